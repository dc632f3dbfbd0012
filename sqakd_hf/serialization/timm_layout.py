"""timm-native save/load: quantized timm models without transformers classes.

The folder layout is timm's Hub layout (``config.json`` with ``architecture``, ``num_classes``,
``model_args``, ``pretrained_cfg``; weights in ``model.safetensors`` under timm's own key names)
plus a ``quantization_config`` block and ``dtype``. transformers reads the same folder as a
``TimmWrapperForImageClassification`` (after ``import sqakd_hf``), and
:func:`from_pretrained_timm` reads folders that transformers wrote for that class
(keys with or without the ``timm_model.`` prefix).

``config.json`` may come from the Hub, so only :data:`SAFE_MODEL_ARGS` of its ``model_args`` reach
``timm.create_model`` (other keys are dropped with a warning naming them), and ``pretrained_cfg`` fields
that locate weight files (:data:`UNSAFE_PRETRAINED_CFG`) are dropped from the overlay.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from ..calibration import refresh_quantizer_state
from ..config import QuantConfig, check_config_compatible
from ..errors import SQAKDCheckpointError
from ..injection import get_quant_config, quant_layers, quantize_model
from .files import SAFE_WEIGHTS_NAME, CheckpointHeader, atomic_save_directory, load_safetensors, write_safetensors
from .manifest import check_finite, check_metadata, quant_metadata
from .packed import as_fp_dtype, check_not_packed, load_packed_state_dict, packed_state_dict

logger = logging.getLogger(__name__)

__all__ = ["save_pretrained_timm", "from_pretrained_timm", "resolve_checkpoint_dir", "SAFE_MODEL_ARGS"]

WRAPPER_PREFIX = "timm_model."
_ALLOW = ["*.json", "*.safetensors"]

#: ``model_args`` keys of a timm ``config.json`` passed on to ``timm.create_model``: architecture
#: hyper-parameters (sizes, depths, dropout rates, layer choices by name). Everything else, in particular
#: what locates or loads weights (``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay``,
#: ``checkpoint_path``, ``file``, ``cache_dir``, ...), is dropped with a warning; so are values that are not
#: JSON scalars or lists of them. Pass other arguments explicitly: ``from_pretrained_timm(..., key=value)``.
SAFE_MODEL_ARGS = frozenset({
    # classifier and input
    "num_classes", "in_chans", "global_pool", "img_size", "input_size", "patch_size", "class_token",
    "no_embed_class", "reg_tokens", "pos_embed", "dynamic_img_size", "dynamic_img_pad", "fc_norm", "pre_norm",
    "final_norm", "head_hidden_size", "head_init_scale", "num_features", "output_stride",
    # regularisation
    "drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate",
    "patch_drop_rate",
    # widths and depths
    "embed_dim", "embed_dims", "depth", "depths", "num_heads", "head_dim", "mlp_ratio", "mlp_ratios", "dims",
    "widths", "channels", "layers", "width", "width_multiplier", "channel_multiplier", "depth_multiplier",
    "stem_width", "stem_chs", "stem_type", "base_width", "cardinality", "kernel_sizes", "window_size",
    "num_stages", "groups", "group_size",
    # block choices (names resolved by timm's own registries)
    "act_layer", "norm_layer", "block_type", "attn_layer", "se_layer", "qkv_bias", "qk_norm", "init_values",
    "ls_init_value", "layer_scale_init_value", "conv_mlp", "weight_init",
})
#: ``pretrained_cfg`` fields not applied from a ``config.json``: they locate weight files
UNSAFE_PRETRAINED_CFG = ("file", "url", "hf_hub_id", "hf_hub_filename", "source", "custom_load")
_JSON_SCALARS = (bool, int, float, str, type(None))


def _unwrap(model: nn.Module):
    """``(timm_model, key_prefix)``: transformers' timm wrapper keeps the timm model under ``timm_model``."""
    inner = getattr(model, "timm_model", None)
    if isinstance(inner, nn.Module):
        return inner, WRAPPER_PREFIX
    return model, ""


def save_pretrained_timm(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    *,
    packed: bool = False,
    fp_dtype: Union[None, str, torch.dtype] = torch.float16,
    model_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Save a quantized timm model (or transformers' timm wrapper) in timm's Hub layout.

    ``packed=False`` writes the training form (FP master weights + all quantizer tensors),
    ``packed=True`` the packed form (see :mod:`sqakd_hf.serialization.packed`; ``fp_dtype`` as there); a model
    loaded from a packed checkpoint is always saved packed.
    ``model_config`` adds top-level fields (e.g. ``label_names``). Atomic write. Returns the directory.
    """
    from timm.models._hub import save_config_for_hf

    timm_model, prefix = _unwrap(model)
    if not isinstance(getattr(timm_model, "pretrained_cfg", None), dict):
        raise ValueError(
            f"{type(timm_model).__name__} is not a timm model (no pretrained_cfg); for a plain nn.Module use "
            "sqakd_hf.pack_model(model) and write the tensors with safetensors.torch.save_file"
        )
    config = get_quant_config(model)
    if packed or config.packed:  # a model loaded from a packed checkpoint has no master weights to save
        state, config, metadata = packed_state_dict(model, as_fp_dtype(fp_dtype))
    else:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        check_finite(state, f"{type(timm_model).__name__}")
        metadata = {"format": "pt", **quant_metadata(model, packed=False)}
    state = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in state.items()}
    dtype = next((p.dtype for p in timm_model.parameters() if p.is_floating_point()), torch.float32)
    extra = {**(model_config or {}), "quantization_config": config.to_dict(), "dtype": str(dtype).replace("torch.", "")}
    with atomic_save_directory(save_directory) as staging:
        write_safetensors(state, staging / SAFE_WEIGHTS_NAME, metadata)
        cfg_path = staging / "config.json"
        save_config_for_hf(timm_model, str(cfg_path), model_config=extra)
        cfg = json.loads(cfg_path.read_text())
        # num_classes lives at the top level; transformers' timm wrapper passes it again with model_args
        if isinstance(cfg.get("model_args"), dict) and cfg["model_args"].pop("num_classes", None) is not None:
            cfg["model_args"] = cfg["model_args"] or None
            cfg_path.write_text(json.dumps(cfg, indent=2))
    return Path(save_directory)


def resolve_checkpoint_dir(path_or_repo_id: Union[str, os.PathLike], **hub_kwargs: Any) -> Path:
    """A local folder as is; otherwise a Hub repo id (``hf-hub:`` prefix allowed) fetched with
    ``huggingface_hub.snapshot_download`` (only ``*.json`` and ``*.safetensors``)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    repo_id = str(path_or_repo_id).removeprefix("hf-hub:")
    if path.exists() or repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise FileNotFoundError(f"{path_or_repo_id} is neither a checkpoint directory nor a Hub repo id")
    from huggingface_hub import snapshot_download

    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    return Path(snapshot_download(repo_id, allow_patterns=_ALLOW, **kwargs))


def _read_state(folder: Path) -> tuple:
    index = folder / f"{SAFE_WEIGHTS_NAME}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        files = [SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} in {folder} (only safetensors checkpoints are read)")
    state: Dict[str, Tensor] = {}
    metadata: Dict[str, str] = {}
    for name in files:
        s, m = load_safetensors(folder / name)
        state.update(s)
        metadata.update(m)
    state = {k[len(WRAPPER_PREFIX):] if k.startswith(WRAPPER_PREFIX) else k: v for k, v in state.items()}
    return state, metadata, str(folder / files[0])


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _JSON_SCALARS) or (isinstance(v, (list, tuple)) and _is_plain(v)) for v in value)
    return isinstance(value, _JSON_SCALARS)


def _safe_model_args(model_args: Any) -> Dict[str, Any]:
    """The :data:`SAFE_MODEL_ARGS` of a config.json's ``model_args`` with plain JSON values; the rest dropped,
    with a warning naming it."""
    if not model_args:
        return {}
    if not isinstance(model_args, dict):
        logger.warning("sqakd: config.json model_args is not an object (%s); ignored", type(model_args).__name__)
        return {}
    kept = {k: v for k, v in model_args.items() if k in SAFE_MODEL_ARGS and _is_plain(v)}
    dropped = sorted(set(model_args) - set(kept))
    if dropped:
        logger.warning(
            "sqakd: config.json model_args %s are not passed to timm.create_model (not on the allow-list "
            "sqakd_hf.serialization.timm_layout.SAFE_MODEL_ARGS, or not plain JSON values); pass them explicitly "
            "as from_pretrained_timm(..., name=value) if you trust them", dropped)
    return kept


def _create(cfg: Dict[str, Any], **kwargs: Any) -> nn.Module:
    import timm
    from timm.models import PretrainedCfg

    arch = cfg.get("architecture")
    if not arch:
        raise ValueError("config.json has no 'architecture': not a timm checkpoint (use transformers' from_pretrained)")
    args = _safe_model_args(cfg.get("model_args"))
    num_classes = cfg.get("num_classes", cfg.get("num_labels"))
    if num_classes is None and cfg.get("id2label"):
        num_classes = len(cfg["id2label"])
    if num_classes is not None:
        args.setdefault("num_classes", num_classes)
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    overlay = {k: v for k, v in (cfg.get("pretrained_cfg") or {}).items()
               if k in fields and k not in UNSAFE_PRETRAINED_CFG}
    for key in ("input_size", "test_input_size", "min_input_size", "mean", "std", "pool_size", "test_pool_size"):
        if isinstance(overlay.get(key), list):
            overlay[key] = tuple(overlay[key])
    args.update(kwargs)
    return timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay or None, **args)


def from_pretrained_timm(
    path_or_repo_id: Union[str, os.PathLike],
    *,
    quantization_config: Optional[QuantConfig] = None,
    revision: Optional[str] = None,
    token: Optional[Union[str, bool]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a quantized timm model from a local folder or Hub repo id (training or packed form).

    A quantized checkpoint loads exactly as saved, no calibration needed; a ``quantization_config``
    that contradicts it raises ``ValueError``. A full-precision timm checkpoint (no
    ``quantization_config`` in ``config.json``) needs ``quantization_config``: it is quantized and
    its weight quantizers initialised; activation quantizers then need :func:`sqakd_hf.calibrate`.
    Extra ``model_kwargs`` go to ``timm.create_model``. Returns the model in eval mode.
    """
    folder = resolve_checkpoint_dir(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    cfg = json.loads(cfg_file.read_text())
    state, metadata, source = _read_state(folder)
    model = _create(cfg, **model_kwargs)
    saved = cfg.get("quantization_config")
    if saved is None:
        if quantization_config is None:
            raise ValueError(
                f"{path_or_repo_id} is a full-precision checkpoint (config.json has no quantization_config); pass "
                "quantization_config=QuantConfig(...) to quantize it"
            )
        _load_strict(model, state, source)
        quantize_model(model, quantization_config)
        for _, layer in quant_layers(model):
            layer.weight_quantizer.init_from_weight(layer.weight)
        return model.eval()
    saved = QuantConfig.from_dict(dict(saved))
    if quantization_config is not None:
        check_config_compatible(saved, quantization_config, where=str(path_or_repo_id))
    quantize_model(model, saved)
    # the metadata names layers as the saving model did: with the wrapper's prefix if transformers saved it
    prefix = WRAPPER_PREFIX.rstrip(".")
    if saved.packed:
        load_packed_state_dict(model, state, metadata, source=source, prefix=prefix)
    else:
        check_not_packed(state, source)
        header = CheckpointHeader(shapes={k: tuple(v.shape) for k, v in state.items()}, metadata=metadata)
        check_metadata(model, header, source, prefix=prefix)
        _load_strict(model, state, source)
    refresh_quantizer_state(model)
    return model.eval()


def _load_strict(model: nn.Module, state: Dict[str, Tensor], source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SQAKDCheckpointError(
            f"checkpoint {source} does not match the model built from its config.json: {err}"
        ) from None
