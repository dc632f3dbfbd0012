"""Pytest fixture pointing the real ``huggingface_hub`` client at an in-process :class:`LocalHub`.

Use it from a test module with ``from hub_fixtures import local_hub  # noqa: F401`` (``tests/`` is on
``sys.path`` under pytest's default import mode), or list ``"hub_fixtures"`` in ``pytest_plugins``.

``huggingface_hub`` reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE``/``HF_HUB_DISABLE_XET`` once, at import,
into module-level constants, and some objects copy the endpoint when they are built. Since other
tests may have imported it already, :func:`point_hub_client_at` patches those values in place
(environment variables are set as well, for subprocesses); ``monkeypatch`` restores all of it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from hub_server import LocalHub

DUMMY_TOKEN = "hf_localhubdummytoken"
_PATCHED_PACKAGES = ("huggingface_hub", "transformers", "timm", "sqakd_hf")


def point_hub_client_at(monkeypatch: pytest.MonkeyPatch, url: str, cache_dir: Path) -> None:
    """Make ``huggingface_hub`` (and libraries built on it) talk to ``url``, online, without Xet."""
    from huggingface_hub import HfApi, constants

    env = {
        "HF_ENDPOINT": url,
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_CACHE": str(cache_dir),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)  # would take precedence over HF_TOKEN

    old_endpoint, old_template = constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE
    new_template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read by `is_offline_mode()` on every request
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # `is_xet_available()` reads it at call time
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {urlsplit(url).hostname})

    # `constants.ENDPOINT` / the resolve-URL template, and every copy made by `from ... import ENDPOINT`
    # or by an `HfApi()` built at import (e.g. `huggingface_hub.hf_api.api`, behind `huggingface_hub.create_repo`).
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(_PATCHED_PACKAGES):
            continue
        for attr, value in list(vars(module).items()):
            if attr == "ENDPOINT" and value == old_endpoint:
                monkeypatch.setattr(module, attr, url)
            elif attr == "HUGGINGFACE_CO_URL_TEMPLATE" and value == old_template:
                monkeypatch.setattr(module, attr, new_template)
            elif isinstance(value, HfApi) and value.endpoint == old_endpoint:
                monkeypatch.setattr(value, "endpoint", url)
    # transformers caches an HfApi lazily; drop it so the next one is built with the patched endpoint.
    if "transformers.utils.hub" in sys.modules:
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A started :class:`LocalHub`; ``huggingface_hub`` points at it for the duration of the test.

    Also sets a dummy ``HF_TOKEN`` (``whoami`` answers ``"testuser"``) and a fresh ``HF_HUB_CACHE``.
    """
    hub = LocalHub().start()
    try:
        point_hub_client_at(monkeypatch, hub.url, tmp_path_factory.mktemp("hf_hub_cache"))
        yield hub
    finally:
        hub.stop()
