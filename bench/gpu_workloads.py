"""Realistic QAT workloads, side by side: FP fine-tuning, fake-quant, SQAKD, SQAKD with the teacher cache, torchao QAT.

    python -m bench.gpu_workloads                      # the GPU run: writes bench/results/workloads_gpu_cuda.{json,md}
    python -m bench.gpu_workloads --preset cpu --device cpu   # CPU-sized models: workloads_cpu_cpu.{json,md}
    python -m bench.gpu_workloads --smoke --out DIR    # seconds-long mechanics check (tests/test_bench_smoke.py)

Workloads (``--preset gpu``): timm resnet50 at 224 px, batch 128; a ~135M-parameter Llama (SmolLM-135M shape:
hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536, vocab 49152) at sequence 1024, batch 8. bf16
autocast on CUDA (fp32 master weights, AdamW), fp32 on CPU.

Variants, each one optimizer step on a fixed batch:

* ``fp``: the FP model, cross-entropy with labels (next-token loss for the LM), backward, AdamW (fused, as
  every variant: the transformers Trainer's default optimizer, which ``SQAKDTrainer`` uses).
* ``fake_quant``: the W4A4 LSQ student (``quantize_model`` + ``calibrate``), same loss and optimizer.
* ``sqakd``: ``SQAKDTrainer.training_step`` (teacher forward, student forward/backward, KD loss) + AdamW.
* ``sqakd_cache``: the same step on a batch that carries the teacher's cached outputs (what
  ``cache_teacher_outputs=True`` feeds every step after the cache is built: full logits for the classifier,
  top-64 log-probabilities + rest mass per token for the LM): no teacher forward.
* ``torchao_qat``: torchao's QAT "prepare" (int8 per-token dynamic activations, int4 per-channel weights) on the
  Linear layers (torchao fake-quantizes Linear only: absent for resnet50), same loss as ``fp``.
* ``fake_quant_fused``, ``sqakd_fused``, ``sqakd_cache_fused`` (CPU only): the same steps with the fused CPU
  fake-quant kernels on (``SQAKD_CPU_FUSED=1``, :mod:`sqakd_hf.quantizers.cpu_fused`; compiled in the warm-up).

On CUDA each variant runs alone (built, warm-up steps, timed steps, freed): median wall time per step
(synchronised) and peak memory (``torch.cuda.max_memory_allocated``). On CPU the variants are timed in turn
(interleaved, so that load drift on a shared machine hits all alike), in CPU time of this process (run with
``--threads 1``), and memory is not measured. Goals (issue "Speed at scale"): SQAKD
<= 1.5x FP, fake-quant <= 1.2x FP, peak memory <= 1.3x FP on GPU; with the cache <= 1.1x the fake-quant step.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("fp", "fake_quant", "sqakd", "sqakd_cache", "torchao_qat")
#: CPU only: the same steps with the fused CPU fake-quant kernels on (``sqakd_hf.quantizers.cpu_fused``)
FUSED_VARIANTS = ("fake_quant_fused", "sqakd_fused", "sqakd_cache_fused")
_FUSED = "_fused"
TOP_K = 64

#: per preset: (resnet model name, image size, batch) and the Llama config / sequence / batch
PRESETS: Dict[str, Dict[str, Any]] = {
    "gpu": {"vision": ("resnet50", 224, 128),
            "llama": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3), 1024, 8),
            "warmup": 3, "reps": 10},
    "cpu": {"vision": ("resnet18", 32, 64),
            "llama": (dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2), 128, 4),
            "warmup": 2, "reps": 9},
    "smoke": {"vision": ("resnet18", 32, 2),
              "llama": (dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2), 16, 2),
              "warmup": 1, "reps": 1},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: Dict[str, Callable[[], None]], reps: int, device: Any, warmup: int = 1,
                     cpu_time: bool = False) -> Dict[str, List[float]]:
    """Seconds per call of each step, called in turn ``reps`` times (after ``warmup`` rounds), synchronised: wall
    time, or with ``cpu_time`` (CPU only) this process's CPU time (``time.process_time``: with one torch thread,
    other processes on a shared machine do not count; contention for caches and memory bandwidth still does)."""
    device = torch.device(device)
    clock = time.process_time if cpu_time and device.type == "cpu" else time.perf_counter
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            _sync(device)
            t0 = clock()
            step()
            _sync(device)
            times[k].append(clock() - t0)
    return times


# ---- workloads: (FP model, batch without labels, labels, loss of FP-style variants) ---------------------------
def build_workload(name: str, preset: str, device: torch.device):
    torch.manual_seed(0)
    if name == "vision":
        import timm

        arch, size, batch = PRESETS[preset]["vision"]
        model = timm.create_model(arch, pretrained=False, num_classes=1000)
        inputs = {"pixel_values": torch.randn(batch, 3, size, size)}
        labels = torch.randint(0, 1000, (batch,))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg, seq, batch = PRESETS[preset]["llama"]
        model = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=max(seq, 64), tie_word_embeddings=True))
        model.config.use_cache = False
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        labels = ids
    return model.to(device), {k: v.to(device) for k, v in inputs.items()}, labels.to(device)


def _supervised_loss(model: nn.Module, inputs: Dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    from sqakd_hf.model_io import call_model, output_tensor

    logits = output_tensor(call_model(model, inputs), "logits")
    if logits.dim() == 3:  # next-token loss
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _supervised_step(model: nn.Module, inputs, labels, device, bf16: bool) -> Callable[[], None]:
    # fused AdamW: the transformers Trainer's default (adamw_torch_fused), which the SQAKD variants step with
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    model.train()

    def step() -> None:
        with _autocast(device, bf16):
            loss = _supervised_loss(model, inputs, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _student(fp: nn.Module, inputs: Dict[str, torch.Tensor]) -> nn.Module:
    from sqakd_hf import QuantConfig, calibrate, quantize_model
    from sqakd_hf.model_io import call_input

    student = quantize_model(copy.deepcopy(fp).train(), QuantConfig(method="lsq", weight_bits=4, act_bits=4))
    calibrate(student, [call_input(student, inputs)])
    return student


def _sqakd_step(fp: nn.Module, inputs, device, bf16: bool, cached: bool) -> Callable[[], None]:
    from sqakd_hf import SQAKDTrainer, SQAKDTrainingArguments
    from sqakd_hf.model_io import unwrap
    from sqakd_hf.training.teacher_cache import CACHE_PREFIX, _topk_rows

    student = _student(fp, inputs)
    args = SQAKDTrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=device.type == "cpu",
                                  save_strategy="no", disable_tqdm=True, learning_rate=1e-5, bf16=bf16)
    trainer = SQAKDTrainer(model=student, teacher_model=fp.eval(), args=args)
    opt = trainer.create_optimizer()
    model = unwrap(trainer.model)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is bypassed here
    batch = dict(inputs)
    if cached:  # what the cache's collator adds to every batch; the teacher is then never called
        with torch.no_grad(), _autocast(device, bf16):
            from sqakd_hf.model_io import output_tensor

            t = output_tensor(trainer.teacher_outputs(inputs), "logits", "teacher")
        if t.dim() == 3 and t.shape[-1] > TOP_K:
            rows = _topk_rows(t.reshape(-1, t.shape[-1]), TOP_K, args.temperature)
            batch.update({CACHE_PREFIX + k: v.reshape(*t.shape[:-1], *v.shape[1:]).to(device) for k, v in rows.items()})
        else:
            batch[CACHE_PREFIX + "outputs"] = t
        trainer.teacher = None  # would fail loudly if the cached step still ran the teacher

    def step() -> None:
        trainer.training_step(model, dict(batch))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _torchao_step(fp: nn.Module, inputs, labels, device, bf16: bool) -> Optional[Callable[[], None]]:
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError:
        return None
    linears = [n for n, m in fp.named_modules() if isinstance(m, nn.Linear) and n not in ("lm_head", "fc", "head")]
    if not linears:
        return None
    cfg = QATConfig(activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
                    weight_config=IntxFakeQuantizeConfig(torch.int4, "per_channel", is_symmetric=True), step="prepare")
    model = copy.deepcopy(fp)
    quantize_(model, cfg, filter_fn=lambda m, fqn: fqn in linears)
    return _supervised_step(model, inputs, labels, device, bf16)


def _with_fused_kernels(step: Optional[Callable[[], None]]) -> Optional[Callable[[], None]]:
    """``step`` with the fused CPU fake-quant kernels on while it runs (off again for the interleaved others)."""
    from sqakd_hf.quantizers import cpu_fused

    if step is None:
        return None

    def fused_step() -> None:
        with cpu_fused.use(True):
            step()

    return fused_step


def make_step(variant: str, fp: nn.Module, inputs, labels, device, bf16: bool) -> Optional[Callable[[], None]]:
    """One optimizer step of ``variant`` (None: not applicable to this model)."""
    if variant.endswith(_FUSED):
        return _with_fused_kernels(make_step(variant[: -len(_FUSED)], fp, inputs, labels, device, bf16))
    if variant == "fp":
        return _supervised_step(fp, inputs, labels, device, bf16)
    if variant == "fake_quant":
        return _supervised_step(_student(fp, inputs), inputs, labels, device, bf16)
    if variant in ("sqakd", "sqakd_cache"):
        return _sqakd_step(fp, inputs, device, bf16, cached=variant == "sqakd_cache")
    if variant == "torchao_qat":
        return _torchao_step(fp, inputs, labels, device, bf16)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


# ---- measuring --------------------------------------------------------------------------------------------------
def measure(workload: str, variant: str, preset: str, device: torch.device, bf16: bool) -> Optional[Dict[str, Any]]:
    """Median step time (s) and peak memory (MiB, CUDA only) of one variant run alone."""
    gc.collect()
    fp, inputs, labels = build_workload(workload, preset, device)
    step = make_step(variant, fp, inputs, labels, device, bf16)
    del fp, inputs, labels  # what the step needs, its closure holds (fake-quant: the student, not the FP model)
    if step is None:
        return None
    gc.collect()
    if device.type == "cuda":  # peak over the steps: resident weights, gradients, optimizer state, activations
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = time_interleaved({variant: step}, PRESETS[preset]["reps"], device, PRESETS[preset]["warmup"])[variant]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    del step
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "peak_mib": peak}


def measure_interleaved(workload: str, variants: List[str], preset: str, device: torch.device,
                        bf16: bool) -> Dict[str, Optional[Dict[str, Any]]]:
    """All variants built at once and stepped in turn (one step each per round), so that load drift on a shared CPU
    hits all alike; time only (no memory)."""
    steps: Dict[str, Callable[[], None]] = {}
    for v in variants:
        fp, inputs, labels = build_workload(workload, preset, device)
        step = make_step(v, fp, inputs, labels, device, bf16)
        if step is not None:
            steps[v] = step
    times = time_interleaved(steps, PRESETS[preset]["reps"], device, PRESETS[preset]["warmup"], cpu_time=True)
    return {v: ({"median_s": statistics.median(times[v]), "min_s": min(times[v]), "times_s": times[v], "peak_mib": None}
                if v in times else None) for v in variants}


def run(preset: str, device: torch.device, workloads: List[str], variants: List[str], log=print,
        interleave: Optional[bool] = None) -> Dict[str, Any]:
    """Every workload x variant; ``interleave`` (default: on CPU) times the variants in turn, else each alone with
    its peak memory."""
    bf16 = device.type == "cuda"
    interleave = device.type == "cpu" if interleave is None else interleave
    out: Dict[str, Any] = {"preset": preset, "device": str(device), "bf16": bf16, "torch": torch.__version__,
                           "timing": ("interleaved" if interleave else "each variant alone")
                           + (", wall time" if device.type == "cuda" else ", CPU time of the process"),
                           "threads": torch.get_num_threads(),
                           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                           "workloads": {}}
    for w in workloads:
        rows: Dict[str, Any] = measure_interleaved(w, variants, preset, device, bf16) if interleave else {}
        for v in variants:
            if not interleave:
                rows[v] = measure(w, v, preset, device, bf16)
            r = rows[v]
            log(f"[workloads] {w} {v}: " + ("n/a" if r is None else f"{r['median_s'] * 1e3:.1f} ms"
                                            + (f", peak {r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else "")))
        out["workloads"][w] = {"config": _describe(w, preset), "variants": rows, "ratios": _ratios(rows)}
    return out


def _describe(workload: str, preset: str) -> str:
    if workload == "vision":
        arch, size, batch = PRESETS[preset]["vision"]
        return f"timm {arch}, {size} px, batch {batch}"
    cfg, seq, batch = PRESETS[preset]["llama"]
    n = cfg["num_hidden_layers"]
    return f"Llama (hidden {cfg['hidden_size']}, {n} layers, vocab {cfg['vocab_size']}), seq {seq}, batch {batch}"


def _ratios(rows: Dict[str, Any]) -> Dict[str, Optional[float]]:
    def ratio(a: str, b: str, key: str = "median_s") -> Optional[float]:
        ra, rb = rows.get(a), rows.get(b)
        if not ra or not rb or ra.get(key) is None or rb.get(key) is None:
            return None
        return ra[key] / rb[key]

    return {"fake_quant_vs_fp": ratio("fake_quant", "fp"), "sqakd_vs_fp": ratio("sqakd", "fp"),
            "sqakd_cache_vs_fake_quant": ratio("sqakd_cache", "fake_quant"),
            "sqakd_vs_torchao_qat": ratio("sqakd", "torchao_qat"),
            "fake_quant_fused_vs_fp": ratio("fake_quant_fused", "fp"), "sqakd_fused_vs_fp": ratio("sqakd_fused", "fp"),
            "sqakd_cache_fused_vs_fake_quant_fused": ratio("sqakd_cache_fused", "fake_quant_fused"),
            "sqakd_peak_mem_vs_fp": ratio("sqakd", "fp", "peak_mib")}


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"# QAT workloads ({result['preset']} preset, {result['gpu'] or result['device']}, "
             f"{'bf16 autocast' if result['bf16'] else 'fp32'}, torch {result['torch']})", ""]
    if result.get("note"):
        lines += [f"Run: {result['note']}.", ""]
    for w, data in result["workloads"].items():
        rows = data["variants"]
        fp = rows.get("fp") or {}
        lines += [f"## {data['config']}", "", f"Timing: {result.get('timing')}.", "",
                  "| variant | median step (ms) | min (ms) | x FP (median) | peak memory (MiB) | x FP |",
                  "|---|---|---|---|---|---|"]
        for v, r in rows.items():
            if r is None:
                lines.append(f"| {v} | n/a | | | | |")
                continue
            xt = r["median_s"] / fp["median_s"] if fp else float("nan")
            mem = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            xm = "" if r["peak_mib"] is None or not fp.get("peak_mib") else f"{r['peak_mib'] / fp['peak_mib']:.2f}"
            lines.append(f"| {v} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | {xt:.2f} | {mem} | {xm} |")
        rt = data["ratios"]
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        lines += ["", f"Goals: fake-quant/FP {fmt(rt['fake_quant_vs_fp'])} (<= 1.2 GPU, <= 1.15 CPU); SQAKD/FP "
                  f"{fmt(rt['sqakd_vs_fp'])} (<= 1.5 GPU, <= 1.3 CPU); cached SQAKD/fake-quant "
                  f"{fmt(rt['sqakd_cache_vs_fake_quant'])} (<= 1.1); SQAKD/torchao QAT {fmt(rt['sqakd_vs_torchao_qat'])} "
                  f"(< 1); SQAKD peak memory/FP {fmt(rt['sqakd_peak_mem_vs_fp'])} (<= 1.3).", ""]
        if rt.get("fake_quant_fused_vs_fp") is not None:
            lines[-1:] = [f"With the fused CPU kernels (`SQAKD_CPU_FUSED=1`): fake-quant/FP "
                          f"{fmt(rt['fake_quant_fused_vs_fp'])} (<= 1.15); SQAKD/FP {fmt(rt['sqakd_fused_vs_fp'])} "
                          f"(<= 1.3); cached SQAKD/fake-quant {fmt(rt['sqakd_cache_fused_vs_fake_quant_fused'])} "
                          "(<= 1.1).", ""]
    return "\n".join(lines)


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--smoke", action="store_true", help="= --preset smoke --device cpu (mechanics only)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--workloads", default="vision,llama")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, from {', '.join(VARIANTS + FUSED_VARIANTS)} (default: all; the fused ones "
                   "on CPU only)")
    p.add_argument("--out", default=str(RESULTS), help="folder for workloads_<preset>_<device>.{json,md}")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--note", default="", help="free text for the header (e.g. the machine's load during the run)")
    a = p.parse_args(argv)
    if a.smoke:
        a.preset, a.device = "smoke", a.device or "cpu"
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.variants is None:
        a.variants = ",".join(VARIANTS + (FUSED_VARIANTS if a.device == "cpu" else ()))
    a.workloads, a.variants = a.workloads.split(","), a.variants.split(",")
    for v in a.variants:
        if v not in VARIANTS + FUSED_VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {', '.join(VARIANTS + FUSED_VARIANTS)}")
    for w in a.workloads:
        if w not in ("vision", "llama"):
            p.error(f"unknown workload {w!r}; choose from vision, llama")
    return a


def main(argv: Optional[List[str]] = None, log=print) -> Path:
    a = parse(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    result = run(a.preset, device, a.workloads, a.variants, log=log)
    if a.note:
        result["note"] = a.note
    return write_results(Path(a.out), f"workloads_{a.preset}_{device.type}", result, markdown(result), log, "workloads")


def write_results(out: Path, stem: str, result: Dict[str, Any], text: str, log=print, tag: str = "bench") -> Path:
    """``out/stem.json`` (the result) and ``out/stem.md`` (``text``); returns the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(text)
    log(f"[{tag}] wrote {out / stem}.json and .md")
    return out / f"{stem}.md"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
