"""Static TF 'same' padding for export: timm's ``Conv2dSame`` (the ``tf_*`` models) and our ``QuantConv2dSame`` pad
their input by an amount computed from its height and width at every call, which traces into shape arithmetic
(``Shape``, ``Ceil``, ``Sub``...) feeding a ``Pad`` whose amounts are not constants. onnxruntime then cannot fuse the
conv with its Q/DQ pairs: it stays a float ``Conv`` between a DequantizeLinear and a QuantizeLinear.

An exported graph has a fixed height and width (only the batch, and the sequence of token inputs, are dynamic), so
while :func:`static_same_padding` is open each such conv pads by the constant amounts of the example input's size:
``pad = max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)`` per spatial axis, split ``pad // 2`` before and the
rest after, as TensorFlow does. The traced ``Pad`` then has constant amounts, which
:func:`~sqakd_hf.export.onnx_integer.to_integer_graph` folds into the conv's own ``pads`` attribute.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Callable, Dict, Iterator, List, Set, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..deploy_mode import integer_bias

__all__ = ["same_padding", "static_same_padding", "same_padding_convs"]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int]:
    """TF 'same' padding ``(before, after)`` of one spatial axis of length ``size``."""
    pad = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return pad // 2, pad - pad // 2


def same_padding_convs(model: nn.Module) -> List[Tuple[str, nn.Conv2d]]:
    """``(name, conv)`` of every timm ``Conv2dSame`` and ``QuantConv2dSame`` in ``model`` (none without timm)."""
    if "timm" not in sys.modules:
        return []
    from timm.layers import Conv2dSame

    from .. import modules

    quant = vars(modules).get("QuantConv2dSame")  # defined once a timm layer was wrapped
    kinds = (Conv2dSame,) + ((quant,) if quant is not None else ())
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def _static_forward(conv: nn.Conv2d, size: Tuple[int, int]) -> Callable[[Tensor], Tensor]:
    (top, bottom), (left, right) = (same_padding(n, k, s, d) for n, k, s, d in
                                    zip(size, conv.kernel_size, conv.stride, conv.dilation))
    quantized = hasattr(conv, "input_quantizer")

    def forward(x: Tensor) -> Tensor:
        if quantized:  # zero padding is exact on every grid: quantize first, as QuantConv2dSame does
            x = conv.input_quantizer(x)
        x = F.pad(x, (left, right, top, bottom))
        weight = conv.quantized_weight() if quantized else conv.weight
        return F.conv2d(x, weight, integer_bias(conv), conv.stride, (0, 0), conv.dilation, conv.groups)

    return forward


@contextlib.contextmanager
def static_same_padding(model: nn.Module, run: Callable[[], object]) -> Iterator[int]:
    """While open, every same-padding conv of ``model`` pads by constants: the amounts for the input size it saw
    during ``run()`` (one forward on the example inputs; skipped when there is no such conv; a conv called at two
    sizes keeps its dynamic padding). Yields the number of convs made static; their forwards are restored on exit."""
    convs = same_padding_convs(model)
    if not convs:
        yield 0
        return
    sizes: Dict[nn.Module, Set[Tuple[int, int]]] = {}

    def record(conv: nn.Module, args: Tuple[Tensor, ...]) -> None:
        sizes.setdefault(conv, set()).add(tuple(args[0].shape[-2:]))

    hooks = [conv.register_forward_pre_hook(record) for _, conv in convs]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    swapped = [conv for _, conv in convs if len(sizes.get(conv, ())) == 1]  # a conv called at two sizes stays dynamic
    try:
        for conv in swapped:
            conv.forward = _static_forward(conv, next(iter(sizes[conv])))
        yield len(swapped)
    finally:
        for conv in swapped:
            vars(conv).pop("forward", None)
