"""Model cards (README.md with YAML metadata) for SQAKD-quantized checkpoints.

The Jinja template lives in ``sqakd_hf/templates/model_card_template.md``
(shipped as package data); the repository's top-level
``model_card_template.md`` is a symlink to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..export.onnx import EXACT_SESSION_CONFIG
from ..serialization.packing import storage_bits

__all__ = ["ModelCardInfo", "render_model_card", "DEFAULT_TEMPLATE_PATH", "METRIC_DESCRIPTIONS", "FORMS"]

DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "templates" / "model_card_template.md"

#: the forms a card can describe
FORMS = ("packed", "training", "compressed-tensors", "onnx")
#: the file an ONNX upload holds the graph in
ONNX_FILE = "model.onnx"
_BASE_TAGS = ("sqakd", "quantized", "knowledge-distillation", "qat")
# "name" or "owner/name" with Hub-legal characters; local paths ("./x", "/x", "a/b/c") do not match.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class ModelCardInfo:
    """Everything the model card says about a quantized student."""

    base_model: str | None
    method: str
    weight_bits: int
    act_bits: int
    fp_modules: list[str] = field(default_factory=list)
    model_class: str = "AutoModelForImageClassification"
    library: str = "transformers"
    repo_id: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    checkpoint_bytes: int | None = None
    teacher_bytes: int | None = None
    packed: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    pipeline_tag: str | None = None
    #: whether ``base_model`` is a Hub id (None: decide from its spelling); a local teacher is said to be local
    base_model_on_hub: bool | None = None
    #: "sqakd" (label-free distillation) or "ptq" (calibration only, no training)
    mode: str = "sqakd"
    #: whether training used labels (ce_weight > 0)
    labels_used: bool = False
    #: tensors kept in full precision, grouped: ``[{"group", "bytes", "share", "dtypes"}]`` (shares of the file)
    fp_groups: list[dict[str, Any]] = field(default_factory=list)
    #: share of the file's bytes held by the quantized layers (codes and their scales)
    quantized_share: float | None = None
    #: what ``teacher_bytes`` measures, e.g. "the teacher's safetensors files"
    teacher_bytes_source: str | None = None
    #: the evaluation data: ``{"dataset", "split", "examples"}`` (metric names come from ``metrics``)
    evaluation: dict[str, Any] = field(default_factory=dict)
    #: the uploaded form: "packed" / "training" (sqakd_hf's own, from ``packed`` when None), "compressed-tensors"
    #: (plain transformers, vLLM) or "onnx" (a QDQ graph for onnxruntime)
    form: str | None = None

    @property
    def stored_form(self) -> str:
        return self.form or ("packed" if self.packed else "training")


#: what each reported metric measures
METRIC_DESCRIPTIONS = {
    "accuracy": "top-1 accuracy against the evaluation labels",
    "teacher_agreement": "share of examples (tokens for sequence outputs) where the student's top-1 prediction is the "
                         "teacher's",
    "kd_loss": "the training objective: T^2 KL(teacher || student) of the temperature-softened outputs",
    "hidden_mse": "mean squared error between the student's and the teacher's last hidden states",
}


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and _HUB_ID.match(name) is not None and not name.endswith((".", "-"))


def _pct(share: float) -> str:
    return f"{100 * share:.1f}%" if share >= 0.001 else "<0.1%"


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fmt_num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def _metric_table(
    metrics: dict[str, dict[str, float]],
) -> tuple[list[str], list[dict[str, Any]], bool]:
    """Return (columns, rows, show_delta); teacher and student columns come first."""
    columns = [c for c in ("teacher", "student") if c in metrics]
    columns += [c for c in metrics if c not in columns]
    names: list[str] = []
    for col in columns:
        names += [n for n in metrics[col] if n not in names]
    show_delta = "teacher" in metrics and "student" in metrics
    rows = []
    for name in names:
        values = [_fmt_num(metrics[c][name]) if name in metrics[c] else "–" for c in columns]
        delta = "–"
        if show_delta and name in metrics["teacher"] and name in metrics["student"]:
            d = float(metrics["student"][name]) - float(metrics["teacher"][name])
            delta = f"{d:+.4f}"
        rows.append({"name": name, "cells": values, "delta": delta})
    return columns, rows, show_delta


def _compressed_tensors_snippet(info: ModelCardInfo, target: str) -> tuple[str, str]:
    note = ("This checkpoint is in the compressed-tensors format: plain `transformers` loads it (no `sqakd_hf` "
            "needed) once the `compressed-tensors` package is installed.")
    text = info.pipeline_tag not in (None, "image-classification")
    processor = "AutoTokenizer" if text else "AutoImageProcessor"
    code = (f"# pip install transformers compressed-tensors\nfrom transformers import {processor}, {info.model_class}\n\n"
            f'model = {info.model_class}.from_pretrained("{target}")\nmodel.eval()\n'
            f'{"tokenizer" if text else "processor"} = {processor}.from_pretrained("{target}")')
    if info.pipeline_tag == "text-generation":
        note += " vLLM serves it as is: `vllm serve " + target + "`, or from Python as below."
        code += (f'\n\n# or with vLLM (GPU): pip install vllm\nfrom vllm import LLM\n\nllm = LLM(model="{target}")\n'
                 'print(llm.generate(["The capital of France is"])[0].outputs[0].text)')
    return note, code


def _onnx_snippet(info: ModelCardInfo, target: str) -> tuple[str, str]:
    note = (f"`{ONNX_FILE}` is an ONNX graph with QuantizeLinear / DequantizeLinear pairs carrying the learned scales; "
            "onnxruntime runs it (no `sqakd_hf` and no PyTorch needed). `config.json` holds the labels"
            + (" and the preprocessing (mean, std, input size)" if info.library == "timm" else "") + ".")
    head = ("# pip install onnxruntime huggingface_hub" + ("" if info.library == "timm" else " transformers")
            + ("\nimport numpy as np" if info.library == "timm" or info.pipeline_tag in (None, "image-classification")
               else "") + "\nimport onnxruntime as ort\nfrom huggingface_hub import hf_hub_download\n")
    # The session config keeps quantized weights that meet float inputs exact (see EXACT_SESSION_CONFIG).
    entries = "".join(f'options.add_session_config_entry("{key}", "{value}")\n'
                      for key, value in EXACT_SESSION_CONFIG.items())
    session = ("\noptions = ort.SessionOptions()\n" + entries
               + f'session = ort.InferenceSession(hf_hub_download("{target}", "{ONNX_FILE}"), options)\n')
    if info.library == "transformers" and info.pipeline_tag not in (None, "image-classification"):
        code = (head + "from transformers import AutoTokenizer\n" + session
                + f'tokenizer = AutoTokenizer.from_pretrained("{target}")\n'
                + 'inputs = tokenizer(["An example sentence."], return_tensors="np")\n'
                + "feeds = {i.name: inputs[i.name] for i in session.get_inputs()}\n"
                + "logits = session.run(None, feeds)[0]")
    else:
        code = (head + session + "image = session.get_inputs()[0]\n"
                + "pixels = np.zeros([1, *image.shape[1:]], np.float32)  # your images, resized and normalised\n"
                + "logits = session.run(None, {image.name: pixels})[0]")
    return note, code


def _load_snippet(info: ModelCardInfo) -> tuple[str, str]:
    """Return (explanatory sentence, python code) for loading the checkpoint."""
    target = info.repo_id or "path/to/this/checkpoint"
    if info.stored_form == "compressed-tensors":
        return _compressed_tensors_snippet(info, target)
    if info.stored_form == "onnx":
        return _onnx_snippet(info, target)
    if info.library == "timm":
        note = (
            "Import `sqakd_hf` first: it provides the loader that rebuilds the timm model with "
            "its quantizers and restores the low-bit weights, which plain `timm.create_model` "
            "cannot do."
        )
        code = f'import sqakd_hf\n\nmodel = sqakd_hf.from_pretrained_timm("{target}")\nmodel.eval()'
    else:
        without = (
            "stops with a size-mismatch error naming the quantized layers' weights (this packed checkpoint stores "
            "them as integer codes that only `sqakd_hf` can unpack)"
            if info.packed else
            "loads the full-precision master weights without their quantizers (not the low-bit model)"
        )
        note = (
            "Import `sqakd_hf` before calling `from_pretrained`: without that import transformers "
            f'does not know the quantization method `"sqakd"` in `config.json` and {without}.'
        )
        code = (
            "import sqakd_hf  # registers the \"sqakd\" quantization method with transformers\n"
            f"from transformers import {info.model_class}\n\n"
            f'model = {info.model_class}.from_pretrained("{target}")\nmodel.eval()'
        )
    return note, code


def _tags(info: ModelCardInfo) -> list[str]:
    tags = [*_BASE_TAGS[:2], f"{info.weight_bits}-bit", *_BASE_TAGS[2:],
            f"w{info.weight_bits}a{info.act_bits}", info.method, info.library, *info.tags]
    if info.stored_form in ("compressed-tensors", "onnx"):
        tags.append(info.stored_form)
    if info.pipeline_tag:
        tags.append(info.pipeline_tag)
    seen: list[str] = []
    for t in tags:
        if t and t not in seen:
            seen.append(t)
    return seen


def render_model_card(info: ModelCardInfo, template_path: str | None = None) -> ModelCard:
    """Render a Hub model card for an SQAKD-quantized student.

    The YAML header records the teacher as ``base_model`` with
    ``base_model_relation: quantized`` (only when ``info.base_model`` looks like a
    Hub repo id; local paths are mentioned in the body only, as the Hub rejects
    them in metadata). ``template_path`` defaults to the packaged template.
    """
    if info.library not in ("transformers", "timm"):
        raise ValueError(f"library must be 'transformers' or 'timm', got {info.library!r}")
    for name in ("weight_bits", "act_bits"):
        bits = getattr(info, name)
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"{name} must be a positive integer, got {bits!r}")

    if info.stored_form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {info.form!r}")
    if info.stored_form == "compressed-tensors" and info.library != "transformers":
        raise ValueError("the compressed-tensors form is for transformers models")
    if info.mode not in ("sqakd", "ptq"):
        raise ValueError(f"mode must be 'sqakd' or 'ptq', got {info.mode!r}")
    on_hub = _is_hub_id(info.base_model) if info.base_model_on_hub is None else bool(info.base_model_on_hub)
    card_kwargs: dict[str, Any] = {}
    if on_hub:
        card_kwargs["base_model_relation"] = "quantized"
    card_data = ModelCardData(
        base_model=info.base_model if on_hub else None,
        library_name=info.library,
        license=info.license,
        datasets=list(info.datasets) or None,
        pipeline_tag=info.pipeline_tag,
        tags=_tags(info),
        **card_kwargs,
    )

    if info.base_model and on_hub:
        base_link = f"[`{info.base_model}`](https://huggingface.co/{info.base_model})"
    elif info.base_model:
        base_link = f"`{info.base_model}` (a local checkpoint, not on the Hub)"
    else:
        base_link = None

    checkpoint_size = teacher_size = size_ratio = size_percent = None
    if info.checkpoint_bytes:
        checkpoint_size = _fmt_bytes(info.checkpoint_bytes)
        if info.teacher_bytes:
            teacher_size = _fmt_bytes(info.teacher_bytes)
            ratio = info.teacher_bytes / info.checkpoint_bytes
            size_ratio = ("about the same size" if 0.995 <= ratio < 1.005 else
                          f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger")
            size_percent = f"{100 * info.checkpoint_bytes / info.teacher_bytes:.1f}"

    columns, rows, show_delta = _metric_table(info.metrics or {})
    note, snippet = _load_snippet(info)
    kind = "SQAKD" if info.mode == "sqakd" else "PTQ"
    if info.repo_id:
        title = info.repo_id
    elif info.base_model:
        teacher_name = info.base_model if on_hub else Path(info.base_model).name
        title = f"{teacher_name} ({kind} W{info.weight_bits}A{info.act_bits}, {info.method})"
    else:
        title = f"{kind} W{info.weight_bits}A{info.act_bits} quantized model"
    evaluation = dict(info.evaluation or {})
    metric_names = [row["name"] for row in rows]

    training_rows = [
        (k, f"{v:g}" if isinstance(v, float) else str(v)) for k, v in (info.training or {}).items()
    ]
    container = storage_bits(info.weight_bits) if info.weight_bits <= 8 else info.weight_bits
    path = str(template_path) if template_path is not None else str(DEFAULT_TEMPLATE_PATH)
    return ModelCard.from_template(
        card_data,
        template_path=path,
        title=title,
        base_model_link=base_link,
        method=info.method,
        weight_bits=info.weight_bits,
        act_bits=info.act_bits,
        fp_modules=list(info.fp_modules),
        library=info.library,
        model_class=info.model_class,
        packed=info.packed,
        form=info.stored_form,
        storage_bits=container,
        codes_per_byte=max(1, 8 // container),
        checkpoint_size=checkpoint_size,
        teacher_size=teacher_size,
        size_ratio=size_ratio,
        size_percent=size_percent,
        metric_columns=columns,
        metric_rows=rows,
        show_delta=show_delta,
        load_note=note,
        load_snippet=snippet,
        training_rows=training_rows,
        mode=info.mode,
        labels_used=info.labels_used,
        fp_groups=[{**g, "share_text": _pct(g["share"]), "dtypes": ", ".join(g.get("dtypes", []))}
                   for g in info.fp_groups],
        quantized_share=_pct(info.quantized_share) if info.quantized_share is not None else None,
        teacher_bytes_source=info.teacher_bytes_source,
        eval_dataset=evaluation.get("dataset"),
        eval_split=evaluation.get("split"),
        eval_examples=evaluation.get("examples"),
        metric_descriptions=[(n, METRIC_DESCRIPTIONS.get(n)) for n in metric_names],
    )
