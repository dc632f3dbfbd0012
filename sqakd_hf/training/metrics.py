"""Label-free evaluation of a quantized student against its teacher: one set of functions for
:class:`~sqakd_hf.SQAKDTrainer`'s evaluation loop, :func:`evaluate_models` and the benchmark.

Metrics (all averaged over samples, or over non-padding tokens of sequence outputs):

* ``kd_loss``: ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` (Hinton et al., 2015);
* ``teacher_agreement``: share of positions where ``argmax z_s == argmax z_t``;
* ``accuracy`` of the student and of the teacher, when the data has labels (``-100`` ignored;
  causal LMs compare position ``i``'s prediction with label ``i + 1``);
* ``hidden_mse``: for models without logits, ``mean_d (h_s - h_t)^2`` of the last hidden state
  instead of the three above.

A position whose logits hold a NaN/inf (student's or teacher's) counts as a disagreement and a wrong
prediction, and makes ``kd_loss`` NaN/inf: broken outputs are never reported as agreement.

:func:`batch_stats` turns one batch's outputs into per-sample sums (so a distributed loop can
gather them and drop padded duplicates), :func:`summarize` turns their total into the metrics.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..model_io import call_model, output_tensor, padding_mask, split_labels, to_device, unwrap
from .losses import hidden_state_per_position, kd_kl_per_position

__all__ = [
    "STAT_COLUMNS",
    "batches",
    "batch_stats",
    "by_model",
    "evaluate_models",
    "model_output",
    "shifts_labels",
    "summarize",
    "trainer_metrics",
]

#: the columns of :func:`batch_stats`: per-sample sums over positions
STAT_COLUMNS = ("kd", "positions", "agree", "mse", "student_correct", "teacher_correct", "labeled")
_KD, _POS, _AGREE, _MSE, _S_OK, _T_OK, _LABELED = range(len(STAT_COLUMNS))


def batches(dataset: Any, collator: Callable, batch_size: int) -> Iterable[Dict[str, Any]]:
    """Collated batches of ``dataset`` in order (map-style or iterable)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)


@functools.lru_cache(maxsize=None)
def _causal_lm_classes() -> frozenset:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def shifts_labels(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM (transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), whose position
    ``i`` predicts label ``i + 1``."""
    return type(unwrap(model)).__name__ in _causal_lm_classes()


def model_output(model: nn.Module, inputs: Dict[str, Any]) -> Tuple[Tensor, bool]:
    """``(logits, True)``, or ``(last hidden state, False)`` for a model without logits; ``inputs`` without labels."""
    out = call_model(model, inputs)
    try:
        return output_tensor(out, "logits"), True
    except ValueError:
        return output_tensor(out, "hidden_states"), False


def _finite_rows(z: Tensor) -> Tensor:
    """Positions (all dims but the last) whose outputs are all finite."""
    return torch.isfinite(z).all(-1)


def _per_sample(x: Tensor) -> Tensor:
    x = x.float()
    return x.reshape(x.shape[0], -1).sum(1) if x.dim() > 1 else x


@torch.no_grad()
def batch_stats(
    student: Optional[Tensor],
    teacher: Optional[Tensor],
    *,
    logits: bool = True,
    labels: Optional[Tensor] = None,
    weights: Optional[Tensor] = None,
    temperature: float = 4.0,
    shift_labels: bool = False,
    objective: Optional[Tensor] = None,
) -> Tensor:
    """Per-sample sums, shape ``(batch, len(STAT_COLUMNS))``, of one batch's student/teacher outputs.

    Args:
        student, teacher: logits (or hidden states when ``logits=False``), classes/features last;
            either may be ``None``.
        labels: targets (``-100`` ignored) of the same shape as ``argmax`` of the outputs.
        weights: per-position weights (the padding mask) of shape ``outputs.shape[:-1]``; ones if None.
        shift_labels: causal LMs (position ``i`` predicts label ``i + 1``).
        objective: the per-position distillation loss when already computed (the trainer's), else
            ``T^2 KL`` for logits and the MSE for hidden states.
    """
    ref = student if student is not None else teacher
    if ref is None:
        raise ValueError("batch_stats needs the student's or the teacher's outputs")
    shape = ref.shape[:-1]
    w = weights.float() if weights is not None else torch.ones(shape, device=ref.device)
    stats = torch.zeros(shape[0], len(STAT_COLUMNS), device=ref.device)
    stats[:, _POS] = _per_sample(w)
    if student is not None and teacher is not None:
        if logits:
            per = objective if objective is not None else kd_kl_per_position(student, teacher, temperature) * temperature**2
            agree = (student.argmax(-1) == teacher.argmax(-1)) & _finite_rows(student) & _finite_rows(teacher)
            stats[:, _AGREE] = _per_sample(agree.float() * w)
        else:
            mse = hidden_state_per_position(student, teacher, "mse")
            per = objective if objective is not None else mse
            stats[:, _MSE] = _per_sample(mse * w)
        # padding (w == 0) adds nothing, even NaN; a counted NaN/inf position makes the sum NaN/inf, honestly
        stats[:, _KD] = _per_sample(torch.where(w != 0, per.float() * w, 0.0))
    if labels is not None and logits:
        valid = None
        for column, z in ((_S_OK, student), (_T_OK, teacher)):
            if z is None:
                continue
            pred, lab, ww, fin = z.argmax(-1), labels, w, _finite_rows(z)
            if shift_labels and pred.dim() == 2:
                pred, lab, ww, fin = pred[:, :-1], lab[:, 1:], w[:, :-1], fin[:, :-1]
            if lab.shape != pred.shape:
                continue
            valid = (lab != -100).float() * ww
            stats[:, column] = _per_sample(((pred == lab) & fin).float() * valid)
        if valid is not None:
            stats[:, _LABELED] = _per_sample(valid)
    return stats


def summarize(
    totals: Sequence[float], *, logits: bool = True, student: bool = True, teacher: bool = True
) -> Dict[str, Dict[str, float]]:
    """Metrics ``{"student": {...}, "teacher": {...}}`` from the column sums of :func:`batch_stats`.

    Student: ``kd_loss`` and ``teacher_agreement`` (``hidden_mse`` for models without logits) when both
    models were run; ``accuracy`` when there were labels. Teacher: ``accuracy`` when there were labels.
    """
    t = [float(v) for v in (totals.tolist() if isinstance(totals, Tensor) else totals)]
    out: Dict[str, Dict[str, float]] = {}
    if student:
        out["student"] = {}
    if teacher:
        out["teacher"] = {}
    if student and teacher and t[_POS] > 0:
        if logits:
            out["student"]["kd_loss"] = t[_KD] / t[_POS]
            out["student"]["teacher_agreement"] = t[_AGREE] / t[_POS]
        else:
            out["student"]["hidden_mse"] = t[_MSE] / t[_POS]
    if logits and t[_LABELED] > 0:
        for name, column in (("student", _S_OK), ("teacher", _T_OK)):
            if name in out:
                out[name]["accuracy"] = t[column] / t[_LABELED]
    return out


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
    """Metrics ``{"student": {...}, "teacher": {...}}`` on ``dataset`` (single process, see :func:`summarize`).

    Either model may be ``None``. ``shifted_labels``: causal LMs, whose token ``i`` predicts label ``i + 1``.
    """
    device = device or torch.device("cpu")
    models = {k: m for k, m in (("student", student), ("teacher", teacher)) if m is not None}
    modes = {}
    for name, m in models.items():
        modes[name] = m.training
        m.eval().to(device)
    totals: Optional[Tensor] = None
    has_logits = True
    try:
        for batch in tqdm(batches(dataset, collator, batch_size), desc=desc, disable=not progress, leave=False):
            inputs, labels = split_labels(to_device(batch, device))
            outs = {name: model_output(m, inputs) for name, m in models.items()}
            has_logits = all(is_logits for _, is_logits in outs.values())
            first = next(iter(outs.values()))[0]
            stats = batch_stats(
                outs["student"][0] if "student" in outs else None,
                outs["teacher"][0] if "teacher" in outs else None,
                logits=has_logits, labels=labels, weights=padding_mask(inputs, first[..., 0]),
                temperature=temperature, shift_labels=shifted_labels,
            ).double().sum(0)
            totals = stats if totals is None else totals + stats
    finally:
        for name, m in models.items():
            m.train(modes[name])
    if totals is None:
        return {name: {} for name in models}
    return summarize(totals, logits=has_logits, student="student" in models, teacher="teacher" in models)


#: Trainer metric (without the prefix) -> (model, metric) in the ``{"student": ..., "teacher": ...}`` form
_TRAINER_KEYS = {
    "accuracy": ("student", "accuracy"),
    "teacher_agreement": ("student", "teacher_agreement"),
    "kd_loss": ("student", "kd_loss"),
    "hidden_mse": ("student", "hidden_mse"),
    "teacher_accuracy": ("teacher", "accuracy"),
}


def trainer_metrics(metrics: Dict[str, Dict[str, float]], prefix: str = "eval") -> Dict[str, float]:
    """:func:`summarize`'s ``{"student": ..., "teacher": ...}`` as flat Trainer metrics (``eval_kd_loss``, ...);
    the inverse of :func:`by_model`."""
    flat = {}
    for key, (model, name) in _TRAINER_KEYS.items():
        if name in metrics.get(model, {}):
            flat[f"{prefix}_{key}"] = metrics[model][name]
    return flat


def by_model(metrics: Dict[str, float], prefix: str = "eval") -> Dict[str, Dict[str, float]]:
    """``SQAKDTrainer.evaluate()``'s flat metrics (``eval_accuracy``, ``eval_teacher_accuracy``, ...) in the
    ``{"student": {...}, "teacher": {...}}`` form that :func:`evaluate_models` returns for a student and a
    teacher. For models without logits the student's entry is ``hidden_mse`` (as :func:`evaluate_models`), not
    the trainer's ``eval_kd_loss`` (its hidden-state training objective)."""
    out: Dict[str, Dict[str, float]] = {"student": {}, "teacher": {}}
    hidden = metrics.get(f"{prefix}_hidden_mse") is not None
    for key, (model, name) in _TRAINER_KEYS.items():
        value = metrics.get(f"{prefix}_{key}")
        if value is not None and not (hidden and key == "kd_loss"):
            out[model][name] = float(value)
    return out
