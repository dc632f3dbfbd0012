"""transformers integration: ``quant_method: "sqakd"`` in ``config.json``.

Importing this module (``import sqakd_hf`` does) registers :class:`~sqakd_hf.config.QuantConfig`
and :class:`SQAKDHfQuantizer` with transformers, so that

* ``AutoModelFor*.from_pretrained(fp_dir, quantization_config=QuantConfig(...))`` builds a student
  from a full-precision teacher (weight quantizers initialised from the loaded weights;
  activation quantizers need :func:`sqakd_hf.calibrate`, which ``SQAKDTrainer`` runs);
* ``save_pretrained`` writes the training form (FP master weights + every quantizer tensor);
* ``from_pretrained(saved_dir)`` restores it exactly, or loads a packed checkpoint
  (see :mod:`sqakd_hf.serialization.packed`), with no calibration;
* ``from_pretrained(saved_dir, quantization_config=...)`` with a config that contradicts the saved one
  is an error (transformers would silently keep the saved one).

Loading and saving use only the public ``HfQuantizer`` hooks: the skeleton built before loading holds
exactly the tensors the checkpoint holds, so nothing is reported missing. The config conflict check
wraps one transformers classmethod, for want of a public hook (see :func:`_install_conflict_check`).
Registration happens once: re-running :func:`register` changes nothing.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
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
from ..deploy_mode import apply_deploy_mode
from ..equalization import equalize_model
from ..folding import fold_batchnorm
from ..injection import build_layer_quantizers, quant_layers, quantize_model
from ..serialization import files, manifest, packed

logger = logging.getLogger(__name__)

__all__ = ["SQAKDHfQuantizer", "register"]


def _as_config(cfg: Union[QuantConfig, Dict[str, Any]]) -> QuantConfig:
    return cfg if isinstance(cfg, QuantConfig) else QuantConfig.from_dict(dict(cfg))


class SQAKDHfQuantizer(HfQuantizer):
    """HfQuantizer for SQAKD fake-quant models: trainable (QAT), serializable, no calibration to load."""

    requires_calibration = False

    def __init__(self, quantization_config: Union[QuantConfig, Dict[str, Any]], **kwargs: Any) -> None:
        config = _as_config(quantization_config)
        if config.packed and not kwargs.get("pre_quantized", True):
            config = QuantConfig(**{**config.to_dict(), "packed": False})  # packed is set by the exporter only
        super().__init__(config, **kwargs)
        #: dtype of the FP output head in the packed form that ``save_pretrained`` writes (``config.packed``);
        #: read from the checkpoint when loading a packed one, so that it is saved as it was stored
        self.fp_dtype: Optional[torch.dtype] = None
        self._source = "<checkpoint>"  # the packed checkpoint's files, for error messages
        #: quantizer tensors the checkpoint stores 0-dim (written before per-tensor ones became (1,)): loaded at
        #: their stored shape, reshaped to (1,) after loading
        self._scalar_keys: frozenset = frozenset()

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
    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: Optional[List[str]] = None, **kwargs: Any
    ) -> nn.Module:
        """Insert fake-quant wrappers on the meta skeleton, holding exactly the tensors the checkpoint holds
        (so transformers reports nothing missing).

        Full-precision checkpoint: the wrappers get their quantizers after loading (the file has none).
        Training form: wrappers with every quantizer tensor. Packed form: the packed layers become
        packed-layer skeletons (codes and grid, no ``weight``), checked against the file's metadata here
        and against the loaded sizes after loading.

        A pre-quantized checkpoint is then checked before anything is loaded: ``config.json``'s
        ``quantization_config`` against the quantization recorded in the safetensors metadata, and every
        quantized layer's tensors present at their shapes (transformers would initialise missing ones at
        random and only report them); a contradiction raises :class:`~sqakd_hf.errors.SQAKDCheckpointError`.
        """
        config: QuantConfig = self.quantization_config
        quantize_model(model, config, fold=self.pre_quantized)  # a full-precision file holds the BatchNorms
        header = files.read_checkpoint_header(checkpoint_files or [])  # corrupted files: a clear error
        prefix = getattr(model, "base_model_prefix", "") or ""
        where = ", ".join(sorted(set(header.files.values()))) or "<checkpoint>"
        if not self.pre_quantized:
            for _, layer in quant_layers(model):
                del layer.weight_quantizer, layer.input_quantizer
            return model
        if config.packed:
            self._source = where
            packed.prepare_packed_layers(model, header, prefix=prefix)
            recorded = set(json.loads(header.metadata.get(packed.FP_DTYPE_KEY) or "{}").values())
            self.fp_dtype = packed.as_fp_dtype(recorded.pop()) if len(recorded) == 1 else None
        else:
            packed.check_not_packed(header.shapes, str(sorted(set(header.files.values()))))
        manifest.check_metadata(model, header, where, prefix=prefix)
        manifest.check_tensors_present(model, header, where, prefix=prefix, skip_shapes=packed.PACKED_SUFFIXES)
        self._scalar_keys = frozenset(manifest.legacy_scalar_keys(model, header, prefix=prefix))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        config: QuantConfig = self.quantization_config
        if self.pre_quantized:
            if config.packed:
                packed.finish_packed_load(model, self._source)
            _as_vectors(model, self._scalar_keys)
            refresh_quantizer_state(model)
            return model
        # fold the loaded BatchNorms (fold_bn), then build the quantizers left out before loading, weight
        # quantizers initialised from the loaded weights; activation quantizers need data: sqakd_hf.calibrate
        if config.fold_bn:
            model.sqakd_report.folded = fold_batchnorm(model)
        if config.equalize:
            model.sqakd_report.equalized = equalize_model(model)
        for name, layer in quant_layers(model):
            wq, aq = build_layer_quantizers(layer, type(layer), config, config.bits_for(name))
            layer.weight_quantizer, layer.input_quantizer = wq, aq
            wq.init_from_weight(layer.weight)
        if config.deploy is not None:  # the residual blocks' quantizers, on the folded model (see deploy_mode)
            apply_deploy_mode(model, config)
        logger.info("sqakd: weight quantizers initialised from the checkpoint; calibrate activation quantizers "
                    "with sqakd_hf.calibrate(model, batches) before use (SQAKDTrainer does it)")
        return model

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        """Packed tensors (pre-quantized, packed form): transformers loads them at the size stored, so that
        :func:`~sqakd_hf.serialization.packed.finish_packed_load` can say clearly what does not fit."""
        if self.pre_quantized and param_name in self._scalar_keys:  # a 0-dim quantizer tensor of an older file
            return True
        return (self.pre_quantized and self.quantization_config.packed
                and param_name.rpartition(".")[2] in packed.PACKED_SUFFIXES)

    # ---- saving -------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model: nn.Module) -> Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, str]]:
        """Training form: the model's own state dict. Packed form (``config.packed``): the packed one.
        Both carry the quantization they were saved with in the safetensors metadata (checked on load);
        NaN / infinite tensors are refused (``ValueError`` naming them) before anything is written."""
        if getattr(self.quantization_config, "packed", False):
            state, _, metadata = packed.packed_state_dict(model, self.fp_dtype)
            packed.add_weight_guards(state, metadata)  # plain transformers refuses the file instead of random weights
            return state, metadata
        manifest.check_finite(model.state_dict(), f"{type(model).__name__}")
        return None, manifest.quant_metadata(model, packed=False)


def _as_vectors(model: nn.Module, keys: frozenset) -> None:
    """Reshape the 0-dim quantizer tensors ``keys`` (loaded at their stored shape) to the ``(1,)`` the quantizers
    hold."""
    for key in sorted(keys):
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        t = getattr(module, name)
        if t.dim() == 0:
            if name in module._parameters:
                setattr(module, name, nn.Parameter(t.detach().reshape(1), requires_grad=t.requires_grad))
            else:
                module._buffers[name] = t.reshape(1)


# ---- from_pretrained(quantized_dir, quantization_config=...) --------------------------------------
def _is_sqakd(config: Any) -> bool:
    return isinstance(config, QuantConfig) or (isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD)


def _merge_sqakd(saved: Union[QuantConfig, Dict[str, Any]], passed: Any) -> QuantConfig:
    """The checkpoint's config; a passed one must agree with it (accepted quietly) or it is an error."""
    saved = _as_config(saved)
    if passed is None:
        return saved
    if not isinstance(passed, QuantConfig):
        raise ValueError(
            f"this checkpoint is quantized with sqakd ({saved.short_name}) but you passed a "
            f"{type(passed).__name__}; drop the quantization_config argument"
        )
    check_config_compatible(saved, passed)
    return saved


def _install_conflict_check() -> None:
    """Make a ``quantization_config`` passed to ``from_pretrained`` for an sqakd checkpoint that contradicts
    the saved one an error (transformers keeps the saved one and only warns, even when it agrees).

    Missing public hook: nothing that a quantization method provides sees the config passed to
    ``from_pretrained`` for an already-quantized checkpoint. ``AutoHfQuantizer.merge_quantization_configs``
    drops it after comparing class names; the one per-config hook it calls,
    ``QuantizationConfigMixin.get_loading_attributes``, is only called for transformers' own
    ``LOADING_ATTRIBUTES_CONFIG_TYPES``; the config class and the ``HfQuantizer`` only ever see the saved
    config. So that classmethod is wrapped, once: sqakd checkpoints go to :func:`_merge_sqakd`, every
    other quant method to transformers' function unchanged (``tests/test_hf_quantizer.py`` pins both).
    """
    upstream = AutoHfQuantizer.merge_quantization_configs.__func__
    if getattr(upstream, "sqakd_conflict_check", False):
        return

    @functools.wraps(upstream)
    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        if _is_sqakd(quantization_config):
            return _merge_sqakd(quantization_config, quantization_config_from_args)
        return upstream(cls, quantization_config, quantization_config_from_args)

    merge_quantization_configs.sqakd_conflict_check = True
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge_quantization_configs)


# ---- registration ---------------------------------------------------------------------------------
def register() -> None:
    """Register ``quant_method: "sqakd"`` with transformers (config class and quantizer) and the config
    conflict check. Idempotent; an entry that is already registered is never replaced."""
    for mapping, registrar, cls in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, QuantConfig),
        (AUTO_QUANTIZER_MAPPING, register_quantizer, SQAKDHfQuantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is None:
            registrar(QUANT_METHOD)(cls)
        elif existing is not cls:
            logger.warning(
                "sqakd: transformers already has %s registered for quant_method %r; keeping it. "
                "Import sqakd_hf before anything else registers that name.", existing.__qualname__, QUANT_METHOD,
            )
    _install_conflict_check()


register()
