"""SQAKDTrainer relies on public Trainer hooks only (private uses carry a comment naming the missing public
hook, and their behaviour is pinned here), and its evaluation is the one evaluator of
:mod:`sqakd_hf.training.metrics`: ``by_model(trainer.evaluate())`` equals ``evaluate_models(student, teacher)``."""

from __future__ import annotations

import copy
import inspect
import re

import datasets
import pytest
import torch
from transformers import TrainerCallback, default_data_collator

import sqakd_hf.training.trainer as trainer_mod
from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, named_quantizers, quantize_model
from sqakd_hf.training.metrics import by_model, evaluate_models

#: Trainer / accelerate internals the trainer must not use without saying which public hook is missing
PRIVATE = re.compile(
    r"_inner_training_loop|accelerator\._|\._save\(|_set_signature_columns|_signature_columns|_prepare_inputs"
    r"|_train_batch_size|_loss_shifts_labels|_remove_unused_columns|_get_collator_with_removed_columns"
)
EXPLAINED = re.compile(r"#.*no public hook")


def _args(tmp_path, **kw) -> SQAKDTrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, seed=0, per_device_train_batch_size=32, per_device_eval_batch_size=48,
                calibration_batches=1)
    base.update(kw)
    return SQAKDTrainingArguments(**base)


def test_trainer_source_uses_no_unexplained_private_hooks():
    lines = inspect.getsource(trainer_mod).splitlines()
    offending = [f"{i}: {line.strip()}" for i, line in enumerate(lines, 1)
                 if PRIVATE.search(line) and not EXPLAINED.search(line)]
    assert not offending, "private Trainer/accelerate use without a '# no public hook ...' comment:\n" + "\n".join(
        offending)


def test_timm_native_forward_keeps_image_columns(digits, digits_teacher, tmp_path):
    """Pins the one private hook: a forward(x) student keeps ``pixel_values``; unused columns still go."""
    x_tr, _, _, _ = digits
    ds = datasets.Dataset.from_dict({"pixel_values": x_tr[:64].numpy(), "idx": list(range(64))}).with_format("torch")
    student = quantize_model(copy.deepcopy(digits_teacher).requires_grad_(True), QuantConfig(weight_bits=4, act_bits=4))
    trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(digits_teacher),
                           args=_args(tmp_path, max_steps=1), train_dataset=ds)
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"pixel_values"}
    # building the loader outside train() does not calibrate; train() does, before its first step
    assert not any(q.initialized for _, q in named_quantizers(student))
    calls = []
    trainer.add_callback(type("Spy", (TrainerCallback,), {
        "on_train_begin": lambda self, *a, **k: calls.append(all(q.initialized for _, q in named_quantizers(student)))
    })())
    trainer.train()
    assert calls == [True]


def _assert_same(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys() and all(got[k].keys() == ref[k].keys() for k in ref), (got, ref)
    for k in ref:
        for name, value in ref[k].items():
            assert got[k][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (k, name)


def test_trainer_evaluation_equals_evaluate_models_on_digits(digits, digits_teacher, tmp_path):
    x_tr, _, x_te, y_te = digits
    train = datasets.Dataset.from_dict({"pixel_values": x_tr[:128].numpy()}).with_format("torch")
    test = datasets.Dataset.from_dict({"pixel_values": x_te[:100].numpy(), "label": y_te[:100].numpy()})
    test = test.with_format("torch")
    teacher = copy.deepcopy(digits_teacher)
    student = quantize_model(copy.deepcopy(teacher).requires_grad_(True), QuantConfig(weight_bits=4, act_bits=4))
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=train)
    m = trainer.evaluate(test)  # calibrates first, then evaluates; the student is prepared as the Trainer would
    assert {"eval_kd_loss", "eval_teacher_agreement", "eval_accuracy", "eval_teacher_accuracy"} <= set(m)
    assert "eval_model_preparation_time" in m
    ref = evaluate_models(student, teacher, test, default_data_collator, batch_size=32, progress=False)
    assert set(ref["teacher"]) == {"accuracy"}
    _assert_same(by_model(m), ref)
    # without labels: no accuracies, same structure as evaluate_models
    unlabeled = test.remove_columns("label")
    _assert_same(by_model(trainer.evaluate(unlabeled)),
                 evaluate_models(student, teacher, unlabeled, default_data_collator, progress=False))


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


def test_trainer_evaluation_equals_evaluate_models_causal_lm_with_padding(tmp_path):
    """Token-level metrics over non-padding tokens; accuracy compares position i with label i + 1."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (24, 16), generator=g)
    lengths = torch.randint(6, 17, (24,), generator=g)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    ds = datasets.Dataset.from_dict({"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                     "labels": labels.numpy()}).with_format("torch")
    teacher = _tiny_gpt2()
    student = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(weight_bits=4, act_bits=4))
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, per_device_train_batch_size=8),
                           train_dataset=ds.remove_columns("labels"))
    m = trainer.evaluate(ds)
    ref = evaluate_models(student, teacher, ds, default_data_collator, batch_size=10, shifted_labels=True,
                          progress=False)
    assert set(ref["student"]) == {"kd_loss", "teacher_agreement", "accuracy"} and set(ref["teacher"]) == {"accuracy"}
    _assert_same(by_model(m), ref)


def test_trainer_evaluation_equals_evaluate_models_hidden_states(tmp_path):
    """Models without logits: evaluate_models' hidden-state MSE; eval_kd_loss stays the training objective."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0), add_pooling_layer=False).eval()
    student = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(weight_bits=4, act_bits=4))
    ids = torch.randint(1, 64, (16, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    ds = datasets.Dataset.from_dict({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}).with_format("torch")
    args = _args(tmp_path, per_device_train_batch_size=8, distill_target="hidden_states", hidden_loss="cosine")
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds)
    m = trainer.evaluate(ds)
    assert "eval_kd_loss" in m and "eval_teacher_agreement" not in m
    assert m["eval_kd_loss"] != pytest.approx(m["eval_hidden_mse"])  # cosine objective vs MSE
    ref = evaluate_models(student, teacher, ds, default_data_collator, progress=False)
    assert ref == {"student": {"hidden_mse": pytest.approx(ref["student"]["hidden_mse"])}, "teacher": {}}
    _assert_same(by_model(m), ref)
