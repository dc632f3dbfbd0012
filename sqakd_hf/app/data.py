"""Data for SQAKD runs: column checks and preprocessing (loading is :mod:`sqakd_hf.app.sources`).

* :func:`load_split` (from :mod:`.sources`) reads a split from the Hub, a local imagefolder / csv /
  parquet / json folder or file, a ``save_to_disk`` folder, or the built-in :data:`DIGITS`;
  ``streaming=True`` gives a ``datasets.IterableDataset``.
* :func:`resolve_columns` finds (or checks) the image / text / label columns and raises
  :class:`DataError` naming the available columns when one is missing or the data does not
  match the model's modality (e.g. a text dataset for an image model).
* Images: :func:`timm_image_transform` (timm's ``resolve_data_config`` + ``create_transform``)
  or :func:`processor_image_transform` (a transformers image processor), applied on the fly
  by :func:`prepare_image_dataset`. Text: :func:`prepare_text_dataset` tokenizes with
  truncation; :func:`text_collator` pads per batch (``DataCollatorWithPadding``).
* Labels are optional everywhere: they become a ``labels`` column when present.
* :func:`load_digits_splits`: scikit-learn's 1797 real 8x8 digits as train/test ``Dataset`` s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from ..errors import DataError
from .arguments import DataArguments
from .sources import DIGITS, DIGITS_MEAN, DIGITS_STD, AnyDataset, is_local_path, load_digits_splits, load_split

logger = logging.getLogger(__name__)

__all__ = [
    "DIGITS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "DataError",
    "Columns",
    "AnyDataset",
    "load_digits_splits",
    "is_local_path",
    "load_split",
    "column_names",
    "resolve_columns",
    "label_id_map",
    "timm_image_transform",
    "processor_image_transform",
    "prepare_image_dataset",
    "prepare_text_dataset",
    "text_collator",
    "image_collator",
    "limit_samples",
    "ensure_pad_token",
    "dataset_length",
    "UNLABELED",
]

IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture", "photo")
TEXT_COLUMNS = ("text", "sentence", "content", "document", "review", "question", "prompt")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target", "class")
#: returned by :func:`label_id_map` when the label column does not describe the teacher's classes
UNLABELED: Dict[Any, int] = {}


# ---- loading --------------------------------------------------------------------------------------------
def limit_samples(ds: AnyDataset, n: Optional[int]) -> AnyDataset:
    """The first ``n`` examples (``take`` for streaming data)."""
    if n is None:
        return ds
    if hasattr(ds, "select") and hasattr(ds, "__len__"):
        return ds.select(range(min(n, len(ds))))
    return ds.take(n)


# ---- columns --------------------------------------------------------------------------------------------
@dataclass
class Columns:
    """The columns a run uses: one input column (image or text), optionally a text pair and labels."""

    modality: str
    input: str
    pair: Optional[str] = None
    label: Optional[str] = None


def _peek(ds: AnyDataset) -> Dict[str, Any]:
    try:
        return next(iter(ds))
    except StopIteration:
        raise DataError("the dataset split is empty") from None


def column_names(ds: AnyDataset) -> List[str]:
    names = getattr(ds, "column_names", None)
    if names is None:
        names = list(_peek(ds))
    return list(names)


def _features(ds: AnyDataset) -> Dict[str, Any]:
    feats = getattr(ds, "features", None)
    return dict(feats) if feats else {}


def _kind(ds: AnyDataset, col: str, feats: Mapping[str, Any], sample: Optional[Mapping[str, Any]]) -> str:
    """'image', 'text', 'array', 'label' or 'other' for a column, from its feature (or a sample value)."""
    import datasets

    feat = feats.get(col)
    if feat is not None:
        if isinstance(feat, datasets.Image):
            return "image"
        if isinstance(feat, datasets.ClassLabel):
            return "label"
        if isinstance(feat, (datasets.Array2D, datasets.Array3D, datasets.List, datasets.Sequence)):
            return "array"
        if isinstance(feat, datasets.Value):
            return "text" if feat.dtype in ("string", "large_string") else "other"
        return "other"
    if sample is None:
        return "other"
    value = sample.get(col)
    try:
        from PIL import Image

        if isinstance(value, Image.Image):
            return "image"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, torch.Tensor)) or hasattr(value, "shape"):
        return "array"
    return "other"


def _only_labels(names: List[str], label_col: Optional[str]) -> Optional[str]:
    """The reason to give when every column is a label column (SQAKD distills on the inputs), else None."""
    labels = [c for c in names if c in LABEL_COLUMNS or c == label_col]
    if names and len(labels) == len(names):
        return (f"it holds only labels ({', '.join(labels)}); SQAKD needs the inputs the teacher reads "
                "(the labels are optional)")
    return None


def resolve_columns(ds: AnyDataset, args: DataArguments, modality: str, what: str = "dataset", role: str = "train",
                    need_label: bool = True) -> Columns:
    """Find the input (and label) columns for a model taking ``modality`` ('image' or 'text') input.

    Explicitly configured columns must exist; otherwise the usual names and feature types are
    tried. ``role="eval"``: the ``eval_*_column`` keys override the others. ``need_label=False``
    (training data of a label-free run): no label column is looked for or required. Raises
    :class:`DataError` naming the available columns, and saying so when the data holds the other
    modality (a text dataset for an image model, or the reverse).
    """
    names = column_names(ds)
    feats = _features(ds)
    sample = None if feats else _peek(ds)
    kinds = {c: _kind(ds, c, feats, sample) for c in names}
    shown = ", ".join(f"{c} ({kinds[c]})" for c in names) or "none"

    def require(field_name: str, col: Optional[str]) -> Optional[str]:
        if col is not None and col not in names:
            raise DataError(f"{field_name} {col!r} does not exist in {what}; available columns: {shown}")
        return col

    def configured(key: str) -> tuple:
        own = getattr(args, f"eval_{key}", None) if role == "eval" else None
        return (f"eval_{key}", own) if own is not None else (key, getattr(args, key))

    image_col = require(*configured("image_column"))
    text_col = require(*configured("text_column"))
    pair_col = require("text_pair_column", args.text_pair_column)
    label_key, label_col = configured("label_column")
    label_col = require(label_key, label_col) if need_label or label_col is None or label_col in names else None

    if modality == "image":
        if image_col is None:
            image_col = next((c for c in names if kinds[c] == "image"), None)
            image_col = image_col or next((c for c in IMAGE_COLUMNS if c in names and kinds[c] == "array"), None)
        if image_col is None:
            texts = [c for c in names if kinds[c] == "text" and c not in LABEL_COLUMNS and c != label_col]
            why = (f"it looks like a text dataset (text columns: {', '.join(texts)}), but the model takes images"
                   if texts else _only_labels(names, label_col) or "no column holds images")
            raise DataError(f"{what} has no image column: {why}. Available columns: {shown}. "
                            "Set image_column, or use an image dataset / a text model.")
        if kinds[image_col] not in ("image", "array"):
            raise DataError(f"image_column {image_col!r} holds {kinds[image_col]} values, not images; "
                            f"available columns: {shown}")
        input_col = image_col
    else:
        if text_col is None:
            text_col = next((c for c in TEXT_COLUMNS if c in names and kinds[c] == "text"), None)
            text_col = text_col or next((c for c in names if kinds[c] == "text" and c not in LABEL_COLUMNS
                                         and c != label_col), None)
        if text_col is None:
            images = [c for c in names if kinds[c] == "image"]
            why = (f"it looks like an image dataset (image columns: {', '.join(images)}), but the model takes text"
                   if images else _only_labels(names, label_col) or "no column holds strings")
            raise DataError(f"{what} has no text column: {why}. Available columns: {shown}. "
                            "Set text_column, or use a text dataset / an image model.")
        if kinds[text_col] != "text":
            raise DataError(f"text_column {text_col!r} holds {kinds[text_col]} values, not text; "
                            f"available columns: {shown}")
        input_col = text_col
    if label_col is None and args.use_labels and need_label:
        label_col = next((c for c in LABEL_COLUMNS if c in names and c not in (input_col, pair_col)), None)
    if not args.use_labels or not need_label:
        label_col = None
    return Columns(modality, input_col, pair_col, label_col)


def label_id_map(ds: AnyDataset, label_col: str, id2label: Optional[Mapping[int, str]]) -> Optional[Dict[Any, int]]:
    """How dataset labels map to the model's class ids.

    ``None``: use the values as they are (ints; no class names to compare). A dict maps dataset
    values (ClassLabel ids or strings) to model ids by class name; :data:`UNLABELED` (checked with
    ``is``) means none of the dataset's classes is the teacher's: drop the labels. Raises
    :class:`DataError` when only some names differ or string labels cannot be mapped.
    """
    import datasets

    feat = _features(ds).get(label_col)
    model_names = {int(k): str(v) for k, v in (id2label or {}).items()}
    generic = all(v == f"LABEL_{k}" for k, v in model_names.items())
    if isinstance(feat, datasets.ClassLabel):
        if model_names and generic and feat.num_classes != len(model_names):
            logger.warning(
                "sqakd: label column %r has %d classes, the teacher %d; treating the data as unlabeled (no accuracy "
                "is reported)", label_col, feat.num_classes, len(model_names))
            return UNLABELED
        if not model_names or generic:
            return None
        by_name = {v: k for k, v in model_names.items()}
        missing = [n for n in feat.names if n not in by_name]
        if len(missing) == len(feat.names):
            logger.warning(
                "sqakd: none of the classes of label column %r (%s) are the teacher's classes; treating the data as "
                "unlabeled (no accuracy is reported)", label_col, ", ".join(feat.names[:5]))
            return UNLABELED
        if missing:
            raise DataError(f"label column {label_col!r} has classes {missing} that the teacher does not know "
                            f"(its classes: {', '.join(model_names.values())}); set label_column to a matching "
                            "column or use_labels: false")
        mapping = {i: by_name[n] for i, n in enumerate(feat.names)}
        return None if all(i == j for i, j in mapping.items()) else mapping
    if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
        if not model_names or generic:
            raise DataError(f"label column {label_col!r} holds strings but the teacher has no class names "
                            "(config id2label) to map them to; use integer labels or use_labels: false")
        return {v: k for k, v in model_names.items()}
    return None


# ---- images ---------------------------------------------------------------------------------------------
def timm_image_transform(model: torch.nn.Module, image_size: Optional[int] = None, training: bool = False) -> Callable:
    """timm's preprocessing for ``model``: ``resolve_data_config`` + ``create_transform`` (PIL -> tensor).

    ``image_size`` overrides the model's input size; ``training`` adds timm's training augmentation.
    """
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    if image_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], image_size, image_size)
        if training is False:
            cfg["crop_pct"] = 1.0
    return create_transform(**cfg, is_training=training)


def processor_image_transform(processor: Any, image_size: Optional[int] = None) -> Callable:
    """A transformers image processor as a one-image transform (PIL -> ``pixel_values`` tensor)."""
    kwargs: Dict[str, Any] = {}
    if image_size is not None:
        size = getattr(processor, "size", None) or {}
        size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
        if "height" in size or "width" in size:
            kwargs["size"] = {"height": image_size, "width": image_size}
        else:
            kwargs["size"] = {"shortest_edge": image_size}
            if getattr(processor, "do_center_crop", False):
                kwargs["crop_size"] = {"height": image_size, "width": image_size}

    def transform(image: Any) -> torch.Tensor:
        return processor(images=image, return_tensors="pt", **kwargs)["pixel_values"][0]

    return transform


def _to_rgb(image: Any) -> Any:
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def _array_to_pixels(value: Any, size: Optional[int]) -> torch.Tensor:
    """A ready ``C x H x W`` array (e.g. the digits): as float tensor, resized to ``size`` if needed."""
    x = torch.as_tensor(value, dtype=torch.float32)
    if x.dim() == 2:
        x = x[None].repeat(3, 1, 1)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return x


def _label_value(value: Any, mapping: Optional[Mapping[Any, int]], col: str) -> int:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if mapping is None:
        return int(value)
    if value not in mapping:
        raise DataError(f"label {value!r} in column {col!r} is not one of the teacher's classes {sorted(mapping)}")
    return mapping[value]


def prepare_image_dataset(
    ds: AnyDataset,
    transform: Callable,
    columns: Columns,
    array_size: Optional[int] = None,
    label_map: Optional[Mapping[Any, int]] = None,
) -> AnyDataset:
    """Examples -> ``{"pixel_values", "labels"?}``. PIL images go through ``transform``; ready arrays
    (``C x H x W`` floats, e.g. the digits) are only resized to ``array_size``. Map-style data is
    transformed on the fly (``with_transform``), streaming data lazily with ``map``."""
    import datasets

    img, lab = columns.input, columns.label
    keep = [c for c in (img, lab) if c is not None]

    def one(example: Mapping[str, Any]) -> Dict[str, Any]:
        value = example[img]
        if hasattr(value, "convert"):
            pixels = transform(_to_rgb(value))
        else:
            pixels = _array_to_pixels(value, array_size)
        out = {"pixel_values": pixels}
        if lab is not None:
            out["labels"] = _label_value(example[lab], label_map, lab)
        return out

    if isinstance(ds, datasets.Dataset):
        ds = ds.select_columns(keep)

        def batch(examples: Mapping[str, List[Any]]) -> Dict[str, List[Any]]:
            rows = [one({k: examples[k][i] for k in examples}) for i in range(len(examples[img]))]
            return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}

        return ds.with_format(None).with_transform(batch)
    names = column_names(ds)
    return ds.map(one, remove_columns=names)


def image_collator(features: List[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stack ``pixel_values`` (and ``labels`` when every example has one)."""
    batch = {"pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])}
    if features and all(f.get("labels") is not None for f in features):
        batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
    return batch


# ---- text -----------------------------------------------------------------------------------------------
def prepare_text_dataset(
    ds: AnyDataset,
    tokenizer: Any,
    columns: Columns,
    max_length: int = 128,
    label_map: Optional[Mapping[Any, int]] = None,
    keep_labels: bool = True,
) -> AnyDataset:
    """Tokenize (truncation to ``max_length``, no padding: see :func:`text_collator`); keeps
    ``labels`` only when ``keep_labels`` and a label column exists (sequence-level labels)."""
    text, pair, lab = columns.input, columns.pair, columns.label
    lab = lab if keep_labels else None
    names = column_names(ds)

    def tokenize(examples: Mapping[str, List[Any]]) -> Dict[str, Any]:
        texts = [t if isinstance(t, str) else "" for t in examples[text]]
        pairs = [p if isinstance(p, str) else "" for p in examples[pair]] if pair else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        out = dict(enc)
        if lab is not None:
            out["labels"] = [_label_value(v, label_map, lab) for v in examples[lab]]
        return out

    kwargs: Dict[str, Any] = {"batched": True, "remove_columns": names}
    import datasets

    if isinstance(ds, datasets.Dataset):
        kwargs["desc"] = "Tokenizing"
    ds = ds.map(tokenize, **kwargs)
    # empty texts (e.g. blank lines of a corpus) give no tokens for models without special tokens
    return ds.filter(lambda e: len(e["input_ids"]) > 0)


def text_collator(tokenizer: Any) -> Callable:
    """``DataCollatorWithPadding``: pads each batch to its longest example."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def ensure_pad_token(tokenizer: Any) -> Any:
    """Causal-LM tokenizers often have no pad token: use the EOS token (padding is masked anyway)."""
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dataset_length(ds: AnyDataset) -> Optional[int]:
    try:
        return len(ds)
    except TypeError:
        return None
