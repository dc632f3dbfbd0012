"""transformers integration: ``quant_method: "sqakd"`` in ``config.json``.

Importing this module (``import sqakd_hf`` does) registers :class:`~sqakd_hf.config.QuantConfig`
and :class:`SQAKDHfQuantizer` with transformers, so that

* ``AutoModelFor*.from_pretrained(fp_dir, quantization_config=QuantConfig(...))`` builds a student
  from a full-precision teacher (weight quantizers initialised from the loaded weights;
  activation quantizers need :func:`sqakd_hf.calibrate`, which ``SQAKDTrainer`` runs);
* ``save_pretrained`` writes the training form (FP master weights + every quantizer tensor);
* ``from_pretrained(saved_dir)`` restores it exactly, or loads a packed checkpoint
  (see :mod:`sqakd_hf.serialization.packed`), with no calibration.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict, Optional, Union

import torch
# the defining modules, not the package: registration may run while ``transformers.quantizers`` is still importing
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from ..calibration import refresh_quantizer_state
from ..config import QUANT_METHOD, QuantConfig, check_config_compatible
from ..errors import SQAKDCheckpointError
from ..injection import build_layer_quantizers, quant_layers, quantize_model
from ..serialization import files, packed

logger = logging.getLogger(__name__)

__all__ = ["SQAKDHfQuantizer"]

#: checkpoint keys of quantizer tensors (absent from a full-precision teacher checkpoint)
QUANTIZER_KEYS = r"(^|\.)(weight|input)_quantizer\."
def _as_config(cfg: Union[QuantConfig, Dict[str, Any]]) -> QuantConfig:
    return cfg if isinstance(cfg, QuantConfig) else QuantConfig.from_dict(dict(cfg))


_PACKED_SUFFIX = re.compile(r"\.weight_(packed|scale|zero_point)$")


def _model_side_header(model, header: files.CheckpointHeader) -> files.CheckpointHeader:
    """``header`` with checkpoint names translated to the model's names, the way transformers renames
    keys when loading (legacy renamings, ``timm_model.`` prefix, base-model prefix)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    model_keys = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""

    def rename(key: str) -> str:
        new, _ = rename_source_key(key, renamings, converters)
        probe = _PACKED_SUFFIX.sub(".weight", new)
        if prefix and probe not in model_keys:
            if new.startswith(prefix + ".") and probe[len(prefix) + 1:] in model_keys:
                new = new[len(prefix) + 1:]
            elif f"{prefix}.{probe}" in model_keys:
                new = f"{prefix}.{new}"
        return new

    out = files.CheckpointHeader(metadata=dict(header.metadata))
    for key in header.shapes:
        new = rename(key)
        out.shapes[new], out.dtypes[new], out.files[new] = header.shapes[key], header.dtypes[key], header.files[key]
    layers = {rename(f"{n}.weight_packed")[: -len(".weight_packed")]: v for n, v in header.packed_layers.items()}
    out.metadata[files.LAYERS_KEY] = json.dumps(layers)
    return out


class SQAKDHfQuantizer(HfQuantizer):
    """HfQuantizer for SQAKD fake-quant models: trainable (QAT), serializable, no calibration to load."""

    requires_calibration = False

    def __init__(self, quantization_config: Union[QuantConfig, Dict[str, Any]], **kwargs: Any) -> None:
        config = _as_config(quantization_config)
        if config.packed and not kwargs.get("pre_quantized", True):
            config = QuantConfig(**{**config.to_dict(), "packed": False})  # packed is set by the exporter only
        super().__init__(config, **kwargs)
        #: set by :func:`sqakd_hf.save_packed` to hand ``save_pretrained`` a packed state dict
        self.packed_state: Optional[tuple] = None
        #: dtype of the FP output head when ``save_pretrained`` re-packs a loaded packed model (as it was stored)
        self.fp_dtype: Optional[torch.dtype] = None

    # ---- capabilities -------------------------------------------------------------------------
    def is_serializable(self, safe_serialization: Optional[bool] = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    # ---- loading ------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Insert fake-quant wrappers on the meta skeleton; for a packed checkpoint, shape its packed layers."""
        config: QuantConfig = self.quantization_config
        quantize_model(model, config)
        ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
        header = files.read_checkpoint_header(checkpoint_files or [])  # corrupted files: a clear error
        if not self.pre_quantized:
            # a full-precision checkpoint has no quantizer tensors: they are built after loading
            ignore.add(QUANTIZER_KEYS)
        else:
            if config.packed:
                names = packed.prepare_packed_layers(model, _model_side_header(model, header))
                recorded = set(json.loads(header.metadata.get(packed.FP_DTYPE_KEY) or "{}").values())
                self.fp_dtype = packed.as_fp_dtype(recorded.pop()) if len(recorded) == 1 else None
                ignore.update(rf"^{re.escape(n)}\.weight$" for n in names)
            else:
                packed.check_not_packed(header.shapes, str(sorted(set(header.files.values()))))
        model._keys_to_ignore_on_load_missing = ignore
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config: QuantConfig = self.quantization_config
        if self.pre_quantized:
            if config.packed:
                packed.finish_packed_load(model)
            refresh_quantizer_state(model)
            return model
        # Quantizer tensors were absent from the FP checkpoint (transformers left them uninitialised):
        # rebuild them, initialise weight quantizers from the loaded weights. Activation quantizers
        # need data: sqakd_hf.calibrate(model, batches).
        for name, layer in quant_layers(model):
            wq, aq = build_layer_quantizers(layer, type(layer), config, config.bits_for(name))
            layer.weight_quantizer, layer.input_quantizer = wq, aq
            wq.init_from_weight(layer.weight)
        logger.info("sqakd: weight quantizers initialised from the checkpoint; calibrate activation quantizers "
                    "with sqakd_hf.calibrate(model, batches) before use (SQAKDTrainer does it)")
        return model

    # ---- saving -------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        """Training form: the model's own state dict. Packed form (``config.packed``): the packed one."""
        if self.packed_state is not None:
            state, metadata = self.packed_state
            return state, dict(metadata)
        if getattr(self.quantization_config, "packed", False):
            state, _, metadata = packed.packed_state_dict(model, self.fp_dtype)
            return state, metadata
        return None, {}


# ---- registration ---------------------------------------------------------------------------------
def _merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
    """transformers keeps a checkpoint's quantization_config and only warns when another is passed;
    for ``sqakd`` checkpoints a contradicting one is an error, an agreeing one is accepted quietly."""
    saved = quantization_config
    ours = isinstance(saved, QuantConfig) or (isinstance(saved, dict) and saved.get("quant_method") == QUANT_METHOD)
    if not ours:
        return AutoHfQuantizer._sqakd_original_merge(quantization_config, quantization_config_from_args)
    saved = _as_config(saved)
    if quantization_config_from_args is not None:
        if not isinstance(quantization_config_from_args, QuantConfig):
            raise ValueError(
                f"this checkpoint is quantized with sqakd ({saved.short_name}) but you passed a "
                f"{type(quantization_config_from_args).__name__}; drop the quantization_config argument"
            )
        check_config_compatible(saved, quantization_config_from_args)
    return saved


if getattr(AutoHfQuantizer, "_sqakd_original_merge", None) is None:
    AutoHfQuantizer._sqakd_original_merge = AutoHfQuantizer.merge_quantization_configs  # bound classmethod
    AutoHfQuantizer.merge_quantization_configs = classmethod(_merge_quantization_configs)

if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
    register_quantization_config(QUANT_METHOD)(QuantConfig)
else:
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QuantConfig
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
    register_quantizer(QUANT_METHOD)(SQAKDHfQuantizer)
else:
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = SQAKDHfQuantizer
