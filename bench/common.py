"""Shared pieces of the benchmark: machine description, evaluation, teacher training and the
PTQ / labeled-QAT / SQAKD protocol run side by side on one quantized copy of a teacher."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, quantize_model
from sqakd_hf.model_io import split_labels
from sqakd_hf.app.teacher import train_classifier
from sqakd_hf.training.metrics import batch_stats, model_output, summarize

TEMPERATURE = 4.0


def quiet() -> None:
    """Silence library chatter (progress bars, load reports, deprecation warnings)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "sqakd_hf", "accelerate", "torchao", "torch", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def machine() -> Dict[str, Any]:
    """nproc, CPU model, load, library versions: what a reader needs to weigh the timings."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import timm
    import transformers

    info = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
    }
    return info


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Timer:
    """``with Timer() as t: ...; t.s`` -> wall seconds."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.t0


# ---- evaluation -----------------------------------------------------------------------------
def batched(columns: Dict[str, Tensor], batch_size: int) -> List[Dict[str, Tensor]]:
    """Fixed, ordered batches of a dict of equally long tensors."""
    n = len(next(iter(columns.values())))
    return [{k: v[i : i + batch_size] for k, v in columns.items()} for i in range(0, n, batch_size)]


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Sequence[Dict[str, Tensor]]) -> Tensor:
    """Logits of ``model`` (eval mode) on ``batches`` (labels dropped), concatenated: the forward of
    :func:`sqakd_hf.training.metrics.model_output`, kept so the teacher's logits are computed once."""
    was_training = model.training
    model.eval()
    try:
        outs = []
        for b in batches:
            logits, is_logits = model_output(model, split_labels(b)[0])
            if not is_logits:
                raise ValueError(f"{type(model).__name__} has no logits to benchmark")
            outs.append(logits)
    finally:
        model.train(was_training)
    return torch.cat(outs).float()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Accuracy of a model's logits, as :mod:`sqakd_hf.training.metrics` computes it."""
    return summarize(batch_stats(None, logits, labels=labels).double().sum(0), student=False)["teacher"]["accuracy"]


def metrics(student: Tensor, teacher: Tensor, labels: Tensor) -> Dict[str, float]:
    """Accuracy, teacher agreement (argmax match) and KD loss (``T^2 KL``, mean over samples): the student's
    entry of :func:`sqakd_hf.training.metrics.summarize`, the trainer's and ``evaluate_models``' evaluator."""
    stats = batch_stats(student, teacher, labels=labels, temperature=TEMPERATURE).double().sum(0)
    return summarize(stats)["student"]


# ---- the teacher (labels used here only) ----------------------------------------------------
def train_supervised(model: nn.Module, columns: Dict[str, Tensor], steps: int, batch_size: int, lr: float,
                     seed: int, weight_decay: float = 0.0) -> nn.Module:
    """Cross-entropy training of the FP teacher (the quickstart's trainer: AdamW, one-cycle, seeded shuffles)."""
    return train_classifier(model, columns, steps, batch_size, lr, seed, weight_decay)


# ---- PTQ vs labeled QAT vs SQAKD ------------------------------------------------------------
@dataclass
class Budget:
    """The training budget both QAT and SQAKD get (identical optimizer, schedule, data order)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    quantizer_lr: Optional[float] = None
    calibration_batches: int = 4
    seed: int = 0
    #: share of the steps with a linear learning-rate warmup before the cosine decay (0: none)
    warmup_ratio: float = 0.0

    def describe(self) -> Dict[str, Any]:
        return {"steps": self.steps, "batch_size": self.batch_size, "optimizer": "AdamW (Trainer default)",
                "lr": self.lr, "quantizer_lr": self.quantizer_lr or self.lr, "weight_decay": self.weight_decay,
                "schedule": "cosine", "calibration_batches": self.calibration_batches, "temperature": TEMPERATURE,
                "seed": self.seed}


def _args(budget: Budget, out: str, kd_weight: float, ce_weight: float) -> SQAKDTrainingArguments:
    return SQAKDTrainingArguments(
        output_dir=out, max_steps=budget.steps, per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.lr, weight_decay=budget.weight_decay, lr_scheduler_type="cosine",
        warmup_steps=budget.warmup_ratio,  # transformers 5: a float < 1 is a share of the steps
        quantizer_learning_rate=budget.quantizer_lr, calibration_batches=budget.calibration_batches,
        temperature=TEMPERATURE, kd_weight=kd_weight, ce_weight=ce_weight, seed=budget.seed,
        data_seed=budget.seed, save_strategy="no", report_to="none", logging_strategy="no",
        remove_unused_columns=False, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
    )


def three_ways(
    teacher: nn.Module,
    config: QuantConfig,
    train_labeled: Any,
    collator: Callable,
    test_batches: Sequence[Dict[str, Tensor]],
    teacher_logits: Tensor,
    labels: Tensor,
    budget: Budget,
) -> Dict[str, Dict[str, float]]:
    """Quantize a copy of ``teacher`` with ``config`` and return metrics of the three students.

    * ``ptq``: calibrated on unlabeled training batches, no training;
    * ``qat``: from that same calibrated state, labels only (``SQAKDTrainer`` with ``kd_weight=0,
      ce_weight=1``: plain cross-entropy on the fake-quant student);
    * ``sqakd``: from that same state, KD only, trained on the training set with labels removed.

    Both trained students get the same budget (optimizer, lr, schedule, steps, batches in the
    same seeded order). Each entry also records the training wall time in ``train_s``.
    """
    train_unlabeled = train_labeled.remove_columns("labels")
    student = quantize_model(copy.deepcopy(teacher), config).requires_grad_(True)
    results: Dict[str, Dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sqakd-bench-") as tmp:
        torch.manual_seed(budget.seed)
        sqakd = SQAKDTrainer(model=student, teacher_model=teacher, args=_args(budget, tmp, 1.0, 0.0),
                             train_dataset=train_unlabeled, data_collator=collator)
        sqakd.prepare_student()  # calibration on unlabeled data: the PTQ model
        ptq_logits = predict_logits(student, test_batches)
        results["ptq"] = metrics(ptq_logits, teacher_logits, labels)
        qat_student = copy.deepcopy(student)  # same calibrated start
        torch.manual_seed(budget.seed)
        qat = SQAKDTrainer(model=qat_student, teacher_model=teacher, args=_args(budget, tmp, 0.0, 1.0),
                           train_dataset=train_labeled, data_collator=collator)
        preds = {"ptq": ptq_logits.argmax(-1)}
        for name, trainer in (("qat", qat), ("sqakd", sqakd)):
            with Timer() as t, contextlib.redirect_stdout(io.StringIO()):
                trainer.train()
            logits = predict_logits(trainer.model, test_batches)
            preds[name] = logits.argmax(-1)
            results[name] = {**metrics(logits, teacher_logits, labels), "train_s": t.s}
    correct = {k: (v == labels).float() for k, v in preds.items()}
    agree = {k: (v == teacher_logits.argmax(-1)).float() for k, v in preds.items()}
    results["paired"] = {"sqakd_minus_qat": paired_difference(correct["sqakd"], correct["qat"]),
                         "sqakd_minus_ptq": paired_difference(correct["sqakd"], correct["ptq"]),
                         "agreement_sqakd_minus_qat": paired_difference(agree["sqakd"], agree["qat"]),
                         "agreement_sqakd_minus_ptq": paired_difference(agree["sqakd"], agree["ptq"]),
                         "sqakd_minus_teacher": paired_difference(
                             correct["sqakd"], (teacher_logits.argmax(-1) == labels).float())}
    return results


def paired_difference(a: Tensor, b: Tensor) -> Dict[str, float]:
    """Accuracy difference of two models on the same samples (0/1 correctness vectors) and its
    standard error over samples (paired: only samples where they disagree add variance)."""
    d = a - b
    se = d.std(unbiased=True).item() / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"delta": d.mean().item(), "se": se}
