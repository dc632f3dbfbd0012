"""SQAKDTrainer across model families: causal LMs (token-level KL over non-padding tokens), BERT text
classification (teacher loaded from a path), an embedding model (hidden-state target), timm models."""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import pathlib
import re

import datasets
import pytest
import torch
import torch.nn.functional as F

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, kd_kl_loss, quantize_model

SEQ = 32


def _args(tmp_path, **kw) -> SQAKDTrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, seed=0, logging_steps=1, per_device_train_batch_size=16,
                per_device_eval_batch_size=32, calibration_batches=1)
    base.update(kw)
    return SQAKDTrainingArguments(**base)


@pytest.fixture(scope="module")
def text_batches():
    """Real English text (standard-library docstrings) as byte tokens, right-padded to SEQ (pad id 0)."""
    text = " ".join(inspect.getdoc(m) or "" for m in (json, re, argparse, pathlib, inspect, copy, datasets))
    words = text.split()
    rows, masks = [], []
    g = torch.Generator().manual_seed(0)
    pos = 0
    while len(rows) < 96:
        length = int(torch.randint(SEQ // 2, SEQ + 1, (1,), generator=g))
        ids = list(" ".join(words[pos : pos + 40]).encode("utf-8", "replace"))[:length]
        pos = (pos + 7) % max(1, len(words) - 40)
        rows.append([max(1, min(255, b)) for b in ids] + [0] * (SEQ - len(ids)))
        masks.append([1] * len(ids) + [0] * (SEQ - len(ids)))
    return torch.tensor(rows), torch.tensor(masks)


def _lm_dataset(ids, mask):
    return datasets.Dataset.from_dict({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}).with_format("torch")


def _train_teacher_lm(model, ids, mask, steps=80):
    """A few steps of ordinary LM training so the teacher's predictions are not uniform."""
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    for i in range(steps):
        sl = slice((i * 16) % 96, (i * 16) % 96 + 16)
        loss = model(input_ids=ids[sl], attention_mask=mask[sl], labels=labels[sl]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _causal_lm(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                          eos_token_id=2))
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_token_level_kd(kind, text_batches, tmp_path):
    ids, mask = text_batches
    teacher = _train_teacher_lm(_causal_lm(kind), ids, mask)
    student = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(method="lsq", weight_bits=4, act_bits=4))
    ds = _lm_dataset(ids, mask)
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=ds, eval_dataset=ds,
                           args=_args(tmp_path, max_steps=24, learning_rate=3e-4))
    before = trainer.evaluate()

    # the loss is the per-token KL over non-padding tokens, no shift (teacher and student see the same tokens)
    batch = {"input_ids": ids[:8], "attention_mask": mask[:8]}
    student.eval()
    with torch.no_grad():
        got = trainer.compute_loss(student, batch)
        s = student(**batch).logits
        t = teacher(**batch).logits
        # padding (right side, causal model) cannot change real positions, and must not count
        garbage = {"input_ids": ids[:8].masked_fill(mask[:8] == 0, 77), "attention_mask": mask[:8]}
        got_garbage = trainer.compute_loss(student, garbage)
    student.train()
    real = mask[:8].bool()
    manual = 16 * F.kl_div(F.log_softmax(s[real] / 4, -1), F.log_softmax(t[real] / 4, -1), log_target=True,
                           reduction="batchmean")
    assert got.item() == pytest.approx(manual.item(), rel=1e-4)
    assert got.item() == pytest.approx(kd_kl_loss(s, t, 4.0, mask[:8]).item(), rel=1e-5)
    assert got_garbage.item() == pytest.approx(got.item(), rel=1e-4)

    trainer.train()
    after = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"\n{kind} W4A4 eval_kd_loss {before['eval_kd_loss']:.4f} -> {after['eval_kd_loss']:.4f}, "
          f"token agreement {before['eval_teacher_agreement']:.3f} -> {after['eval_teacher_agreement']:.3f}")
    assert after["eval_kd_loss"] < 0.8 * before["eval_kd_loss"]
    assert sum(losses[-4:]) < sum(losses[:4])
    # not lower by more than a few of the ~900 tokens (float-rounding changes of the step gradient move 1-2 tokens)
    assert after["eval_teacher_agreement"] >= before["eval_teacher_agreement"] - 0.005


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def test_bert_text_classification_teacher_from_path(text_batches, tmp_path):
    from transformers import BertForSequenceClassification

    ids, mask = text_batches
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(_bert_config(num_labels=5, initializer_range=0.2)).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    # init="paper" (DoReFa weights): a start with room to halve the KD loss (the default MSE start is already at 0.025)
    student = quantize_model(copy.deepcopy(teacher).train(),
                             QuantConfig(method="pact", weight_bits=3, act_bits=3, init="paper"))
    ds = _lm_dataset(ids, mask)
    trainer = SQAKDTrainer(model=student, teacher_model=str(tmp_path / "teacher"), train_dataset=ds, eval_dataset=ds,
                           args=_args(tmp_path, max_steps=24, learning_rate=1e-3))
    assert isinstance(trainer.teacher, BertForSequenceClassification) and trainer.teacher is not teacher
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"\nBERT W3A3 (pact) eval_kd_loss {before['eval_kd_loss']:.4f} -> {after['eval_kd_loss']:.4f}, "
          f"agreement {before['eval_teacher_agreement']:.3f} -> {after['eval_teacher_agreement']:.3f}")
    assert after["eval_kd_loss"] < 0.5 * before["eval_kd_loss"]
    assert after["eval_teacher_agreement"] >= before["eval_teacher_agreement"]


def test_embedding_model_hidden_state_target(text_batches, tmp_path):
    from transformers import BertModel

    ids, mask = text_batches
    torch.manual_seed(0)
    teacher = BertModel(_bert_config(initializer_range=0.2), add_pooling_layer=False).eval()
    student = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(method="lsq", weight_bits=4, act_bits=4))
    ds = _lm_dataset(ids, mask)
    # logits are the default target: a model without logits gets a clear error before any step
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=ds, args=_args(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match=r"no `logits`.*distill_target='hidden_states'"):
        trainer.train()
    assert trainer.state.global_step == 0
    args = _args(tmp_path, max_steps=20, learning_rate=3e-4, distill_target="hidden_states", hidden_loss="cosine")
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=ds, eval_dataset=ds, args=args)
    before = trainer.evaluate()
    assert "eval_teacher_agreement" not in before  # no classes to agree on
    trainer.train()
    after = trainer.evaluate()
    print(f"\nBertModel hidden-state cosine loss {before['eval_kd_loss']:.5f} -> {after['eval_kd_loss']:.5f}")
    assert after["eval_kd_loss"] < 0.8 * before["eval_kd_loss"]


def test_timm_wrapper_and_timm_native(tmp_path):
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(0)
    x = torch.rand(48, 3, 32, 32)
    ds = datasets.Dataset.from_dict({"pixel_values": x.numpy()}).with_format("torch")
    wrapper = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=7)).eval()
    native = timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()
    for teacher in (wrapper, native):
        student = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(method="lsq", weight_bits=4, act_bits=4))
        trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=ds, eval_dataset=ds,
                               args=_args(tmp_path, max_steps=2, per_device_train_batch_size=16))
        trainer.train()
        m = trainer.evaluate()
        assert trainer.state.global_step == 2 and m["eval_kd_loss"] >= 0 and "eval_teacher_agreement" in m


def test_ewgs_token_level_with_hessian_schedule(text_batches, tmp_path):
    """EWGS + the Hessian delta schedule on a causal LM: deltas are set from the KD loss."""
    ids, mask = text_batches
    teacher = _train_teacher_lm(_causal_lm("gpt2"), ids, mask, steps=20)
    student = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(method="ewgs", weight_bits=4, act_bits=4))
    args = _args(tmp_path, max_steps=4, learning_rate=1e-3, ewgs_delta_schedule="hessian", ewgs_delta_update_steps=2,
                 ewgs_hessian_samples=2)
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=_lm_dataset(ids, mask), args=args)
    trainer.train()
    assert trainer._last_delta_step == 2 and trainer.ewgs_deltas
    from sqakd_hf.training.ewgs_schedule import ewgs_quantizers

    deltas = [float(q.delta) for _, q in ewgs_quantizers(student)]
    assert all(d >= 0 and d == d for d in deltas) and any(d != 1e-3 for d in deltas)
