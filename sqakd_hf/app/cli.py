"""The ``sqakd-hf`` command (also ``python -m sqakd_hf``): parsing and dispatch only.

    sqakd-hf train RECIPE.yaml [--key value ...]     label-free QAT of a teacher checkpoint
    sqakd-hf ptq RECIPE.yaml [--key value ...]       calibration only (post-training quantization), same outputs
    sqakd-hf eval [RECIPE.yaml] [--model_path DIR] [--key value ...]
    sqakd-hf export MODEL_DIR --format compressed-tensors|onnx --output PATH   deploy formats
    sqakd-hf quickstart [--output_dir DIR] [--method lsq] [--bits 4,2] [--epochs N] [--fast]

Bad input (recipe keys and values, files, dataset columns, model/data modality, the output
folder) is reported as one line on stderr with exit status 2, before any work starts. This
module imports no torch, transformers, datasets or timm: ``--help`` and ``--version`` are fast.
A command is one entry of :data:`COMMANDS`: a function ``(args, argv) -> exit status`` and its help.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, NoReturn, Optional, Sequence

from ..errors import InputError, RecipeError
from .distributed import is_main_process
from .runs import METRICS_FILE, PACKED_SUBDIR, RUN_RECORD

__all__ = ["main", "build_parser", "Command", "COMMANDS", "METRICS_FILE", "PACKED_SUBDIR", "RUN_RECORD"]

DESCRIPTION = "Label-free quantization-aware training (SQAKD) of timm and transformers checkpoints."
EPILOG = """`sqakd-hf <command> --help` lists a command's options. Runs under `accelerate launch` unchanged, e.g.
  accelerate launch --multi_gpu --num_processes 2 -m sqakd_hf train recipes/quickstart.yaml"""
TRAIN_USAGE = "sqakd-hf train RECIPE.yaml [--key value ...]"
PTQ_USAGE = "sqakd-hf ptq RECIPE.yaml [--key value ...]"
EVAL_USAGE = "sqakd-hf eval [RECIPE.yaml] [--model_path DIR] [--key value ...]"
EXPORT_USAGE = "sqakd-hf export MODEL_DIR --format {compressed-tensors,onnx} --output PATH [--overwrite]"


@dataclass(frozen=True)
class Command:
    """A subcommand: ``run(args, argv)`` returns the exit status; ``argv`` holds what argparse left (the recipe
    and its ``--key value`` overrides) when ``overrides``; ``configure`` adds argparse options otherwise."""

    help: str
    run: Callable[[argparse.Namespace, List[str]], int]
    usage: Optional[str] = None
    overrides: bool = True
    configure: Optional[Callable[[argparse.ArgumentParser], None]] = None
    description: Optional[str] = None


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are :class:`InputError` s (main prints them as one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        choice = "invalid choice: "
        if message.startswith("argument <command>: ") and choice in message:
            name = message.split(choice, 1)[1].split(" (choose", 1)[0]
            raise InputError(f"unknown command {name}; choose one of {', '.join(COMMANDS)} (sqakd-hf --help lists them)")
        raise InputError(message)


def _version() -> str:
    from ..version import __version__

    return f"sqakd-hf {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """``sqakd-hf`` with one subcommand per entry of :data:`COMMANDS`. Recipe commands take a recipe and
    ``--key value`` overrides, parsed by :mod:`sqakd_hf.app.recipe` (their ``--help`` lists every key)."""
    parser = _Parser(prog="sqakd-hf", usage="sqakd-hf <command> [options]", description=DESCRIPTION,
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(title="commands", dest="command", metavar="<command>", prog="sqakd-hf")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, usage=command.usage, add_help=not command.overrides,
                                  description=command.description)
        sub.set_defaults(run=command.run, overrides=command.overrides)
        if command.configure is not None:
            command.configure(sub)
    return parser


def _quickstart_options(quick: argparse.ArgumentParser) -> None:
    quick.add_argument("--output_dir", default=None, help="where the teacher, the students and the results go "
                                                          "(default ./sqakd-quickstart)")
    quick.add_argument("--method", default="lsq", help="quantizer: lsq, pact, dorefa, ewgs, minmax")
    quick.add_argument("--bits", default="4,2",
                       help="comma-separated bit-widths, each used for weights and activations (default 4,2)")
    quick.add_argument("--epochs", type=int, default=None, help="SQAKD epochs per student")
    quick.add_argument("--teacher_epochs", type=int, default=None, help="epochs to train the teacher")
    quick.add_argument("--fast", action="store_true", help="a few steps only (for tests)")
    quick.add_argument("--overwrite_output_dir", action="store_true",
                       help="allow an output_dir that holds something other than an earlier quickstart")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--num_threads", type=int, default=1,
                       help="torch CPU threads (default 1: fastest for this tiny model on a shared CPU; 0 = torch's "
                            "default)")


def _export_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("model_dir", help="a run folder of train/ptq, its packed/ folder, or a saved quantized folder")
    sub.add_argument("--format", required=True, choices=("compressed-tensors", "onnx"),
                     help="compressed-tensors: a folder plain transformers (no sqakd_hf) and vLLM load; "
                          "onnx: one QDQ .onnx file for onnxruntime")
    sub.add_argument("--output", required=True, help="the folder (compressed-tensors) or .onnx file to write")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output")


# ---- commands (heavy imports happen here) ---------------------------------------------------------------
def _split_recipe(argv: List[str]):
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def _wants_help(argv: List[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _run_recipe(mode: str, usage: str, argv: List[str]) -> int:
    """``train`` / ``ptq``: parse the recipe and its overrides, then run it (the same code path for both)."""
    from .recipe import format_recipe_help, parse_recipe, runtime_defaults

    if not argv or _wants_help(argv):
        print(f"usage: {usage}\n\nRecipe keys (YAML) and overrides (--key value):")
        print(format_recipe_help())
        return 0 if argv else 2
    path, overrides = _split_recipe(argv)
    if path is None:
        raise RecipeError(f"{mode} needs a recipe: {usage}")
    from .train import run_train

    run_train(parse_recipe(path, overrides, defaults=runtime_defaults()), mode=mode)
    return 0


def _train(args: argparse.Namespace, argv: List[str]) -> int:
    return _run_recipe("train", TRAIN_USAGE, argv)


def _ptq(args: argparse.Namespace, argv: List[str]) -> int:
    return _run_recipe("ptq", PTQ_USAGE, argv)


def _eval(args: argparse.Namespace, argv: List[str]) -> int:
    from .recipe import EVAL_GROUPS, format_recipe_help, parse_eval_recipe

    if _wants_help(argv):
        print(f"usage: {EVAL_USAGE}\n")
        print(format_recipe_help(EVAL_GROUPS))
        return 0
    path, overrides = _split_recipe(argv)
    eval_args, model_args, data, given = parse_eval_recipe(path, overrides)
    from .evaluate import run_defaults, run_eval

    recorded = run_defaults(eval_args.model_path, given)
    if recorded:  # the run's own teacher, data and preprocessing, unless given
        eval_args, model_args, data, _ = parse_eval_recipe(path, overrides, base=recorded)
    from .report import eval_table

    metrics, source = run_eval(eval_args, model_args, data)
    print(f"\nEvaluation on {source.label}:")
    print(eval_table(metrics, eval_args.model_path))
    return 0


def _export(args: argparse.Namespace, argv: List[str]) -> int:
    from pathlib import Path

    from .export import run_export

    written = run_export(Path(args.model_dir), args.format, Path(args.output), overwrite=args.overwrite)
    if is_main_process():
        print(f"wrote {args.format} to {written}")
    return 0


def _quickstart(args: argparse.Namespace, argv: List[str]) -> int:
    try:
        bits = [int(b) for b in str(args.bits).split(",") if b.strip()]
    except ValueError:
        raise RecipeError(f"--bits must be comma-separated integers like 4,2; got {args.bits!r}") from None
    from .quickstart import DEFAULT_OUTPUT_DIR, run_quickstart

    run_quickstart(output_dir=args.output_dir or DEFAULT_OUTPUT_DIR, method=args.method, bits=bits, epochs=args.epochs,
                   teacher_epochs=args.teacher_epochs, fast=args.fast, overwrite=args.overwrite_output_dir,
                   seed=args.seed, num_threads=args.num_threads)
    return 0


#: the subcommands, in the order ``--help`` lists them
COMMANDS: Dict[str, Command] = {
    "train": Command("quantize a teacher checkpoint by label-free distillation (SQAKD)", _train, TRAIN_USAGE),
    "ptq": Command("post-training quantization: calibrate the quantizers only (no training); same outputs as train",
                   _ptq, PTQ_USAGE),
    "eval": Command("evaluate a saved quantized model (and its teacher)", _eval, EVAL_USAGE),
    "export": Command(
        "write a saved quantized model as compressed-tensors or ONNX QDQ (loads without sqakd_hf)", _export,
        EXPORT_USAGE, overrides=False, configure=_export_options,
        description="Write a saved quantized model in a deploy format: compressed-tensors (plain transformers "
                    "from_pretrained, vLLM) or ONNX QDQ (onnxruntime). Grids the format cannot hold exactly "
                    "(e.g. per-token activations with a learned clip ratio) are refused with the fix."),
    "quickstart": Command(
        "offline demo on scikit-learn's digits", _quickstart, overrides=False, configure=_quickstart_options,
        description="Offline demo on scikit-learn's digits: trains a small timm teacher (the only step that uses "
                    "labels), then W4A4 / W2A2 students label-free with SQAKD, and compares them with PTQ."),
}


# ---- entry point ------------------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tools and tests replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    root = logging.getLogger("sqakd_hf")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if is_main_process() else logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``sqakd-hf``; returns the exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = f"sqakd-hf {argv[0]}" if argv and argv[0] in COMMANDS else "sqakd-hf"
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if rest and not args.overrides:
            raise InputError(f"unrecognized arguments: {' '.join(rest)}")
        _setup_logging()
        return args.run(args, rest)
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    except InputError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
