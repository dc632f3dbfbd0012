"""Vision quality: timm ``test_resnet`` teacher on scikit-learn's digits, quantized with every
method and bit-width three ways (PTQ, labeled QAT, label-free SQAKD) at one step budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import timm
import torch

from sqakd_hf import QuantConfig
from sqakd_hf.app.data import image_collator, load_digits_splits

from .common import Budget, Timer, accuracy, batched, predict_logits, three_ways, train_supervised

ARCH = "test_resnet"


@dataclass
class VisionSetup:
    image_size: int
    teacher_steps: int
    budget: Budget
    methods: Sequence[str]
    bits: Sequence[Tuple[int, int]]  # (weight_bits, act_bits)
    test_limit: int = 0  # 0: the whole held-out split


def run(setup: VisionSetup, log=print) -> Dict[str, Any]:
    """Train the teacher, then PTQ / QAT / SQAKD for every (method, bits); returns the JSON section."""
    seed = setup.budget.seed
    digits = load_digits_splits(image_size=setup.image_size, seed=seed)
    train, test = digits["train"], digits["test"]
    if setup.test_limit:
        test = test.select(range(setup.test_limit))
    test_cols = test[:]
    labels = test_cols["labels"]
    test_batches = batched({"pixel_values": test_cols["pixel_values"]}, 256)

    torch.manual_seed(seed)
    teacher = timm.create_model(ARCH, num_classes=10)
    train_cols = train[:]
    with Timer() as tt:
        train_supervised(teacher, train_cols, setup.teacher_steps, 64, 3e-3, seed)
    t_logits = predict_logits(teacher, test_batches)
    t_acc = accuracy(t_logits, labels)
    t_train_acc = accuracy(predict_logits(teacher, batched({"pixel_values": train_cols["pixel_values"]}, 256)),
                           train_cols["labels"])
    log(f"[vision] teacher {ARCH} @ {setup.image_size}px: accuracy {t_acc:.4f} (train {t_train_acc:.4f}, {tt.s:.0f} s)")

    rows: List[Dict[str, Any]] = []
    for method in setup.methods:
        for wb, ab in setup.bits:
            cfg = QuantConfig(method=method, weight_bits=wb, act_bits=ab)
            with Timer() as t:
                res = three_ways(teacher, cfg, train, image_collator, test_batches, t_logits, labels, setup.budget)
            rows.append({"method": method, "bits": f"W{wb}A{ab}", "weight_bits": wb, "act_bits": ab, **res})
            log(f"[vision] {cfg.short_name}: PTQ {res['ptq']['accuracy']:.4f}  QAT {res['qat']['accuracy']:.4f}  "
                f"SQAKD {res['sqakd']['accuracy']:.4f}  ({t.s:.0f} s)")
    return {
        "teacher": {"arch": ARCH, "accuracy": t_acc, "train_accuracy": t_train_acc,
                    "params": sum(p.numel() for p in teacher.parameters()), "train_steps": setup.teacher_steps,
                    "train_s": tt.s},
        "data": {"dataset": "scikit-learn digits (1797 real 8x8 images), stratified 80/20 split",
                 "image_size": setup.image_size, "num_classes": 10, "train": len(train), "test": len(test)},
        "budget": setup.budget.describe(),
        "rows": rows,
    }
