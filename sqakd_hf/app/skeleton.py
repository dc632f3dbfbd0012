"""The teacher's module tree without its weights (a skeleton on the meta device), to check a recipe's
``modules_to_not_convert`` / ``layer_bits`` patterns before any model is loaded."""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

from ..config import QuantConfig
from ..errors import RecipeError
from .arguments import ModelArguments

logger = logging.getLogger(__name__)

__all__ = ["teacher_skeleton", "check_quantization_plan"]


def teacher_skeleton(info: Any, args: Optional[ModelArguments] = None) -> Optional[nn.Module]:
    """The teacher's architecture on the meta device (no weights read, no memory used), or None when it cannot
    be built from its config alone (the real load then reports the problem).

    transformers: ``AutoConfig`` + ``AutoModelFor<task>.from_config``; timm: ``timm.create_model(arch,
    pretrained=False)`` with the config's ``num_classes`` and ``model_args``.
    """
    import torch

    args = args or ModelArguments(teacher=info.name)
    try:
        with torch.device("meta"):
            if info.library == "timm":
                import timm

                cfg = info.config
                kwargs = dict(cfg.get("model_args") or {})
                if cfg.get("num_classes") is not None:
                    kwargs.setdefault("num_classes", cfg["num_classes"])
                return timm.create_model(cfg["architecture"], pretrained=False, **kwargs)
            import transformers

            config = transformers.AutoConfig.from_pretrained(
                str(info.local_dir) if info.local_dir is not None else info.name,
                revision=args.revision, cache_dir=args.cache_dir)
            return getattr(transformers, info.auto_class).from_config(config)
    except Exception as err:  # noqa: BLE001 - an unbuildable skeleton only skips this early check
        logger.debug("sqakd: no meta skeleton of %s (%s: %s); patterns are checked at load", info.name,
                     type(err).__name__, err)
        return None


def check_quantization_plan(info: Any, quant: QuantConfig, args: Optional[ModelArguments] = None) -> None:
    """Run :func:`~sqakd_hf.quantize_model`'s own checks on the teacher's skeleton: a ``modules_to_not_convert``
    or ``layer_bits`` pattern that matches no layer (the message lists the quantizable layers), or nothing
    left to quantize, raises :class:`RecipeError`."""
    from ..injection import quantize_model

    skeleton = teacher_skeleton(info, args)
    if skeleton is None:
        return
    quiet = logging.getLogger(quantize_model.__module__)
    was_disabled, quiet.disabled = quiet.disabled, True  # the real quantization reports its layers
    try:
        quantize_model(skeleton, quant)
    except ValueError as err:
        raise RecipeError(f"quantization of teacher {info.name!r}: {err}") from None
    finally:
        quiet.disabled = was_disabled
