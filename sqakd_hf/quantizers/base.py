"""The one interface every quantizer implements.

A quantizer is an ``nn.Module`` that fake-quantizes one tensor: a layer's weight
(``role="weight"``) or its input activation (``role="act"``). Its life cycle:

1. built with its bit-width and the shape of its parameters (known before any
   weight is loaded, so quantizers can live on a meta skeleton);
2. initialised: weight quantizers from the weight (:meth:`init_from_weight`),
   activation quantizers from statistics of calibration batches
   (:meth:`observe` then :meth:`init_from_stats`); the statistics are sums,
   minima and maxima, so they can be all-reduced across ranks first;
3. trained: ``forward`` fakes the quantization, gradients reach the input and
   the learnable parameters (listed by :meth:`quant_parameters`).

:meth:`grid` exposes the integer grid as ``(scale, zero_point, qmin, qmax)`` with
``value = scale * (code - zero_point)`` and codes ``0 .. 2**bits - 1``; the
packed export relies on it.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from .functional import fake_quantize, safe_divisor
from .ranges import histogram_stats, mse_activation_clip

#: statistic name -> how to merge it across batches/ranks ("sum", "min" or "max")
STAT_OPS: Dict[str, str] = {
    "count": "sum",
    "samples": "sum",
    "sum": "sum",
    "sum_sq": "sum",
    "sum_abs": "sum",
    "min": "min",
    "max": "max",
    "pct_sum": "sum",
    "batches": "sum",
    "hist_pos": "sum",
    "hist_neg": "sum",
}

#: fraction of activation mass below the percentile PACT initialises its clip from
PERCENTILE = 0.999
_PCT_SAMPLE = 1 << 16
_HIST_SAMPLE = 1 << 18
#: how ranges are initialised: the error-minimising clip, or each method's own paper rule
INIT_MODES = ("mse", "paper")
#: activation granularity: one static step per tensor (the paper's), one dynamic step per token row with a learned
#: clip ratio, or one dynamic step per token with the runtime's fixed ratio (compressed-tensors / vLLM dynamic tokens)
ACT_GRANULARITIES = ("per_tensor", "per_token", "per_token_absmax")


def token_absmax(x: Tensor) -> Tensor:
    """``max_j |x[..., j]|`` of every token row of ``x`` viewed as ``(-1, features)``, shape ``(rows, 1)``,
    detached, floored at the smallest normal float (an all-zero row keeps a finite step)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    # max(max x, -min x): two vectorised row reductions, ~10x faster on CPU than vector_norm(ord=inf), same values
    absmax = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())
    return absmax.clamp_min_(torch.finfo(x.dtype).tiny)


class Quantizer(nn.Module):
    """Base class: bit-width, signedness, grid bounds, calibration state."""

    method: ClassVar[str] = ""
    #: activations clipped to a fixed range (nothing calibrated): their quantization error depends on the input
    fixed_act_range: ClassVar[bool] = False

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        param_shape: Tuple[int, ...] = (),
        channel_axis: int = 0,
        delta: Optional[float] = None,
        init: str = "paper",
        per_token: bool = False,
    ) -> None:
        super().__init__()
        if role not in ("weight", "act"):
            raise ValueError(f"role must be 'weight' or 'act', got {role!r}")
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {', '.join(INIT_MODES)}, got {init!r}")
        if per_token and (role != "act" or param_shape):
            raise ValueError("per_token applies to activation quantizers with one (per-tensor) parameter set")
        #: dynamic per-token activations: each token row ``x_t`` is quantized as ``m_t * Q(x_t / m_t)`` with
        #: ``m_t = max|x_t|`` computed in forward; the method's parameters live in units of ``m_t``
        self.per_token = bool(per_token)
        #: range initialisation: "mse" (minimum quantization error) or "paper" (the method's own rule)
        self.init_mode = init
        self.bits = int(bits)
        self.role = role
        #: one value per entry of this shape (per channel / per row); ``()`` means one value per tensor
        self.param_shape = tuple(param_shape)
        self.channel_axis = channel_axis
        # Python mirrors of the persistent buffers below (read in forward without a host sync)
        self.signed = role == "weight"
        self.initialized = False
        self.register_buffer("signed_flag", torch.tensor(self.signed))
        self.register_buffer("initialized_flag", torch.tensor(False))
        self.delta: Optional[Tensor]
        if delta is None:
            self.delta = None
        else:
            self.register_buffer("delta", torch.tensor(float(delta)))
        self._stats: Optional[Dict[str, Tensor]] = None
        #: while True, forward records statistics and returns its input unchanged
        self.observing = False
        #: while True, forward returns its input unchanged (full-precision function, e.g. to check a fold)
        self.bypass = False

    # ---- grid -------------------------------------------------------------------------------
    @property
    def binary(self) -> bool:
        """1-bit signed tensors use {-1, +1} (sign times a scale), not the grid {-1, 0}."""
        return self.bits == 1 and self.signed

    @property
    def qmin(self) -> int:
        if self.binary:
            return -1
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        if self.binary:
            return 1
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def tensor_shape(self) -> Tuple[int, ...]:
        """Shape of the per-parameter tensors: ``param_shape``, or ``(1,)`` per tensor (a 1-element 1-D tensor, not
        a 0-dim one: FSDP2's ``fully_shard`` refuses scalar parameters; broadcasting gives the same values)."""
        return self.param_shape or (1,)

    def grid(self, w: Tensor) -> Tuple[Tensor, Tensor, int, int]:
        """``(scale, zero_point, qmin, qmax)`` such that ``forward(w) = scale * (code - zero_point)``."""
        raise NotImplementedError(f"{type(self).__name__} has no integer grid export")

    def codes(self, w: Tensor) -> Tensor:
        """Integer codes ``0 .. 2**bits - 1`` of a weight under the current parameters."""
        scale, zero_point, _, _ = self.grid(w)
        return torch.round(self(w).detach() / safe_divisor(scale) + zero_point).clamp_(0, self.levels).to(torch.uint8)

    # ---- state ------------------------------------------------------------------------------
    def set_signed(self, signed: bool) -> None:
        self.signed = bool(signed)
        self.signed_flag.fill_(self.signed)

    def mark_initialized(self) -> None:
        self.initialized = True
        self.initialized_flag.fill_(True)

    def sync_from_buffers(self) -> None:
        """Refresh the Python mirrors after buffers were written behind our back (loading)."""
        if self.signed_flag.device.type != "meta":
            self.signed = bool(self.signed_flag.item())
            self.initialized = bool(self.initialized_flag.item())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before per-tensor parameters became 1-element 1-D tensors hold them 0-dim
        for name, t in [*self._parameters.items(), *self._buffers.items()]:
            stored = state_dict.get(prefix + name)
            if t is not None and stored is not None and tuple(t.shape) == (1,) and stored.dim() == 0:
                state_dict[prefix + name] = stored.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sync_from_buffers()

    def quant_parameters(self):
        """The learnable quantizer parameters (their own optimizer group, no weight decay)."""
        return [p for p in self.parameters(recurse=False)]

    def extra_repr(self) -> str:
        sign = "signed" if self.signed else "unsigned"
        shape = f", per_channel{list(self.param_shape)}" if self.param_shape else ""
        shape += ", per_token" if self.per_token else ""
        return f"{self.method}, bits={self.bits}, {self.role}, {sign}{shape}, init={self.init_mode}"

    # ---- calibration ------------------------------------------------------------------------
    def _reduce_dims(self, t: Tensor) -> Tuple[int, ...]:
        """Dimensions to reduce to get one value per entry of ``param_shape``."""
        if not self.param_shape:
            return tuple(range(t.dim()))
        axis = self.channel_axis % t.dim()
        return tuple(d for d in range(t.dim()) if d != axis)

    def _per_param(self, t: Tensor) -> Tensor:
        """Reshape a reduction result to :attr:`tensor_shape` (``param_shape``, or ``(1,)`` per tensor)."""
        return t.reshape(self.tensor_shape)

    def init_from_weight(self, w: Tensor) -> None:
        """Initialise from a weight tensor (weight quantizers)."""
        raise NotImplementedError

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Accumulate calibration statistics of one activation batch (per token: of ``x_t / max|x_t|``)."""
        x = x.detach().float()
        if self.per_token:
            x = x.reshape(-1, x.shape[-1]) / token_absmax(x)
        flat = x.reshape(-1)
        flat_s = flat[:: flat.numel() // _PCT_SAMPLE] if flat.numel() > _PCT_SAMPLE else flat
        hist_pos, hist_neg = histogram_stats(flat[:: flat.numel() // _HIST_SAMPLE] if flat.numel() > _HIST_SAMPLE else flat)
        batch = {
            "count": torch.tensor(float(flat.numel()), device=x.device),
            "samples": torch.tensor(float(x.shape[0] if x.dim() > 1 else 1), device=x.device),
            "sum": flat.sum(),
            "sum_sq": flat.square().sum(),
            "sum_abs": flat.abs().sum(),
            "min": flat.min(),
            "max": flat.max(),
            "pct_sum": torch.quantile(flat_s.abs(), PERCENTILE),
            "batches": torch.tensor(1.0, device=x.device),
            "hist_pos": hist_pos,
            "hist_neg": hist_neg,
        }
        if self._stats is None:
            self._stats = batch
        else:
            self._stats = merge_stats(self._stats, batch)

    def pop_stats(self) -> Optional[Dict[str, Tensor]]:
        stats, self._stats = self._stats, None
        return stats

    @torch.no_grad()
    def init_from_stats(self, stats: Dict[str, Tensor]) -> None:
        """Decide signedness, then initialise the method's parameters from merged statistics."""
        self.set_signed(bool(stats["min"] < 0))
        self._init_act(ActStats(stats))
        self.mark_initialized()

    def _init_act(self, stats: "ActStats") -> None:
        raise NotImplementedError

    # ---- forward ----------------------------------------------------------------------------
    def features_per_sample(self, x: Tensor) -> int:
        """N in LSQ's gradient scale: elements per step, not counting the batch."""
        if self.role == "weight":  # per channel: the elements of one channel (also for a subset of the channels)
            return x.numel() // max(1, x.shape[self.channel_axis % x.dim()]) if self.param_shape else x.numel()
        return x.numel() // x.shape[0] if x.dim() > 1 else x.numel()

    def forward(self, x: Tensor) -> Tensor:
        if self.bypass:
            return x
        if self.observing:
            self.observe(x)
            return x
        if not self.initialized:
            raise RuntimeError(
                f"{type(self).__name__} ({self.role}) is not initialised: run "
                "sqakd_hf.calibrate(model, batches) first (SQAKDTrainer does it for you)."
            )
        return self.quantize(x)

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def quantize_rows(self, rows: Tensor, index: Tensor) -> Tensor:
        """``forward`` of the rows ``index`` of a weight quantized per row (channel axis 0), computing only those
        rows: every per-row parameter and buffer is gathered at ``index`` (gradients scatter back to it).
        Equals ``forward(weight)[index]`` for the row-local quantizers of every method."""
        if not self.param_shape or self.channel_axis != 0:
            raise ValueError("quantize_rows needs a weight quantizer with one step per row (channel axis 0)")
        tensors = dict(self.named_parameters(recurse=False))
        tensors.update((k, v) for k, v in self.named_buffers(recurse=False) if v is not None)
        gathered = {k: v.index_select(0, index) for k, v in tensors.items() if tuple(v.shape) == self.param_shape}
        return torch.func.functional_call(self, gathered, (rows,), strict=False)

    def fake_quantize_act(self, x: Tensor, scale: Tensor, qmin: float, qmax: float, *,
                          zero: Optional[Tensor] = None, **kw) -> Tensor:
        """:func:`~.functional.fake_quantize` of an activation; per token, ``scale`` and ``zero`` are in units
        of each row's ``max|x_t|`` (no host sync; the gradient reaches the parameters through the product)."""
        if not self.per_token:
            return fake_quantize(x, scale, qmin, qmax, zero=zero, **kw)
        m = token_absmax(x)
        rows = x.reshape(-1, x.shape[-1])
        # an all-zero row has a tiny step: keep its reciprocal finite (0 / step stays 0, never 0 * inf)
        step = (scale * m).clamp_min(4.0 / torch.finfo(m.dtype).max)
        out = fake_quantize(rows, step, qmin, qmax, zero=None if zero is None else zero * m, **kw)
        return out.reshape(x.shape)


def merge_stats(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for k, op in STAT_OPS.items():
        if op == "sum":
            out[k] = a[k] + b[k]
        elif op == "min":
            out[k] = torch.minimum(a[k], b[k])
        else:
            out[k] = torch.maximum(a[k], b[k])
    return out


class ActStats:
    """Derived views of merged activation statistics."""

    def __init__(self, s: Dict[str, Tensor]) -> None:
        self.raw = s
        n = s["count"]
        self.min = s["min"]
        self.max = s["max"]
        self.mean = s["sum"] / n
        self.mean_abs = s["sum_abs"] / n
        self.std = (s["sum_sq"] / n - self.mean.square()).clamp_min(0).sqrt()
        self.percentile_abs = s["pct_sum"] / s["batches"]

    def mse_clip(self, pos_levels: float, neg_levels: float) -> Tensor:
        """The clip minimising the squared quantization error of the observed values on a grid of step
        ``clip / pos_levels`` reaching ``neg_levels`` steps below zero (0: unsigned); see :mod:`.ranges`."""
        return mse_activation_clip(self.raw["hist_pos"], self.raw["hist_neg"], pos_levels, neg_levels)


class FullPrecision(Quantizer):
    """Placeholder for ``bits=32``: passes the tensor through, has no parameters."""

    method = "fp"

    def __init__(self, role: str = "weight", **_: object) -> None:
        super().__init__(32, role)
        self.mark_initialized()

    def init_from_weight(self, w: Tensor) -> None:
        pass

    def _init_act(self, stats: ActStats) -> None:
        pass

    def observe(self, x: Tensor) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        return x


@contextlib.contextmanager
def bypassing(quantizers: Iterable[Quantizer]) -> Iterator[None]:
    """Inside the block every quantizer of ``quantizers`` passes its input through unchanged (the full-precision
    function); each one's own ``bypass`` flag is restored after, also on error."""
    quantizers = list(quantizers)
    saved = [q.bypass for q in quantizers]
    for q in quantizers:
        q.bypass = True
    try:
        yield
    finally:
        for q, flag in zip(quantizers, saved):
            q.bypass = flag
