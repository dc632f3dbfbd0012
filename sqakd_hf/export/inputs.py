"""Example inputs that trace a model into an ONNX graph: a tokenized sentence for text models, one image otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from ..checkpoint import model_library
from ..errors import InputError

__all__ = ["example_inputs", "image_size", "takes_text", "load_tokenizer", "EXAMPLE_TEXT"]

EXAMPLE_TEXT = "An example sentence to trace the graph."


def image_size(model: nn.Module) -> int:
    """The side of the square image ``model`` takes: its config's ``image_size``, timm's ``input_size``, else 224."""
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = (cfg.get("input_size") or (3, 224, 224))[-1]
    return int(size[-1] if isinstance(size, (list, tuple)) else size)


def takes_text(model: nn.Module) -> bool:
    """Whether ``model`` reads token ids (a transformers model without image channels)."""
    return model_library(model) == "transformers" and getattr(getattr(model, "config", None), "num_channels",
                                                              None) is None


def example_inputs(model: nn.Module, tokenizer: Optional[Any] = None,
                   where: str = "the model") -> Union[Tensor, Dict[str, Tensor]]:
    """One example input that traces ``model``: ``tokenizer``'s encoding of one sentence (as a dict of tensors) for
    text models, else one zero image of the model's input size. ``where`` names the model in the error raised when
    a text model comes without a tokenizer."""
    if takes_text(model):
        if tokenizer is None:
            raise InputError(f"no tokenizer found for {where}: save the tokenizer next to the model "
                             "(tokenizer.save_pretrained) or pass it, so the ONNX graph can be traced")
        return dict(tokenizer([EXAMPLE_TEXT], return_tensors="pt"))
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    size = image_size(model)
    return torch.zeros(1, int(channels or 3), size, size)


#: files a saved tokenizer holds at least one of (transformers builds an empty-vocabulary tokenizer from a bare
#: config.json: a folder without any of these holds no tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(*sources: Any) -> Optional[Any]:
    """The tokenizer saved in the first of ``sources`` (folders or Hub ids; empty ones skipped) that holds one."""
    from transformers import AutoTokenizer

    for source in sources:
        if not source:
            continue
        folder = Path(str(source))
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            continue
        try:
            return AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError, KeyError):
            continue
    return None
