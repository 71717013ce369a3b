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


def test_validate_and_dry_run_never_import_torch_ray_or_pandas(tmp_path):
    """``smn validate`` and ``smn run --dry-run [--json]`` on the finished demo read the spec, the dataset's
    metadata and the ledger's file names only (issue 27): 15 cells done (the 6 random-mask controls too, ready
    since their SMN cells landed), 0 to run, and none of torch,
    torchvision, ray or pandas in the interpreter afterwards (the checks that build a model are left to
    ``smn run``, which a ``selector-no-match-run`` case of tests/test_bad_inputs.py covers)."""
    shutil.copytree(REPO / "docs" / "results" / "demo", tmp_path / "results" / "demo")
    spec, r = str(REPO / "experiments" / "demo.yaml"), str(tmp_path / "results")
    script = r"""
import contextlib, io, json, sys
from orchestrator.cli.app import main
out = {}
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    out[argv[0] + (" --json" if "--json" in argv else "")] = [code, buf.getvalue(), sorted(
        m for m in ("torch", "torchvision", "ray", "pandas", "sklearn") if m in sys.modules)]
print(json.dumps(out))
"""
    argvs = [["validate", spec], ["run", spec, "--dry-run", "--results", r],
             ["run", spec, "--dry-run", "--json", "--results", r]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(code == 0 and mods == [] for code, _, mods in seen.values()), seen
    assert "spec demo: valid, 9 cells; 6 waiting on another cell" in seen["validate"][1]
    assert "mask selector" in seen["validate"][1] and "waiting on" in seen["validate"][1]
    assert "15 cells: 15 done, 0 to run now\n" in seen["run"][1] and "waiting on" not in seen["run"][1]
    summary = json.loads(seen["run --json"][1])
    assert len(summary["done"]) == 15 and summary["to_run"] == summary["waiting"] == []
    assert summary["estimate"]["total_s"] == 0
