"""SmoothQuant outlier migration (Xiao et al., 2023), folded so the full-precision function is unchanged.

Activation outliers sit in a few input channels of a Linear. For a Linear whose input ``X`` is the output
of a *foldable source* (a LayerNorm / RMSNorm, or another Linear), every input channel ``j`` is divided
by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and the weight column ``W[:, j]`` multiplied by it:
``(X / s) (W s)^T = X W^T``. The division is folded into the source (norm weight and bias, or the
source Linear's output rows and bias), so no op is added and the student keeps the teacher's tensors
(same names and shapes).

Sources are found by running the model: a Linear whose input tensor *is* a norm's output (the same
object) gets that norm as candidate source; any other Linear gets the nearest Linear called before it
with as many outputs as it has inputs. A candidate is kept only if folding random positive scales
into it leaves the model's output unchanged on a calibration batch: a source whose output also
feeds something else (a post-LN transformer's residual stream, a nonlinearity such as GELU, another
norm) changes the function and is skipped. In BERT-style (post-LN) models only the attention output
projection qualifies (folded into the value projection); in pre-LN models (GPT-2, LLaMA) the norms
before the attention and MLP input projections do too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .injection import named_quantizers
from .model_io import first_float_tensor
from .modules import QuantEmbedding, QuantLayer
from .process_group import all_reduce_
from .quantizers import bypassing

logger = logging.getLogger(__name__)

__all__ = ["SmoothingGroup", "smooth_model", "is_norm"]

#: relative L2 change of the model output below which a random fold counts as function-preserving
FOLD_TOLERANCE = 1e-4
_S_RANGE = (1e-5, 1e5)


@dataclass
class SmoothingGroup:
    """Linears (``targets``) reading one source's output; ``kind`` is ``"norm"`` or ``"linear"``."""

    source: str
    kind: str
    targets: List[str] = field(default_factory=list)


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm / RMSNorm with a per-channel affine ``weight`` (its output scales channel by channel)."""
    name = type(module).__name__
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm"))) and \
        isinstance(w, Tensor) and w.dim() == 1


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, QuantEmbedding)


def _act_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantLayer) and module.input_quantizer.bits < 32


def _in_axis(linear: nn.Module) -> int:
    """Axis of the input channels in ``weight``: Linear (out, in); GPT-2 Conv1D (in, out)."""
    return 0 if isinstance(linear, Conv1D) else 1


def _in_features(linear: nn.Module) -> int:
    return linear.weight.shape[_in_axis(linear)]


def _out_features(linear: nn.Module) -> int:
    return linear.weight.shape[1 - _in_axis(linear)]


class _Trace:
    """One pass over the batches: which Linears read a norm's output, the Linears' call order, and the
    per-input-channel ``max|X_j|`` of every Linear."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.norm_outputs: Dict[int, str] = {}
        self.keep: List[Tensor] = []  # norm outputs stay alive, so their ids are not reused
        self.reads_norm: Dict[str, str] = {}
        self.order: List[str] = []
        self.absmax: Dict[str, Tensor] = {}
        self.handles = []
        for m in model.modules():
            if is_norm(m):
                self.handles.append(m.register_forward_hook(self._norm_hook))
            elif _is_linear(m):
                self.handles.append(m.register_forward_pre_hook(self._linear_hook))

    def _norm_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            self.norm_outputs[id(out)] = self.names[id(module)]
            self.keep.append(out)

    def _linear_hook(self, module: nn.Module, args: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, Tensor) or x.shape[-1] != _in_features(module):
            return
        name = self.names[id(module)]
        if name not in self.order:
            self.order.append(name)
        source = self.norm_outputs.get(id(x))
        if source is not None:
            self.reads_norm.setdefault(name, source)
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.absmax[name] = torch.maximum(self.absmax[name], amax) if name in self.absmax else amax

    def end_batch(self) -> None:
        self.norm_outputs.clear()
        self.keep.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _candidates(model: nn.Module, trace: _Trace) -> List[SmoothingGroup]:
    groups: Dict[str, SmoothingGroup] = {}
    for name in trace.order:
        source = trace.reads_norm.get(name)
        kind = "norm"
        if source is None:
            i = trace.order.index(name)
            need = _in_features(model.get_submodule(name))
            before = [n for n in trace.order[:i] if _out_features(model.get_submodule(n)) == need]
            if not before:
                continue
            source, kind = before[-1], "linear"
        groups.setdefault(source, SmoothingGroup(source, kind)).targets.append(name)
    return list(groups.values())


@torch.no_grad()
def _fold(model: nn.Module, group: SmoothingGroup, s: Tensor) -> None:
    """Divide the source's output channels by ``s`` and multiply the targets' input channels by it."""
    source = model.get_submodule(group.source)
    if group.kind == "norm":
        shaped = [(source.weight, s)]
    else:
        out_axis = 1 - _in_axis(source)
        shaped = [(source.weight, s.reshape([-1, 1] if out_axis == 0 else [1, -1]))]
    if getattr(source, "bias", None) is not None:
        shaped.append((source.bias, s))
    for t, scale in shaped:
        t.div_(scale.to(t.dtype))
    for name in group.targets:
        w = model.get_submodule(name).weight
        w.mul_(s.to(w.dtype).reshape([1, -1] if _in_axis(model.get_submodule(name)) == 1 else [-1, 1]))


def _group_tensors(model: nn.Module, group: SmoothingGroup) -> List[Tensor]:
    mods = [model.get_submodule(group.source)] + [model.get_submodule(n) for n in group.targets]
    return [t for m in mods for t in (m.weight, getattr(m, "bias", None)) if isinstance(t, Tensor)]


def _all_reduce_max(stats: Dict[str, Tensor]) -> None:
    for v in stats.values():
        all_reduce_(v, "max")


@torch.no_grad()
def smooth_model(model: nn.Module, batches: Sequence[Any], alpha: float,
                 forward: Callable[[nn.Module, Any], Any]) -> List[SmoothingGroup]:
    """Migrate activation outliers of ``model``'s Linears into their weights, in place, from the
    calibration ``batches`` (``forward(model, batch)`` runs one); the quantizers are bypassed throughout.
    Returns the groups that were folded (each: the source and the Linears smoothed)."""
    if not batches:
        return []
    was_training = model.training
    model.eval()
    with bypassing(q for _, q in named_quantizers(model)):
        try:
            trace = _Trace(model)
            try:
                reference = None
                for i, batch in enumerate(batches):
                    out = first_float_tensor(forward(model, batch))
                    if i == 0:
                        reference = out.detach().float().clone() if out is not None else None
                    trace.end_batch()
            finally:
                trace.remove()
            _all_reduce_max(trace.absmax)
            if reference is None or not trace.absmax or \
                    not torch.isfinite(torch.stack([v.max() for v in trace.absmax.values()])).all():
                return []  # non-finite activations: calibrate() names the batch and layer
            folded = []
            gen = torch.Generator().manual_seed(0)
            for group in _candidates(model, trace):
                if not any(_act_quantized(model.get_submodule(n)) for n in group.targets):
                    continue
                if _preserves_function(model, group, batches[0], reference, forward, gen):
                    s = _scales(model, group, trace.absmax, alpha)
                    _fold(model, group, s)
                    folded.append(group)
        finally:
            model.train(was_training)
    logger.info("sqakd: SmoothQuant (alpha=%s) migrated %d layer input(s): %s", alpha,
                sum(len(g.targets) for g in folded), ", ".join(t for g in folded for t in g.targets) or "none")
    return folded


def _preserves_function(model: nn.Module, group: SmoothingGroup, batch: Any, reference: Tensor,
                        forward: Callable[[nn.Module, Any], Any], gen: torch.Generator) -> bool:
    """Fold random positive scales into the group, compare the output with ``reference``, restore."""
    channels = _in_features(model.get_submodule(group.targets[0]))
    saved = [t.detach().clone() for t in _group_tensors(model, group)]
    s = torch.empty(channels).uniform_(-1.0, 1.0, generator=gen).exp_()
    try:
        _fold(model, group, s.to(saved[0].device))
        out = first_float_tensor(forward(model, batch))
        err = (out.float() - reference).norm() / reference.norm().clamp_min(1e-30)
        return bool(err < FOLD_TOLERANCE)
    finally:
        for t, v in zip(_group_tensors(model, group), saved):
            t.copy_(v)


def _scales(model: nn.Module, group: SmoothingGroup, absmax: Dict[str, Tensor], alpha: float) -> Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` over the group's inputs and weights (1 where either is 0)."""
    x = torch.stack([absmax[n] for n in group.targets]).amax(0)
    w = torch.stack([model.get_submodule(n).weight.detach().abs().float().amax(1 - _in_axis(model.get_submodule(n)))
                     for n in group.targets]).amax(0).to(x.device)
    s = x.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((x > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(*_S_RANGE).to(model.get_submodule(group.targets[0]).weight.device)
