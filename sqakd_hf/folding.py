"""BatchNorm folding: each BatchNorm whose only input is a convolution's only output is folded into that conv.

In eval mode a BatchNorm computes ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` per channel, so after a
conv ``x = W * u + b`` the pair equals one conv with ``W' = W * gamma / sqrt(var + eps)`` (per output channel)
and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Folding before quantization makes the quantized weight
the one an integer deployment computes with (per-channel weight steps absorb ``gamma / sigma``).

The conv -> BatchNorm pairs are found in the model's data flow (a ``torch.fx`` trace with convolutions and
norms as leaves; a module that cannot be traced is searched child by child), never from names or registration
order, and the search needs no data: it runs on a meta-device skeleton too, so a saved folded model rebuilds the
same structure before its weights load. A folded BatchNorm is replaced by :class:`FoldedNorm` (identity, or
timm's ``BatchNormAct2d`` activation and dropout, kept under their names).
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

__all__ = ["FoldedNorm", "fold_batchnorm", "conv_bn_pairs", "set_submodule", "traced_graphs"]

#: the layer types treated as convolutions (folding, bias correction)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FoldedNorm(nn.Module):
    """What is left of a BatchNorm folded into the conv before it: its activation and dropout (timm's
    ``BatchNormAct2d``), or nothing. Child names are the norm's own, so their tensors keep their keys."""

    def __init__(self, act: Optional[nn.Module] = None, drop: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps convolutions, norms, :class:`FoldedNorm`, timm's no-trace modules and the modules
    ``leaf_if`` accepts whole."""

    def __init__(self, leaf_if: Optional[Callable[[nn.Module], bool]] = None) -> None:
        self._leaf_if = leaf_if
        leaf, functions = [], []
        if "timm" in sys.modules:
            from timm.layers import get_notrace_functions, get_notrace_modules

            leaf, functions = get_notrace_modules(), [f for f in get_notrace_functions() if callable(f)]
        super().__init__(autowrap_functions=tuple(functions))
        self._leaf = tuple(leaf)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, CONVS + (_BatchNorm, FoldedNorm)) or type(m) in self._leaf:
            return True
        if self._leaf_if is not None and self._leaf_if(m):
            return True
        return super().is_leaf_module(m, qualname)


def traced_graphs(model: nn.Module, prefix: str = "", leaf: Optional[Callable[[nn.Module], bool]] = None
                  ) -> Iterator[Tuple[str, fx.Graph]]:
    """``(prefix, graph)`` of ``model`` traced by ``torch.fx`` (module targets relative to ``prefix``; modules that
    ``leaf`` accepts are kept whole, as convolutions and norms are); a module that does not trace (data-dependent
    control flow) is replaced by the graphs of its children."""
    try:
        graph = _LeafTracer(leaf).trace(model)
    except Exception:  # noqa: BLE001 - any trace failure: search the children instead
        for name, child in model.named_children():
            yield from traced_graphs(child, f"{prefix}{name}.", leaf)
        return
    yield prefix, graph


def _foldable_norm(m: nn.Module) -> bool:
    if not (isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None):
        return False
    if type(m) in _PLAIN_NORMS:
        return True
    return type(m).__name__ == "BatchNormAct2d" and type(m).__module__.startswith("timm.")


def conv_bn_pairs(model: nn.Module, leaf: Optional[Callable[[nn.Module], bool]] = None) -> List[Tuple[str, str]]:
    """``(conv_name, norm_name)`` for every BatchNorm (with running statistics) whose input is a conv's output
    that nothing else reads, each module called once, channel counts equal. ``leaf``: modules traced whole (e.g.
    fake-quant layers, whose forward does not trace)."""
    modules = dict(model.named_modules())
    pairs = []
    for prefix, graph in traced_graphs(model, leaf=leaf):
        calls: Dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            src = node.args[0]
            if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
                continue
            conv, norm = modules.get(prefix + src.target), modules.get(prefix + node.target)
            if (isinstance(conv, CONVS) and norm is not None and _foldable_norm(norm)
                    and calls[src.target] == 1 and calls[node.target] == 1 and conv.out_channels == norm.num_features):
                pairs.append((prefix + src.target, prefix + node.target))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, norm: _BatchNorm) -> None:
    w = conv.weight
    scale = torch.rsqrt(norm.running_var.to(torch.float64) + norm.eps)
    shift = -norm.running_mean.to(torch.float64) * scale
    if norm.affine:
        scale, shift = scale * norm.weight.to(torch.float64), shift * norm.weight.to(torch.float64) + norm.bias
    bias = conv.bias.to(torch.float64) * scale if conv.bias is not None else 0.0
    view = (-1,) + (1,) * (w.dim() - 1)
    w.copy_((w.to(torch.float64) * scale.reshape(view)).to(w.dtype))
    new_bias = (bias + shift).to(w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule called ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def fold_batchnorm(model: nn.Module) -> List[str]:
    """Fold every BatchNorm that directly follows a conv into that conv, in place (eval-mode function kept, up
    to float rounding: the fold is computed in float64). Returns the names of the folded norms (empty for a
    model without BatchNorm: a no-op). Works on meta tensors (structure only). The conv gains a bias; the
    norm becomes a :class:`FoldedNorm` keeping a timm ``BatchNormAct2d``'s activation and dropout."""
    folded = []
    for conv_name, norm_name in conv_bn_pairs(model):
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        _fold_into(conv, norm)
        set_submodule(model, norm_name, FoldedNorm(getattr(norm, "act", None), getattr(norm, "drop", None)))
        folded.append(norm_name)
    if folded:
        logger.info("sqakd: folded %d BatchNorm layers into the convs before them", len(folded))
    return folded
