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

Before the first epoch the run's bar says what the run waits for: ``starting Ray``, ``starting 2 workers``
(``starting 2 trials`` for a sweep), ``pretraining``. Ray's own driver log records (``INFO worker.py --
Started a local Ray instance``, Tune's notices) go to a log file, ``smn_driver.log`` in the Ray session's log
folder (:func:`ray_log`), in every mode: neither onto the bars nor into a pipe (where ``smn`` also keeps Ray's
logger at warning level, :mod:`orchestrator.cli.app`); Ray's warnings are still shown, one line each.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterator, TextIO

__all__ = ["RunProgress", "run_progress", "wants_bars", "ray_log", "plural"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EPOCH = re.compile(r"\[(?P<key>[^\[\]]+)\] epoch (?P<k>\d+)/(?P<n>\d+) "
                    r"loss (?P<loss>[-\d.e+naif]+)(?: density (?P<density>[\d.]+))?(?: eta (?P<eta>\d+)s)?")
_CELLS_DONE = re.compile(r"\[(?P<k>\d+)/(?P<n>\d+) cells done[^\]]*\] (?P<cell>[0-9a-f]{16})(?P<rest>.*)")
_SWEEP = re.compile(r"(?P<done>\d+) done, (?P<running>\d+) running, (?P<pending>\d+) pending, (?P<failed>\d+) failed"
                    r"(?:; best (?P<metric>\S+) (?P<best>[\d.]+))?")
_ALREADY = re.compile(r"(?P<total>\d+) cells?\b.*?, (?P<skipped>\d+) already in the ledger(?:, (?P<todo>\d+) to run)?")
_RAY_STARTED = ("Started a local Ray instance", "Connected to Ray cluster")


def plural(n: int, word: str, words: str | None = None) -> str:
    """``"1 cell"``, ``"2 cells"``: ``n`` and the word, plural unless ``n == 1`` (``words``: an irregular plural)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


class _RayLogHandler(logging.Handler):
    """Ray's driver log records during a run: INFO and below to ``smn_driver.log`` (in the Ray session's log
    folder once there is one, else the temp folder), a warning or error also to ``warn`` as one line; the
    start-up record calls ``on_start(local)``."""

    def __init__(self, warn: Callable[[str], None], on_start: Callable[[bool], None] | None) -> None:
        super().__init__(logging.DEBUG)
        self.warn, self.on_start = warn, on_start
        self.path: str | None = None
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)s -- %(message)s"))

    def _log_path(self) -> str:
        folder = tempfile.gettempdir()
        try:  # the Ray session's logs folder, beside Ray's own driver and worker logs
            import ray._private.worker as ray_worker

            node = getattr(ray_worker, "_global_node", None)
            if node is not None:
                folder = node.get_logs_dir_path()
        except Exception:  # noqa: BLE001 - a log location is a convenience, never a failure
            pass
        return os.path.join(folder, "smn_driver.log")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if self.path is None:
                self.path = self._log_path()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(_ANSI.sub("", self.format(record)) + "\n")
            if record.levelno >= logging.WARNING:
                first = _ANSI.sub("", message).strip().splitlines()
                self.warn(f"ray {record.levelname.lower()}: {first[0] if first else ''} (details: {self.path})")
            if self.on_start is not None and message.startswith(_RAY_STARTED):
                self.on_start(message.startswith(_RAY_STARTED[0]))
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


@contextlib.contextmanager
def ray_log(warn: Callable[[str], None] | None = None,
            on_start: Callable[[bool], None] | None = None) -> Iterator[_RayLogHandler]:
    """While the block runs, Ray's driver logger (``"ray"``, Tune's included) writes to ``smn_driver.log`` instead
    of the console; warnings are also passed to ``warn`` (default: a line on stderr). Yields the handler (its
    ``path`` is the log file once a record was written). The logger's own handlers come back afterwards."""
    logger = logging.getLogger("ray")
    saved, propagate = logger.handlers[:], logger.propagate
    handler = _RayLogHandler(warn or (lambda line: print(line, file=sys.stderr)), on_start)
    logger.handlers, logger.propagate = [handler], False
    try:
        yield handler
    finally:
        logger.handlers, logger.propagate = saved, propagate
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
        resources: the spec's ``resources`` (``cpus_per_worker``, ``max_concurrent_cells``), to say how many
            workers start; None: the phase says "starting workers".

    ``phase`` is what the run waits for before its first epoch (shown in the run's bar): ``"reading the
    ledger"``, then ``"starting Ray"``, ``"starting N workers"`` (``trials`` for a sweep), ``"pretraining"``;
    empty once a cell trains.
    """

    def __init__(self, total: int | None, name: str, stream: TextIO | None = None, resources: Any = None) -> None:
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
        self.resources = resources
        self.todo: int | None = None
        self.sweep = False
        self.phase = "reading the ledger"
        self._buf = ""
        self.progress.update(self.overall, info=self._info(running=None))

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
            self._set_phase("pretraining" if key == "pretrain" else "")
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
            if (c := re.search(r"<- (?:finished|stopped early|FAILED) (.*)$", plain)) is not None:
                for key in [k for k in self.tasks if k != "pretrain"]:
                    if " ".join(_CELL_ID.sub("", key).split()) == c.group(1).strip():
                        self._finish_cell(key)
            self.progress.update(self.overall, completed=self.skipped + int(m["done"]) + int(m["failed"]),
                                 info=self._info(running=int(m["running"])))
        elif (m := _ALREADY.search(plain)) is not None:
            self.skipped = int(m["skipped"])
            self.sweep = plain.startswith("sweep ")
            self.todo = int(m["todo"]) if m["todo"] else None
            self.phase = "" if self.todo == 0 else ("starting Ray" if not _ray_up() else self._workers_phase(None))
            self.progress.update(self.overall, completed=self.skipped, info=self._info(running=None))
        elif plain.startswith("pretraining "):
            self._set_phase("pretraining")
        elif (m := _DONE_IN.search(plain)) is not None:  # a cascade expert: "[expert 4 <id> (...)] done in 311s"
            self._finish_cell(m["key"])
        elif "pretrained backbone ready" in plain:
            if "pretrain" in self.tasks:
                self._finish_cell("pretrain")
            self._set_phase(self._workers_phase(None) if self.phase == "pretraining" else self.phase)

    def ray_started(self, local: bool) -> None:
        """Ray is up (a local instance started, or a cluster joined): the run now waits for its workers."""
        self._set_phase(self._workers_phase(os.cpu_count() if local else None))

    def _workers_phase(self, cpus: int | None) -> str:
        """``"starting N workers"``: the cells to run, no more than ``max_concurrent_cells`` nor, on a local Ray of
        ``cpus`` CPUs, than fit; ``"starting workers"`` when the count is not known."""
        what = "trials" if self.sweep else "workers"
        n = float(self.todo) if self.todo else math.inf
        res = self.resources
        if res is not None:
            n = min(n, getattr(res, "max_concurrent_cells", None) or math.inf)
            per = float(getattr(res, "cpus_per_worker", 1) or 0)
            if cpus and per > 0 and getattr(res, "workers", 1) == 1:
                n = min(n, max(1, int(cpus / per + 1e-6)))
        return f"starting {plural(int(n), what[:-1], what)}" if math.isfinite(n) else f"starting {what}"

    def _set_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.progress.update(self.overall, info=self._info(running=None))

    def _finish_cell(self, key: str) -> None:
        for k in [k for k in self.tasks if k == key or key in k]:  # a cell id finishes its bar
            self.progress.remove_task(self.tasks.pop(k))

    def _info(self, running: int | None) -> str:
        if self.phase:  # before the first epoch: what the run waits for
            return self.phase + "..."
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


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


@contextlib.contextmanager
def run_progress(total: int | None, name: str, enabled: bool | None = None,
                 resources: Any = None) -> Iterator[RunProgress | None]:
    """Bars for a run while the block runs, when stdout is a terminal (``enabled=None``) or when asked;
    otherwise plain lines. Either way Ray's driver log goes to its file (:func:`ray_log`). Yields the
    :class:`RunProgress` or None. ``resources``: the spec's, for the "starting N workers" phase."""
    if enabled is None:
        enabled = wants_bars()
    if not enabled:
        with ray_log():
            yield None
        return
    with RunProgress(total, name, resources=resources) as tap, contextlib.redirect_stdout(tap), \
            ray_log(warn=tap.feed, on_start=tap.ray_started):
        yield tap


def knn_bank_note(rows) -> str | None:
    """One line, in smn's words, when a k-NN ``k`` of the experiment's cells exceeds the smallest class's bank of
    train images (ledger metric ``knn_min_class_bank``); None when none does.

    ``rows``: the experiment's ledger frame (:func:`orchestrator.results.ledger.read_ledger`). The workers do not
    warn (``smn_core.pipeline.SmallKnnBankWarning`` is recorded, not raised): the driver says it once per run.
    """
    import json

    if rows is None or len(rows) == 0 or "metric" not in rows:
        return None
    banks = rows[rows["metric"] == "knn_min_class_bank"]
    over: dict[tuple[str, int], list[int]] = {}
    for cid, cell in banks.groupby("cell_id"):
        bank = int(cell["value"].iloc[0])
        ev = json.loads(cell["config_json"].iloc[0]).get("eval", {})
        for key in ("knn_k", "knn_dino_k"):
            k = ev.get(key)
            if isinstance(k, int) and k > bank:
                over.setdefault((key, k), []).append(bank)
    if not over:
        return None
    n = banks["cell_id"].nunique()
    parts = [f"eval.{key} = {k} is more than the {min(b)} train images of the smallest class in "
             f"{len(b)} of {plural(n, 'cell')}" for (key, k), b in sorted(over.items())]
    return ("note: " + "; ".join(parts) + ": those k-NN votes reach into other classes "
            "(a k of 20, as DINO's knn_dino_k, suits small banks)")
