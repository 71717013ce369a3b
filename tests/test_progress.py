"""Progress in a terminal: ``smn run`` under a real pseudo-terminal draws rich bars (the run's cells, each
cell's epochs with loss and density) and still prints every plain line; with stdout on a pipe it prints the
plain lines only."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from orchestrator.cli.progress import RunProgress, run_progress, wants_bars

from .conftest import REPO, TINY_SPEC


def _run_in_pty(cmd: list[str], env: dict, timeout: float) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.cluster
@pytest.mark.slow
def test_run_in_a_terminal_draws_bars_and_keeps_the_plain_lines(tmp_path):
    spec = tmp_path / "bars.yaml"
    spec.write_text(TINY_SPEC.format(name="bars", epochs=2, workers=1).replace("[pretrained, smn]", "[smn]"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(REPO),
           "COLUMNS": "160", "TERM": "xterm-256color"}
    code, out = _run_in_pty([sys.executable, "-m", "orchestrator", "run", str(spec), "--results",
                             str(tmp_path / "results")], env, timeout=400)
    assert code == 0, out[-3000:]
    assert "━" in out  # rich's bar
    assert "bars: cells" in out and "smn seed=0" in out and ": epochs" in out  # the run's bar and a cell's bar
    assert "epoch 2/2 loss" in out  # the plain lines are still printed, above the bars
    assert "knn_top1" in out  # the final table


@pytest.mark.unit
def test_bars_only_on_a_terminal(tmp_path):
    with open(tmp_path / "log.txt", "w") as f:
        assert not wants_bars(f)
    with run_progress(3, "x", enabled=None) as tap:  # pytest captures stdout: not a terminal
        assert tap is None


@pytest.mark.unit
def test_a_run_progress_reads_the_engine_lines(tmp_path):
    """The lines the runner and the training loop print (their real formats) move the right bars."""
    import io

    out = io.StringIO()
    with RunProgress(3, "exp", stream=out) as tap:
        tap.write("experiment exp: 3 cells, 1 already in the ledger, 2 to run\n")
        tap.write("\x1b[36m(run_cell_here pid=1)\x1b[0m [6c64179ff2a2fec4 smn seed=0] epoch 2/8 loss 4.6164 "
                  "density 0.977 eta 175s\n")
        task = tap.progress.tasks[-1]
        assert task.description.strip().startswith("smn seed=0") and task.completed == 2 and task.total == 8
        assert task.fields["info"] == "loss 4.616 density 0.977"
        tap.write("[2/3 cells done, 40s] 6c64179ff2a2fec4 smn seed=0: knn_top1 0.700, density 0.977\n")
        assert tap.progress.tasks[0].completed == 2 and "best knn 0.700" in tap.progress.tasks[0].fields["info"]
        assert len(tap.progress.tasks) == 1  # the finished cell's bar is gone
    text = out.getvalue()
    assert "epoch 2/8 loss 4.6164" in text and "cells done" in text


@pytest.mark.unit
def test_cascade_expert_lines_get_their_own_bars():
    import io

    with RunProgress(1, "cascade", stream=io.StringIO()) as tap:
        tap.write("\x1b[36m(ExpertActor pid=19548)\x1b[0m [expert 1 63cc2989a756bf5e (59 images, 64 epochs)] epoch 9/64 "
                  "loss 6.9052 density 0.960 eta 161s\x1b[32m [repeated 5x across cluster]\x1b[0m\n")
        (bar,) = tap.progress.tasks[1:]
        assert bar.description.strip() == "expert 1 (59 images, 64 epochs) 63cc2989: epochs"
        assert (bar.completed, bar.total) == (9, 64)
        tap.write("[expert 1 63cc2989a756bf5e (59 images, 64 epochs)] done in 311s: loss 2.3650, density 0.932\n")
        assert len(tap.progress.tasks) == 1


@pytest.mark.unit
def test_sweep_lines_move_the_run_bar_and_close_finished_cells():
    """The sweep's own progress lines (orchestrator.engine.sweep.SweepProgress) drive the run's bar."""
    import io

    with RunProgress(4, "sw", stream=io.StringIO()) as tap:
        tap.write("sweep sw: 4 cells, 1 already in the ledger, 3 to run now\n")
        tap.write("[0123456789abcdef smn num_prototypes=10 seed=0] epoch 1/2 loss 3.7100 density 0.999 eta 4s\n")
        assert len(tap.progress.tasks) == 2
        tap.write("[sweep sw 12s] 1 done, 2 running, 0 pending, 0 failed; best knn_top1 0.783 (smn num_prototypes=10 "
                  "seed=0)  <- finished smn num_prototypes=10 seed=0\n")
        (run,) = tap.progress.tasks
        assert run.completed == 2 and run.fields["info"] == "2 running, 0 failed, best knn 0.783"


@pytest.mark.unit
def test_the_run_bar_says_what_the_run_waits_for():
    """Before the first epoch: reading the ledger, starting Ray, starting N workers (no more than fit), pretraining."""
    import io
    from types import SimpleNamespace

    res = SimpleNamespace(cpus_per_worker=1, workers=1, max_concurrent_cells=None)
    with RunProgress(9, "demo", stream=io.StringIO(), resources=res) as tap:
        info = lambda: tap.progress.tasks[0].fields["info"]  # noqa: E731
        assert info() == "reading the ledger..."
        tap.write("experiment demo: 9 cells, 0 already in the ledger, 9 to run\n")
        assert info() == "starting Ray..."
        tap.ray_started(local=True)
        assert info() == f"starting {min(9, os.cpu_count())} worker{'s' if min(9, os.cpu_count()) > 1 else ''}..."
        tap.write("pretraining cifar_resnet8 on digits -> pretrain-abc\n")
        assert info() == "pretraining..."
        tap.write("[pretrain] epoch 1/3 loss 2.0000\n")
        assert info() == "pretraining..."
        tap.write("pretrained backbone ready (source_test_top1 0.900)\n")
        assert info().startswith("starting ")
        tap.write("[0123456789abcdef smn seed=0] epoch 1/2 loss 3.7100 density 0.999 eta 4s\n")
        assert info() == "0 failed"
    res = SimpleNamespace(cpus_per_worker=1, workers=1, max_concurrent_cells=2)
    with RunProgress(4, "sw", stream=io.StringIO(), resources=res) as tap:
        tap.write("sweep sw: 4 cells, 3 already in the ledger, 1 to run now\n")
        tap.ray_started(local=False)
        assert tap.progress.tasks[0].fields["info"] == "starting 1 trial..."
    with RunProgress(1, "one", stream=io.StringIO(), resources=res) as tap:
        tap.write("experiment one: 1 cell, 0 already in the ledger, 1 to run\n")  # the singular line is read too
        assert tap.todo == 1 and tap.progress.tasks[0].fields["info"] == "starting Ray..."


@pytest.mark.unit
def test_plurals():
    from orchestrator.cli.progress import plural

    assert plural(1, "cell") == "1 cell" and plural(0, "cell") == "0 cells" and plural(2, "trial") == "2 trials"


@pytest.mark.unit
def test_ray_driver_log_goes_to_its_file_and_warnings_stay_one_line(tmp_path, monkeypatch, capsys):
    import logging

    from orchestrator.cli.progress import ray_log

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    logger = logging.getLogger("ray")
    before = logger.handlers[:]
    started, warned = [], []
    with ray_log(warn=warned.append, on_start=started.append) as handler:
        logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
        logging.getLogger("ray.tune").warning("something odd\nwith a second line")
    assert logger.handlers == before  # Ray's own handlers are back
    assert started == [True] and handler.path == str(tmp_path / "smn_driver.log")
    text = (tmp_path / "smn_driver.log").read_text()
    assert "INFO ray._private.worker" in text and "Started a local Ray instance." in text and "second line" in text
    assert warned == [f"ray warning: something odd (details: {handler.path})"]
    assert "Started" not in capsys.readouterr().err


@pytest.mark.unit
def test_knn_bank_note_is_one_line_in_smn_words():
    import json

    import pandas as pd

    from orchestrator.cli.progress import knn_bank_note

    def rows(bank: int, k: int, n: int) -> pd.DataFrame:
        cfg = json.dumps({"eval": {"knn_k": k, "knn_dino_k": 20}})
        return pd.DataFrame([{"cell_id": f"{i:016x}", "metric": m, "value": v, "config_json": cfg}
                             for i in range(n) for m, v in (("knn_min_class_bank", bank), ("knn_top1", 0.5))])

    note = knn_bank_note(rows(45, 200, 3))
    assert note == ("note: eval.knn_k = 200 is more than the 45 train images of the smallest class in 3 of 3 cells: "
                    "those k-NN votes reach into other classes (a k of 20, as DINO's knn_dino_k, suits small banks)")
    assert "\n" not in note and "1 of 1 cell:" in knn_bank_note(rows(10, 200, 1))
    assert knn_bank_note(rows(45, 20, 3)) is None and knn_bank_note(pd.DataFrame()) is None
