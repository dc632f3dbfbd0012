"""``sqakd-hf eval``: evaluate a saved quantized model (training or packed form) and its teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ..errors import InputError, RecipeError
from .arguments import DataArguments, EvalArguments, ModelArguments
from .models import inspect_checkpoint, inspect_teacher, load_fp_teacher, load_processor
from .runs import read_run_record
from .splits import load_and_check_data, preprocess

__all__ = ["run_eval"]


def _find_teacher(model_path: Path) -> str | None:
    """The teacher named by the run record of the model's folder (or of the run around a packed form)."""
    for folder in (model_path, model_path.parent):
        record = read_run_record(folder)
        if record and record.get("teacher"):
            return record["teacher"]
    return None


def load_saved_model(path: Path) -> Any:
    """:func:`~sqakd_hf.load_quantized`; a config.json that contradicts the weights (edited, or copied from
    another model) raises :class:`InputError` naming the file and the fix instead of a loader traceback."""
    from ..checkpoint import load_quantized
    from ..errors import SQAKDCheckpointError

    try:
        return load_quantized(path)
    except SQAKDCheckpointError as err:  # names the file, the contradiction and the fix
        raise InputError(f"model_path {path}: {' '.join(str(err).split())}") from None
    except RuntimeError as err:
        text = " ".join(str(err).split())
        if "size mismatch" not in text:
            raise
        cause = text if len(text) <= 300 else text[:300] + "..."
        raise InputError(f"model_path {path}: the weights do not match {path / 'config.json'} ({cause}); "
                         "restore the config.json saved with these weights (its quantization_config, e.g. "
                         "weight_granularity, must be the one the model was trained with) or save the model "
                         "again") from None


def run_eval(eval_args: EvalArguments, model_args: ModelArguments, data: DataArguments) -> Dict[str, Dict[str, float]]:
    """Metrics ``{"student": {...}, "teacher": {...}}`` of the model at ``eval_args.model_path`` (and of its
    teacher, if known) on ``data``'s eval split (default ``test``)."""
    import torch

    from ..training.metrics import evaluate_models

    if not eval_args.model_path:
        raise RecipeError("no model to evaluate: pass --model_path DIR (or a recipe whose output_dir holds one)")
    path = Path(eval_args.model_path)
    if not (path / "config.json").is_file():
        raise InputError(f"model_path {path}: no saved model there (no config.json); give the output_dir of a "
                         "sqakd-hf train run or its packed/ folder")
    info = inspect_checkpoint(str(path), ModelArguments(teacher=str(path), task=model_args.task), what="model")
    if not info.config.get("quantization_config"):
        raise InputError(f"model_path {path} holds a full-precision model (no quantization_config in config.json)")
    model_args.teacher = model_args.teacher or _find_teacher(path)
    if not data.dataset_name:
        raise RecipeError("no dataset to evaluate on: pass --dataset_name (or a recipe)")
    data.eval_split = data.eval_split or "test"
    teacher_info = inspect_teacher(model_args) if model_args.teacher else None
    raw = load_and_check_data(data, info, need_train=False, cache_dir=model_args.cache_dir)
    processor = load_processor(str(path), info, fallback=model_args.teacher)
    student = load_saved_model(path)
    teacher = load_fp_teacher(teacher_info, model_args) if teacher_info is not None else None
    _, eval_ds, collator = preprocess(raw, data, info, student, processor)
    device = torch.device(eval_args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    metrics = evaluate_models(student, teacher, eval_ds, collator, batch_size=eval_args.batch_size,
                              temperature=eval_args.temperature, device=device,
                              shifted_labels=info.task == "causal-lm")
    if eval_args.output_file:
        Path(eval_args.output_file).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
