"""The benchmark's sections and their sizes per mode; importable, so worker processes can run them."""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict

import torch

SECTIONS = ("vision", "text", "cost", "size", "real_text", "real_vision", "deploy")
#: sections that write their own results files (``<name>.{json,md}``), not results.{json,md}
OWN_FILES = ("real_text", "real_vision", "deploy")
#: sections run when ``--sections`` is not given: the real-task sections only in full mode (~1 h on 2 CPU cores)
DEFAULT_SECTIONS = {"full": SECTIONS, "quick": SECTIONS[:4], "micro": SECTIONS[:4]}
METHODS = ("lsq", "pact", "dorefa", "ewgs")
#: Lite0 mixed precision: 8-bit weights for the layers whose 4-bit weights alone move the output most, at most 4%
#: of the weights (``sqakd_hf.layer_sensitivity`` on the calibration batches, then ``choose_layer_bits``; val after
#: 300 steps: 89.6% at 4%, 87.2% at 2.1%)
LITE0_W8 = {"layer_bits_budget": 0.04, "label": "the most sensitive layers at W8, by measurement"}


def presets(mode: str, seed: int) -> Dict[str, Any]:
    """Sizes of every section for ``quick`` / ``full`` / ``micro`` (a seconds-long smoke run)."""
    from .common import Budget
    from .deploy import DeploySetup
    from .quality_text import TextSetup
    from .real_text import RealTextSetup
    from .real_vision import RealVisionSetup
    from .quality_vision import VisionSetup

    if mode == "full":
        return {
            "vision": VisionSetup(32, 270, Budget(135, 64, 1e-3, seed=seed), METHODS,
                                  [(8, 8), (4, 4), (3, 3), (2, 2), (1, 2)]),
            "text": TextSetup(128, 0, 0, 222, 1e-4, Budget(60, 16, 5e-5, weight_decay=0.01, seed=seed),
                              [(8, 8), (4, 8), (4, 4)]),
            "cost": {"batch_size": 16, "seq_len": 128, "reps": 5},
            "size": [8, 4, 2, 1],
            "real_text": RealTextSetup(48, 2000, 0, 500, 16, 1e-4, Budget(120, 16, 1e-5, weight_decay=0.0, seed=seed),
                                       [("lsq", 4, 8, {"lr": 1e-5}), ("lsq", 4, 4, {"lr": 5e-5, "steps": 300})],
                                       jobs=2),
            # 14 training photos, 6 held out whole (T = 2 for W8A8: 96.4% on val vs 96.1% at T = 1, 95.3% at T = 4,
            # 100 steps at lr 1e-5; 300 steps at lr 2e-5: 97.4%)
            "real_vision": RealVisionSetup(224, 1344, 1344, Budget(300, 16, 1e-4, weight_decay=0.0, seed=seed),
                                           [("lsq", 8, 8, {"lr": 2e-5, "steps": 300, "temperature": 2.0,
                                                           "quantizer_lr_mode": "relative"}),
                                            ("lsq", 4, 8, {**LITE0_W8, "quantizer_lr_mode": "relative"}),
                                            ("lsq", 4, 8, {"quantizer_lr_mode": "relative"})], jobs=2,
                                           eval_every=100, val_crops=384, other_crops=96, photos="many"),
            "deploy": DeploySetup([("resnet18", 128), ("resnet18", 224), ("efficientnet_lite0", 224)], 128, 64, 64,
                                  {1: 10, 32: 3}, threads=(1,), seed=seed, text_test=200),
        }
    if mode == "quick":
        return {
            "vision": VisionSetup(16, 90, Budget(30, 64, 1e-3, seed=seed), METHODS, [(8, 8), (4, 4), (2, 2), (1, 4)]),
            "text": TextSetup(64, 320, 200, 40, 3e-4, Budget(12, 16, 5e-5, weight_decay=0.01, seed=seed),
                              [(8, 8), (4, 8)]),
            "cost": {"batch_size": 8, "seq_len": 128, "reps": 3},
            "size": [8, 4, 2, 1],
            "real_text": RealTextSetup(48, 500, 4000, 150, 16, 1e-4, Budget(40, 16, 5e-5, weight_decay=0.01, seed=seed),
                                       [("lsq", 4, 8)]),
            "real_vision": RealVisionSetup(160, 320, 96, Budget(20, 16, 1e-5, weight_decay=0.0, seed=seed),
                                           [("lsq", 8, 8, 1e-5)]),
            "deploy": DeploySetup([("resnet18", 128)], 128, 32, 64, {1: 5, 32: 2}, threads=(1,), seed=seed,
                                  text_test=64),
        }
    return {  # micro: mechanics only
        "vision": VisionSetup(8, 2, Budget(2, 32, 1e-3, calibration_batches=1, seed=seed), ("lsq",), [(4, 4)],
                              test_limit=64),
        "text": TextSetup(16, 40, 20, 2, 3e-4, Budget(2, 8, 5e-5, calibration_batches=1, seed=seed), [(8, 8)]),
        "cost": {"batch_size": 2, "seq_len": 16, "reps": 1},
        "size": [4],
        "real_text": RealTextSetup(16, 24, 48, 2, 8, 1e-4, Budget(2, 8, 5e-5, calibration_batches=1, seed=seed),
                                   [("lsq", 4, 8)], cache=None, eval_batch_size=8),
        "real_vision": RealVisionSetup(64, 8, 8, Budget(1, 4, 1e-5, calibration_batches=1, seed=seed),
                                       [("lsq", 8, 8, 1e-5)]),
        "deploy": DeploySetup([("resnet18", 32)], 0, 4, 8, {1: 1, 32: 1}, threads=(1,), seed=seed),
    }


def log(msg: str) -> None:
    print(msg, flush=True)


def setup(threads: int, verbose: bool) -> None:
    if not verbose:  # before torch/transformers/torchao imports log their deprecation notices
        logging.getLogger("torch").setLevel(logging.ERROR)
        from .common import quiet

        quiet()
    if threads > 0:
        torch.set_num_threads(threads)


def run_section(name: str, mode: str, seed: int, threads: int, verbose: bool, log: Callable[[str], None] = log):
    """Run one section (any of :data:`SECTIONS`); returns ``(result, seconds)``."""
    setup(threads, verbose)
    from . import common, cost, deploy, quality_text, quality_vision, real_text, real_vision, size

    cfg = presets(mode, seed)
    jobs = {
        "vision": lambda: quality_vision.run(cfg["vision"], log),
        "text": lambda: quality_text.run(cfg["text"], log),
        "cost": lambda: cost.run(**cfg["cost"], mode=mode, log=log),
        "size": lambda: size.run(cfg["size"], log),
        "real_text": lambda: real_text.run(cfg["real_text"], log),
        "real_vision": lambda: real_vision.run(cfg["real_vision"], log),
        "deploy": lambda: deploy.run(cfg["deploy"], log),
    }
    with common.Timer() as t:
        result = jobs[name]()
    log(f"[bench] {name} done in {t.s:.0f} s")
    return result, t.s
