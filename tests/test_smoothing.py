"""SmoothQuant outlier migration (``QuantConfig(smooth_alpha=...)``) on a small pre-LN transformer (GPT-2 layout):
which inputs are migrated, that the full-precision function is unchanged, that outlier channels shrink, and that
a source whose output also feeds something else (the residual stream of a post-LN model) is left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from sqakd_hf import QuantConfig, calibrate, quantize_model
from sqakd_hf.injection import named_quantizers
from sqakd_hf.smoothing import FOLD_TOLERANCE


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).eval()
    with torch.no_grad():  # real LLM activations have a few outlier channels: make ln_1's output have them
        for block in model.transformer.h:
            block.ln_1.weight[:3] = 40.0
    return model


def _batches(vocab: int, n: int = 3):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (4, 12), generator=gen) for _ in range(n)]


def _fp_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    quantizers = [q for _, q in named_quantizers(model)]
    for q in quantizers:
        q.bypass = True
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for q in quantizers:
            q.bypass = False


def test_pre_ln_norms_fold_and_the_function_is_unchanged():
    teacher = _gpt2()
    batches = _batches(64)
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=8, act_bits=8, smooth_alpha=0.5,
                                                                 act_granularity="per_tensor"))
    before = student.transformer.h[0].ln_1.weight.detach().clone()
    calibrate(student, batches)
    assert student.sqakd_report.smoothed == student.sqakd_smoothed
    for i in range(2):
        assert f"transformer.h.{i}.attn.c_attn <- transformer.h.{i}.ln_1" in student.sqakd_smoothed
        assert f"transformer.h.{i}.mlp.c_fc <- transformer.h.{i}.ln_2" in student.sqakd_smoothed
    # c_proj reads the attention context / GELU output: no foldable source
    assert not any("c_proj" in entry for entry in student.sqakd_smoothed)
    with torch.no_grad():
        expected = teacher(batches[0]).logits
    got = _fp_logits(student, batches[0])
    assert ((got - expected).norm() / expected.norm()) < 1e-5
    # the outlier channels were migrated: ln_1's output channels 0..2 shrank relative to the rest
    after = student.transformer.h[0].ln_1.weight.detach()
    assert (after[:3].abs().mean() / after[3:].abs().mean()) < 0.5 * (before[:3].abs().mean() / before[3:].abs().mean())
    # and the student still loads into the teacher's architecture under the same names
    plain = {k: v for k, v in student.state_dict().items() if "_quantizer." not in k}
    copy.deepcopy(teacher).load_state_dict(plain, strict=True)


def test_smoothing_reduces_the_static_activation_error():
    teacher = _gpt2()
    batches = _batches(64)
    with torch.no_grad():
        expected = teacher(batches[0]).logits
    err = {}
    for alpha in (None, 0.5):
        student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=8, act_bits=4, smooth_alpha=alpha,
                                                                     act_granularity="per_tensor"))
        calibrate(student, batches)
        with torch.no_grad():
            err[alpha] = ((student(batches[0]).logits - expected).norm() / expected.norm()).item()
    assert err[0.5] < err[None], err


def test_post_ln_residual_sources_are_skipped():
    """BERT's LayerNorm output is also the residual stream: folding into it would change the model. Only the
    attention output projection (source: the value projection) is migrated."""
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                   vocab_size=64, max_position_embeddings=16)).eval()
    batches = [{"input_ids": ids} for ids in _batches(64)]
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=8, act_bits=8, smooth_alpha=0.5))
    calibrate(student, batches)
    assert sorted(student.sqakd_smoothed) == [
        f"encoder.layer.{i}.attention.output.dense <- encoder.layer.{i}.attention.self.value" for i in range(2)]
    quantizers = [q for _, q in named_quantizers(student)]
    for q in quantizers:
        q.bypass = True
    with torch.no_grad():
        got, expected = student(**batches[0]).last_hidden_state, teacher(**batches[0]).last_hidden_state
    assert ((got - expected).norm() / expected.norm()) < FOLD_TOLERANCE


def test_calibrating_twice_does_not_migrate_again():
    teacher = _gpt2()
    batches = _batches(64)
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=8, act_bits=8, smooth_alpha=0.5))
    calibrate(student, iter(batches))  # a one-shot iterator: the batches are read once, used twice
    ln = student.transformer.h[0].ln_1.weight.detach().clone()
    calibrate(student, batches)
    assert torch.allclose(student.transformer.h[0].ln_1.weight, ln, rtol=1e-4)


def test_no_smoothing_by_default():
    student = quantize_model(_gpt2(), QuantConfig(weight_bits=8, act_bits=8))
    weight = student.transformer.h[0].ln_1.weight.detach().clone()
    calibrate(student, _batches(64))
    assert torch.equal(student.transformer.h[0].ln_1.weight, weight)
    assert student.sqakd_report.smoothed == []
