"""A run's output folder: its run record (``sqakd_run.json``) and the rule that no run is overwritten silently.

An existing, non-empty ``output_dir`` needs ``overwrite_output_dir: true`` (which replaces the
recorded run) or ``resume_from_checkpoint`` (which must keep the recorded run's model, data and
quantization settings). The record is written with ``"status": "incomplete"`` when training
starts and marked ``"complete"`` once the model is saved: a run that failed before leaving a
complete checkpoint does not block the corrected rerun, a finished one stays protected.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .distributed import is_main_process
from .resume import check_checkpoint, latest_complete_checkpoint

if TYPE_CHECKING:
    from .recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = ["RUN_RECORD", "METRICS_FILE", "PACKED_SUBDIR", "INCOMPLETE", "COMPLETE", "read_run_record",
           "write_run_record", "mark_run_complete", "is_unfinished", "check_output_dir", "clear_previous_run"]

#: written into output_dir when training starts: identifies the run (no silent overwrite of another one)
RUN_RECORD = "sqakd_run.json"
#: the final evaluation, ``{"student": {...}, "teacher": {...}}``
METRICS_FILE = "sqakd_metrics.json"
#: where the packed model and its model card go
PACKED_SUBDIR = "packed"
#: the run record's ``status`` while training runs (or after it failed) and once the model is saved
INCOMPLETE, COMPLETE = "incomplete", "complete"
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


def _write_record(out: Path, record: Dict[str, Any]) -> None:
    """Write the record atomically (a kill leaves the old record or the new one, never half of one)."""
    tmp = out / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, out / RUN_RECORD)


def write_run_record(recipe: "Recipe", teacher: str, status: str = INCOMPLETE, **facts: Any) -> None:
    """Record the run (package version, teacher, recipe values, ``status`` and ``facts`` such as the mode, the
    resolved data arguments and sources) in its output folder."""
    from ..version import __version__

    out = Path(recipe.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_record(out, {"sqakd_hf_version": __version__, "teacher": teacher, "status": status,
                        "recipe": _jsonable(recipe.record()), **_jsonable(facts)})


def mark_run_complete(out: Path, **facts: Any) -> Dict[str, Any]:
    """Set the run record's status to complete (the trained model is saved), adding ``facts`` (what the run
    did: steps, epochs, evaluation); returns the record."""
    record = read_run_record(Path(out)) or {}
    record = {**record, **_jsonable(facts), "status": COMPLETE}
    _write_record(Path(out), record)
    return record


def is_unfinished(record: Optional[Dict[str, Any]]) -> bool:
    """Whether a run record belongs to a run that started training and did not finish (records written before
    the status existed count as finished)."""
    return bool(record) and record.get("status") == INCOMPLETE


def _resume_latest(out: Path, resume: Any) -> str:
    """The newest complete checkpoint of ``out``; incomplete newer ones are skipped, and said so in one line."""
    from ..errors import RecipeError

    last, skipped = latest_complete_checkpoint(out)
    broken = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    if last is None:
        if skipped:
            raise RecipeError(f"resume_from_checkpoint={resume}: {out} holds no complete checkpoint-* folder to resume "
                              f"from ({broken}); start over with --overwrite_output_dir true")
        raise RecipeError(f"resume_from_checkpoint={resume}: {out} holds no checkpoint-* folder to resume from")
    if skipped and is_main_process():
        logger.warning("sqakd: resume_from_checkpoint: skipping incomplete %s; resuming from %s",
                       ", ".join(f"{p.name} ({why})" for p, why in skipped), last.name)
    return str(last)


def _diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_output_dir(recipe: "Recipe") -> Optional[str]:
    """Refuse to write over another run; returns the checkpoint to resume from (or None).

    ``resume_from_checkpoint: true`` (or ``last``) means the latest ``checkpoint-*`` of ``output_dir``.
    Raises :class:`~sqakd_hf.errors.RecipeError` saying what differs and the ways forward.
    """
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
            resume = _resume_latest(out, resume)
        elif not Path(str(resume)).is_dir():
            raise RecipeError(f"resume_from_checkpoint {resume!r}: no such checkpoint folder")
        else:
            check_checkpoint(Path(str(resume)))
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
    last = latest_complete_checkpoint(out)[0]
    if is_unfinished(record) and last is None:
        return None  # a failed run left nothing to resume: the rerun replaces its leftovers
    if record is None:
        why = f"is not empty ({shown}) and holds no sqakd-hf run"
    else:
        diff = _diff(identity_of(record.get("recipe", {})), now)
        if is_unfinished(record):
            why = f"holds an unfinished run (newest complete checkpoint: {last.name}"
            why += f"; {'; '.join(diff[:6])})" if diff else ")"
        else:
            why = f"holds a different run ({'; '.join(diff[:6])})" if diff else f"already holds this run ({shown})"
    raise RecipeError(
        f"output_dir {out} {why}. Nothing is overwritten silently: pass --overwrite_output_dir true to replace "
        "it, --resume_from_checkpoint true to continue from its last checkpoint, or choose another --output_dir."
    )


def clear_previous_run(out: Path) -> List[str]:
    """``overwrite_output_dir`` (or a rerun after a failed run): remove the replaced run's checkpoints, packed
    model, metrics and record (only when the folder holds a run record; other files are never deleted).
    Returns what was removed."""
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
