"""``sqakd-hf train`` / ``ptq``: checks, data, teacher and student, SQAKD training (or calibration only),
evaluation, saving (training form, packed form + model card, metrics, run record), pushing.

Runs unchanged as one process or under ``accelerate launch`` (DDP). Every check of the input
runs on every rank before any model is loaded or any rank waits on another.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

from ..config import QuantConfig
from ..errors import RecipeError
from .data import dataset_length
from .distributed import barrier, say, setup_distributed
from .layer_choice import RECORD_KEY, choose_student_layer_bits
from .models import TeacherInfo, inspect_teacher, load_fp_teacher, load_processor, load_student
from .checks import check_training_ranges
from .recipe import Recipe
from .report import train_summary
from .runs import (
    METRICS_FILE,
    PACKED_SUBDIR,
    check_output_dir,
    clear_previous_run,
    is_unfinished,
    mark_run_complete,
    read_run_record,
    write_run_record,
)
from .skeleton import check_quantization_plan
from .run_card import PTQ, TRAIN, card_facts, run_result, source_records, teacher_reference
from .sources import eval_source, resolved_data_arguments, train_source
from .splits import load_and_check_data, preprocess

logger = logging.getLogger(__name__)

__all__ = ["run_train", "validate_recipe"]


def validate_recipe(recipe: Recipe, mode: str = TRAIN) -> QuantConfig:
    """Cheap checks of a parsed recipe; returns the student's :class:`~sqakd_hf.QuantConfig`."""
    if not recipe.model.teacher:
        raise RecipeError("the recipe sets no teacher (a Hub id or a local checkpoint folder)")
    train_source(recipe.data)  # raises when no training data is configured
    has_eval = eval_source(recipe.data) is not None
    if "output_dir" not in recipe.values:
        raise RecipeError("the recipe sets no output_dir (where the student is written)")
    training = recipe.training
    check_training_ranges(training)
    if mode == PTQ:
        if training.resume_from_checkpoint not in (None, "", False):
            raise RecipeError("ptq does not train, so there is nothing to resume: drop resume_from_checkpoint")
    elif recipe.data.streaming and training.max_steps <= 0:
        raise RecipeError("streaming: true needs max_steps > 0 (a streamed dataset has no length to count epochs)")
    if not has_eval and str(getattr(training.eval_strategy, "value", "no")) != "no" and mode != PTQ:
        raise RecipeError(f"eval_strategy {training.eval_strategy.value!r} needs an eval_split (or eval_files / "
                          "eval_dataset_name)")
    quant = recipe.quant.to_quant_config()
    if training.push_to_hub and recipe.run.hub_format == "packed" and not recipe.run.save_packed:
        raise RecipeError("push_to_hub uploads the packed model: it needs save_packed: true (or a deploy hub_format: "
                          "compressed-tensors, onnx)")
    return quant


def _check_task(recipe: Recipe, info: TeacherInfo) -> None:
    if recipe.training.push_to_hub and recipe.run.hub_format == "compressed-tensors" and info.library != "transformers":
        raise RecipeError(f"hub_format: compressed-tensors is for transformers models; {info.name!r} is a "
                          f"{info.library} model: use hub_format: onnx or packed")
    if info.task == "feature-extraction" and recipe.training.distill_target == "logits":
        raise RecipeError(f"teacher {info.name!r} has no logits (task feature-extraction): set "
                          "distill_target: hidden_states (MSE or cosine on the last hidden state)")


def run_train(recipe: Recipe, mode: str = TRAIN) -> Dict[str, Any]:
    """Run a parsed recipe: SQAKD training (``mode="train"``) or calibration only (``mode="ptq"``), then the
    same evaluation, saving (training form, packed form, model card, metrics, run record) and push.
    Returns ``{"output_dir", "packed_dir", "metrics"}``."""
    quant_config = validate_recipe(recipe, mode)
    resume = check_output_dir(recipe)
    info = inspect_teacher(recipe.model)
    _check_task(recipe, info)
    check_quantization_plan(info, quant_config, recipe.model)
    training = recipe.training
    push, training.push_to_hub = training.push_to_hub, False  # the packed model + card are pushed below
    setup_distributed(training)

    raw = load_and_check_data(recipe.data, info, keep_train_labels=training.ce_weight > 0 and mode == TRAIN,
                              cache_dir=recipe.model.cache_dir)
    processor = load_processor(recipe.model.teacher, info)
    barrier()  # every rank passed every check
    with training.main_process_first(desc="loading the models and preparing the data"):
        teacher = load_fp_teacher(info, recipe.model)
        train_ds, eval_ds, collator = preprocess(raw, recipe.data, info, teacher, processor,
                                                 raw.train_label_map(info.id2label))
    choice = None
    if recipe.quant.layer_bits_budget is not None:
        recorded = (read_run_record(Path(training.output_dir)) or {}).get(RECORD_KEY) if resume else None
        quant_config, choice = choose_student_layer_bits(
            teacher, quant_config, train_ds, collator, training, recipe.quant.layer_bits_budget,
            recipe.quant.sensitive_layer_bits, recorded)
    with training.main_process_first(desc="building the student"):
        student = load_student(info, quant_config, teacher, recipe.model)
    if info.modality == "image":
        training.remove_unused_columns = False  # images are transformed on the fly from their raw column
    out = Path(training.output_dir)

    from ..training.trainer import SQAKDTrainer

    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=training, train_dataset=train_ds,
                           eval_dataset=eval_ds, data_collator=collator, processing_class=processor)
    if training.should_save:
        _start_run_record(recipe, out, resume, mode=mode, teacher=teacher_reference(info),
                          teacher_on_hub=info.local_dir is None, data=resolved_data_arguments(recipe.data),
                          sources=source_records(raw), **({RECORD_KEY: choice} if choice else {}))
    examples = dataset_length(train_ds) or "streamed"
    if mode == PTQ:
        say(f"sqakd-hf: PTQ {quant_config.short_name} of {info.name} ({info.library}, {info.task}): calibration "
            f"only, on {training.calibration_batches} batch(es) drawn from {examples} examples, no labels used")
        trainer.prepare_student(train_ds, force_check=True)
    else:
        say(f"sqakd-hf: {quant_config.short_name} student of {info.name} ({info.library}, {info.task}); "
            f"{examples} training examples, no labels used"
            + (" (ce_weight > 0: labels used)" if training.ce_weight > 0 else ""))
        trainer.train(resume_from_checkpoint=resume)
    metrics = _final_metrics(trainer, recipe) if eval_ds is not None else {}
    trainer.save_model(str(out))  # the training form; one writer under DDP

    packed_dir = out / PACKED_SUBDIR if recipe.run.save_packed else None
    if trainer.is_world_process_zero():
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
        result = run_result(trainer, recipe, mode, train_ds, eval_ds, raw, metrics)
        record = {**(read_run_record(out) or {}), "result": result}
        if packed_dir is not None:
            _save_packed_with_card(trainer.model, packed_dir, processor, recipe, record, metrics,
                                   training.hub_model_id if push else None)
        mark_run_complete(out, result=result)
        say(train_summary(quant_config.short_name, info.name, out, packed_dir, metrics,
                          raw.eval_source.split_name if raw.eval_source else None, "PTQ" if mode == PTQ else "SQAKD"))
        if push:
            from ..hub.push import push_to_hub

            repo_id = training.hub_model_id or out.resolve().name
            fmt = recipe.run.hub_format
            if fmt == "packed":
                commit = push_to_hub(packed_dir, repo_id, token=training.hub_token, private=training.hub_private_repo)
            else:  # the deploy form of the training form (full-precision head), with the run's card facts
                commit = push_to_hub(trainer.model, repo_id, format=fmt, token=training.hub_token,
                                     private=training.hub_private_repo, metrics=metrics or None, processor=processor,
                                     **card_facts(record))
            say(f"pushed the {fmt} model and its model card to {getattr(commit, 'repo_url', repo_id)}")
    barrier()
    return {"output_dir": str(out), "packed_dir": str(packed_dir) if packed_dir else None, "metrics": metrics}


def _start_run_record(recipe: Recipe, out: Path, resume: Optional[str], teacher: str, **facts: Any) -> None:
    """Replace the previous run (overwrite_output_dir, or a run that failed before a complete checkpoint) and
    record this one as incomplete until its model is saved."""
    unfinished = is_unfinished(read_run_record(out)) if out.is_dir() else False
    if resume is None and out.is_dir() and (recipe.run.overwrite_output_dir or unfinished):
        removed = clear_previous_run(out)
        if removed:
            why = "overwrite_output_dir" if recipe.run.overwrite_output_dir else "rerun of an unfinished run"
            logger.warning("sqakd: %s: removed the previous run's %s", why, ", ".join(removed))
    write_run_record(recipe, teacher, **facts)


def _final_metrics(trainer, recipe: Recipe) -> Dict[str, Dict[str, float]]:
    """The trainer's own evaluation of the trained student (every rank takes part under DDP), as
    ``{"student": {...}, "teacher": {...}}``; the teacher's only with ``eval_teacher``."""
    from ..training.metrics import by_model

    metrics = by_model(trainer.evaluate())
    if not recipe.run.eval_teacher:
        metrics.pop("teacher", None)
    return metrics


def _save_packed_with_card(model, packed_dir: Path, processor, recipe: Recipe, record: Dict[str, Any],
                           metrics: Optional[Dict[str, Dict[str, float]]], repo_id: Optional[str]) -> None:
    from ..checkpoint import save_packed
    from ..hub.card_info import write_model_card

    save_packed(model, packed_dir, fp_dtype=recipe.run.packed_fp_dtype)
    if processor is not None:
        processor.save_pretrained(str(packed_dir))
    write_model_card(model, packed_dir, metrics=metrics or None, repo_id=repo_id, **card_facts(record))
