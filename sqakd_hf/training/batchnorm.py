"""BatchNorm statistics policy of the student during SQAKD training.

A short label-free run on few images moves BatchNorm running statistics towards those images and away
from the statistics the teacher was trained with; keeping BN layers in eval mode ("frozen") keeps the
running statistics while their affine weight and bias still train. Mode flips only: no host sync.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..injection import named_quantizers

#: ``"auto"``: ``"frozen"`` when every quantized tensor has >= 8 bits, else ``"train"``;
#: ``"frozen"``: running statistics never update; ``"train"``: they update every step (plain ``model.train()``);
#: ``"freeze_after"``: they update during the first ``bn_freeze_steps`` optimizer steps, then freeze
BN_POLICIES = ("auto", "frozen", "train", "freeze_after")
#: the lowest bit-width at which ``"auto"`` keeps the teacher's statistics
AUTO_FROZEN_MIN_BITS = 8


def resolve_policy(policy: str, model: nn.Module) -> str:
    """``"auto"`` decided for ``model``: at 8 bits the quantized network's activations stay close to the
    teacher's, so its BN statistics are kept (``"frozen"``); at lower bits they shift and BN re-estimates them
    (``"train"``). Other policies are returned as they are."""
    if policy != "auto":
        return policy
    bits = [q.bits for _, q in named_quantizers(model) if q.bits < 32]
    return "frozen" if not bits or min(bits) >= AUTO_FROZEN_MIN_BITS else "train"


def batchnorm_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every BatchNorm layer of ``model`` that tracks running statistics, by name (``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm`` and subclasses such as timm's ``BatchNormAct2d``)."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def set_batchnorm_eval(modules: List[Tuple[str, nn.Module]]) -> int:
    """Put ``modules`` in eval mode (running statistics used and kept; parameters still train).
    Returns how many were switched from train mode."""
    switched = 0
    for _, m in modules:
        if m.training:
            m.train(False)
            switched += 1
    return switched


def stats_frozen(policy: str, global_step: int, freeze_steps: Optional[int]) -> bool:
    """Whether BN running statistics are frozen in the step after ``global_step`` completed optimizer steps."""
    if policy == "frozen":
        return True
    if policy == "freeze_after":
        return global_step >= int(freeze_steps or 0)
    return False


def check_bn_args(policy: object, freeze_steps: object) -> None:
    """Validate ``bn_policy`` / ``bn_freeze_steps``; the ``ValueError`` names the field and the fix."""
    if policy not in BN_POLICIES:
        raise ValueError(f"bn_policy must be one of {', '.join(BN_POLICIES)}; got {policy!r}")
    if policy == "freeze_after":
        if isinstance(freeze_steps, bool) or not isinstance(freeze_steps, int) or freeze_steps < 1:
            raise ValueError(
                f"bn_freeze_steps must be an integer >= 1 with bn_policy='freeze_after' (the optimizer steps during "
                f"which BatchNorm statistics update); got {freeze_steps!r}"
            )
    elif freeze_steps is not None:
        raise ValueError(
            f"bn_freeze_steps={freeze_steps!r} only applies to bn_policy='freeze_after' (bn_policy is {policy!r}): "
            "remove it or pass bn_policy='freeze_after'"
        )
