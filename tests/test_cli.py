"""The smn command line: help, validation errors (nothing written), table from the ledger."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from orchestrator import ledger
from orchestrator.cli import build_parser, main

from .conftest import REPO


def test_help_lists_every_subcommand_and_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("run", "table", "validate"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for word in ("--results", "--address", "--dry-run", "key=value"):
        assert word in out
    assert build_parser().prog == "smn"


def test_bad_spec_exits_2_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["run", str(REPO / "experiments" / "demo.yaml"), "--results", str(results), "train.epochs=-1"])
    assert code == 2
    assert "train" in capsys.readouterr().err
    assert not results.exists()


def test_dry_run_lists_cells(capsys, tmp_path):
    assert main(["run", str(REPO / "experiments" / "demo.yaml"), "--dry-run", "--results", str(tmp_path),
                 "seeds=[0,1]", "methods=[pretrained,smn]"]) == 0
    out = capsys.readouterr().out
    listing, estimate = out.split("cost estimate")
    assert "4 cells" in listing and listing.count("smn seed=") == 2
    assert estimate.count("smn seed=") == 2 and "CPU-hours" in estimate
    assert not any(tmp_path.iterdir())


def test_table_command_reads_the_ledger(tmp_path):
    now = time.time()
    ledger.write_cell(str(tmp_path), "exp", cell_id="c1", method="smn", backbone="cifar_resnet8", dataset="digits",
                      seed=0, grid={}, config={}, metrics={"knn_top1": 0.875, "linear_probe_top1": 0.9},
                      started_at=now, finished_at=now)
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "table", str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    assert "0.875" in out and "linear_probe_top1" in out
    bad = subprocess.run([sys.executable, "-m", "orchestrator.cli", "table", str(tmp_path), "--format", "xml"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_run_hands_a_spec_with_a_cascade_section_to_the_cascade(capsys, tmp_path):
    spec = REPO / "experiments" / "table3_cascade_small.yaml"
    assert main(["run", str(spec), "--results", str(tmp_path / "r"), "--dry-run", "cascade.router.clusters=3"]) == 0
    out = capsys.readouterr().out
    assert "1 cascade(s), 3 experts each" in out
    assert [line.split()[:2] for line in out.splitlines() if line.strip().startswith("expert ")] == [
        ["expert", "0"], ["expert", "1"], ["expert", "2"]]
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
