"""Finiteness policy of :class:`~sqakd_hf.SQAKDTrainer`: NaN/inf in a training step is found without a
host sync on the hot path.

Every step folds the finiteness of the batch's float inputs, the teacher's outputs, the student's outputs
and the loss into a device tensor holding, per cause, the first step where it was non-finite (a
``torch.where`` min). A tensor is tested through its float32 sum (one pass; NaN/inf propagate through
it, 16x cheaper than ``torch.isfinite(x).all()`` on CPU); a finite tensor fails only if its sum overflows,
i.e. with values near ``3e38 / numel``. :meth:`FiniteGuard.check` reads it (one host sync) at logging, saving,
evaluation and the end of training, and raises :class:`NonFiniteError` naming the first bad step and the cause.

Policies (``SQAKDTrainingArguments.nonfinite``):

* ``"error"`` (default): any non-finite value stops training at the next check.
* ``"skip_batch"``: a batch whose *data* is bad (non-finite inputs, or non-finite teacher outputs) adds
  nothing: NaN/inf elements of its float inputs become 0 before both forwards (so no NaN reaches
  activations, gradients or BatchNorm statistics), so do those of the teacher's outputs, and its loss is
  replaced by 0 with ``torch.where`` (every local gradient is finite, so the zero upstream gradient gives
  exactly zero, never ``NaN * 0``). Skipped batches are counted
  and logged (``nonfinite_skipped_batches``); more than ``nonfinite_max_skip_fraction`` of the run's batches
  is an error. Non-finite student outputs or loss on clean data mean training diverged: always an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..process_group import all_reduce_

__all__ = ["CAUSES", "NONFINITE_POLICIES", "FiniteGuard", "NonFiniteError", "all_finite", "is_finite"]

NONFINITE_POLICIES = ("error", "skip_batch")
#: what a step checks, in the order a root cause is named
CAUSES = ("inputs", "teacher outputs", "student outputs", "loss")
_INPUTS, _TEACHER, _STUDENT, _LOSS = range(len(CAUSES))
#: "never non-finite" in the first-step record
_NEVER = 2**62

_FIX = {
    "inputs": "the training data has NaN/inf values (e.g. a corrupt image or a feature divided by zero): clean it "
    "(keep samples with torch.isfinite(x).all()), or pass nonfinite='skip_batch' to skip such batches",
    "teacher outputs": "the teacher produces NaN/inf on finite inputs: check its weights "
    "(torch.isfinite(p).all() for each parameter) and run it in float32 (float16 overflows), or pass "
    "nonfinite='skip_batch' to skip the batches it fails on",
    "student outputs": "training diverged (the student's outputs are NaN/inf on finite data): lower learning_rate "
    "/ quantizer_learning_rate, keep max_grad_norm > 0, and restart from a checkpoint saved before this step",
    "loss": "the loss is NaN/inf although the inputs and both models' outputs are finite: check temperature, "
    "kd_weight and ce_weight (and the labels when ce_weight > 0)",
}


def _float_tensors(x: Any) -> List[Tensor]:
    if isinstance(x, Tensor):
        return [x] if x.is_floating_point() or x.is_complex() else []
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _float_tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _float_tensors(v)]
    return []


def is_finite(x: Tensor) -> Tensor:
    """0-dim bool tensor: ``x`` holds no NaN/inf (tested through its sum in float32 or wider; sync-free)."""
    return torch.isfinite(x.detach().sum(dtype=torch.promote_types(x.dtype, torch.float32)))


def all_finite(tensors: List[Tensor]) -> Optional[Tensor]:
    """0-dim bool tensor: no element of ``tensors`` is NaN/inf (see :func:`is_finite`); None for no tensors."""
    flags = [is_finite(t) for t in tensors]
    if not flags:
        return None
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _zero_nonfinite(x: Any) -> Any:
    """``x`` with the NaN/inf elements of its float tensors set to 0 (new tensors, sync-free)."""
    if isinstance(x, Tensor):
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return type(x)({k: _zero_nonfinite(v) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return type(x)(_zero_nonfinite(v) for v in x)
    return x


class FiniteGuard:
    """Device-side record of non-finite values in training steps (see the module docstring).

    Per micro-batch: :meth:`inputs`, :meth:`outputs`, then :meth:`loss`, all sync-free; :meth:`check` reads the
    record (one host sync, all-reduced across processes) and raises :class:`NonFiniteError`.
    """

    def __init__(self, policy: str = "error", max_skip_fraction: float = 0.1) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}; got {policy!r}")
        self.policy = policy
        self.max_skip_fraction = float(max_skip_fraction)
        #: micro-batches one process will train on (the skip budget's base); None: judge by the batches seen
        self.planned_batches: Optional[int] = None
        #: processes whose skipped batches :meth:`read` sums
        self.processes = 1
        self.reset()

    @property
    def skips(self) -> bool:
        return self.policy == "skip_batch"

    def reset(self) -> None:
        """Forget every record (the start of a training run)."""
        self._first: Optional[Tensor] = None  # (len(CAUSES),) int64: first step each cause was non-finite
        self._skipped: Optional[Tensor] = None  # () int64: batches skipped
        self._pending: List[Optional[Tensor]] = [None] * len(CAUSES)
        self.batches = 0  # micro-batches checked (host counter, no sync)
        self.reported_skips = 0

    # ---- the hot path (no host sync) ----------------------------------------------------------------------
    def inputs(self, model_inputs: Any) -> Any:
        """Record whether the batch's float inputs are finite; under ``skip_batch`` their NaN/inf become 0."""
        self._pending = [None] * len(CAUSES)
        floats = _float_tensors(model_inputs)
        self._pending[_INPUTS] = all_finite(floats)
        if floats and self.skips:
            model_inputs = _zero_nonfinite(model_inputs)
        return model_inputs

    def outputs(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Record both models' outputs; returns the teacher's (under ``skip_batch`` with its NaN/inf set to 0 in
        place: the teacher's outputs are a no-grad tensor of this step, and no copy is made)."""
        self._pending[_TEACHER] = is_finite(teacher)
        self._pending[_STUDENT] = is_finite(student)
        if self.skips:
            teacher = teacher.detach().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return teacher

    def loss(self, loss: Tensor, step: int) -> Tensor:
        """Fold this micro-batch's flags (and the loss's) into the record at ``step``; under ``skip_batch`` the
        loss of a batch with bad data is 0 (``torch.where``: no NaN leaks through a multiplication by 0)."""
        self._pending[_LOSS] = is_finite(loss)
        device = loss.device
        if self._first is None or self._first.device != device:
            self._first = torch.full((len(CAUSES),), _NEVER, dtype=torch.int64, device=device)
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
            self._true = torch.ones((), dtype=torch.bool, device=device)
        ok = torch.stack([self._true if f is None else f.to(device) for f in self._pending])
        self._first = torch.where(ok, self._first, self._first.clamp(max=step))
        self.batches += 1
        if self.skips:
            data_ok = ok[: _TEACHER + 1].all()
            self._skipped = self._skipped + (~data_ok).long()
            loss = torch.where(data_ok, loss, 0.0)
        self._pending = [None] * len(CAUSES)
        return loss

    # ---- reading the record (one host sync) ---------------------------------------------------------------
    def read(self) -> Tuple[Dict[str, int], int]:
        """``({cause: first step}, skipped batches)`` over all processes; causes never seen are left out."""
        if self._first is None:
            return {}, 0
        first = all_reduce_(self._first.clone(), "min")
        skipped = all_reduce_(self._skipped.clone().view(1))
        values = torch.cat([first, skipped]).tolist()
        return {c: s for c, s in zip(CAUSES, values[:-1]) if s < _NEVER}, int(values[-1])

    def errors(self, seen: Dict[str, int]) -> Dict[str, int]:
        """The causes of ``seen`` that the policy does not skip."""
        if not self.skips:
            return dict(seen)
        return {c: s for c, s in seen.items() if c in ("student outputs", "loss")}

    def check(self, where: str = "") -> int:
        """Raise :class:`NonFiniteError` if the record holds an error under the policy, or (``skip_batch``) more
        skipped batches than the budget; returns the number of skipped batches."""
        seen, skipped = self.read()
        bad = self.errors(seen)
        if bad:
            raise NonFiniteError(self.message(bad, where))
        if skipped:
            base = (self.planned_batches or self.batches) * self.processes
            budget = self.max_skip_fraction * base
            if skipped > budget:
                raise NonFiniteError(
                    f"SQAKD training stopped{where}: {skipped} of the {self.batches * self.processes} batches so far "
                    f"were skipped for "
                    f"NaN/inf inputs or teacher outputs (the first at optimizer step {min(seen.values())}), more than "
                    f"nonfinite_max_skip_fraction={self.max_skip_fraction:g} of the run's {base} batches: the data or "
                    "the teacher is broken, not one bad sample. Clean the data (keep samples with "
                    "torch.isfinite(x).all()), check the teacher's outputs in float32, or raise "
                    "nonfinite_max_skip_fraction"
                )
        return skipped

    @staticmethod
    def message(bad: Dict[str, int], where: str = "") -> str:
        step = min(bad.values())
        causes = [c for c in CAUSES if bad.get(c) == step]
        later = [f"{c} (from step {s})" for c, s in bad.items() if s != step]
        root = causes[0]
        also = f" (with it: {', '.join(causes[1:])})" if len(causes) > 1 else ""
        more = f"; later also {', '.join(later)}" if later else ""
        return (
            f"SQAKD training stopped{where}: non-finite values (NaN/inf) in the {root}{also} at optimizer step "
            f"{step}, the first bad step{more}. Weights updated from step {step} on are not trustworthy; the "
            f"trainer refuses to save them. Cause and fix: {_FIX[root]}."
        )
