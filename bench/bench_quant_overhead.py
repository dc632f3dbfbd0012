"""Step time (forward + backward) of fake-quant W4A4 models vs the same FP model, side by side.

    python -m bench.bench_quant_overhead [--reps 10]

Models: timm resnet18 at 32x32, batch 128, and a BERT-mini (4 layers, hidden 256) at batch 32,
seq 128, on CPU. Four variants per model are timed interleaved in one run: FP, sqakd_hf's
fused quantizers (eager, and with the fused CPU kernels of ``SQAKD_CPU_FUSED=1``), and a naive composition (``x + (round(x) - x).detach()`` with autograd doing
the rest) as a reference point. Writes bench/results/quant_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
from transformers import BertConfig, BertForSequenceClassification

import sqakd_hf
from sqakd_hf import QuantConfig, calibrate, quantize_model
from sqakd_hf.quantizers import cpu_fused
from sqakd_hf.quantizers.lsq import LSQQuantizer

RESULTS = Path(__file__).parent / "results"


def _naive_lsq_quantize(self: LSQQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Textbook LSQ: composed autograd ops, STE by the detach trick (what we compare against)."""
    g = 1.0 / (self.features_per_sample(x) * self.qmax) ** 0.5
    s = (self.scale - self.scale * g).detach() + self.scale * g
    xs = torch.clamp(x / s, self.qmin, self.qmax)
    return (xs + (xs.round() - xs).detach()) * s


class _Naive(LSQQuantizer):
    quantize = _naive_lsq_quantize


def _make_naive(model: torch.nn.Module) -> torch.nn.Module:
    for _, q in sqakd_hf.named_quantizers(model):
        if isinstance(q, LSQQuantizer):
            q.__class__ = _Naive
    return model


def _step(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    logits = out.logits if hasattr(out, "logits") else out
    logits.float().pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None


def _timed_step(name: str, model, batch) -> None:
    """One step; the ``cpu_fused`` variant with the fused CPU fake-quant kernels on (``SQAKD_CPU_FUSED=1``)."""
    with cpu_fused.use(name == "sqakd_cpu_fused"):
        _step(model, batch)


def _time_variants(variants: dict, batch, reps: int) -> dict:
    for k, m in variants.items():  # warm-up (compiles the fused kernels)
        m.train()
        _timed_step(k, m, batch)
    times = {k: [] for k in variants}
    for _ in range(reps):  # interleaved so drift hits all variants alike
        for k, m in variants.items():
            t0 = time.perf_counter()
            _timed_step(k, m, batch)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _variants(fp: torch.nn.Module, calib, bits: int = 4) -> dict:
    cfg = QuantConfig(method="lsq", weight_bits=bits, act_bits=bits)
    fused = calibrate(quantize_model(copy.deepcopy(fp), cfg), [calib])
    naive = _make_naive(copy.deepcopy(fused))
    return {"fp": fp, "sqakd_fused": fused, "sqakd_cpu_fused": fused, "naive_ste": naive}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []

    resnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    x = torch.randn(128, 3, 32, 32)
    t = _time_variants(_variants(resnet, x), x, args.reps)
    rows.append({"model": "timm resnet18", "input": "32x32, batch 128", **t})

    bert_cfg = BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=1024, num_labels=5)
    bert = BertForSequenceClassification(bert_cfg)
    batch = {"input_ids": torch.randint(0, 30522, (32, 128)), "attention_mask": torch.ones(32, 128, dtype=torch.long)}
    t = _time_variants(_variants(bert, batch), batch, args.reps)
    rows.append({"model": "BERT-mini (4x256)", "input": "batch 32, seq 128", **t})

    for r in rows:
        r["ratio_sqakd_vs_fp"] = r["sqakd_fused"] / r["fp"]
        r["ratio_naive_vs_fp"] = r["naive_ste"] / r["fp"]
        r["ratio_cpu_fused_vs_fp"] = r["sqakd_cpu_fused"] / r["fp"]
    meta = {
        "command": "python -m bench.bench_quant_overhead --reps %d" % args.reps
        + (f" --threads {args.threads}" if args.threads > 0 else ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "metric": "median seconds per training step (forward + backward), W4A4 LSQ, first/last layer FP",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Fake-quant step-time overhead (W4A4 LSQ vs FP)", "",
        f"`{meta['command']}` — {meta['date']} — {meta['machine']}", "",
        "| model | input | FP s/step | sqakd s/step | sqakd + fused CPU kernels s/step | naive STE s/step | sqakd / FP "
        "| fused CPU kernels / FP | naive / FP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['fp']:.3f} | {r['sqakd_fused']:.3f} | {r['sqakd_cpu_fused']:.3f} "
            f"| {r['naive_ste']:.3f} | **{r['ratio_sqakd_vs_fp']:.2f}x** | **{r['ratio_cpu_fused_vs_fp']:.2f}x** "
            f"| {r['ratio_naive_vs_fp']:.2f}x |"
        )
    lines += ["", "sqakd: the library's quantizers (eager fast path); fused CPU kernels: the same with "
              "`SQAKD_CPU_FUSED=1` (torch.compile'd forward/backward on large tensors); naive STE: textbook LSQ "
              "composed of autograd ops."]
    (RESULTS / "quant_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
