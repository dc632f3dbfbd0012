"""KD and hidden-state losses against the formulas written out by hand:
T^2 KL(teacher || student), mean over samples or non-padding tokens."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sqakd_hf.training.losses as losses
from sqakd_hf.training.losses import hidden_state_loss, kd_kl_loss, kd_kl_per_position


def _reference(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    """(T^2 / B) sum_i sum_c p_t (log p_t - log_softmax(z_s / T)), element by element."""
    B, C = zs.shape
    total = 0.0
    for i in range(B):
        pt = [math.exp(float(zt[i, c]) / T) for c in range(C)]
        zt_sum = sum(pt)
        ps = [math.exp(float(zs[i, c]) / T) for c in range(C)]
        zs_sum = sum(ps)
        for c in range(C):
            p = pt[c] / zt_sum
            total += p * (math.log(p) - math.log(ps[c] / zs_sum))
    return torch.tensor(T * T * total / B, dtype=torch.float64)


def test_value_matches_formula():
    zs = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]], dtype=torch.float64)
    zt = torch.tensor([[2.0, 0.0, -1.0], [-0.5, 1.5, 0.0]], dtype=torch.float64)
    for T in (1.0, 4.0):
        assert torch.allclose(kd_kl_loss(zs, zt, T), _reference(zs, zt, T), atol=1e-12)


def test_gradient_is_T_over_B_times_softmax_difference():
    """d L / d z_s = (T / B) (softmax(z_s / T) - p_t), checked against numbers worked out by hand."""
    zs = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]], dtype=torch.float64, requires_grad=True)
    zt = torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)]], dtype=torch.float64)
    T, B = 1.0, 2
    (g,) = torch.autograd.grad(kd_kl_loss(zs, zt, T), zs)
    # row 0: softmax = (1/4, 3/4), p_t = (1/2, 1/2); row 1: softmax = (2/3, 1/3), p_t = (1/5, 4/5)
    expected = (T / B) * torch.tensor([[1 / 4 - 1 / 2, 3 / 4 - 1 / 2], [2 / 3 - 1 / 5, 1 / 3 - 4 / 5]], dtype=torch.float64)
    assert torch.allclose(g, expected, atol=1e-12)
    # and for a random case at T = 4, against the formula
    torch.manual_seed(0)
    zs = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(5, 7, dtype=torch.float64)
    (g,) = torch.autograd.grad(kd_kl_loss(zs, zt, 4.0), zs)
    assert torch.allclose(g, (4.0 / 5) * (torch.softmax(zs / 4, -1) - torch.softmax(zt / 4, -1)), atol=1e-12)


def test_sequence_mask_averages_over_non_padding_tokens():
    torch.manual_seed(1)
    zs = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 4, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss = kd_kl_loss(zs, zt, 2.0, mask)
    rows = mask.bool()
    expected = kd_kl_loss(zs[rows], zt[rows], 2.0)  # the 5 real tokens as a batch of 5
    assert torch.allclose(loss, expected, atol=1e-12)
    (g,) = torch.autograd.grad(loss, zs)
    assert torch.count_nonzero(g[~rows]) == 0  # padding gets no gradient
    # no mask: mean over all 8 positions
    assert torch.allclose(kd_kl_loss(zs, zt, 2.0), kd_kl_loss(zs.reshape(8, 6), zt.reshape(8, 6), 2.0), atol=1e-12)


def test_matches_kl_div_and_is_zero_for_equal_logits():
    torch.manual_seed(2)
    zs, zt = torch.randn(8, 11), torch.randn(8, 11)
    ref = 16 * F.kl_div(F.log_softmax(zs / 4, -1), F.log_softmax(zt / 4, -1), log_target=True, reduction="batchmean")
    assert torch.allclose(kd_kl_loss(zs, zt, 4.0), ref, atol=1e-6)
    assert kd_kl_loss(zt, zt, 4.0).abs() < 1e-6


def test_gradcheck_and_double_backward():
    torch.manual_seed(3)
    zs = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    fn = lambda z: kd_kl_loss(z, zt, 3.0, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (zs,))
    assert torch.autograd.gradgradcheck(fn, (zs,))  # Hessian-vector products (EWGS schedule) need this


def test_chunked_computation_is_exact(monkeypatch):
    torch.manual_seed(4)
    zs = torch.randn(37, 50, requires_grad=True)
    zt = torch.randn(37, 50)
    loss_full = kd_kl_loss(zs, zt, 4.0)
    (g_full,) = torch.autograd.grad(loss_full, zs)
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 50 * 3)  # 3 rows per chunk
    loss_chunked = kd_kl_loss(zs, zt, 4.0)
    (g_chunked,) = torch.autograd.grad(loss_chunked, zs)
    assert torch.allclose(loss_full, loss_chunked, atol=1e-6)
    assert torch.allclose(g_full, g_chunked, atol=1e-7)


def test_keeps_no_vocabulary_sized_temporaries_for_backward():
    """Only the two logit tensors (alive anyway) are saved for backward: no log-softmax copies."""
    torch.manual_seed(5)
    zs = torch.randn(4, 16, 1000, requires_grad=True)
    zt = torch.randn(4, 16, 1000)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = kd_kl_loss(zs, zt, 4.0)
    big = [t for t in saved if t.numel() >= zs.numel()]
    assert {t.data_ptr() for t in big} <= {zs.data_ptr(), zt.data_ptr()}
    loss.backward()
    assert zs.grad.shape == zs.shape


def test_half_precision_logits_accumulate_in_fp32():
    torch.manual_seed(6)
    zs, zt = torch.randn(6, 30), torch.randn(6, 30)
    ref = kd_kl_loss(zs, zt, 4.0)
    out = kd_kl_loss(zs.bfloat16().requires_grad_(), zt.bfloat16(), 4.0)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=5e-2)


def test_input_errors():
    with pytest.raises(ValueError, match="shape"):
        kd_kl_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_kl_per_position(torch.randn(2, 3), torch.randn(2, 3), 0.0)
    with pytest.raises(ValueError, match="mask shape"):
        kd_kl_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 1.0, mask=torch.ones(2, 4))


def test_hidden_state_losses():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 4.0], [1.0, 1.0]]], requires_grad=True)
    t = torch.tensor([[[1.0, 1.0], [0.0, 1.0]], [[3.0, 4.0], [-1.0, -1.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # mse per position (mean over features): [[0.5, 0.5], [0, 4]]; masked mean over 3 tokens
    assert torch.allclose(hidden_state_loss(s, t, "mse", mask), torch.tensor(1.0 / 3))
    assert torch.allclose(hidden_state_loss(s, t, "mse"), torch.tensor(5.0 / 4))
    # cosine: 1 - cos per position: [[1 - 1/sqrt2, 0], [0, 2]]
    expected = (1 - 1 / math.sqrt(2)) / 3
    assert torch.allclose(hidden_state_loss(s, t, "cosine", mask), torch.tensor(expected), atol=1e-6)
    hidden_state_loss(s, t, "cosine", mask).backward()
    assert s.grad is not None and torch.count_nonzero(s.grad[1, 1]) == 0
    with pytest.raises(ValueError, match="'mse' or 'cosine'"):
        hidden_state_loss(s, t, "l1")
