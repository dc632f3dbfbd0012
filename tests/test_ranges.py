"""MSE range search: the chosen clip minimises (to the search's resolution) the quantization error
it claims to minimise, checked against a brute-force search on the same values."""

from __future__ import annotations

import torch

from sqakd_hf.quantizers import build_quantizer
from sqakd_hf.quantizers.ranges import histogram_stats, mse_activation_clip, mse_weight_clip


def _fq(x: torch.Tensor, clip: torch.Tensor, qmax: int, qmin: int) -> torch.Tensor:
    step = torch.as_tensor(clip) / qmax
    return (x / step).round().clamp(qmin, qmax) * step


def _brute_force(x: torch.Tensor, qmax: int, qmin: int, dim=None) -> torch.Tensor:
    """Smallest squared error over 400 clips between 0.5% and 100% of max|x| (per row when ``dim``)."""
    top = x.abs().amax(dim=dim, keepdim=dim is not None).clamp_min(1e-12)
    errs = [(_fq(x, top * f, qmax, qmin) - x).square().sum(dim=dim) for f in torch.linspace(0.005, 1, 400).tolist()]
    return torch.stack(errs).amin(0)


def test_weight_clip_matches_brute_force_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 512) * torch.linspace(0.1, 2.0, 16)[:, None]
    w[3, :4] = 9.0  # a channel with outliers
    w[5] = 0.0  # a dead channel
    for qmax, qmin in ((7, -8), (1, -2), (127, -128)):
        clip = mse_weight_clip(w, (1,), lambda c: _fq(w, c, qmax, qmin))
        err = (_fq(w, clip.clamp_min(1e-12), qmax, qmin) - w).square().sum(1)
        best = _brute_force(w, qmax, qmin, dim=1)
        assert (err <= best * 1.03 + 1e-9).all(), (qmax, err / best.clamp_min(1e-12))


def test_activation_clip_matches_brute_force():
    torch.manual_seed(0)
    samples = {
        "relu_gaussian": torch.randn(100_000).relu() * 3,
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((100_000,)).abs(),
        "uniform": torch.rand(100_000),
    }
    for name, x in samples.items():
        for qmax in (3, 15, 255):
            clip = mse_activation_clip(*histogram_stats(x), qmax, 0)
            err = (_fq(x, clip, qmax, 0) - x).square().sum()
            best = _brute_force(x, qmax, 0)
            assert err <= best * 1.05, (name, qmax, float(clip), float(err / best))
    signed = torch.randn(100_000)
    clip = mse_activation_clip(*histogram_stats(signed), 7, 8)
    assert (_fq(signed, clip, 7, -8) - signed).square().sum() <= _brute_force(signed, 7, -8) * 1.05
    assert mse_activation_clip(torch.zeros(2400), torch.zeros(2400), 15, 0) == 0


def test_quantizers_use_the_search_when_asked():
    """``init="mse"`` gives a smaller quantization error than the paper rules on heavy-tailed values."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((8, 1024))
    x = torch.distributions.StudentT(3.0).sample((16, 4096)).abs()
    for method in ("lsq", "ewgs"):
        err = {}
        for init in ("paper", "mse"):
            q = build_quantizer(method, 4, "weight", (8, 1), 0, None, init)
            q.init_from_weight(w)
            err[init] = (q(w) - w).square().sum().item()
        assert err["mse"] < err["paper"], (method, "weight", err)
    for method in ("lsq", "pact", "ewgs"):
        err = {}
        for init in ("paper", "mse"):
            q = build_quantizer(method, 4, "act", (), 0, None, init)
            q.observe(x)
            q.init_from_stats(q.pop_stats())
            err[init] = (q(x) - x).square().sum().item()
        assert err["mse"] < err["paper"], (method, "act", err)
