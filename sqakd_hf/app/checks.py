"""Numeric ranges of the training arguments, checked before anything is loaded (NaN and inf rejected).

``TrainingArguments`` accepts e.g. ``per_device_train_batch_size: -1`` or ``learning_rate: nan``
and fails only inside the Trainer; :func:`check_training_ranges` turns them into one-line
:class:`~sqakd_hf.errors.RecipeError` s naming the key and the valid range.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ..errors import RecipeError

__all__ = ["check_training_ranges", "check_int", "check_float"]

#: keys that must be integers >= 1
_POSITIVE_INTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
#: optional keys that must be integers >= 1 when set
_OPTIONAL_POSITIVE_INTS = ("eval_accumulation_steps", "torch_empty_cache_steps", "dataloader_prefetch_factor")
#: keys that must be integers >= 0
_NON_NEGATIVE_INTS = ("dataloader_num_workers",)
#: keys that must be finite numbers >= 0
_NON_NEGATIVE_FLOATS = ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "eval_delay",
                        "kd_weight", "ce_weight", "quantizer_weight_decay")
#: keys that must be finite numbers > 0 (when set)
_POSITIVE_FLOATS = ("temperature", "adam_epsilon", "logging_steps", "save_steps", "eval_steps")
#: keys that must be finite numbers in [low, high]
_UNIT_FLOATS = {"adam_beta1": (0.0, 1.0), "adam_beta2": (0.0, 1.0), "label_smoothing_factor": (0.0, 1.0)}
_SEED_MAX = 2**32 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: Optional[int] = None, hint: str = "") -> None:
    """Raise :class:`RecipeError` unless ``value`` is an integer in ``[low, high]``."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise RecipeError(f"{name} must be an integer {span}{hint}; got {value!r}")


def check_float(name: str, value: Any, low: float, high: Optional[float] = None, strict: bool = False,
                hint: str = "") -> None:
    """Raise :class:`RecipeError` unless ``value`` is a finite number ``>= low`` (``> low`` if ``strict``)
    and ``<= high``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (value > low if strict else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
        span = f"{'>' if strict else '>='} {low}" if high is None else f"in [{low}, {high}]"
        raise RecipeError(f"{name} must be a finite number {span}{hint}; got {value!r}")


def check_training_ranges(training: Any) -> None:
    """Check the numeric training arguments of a parsed recipe; raises :class:`RecipeError` naming the key."""
    for name in _POSITIVE_INTS:
        check_int(name, getattr(training, name), 1)
    for name in _OPTIONAL_POSITIVE_INTS:
        if getattr(training, name, None) is not None:
            check_int(name, getattr(training, name), 1)
    for name in _NON_NEGATIVE_INTS:
        check_int(name, getattr(training, name), 0)
    for name in _NON_NEGATIVE_FLOATS:
        check_float(name, getattr(training, name), 0.0)
    for name in _POSITIVE_FLOATS:
        if getattr(training, name, None) is not None:
            check_float(name, getattr(training, name), 0.0, strict=True)
    for name, (low, high) in _UNIT_FLOATS.items():
        check_float(name, getattr(training, name), low, high)
    if training.quantizer_learning_rate is not None:
        check_float("quantizer_learning_rate", training.quantizer_learning_rate, 0.0, hint=" (or null)")
    if training.save_total_limit is not None:
        check_int("save_total_limit", training.save_total_limit, 1, hint=" (or null: keep every checkpoint)")
    check_int("seed", training.seed, 0, _SEED_MAX)
    check_int("max_steps", training.max_steps, -1, hint=" (-1: train for num_train_epochs)")
    if training.max_steps <= 0:
        check_float("num_train_epochs", training.num_train_epochs, 0.0, strict=True,
                    hint=" (or set max_steps > 0)")
    else:
        check_float("num_train_epochs", training.num_train_epochs, 0.0)
