"""Teacher-output cache: the frozen teacher runs once over a fixed dataset, every epoch reads its outputs from disk.

Layout (a folder next to the run, ``{output_dir}/_teacher_cache`` by default; the Trainer's
Hub uploads of ``output_dir`` skip names starting with ``_``):

* ``rows-{rank}-of-{world}.safetensors``: one shard per process that built the cache, each written atomically
  (temporary file, then ``os.replace``): ``sample_index`` (the dataset indices it holds), ``offsets`` (sample
  ``j``'s positions are rows ``offsets[j]:offsets[j+1]``) and the rows themselves:

  - ``mode="full"``: ``outputs (positions, width)``, the teacher's outputs as computed (classifier logits, the
    logits of a small vocabulary, hidden states);
  - ``mode="topk"`` (per-token logits wider than ``k``): ``topk_indices (positions, k)`` (int32),
    ``topk_log_probs (positions, k)`` and ``rest_log_mass (positions,)``, the log-probabilities at temperature
    ``T`` of the teacher's k most likely tokens and the log of the remaining mass (the loss is then
    :func:`~sqakd_hf.training.losses.kd_kl_topk_per_position`, a documented approximation of the full KL).

* ``teacher_cache.json`` (written last, atomically): the fingerprint (teacher weights hash, dataset
  fingerprint, output target, k and T for top-k), the mode and the shard list. A folder without it is an
  interrupted build and is rebuilt; a fingerprint that differs from the current run's is an error.

Positions: per-sample outputs (classifiers) have one; per-token outputs keep only the positions the
attention mask counts (the KD loss ignores padding), so the cache does not depend on how a batch is padded.

Training reads the cache in the data loader: :class:`IndexedDataset` adds each sample's index, and
:class:`CachedTeacherCollator` gathers that sample's rows from memory-mapped shards (no teacher forward, no
device sync) into batch keys starting with :data:`CACHE_PREFIX`, which :func:`split_cached` takes back out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DataError, InputError
from ..model_io import split_labels, to_device
from ..serialization.files import write_safetensors
from .losses import _chunks

logger = logging.getLogger(__name__)

#: batch key carrying each sample's dataset index (added by :class:`IndexedDataset`)
INDEX_KEY = "sqakd_cache_index"
#: prefix of the batch keys carrying cached teacher outputs
CACHE_PREFIX = "sqakd_teacher_"
MANIFEST_NAME = "teacher_cache.json"
FORMAT_VERSION = 1
#: samples read twice to detect random transforms, and hashed into the dataset fingerprint
PROBE_SAMPLES = 8
FINGERPRINT_SAMPLES = 64


# ---- fingerprints and the random-transform check -------------------------------------------------------
def _hash_tensors(h: "hashlib._Hash", named: Sequence[Tuple[str, Tensor]]) -> None:
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def teacher_fingerprint(teacher: nn.Module) -> str:
    """sha256 of the teacher's class and state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(type(teacher).__qualname__.encode())
    _hash_tensors(h, sorted(teacher.state_dict().items()))
    return h.hexdigest()


def _tensors_of(batch: Mapping) -> List[Tuple[str, Tensor]]:
    return sorted((k, v) for k, v in batch.items() if isinstance(v, Tensor))


def _spread(n: int, count: int) -> List[int]:
    return sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(min(n, count))})


def dataset_fingerprint(dataset: Any, collator: Callable) -> Dict[str, Any]:
    """Length and a hash of ``FINGERPRINT_SAMPLES`` evenly spaced collated samples. (Not the ``datasets``
    fingerprint: it is random for ``map`` functions it cannot hash, which would refuse every resume.) A change
    that keeps the length and those samples goes unnoticed here; per-token rows still check every sample's
    token count when read."""
    n = len(dataset)
    h = hashlib.sha256()
    for start in range(0, min(n, FINGERPRINT_SAMPLES), 16):
        picks = _spread(n, FINGERPRINT_SAMPLES)[start : start + 16]
        _hash_tensors(h, _tensors_of(collator([dataset[i] for i in picks])))
    return {"length": n, "samples_sha256": h.hexdigest()}


def _attached_transforms(dataset: Any) -> List[Any]:
    found, seen = [], set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        for attr in ("transform", "transforms", "_transform"):
            value = getattr(dataset, attr, None)
            if value is not None and not isinstance(value, (str, bool, int)):
                found.append(value)
        fmt = getattr(dataset, "format", None)
        if isinstance(fmt, Mapping) and (fmt.get("format_kwargs") or {}).get("transform") is not None:
            found.append(fmt["format_kwargs"]["transform"])
        dataset = getattr(dataset, "dataset", None)
    return found


def check_deterministic(dataset: Any, collator: Callable) -> None:
    """Raise :class:`~sqakd_hf.errors.DataError` when the dataset (or collator) gives different inputs for the same
    index: an attached transform named ``Random...``, or samples read and collated twice that differ."""
    fix = ("cache_teacher_outputs needs the same inputs every epoch: remove the random augmentation (or apply it "
           "once, offline), or train without cache_teacher_outputs")
    for t in _attached_transforms(dataset):
        if "Random" in repr(t):
            raise DataError(f"the training dataset has a random transform attached ({repr(t)[:120]}): {fix}")
    picks = _spread(len(dataset), PROBE_SAMPLES)
    first, second = collator([dataset[i] for i in picks]), collator([dataset[i] for i in picks])
    a, b = _tensors_of(first), _tensors_of(second)
    if [k for k, _ in a] != [k for k, _ in b]:
        raise DataError(f"the training batches change from one read to the next (columns differ): {fix}")
    for (k, x), (_, y) in zip(a, b):
        if x.shape != y.shape or not torch.equal(x, y):
            raise DataError(f"the training data is random: reading the same samples twice gave different {k!r} "
                            f"(random transform or collator, e.g. MLM masking): {fix}")


# ---- the dataset and collator of a cached run -------------------------------------------------------------
class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose samples (dicts) also carry their index under :data:`INDEX_KEY`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        sample = self.dataset[i]
        if not isinstance(sample, Mapping):
            raise DataError(f"cache_teacher_outputs needs samples that are dicts of columns; got {type(sample).__name__}")
        return {**sample, INDEX_KEY: int(i)}


def split_cached(model_inputs: Mapping) -> Tuple[Dict[str, Any], Optional[Dict[str, Tensor]]]:
    """``(model inputs, cached teacher tensors or None)``: the cache's batch keys taken out of a batch."""
    cached = {k[len(CACHE_PREFIX):]: v for k, v in model_inputs.items() if k.startswith(CACHE_PREFIX)}
    rest = {k: v for k, v in model_inputs.items() if not k.startswith(CACHE_PREFIX) and k != INDEX_KEY}
    return rest, (cached or None)


class CachedTeacherCollator:
    """Wraps the trainer's collator: samples with :data:`INDEX_KEY` get their cached teacher rows added to the
    batch (keys ``sqakd_teacher_*``); samples without it (evaluation) are collated as before."""

    def __init__(self, collator: Callable, cache: "TeacherCache") -> None:
        self.collator, self.cache = collator, cache

    def __call__(self, features: List[Mapping]) -> Any:
        if not features or INDEX_KEY not in features[0]:
            return self.collator(features)
        index = torch.tensor([f[INDEX_KEY] for f in features], dtype=torch.long)
        batch = self.collator([{k: v for k, v in f.items() if k != INDEX_KEY} for f in features])
        for k, v in self.cache.lookup(index, batch.get("attention_mask")).items():
            batch[CACHE_PREFIX + k] = v
        return batch


# ---- building ---------------------------------------------------------------------------------------------
@dataclass
class CacheSpec:
    """What to cache: ``target`` ("logits" / "hidden_states"), ``top_k`` for per-token logits, ``temperature``."""

    target: str
    top_k: int
    temperature: float


def _topk_rows(rows: Tensor, k: int, temperature: float) -> Dict[str, Tensor]:
    """Top-k log-probabilities at ``temperature`` of logit rows, and the log of the rest mass (chunked)."""
    idx = torch.empty(rows.shape[0], k, dtype=torch.int32)
    logp = torch.empty(rows.shape[0], k, dtype=torch.float32)
    rest = torch.empty(rows.shape[0], dtype=torch.float32)
    for sl in _chunks(rows.shape[0], rows.shape[1]):
        lp = torch.log_softmax(rows[sl].float() / temperature, dim=-1)
        v, i = lp.topk(k, dim=-1)
        rest[sl] = torch.logsumexp(lp.scatter(-1, i, float("-inf")), dim=-1).cpu()
        idx[sl], logp[sl] = i.int().cpu(), v.cpu()
    return {"topk_indices": idx, "topk_log_probs": logp, "rest_log_mass": rest}


def _positions(out: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, bool]:
    """``(rows (positions, width), positions per sample, masked)`` of one batch's teacher outputs."""
    b = out.shape[0]
    if out.dim() == 2:
        return out, torch.ones(b, dtype=torch.long), False
    if out.dim() == 3 and isinstance(mask, Tensor) and mask.shape == out.shape[:2]:
        m = mask.bool()
        return out[m], m.sum(1).cpu(), True
    flat = out.reshape(b, -1, out.shape[-1])
    return flat.reshape(-1, out.shape[-1]), torch.full((b,), flat.shape[1], dtype=torch.long), False


@torch.no_grad()
def build_shard(
    teacher_fn: Callable[[Dict[str, Any]], Tensor], dataset: Any, collator: Callable, indices: Sequence[int],
    batch_size: int, spec: CacheSpec, device: torch.device, num_workers: int = 0,
) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Run the teacher over ``dataset[indices]`` (in order) and return ``(shard tensors, layout)``."""
    subset = torch.utils.data.Subset(dataset, list(indices))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collator,
                                         num_workers=num_workers)
    parts: Dict[str, List[Tensor]] = {}
    counts: List[Tensor] = []
    layout: Dict[str, Any] = {}
    for batch in loader:
        model_inputs, _ = split_labels(to_device(batch, device))
        out = teacher_fn(model_inputs)
        rows, n, masked = _positions(out, model_inputs.get("attention_mask"))
        if not layout:
            per_token = out.dim() >= 3
            topk = spec.target == "logits" and per_token and spec.top_k < out.shape[-1]
            layout = {"mode": "topk" if topk else "full", "width": int(out.shape[-1]), "masked": masked,
                      "sample_shape": list(out.shape[1:-1]), "dtype": str(out.dtype).replace("torch.", "")}
        elif masked != layout["masked"] or (not masked and list(out.shape[1:-1]) != layout["sample_shape"]):
            raise DataError("the teacher's output positions change from batch to batch without an attention mask "
                            "(pad every sample to one length, or return attention_mask): cannot cache them")
        new = (_topk_rows(rows, spec.top_k, spec.temperature) if layout["mode"] == "topk"
               else {"outputs": rows.detach().cpu()})
        for k, v in new.items():
            parts.setdefault(k, []).append(v)
        counts.append(n)
    n_all = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors["sample_index"] = torch.tensor(list(indices), dtype=torch.long)
    tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), n_all.cumsum(0)])
    return tensors, layout


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def shard_name(rank: int, world: int) -> str:
    return f"rows-{rank:05d}-of-{world:05d}.safetensors"


def write_shard(directory: Path, rank: int, world: int, tensors: Dict[str, Tensor]) -> str:
    """Write one shard atomically; returns its file name."""
    name = shard_name(rank, world)
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    write_safetensors(tensors, tmp)
    os.replace(tmp, directory / name)
    return name


def write_manifest(directory: Path, fingerprint: Dict[str, Any], layout: Dict[str, Any], shards: List[str],
                   samples: int) -> None:
    """Publish the cache (the last write of a build)."""
    record = {"version": FORMAT_VERSION, "fingerprint": fingerprint, "layout": layout, "shards": shards,
              "samples": samples}
    _atomic_write_text(directory / MANIFEST_NAME, json.dumps(record, indent=1, sort_keys=True))


def read_manifest(directory: Path) -> Optional[Dict[str, Any]]:
    """The published manifest, or None (no cache, or an interrupted build)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def expected_mode(layout: Dict[str, Any], spec: CacheSpec, per_token: bool) -> str:
    return "topk" if spec.target == "logits" and per_token and spec.top_k < layout["width"] else "full"


def mode_fingerprint(mode: str, spec: CacheSpec) -> Dict[str, Any]:
    """The fingerprint fields of the stored form: top-k rows depend on k and on the temperature, full rows on neither."""
    return {"mode": mode, "top_k": spec.top_k, "temperature": spec.temperature} if mode == "topk" else {"mode": mode}


def check_fingerprint(directory: Path, record: Dict[str, Any], fingerprint: Dict[str, Any], spec: CacheSpec) -> None:
    """Raise :class:`~sqakd_hf.errors.InputError` naming what differs between a cache and the current run."""
    fix = f"delete {directory} to rebuild the cache, or set teacher_cache_dir to another folder"
    if record.get("version") != FORMAT_VERSION:
        raise InputError(f"the teacher-output cache in {directory} has format {record.get('version')!r}, this "
                         f"version reads {FORMAT_VERSION}: {fix}")
    cached, layout = record["fingerprint"], record["layout"]
    per_token = bool(layout["masked"] or layout["sample_shape"])
    wanted = {**fingerprint, **mode_fingerprint(expected_mode(layout, spec, per_token), spec)}
    diff = [k for k in sorted(set(cached) | set(wanted)) if cached.get(k) != wanted.get(k)]
    if diff:
        what = {"teacher": "the teacher's weights", "dataset": "the training data", "target": "distill_target",
                "top_k": "teacher_cache_top_k", "temperature": "temperature", "mode": "full vs top-k outputs"}
        named = ", ".join(f"{what.get(k, k)} ({_short(cached.get(k))} cached, {_short(wanted.get(k))} now)" for k in diff)
        raise InputError(f"the teacher-output cache in {directory} does not match this run: {named}. {fix}")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:12] + "..."


# ---- reading ----------------------------------------------------------------------------------------------
_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}


def mmap_safetensors(path: Path) -> Dict[str, Tensor]:
    """The tensors of a safetensors file as zero-copy views of a memory map (pages are read when indexed)."""
    raw = np.memmap(path, dtype=np.uint8, mode="c")
    n = int(np.frombuffer(raw[:8].tobytes(), dtype="<u8")[0])
    header = json.loads(raw[8 : 8 + n].tobytes())
    out: Dict[str, Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (8 + n + o for o in info["data_offsets"])
        arr = raw[begin:end].view(_NP_DTYPES[info["dtype"]]).reshape(info["shape"])
        t = torch.from_numpy(arr)
        out[name] = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
    return out


def _ragged(starts: Tensor, counts: Tensor) -> Tensor:
    """``cat([arange(s, s + c) for s, c in zip(starts, counts)])``, vectorised."""
    total = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - first, counts, output_size=total) + torch.arange(total)


class TeacherCache:
    """Reader of a published cache: :meth:`lookup` gathers the rows of a batch's samples. Shards are memory-mapped
    on first use in each process (a pickled reader, e.g. in a data-loader worker, maps them again)."""

    def __init__(self, directory: Path, record: Dict[str, Any]) -> None:
        self.directory, self.record = Path(directory), record
        self.layout = record["layout"]
        self._shards: Optional[List[Dict[str, Tensor]]] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_shards": None}

    def _open(self) -> List[Dict[str, Tensor]]:
        if self._shards is None:
            shards = [mmap_safetensors(self.directory / name) for name in self.record["shards"]]
            n = self.record["samples"]
            self._where = torch.full((n, 2), -1, dtype=torch.long)
            for s, shard in enumerate(shards):
                idx = shard["sample_index"]
                self._where[idx, 0] = s
                self._where[idx, 1] = torch.arange(len(idx))
            self._shards = shards
        return self._shards

    def lookup(self, index: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """The cached teacher tensors of samples ``index`` in the batch's layout: ``(B, ...)`` per-sample rows,
        or per-token rows placed at the positions ``mask`` counts (padding: harmless finite values)."""
        shards = self._open()
        n = self.record["samples"]
        if int(index.min()) < 0 or int(index.max()) >= n:
            raise DataError(f"sample {int(index.max())} is not in the teacher-output cache of {n} samples in "
                            f"{self.directory}: the dataset changed; delete the folder to rebuild the cache")
        where = self._where[index]
        starts = torch.empty_like(index)
        counts = torch.empty_like(index)
        for s, shard in enumerate(shards):
            sel = where[:, 0] == s
            loc = where[sel, 1]
            starts[sel], counts[sel] = shard["offsets"][loc], shard["offsets"][loc + 1] - shard["offsets"][loc]
        first = torch.cumsum(counts, 0) - counts
        total = int(counts.sum())
        rows: Dict[str, Tensor] = {}
        for s, shard in enumerate(shards):
            sel = where[:, 0] == s
            if not bool(sel.any()):
                continue
            src, dst = _ragged(starts[sel], counts[sel]), _ragged(first[sel], counts[sel])
            for k, v in shard.items():
                if k in ("sample_index", "offsets"):
                    continue
                if k not in rows:
                    rows[k] = torch.empty((total, *v.shape[1:]), dtype=v.dtype)
                rows[k][dst] = v[src]
        return self._place(rows, counts, mask)

    def _place(self, rows: Dict[str, Tensor], counts: Tensor, mask: Optional[Tensor]) -> Dict[str, Tensor]:
        b = len(counts)
        if not self.layout["masked"]:
            shape = self.layout["sample_shape"]
            return {k: v.reshape(b, *shape, *v.shape[1:]) for k, v in rows.items()}
        if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != b:
            raise DataError("the teacher-output cache holds per-token outputs at the attention mask's positions, "
                            "but this batch has no attention_mask: use the collator the cache was built with")
        m = mask.bool()
        have = m.sum(1)
        if not torch.equal(have, counts):
            i = int((have != counts).nonzero()[0])
            raise DataError(f"a training sample has {int(have[i])} tokens but {int(counts[i])} are cached in "
                            f"{self.directory}: the data or the tokenization changed; delete the folder to rebuild")
        out: Dict[str, Tensor] = {}
        for k, v in rows.items():
            full = _padding(k, v, (b, m.shape[1]))
            full[m] = v
            out[k] = full
        return out


def _padding(key: str, rows: Tensor, lead: Tuple[int, int]) -> Tensor:
    """Values at padding positions (masked out of the loss, finite for the NaN checks)."""
    shape = (*lead, *rows.shape[1:])
    if key == "topk_indices":
        return torch.arange(rows.shape[-1], dtype=rows.dtype).expand(shape).clone()
    if key == "topk_log_probs":
        return torch.full(shape, -float(np.log(rows.shape[-1])), dtype=rows.dtype)
    if key == "rest_log_mass":
        return torch.full(shape, float("-inf"), dtype=rows.dtype)
    return torch.zeros(shape, dtype=rows.dtype)


# ---- the whole step: reuse or build ----------------------------------------------------------------------
def open_or_build(
    directory: Path, fingerprint: Dict[str, Any], spec: CacheSpec, dataset: Any, collator: Callable,
    teacher_fn: Callable[[Dict[str, Any]], Tensor], *, rank: int, world: int, barrier: Callable[[], None],
    batch_size: int, device: torch.device, num_workers: int = 0,
) -> Tuple[TeacherCache, bool]:
    """The published cache in ``directory`` if its fingerprint matches (else :class:`InputError`), or a new one:
    every process builds the shard of samples ``rank::world`` and rank 0 publishes the manifest. Returns
    ``(reader, built)``. ``fingerprint``: teacher, dataset and target (the stored form is added here)."""
    directory = Path(directory)
    record = read_manifest(directory)
    barrier()  # no process may see a manifest published by this very build
    if record is not None:
        check_fingerprint(directory, record, fingerprint, spec)
        logger.info("sqakd: reusing the teacher-output cache in %s (%d samples, %s)", directory, record["samples"],
                    record["layout"]["mode"])
        return TeacherCache(directory, record), False
    directory.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    logger.info("sqakd: building the teacher-output cache in %s (%d samples, %d process(es))", directory, n, world)
    tensors, layout = build_shard(teacher_fn, dataset, collator, range(rank, n, world), batch_size, spec, device,
                                  num_workers)
    write_shard(directory, rank, world, tensors)
    barrier()
    if rank == 0:
        full = {**fingerprint, **mode_fingerprint(layout["mode"], spec)}
        shards = [shard_name(r, world) for r in range(min(world, n))]
        write_manifest(directory, full, layout, shards, n)
    barrier()
    record = read_manifest(directory)
    return TeacherCache(directory, record), True
