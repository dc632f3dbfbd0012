"""``sqakd-hf export``: write a saved quantized model in a deploy format that loads without ``sqakd_hf``.

    sqakd-hf export MODEL_DIR --format compressed-tensors --output DIR   (transformers; plain from_pretrained, vLLM)
    sqakd-hf export MODEL_DIR --format onnx --output model.onnx          (timm or transformers; onnxruntime)

``MODEL_DIR`` is a run folder written by ``train`` / ``ptq`` (its training form), its ``packed/`` folder, or any
folder saved by ``save_quantized`` / ``save_packed``. The ONNX graph's example input comes from the model: a
tokenizer's encoding of one sentence (its tokenizer is found in the folder or, through the run record, in the
teacher's), or one image of the model's input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import InputError
from .evaluate import _run_record_of, load_saved_model

FORMATS = ("compressed-tensors", "onnx")


def _check_paths(model_dir: Path, fmt: str, output: Path, overwrite: bool) -> None:
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not a deploy format; choose one of {', '.join(FORMATS)}")
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir} holds no saved model (no config.json): give a run folder written by "
                         "sqakd-hf train/ptq, its packed/ folder, or a folder saved by save_quantized/save_packed")
    if output.resolve() == model_dir.resolve() or model_dir.resolve() in output.resolve().parents:
        raise InputError(f"--output {output} is inside the model folder {model_dir}; write the export elsewhere")
    if output.exists() and not overwrite:
        raise InputError(f"--output {output} already exists; choose a new path or pass --overwrite to replace it")
    if fmt == "onnx" and output.suffix != ".onnx":
        raise InputError(f"--output {output}: an ONNX export is one file; give a path ending in .onnx")


def _tokenizer(model_dir: Path) -> Optional[Any]:
    """The model's tokenizer: from its folder, the run around it, or the run's teacher; None for image models."""
    from ..export.inputs import load_tokenizer

    return load_tokenizer(model_dir, model_dir.parent, _run_record_of(model_dir).get("teacher"))


def example_inputs(model: Any, model_dir: Path) -> Any:
    """One example input that traces the model: its tokenizer's encoding of one sentence, or one image."""
    from ..export.inputs import example_inputs as build, takes_text

    tokenizer = _tokenizer(model_dir) if takes_text(model) else None
    return build(model, tokenizer, where=f"{model_dir} (nor for the teacher of its run record)")


def run_export(model_dir: Path, fmt: str, output: Path, overwrite: bool = False) -> Path:
    """Load the quantized model in ``model_dir`` and write it to ``output`` in ``fmt``; returns what was written."""
    _check_paths(model_dir, fmt, output, overwrite)
    model = load_saved_model(model_dir)
    if fmt == "compressed-tensors":
        from ..export.compressed_tensors import export_compressed_tensors

        tokenizer = _tokenizer(model_dir)
        return export_compressed_tensors(model, output, processor=tokenizer)
    from ..export.onnx import export_onnx

    inputs = example_inputs(model, model_dir)
    return export_onnx(model, output, inputs)
