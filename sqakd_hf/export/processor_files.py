"""The tokenizer / image-processor files that travel with an exported model, and where to find them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

from torch import nn

__all__ = ["PROCESSOR_FILES", "source_folder", "copy_processor_files"]

#: files a tokenizer / image processor is saved as (copied from the model's source folder)
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json", "chat_template.jinja",
    "chat_template.json",
)


def source_folder(model: nn.Module) -> Optional[Path]:
    """The local folder ``model`` was loaded from (its config's ``_name_or_path``), or None."""
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(path) if path and os.path.isdir(path) else None


def copy_processor_files(source: Optional[Path], target: Path) -> List[str]:
    """Copy the processor files of ``source`` that ``target`` does not have yet; returns their names."""
    copied = []
    for name in PROCESSOR_FILES:
        if source is not None and (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied
