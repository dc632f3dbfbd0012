"""What a finished run did (recorded in its run record) and the model card said from that record.

:func:`run_result` collects the facts of a run once it is done (true optimizer steps and epochs,
training examples, evaluation split, size and metric names); :func:`card_facts` turns a run record
into the model card's fields, so that every statement of the card can be checked against the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from .data import dataset_length

__all__ = ["TRAIN", "PTQ", "teacher_reference", "source_records", "run_result", "card_facts"]

#: the run modes: SQAKD training, or post-training quantization (calibration only)
TRAIN, PTQ = "train", "ptq"


def teacher_reference(info: Any) -> str:
    """The teacher as a run records it: a Hub id as it is, a local folder as an absolute path."""
    return str(Path(info.local_dir).expanduser().resolve()) if info.local_dir is not None else info.name


def source_records(raw: Any) -> Dict[str, Optional[Dict[str, Any]]]:
    """The training and evaluation sources of loaded data (``RawData``), as recorded with the run."""
    return {"train": raw.train_source.describe() if raw.train_source is not None else None,
            "eval": raw.eval_source.describe() if raw.eval_source is not None else None}


def _plain(value: Any) -> Any:
    return str(getattr(value, "value", value))


def run_result(trainer: Any, recipe: Any, mode: str, train_ds: Any, eval_ds: Any, raw: Any,
               metrics: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """What the run did, from the trainer's state: ``mode``, ``optimizer_steps``, ``epochs`` (completed, e.g.
    0.53 when ``max_steps`` ended the run early), the training examples and global batch, whether labels were
    used, the hyper-parameters in effect, and the evaluation (``split``, ``examples``, ``metrics``)."""
    t = recipe.training
    state = trainer.state
    result: Dict[str, Any] = {
        "mode": mode,
        "optimizer_steps": int(state.global_step or 0),
        "epochs": round(float(state.epoch or 0.0), 4),
        "train_examples": dataset_length(train_ds),
        "global_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * max(1, t.world_size),
        "labels_used": mode == TRAIN and t.ce_weight > 0,
        "calibration_batches": t.calibration_batches,
        "hyperparameters": {
            "learning_rate": t.learning_rate, "quantizer_learning_rate": t.effective_quantizer_learning_rate,
            "weight_decay": t.weight_decay, "lr_scheduler_type": _plain(t.lr_scheduler_type),
            "optim": _plain(t.optim), "temperature": t.temperature, "quantizer_lr_mode": t.quantizer_lr_mode,
            "bn_policy": t.bn_policy,
        },
        "eval": None,
    }
    if eval_ds is not None and raw.eval_source is not None:
        result["eval"] = {**raw.eval_source.describe(), "examples": dataset_length(eval_ds),
                          "metrics": sorted({name for values in metrics.values() for name in values})}
    return result


def _dataset_label(described: Dict[str, Any]) -> Optional[str]:
    """A Hub dataset id as it is; a local dataset by its folder or file name (no local path on a public card)."""
    if described.get("files"):
        return None  # the split names the files
    name = described.get("dataset")
    if not name:
        return None
    return name if described.get("on_hub") else f"{Path(name).name} (local)"


def _training_rows(result: Dict[str, Any]) -> Dict[str, Any]:
    hp = result.get("hyperparameters", {})
    labels = "yes (ce_weight > 0)" if result.get("labels_used") else "no"
    if result.get("mode") == PTQ:
        examples = result.get("train_examples")
        calibrated = result.get("calibration_batches", 0) * result.get("global_batch_size", 0)
        return {"training steps": 0, "calibration batches": result.get("calibration_batches"),
                "calibration examples": min(calibrated, examples) if examples else calibrated, "labels used": labels}
    rows = {"optimizer steps": result.get("optimizer_steps"), "epochs": result.get("epochs"),
            "training examples": result.get("train_examples") or "streamed",
            "global batch size": result.get("global_batch_size")}
    rows.update({k: hp[k] for k in ("learning_rate", "quantizer_learning_rate", "lr_scheduler_type", "optim",
                                    "quantizer_lr_mode", "weight_decay", "temperature", "bn_policy") if k in hp})
    rows["labels used"] = labels
    return rows


def card_facts(record: Dict[str, Any]) -> Dict[str, Any]:
    """The model card's fields (keyword arguments of :func:`~sqakd_hf.hub.card_info.write_model_card`) from a
    run record with its ``result``: teacher (and whether it is on the Hub), mode, labels, training rows,
    evaluation split / size, Hub datasets."""
    result = record.get("result") or {}
    teacher, on_hub = record.get("teacher"), record.get("teacher_on_hub")
    facts: Dict[str, Any] = {
        "teacher": teacher,
        "base_model": Path(teacher).name if teacher and on_hub is False else teacher,  # no local path on the card
        "base_model_on_hub": on_hub,
        "mode": "ptq" if result.get("mode") == PTQ else "sqakd",
        "labels_used": bool(result.get("labels_used")),
        "training": _training_rows(result) if result else {},
    }
    hub: List[str] = []
    for described in (record.get("sources") or {}).values():
        if described and described.get("on_hub") and described["dataset"] not in hub:
            hub.append(described["dataset"])
    facts["datasets"] = hub
    evaluated = result.get("eval")
    if evaluated:
        facts["evaluation"] = {"dataset": _dataset_label(evaluated), "split": evaluated.get("split"),
                               "examples": evaluated.get("examples")}
    return facts
