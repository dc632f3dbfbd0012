"""Checkpoint files: atomic folder writes and safetensors reading/writing with clear errors.

Formats only: nothing here knows model classes or quantization.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import SQAKDCheckpointError

logger = logging.getLogger(__name__)

__all__ = [
    "SAFE_WEIGHTS_NAME",
    "LAYERS_KEY",
    "CheckpointHeader",
    "atomic_save_directory",
    "remove_stale_staging",
    "read_checkpoint_header",
    "load_safetensors",
    "write_safetensors",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
#: safetensors metadata key: JSON of the packed layers ``{name: {"bits": b, "shape": [...]}}``
LAYERS_KEY = "sqakd_layers"


# ---- atomic writes --------------------------------------------------------------------------------
_STALE_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_STAGING_TAG = ".sqakd-tmp-"
#: a staging folder whose owner cannot be checked (another host, or named before owners were recorded)
#: is removed once it has not changed for this long
STALE_STAGING_AGE_S = 3600.0


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists, owned by someone else (or cannot tell: keep it)
        return True
    return True


def remove_stale_staging(target: Path) -> List[Path]:
    """Remove the staging folders ``.NAME.sqakd-tmp-*`` of saves to ``target`` that were killed.

    A staging folder is named ``.NAME.sqakd-tmp-<pid>-<host>-<random>``: one made on this host is stale
    once its pid no longer runs; one from another host, or without an owner in its name, once untouched
    for :data:`STALE_STAGING_AGE_S`. A running save's folder is never removed. Returns what was removed."""
    prefix = f".{target.name}{_STAGING_TAG}"
    owner = re.compile(r"^(\d+)-([0-9a-f]{8})-")
    host, now, removed = _host_tag(), time.time(), []
    try:
        entries = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return removed
    for path in entries:
        match = owner.match(path.name[len(prefix):])
        if match and match.group(2) == host:
            pid = int(match.group(1))
            stale = pid != os.getpid() and not _pid_alive(pid)
        else:
            try:
                stale = now - path.stat().st_mtime > STALE_STAGING_AGE_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    if removed:
        logger.info("sqakd: removed staging folder(s) of interrupted saves: %s", [p.name for p in removed])
    return removed


@contextlib.contextmanager
def atomic_save_directory(save_directory: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield an empty staging folder next to ``save_directory``; publish its files there on success.

    A new ``save_directory`` appears by one rename. An existing one gets each file replaced by
    ``os.replace`` (weights first, ``config.json`` last) and stale weight files of an earlier save
    removed; other files are left alone. On any error nothing in ``save_directory`` changes.
    Staging folders left next to it by killed earlier saves are removed first (:func:`remove_stale_staging`).
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING_TAG}{os.getpid()}-{_host_tag()}-",
                                    dir=target.parent))
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
            return
        names = sorted(os.listdir(staging), key=lambda n: (n == "config.json", n))
        for name in names:
            dest = target / name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(staging / name, dest)
        for name in os.listdir(target):
            if name not in names and _STALE_WEIGHTS.match(name):
                (target / name).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- reading checkpoints --------------------------------------------------------------------------
@dataclass
class CheckpointHeader:
    """Names, shapes and dtypes of the tensors in one or more safetensors files, plus their metadata."""

    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    dtypes: Dict[str, str] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)

    @property
    def packed_layers(self) -> Dict[str, dict]:
        return json.loads(self.metadata.get(LAYERS_KEY, "{}"))


def _corrupt(path: Union[str, Path], err: Exception) -> SQAKDCheckpointError:
    return SQAKDCheckpointError(
        f"cannot read checkpoint file {path}: it is corrupted or truncated ({err}). Delete it and save the model "
        "again, or re-download it (from_pretrained(..., force_download=True) / huggingface_hub.snapshot_download"
        "(..., force_download=True))."
    )


def read_checkpoint_header(files: Sequence[Union[str, Path]]) -> CheckpointHeader:
    """Read the headers of safetensors ``files`` without loading tensors; corrupted files raise
    :class:`SQAKDCheckpointError` naming the file and how to recover."""
    header = CheckpointHeader()
    for path in files:
        if not str(path).endswith(".safetensors"):
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                header.metadata.update(f.metadata() or {})
                for key in f.keys():
                    sl = f.get_slice(key)
                    header.shapes[key] = tuple(sl.get_shape())
                    header.dtypes[key] = sl.get_dtype()
                    header.files[key] = str(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise _corrupt(path, err) from err
    return header


def load_safetensors(path: Union[str, Path]) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """All tensors and the metadata of one safetensors file; corruption raises :class:`SQAKDCheckpointError`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt(path, err) from err


def write_safetensors(
    state: Mapping[str, Tensor], path: Union[str, Path], metadata: Optional[Dict[str, str]] = None
) -> None:
    """``safetensors.torch.save_file`` that copies tensors sharing storage (safetensors refuses aliases)."""
    out: Dict[str, Tensor] = {}
    seen: set = set()
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if (v.numel() and ptr in seen) else v
        seen.add(ptr)
    save_file(out, str(path), metadata=dict(metadata or {"format": "pt"}))
