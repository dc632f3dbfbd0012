"""Upload a quantized model to the Hub: the packed form plus its model card, in one commit."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..checkpoint import load_quantized, save_packed
from ..errors import PushToHubError
from ..injection import get_quant_config
from .card_info import Metrics, write_model_card

logger = logging.getLogger(__name__)

__all__ = ["push_to_hub"]

ModelOrPath = Union[nn.Module, str, os.PathLike]


def push_to_hub(
    model_or_dir: ModelOrPath,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    create_pr: bool = False,
    revision: Optional[str] = None,
    teacher: Any = None,
    metrics: Optional[Metrics] = None,
    training: Optional[Dict[str, Any]] = None,
    fp_dtype: Union[None, str, torch.dtype] = torch.float16,
    **card_kwargs: Any,
):
    """Upload the packed form of a quantized model and its model card to the Hub repo ``repo_id``.

    ``model_or_dir`` is a quantized model or a folder holding one (training or packed form; the
    folder is never modified). The repo is created if needed (``exist_ok``; a bare name goes to the
    token's namespace), then the packed checkpoint and ``README.md`` (teacher as ``base_model``,
    ``metrics``, ``training`` hyper-parameters; ``card_kwargs`` go to :func:`model_card_info`) are
    staged in a temporary folder and uploaded in one commit. Returns ``huggingface_hub.CommitInfo``.
    On failure raises :class:`PushToHubError` naming the failed step and, once staged, the kept
    folder to retry from.
    """
    from huggingface_hub import HfApi

    from_dir = isinstance(model_or_dir, (str, os.PathLike))
    model = load_quantized(model_or_dir) if from_dir else model_or_dir
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    except Exception as err:  # network, HTTP and auth errors all end here
        raise PushToHubError(
            f"push_to_hub failed to create the repository {repo_id!r} on {api.endpoint}: {type(err).__name__}: "
            f"{err}. Nothing was written; fix the cause (token, permissions, network) and call push_to_hub again."
        ) from err

    # a folder's own model card is kept unless new card contents are given (e.g. retrying a failed push)
    old_card = Path(model_or_dir) / "README.md" if from_dir else None
    keep_card = (old_card is not None and old_card.is_file() and "SQAKD" in old_card.read_text(errors="ignore")
                 and not (teacher or metrics or training or card_kwargs))
    staging = Path(tempfile.mkdtemp(prefix="sqakd-push-")) / repo_id.replace("/", "--")
    try:
        save_packed(model, staging, fp_dtype=fp_dtype)
        if keep_card:
            shutil.copyfile(old_card, staging / "README.md")
        else:
            write_model_card(model, staging, teacher=teacher, metrics=metrics, training=training, repo_id=repo_id,
                             packed=True, **card_kwargs)
    except BaseException:
        shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    try:
        info = api.upload_folder(
            folder_path=str(staging), repo_id=repo_id, repo_type="model",
            commit_message=commit_message or f"Upload SQAKD {get_quant_config(model).short_name} model (packed)",
            create_pr=create_pr, revision=revision,
        )
    except Exception as err:
        raise PushToHubError(
            f"push_to_hub failed to upload the files for {repo_id!r} on {api.endpoint}: {type(err).__name__}: {err}. "
            f"The packed model and README.md are kept in {staging}; fix the cause (token, permissions, network) and "
            f"retry with sqakd_hf.push_to_hub({str(staging)!r}, {repo_id!r}) or "
            f"huggingface_hub.upload_folder(folder_path={str(staging)!r}, repo_id={repo_id!r}).",
            folder=staging,
        ) from err
    shutil.rmtree(staging.parent, ignore_errors=True)
    logger.info("sqakd: pushed to %s", getattr(info, "commit_url", repo_id))
    return info
