"""The read commands never import torch or ray (issue 27), on a compacted ledger too: ``smn ls``, ``table``,
``ledger compact`` and ``plot`` run in one fresh interpreter (``main([...])`` in-process there) on the committed
ledgers, and the interpreter's ``sys.modules`` is checked after each (``report`` on plain ledgers:
``tests/test_cli.py::test_read_commands_load_neither_torch_nor_ray``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import contextlib, io, json, sys
from orchestrator.cli.app import main
out = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    out[" ".join(argv[:3])] = [code, sorted(m for m in ("torch", "torchvision", "ray") if m in sys.modules)]
print(json.dumps(out))
"""


def test_read_commands_never_import_torch(tmp_path):
    results = tmp_path / "results"
    for name in ("demo", "table2_masking_small", "table3_small"):
        shutil.copytree(REPO / "docs" / "results" / name, results / name)
    r = str(results)
    argvs = [["ls", r], ["table", r], ["ledger", "compact", r, "--experiment", "demo"], ["table", r, "--layout", "table3"],
             ["plot", r, "--figure", "fig8"], ["ls", r, "--json"]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(argvs)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["table " + r][0] == 0 and seen["ledger compact " + r][0] == 0, seen
    assert all(mods == [] for _, mods in seen.values()), seen
