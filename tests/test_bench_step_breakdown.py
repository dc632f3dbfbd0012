"""bench/step_breakdown.py in its tiny mode: every row is measured and written."""

from __future__ import annotations

import json

import pytest


def test_step_breakdown_smoke_measures_every_part(tmp_path):
    breakdown = pytest.importorskip("bench.step_breakdown")
    md = breakdown.main(["--preset", "smoke", "--workloads", "vision,llama", "--reps", "1", "--threads", "0",
                            "--out", str(tmp_path)],
                        log=lambda msg: None)
    result = json.loads((tmp_path / "step_breakdown_smoke.json").read_text())
    for name in ("vision", "llama"):
        med = result["workloads"][name]["median_s"]
        assert set(med) == {"fp", "student, quantizers bypassed", "weights only", "activations only", "fake_quant",
                            "fake_quant, fused", "teacher forward", "KD loss (fwd + bwd)", "FP loss (fwd + bwd)",
                            "sqakd", "sqakd, fused"}
        assert all(v > 0 for v in med.values())
    assert "| teacher forward |" in md.read_text()
