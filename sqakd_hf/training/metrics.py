"""Label-free evaluation of a quantized student against its teacher (single process).

:func:`evaluate_models` runs both models over a dataset and reports the KD loss
(``T^2 KL(teacher || student)``, mean over samples or non-padding tokens), the teacher
agreement (share of samples/tokens where the argmaxes agree) and, when the data has labels,
the accuracy of the student and of the teacher. Models without logits are compared on
their last hidden state (mean squared error) instead.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model_io import call_model, output_tensor, split_labels, to_device
from .losses import hidden_state_per_position, kd_kl_per_position

__all__ = ["evaluate_models", "evaluate_model", "batches"]


def batches(dataset: Any, collator: Callable, batch_size: int) -> Iterable[Dict[str, Any]]:
    """Collated batches of ``dataset`` in order (map-style or iterable)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    return loader


def _logits_or_hidden(model: nn.Module, inputs: Dict[str, Any], who: str):
    out = call_model(model, inputs)
    try:
        return output_tensor(out, "logits", who), True
    except ValueError:
        return output_tensor(out, "hidden_states", who), False


@torch.no_grad()
def evaluate_models(
    student: Optional[nn.Module],
    teacher: Optional[nn.Module],
    dataset: Any,
    collator: Callable,
    batch_size: int = 64,
    temperature: float = 4.0,
    device: Optional[torch.device] = None,
    shifted_labels: bool = False,
    desc: str = "Evaluating",
    progress: bool = True,
) -> Dict[str, Dict[str, float]]:
    """Metrics ``{"student": {...}, "teacher": {...}}`` on ``dataset``.

    Student: ``kd_loss`` and ``teacher_agreement`` (need the teacher), ``accuracy`` (needs labels).
    Teacher: ``accuracy`` (needs labels). Either model may be ``None``. ``shifted_labels``: causal
    LMs, whose token ``i`` predicts label ``i + 1``.
    """
    device = device or torch.device("cpu")
    models = {k: m for k, m in (("student", student), ("teacher", teacher)) if m is not None}
    modes = {}
    for name, m in models.items():
        modes[name] = m.training
        m.eval().to(device)
    totals = {"kd": 0.0, "positions": 0.0, "agree": 0.0, "s_correct": 0.0, "t_correct": 0.0, "labeled": 0.0}
    has_logits = True
    try:
        for batch in tqdm(batches(dataset, collator, batch_size), desc=desc, disable=not progress, leave=False):
            inputs, labels = split_labels(to_device(batch, device))
            outs = {name: _logits_or_hidden(m, inputs, name) for name, m in models.items()}
            has_logits = all(is_logits for _, is_logits in outs.values())
            mask = inputs.get("attention_mask")
            first = next(iter(outs.values()))[0]
            w = mask.float() if isinstance(mask, torch.Tensor) and first.dim() == 3 and mask.shape == first.shape[:2] \
                else torch.ones(first.shape[:-1], device=first.device)
            if "student" in outs and "teacher" in outs:
                s, t = outs["student"][0], outs["teacher"][0]
                if has_logits:
                    per = kd_kl_per_position(s, t, temperature) * temperature**2
                    totals["agree"] += float(((s.argmax(-1) == t.argmax(-1)).float() * w).sum())
                else:
                    per = hidden_state_per_position(s, t, "mse")
                totals["kd"] += float((per * w).sum())
            totals["positions"] += float(w.sum())
            if labels is not None and has_logits:
                valid_labels = labels
                for name, (z, _) in outs.items():
                    pred = z.argmax(-1)
                    lab = valid_labels
                    ww = w
                    if shifted_labels and pred.dim() == 2:
                        pred, lab, ww = pred[:, :-1], lab[:, 1:], w[:, :-1]
                    if lab.shape != pred.shape:
                        continue
                    valid = (lab != -100).float() * ww
                    totals["s_correct" if name == "student" else "t_correct"] += float(((pred == lab).float() * valid).sum())
                    if name == next(iter(outs)):
                        totals["labeled"] += float(valid.sum())
    finally:
        for name, m in models.items():
            m.train(modes[name])
    out: Dict[str, Dict[str, float]] = {name: {} for name in models}
    if "student" in out and "teacher" in out and totals["positions"]:
        key = "kd_loss" if has_logits else "hidden_mse"
        out["student"][key] = totals["kd"] / totals["positions"]
        if has_logits:
            out["student"]["teacher_agreement"] = totals["agree"] / totals["positions"]
    if totals["labeled"]:
        for name in out:
            out[name]["accuracy"] = totals["s_correct" if name == "student" else "t_correct"] / totals["labeled"]
    return out


def evaluate_model(model: nn.Module, dataset: Any, collator: Callable, batch_size: int = 64, **kwargs: Any) -> Dict[str, float]:
    """Accuracy of one model (needs labels), as ``{"accuracy": ...}``."""
    return evaluate_models(None, model, dataset, collator, batch_size, **kwargs)["teacher"]


#: Trainer metric (without the prefix) -> (model, metric) in the ``{"student": ..., "teacher": ...}`` form
_TRAINER_KEYS = {
    "accuracy": ("student", "accuracy"),
    "teacher_agreement": ("student", "teacher_agreement"),
    "kd_loss": ("student", "kd_loss"),
    "hidden_mse": ("student", "hidden_mse"),
    "teacher_accuracy": ("teacher", "accuracy"),
}


def by_model(metrics: Dict[str, float], prefix: str = "eval") -> Dict[str, Dict[str, float]]:
    """``SQAKDTrainer.evaluate()``'s flat metrics (``eval_accuracy``, ``eval_teacher_accuracy``, ...) in the
    ``{"student": {...}, "teacher": {...}}`` form that :func:`evaluate_models` returns."""
    out: Dict[str, Dict[str, float]] = {"student": {}, "teacher": {}}
    for key, (model, name) in _TRAINER_KEYS.items():
        value = metrics.get(f"{prefix}_{key}")
        if value is not None:
            out[model][name] = float(value)
    return {k: v for k, v in out.items() if v}
