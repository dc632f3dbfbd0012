"""Quantizer updates relative to their size (``SQAKDTrainingArguments.quantizer_lr_mode``).

Adam-type optimizers move every parameter by about the learning rate per step, whatever its size. A quantizer's
step is ~2e-3 for 8-bit weights and ~0.1 for 2-bit ones, so one learning rate either freezes the coarse steps
or lets the fine ones drift by their own size within a few hundred steps. The ``"relative"`` mode turns the
update ``d = p_new - p_old`` the optimizer computed for the quantizer group into a multiplicative one,

    p <- p_old * exp(sign(p_old) * d)   (~ p_old + |p_old| * d),

so each parameter moves by about ``lr * |p|`` per step: to first order the optimizer's step on ``log|p|``. A
parameter keeps its sign (steps and clip levels stay positive); one at exactly 0 gets the plain update ``d``.
Decoupled weight decay is part of ``d``, so it is scaled by ``|p|`` too.
The rule is element-wise and stateless: it works with any ``torch.optim`` optimizer (fused AdamW included), LR
schedules (they scale ``d``), checkpoints (the optimizer state is the plain optimizer's) and flattened or
sharded parameters, and needs no host sync.

``"auto"`` (the default) applies it to quantizers of 8 bits or more only. Their calibrated steps are already close
to optimal and tiny against usual learning rates, so they must stay put; a 2-4 bit grid needs its steps to move
far from calibration, which the plain (LSQ-style) update does and a relative one at the weights' lr would not.
Measured on real weights: EfficientNet-Lite0 W8A8 (relative keeps SQAKD above its PTQ start, absolute drifts below
it) and MiniLM W4A4 on tweets (2000 held-out, 150 steps: teacher agreement 95.25% absolute, 94.65% relative).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

QUANTIZER_LR_MODES = ("auto", "relative", "absolute")
#: ``"auto"``: quantizers of at least this many bits are updated relative to their size, coarser ones absolutely
RELATIVE_FROM_BITS = 8


def relative_update_(params: List[Tensor], old: List[Tensor]) -> None:
    """In place: ``p <- old * exp(sign(old) * (p - old))`` for each pair (``p`` where ``old == 0``)."""
    if not params:
        return
    with torch.no_grad():
        cur = [p.detach() for p in params]
        d = torch._foreach_sub(cur, old)
        torch._foreach_mul_(d, torch._foreach_sign(old))
        torch._foreach_exp_(d)
        torch._foreach_mul_(d, old)  # old * exp(...): 0 where old == 0
        # where old == 0: d is 0, add the plain value p (there p - old == p)
        zero = [(o == 0).to(o.dtype) for o in old]
        torch._foreach_addcmul_(d, zero, cur)
        torch._foreach_copy_(cur, d)


class RelativeQuantizerUpdate:
    """Step hooks on ``optimizer`` applying :func:`relative_update_` to its param group ``group_index`` (the
    quantizer group). The group's parameters are read at each step, so a checkpoint load or a wrapper that
    flattens them (ZeRO, FSDP) is followed. :meth:`remove` takes the hooks off."""

    def __init__(self, optimizer: torch.optim.Optimizer, group_index: int) -> None:
        if not 0 <= group_index < len(optimizer.param_groups):
            raise ValueError(f"group_index {group_index} is not one of the optimizer's "
                             f"{len(optimizer.param_groups)} parameter groups")
        self.group_index = group_index
        self._old: Optional[List[Tensor]] = None
        self._handles = (optimizer.register_step_pre_hook(self._before),
                         optimizer.register_step_post_hook(self._after))

    def _params(self, optimizer: torch.optim.Optimizer) -> List[Tensor]:
        return [p for p in optimizer.param_groups[self.group_index]["params"] if p is not None]

    def _before(self, optimizer: torch.optim.Optimizer, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        params = self._params(optimizer)
        self._old = [p.detach().clone() for p in params] if params else None

    def _after(self, optimizer: torch.optim.Optimizer, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        old, self._old = self._old, None
        if old is not None:
            relative_update_(self._params(optimizer), old)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
