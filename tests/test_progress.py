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
