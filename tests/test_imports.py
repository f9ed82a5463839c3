"""``import vbpc`` stays light: the framework integrations and their libraries load on demand."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("pytorch_lightning", "lightning", "peft", "accelerate", "transformers", "laplace", "netcal", "pyro",
         "torchvision", "matplotlib")


@pytest.mark.slow  # a fresh interpreter imports torch
def test_import_vbpc_loads_no_integration():
    code = f"import sys, vbpc; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_public_api_is_coherent():
    """Every name in ``vbpc.__all__`` resolves; learners are classes (named constructors included, one
    style); every public error type is exported; no private name is exported."""
    import inspect

    import torch

    import vbpc
    from vbpc import errors

    for name in vbpc.__all__:
        assert hasattr(vbpc, name), name
        assert not name.startswith("_") or name == "__version__"
    learners = ("IVON", "VSGD", "VON", "IVONPoCo", "IVONPoCoMo", "VSGDPoCo", "SVRG", "AlphaSVRG", "VONPoCo",
                "ContinualIVON")
    for name in learners:
        cls = getattr(vbpc, name)
        assert inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer), name
    for name in errors.__all__:
        assert name in vbpc.__all__ and getattr(vbpc, name) is getattr(errors, name), name
    assert len(vbpc.__all__) == len(set(vbpc.__all__))


def test_no_private_name_is_imported_across_packages():
    """``from ..x import _name`` across vbpc's packages would couple them through internals."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "vbpc"
    bad = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                base = path.parent.joinpath(*[".."] * (node.level - 1), *(node.module or "").split(".")).resolve()
                bad += [f"{path.relative_to(root)}: {a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"
                        and not (base / f"{a.name}.py").exists()]  # a private module of the package: allowed
    assert bad == []


def test_every_module_is_imported_by_something():
    """No dead module: each module of the package is imported by another module of the package (or is
    a package's ``__init__``/``__main__``, or an entry point)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "vbpc"
    sources = {p: p.read_text() for p in root.rglob("*.py")}
    entry_points = {"cli", "lightning", "hf", "accelerate"}  # the command line; integrations users import
    dead = []
    for path in sources:
        name = path.stem
        if name in ("__init__", "__main__") or name in entry_points:
            continue
        pattern = re.compile(rf"(\bimport\s+[\w., ]*\b{name}\b|\bfrom\s+[.\w]*\b{name}\b\s+import|"
                             rf"\bfrom\s+[.\w]+\s+import\s+[\w, ()\n]*\b{name}\b|[\"'][.\w]*\b{name}[\"'])")
        if not any(pattern.search(src) for other, src in sources.items() if other != path):
            dead.append(str(path.relative_to(root)))
    assert dead == []


@pytest.mark.slow
def test_import_vbpc_imports_no_torch_until_a_name_is_used():
    """``import vbpc`` is instant: every public name loads on first use (PEP 562)."""
    code = ("import sys, vbpc\nassert 'torch' not in sys.modules\nfrom vbpc import IVON, PoCo\n"
            "assert 'torch' in sys.modules and IVON.__name__ == 'IVON' and sorted(dir(vbpc)) == dir(vbpc)\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
