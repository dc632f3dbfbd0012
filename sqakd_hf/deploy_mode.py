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
  rewritten block's output directly gets a pass-through input quantizer.

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
from typing import Dict, Iterator, List, Optional, Tuple, Type

import torch
from torch import Tensor, fx, nn

from .config import QuantConfig
from .errors import InputError
from .folding import traced_graphs
from .modules import QuantLayer
from .quantizers import FullPrecision, Quantizer, build_quantizer

__all__ = ["BLOCKS", "BlockSpec", "apply_deploy_mode", "deploy_blocks", "tensor_quantizers"]

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
    out = self.residual_quantizer(y) + shortcut
    post = _child(self, spec.post)
    if post is not None:
        out = post(out)
    return self.output_quantizer(out)


def _deploy_class(cls: type) -> type:
    """``cls`` with the deploy forward (a subclass, defined once per type and reachable by name in this module)."""
    if cls not in _DEPLOY_CLASSES:
        spec = BLOCKS[(cls.__module__, cls.__name__)]
        name = f"Deploy{cls.__name__}"
        new = type(name, (cls,), {"forward": _deploy_forward, "deploy_spec": spec, "__module__": __name__,
                                  "__doc__": f"{cls.__name__} with the deploy-mode quantizers (see {__name__})."})
        _DEPLOY_CLASSES[cls] = new
        globals()[name] = new
    return _DEPLOY_CLASSES[cls]


def __getattr__(name: str) -> type:
    """``Deploy<Block>`` classes by name, also in a process that has not rewritten a block yet (unpickling)."""
    for module, cls_name in BLOCKS:
        if name == f"Deploy{cls_name}":
            import importlib

            return _deploy_class(getattr(importlib.import_module(module), cls_name))
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
    layers were wrapped; works on a meta skeleton. Returns the rewritten blocks' names. Raises
    :class:`~sqakd_hf.errors.InputError` for a residual add outside a known block."""
    blocks = dict(deploy_blocks(model))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}
    fed_by_block: Dict[str, bool] = {}  # block -> its input is another block's output
    reads_block: List[str] = []  # quantized layers reading a block's output directly
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
            from_block = src.op == "call_module" and prefix + src.target in blocks
            if name in blocks:
                fed_by_block[name] = from_block
            elif from_block and name in layers:
                reads_block.append(name)
    _check_untraced(model, traced, config)
    missing = sorted(set(blocks) - set(fed_by_block))
    if missing:
        raise InputError(f"deploy={config.deploy!r}: cannot follow the data flow into {missing[0]} "
                         f"({type(blocks[missing[0]]).__name__}): the model does not trace with torch.fx")
    for name, block in blocks.items():
        _rewrite(block, name, config, quantize_input=not fed_by_block[name])
    for name in reads_block:
        layers[name].input_quantizer = FullPrecision("act")
    return sorted(blocks)


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


def _rewrite(block: nn.Module, name: str, config: QuantConfig, *, quantize_input: bool) -> None:
    spec = _spec(block)
    ref = next((t for t in block.parameters()), None)
    device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)
    readers = [next((m for m in (_child(block, e) for e in spec.entry) if m is not None), None)]
    down = _child(block, spec.downsample)
    if down is not None:
        readers.append(down if isinstance(down, QuantLayer) else next(iter(down.children()), None))
    for reader in readers:  # they read the block input through the block's one input quantizer
        if isinstance(reader, QuantLayer):
            reader.input_quantizer = FullPrecision("act")
    if quantize_input:
        block.input_quantizer = _act_quantizer(config, name, device, dtype)
    block.residual_quantizer = _act_quantizer(config, name, device, dtype)
    if down is not None:
        block.shortcut_quantizer = _act_quantizer(config, name, device, dtype)
    block.output_quantizer = _act_quantizer(config, name, device, dtype)
    block.__class__ = _deploy_class(type(block))


def tensor_quantizers(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, Quantizer]]:
    """``(qualified name, owner, attribute, quantizer)`` of every deploy-mode block quantizer (for exporters that swap
    quantizers for their integer grids)."""
    for name, block in model.named_modules():
        if type(block) in _DEPLOY_CLASSES.values():
            for attr in BLOCK_QUANTIZERS:
                q = block._modules.get(attr)
                if isinstance(q, Quantizer):
                    yield f"{name}.{attr}", block, attr, q
