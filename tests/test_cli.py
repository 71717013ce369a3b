"""The smn command line: help, validation errors (nothing written), table from the ledger."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from orchestrator.results import ledger
from orchestrator.cli.app import build_parser, main

from .conftest import REPO


@pytest.mark.unit
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


@pytest.mark.unit
def test_bad_spec_exits_2_and_writes_nothing(tmp_path, capsys):
    results = tmp_path / "results"
    code = main(["run", str(REPO / "experiments" / "demo.yaml"), "--results", str(results), "train.epochs=-1"])
    assert code == 2
    assert "train" in capsys.readouterr().err
    assert not results.exists()


@pytest.mark.unit
def test_dry_run_lists_cells(capsys, tmp_path):
    assert main(["run", str(REPO / "experiments" / "demo.yaml"), "--dry-run", "--results", str(tmp_path),
                 "seeds=[0,1]", "methods=[pretrained,smn]"]) == 0
    out = capsys.readouterr().out
    listing, estimate = out.split("cost estimate")
    assert "4 cells" in listing and listing.count("smn seed=") == 2
    assert estimate.count("smn seed=") == 2 and "CPU-hours" in estimate
    assert not any(tmp_path.iterdir())


@pytest.mark.unit
def test_dry_run_lists_the_controls_waiting_on_their_smn_cell(capsys, tmp_path):
    """The demo's random-mask controls cannot be named before their SMN cell has landed: the dry run counts
    them apart (``waiting on another cell``) and lists each with the SMN cell it waits on; ``--json`` too."""
    import re

    spec = str(REPO / "experiments" / "demo.yaml")
    assert main(["run", spec, "--dry-run", "--results", str(tmp_path), "seeds=[0,1]"]) == 0
    out = capsys.readouterr().out.split("cost estimate")[0]
    assert "6 cells: 0 done, 6 to run now, 4 waiting on another cell" in out
    smn = dict(re.findall(r"^  ([0-9a-f]{16})  smn seed=(\d)", out, re.M))
    waits = re.findall(r"^  \(after\)\s+(random_mask\S*) seed=(\d)\s+waiting on ([0-9a-f]{16})$", out, re.M)
    assert sorted(waits) == sorted((m, seed, cid) for cid, seed in smn.items()
                                   for m in ("random_mask", "random_mask_magnitude"))
    assert main(["run", spec, "--dry-run", "--json", "--results", str(tmp_path), "seeds=[0,1]"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["to_run"]) == 6 and sorted((w["method"], w["waiting_on"]) for w in plan["waiting"]) == sorted(
        (m, cid) for m, _, cid in waits)
    assert not any(tmp_path.iterdir())
    # top-k at the density SMN found: ready once the threshold cell's density is in the ledger (read from its rows)
    import shutil

    shutil.copytree(REPO / "docs" / "results" / "table2_masking_small", tmp_path / "t2" / "table2_masking_small")
    spec = str(REPO / "experiments" / "table2_masking_small.yaml")
    assert main(["run", spec, "--dry-run", "--results", str(tmp_path / "t2")]) == 0
    assert "15 cells: 15 done, 0 to run now\n" in capsys.readouterr().out
    assert main(["run", spec, "--dry-run", "--results", str(tmp_path / "fresh")]) == 0
    out = capsys.readouterr().out
    assert "12 to run now, 3 waiting on another cell" in out and out.count("topk_density=found") == 3


@pytest.mark.cluster
def test_table_command_reads_the_ledger(tmp_path):
    now = time.time()
    ledger.write_cell(str(tmp_path), "exp", cell_id="c1", method="smn", backbone="cifar_resnet8", dataset="digits",
                      seed=0, grid={}, config={}, metrics={"knn_top1": 0.875, "linear_probe_top1": 0.9},
                      started_at=now, finished_at=now)
    out = subprocess.run([sys.executable, "-m", "orchestrator", "table", str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    assert "0.875" in out and "linear_probe_top1" in out
    bad = subprocess.run([sys.executable, "-m", "orchestrator", "table", str(tmp_path), "--format", "xml"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.unit
def test_run_hands_a_spec_with_a_cascade_section_to_the_cascade(capsys, tmp_path):
    spec = REPO / "experiments" / "table3_cascade_small.yaml"
    assert main(["run", str(spec), "--results", str(tmp_path / "r"), "--dry-run", "cascade.router.clusters=3"]) == 0
    out = capsys.readouterr().out
    assert "1 cascade(s), 3 experts each" in out
    assert [line.split()[:2] for line in out.splitlines() if line.strip().startswith("expert ")] == [
        ["expert", "0"], ["expert", "1"], ["expert", "2"]]
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


@pytest.mark.unit
def test_version_bare_smn_and_help_list_env_and_exit_codes(capsys):
    import smn_core

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"smn {smn_core.__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: smn") and "COMMAND" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("RAY_AUTH_MODE", "RAY_ADDRESS", "SMN_ALLOW_AUTOSCALE_GPUS", "SMN_ALLOW_AUTOSCALE_CPUS",
                 "SMN_CIFAR_WEIGHTS_DIR", "AWS_ACCESS_KEY_ID", "exit codes:", "130"):
        assert word in out, word


@pytest.mark.unit
def test_every_option_of_every_command_shows_its_default():
    import argparse

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for child in set(a.choices.values()):
                    yield from parsers(child)

    missing = []
    for p in parsers(build_parser()):
        formatter = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or a.default is argparse.SUPPRESS:
                continue
            shown = formatter._expand_help(a) if a.help else ""
            if "(default: " not in shown:
                missing.append(f"{p.prog} {a.option_strings[-1]}")
    assert missing == []


@pytest.mark.unit
def test_layout_and_figure_lists_need_no_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["table", "--layout", "list"]) == 0
    assert "table2" in capsys.readouterr().out
    assert main(["plot", "--figure", "list"]) == 0
    assert "fig8" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


_READ_COMMANDS = """
import sys
from orchestrator.cli.app import main
results, out = sys.argv[1], sys.argv[2]
codes = [main(["table", results]), main(["table", results, "--layout", "lowshot"]), main(["ls", results]),
         main(["report", results, "--out", out]), main(["plot", results, "--figure", "fig3", "--out", out + "/f.png"])]
print("codes", codes, "torch" in sys.modules, "ray" in sys.modules)
"""


@pytest.mark.cluster  # subprocesses: a fresh interpreter per command
def test_read_commands_load_neither_torch_nor_ray(tmp_path):
    now = time.time()
    for seed in (0, 1):
        ledger.write_cell(str(tmp_path / "r"), "fig3", cell_id=f"c{seed}", method="smn", backbone="cifar_resnet8",
                          dataset="digits", seed=seed, grid={}, config={"dataset": {"source": "digits"}},
                          metrics={"linear_probe_top1": 0.8 + seed / 100, "lowshot_top1@0.1": 0.5},
                          started_at=now, finished_at=now)
    done = subprocess.run([sys.executable, "-c", _READ_COMMANDS, str(tmp_path / "r"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert done.strip().splitlines()[-1] == "codes [0, 0, 0, 0, 0] False False"
    assert (tmp_path / "out" / "f.png").stat().st_size > 0 and (tmp_path / "out" / "report.html").is_file()
