"""Teacher-output cache (cache_teacher_outputs): the top-k loss, equality with the uncached run, no teacher
forward after the build, reuse on resume, and the refusals (fingerprint mismatch, random data)."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, kd_kl_per_position, quantize_model
from sqakd_hf.errors import DataError, InputError
from sqakd_hf.training.losses import kd_kl_topk_per_position
from sqakd_hf.training.teacher_cache import MANIFEST_NAME, CachedTeacherCollator, IndexedDataset, mmap_safetensors

SEQ, VOCAB = 24, 96


# ---- the top-k loss ------------------------------------------------------------------------------------------
def _topk(t: torch.Tensor, k: int, T: float):
    lp = torch.log_softmax(t / T, -1)
    v, i = lp.topk(k, -1)
    return i, v, torch.logsumexp(lp.scatter(-1, i, float("-inf")), -1)


def test_topk_loss_is_exact_for_k_classes_minus_one_and_a_lower_bound():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5, 40, dtype=torch.float64), 3 * torch.randn(4, 5, 40, dtype=torch.float64)
    full = kd_kl_per_position(s, t, 2.0)
    exact = kd_kl_topk_per_position(s, *_topk(t, 39, 2.0), 2.0)
    torch.testing.assert_close(exact, full, rtol=1e-12, atol=1e-12)
    for k in (1, 5, 20):
        approx = kd_kl_topk_per_position(s, *_topk(t, k, 2.0), 2.0)
        assert bool((approx <= full + 1e-12).all()) and bool((approx >= 0).all())


def test_topk_loss_equals_full_kl_when_the_rest_follows_the_student():
    """The documented approximation is exact when the teacher's mass outside K is shaped like the student's."""
    torch.manual_seed(1)
    s = torch.randn(6, 30, dtype=torch.float64)
    q = torch.softmax(s / 3.0, -1)
    idx = torch.randperm(30)[:7].expand(6, 7)
    rest = torch.ones(6, 30, dtype=torch.bool).scatter(-1, idx, False)
    p = torch.where(rest, q * 0.4 / (q * rest).sum(-1, keepdim=True), 0.0)
    p = p.scatter(-1, idx, torch.softmax(torch.randn(6, 7, dtype=torch.float64), -1) * 0.6)
    t = p.log() * 3.0  # teacher logits whose softmax at T=3 is p
    got = kd_kl_topk_per_position(s, idx, p.log().gather(-1, idx), torch.full((6,), 0.4, dtype=torch.float64).log(), 3.0)
    torch.testing.assert_close(got, kd_kl_per_position(s, t, 3.0), rtol=1e-10, atol=1e-12)


def test_topk_loss_gradients_match_autograd_and_double_backward():
    torch.manual_seed(2)
    s = torch.randn(3, 4, 25, dtype=torch.float64, requires_grad=True)
    idx, lp, lr = _topk(2 * torch.randn(3, 4, 25, dtype=torch.float64), 6, 1.5)
    w = torch.randn(3, 4, dtype=torch.float64)
    got, = torch.autograd.grad((kd_kl_topk_per_position(s, idx, lp, lr, 1.5) * w).sum(), s)
    log_q = torch.log_softmax(s / 1.5, -1)
    log_rest = torch.logsumexp(log_q.scatter(-1, idx, float("-inf")), -1)
    ref = (lp.exp() * (lp - log_q.gather(-1, idx))).sum(-1) + lr.exp() * (lr - log_rest)
    want, = torch.autograd.grad((ref * w).sum(), s)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda x: kd_kl_topk_per_position(x, idx, lp, lr, 1.5), (s,))
    with pytest.raises(ValueError, match="top-k teacher tensors do not match"):
        kd_kl_topk_per_position(s, idx[..., :3], lp, lr, 1.5)


# ---- fixtures ------------------------------------------------------------------------------------------------
class Calls(TrainerCallback):
    """Teacher forwards counted per epoch (a forward hook on the teacher)."""

    def __init__(self, teacher: nn.Module) -> None:
        self.n, self.per_epoch, self._start = 0, [], 0
        self._hook = teacher.register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))

    def on_epoch_begin(self, args, state, control, **kw):
        self._start = self.n

    def on_epoch_end(self, args, state, control, **kw):
        self.per_epoch.append(self.n - self._start)

    def on_train_end(self, args, state, control, **kw):
        self._hook.remove()


def _args(out, **kw) -> SQAKDTrainingArguments:
    base = dict(output_dir=str(out), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                logging_steps=1, per_device_train_batch_size=16, per_device_eval_batch_size=16, calibration_batches=1,
                train_sampling_strategy="sequential", learning_rate=1e-3, lr_scheduler_type="constant")
    base.update(kw)
    return SQAKDTrainingArguments(**base)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def mlp_teacher(digits):
    x, y, _, _ = digits
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(5):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits_ds(digits):
    return datasets.Dataset.from_dict({"pixel_values": digits[0][:96].numpy()}).with_format("torch")


def _student(teacher: nn.Module) -> nn.Module:
    return quantize_model(copy.deepcopy(teacher).train().requires_grad_(True), QuantConfig(method="lsq", weight_bits=4, act_bits=4,
                                                                      modules_to_not_convert=[]))


def _train(teacher, student, ds, out, **kw):
    calls = Calls(teacher)
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, train_dataset=ds, args=_args(out, **kw),
                           callbacks=[calls])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer, calls, losses


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))


@pytest.fixture(scope="module")
def lm_data():
    """Right-padded token rows of varying length (pad id 0), so cached rows must follow the attention mask."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(SEQ // 3, SEQ + 1, (48,), generator=g)
    ids = torch.randint(1, VOCAB, (48, SEQ), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    return datasets.Dataset.from_dict({"input_ids": (ids * mask).numpy(), "attention_mask": mask.numpy()}
                                      ).with_format("torch")


# ---- classifiers: full logits, bit-for-bit the uncached run ------------------------------------------------------
def test_classifier_cache_equals_uncached_run_and_skips_the_teacher(mlp_teacher, digits_ds, tmp_path):
    student = _student(mlp_teacher)
    ref_student = copy.deepcopy(student)
    trainer, calls, losses = _train(mlp_teacher, student, digits_ds, tmp_path / "cached", num_train_epochs=2,
                                    cache_teacher_outputs=True)
    _, ref_calls, ref_losses = _train(mlp_teacher, ref_student, digits_ds, tmp_path / "plain", num_train_epochs=2)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0) and len(losses) == 12
    for (k, a), b in zip(student.state_dict().items(), ref_student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    assert calls.per_epoch == [0, 0] and ref_calls.per_epoch == [6, 6]
    # one forward per build batch (96 / 16) plus the pre-training output check
    assert calls.n == 6 + 1
    record = json.loads((tmp_path / "cached" / "_teacher_cache" / MANIFEST_NAME).read_text())
    assert record["layout"]["mode"] == "full" and record["samples"] == 96
    shard = mmap_safetensors(tmp_path / "cached" / "_teacher_cache" / record["shards"][0])
    with torch.no_grad():
        torch.testing.assert_close(shard["outputs"], mlp_teacher(digits_ds[:]["pixel_values"]))
    assert trainer.teacher_cache is not None


def test_resume_reuses_the_cache(mlp_teacher, digits_ds, tmp_path):
    out = tmp_path / "run"
    _train(mlp_teacher, _student(mlp_teacher), digits_ds, out, max_steps=4, save_strategy="steps", save_steps=2,
           cache_teacher_outputs=True)
    manifest = out / "_teacher_cache" / MANIFEST_NAME
    stamps = {p.name: p.stat().st_mtime_ns for p in manifest.parent.iterdir()}
    student = _student(mlp_teacher)
    calls = Calls(mlp_teacher)  # after the copy: a deepcopy would copy the hook
    trainer = SQAKDTrainer(model=student, teacher_model=mlp_teacher, train_dataset=digits_ds,
                           args=_args(out, max_steps=8, save_strategy="no", cache_teacher_outputs=True),
                           callbacks=[calls])
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert trainer.state.global_step == 8
    assert calls.n == 1  # the pre-training output check only: no rebuild, no per-step teacher
    assert {p.name: p.stat().st_mtime_ns for p in manifest.parent.iterdir()} == stamps


def test_fingerprint_mismatch_is_an_error(mlp_teacher, digits_ds, tmp_path):
    out = tmp_path / "run"
    _train(mlp_teacher, _student(mlp_teacher), digits_ds, out, max_steps=1, cache_teacher_outputs=True)
    other = copy.deepcopy(mlp_teacher)
    with torch.no_grad():
        other[1].weight.add_(1e-3)
    with pytest.raises(InputError, match=r"does not match this run: the teacher's weights .*delete .*teacher_cache"):
        _train(other, _student(other), digits_ds, out, max_steps=1, cache_teacher_outputs=True)
    changed = digits_ds.select(range(1, 96))
    with pytest.raises(InputError, match="the training data"):
        _train(mlp_teacher, _student(mlp_teacher), changed, out, max_steps=1, cache_teacher_outputs=True)
    # another folder is another cache
    _train(other, _student(other), changed, out, max_steps=1, cache_teacher_outputs=True,
           teacher_cache_dir=str(tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / MANIFEST_NAME).is_file()


class NoisyDigits(torch.utils.data.Dataset):
    """Random augmentation done inside __getitem__ (no transform attribute to spot)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i] + 0.05 * torch.randn_like(self.x[i])}


class RandomFlip:
    def __call__(self, x):
        return x


class WithTransform(NoisyDigits):
    transform = RandomFlip()

    def __getitem__(self, i):
        return {"pixel_values": self.transform(self.x[i])}


def test_random_data_is_refused(mlp_teacher, digits, tmp_path):
    x = digits[0][:64]
    with pytest.raises(DataError, match="reading the same samples twice gave different 'pixel_values'"):
        _train(mlp_teacher, _student(mlp_teacher), NoisyDigits(x), tmp_path / "a", max_steps=1,
               cache_teacher_outputs=True)
    with pytest.raises(DataError, match="random transform attached"):
        _train(mlp_teacher, _student(mlp_teacher), WithTransform(x), tmp_path / "b", max_steps=1,
               cache_teacher_outputs=True)
    stream = datasets.Dataset.from_dict({"pixel_values": x.numpy()}).to_iterable_dataset().with_format("torch")
    with pytest.raises(InputError, match="map-style train_dataset"):
        _train(mlp_teacher, _student(mlp_teacher), stream, tmp_path / "c", max_steps=1, cache_teacher_outputs=True)
    with pytest.raises(ValueError, match="teacher_cache_top_k must be an integer >= 1"):
        _args(tmp_path, teacher_cache_top_k=0)


# ---- causal LM: per-token rows at the attention mask's positions --------------------------------------------------
def _lm_student(teacher):
    return quantize_model(copy.deepcopy(teacher).train().requires_grad_(True), QuantConfig(method="lsq", weight_bits=4, act_bits=4))


def test_lm_full_cache_equals_uncached_run(lm_data, tmp_path):
    teacher = _llama().eval()
    student = _lm_student(teacher)
    ref_student = copy.deepcopy(student)
    kw = dict(max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-3)
    _, calls, losses = _train(teacher, student, lm_data, tmp_path / "c", cache_teacher_outputs=True,
                              teacher_cache_top_k=VOCAB, **kw)
    _, _, ref = _train(teacher, ref_student, lm_data, tmp_path / "p", **kw)
    assert losses == pytest.approx(ref, rel=1e-5)
    for (k, a), b in zip(student.state_dict().items(), ref_student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert calls.n == 6 + 1  # 48 / 8 build batches + the output check


def test_lm_topk_cache_matches_full_kl_within_tolerance(lm_data, tmp_path):
    """Top-k rows (k = 16 of 96 tokens) of a peaked teacher: loss and gradients within a few percent of the full KL."""
    teacher = _llama()
    with torch.no_grad():  # a confident teacher, as trained LMs are (random init is near-uniform)
        teacher.lm_head.weight.mul_(40)  # top-1 p ~0.55, mass outside the top-16 ~1%
    teacher.eval()
    student = _lm_student(teacher)
    kw = dict(max_steps=1, per_device_train_batch_size=8, per_device_eval_batch_size=8, temperature=1.0,
              cache_teacher_outputs=True, teacher_cache_top_k=16)
    trainer, calls, _ = _train(teacher, student, lm_data, tmp_path / "k", **kw)
    record = json.loads((tmp_path / "k" / "_teacher_cache" / MANIFEST_NAME).read_text())
    assert record["layout"]["mode"] == "topk" and record["fingerprint"]["top_k"] == 16
    collate = CachedTeacherCollator(trainer.data_collator, trainer.teacher_cache)
    batch = collate([IndexedDataset(lm_data)[i] for i in range(16, 24)])
    assert {"sqakd_teacher_topk_indices", "sqakd_teacher_rest_log_mass"} <= set(batch)
    plain = {k: v for k, v in batch.items() if not k.startswith("sqakd_")}
    student.zero_grad()
    cached = trainer.compute_loss(student, batch)
    cached.backward()
    g_cached = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    student.zero_grad()
    full = trainer.compute_loss(student, plain)
    full.backward()
    g_full = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    rel_loss = abs(cached.item() - full.item()) / full.item()
    rel_grad = ((g_cached - g_full).norm() / g_full.norm()).item()
    print(f"\ntop-16 of {VOCAB}: loss {cached.item():.5f} vs full {full.item():.5f} (rel {rel_loss:.2e}); "
          f"gradient rel. error {rel_grad:.2e}")
    assert cached.item() <= full.item() + 1e-6 and rel_loss < 0.03 and rel_grad < 0.05
    # another k, or another temperature, is another cache
    with pytest.raises(InputError, match=r"teacher_cache_top_k \(16 cached, 8 now\)"):
        _train(teacher, _lm_student(teacher), lm_data, tmp_path / "k", **{**kw, "teacher_cache_top_k": 8})
    with pytest.raises(InputError, match="temperature"):
        _train(teacher, _lm_student(teacher), lm_data, tmp_path / "k", **{**kw, "temperature": 2.0})


def test_shards_are_memory_mapped_in_every_dtype_and_the_reader_pickles(tmp_path):
    """bf16 rows (a bf16 teacher on GPU) read back bit-exactly; a reader sent to a data-loader worker re-maps."""
    import pickle

    from sqakd_hf.training.teacher_cache import TeacherCache, read_manifest, write_manifest, write_shard

    g = torch.Generator().manual_seed(0)
    rows = {"outputs": torch.randn(10, 7, generator=g).bfloat16(), "sample_index": torch.tensor([4, 0, 2, 3, 1]),
            "offsets": torch.tensor([0, 2, 4, 6, 8, 10])}
    write_shard(tmp_path, 0, 1, rows)
    write_manifest(tmp_path, {}, {"mode": "full", "width": 7, "masked": False, "sample_shape": [2], "dtype": "bfloat16"},
                   ["rows-00000-of-00001.safetensors"], 5)
    assert torch.equal(mmap_safetensors(tmp_path / "rows-00000-of-00001.safetensors")["outputs"], rows["outputs"])
    reader = TeacherCache(tmp_path, read_manifest(tmp_path))
    got = reader.lookup(torch.tensor([0, 4]))["outputs"]
    assert got.dtype == torch.bfloat16 and got.shape == (2, 2, 7)
    assert torch.equal(got[0], rows["outputs"][2:4]) and torch.equal(got[1], rows["outputs"][0:2])
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._shards is None and torch.equal(clone.lookup(torch.tensor([0, 4]))["outputs"], got)
    with pytest.raises(DataError, match="not in the teacher-output cache of 5 samples"):
        reader.lookup(torch.tensor([5]))


def test_a_changed_sample_is_a_dataset_mismatch(mlp_teacher, digits_ds, tmp_path):
    out = tmp_path / "run"
    _train(mlp_teacher, _student(mlp_teacher), digits_ds, out, max_steps=1, cache_teacher_outputs=True)
    x = digits_ds[:]["pixel_values"].clone()
    x[0] += 0.5  # same length, one sample changed (sample 0 is always hashed)
    changed = datasets.Dataset.from_dict({"pixel_values": x.numpy()}).with_format("torch")
    with pytest.raises(InputError, match="the training data"):
        _train(mlp_teacher, _student(mlp_teacher), changed, out, max_steps=1, cache_teacher_outputs=True)
