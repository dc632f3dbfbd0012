"""`SQAKDTrainer`: label-free quantization-aware training by distillation from the FP teacher.

A `transformers.Trainer` whose loss is the teacher's softened KL (METHOD.md §2), with:

* a frozen teacher (eval mode, no grad, placed by accelerate; bf16/fp16 on GPU when asked);
* calibration of the quantizers on training data right before the training loop starts
  (after a checkpoint is loaded, before DDP wraps the model), skipped when every quantizer
  is already initialised (a quantized checkpoint, a resume);
* a teacher/student output check on the first batch, before any step;
* a separate optimizer group for quantizer parameters (own lr, no weight decay by default);
* label-free evaluation: ``eval_kd_loss`` and ``eval_teacher_agreement`` (plus
  ``eval_accuracy`` when labels exist);
* optionally EWGS's Hessian-based delta schedule (see :mod:`.ewgs_schedule`).

Loss reduction: the KD loss of a micro-batch is its mean over samples (or non-padding tokens);
``loss_is_scaled_for_ga = False`` lets the Trainer divide by the accumulation steps once. Under
DDP with ``average_tokens_across_devices`` the denominator is the micro-batch's global count
(all-reduced), so gradients and the logged loss equal those of one process on the global batch.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import has_length

from ..calibration import calibrate
from ..checkpoint import load_teacher, save_quantized
from ..hub.card_info import write_model_card
from ..hub.push import push_to_hub as push_quantized_to_hub
from ..injection import is_quantized, quant_layers, quantizer_parameters, named_quantizers
from ..model_io import LABEL_KEYS, POSITIONAL_KEYS, call_model, forward_params, output_tensor
from ..model_io import unwrap as _core
from .args import SQAKDTrainingArguments
from .ewgs_schedule import all_reduce_deltas, apply_ewgs_deltas, estimate_ewgs_deltas, ewgs_quantizers
from .losses import hidden_state_per_position, kd_kl_per_position

try:
    from transformers.trainer_optimizer import is_optimizer_factory
except ImportError:  # older transformers 5.x: no optimizer factories

    def is_optimizer_factory(optimizer_cls: Any) -> bool:
        return False


logger = logging.getLogger(__name__)

@dataclass
class _Distill:
    """One distillation forward: per-position losses and what evaluation needs."""

    per_position: Tensor
    mask: Optional[Tensor]
    student: Tensor
    teacher: Tensor
    outputs: Any
    labels: Optional[Tensor]


class SQAKDTrainer(Trainer):
    """Trainer for SQAKD: the student (a model with fake-quant layers) learns from the teacher only.

    Args:
        model: the student, built with :func:`~sqakd_hf.quantize_model` or loaded with
            ``quantization_config=QuantConfig(...)``.
        args: :class:`~sqakd_hf.SQAKDTrainingArguments`.
        teacher_model: the FP teacher, an ``nn.Module`` or a local path / Hub id (loaded with
            the student's class, timm for timm-native students, else ``AutoModel``).
        *trainer_args, **kwargs: every other `transformers.Trainer` argument.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Optional[SQAKDTrainingArguments] = None,
        *trainer_args: Any,
        teacher_model: Union[nn.Module, str, os.PathLike, None] = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SQAKDTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, SQAKDTrainingArguments):
            raise TypeError(
                f"SQAKDTrainer needs SQAKDTrainingArguments (temperature, kd/ce weights, quantizer lr, ...); "
                f"got {type(args).__name__}"
            )
        if teacher_model is None:
            raise ValueError("SQAKDTrainer needs teacher_model: the full-precision model the student distills from")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "SQAKDTrainer computes its own loss (KD, plus ce_weight * the model's label loss): compute_loss_func "
                "would be ignored; subclass SQAKDTrainer and override compute_loss instead"
            )
        if model is not None:
            self._check_student(model, args)
        train_dataset = kwargs.get("train_dataset", trainer_args[1] if len(trainer_args) > 1 else None)
        self._check_train_dataset(train_dataset)
        teacher = load_teacher(teacher_model, model)
        #: what the model card names as base_model: the teacher's path / Hub id, or the teacher itself
        self.teacher_ref: Any = teacher_model if isinstance(teacher_model, (str, os.PathLike)) else teacher
        if teacher is model:
            raise ValueError("teacher_model is the student itself: pass a separate full-precision copy")
        if is_quantized(teacher):
            raise ValueError("teacher_model contains fake-quant layers: the teacher must be the full-precision model")
        super().__init__(model, args, *trainer_args, **kwargs)
        # our compute_loss never hands num_items_in_batch to the model: keep the Trainer from counting label
        # tokens for it and (in transformers < 5.2x) from skipping its division by the accumulation steps
        self.model_accepts_loss_kwargs = False
        if model is None:  # model_init
            self._check_student(self.model, args)
        self.teacher = self._prepare_teacher(teacher)
        self._eval_totals: Optional[Tensor] = None
        self._checked_model_id: Optional[int] = None
        self._last_delta_step = -1
        #: latest EWGS deltas set by the Hessian schedule, by quantizer name
        self.ewgs_deltas: Dict[str, float] = {}

    # ---- validation ------------------------------------------------------------------------
    @staticmethod
    def _check_student(model: nn.Module, args: SQAKDTrainingArguments) -> None:
        if not is_quantized(_core(model)):
            raise ValueError(
                "the student has no quantizers (no fake-quant layers): build it with "
                "sqakd_hf.quantize_model(model, QuantConfig(method='lsq', weight_bits=4, act_bits=4)) or load it with "
                "from_pretrained(..., quantization_config=QuantConfig(...))"
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "the student has no trainable parameters (requires_grad is False everywhere; was it copied from a "
                "frozen teacher?): call student.requires_grad_(True)"
            )
        frozen = [n for n, layer in quant_layers(_core(model)) if not layer.weight.requires_grad]
        if frozen:
            logger.warning(
                "%d quantized layers have frozen weights (requires_grad=False; copied from a frozen teacher?), e.g. "
                "%s: only their quantizer parameters will train; call student.requires_grad_(True) to train them",
                len(frozen), frozen[0],
            )
        if args.ewgs_delta_schedule == "hessian" and not ewgs_quantizers(_core(model)):
            raise ValueError("ewgs_delta_schedule='hessian' needs EWGS quantizers: use QuantConfig(method='ewgs', ...)")

    @staticmethod
    def _check_train_dataset(dataset: Any) -> None:
        if dataset is not None and has_length(dataset) and len(dataset) == 0:
            raise ValueError("train_dataset is empty: SQAKD needs (unlabeled) training inputs to distill on")

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.requires_grad_(False)
        teacher.eval()
        if getattr(getattr(teacher, "config", None), "use_cache", None):
            teacher.config.use_cache = False  # no KV cache to build on every training forward
        if self.args.device.type == "cuda" and (self.args.bf16 or self.args.fp16):
            teacher.to(torch.bfloat16 if self.args.bf16 else torch.float16)
        teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        # the teacher is not a model the Trainer trains, saves or evaluates: keep it out of accelerate's list
        # (evaluation_loop prepares the student only when that list is empty)
        if teacher in self.accelerator._models:
            self.accelerator._models.remove(teacher)
        return teacher.eval()

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if not isinstance(_core(self.model), PreTrainedModel):  # timm-native forward(x): keep image columns
            self._signature_columns += [k for k in ("pixel_values", "x") if k not in self._signature_columns]

    # ---- the distillation forward ----------------------------------------------------------
    @staticmethod
    def _split_labels(inputs: Mapping) -> Tuple[Dict[str, Any], Optional[Tensor]]:
        labels = next((inputs[k] for k in LABEL_KEYS if inputs.get(k) is not None), None)
        return {k: v for k, v in inputs.items() if k not in LABEL_KEYS}, labels

    def _extra_kwargs(self) -> Dict[str, Any]:
        return {"output_hidden_states": True} if self.args.distill_target == "hidden_states" else {}

    @torch.no_grad()
    def teacher_outputs(self, model_inputs: Mapping) -> Any:
        """The teacher's outputs on a batch (eval mode, no grad)."""
        if self.teacher.training:
            self.teacher.eval()
        return call_model(self.teacher, model_inputs, **self._extra_kwargs())

    def _distill(self, model: nn.Module, inputs: Mapping, with_ce_labels: bool = False) -> _Distill:
        model_inputs, labels = self._split_labels(inputs)
        target = self.args.distill_target
        t = output_tensor(self.teacher_outputs(model_inputs), target, "teacher")
        extra = self._extra_kwargs()
        if with_ce_labels and labels is not None and isinstance(_core(model), PreTrainedModel):
            extra["labels"] = labels
        outputs = call_model(model, model_inputs, **extra)
        s = output_tensor(outputs, target, "student")
        if s.shape != t.shape:
            raise ValueError(self._mismatch_message(s, t))
        if target == "logits":
            per = kd_kl_per_position(s, t, self.args.temperature) * (self.args.temperature**2)
        else:
            per = hidden_state_per_position(s, t, self.args.hidden_loss)
        return _Distill(per, self._padding_mask(model_inputs, per), s, t, outputs, labels)

    @staticmethod
    def _padding_mask(model_inputs: Mapping, per_position: Tensor) -> Optional[Tensor]:
        """Sequence outputs: the attention mask marks the positions that count (padding does not)."""
        mask = model_inputs.get("attention_mask")
        if per_position.dim() >= 2 and isinstance(mask, Tensor) and mask.shape == per_position.shape:
            return mask.to(per_position.dtype)
        return None

    def _mismatch_message(self, s: Tensor, t: Tensor) -> str:
        what = "logits" if self.args.distill_target == "logits" else "hidden states"
        return (
            f"teacher and student outputs do not match: student {what} have shape {tuple(s.shape)}, teacher {what} "
            f"{tuple(t.shape)}. The student must be a quantized copy of the teacher's architecture with the same "
            "output space (same number of labels / vocabulary size / hidden size)."
        )

    def _shifts_labels(self) -> bool:
        """Causal LMs predict token i+1 at position i (for label accuracy / CE, not for the KD loss)."""
        shifts = getattr(self, "_loss_shifts_labels", None)  # transformers >= 5.2x
        if shifts is None:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            shifts = type(_core(self.model)).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        return bool(shifts)

    def _cross_entropy(self, d: _Distill) -> Tensor:
        loss = d.outputs.get("loss") if isinstance(d.outputs, Mapping) else None
        if loss is not None:
            return loss
        logits, labels = d.student, d.labels
        if logits.dim() == 3 and self._shifts_labels():
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    # ---- training --------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[Tensor, int]] = None,
    ) -> Union[Tensor, Tuple[Tensor, Any]]:
        """``kd_weight * KD + ce_weight * CE``; KD is the mean over the micro-batch's samples
        (non-padding tokens for sequence outputs). Labels reach the student only when ``ce_weight > 0``."""
        use_ce = self.args.ce_weight > 0
        d = self._distill(model, inputs, with_ce_labels=use_ce)
        num = (d.per_position * d.mask).sum() if d.mask is not None else d.per_position.sum()
        den = d.mask.sum() if d.mask is not None else torch.tensor(float(d.per_position.numel()), device=num.device)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1 and self.args.average_tokens_across_devices and model.training:
            den = den.detach().clone()
            dist.all_reduce(den, op=dist.ReduceOp.SUM)
            kd = num * world / den.clamp_min(1.0)  # DDP averages gradients over ranks
        else:
            kd = num / den.clamp_min(1.0)
        loss = self.args.kd_weight * kd
        if use_ce:
            if d.labels is None:
                raise ValueError("ce_weight > 0 but the batch has no labels: remove ce_weight or add a label column")
            loss = loss + self.args.ce_weight * self._cross_entropy(d)
        return (loss, d.outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Optional[Union[Tensor, int]] = None
    ) -> Tensor:
        if (
            self.args.ewgs_delta_schedule == "hessian"
            and self.state.global_step % self.args.ewgs_delta_update_steps == 0
            and self._last_delta_step != self.state.global_step
        ):
            self.update_ewgs_deltas(self._prepare_inputs(inputs))
        return super().training_step(model, inputs, num_items_in_batch)

    def update_ewgs_deltas(self, inputs: Mapping) -> Dict[str, float]:
        """Set every EWGS quantizer's delta from the Hessian trace of the KD loss on ``inputs``
        (see :mod:`sqakd_hf.ewgs_schedule`); model buffers (BN statistics) and RNG are left as found."""
        core = _core(self.model)
        model_inputs, _ = self._split_labels(inputs)
        saved = {n: b.detach().clone() for n, b in core.named_buffers()}
        was_training = core.training
        core.train()

        def loss_fn() -> Tensor:
            d = self._distill(core, model_inputs)
            if d.mask is None:
                return d.per_position.mean()
            return (d.per_position * d.mask).sum() / d.mask.sum().clamp_min(1.0)

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and self.args.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                deltas = estimate_ewgs_deltas(
                    core, loss_fn, self.args.ewgs_hessian_samples, seed=self.args.seed + self.state.global_step
                )
        finally:
            with torch.no_grad():
                for n, b in core.named_buffers():
                    if n in saved:
                        b.copy_(saved[n])
            core.train(was_training)
        deltas = all_reduce_deltas(deltas, device=self.args.device)
        apply_ewgs_deltas(core, deltas)
        self.ewgs_deltas = deltas
        self._last_delta_step = self.state.global_step
        if deltas:
            values = list(deltas.values())
            logger.info(
                "sqakd: EWGS delta (Hessian) at step %d: mean %.3g, min %.3g, max %.3g",
                self.state.global_step, sum(values) / len(values), min(values), max(values),
            )
        return deltas

    # ---- optimizer -------------------------------------------------------------------------
    def quantizer_param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Three groups: decayed weights, non-decayed weights (bias, norms), quantizer parameters
        (``quantizer_learning_rate``, ``quantizer_weight_decay``)."""
        qids = {id(p) for p in quantizer_parameters(_core(model))}
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in named if id(p) not in qids and n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if id(p) not in qids and n not in decay], "weight_decay": 0.0},
            {
                "params": [p for _, p in named if id(p) in qids],
                "weight_decay": self.args.quantizer_weight_decay,
                "lr": self.args.effective_quantizer_learning_rate,
            },
        ]

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or any(k in optimizer_kwargs for k in ("params", "model", "optimizer_dict")):
            logger.warning(
                "sqakd: optimizer %s builds its own parameter groups; quantizer parameters get no separate group",
                getattr(optimizer_cls, "__name__", optimizer_cls),
            )
            return super().create_optimizer(model)
        self.optimizer = optimizer_cls(self.quantizer_param_groups(opt_model), **optimizer_kwargs)
        return self.optimizer

    # ---- calibration and checks before the first step ---------------------------------------
    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        self._check_train_dataset(self.train_dataset)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _inner_training_loop(self, *args: Any, **kwargs: Any):
        # here a resumed checkpoint is loaded and the model is not wrapped in DDP yet
        self._check_student(self.model, self.args)
        self.prepare_student(self.train_dataset, force_check=True)
        self._last_delta_step = -1
        return super()._inner_training_loop(*args, **kwargs)

    def prepare_student(self, dataset: Any = None, force_check: bool = False) -> None:
        """Calibrate the student's quantizers if any is uninitialised, then check teacher/student
        outputs on the first batch. Runs on every rank (statistics are all-reduced)."""
        dataset = self.train_dataset if dataset is None else dataset
        needs_calibration = not all(q.initialized for _, q in named_quantizers(_core(self.model)))
        if not needs_calibration and not force_check and self._checked_model_id == id(self.model):
            return
        if dataset is None:
            if needs_calibration:
                raise ValueError("the student's quantizers are not calibrated and there is no dataset to calibrate on")
            return
        self._check_train_dataset(dataset)
        batches = self._calibration_batches(dataset, first_only=not needs_calibration)
        core = _core(self.model)
        if needs_calibration:
            calibrate(core, [self._model_call_input(core, b) for b in batches])
        self._check_outputs(batches[0])
        self._checked_model_id = id(self.model)

    @staticmethod
    def _model_call_input(model: nn.Module, batch: Mapping) -> Any:
        """What :func:`sqakd_hf.calibrate` should feed: the kwargs dict, or the one positional tensor."""
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        accepted = forward_params(model)
        if accepted is None or all(k in accepted for k in inputs):
            return inputs
        key = next((k for k in POSITIONAL_KEYS if k in inputs), next(iter(inputs)))
        return inputs[key]

    def _calibration_batches(self, dataset: Any, first_only: bool = False) -> List[Dict[str, Any]]:
        """This rank's share of ``calibration_batches`` global batches of seeded-random samples.

        A global batch is one optimizer step's data (per-device batch x accumulation x processes);
        every rank draws the same samples and takes every ``world_size``-th, so the all-reduced
        statistics do not depend on the number of processes or on accumulation.
        """
        try:
            import datasets
        except ImportError:  # datasets is optional for the Trainer: plain torch datasets work too
            datasets = None
        args = self.args
        per_device = max(1, self._train_batch_size)
        world, rank = max(1, args.world_size), args.process_index
        total = args.calibration_batches * per_device * args.gradient_accumulation_steps * world
        collator = self.data_collator
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="calibration")
        else:
            collator = self._get_collator_with_removed_columns(self.data_collator, description="calibration")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not has_length(dataset):
            samples = list(itertools.islice(iter(dataset), total))
        else:
            gen = torch.Generator().manual_seed(args.seed)
            order = torch.randperm(len(dataset), generator=gen)[:total].tolist()
            samples = None
        count = len(samples) if samples is not None else len(order)
        if count == 0:
            raise ValueError("the calibration data is empty: SQAKD needs (unlabeled) training inputs")
        mine = list(range(rank, count, world)) or [rank % count]
        if first_only:  # only the output check needs data
            mine = mine[:per_device]
        pick = [samples[i] for i in mine] if samples is not None else [dataset[order[i]] for i in mine]
        batches = [collator(pick[i : i + per_device]) for i in range(0, len(pick), per_device)]
        return [self._prepare_inputs(b) for b in batches]

    @torch.no_grad()
    def _check_outputs(self, batch: Mapping) -> None:
        core = _core(self.model)
        was_training = core.training
        core.eval()
        try:
            model_inputs, _ = self._split_labels(batch)
            t = output_tensor(self.teacher_outputs(model_inputs), self.args.distill_target, "teacher")
            s = output_tensor(call_model(core, model_inputs, **self._extra_kwargs()), self.args.distill_target, "student")
        finally:
            core.train(was_training)
        if s.shape != t.shape:
            raise ValueError(self._mismatch_message(s, t))

    # ---- label-free evaluation --------------------------------------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """The Trainer's loop plus ``{prefix}_kd_loss``, ``{prefix}_teacher_agreement`` and, when the data has
        labels, ``{prefix}_accuracy`` (unless ``compute_metrics`` already reports one)."""
        self.prepare_student(self.train_dataset if self.train_dataset is not None else getattr(dataloader, "dataset", None))
        self._eval_totals = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        totals, self._eval_totals = self._eval_totals, None
        if totals is not None:
            kd_sum, positions, agree, agree_n, correct, labeled = totals.tolist()
            m = output.metrics
            if positions > 0:
                m[f"{metric_key_prefix}_kd_loss"] = kd_sum / positions
            if agree_n > 0:
                m[f"{metric_key_prefix}_teacher_agreement"] = agree / agree_n
            if labeled > 0 and f"{metric_key_prefix}_accuracy" not in m:
                m[f"{metric_key_prefix}_accuracy"] = correct / labeled
        return output

    def prediction_step(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Optional[List[str]] = None,
    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """KD loss of the batch, the student's logits (or hidden states) and the labels (if any); no labels needed."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            d = self._distill(model, inputs)
        self._accumulate_eval_stats(d)
        w = d.mask if d.mask is not None else torch.ones_like(d.per_position)
        loss = ((d.per_position * w).sum() / w.sum().clamp_min(1.0)).detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, d.student.detach(), d.labels

    def _accumulate_eval_stats(self, d: _Distill) -> None:
        """Per-sample sums, gathered across processes (duplicates of the last batch dropped)."""
        per = d.per_position.float()
        w = d.mask.float() if d.mask is not None else torch.ones_like(per)

        def per_sample(x: Tensor) -> Tensor:
            x = x.float()
            return x.reshape(x.shape[0], -1).sum(1) if x.dim() > 1 else x

        zeros = torch.zeros(per.shape[0], device=per.device)
        if self.args.distill_target == "logits":
            agree = per_sample((d.student.argmax(-1) == d.teacher.argmax(-1)).float() * w)
            agree_n = per_sample(w)
        else:
            agree, agree_n = zeros, zeros
        correct, labeled = zeros, zeros
        if d.labels is not None and self.args.distill_target == "logits":
            pred, labels = d.student.argmax(-1), d.labels
            if pred.dim() == 2 and labels.shape == pred.shape:
                if self._shifts_labels():
                    pred, labels = pred[:, :-1], labels[:, 1:]
                valid = (labels != -100).float()
                correct = per_sample((pred == labels).float() * valid)
                labeled = per_sample(valid)
            elif pred.dim() == 1 and labels.shape == pred.shape:
                valid = (labels != -100).float()
                correct, labeled = (pred == labels).float() * valid, valid
        stats = torch.stack([per_sample(per * w), per_sample(w), agree, agree_n, correct, labeled], dim=1)
        stats = self.accelerator.gather_for_metrics(stats).double().sum(0).cpu()
        self._eval_totals = stats if self._eval_totals is None else self._eval_totals + stats

    # ---- saving and sharing ----------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[Dict[str, Tensor]] = None) -> None:
        """Training form. transformers models: the stock path (config.json carries quantization_config);
        timm-native students: timm's layout plus quantization_config, so ``from_pretrained_timm`` reads it."""
        model = _core(self.model)
        if isinstance(model, PreTrainedModel) or not isinstance(getattr(model, "pretrained_cfg", None), dict):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:  # one writer per checkpoint under DDP
            return
        output_dir = output_dir or self.args.output_dir
        save_quantized(model, output_dir, processor=self.processing_class)

    def _card_metrics(self) -> Dict[str, Dict[str, float]]:
        """The student's latest evaluation metrics, as the model card reports them."""
        latest = next((h for h in reversed(self.state.log_history) if "eval_kd_loss" in h), None)
        if latest is None:
            return {}
        keys = ("eval_accuracy", "eval_teacher_agreement", "eval_kd_loss")
        return {"student": {k[len("eval_"):]: float(latest[k]) for k in keys if k in latest}}

    def _card_training(self) -> Dict[str, Any]:
        a = self.args
        return {
            "temperature": a.temperature, "kd_weight": a.kd_weight, "ce_weight": a.ce_weight,
            "learning_rate": a.learning_rate, "quantizer_learning_rate": a.effective_quantizer_learning_rate,
            "epochs": a.num_train_epochs, "global_steps": self.state.global_step,
        }

    def create_model_card(
        self,
        language: Optional[str] = None,
        license: Optional[str] = None,
        tags: Union[str, List[str], None] = None,
        model_name: Optional[str] = None,
        finetuned_from: Optional[str] = None,
        tasks: Union[str, List[str], None] = None,
        dataset_tags: Union[str, List[str], None] = None,
        dataset: Union[str, List[str], None] = None,
        dataset_args: Union[str, List[str], None] = None,
    ) -> None:
        """Render sqakd_hf's model card (teacher as base_model, bits, metrics) into ``output_dir/README.md``
        instead of the Trainer's generic card."""
        if not self.is_world_process_zero():
            return
        as_list = lambda v: [v] if isinstance(v, str) else list(v or [])  # noqa: E731
        write_model_card(
            _core(self.model), self.args.output_dir, teacher=finetuned_from or self.teacher_ref,
            metrics=self._card_metrics(), training=self._card_training(), repo_id=self.args.hub_model_id,
            license=license, tags=as_list(tags), datasets=as_list(dataset_tags or dataset),
        )

    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        **kwargs: Any,
    ):
        """Save the training form to ``output_dir`` (with the model card), then upload the packed
        low-bit form and the card to ``args.hub_model_id`` (default: the output folder's name)."""
        self.save_model()
        if not self.is_world_process_zero():
            return None
        card_keys = ("license", "tags", "finetuned_from", "dataset_tags", "dataset")
        self.create_model_card(**{k: kwargs[k] for k in card_keys if k in kwargs})
        repo_id = self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))
        return push_quantized_to_hub(
            _core(self.model), repo_id, commit_message=commit_message, private=self.args.hub_private_repo,
            token=token or self.args.hub_token, revision=revision, teacher=self.teacher_ref,
            metrics=self._card_metrics(), training=self._card_training(),
        )
