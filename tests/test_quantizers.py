"""Forward values and gradients of every quantizer, against hand-computed cases (Zhao & Zhao, AISTATS 2024, and each method's paper)."""

import math

import pytest
import torch

from sqakd_hf.quantizers import (
    DoReFaQuantizer,
    EWGSQuantizer,
    LSQQuantizer,
    MinMaxQuantizer,
    PACTQuantizer,
    build_quantizer,
)
from sqakd_hf.quantizers.base import FullPrecision
from sqakd_hf.quantizers.functional import fake_quantize, round_delta


def _ready(q, signed=None, **params):
    """Set parameters by hand and mark initialised (no calibration involved)."""
    with torch.no_grad():
        for k, v in params.items():
            getattr(q, k).copy_(torch.as_tensor(v, dtype=torch.float32).reshape(getattr(q, k).shape))
    if signed is not None:
        q.set_signed(signed)
    q.mark_initialized()
    return q


def _t(values, grad=True):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


# ---------------------------------------------------------------------------------------------- LSQ
def test_lsq_weight_forward_and_gradients_by_hand():
    # 3-bit signed grid [-4, 3], s = 0.5
    q = _ready(LSQQuantizer(3, "weight"), scale=0.5)
    x = _t([-1.3, -0.55, 0.1, 0.3, 0.74, 2.0])
    y = q(x)
    # x/s = [-2.6, -1.1, 0.2, 0.6, 1.48, 4.0] -> round/clamp [-3, -1, 0, 1, 1, 3]
    assert torch.allclose(y, torch.tensor([-1.5, -0.5, 0.0, 0.5, 0.5, 1.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1, 1, 1, 1, 0]))  # STE inside, 0 where clipped
    # ds per element: q - x/s inside, the clip bound outside; sum = 2.42; g = 1/sqrt(N*Qp) = 1/sqrt(6*3)
    assert q.scale.grad.item() == pytest.approx(2.42 / math.sqrt(18), rel=1e-5)


def test_lsq_activation_grad_scale_counts_features_per_sample_not_batch():
    q = _ready(LSQQuantizer(2, "act"), signed=False, scale=1.0)
    assert (q.qmin, q.qmax) == (0, 3)
    x = _t([[0.2, 1.4, 5.0], [0.6, 2.2, -1.0]])  # batch 2, 3 features per sample
    q(x).sum().backward()
    # terms: q - x/s inside = [-0.2, -0.4, 0.4, -0.2]; outside: clip bounds 3 (x=5) and 0 (x=-1) -> 2.6
    assert q.scale.grad.item() == pytest.approx(2.6 / math.sqrt(3 * 3), rel=1e-5)
    assert torch.equal(x.grad, torch.tensor([[1.0, 1, 0], [1, 1, 0]]))


def test_lsq_per_channel_weight_and_weighted_upstream():
    q = _ready(LSQQuantizer(2, "weight", param_shape=(2, 1)), scale=[[1.0], [0.25]])
    x = _t([[0.4, -1.6, 3.0], [0.1, -0.3, 0.2]])
    y = q(x)
    # row 0: x/s = [0.4, -1.6, 3.0] -> [0, -2, 1]; row 1: x/s = [0.4, -1.2, 0.8] -> [0, -1, 1]
    assert torch.allclose(y, torch.tensor([[0.0, -2.0, 1.0], [0.0, -0.25, 0.25]]))
    g = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 1.0, 2.0]])
    y.backward(g)
    # row 0: 1*(0-0.4) + 2*(-2+1.6) + 3*1 = 1.8 ; row 1: -1*(0-0.4) + 1*(-1+1.2) + 2*(1-0.8) = 1.0
    gs = 1 / math.sqrt(3 * 1)  # N = 3 weights per channel, Qp = 1
    assert torch.allclose(q.scale.grad.flatten(), torch.tensor([1.8, 1.0]) * gs, rtol=1e-5)
    assert torch.equal(x.grad, torch.tensor([[1.0, 2.0, 0.0], [-1.0, 1.0, 2.0]]))


def test_lsq_init_formulas():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    q = LSQQuantizer(4, "weight", param_shape=(2, 1))
    q.init_from_weight(w)
    # s = 2 mean|w| / sqrt(Qp), Qp = 7
    assert torch.allclose(q.scale.flatten(), torch.tensor([2 * 2.0, 2 * 0.5]) / math.sqrt(7))
    a = LSQQuantizer(2, "act")
    a.observe(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    a.init_from_stats(a.pop_stats())
    assert not a.signed  # never negative -> unsigned grid, no wasted bit
    assert a.scale.item() == pytest.approx(2 * 1.5 / math.sqrt(3))


def test_one_bit_weights_are_sign_times_scale():
    q = LSQQuantizer(1, "weight", param_shape=(2, 1))
    w = torch.tensor([[0.3, -0.1, 0.0, -0.6], [2.0, -2.0, 1.0, -1.0]])
    q.init_from_weight(w)
    assert torch.allclose(q.scale.flatten(), torch.tensor([0.25, 1.5]))  # mean |w|
    y = q(w)
    assert torch.allclose(y, torch.tensor([[0.25, -0.25, 0.25, -0.25], [1.5, -1.5, 1.5, -1.5]]))


# --------------------------------------------------------------------------------------------- PACT
def test_pact_forward_and_alpha_gradient_by_hand():
    q = _ready(PACTQuantizer(2, "act"), signed=False, alpha=2.0)
    x = _t([-0.5, 0.2, 0.9, 1.6, 2.5, 3.0])
    y = q(x)
    # clip to [0, 2], 3 steps of 2/3: x*1.5 = [-0.75, .3, 1.35, 2.4, 3.75, 4.5] -> [0, 0, 1, 2, 3, 3]
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 2 / 3, 4 / 3, 2.0, 2.0]))
    y.backward(torch.tensor([1.0, 2, 3, 4, 5, 6]))
    assert torch.equal(x.grad, torch.tensor([0.0, 2, 3, 4, 0, 0]))
    assert q.alpha.grad.item() == pytest.approx(5 + 6)  # d alpha = g where x >= alpha, else 0


def test_pact_alpha_initialised_from_high_percentile():
    q = PACTQuantizer(4, "act")
    x = torch.arange(0, 10001, dtype=torch.float32).reshape(1, -1) / 10000  # uniform on [0, 1]
    q.observe(x)
    q.init_from_stats(q.pop_stats())
    assert q.alpha.item() == pytest.approx(0.999, abs=2e-3)
    assert not q.signed


# ------------------------------------------------------------------------------------------- DoReFa
def test_dorefa_weights_tanh_normalised_by_hand():
    w = _t([-1.0, -0.2, 0.05, 0.3, 0.8])
    q = DoReFaQuantizer(2, "weight")
    q.init_from_weight(w.detach())
    assert q.magnitude.item() == pytest.approx(1.0)  # max |w| keeps the layer's scale
    t = [math.tanh(v) for v in w.tolist()]
    m = max(abs(v) for v in t)
    expected = [2 * round(3 * (v / (2 * m) + 0.5)) / 3 - 1 for v in t]  # 2 quantize_2(w_n) - 1
    assert expected == pytest.approx([-1, -1 / 3, 1 / 3, 1 / 3, 1])
    y = q(w)
    assert torch.allclose(y, torch.tensor(expected))
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_dorefa_activations_clip_unit_interval_no_tanh():
    q = DoReFaQuantizer(2, "act")
    q.observe(torch.tensor([[0.0, 1.0]]))
    q.init_from_stats(q.pop_stats())
    x = _t([-0.3, 0.1, 0.45, 0.9, 1.7])
    y = q(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 1 / 3, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 0]))
    assert list(q.parameters()) == []  # nothing learnable


# --------------------------------------------------------------------------------------------- EWGS
def test_ewgs_delta_rule_by_hand():
    # act grid on [l, u] = [0, 3] with 2 bits -> step 1; paper's delta 0.3 on the [0, 1] latent
    q = _ready(EWGSQuantizer(2, "act", delta=0.3), signed=False, lower=0.0, upper=3.0)
    x = _t([0.2, 0.7, 1.4, 2.6])
    y = q(x)
    assert torch.allclose(y, torch.tensor([0.0, 1.0, 1.0, 3.0]))
    y.backward(torch.tensor([1.0, -1.0, 2.0, -2.0]))
    # g * (1 + delta * sign(g) * (x_n - x_q)) with x_n - x_q on [0, 1]: [0.2, -0.3, 0.4, -0.4] / 3
    assert torch.allclose(x.grad, torch.tensor([1.02, -1.03, 2.08, -2.08]), atol=1e-6)


def test_ewgs_delta_zero_is_ste_and_interval_gradient():
    q = _ready(EWGSQuantizer(2, "act", delta=0.0), signed=False, lower=0.0, upper=3.0)
    x = _t([0.2, 0.7, 1.4, 2.6, 4.0])
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1, 1, 1, 0]))
    # d out/du = (q - x_n * inside) / L: inside [-0.2, 0.3, -0.4, 0.4], outside q = 3 -> 3.1 / 3
    assert q.upper.grad.item() == pytest.approx(3.1 / 3, rel=1e-5)


def test_ewgs_weights_interval_init_and_levels():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    q = EWGSQuantizer(2, "weight", param_shape=(4, 1))
    q.init_from_weight(w)
    std = w.std(dim=1)
    assert torch.allclose(q.upper.flatten(), 3 * std) and torch.allclose(q.lower.flatten(), -3 * std)
    y = q(w)
    for row, s in zip(y, q.out_scale.flatten()):
        levels = torch.unique(row)
        assert len(levels) <= 4
        assert torch.allclose(levels.abs().max(), s)  # 2 round(...) / L - 1 spans [-1, 1] times the scale


def test_ewgs_activation_init_half_normal_rule():
    torch.manual_seed(0)
    x = torch.randn(64, 256).relu()
    q = EWGSQuantizer(3, "act")
    q.observe(x)
    q.init_from_stats(q.pop_stats())
    assert not q.signed
    assert q.lower.item() == pytest.approx(0.0)
    expected = min(3 * x.std(unbiased=False).item() / math.sqrt(1 - 2 / math.pi), x.max().item())
    assert q.upper.item() == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------------- minmax
def test_minmax_weights_absmax_per_channel_by_hand():
    q = MinMaxQuantizer(3, "weight", param_shape=(2, 1))
    q.init_from_weight(torch.zeros(2, 3))
    w = _t([[0.55, -1.0, 0.25], [2.0, 0.1, -0.6]])
    y = q(w)
    # steps absmax/Qp = [1/3, 2/3]: row0 w/s = [1.65, -3, .75] -> [2, -3, 1]; row1 [3, .15, -.9] -> [3, 0, -1]
    assert torch.allclose(y, torch.tensor([[2 / 3, -1.0, 1 / 3], [2.0, 0.0, -2 / 3]]), atol=1e-6)
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones(2, 3))
    assert list(q.parameters()) == []


def test_minmax_static_activation_step_mse_observer_or_absmax():
    """init="mse": the step of the clip with the least squared error on the calibration histogram (one outlier
    does not set the range); init="paper": the plain range."""
    torch.manual_seed(0)
    x = torch.randn(4096).abs()
    x[0] = 40.0  # one outlier far above the bulk
    steps = {}
    for init in ("mse", "paper"):
        q = build_quantizer("minmax", 4, "act", init=init)
        q.observe(x)
        q.init_from_stats(q.pop_stats())
        steps[init] = q.scale.item()
    assert steps["paper"] == pytest.approx(40.0 / 15, rel=1e-6)
    assert steps["mse"] < steps["paper"] / 2  # the outlier is clipped
    err = {k: (fake_quantize(x, torch.tensor(s), 0, 15) - x).square().sum().item() for k, s in steps.items()}
    assert err["mse"] < err["paper"] / 2, err


# ----------------------------------------------------------------------------------------- generic
@pytest.mark.parametrize("method", ["lsq", "pact", "dorefa", "ewgs", "minmax"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_distinct_levels_per_tensor_and_channel(method, bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 16, 3, 3) * 0.1
    wq = build_quantizer(method, bits, "weight", (8, 1, 1, 1), 0)
    wq.init_from_weight(w)
    y = wq(w)
    for c in range(8):
        n = len(torch.unique(y[c]))
        assert 2 <= n <= 2**bits, (method, bits, c, n)
    x = torch.randn(32, 16, 8, 8)
    aq = build_quantizer(method, bits, "act")
    aq.observe(x)
    aq.init_from_stats(aq.pop_stats())
    assert aq.signed  # calibration saw negatives -> signed grid
    assert 2 <= len(torch.unique(aq(x))) <= 2**bits


@pytest.mark.parametrize("method", ["lsq", "pact", "dorefa", "ewgs", "minmax"])
def test_unsigned_grid_after_relu_uses_all_levels(method):
    torch.manual_seed(0)
    x = torch.randn(64, 32, 8, 8).relu() * 0.3
    q = build_quantizer(method, 2, "act")
    q.observe(x)
    q.init_from_stats(q.pop_stats())
    assert not q.signed and q.qmin == 0
    y = q(x)
    assert (y >= 0).all()
    assert len(torch.unique(y)) == 4  # all 2^b levels in use: no level wasted on negatives


def test_round_delta_ste_and_scaling():
    x = _t([0.3, 1.6, -0.8])
    round_delta(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    x = _t([0.3, 1.6, -0.8])
    y = round_delta(x, torch.tensor(0.5))
    assert torch.equal(y, torch.tensor([0.0, 2.0, -1.0]))
    y.backward(torch.tensor([1.0, 1.0, -1.0]))
    # 1 + 0.5 * sign(g) * (x - round(x)): [1.15, 0.8, -(1 - 0.5 * 0.2)]
    assert torch.allclose(x.grad, torch.tensor([1.15, 0.8, -0.9]))


def test_fake_quantize_zero_point_gradient():
    # out = z + s * clamp(round((x - z) / s)); d out / d z = 1 - inside
    x = _t([0.5, 2.0, 9.0])
    z = torch.tensor(1.0, requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    y = fake_quantize(x, s, 0, 3, zero=z)
    assert torch.equal(y, torch.tensor([1.0, 2.0, 4.0]))
    y.sum().backward()
    assert z.grad.item() == pytest.approx(2.0)  # x=0.5 and x=9 are clipped
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 0.0]))


def test_uninitialised_quantizer_fails_clearly_and_fp_passthrough():
    with pytest.raises(RuntimeError, match="calibrate"):
        LSQQuantizer(4, "act")(torch.ones(2, 2))
    fp = build_quantizer("lsq", 32, "act")
    assert isinstance(fp, FullPrecision)
    x = torch.randn(3)
    assert fp(x) is x


def test_unknown_method_error():
    with pytest.raises(ValueError, match="unknown quantization method 'foo'.*lsq"):
        build_quantizer("foo", 4, "weight")


@pytest.mark.parametrize("scale_shape, scale_grad", [((), "chain"), ((), "pact"), ((6, 1, 1), "chain"), ((1, 1, 5), "chain")])
def test_fused_fast_path_matches_general_formula(scale_shape, scale_grad):
    """The single-allocation STE path must give the same values and gradients as the general one
    (forced here with delta = 0, which is STE through the general code)."""
    torch.manual_seed(0)
    x0 = torch.randn(6, 4, 5) * 2
    g = torch.randn(6, 4, 5)
    s0 = torch.rand(scale_shape) * 0.3 + 0.1
    results = []
    for delta in (None, torch.tensor(0.0)):
        x = x0.clone().requires_grad_()
        s = s0.clone().requires_grad_()
        y = fake_quantize(x, s, -4, 3, delta=delta, scale_grad=scale_grad)
        y.backward(g)
        results.append((y.detach(), x.grad, s.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


# -------------------------------------------------------------------------------- per-token activations
def _per_token_act(method: str, bits: int = 4):
    """A per-token activation quantizer calibrated on one batch (MSE init)."""
    torch.manual_seed(0)
    q = build_quantizer(method, bits, "act", init="mse", per_token=True)
    calib = torch.randn(4, 6, 16) * torch.logspace(-1, 1, 16)
    q.observing = True
    q(calib)
    q.observing = False
    q.init_from_stats(q.pop_stats())
    return q


def test_per_token_minmax_is_dynamic_absmax_per_row_by_hand():
    q = _ready(build_quantizer("minmax", 2, "act", per_token=True), signed=True, scale=0.5)  # 1 / Qp of the row max
    x = _t([[0.2, -1.0, 0.7], [30.0, 10.0, -5.0]])
    # row 0: step 0.5 (absmax 1); row 1: step 15 (absmax 30); signed 2-bit grid [-2, 1]
    assert torch.allclose(q(x), torch.tensor([[0.0, -1.0, 0.5], [15.0, 15.0, -0.0]]))


@pytest.mark.parametrize("method", ["lsq", "pact", "ewgs", "dorefa", "minmax"])
def test_per_token_rows_are_scale_equivariant_and_gradients_defined(method):
    """Per token, Q(c x_t) = c Q(x_t) for every row (no static range), all-zero rows stay finite and zero, and the input
    and every learned parameter get finite gradients."""
    q = _per_token_act(method)
    x = torch.randn(2, 5, 16) * torch.logspace(-1, 1, 16)
    x[0, 1] = 0.0
    c = torch.logspace(-3, 3, 5).reshape(1, 5, 1)
    assert torch.allclose(q(x * c), q(x) * c, rtol=1e-5, atol=1e-9)
    xg = (x * c).requires_grad_()
    out = q(xg)
    assert out[0, 1].abs().max() < 1e-30  # an all-zero row stays (numerically) zero, never NaN
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    for p in q.quant_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (method, p.shape)
    assert "per_token" in repr(q)


def test_per_token_beats_per_tensor_on_rows_of_different_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 32) * torch.logspace(-2, 2, 64)[:, None]  # token rows spanning 4 decades
    err = {}
    for per_token in (False, True):
        q = build_quantizer("lsq", 8, "act", init="mse", per_token=per_token)
        q.observing = True
        q(x)
        q.observing = False
        q.init_from_stats(q.pop_stats())
        err[per_token] = ((q(x) - x).norm(dim=1) / x.norm(dim=1)).mean().item()  # mean relative error per row
    assert err[True] < err[False] / 10, err


def test_per_token_only_for_activations():
    with pytest.raises(ValueError, match="per_token"):
        build_quantizer("lsq", 4, "weight", (3, 1), per_token=True)


@pytest.mark.parametrize("method", ["lsq", "pact", "ewgs", "minmax", "dorefa"])
@pytest.mark.parametrize("init", ["mse", "paper"])
def test_embedding_quantizes_only_looked_up_rows_exactly(method, init):
    """QuantEmbedding quantizes the looked-up rows only; values and every gradient equal quantizing the table."""
    from torch import nn

    from sqakd_hf.modules import QuantEmbedding

    torch.manual_seed(0)
    emb = nn.Embedding(50, 16, padding_idx=0)
    wq = build_quantizer(method, 4, "weight", (50, 1), 0, 1e-3, init)
    wq.init_from_weight(emb.weight)
    q = QuantEmbedding.from_float(emb, wq, FullPrecision("act"))
    ids = torch.randint(0, 50, (3, 7))
    ids[0, 0] = 0
    out = q(ids)
    full = torch.nn.functional.embedding(ids, q.quantized_weight(), 0)
    assert torch.equal(out, full)
    out.pow(2).sum().backward()
    rows_grads = {n: p.grad.clone() for n, p in q.named_parameters()}
    q.zero_grad()
    full.pow(2).sum().backward()
    for n, p in q.named_parameters():
        assert torch.allclose(rows_grads[n], p.grad, atol=1e-6), n
