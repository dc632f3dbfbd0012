"""Upload a quantized model to the Hub in one commit: the packed form (default), the compressed-tensors folder or the
ONNX QDQ graph, with a model card whose loading snippet matches what was uploaded."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..checkpoint import load_quantized, model_library, save_packed
from ..errors import InputError, PushToHubError
from ..injection import get_quant_config
from .card import ONNX_FILE
from .card_info import Metrics, write_model_card

logger = logging.getLogger(__name__)

__all__ = ["push_to_hub", "HUB_FORMATS", "ONNX_FILE"]

ModelOrPath = Union[nn.Module, str, os.PathLike]
#: what push_to_hub can upload: our packed form, or a deploy format that loads without sqakd_hf
HUB_FORMATS = ("packed", "compressed-tensors", "onnx")


def _source_dirs(model: nn.Module, folder: Optional[Path]) -> list:
    """Where the model's tokenizer / processor files may be: the folder pushed, then the one it was loaded from."""
    from ..export.processor_files import source_folder

    return [p for p in (folder, source_folder(model)) if p]


def _stage_onnx(model: nn.Module, staging: Path, processor: Any, sources: list) -> None:
    """``model.onnx`` plus what a reader needs to feed it: ``config.json`` (labels; timm: the preprocessing) and the
    tokenizer / image processor files."""
    from ..export.inputs import example_inputs, load_tokenizer, takes_text
    from ..export.onnx import export_onnx

    if processor is None and takes_text(model):
        processor = load_tokenizer(*sources)
    inputs = example_inputs(model, processor if takes_text(model) else None,
                            where=" or ".join(map(str, sources)) or "the model (pass processor=)")
    staging.mkdir(parents=True)
    export_onnx(model, staging / ONNX_FILE, inputs)
    if model_library(model) == "timm":
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, str(staging / "config.json"))
    else:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the graph holds the quantization; nothing for transformers to apply
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(str(staging))
    from ..export.processor_files import copy_processor_files

    for source in sources:
        copy_processor_files(source, staging)


def _stage(model: nn.Module, staging: Path, fmt: str, fp_dtype: Any, processor: Any, folder: Optional[Path]) -> None:
    """Write ``model`` in ``fmt`` to the new folder ``staging``; a model the format cannot hold raises InputError."""
    if fmt == "packed":
        save_packed(model, staging, fp_dtype=fp_dtype)
    elif fmt == "compressed-tensors":
        from ..export.compressed_tensors import export_compressed_tensors

        export_compressed_tensors(model, staging, processor=processor)
        if folder is not None:
            from ..export.processor_files import copy_processor_files

            copy_processor_files(folder, staging)
    else:
        _stage_onnx(model, staging, processor, _source_dirs(model, folder))


def push_to_hub(
    model_or_dir: ModelOrPath,
    repo_id: str,
    *,
    format: str = "packed",
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    create_pr: bool = False,
    revision: Optional[str] = None,
    teacher: Any = None,
    metrics: Optional[Metrics] = None,
    training: Optional[Dict[str, Any]] = None,
    fp_dtype: Union[None, str, torch.dtype] = torch.float16,
    processor: Any = None,
    **card_kwargs: Any,
):
    """Upload a quantized model in the chosen ``format`` and its model card to the Hub repo ``repo_id``.

    ``model_or_dir`` is a quantized model or a folder holding one (training or packed form; the folder is never
    modified). ``format``:

    * ``"packed"``: our packed low-bit form (loads with ``import sqakd_hf``; to resume or fine-tune), its FP head in
      ``fp_dtype``;
    * ``"compressed-tensors"`` (transformers models): loads with plain ``AutoModelFor*.from_pretrained`` (``pip
      install compressed-tensors``, no ``import sqakd_hf``) and serves with vLLM;
    * ``"onnx"``: ``model.onnx`` (QDQ graph for onnxruntime) with ``config.json`` and the tokenizer / processor files.

    ``processor`` (tokenizer / image processor) goes with the deploy formats; by default the one saved in the folder
    or in the folder the model was loaded from. The model is written in the chosen form first, so a model the format
    cannot hold fails with :class:`~sqakd_hf.errors.InputError` before anything is created on the Hub. Then the repo
    is created if needed (``exist_ok``; a bare name goes to the token's namespace) and the files plus ``README.md``
    (teacher as ``base_model``, ``metrics``, ``training`` hyper-parameters; ``card_kwargs`` go to
    :func:`model_card_info`) are uploaded in one commit. Returns ``huggingface_hub.CommitInfo``. On failure raises
    :class:`PushToHubError` naming the failed step and, once staged, the kept folder to retry from.
    """
    from huggingface_hub import HfApi

    if format not in HUB_FORMATS:
        raise InputError(f"format={format!r} is not an upload format; choose one of {', '.join(HUB_FORMATS)}")
    from_dir = isinstance(model_or_dir, (str, os.PathLike))
    folder = Path(model_or_dir) if from_dir else None
    model = load_quantized(model_or_dir) if from_dir else model_or_dir
    staging = Path(tempfile.mkdtemp(prefix="sqakd-push-")) / repo_id.replace("/", "--")
    try:
        _stage(model, staging, format, fp_dtype, processor, folder)
    except BaseException:
        shutil.rmtree(staging.parent, ignore_errors=True)
        raise

    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    except Exception as err:  # network, HTTP and auth errors all end here
        shutil.rmtree(staging.parent, ignore_errors=True)
        raise PushToHubError(
            f"push_to_hub failed to create the repository {repo_id!r} on {api.endpoint}: {type(err).__name__}: "
            f"{err}. Nothing was written; fix the cause (token, permissions, network) and call push_to_hub again."
        ) from err

    # a packed folder's own model card is kept unless new card contents are given (e.g. retrying a failed push)
    old_card = folder / "README.md" if folder is not None else None
    keep_card = (format == "packed" and old_card is not None and old_card.is_file()
                 and "SQAKD" in old_card.read_text(errors="ignore")
                 and not (teacher or metrics or training or card_kwargs))
    try:
        if keep_card:
            shutil.copyfile(old_card, staging / "README.md")
        else:
            write_model_card(model, staging, teacher=teacher, metrics=metrics, training=training, repo_id=repo_id,
                             packed=format == "packed", form=format, **card_kwargs)
    except BaseException:
        shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    try:
        info = api.upload_folder(
            folder_path=str(staging), repo_id=repo_id, repo_type="model",
            commit_message=commit_message or f"Upload SQAKD {get_quant_config(model).short_name} model ({format})",
            create_pr=create_pr, revision=revision,
        )
    except Exception as err:
        raise PushToHubError(
            f"push_to_hub failed to upload the files for {repo_id!r} on {api.endpoint}: {type(err).__name__}: {err}. "
            f"The {format} model and README.md are kept in {staging}; fix the cause (token, permissions, network) and "
            + (f"retry with sqakd_hf.push_to_hub({str(staging)!r}, {repo_id!r}) or " if format == "packed" else
               "retry with ")
            + f"huggingface_hub.upload_folder(folder_path={str(staging)!r}, repo_id={repo_id!r}).",
            folder=staging,
        ) from err
    shutil.rmtree(staging.parent, ignore_errors=True)
    logger.info("sqakd: pushed to %s", getattr(info, "commit_url", repo_id))
    return info
