"""Builders for the CLI / data / recipe tests (not tests): real digits written as PNG imagefolders,
a text csv, and tiny real timm / transformers teachers saved as checkpoint folders."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
import yaml

WORDS_POS = ["good", "great", "fine", "lovely", "superb"]
WORDS_NEG = ["bad", "awful", "poor", "boring", "dull"]
WORDS_FILL = ["the", "movie", "film", "plot", "is", "was", "a", "very", "acting", "story"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_digits_imagefolder(root: Path, n_train: int = 96, n_test: int = 40, size: int = 32) -> Path:
    """scikit-learn digits as PNGs: ``root/{train,test}/<digit>/<i>.png`` (RGB, ``size`` x ``size``)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.RandomState(0)
    order = rng.permutation(len(d.target))
    for split, idx in (("train", order[:n_train]), ("test", order[n_train : n_train + n_test])):
        for i in idx:
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (d.images[i] / 16.0 * 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
    return root


def save_timm_teacher(path: Path, seed: int = 0) -> Path:
    """A real timm ``test_resnet`` (10 classes, 32x32, random weights) saved in timm's Hub layout."""
    import timm

    from sqakd_hf.app.quickstart import save_timm_teacher as save

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=10)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3,
                                crop_pct=1.0, num_classes=10)
    return save(model.eval(), path)


def tiny_bert_tokenizer():
    from transformers import BertTokenizer

    vocab = SPECIAL + sorted(set(WORDS_POS + WORDS_NEG + WORDS_FILL))
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def save_bert_teacher(path: Path, seed: int = 0) -> Path:
    """A tiny real ``BertForSequenceClassification`` (2 labels: negative/positive) + its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tok = tiny_bert_tokenizer()
    cfg = BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def text_rows(n: int, seed: int = 0) -> List[Dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(WORDS_FILL, 4) + [rng.choice(WORDS_POS if label else WORDS_NEG)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_text_csv(path: Path, n: int = 64, seed: int = 0, with_labels: bool = True) -> Path:
    import csv

    rows = text_rows(n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        fields = ["text", "label"] if with_labels else ["text"]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})
    return path


def write_recipe(path: Path, **values: Any) -> Path:
    path.write_text(yaml.safe_dump({k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}))
    return path


def image_recipe(tmp: Path, teacher: Path, data: Path, **extra: Any) -> Dict[str, Any]:
    """A tiny, fast recipe: timm teacher on a digits imagefolder."""
    values = dict(
        teacher=str(teacher), dataset_name=str(data), train_split="train", eval_split="test",
        method="lsq", weight_bits=4, act_bits=4, output_dir=str(tmp / "out"), max_steps=3,
        per_device_train_batch_size=16, per_device_eval_batch_size=32, learning_rate=1e-3, calibration_batches=1,
        save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, seed=0,
    )
    values.update(extra)
    return values
