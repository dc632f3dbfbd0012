"""``sqakd-hf eval``: evaluate a saved quantized model (training or packed form) and its teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Set, Tuple

from ..errors import InputError, RecipeError
from .arguments import DataArguments, EvalArguments, ModelArguments
from .models import inspect_checkpoint, inspect_teacher, load_fp_teacher, load_processor
from .runs import read_run_record
from .sources import DataSource
from .splits import load_and_check_data, preprocess

__all__ = ["run_eval", "run_defaults", "load_saved_model"]


#: data keys that name the run's dataset: given any of them, the run record's data sources are not used
DATASET_KEYS = ("dataset_name", "dataset_config_name", "data_dir", "data_files", "dataset_kwargs", "train_files",
                "train_split")
#: data keys that name the evaluation data: given any of them (and no dataset key), the record's dataset is used
EVAL_KEYS = ("eval_split", "eval_files", "eval_dataset_name", "eval_dataset_config_name", "eval_dataset_kwargs")
#: data keys that say how the run read its data (taken from its record unless given)
PREPROCESSING_KEYS = ("max_length", "image_size", "text_column", "text_pair_column", "label_column",
                      "image_column", "eval_image_column", "eval_text_column", "eval_label_column", "use_labels")


def _run_record_of(model_path: Path) -> Dict[str, Any]:
    """The run record of the model's folder (or of the run around a packed form); ``{}`` if there is none."""
    for folder in (model_path, model_path.parent):
        record = read_run_record(folder)
        if record:
            return record
    return {}


def run_defaults(model_path: Optional[str], given: Set[str]) -> Dict[str, Any]:
    """What the run record of ``model_path`` says for the keys the user did not set: the teacher (an absolute
    path or a Hub id), its library and task, the run's data sources (unless the user named another source), how
    it read them (``max_length``, columns, ...) and its evaluation temperature and batch size."""
    if not model_path:
        return {}
    record = _run_record_of(Path(model_path))
    if not record:
        return {}
    recipe = record.get("recipe") or {}
    data = record.get("data") or recipe  # runs recorded before the resolved data arguments: as written
    values: Dict[str, Any] = {"teacher": record.get("teacher")}
    values.update({k: recipe.get(k) for k in ("library", "task", "revision", "temperature")})
    values["batch_size"] = recipe.get("per_device_eval_batch_size")
    values.update({k: data.get(k) for k in PREPROCESSING_KEYS})
    if not given & set(DATASET_KEYS):
        values.update({k: data.get(k) for k in DATASET_KEYS + (() if given & set(EVAL_KEYS) else EVAL_KEYS)})
    return {k: v for k, v in values.items() if v is not None and k not in given}


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


def run_eval(eval_args: EvalArguments, model_args: ModelArguments, data: DataArguments
             ) -> Tuple[Dict[str, Dict[str, float]], DataSource]:
    """Metrics ``{"student": {...}, "teacher": {...}}`` of the model at ``eval_args.model_path`` (and of its
    teacher, if known) on the evaluation data (default: split ``test`` of the dataset), and that data's source."""
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
    if not (data.dataset_name or data.train_files or data.eval_files or data.eval_dataset_name):
        raise RecipeError("no dataset to evaluate on: pass --dataset_name or --eval_files (or a recipe)")
    if not data.has_eval:
        if not data.dataset_name and not data.eval_dataset_name:
            raise RecipeError("no evaluation data: pass --eval_files FILE, --eval_split SPLIT or --dataset_name")
        data.eval_split = "test"
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
    return metrics, raw.eval_source
