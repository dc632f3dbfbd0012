"""`quantize_model`: insert fake-quant layers into any ``nn.Module``, in place."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from transformers import PretrainedConfig

from .config import QuantConfig
from .deploy_mode import apply_deploy_mode
from .equalization import equalize_model
from .folding import fold_batchnorm
from .modules import EMBEDDING_WRAPPERS, WRAPPERS, QuantEmbedding, QuantLayer, wrapper_for
from .quantizers import FullPrecision, Quantizer, build_quantizer

logger = logging.getLogger(__name__)

_LINEAR_LIKE = tuple(WRAPPERS)


@dataclass
class LayerEntry:
    name: str
    kind: str
    weight_bits: int = 32
    act_bits: int = 32
    reason: str = ""


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` wrapped and what it kept full precision (and why)."""

    method: str
    quantized: List[LayerEntry] = field(default_factory=list)
    kept_fp: List[LayerEntry] = field(default_factory=list)
    #: ``"<layer> <- <source>"`` for every layer input SmoothQuant migrated at calibration (``smooth_alpha``)
    smoothed: List[str] = field(default_factory=list)
    #: BatchNorm layers folded into the conv before them (``fold_bn``)
    folded: List[str] = field(default_factory=list)
    #: ``"<first conv> -> <second conv>"`` per cross-layer-equalized pair (``equalize``)
    equalized: List[str] = field(default_factory=list)

    def summary(self) -> str:
        kept = ", ".join(f"{e.name} ({e.reason})" for e in self.kept_fp) or "none"
        return f"sqakd: quantized {len(self.quantized)} layers with {self.method}; kept full precision: {kept}"

    def __str__(self) -> str:
        rows = [f"{'layer':<60} {'type':<14} {'W':>3} {'A':>3}  note"]
        for e in self.quantized:
            rows.append(f"{e.name:<60} {e.kind:<14} {e.weight_bits:>3} {e.act_bits:>3}")
        for e in self.kept_fp:
            rows.append(f"{e.name:<60} {e.kind:<14} {'fp':>3} {'fp':>3}  {e.reason}")
        return "\n".join(rows)


def _module_name_map(model: nn.Module) -> Dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _call_getter(model: nn.Module, getter: str) -> Optional[nn.Module]:
    fn = getattr(model, getter, None)
    if fn is None:
        return None
    try:
        out = fn()
    except (NotImplementedError, AttributeError, TypeError):
        return None
    return out if isinstance(out, nn.Module) else None


def declared_head(model: nn.Module) -> Optional[nn.Module]:
    """The output layer the model declares: transformers' ``get_output_embeddings()`` (LM heads) or
    timm's ``get_classifier()`` (also inside transformers' timm wrapper); None when it declares none."""
    head = _call_getter(model, "get_output_embeddings")
    if head is None:
        head = _call_getter(model, "get_classifier")
    if head is None:
        timm_model = getattr(model, "timm_model", None)  # transformers' TimmWrapper
        head = _call_getter(timm_model, "get_classifier") if isinstance(timm_model, nn.Module) else None
    return head


def _default_fp_layers(model: nn.Module, candidates: List[str]) -> Dict[str, str]:
    """The paper's rule: first layer (stem/patch embedding) and classifier head stay FP."""
    names = _module_name_map(model)
    keep: Dict[str, str] = {}
    if not candidates:
        return keep
    if not isinstance(_call_getter(model, "get_input_embeddings"), nn.Embedding):
        keep[candidates[0]] = "first layer, kept full precision by default"
    head = declared_head(model)
    if head is None:  # no declared head: the last quantizable layer in registration order
        head_name = candidates[-1]
    else:  # the declared head, or the last quantizable layer inside it (none for an Identity head)
        inside = [names[id(m)] for m in head.modules() if names.get(id(m)) in candidates]
        head_name = inside[-1] if inside else None
    if head_name is not None:
        keep[head_name] = "classifier head, kept full precision by default"
    return keep


def _match_patterns(patterns: List[str], names: List[str], field_name: str) -> None:
    for p in patterns:
        if not any(re.search(p, n) for n in names):
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"{field_name} pattern {p!r} matches no quantizable layer; quantizable layers are: {shown}"
            )


def build_layer_quantizers(layer: nn.Module, cls: type, config: QuantConfig, bits: Dict[str, int]) -> Tuple[Quantizer, Quantizer]:
    """The ``(weight_quantizer, input_quantizer)`` of ``layer`` wrapped as ``cls``; embedding tables get
    ``config.embedding_bits`` per row and a full-precision input placeholder (``bits`` is ignored)."""
    weight = layer.weight
    if issubclass(cls, QuantEmbedding):
        with torch.device(weight.device):
            wq = build_quantizer(config.method, config.embedding_bits or 32, "weight",
                                 cls.quantizer_param_shape(weight.shape), cls.channel_axis, config.ewgs_delta, config.init)
            return wq.to(weight.dtype), FullPrecision("act")
    per_channel = config.weight_granularity == "per_channel"
    shape = cls.quantizer_param_shape(weight.shape) if per_channel else ()
    per_token = {"per_token": True, "per_token_absmax": "absmax"}.get(config.act_granularity, False) \
        if cls.features_last else False
    with torch.device(weight.device):
        wq = build_quantizer(config.method, bits["weight_bits"], "weight", shape, cls.channel_axis, config.ewgs_delta,
                             config.init)
        aq = build_quantizer(config.method, bits["act_bits"], "act", (), 0, config.ewgs_delta, config.init, per_token)
    return wq.to(weight.dtype), aq.to(weight.dtype)


def quantize_model(model: nn.Module, config: Union[QuantConfig, dict, None] = None, *, fold: bool = True,
                   **kwargs) -> nn.Module:
    """Replace every Linear / Conv2d / Conv1D of ``model`` by its fake-quant wrapper, in place.

    ``config`` is a :class:`QuantConfig` (or its dict; keyword arguments build one). With ``config.fold_bn``
    the BatchNorms are first folded into their convs (:func:`sqakd_hf.folding.fold_batchnorm`);
    with ``config.equalize`` conv pairs are then equalized (:func:`sqakd_hf.equalization.equalize_model`);
    ``fold=False`` leaves both to the caller (a loader that folds once the full-precision weights are in).
    Returns ``model``; the report of what was quantized and kept full precision is
    logged and stored as ``model.sqakd_report``, the config as ``model.sqakd_config``.
    Raises ``ValueError`` if nothing would be quantized or a pattern matches no layer.
    """
    if config is None:
        config = QuantConfig(**kwargs)
    elif isinstance(config, dict):
        config = QuantConfig(**{**config, **kwargs})
    elif kwargs:
        raise ValueError("pass either a QuantConfig or keyword arguments, not both")
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("model is already quantized (it contains fake-quant layers); start from the FP model")

    report = QuantizationReport(method=config.method)
    if config.fold_bn and fold:
        report.folded = fold_batchnorm(model)
    if config.equalize and fold:
        report.equalized = equalize_model(model)
    candidates: List[str] = []
    for name, module in model.named_modules():
        if wrapper_for(module) is not None:
            candidates.append(name)
        elif isinstance(module, _LINEAR_LIKE):
            report.kept_fp.append(
                LayerEntry(name, type(module).__name__, reason=f"unsupported subclass {type(module).__name__}")
            )
    parents = {id(m) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    if parents:  # nn.MultiheadAttention reads out_proj.weight directly, bypassing its forward
        mha_out = {n + ".out_proj" for n, m in model.named_modules() if id(m) in parents}
        for n in sorted(mha_out & set(candidates)):
            candidates.remove(n)
            report.kept_fp.append(LayerEntry(n, "Linear", reason="used functionally by nn.MultiheadAttention"))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has nothing to quantize: it contains no nn.Linear, nn.Conv2d or "
            "transformers Conv1D layer"
        )

    if config.embedding_bits is None:
        tables = []
        report.kept_fp.extend(LayerEntry(n, type(m).__name__, reason="embedding table (embedding_bits=None)")
                              for n, m in model.named_modules() if type(m) in EMBEDDING_WRAPPERS)
    else:
        tables = _embedding_tables(model, report)
    if config.modules_to_not_convert is None:
        keep = _default_fp_layers(model, candidates)
    else:
        _match_patterns(config.modules_to_not_convert, candidates + tables, "modules_to_not_convert")
        keep = {n: "matches modules_to_not_convert" for n in candidates + tables
                if any(re.search(p, n) for p in config.modules_to_not_convert)}
    _match_patterns(list(config.layer_bits), candidates, "layer_bits")
    for name in tables:
        table = model.get_submodule(name)
        if name in keep:
            report.kept_fp.append(LayerEntry(name, type(table).__name__, reason=keep[name]))
            continue
        cls = EMBEDDING_WRAPPERS[type(table)]
        wq, aq = build_layer_quantizers(table, cls, config, {})
        _set_submodule(model, name, cls.from_float(table, wq, aq))
        report.quantized.append(LayerEntry(name, type(table).__name__, config.embedding_bits, 32))

    for name in candidates:
        layer = model.get_submodule(name)
        kind = type(layer).__name__
        bits = config.bits_for(name)
        if name in keep or (bits["weight_bits"] == 32 and bits["act_bits"] == 32):
            report.kept_fp.append(LayerEntry(name, kind, reason=keep.get(name, "32 bits requested")))
            continue
        cls = wrapper_for(layer)
        wq, aq = build_layer_quantizers(layer, cls, config, bits)
        _set_submodule(model, name, cls.from_float(layer, wq, aq))
        report.quantized.append(LayerEntry(name, kind, bits["weight_bits"], bits["act_bits"]))

    if not report.quantized:
        raise ValueError(
            f"nothing to quantize in {type(model).__name__}: all {len(candidates)} candidate layers are kept full "
            "precision by modules_to_not_convert / layer_bits; pass modules_to_not_convert=[] to quantize them"
        )
    if config.deploy is not None and fold:  # a loader that folds later also rewrites the blocks then
        apply_deploy_mode(model, config)
    model.sqakd_config = config
    model.sqakd_report = report
    if isinstance(getattr(model, "config", None), PretrainedConfig):
        model.config.quantization_config = config  # save_pretrained records it; from_pretrained restores the model
    logger.info(report.summary())
    return model


def _embedding_tables(model: nn.Module, report: QuantizationReport) -> List[str]:
    """Names of the embedding tables to quantize (``embedding_bits``); a table whose weight another module
    shares (an LM head tied to it) is kept full precision and reported, so the two stay one tensor."""
    owners: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0])
    # a skeleton built from a config is not tied yet (transformers ties after loading): add the ties it declares
    for target, source in _declared_ties(model).items():
        if not (target.endswith(".weight") and source.endswith(".weight")):
            continue
        t, s = target[: -len(".weight")], source[: -len(".weight")]
        for a, b in ((t, s), (s, t)):
            try:
                owners.setdefault(id(model.get_parameter(f"{a}.weight")), []).append(b)
            except AttributeError:
                pass
    tables = []
    for name, module in model.named_modules():
        if type(module) not in EMBEDDING_WRAPPERS:
            continue
        tied = [n for n in dict.fromkeys(owners.get(id(module.weight), [])) if n != name]
        if tied:
            report.kept_fp.append(LayerEntry(name, type(module).__name__,
                                             reason=f"tied to {tied[0]} (shares its weight), kept full precision"))
            logger.warning("sqakd: embedding %s shares its weight with %s (tied); kept full precision. Untie them "
                           "(for an LM head: tie_word_embeddings=False) to quantize the table", name, tied[0])
        else:
            tables.append(name)
    return tables


def _declared_ties(model: nn.Module) -> Dict[str, str]:
    """``{target: source}`` parameter names that transformers ties in ``model`` (its ``_tied_weights_keys`` as
    the config enables them, every sub-model included); empty for other models."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if not callable(expand):  # a transformers release without it: the LM head tied to the input embedding
        names = _module_name_map(model)
        head, table = _call_getter(model, "get_output_embeddings"), _call_getter(model, "get_input_embeddings")
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        if tied and head is not None and table is not None and id(head) in names and id(table) in names:
            return {f"{names[id(head)]}.weight": f"{names[id(table)]}.weight"}
        return {}
    try:
        return dict(expand(all_submodels=True))
    except (ValueError, AttributeError, TypeError):  # a declared pattern that matches nothing in this model
        return {}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quant_layers(model: nn.Module) -> Iterator[Tuple[str, QuantLayer]]:
    """``(name, layer)`` for every fake-quant layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m


def named_quantizers(model: nn.Module) -> Iterator[Tuple[str, Quantizer]]:
    """``(name, quantizer)`` for every quantizer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def quantizer_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Learnable quantizer parameters (steps, clip levels, intervals): their own optimizer group."""
    return [p for _, q in named_quantizers(model) for p in q.quant_parameters()]


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in quant_layers(model))


def get_quant_config(model: nn.Module) -> QuantConfig:
    """The :class:`QuantConfig` of a quantized model (``model.sqakd_config`` or ``config.quantization_config``)."""
    cfg = getattr(model, "sqakd_config", None)
    if cfg is None:
        cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(cfg, Mapping):
        cfg = QuantConfig.from_dict(cfg)
    if not isinstance(cfg, QuantConfig):
        raise ValueError(
            f"{type(model).__name__} is not an SQAKD-quantized model: quantize it with sqakd_hf.quantize_model(model, "
            "config) or load it with from_pretrained(..., quantization_config=QuantConfig(...)) first"
        )
    return cfg
