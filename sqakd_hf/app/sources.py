"""Where a run's data comes from: its training and evaluation sources, loaded with `datasets`.

A source is a dataset (Hub id, local folder or file, ``save_to_disk`` folder, builder name with
``data_dir`` / ``data_files``, or the built-in :data:`DIGITS`) and a split, or local files read
whole (``train_files`` / ``eval_files``). Each source is loaded on its own, with its own reader
options (``dataset_kwargs`` / ``eval_dataset_kwargs``), so training and evaluation data may have
different columns. Loading problems raise a one-line :class:`~sqakd_hf.errors.DataError` naming
the file and the fix: a file not in the expected text encoding, files whose columns differ, a file
the reader cannot parse, an unknown reader option, a missing file, split or Hub dataset.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F

from ..errors import DataError, RecipeError
from .arguments import DataArguments

__all__ = ["DIGITS", "DIGITS_MEAN", "DIGITS_STD", "BUILDERS", "FILE_BUILDERS", "AnyDataset", "DataSource",
           "load_digits_splits", "is_local_path", "train_source", "eval_source", "load_source", "load_split",
           "resolved_data_arguments"]

#: ``dataset_name`` of the built-in scikit-learn digits (no download)
DIGITS = "sklearn:digits"
#: the digits' ``pixel_values`` are (x / 16 - mean) / std, in [-1, 1]
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
BUILDERS = ("imagefolder", "csv", "parquet", "json", "text", "arrow")
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json",
                 ".txt": "text", ".arrow": "arrow"}
#: builders that read text files (their encoding matters), and those files' suffixes
_TEXT_BUILDERS = ("csv", "json", "text")
_TEXT_SUFFIXES = tuple(s for s, b in FILE_BUILDERS.items() if b in _TEXT_BUILDERS)
#: load_dataset arguments that recipe keys set (a reader option may not set them)
_RESERVED = {"path": "dataset_name", "name": "dataset_config_name", "split": "train_split / eval_split",
             "data_files": "data_files / train_files / eval_files", "data_dir": "data_dir", "streaming": "streaming",
             "cache_dir": "cache_dir"}

AnyDataset = Any  # datasets.Dataset | datasets.IterableDataset


# ---- the built-in digits ------------------------------------------------------------------------------
def load_digits_splits(
    image_size: int = 32, test_size: float = 0.2, seed: int = 0, with_labels: bool = True
):
    """scikit-learn's digits (1797 real 8x8 handwritten digits) as a ``datasets.DatasetDict``.

    Splits ``train`` / ``test`` (stratified, deterministic for a given ``seed``). ``pixel_values``
    are ``3 x image_size x image_size`` float32 (bilinear upsampling, grey replicated to RGB,
    normalised to [-1, 1] with :data:`DIGITS_MEAN` / :data:`DIGITS_STD`); ``labels`` (0..9) when
    ``with_labels``. Returned with torch formatting.
    """
    import datasets

    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - scikit-learn is in the demo/test extras
        raise ImportError("the digits dataset needs scikit-learn: pip install 'sqakd-hf[demo]'") from None

    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer; got {image_size!r}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    x = F.interpolate(images[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x.clamp(0, 1) - DIGITS_MEAN[0]) / DIGITS_STD[0]).repeat(1, 3, 1, 1)
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=test_size, random_state=seed, stratify=digits.target
    )
    features = {"pixel_values": datasets.Array3D(shape=(3, image_size, image_size), dtype="float32")}
    if with_labels:
        features["labels"] = datasets.ClassLabel(names=[str(i) for i in range(10)])
    splits = {}
    for name, idx in (("train", idx_train), ("test", idx_test)):
        cols: Dict[str, Any] = {"pixel_values": x[idx].numpy()}
        if with_labels:
            cols["labels"] = labels[idx].tolist()
        splits[name] = datasets.Dataset.from_dict(cols, features=datasets.Features(features)).with_format("torch")
    return datasets.DatasetDict(splits)


# ---- sources --------------------------------------------------------------------------------------------
def is_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path (exists, or is written like one), not a Hub id."""
    if os.path.exists(name):
        return True
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
            or Path(name).suffix.lower() in FILE_BUILDERS)


@dataclass
class DataSource:
    """One split of one dataset, or local files read whole, with its reader options."""

    role: str  #: "train" or "eval": which recipe keys configure it (named in error messages)
    name: Optional[str] = None  #: dataset name / path / builder; None for files
    split: str = "train"
    files: Optional[List[str]] = None  #: train_files / eval_files
    config: Optional[str] = None
    data_dir: Optional[str] = None
    data_files: Any = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    streaming: bool = False
    image_size: Optional[int] = None  #: the digits' size

    @property
    def kwargs_key(self) -> str:
        """The recipe key of this source's reader options."""
        return "eval_dataset_kwargs" if self.role == "eval" else "dataset_kwargs"

    @property
    def files_key(self) -> str:
        return "eval_files" if self.role == "eval" else "train_files"

    @property
    def label(self) -> str:
        """``train_files a.csv, b.csv`` or ``dataset <name> (split <split>)``, for messages."""
        if self.files:
            return f"{self.files_key} {', '.join(self.files)}"
        return f"dataset {self.name} (split {self.split})"

    @property
    def split_name(self) -> str:
        """What the evaluation is called: the split, or the file names for files read whole."""
        return ", ".join(Path(f).name for f in self.files) if self.files else self.split

    def describe(self) -> Dict[str, Any]:
        """The source as recorded with a run: local paths absolute, Hub ids as they are."""
        out: Dict[str, Any] = {"split": self.split_name}
        if self.files:
            out["files"] = [_absolute(f) for f in self.files]
        else:
            local = self.name not in BUILDERS and self.name != DIGITS and is_local_path(str(self.name))
            out["dataset"] = _absolute(self.name) if local else self.name
            out["on_hub"] = not local and self.name not in BUILDERS and self.name != DIGITS
            if self.config:
                out["config"] = self.config
        return out


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def train_source(args: DataArguments) -> DataSource:
    """The training data of a recipe: ``train_files``, or ``dataset_name`` and ``train_split``."""
    if args.train_files:
        return DataSource("train", files=list(args.train_files), kwargs=dict(args.dataset_kwargs or {}),
                          streaming=args.streaming)
    if not args.dataset_name:
        raise RecipeError(f"no training data: set dataset_name (a Hub id, a local folder/file, or {DIGITS!r}) or "
                          "train_files (local csv/json/parquet/txt files)")
    return DataSource("train", args.dataset_name, args.train_split, config=args.dataset_config_name,
                      data_dir=args.data_dir, data_files=args.data_files, kwargs=dict(args.dataset_kwargs or {}),
                      streaming=args.streaming, image_size=args.image_size)


def eval_source(args: DataArguments) -> Optional[DataSource]:
    """The evaluation data of a recipe (None without any): ``eval_files``; ``eval_dataset_name`` and
    ``eval_split``; or ``eval_split`` of the training source."""
    kwargs = dict(args.dataset_kwargs or {}) if args.eval_dataset_kwargs is None else dict(args.eval_dataset_kwargs)
    if args.eval_files:
        return DataSource("eval", files=list(args.eval_files), kwargs=kwargs)
    if args.eval_dataset_name:
        if not args.eval_split:
            raise RecipeError(f"eval_dataset_name {args.eval_dataset_name!r} needs an eval_split (e.g. validation)")
        return DataSource("eval", args.eval_dataset_name, args.eval_split, config=args.eval_dataset_config_name,
                          kwargs=kwargs, streaming=args.streaming, image_size=args.image_size)
    if not args.eval_split:
        return None
    if args.train_files:
        return DataSource("eval", files=list(args.train_files), split=args.eval_split, kwargs=kwargs)
    if not args.dataset_name:
        raise RecipeError(f"eval_split {args.eval_split!r} needs a dataset: set dataset_name, eval_dataset_name or "
                          "eval_files")
    return DataSource("eval", args.dataset_name, args.eval_split, config=args.dataset_config_name,
                      data_dir=args.data_dir, data_files=args.data_files, kwargs=kwargs, streaming=args.streaming,
                      image_size=args.image_size)


def load_split(args: DataArguments, split: str, cache_dir: Optional[str] = None) -> AnyDataset:
    """One split of ``args.dataset_name`` (``IterableDataset`` when ``args.streaming``); see :func:`load_source`."""
    source = train_source(args)
    source.split = split
    return load_source(source, cache_dir)


# ---- loading --------------------------------------------------------------------------------------------
def _split_base(split: str) -> str:
    return split.split("[", 1)[0].strip()


def _check_local(name: str, what: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"{what} {name!r}: no such file or directory")
    return path


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def _expand(files: List[str], key: str) -> List[str]:
    """Local files (globs expanded); a missing file or a pattern matching nothing raises :class:`DataError`."""
    found: List[str] = []
    for f in files:
        if f.startswith(("hf://", "http://", "https://")):
            found.append(f)
        elif _is_pattern(f):
            matches = sorted(glob.glob(os.path.expanduser(f), recursive=True))
            if not matches:
                raise DataError(f"{key} pattern {f!r} matches no file")
            found += matches
        else:
            path = _check_local(f, f"{key} entry")
            if path.is_dir():
                raise DataError(f"{key} entry {f!r} is a folder; give its files (e.g. {f.rstrip('/')}/*.csv) or set "
                                "it as dataset_name")
            found.append(str(path))
    return found


def _builder_of(files: List[str], key: str) -> str:
    builders = {FILE_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in builders:
        bad = next(f for f in files if Path(f).suffix.lower() not in FILE_BUILDERS)
        raise DataError(f"{key} entry {bad!r} has an unsupported extension; use one of "
                        f"{', '.join(sorted(FILE_BUILDERS))}")
    if len(builders) > 1:
        raise DataError(f"{key} mixes file types ({', '.join(sorted(builders))}); give files of one type")
    return builders.pop()


def _flat_files(data_files: Any) -> List[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [x for v in data_files.values() for x in ([v] if isinstance(v, str) else v)]
    return list(data_files or [])


def _split_files(source: DataSource) -> Any:
    """``data_files`` for this source's split only: with a split mapping, its entry, so that files of other splits
    (with other columns) are not read."""
    files = source.data_files
    for f in _flat_files(files):
        if not _is_pattern(f) and not f.startswith(("hf://", "http://", "https://")):
            _check_local(f, "data_files entry")
    if isinstance(files, dict):
        base = _split_base(source.split)
        if base not in files:
            raise DataError(f"data_files has no {base!r} entry (it has {', '.join(files)}); set the split to one of "
                            "them, or give the evaluation data as eval_files")
        return {base: files[base]}
    return files


def _from_disk(path: Path, split: str, streaming: bool) -> AnyDataset:
    import datasets

    if "[" in split:
        raise DataError(f"split slices like {split!r} are not supported for save_to_disk folders ({path}); "
                        "use a plain split name and max_train_samples / max_eval_samples")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"split {split!r} not found in {path}; available splits: {', '.join(loaded)}")
        ds = loaded[split]
    else:
        if split != "train":
            raise DataError(f"{path} holds a single Dataset (no splits); use split 'train' for it, not {split!r}")
        ds = loaded
    return ds.to_iterable_dataset() if streaming else ds


def _digits(source: DataSource) -> AnyDataset:
    splits = load_digits_splits(image_size=source.image_size or 32)
    base = _split_base(source.split)
    if base not in splits or "[" in source.split:
        raise DataError(f"{DIGITS} has the splits {', '.join(splits)}; got {source.split!r}")
    ds = splits[base]
    return ds.to_iterable_dataset() if source.streaming else ds


def load_source(source: DataSource, cache_dir: Optional[str] = None) -> AnyDataset:
    """The examples of ``source`` (``IterableDataset`` when it streams).

    Raises :class:`DataError` naming the file (or dataset) and the fix when it cannot be loaded.
    """
    if source.name == DIGITS:
        return _digits(source)
    for key in source.kwargs:
        if key in _RESERVED:
            raise DataError(f"{source.kwargs_key} may not set {key!r}: use the recipe key {_RESERVED[key]}")
    kwargs: Dict[str, Any] = {}
    local: List[str] = []  # local files read, to name the one at fault
    split = source.split
    if source.files:
        local = _expand(source.files, source.files_key)
        kwargs.update(path=_builder_of(local, source.files_key), data_files={"train": local})
        base = _split_base(split)
        if base != "train":
            raise DataError(f"{source.files_key} are one split named 'train'; got the split {split!r} (a slice like "
                            "'train[90%:]' selects part of them)")
    else:
        name = str(source.name)
        if source.data_dir is not None:
            kwargs["data_dir"] = str(_check_local(source.data_dir, "data_dir"))
        if source.data_files is not None:
            kwargs["data_files"] = _split_files(source)
            local = [f for f in _flat_files(kwargs["data_files"]) if os.path.isfile(f)]
        if name in BUILDERS:
            kwargs["path"] = name
            if not ({"data_dir", "data_files"} & set(kwargs)):
                raise DataError(f"dataset_name {name!r} is a builder: set data_dir or data_files too")
        elif is_local_path(name):
            path = _check_local(name, "eval_dataset_name" if source.role == "eval" and source.name else "dataset_name")
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                return _from_disk(path, split, source.streaming)
            if path.is_file():
                builder = FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise DataError(f"dataset file {path} has an unsupported extension; use one of "
                                    f"{', '.join(sorted(FILE_BUILDERS))} or a folder")
                kwargs.update(path=builder, data_files={"train": str(path)})
                local = [str(path)]
            else:
                kwargs["path"] = str(path)
                local = local or [str(path)]  # a folder: its files are listed only to explain a failure
        else:
            kwargs["path"] = name
            if source.config:
                kwargs["name"] = source.config
    if "encoding" in source.kwargs:
        try:
            codecs.lookup(str(source.kwargs["encoding"]))
        except LookupError:
            raise DataError(f"{source.kwargs_key}: unknown encoding {source.kwargs['encoding']!r} (e.g. utf-8, "
                            "latin-1, cp1252)") from None
    if source.streaming and local:
        _check_encoding(source, local, kwargs["path"])  # streamed files are decoded only while training
    return _load(source, {**source.kwargs, **kwargs, "split": split}, local, cache_dir)


@contextlib.contextmanager
def _datasets_quiet() -> Iterator[None]:
    """Silence datasets' own error logging while loading (the error is reported once, as a DataError)."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _load(source: DataSource, kwargs: Dict[str, Any], local: List[str], cache_dir: Optional[str]) -> AnyDataset:
    import datasets
    from datasets.exceptions import DatasetsError

    try:
        with _datasets_quiet():
            return datasets.load_dataset(streaming=source.streaming, cache_dir=cache_dir, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err) or not source.kwargs:
            raise
        option = re.search(r"argument '(\w+)'", str(err))
        raise DataError(f"{source.kwargs_key}: the {kwargs['path']} reader of {source.label} has no option "
                        f"{option.group(1) if option else ''!r}; remove it (csv takes e.g. encoding, delimiter, "
                        "column_names; json takes e.g. field)") from None
    except DatasetsError as err:
        raise _explain(err, source, kwargs.get("path"), local) from None
    except ValueError as err:
        msg = " ".join(str(err).split())
        if "split" in msg.lower():
            raise DataError(f"{source.label}: cannot load split {source.split!r}: {msg}") from None
        raise DataError(f"cannot load {source.label}: {msg}") from None
    except (FileNotFoundError, ConnectionError, OSError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set: Hub datasets must already be in the cache)" if offline else ""
        raise DataError(f"cannot load {source.label}{hint}: {type(err).__name__}: {' '.join(str(err).split())}"
                        ) from None


def _causes(err: BaseException) -> List[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


def _first_undecodable(files: List[str], encoding: str) -> Optional[tuple]:
    """``(file, byte offset, byte)`` of the first byte of ``files`` that is not valid ``encoding`` text."""
    for f in files:
        decoder = codecs.getincrementaldecoder(encoding)()
        offset = 0
        with open(f, "rb") as handle:
            while True:
                chunk = handle.read(1 << 22)
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as err:
                    return f, offset + err.start, err.object[err.start]
                if not chunk:
                    break
                offset += len(chunk)
    return None


def _encoding_error(source: DataSource, found: tuple, encoding: str) -> DataError:
    file, offset, byte = found
    return DataError(f"{file} is not {encoding} text (byte 0x{byte:02x} at offset {offset}): set {source.kwargs_key}: "
                     "{encoding: latin-1} in the recipe (or the file's real encoding, e.g. cp1252)")


def _check_encoding(source: DataSource, files: List[str], builder: str) -> None:
    if builder not in _TEXT_BUILDERS:
        return
    encoding = str(source.kwargs.get("encoding", "utf-8"))
    found = _first_undecodable(_data_files(files), encoding)
    if found is not None:
        raise _encoding_error(source, found, encoding)


def _data_files(paths: List[str]) -> List[str]:
    """``paths`` with folders replaced by the data files under them (at most 1000)."""
    found: List[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += [str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in _TEXT_SUFFIXES][:1000]
        elif p.is_file():
            found.append(str(p))
    return found


def _explain(err: BaseException, source: DataSource, builder: Optional[str], local: List[str]) -> DataError:
    """One line for a failure while `datasets` generated the data: which file, what is wrong, the fix."""
    local = _data_files(local)
    chain = _causes(err)
    text = " ".join(str(err).split())
    encoding = str(source.kwargs.get("encoding", "utf-8"))
    if any(isinstance(c, (UnicodeDecodeError, LookupError)) or "Invalid UTF8" in str(c) for c in chain):
        with contextlib.suppress(LookupError, OSError):
            found = _first_undecodable(local, encoding)
            if found is not None:
                return _encoding_error(source, found, encoding)
    if type(err).__name__ == "DatasetGenerationCastError" or "must have the same columns" in text:
        culprit = re.search(r"generating data using (\S+?),? \[", text)
        diff = re.search(r"there are (\d+ (?:new|missing) columns \(\{.*?\}\))", text)
        where = culprit.group(1) if culprit else ", ".join(local) or source.label
        detail = f" (it has {diff.group(1)})" if diff else ""
        return DataError(f"{where}: its columns differ from the other files of {source.label}{detail}; one source reads "
                         "files with the same columns: put evaluation data with other columns in eval_files (each "
                         "source has its own columns), or fix the file")
    cause = next((c for c in chain[1:] if str(c).strip()), err)  # the reader's own error, under datasets' wrapper
    why = " ".join(str(cause).split())
    why = why if len(why) <= 200 else why[:200] + "..."
    where = local[0] if len(local) == 1 else source.label
    hint = "e.g. {delimiter: ';'} or {encoding: latin-1}" if builder == "csv" else "e.g. {encoding: latin-1}"
    return DataError(f"cannot read {where} as {builder or 'data'}: {type(cause).__name__}: {why}; check the file's "
                     f"format, or pass reader options in {source.kwargs_key} ({hint})")


def _absolute_entries(value: Any) -> Any:
    if isinstance(value, str):
        return value if value.startswith(("hf://", "http://", "https://")) else _absolute(value)
    if isinstance(value, dict):
        return {k: _absolute_entries(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_absolute_entries(v) for v in value]
    return value


def resolved_data_arguments(args: DataArguments) -> Dict[str, Any]:
    """Every data argument, with local paths made absolute (a run record read from another folder finds the
    same data); Hub ids, builder names and the digits stay as they are."""
    import dataclasses

    values = dataclasses.asdict(args)
    for key in ("dataset_name", "eval_dataset_name"):
        name = values.get(key)
        if name and name not in BUILDERS and name != DIGITS and is_local_path(name):
            values[key] = _absolute(name)
    for key in ("data_dir", "data_files", "train_files", "eval_files"):
        values[key] = _absolute_entries(values.get(key))
    return values
