"""Recipes: a flat YAML mapping of argument values plus ``--key value`` overrides, parsed by
transformers' ``HfArgumentParser`` (as TRL's ``TrlParser`` does).

The file's values become the parser's defaults, the command line overrides them, and
``parse_args_into_dataclasses`` builds :class:`ModelArguments`, :class:`DataArguments`,
:class:`QuantArguments`, :class:`RunArguments` and :class:`~sqakd_hf.SQAKDTrainingArguments`.
:class:`RecipeParser` adds only what ``HfArgumentParser`` lacks: errors as one-line
:class:`RecipeError` s naming the key (unknown keys with a did-you-mean and the valid keys),
``--no_<flag>`` for every boolean, ``null`` for optional fields, YAML/JSON text for mapping and
list fields, and YAML's unquoted ``no`` (read as false) for ``save_strategy: no``-style fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from transformers import HfArgumentParser

from ..errors import InputError, RecipeError
from ..training.args import SQAKDTrainingArguments
from .arguments import (
    LIBRARIES,
    TASKS,
    DataArguments,
    EvalArguments,
    ModelArguments,
    QuantArguments,
    RunArguments,
)

__all__ = [
    "InputError",
    "RecipeError",
    "ModelArguments",
    "DataArguments",
    "QuantArguments",
    "RunArguments",
    "EvalArguments",
    "Recipe",
    "RecipeParser",
    "ARGUMENT_GROUPS",
    "EVAL_GROUPS",
    "LIBRARIES",
    "TASKS",
    "parse_recipe",
    "parse_eval_recipe",
    "parse_overrides",
    "runtime_defaults",
    "read_recipe_file",
    "valid_keys_message",
    "format_recipe_help",
]

Groups = Sequence[Tuple[str, type]]

#: (group name, dataclass) in parsing order
ARGUMENT_GROUPS: Tuple[Tuple[str, type], ...] = (
    ("model", ModelArguments),
    ("data", DataArguments),
    ("quantization", QuantArguments),
    ("run", RunArguments),
    ("training", SQAKDTrainingArguments),
)
#: the groups of ``sqakd-hf eval``
EVAL_GROUPS: Tuple[Tuple[str, type], ...] = (("eval", EvalArguments), ("model", ModelArguments), ("data", DataArguments))
#: recipe keys the eval command reads under another name
_EVAL_FROM_RECIPE = {"output_dir": "model_path", "per_device_eval_batch_size": "batch_size"}
#: recipe groups that define what a run produces (a resume must keep them)
IDENTITY_GROUPS = ("model", "data", "quantization")
_NULL = ("null", "~")


@dataclass
class Recipe:
    """A parsed recipe: one instance of each argument group, plus the values it set and where it came from."""

    model: ModelArguments
    data: DataArguments
    quant: QuantArguments
    run: RunArguments
    training: SQAKDTrainingArguments
    #: every key the recipe file, the overrides or the runtime defaults set, with its parsed value
    values: Dict[str, Any]
    source: Optional[Path] = None

    def record(self) -> Dict[str, Any]:
        """What identifies the run (saved as ``sqakd_run.json``): the merged recipe values."""
        return dict(sorted(self.values.items()))

    def identity(self) -> Dict[str, Any]:
        """The values that define what the run produces (model, data and quantization settings)."""
        return identity_of(self.values)


def identity_of(values: Mapping[str, Any]) -> Dict[str, Any]:
    """The model/data/quantization entries of recipe ``values`` (e.g. those of a saved run record)."""
    keys = {f.name for name, cls in ARGUMENT_GROUPS if name in IDENTITY_GROUPS for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in keys}


# ---- the parser --------------------------------------------------------------------------------------
def field_types(groups: Groups) -> Dict[str, Any]:
    """``{field: type hint}`` of every init field of ``groups`` (first group wins)."""
    found: Dict[str, Any] = {}
    for _, cls in groups:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                found.setdefault(f.name, hints.get(f.name, f.type))
    return found


def _is_optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _accepts_mapping(tp: Any) -> bool:
    return any(a is dict or typing.get_origin(a) is dict for a in (tp, *typing.get_args(tp)))


def _converter(convert: Callable[[str], Any], name: str, null: bool, mapping: bool) -> Callable[[str], Any]:
    """``convert`` plus ``null`` -> None (optional fields) and YAML/JSON ``{...}`` text (mapping fields)."""

    def parse(text: str) -> Any:
        if null and text.strip().lower() in _NULL:
            return None
        if mapping and text.strip().startswith("{"):
            import yaml

            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise argparse.ArgumentTypeError(f"{text!r} is not valid YAML/JSON ({yaml_problem(err)})") from None
        return convert(text)

    parse.__name__ = name  # argparse's "invalid <name> value" message
    return parse


class RecipeParser(HfArgumentParser):
    """``HfArgumentParser`` over argument groups whose errors are one-line :class:`RecipeError` s.

    :meth:`set_recipe_defaults` makes recipe values the defaults (checking their keys), and
    :meth:`parse` applies ``--key value`` overrides and builds the dataclasses.
    """

    def __init__(self, groups: Groups = ARGUMENT_GROUPS) -> None:
        self.groups = tuple(groups)
        super().__init__([cls for _, cls in self.groups], allow_abbrev=False, add_help=False)
        self.types = field_types(self.groups)
        self._recipe_keys: Set[str] = set()
        for action in list(self._actions):
            tp = self.types.get(action.dest)
            if tp is not None and action.type is not None:
                name = getattr(action.type, "__name__", "value").replace("string_to_bool", "bool")
                action.type = _converter(action.type, name, _is_optional(tp), _accepts_mapping(tp))
        for name, tp in self.types.items():  # --no_<flag> for every boolean (HfArgumentParser: default-True ones)
            negative = f"--no_{name}"
            if bool in (tp, *typing.get_args(tp)) and negative not in self._option_string_actions:
                self.add_argument(negative, f"--no-{name.replace('_', '-')}", action="store_false", dest=name,
                                  default=argparse.SUPPRESS)

    # ---- errors ----
    def error(self, message: str) -> typing.NoReturn:
        found = re.match(r"argument (--[\w-]+)(?:/\S+)*: (.*)", message, re.S)
        if not found:
            raise RecipeError(message)
        key, why = found.group(1)[2:].replace("-", "_"), found.group(2)
        if why.startswith("expected"):
            raise RecipeError(f"--{key} needs a value")
        bad = re.match(r"invalid (\w+) value: (.*)", why, re.S)
        raise RecipeError(f"{key}: cannot read {bad.group(2)} as {bad.group(1)}" if bad else f"{key}: {why}")

    def check_keys(self, keys: Iterable[str], where: str, groups: Optional[Groups] = None) -> None:
        """Raise :class:`RecipeError` for keys that are no field (did-you-mean, then the valid keys)."""
        groups = groups or self.groups
        valid = list(field_types(groups))
        unknown = [str(k) for k in keys if k not in valid]
        if unknown:
            parts = []
            for k in unknown:
                close = difflib.get_close_matches(k, valid, n=1)
                parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise RecipeError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(parts)} in {where}.\n"
                              + valid_keys_message(groups))

    def _explain_leftovers(self, tokens: List[str], leftovers: List[str]) -> RecipeError:
        first = leftovers[0]
        if first.startswith("--"):
            key = first[2:].partition("=")[0].replace("-", "_")
            try:
                self.check_keys([key], "the command-line overrides")
            except RecipeError as err:
                return err
        flag, values = None, []
        for tok in tokens + ["--"]:  # find the option that got more values than it takes
            if not tok.startswith("--"):
                values.append(tok)
                continue
            if flag is None and values:
                break
            action = self._option_string_actions.get((flag or "").partition("=")[0])
            if action is not None and action.nargs != "+" and len(values) > (0 if "=" in flag else 1):
                return RecipeError(f"--{action.dest} takes one value; got {values}")
            flag, values = tok, []
        return RecipeError(f"unexpected argument {first!r}: overrides are written --key value")

    # ---- parsing ----
    def set_recipe_defaults(self, values: Mapping[str, Any], where: str) -> None:
        """Make ``values`` (from a recipe file or a mapping) the defaults of their fields."""
        self.check_keys(values, where)
        defaults = {}
        for key, value in values.items():
            action = self._option_string_actions[f"--{key}"]
            if value is False and action.choices and "no" in action.choices:
                value = "no"  # YAML 1.1 reads an unquoted `no` (save_strategy: no) as false
            elif action.nargs == "+" and value is not None and not isinstance(value, (list, tuple)):
                value = [value]
            defaults[key] = value
        self.set_defaults(**defaults)
        self._recipe_keys.update(values)

    def parse(self, overrides: Sequence[str] = (), what: str = "arguments") -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """``(dataclass instances, {key: value} of every key set by the defaults or the overrides)``; a value
        a dataclass rejects raises ``RecipeError("invalid <what>: ...")``."""
        tokens = [str(t) for t in overrides]
        try:
            *instances, leftovers = self.parse_args_into_dataclasses(
                args=tokens, return_remaining_strings=True, look_for_args_file=False)
        except RecipeError:
            raise
        except (ValueError, TypeError) as err:
            raise RecipeError(f"invalid {what}: {err}") from None
        if leftovers:
            raise self._explain_leftovers(tokens, leftovers)
        named = set(self._recipe_keys)
        for tok in tokens:
            action = self._option_string_actions.get(tok.partition("=")[0]) if tok.startswith("--") else None
            if action is not None:
                named.add(action.dest)
        owner = {f.name: obj for obj in instances for f in dataclasses.fields(obj)}
        values = {k: _plain(getattr(owner[k], k)) for k in sorted(named)}
        return tuple(instances), values

    def parse_known_args(self, args=None, namespace=None):
        """argparse's parsing, plus a list field given as one YAML list (``--modules_to_not_convert '[]'``)."""
        namespace, leftovers = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(namespace, action.dest, None)
            if action.nargs == "+" and isinstance(value, list) and len(value) == 1 and str(value[0]).startswith("["):
                setattr(namespace, action.dest, _yaml_list(action.dest, str(value[0])))
        return namespace, leftovers


def yaml_problem(err: Exception) -> str:
    """A YAML error in one line: what is wrong and where (``"expected ',' or ']' at line 1, column 3"``)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _yaml_list(key: str, text: str) -> List[Any]:
    """``--key '[a, b]'``: the YAML/JSON list; malformed text raises :class:`RecipeError` naming the key."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{key}: {text!r} is not a valid YAML/JSON list ({yaml_problem(err)}); write it like "
                          f"--{key} '[\"pattern\", \"other\"]' or --{key} pattern other") from None
    if not isinstance(value, list):
        raise RecipeError(f"{key}: {text!r} is not a list; write it like --{key} '[\"pattern\"]'")
    return value


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


# ---- entry points ------------------------------------------------------------------------------------
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
        raise RecipeError(f"recipe {path} is not valid YAML: {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of key: value; got a {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


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
    mapping) and build every argument group; ``defaults`` fill keys that neither sets (the CLI passes
    :func:`runtime_defaults`). Raises :class:`RecipeError` on unknown keys (listing the valid ones),
    unreadable values, or values the dataclasses reject."""
    parser = RecipeParser()
    if defaults:
        parser.set_recipe_defaults(defaults, "the runtime defaults")
    if path is not None:
        parser.set_recipe_defaults(read_recipe_file(path), f"recipe {path}")
    tokens: Sequence[str] = ()
    if isinstance(overrides, Mapping):
        parser.set_recipe_defaults(overrides, "the overrides")
    elif overrides:
        tokens = overrides
    (model, data, quant, run, training), values = parser.parse(tokens, f"recipe {path}" if path else "recipe")
    return Recipe(model, data, quant, run, training, values, Path(path) if path is not None else None)


def parse_overrides(tokens: Sequence[str], groups: Groups = ARGUMENT_GROUPS) -> Dict[str, Any]:
    """The values that ``--key value`` tokens set, e.g. ``["--learning_rate", "1e-4", "--no_save_packed"]``
    -> ``{"learning_rate": 0.0001, "save_packed": False}``."""
    return RecipeParser(groups).parse(tokens)[1]


def parse_eval_recipe(path: Optional[Union[str, os.PathLike]], overrides: Sequence[str],
                      base: Optional[Mapping[str, Any]] = None
                      ) -> Tuple[EvalArguments, ModelArguments, DataArguments, Set[str]]:
    """``sqakd-hf eval``'s arguments and the keys the user set: ``base`` (e.g. what a run record says), then the
    recipe's model and data (its ``output_dir`` as ``model_path``, its eval batch size and temperature), then the
    overrides."""
    parser = RecipeParser(EVAL_GROUPS)
    if base:
        parser.set_recipe_defaults({k: v for k, v in base.items() if k in parser.types}, "the run record")
    given: Set[str] = set()
    if path is not None:
        values = read_recipe_file(path)
        parser.check_keys(values, f"recipe {path}", ARGUMENT_GROUPS)
        renamed = {_EVAL_FROM_RECIPE.get(k, k): v for k, v in values.items()}
        renamed = {k: v for k, v in renamed.items() if k in parser.types}
        parser.set_recipe_defaults(renamed, f"recipe {path}")
        given.update(renamed)
    (eval_args, model, data), _ = parser.parse(overrides, "eval arguments")
    for token in overrides:
        action = parser._option_string_actions.get(str(token).partition("=")[0])
        if action is not None:
            given.add(action.dest)
    return eval_args, model, data, given


# ---- help --------------------------------------------------------------------------------------------
def valid_keys_message(groups: Groups = ARGUMENT_GROUPS) -> str:
    lines = []
    for name, cls in groups:
        keys = [f.name for f in dataclasses.fields(cls) if f.init]
        lines.append(f"  {name} ({cls.__name__}): {', '.join(keys)}")
    return "Valid keys:\n" + "\n".join(lines)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def format_recipe_help(groups: Groups = ARGUMENT_GROUPS) -> str:
    """Every recipe key with its type, default and help, by group."""
    types = field_types(groups)
    lines: List[str] = []
    for name, cls in groups:
        lines.append(f"\n{name} ({cls.__name__}):")
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = _plain(f.default)
            else:
                default = "(required)" if f.default_factory is dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{f.name} ({_type_name(types[f.name])}, default {default!r})")
            help_text = " ".join(str(f.metadata.get("help", "")).replace("%%", "%").split())
            if help_text:
                lines.append(f"      {help_text}")
    return "\n".join(lines)
