"""``quantizer_lr_mode``: quantizer parameters move relative to their own size ('relative') or by the optimizer's
plain update ('absolute'); the rule, its sign safety, its place in the trainer, resume, and argument errors."""

from __future__ import annotations

import copy
import os

import datasets
import pytest
import torch
from conftest import DigitsCNN

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, named_quantizers, quantize_model
from sqakd_hf.training.quantizer_lr import RelativeQuantizerUpdate, relative_update_


def _args(tmp_path, name, **kw) -> SQAKDTrainingArguments:
    base = dict(output_dir=str(tmp_path / name), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, seed=0, logging_steps=1, calibration_batches=1, per_device_train_batch_size=16)
    base.update(kw)
    return SQAKDTrainingArguments(**base)


@pytest.fixture()
def digits_ds(digits):
    x_tr = digits[0]
    return datasets.Dataset.from_dict({"pixel_values": x_tr[:64].numpy()}).with_format("torch")


def _mixed_student(base):
    """Layer features.0 at 8 bits, features.1 at 2 bits: weight steps ~50x apart."""
    cfg = QuantConfig(method="lsq", weight_bits=4, act_bits=8, modules_to_not_convert=[],
                      layer_bits={"features.0.0": 8, "features.1.0": 2})
    return quantize_model(copy.deepcopy(base), cfg)


def _steps(model):
    return {n: q.scale.detach().clone() for n, q in named_quantizers(model) if n.endswith("weight_quantizer")}


def test_rule_moves_fine_and_coarse_steps_by_the_same_fraction():
    """First AdamW step: |d| = lr for every element; relative: |p_new / p_old - 1| = lr up to exp's 2nd order, for a
    step of 2e-3 (8-bit-like) and 0.1 (2-bit-like) alike; absolute: both move by lr."""
    lr = 1e-3
    for mode in ("relative", "absolute"):
        steps = torch.nn.Parameter(torch.tensor([2e-3, 0.1, 0.1, 2e-3]))
        opt = torch.optim.AdamW([{"params": [steps], "weight_decay": 0.0}], lr=lr)
        if mode == "relative":
            RelativeQuantizerUpdate(opt, 0)
        old = steps.detach().clone()
        (steps * torch.tensor([1.0, 1.0, -1.0, -1.0])).sum().backward()
        opt.step()
        moved = steps.detach() - old
        if mode == "relative":
            torch.testing.assert_close(moved / old, torch.tensor([-lr, -lr, lr, lr]), rtol=1e-3, atol=0)
        else:
            torch.testing.assert_close(moved, torch.tensor([-lr, -lr, lr, lr]), rtol=1e-3, atol=0)


def test_rule_keeps_signs_and_moves_zeros_by_the_plain_update():
    old = torch.tensor([1e-3, 0.5, -0.2, 0.0])
    p = old + torch.tensor([-10.0, -3.0, 5.0, 0.25])  # an update far larger than the values: absolute flips signs
    relative_update_([p], [old])
    assert (p[:3].sign() == old[:3].sign()).all()
    torch.testing.assert_close(p, torch.stack([1e-3 * torch.exp(torch.tensor(-10.0)), 0.5 * torch.exp(torch.tensor(-3.0)),
                                               -0.2 * torch.exp(torch.tensor(-5.0)), torch.tensor(0.25)]))


def test_trainer_relative_on_8_and_2_bit_steps(digits_ds, tmp_path):
    """One SQAKD step (AdamW, constant lr): in 'relative' mode the 8-bit and the 2-bit layer's weight steps change by
    at most ~lr of their size; in 'absolute' mode the 8-bit steps change by ~lr, a far larger share of their size."""
    torch.manual_seed(0)
    teacher, base = DigitsCNN().eval(), DigitsCNN()
    lr = 1e-3
    changes = {}
    for mode in ("relative", "absolute"):
        student = _mixed_student(base)
        args = _args(tmp_path, mode, max_steps=1, learning_rate=lr, lr_scheduler_type="constant",
                     quantizer_lr_mode=mode)
        trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=args, train_dataset=digits_ds)
        trainer.prepare_student()
        before = _steps(student)
        trainer.train()
        after = _steps(student)
        assert (trainer.quantizer_update is None) == (mode == "absolute")
        changes[mode] = {n: ((after[n] - before[n]).abs() / before[n].abs()) for n in before}
        assert all((after[n] > 0).all() for n in after)
    fine, coarse = "features.0.0.weight_quantizer", "features.1.0.weight_quantizer"
    for name in (fine, coarse):
        rel = changes["relative"][name]
        assert rel.max() <= lr * 1.01, (name, rel.max())
        assert rel.max() >= lr * 0.5, (name, rel.max())  # it does train
    # absolute: an 8-bit step (~1e-2 of a weight range here) moves by ~lr, i.e. many times its relative lr share
    assert changes["absolute"][fine].median() > 5 * changes["relative"][fine].median()


def test_resume_keeps_the_relative_rule(digits_ds, tmp_path):
    """2N relative steps straight == N steps, checkpoint, resume N more; and differs from the absolute run."""
    torch.manual_seed(0)
    teacher, base = DigitsCNN().eval(), DigitsCNN()
    common = dict(max_steps=6, learning_rate=1e-2, save_strategy="steps", save_steps=3, save_only_model=False,
                  quantizer_lr_mode="relative")
    straight = _mixed_student(base)
    SQAKDTrainer(model=straight, teacher_model=copy.deepcopy(teacher), args=_args(tmp_path, "a", **common),
                 train_dataset=digits_ds).train()
    resumed = _mixed_student(base)
    trainer = SQAKDTrainer(model=resumed, teacher_model=copy.deepcopy(teacher), args=_args(tmp_path, "b", **common),
                           train_dataset=digits_ds)
    trainer.train(resume_from_checkpoint=os.path.join(tmp_path, "a", "checkpoint-3"))
    assert trainer.state.global_step == 6 and trainer.quantizer_update is not None
    a, b = _steps(straight), _steps(resumed)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-7, rtol=1e-6, msg=n)
    absolute = _mixed_student(base)
    SQAKDTrainer(model=absolute, teacher_model=copy.deepcopy(teacher),
                 args=_args(tmp_path, "c", **{**common, "quantizer_lr_mode": "absolute", "save_strategy": "no"}),
                 train_dataset=digits_ds).train()
    c = _steps(absolute)
    assert max((a[n] - c[n]).abs().max().item() for n in a) > 1e-3  # the modes do differ


def test_default_is_auto(tmp_path):
    args = _args(tmp_path, "d")
    assert args.quantizer_lr_mode == "auto"
    assert "relatively" in SQAKDTrainingArguments.__dataclass_fields__["quantizer_learning_rate"].metadata["help"]


def test_auto_updates_8_bit_steps_relatively_and_coarser_ones_absolutely(digits_ds, tmp_path):
    """'auto': the 8-bit layer's steps change as in 'relative', the 2-bit layer's as in 'absolute' (one step: the
    same gradients in every mode)."""
    torch.manual_seed(0)
    teacher, base = DigitsCNN().eval(), DigitsCNN()
    after = {}
    for mode in ("auto", "relative", "absolute"):
        student = _mixed_student(base)
        args = _args(tmp_path, mode, max_steps=1, learning_rate=1e-3, lr_scheduler_type="constant",
                     quantizer_lr_mode=mode, save_strategy="no")
        trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=args, train_dataset=digits_ds)
        trainer.train()
        after[mode] = _steps(student)
    fine, coarse = "features.0.0.weight_quantizer", "features.1.0.weight_quantizer"
    torch.testing.assert_close(after["auto"][fine], after["relative"][fine])
    torch.testing.assert_close(after["auto"][coarse], after["absolute"][coarse])
    assert (after["relative"][coarse] - after["absolute"][coarse]).abs().max() > 1e-4  # the test can tell them apart
    assert (after["relative"][fine] - after["absolute"][fine]).abs().max() > 1e-4


def test_bad_mode_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="quantizer_lr_mode must be one of auto, relative, absolute"):
        _args(tmp_path, "x", quantizer_lr_mode="log")
    with pytest.raises(ValueError, match="group_index 3"):
        RelativeQuantizerUpdate(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), 3)
