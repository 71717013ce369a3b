"""Progress bars for ``smn run`` in a terminal (rich), plain lines everywhere else.

The cells run in Ray workers, which print one plain line per epoch (``[<cell_id> <label>] epoch 3/8 loss
4.61 density 0.97 eta 107s``, from :mod:`smn_core.training`'s ``progress`` callback; ``[pretrain] epoch ...``
for pretraining); Ray forwards those lines to the driver's stdout, and the driver prints its own lines per
finished cell (``[k/N cells done ...]``) or per sweep event (``d done, r running, p pending, f failed; best
...``). When stdout is a terminal, :func:`run_progress` taps the driver's stdout: every line is still
printed (above the bars), and the lines it recognises drive rich bars: one for the run as a whole (cells
done of all, running, failed, best so far) and one per training cell or pretraining (epochs, loss,
density, ETA). When stdout is not a terminal (``ray job logs``, CI, a pipe) nothing changes: one plain
line per epoch. ``smn run --quiet`` prints no progress at all (:mod:`orchestrator.cli.report`).

Reading the lines keeps the bars free of any hook in the engine: a line the tap does not recognise is
printed as it is, and its bar simply does not move.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import Iterator, TextIO

__all__ = ["RunProgress", "run_progress", "wants_bars"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EPOCH = re.compile(r"\[(?P<key>[^\[\]]+)\] epoch (?P<k>\d+)/(?P<n>\d+) "
                    r"loss (?P<loss>[-\d.e+naif]+)(?: density (?P<density>[\d.]+))?(?: eta (?P<eta>\d+)s)?")
_CELLS_DONE = re.compile(r"\[(?P<k>\d+)/(?P<n>\d+) cells done[^\]]*\] (?P<cell>[0-9a-f]{16})(?P<rest>.*)")
_SWEEP = re.compile(r"(?P<done>\d+) done, (?P<running>\d+) running, (?P<pending>\d+) pending, (?P<failed>\d+) failed"
                    r"(?:; best (?P<metric>\S+) (?P<best>[\d.]+))?")
_ALREADY = re.compile(r"(?P<total>\d+) cells.*?, (?P<skipped>\d+) already in the ledger")
_DONE_IN = re.compile(r"\[(?P<key>[^\[\]]+)\] done in \d")
_CELL_ID = re.compile(r"\b[0-9a-f]{16}\b")
_BEST = re.compile(r"knn_top1 (?P<v>[\d.]+)")


def wants_bars(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stdout) is a terminal, where bars replace nothing but add to the lines."""
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class RunProgress(io.TextIOBase):
    """A stdout tap for one ``smn run``: prints every line above rich bars and moves the bars from the lines.

    Args:
        total: cells of the run (all of them, those the ledger holds included; None: not known).
        name: the experiment's name.
        stream: the terminal (default: the current stdout).
    """

    def __init__(self, total: int | None, name: str, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        super().__init__()
        self.stream = stream or sys.stdout
        self.console = Console(file=self.stream, force_terminal=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, redirect_stdout=False, redirect_stderr=False,
                                 refresh_per_second=4)
        self.overall = self.progress.add_task(f"{name}: cells", total=total, info="")
        self.tasks: dict[str, int] = {}
        self.failed = 0
        self.best: float | None = None
        self.skipped = 0
        self._buf = ""

    def writable(self) -> bool:  # noqa: D401 - io protocol
        """A tap is writable."""
        return True

    def write(self, text: str) -> int:
        """Print complete lines above the bars (and read them); keep a partial line for later."""
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self.feed(line)
        return len(text)

    def flush(self) -> None:
        """Flush the terminal."""
        self.stream.flush()

    def isatty(self) -> bool:
        """The tap stands for a terminal."""
        return True

    def feed(self, line: str) -> None:
        """Print one line above the bars and move the bars it speaks of."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        plain = _ANSI.sub("", line)
        if (m := _EPOCH.search(plain)) is not None:
            key = m["key"]
            if key not in self.tasks:
                cid = _CELL_ID.search(key)
                label = "pretraining" if key == "pretrain" else (
                    f"{' '.join(_CELL_ID.sub('', key).split())} {cid.group(0)[:8]}" if cid else key).strip()
                self.tasks[key] = self.progress.add_task(f"  {label}: epochs", total=int(m["n"]), info="")
            info = f"loss {float(m['loss']):.3f}" + (f" density {float(m['density']):.3f}" if m["density"] else "")
            self.progress.update(self.tasks[key], completed=int(m["k"]), info=info)
        elif (m := _CELLS_DONE.search(plain)) is not None:
            self.failed += "FAILED" in m["rest"]
            if (b := _BEST.search(m["rest"])) is not None:
                self.best = max(self.best or 0.0, float(b["v"]))
            self._finish_cell(m["cell"])
            self.progress.update(self.overall, completed=int(m["k"]), info=self._info(running=None))
        elif (m := _SWEEP.search(plain)) is not None:
            self.failed = int(m["failed"])
            if m["best"]:
                self.best = float(m["best"])
            if (c := re.search(r"<- (?:finished|FAILED) (.*)$", plain)) is not None:
                for key in [k for k in self.tasks if k != "pretrain"]:
                    if " ".join(_CELL_ID.sub("", key).split()) == c.group(1).strip():
                        self._finish_cell(key)
            self.progress.update(self.overall, completed=self.skipped + int(m["done"]) + int(m["failed"]),
                                 info=self._info(running=int(m["running"])))
        elif (m := _ALREADY.search(plain)) is not None:
            self.skipped = int(m["skipped"])
            self.progress.update(self.overall, completed=self.skipped, info=self._info(running=None))
        elif (m := _DONE_IN.search(plain)) is not None:  # a cascade expert: "[expert 4 <id> (...)] done in 311s"
            self._finish_cell(m["key"])
        elif "pretrained backbone ready" in plain and "pretrain" in self.tasks:
            self._finish_cell("pretrain")

    def _finish_cell(self, key: str) -> None:
        for k in [k for k in self.tasks if k == key or key in k]:  # a cell id finishes its bar
            self.progress.remove_task(self.tasks.pop(k))

    def _info(self, running: int | None) -> str:
        parts = []
        if running is not None:
            parts.append(f"{running} running")
        parts.append(f"{self.failed} failed")
        if self.best is not None:
            parts.append(f"best knn {self.best:.3f}")
        return ", ".join(parts)

    def __enter__(self) -> "RunProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._buf:
            self.feed(self._buf)
            self._buf = ""
        self.progress.stop()


@contextlib.contextmanager
def run_progress(total: int | None, name: str, enabled: bool | None = None) -> Iterator[RunProgress | None]:
    """Bars for a run while the block runs, when stdout is a terminal (``enabled=None``) or when asked;
    otherwise nothing changes (plain lines). Yields the :class:`RunProgress` or None."""
    if enabled is None:
        enabled = wants_bars()
    if not enabled:
        yield None
        return
    with RunProgress(total, name) as tap, contextlib.redirect_stdout(tap):
        yield tap
