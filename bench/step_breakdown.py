"""Where a fake-quant and a SQAKD training step spend their time over an FP fine-tuning step (CPU workloads).

    python -m bench.step_breakdown --threads 1        # writes bench/results/step_breakdown_cpu.{json,md}
    python -m bench.step_breakdown --preset smoke --out DIR    # seconds-long mechanics check

Each row is one optimizer step (or one part of it) on the ``cpu`` preset of :mod:`bench.gpu_workloads`, timed in
turn with the others (interleaved, CPU time of this process), so each difference is the cost of one thing:

* ``fp``: the FP fine-tuning step (cross-entropy, backward, fused AdamW);
* ``student, quantizers bypassed``: the W4A4 LSQ student with every quantizer passing its input through (the
  wrapper modules and the extra optimizer parameters);
* ``weights only`` / ``activations only``: one kind of quantizer on, the other bypassed;
* ``fake_quant``: every quantizer on; ``..., fused``: with the fused CPU kernels (``SQAKD_CPU_FUSED=1``);
* ``teacher forward``: the teacher alone as ``SQAKDTrainer`` runs it (eval mode, no grad, channels_last for
  convolutional teachers on CPU);
* ``KD loss`` / ``FP loss``: forward and backward of the distillation loss on fixed logits, and of the FP step's
  cross-entropy on the same logits;
* ``sqakd``: the full ``SQAKDTrainer.training_step`` + AdamW (``..., fused``: with the fused kernels).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from bench.gpu_workloads import (PRESETS, RESULTS, _describe, _student, _supervised_loss, _supervised_step,
                                 _with_fused_kernels, build_workload, make_step, time_interleaved, write_results)


def _bypassed(student: torch.nn.Module, weights: bool, acts: bool) -> torch.nn.Module:
    for name, module in student.named_modules():
        if name.endswith("weight_quantizer"):
            module.bypass = weights
        elif name.endswith("input_quantizer"):
            module.bypass = acts
    return student


def _loss_steps(fp: torch.nn.Module, inputs, labels) -> Dict[str, Callable[[], None]]:
    """Forward + backward of the KD loss and of the FP cross-entropy on the teacher's (fixed) logits."""
    from sqakd_hf.model_io import call_model, output_tensor
    from sqakd_hf.training.losses import kd_kl_loss

    with torch.no_grad():
        teacher = output_tensor(call_model(fp.eval(), inputs), "logits")
    student = (teacher + 0.1 * torch.randn_like(teacher)).requires_grad_()

    class _Logits(torch.nn.Module):
        def forward(self, **_: Any):
            return {"logits": student}

    def kd() -> None:
        kd_kl_loss(student, teacher, 4.0).backward()
        student.grad = None

    def ce() -> None:
        _supervised_loss(_Logits(), inputs, labels).backward()
        student.grad = None

    return {"KD loss (fwd + bwd)": kd, "FP loss (fwd + bwd)": ce}


def _teacher_forward(fp: torch.nn.Module, inputs) -> Callable[[], None]:
    from sqakd_hf import SQAKDTrainer, SQAKDTrainingArguments

    student = _student(fp, inputs)
    args = SQAKDTrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, save_strategy="no",
                                  disable_tqdm=True)
    trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(fp), args=args)
    return lambda: trainer.teacher_outputs(inputs)


def breakdown(workload: str, reps: int, preset: str = "cpu") -> Dict[str, Any]:
    device = torch.device("cpu")
    fp, inputs, labels = build_workload(workload, preset, device)
    steps: Dict[str, Callable[[], None]] = {"fp": _supervised_step(copy.deepcopy(fp), inputs, labels, device, False)}
    for name, (w, a) in {"student, quantizers bypassed": (True, True), "weights only": (False, True),
                         "activations only": (True, False), "fake_quant": (False, False)}.items():
        steps[name] = _supervised_step(_bypassed(_student(fp, inputs), w, a), inputs, labels, device, False)
    steps["fake_quant, fused"] = _with_fused_kernels(_supervised_step(_student(fp, inputs), inputs, labels, device,
                                                                      False))
    steps["teacher forward"] = _teacher_forward(fp, inputs)
    steps.update(_loss_steps(fp, inputs, labels))
    for variant in ("sqakd", "sqakd_fused"):
        steps[variant.replace("_fused", ", fused")] = make_step(variant, copy.deepcopy(fp), inputs, labels, device,
                                                                False)
    times = time_interleaved(steps, reps, device, warmup=PRESETS[preset]["warmup"], cpu_time=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": _describe(workload, preset), "median_s": med, "times_s": times}


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"# Where the step time goes ({result['preset']} preset, {result['threads']} thread(s), CPU time, "
             "interleaved)", "",
             f"`python -m bench.step_breakdown --threads {result['threads']}`, torch {result['torch']}"
             + (f"; {result['note']}" if result.get("note") else ""), ""]
    for data in result["workloads"].values():
        med = data["median_s"]
        fp = med["fp"]
        lines += [f"## {data['config']}", "", "| step or part | median (ms) | x FP step | over FP (ms) |",
                  "|---|---|---|---|"]
        for name, s in med.items():
            over = f"{(s - fp) * 1e3:+.1f}" if name in _WHOLE_STEPS else ""
            lines.append(f"| {name} | {s * 1e3:.1f} | {s / fp:.3f} | {over} |")
        lines.append("")
    return "\n".join(lines)


_WHOLE_STEPS = ("student, quantizers bypassed", "weights only", "activations only", "fake_quant", "fake_quant, fused",
                "sqakd", "sqakd, fused")


def main(argv: Optional[List[str]] = None, log=print) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="vision,llama")
    p.add_argument("--preset", choices=("cpu", "smoke"), default="cpu", help="smoke: tiny models (mechanics only)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default: the preset's)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's setting)")
    p.add_argument("--note", default="", help="free text for the header (e.g. the machine's load)")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    result: Dict[str, Any] = {"preset": a.preset, "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "note": a.note, "workloads": {}}
    for w in a.workloads.split(","):
        result["workloads"][w] = breakdown(w, a.reps or PRESETS[a.preset]["reps"], a.preset)
        log(f"[breakdown] {w}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in result["workloads"][w]["median_s"].items()))
    return write_results(Path(a.out), f"step_breakdown_{a.preset}", result, markdown(result), log, "breakdown")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
