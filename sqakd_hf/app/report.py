"""What the commands print: the summary of a training run and the table of an evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

__all__ = ["fmt", "folder_bytes", "train_summary", "eval_table"]

Metrics = Dict[str, Dict[str, float]]


def fmt(value: Optional[float], pct: bool = True) -> str:
    """``0.9123`` -> ``91.23%`` (or ``0.9123`` with ``pct=False``); ``-`` for a missing value."""
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if pct else f"{value:.4f}"


def folder_bytes(path: Path) -> int:
    """Bytes of the ``*.safetensors`` weights in ``path``."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def train_summary(student: str, teacher: str, out: Path, packed_dir: Optional[Path], metrics: Metrics,
                  eval_split: Optional[str], kind: str = "SQAKD") -> str:
    """E.g. ``SQAKD lsq-W4A4 student of <teacher>`` (``PTQ lsq-W4A4 model of ...`` for ``kind="PTQ"``), where its
    two forms are, and the final evaluation."""
    what = "student" if kind == "SQAKD" else "model"
    lines = [f"\n{kind} {student} {what} of {teacher}", f"  training form (resume / reload): {out}"]
    if packed_dir is not None:
        lines.append(f"  packed form + model card:        {packed_dir} ({folder_bytes(packed_dir) / 1e6:.2f} MB)")
    if metrics:
        s, t = metrics.get("student", {}), metrics.get("teacher", {})
        lines.append(f"  eval ({eval_split}): student accuracy {fmt(s.get('accuracy'))}, teacher accuracy "
                     f"{fmt(t.get('accuracy'))}, teacher agreement {fmt(s.get('teacher_agreement'))}, "
                     f"KD loss {fmt(s.get('kd_loss'), pct=False)}")
    return "\n".join(lines)


def eval_table(metrics: Metrics, model_path: str) -> str:
    """One row per model: accuracy, teacher agreement, KD loss (or hidden-state MSE)."""
    rows = [("model", "accuracy", "teacher agreement", "KD loss")]
    if "teacher" in metrics:
        rows.append(("teacher", fmt(metrics["teacher"].get("accuracy")), "-", "-"))
    s = metrics.get("student", {})
    rows.append((model_path, fmt(s.get("accuracy")), fmt(s.get("teacher_agreement")),
                 fmt(s.get("kd_loss", s.get("hidden_mse")), pct=False)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
