"""One command for the SQAKD benchmarks: quality (vision, text), cost and size.

    python -m bench --quick     # < 10 min on a shared 2-core CPU
    python -m bench             # full mode (see bench/results/results.md for its wall time)

Writes bench/results/results.{json,md} and PNG plots (``--out`` to change). Fixed seeds; every
comparison runs side by side in this one process. ``--threads`` defaults to 1: on a CPU shared
with other jobs, two intra-op threads ran the same step 3-30x slower than one (spin-waiting).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

SECTIONS = ("vision", "text", "cost", "size")
RESULTS = Path(__file__).parent / "results"
METHODS = ("lsq", "pact", "dorefa", "ewgs")


def presets(mode: str, seed: int) -> Dict[str, Any]:
    """Sizes of every section for ``quick`` / ``full`` / ``micro`` (a seconds-long smoke run)."""
    from .common import Budget
    from .quality_text import TextSetup
    from .quality_vision import VisionSetup

    if mode == "full":
        return {
            "vision": VisionSetup(32, 270, Budget(135, 64, 1e-3, seed=seed), METHODS,
                                  [(8, 8), (4, 4), (3, 3), (2, 2), (1, 2)]),
            "text": TextSetup(128, 0, 0, 222, 1e-4, Budget(60, 16, 5e-5, weight_decay=0.01, seed=seed),
                              [(8, 8), (4, 8), (4, 4)]),
            "cost": {"batch_size": 16, "seq_len": 128, "reps": 5},
            "size": [8, 4, 2, 1],
        }
    if mode == "quick":
        return {
            "vision": VisionSetup(16, 90, Budget(30, 64, 1e-3, seed=seed), METHODS, [(8, 8), (4, 4), (2, 2), (1, 4)]),
            "text": TextSetup(64, 320, 200, 40, 3e-4, Budget(12, 16, 5e-5, weight_decay=0.01, seed=seed),
                              [(8, 8), (4, 8)]),
            "cost": {"batch_size": 8, "seq_len": 128, "reps": 3},
            "size": [8, 4, 2, 1],
        }
    return {  # micro: mechanics only
        "vision": VisionSetup(8, 2, Budget(2, 32, 1e-3, calibration_batches=1, seed=seed), ("lsq",), [(4, 4)],
                              test_limit=64),
        "text": TextSetup(16, 40, 20, 2, 3e-4, Budget(2, 8, 5e-5, calibration_batches=1, seed=seed), [(8, 8)]),
        "cost": {"batch_size": 2, "seq_len": 16, "reps": 1},
        "size": [4],
    }


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short run (< 10 min on a 2-core CPU)")
    mode.add_argument("--micro", action="store_true", help="a seconds-long smoke run of the mechanics (for tests)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    ap.add_argument("--verbose", action="store_true", help="keep library logs and warnings")
    args = ap.parse_args(argv)
    args.mode = "quick" if args.quick else "micro" if args.micro else "full"
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: Optional[List[str]] = None, log: Callable[[str], None] = print) -> Path:
    args = parse(argv)
    if not args.verbose:  # before torch/transformers/torchao imports log their deprecation notices
        logging.getLogger("torch").setLevel(logging.ERROR)
    from . import common, cost, quality_text, quality_vision, report, size

    if not args.verbose:
        common.quiet()
    old_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        cfg = presets(args.mode, args.seed)
        argv_shown = sys.argv[1:] if argv is None else argv
        run: Dict[str, Any] = {"meta": {"command": " ".join(["python -m bench", *map(shlex.quote, argv_shown)]),
                                        "mode": args.mode, "date": common.now(), "machine": common.machine(),
                                        "seed": args.seed, "sections_s": {}}}
        t0 = time.perf_counter()
        jobs = {
            "vision": lambda: quality_vision.run(cfg["vision"], log),
            "text": lambda: quality_text.run(cfg["text"], log),
            "cost": lambda: cost.run(**cfg["cost"], mode=args.mode, log=log),
            "size": lambda: size.run(cfg["size"], log),
        }
        for name in SECTIONS:
            if name in args.sections:
                with common.Timer() as t:
                    run[name] = jobs[name]()
                run["meta"]["sections_s"][name] = t.s
                log(f"[bench] {name} done in {t.s:.0f} s")
        run["meta"]["wall_s"] = time.perf_counter() - t0
        out = report.write(args.out, args.mode, run)
        log(f"[bench] {args.mode} run: {run['meta']['wall_s'] / 60:.1f} min; wrote {out}")
        return out
    finally:
        torch.set_num_threads(old_threads)


if __name__ == "__main__":
    main()
