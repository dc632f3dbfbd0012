"""The package's import graph: layers whose imports only point down, and no import cycle.

Every ``import`` in ``sqakd_hf`` (module level and inside functions) is read with ``ast``; an import
of a module in a higher layer, or any cycle between modules, fails the test with the offending
edges. The package facade (``__init__``, ``__main__``, ``_registration``) may import anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sqakd_hf"

#: lowest first; a module may import its own layer (without cycles) or lower ones
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("errors", "model_io", "process_group", "quantizers", "version"),
    ("config",),
    ("modules", "folding", "equalization"),
    ("deploy_mode",),
    ("injection",),
    ("smoothing", "bias_correction", "gptq", "ptq_guard"),
    ("calibration",),
    ("mixed_precision",),
    ("serialization",),
    ("integrations",),
    ("checkpoint",),
    ("export",),
    ("hub",),
    ("training",),
    ("app",),
)
FACADE = {"sqakd_hf", "sqakd_hf.__main__", "sqakd_hf._registration"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Package modules that ``name`` imports (resolved to the deepest known module)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: Set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sqakd_hf"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[: len(base) - node.level + 1])
                module = f"{prefix}.{node.module}" if node.module else prefix
            else:
                module = node.module or ""
            if not module.startswith("sqakd_hf"):
                continue
            for alias in node.names:  # `from . import x` imports the submodule x
                candidate = f"{module}.{alias.name}"
                add(candidate if candidate in known else module)
    return found


def _rank(module: str) -> int:
    top = module.split(".")[1]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer():
    for name in _modules():
        if name not in FACADE:
            _rank(name)


def test_imports_only_point_down():
    upward = [
        f"{src} (layer {_rank(src)}) imports {dst} (layer {_rank(dst)})"
        for src, targets in _graph().items() if src not in FACADE
        for dst in sorted(targets) if dst not in FACADE and _rank(dst) > _rank(src)
    ]
    facade = [f"{src} imports the facade {dst}" for src, targets in _graph().items() if src not in FACADE
              for dst in targets if dst in FACADE]
    assert not upward + facade, "\n".join(upward + facade)


def test_no_import_cycle():
    graph = {k: {d for d in v if d not in FACADE} for k, v in _graph().items() if k not in FACADE}
    cycles: List[List[str]] = []
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a relative import from a core module into training/ is an upward edge."""
    fake = tmp_path / "injection.py"
    fake.write_text("from .training.trainer import SQAKDTrainer\nfrom . import checkpoint\n")
    known = set(_modules())
    assert _imports("sqakd_hf.injection", fake, known) == {"sqakd_hf.training.trainer", "sqakd_hf.checkpoint"}
    assert _rank("sqakd_hf.training.trainer") > _rank("sqakd_hf.injection")


@pytest.mark.parametrize("statement", [
    "import sqakd_hf.quantizers as q; q.LSQQuantizer",
    "from sqakd_hf.quantizers import LSQQuantizer",
    "import sqakd_hf; sqakd_hf.named_quantizers; import sqakd_hf.quantizers as q; q.build_quantizer",
])
def test_quantizers_subpackage_is_not_shadowed(statement):
    subprocess.run([sys.executable, "-c", statement], check=True)


def test_import_is_light_and_still_registers_with_transformers():
    """``import sqakd_hf`` loads neither torch nor timm; transformers knows "sqakd" once its registry loads."""
    code = (
        "import sys, sqakd_hf\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules)\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
        "assert AUTO_QUANTIZER_MAPPING['sqakd'].__name__ == 'SQAKDHfQuantizer'\n"
        "assert AUTO_QUANTIZATION_CONFIG_MAPPING['sqakd'] is sqakd_hf.QuantConfig\n"
        "assert 'timm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registration_when_transformers_came_first():
    code = (
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
        "import sqakd_hf\n"
        "assert AUTO_QUANTIZER_MAPPING['sqakd'].__name__ == 'SQAKDHfQuantizer'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_code_and_help_cite_no_files_outside_the_repository():
    """Docstrings, help text and recipes name formulas and papers, not planning files the repo does not ship."""
    roots = [PACKAGE, PACKAGE.parent / "recipes"]
    offenders = [
        str(p.relative_to(PACKAGE.parent)) for root in roots for p in root.rglob("*")
        if p.suffix in (".py", ".yaml", ".md") and any(n in p.read_text() for n in ("METHOD.md", "DESIGN.md"))
    ]
    assert not offenders, offenders
