"""``import vbpc`` stays light: the framework integrations and their libraries load on demand."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pytorch_lightning", "lightning", "peft", "accelerate", "transformers", "laplace", "netcal", "pyro",
         "torchvision", "matplotlib")


def test_import_vbpc_loads_no_integration():
    code = f"import sys, vbpc; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
