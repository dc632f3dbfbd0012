"""Quantizers: one module per method behind :class:`~.base.Quantizer`."""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

from .base import FullPrecision, Quantizer
from .dorefa import DoReFaQuantizer
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
) -> Quantizer:
    """The quantizer for ``method`` at ``bits`` (``FullPrecision`` at 32 bits).

    PACT weights are DoReFa weights (as in the PACT paper). ``delta`` is used by
    EWGS only; the others use the straight-through estimator. ``init`` picks how ranges are
    initialised: ``"mse"`` (minimum quantization error) or ``"paper"`` (each method's own rule).
    """
    if bits >= 32:
        return FullPrecision(role)
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    cls = DoReFaQuantizer if (method == "pact" and role == "weight") else QUANTIZERS[method]
    kw = {"delta": delta} if cls is EWGSQuantizer else {}
    return cls(bits, role, param_shape, channel_axis=channel_axis, init=init, **kw)


__all__ = ["Quantizer", "FullPrecision", "QUANTIZERS", "METHODS", "build_quantizer"] + [c.__name__ for c in QUANTIZERS.values()]
