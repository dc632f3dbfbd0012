"""Cost: our W4A8 LSQ fake-quant step vs torchao's QAT (int4 weights, int8 activations) vs FP,
forward + backward on the MiniLM-L6 classifier, timed interleaved in one process; plus the
SQAKD-vs-FP step cost from ``bench/bench_kd_cost.py`` when that benchmark exists."""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from sqakd_hf import QuantConfig, calibrate, quantize_model

BENCH = Path(__file__).parent


def _torchao_student(fp: nn.Module) -> nn.Module:
    """torchao QAT "prepare": int4 per-channel symmetric weights, int8 per-token asymmetric dynamic
    activations (torchao's 8da4w scheme) on every Linear except the classifier (kept FP, as ours)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    cfg = QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                    weight_config=IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True), step="prepare")
    model = copy.deepcopy(fp)
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "classifier")
    return model


def _step(model: nn.Module, batch: Dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    F.cross_entropy(model(**batch).logits, labels).backward()
    for p in model.parameters():
        p.grad = None


def _time(variants: Dict[str, nn.Module], batch, labels, reps: int) -> Dict[str, Dict[str, float]]:
    for m in variants.values():  # warm-up
        m.train()
        _step(m, batch, labels)
    times: Dict[str, list] = {k: [] for k in variants}
    for _ in range(reps):  # interleaved: load drift hits every variant alike
        for k, m in variants.items():
            t0 = time.perf_counter()
            _step(m, batch, labels)
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v} for k, v in times.items()}


def peer_comparison(batch_size: int, seq_len: int, reps: int, log=print) -> Dict[str, Any]:
    """Step times of FP, sqakd_hf W4A8 LSQ and torchao W4A8 QAT on the same model and batch."""
    from transformers import AutoModelForSequenceClassification

    from .quality_text import model_dir

    torch.manual_seed(0)
    fp = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=5)
    batch = {"input_ids": torch.randint(1000, 30000, (batch_size, seq_len)),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    labels = torch.randint(0, 5, (batch_size,))
    ours = calibrate(quantize_model(copy.deepcopy(fp), QuantConfig(method="lsq", weight_bits=4, act_bits=8)), [batch])
    variants: Dict[str, nn.Module] = {"fp": fp, "sqakd_lsq_w4a8": ours}
    torchao: Dict[str, Any] = {}
    try:
        import torchao as _tao

        torchao["version"] = _tao.__version__
        variants["torchao_qat_w4a8"] = _torchao_student(fp)
        _step(variants["torchao_qat_w4a8"], batch, labels)
        torchao["status"] = "ok"
    except Exception as err:  # report why, keep the rest of the benchmark
        variants.pop("torchao_qat_w4a8", None)
        torchao["status"] = f"failed: {type(err).__name__}: {err}"
    log(f"[cost] torchao: {torchao}")
    timed = _time(variants, batch, labels, reps)
    fp_s = timed["fp"]["median_s"]
    for v in timed.values():
        v["ratio_vs_fp"] = v["median_s"] / fp_s
    log("[cost] " + ", ".join(f"{k} {v['median_s']:.2f} s ({v['ratio_vs_fp']:.2f}x)" for k, v in timed.items()))
    return {
        "model": "all-MiniLM-L6-v2 BertForSequenceClassification (22.7M params, 5 labels)",
        "batch": f"batch {batch_size}, seq {seq_len}", "reps": reps,
        "metric": "median wall seconds of one forward + backward (cross-entropy), interleaved",
        "ours": "LSQ W4A8: per-channel learned weight steps, per-tensor static learned activation steps; "
                "classifier FP",
        "torchao_config": "QATConfig(activation_config=IntxFakeQuantizeConfig(int8, per_token, asymmetric, dynamic), "
                          "weight_config=IntxFakeQuantizeConfig(int4, per_channel, symmetric)); classifier FP",
        "torchao": torchao,
        "timings": timed,
    }


def kd_cost(mode: str, timeout_s: int, log=print) -> Dict[str, Any]:
    """SQAKD-vs-FP step cost from ``bench/bench_kd_cost.py`` (owned elsewhere), if it exists.

    Full mode runs it (``python -m bench.bench_kd_cost``); quick mode runs it only if it offers
    ``--quick`` (its default run takes minutes) and otherwise reports its last committed results."""
    script = BENCH / "bench_kd_cost.py"
    if not script.is_file():
        return {"status": "bench/bench_kd_cost.py does not exist (yet): SQAKD-vs-FP step cost not measured"}
    cmd = [sys.executable, "-m", "bench.bench_kd_cost"]
    if mode == "quick":
        helptext = subprocess.run(cmd + ["--help"], capture_output=True, text=True, cwd=BENCH.parent,
                                  timeout=120).stdout
        if "--quick" not in helptext:
            return {"status": "not re-run in quick mode (it has no --quick and takes minutes); its last results "
                              "(bench/results/kd_cost.md) are quoted"}
        cmd.append("--quick")
    elif mode != "full":
        return {"status": f"not run in {mode} mode"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCH.parent, timeout=timeout_s)
        rc, out = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, out = None, f"timed out after {timeout_s} s"
    log(f"[cost] bench_kd_cost: rc={rc}")
    return {"status": "ran in this run" if rc == 0 else "failed", "command": " ".join(["python"] + cmd[1:]),
            "returncode": rc, "wall_s": time.perf_counter() - t0, "output_tail": out}


def run(batch_size: int, seq_len: int, reps: int, mode: str, kd_timeout_s: int = 1800, log=print) -> Dict[str, Any]:
    return {"peer": peer_comparison(batch_size, seq_len, reps, log), "kd_cost": kd_cost(mode, kd_timeout_s, log)}
