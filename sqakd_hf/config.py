"""`QuantConfig`: what to quantize and how; lands in config.json as ``quantization_config``."""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Dict, List, Mapping, Optional, Union

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quantizers import METHODS
from .quantizers.base import ACT_GRANULARITIES, INIT_MODES

QUANT_METHOD = "sqakd"
ALLOWED_BITS = tuple(range(1, 9)) + (32,)
GRANULARITIES = ("per_channel", "per_tensor")
#: integer engines ``deploy`` can target, and the methods whose grids they run
DEPLOY_TARGETS = ("onnx", "onnx-vnni")
DEPLOY_METHODS = ("lsq", "pact", "minmax")

BitsOverride = Union[int, Mapping[str, int]]


def _check_bits(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in ALLOWED_BITS:
        raise ValueError(f"{field} must be an integer in 1..8, or 32 to keep full precision; got {value!r}")
    return value


def _check_pattern(field: str, pattern: Any) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field} entries must be non-empty strings (regular expressions); got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{field} entry {pattern!r} is not a valid regular expression: {e}") from None
    return pattern


class QuantConfig(QuantizationConfigMixin):
    """Configuration of a SQAKD fake-quantized model.

    Args:
        method: quantizer family: ``"lsq"``, ``"pact"``, ``"dorefa"``, ``"ewgs"`` or ``"minmax"``
            (a non-learned absmax/min-max baseline).
        weight_bits / act_bits: 1..8, or 32 to leave that side full precision.
        weight_granularity: ``"per_channel"`` (one step per output channel) or ``"per_tensor"``.
        act_granularity: ``"per_token"`` (default without ``deploy``; one dynamic step per token row of every
            Linear / Conv1D input, ``max|x_t|`` times the method's learned parameter, computed in forward; conv
            inputs stay per tensor), ``"per_tensor"`` (default with ``deploy``; one static step per layer input, as
            in the papers) or
            ``"per_token_absmax"`` (dynamic per token with the runtime's fixed ratio, nothing learned: step
            ``max|x_t| / ((2^b - 1) / 2)`` on a symmetric grid, as compressed-tensors and vLLM compute for dynamic
            token activations; exports exactly to both deploy formats).
        smooth_alpha: SmoothQuant outlier migration strength in (0, 1] (Xiao et al. 2023), or None (default,
            off). At calibration each input channel j of a Linear whose input comes from a foldable layer is
            divided by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, ``W[:, j]`` multiplied by it and ``1 / s_j``
            folded into the preceding LayerNorm or Linear, so the full-precision function is unchanged.
        embedding_bits: weight-only quantization of ``nn.Embedding`` tables, one step per row (1..8 bits), or
            None (default: embeddings stay full precision). Tied embeddings are kept full precision.
        ewgs_delta: EWGS's gradient-scaling factor (latent on [0, 1], as in the paper); EWGS only.
        init: how calibration initialises the learned ranges: ``"mse"`` (default; the clip that minimises the
            squared quantization error: per output channel for weights, from a histogram of the calibration
            activations) or ``"paper"`` (each method's own rule: LSQ ``2 mean|x| / sqrt(Qp)``, PACT a high
            percentile of ``|x|``, EWGS ``3 std``). DoReFa has no learned range; minmax weights under ``"mse"``
            scale each channel's absmax by the clip ratio of least squared error (fixed at calibration), under
            ``"paper"`` they are plain absmax.
        fold_bn: fold every BatchNorm that directly follows a conv into that conv before quantizing (default
            False; eval-mode function unchanged): the quantized weight is then the one an integer deployment
            computes with, and no BatchNorm is left to train. A model without BatchNorm is unchanged.
        equalize: cross-layer equalization (Nagel et al. 2019) of every conv -> ReLU/ReLU6 -> conv pair before
            quantizing (default False; function unchanged, ReLU6 becomes a per-channel clip): channel ``c`` of the
            first conv is divided and the second conv's input channel ``c`` multiplied by
            ``s_c = sqrt(r1_c * r2_c) / r2_c`` (``r``: per-channel weight ranges). Needs ``fold_bn=True`` on
            models with BatchNorm (a BatchNorm between the convs stops the pair); a no-op without conv pairs.
        bias_correction: at calibration, add each quantized layer's mean output shift (full precision minus
            quantized, per output channel, over the calibration batches) to its bias, or subtract it from the
            running mean of the BatchNorm that alone reads a bias-free conv's output (other layers without a bias
            are left as they are). ``"auto"`` (default): convolutions only (EfficientNet-Lite0 W8A8 85.0% ->
            92.8% top-1 agreement; on transformer linears the mean shift is not the same for every token and the
            correction can hurt: all-MiniLM-L6-v2 static per-tensor W8A8 0.986 -> 0.480 min cosine), and not for
            DoReFa, whose fixed [0, 1] activation clip makes the shift depend on the input (resnet18 W8A8 relative
            error 0.041 -> 0.098); ``True``: every quantized layer; ``False``: off.
        gptq: at calibration, round each quantized Conv2d / Linear weight with GPTQ (Frantar et al. 2023) on the
            grid calibration chose, from the layer's calibration inputs, instead of to the nearest grid value
            (default False; methods whose forward does not keep its own grid values, e.g. minmax, are left as
            they are). The master weights become the rounded grid values.
        deploy: train the function an integer engine runs (see :mod:`sqakd_hf.deploy_mode`), or None (default).
            ``"onnx"``: what a fully integer onnxruntime graph (QLinearConv + QLinearAdd) quantizes: BatchNorm
            folded (implies ``fold_bn=True``), static per-tensor activations (the default ``act_granularity``
            then), the inputs and output of every residual add quantized, one step per tensor that several
            layers read; 8-bit weights are trained as 7-bit codes (``[-64, 63]``, onnxruntime's reduce-range
            convention), because x86 CPUs without VNNI add pairs of u8 x s8 products in saturating int16 and
            full 8-bit codes can overflow there. ``"onnx-vnni"``: the same with full 8-bit weight codes, for CPUs
            with VNNI (or ARM). Methods with a static integer grid only: ``"lsq"``, ``"pact"``, ``"minmax"``.
        modules_to_not_convert: regular expressions (``re.search`` on the qualified module name) of
            layers kept full precision. ``None`` (default) keeps the first layer (stem conv / patch
            embedding) and the classifier head full precision, as in the paper; a list replaces
            that rule (use ``[]`` to quantize everything).
        layer_bits: mixed precision, ``{pattern: bits}`` or ``{pattern: {"weight_bits": w, "act_bits": a}}``;
            the first matching pattern wins.
        packed: set by the exporter: the checkpoint holds packed integer codes, not FP master weights.
    """

    def __init__(
        self,
        method: str = "lsq",
        weight_bits: int = 4,
        act_bits: int = 4,
        weight_granularity: str = "per_channel",
        ewgs_delta: float = 1e-3,
        init: str = "mse",
        act_granularity: Optional[str] = None,
        smooth_alpha: Optional[float] = None,
        embedding_bits: Optional[int] = None,
        fold_bn: bool = False,
        equalize: bool = False,
        bias_correction: Union[bool, str] = "auto",
        gptq: bool = False,
        deploy: Optional[str] = None,
        modules_to_not_convert: Optional[List[str]] = None,
        layer_bits: Optional[Dict[str, BitsOverride]] = None,
        packed: bool = False,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(
                f"QuantConfig got unknown field(s) {sorted(kwargs)}; allowed: {', '.join(self._fields())}"
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} for QuantConfig; got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        self.method = method
        self.weight_bits = _check_bits("weight_bits", weight_bits)
        self.act_bits = _check_bits("act_bits", act_bits)
        if weight_granularity not in GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {', '.join(GRANULARITIES)}; got {weight_granularity!r}")
        self.weight_granularity = weight_granularity
        if (isinstance(ewgs_delta, bool) or not isinstance(ewgs_delta, (int, float)) or not math.isfinite(ewgs_delta)
                or ewgs_delta < 0):
            raise ValueError(f"ewgs_delta must be a finite number >= 0 (0 = straight-through); got {ewgs_delta!r}")
        self.ewgs_delta = float(ewgs_delta)
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {', '.join(INIT_MODES)}; got {init!r}")
        self.init = init
        if deploy not in (None,) + DEPLOY_TARGETS:
            raise ValueError(f"deploy must be one of {', '.join(DEPLOY_TARGETS)} or None; got {deploy!r}")
        self.deploy = deploy
        if act_granularity is None:
            act_granularity = "per_tensor" if deploy else "per_token"
        if act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {', '.join(ACT_GRANULARITIES)}; got {act_granularity!r}")
        self.act_granularity = act_granularity
        if smooth_alpha is not None and (isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, (int, float))
                                         or not 0 < smooth_alpha <= 1):
            raise ValueError(f"smooth_alpha must be a number in (0, 1] (SmoothQuant uses 0.5) or None; got {smooth_alpha!r}")
        self.smooth_alpha = None if smooth_alpha is None else float(smooth_alpha)
        if embedding_bits is not None and (isinstance(embedding_bits, bool) or not isinstance(embedding_bits, int)
                                           or embedding_bits not in range(1, 9)):
            raise ValueError(f"embedding_bits must be an integer in 1..8, or None to keep embeddings full precision; "
                             f"got {embedding_bits!r}")
        self.embedding_bits = embedding_bits
        if not isinstance(fold_bn, bool):
            raise ValueError(f"fold_bn must be True or False; got {fold_bn!r}")
        self.fold_bn = fold_bn or deploy is not None  # an integer graph has no BatchNorm
        for name, value in (("equalize", equalize), ("gptq", gptq)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False; got {value!r}")
        if not isinstance(bias_correction, bool) and bias_correction != "auto":
            raise ValueError(f"bias_correction must be True, False or 'auto' (convolutions only); got {bias_correction!r}")
        self.equalize = equalize
        self.bias_correction = bias_correction
        self.gptq = gptq
        if deploy is not None and (act_granularity != "per_tensor" or method not in DEPLOY_METHODS):
            raise ValueError(f"deploy={deploy!r} needs static per-tensor activations and a method with a static integer "
                             f"grid ({', '.join(DEPLOY_METHODS)}); got method={method!r}, "
                             f"act_granularity={act_granularity!r}")
        if modules_to_not_convert is not None:
            if isinstance(modules_to_not_convert, str) or not isinstance(modules_to_not_convert, (list, tuple)):
                raise ValueError(
                    f"modules_to_not_convert must be a list of name patterns or None; got {modules_to_not_convert!r}"
                )
            modules_to_not_convert = [_check_pattern("modules_to_not_convert", p) for p in modules_to_not_convert]
        self.modules_to_not_convert = modules_to_not_convert
        self.layer_bits = self._normalise_layer_bits(layer_bits or {})
        if not isinstance(packed, bool):
            raise ValueError(f"packed must be a bool; got {packed!r}")
        self.packed = packed

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """A saved config (``config.json``'s ``quantization_config``). One written before ``act_granularity``
        existed was quantized with static per-tensor activations, and is read so."""
        config_dict = dict(config_dict)
        if config_dict.get("quant_method", QUANT_METHOD) == QUANT_METHOD:
            config_dict.setdefault("act_granularity", "per_tensor")
            for name in ("fold_bn", "equalize", "bias_correction", "gptq"):  # written before these existed: not applied
                config_dict.setdefault(name, False)
        return super().from_dict(config_dict, return_unused_kwargs, **kwargs)

    @staticmethod
    def _fields() -> List[str]:
        return [
            "method", "weight_bits", "act_bits", "weight_granularity", "ewgs_delta", "init", "act_granularity",
            "smooth_alpha", "embedding_bits", "fold_bn", "equalize", "bias_correction", "gptq", "deploy",
            "modules_to_not_convert", "layer_bits", "packed", "quant_method",
        ]

    @staticmethod
    def _normalise_layer_bits(layer_bits: Mapping[str, BitsOverride]) -> Dict[str, Dict[str, int]]:
        if not isinstance(layer_bits, Mapping):
            raise ValueError(f"layer_bits must be a mapping pattern -> bits; got {layer_bits!r}")
        out: Dict[str, Dict[str, int]] = {}
        for pattern, bits in layer_bits.items():
            _check_pattern("layer_bits", pattern)
            if isinstance(bits, Mapping):
                unknown = set(bits) - {"weight_bits", "act_bits"}
                if unknown or not bits:
                    raise ValueError(
                        f"layer_bits[{pattern!r}] takes keys 'weight_bits' and/or 'act_bits'; got {dict(bits)!r}"
                    )
                out[pattern] = {k: _check_bits(f"layer_bits[{pattern!r}].{k}", v) for k, v in bits.items()}
            else:
                b = _check_bits(f"layer_bits[{pattern!r}]", bits)
                out[pattern] = {"weight_bits": b, "act_bits": b}
        return out

    def bits_for(self, name: str) -> Dict[str, int]:
        """``{"weight_bits", "act_bits"}`` for the module called ``name`` (overrides applied)."""
        bits = {"weight_bits": self.weight_bits, "act_bits": self.act_bits}
        for pattern, override in self.layer_bits.items():
            if re.search(pattern, name):
                bits.update(override)
                break
        if self.deploy == "onnx" and bits["weight_bits"] == 8:  # reduce range: u8 x s8 pairs never saturate int16
            bits["weight_bits"] = 7
        return bits

    def to_dict(self) -> Dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in self._fields()}

    @property
    def short_name(self) -> str:
        """E.g. ``lsq-W4A4``."""
        return f"{self.method}-W{self.weight_bits}A{self.act_bits}"


#: QuantConfig fields that describe storage, not the quantized function
STORAGE_FIELDS = ("packed", "quant_method")
#: fields a loaded checkpoint may differ in: storage, and how calibration first set ranges and migrated outliers
#: (the result of these is in the saved tensors)
_NOT_COMPARED = STORAGE_FIELDS + ("init", "smooth_alpha", "bias_correction", "gptq")


def check_config_compatible(saved: QuantConfig, requested: QuantConfig, where: str = "the checkpoint") -> None:
    """Raise ``ValueError`` naming every field in which ``requested`` contradicts ``saved``."""
    a, b = saved.to_dict(), requested.to_dict()
    diff = [k for k in a if k not in _NOT_COMPARED and a[k] != b.get(k)]
    if diff:
        rows = "; ".join(f"{k}: {where} has {a[k]!r}, you passed {b.get(k)!r}" for k in diff)
        raise ValueError(
            f"the quantization_config you passed contradicts the one {where} was quantized with ({rows}). "
            "Drop the quantization_config argument to load the checkpoint as saved, or start from the "
            "full-precision teacher to quantize it differently."
        )
