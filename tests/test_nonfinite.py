"""NaN/inf never trains, evaluates or saves silently: each case runs the real SQAKDTrainer on the digits CNN.

Cases: a NaN sample in the data, a teacher that returns NaN (on some samples, or everywhere), non-finite
arguments (temperature=inf, kd_weight=nan, ...), the ``skip_batch`` policy, NaN calibration data, and
evaluation of NaN outputs (disagreement, NaN kd loss)."""

from __future__ import annotations

import copy
import math
import os
import re

import datasets
import pytest
import torch
from torch import nn
from transformers import TrainerCallback, default_data_collator

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, calibrate, quantize_model
from sqakd_hf.training.finite import NonFiniteError
from sqakd_hf.training.metrics import batch_stats, summarize

BATCH = 32
MARK = -1.0  # a corner pixel of -1 marks a sample (digits are in [0, 1], and their corners are 0)


def make_args(tmp_path, **kw) -> SQAKDTrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, save_strategy="no",
                disable_tqdm=True, per_device_train_batch_size=BATCH, per_device_eval_batch_size=128, seed=0,
                logging_steps=5, calibration_batches=1, learning_rate=1e-3, num_train_epochs=1)
    base.update(kw)
    return SQAKDTrainingArguments(**base)


def student_of(teacher: nn.Module) -> nn.Module:
    return quantize_model(copy.deepcopy(teacher).requires_grad_(True).train(), QuantConfig(weight_bits=4, act_bits=4))


def calibration_indices(n: int, seed: int = 0, batches: int = 1) -> set:
    """The samples the trainer draws for calibration and its first-batch check (seeded, as the trainer)."""
    return set(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: batches * BATCH].tolist())


def pick_outside_calibration(n: int, count: int = 1) -> list:
    used = calibration_indices(n)
    return [i for i in range(n // 2, n) if i not in used][:count]


class Spy:
    """The data collator, noting for each collated batch whether it holds a marked sample."""

    def __init__(self, marked) -> None:
        self.marked, self.calls, self.start = marked, [], None

    def __call__(self, features):
        batch = default_data_collator(features)
        self.calls.append(bool(self.marked(batch["pixel_values"]).any()))
        return batch

    def callback(self) -> TrainerCallback:
        spy = self

        class Start(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                spy.start = len(spy.calls)

        return Start()

    def first_marked_step(self) -> int:
        """1-based optimizer step (no accumulation) of the first training batch with a marked sample."""
        return self.calls[self.start:].index(True) + 1


def nan_rows(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)


def marked_rows(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0, 0, 0] == MARK


class NaNOnMarked(nn.Module):
    """A teacher whose outputs are NaN on marked samples (finite inputs), as an fp16 overflow would be."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.inner = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return torch.where(marked_rows(x)[:, None], torch.full_like(out, float("nan")), out)


def dataset_of(x: torch.Tensor) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"pixel_values": x.numpy()}).with_format("torch")


def all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())


# ---- a NaN sample in the data ------------------------------------------------------------------
def test_nan_sample_stops_training_at_its_step_and_nothing_is_saved_after_it(digits, digits_teacher, tmp_path):
    x = digits[0].clone()
    bad = pick_outside_calibration(len(x))[0]
    x[bad, 0, 3, 3] = float("nan")
    spy = Spy(nan_rows)
    student = student_of(digits_teacher)
    trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(digits_teacher), train_dataset=dataset_of(x),
                           data_collator=spy, callbacks=[spy.callback()],
                           args=make_args(tmp_path, save_strategy="steps", save_steps=1, save_only_model=True))
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    step = spy.first_marked_step()
    msg = str(err.value)
    assert f"non-finite values (NaN/inf) in the inputs" in msg and f"at optimizer step {step}," in msg, msg
    assert "nonfinite='skip_batch'" in msg and "torch.isfinite" in msg  # the fix
    out = tmp_path / "out"
    assert not (out / f"checkpoint-{step}").exists()  # the bad step's weights were refused
    if step > 1:
        assert (out / f"checkpoint-{step - 1}").exists()
    with pytest.raises(NonFiniteError, match=f"before saving.*step {step}"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
    # the log never carried a filtered (fake) loss for the bad steps
    assert all(h.get("step", 0) < step for h in trainer.state.log_history if "loss" in h)


def test_nan_in_a_calibration_sample_is_named_before_any_step(digits, digits_teacher, tmp_path):
    x = digits[0].clone()
    x[sorted(calibration_indices(len(x)))[0], 0, 2, 2] = float("inf")
    trainer = SQAKDTrainer(model=student_of(digits_teacher), teacher_model=copy.deepcopy(digits_teacher),
                           train_dataset=dataset_of(x), args=make_args(tmp_path))
    with pytest.raises(NonFiniteError, match=r"calibration batch 0 .*NaN/inf values in \['pixel_values'\]"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---- NaN teacher outputs -----------------------------------------------------------------------
def test_teacher_nan_on_some_samples_is_named_with_its_step(digits, digits_teacher, tmp_path):
    x = digits[0].clone()
    bad = pick_outside_calibration(len(x))[0]
    x[bad, 0, 0, 0] = MARK
    spy = Spy(marked_rows)
    trainer = SQAKDTrainer(model=student_of(digits_teacher), teacher_model=NaNOnMarked(copy.deepcopy(digits_teacher)),
                           train_dataset=dataset_of(x), data_collator=spy, callbacks=[spy.callback()],
                           args=make_args(tmp_path))
    with pytest.raises(NonFiniteError) as err:
        trainer.train()
    msg = str(err.value)
    assert f"in the teacher outputs (with it: student outputs, loss) at optimizer step {spy.first_marked_step()}," \
        in msg or f"in the teacher outputs (with it: loss) at optimizer step {spy.first_marked_step()}," in msg, msg
    assert "run it in float32" in msg


def test_nan_teacher_is_reported_on_the_first_batch(digits, digits_teacher, tmp_path):
    teacher = copy.deepcopy(digits_teacher)
    with torch.no_grad():
        teacher.fc.weight[0, 0] = float("nan")
    trainer = SQAKDTrainer(model=student_of(digits_teacher), teacher_model=teacher,
                           train_dataset=dataset_of(digits[0]), args=make_args(tmp_path))
    with pytest.raises(NonFiniteError, match=r"teacher's outputs on the first training batch are NaN/inf \(32 of 32"):
        trainer.train()
    assert trainer.state.global_step == 0


# ---- non-finite arguments ----------------------------------------------------------------------
@pytest.mark.parametrize("name,value", [("temperature", math.inf), ("kd_weight", math.nan), ("ce_weight", math.inf),
                                        ("quantizer_learning_rate", math.nan), ("quantizer_weight_decay", math.inf),
                                        ("learning_rate", math.nan), ("weight_decay", math.inf),
                                        ("max_grad_norm", math.nan), ("nonfinite_max_skip_fraction", math.nan)])
def test_non_finite_arguments_are_rejected_by_name(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number; got {value!r}"):
        make_args(tmp_path, **{name: value})


def test_bad_policy_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="nonfinite must be one of error, skip_batch"):
        make_args(tmp_path, nonfinite="ignore")
    with pytest.raises(ValueError, match=r"nonfinite_max_skip_fraction must be in \[0, 1\]"):
        make_args(tmp_path, nonfinite_max_skip_fraction=1.5)


def test_a_nan_weight_set_after_validation_is_caught_as_the_loss(digits, digits_teacher, tmp_path):
    """The per-step check catches what argument validation cannot (kd_weight changed on the live args)."""
    trainer = SQAKDTrainer(model=student_of(digits_teacher), teacher_model=copy.deepcopy(digits_teacher),
                           train_dataset=dataset_of(digits[0]), args=make_args(tmp_path, max_steps=3))
    trainer.args.kd_weight = float("nan")
    with pytest.raises(NonFiniteError, match=r"in the loss at optimizer step 1, .*check temperature, kd_weight"):
        trainer.train()


# ---- the skip_batch policy ---------------------------------------------------------------------
@pytest.mark.parametrize("case", ["nan_input", "nan_teacher"])
def test_skip_batch_skips_bad_batches_counts_them_and_keeps_weights_finite(digits, digits_teacher, tmp_path, case):
    x = digits[0].clone()
    bad = pick_outside_calibration(len(x))[0]
    teacher = copy.deepcopy(digits_teacher)
    if case == "nan_input":
        x[bad, 0, 4, 4] = float("nan")
    else:
        x[bad, 0, 0, 0] = MARK
        teacher = NaNOnMarked(teacher)
    student = student_of(digits_teacher)
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=dataset_of(x),
                           args=make_args(tmp_path, nonfinite="skip_batch"))
    trainer.train()
    skipped = [h["nonfinite_skipped_batches"] for h in trainer.state.log_history if "nonfinite_skipped_batches" in h]
    assert skipped and skipped[-1] == 1, trainer.state.log_history
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert all_finite(student)  # no NaN in weights, quantizer parameters or BatchNorm statistics
    trainer.save_model(str(tmp_path / "final"))
    assert os.listdir(tmp_path / "final")


def test_skip_batch_errors_when_too_many_batches_are_bad(digits, digits_teacher, tmp_path):
    x = digits[0].clone()
    for i in pick_outside_calibration(len(x), count=12):
        x[i, 0, 4, 4] = float("nan")
    trainer = SQAKDTrainer(model=student_of(digits_teacher), teacher_model=copy.deepcopy(digits_teacher),
                           train_dataset=dataset_of(x), args=make_args(tmp_path, nonfinite="skip_batch"))
    with pytest.raises(NonFiniteError, match=r"batches so far were skipped for NaN/inf inputs or teacher outputs.*"
                                             r"more than nonfinite_max_skip_fraction=0\.1 of the run's 43 batches"):
        trainer.train()


def test_skip_batch_still_stops_a_diverged_student(digits, digits_teacher, tmp_path):
    """NaN student outputs on clean data are divergence, not bad data: an error under every policy."""
    student = student_of(digits_teacher)
    trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(digits_teacher),
                           train_dataset=dataset_of(digits[0]),
                           args=make_args(tmp_path, nonfinite="skip_batch", max_steps=6, max_grad_norm=0.0))

    class Diverge(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    student.fc.weight.fill_(float("inf"))

    trainer.add_callback(Diverge())
    with pytest.raises(NonFiniteError, match=r"in the student outputs .*at optimizer step 3,.*training diverged"):
        trainer.train()


# ---- calibration -------------------------------------------------------------------------------
def test_calibrate_names_the_nan_batch_and_layer(digits, digits_teacher):
    x = digits[0]
    student = student_of(digits_teacher)
    bad = x[64:96].clone()
    bad[5, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 1 \(of 3\) gives NaN/inf activations at '[\w.]+'"):
        calibrate(student, [x[:32], bad, x[32:64]])
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())


def test_calibrate_refuses_nan_weights(digits, digits_teacher):
    student = student_of(digits_teacher)
    with torch.no_grad():
        student.features[1][0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weights of 1 layer\(s\) are NaN/inf, first 'features\.1\.0'"):
        calibrate(student, [digits[0][:32]])


# ---- evaluation --------------------------------------------------------------------------------
def test_batch_stats_count_nan_outputs_as_disagreement():
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    s = torch.tensor([[float("nan"), float("nan")], [0.0, 1.0], [float("inf"), 0.0]])
    stats = batch_stats(s, t, labels=torch.tensor([0, 1, 0]))
    m = summarize(stats.double().sum(0))
    assert m["student"]["teacher_agreement"] == pytest.approx(1 / 3)
    assert m["student"]["accuracy"] == pytest.approx(1 / 3) and m["teacher"]["accuracy"] == 1.0
    assert math.isnan(m["student"]["kd_loss"])
    both_nan = summarize(batch_stats(s[:1], s[:1]).double().sum(0))
    assert both_nan["student"]["teacher_agreement"] == 0.0 and math.isnan(both_nan["student"]["kd_loss"])


def test_evaluate_reports_nan_student_honestly(digits, digits_teacher, tmp_path):
    x_tr, _, x_te, y_te = digits
    student = student_of(digits_teacher)
    calibrate(student, [x_tr[:32]])
    with torch.no_grad():
        student.fc.bias.fill_(float("nan"))
    test = datasets.Dataset.from_dict({"pixel_values": x_te[:100].numpy(), "label": y_te[:100].numpy()})
    trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(digits_teacher), args=make_args(tmp_path),
                           train_dataset=dataset_of(x_tr))
    m = trainer.evaluate(test.with_format("torch"))
    assert m["eval_teacher_agreement"] == 0.0 and m["eval_accuracy"] == 0.0
    assert m["eval_teacher_accuracy"] > 0.9
    assert math.isnan(m["eval_kd_loss"]) and math.isnan(m["eval_loss"])
    with pytest.raises(NonFiniteError, match=r"refusing to save: 1 tensor\(s\) of the student are NaN/inf, e\.g\. "
                                             r"'fc\.bias'"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_messages_name_step_cause_and_fix():
    from sqakd_hf.training.finite import FiniteGuard

    msg = FiniteGuard.message({"inputs": 7, "teacher outputs": 7, "student outputs": 9})
    assert re.search(r"in the inputs \(with it: teacher outputs\) at optimizer step 7, the first bad step; "
                     r"later also student outputs \(from step 9\)", msg), msg
    assert "Cause and fix: the training data has NaN/inf values" in msg


# ---- no host sync on the hot path --------------------------------------------------------------
def _no_sync(monkeypatch) -> None:
    """Make every tensor -> host read fail (what a CUDA sync would be), for the code run under it."""
    def fail(*args, **kwargs):
        raise AssertionError("host sync on the training hot path")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, fail)


@pytest.mark.parametrize("policy", ["error", "skip_batch"])
def test_checked_training_step_reads_nothing_back_to_the_host(digits, digits_teacher, tmp_path, monkeypatch, policy):
    x = digits[0][:64].clone()
    x[3, 0, 4, 4] = float("nan")
    student = student_of(digits_teacher)
    calibrate(student, [digits[0][:32]])
    trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(digits_teacher), args=make_args(
        tmp_path, nonfinite=policy))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    batch = {"pixel_values": x[:32]}
    with monkeypatch.context() as m:
        _no_sync(m)
        for _ in range(2):
            trainer.training_step(student, dict(batch))
    with pytest.raises(AssertionError, match="host sync"), monkeypatch.context() as m:
        _no_sync(m)
        torch.tensor(1.0).item()  # the patch is live
    seen, skipped = trainer.finite_guard.read()
    assert seen["inputs"] == 1 and skipped == (2 if policy == "skip_batch" else 0)
    if policy == "skip_batch":
        assert all_finite(student)
