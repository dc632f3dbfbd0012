"""One command for the SQAKD benchmarks: quality (vision, text), cost and size.

    python -m bench --quick     # < 10 min on a shared 2-core CPU
    python -m bench             # full mode (see bench/results/results.md for its wall time)

Writes bench/results/results.{json,md} and PNG plots (``--out`` to change). Fixed seeds. Each
comparison (PTQ vs labeled QAT vs SQAKD; FP vs ours vs torchao) runs side by side in one process;
the vision and text sections run in two worker processes at once (``--jobs 1``: one after the
other), cost and size run alone afterwards. ``--threads`` defaults to 1: on a CPU shared with
other jobs, two intra-op threads ran the same step 3-30x slower than one (spin-waiting).
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .runner import DEFAULT_SECTIONS, OWN_FILES, SECTIONS, log as _log, run_section, setup

RESULTS = Path(__file__).parent / "results"


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short run (< 10 min on a 2-core CPU)")
    mode.add_argument("--micro", action="store_true", help="a seconds-long smoke run of the mechanics (for tests)")
    ap.add_argument("--sections", default=None,
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; --quick and --micro "
                         "leave out real_text, real_vision and deploy)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="processes for the two quality sections (default 2: vision and text side by side)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    ap.add_argument("--verbose", action="store_true", help="keep library logs and warnings")
    args = ap.parse_args(argv)
    args.mode = "quick" if args.quick else "micro" if args.micro else "full"
    args.sections = (list(DEFAULT_SECTIONS[args.mode]) if args.sections is None
                     else [s.strip() for s in args.sections.split(",") if s.strip()])
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: Optional[List[str]] = None, log: Callable[[str], None] = _log) -> Path:
    """Run the selected sections and write the results; returns the path of results.md.

    With ``--jobs 2`` the two quality sections run in parallel worker processes (one core each);
    the timing sections (cost, size) always run alone afterwards."""
    args = parse(argv)
    old_threads = torch.get_num_threads()
    try:
        setup(args.threads, args.verbose)
        from . import common, report

        argv_shown = sys.argv[1:] if argv is None else argv
        run: Dict[str, Any] = {"meta": {"command": " ".join(["python -m bench", *map(shlex.quote, argv_shown)]),
                                        "mode": args.mode, "date": common.now(), "machine": common.machine(),
                                        "seed": args.seed, "jobs": args.jobs, "sections_s": {}}}
        t0 = time.perf_counter()
        quality = [s for s in ("vision", "text") if s in args.sections]
        if args.jobs > 1 and len(quality) > 1:
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(len(quality), mp_context=spawn) as pool:  # a dead worker raises, never hangs
                pending = {s: pool.submit(run_section, s, args.mode, args.seed, args.threads, args.verbose)
                           for s in quality}
                for s, future in pending.items():
                    run[s], run["meta"]["sections_s"][s] = future.result()
        for s in SECTIONS:
            if s in args.sections and s not in run:
                run[s], run["meta"]["sections_s"][s] = run_section(s, args.mode, args.seed, args.threads,
                                                                   args.verbose, log)
        run["meta"]["wall_s"] = time.perf_counter() - t0
        written = None
        for name in OWN_FILES:  # their own files: <name>.{json,md}
            if name in run:
                module = importlib.import_module(f".{name}", __package__)
                meta = {**run["meta"], "wall_s": run["meta"]["sections_s"][name]}
                written = module.write(args.out, args.mode, run.pop(name), meta)
                log(f"[bench] wrote {written}")
        if written is not None and not set(args.sections) - set(OWN_FILES):
            return written
        out = report.write(args.out, args.mode, run)
        log(f"[bench] {args.mode} run: {run['meta']['wall_s'] / 60:.1f} min; wrote {out}")
        return out
    finally:
        torch.set_num_threads(old_threads)


if __name__ == "__main__":
    main()
