"""Calibration: initialise every quantizer from the weights and a few batches of data.

A calibrated-but-untrained model is the post-training-quantization (PTQ) baseline.
Under ``torch.distributed`` the activation statistics are all-reduced before the
parameters are derived, so every rank starts from identical quantizer parameters.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .injection import named_quantizers, quant_layers
from .model_io import split_labels, to_device
from .quantizers.base import STAT_OPS

logger = logging.getLogger(__name__)

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def model_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: a tensor, a mapping of keyword inputs (labels dropped),
    or a ``(inputs, targets)`` tuple as produced by a ``TensorDataset`` loader."""
    if isinstance(batch, Mapping):
        return model(**split_labels(batch)[0])
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _all_reduce_stats(stats: dict) -> dict:
    """All-reduce a stats dict across ranks with each statistic's own merge op."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return stats
    out = {}
    for op in ("sum", "min", "max"):
        keys = [k for k, o in STAT_OPS.items() if o == op]
        flat = torch.stack([stats[k].float() for k in keys])
        dist.all_reduce(flat, op=_REDUCE_OPS[op])
        out.update(zip(keys, flat.unbind()))
    return out


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: Optional[int] = None) -> nn.Module:
    """Initialise all quantizers of ``model``; returns ``model``.

    Weight quantizers are initialised from the current weights. Activation
    quantizers observe the full-precision activations of ``batches`` (at most
    ``num_batches``), then derive their parameters (each method's own initialisation) and their grid's
    signedness (unsigned when the calibration activations are never negative).
    Deterministic for the same weights and batches. Must be called on every rank
    with that rank's batches under DDP; the statistics are all-reduced.
    """
    layers = list(quant_layers(model))
    if not layers:
        raise ValueError("calibrate() needs a quantized model: call sqakd_hf.quantize_model(model, config) first")
    for _, layer in layers:
        layer.weight_quantizer.init_from_weight(layer.weight)
    acts = [(n, q) for n, q in named_quantizers(model) if q.role == "act" and q.bits < 32]
    was_training = model.training
    device = next(model.parameters()).device
    seen = 0
    model.eval()
    try:
        for q in [q for _, q in acts]:
            q.observing = True
        for batch in itertools.islice(batches, num_batches):
            model_forward(model, to_device(batch, device))
            seen += 1
    finally:
        for _, q in acts:
            q.observing = False
        model.train(was_training)
    if seen == 0 and acts:
        raise ValueError("calibration got no batches: the data iterable is empty")
    unused = []
    for name, q in acts:
        stats = q.pop_stats()
        if stats is None:
            unused.append(name)
            continue
        q.init_from_stats(_all_reduce_stats(stats))
    if unused:
        logger.warning("these activation quantizers saw no data during calibration (layer unused?): %s", unused)
    logger.info("sqakd: calibrated %d layers on %d batch(es)", len(layers), seen)
    return model


def refresh_quantizer_state(model: nn.Module) -> None:
    """Re-read quantizer flags (signedness, initialised) from their buffers after weights were loaded."""
    for _, q in named_quantizers(model):
        q.sync_from_buffers()
