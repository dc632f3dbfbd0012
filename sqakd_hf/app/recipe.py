"""Recipe arguments: HF-style dataclasses read from a YAML recipe plus ``--key value`` overrides.

A recipe is one flat YAML mapping whose keys are the fields of :class:`ModelArguments`,
:class:`DataArguments`, :class:`QuantArguments`, :class:`RunArguments` and
:class:`~sqakd_hf.SQAKDTrainingArguments` (``output_dir``, ``learning_rate``, ...).
:func:`parse_recipe` merges the file with command-line overrides and builds all five with
``HfArgumentParser.parse_dict``; an unknown key, a value of the wrong type or an invalid
value raises :class:`RecipeError` naming the key (and, for unknown keys, the valid ones).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..config import QuantConfig
from ..errors import InputError, RecipeError
from ..quantizers import METHODS
from ..training.args import SQAKDTrainingArguments

__all__ = [
    "InputError",
    "RecipeError",
    "ModelArguments",
    "DataArguments",
    "QuantArguments",
    "RunArguments",
    "Recipe",
    "ARGUMENT_GROUPS",
    "LIBRARIES",
    "TASKS",
    "recipe_parser",
    "parse_recipe",
    "runtime_defaults",
    "read_recipe_file",
    "parse_overrides",
    "valid_keys_message",
    "format_recipe_help",
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
                          "timm for timm-layout folders and 'hf-hub:' / 'timm/' ids, transformers otherwise.",
                  "choices": list(LIBRARIES)},
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
    train_split: str = field(
        default="train", metadata={"help": "Training split; slices allowed (e.g. 'train[:90%]')."}
    )
    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "Optional evaluation split (e.g. 'validation', 'test', 'train[90%:]'). Labeled or not: "
                          "evaluation reports KD loss and teacher agreement, plus accuracy when labels exist."},
    )
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


@dataclass
class QuantArguments:
    """The :class:`~sqakd_hf.QuantConfig` of the student (same names and meanings)."""

    method: str = field(default="lsq", metadata={"help": f"Quantizer family: {', '.join(METHODS)}."})
    weight_bits: int = field(default=4, metadata={"help": "Weight bits: 1..8, or 32 for full precision."})
    act_bits: int = field(default=4, metadata={"help": "Activation bits: 1..8, or 32 for full precision."})
    weight_granularity: str = field(
        default="per_channel", metadata={"help": "'per_channel' or 'per_tensor' weight steps."}
    )
    ewgs_delta: float = field(default=1e-3, metadata={"help": "EWGS gradient-scaling factor (EWGS only)."})
    modules_to_not_convert: Optional[List[str]] = field(
        default=None,
        metadata={"help": "Regular expressions of layers kept full precision (default: first layer and classifier "
                          "head; [] quantizes everything)."},
    )
    layer_bits: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "Mixed precision: {pattern: bits} or {pattern: {weight_bits, act_bits}}."}
    )

    def to_quant_config(self) -> QuantConfig:
        """The :class:`QuantConfig`; invalid values raise :class:`RecipeError` naming the field."""
        layer_bits = self.layer_bits
        if isinstance(layer_bits, str):
            import yaml

            layer_bits = yaml.safe_load(layer_bits)
        try:
            return QuantConfig(
                method=self.method, weight_bits=self.weight_bits, act_bits=self.act_bits,
                weight_granularity=self.weight_granularity, ewgs_delta=self.ewgs_delta,
                modules_to_not_convert=self.modules_to_not_convert, layer_bits=layer_bits,
            )
        except ValueError as err:
            raise RecipeError(f"invalid quantization setting: {err}") from None


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
        metadata={"help": "dtype of the full-precision head in the packed model: float16, bfloat16, float32."},
    )
    eval_teacher: bool = field(
        default=True, metadata={"help": "Also evaluate the teacher on the eval split (for the comparison/model card)."}
    )

    def __post_init__(self) -> None:
        if self.packed_fp_dtype not in ("float16", "bfloat16", "float32"):
            raise RecipeError(f"packed_fp_dtype must be float16, bfloat16 or float32; got {self.packed_fp_dtype!r}")


#: (group name, dataclass) in parsing order
ARGUMENT_GROUPS: Tuple[Tuple[str, type], ...] = (
    ("model", ModelArguments),
    ("data", DataArguments),
    ("quantization", QuantArguments),
    ("run", RunArguments),
    ("training", SQAKDTrainingArguments),
)


@dataclass
class Recipe:
    """A parsed recipe: one instance of each argument group, plus where it came from."""

    model: ModelArguments
    data: DataArguments
    quant: QuantArguments
    run: RunArguments
    training: SQAKDTrainingArguments
    values: Dict[str, Any]
    source: Optional[Path] = None

    def record(self) -> Dict[str, Any]:
        """What identifies the run (saved as ``sqakd_run.json``): the merged recipe values."""
        return {k: v for k, v in sorted(self.values.items())}


# ---- parsing ------------------------------------------------------------------------------------------
def recipe_parser(groups: Sequence[Tuple[str, type]] = ARGUMENT_GROUPS) -> HfArgumentParser:
    return HfArgumentParser([cls for _, cls in groups])


def _field_types(groups: Sequence[Tuple[str, type]]) -> Dict[str, Any]:
    types: Dict[str, Any] = {}
    for _, cls in groups:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # pragma: no cover - unresolvable annotations
            hints = {}
        for f in dataclasses.fields(cls):
            if f.init:
                types.setdefault(f.name, hints.get(f.name, f.type))
    return types


def _base_type(tp: Any) -> Any:
    """``Optional[X]`` -> X; unions with several real types -> the union itself."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, getattr(__import__("types"), "UnionType", Union)) and len(args) == 1:
        return args[0]
    return tp


def _accepts_mapping(tp: Any) -> bool:
    tp = _base_type(tp)
    if tp is dict or typing.get_origin(tp) is dict:
        return True
    return any(a is dict or typing.get_origin(a) is dict for a in typing.get_args(tp))


def _is_list(tp: Any) -> bool:
    tp = _base_type(tp)
    return tp is list or typing.get_origin(tp) in (list, List)


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def format_recipe_help(groups: Sequence[Tuple[str, type]] = ARGUMENT_GROUPS) -> str:
    """Every recipe key with its type, default and help, by group."""
    types = _field_types(groups)
    lines: List[str] = []
    for name, cls in groups:
        lines.append(f"\n{name} ({cls.__name__}):")
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            tp = _base_type(types.get(f.name, f.type))
            tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            default = f.default if f.default is not dataclasses.MISSING else (
                "(required)" if f.default_factory is dataclasses.MISSING else f.default_factory())
            default = getattr(default, "value", default)
            help_text = " ".join(str(f.metadata.get("help", "")).split())
            lines.append(f"  --{f.name} ({tname}, default {default!r})")
            if help_text:
                lines.append(f"      {help_text}")
    return "\n".join(lines)


def valid_keys_message(groups: Sequence[Tuple[str, type]] = ARGUMENT_GROUPS) -> str:
    lines = []
    for name, cls in groups:
        keys = [f.name for f in dataclasses.fields(cls) if f.init]
        lines.append(f"  {name} ({cls.__name__}): {', '.join(keys)}")
    return "Valid keys:\n" + "\n".join(lines)


def _check_keys(keys: Sequence[str], where: str, groups: Sequence[Tuple[str, type]]) -> None:
    valid = list(_field_types(groups))
    unknown = [k for k in keys if k not in valid]
    if not unknown:
        return
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), valid, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise RecipeError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(parts)} in {where}.\n"
                      + valid_keys_message(groups))


def _has_no_choice(tp: Any) -> bool:
    """Strategy fields (an Enum with the value "no", e.g. SaveStrategy)."""
    from enum import Enum

    return any(isinstance(a, type) and issubclass(a, Enum) and "no" in {m.value for m in a}
               for a in typing.get_args(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """YAML/CLI value -> the field's type where the field is a plain scalar (YAML reads ``1e-3`` as a string)."""
    base = _base_type(tp)
    if value is False and _has_no_choice(tp):
        return "no"  # YAML 1.1 reads an unquoted `no` (save_strategy: no) as false
    if isinstance(value, str):
        if value.lower() in ("null", "~") and _optional(tp):
            return None
        try:
            if base is bool:
                return string_to_bool(value)
            if base is int:
                return int(value)
            if base is float:
                return float(value)
        except (ValueError, TypeError):
            raise RecipeError(f"{key}: cannot read {value!r} as {base.__name__}") from None
        if _accepts_mapping(tp) and value.strip().startswith("{"):
            import yaml

            return yaml.safe_load(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if _is_list(tp) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    return value


def read_recipe_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The recipe's mapping; a missing file or a file that is not a YAML mapping raises :class:`RecipeError`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist" if not path.exists()
                          else f"recipe {str(path)!r} is not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of key: value; got a {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def parse_overrides(tokens: Sequence[str], groups: Sequence[Tuple[str, type]] = ARGUMENT_GROUPS) -> Dict[str, Any]:
    """``["--learning_rate", "1e-4", "--do_eval", "--modules_to_not_convert", "a", "b"]`` -> a dict.

    ``--key=value`` works too; a bare boolean flag means true, ``--no_key`` false; list fields take
    several values; mapping fields take YAML/JSON (``--layer_bits '{"fc": 8}'``).
    """
    types = _field_types(groups)
    out: Dict[str, Any] = {}
    i = 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise RecipeError(f"unexpected argument {tok!r}: overrides are written --key value")
        key, eq, inline = tok[2:].partition("=")
        key = key.replace("-", "_")
        values: List[str] = [inline] if eq else []
        i += 1
        if not eq:
            while i < len(tokens) and not (tokens[i].startswith("--") and len(tokens[i]) > 2):
                values.append(tokens[i])
                i += 1
        if key not in types and key.startswith("no_") and _base_type(types.get(key[3:])) is bool and not values:
            out[key[3:]] = False
            continue
        _check_keys([key], "the command-line overrides", groups)
        tp = types[key]
        if not values:
            if _base_type(tp) is bool:
                out[key] = True
                continue
            raise RecipeError(f"--{key} needs a value")
        if _is_list(tp):
            if len(values) == 1 and values[0].strip().startswith("["):
                import yaml

                out[key] = yaml.safe_load(values[0])
            else:
                out[key] = values
            continue
        if len(values) > 1:
            raise RecipeError(f"--{key} takes one value; got {values}")
        value = values[0]
        if _accepts_mapping(tp) or _base_type(tp) is Any:
            import yaml

            try:
                value = yaml.safe_load(value) if value.strip()[:1] in "{[" else value
            except yaml.YAMLError as err:
                raise RecipeError(f"--{key}: {value!r} is not valid YAML/JSON: {err}") from None
        out[key] = _coerce(key, value, tp)
    return out


def runtime_defaults() -> Dict[str, Any]:
    """Training defaults that depend on the machine, applied unless the recipe sets them: without a
    GPU, ``use_cpu`` (so a 2-process launch is CPU DDP) and, under a launcher, the gloo backend.
    They must be known when ``TrainingArguments`` is built (it sets up its devices then)."""
    import torch

    if torch.cuda.is_available():
        return {}
    defaults: Dict[str, Any] = {"use_cpu": True}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        defaults["ddp_backend"] = "gloo"
    return defaults


def parse_recipe(
    path: Optional[Union[str, os.PathLike]] = None,
    overrides: Union[Sequence[str], Mapping[str, Any], None] = None,
    defaults: Optional[Mapping[str, Any]] = None,
) -> Recipe:
    """Read the YAML recipe at ``path`` (optional), apply ``overrides`` (``--key value`` tokens or a
    mapping), and build every argument group; ``defaults`` fill keys that neither sets (the CLI passes
    :func:`runtime_defaults`). Raises :class:`RecipeError` on unknown keys (listing the valid ones),
    uncoercible values, or values the dataclasses reject."""
    groups = ARGUMENT_GROUPS
    values: Dict[str, Any] = {}
    if path is not None:
        values = read_recipe_file(path)
        _check_keys(list(values), f"recipe {path}", groups)
    if overrides:
        if isinstance(overrides, Mapping):
            _check_keys(list(overrides), "the overrides", groups)
            extra = dict(overrides)
        else:
            extra = parse_overrides(overrides, groups)
        values.update(extra)
    for k, v in (defaults or {}).items():
        values.setdefault(k, v)
    types = _field_types(groups)
    values = {k: _coerce(k, v, types[k]) for k, v in values.items()}
    try:
        model, data, quant, run, training = recipe_parser(groups).parse_dict(values)
    except RecipeError:
        raise
    except (ValueError, TypeError) as err:
        raise RecipeError(f"invalid recipe{f' {path}' if path else ''}: {err}") from None
    return Recipe(model, data, quant, run, training, values, Path(path) if path is not None else None)
