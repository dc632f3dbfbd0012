"""Fake-quant layers: Linear, Conv2d (grouped/depthwise too), GPT-2's Conv1D, and weight-only Embedding.

Each wrapped layer is a subclass of the layer it replaces, keeps its parameters
under their original names (``weight``, ``bias``) so a teacher state dict loads
unchanged, and carries two submodules: ``weight_quantizer`` and ``input_quantizer``.
"""

from __future__ import annotations

import sys
from typing import Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .quantizers import Quantizer

class QuantLayer:
    """Mixin for fake-quant layers; ``weight_quantizer`` and ``input_quantizer`` are modules."""

    weight_quantizer: Quantizer
    input_quantizer: Quantizer
    #: axis of the output channel in ``weight`` (per-channel steps live there)
    channel_axis: int = 0
    #: the input's features are its last dimension (token rows: per-token activation steps apply)
    features_last: bool = True

    @classmethod
    def from_float(cls, layer: nn.Module, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> "QuantLayer":
        """Wrap ``layer`` sharing its parameters (no copy); works on meta tensors too."""
        with torch.device("meta"):
            new = cls._empty_like(layer)
        for key, value in layer.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules"):
                new.__dict__.setdefault(key, value)
        new.training = layer.training
        for name, p in layer._parameters.items():
            new._parameters[name] = p
        for name, b in layer._buffers.items():
            new._buffers[name] = b
        new.weight_quantizer = weight_quantizer
        new.input_quantizer = input_quantizer
        return new

    @classmethod
    def _empty_like(cls, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    @classmethod
    def quantizer_param_shape(cls, weight_shape: torch.Size) -> tuple:
        """Broadcastable shape of one-value-per-output-channel parameters."""
        shape = [1] * len(weight_shape)
        shape[cls.channel_axis] = weight_shape[cls.channel_axis]
        return tuple(shape)


class QuantLinear(QuantLayer, nn.Linear):
    @classmethod
    def _empty_like(cls, layer: nn.Linear) -> "QuantLinear":
        return cls(layer.in_features, layer.out_features, bias=layer.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantLayer, nn.Conv2d):
    features_last = False  # channels are dim 1: activations stay per tensor

    @classmethod
    def _empty_like(cls, layer: nn.Conv2d) -> "QuantConv2d":
        return cls(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantConv1D(QuantLayer, Conv1D):
    """GPT-2 style Conv1D: ``weight`` is (in, out), so output channels are axis 1."""

    channel_axis = 1

    @classmethod
    def _empty_like(cls, layer: Conv1D) -> "QuantConv1D":
        return cls(layer.nf, layer.nx)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        xq = self.input_quantizer(x)
        out = torch.addmm(self.bias, xq.reshape(-1, xq.size(-1)), self.quantized_weight())
        return out.view(size_out)


class QuantEmbedding(QuantLayer, nn.Embedding):
    """Weight-only fake-quant embedding table: one step per row (``weight_quantizer`` per output channel,
    axis 0); ``input_quantizer`` is a full-precision placeholder (token ids are not quantized)."""

    @classmethod
    def _empty_like(cls, layer: nn.Embedding) -> "QuantEmbedding":
        return cls(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx, max_norm=layer.max_norm,
                   norm_type=layer.norm_type, scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse)

    def forward(self, ids: Tensor) -> Tensor:
        if self.max_norm is not None or self.weight_quantizer.observing:  # max_norm renormalises the table in place
            return F.embedding(ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
        # only the looked-up rows are quantized (the quantizers are row-local): not the whole table every step
        rows = F.embedding(ids, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)
        flat = self.weight_quantizer.quantize_rows(rows.reshape(-1, rows.shape[-1]), ids.reshape(-1))
        return flat.reshape(rows.shape)


WRAPPERS: Dict[Type[nn.Module], Type[QuantLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    Conv1D: QuantConv1D,
}



#: weight-only wrappers of lookup tables, used when ``QuantConfig.embedding_bits`` is set
EMBEDDING_WRAPPERS: Dict[Type[nn.Module], Type[QuantLayer]] = {nn.Embedding: QuantEmbedding}


def _register_timm_layers() -> None:
    """Wrappers for timm's own layer classes, registered once timm is in use: a model that holds timm
    layers was built after ``import timm``, so a text-only run never imports it."""
    from timm.layers import Conv2dSame
    from timm.layers import Linear as TimmLinear  # adds only a TorchScript dtype cast to nn.Linear
    from timm.layers.padding import pad_same

    class QuantConv2dSame(QuantConv2d):
        """timm's Conv2dSame (dynamic TF 'same' padding) with fake-quant."""

        def forward(self, x: Tensor) -> Tensor:
            # zero padding is exactly representable on every grid, so quantize before padding
            x = pad_same(self.input_quantizer(x), self.weight.shape[-2:], self.stride, self.dilation)
            return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, (0, 0), self.dilation, self.groups)

        @classmethod
        def _empty_like(cls, layer: nn.Conv2d) -> "QuantConv2dSame":
            return cls(
                layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
            )

    QuantConv2dSame.__module__ = __name__
    QuantConv2dSame.__qualname__ = "QuantConv2dSame"  # pickle finds it as sqakd_hf.modules.QuantConv2dSame
    globals()["QuantConv2dSame"] = QuantConv2dSame
    WRAPPERS[Conv2dSame] = QuantConv2dSame
    WRAPPERS[TimmLinear] = QuantLinear


def __getattr__(name: str) -> type:
    """``QuantConv2dSame`` also in a process that has not wrapped a timm layer yet (unpickling)."""
    if name == "QuantConv2dSame":
        _register_timm_layers()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def wrapper_for(layer: nn.Module) -> Optional[Type[QuantLayer]]:
    """The fake-quant class for exactly this layer type, or None."""
    cls = type(layer)
    if cls not in WRAPPERS and cls.__module__.startswith("timm.") and "timm" in sys.modules:
        if "QuantConv2dSame" not in globals():
            _register_timm_layers()
    return WRAPPERS.get(cls)
