"""The argument dataclasses of the ``sqakd-hf`` commands (HF style: fields with ``help`` metadata).

A recipe sets the fields of :class:`ModelArguments`, :class:`DataArguments`,
:class:`QuantArguments`, :class:`RunArguments` and
:class:`~sqakd_hf.SQAKDTrainingArguments`; ``sqakd-hf eval`` reads :class:`EvalArguments`.
:class:`QuantArguments` is generated from :class:`~sqakd_hf.QuantConfig` (same names,
defaults and documentation), so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from argparse import ArgumentTypeError
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from transformers.hf_argparser import string_to_bool

from ..config import STORAGE_FIELDS, QuantConfig
from ..errors import RecipeError
from ..hub.push import HUB_FORMATS

__all__ = [
    "LIBRARIES",
    "TASKS",
    "ModelArguments",
    "DataArguments",
    "QuantArguments",
    "RunArguments",
    "EvalArguments",
]

LIBRARIES = ("auto", "transformers", "timm")
#: task -> (transformers Auto class, input modality)
TASKS: Dict[str, Tuple[str, str]] = {
    "image-classification": ("AutoModelForImageClassification", "image"),
    "text-classification": ("AutoModelForSequenceClassification", "text"),
    "token-classification": ("AutoModelForTokenClassification", "text"),
    "causal-lm": ("AutoModelForCausalLM", "text"),
    "masked-lm": ("AutoModelForMaskedLM", "text"),
    "feature-extraction": ("AutoModel", "text"),
}
PACKED_FP_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class ModelArguments:
    """Which teacher to quantize, and how to load it."""

    teacher: Optional[str] = field(
        default=None,
        metadata={"help": "The full-precision teacher: a Hub id (e.g. 'google/vit-base-patch16-224', "
                          "'hf-hub:timm/resnet18.a1_in1k') or a local checkpoint folder (transformers or timm layout)."},
    )
    library: str = field(
        default="auto",
        metadata={"help": "'transformers' (AutoModelFor<task>), 'timm' (timm.create_model + quantize_model) or 'auto': "
                          "timm for timm-layout folders and 'hf-hub:' / 'timm/' ids, transformers otherwise."},
    )
    task: str = field(
        default="auto",
        metadata={"help": f"One of {', '.join(TASKS)}, or 'auto' (from the teacher's config: its architecture "
                          "name; timm models are image classifiers)."},
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the teacher."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where Hub downloads are cached."})

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise RecipeError(f"library must be one of {', '.join(LIBRARIES)}; got {self.library!r}")
        if self.task != "auto" and self.task not in TASKS:
            raise RecipeError(f"task must be 'auto' or one of {', '.join(TASKS)}; got {self.task!r}")


@dataclass
class DataArguments:
    """Which data to distill on (labels optional everywhere) and how to preprocess it."""

    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "A Hub dataset id, a local folder (imagefolder, csv/parquet/json files, or a "
                          "Dataset.save_to_disk folder), a local .csv/.parquet/.json/.jsonl/.txt file, a builder name "
                          "('imagefolder', 'csv', 'parquet', 'json', 'text') with data_dir/data_files, or "
                          "'sklearn:digits' (scikit-learn's digits, built in)."},
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration name."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "data_dir passed to datasets.load_dataset."})
    data_files: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "data_files passed to datasets.load_dataset (a path, list or split mapping)."}
    )
    dataset_kwargs: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Reader options passed to datasets.load_dataset for every source, e.g. {encoding: latin-1, "
                          "delimiter: ';'} for a csv file."},
    )
    train_files: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Training data as local file(s) (.csv/.tsv/.json/.jsonl/.parquet/.txt, globs allowed), "
                          "instead of dataset_name."},
    )
    train_split: str = field(
        default="train", metadata={"help": "Training split; slices allowed (e.g. 'train[:90%%]')."}
    )
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Optional evaluation split (e.g. 'validation', 'test', 'train[90%%:]'), of eval_dataset_name "
                          "if set, else of the training source. Labeled or not: evaluation reports KD loss and "
                          "teacher agreement, plus accuracy when labels exist."},
    )
    eval_files: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Evaluation data as local file(s), read whole, with its own columns (e.g. labeled eval data "
                          "next to unlabeled training data)."},
    )
    eval_dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "Evaluation data from another dataset than the training data (a Hub id, local folder or "
                          "file); its split is eval_split."},
    )
    eval_dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset configuration name of eval_dataset_name."})
    eval_dataset_kwargs: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "Reader options of the evaluation source (default: dataset_kwargs)."})
    image_column: Optional[str] = field(
        default=None, metadata={"help": "Image column (default: 'image', 'img' or the first Image feature)."}
    )
    text_column: Optional[str] = field(
        default=None, metadata={"help": "Text column (default: 'text', 'sentence', ... or the first string column)."}
    )
    text_pair_column: Optional[str] = field(
        default=None, metadata={"help": "Second text column for sentence-pair tasks."}
    )
    label_column: Optional[str] = field(
        default=None,
        metadata={"help": "Label column (default: 'label' / 'labels' if present). Never used for training unless "
                          "ce_weight > 0; used for eval accuracy."},
    )
    eval_image_column: Optional[str] = field(
        default=None, metadata={"help": "Image column of the evaluation data (default: image_column)."})
    eval_text_column: Optional[str] = field(
        default=None, metadata={"help": "Text column of the evaluation data (default: text_column)."})
    eval_label_column: Optional[str] = field(
        default=None, metadata={"help": "Label column of the evaluation data (default: label_column)."})
    use_labels: bool = field(
        default=True, metadata={"help": "false: drop the label column everywhere (fully unlabeled run)."}
    )
    max_length: int = field(default=128, metadata={"help": "Text: maximum tokens per example (truncation)."})
    image_size: Optional[int] = field(
        default=None, metadata={"help": "Images: override the model's input size (square)."}
    )
    augment: bool = field(
        default=False, metadata={"help": "Images: timm's training augmentation (random resized crop, flip) on the "
                                         "training split."}
    )
    streaming: bool = field(
        default=False, metadata={"help": "Stream the data (datasets.IterableDataset) instead of preparing it; "
                                         "needs max_steps."}
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training examples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many eval examples."})

    def __post_init__(self) -> None:
        for name in ("max_length", "image_size", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RecipeError(f"{name} must be a positive integer; got {value!r}")
        for name in ("dataset_kwargs", "eval_dataset_kwargs"):
            setattr(self, name, _mapping(name, getattr(self, name), "{encoding: latin-1}"))
        for name in ("train_files", "eval_files"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is not None and (not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, str) and v for v in value)):
                raise RecipeError(f"{name} must be a file path or a list of file paths; got {value!r}")
        if self.train_files and self.dataset_name:
            raise RecipeError("set either dataset_name or train_files for the training data, not both")
        if self.eval_files and self.eval_dataset_name:
            raise RecipeError("set either eval_files or eval_dataset_name for the evaluation data, not both")
        if self.eval_files and self.eval_split:
            raise RecipeError(f"eval_files are read whole: drop eval_split ({self.eval_split!r}); use "
                              "max_eval_samples to evaluate on fewer examples")

    @property
    def has_eval(self) -> bool:
        """Whether evaluation data is configured."""
        return bool(self.eval_split or self.eval_files)


def _mapping(name: str, value: Any, example: str) -> Optional[Dict[str, Any]]:
    """A mapping field given as a mapping or as its YAML/JSON text; anything else raises :class:`RecipeError`."""
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise RecipeError(f"{name}: {value!r} is not valid YAML/JSON ({getattr(err, 'problem', None) or err}); "
                              f"write it like {example}") from None
    if value is not None and not isinstance(value, dict):
        raise RecipeError(f"{name} must be a mapping of reader options like {example}; got {value!r}")
    return dict(value) if value is not None else None


# ---- QuantArguments: generated from QuantConfig ---------------------------------------------------
def _docstring_args(cls: type) -> Dict[str, str]:
    """``{argument: help}`` from the ``Args:`` section of a Google-style class docstring
    (``a / b: text`` documents both ``a`` and ``b``)."""
    section = (inspect.getdoc(cls) or "").partition("Args:")[2]
    helps: Dict[str, str] = {}
    names: List[str] = []
    for line in section.splitlines():
        entry = re.match(r"^ {4}(\w+(?: / \w+)*): (.*)$", line)
        if entry:
            names = entry.group(1).split(" / ")
            helps.update({n: entry.group(2).strip() for n in names})
        elif names and line.startswith(" " * 8):
            helps.update({n: f"{helps[n]} {line.strip()}" for n in names})
        else:
            names = []
    # plain text for --help: ``x`` -> x, :class:`~a.B` -> B; '%' is argparse's format character
    return {n: re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", h.replace("``", "")).replace("%", "%%")
            for n, h in helps.items()}


def _argument_type(hint: Any) -> Any:
    """A mapping field also accepts its YAML/JSON text (``--layer_bits '{"fc": 8}'``); a bool-or-"auto" field
    (``bias_correction``) is read as text and converted in ``to_quant_config``."""
    parts = typing.get_args(hint) or (hint,)
    if any(p is dict or typing.get_origin(p) in (dict, typing.Mapping) for p in parts):
        return Optional[Union[dict, str]]
    if bool in parts and str in parts:
        return str
    return hint


def _bool_or_auto(name: str, value: Any) -> Any:
    """``value`` of a bool-or-"auto" field: a bool, ``"auto"``, or text meaning a bool (true/false, yes/no, 1/0)."""
    if isinstance(value, bool) or value == "auto":
        return value
    try:
        return string_to_bool(value)
    except (ArgumentTypeError, AttributeError):
        raise RecipeError(f"{name} must be true, false or auto; got {value!r}") from None


#: quantization fields that are not :class:`QuantConfig` arguments: how the run chooses ``layer_bits`` itself
LAYER_CHOICE_FIELDS = [
    ("layer_bits_budget", Optional[float], field(default=None, metadata={"help": (
        "Mixed precision by measurement: before training, rank every quantized layer by how far the teacher's output "
        "moves when only that layer's weights are quantized (on the calibration batches), and keep the most sensitive "
        "layers' weights at sensitive_layer_bits while their weight elements stay within this share of all quantized "
        "weight elements (a fraction in (0, 1), e.g. 0.02). Added after layer_bits (your own patterns win); the "
        "choice is printed, stored in the run record and the model config, and reused on resume. Default: off.")})),
    ("sensitive_layer_bits", int, field(default=8, metadata={"help": (
        "Weight bit-width (1..8) of the layers layer_bits_budget chooses.")})),
]


class _QuantArgumentsMethods:
    def __post_init__(self) -> None:
        budget, bits = self.layer_bits_budget, self.sensitive_layer_bits
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget < 1):
            raise RecipeError(f"layer_bits_budget is a share of the quantized weight elements, in (0, 1) (e.g. 0.02); "
                              f"got {budget!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise RecipeError(f"sensitive_layer_bits must be an integer in 1..8; got {bits!r}")

    def to_quant_config(self) -> QuantConfig:
        """The :class:`QuantConfig`; an invalid value raises :class:`RecipeError` naming the field."""
        choice = {name for name, _, _ in LAYER_CHOICE_FIELDS}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in choice}
        values["bias_correction"] = _bool_or_auto("bias_correction", values["bias_correction"])
        if isinstance(values.get("layer_bits"), str):
            import yaml

            try:
                values["layer_bits"] = yaml.safe_load(values["layer_bits"])
            except yaml.YAMLError as err:
                raise RecipeError(f"layer_bits: {values['layer_bits']!r} is not valid YAML/JSON "
                                  f"({getattr(err, 'problem', None) or err})") from None
        try:
            return QuantConfig(**values)
        except ValueError as err:
            raise RecipeError(f"invalid quantization setting: {err}") from None


def _quant_arguments() -> type:
    hints = typing.get_type_hints(QuantConfig.__init__)
    helps = _docstring_args(QuantConfig)
    fields = [
        (name, _argument_type(hints[name]), field(default=param.default, metadata={"help": helps.get(name, "")}))
        for name, param in inspect.signature(QuantConfig.__init__).parameters.items()
        if param.kind is param.POSITIONAL_OR_KEYWORD and name != "self" and name not in STORAGE_FIELDS
    ] + LAYER_CHOICE_FIELDS
    return dataclasses.make_dataclass(
        "QuantArguments", fields, bases=(_QuantArgumentsMethods,),
        namespace={"__module__": __name__,
                   "__doc__": "The :class:`~sqakd_hf.QuantConfig` of the student (its arguments, names and defaults), "
                              "and how the run may choose layer_bits by measured sensitivity."},
    )


#: the student's :class:`~sqakd_hf.QuantConfig` arguments (method, weight_bits, act_bits, ...) as a dataclass
QuantArguments = _quant_arguments()


@dataclass
class RunArguments:
    """What the ``train`` command does around the Trainer."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds another run."}
    )
    save_packed: bool = field(
        default=True, metadata={"help": "Also write the packed low-bit model (+ model card) to output_dir/packed."}
    )
    packed_fp_dtype: str = field(
        default="float16",
        metadata={"help": f"dtype of the full-precision head in the packed model: {', '.join(PACKED_FP_DTYPES)}."},
    )
    eval_teacher: bool = field(
        default=True, metadata={"help": "Also report the teacher's accuracy on the eval split (for the comparison "
                                        "and the model card)."}
    )
    hub_format: str = field(
        default="packed",
        metadata={"help": "What push_to_hub uploads: packed (our packed form, loads with import sqakd_hf), "
                          "compressed-tensors (plain transformers and vLLM; transformers models with per_tensor, "
                          "per_token_absmax or no activation quantization) or onnx (a QDQ graph for onnxruntime, with config and tokenizer)."},
    )

    def __post_init__(self) -> None:
        if self.hub_format not in HUB_FORMATS:
            raise RecipeError(f"hub_format must be one of {', '.join(HUB_FORMATS)}; got {self.hub_format!r}")
        if self.packed_fp_dtype not in PACKED_FP_DTYPES:
            raise RecipeError(f"packed_fp_dtype must be {', '.join(PACKED_FP_DTYPES[:-1])} or {PACKED_FP_DTYPES[-1]}; "
                              f"got {self.packed_fp_dtype!r}")


@dataclass
class EvalArguments:
    """What ``sqakd-hf eval`` evaluates."""

    model_path: Optional[str] = field(
        default=None, metadata={"help": "Saved quantized model (training or packed form); default: the recipe's "
                                        "output_dir. Its run record (sqakd_run.json) supplies the teacher, the data "
                                        "sources, max_length and columns of the run, unless given here."})
    batch_size: int = field(default=64, metadata={"help": "Evaluation batch size."})
    temperature: float = field(default=4.0, metadata={"help": "Temperature of the reported KD loss."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Also write the metrics to this JSON file."})
    device: Optional[str] = field(default=None, metadata={"help": "torch device (default: cuda if available)."})

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RecipeError(f"batch_size must be an integer >= 1; got {self.batch_size!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise RecipeError(f"temperature must be a finite number > 0; got {t!r}")
