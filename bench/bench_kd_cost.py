"""Cost of a SQAKD training step vs plain FP fine-tuning of the same model on the same batch.

    python -m bench.bench_kd_cost [--reps 5] [--mem-steps 2] [--device cpu|cuda]

SQAKD step: ``SQAKDTrainer.training_step`` (teacher forward under no_grad + W4A4 LSQ fake-quant
student forward/backward + KD loss) then ``optimizer.step()``. FP step: the FP model's forward,
cross-entropy with labels, backward, ``optimizer.step()``. Both fused AdamW (the Trainer's default), fp32.

Models: timm resnet18 at 32x32, batch 128; a BERT of MiniLM-L6 size (hidden 384, 6 layers, 12 heads,
intermediate 1536, vocab 30522, 5-class head) at batch 16, seq 64.

Time: median seconds per step, FP, SQAKD and the teacher's forward alone interleaved in one
process (after a warm-up step each), so machine-load drift hits all alike.
Memory on CPU: each variant runs alone in a fresh subprocess; "training memory" = peak RSS
(``VmHWM``) minus the RSS after imports, before any model exists: weights (+ the teacher's, for
SQAKD), gradients, optimizer state, activations and allocator slack. On CUDA:
``torch.cuda.max_memory_allocated`` of each variant run alone. Where the time goes:
``torch.profiler`` top ops (self time) of one SQAKD step. Writes bench/results/kd_cost.{json,md}
(``kd_cost_cuda.*`` with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "resnet18": "timm resnet18, 32x32, batch 128",
    "minilm_bert": "BERT (MiniLM-L6 size, 5 labels), batch 16, seq 64",
}


def _status_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB. VmHWM is the peak RSS of this process image;
    unlike ``ru_maxrss`` it does not inherit the parent's peak across fork/exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _build(name: str, device: str):
    """(FP model, batch without labels, labels) on ``device``; deterministic."""
    import torch

    torch.manual_seed(0)
    if name == "resnet18":
        import timm

        model = timm.create_model("resnet18", pretrained=False, num_classes=10)
        batch, labels = {"pixel_values": torch.randn(128, 3, 32, 32)}, torch.randint(0, 10, (128,))
    else:
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, num_labels=5)
        model = BertForSequenceClassification(cfg)
        batch = {"input_ids": torch.randint(0, 30522, (16, 64)),
                 "attention_mask": torch.ones(16, 64, dtype=torch.long)}
        labels = torch.randint(0, 5, (16,))
    return model.to(device), {k: v.to(device) for k, v in batch.items()}, labels.to(device)


def _fp_step_fn(model, batch, labels) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    from sqakd_hf.model_io import call_model, output_tensor

    # fused AdamW: the transformers Trainer's default, which the SQAKD step (trainer.create_optimizer) uses too
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step() -> None:
        logits = output_tensor(call_model(model, batch), "logits")
        F.cross_entropy(logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _make_sqakd(teacher, batch, device: str):
    """A SQAKDTrainer on a calibrated W4A4 LSQ copy of ``teacher``; returns (step, trainer)."""
    from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, calibrate, quantize_model
    from sqakd_hf.model_io import unwrap as _core

    student = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(method="lsq", weight_bits=4, act_bits=4))
    calibrate(student, [batch if "pixel_values" not in batch else batch["pixel_values"]])
    args = SQAKDTrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=device == "cpu",
                                  save_strategy="no", disable_tqdm=True, learning_rate=1e-4)
    trainer = SQAKDTrainer(model=student, teacher_model=teacher.eval(), args=args)
    opt = trainer.create_optimizer()
    model = _core(trainer.model)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass

    def step() -> None:
        trainer.training_step(model, dict(batch))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, trainer


def _variant_step(name: str, variant: str, device: str) -> Callable[[], None]:
    model, batch, labels = _build(name, device)
    if variant == "fp":
        return _fp_step_fn(model, batch, labels)
    return _make_sqakd(model, batch, device)[0]


def _worker(name: str, variant: str, steps: int) -> Dict[str, float]:
    """CPU: run one variant alone; training memory = peak RSS above the post-import baseline."""
    import torch  # noqa: F401
    import sqakd_hf  # noqa: F401  (imports counted in the baseline)

    base = _status_kb("VmRSS")
    step = _variant_step(name, variant, "cpu")
    for _ in range(steps):
        step()
    peak = _status_kb("VmHWM")
    return {"baseline_rss_mb": base / 1024, "peak_rss_mb": peak / 1024, "training_mem_mb": (peak - base) / 1024}


def _memory(name: str, variant: str, steps: int, device: str) -> Dict[str, float]:
    if device == "cuda":
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step = _variant_step(name, variant, device)
        for _ in range(steps):
            step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated()
        del step
        gc.collect()
        torch.cuda.empty_cache()
        return {"training_mem_mb": (peak - base) / 2**20, "peak_rss_mb": float("nan")}
    cmd = [sys.executable, "-m", "bench.bench_kd_cost", "--worker", name, variant, "--mem-steps", str(steps)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timing(name: str, reps: int, device: str) -> Dict[str, float]:
    teacher, batch, labels = _build(name, device)
    fp_step = _fp_step_fn(copy.deepcopy(teacher), batch, labels)
    kd_step, trainer = _make_sqakd(teacher, batch, device)

    def teacher_fwd() -> None:  # the part of the SQAKD step that FP fine-tuning does not have
        trainer.teacher_outputs(batch)

    steps = {"fp": fp_step, "sqakd": kd_step, "teacher_fwd": teacher_fwd}
    from .gpu_workloads import time_interleaved

    times = time_interleaved(steps, reps, device, warmup=1)  # the warm-up allocates optimizer state
    return {f"{k}_s_per_step": statistics.median(v) for k, v in times.items()}


def _profile(name: str, device: str, top: int = 12):
    """Top ops by self time (device time on CUDA) over one SQAKD step (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    teacher, batch, _ = _build(name, device)
    step, _ = _make_sqakd(teacher, batch, device)
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events) or 1
    return [{"op": e.key, "self_ms": getattr(e, attr) / 1000, "share": getattr(e, attr) / total, "calls": e.count}
            for e in events[:top]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], args.worker[1], args.mem_steps)))
        return

    import torch

    dev = args.device
    rows = []
    for name, desc in MODELS.items():
        t = _timing(name, args.reps, dev)
        mem = {v: _memory(name, v, args.mem_steps, dev) for v in ("fp", "sqakd")}
        row = {
            "model": name, "setting": desc, **t,
            "time_ratio": t["sqakd_s_per_step"] / t["fp_s_per_step"],
            "teacher_share_of_sqakd_step": t["teacher_fwd_s_per_step"] / t["sqakd_s_per_step"],
            "time_ratio_without_teacher": (t["sqakd_s_per_step"] - t["teacher_fwd_s_per_step"]) / t["fp_s_per_step"],
            "fp_training_mem_mb": mem["fp"]["training_mem_mb"], "sqakd_training_mem_mb": mem["sqakd"]["training_mem_mb"],
            "fp_peak_rss_mb": mem["fp"]["peak_rss_mb"], "sqakd_peak_rss_mb": mem["sqakd"]["peak_rss_mb"],
            "top_ops_sqakd_step": _profile(name, dev),
        }
        row["mem_ratio"] = row["sqakd_training_mem_mb"] / row["fp_training_mem_mb"]
        row["peak_rss_ratio"] = row["sqakd_peak_rss_mb"] / row["fp_peak_rss_mb"]
        rows.append(row)
        print(f"{name}: time x{row['time_ratio']:.2f}, training memory x{row['mem_ratio']:.2f}", flush=True)

    if dev == "cuda":
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, python {platform.python_version()}"
        mem_method = ("each variant alone in the same process: torch.cuda.max_memory_allocated during its steps minus "
                      "the allocated memory before it was built (weights incl. the teacher's, grads, optimizer state, "
                      "activations)")
    else:
        machine = (f"{platform.machine()}, nproc {os.cpu_count()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}, python {platform.python_version()}")
        mem_method = ("each variant alone in a fresh subprocess; training memory = peak RSS (VmHWM) minus the RSS "
                      "after imports, before any model is built (weights incl. the teacher's, grads, optimizer state, "
                      "activations, allocator slack); peak_rss_* are the raw process peaks")
    meta = {
        "command": f"python -m bench.bench_kd_cost --reps {args.reps} --mem-steps {args.mem_steps} --device {dev}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "goal": "time ratio <= 1.4, training-memory ratio <= 1.3",
        "time_method": "median wall seconds per optimizer step, FP, SQAKD and the teacher forward alone interleaved "
                       "in one process after a warm-up step each" + (" (CUDA-synchronised)" if dev == "cuda" else ""),
        "memory_method": mem_method,
    }
    stem = "kd_cost" if dev == "cpu" else "kd_cost_cuda"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# Cost of a SQAKD step vs an FP fine-tuning step ({dev}; W4A4 LSQ student + FP teacher)", "",
        f"`{meta['command']}` — {meta['date']} — {meta['machine']}", "",
        f"Goal: {meta['goal']}.", "",
        "| model | setting | FP s/step | SQAKD s/step | time ratio | teacher fwd s | ratio w/o teacher "
        "| FP train mem MB | SQAKD train mem MB | mem ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['fp_s_per_step']:.4f} | {r['sqakd_s_per_step']:.4f} "
            f"| **{r['time_ratio']:.2f}x** | {r['teacher_fwd_s_per_step']:.4f} | {r['time_ratio_without_teacher']:.2f}x "
            f"| {r['fp_training_mem_mb']:.0f} | {r['sqakd_training_mem_mb']:.0f} | **{r['mem_ratio']:.2f}x** |"
        )
    lines += ["", f"Time: {meta['time_method']}. \"teacher fwd\" is the teacher's forward alone; \"ratio w/o teacher\" "
              "= (SQAKD step - teacher fwd) / FP step, i.e. the fake-quant student's own overhead.",
              "", f"Memory: {meta['memory_method']}.", ""]
    for r in rows:
        lines += [f"Where a SQAKD step's time goes, {r['model']} (torch.profiler, self {'CUDA' if dev == 'cuda' else 'CPU'}"
                  " time, top ops):", "", "| op | self ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_ms']:.2f} | {o['share']:.1%} | {o['calls']} |"
                  for o in r["top_ops_sqakd_step"]]
        lines.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
