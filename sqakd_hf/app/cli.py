"""The ``sqakd-hf`` command (also ``python -m sqakd_hf``): parsing and dispatch only.

    sqakd-hf train RECIPE.yaml [--key value ...]     label-free QAT of a teacher checkpoint
    sqakd-hf eval [RECIPE.yaml] [--model_path DIR] [--key value ...]
    sqakd-hf quickstart [--output_dir DIR] [--method lsq] [--bits 4,2] [--epochs N] [--fast]

Bad input (recipe keys and values, files, dataset columns, model/data modality, the output
folder) is reported as one line on stderr with exit status 2, before any work starts. This
module imports no torch, transformers, datasets or timm: ``--help`` and ``--version`` are fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, NoReturn, Optional, Sequence

from ..errors import InputError, RecipeError
from .distributed import is_main_process
from .runs import METRICS_FILE, PACKED_SUBDIR, RUN_RECORD

__all__ = ["main", "build_parser", "METRICS_FILE", "PACKED_SUBDIR", "RUN_RECORD"]

DESCRIPTION = "Label-free quantization-aware training (SQAKD) of timm and transformers checkpoints."
EPILOG = """`sqakd-hf <command> --help` lists a command's options. Runs under `accelerate launch` unchanged, e.g.
  accelerate launch --multi_gpu --num_processes 2 -m sqakd_hf train recipes/quickstart.yaml"""
TRAIN_USAGE = "sqakd-hf train RECIPE.yaml [--key value ...]"
EVAL_USAGE = "sqakd-hf eval [RECIPE.yaml] [--model_path DIR] [--key value ...]"
COMMANDS = ("train", "eval", "quickstart")


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
    """``sqakd-hf`` with its ``train``, ``eval`` and ``quickstart`` subcommands. ``train`` and ``eval`` take a
    recipe and ``--key value`` overrides, parsed by :mod:`sqakd_hf.app.recipe` (their ``--help`` lists every key)."""
    parser = _Parser(prog="sqakd-hf", usage="sqakd-hf <command> [options]", description=DESCRIPTION,
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(title="commands", dest="command", metavar="<command>", prog="sqakd-hf")
    commands.add_parser("train", add_help=False, usage=TRAIN_USAGE,
                        help="quantize a teacher checkpoint by label-free distillation (SQAKD)"
                        ).set_defaults(run=_train, overrides=True)
    commands.add_parser("eval", add_help=False, usage=EVAL_USAGE,
                        help="evaluate a saved quantized model (and its teacher)").set_defaults(run=_eval, overrides=True)
    quick = commands.add_parser(
        "quickstart", help="offline demo on scikit-learn's digits",
        description="Offline demo on scikit-learn's digits: trains a small timm teacher (the only step that uses "
                    "labels), then W4A4 / W2A2 students label-free with SQAKD, and compares them with PTQ.")
    quick.set_defaults(run=_quickstart, overrides=False)
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
    return parser


# ---- commands (heavy imports happen here) ---------------------------------------------------------------
def _split_recipe(argv: List[str]):
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def _wants_help(argv: List[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _train(args: argparse.Namespace, argv: List[str]) -> int:
    from .recipe import format_recipe_help, parse_recipe, runtime_defaults

    if not argv or _wants_help(argv):
        print(f"usage: {TRAIN_USAGE}\n\nRecipe keys (YAML) and overrides (--key value):")
        print(format_recipe_help())
        return 0 if argv else 2
    path, overrides = _split_recipe(argv)
    if path is None:
        raise RecipeError(f"train needs a recipe: {TRAIN_USAGE}")
    from .train import run_train

    run_train(parse_recipe(path, overrides, defaults=runtime_defaults()))
    return 0


def _eval(args: argparse.Namespace, argv: List[str]) -> int:
    from .recipe import EVAL_GROUPS, format_recipe_help, parse_eval_recipe

    if _wants_help(argv):
        print(f"usage: {EVAL_USAGE}\n")
        print(format_recipe_help(EVAL_GROUPS))
        return 0
    eval_args, model_args, data = parse_eval_recipe(*_split_recipe(argv))
    from .evaluate import run_eval
    from .report import eval_table

    metrics = run_eval(eval_args, model_args, data)
    print(f"\nEvaluation on {data.dataset_name} ({data.eval_split}):")
    print(eval_table(metrics, eval_args.model_path))
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
