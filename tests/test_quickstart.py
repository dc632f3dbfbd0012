"""``sqakd-hf quickstart --fast``: teacher on the digits, PTQ and label-free SQAKD students at W4A4 and
W2A2, packed models with model cards, and the comparison table (mechanics; the full run's quality is
reported by the quickstart itself and the benchmarks)."""

from __future__ import annotations

import json

import torch

from sqakd_hf import is_quantized
from sqakd_hf.app.cli import main
from sqakd_hf.app.data import load_digits_splits
from sqakd_hf.checkpoint import load_quantized


def test_quickstart_fast(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | bits | accuracy | teacher agreement | KD loss | size |" in printed
    for row in ("| teacher | FP32 |", "| PTQ lsq | W4A4 |", "| SQAKD lsq | W4A4 |", "| PTQ lsq | W2A2 |",
                "| SQAKD lsq | W2A2 |"):
        assert row in printed
    assert "Wall time:" in printed
    results = json.loads((out / "results.json").read_text())
    rows = {(r["model"], r["bits"]): r for r in results["rows"]}
    assert len(rows) == 5 and results["fast"] is True
    assert 0 <= rows[("SQAKD lsq", "W2A2")]["accuracy"] <= 1
    # packed students: smaller than the teacher, with a model card, loadable and quantized
    teacher_bytes = rows[("teacher", "FP32")]["size_bytes"]
    x = load_digits_splits(image_size=32)["test"][:4]["pixel_values"]
    for bits in (4, 2):
        folder = out / f"sqakd-lsq-w{bits}a{bits}"
        assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
        assert rows[("SQAKD lsq", f"W{bits}A{bits}")]["size_bytes"] < teacher_bytes / 4
        model = load_quantized(folder)
        assert is_quantized(model)
        with torch.no_grad():
            assert model(x).shape == (4, 10)
        card = (folder / "README.md").read_text()
        assert "lsq" in card
    # the teacher is a real timm checkpoint folder
    teacher_cfg = json.loads((out / "teacher" / "config.json").read_text())
    assert teacher_cfg["architecture"] == "test_resnet" and teacher_cfg["num_classes"] == 10
    # re-running into the same quickstart folder is allowed; a foreign folder is not
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["quickstart", "--fast", "--output_dir", str(other)]) == 2
    assert "holds no earlier quickstart" in capsys.readouterr().err


def test_quickstart_bad_options(tmp_path, capsys):
    assert main(["quickstart", "--bits", "4,x", "--output_dir", str(tmp_path / "a")]) == 2
    assert "--bits must be comma-separated integers" in capsys.readouterr().err
    assert main(["quickstart", "--bits", "12", "--output_dir", str(tmp_path / "b")]) == 2
    assert "weight_bits must be an integer in 1..8" in capsys.readouterr().err
    assert main(["quickstart", "--method", "nope", "--output_dir", str(tmp_path / "c")]) == 2
    assert "method must be one of" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
