"""Deployment-aware quantization (``QuantConfig(deploy="onnx")``): the student fake-quantizes exactly the tensors that
a fully integer ONNX graph (QLinearConv + QLinearAdd) quantizes, so that training optimises the function that runs.

An integer graph computes every residual block ``out = act(main(x) + shortcut(x))`` on integer tensors, so besides
each conv's weight and input it quantizes

* the block input ``x`` once, with one step shared by everything that reads it (the first conv of the main branch,
  the downsample conv, the identity shortcut): ``input_quantizer`` on the block, the readers' own input quantizers
  become pass-through;
* both inputs of the add: ``residual_quantizer`` (the main branch's output) and ``shortcut_quantizer`` (the downsample
  branch's output; an identity shortcut is the already quantized block input);
* the add's output (after the block's activation): ``output_quantizer``. A block whose input is another rewritten
  block's output has no ``input_quantizer`` (that tensor is already on one grid), and a quantized layer that reads a
  rewritten block's output directly gets a pass-through input quantizer;
* the input of an average pool fed by a conv (the head conv of EfficientNet-Lite before its global pool): an
  ``input_quantizer`` on the pool (one of :data:`POOLS`), so that conv too runs as an integer conv.

An integer conv also adds its bias as an int32 code at step ``s_in * s_w`` (input step times the channel's weight step),
so each conv whose output the graph quantizes (it feeds, through ReLU / ReLU6 / identity only, a quantized layer or
quantizer) adds ``round(b / d) * d`` with ``d = max(s_in * s_w, |b| / BIAS_CODE_LIMIT)`` (straight-through gradient
to ``b``): the rounding moves an output by up to ``s_in * s_w / 2``, a sizeable fraction of an output step for convs
with few inputs per output (the stem: ~0.04 of a step), which without it flips one code in a few hundred; the floor
keeps the code inside int32 for channels with near-zero folded weights (:func:`integer_bias`). In evaluation (eval
mode with autograd off, e.g. under ``torch.no_grad()``) such a conv computes as onnxruntime's QLinearConv does
(:func:`engine_conv`: exact integer accumulation, one float32 requantization, round half to even), and so does each
residual add (:func:`engine_add`: QLinearAdd's fused multiply-adds on the uint8 codes): float32 fake-quant arithmetic
rounds a few codes in 10^5 differently, and a deep depthwise stack amplifies each such one-code flip
(EfficientNet-Lite0: 98.7% top-1 agreement with the integer graph, or with the same student run in float64; 100% with
the engine's arithmetic). Training keeps the float fake-quant path and its gradients.

The residual blocks are found by type in :data:`BLOCKS` (timm's ResNet ``BasicBlock`` / ``Bottleneck`` and the
EfficientNet / MobileNet ``InvertedResidual``, ``DepthwiseSeparableConv`` and ``ConvBnAct`` with a skip); each block is
given a subclass of its type whose ``forward`` adds the quantizers, keeping every child and tensor name. Which tensors
feed which is read from a ``torch.fx`` trace (rewritten blocks and layers as leaves) that needs no data, so the same
rewrite replays on the meta skeleton when a saved student is loaded. A residual add the trace finds outside a known
block is refused with :class:`~sqakd_hf.errors.InputError` (its two inputs would be quantized on two grids).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .config import QuantConfig
from .errors import InputError
from .folding import FoldedNorm, traced_graphs
from .modules import QuantLayer
from .quantizers import FullPrecision, Quantizer, build_quantizer

__all__ = ["BLOCKS", "BIAS_CODE_LIMIT", "POOLS", "BlockSpec", "apply_deploy_mode", "deploy_blocks", "engine_add",
           "engine_conv", "int32_fit_weight_step", "integer_bias", "tensor_quantizers"]

#: largest ``|bias code|`` of an integer conv: int32, with room for the accumulated products (``K * 255 * 128``
#: stays below ``2**30`` up to ``K = 32768`` inputs per output)
BIAS_CODE_LIMIT = 2 ** 30

#: the quantizers a rewritten block may hold, in the order its forward applies them
BLOCK_QUANTIZERS = ("input_quantizer", "residual_quantizer", "shortcut_quantizer", "output_quantizer")


@dataclass(frozen=True)
class BlockSpec:
    """How a residual block type computes ``out = post(main(x) + downsample(x))``, by child names."""

    main: Tuple[str, ...]  #: children applied in order on the main branch (absent / None children skipped)
    entry: Tuple[str, ...]  #: candidates for the main branch's first layer (the first present one reads ``x``)
    downsample: Optional[str] = None  #: the shortcut branch's module (None or absent: identity shortcut)
    post: Optional[str] = None  #: activation after the add
    skip_flag: Optional[str] = None  #: attribute that says whether this instance adds its input (None: always)


#: residual block types the deploy rewrite knows, by (module, class name); filled from timm when it is in use
BLOCKS: Dict[Tuple[str, str], BlockSpec] = {
    ("timm.models.resnet", "BasicBlock"): BlockSpec(
        ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path"), ("conv1",),
        downsample="downsample", post="act2"),
    ("timm.models.resnet", "Bottleneck"): BlockSpec(
        ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3", "se", "drop_path"),
        ("conv1",), downsample="downsample", post="act3"),
    ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv"): BlockSpec(
        ("conv_s2d", "bn_s2d", "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2", "drop_path"), ("conv_s2d", "conv_dw"),
        skip_flag="has_skip"),
    ("timm.models._efficientnet_blocks", "InvertedResidual"): BlockSpec(
        ("conv_s2d", "bn_s2d", "conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3", "drop_path"),
        ("conv_s2d", "conv_pw"), skip_flag="has_skip"),
    ("timm.models._efficientnet_blocks", "ConvBnAct"): BlockSpec(
        ("conv", "bn1", "aa", "drop_path"), ("conv",), skip_flag="has_skip"),
}

_DEPLOY_CLASSES: Dict[type, type] = {}
_INTEGER_CLASSES: Dict[type, type] = {}  # quantized conv type -> its subclass adding the bias on the int32 grid
_POOL_CLASSES: Dict[type, type] = {}  # average-pool type -> its subclass quantizing its input
#: average pools whose input the integer graph quantizes when a conv feeds them (the head conv of EfficientNet-Lite:
#: it then runs as an integer conv, the pool on the dequantized codes)
POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def _child(block: nn.Module, name: Optional[str]) -> Optional[nn.Module]:
    return getattr(block, name, None) if name else None


def _deploy_forward(self: nn.Module, x: Tensor) -> Tensor:
    spec: BlockSpec = self.deploy_spec
    quantize_input = self._modules.get("input_quantizer")
    if quantize_input is not None:
        x = quantize_input(x)
    y = x
    for name in spec.main:
        layer = _child(self, name)
        if layer is not None:
            y = layer(y)
    shortcut = x
    down = _child(self, spec.downsample)
    if down is not None:
        shortcut = self.shortcut_quantizer(down(x))
    main = self.residual_quantizer(y)
    out = None
    if not self.training and not torch.is_grad_enabled():  # evaluation: the integer engine's arithmetic
        source = (self, "shortcut_quantizer") if down is not None else self.__dict__.get("deploy_input_source")
        out = engine_add(main, self.residual_quantizer, shortcut, getattr(*source) if source else None,
                         self.output_quantizer)
    if out is None:
        out = main + shortcut
    post = _child(self, spec.post)
    if post is not None:
        out = post(out)
    return self.output_quantizer(out)


def _subclass(registry: Dict[type, type], cls: type, prefix: str, attrs: Dict[str, object], doc: str) -> type:
    """``cls`` with ``attrs`` as ``<prefix><cls name>``: defined once per type, and reachable by name in this module
    (unpickling, see :func:`__getattr__`)."""
    if cls not in registry:
        name = f"{prefix}{cls.__name__}"
        registry[cls] = type(name, (cls,), {**attrs, "__module__": __name__,
                                            "__doc__": f"{cls.__name__} {doc} (see {__name__})."})
        globals()[name] = registry[cls]
    return registry[cls]


def _deploy_class(cls: type) -> type:
    """``cls`` (a residual block) with the deploy forward."""
    return _subclass(_DEPLOY_CLASSES, cls, "Deploy", {"forward": _deploy_forward,
                                                      "deploy_spec": BLOCKS[(cls.__module__, cls.__name__)]},
                     "with the deploy-mode quantizers")


def __getattr__(name: str) -> type:
    """``Deploy<Block>`` / ``Integer<Conv>`` classes by name, also in a process that has not rewritten a model yet
    (unpickling)."""
    import importlib

    for module, cls_name in BLOCKS:
        if name == f"Deploy{cls_name}":
            return _deploy_class(getattr(importlib.import_module(module), cls_name))
    if name in ("IntegerQuantConv2d", "IntegerQuantConv2dSame"):
        return _integer_conv_class(getattr(importlib.import_module(".modules", __package__), name[len("Integer"):]))
    pool = next((cls for cls in POOLS if name == f"Deploy{cls.__name__}"), None)
    if pool is not None:
        return _pool_class(pool)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _spec(module: nn.Module) -> Optional[BlockSpec]:
    cls = type(module)
    if cls in _DEPLOY_CLASSES.values():
        return cls.deploy_spec
    spec = BLOCKS.get((cls.__module__, cls.__name__))
    if spec is None or (spec.skip_flag is not None and not getattr(module, spec.skip_flag, False)):
        return None
    return spec


def deploy_blocks(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, block)`` for every residual block the deploy rewrite handles (rewritten or not yet)."""
    for name, module in model.named_modules():
        if _spec(module) is not None:
            yield name, module


#: where a quantizer lives: (owner module, attribute name), resolved at each call (exporters swap quantizers)
Source = Tuple[nn.Module, str]

#: modules an integer conv absorbs on the way to the next quantizer (onnxruntime folds ReLU / Clip into the
#: requantization, dropout and identities vanish in eval, and the export quantizes in front of a max-pool)
_PASS_THROUGH = (nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Dropout, nn.MaxPool2d)


def _passes_codes(module: Optional[nn.Module]) -> bool:
    if isinstance(module, FoldedNorm):
        return all(_passes_codes(c) for c in module.children())
    return module is None or isinstance(module, _PASS_THROUGH) or type(module).__name__ == "DropPath"


def _calibrated(q: object) -> bool:
    """Whether ``q`` is one of our quantizers and quantizes now (calibrated, below 32 bits, not bypassed)."""
    return isinstance(q, Quantizer) and not isinstance(q, FullPrecision) and q.bits < 32 and q.initialized and \
        not q.bypass


def _live_step(q: object) -> Optional[Union[Tensor, float]]:
    """The step of a static per-tensor activation quantizer (LSQ / minmax ``scale``, PACT ``alpha / qmax``), or of the
    Q/DQ module an exporter swapped in for it (a float ``scale``); None when it does not quantize."""
    if isinstance(q, Quantizer):
        if not _calibrated(q):
            return None
        alpha = getattr(q, "alpha", None)
        if isinstance(alpha, Tensor):
            return alpha.detach().abs().clamp_min(1e-8) / q.qmax
        scale = getattr(q, "scale", None)
        return scale.detach().clamp_min(1e-8) if isinstance(scale, Tensor) else None
    scale = getattr(q, "scale", None)
    return scale if isinstance(scale, (float, Tensor)) else None


def int32_fit_weight_step(s_w: Tensor, s_in: Union[Tensor, float], bias: Tensor) -> Tensor:
    """Per output channel, the weight step an integer conv uses so that its bias code ``round(b / (s_in * step))``
    stays within :data:`BIAS_CODE_LIMIT`: ``s_w``, raised to ``|b| / (s_in * BIAS_CODE_LIMIT)`` (plus a 2**-20
    margin) where that is larger; float64, shape of ``bias``."""
    s_in = torch.as_tensor(s_in, dtype=torch.float64).reshape(())
    need = bias.double().abs() / (s_in * BIAS_CODE_LIMIT) * (1 + 2 ** -20)
    s_w = s_w.double().reshape(-1).expand_as(need)
    return torch.where(need > s_w, need, s_w)


def integer_bias(layer: nn.Module) -> Optional[Tensor]:
    """``layer.bias`` as an integer engine adds it: ``round(b / d) * d`` with ``d = s_in * step``
    (:func:`int32_fit_weight_step`) per output channel, straight-through to ``b``, for a conv the deploy rewrite
    marked (its output is quantized, see :func:`apply_deploy_mode`) while its input and weight quantizers are
    active; else ``layer.bias``."""
    bias = layer.bias
    source = layer.__dict__.get("deploy_input_source")  # (owner, attribute) of the quantizer that made the input
    if bias is None or source is None:
        return bias
    s_in = _live_step(getattr(source[0], source[1], None))
    wq = layer.weight_quantizer
    if isinstance(wq, Quantizer):
        s_w = wq.grid(layer.weight)[0] if _calibrated(wq) else None
    else:  # the exporter's Q/DQ weight: its per-channel scale
        s_w = getattr(wq, "scale", None)
    if s_in is None or s_w is None:
        return bias
    b = bias.detach()
    s_in = s_in.detach().to(b).reshape(()) if isinstance(s_in, Tensor) else s_in
    step = (int32_fit_weight_step(s_w.detach(), s_in, b) * s_in).to(b)
    return bias + (torch.round(b / step) * step - b)


def engine_conv(layer: nn.Module, x: Tensor, padding: Tuple[int, ...]) -> Optional[Tensor]:
    """A marked conv's output as onnxruntime's QLinearConv computes it from the quantized input ``x``: the integer
    codes accumulated exactly (float32 while ``K * 2**a_bits * 2**(w_bits-1) < 2**24``, else float64), the int32 bias
    code added, one float32 multiply by ``s_in * s_w / s_out`` and a round half to even; returned on the output grid
    (``codes * s_out``), which the output quantizer then keeps exactly. Channels whose bias code would overflow int32
    use the export's larger weight step (:func:`~sqakd_hf.export.onnx_integer.fit_biases_in_int32`). None (use the
    float path) unless the input, weight and output quantizers are calibrated quantizers and ``x`` is float32."""
    source, output = layer.__dict__.get("deploy_input_source"), layer.__dict__.get("deploy_output_source")
    if source is None or output is None or x.dtype != torch.float32 or layer.padding_mode != "zeros":
        return None
    q_in, q_out, wq = getattr(*source, None), getattr(*output, None), layer.weight_quantizer
    if not (_calibrated(q_in) and _calibrated(q_out) and _calibrated(wq)):
        return None
    s_in, s_out = _live_step(q_in).float().reshape(()), _live_step(q_out).float().reshape(())
    s_w = wq.grid(layer.weight)[0].detach().float().reshape(-1)
    channel = (-1,) + (1,) * (layer.weight.dim() - 1)
    bias = integer_bias(layer)
    bias = torch.zeros_like(s_w) if bias is None else bias.detach().float()
    s_eff = int32_fit_weight_step(s_w, s_in, bias).float()
    codes_w = torch.round(layer.quantized_weight().detach().float() / s_w.view(channel))
    codes_w = torch.round(codes_w.double() * (s_w.double() / s_eff.double()).view(channel))
    bias_codes = torch.round(bias / (s_in * s_eff))
    exact32 = codes_w[0].numel() * 2 ** q_in.bits * 2 ** (wq.bits - 1) < 2 ** 24
    dtype = torch.float32 if exact32 else torch.float64
    acc = F.conv2d(x.div(s_in).round_().to(dtype), codes_w.to(dtype), None, layer.stride, padding, layer.dilation,
                   layer.groups)
    # the bias code joins the exact integer sum with one rounding, as float32(int32 sum) does
    acc = acc.add_(bias_codes.to(dtype).view(1, -1, *([1] * (acc.dim() - 2)))).float()
    scale = (s_in * s_eff) / s_out
    return acc.mul_(scale.view(1, -1, *([1] * (acc.dim() - 2)))).round_().mul_(s_out)


def _u8_zero_point(q: Quantizer) -> float:
    """The uint8 zero point of a quantizer's grid in the exported graph (signed: 128; unsigned b-bit: 128 - 2^(b-1))."""
    return 128.0 if q.qmin < 0 else 128.0 - 2 ** (q.bits - 1)


def engine_add(a: Tensor, qa: Quantizer, b: Tensor, qb: Optional[Quantizer], qc: Quantizer) -> Optional[Tensor]:
    """``a + b`` (on the grids of ``qa`` and ``qb``) as onnxruntime's QLinearAdd computes it onto ``qc``'s grid: on the
    uint8 codes ``A``, ``B``, ``round(fma(A, sa/sc, fma(B, sb/sc, zc - (sa/sc * za + sb/sc * zb))))`` in float32
    (fused multiply-adds, emulated exactly in float64), round half to even, saturated to uint8; returned on ``qc``'s
    grid. None (use the float sum) unless the three quantizers are calibrated and the inputs float32."""
    if qb is None or a.dtype != torch.float32 or not all(_calibrated(q) for q in (qa, qb, qc)):
        return None
    sa, sb, sc = (_live_step(q).float().reshape(()) for q in (qa, qb, qc))
    za, zb, zc = (_u8_zero_point(q) for q in (qa, qb, qc))
    rac, rbc = sa / sc, sb / sc
    fixed = zc - ((rac * za).float() + (rbc * zb).float())
    codes_a, codes_b = a.div(sa).round_().add_(za).double(), b.div(sb).round_().add_(zb).double()
    inner = codes_b.mul_(rbc.double()).add_(fixed.double()).float().double()
    out = codes_a.mul_(rac.double()).add_(inner).float()
    return out.round_().clamp_(0, 255).sub_(zc).mul_(sc)


def _integer_forward(self: nn.Module, x: Tensor) -> Tensor:
    x = self.input_quantizer(x)
    padding = self.padding
    if self.deploy_same_padding:  # timm's Conv2dSame: TF 'same' padding (quantize first: zero is on every grid)
        from timm.layers.padding import pad_same

        x, padding = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation), (0, 0)
    if not self.training and not torch.is_grad_enabled():  # evaluation: the integer engine's arithmetic
        out = engine_conv(self, x, padding)
        if out is not None:
            return out
    if self.deploy_same_padding:
        return F.conv2d(x, self.quantized_weight(), integer_bias(self), self.stride, padding, self.dilation,
                        self.groups)
    return self._conv_forward(x, self.quantized_weight(), integer_bias(self))


def _pool_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.deploy_base.forward(self, self.input_quantizer(x))


def _pool_class(cls: type) -> type:
    """``cls`` (an average pool) quantizing its input."""
    return _subclass(_POOL_CLASSES, cls, "Deploy", {"forward": _pool_forward, "deploy_base": cls},
                     "quantizing its input")


def _integer_conv_class(cls: type) -> type:
    """``cls`` (a quantized conv) adding its bias on the int32 grid and computing as the engine in evaluation."""
    return _subclass(_INTEGER_CLASSES, cls, "Integer", {"forward": _integer_forward,
                                                        "deploy_same_padding": cls.__name__ == "QuantConv2dSame"},
                     "adding its bias on the int32 grid")


def _kept_whole(m: nn.Module) -> bool:
    """Modules the data-flow trace keeps as single nodes (besides convs and norms): residual blocks and layers."""
    return _spec(m) is not None or isinstance(m, (QuantLayer, nn.Linear))


_ADDS = (operator.add, operator.iadd, torch.add)


def _is_tensor_node(arg: object) -> bool:
    return (isinstance(arg, fx.Node) and arg.op not in ("get_attr",)
            and not (arg.op == "call_method" and arg.target in ("size", "dim", "numel"))
            and not (arg.op == "call_function" and arg.target in (getattr, len)))


def _owner(node: fx.Node, prefix: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    inner = next(reversed(stack.values()), None) if stack else None
    path = inner[0] if isinstance(inner, tuple) else ""
    return (prefix + path).rstrip(".") or "<model>"


def _act_quantizer(config: QuantConfig, name: str, device: torch.device, dtype: torch.dtype) -> Quantizer:
    bits = config.bits_for(name)["act_bits"]
    with torch.device(device):
        return build_quantizer(config.method, bits, "act", (), 0, config.ewgs_delta, config.init).to(dtype)


def apply_deploy_mode(model: nn.Module, config: QuantConfig) -> List[str]:
    """Rewrite ``model``'s residual blocks for ``config.deploy`` (see the module docstring), in place, after the
    layers were wrapped; works on a meta skeleton. Every quantized conv whose output the integer graph quantizes adds
    its bias on the int32 grid (:func:`integer_bias`). Returns the rewritten blocks' names. Raises
    :class:`~sqakd_hf.errors.InputError` for a residual add outside a known block."""
    blocks = dict(deploy_blocks(model))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    fed_by: Dict[str, Optional[str]] = {}  # block -> the block whose output it reads (None: another tensor)
    reads_block: List[Tuple[str, str]] = []  # (quantized layer, block) for layers reading a block's output directly
    integer: List[Tuple[nn.Module, Source]] = []  # (conv, the quantizer of its output) for integer convs
    traced: List[str] = []
    for prefix, graph in traced_graphs(model, leaf=_kept_whole):
        traced.append(prefix)
        for node in graph.nodes:
            if node.op == "call_function" and node.target in _ADDS:
                if len([a for a in node.args if _is_tensor_node(a)]) == 2:
                    owner = _owner(node, prefix)
                    kind = type(model.get_submodule(owner)).__name__ if owner != "<model>" else type(model).__name__
                    raise InputError(
                        f"deploy={config.deploy!r}: {owner} ({kind}) adds two tensors (a residual connection) the "
                        "deploy rewrite does not know, so its inputs would be quantized on two grids; it knows "
                        f"{', '.join(sorted(n for _, n in BLOCKS))} (timm ResNet / EfficientNet / MobileNet). Quantize "
                        "this model without deploy (QuantConfig(act_granularity='per_tensor') still exports to ONNX)")
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            name, src = prefix + node.target, node.args[0]
            source = prefix + src.target if src.op == "call_module" and prefix + src.target in blocks else None
            if name in blocks:
                fed_by[name] = source
            elif source is not None and name in layers:
                reads_block.append((name, source))
            output = _feeds_quantizer(node, prefix, model, blocks, layers) if name in layers else None
            if output is not None:
                integer.append((layers[name], output))
    _check_untraced(model, traced, config)
    missing = sorted(set(blocks) - set(fed_by))
    if missing:
        raise InputError(f"deploy={config.deploy!r}: cannot follow the data flow into {missing[0]} "
                         f"({type(blocks[missing[0]]).__name__}): the model does not trace with torch.fx")
    sources: Dict[int, Source] = {}  # id(layer) -> the quantizer of its input
    for name, block in blocks.items():
        src = (block, "input_quantizer") if fed_by[name] is None else (blocks[fed_by[name]], "output_quantizer")
        sources.update((id(reader), src) for reader in _rewrite(block, name, config, quantize_input=src[0] is block))
        block.__dict__["deploy_input_source"] = src  # an identity shortcut's grid (see engine_add)
        integer.extend(_block_integer_convs(block))
    for name, src in reads_block:
        layers[name].input_quantizer = FullPrecision("act")
        sources[id(layers[name])] = (blocks[src], "output_quantizer")
    names = {id(m): n for n, m in model.named_modules()}
    for conv, output in integer:
        if isinstance(output[0], POOLS):
            _quantize_pool_input(output[0], names[id(output[0])], config, conv.weight)
        _add_integer_bias(conv, sources.get(id(conv), (conv, "input_quantizer")), output)
    return sorted(blocks)


def _quantize_pool_input(pool: nn.Module, name: str, config: QuantConfig, like: Tensor) -> None:
    """Give an average pool fed by a conv its own input quantizer (on ``like``'s device and dtype)."""
    if type(pool) not in _POOL_CLASSES.values():
        pool.input_quantizer = _act_quantizer(config, name, like.device, like.dtype)
        pool.__class__ = _pool_class(type(pool))


def _reads_quantized(module: nn.Module) -> bool:
    q = module.input_quantizer if isinstance(module, QuantLayer) else module._modules.get("input_quantizer")
    return isinstance(q, Quantizer) and not isinstance(q, FullPrecision) and q.bits < 32


def _feeds_quantizer(node: fx.Node, prefix: str, model: nn.Module, blocks: Dict[str, nn.Module],
                     layers: Dict[str, nn.Module]) -> Optional[Source]:
    """The quantizer (owner, attribute) that ``node``'s output reaches through pass-through modules only, with no
    other reader: a quantized layer's input quantizer, a residual block's, or an average pool's (the integer graph
    quantizes it there); None if there is none."""
    while len(node.users) == 1:
        node = next(iter(node.users))
        if node.op != "call_module":
            return None
        name = prefix + node.target
        if name in layers:
            return (layers[name], "input_quantizer") if _reads_quantized(layers[name]) else None
        if name in blocks:
            return blocks[name], "input_quantizer"  # a block fed by a non-block tensor quantizes its input
        module = model.get_submodule(name)
        if isinstance(module, POOLS):
            return module, "input_quantizer"  # given one by apply_deploy_mode
        if not _passes_codes(module):
            return None
    return None


def _block_integer_convs(block: nn.Module) -> List[Tuple[nn.Module, Source]]:
    """``(conv, output quantizer)`` for the convs of a rewritten block whose outputs are quantized: followed on the
    main branch by pass-through children up to the next quantized layer or the residual quantizer; a downsample conv
    up to the shortcut quantizer."""
    spec: BlockSpec = block.deploy_spec
    main = [c for c in (_child(block, n) for n in spec.main) if c is not None]
    down = _child(block, spec.downsample)
    branches = [(main, "residual_quantizer")]
    if down is not None:
        branches.append(([down] if isinstance(down, QuantLayer) else list(down.children()), "shortcut_quantizer"))
    found = []
    for branch, end in branches:
        for i, layer in enumerate(branch):
            if not isinstance(layer, QuantLayer):
                continue
            after = next((c for c in branch[i + 1:] if not _passes_codes(c)), None)
            if after is None:
                found.append((layer, (block, end)))
            elif isinstance(after, QuantLayer) and _reads_quantized(after):
                found.append((layer, (after, "input_quantizer")))
    return found


def _add_integer_bias(layer: nn.Module, source: Source, output: Source) -> None:
    """Make a quantized conv compute as an integer conv: ``source`` and ``output`` are the quantizers (owner,
    attribute) of its input and output, plain references outside the module tree (see :func:`integer_bias`,
    :func:`engine_conv`)."""
    cls = type(layer)
    if cls not in _INTEGER_CLASSES.values():
        if cls.__name__ not in ("QuantConv2d", "QuantConv2dSame") or cls.__module__ != QuantLayer.__module__:
            return
        layer.__class__ = _integer_conv_class(cls)
    layer.__dict__["deploy_input_source"] = source
    layer.__dict__["deploy_output_source"] = output


def _check_untraced(model: nn.Module, traced: List[str], config: QuantConfig) -> None:
    """A module that does not trace (its children were traced one by one) and wires two or more parts holding
    quantized layers may hide a residual add: refuse it (a wrapper around one model, such as transformers' timm
    wrapper, is fine)."""
    untraced = set()
    for prefix in traced:
        parts = prefix.rstrip(".").split(".") if prefix else []
        untraced.update(".".join(parts[:i]) for i in range(len(parts)))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    # the innermost first, then in module order (a set's string order changes from process to process)
    for name in sorted(untraced, key=lambda n: (-(n.count(".") + 1) if n else 0, order.get(n, 0))):
        module = model.get_submodule(name) if name else model
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # no forward: its owner wires the parts
            continue
        children = [g for c in module.children()
                    for g in (c.children() if isinstance(c, (nn.ModuleList, nn.ModuleDict)) else [c])]
        parts = [c for c in children if any(isinstance(m, QuantLayer) for m in c.modules())]
        if len(parts) >= 2:
            raise InputError(
                f"deploy={config.deploy!r}: {name or '<model>'} ({type(module).__name__}) does not trace with "
                "torch.fx, so its residual connections cannot be found; the deploy rewrite knows the timm ResNet / "
                "EfficientNet / MobileNet blocks. Quantize this model without deploy "
                "(QuantConfig(act_granularity='per_tensor') still exports to ONNX)")


def _rewrite(block: nn.Module, name: str, config: QuantConfig, *, quantize_input: bool) -> List[nn.Module]:
    """Add the block quantizers and the deploy forward; returns the quantized layers that read the block input."""
    spec = _spec(block)
    ref = next((t for t in block.parameters()), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
    readers = [next((m for m in (_child(block, e) for e in spec.entry) if m is not None), None)]
    down = _child(block, spec.downsample)
    if down is not None:
        readers.append(down if isinstance(down, QuantLayer) else next(iter(down.children()), None))
    readers = [r for r in readers if isinstance(r, QuantLayer)]
    for reader in readers:  # they read the block input through the block's one input quantizer
        reader.input_quantizer = FullPrecision("act")
    if quantize_input:
        block.input_quantizer = _act_quantizer(config, name, device, dtype)
    block.residual_quantizer = _act_quantizer(config, name, device, dtype)
    if down is not None:
        block.shortcut_quantizer = _act_quantizer(config, name, device, dtype)
    block.output_quantizer = _act_quantizer(config, name, device, dtype)
    block.__class__ = _deploy_class(type(block))
    return readers


def tensor_quantizers(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, Quantizer]]:
    """``(qualified name, owner, attribute, quantizer)`` of every deploy-mode block or pool quantizer (for exporters
    that swap quantizers for their integer grids)."""
    for name, block in model.named_modules():
        if type(block) in _DEPLOY_CLASSES.values() or type(block) in _POOL_CLASSES.values():
            for attr in BLOCK_QUANTIZERS:
                q = block._modules.get(attr)
                if isinstance(q, Quantizer):
                    yield f"{name}.{attr}", block, attr, q
