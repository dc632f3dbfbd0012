"""Which ``checkpoint-*`` folder a resumed run continues from.

The Trainer writes a checkpoint's ``trainer_state.json`` last, so a run killed while writing one
leaves a folder without it (or without weights): such a folder is skipped, never resumed from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import RecipeError

__all__ = ["TRAINER_STATE", "WEIGHT_FILES", "checkpoint_folders", "incomplete_reason", "latest_complete_checkpoint",
           "check_checkpoint"]

TRAINER_STATE = "trainer_state.json"
#: any one of these makes a checkpoint's weights (single file, sharded index, adapter)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(out: Path) -> List[Path]:
    """The ``checkpoint-<step>`` folders of ``out``, newest (highest step) first."""
    if not Path(out).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(out).iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, key=lambda item: item[0], reverse=True)]


def incomplete_reason(folder: Path) -> Optional[str]:
    """Why ``folder`` cannot be resumed from (e.g. ``"no trainer_state.json"``), or None if it is complete."""
    folder = Path(folder)
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is truncated"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no weights file (model.safetensors)"
    return None


def latest_complete_checkpoint(out: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """``(newest complete checkpoint or None, [(newer incomplete folder, why), ...])``."""
    skipped: List[Tuple[Path, str]] = []
    for folder in checkpoint_folders(out):
        why = incomplete_reason(folder)
        if why is None:
            return folder, skipped
        skipped.append((folder, why))
    return None, skipped


def check_checkpoint(path: Path) -> None:
    """Raise :class:`RecipeError` (one line, with the fix) if the explicitly named checkpoint is incomplete."""
    why = incomplete_reason(path)
    if why is not None:
        raise RecipeError(
            f"resume_from_checkpoint {str(path)!r} is incomplete ({why}): the run was probably stopped while writing "
            "it. Resume from an earlier checkpoint-* folder, or pass --resume_from_checkpoint true to use the newest "
            "complete one."
        )
