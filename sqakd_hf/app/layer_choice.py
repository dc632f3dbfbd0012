"""``layer_bits_budget``: the run chooses which layers keep higher-precision weights by measuring them.

Every rank measures the layers with :func:`~sqakd_hf.layer_sensitivity` on the teacher, on its share of the
seeded training samples calibration draws (the error sums are all-reduced, so all ranks see the same ranking and
build the same student), and keeps the most sensitive within the budget with :func:`~sqakd_hf.choose_layer_bits`.
A resumed run reuses the choice its run record holds instead of measuring again.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from ..config import QuantConfig
from ..mixed_precision import choose_layer_bits, layer_sensitivity
from ..model_io import call_input, split_labels, to_device
from .distributed import say

__all__ = ["RECORD_KEY", "choose_student_layer_bits", "with_layer_bits"]

#: the run-record entry holding the choice (``{"layer_bits": {...}, "layers": [...], "share": float}``)
RECORD_KEY = "chosen_layer_bits"


def _measure(teacher: nn.Module, config: QuantConfig, dataset: Any, collator: Callable, training: Any,
             budget: float, bits: int) -> Dict[str, Any]:
    """The choice, measured on this rank's share of the calibration samples (see :func:`choose_student_layer_bits`)."""
    from ..training.trainer import calibration_samples  # the Trainer's import stays out of the CLI's start

    per_device = max(1, training.train_batch_size)
    samples = calibration_samples(dataset, training)
    teacher = teacher.to(training.device)
    batches = [call_input(teacher, to_device(split_labels(collator(samples[i:i + per_device]))[0], training.device))
               for i in range(0, len(samples), per_device)]
    progress = not training.disable_tqdm and training.process_index == 0
    sensitivity = layer_sensitivity(teacher, config, batches, progress=progress)
    layer_bits = choose_layer_bits(teacher, sensitivity, budget, bits)
    chosen = [n for n in sensitivity if any(re.fullmatch(p, n) for p in layer_bits)]
    sizes = {n: teacher.get_submodule(n).weight.numel() for n in sensitivity}
    return {"layer_bits": layer_bits, "layers": chosen, "bits": bits, "budget": budget,
            "share": sum(sizes[n] for n in chosen) / max(1, sum(sizes.values()))}


def with_layer_bits(config: QuantConfig, layer_bits: Dict[str, Dict[str, int]]) -> QuantConfig:
    """``config`` with ``layer_bits`` added after its own patterns (the first matching pattern wins, so a layer the
    user already set keeps the user's bits)."""
    return QuantConfig.from_dict({**config.to_dict(), "layer_bits": {**config.layer_bits, **layer_bits}})


def choose_student_layer_bits(teacher: nn.Module, config: QuantConfig, dataset: Any, collator: Callable,
                              training: Any, budget: float, bits: int = 8,
                              recorded: Optional[Dict[str, Any]] = None) -> Tuple[QuantConfig, Dict[str, Any]]:
    """``(config with the chosen layer_bits, the choice)``: the layers whose weights stay at ``bits``, chosen by
    measured sensitivity within ``budget`` (a share of the quantized weight elements) on the teacher, from the
    ``calibration_batches`` batches of seeded-random training samples that calibration also draws.

    Under DDP every rank measures its share of the samples. ``recorded``: the choice of the run being resumed
    (from its run record), reused as it is when it was made with the same budget and bits.
    """
    if recorded and recorded.get("budget") == budget and recorded.get("bits") == bits:
        choice = recorded
    else:
        say(f"sqakd-hf: layer_bits_budget {budget:g}: measuring each layer's sensitivity on the teacher "
            f"({training.calibration_batches} batch(es) of training inputs)")
        choice = _measure(teacher, config, dataset, collator, training, budget, bits)
    layers = choice["layers"]
    say(f"sqakd-hf: {bits}-bit weights for the {len(layers)} most sensitive layer(s), {100 * choice['share']:.2f}% "
        f"of the quantized weights (budget {100 * budget:g}%)" + (f": {', '.join(layers)}" if layers else
                                                                   ": no layer fits the budget"))
    return with_layer_bits(config, choice["layer_bits"]), choice
