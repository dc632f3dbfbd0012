"""Quantizers: one module per method behind :class:`~.base.Quantizer`."""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type, Union

from .base import FullPrecision, Quantizer, bypassing
from .dorefa import DoReFaQuantizer
from .dynamic import RuntimeTokenQuantizer
from .ewgs import EWGSQuantizer
from .lsq import LSQQuantizer
from .minmax import MinMaxQuantizer
from .pact import PACTQuantizer

QUANTIZERS: Dict[str, Type[Quantizer]] = {
    "lsq": LSQQuantizer,
    "pact": PACTQuantizer,
    "dorefa": DoReFaQuantizer,
    "ewgs": EWGSQuantizer,
    "minmax": MinMaxQuantizer,
}
METHODS = tuple(QUANTIZERS)


def build_quantizer(
    method: str,
    bits: int,
    role: str,
    param_shape: Tuple[int, ...] = (),
    channel_axis: int = 0,
    delta: Optional[float] = None,
    init: str = "paper",
    per_token: Union[bool, str] = False,
) -> Quantizer:
    """The quantizer for ``method`` at ``bits`` (``FullPrecision`` at 32 bits).

    PACT weights are DoReFa weights with ``init="paper"`` (as in the PACT paper); with ``init="mse"`` they get a
    learned per-channel step initialised at the error-minimising clip (DoReFa's ``tanh`` normalisation bends a
    pretrained weight: MiniLM W4A8 min cosine -0.04 against 0.93). ``delta`` is used by
    EWGS only; the others use the straight-through estimator. ``init`` picks how ranges are
    initialised: ``"mse"`` (minimum quantization error) or ``"paper"`` (each method's own rule).
    ``per_token`` (activations only): one dynamic step per token row, ``max|x_t|`` times the method's parameter;
    ``"absmax"``: the runtime's dynamic per-token grid, nothing learned (:class:`RuntimeTokenQuantizer`, any method).
    """
    if bits >= 32:
        return FullPrecision(role)
    if per_token == "absmax":
        return RuntimeTokenQuantizer(bits, role, param_shape, delta=delta if method == "ewgs" else None)
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    cls = QUANTIZERS[method]
    if method == "pact" and role == "weight":
        cls = DoReFaQuantizer if init == "paper" else LSQQuantizer
    kw = {"delta": delta} if cls is EWGSQuantizer else {}
    if per_token:
        kw["per_token"] = True
    return cls(bits, role, param_shape, channel_axis=channel_axis, init=init, **kw)


__all__ = ["Quantizer", "FullPrecision", "bypassing", "RuntimeTokenQuantizer", "QUANTIZERS", "METHODS", "build_quantizer"] + [c.__name__ for c in QUANTIZERS.values()]
