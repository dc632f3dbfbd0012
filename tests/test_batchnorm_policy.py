"""BatchNorm statistics policy of SQAKDTrainer (``bn_policy``): real Trainer, a digits CNN with BatchNorm.

'frozen' keeps the running statistics the student started with (the teacher's, with the running means of the
norms after bias-corrected convs moved by calibration) exactly while BN weight/bias train; 'train' updates them; 'freeze_after' updates them during the first ``bn_freeze_steps`` optimizer steps
only, also across a resume from a checkpoint.
"""

from __future__ import annotations

import copy
import os

import datasets
import pytest
import torch
from conftest import DigitsCNN
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, quantize_model
from sqakd_hf.training.batchnorm import batchnorm_modules, resolve_policy, set_batchnorm_eval, stats_frozen

STATS = ("running_mean", "running_var", "num_batches_tracked")


def _args(tmp_path, name="out", **kw) -> SQAKDTrainingArguments:
    base = dict(output_dir=str(tmp_path / name), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, seed=0, per_device_train_batch_size=16, calibration_batches=1, max_steps=4,
                learning_rate=1e-2, lr_scheduler_type="constant")
    base.update(kw)
    return SQAKDTrainingArguments(**base)


@pytest.fixture(scope="module")
def setup(digits):
    """(teacher with non-trivial running statistics, unlabeled training set)."""
    x_tr, _, _, _ = digits
    torch.manual_seed(0)
    teacher = DigitsCNN().train()
    with torch.no_grad():
        for i in range(0, 256, 64):
            teacher(x_tr[i : i + 64])
    ds = datasets.Dataset.from_dict({"pixel_values": x_tr[256:416].numpy()}).with_format("torch")
    return teacher.eval(), ds


def _student(teacher: nn.Module) -> nn.Module:
    return quantize_model(copy.deepcopy(teacher).requires_grad_(True), QuantConfig(method="lsq", weight_bits=4,
                                                                                   act_bits=4))


def _stats(model: nn.Module) -> dict:
    return {f"{n}.{s}": getattr(m, s).detach().clone() for n, m in batchnorm_modules(model) for s in STATS}


def _affine(model: nn.Module) -> dict:
    return {f"{n}.{s}": getattr(m, s).detach().clone() for n, m in batchnorm_modules(model) for s in ("weight", "bias")}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _StatsPerStep(TrainerCallback):
    """The student's BN statistics after every optimizer step."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.seen = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append((state.global_step, _stats(self.model)))


def test_arguments_are_validated(tmp_path):
    assert SQAKDTrainingArguments(output_dir=str(tmp_path)).bn_policy == "auto"
    with pytest.raises(ValueError, match="bn_policy must be one of auto, frozen, train, freeze_after"):
        _args(tmp_path, bn_policy="eval")
    for bad in (None, 0, -1, True, 2.0):
        with pytest.raises(ValueError, match="bn_freeze_steps must be an integer >= 1"):
            _args(tmp_path, bn_policy="freeze_after", bn_freeze_steps=bad)
    with pytest.raises(ValueError, match="bn_freeze_steps=3 only applies to bn_policy='freeze_after'"):
        _args(tmp_path, bn_policy="frozen", bn_freeze_steps=3)
    assert _args(tmp_path, bn_policy="freeze_after", bn_freeze_steps=2).bn_freeze_steps == 2


def test_helpers_find_every_batchnorm_incl_timm_and_flip_modes():
    timm = pytest.importorskip("timm")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm.layers.BatchNormAct2d(4), nn.BatchNorm2d(4),
                          nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.LazyLinear(2),
                          nn.BatchNorm1d(2), nn.LayerNorm(2)).train()
    found = batchnorm_modules(model)
    assert [n for n, _ in found] == ["1", "2", "6"]  # no stats to keep: the untracked BN; LayerNorm is no BN
    assert set_batchnorm_eval(found) == 3 and set_batchnorm_eval(found) == 0
    assert not any(m.training for _, m in found) and model[0].training and model[3].training
    assert batchnorm_modules(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))) == []
    assert stats_frozen("frozen", 0, None) and not stats_frozen("train", 5, None)
    assert not stats_frozen("freeze_after", 1, 2) and stats_frozen("freeze_after", 2, 2)


def test_frozen_keeps_teacher_statistics_trains_affine_and_saves_them(setup, tmp_path, digits):
    teacher, ds = setup
    student = _student(teacher)
    trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=_args(tmp_path, bn_policy="frozen"),
                           train_dataset=ds)
    affine_before = _affine(student)
    trainer.prepare_student()  # calibration: bias correction moves the running statistics of the corrected convs' norms
    calibrated = _stats(student)
    assert sorted(student.sqakd_bias_corrected) == ["features.1.0", "features.2.0", "features.3.0"]
    for k, v in _stats(teacher).items():  # the stem conv stays full precision: its norm keeps the teacher's statistics
        corrected = k.startswith(("features.1.", "features.2.", "features.3.")) and not k.endswith("num_batches_tracked")
        assert torch.equal(calibrated[k], v) != corrected, k
    trainer.train()
    assert _same(_stats(student), calibrated)
    moved = [k for k, v in _affine(student).items() if not torch.equal(v, affine_before[k])]
    assert len(moved) == len(affine_before)  # every BN weight and bias still trained
    # evaluation uses the (kept) statistics and works as before; saving writes them unchanged
    x_te = digits[2][:64]
    metrics = trainer.evaluate(datasets.Dataset.from_dict({"pixel_values": x_te.numpy()}).with_format("torch"))
    assert 0.0 <= metrics["eval_teacher_agreement"] <= 1.0
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(os.path.join(tmp_path, "saved", "model.safetensors"))
    for k, v in calibrated.items():
        if k in saved:
            assert torch.equal(saved[k], v), k
    assert any(k.endswith("running_var") for k in saved)


def test_train_policy_updates_statistics(setup, tmp_path):
    teacher, ds = setup
    student = _student(teacher)
    SQAKDTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=_args(tmp_path, bn_policy="train"),
                 train_dataset=ds).train()
    before, after = _stats(teacher), _stats(student)
    changed = [k for k in before if k.endswith("running_var") and not torch.equal(before[k], after[k])]
    assert len(changed) == len(batchnorm_modules(teacher))


def test_freeze_after_updates_during_the_first_steps_only(setup, tmp_path):
    teacher, ds = setup
    student = _student(teacher)
    trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(teacher), train_dataset=ds,
                           args=_args(tmp_path, bn_policy="freeze_after", bn_freeze_steps=2, max_steps=5))
    spy = _StatsPerStep(student)
    trainer.add_callback(spy)
    trainer.train()
    history = [_stats(teacher)] + [s for _, s in spy.seen]
    assert [step for step, _ in spy.seen] == [1, 2, 3, 4, 5]
    updated = [not _same(history[i], history[i + 1]) for i in range(5)]
    assert updated == [True, True, False, False, False]


def test_resume_keeps_the_policy(setup, tmp_path):
    """freeze_after(3), 6 steps: straight vs checkpoint at step 2 + resume (the resumed run still updates the
    statistics in step 3, then freezes): same final state."""
    teacher, ds = setup
    common = dict(bn_policy="freeze_after", bn_freeze_steps=3, max_steps=6, learning_rate=1e-3,
                  lr_scheduler_type="linear", save_strategy="steps", save_steps=2, save_only_model=False)
    straight = _student(teacher)
    SQAKDTrainer(model=straight, teacher_model=copy.deepcopy(teacher), args=_args(tmp_path, "a", **common),
                 train_dataset=ds).train()
    resumed = _student(teacher)
    trainer = SQAKDTrainer(model=resumed, teacher_model=copy.deepcopy(teacher), args=_args(tmp_path, "b", **common),
                           train_dataset=ds)
    spy = _StatsPerStep(resumed)
    trainer.add_callback(spy)
    trainer.train(resume_from_checkpoint=os.path.join(tmp_path, "a", "checkpoint-2"))
    assert [step for step, _ in spy.seen] == [3, 4, 5, 6]
    at_checkpoint = load_stats(os.path.join(tmp_path, "a", "checkpoint-2"), resumed)
    assert any(k.endswith("running_var") for k in at_checkpoint)
    assert not all(torch.equal(spy.seen[0][1][k], v) for k, v in at_checkpoint.items())
    assert all(_same(spy.seen[0][1], s) for _, s in spy.seen[1:])
    a, b = straight.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def load_stats(checkpoint: str, like: nn.Module) -> dict:
    """The BN statistics stored in a checkpoint, keyed as :func:`_stats` keys them."""
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    return {k: saved[k] for k in _stats(like) if k in saved}


def test_auto_freezes_at_8_bits_and_trains_below():
    """``auto``: 8-bit students keep the teacher's statistics, lower-bit ones re-estimate them."""
    base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                         nn.LazyLinear(2))
    base(torch.zeros(1, 3, 8, 8))
    for (wb, ab), expected in (((8, 8), "frozen"), ((4, 8), "train"), ((8, 4), "train"), ((2, 2), "train")):
        model = quantize_model(copy.deepcopy(base), QuantConfig(weight_bits=wb, act_bits=ab, modules_to_not_convert=[]))
        assert resolve_policy("auto", model) == expected, (wb, ab)
        assert resolve_policy("train", model) == "train" and resolve_policy("frozen", model) == "frozen"
