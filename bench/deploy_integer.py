"""Deployment-aware student in onnxruntime: resnet18 (timm, random init, BatchNorm folded) as ``QuantConfig(deploy=
"onnx")`` W8A8 (7-bit weight codes on CPUs without VNNI), every layer quantized, calibrated on natural-photo crops,
exported by ``sqakd_hf.export_onnx`` (a fully integer graph: QLinearConv + QLinearAdd) against the FP32 model exported
the same way, and against onnxruntime's own ``quantize_static`` of the FP32 file (the anchor: what onnxruntime's
int8 kernels give on this CPU), all in onnxruntime with all graph optimizations, 1 intra-op thread.

Latency at batch 1 and 32 (224 px) is the median over repeats interleaved between the arms (a shared machine's load
hits both alike; the ratio is what to read), with the load average recorded. Also: file sizes, the node types
onnxruntime runs, and top-1 agreement / max logit difference between the int8 graph and the fake-quant student on
held-out crops. Writes bench/results/deploy_integer.{json,md}.

    python -m bench.deploy_integer            # full: 40 / 8 interleaved repeats at batch 1 / 32
    python -m bench.deploy_integer --quick    # 5 / 2 repeats
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"speedup_b1": 3.0, "speedup_b32": 2.0, "size_ratio": 0.3}


def _test_helpers():
    """``(photo_crops, teacher_of)`` from the test suite: natural-photo crops, and a seeded random-init timm model with
    non-trivial, well-conditioned BatchNorms (timm zero-initialises each block's last gamma, which would fold into
    all-zero convs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from effnet_fixtures import photo_crops
    from test_deploy_mode import teacher_of

    return photo_crops, teacher_of


def _ort_static(fp_path: Path, calib: torch.Tensor, folder: Path) -> Path:
    """onnxruntime's own post-training static quantization of the FP32 file (the anchor): QDQ, u8 activations, s8
    per-channel weights with its reduce-range convention, calibrated (min-max) on the same crops."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i : i + 8].numpy()} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    pre, out = folder / "fp32_pre.onnx", folder / "ort_static.onnx"
    quant_pre_process(str(fp_path), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _interleaved(sessions: Dict[str, object], x: np.ndarray, repeats: int) -> Dict[str, float]:
    """Median seconds per run of each session, the arms alternating within every repeat."""
    times: Dict[str, List[float]] = {name: [] for name in sessions}
    for s in sessions.values():  # warm-up
        s.run(None, {"input": x})
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"input": x})
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool) -> Dict[str, object]:
    from sqakd_hf import QuantConfig, calibrate, export_onnx, quantize_model
    from sqakd_hf.export.onnx_integer import cpu_has_vnni, optimized_op_counts

    torch.set_num_threads(1)
    photo_crops, teacher_of = _test_helpers()
    teacher = teacher_of("resnet18", num_classes=1000)
    config = QuantConfig(deploy="onnx", weight_bits=8, act_bits=8, modules_to_not_convert=[])
    student = quantize_model(copy.deepcopy(teacher), config)
    calib, held_out = photo_crops(32, 0, 224), photo_crops(64, 1, 224)
    calibrate(student, [calib[i : i + 8] for i in range(0, 32, 8)])
    student.eval()
    out: Dict[str, object] = {"model": "timm resnet18 (seeded random init, non-trivial BatchNorms), 224 px", "config": config.to_dict(),
                              "weight_code_bits": 7 if config.deploy == "onnx" else 8, "cpu_has_vnni": cpu_has_vnni(),
                              "threads": 1, "nproc": os.cpu_count(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        fp_path, int_path = Path(tmp) / "fp32.onnx", Path(tmp) / "deploy.onnx"
        with torch.no_grad():
            torch.onnx.export(teacher, (calib[:1],), str(fp_path), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=False)
        export_onnx(student, int_path, calib[:1])
        ort_path = _ort_static(fp_path, calib, Path(tmp))
        out["file_bytes"] = {"fp32": fp_path.stat().st_size, "deploy_int8": int_path.stat().st_size,
                             "ort_static": ort_path.stat().st_size}
        out["size_ratio"] = out["file_bytes"]["deploy_int8"] / out["file_bytes"]["fp32"]
        out["ort_ops"] = optimized_op_counts(int_path, Path(tmp) / "opt.onnx")
        sessions = {"fp32": _session(fp_path), "deploy_int8": _session(int_path), "ort_static": _session(ort_path)}
        logits = sessions["deploy_int8"].run(None, {"input": held_out.numpy()})[0]
        with torch.no_grad():
            ref = student(held_out).numpy()
        out["agreement_top1_vs_student"] = float((logits.argmax(1) == ref.argmax(1)).mean())
        out["max_abs_logit_diff_vs_student"] = float(np.abs(logits - ref).max())
        out["max_abs_logit"] = float(np.abs(ref).max())
        top2 = np.sort(ref, 1)[:, -2:]
        flipped = logits.argmax(1) != ref.argmax(1)
        out["largest_top1_margin_of_a_flipped_crop"] = float((top2[:, 1] - top2[:, 0])[flipped].max(initial=0.0))
        out["median_top1_margin"] = float(np.median(top2[:, 1] - top2[:, 0]))
        latency = {}
        for batch, repeats in ((1, 5 if quick else 40), (32, 2 if quick else 8)):
            x = held_out[:batch].numpy()
            latency[f"b{batch}"] = _interleaved(sessions, x, repeats)
        out["latency_s"] = latency
        out["speedup_b1"] = latency["b1"]["fp32"] / latency["b1"]["deploy_int8"]
        out["speedup_b32"] = latency["b32"]["fp32"] / latency["b32"]["deploy_int8"]
        out["ort_static_speedup"] = {b: lat["fp32"] / lat["ort_static"] for b, lat in latency.items()}
    out["load_average_after"] = os.getloadavg()
    out["goals_met"] = {"speedup_b1": out["speedup_b1"] >= GOALS["speedup_b1"],
                        "speedup_b32": out["speedup_b32"] >= GOALS["speedup_b32"],
                        "size_ratio": out["size_ratio"] <= GOALS["size_ratio"]}
    return out


def write(result: Dict[str, object], quick: bool) -> None:
    suffix = "_quick" if quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"deploy_integer{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lat = result["latency_s"]
    rows = [
        "# Deployment-aware resnet18 in onnxruntime (fully integer graph) vs FP32",
        "",
        f"{result['model']}; deploy='onnx' W8A8 ({result['weight_code_bits']}-bit weight codes; VNNI: "
        f"{result['cpu_has_vnni']}), every layer quantized; onnxruntime, all optimizations, 1 thread; repeats "
        f"interleaved; load average {result['load_average_before'][0]:.2f} before, "
        f"{result['load_average_after'][0]:.2f} after ({result['nproc']} cores, shared).",
        "",
        "| | FP32 ORT | ours: deploy int8 ORT | ratio | goal | ORT's own quantize_static (anchor) |",
        "|---|---|---|---|---|---|",
        f"| latency batch 1 (ms) | {1e3 * lat['b1']['fp32']:.1f} | {1e3 * lat['b1']['deploy_int8']:.1f} | "
        f"{result['speedup_b1']:.2f}x faster | >= {GOALS['speedup_b1']}x | {1e3 * lat['b1']['ort_static']:.1f} "
        f"({result['ort_static_speedup']['b1']:.2f}x) |",
        f"| latency batch 32 (ms) | {1e3 * lat['b32']['fp32']:.0f} | {1e3 * lat['b32']['deploy_int8']:.0f} | "
        f"{result['speedup_b32']:.2f}x faster | >= {GOALS['speedup_b32']}x | {1e3 * lat['b32']['ort_static']:.0f} "
        f"({result['ort_static_speedup']['b32']:.2f}x) |",
        f"| file (MB) | {result['file_bytes']['fp32'] / 1e6:.2f} | {result['file_bytes']['deploy_int8'] / 1e6:.2f} | "
        f"{result['size_ratio']:.3f}x | <= {GOALS['size_ratio']}x | "
        f"{result['file_bytes']['ort_static'] / 1e6:.2f} |",
        "",
        f"Int8 graph vs the fake-quant student on 64 held-out photo crops: top-1 agreement "
        f"{100 * result['agreement_top1_vs_student']:.1f}%, max |logit difference| "
        f"{result['max_abs_logit_diff_vs_student']:.3g} (max |logit| {result['max_abs_logit']:.3g}); the crops whose "
        f"top-1 differs had a student top-1 margin of at most {result['largest_top1_margin_of_a_flipped_crop']:.3g} "
        f"(median margin {result['median_top1_margin']:.3g}: a random-init 1000-class head is often near-tied).",
        "",
        "Node types onnxruntime runs: " + ", ".join(f"{k} {v}" for k, v in result["ort_ops"].items()) + ".",
    ]
    (RESULTS / f"deploy_integer{suffix}.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("sqakd_hf").setLevel(logging.ERROR)
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    write(run(args.quick), args.quick)


if __name__ == "__main__":
    main()
