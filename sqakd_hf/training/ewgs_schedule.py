"""EWGS's Hessian-based update of the gradient-scaling factor delta, driven by the KD loss.

EWGS (J. Lee, D. Kim, B. Ham, "Network Quantization with Element-wise Gradient Scaling",
CVPR 2021, Sec. 3.3) scales the gradient reaching the latent value ``x_n`` as
``g_n = g_q (1 + delta sign(g_q) (x_n - x_q))``: a first-order expansion of the gradient
around the discrete value ``x_q`` with the Hessian diagonal approximated by
``delta |g_q|``. The paper sets delta per layer (weights and activations separately) from the
average Hessian trace, ``delta = (Tr(H) / N) / G`` with ``G = 3 std(g_q)`` standing in for the
maximum gradient magnitude, clipped at 0; the trace comes from Hutchinson's estimator with
Rademacher probes (this is also what the authors' released ``update_grad_scales`` computes).
Here ``H`` and ``g_q`` are the Hessian and gradient of the **KD loss** (no labels) w.r.t.
each EWGS quantizer's discrete output on the paper's [0, 1] latent scale, and ``N`` its number
of elements. The SQAKD reference code (Zhao & Zhao, AISTATS 2024) never updated delta; we do.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..injection import named_quantizers
from ..process_group import all_reduce_, world_size
from ..quantizers.ewgs import EWGSQuantizer


def ewgs_quantizers(model: nn.Module) -> List[Tuple[str, EWGSQuantizer]]:
    """``(name, quantizer)`` for every low-bit EWGS quantizer of ``model``."""
    return [(n, q) for n, q in named_quantizers(model) if isinstance(q, EWGSQuantizer) and q.bits < 32]


def _latent_scale(q: EWGSQuantizer) -> Tensor:
    """``a`` with ``output = c + a * x_q`` for the latent ``x_q`` in [0, 1] (broadcasts against the output)."""
    if q.role == "act":
        return (q.upper - q.lower).detach().clamp_min(1e-8)
    return 2 * q.out_scale.detach()


def _double_backward_friendly_attention():
    """Fused scaled-dot-product-attention kernels have no double backward; use the math one."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _rademacher(like: Tensor, generator: torch.Generator) -> Tensor:
    r = torch.randint(0, 2, like.shape, generator=generator, device="cpu", dtype=torch.int8)
    return (2 * r - 1).to(device=like.device, dtype=like.dtype)


def estimate_ewgs_deltas(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    num_samples: int = 8,
    seed: int = 0,
) -> Dict[str, float]:
    """EWGS delta per quantizer name from one evaluation of ``loss_fn`` (which runs ``model``).

    One forward with hooks on the EWGS quantizers, one backward with ``create_graph=True``,
    then ``num_samples`` Hessian-vector products with independent Rademacher probes on all
    quantizer outputs at once (``E[v_i^T (H v)_i] = Tr(H_ii)`` since probes of different
    tensors are independent). Does not set the deltas (see :func:`apply_ewgs_deltas`) and
    leaves parameter ``.grad`` untouched.
    """
    named = ewgs_quantizers(model)
    if not named:
        return {}
    with _double_backward_friendly_attention():
        return _estimate(named, loss_fn, num_samples, seed)


def _estimate(named, loss_fn: Callable[[], Tensor], num_samples: int, seed: int) -> Dict[str, float]:
    outputs: Dict[int, Tensor] = {}

    def hook(module, _inputs, output):
        outputs[id(module)] = output

    handles = [q.register_forward_hook(hook) for _, q in named]
    try:
        loss = loss_fn()
    finally:
        for h in handles:
            h.remove()
    used = [(n, q, outputs[id(q)]) for n, q in named if id(q) in outputs and outputs[id(q)].requires_grad]
    if not used:
        return {}
    ys = [y for _, _, y in used]
    grads = torch.autograd.grad(loss, ys, create_graph=True, allow_unused=True)
    keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    scales = [_latent_scale(used[i][1]) for i in keep]
    gen = torch.Generator().manual_seed(int(seed))
    traces = [torch.zeros((), dtype=torch.float64, device=ys[i].device) for i in keep]
    for s in range(num_samples):
        probes = [_rademacher(ys[i], gen) * a for i, a in zip(keep, scales)]
        hvs = torch.autograd.grad(
            [grads[i] for i in keep], [ys[i] for i in keep], grad_outputs=probes,
            retain_graph=s < num_samples - 1, allow_unused=True,
        )
        for j, (hv, w) in enumerate(zip(hvs, probes)):
            if hv is not None:
                traces[j] += (hv.detach() * w).sum().double()
    deltas: Dict[str, float] = {name: 0.0 for name, _, _ in used}
    for j, i in enumerate(keep):
        g_latent = grads[i].detach() * scales[j]  # gradient w.r.t. the [0, 1] latent
        avg_trace = traces[j] / num_samples / ys[i].numel()
        spread = 3.0 * g_latent.double().std()
        delta = avg_trace / spread if spread > 0 else torch.zeros((), dtype=torch.float64)
        deltas[used[i][0]] = float(delta.clamp_min(0.0))
    return deltas


def all_reduce_deltas(deltas: Dict[str, float], device: Optional[torch.device] = None) -> Dict[str, float]:
    """Average deltas over ranks (each rank estimated them on its own batch) so all ranks agree."""
    world = world_size()
    if not deltas or world == 1:
        return deltas
    names = sorted(deltas)
    t = torch.tensor([deltas[n] for n in names], dtype=torch.float64, device=device)
    all_reduce_(t).div_(world)
    return dict(zip(names, t.tolist()))


@torch.no_grad()
def apply_ewgs_deltas(model: nn.Module, deltas: Dict[str, float]) -> None:
    """Write the deltas into the quantizers' ``delta`` buffers (persisted with the checkpoint)."""
    for name, q in ewgs_quantizers(model):
        if name in deltas:
            q.delta.fill_(deltas[name])
