"""Register ``quant_method: "sqakd"`` with transformers as soon as transformers' quantizer registry exists.

transformers has no plugin discovery: ``from_pretrained`` only knows quant methods registered in
``transformers.quantizers.auto`` before it runs. ``import sqakd_hf`` must therefore register ours,
but importing transformers' quantizers takes seconds (torch and every quantizer backend), which a
``sqakd-hf --version`` or a timm-only script should not pay. So: if the registry module is already
imported, register now; otherwise register right after it is first imported (a ``sys.meta_path``
finder that wraps that one module's loader). Either way registration happens before any
``from_pretrained`` can consult the registry.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, Optional

REGISTRY_MODULE = "transformers.quantizers.auto"


def register_now() -> None:
    """Import the integration, whose import registers the config and quantizer classes."""
    from .integrations import hf_quantizer  # noqa: F401


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        register_now()


class _RegistryFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[Any]:
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; find the real spec without us
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else as soon as it is."""
    if REGISTRY_MODULE in sys.modules:
        register_now()
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())
