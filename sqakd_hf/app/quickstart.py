"""``sqakd-hf quickstart``: the whole SQAKD workflow offline, on scikit-learn's real digits.

1. Train a small real timm model (``test_resnet``, 32x32 inputs) on the digits: the teacher.
   This is the only step that uses labels; it stands in for the checkpoint a user would
   download. It is saved in timm's layout (``teacher/``) and reloaded from there.
2. For each bit-width b: quantize a copy of the teacher (W b A b), calibrate it on unlabeled
   training images (that alone is the post-training-quantization baseline, PTQ), then train it
   label-free with :class:`~sqakd_hf.SQAKDTrainer` (KD from the teacher only).
3. Evaluate teacher, PTQ and SQAKD on the held-out split (accuracy, teacher agreement), save each
   SQAKD student packed with a model card (``sqakd-<method>-w<b>a<b>/``), reload the packed model
   and report its numbers, and print a comparison table (also written to ``results.md`` / ``.json``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import InputError
from .data import DIGITS_MEAN, DIGITS_STD, image_collator, load_digits_splits
from .teacher import refresh_batchnorm, train_classifier

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_OUTPUT_DIR", "TEACHER_ARCH", "QuickstartRow", "train_teacher", "save_timm_teacher",
           "run_quickstart", "format_table"]

DEFAULT_OUTPUT_DIR = "./sqakd-quickstart"
TEACHER_ARCH = "test_resnet"
IMAGE_SIZE = 32
MARKER = "quickstart.json"
TEACHER_DIR = "teacher"


@dataclass
class QuickstartRow:
    """One line of the comparison table."""

    model: str
    bits: str
    accuracy: Optional[float]
    teacher_agreement: Optional[float]
    kd_loss: Optional[float]
    size_bytes: Optional[int]
    path: Optional[str] = None


# ---- the teacher (labels used here only) ----------------------------------------------------------------
def train_teacher(train_ds, epochs: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                  max_steps: Optional[int] = None) -> nn.Module:
    """Train ``timm.create_model("test_resnet", num_classes=10)`` on the labeled digits (Adam, one-cycle; see :func:`.teacher.train_classifier`)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TEACHER_ARCH, num_classes=10)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, IMAGE_SIZE, IMAGE_SIZE), mean=DIGITS_MEAN,
                                std=DIGITS_STD, crop_pct=1.0, num_classes=10)
    columns = train_ds.with_format("torch")[:]
    x, y = columns["pixel_values"], columns["labels"]
    per_epoch = math.ceil(len(x) / batch_size)
    total = min(epochs * per_epoch, max_steps) if max_steps else epochs * per_epoch
    train_classifier(model, {"pixel_values": x, "labels": y}, total, batch_size, lr, seed, pct_start=0.3,
                     desc="Training the FP teacher (with labels)")
    refresh_batchnorm(model, x, batch_size)
    return model.eval()


def save_timm_teacher(model: nn.Module, directory: Path) -> Path:
    """Save the teacher the way timm publishes checkpoints (``config.json`` + ``model.safetensors``)."""
    from timm.models import save_for_hf

    directory.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(directory), model_config={"label_names": [str(i) for i in range(10)]},
                safe_serialization=True)
    return directory


# ---- helpers ---------------------------------------------------------------------------------------------
def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--output_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file() and not overwrite:
        raise InputError(f"--output_dir {out} is not empty and holds no earlier quickstart; choose another "
                         "--output_dir or pass --overwrite_output_dir")


def _bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:6.2f}%"


def format_table(rows: Sequence[QuickstartRow], teacher_bytes: Optional[int] = None) -> str:
    """Markdown table of the quickstart results."""
    head = "| model | bits | accuracy | teacher agreement | KD loss | size |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        size = "-" if r.size_bytes is None else f"{r.size_bytes / 1e3:.1f} kB"
        if r.size_bytes is not None and teacher_bytes and r.model != "teacher":
            size += f" ({teacher_bytes / r.size_bytes:.1f}x smaller)"
        kd = "-" if r.kd_loss is None else f"{r.kd_loss:.4f}"
        lines.append(f"| {r.model} | {r.bits} | {_fmt_pct(r.accuracy)} | {_fmt_pct(r.teacher_agreement)} | {kd} | {size} |")
    return "\n".join(lines)


def _row(name: str, bits: str, metrics: Dict[str, float], size: Optional[int], path: Optional[Path] = None) -> QuickstartRow:
    return QuickstartRow(name, bits, metrics.get("accuracy"), metrics.get("teacher_agreement"), metrics.get("kd_loss"),
                         size, str(path) if path else None)


# ---- the run ---------------------------------------------------------------------------------------------
def run_quickstart(
    output_dir: str = DEFAULT_OUTPUT_DIR,
    method: str = "lsq",
    bits: Sequence[int] = (4, 2),
    epochs: Optional[int] = None,
    teacher_epochs: Optional[int] = None,
    fast: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    num_threads: Optional[int] = 1,
) -> List[QuickstartRow]:
    """Run the quickstart (see the module docstring); returns the table rows.

    Full mode: teacher 4 epochs, each student 4 epochs. ``fast``: teacher 1 epoch, each student
    12 steps (mechanics only, for tests). ``epochs`` / ``teacher_epochs`` override either.
    ``num_threads``: torch CPU threads (default 1: the model is tiny, and on a shared 2-core CPU
    multi-threaded small kernels stall when another process holds a core; measured 28 s with 1
    thread vs 7.5 min with 2 under load). ``None``/0 keeps torch's setting.
    """
    from ..checkpoint import load_quantized, save_packed
    from ..config import QuantConfig
    from ..hub.card_info import write_model_card
    from ..injection import quantize_model
    from ..training.args import SQAKDTrainingArguments
    from ..training.metrics import evaluate_models
    from ..training.trainer import SQAKDTrainer

    start = time.perf_counter()
    if num_threads and not torch.cuda.is_available():
        torch.set_num_threads(num_threads)
    out = Path(output_dir)
    _check_output_dir(out, overwrite)
    configs = []
    for b in bits:
        try:
            configs.append(QuantConfig(method=method, weight_bits=b, act_bits=b))
        except ValueError as err:
            raise InputError(str(err)) from None
    if not configs:
        raise InputError("--bits is empty: give at least one bit-width, e.g. --bits 4,2")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"method": method, "bits": list(bits), "fast": fast}))
    teacher_epochs = teacher_epochs or (1 if fast else 4)
    student_epochs = epochs or 4
    student_steps = 12 if fast and epochs is None else -1

    digits = load_digits_splits(image_size=IMAGE_SIZE, seed=seed)
    train, test = digits["train"], digits["test"]
    unlabeled = train.remove_columns("labels")
    print(f"Digits: {len(train)} training images (labels used only for the teacher), {len(test)} held out.")

    # 1. the teacher: train, save as a timm checkpoint, reload it as a user would
    import timm

    trained = train_teacher(train, teacher_epochs, batch_size, seed=seed)
    teacher_dir = save_timm_teacher(trained, out / TEACHER_DIR)
    teacher = timm.create_model(f"local-dir:{teacher_dir}", pretrained=True).eval()
    teacher_bytes = _bytes(teacher_dir)
    t_metrics = evaluate_models(None, teacher, test, image_collator, progress=False)["teacher"]
    rows = [_row("teacher", "FP32", {**t_metrics, "teacher_agreement": 1.0}, teacher_bytes, teacher_dir)]

    for config in configs:
        tag = f"W{config.weight_bits}A{config.act_bits}"
        student = quantize_model(copy.deepcopy(teacher), config).requires_grad_(True)
        args = SQAKDTrainingArguments(
            output_dir=str(out / "runs" / config.short_name), num_train_epochs=student_epochs,
            max_steps=student_steps, per_device_train_batch_size=batch_size, learning_rate=1e-3, weight_decay=1e-4,
            lr_scheduler_type="cosine", temperature=4.0, save_strategy="no", report_to="none", logging_strategy="no",
            remove_unused_columns=False, seed=seed, use_cpu=not torch.cuda.is_available(),
        )
        trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=unlabeled,
                               data_collator=image_collator)
        trainer.prepare_student()  # calibration on unlabeled images: the PTQ baseline
        ptq = evaluate_models(student, teacher, test, image_collator, progress=False)["student"]
        rows.append(_row(f"PTQ {method}", tag, ptq, None))
        print(f"SQAKD {config.short_name}: label-free distillation from the teacher")
        trainer.train()
        student = trainer.model.eval()
        packed_dir = out / f"sqakd-{method}-w{config.weight_bits}a{config.act_bits}"
        save_packed(student, packed_dir)
        reloaded = load_quantized(packed_dir)
        s_metrics = evaluate_models(reloaded, teacher, test, image_collator, progress=False)["student"]
        write_model_card(
            student, packed_dir, teacher=str(teacher_dir),
            metrics={"teacher": t_metrics, "student": s_metrics, "ptq": ptq},
            training={"dataset": "scikit-learn digits (32x32)", "labels_used": False, "epochs": student_epochs,
                      "max_steps": student_steps, "learning_rate": 1e-3, "temperature": 4.0},
        )
        rows.append(_row(f"SQAKD {method}", tag, s_metrics, _bytes(packed_dir), packed_dir))

    table = format_table(rows, teacher_bytes)
    elapsed = time.perf_counter() - start
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "wall_time_s": elapsed,
                                                  "fast": fast}, indent=2))
    print(f"\nHeld-out digits ({len(test)} images); students trained without labels:\n\n{table}\n")
    print(f"Packed models and model cards: {', '.join(r.path for r in rows[1:] if r.path)}")
    print(f"Wall time: {elapsed:.0f} s")
    return rows
