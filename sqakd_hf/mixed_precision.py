"""Mixed precision chosen by measurement.

:func:`layer_sensitivity` measures, for every layer a :class:`QuantConfig` would quantize, how far the model's output
moves when only that layer's weights are quantized (relative error ``||z - z_fp|| / ||z_fp||`` over a few batches,
everything else full precision); :func:`choose_layer_bits` keeps the most sensitive layers at a higher weight
bit-width under a budget (a share of the quantized weight elements) and returns them as ``QuantConfig.layer_bits``.
The per-layer error is the first-order ranking used by sensitivity-based mixed precision (HAWQ, Dong et al. 2019,
rank layers by the loss change their quantization causes); here the change is measured directly on the output.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import calibrate, model_forward
from .config import QuantConfig
from .injection import named_quantizers, quant_layers, quantize_model
from .model_io import output_tensor, to_device
from .modules import QuantEmbedding
from .process_group import all_reduce_
from .quantizers import bypassing

__all__ = ["layer_sensitivity", "choose_layer_bits"]


@contextlib.contextmanager
def _info_silenced(*functions: Any):
    """The INFO records of the modules defining ``functions`` left out (their warnings still shown)."""
    loggers = [logging.getLogger(f.__module__) for f in functions]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _outputs(model: nn.Module, batches: List[Any]) -> List[torch.Tensor]:
    return [output_tensor(model_forward(model, b)).float() for b in batches]


def _squared_distance(outs: List[torch.Tensor], refs: List[torch.Tensor]) -> torch.Tensor:
    return sum((o - r).double().pow(2).sum() for o, r in zip(outs, refs))


def layer_sensitivity(model: nn.Module, config: QuantConfig, batches: Iterable[Any],
                      num_batches: Optional[int] = None, progress: bool = True) -> Dict[str, float]:
    """``{layer name: relative output error}`` for every layer ``config`` quantizes (embedding tables excepted):
    the model's output (logits, else the first output tensor) with only that layer's weights quantized, compared
    with the full-precision output over ``batches`` (at most ``num_batches``). The weights are quantized as
    ``config`` says (bits, granularity, method, its range initialisation; BatchNorm folded first with ``fold_bn``);
    GPTQ rounding and bias correction are left out, so the number is the layer's own rounding error as the rest of
    the network carries it to the output. ``model`` is not modified (a copy is quantized). Cost: one forward over
    the batches per layer; the full-precision outputs of the batches are kept in memory meanwhile. Under DDP, call
    it on every rank with that rank's batches (as :func:`~sqakd_hf.calibrate`): the calibration statistics and the
    error sums are all-reduced, so every rank gets the same map."""
    batches = list(batches)[:num_batches]
    if not batches:
        raise ValueError("layer_sensitivity needs at least one batch of inputs")
    fields = {**config.to_dict(), "gptq": False, "bias_correction": False}
    with _info_silenced(quantize_model, calibrate):  # the copy's own build reports would read as the model's
        student = quantize_model(copy.deepcopy(model), QuantConfig.from_dict(fields))
        device = next(student.parameters()).device
        batches = [to_device(b, device) for b in batches]
        student.eval()
        with torch.no_grad():
            calibrate(student, batches)
    with torch.no_grad():
        quantizers = [q for _, q in named_quantizers(student)]
        layers = [(n, m) for n, m in quant_layers(student) if not isinstance(m, QuantEmbedding)]
        with bypassing(quantizers):
            refs = _outputs(student, batches)
        sums = [sum(r.double().pow(2).sum() for r in refs)]  # ||z_fp||^2, then ||z - z_fp||^2 per layer
        for _, layer in tqdm(layers, desc="layer sensitivity", disable=not progress, leave=False):
            with bypassing(q for q in quantizers if q is not layer.weight_quantizer):
                sums.append(_squared_distance(_outputs(student, batches), refs))
        sums = all_reduce_(torch.stack(sums))
        errors = (sums[1:] / sums[0].clamp_min(torch.finfo(torch.float32).tiny)).sqrt().tolist()  # one host sync
    return {name: err for (name, _), err in zip(layers, errors)}


def choose_layer_bits(model: nn.Module, sensitivity: Dict[str, float], budget: float,
                      bits: int = 8) -> Dict[str, Dict[str, int]]:
    """``QuantConfig.layer_bits`` keeping the most sensitive layers' weights at ``bits``: layers in decreasing
    ``sensitivity`` (from :func:`layer_sensitivity`), each taken unless it would bring the weight elements kept at
    ``bits`` above ``budget`` (a fraction in (0, 1) of the weight elements of all layers in ``sensitivity``).
    Returns ``{}`` when no layer fits, else one pattern matching exactly the chosen layers' names."""
    if not 0 < budget < 1:
        raise ValueError(f"budget is a fraction of the quantized weight elements, in (0, 1); got {budget!r}")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8; got {bits!r}")
    try:
        sizes = {name: model.get_submodule(name).weight.numel() for name in sensitivity}
    except AttributeError as e:
        raise ValueError(f"a layer of the sensitivity map is not a weighted layer of this model ({e}); pass the "
                         "model the sensitivity was measured on") from None
    limit, used, chosen = budget * sum(sizes.values()), 0, []
    for name in sorted(sensitivity, key=lambda n: (-sensitivity[n], n)):
        if used + sizes[name] <= limit:
            chosen.append(name)
            used += sizes[name]
    if not chosen:
        return {}
    return {"^(" + "|".join(re.escape(n) for n in chosen) + ")$": {"weight_bits": bits}}
