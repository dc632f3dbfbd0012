"""``sqakd-hf export``: a ``ptq`` run folder written as compressed-tensors (loaded by plain transformers in a fresh
process that never imports sqakd_hf) and as ONNX QDQ (run by onnxruntime), each reproducing the student; bad
input is one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")
ort = pytest.importorskip("onnxruntime")

from cli_fixtures import (  # noqa: E402
    image_recipe,
    save_bert_teacher,
    save_timm_teacher,
    tiny_bert_tokenizer,
    write_digits_imagefolder,
    write_recipe,
    write_text_csv,
)
from sqakd_hf.app.cli import main  # noqa: E402
from sqakd_hf.checkpoint import load_quantized  # noqa: E402

SENTENCES = ["the movie was great and fun", "awful boring plot and bad acting", "a plain day"]

_FRESH = textwrap.dedent("""
    import json, sys
    import torch, transformers
    folder = sys.argv[1]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = tok(json.loads(sys.argv[2]), return_tensors="pt", padding=True)
    with torch.no_grad():
        print(json.dumps({"logits": model(**batch).logits.tolist(),
                          "sqakd_hf": any(m.split(".")[0] == "sqakd_hf" for m in sys.modules)}))
""")


def _text_run(tmp: Path, name: str, **extra) -> Path:
    teacher = save_bert_teacher(tmp / "bert-teacher") if not (tmp / "bert-teacher").exists() else tmp / "bert-teacher"
    train = write_text_csv(tmp / "train.csv", 32, with_labels=False)
    values = dict(teacher=str(teacher), train_files=str(train), text_column="text", method="lsq", weight_bits=4,
                  act_bits=8, output_dir=str(tmp / name), max_length=16, per_device_train_batch_size=8,
                  per_device_eval_batch_size=8, calibration_batches=2, report_to="none", disable_tqdm=True, seed=0)
    values.update(extra)
    assert main(["ptq", str(write_recipe(tmp / f"{name}.yaml", **values))]) == 0
    return tmp / name


@pytest.fixture(scope="module")
def static_run(tmp_path_factory) -> Path:
    return _text_run(tmp_path_factory.mktemp("export"), "static", act_granularity="per_tensor")


def _student_logits(folder: Path) -> torch.Tensor:
    student = load_quantized(folder).eval()
    batch = tiny_bert_tokenizer()(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return student(**batch).logits


def test_compressed_tensors_from_a_run_folder_loads_without_sqakd_hf(static_run, tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["export", str(static_run), "--format", "compressed-tensors", "--output", str(out)]) == 0
    assert f"wrote compressed-tensors to {out}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", _FRESH, str(out), json.dumps(SENTENCES)], capture_output=True,
                         text=True, env=env, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    assert not fresh["sqakd_hf"]  # the tokenizer was copied and the weights load with plain transformers
    expected = _student_logits(static_run)
    got = torch.tensor(fresh["logits"])
    assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()) + 1e-6), (got, expected)


def test_onnx_from_the_packed_folder_runs_in_onnxruntime(static_run, tmp_path):
    path = tmp_path / "student.onnx"
    assert main(["export", str(static_run / "packed"), "--format", "onnx", "--output", str(path)]) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = tiny_bert_tokenizer()(SENTENCES, return_tensors="np", padding=True)
    feeds = {i.name: batch[i.name] for i in session.get_inputs()}
    got = torch.from_numpy(session.run(None, feeds)[0])
    expected = _student_logits(static_run / "packed")
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()) + 1e-5), (got, expected)


def test_onnx_of_a_timm_run_uses_the_model_input_size(tmp_path):
    imgs = write_digits_imagefolder(tmp_path / "digits", n_train=32, n_test=8)
    teacher = save_timm_teacher(tmp_path / "timm-teacher")
    recipe = write_recipe(tmp_path / "r.yaml", **image_recipe(tmp_path, teacher, imgs, weight_bits=8, act_bits=8))
    assert main(["ptq", str(recipe)]) == 0
    path = tmp_path / "timm.onnx"
    assert main(["export", str(tmp_path / "out"), "--format", "onnx", "--output", str(path)]) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    x = torch.rand(4, *[int(d) for d in inp.shape[1:]])
    student = load_quantized(tmp_path / "out").eval()
    with torch.no_grad():
        expected = student(x)
    got = torch.from_numpy(session.run(None, {inp.name: x.numpy()})[0])
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()) + 1e-5)


def test_bad_export_input_is_one_line_with_exit_2(static_run, tmp_path, capsys):
    per_token = _text_run(tmp_path, "per-token")  # the default: per-token activations
    capsys.readouterr()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    cases = {
        "per-token grid": ([str(per_token), "--format", "compressed-tensors", "--output", str(tmp_path / "a")],
                           "per_tensor"),
        "no model": ([str(tmp_path / "nothing"), "--format", "onnx", "--output", str(tmp_path / "b.onnx")],
                     "no saved model"),
        "occupied output": ([str(static_run), "--format", "compressed-tensors", "--output", str(occupied)],
                            "--overwrite"),
        "onnx path": ([str(static_run), "--format", "onnx", "--output", str(tmp_path / "c")], ".onnx"),
        "inside the model": ([str(static_run), "--format", "compressed-tensors", "--output", str(static_run / "ct")],
                             "inside the model folder"),
        "unknown format": ([str(static_run), "--format", "tflite", "--output", str(tmp_path / "d")], "tflite"),
    }
    for name, (argv, needle) in cases.items():
        assert main(["export", *argv]) == 2, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("sqakd-hf export: error: ")]
        assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err, (name, err)
    assert not (tmp_path / "a").exists() and os.listdir(occupied) == []
