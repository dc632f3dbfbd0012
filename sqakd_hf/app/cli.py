"""The ``sqakd-hf`` command (also ``python -m sqakd_hf``).

    sqakd-hf train RECIPE.yaml [--key value ...]     label-free QAT of a teacher checkpoint
    sqakd-hf eval [RECIPE.yaml] [--model_path DIR] [--key value ...]
    sqakd-hf quickstart [--output_dir DIR] [--method lsq] [--bits 4,2] [--epochs N] [--fast]

``train`` runs unchanged as one process or under ``accelerate launch`` (DDP). Every check of
the input (recipe keys and values, files, dataset columns, model/data modality, the output
folder) runs before any model is loaded or trained; a failed check prints one clear error
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .data import (
    DIGITS,
    UNLABELED,
    Columns,
    dataset_length,
    ensure_pad_token,
    image_collator,
    is_local_path,
    label_id_map,
    limit_samples,
    load_split,
    prepare_image_dataset,
    prepare_text_dataset,
    processor_image_transform,
    resolve_columns,
    text_collator,
    timm_image_transform,
)
from ..errors import DataError, InputError, RecipeError
from .recipe import (
    ARGUMENT_GROUPS,
    DataArguments,
    ModelArguments,
    Recipe,
    _check_keys,
    _coerce,
    _field_types,
    format_recipe_help,
    parse_overrides,
    parse_recipe,
    read_recipe_file,
    recipe_parser,
    runtime_defaults,
)

logger = logging.getLogger("sqakd_hf.cli")

#: written into output_dir when a run starts: identifies the run (no silent overwrite of another one)
RUN_RECORD = "sqakd_run.json"
PACKED_SUBDIR = "packed"
METRICS_FILE = "sqakd_metrics.json"
#: recipe groups that define what a run produces (a resume must keep them)
_IDENTITY_GROUPS = ("model", "data", "quantization")


# ---- logging ------------------------------------------------------------------------------------------
def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def _setup_logging() -> None:
    level = logging.INFO if _is_main_process() else logging.WARNING
    root = logging.getLogger("sqakd_hf")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


def _say(msg: str) -> None:
    """Print on the main process only."""
    if _is_main_process():
        print(msg, flush=True)


# ---- output folder --------------------------------------------------------------------------------------
def _identity(values: Dict[str, Any]) -> Dict[str, Any]:
    keys = {f for name, cls in ARGUMENT_GROUPS if name in _IDENTITY_GROUPS for f in _field_types([(name, cls)])}
    return {k: v for k, v in values.items() if k in keys}


def _jsonable(values: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(values, default=str, sort_keys=True))


def _read_record(out: Path) -> Optional[Dict[str, Any]]:
    path = out / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_output_dir(recipe: Recipe) -> Optional[str]:
    """Refuse to write over another run; returns the checkpoint to resume from (or None).

    An existing, non-empty ``output_dir`` needs ``overwrite_output_dir: true`` or
    ``resume_from_checkpoint`` (``true``/``last`` = its latest ``checkpoint-*``). A resume must
    keep the recorded run's model, data and quantization settings.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(recipe.training.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output_dir {out} exists and is not a folder")
    resume = recipe.training.resume_from_checkpoint
    existing = sorted(os.listdir(out)) if out.is_dir() else []
    record = _read_record(out) if existing else None
    now = _jsonable(_identity(recipe.values))
    if resume not in (None, "", False):
        if str(resume).lower() in ("true", "last", "1", "yes"):
            last = get_last_checkpoint(str(out)) if out.is_dir() else None
            if last is None:
                raise RecipeError(f"resume_from_checkpoint={resume}: {out} holds no checkpoint-* folder to resume from")
            resume = last
        elif not Path(str(resume)).is_dir():
            raise RecipeError(f"resume_from_checkpoint {resume!r}: no such checkpoint folder")
        if record and not recipe.run.overwrite_output_dir:
            diff = _diff(_identity(record.get("recipe", {})), now)
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
        diff = _diff(_identity(record.get("recipe", {})), now)
        why = (f"holds a different run ({'; '.join(diff[:6])})" if diff
               else f"already holds this run ({shown})")
    raise RecipeError(
        f"output_dir {out} {why}. Nothing is overwritten silently: pass --overwrite_output_dir true to replace "
        "it, --resume_from_checkpoint true to continue from its last checkpoint, or choose another --output_dir."
    )


def clear_previous_run(out: Path) -> List[str]:
    """``overwrite_output_dir``: remove the replaced run's checkpoints and packed model (only when the
    folder holds a sqakd-hf run record; other files are never deleted). Returns what was removed."""
    import shutil

    if _read_record(out) is None:
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


def write_run_record(recipe: Recipe, teacher: str) -> None:
    out = Path(recipe.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .. import __version__

    record = {"sqakd_hf_version": __version__, "teacher": teacher, "recipe": _jsonable(recipe.values)}
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))


# ---- validation before any work --------------------------------------------------------------------------
def validate_recipe(recipe: Recipe):
    """Cheap checks of a parsed recipe; returns the :class:`~sqakd_hf.QuantConfig`."""
    if not recipe.model.teacher:
        raise RecipeError("the recipe sets no teacher (a Hub id or a local checkpoint folder)")
    if not recipe.data.dataset_name:
        raise RecipeError(f"the recipe sets no dataset_name (a Hub id, a local folder/file, or {DIGITS!r})")
    if "output_dir" not in recipe.values:
        raise RecipeError("the recipe sets no output_dir (where the student is written)")
    if recipe.data.streaming and recipe.training.max_steps <= 0:
        raise RecipeError("streaming: true needs max_steps > 0 (a streamed dataset has no length to count epochs)")
    if not recipe.data.eval_split and str(getattr(recipe.training.eval_strategy, "value", "no")) != "no":
        raise RecipeError(f"eval_strategy {recipe.training.eval_strategy.value!r} needs an eval_split")
    quant = recipe.quant.to_quant_config()
    if recipe.training.push_to_hub and not recipe.run.save_packed:
        raise RecipeError("push_to_hub uploads the packed model: it needs save_packed: true")
    return quant


@dataclass
class RawData:
    """Loaded, checked (not yet preprocessed) splits."""

    train: Any
    eval: Any
    train_columns: Columns
    eval_columns: Optional[Columns]
    eval_label_map: Optional[Dict[Any, int]] = None


def load_and_check_data(data: DataArguments, info, need_train: bool = True, keep_train_labels: bool = False,
                        cache_dir: Optional[str] = None) -> RawData:
    """Load the configured splits and check their columns against the teacher (raises :class:`DataError`)."""
    modality = info.modality
    train = train_cols = None
    if need_train:
        train = load_split(data, data.train_split, cache_dir)
        what = f"dataset {data.dataset_name} (split {data.train_split})"
        train_cols = resolve_columns(train, data, modality, what)
        if not keep_train_labels:
            train_cols.label = None
        elif train_cols.label is None or label_id_map(train, train_cols.label, info.id2label) is UNLABELED:
            raise DataError(f"ce_weight > 0 needs labels that match the teacher's classes, but {what} has none "
                            "(set label_column, or ce_weight: 0 for label-free SQAKD)")
        train = limit_samples(train, data.max_train_samples)
    evals = eval_cols = label_map = None
    if data.eval_split:
        evals = load_split(data, data.eval_split, cache_dir)
        what = f"dataset {data.dataset_name} (split {data.eval_split})"
        eval_cols = resolve_columns(evals, data, modality, what)
        if info.task not in ("image-classification", "text-classification"):
            eval_cols.label = None
        if eval_cols.label is not None:
            label_map = label_id_map(evals, eval_cols.label, info.id2label)
            if label_map is UNLABELED:
                eval_cols.label, label_map = None, None
        evals = limit_samples(evals, data.max_eval_samples)
    return RawData(train, evals, train_cols, eval_cols, label_map)


def preprocess(raw: RawData, data: DataArguments, info, teacher, processor, train_label_map=None
               ) -> Tuple[Any, Any, Callable]:
    """Preprocessed ``(train, eval, collator)``: images via timm's data config or the image processor,
    text via the tokenizer."""
    if info.modality == "image":
        size = data.image_size
        if info.library == "timm":
            from timm.data import resolve_data_config

            size = size or resolve_data_config({}, model=teacher)["input_size"][-1]
            eval_tf = timm_image_transform(teacher, data.image_size)
            train_tf = timm_image_transform(teacher, data.image_size, training=True) if data.augment else eval_tf
        else:
            eval_tf = train_tf = processor_image_transform(processor, data.image_size)
        train = (prepare_image_dataset(raw.train, train_tf, raw.train_columns, size, train_label_map)
                 if raw.train is not None else None)
        evals = (prepare_image_dataset(raw.eval, eval_tf, raw.eval_columns, size, raw.eval_label_map)
                 if raw.eval is not None else None)
        return train, evals, image_collator
    if info.task == "causal-lm":
        ensure_pad_token(processor)
    train = (prepare_text_dataset(raw.train, processor, raw.train_columns, data.max_length, train_label_map)
             if raw.train is not None else None)
    evals = (prepare_text_dataset(raw.eval, processor, raw.eval_columns, data.max_length, raw.eval_label_map)
             if raw.eval is not None else None)
    return train, evals, text_collator(processor)


def _check_task_args(recipe: Recipe, info) -> None:
    if info.task == "feature-extraction" and recipe.training.distill_target == "logits":
        raise RecipeError(f"teacher {info.name!r} has no logits (task feature-extraction): set "
                          "distill_target: hidden_states (MSE or cosine on the last hidden state)")


def _setup_distributed(recipe: Recipe) -> None:
    """DDP on CPU (``accelerate launch --multi_gpu`` / ``torchrun``) needs the gloo backend."""
    import torch

    from transformers.training_args import ParallelMode

    training = recipe.training
    if not torch.cuda.is_available():
        training.dataloader_pin_memory = False
    _ = training.device  # initialises the process group under a launcher
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and training.parallel_mode != ParallelMode.DISTRIBUTED:
        raise RecipeError(
            f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but the training arguments are not set up for "
            "distributed training; on a machine without GPUs set use_cpu: true and ddp_backend: gloo "
            "(sqakd-hf train does this unless the recipe sets them)"
        )
    if training.world_size > 1:
        print(f"sqakd-hf: process {training.process_index}/{training.world_size} on {training.device}", flush=True)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---- train ------------------------------------------------------------------------------------------------
def _fmt(v: Optional[float], pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.4f}"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def run_train(recipe: Recipe) -> Dict[str, Any]:
    """Run a parsed recipe: checks, data, teacher/student, SQAKD training, evaluation, saving, pushing.

    Returns ``{"output_dir", "packed_dir", "metrics"}``.
    """
    from .models import inspect_teacher, load_processor, load_teacher_and_student

    quant_config = validate_recipe(recipe)
    resume = check_output_dir(recipe)
    info = inspect_teacher(recipe.model)
    _check_task_args(recipe, info)
    training = recipe.training
    push, training.push_to_hub = training.push_to_hub, False  # we push the packed model + card ourselves
    _setup_distributed(recipe)

    # checks run on every rank (identically) before any rank waits on another
    raw = load_and_check_data(recipe.data, info, keep_train_labels=training.ce_weight > 0,
                              cache_dir=recipe.model.cache_dir)
    processor = load_processor(recipe.model.teacher, info)
    _barrier()  # every rank passed every check
    with training.main_process_first(desc="loading the models and preparing the data"):
        teacher, student = load_teacher_and_student(info, quant_config, recipe.model)
        train_map = (label_id_map(raw.train, raw.train_columns.label, info.id2label)
                     if raw.train_columns.label is not None else None)
        train_ds, eval_ds, collator = preprocess(raw, recipe.data, info, teacher, processor, train_map)
    if info.modality == "image":
        training.remove_unused_columns = False  # images are transformed on the fly from their raw column
    if training.should_save:
        if recipe.run.overwrite_output_dir and resume is None and Path(training.output_dir).is_dir():
            removed = clear_previous_run(Path(training.output_dir))
            if removed:
                logger.warning("sqakd: overwrite_output_dir: removed the previous run's %s", ", ".join(removed))
        write_run_record(recipe, info.name)

    from ..training.trainer import SQAKDTrainer

    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=training, train_dataset=train_ds,
                           eval_dataset=eval_ds, data_collator=collator, processing_class=processor)
    _say(f"sqakd-hf: {quant_config.short_name} student of {info.name} ({info.library}, {info.task}); "
         f"{dataset_length(train_ds) or 'streamed'} training examples, no labels used"
         + (" (ce_weight > 0: labels used)" if training.ce_weight > 0 else ""))
    trainer.train(resume_from_checkpoint=resume)
    _barrier()

    out = Path(training.output_dir)
    model = trainer.model
    metrics: Dict[str, Dict[str, float]] = {}
    if eval_ds is not None and trainer.is_world_process_zero():
        from ..training.metrics import evaluate_models

        metrics = evaluate_models(model, teacher if recipe.run.eval_teacher else None, eval_ds, collator,
                                  batch_size=training.per_device_eval_batch_size, temperature=training.temperature,
                                  device=training.device, shifted_labels=info.task == "causal-lm",
                                  desc="Evaluating teacher and student")
    if info.library == "timm":
        if trainer.is_world_process_zero():
            from ..serialization.timm_layout import save_pretrained_timm

            save_pretrained_timm(model, out)
    else:
        trainer.save_model(str(out))
    packed_dir = out / PACKED_SUBDIR if recipe.run.save_packed else None
    if trainer.is_world_process_zero():
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if packed_dir is not None:
            _save_packed_with_card(model, packed_dir, processor, recipe, info, metrics)
        _print_summary(recipe, info, quant_config, out, packed_dir, metrics)
        if push:
            from ..hub.push import push_to_hub

            repo_id = training.hub_model_id or out.resolve().name
            commit = push_to_hub(packed_dir, repo_id, token=training.hub_token, private=training.hub_private_repo)
            _say(f"pushed the packed model and its model card to {getattr(commit, 'repo_url', repo_id)}")
    _barrier()
    return {"output_dir": str(out), "packed_dir": str(packed_dir) if packed_dir else None, "metrics": metrics}


def _training_summary(recipe: Recipe) -> Dict[str, Any]:
    t = recipe.training
    return {
        "temperature": t.temperature, "learning_rate": t.learning_rate,
        "quantizer_learning_rate": t.effective_quantizer_learning_rate, "weight_decay": t.weight_decay,
        "lr_scheduler_type": str(getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)),
        "optim": str(getattr(t.optim, "value", t.optim)), "epochs": t.num_train_epochs, "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_train_batch_size, "dataset": recipe.data.dataset_name,
        "labels_used": t.ce_weight > 0,
    }


def _save_packed_with_card(model, packed_dir: Path, processor, recipe: Recipe, info, metrics) -> None:
    from ..checkpoint import save_packed
    from ..hub.card_info import write_model_card

    save_packed(model, packed_dir, fp_dtype=recipe.run.packed_fp_dtype)
    if processor is not None:
        processor.save_pretrained(str(packed_dir))
    name = recipe.data.dataset_name
    datasets = [name] if name and not is_local_path(name) and name != DIGITS and "/" in name else None
    write_model_card(model, packed_dir, teacher=info.name, metrics=metrics or None,
                     training=_training_summary(recipe), datasets=datasets)


def _print_summary(recipe: Recipe, info, quant_config, out: Path, packed_dir: Optional[Path], metrics) -> None:
    lines = [f"\nSQAKD {quant_config.short_name} student of {info.name}",
             f"  training form (resume / reload): {out}"]
    if packed_dir is not None:
        lines.append(f"  packed form + model card:        {packed_dir} ({_dir_bytes(packed_dir) / 1e6:.2f} MB)")
    if metrics:
        s, t = metrics.get("student", {}), metrics.get("teacher", {})
        lines.append(f"  eval ({recipe.data.eval_split}): student accuracy {_fmt(s.get('accuracy'))}, teacher accuracy "
                     f"{_fmt(t.get('accuracy'))}, teacher agreement {_fmt(s.get('teacher_agreement'))}, "
                     f"KD loss {_fmt(s.get('kd_loss'), pct=False)}")
    _say("\n".join(lines))


# ---- eval --------------------------------------------------------------------------------------------------
@dataclass
class EvalArguments:
    """What ``sqakd-hf eval`` evaluates."""

    model_path: Optional[str] = field(
        default=None, metadata={"help": "Saved quantized model (training or packed form); default: the recipe's "
                                        "output_dir."})
    batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    temperature: float = field(default=4.0, metadata={"help": "Temperature of the reported KD loss."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    device: Optional[str] = field(default=None, metadata={"help": "torch device (default: cuda if available)."})


EVAL_GROUPS = (("eval", EvalArguments), ("model", ModelArguments), ("data", DataArguments))
#: recipe keys the eval command reads under another name
_EVAL_FROM_RECIPE = {"output_dir": "model_path", "per_device_eval_batch_size": "batch_size",
                     "temperature": "temperature"}


def parse_eval_args(recipe_path: Optional[str], overrides: Sequence[str]):
    values: Dict[str, Any] = {}
    eval_keys = set(_field_types(EVAL_GROUPS))
    if recipe_path is not None:
        recipe_values = read_recipe_file(recipe_path)
        _check_keys(list(recipe_values), f"recipe {recipe_path}", ARGUMENT_GROUPS)
        for k, v in recipe_values.items():
            if k in _EVAL_FROM_RECIPE:
                values[_EVAL_FROM_RECIPE[k]] = v
            elif k in eval_keys:
                values[k] = v
    values.update(parse_overrides(list(overrides), EVAL_GROUPS))
    types = _field_types(EVAL_GROUPS)
    values = {k: _coerce(k, v, types[k]) for k, v in values.items()}
    try:
        return recipe_parser(EVAL_GROUPS).parse_dict(values)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"invalid eval arguments: {err}") from None


def run_eval(eval_args: EvalArguments, model_args: ModelArguments, data: DataArguments) -> Dict[str, Dict[str, float]]:
    """Evaluate a saved quantized model (and its teacher, if known) on ``data``'s eval split."""
    import torch

    from ..checkpoint import load_quantized
    from .models import inspect_checkpoint, inspect_teacher, load_fp_teacher, load_processor

    if not eval_args.model_path:
        raise RecipeError("no model to evaluate: pass --model_path DIR (or a recipe whose output_dir holds one)")
    path = Path(eval_args.model_path)
    if not (path / "config.json").is_file():
        raise InputError(f"model_path {path}: no saved model there (no config.json)")
    info = inspect_checkpoint(str(path), ModelArguments(teacher=str(path), task=model_args.task), what="model")
    if not info.config.get("quantization_config"):
        raise InputError(f"model_path {path} holds a full-precision model (no quantization_config in config.json)")
    if not model_args.teacher:
        for folder in (path, path.parent):
            record = _read_record(folder)
            if record and record.get("teacher"):
                model_args.teacher = record["teacher"]
                break
    if not data.dataset_name:
        raise RecipeError("no dataset to evaluate on: pass --dataset_name (or a recipe)")
    if not data.eval_split:
        data.eval_split = "test"
    teacher_info = inspect_teacher(model_args) if model_args.teacher else None
    raw = load_and_check_data(data, info, need_train=False, cache_dir=model_args.cache_dir)
    processor = load_processor(str(path), info, fallback=model_args.teacher)
    student = load_quantized(path)
    teacher = load_fp_teacher(teacher_info, model_args) if teacher_info is not None else None
    _, eval_ds, collator = preprocess(raw, data, info, student, processor)
    device = torch.device(eval_args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from ..training.metrics import evaluate_models

    metrics = evaluate_models(student, teacher, eval_ds, collator, batch_size=eval_args.batch_size,
                              temperature=eval_args.temperature, device=device,
                              shifted_labels=info.task == "causal-lm")
    if eval_args.output_file:
        Path(eval_args.output_file).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _print_eval(metrics: Dict[str, Dict[str, float]], model_path: str) -> None:
    rows = [("model", "accuracy", "teacher agreement", "KD loss")]
    if "teacher" in metrics:
        t = metrics["teacher"]
        rows.append(("teacher", _fmt(t.get("accuracy")), "-", "-"))
    s = metrics.get("student", {})
    rows.append((model_path, _fmt(s.get("accuracy")), _fmt(s.get("teacher_agreement")),
                 _fmt(s.get("kd_loss", s.get("hidden_mse")), pct=False)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


# ---- entry point ---------------------------------------------------------------------------------------------
USAGE = """usage: sqakd-hf <command> [options]

commands:
  train RECIPE.yaml [--key value ...]   quantize a teacher checkpoint by label-free distillation (SQAKD)
  eval [RECIPE.yaml] [--model_path DIR] [--teacher T] [--dataset_name D] [--eval_split S] [--key value ...]
                                        evaluate a saved quantized model (and its teacher)
  quickstart [--output_dir DIR] [--method lsq] [--bits 4,2] [--epochs N] [--fast]
                                        offline demo on scikit-learn's digits

`sqakd-hf <command> --help` lists the options. Runs under `accelerate launch` unchanged, e.g.
  accelerate launch --multi_gpu --num_processes 2 -m sqakd_hf train recipes/quickstart.yaml
"""


def _split_recipe_arg(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    if argv and not argv[0].startswith("--"):
        return argv[0], argv[1:]
    return None, argv


def cmd_train(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sqakd-hf train RECIPE.yaml [--key value ...]\n\nRecipe keys (YAML) and overrides "
              "(--key value); see the dataclass help below.\n")
        print(format_recipe_help())
        return 0 if argv else 2
    path, overrides = _split_recipe_arg(argv)
    if path is None:
        raise RecipeError("train needs a recipe: sqakd-hf train RECIPE.yaml [--key value ...]")
    recipe = parse_recipe(path, overrides, defaults=runtime_defaults())
    run_train(recipe)
    return 0


def cmd_eval(argv: List[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print("usage: sqakd-hf eval [RECIPE.yaml] [--model_path DIR] [--key value ...]\n")
        print(format_recipe_help(EVAL_GROUPS))
        return 0
    path, overrides = _split_recipe_arg(argv)
    eval_args, model_args, data = parse_eval_args(path, overrides)
    metrics = run_eval(eval_args, model_args, data)
    print(f"\nEvaluation on {data.dataset_name} ({data.eval_split}):")
    _print_eval(metrics, eval_args.model_path)
    return 0


def cmd_quickstart(argv: List[str]) -> int:
    from .quickstart import DEFAULT_OUTPUT_DIR, run_quickstart

    parser = argparse.ArgumentParser(
        prog="sqakd-hf quickstart",
        description="Offline demo on scikit-learn's digits: trains a small timm teacher (the only step that uses "
                    "labels), then W4A4 / W2A2 students label-free with SQAKD, and compares them with PTQ.")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--method", default="lsq", help="quantizer: lsq, pact, dorefa, ewgs, minmax")
    parser.add_argument("--bits", default="4,2", help="comma-separated bit-widths, each used for weights and "
                                                       "activations (default 4,2)")
    parser.add_argument("--epochs", type=int, default=None, help="SQAKD epochs per student")
    parser.add_argument("--teacher_epochs", type=int, default=None, help="epochs to train the teacher")
    parser.add_argument("--fast", action="store_true", help="a few steps only (for tests)")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="allow an output_dir that holds something other than an earlier quickstart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest for this tiny model on a shared CPU; 0 = torch's "
                             "default)")
    args = parser.parse_args(argv)
    try:
        bits = [int(b) for b in str(args.bits).split(",") if b.strip()]
    except ValueError:
        raise RecipeError(f"--bits must be comma-separated integers like 4,2; got {args.bits!r}") from None
    run_quickstart(output_dir=args.output_dir, method=args.method, bits=bits, epochs=args.epochs,
                   teacher_epochs=args.teacher_epochs, fast=args.fast, overwrite=args.overwrite_output_dir,
                   seed=args.seed, num_threads=args.num_threads)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "quickstart": cmd_quickstart}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``sqakd-hf``; returns the exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from .. import __version__

        print(f"sqakd-hf {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"sqakd-hf: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    _setup_logging()
    try:
        return command(argv[1:])
    except InputError as err:
        print(f"sqakd-hf {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
