"""results.json / results.md / PNG plots from the benchmark sections.

``results.json`` keeps one entry per mode (``runs.quick``, ``runs.full``); a run replaces its own
entry and ``results.md`` is regenerated from all entries, so a quick and a full run can sit
side by side. The hand-written interpretation in ``bench/analysis.md`` (if any) is appended.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

ANALYSIS = Path(__file__).parent / "analysis.md"
KD_COST_MD = Path(__file__).parent / "results" / "kd_cost.md"  # written by bench_kd_cost
MODES = ("full", "quick", "micro")
WAYS = (("ptq", "PTQ"), ("qat", "labeled QAT"), ("sqakd", "SQAKD"))


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _pt(d: Dict[str, float]) -> str:
    return f"{100 * d['delta']:+.1f} ± {200 * d['se']:.1f}"


def collapsed(row: Dict[str, Any], num_classes: int) -> bool:
    """Both trained students below twice chance: the comparison says nothing about labels vs KD."""
    return max(row["qat"]["accuracy"], row["sqakd"]["accuracy"]) < 2.0 / num_classes


def verdict(d: Dict[str, float]) -> str:
    """``beats`` / ``ties`` / ``loses``: the paired difference against twice its standard error."""
    if d["delta"] > 2 * d["se"]:
        return "beats"
    if d["delta"] < -2 * d["se"]:
        return "loses"
    return "ties"


# ---- tables ---------------------------------------------------------------------------------
def quality_table(section: Dict[str, Any]) -> List[str]:
    lines = [
        "| method | bits | PTQ acc | QAT acc | SQAKD acc | SQAKD − QAT (pt, ±2 SE) | SQAKD − PTQ (pt) "
        "| agreement PTQ / QAT / SQAKD | KD loss PTQ / QAT / SQAKD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        p = r["paired"]
        agree = " / ".join(_pct(r[w]["teacher_agreement"]) for w, _ in WAYS)
        kd = " / ".join(f"{r[w]['kd_loss']:.3f}" for w, _ in WAYS)
        lines.append(
            f"| {r['method']} | {r['bits']} | {_pct(r['ptq']['accuracy'])} | {_pct(r['qat']['accuracy'])} "
            f"| **{_pct(r['sqakd']['accuracy'])}** | {_pt(p['sqakd_minus_qat'])} ({verdict(p['sqakd_minus_qat'])}) "
            f"| {100 * p['sqakd_minus_ptq']['delta']:+.1f} | {agree} | {kd} |"
        )
    return lines


def answer(section: Dict[str, Any]) -> List[str]:
    """Per bit-width: how often SQAKD reaches labeled QAT, and its margin over PTQ."""
    data = section["data"]
    classes = data.get("num_classes") or len(data.get("classes", [])) or 10
    by_bits: Dict[str, List[Dict[str, Any]]] = {}
    for r in section["rows"]:
        by_bits.setdefault(r["bits"], []).append(r)
    lines = []
    for bits, rows in by_bits.items():
        dead = [r["method"] for r in rows if collapsed(r, classes)]
        live = [r for r in rows if not collapsed(r, classes)]
        verdicts = [verdict(r["paired"]["sqakd_minus_qat"]) for r in live]
        counts = {v: verdicts.count(v) for v in ("beats", "ties", "loses")}
        vs_ptq = [100 * r["paired"]["sqakd_minus_ptq"]["delta"] for r in rows]
        detail = ", ".join(f"{r['method']} {_pt(r['paired']['sqakd_minus_qat'])}" for r in live)
        text = f"- **{bits}**: "
        if live:
            pairs = [r["paired"]["sqakd_minus_qat"] for r in live]
            pooled = {"delta": sum(p["delta"] for p in pairs) / len(pairs),
                      "se": math.sqrt(sum(p["se"] ** 2 for p in pairs)) / len(pairs)}
            text += (f"SQAKD reaches (ties within 2 SE) or beats labeled QAT for {counts['beats'] + counts['ties']}/"
                     f"{len(live)} (beats {counts['beats']}, ties {counts['ties']}, loses {counts['loses']}; "
                     f"mean over methods {_pt(pooled)} pt; {detail}). ")
        if dead:
            text += f"Both QAT and SQAKD near chance for {', '.join(dead)} (no verdict). "
        text += (f"Over PTQ: mean {sum(vs_ptq) / len(vs_ptq):+.1f} pt, median {statistics.median(vs_ptq):+.1f} "
                 f"(range {min(vs_ptq):+.1f} to {max(vs_ptq):+.1f}).")
        lines.append(text)
    return lines


def cost_lines(cost: Dict[str, Any]) -> List[str]:
    peer = cost["peer"]
    lines = [
        f"Peer comparison, {peer['model']}, {peer['batch']}, {peer['reps']} interleaved reps; {peer['metric']}.",
        f"Ours: {peer['ours']}. torchao {peer['torchao'].get('version', '?')}: {peer['torchao_config']}. "
        f"torchao status: {peer['torchao']['status']}.", "",
        "| variant | s/step (median) | min | vs FP |", "|---|---|---|---|",
    ]
    for name, t in peer["timings"].items():
        lines.append(f"| {name} | {t['median_s']:.3f} | {t['min_s']:.3f} | **{t['ratio_vs_fp']:.2f}x** |")
    kd = cost["kd_cost"]
    lines += ["", "SQAKD step vs FP fine-tuning step (time and memory): `bench/bench_kd_cost.py` (owned separately). "
              f"Status in this run: {kd['status']}."]
    if kd.get("command"):
        lines.append(f"Command: `{kd['command']}`, return code {kd['returncode']}, {kd['wall_s']:.0f} s.")
    md = KD_COST_MD
    if md.is_file():
        table = [line for line in md.read_text().splitlines() if line.startswith("|")]
        head = next((i for i, line in enumerate(table) if "time ratio" in line), None)
        if head is not None:
            rows = [table[head], table[head + 1]] + [
                line for line in table[head + 2 :] if line.count("|") == table[head].count("|")]
            stamp = next((line for line in md.read_text().splitlines() if line.startswith("`python")), "")
            lines += ["", f"From `bench/results/kd_cost.md` ({stamp}):", ""] + rows
    return lines


def size_lines(size: List[Dict[str, Any]]) -> List[str]:
    lines = ["| model | FP32 safetensors | weights | packed | smaller by | share of weights quantized |",
             "|---|---|---|---|---|---|"]
    for m in size:
        for r in m["rows"]:
            lines.append(f"| {m['model']} | {m['fp32_bytes'] / 1e6:.2f} MB | W{r['weight_bits']} "
                         f"| {r['packed_bytes'] / 1e6:.2f} MB | **{r['ratio_vs_fp32']:.1f}x** "
                         f"| {100 * r['quantized_weight_share']:.0f}% |")
    return lines


# ---- plots ----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(section: Dict[str, Any], title: str, path: Path) -> None:
    """Accuracy vs bit-width, one panel per method, PTQ / QAT / SQAKD lines, teacher dashed."""
    plt = _plt()
    methods = list(dict.fromkeys(r["method"] for r in section["rows"]))
    cols = min(2, len(methods))
    rows_n = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False, sharey=True)
    for ax, method in zip(axes.flat, methods):
        rows = [r for r in section["rows"] if r["method"] == method]
        xs = range(len(rows))
        for (way, label), style in zip(WAYS, ("s:", "o--", "D-")):
            ax.plot(xs, [100 * r[way]["accuracy"] for r in rows], style, label=label)
        ax.axhline(100 * section["teacher"]["accuracy"], color="grey", ls="--", lw=1, label="FP teacher")
        ax.set_xticks(list(xs), [r["bits"] for r in rows])
        ax.set_title(method)
        ax.set_xlabel("bit-width")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out accuracy (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_size(size: List[Dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(size), figsize=(4.5 * len(size), 3.4), squeeze=False)
    for ax, m in zip(axes[0], size):
        labels = ["FP32"] + [f"W{r['weight_bits']}" for r in m["rows"]]
        values = [m["fp32_bytes"] / 1e6] + [r["packed_bytes"] / 1e6 for r in m["rows"]]
        ax.bar(labels, values, color=["grey"] + ["C0"] * len(m["rows"]))
        ax.set_title(m["model"], fontsize=9)
        ax.set_ylabel("checkpoint MB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- files ----------------------------------------------------------------------------------
def _run_markdown(mode: str, run: Dict[str, Any]) -> List[str]:
    meta, m = run["meta"], run["meta"]["machine"]
    lines = [
        f"## {mode} run", "",
        f"`{meta['command']}` — {meta['date']} — wall time **{meta['wall_s'] / 60:.1f} min** "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in meta['sections_s'].items())})", "",
        f"Machine: nproc {m['nproc']}, {m['cpu_model']}, torch {m['torch']} ({m['torch_threads']} thread(s)), "
        f"transformers {m['transformers']}, timm {m['timm']}, python {m['python']}; "
        f"1-min load average at start {m['load_avg_1m_at_start']:.1f} (the machine is shared).", "",
    ]
    for key, title in (("vision", "Vision: timm test_resnet on scikit-learn digits"),
                       ("text", "Text: all-MiniLM-L6-v2 fine-tuned on BBC News")):
        sec = run.get(key)
        if not sec:
            continue
        t, d, b = sec["teacher"], sec["data"], sec["budget"]
        size_note = f"{d['image_size']}x{d['image_size']} px" if "image_size" in d else f"{d['max_length']} tokens"
        lines += [
            f"### {title}", "",
            f"Data: {d['dataset']}; {size_note}; {d['train']} train / {d['test']} held-out. "
            f"FP teacher: held-out accuracy **{_pct(t['accuracy'])}%** (training-set accuracy "
            f"{_pct(t['train_accuracy'])}%), {t['train_steps']} supervised steps.",
            f"Budget for QAT and SQAKD alike: {b['steps']} steps, batch {b['batch_size']}, {b['optimizer']}, lr "
            f"{b['lr']:g} (quantizer parameters {b['quantizer_lr']:g}), weight decay {b['weight_decay']:g}, "
            f"{b['schedule']} schedule, same seeded data order; both start from the PTQ state "
            f"({b['calibration_batches']} calibration batches of unlabeled training data). SQAKD: KD only (T=4), "
            "labels removed from its dataset. Labeled QAT: `SQAKDTrainer` with `kd_weight=0, ce_weight=1` "
            "(cross-entropy on the same fake-quant student). Accuracy and teacher agreement in %; "
            "± is twice the paired standard error over held-out samples.", "",
            *quality_table(sec), "",
            f"![{key} accuracy vs bits]({key}_accuracy_{mode}.png)", "",
            "**Does label-free SQAKD reach labeled QAT, and how much does it beat PTQ?** (beats / ties / loses = "
            "difference above / within / below 2 paired SE)", "",
            *answer(sec), "",
        ]
    if run.get("cost"):
        lines += ["### Cost", "", *cost_lines(run["cost"]), ""]
    if run.get("size"):
        lines += ["### Size: packed checkpoint vs FP32 safetensors", "",
                  "`sqakd_hf.save_packed` (LSQ, activations 8-bit; first layer and classifier FP as by default, "
                  "classifier stored fp16; embeddings and norms FP32).", "",
                  *size_lines(run["size"]), "", f"![size](size_{mode}.png)", ""]
    return lines


def write(results_dir: Path, mode: str, run: Dict[str, Any]) -> Path:
    """Store ``run`` under ``runs[mode]`` of results.json, then :func:`render`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "results.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    runs = data.get("runs", {})
    runs[mode] = run
    path.write_text(json.dumps({"runs": runs}, indent=1, default=float) + "\n")
    return render(results_dir)


def render(results_dir: Path) -> Path:
    """Draw the plots and write results.md for every run stored in results.json."""
    runs = json.loads((results_dir / "results.json").read_text())["runs"]
    lines = ["# SQAKD benchmark: label-free SQAKD vs PTQ vs labeled QAT, cost and size", "",
             "Produced by `python -m bench` (`--quick` for the short run; `python -m bench.report` re-renders this "
             "file and the plots from results.json). Within each section every comparison ran side by side in one "
             "process with fixed seeds.", ""]
    for mode in MODES:
        run = runs.get(mode)
        if not run:
            continue
        if run.get("vision"):
            plot_quality(run["vision"], f"digits, timm test_resnet ({mode})",
                         results_dir / f"vision_accuracy_{mode}.png")
        if run.get("text"):
            plot_quality(run["text"], f"BBC News, MiniLM-L6 ({mode})", results_dir / f"text_accuracy_{mode}.png")
        if run.get("size"):
            plot_size(run["size"], results_dir / f"size_{mode}.png")
        lines += _run_markdown(mode, run)
    if ANALYSIS.is_file():
        lines += ["## Interpretation (hand-written, see `bench/analysis.md`)", "", ANALYSIS.read_text().strip(), ""]
    out = results_dir / "results.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.report", description="re-render results.md and the plots")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    print(render(ap.parse_args().out))
