"""The splits of a run: load them, check their columns against the teacher, preprocess them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import DataError
from .arguments import DataArguments
from .sources import DataSource, eval_source, load_source, train_source
from .data import (
    UNLABELED,
    Columns,
    ensure_pad_token,
    image_collator,
    label_id_map,
    limit_samples,
    prepare_image_dataset,
    prepare_text_dataset,
    processor_image_transform,
    resolve_columns,
    text_collator,
    timm_image_transform,
)

__all__ = ["RawData", "load_and_check_data", "preprocess"]


@dataclass
class RawData:
    """Loaded, checked (not yet preprocessed) splits, and where they came from."""

    train: Any
    eval: Any
    train_columns: Optional[Columns]
    eval_columns: Optional[Columns]
    eval_label_map: Optional[Dict[Any, int]] = None
    train_source: Optional[DataSource] = None
    eval_source: Optional[DataSource] = None

    def train_label_map(self, id2label) -> Optional[Dict[Any, int]]:
        """Training label -> class id (only when training uses labels)."""
        if self.train_columns is None or self.train_columns.label is None:
            return None
        return label_id_map(self.train, self.train_columns.label, id2label)


def load_and_check_data(data: DataArguments, info, need_train: bool = True, keep_train_labels: bool = False,
                        cache_dir: Optional[str] = None) -> RawData:
    """Load the configured training and evaluation sources (each with its own columns and reader options) and
    check their columns against the teacher ``info`` (raises :class:`DataError`)."""
    modality = info.modality
    train = train_cols = source = None
    if need_train:
        source = train_source(data)
        train = load_source(source, cache_dir)
        train_cols = resolve_columns(train, data, modality, source.label, need_label=keep_train_labels)
        if keep_train_labels and (train_cols.label is None
                                  or label_id_map(train, train_cols.label, info.id2label) is UNLABELED):
            raise DataError(f"ce_weight > 0 needs labels that match the teacher's classes, but {source.label} has none "
                            "(set label_column, or ce_weight: 0 for label-free SQAKD)")
        train = limit_samples(train, data.max_train_samples)
    evals = eval_cols = label_map = None
    held_out = eval_source(data)
    if held_out is not None:
        evals = load_source(held_out, cache_dir)
        eval_cols = resolve_columns(evals, data, modality, held_out.label, role="eval")
        if info.task not in ("image-classification", "text-classification"):
            eval_cols.label = None
        if eval_cols.label is not None:
            label_map = label_id_map(evals, eval_cols.label, info.id2label)
            if label_map is UNLABELED:
                eval_cols.label, label_map = None, None
        evals = limit_samples(evals, data.max_eval_samples)
    return RawData(train, evals, train_cols, eval_cols, label_map, source, held_out)


def preprocess(raw: RawData, data: DataArguments, info, teacher, processor, train_label_map=None
               ) -> Tuple[Any, Any, Callable]:
    """Preprocessed ``(train, eval, collator)``: images via timm's data config (timm models) or the image
    processor, text via the tokenizer."""
    if info.modality == "image":
        size = data.image_size
        if info.library == "timm":
            from timm.data import resolve_data_config

            size = size or resolve_data_config({}, model=teacher)["input_size"][-1]
            eval_tf = timm_image_transform(teacher, data.image_size)
            train_tf = timm_image_transform(teacher, data.image_size, training=True) if data.augment else eval_tf
        else:
            eval_tf = train_tf = processor_image_transform(processor, data.image_size)
        train = (prepare_image_dataset(raw.train, train_tf, raw.train_columns, size, train_label_map)
                 if raw.train is not None else None)
        evals = (prepare_image_dataset(raw.eval, eval_tf, raw.eval_columns, size, raw.eval_label_map)
                 if raw.eval is not None else None)
        return train, evals, image_collator
    if info.task == "causal-lm":
        ensure_pad_token(processor)
    train = (prepare_text_dataset(raw.train, processor, raw.train_columns, data.max_length, train_label_map)
             if raw.train is not None else None)
    evals = (prepare_text_dataset(raw.eval, processor, raw.eval_columns, data.max_length, raw.eval_label_map)
             if raw.eval is not None else None)
    return train, evals, text_collator(processor)
