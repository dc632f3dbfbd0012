"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", Sec. 4.1) for conv -> activation -> conv pairs.

For a pair whose first conv's output channel ``c`` only reaches the second conv through a per-channel positively
homogeneous activation (ReLU, ReLU6, identity, dropout), dividing that channel of the first conv (weight and bias)
by ``s_c`` and multiplying the second conv's input channel ``c`` by ``s_c`` keeps the function. With
``s_c = sqrt(r1_c * r2_c) / r2_c`` (``r1_c``: range of the first conv's output channel ``c``, ``r2_c``: range of
the second conv's input channel ``c``) both become ``sqrt(r1_c * r2_c)``, so per-channel weight steps and per-tensor
activation steps waste less of their grid on one large channel. ReLU6 is only positively homogeneous up to its
clip: ``min(max(x / s, 0), 6 / s) = relu6(x) / s``, so it becomes a :class:`ChannelClip` with the upper bound
``6 / s_c`` per channel. Pairs are equalized in turn, a few sweeps (chains such as pointwise -> depthwise ->
pointwise share their middle conv).

Pairs come from the ``torch.fx`` data flow (as for BatchNorm folding, which must run first: a BatchNorm between
the convs stops the search); no data is needed, so a saved equalized model rebuilds its :class:`ChannelClip`
modules on a meta skeleton before the weights load.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .folding import FoldedNorm, set_submodule, traced_graphs

logger = logging.getLogger(__name__)

__all__ = ["ChannelClip", "equalize_model", "equalizable_pairs"]

#: sweeps over all pairs (ranges change when a neighbouring pair is equalized)
SWEEPS = 4
#: per-channel scales are kept within these bounds (a dead channel keeps scale 1)
_SCALE_RANGE = (1e-4, 1e4)
_PASS_THROUGH = (nn.Identity, nn.Dropout)


class ChannelClip(nn.Module):
    """``min(max(x, 0), upper_c)`` along channel dim 1: ReLU6 with one upper bound per channel (a buffer)."""

    def __init__(self, channels: int, upper: float = 6.0) -> None:
        super().__init__()
        self.register_buffer("upper", torch.full((channels,), float(upper)))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.minimum(x.clamp_min(0), self.upper.to(x.dtype).view(shape))


def _activation_of(module: nn.Module) -> Optional[nn.Module]:
    """The homogeneous activation a module applies (itself, or a FoldedNorm's act), or None if it is not one."""
    if isinstance(module, FoldedNorm):
        if not isinstance(module.drop, _PASS_THROUGH):
            return None
        module = module.act
    if isinstance(module, (nn.ReLU, nn.ReLU6, ChannelClip) + _PASS_THROUGH):
        return module
    return None


def _conv_kind(conv: nn.Module) -> Optional[str]:
    if not isinstance(conv, nn.Conv2d):
        return None
    if conv.groups == 1:
        return "full"
    if conv.groups == conv.in_channels == conv.out_channels:
        return "depthwise"
    return None


def equalizable_pairs(model: nn.Module) -> List[Tuple[str, List[str], str]]:
    """``(first_conv, [modules between], second_conv)`` for every conv whose output reaches exactly one other
    conv (dense or depthwise) only through homogeneous activations, each module called once."""
    modules = dict(model.named_modules())
    pairs = []
    for prefix, graph in traced_graphs(model):
        calls: dict = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        for node in graph.nodes:
            first = modules.get(prefix + str(node.target)) if node.op == "call_module" else None
            if _conv_kind(first) is None or calls[node.target] != 1:
                continue
            between, cur = [], node
            while len(cur.users) == 1:
                nxt = next(iter(cur.users))
                if nxt.op != "call_module" or calls[nxt.target] != 1 or nxt.args[:1] != (cur,) or len(nxt.args) != 1:
                    break
                m = modules[prefix + nxt.target]
                if _conv_kind(m) is not None:
                    if m.in_channels == first.out_channels:
                        pairs.append((prefix + str(node.target), between, prefix + nxt.target))
                    break
                if _activation_of(m) is None:
                    break
                between.append(prefix + nxt.target)
                cur = nxt
    return pairs


def _clip_module(model: nn.Module, name: str, channels: int) -> Optional[ChannelClip]:
    """Replace a ReLU6 (itself or a FoldedNorm's act) named ``name`` by a ChannelClip; return the ChannelClip
    now in its place (None for activations without a clip)."""
    module = model.get_submodule(name)
    owner, attr = (module, "act") if isinstance(module, FoldedNorm) else (None, None)
    act = module.act if owner is not None else module
    if isinstance(act, nn.ReLU6):
        clip = ChannelClip(channels, 6.0).to(device=next(iter(model.parameters())).device)
        if owner is not None:
            setattr(owner, attr, clip)
        else:
            set_submodule(model, name, clip)
        return clip
    return act if isinstance(act, ChannelClip) else None


def _ranges(first: nn.Conv2d, second: nn.Conv2d) -> Tuple[Tensor, Tensor]:
    w1, w2 = first.weight.detach(), second.weight.detach()
    r1 = w1.abs().flatten(1).amax(1)
    r2 = w2.abs().flatten(1).amax(1) if _conv_kind(second) == "depthwise" else w2.abs().transpose(0, 1).flatten(1).amax(1)
    return r1, r2


@torch.no_grad()
def equalize_model(model: nn.Module, sweeps: int = SWEEPS) -> List[str]:
    """Equalize every conv -> activation -> conv pair of ``model`` in place (function kept up to float
    rounding; ReLU6 between the pair becomes a :class:`ChannelClip`). Returns ``"first -> second"`` per pair;
    a model without such pairs is unchanged. Run :func:`sqakd_hf.folding.fold_batchnorm` first."""
    pairs = equalizable_pairs(model)
    clips = []
    for first_name, between, _ in pairs:
        channels = model.get_submodule(first_name).out_channels
        clips.append([c for c in (_clip_module(model, n, channels) for n in between) if c is not None])
    for _ in range(sweeps):
        for (first_name, _, second_name), pair_clips in zip(pairs, clips):
            first, second = model.get_submodule(first_name), model.get_submodule(second_name)
            r1, r2 = _ranges(first, second)
            live = (r1 > 0) & (r2 > 0)
            s = torch.where(live, (r1 * r2).sqrt() / r2.clamp_min(1e-30), torch.ones_like(r1)).clamp(*_SCALE_RANGE)
            first.weight.div_(s.view(-1, *([1] * (first.weight.dim() - 1))))
            if first.bias is not None:
                first.bias.div_(s)
            if _conv_kind(second) == "depthwise":
                second.weight.mul_(s.view(-1, *([1] * (second.weight.dim() - 1))))
            else:
                second.weight.mul_(s.view(1, -1, *([1] * (second.weight.dim() - 2))))
            for clip in pair_clips:
                clip.upper.div_(s)
    if pairs:
        logger.info("sqakd: equalized %d conv pairs (cross-layer equalization)", len(pairs))
    return [f"{a} -> {b}" for a, _, b in pairs]
