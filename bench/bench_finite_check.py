"""Cost of SQAKDTrainer's NaN/inf checks (``nonfinite='error'`` and ``'skip_batch'``) on a training step.

    python -m bench.bench_finite_check [--steps 30] [--rounds 8] [--threads 1] [--device cpu|cuda]

One trainer per model (W4A4 LSQ student, FP teacher, AdamW); the same trainer runs optimizer steps
(``training_step`` + ``optimizer.step``) with the checks off (a pass-through guard), with ``'error'`` and with
``'skip_batch'``, and again with the checks off (an A/A control: its "overhead" is the measurement's noise
floor), interleaved step by step (seeded random order per block of four) for ``--rounds`` x ``--steps`` blocks, in
one process, so machine-load drift hits all alike. Each step is timed in process CPU time (what the step
computed, robust to other processes on a shared machine) and wall time. Overhead = median over blocks of (step
time / the same block's unchecked step time) - 1. Also timed alone: the check ops themselves on one step's
tensors (inputs, both outputs, loss), as a share of the unchecked step: the precise figure.

Models: a tiny BERT classifier (vocab 8192, hidden 128, 2 layers, 5 labels; batch 16, seq 64) and a tiny GPT-2
causal LM (vocab 8192, hidden 128, 2 layers; batch 8, seq 64: per-token logits, the largest tensors the check
reads, against the smallest model: the harshest ratio).
Writes bench/results/finite_check{,_cuda}.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "bert_tiny": "BERT classifier (vocab 8192, hidden 128, 2 layers, 5 labels), batch 16, seq 64",
    "gpt2_lm": "GPT-2 causal LM (vocab 8192, hidden 128, 2 layers), batch 8, seq 64",
}
GOAL = 0.02


class _NoChecks:
    """A pass-through guard: the step without any finiteness check."""

    skips = False

    def inputs(self, model_inputs: Any) -> Any:
        return model_inputs

    def outputs(self, student: Any, teacher: Any) -> Any:
        return teacher

    def loss(self, loss: Any, step: int) -> Any:
        return loss


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _build(name: str, device: str):
    import torch

    torch.manual_seed(0)
    if name == "bert_tiny":
        from transformers import BertConfig, BertForSequenceClassification

        model = BertForSequenceClassification(BertConfig(
            vocab_size=8192, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
            num_labels=5))
        batch = {"input_ids": torch.randint(0, 8192, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long)}
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_positions=64, n_embd=128, n_layer=2, n_head=2))
        batch = {"input_ids": torch.randint(0, 8192, (8, 64)), "attention_mask": torch.ones(8, 64, dtype=torch.long)}
    return model.to(device), {k: v.to(device) for k, v in batch.items()}


def _trainer(name: str, device: str):
    from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, calibrate, quantize_model

    teacher, batch = _build(name, device)
    student = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(method="lsq", weight_bits=4, act_bits=4))
    calibrate(student, [batch])
    args = SQAKDTrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=device == "cpu",
                                  save_strategy="no", disable_tqdm=True, learning_rate=1e-5)
    trainer = SQAKDTrainer(model=student, teacher_model=teacher.eval(), args=args)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we bypass
    return trainer, batch


def _step(trainer, batch, device: str) -> Dict[str, float]:
    """One optimizer step; its process CPU seconds and wall seconds."""
    opt, model = trainer.optimizer, trainer.model
    _sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    trainer.training_step(model, dict(batch))
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    return {"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0}


def _check_ops_time(trainer, batch, device: str, policy: str, reps: int = 200) -> float:
    """Seconds per step spent in the check ops alone (inputs, both outputs, loss) on one step's tensors."""
    import torch

    from sqakd_hf.training.finite import FiniteGuard

    with torch.no_grad():
        s = trainer.model(**batch).logits
        t = trainer.teacher(**batch).logits
    loss = s.float().mean()
    guard = FiniteGuard(policy)

    def once() -> None:
        guard.inputs(batch)
        guard.outputs(s, t)
        guard.loss(loss, 1)

    for _ in range(10):
        once()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def measure(name: str, steps: int, rounds: int, device: str) -> Dict[str, Any]:
    from sqakd_hf.training.finite import FiniteGuard

    trainer, batch = _trainer(name, device)
    guards: Dict[str, Callable[[], Any]] = {
        "off": _NoChecks, "error": lambda: FiniteGuard("error"), "skip_batch": lambda: FiniteGuard("skip_batch"),
        "off_again": _NoChecks,
    }
    made = {k: make() for k, make in guards.items()}
    for k in guards:  # warm-up (optimizer state, allocator)
        trainer.finite_guard = made[k]
        _step(trainer, batch, device)
    times: Dict[str, Dict[str, list]] = {k: {"cpu": [], "wall": []} for k in guards}
    rnd = random.Random(0)
    for _ in range(rounds * steps):
        order = list(guards)
        rnd.shuffle(order)  # no variant always runs first, or after the same one
        for k in order:
            trainer.finite_guard = made[k]
            for clock, value in _step(trainer, batch, device).items():
                times[k][clock].append(value)
    med = {k: {c: statistics.median(v) for c, v in t.items()} for k, t in times.items()}
    clock = "cpu" if device == "cpu" else "wall"

    def overhead(k: str, c: str) -> float:
        return statistics.median(a / b for a, b in zip(times[k][c], times["off"][c])) - 1.0

    checked = ("error", "skip_batch", "off_again")
    ops = {p: _check_ops_time(trainer, batch, device, p) for p in ("error", "skip_batch")}
    return {
        "model": name, "setting": MODELS[name], "steps_each": rounds * steps, "clock": clock,
        "s_per_step": {k: m[clock] for k, m in med.items()},
        "overhead": {k: overhead(k, clock) for k in checked},
        "wall_s_per_step": {k: m["wall"] for k, m in med.items()},
        "wall_overhead": {k: overhead(k, "wall") for k in checked},
        "check_ops_s": ops, "check_ops_share": {p: v / med["off"][clock] for p, v in ops.items()},
    }


def render(results: Dict[str, Any]) -> str:
    lines = [
        f"# Cost of the NaN/inf checks on a SQAKD step ({results['device']})", "",
        f"`{results['command']}` — {results['date']} — {results['machine']}", "",
        f"Goal: overhead < {GOAL:.0%} of the SQAKD step time.", "",
        "| model | setting | steps each | off s/step | error s/step | skip_batch s/step | overhead error "
        "| overhead skip_batch | A/A control (noise) | wall overhead error / skip_batch / A/A "
        "| check ops alone, error / skip_batch (share of step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["models"]:
        t, o, w = r["s_per_step"], r["overhead"], r["wall_overhead"]
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['steps_each']} | {t['off']:.4f} | {t['error']:.4f} "
            f"| {t['skip_batch']:.4f} | **{o['error']:+.2%}** | **{o['skip_batch']:+.2%}** | {o['off_again']:+.2%} "
            f"| {w['error']:+.2%} / {w['skip_batch']:+.2%} / {w['off_again']:+.2%} "
            f"| {r['check_ops_s']['error'] * 1e3:.3f} / "
            f"{r['check_ops_s']['skip_batch'] * 1e3:.3f} ms ({r['check_ops_share']['error']:.2%} / "
            f"{r['check_ops_share']['skip_batch']:.2%}) |"
        )
    lines += [
        "",
        "The same trainer, model and optimizer run steps with the checks off (a pass-through guard), with "
        "`nonfinite='error'`, with `nonfinite='skip_batch'` and off again (A/A control), interleaved step by step "
        "in seeded random order per block. s/step: medians of per-step process CPU time on CPU (what the step "
        "computed; the shared machine's other processes do not count), wall time on CUDA. Overhead: median over "
        "blocks of the step's time over the same block's unchecked step, - 1; the A/A control's value is the "
        "noise floor of that comparison. \"check ops alone\" times only the checks on one step's tensors (float "
        "inputs, teacher and student outputs, loss, and under skip_batch the in-place teacher clean-up and the "
        "input copy): the precise figure of what the checks add.", "",
        "The checks do no host sync: the record is read at logging, saving and evaluation only.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = {
        "command": f"python -m bench.bench_finite_check --steps {args.steps} --rounds {args.rounds} "
        f"--threads {args.threads} --device {args.device}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, nproc {os.cpu_count()}, {args.threads} torch threads, torch "
        f"{torch.__version__}" + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "device": args.device, "goal_overhead": GOAL,
        "models": [measure(m, args.steps, args.rounds, args.device) for m in args.models],
    }
    RESULTS.mkdir(exist_ok=True)
    stem = "finite_check" if args.device == "cpu" else "finite_check_cuda"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
