"""A run's output folder: its run record (``sqakd_run.json``) and the rule that no run is overwritten silently.

An existing, non-empty ``output_dir`` needs ``overwrite_output_dir: true`` (which replaces the
recorded run) or ``resume_from_checkpoint`` (which must keep the recorded run's model, data and
quantization settings).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:
    from .recipe import Recipe

__all__ = ["RUN_RECORD", "METRICS_FILE", "PACKED_SUBDIR", "read_run_record", "write_run_record",
           "check_output_dir", "clear_previous_run"]

#: written into output_dir when a run starts: identifies the run (no silent overwrite of another one)
RUN_RECORD = "sqakd_run.json"
#: the final evaluation, ``{"student": {...}, "teacher": {...}}``
METRICS_FILE = "sqakd_metrics.json"
#: where the packed model and its model card go
PACKED_SUBDIR = "packed"
_RESUME_LAST = ("true", "last", "1", "yes")


def _jsonable(values: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(values, default=str, sort_keys=True))


def read_run_record(folder: Path) -> Optional[Dict[str, Any]]:
    """The run record in ``folder`` (``{}`` if unreadable), or None if there is none."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def write_run_record(recipe: "Recipe", teacher: str) -> None:
    """Record the run (package version, teacher, recipe values) in its output folder."""
    from ..version import __version__

    out = Path(recipe.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"sqakd_hf_version": __version__, "teacher": teacher, "recipe": _jsonable(recipe.record())}
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))


def _diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_output_dir(recipe: "Recipe") -> Optional[str]:
    """Refuse to write over another run; returns the checkpoint to resume from (or None).

    ``resume_from_checkpoint: true`` (or ``last``) means the latest ``checkpoint-*`` of ``output_dir``.
    Raises :class:`~sqakd_hf.errors.RecipeError` saying what differs and the ways forward.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from ..errors import RecipeError
    from .recipe import identity_of

    out = Path(recipe.training.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir {out} exists and is not a folder")
    resume = recipe.training.resume_from_checkpoint
    existing = sorted(os.listdir(out)) if out.is_dir() else []
    record = read_run_record(out) if existing else None
    now = _jsonable(recipe.identity())
    if resume not in (None, "", False):
        if str(resume).lower() in _RESUME_LAST:
            last = get_last_checkpoint(str(out)) if out.is_dir() else None
            if last is None:
                raise RecipeError(f"resume_from_checkpoint={resume}: {out} holds no checkpoint-* folder to resume from")
            resume = last
        elif not Path(str(resume)).is_dir():
            raise RecipeError(f"resume_from_checkpoint {resume!r}: no such checkpoint folder")
        if record and not recipe.run.overwrite_output_dir:
            diff = _diff(identity_of(record.get("recipe", {})), now)
            if diff:
                raise RecipeError(
                    f"output_dir {out} holds a different run; resuming it with other model/data/quantization "
                    f"settings would mix two runs ({'; '.join(diff)}). Use the recorded settings, another "
                    "output_dir, or overwrite_output_dir: true."
                )
        return str(resume)
    if not existing or recipe.run.overwrite_output_dir:
        return None
    shown = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
    if record is None:
        why = f"is not empty ({shown}) and holds no sqakd-hf run"
    else:
        diff = _diff(identity_of(record.get("recipe", {})), now)
        why = f"holds a different run ({'; '.join(diff[:6])})" if diff else f"already holds this run ({shown})"
    raise RecipeError(
        f"output_dir {out} {why}. Nothing is overwritten silently: pass --overwrite_output_dir true to replace "
        "it, --resume_from_checkpoint true to continue from its last checkpoint, or choose another --output_dir."
    )


def clear_previous_run(out: Path) -> List[str]:
    """``overwrite_output_dir``: remove the replaced run's checkpoints, packed model, metrics and record (only
    when the folder holds a run record; other files are never deleted). Returns what was removed."""
    if read_run_record(out) is None:
        return []
    removed = []
    for child in sorted(out.iterdir()):
        if child.is_dir() and (child.name.startswith("checkpoint-") or child.name == PACKED_SUBDIR):
            shutil.rmtree(child)
            removed.append(child.name)
    for name in (METRICS_FILE, RUN_RECORD):
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    return removed
