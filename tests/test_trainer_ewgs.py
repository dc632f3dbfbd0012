"""EWGS delta from the Hessian trace of the KD loss (Lee et al., CVPR 2021, Sec. 3.3), checked in closed form."""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from torch import nn

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, calibrate, kd_kl_loss, quantize_model
from sqakd_hf.training.ewgs_schedule import estimate_ewgs_deltas, ewgs_quantizers


def test_hutchinson_delta_matches_closed_form():
    """One EWGS Linear feeding the KD loss: L = T^2/B sum_b KL(p_b || softmax(W_q y_b / T)).

    Hessian w.r.t. the logits of sample b: (1/B)(diag(q_b) - q_b q_b^T). Hence, on the [0, 1] latent scale
    (output = c + a * x_q): activations Tr = a^2 sum_b tr(W_q^T H_b W_q); weights Tr = sum_b sum_i a_i^2 H_b[i,i] |y_b|^2;
    delta = (Tr / N) / (3 std(a * g)).
    """
    torch.manual_seed(0)
    B, T = 6, 2.0
    model = quantize_model(nn.Sequential(nn.Linear(4, 3)),
                           QuantConfig(method="ewgs", weight_bits=4, act_bits=4, modules_to_not_convert=[]))
    x = torch.randn(B, 4)
    calibrate(model, [x])
    teacher_logits = 2 * torch.randn(B, 3)
    layer = model[0]
    aq, wq = layer.input_quantizer, layer.weight_quantizer
    with torch.no_grad():
        y, w = aq(x), wq(layer.weight)
        z = y @ w.T + layer.bias
        q, p = torch.softmax(z / T, -1), torch.softmax(teacher_logits / T, -1)
        H = (torch.diag_embed(q) - q[:, :, None] * q[:, None, :]) / B  # (B, 3, 3)
        gz = (T / B) * (q - p)
        a_act = (aq.upper - aq.lower)
        a_w = 2 * wq.out_scale  # (3, 1)
        tr_act = a_act**2 * torch.einsum("ij,bik,kl->bjl", w, H, w).diagonal(dim1=1, dim2=2).sum()
        tr_w = (a_w.squeeze(1) ** 2 * H.diagonal(dim1=1, dim2=2) * y.square().sum(1, keepdim=True)).sum()
        g_act, g_w = a_act * (gz @ w), a_w * (gz.T @ y)
        expected = {
            "0.input_quantizer": (tr_act / y.numel() / (3 * g_act.std())).item(),
            "0.weight_quantizer": (tr_w / w.numel() / (3 * g_w.std())).item(),
        }

    deltas = estimate_ewgs_deltas(model, lambda: kd_kl_loss(model(x), teacher_logits, T), num_samples=3000, seed=0)
    print(f"\nEWGS delta: closed form {expected}, Hutchinson (3000 probes) {deltas}")
    assert deltas.keys() == expected.keys()
    for k in expected:
        assert expected[k] > 0
        assert deltas[k] == pytest.approx(expected[k], rel=0.05), k
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


def test_trainer_schedule_sets_deltas_and_leaves_state_alone(digits, digits_teacher, tmp_path):
    """In train mode (BN batch statistics), as the EWGS authors' code; with a trained teacher the traces are positive.
    (For an untrained random teacher BN's scale invariance can make them negative; delta is then clipped to 0.)"""
    x_tr, _, _, _ = digits
    teacher = copy.deepcopy(digits_teacher)
    student = quantize_model(copy.deepcopy(teacher).requires_grad_(True).train(),
                             QuantConfig(method="ewgs", weight_bits=2, act_bits=2))
    ds = datasets.Dataset.from_dict({"pixel_values": x_tr[:96].numpy()}).with_format("torch")
    args = SQAKDTrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, save_strategy="no",
                                  disable_tqdm=True, per_device_train_batch_size=32, max_steps=5, seed=0,
                                  ewgs_delta_schedule="hessian", ewgs_delta_update_steps=2, ewgs_hessian_samples=4)
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds)
    trainer.prepare_student()
    batch = {"pixel_values": x_tr[:32]}
    buffers = {n: b.clone() for n, b in student.named_buffers() if "delta" not in n}
    rng = torch.get_rng_state()
    d1 = trainer.update_ewgs_deltas(batch)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(b, buffers[n]) for n, b in student.named_buffers() if n in buffers)  # BN stats restored
    assert all(p.grad is None for p in student.parameters())
    assert len(d1) == len(ewgs_quantizers(student)) and all(v > 0 for v in d1.values())
    for name, q in ewgs_quantizers(student):
        assert float(q.delta) == pytest.approx(d1[name])
    # deterministic for a given state (downstream deltas shape upstream gradients, so reset them first)
    for _, q in ewgs_quantizers(student):
        q.delta.fill_(1e-3)
    assert trainer.update_ewgs_deltas(batch) == d1

    updates = []
    real = trainer.update_ewgs_deltas
    trainer.update_ewgs_deltas = lambda inputs: updates.append(trainer.state.global_step) or real(inputs)
    trainer.train()
    assert updates == [0, 2, 4]
    print(f"\nEWGS W2A2 deltas at step 4: {sorted(round(v, 4) for v in trainer.ewgs_deltas.values())}")
