"""Distillation losses (Hinton et al., 2015, as used by SQAKD, Zhao & Zhao, AISTATS 2024).

:func:`kd_kl_loss` is SQAKD's objective, ``T^2 * KL(p_t || softmax(z_s / T))`` summed over
classes and averaged over samples (or non-padding tokens). Its per-position core,
:func:`kd_kl_per_position`, is an autograd function that keeps no vocabulary-sized tensor
alive between forward and backward: it saves only the two logit tensors (which exist anyway),
works through rows in chunks of bounded size, and recomputes the softmaxes in backward.
Its backward is made of differentiable operations, so double backward (Hessian-vector
products, used by the EWGS delta schedule) works.

:func:`hidden_state_loss` is the objective for models without logits (MSE or cosine on the
last hidden state): a different objective, not a KL divergence.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: elements per chunk of rows on CPU (fp32 temporaries of ~1 MiB each: they stay in the cache and the allocator
#: reuses them, where vocabulary-sized temporaries cost a page fault per 4 KiB on every step; ~4x faster)
_CHUNK_ELEMENTS = 1 << 18
#: elements per chunk elsewhere (accelerators: few kernel launches; fp32 temporaries of at most ~64 MiB each)
_LARGE_CHUNK_ELEMENTS = 1 << 24


def _chunks(rows: int, width: int, device: Optional[torch.device] = None):
    """Row slices of at most a chunk's elements each (the CPU size when ``device`` is a CPU device)."""
    per_chunk = _CHUNK_ELEMENTS if device is not None and device.type == "cpu" else _LARGE_CHUNK_ELEMENTS
    step = max(1, per_chunk // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half/bfloat16 logits, else the logits' own (fp32 or fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


class _KDKL(torch.autograd.Function):
    """Per-row ``sum_c p_t (log p_t - log q_s)`` with ``p = softmax(z / T)`` over the last dim."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
        s2 = student.reshape(-1, student.shape[-1])
        t2 = teacher.reshape(-1, teacher.shape[-1])
        acc = _acc_dtype(student)
        out = torch.empty(s2.shape[0], dtype=acc, device=student.device)
        for sl in _chunks(s2.shape[0], s2.shape[1], s2.device):
            log_q = F.log_softmax(s2[sl].to(acc) / temperature, dim=-1)
            log_p = F.log_softmax(t2[sl].to(acc) / temperature, dim=-1)
            # KL >= 0; summing rounding errors can give -1e-8 when student and teacher agree (NaN stays NaN)
            out[sl] = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).clamp_min(0)
            del log_q, log_p
        ctx.save_for_backward(student, teacher)
        ctx.temperature = temperature
        return out.reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        student, teacher = ctx.saved_tensors
        T = ctx.temperature
        acc = _acc_dtype(student)
        if torch.is_grad_enabled():
            # create_graph=True (double backward): plain differentiable ops, no chunking
            q = torch.softmax(student.to(acc) / T, dim=-1)
            p = torch.softmax(teacher.to(acc) / T, dim=-1)
            grad = (q - p) * (grad_out.unsqueeze(-1) / T)
            return grad.to(student.dtype), None, None
        width = student.shape[-1]
        s2 = student.reshape(-1, width)
        t2 = teacher.reshape(-1, width)
        g2 = grad_out.reshape(-1, 1)
        grad = torch.empty_like(s2)
        for sl in _chunks(s2.shape[0], width, s2.device):
            q = torch.softmax(s2[sl].to(acc) / T, dim=-1)
            q.sub_(torch.softmax(t2[sl].to(acc) / T, dim=-1)).mul_(g2[sl] / T)
            grad[sl] = q
            del q
        return grad.reshape(student.shape), None, None


def kd_kl_per_position(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` for every position (all dims but the last, the classes).

    Returns fp32 (fp64 for fp64 logits) of shape ``logits.shape[:-1]``, without the ``T^2`` factor. The teacher is a
    constant target: no gradient flows to ``teacher_logits``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    if not 0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be > 0 and finite; got {temperature!r}")
    return _KDKL.apply(student_logits, teacher_logits.detach(), float(temperature))


def _masked_mean(per_position: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the positions' shape {tuple(per_position.shape)}")
    m = mask.to(per_position.dtype)
    return (per_position * m).sum() / m.sum().clamp_min(1.0)


def kd_kl_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, mask: Optional[Tensor] = None
) -> Tensor:
    """SQAKD's loss: ``T^2 * mean_i sum_c p_t[i,c] (log p_t[i,c] - log_softmax(z_s / T)[i,c])``.

    Classes are the last dimension; the mean runs over all other positions (samples, or
    tokens of sequence outputs), restricted to ``mask != 0`` when a padding mask of shape
    ``logits.shape[:-1]`` is given. Gradient w.r.t. the student logits:
    ``(T / n) (softmax(z_s / T) - p_t)`` for the ``n`` counted positions.
    """
    per_position = kd_kl_per_position(student_logits, teacher_logits, temperature)
    return (float(temperature) ** 2) * _masked_mean(per_position, mask)


def hidden_state_per_position(student_hidden: Tensor, teacher_hidden: Tensor, kind: str = "mse") -> Tensor:
    """Per-position distance of hidden states (last dim = features): ``mean_d (s - t)^2`` or ``1 - cos(s, t)``."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student and teacher hidden states differ in shape: {tuple(student_hidden.shape)} vs "
            f"{tuple(teacher_hidden.shape)}"
        )
    s = student_hidden.float()
    t = teacher_hidden.detach().float()
    if kind == "mse":
        return (s - t).square().mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise ValueError(f"kind must be 'mse' or 'cosine'; got {kind!r}")


def hidden_state_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, kind: str = "mse", mask: Optional[Tensor] = None
) -> Tensor:
    """Hidden-state matching for models without logits, averaged over (non-padding) positions.

    ``"mse"``: mean squared error per feature; ``"cosine"``: ``1 - cosine similarity`` per position.
    """
    return _masked_mean(hidden_state_per_position(student_hidden, teacher_hidden, kind), mask)


def _topk_terms(z: Tensor, idx: Tensor):
    """``(log_q, log q_rest)`` for scaled student logits ``z`` (rows) and the teacher's top-k ``idx``, out of place
    (differentiable again, for double backward; :func:`_topk_split` is the in-place form)."""
    log_q = F.log_softmax(z, dim=-1)
    log_q_rest = torch.logsumexp(log_q.scatter(-1, idx, float("-inf")), dim=-1)
    return log_q, log_q_rest


def _topk_split(z: Tensor, idx: Tensor):
    """``(log q on K, log q_rest, log q with -inf on K)`` for scaled student logits ``z``: one log-softmax, its
    top-k entries read, then masked in place (no second full-width tensor)."""
    log_q = F.log_softmax(z, dim=-1)
    log_q_k = log_q.gather(-1, idx)
    log_q.scatter_(-1, idx, float("-inf"))
    return log_q_k, torch.logsumexp(log_q, dim=-1), log_q


def _topk_kl_from(log_q_k: Tensor, log_q_rest: Tensor, log_p: Tensor, log_r: Tensor) -> Tensor:
    p, r = log_p.exp(), log_r.exp()
    top = torch.where(p > 0, p * (log_p - log_q_k), 0.0).sum(-1)
    rest = torch.where(r > 0, r * (log_r - log_q_rest), 0.0)
    return (top + rest).clamp_min(0)


def _topk_target(log_q: Tensor, log_q_rest: Tensor, idx: Tensor, log_p: Tensor, log_r: Tensor) -> Tensor:
    """The full-width target ``p_hat``: the teacher's top-k probabilities, and its rest mass ``r`` spread over the
    other classes in proportion to the student's (``r q_j / q_rest``)."""
    shift = torch.where(torch.isfinite(log_q_rest), log_r - log_q_rest, float("-inf")).unsqueeze(-1)
    return (log_q + shift).exp().scatter(-1, idx, log_p.exp())


class _KDKLTopK(torch.autograd.Function):
    """Per-row KL of the (k+1)-outcome coarse-grained distributions; see :func:`kd_kl_topk_per_position`."""

    @staticmethod
    def forward(ctx, student: Tensor, idx: Tensor, log_p: Tensor, log_r: Tensor, temperature: float) -> Tensor:
        width = student.shape[-1]
        s2, i2 = student.reshape(-1, width), idx.reshape(-1, idx.shape[-1])
        p2, r2 = log_p.reshape(i2.shape), log_r.reshape(-1)
        acc = _acc_dtype(student)
        out = torch.empty(s2.shape[0], dtype=acc, device=student.device)
        for sl in _chunks(s2.shape[0], width, s2.device):
            log_q_k, log_q_rest, _ = _topk_split(s2[sl].to(acc) / temperature, i2[sl])
            out[sl] = _topk_kl_from(log_q_k, log_q_rest, p2[sl].to(acc), r2[sl].to(acc))
        ctx.save_for_backward(student, i2, p2, r2)
        ctx.temperature = temperature
        return out.reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        student, i2, p2, r2 = ctx.saved_tensors
        T, acc, width = ctx.temperature, _acc_dtype(student), student.shape[-1]
        s2, g2 = student.reshape(-1, width), grad_out.reshape(-1, 1)
        if torch.is_grad_enabled():  # create_graph=True (double backward): plain differentiable ops, no chunking
            log_q, log_q_rest = _topk_terms(s2.to(acc) / T, i2)
            grad = (log_q.exp() - _topk_target(log_q, log_q_rest, i2, p2.to(acc), r2.to(acc))) * (g2 / T)
            return grad.to(student.dtype).reshape(student.shape), None, None, None, None
        grad = torch.empty_like(s2)
        for sl in _chunks(s2.shape[0], width, s2.device):
            # outside K: q_j (1 - r / q_rest); on K: q_i - p_i (one exp pass, in place)
            log_q_k, log_q_rest, q = _topk_split(s2[sl].to(acc) / T, i2[sl])
            shift = torch.where(torch.isfinite(log_q_rest), r2[sl].to(acc) - log_q_rest, float("-inf"))
            scale = g2[sl] / T
            q.exp_().mul_((1 - shift.exp()).unsqueeze(-1) * scale)
            q.scatter_(-1, i2[sl], (log_q_k.exp() - p2[sl].to(acc).exp()) * scale)
            grad[sl] = q
            del q
        return grad.reshape(student.shape), None, None, None, None


def kd_kl_topk_per_position(
    student_logits: Tensor, topk_indices: Tensor, topk_log_probs: Tensor, rest_log_mass: Tensor,
    temperature: float = 4.0,
) -> Tensor:
    """Per-position KD loss against a teacher known only by its top-k classes (a teacher-output cache).

    The teacher is given at temperature ``T`` by the indices ``K`` of its k most likely classes, their
    log-probabilities ``log p_K`` and the log of the remaining mass ``r = 1 - sum_K p``. The loss is the
    KL divergence of the two distributions coarse-grained onto k + 1 outcomes (each class of ``K``, and
    "any other class"), with ``q = softmax(z_s / T)`` and ``q_rest = 1 - sum_K q``::

        sum_{i in K} p_i (log p_i - log q_i) + r (log r - log q_rest)

    This is the documented approximation of the full ``KL(p || q)``: never larger than it (data
    processing inequality), and equal to it when the teacher's distribution over the classes outside
    ``K`` is proportional to the student's (always when k = classes - 1). Gradient w.r.t. ``z_s``:
    ``(q - p_hat) / T`` with ``p_hat = p`` on ``K`` and ``r q_j / q_rest`` elsewhere.

    Shapes: ``student_logits (..., C)``, ``topk_indices`` and ``topk_log_probs (..., k)``,
    ``rest_log_mass (...)``. Returns fp32 (fp64 for fp64 logits) of shape ``(...)``, without the ``T^2``
    factor, like :func:`kd_kl_per_position`; no gradient flows to the teacher's tensors.
    """
    lead = student_logits.shape[:-1]
    if topk_indices.shape != topk_log_probs.shape or topk_indices.shape[:-1] != lead or rest_log_mass.shape != lead:
        raise ValueError(
            f"top-k teacher tensors do not match the student logits {tuple(student_logits.shape)}: indices "
            f"{tuple(topk_indices.shape)}, log-probabilities {tuple(topk_log_probs.shape)}, rest mass "
            f"{tuple(rest_log_mass.shape)} (expected (..., k), (..., k) and {tuple(lead)})"
        )
    if not 0 < float(temperature) < float("inf"):
        raise ValueError(f"temperature must be > 0 and finite; got {temperature!r}")
    return _KDKLTopK.apply(
        student_logits, topk_indices.detach().long(), topk_log_probs.detach(), rest_log_mass.detach(), float(temperature)
    )
