"""Calibration: initialise every quantizer from the weights and a few batches of data.

A calibrated-but-untrained model is the post-training-quantization (PTQ) baseline.
Under ``torch.distributed`` the activation statistics are all-reduced before the
parameters are derived, so every rank starts from identical quantizer parameters.
NaN/inf weights or activations are refused (naming the layer and the batch) before any
quantizer is set from them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .bias_correction import auto_corrects, correct_biases
from .config import QuantConfig
from .gptq import gptq_round
from .injection import get_quant_config, named_quantizers, quant_layers
from .model_io import split_labels, to_device
from .process_group import all_reduce_, world_size
from .ptq_guard import OutputErrorProbe, keep_if_better
from .quantizers.base import STAT_OPS
from .smoothing import SmoothingGroup, smooth_model

logger = logging.getLogger(__name__)


def model_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: a tensor, a mapping of keyword inputs (labels dropped),
    or a ``(inputs, targets)`` tuple as produced by a ``TensorDataset`` loader."""
    if isinstance(batch, Mapping):
        return model(**split_labels(batch)[0])
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def _is_empty(batch: Any) -> bool:
    """Whether a batch (as :func:`model_forward` takes it) holds no samples: its first tensor has size 0."""
    if isinstance(batch, Mapping):
        batch = next((v for v in split_labels(batch)[0].values() if isinstance(v, torch.Tensor)), None)
    elif isinstance(batch, (list, tuple)):
        batch = batch[0] if batch else None
    return isinstance(batch, torch.Tensor) and batch.numel() == 0


def _all_reduce_stats(stats: dict) -> dict:
    """All-reduce a stats dict across ranks with each statistic's own merge op."""
    if world_size() == 1:
        return stats
    out = {}
    for op in ("sum", "min", "max"):
        keys = [k for k, o in STAT_OPS.items() if o == op]
        parts = [stats[k].float() for k in keys]  # scalars and histograms: one flat buffer per op
        flat = torch.cat([p.reshape(-1) for p in parts])
        all_reduce_(flat, op)
        out.update(zip(keys, (v.reshape(p.shape) for v, p in zip(flat.split([p.numel() for p in parts]), parts))))
    return out


_NEVER = 2**62


def _check_weights(layers: List[Tuple[str, nn.Module]]) -> None:
    """NaN/inf weights make every quantizer step NaN: refuse them, naming the first layer (one host sync)."""
    ok = torch.stack([torch.isfinite(layer.weight).all().cpu() for _, layer in layers]).tolist()
    if not all(ok):
        bad = [n for (n, _), good in zip(layers, ok) if not good]
        raise ValueError(
            f"calibrate(): the weights of {len(bad)} layer(s) are NaN/inf, first {bad[0]!r}: the model is broken "
            "(diverged training or a bad checkpoint); load finite weights before quantizing"
        )


def _watch_activations(acts: List[Tuple[str, nn.Module]], device: torch.device):
    """Forward pre-hooks recording, per activation quantizer, the first batch whose input holds a NaN/inf
    (device tensor, no host sync per batch). Returns ``(first_bad, batch_counter, handles)``."""
    first = torch.full((len(acts),), _NEVER, dtype=torch.int64, device=device)
    batch = [0]

    def hook(i: int):
        def pre(_module: nn.Module, args: Tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                bad = ~torch.isfinite(x).all()
                first[i] = torch.where(bad, first[i].clamp(max=batch[0]), first[i])

        return pre

    handles = [q.register_forward_pre_hook(hook(i)) for i, (_, q) in enumerate(acts)]
    return first, batch, handles


def _check_activations(acts: List[Tuple[str, nn.Module]], first: torch.Tensor, seen: int) -> None:
    """Raise naming the first batch and the first layer whose calibration activations are NaN/inf (on any rank)."""
    values = all_reduce_(first, "min").tolist()
    bad = [(b, i) for i, b in enumerate(values) if b < _NEVER]
    if not bad:
        return
    batch, i = min(bad)
    layers = [acts[j][0] for b, j in bad if b == batch]
    raise ValueError(
        f"calibrate(): calibration batch {batch} (of {seen}) gives NaN/inf activations at {acts[i][0]!r}"
        + (f" and {len(layers) - 1} more layer(s)" if len(layers) > 1 else "")
        + ": the batch contains NaN/inf values (or the model overflows on it). Clean the calibration data "
        "(keep samples with torch.isfinite(x).all()) and calibrate again; no quantizer was set from it"
    )


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: Optional[int] = None) -> nn.Module:
    """Initialise all quantizers of ``model``; returns ``model``.

    With ``smooth_alpha`` set in the model's config, activation outliers are first migrated into the weights
    (SmoothQuant, see :mod:`sqakd_hf.smoothing`; the batches are then read into a list, since they are used
    twice); the layers migrated are listed in ``model.sqakd_smoothed``.
    With ``bias_correction`` set (``"auto"``, the default: convolutions only, none for DoReFa), once every quantizer
    is initialised, each quantized layer's mean output shift over the batches is added to its bias, or removed
    through the BatchNorm after it (see :mod:`sqakd_hf.bias_correction`); those layers are listed in
    ``model.sqakd_bias_corrected``. With ``gptq`` set, before that, weights are GPTQ-rounded on their grids
    (see :mod:`sqakd_hf.gptq`; the layers in ``model.sqakd_gptq_rounded``). Each of these two steps is undone (with a
    warning) when it raises the model's relative output error on the first calibration batches
    (:mod:`sqakd_hf.ptq_guard`).
    Weight quantizers are initialised from the current weights. Activation
    quantizers observe the full-precision activations of ``batches`` (at most
    ``num_batches``), then derive their parameters (each method's own initialisation) and their grid's
    signedness (unsigned when the calibration activations are never negative).
    Deterministic for the same weights and batches. Must be called on every rank
    with that rank's batches under DDP; the statistics are all-reduced.

    Raises ``ValueError`` for NaN/inf weights (naming the layer) or a batch (0-based) that gives NaN/inf
    activations (naming the batch and the first layer); no quantizer is set from non-finite values.
    """
    layers = list(quant_layers(model))
    if not layers:
        raise ValueError("calibrate() needs a quantized model: call sqakd_hf.quantize_model(model, config) first")
    _check_weights(layers)
    config = _config_or_none(model)
    alpha = getattr(config, "smooth_alpha", None)
    bias_correction, gptq = getattr(config, "bias_correction", False), getattr(config, "gptq", False)
    if bias_correction == "auto" and not any(auto_corrects(m) for _, m in layers):
        bias_correction = False  # nothing to correct: keep the single pass over the batches
    device = next(model.parameters()).device
    if alpha is not None or bias_correction or gptq:  # the batches are read more than once
        batches = list(itertools.islice(batches, num_batches))
        num_batches = None
    if alpha is not None:  # migrate outliers first: the weight ranges and activation statistics are those after it
        groups = smooth_model(model, [to_device(b, device) for b in batches], alpha, model_forward)
        _record_smoothing(model, groups)
    for _, layer in layers:
        layer.weight_quantizer.init_from_weight(layer.weight)
    acts = [(n, q) for n, q in named_quantizers(model) if q.role == "act" and q.bits < 32]
    was_training = model.training
    device = next(model.parameters()).device
    seen = 0
    first_bad, counter, handles = _watch_activations(acts, device)
    model.eval()
    try:
        for q in [q for _, q in acts]:
            q.observing = True
        for batch in itertools.islice(batches, num_batches):
            if _is_empty(batch):
                raise ValueError(f"calibration batch {seen} (0-based) is empty (0 samples): pass non-empty batches "
                                 "(e.g. fewer calibration batches than the data holds, or a smaller batch size)")
            counter[0] = seen
            model_forward(model, to_device(batch, device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for _, q in acts:
            q.observing = False
        model.train(was_training)
    if seen == 0 and acts:
        raise ValueError("calibration got no batches: the data iterable is empty")
    stats_of = {name: q.pop_stats() for name, q in acts}
    _check_activations(acts, first_bad, seen)
    unused = [name for name, stats in stats_of.items() if stats is None]
    reduced = {name: _all_reduce_stats(stats) for name, stats in stats_of.items() if stats is not None}
    if reduced:
        ok = torch.stack([torch.isfinite(torch.cat([v.float().reshape(-1) for v in st.values()])).all()
                          for st in reduced.values()])
        bad = [name for name, good in zip(reduced, ok.tolist()) if not good]
        if bad:
            raise ValueError(
                f"calibrate(): the activation statistics of {bad[0]!r} overflow to NaN/inf (activations too large "
                "for float32 sums): calibrate on fewer or smaller-valued batches, or check the model's inputs"
            )
    for name, q in acts:
        if name in reduced:
            q.init_from_stats(reduced[name])
    if unused:
        logger.warning("these activation quantizers saw no data during calibration (layer unused?): %s", unused)
    if gptq or bias_correction:  # each step stays only if it lowers the model's output error (see ptq_guard)
        _guarded_weight_steps(model, layers, [to_device(b, device) for b in batches], gptq, bias_correction)
    logger.info("sqakd: calibrated %d layers on %d batch(es)", len(layers), seen)
    return model


def _guarded_weight_steps(model: nn.Module, layers: List[Tuple[str, nn.Module]], batches: List[Any], gptq: bool,
                          bias_correction: Any) -> None:
    """GPTQ rounding, then bias correction, each undone when it raises the model's output error."""
    probe = OutputErrorProbe(model, batches, model_forward)
    reference = {}
    if gptq:  # the grids are set: choose each weight's grid value from the layer's inputs
        if bias_correction:  # the shift is measured against the full-precision weights GPTQ replaces
            reference = {name: layer.weight.detach().clone() for name, layer in layers}
        rounded: List[str] = []
        weights = {name: layer.weight for name, layer in layers}
        if not keep_if_better(probe, "GPTQ rounding", weights,
                              lambda: rounded.extend(gptq_round(model, batches, model_forward))):
            rounded.clear()
            reference = {}
        model.sqakd_gptq_rounded = rounded
    if bias_correction:  # the quantizers are set: measure each layer's mean output shift and remove it
        corrected: List[str] = []
        shifted = {f"{name}.bias": layer.bias for name, layer in layers if layer.bias is not None}
        shifted.update({f"{name}.{stat}": getattr(m, stat) for name, m in model.named_modules()
                        if isinstance(m, _BatchNorm) for stat in ("running_mean", "running_var")
                        if getattr(m, stat) is not None})
        if not keep_if_better(probe, "bias correction", shifted, lambda: corrected.extend(correct_biases(
                model, batches, model_forward, reference, auto=bias_correction == "auto"))):
            corrected.clear()
        model.sqakd_bias_corrected = corrected


def _config_or_none(model: nn.Module) -> Optional[QuantConfig]:
    try:
        return get_quant_config(model)
    except ValueError:
        return None


def _record_smoothing(model: nn.Module, groups: List[SmoothingGroup]) -> None:
    """``model.sqakd_smoothed`` (and the quantization report, if any): ``"<layer> <- <source>"`` per migrated input."""
    smoothed = [f"{t} <- {g.source}" for g in groups for t in g.targets]
    model.sqakd_smoothed = smoothed
    report = getattr(model, "sqakd_report", None)
    if report is not None:
        report.smoothed = smoothed


def refresh_quantizer_state(model: nn.Module) -> None:
    """Re-read quantizer flags (signedness, initialised) from their buffers after weights were loaded."""
    for _, q in named_quantizers(model):
        q.sync_from_buffers()
