"""Where every file of an experiment lives: :class:`ExperimentLayout`, and the one experiment-name rule.

An experiment's results sit under one root, ``<results>/<experiment>/``. ``results`` is a local
path (an NFS mount on a cluster is one) or any URI that ``pyarrow.fs`` understands
(``s3://bucket/prefix?endpoint_override=host:port&scheme=http``, ``file:///...``). The layout is built
once, where the user's ``--results`` enters (the CLI or ``run_experiment``); everything downstream (the
engine, the ledger, the sweep, the cascade, Ray Train and Ray Tune storage) asks it for locations and
never rebuilds a path by hand.

| name | location (under ``<results>/<experiment>/``) | written by |
| --- | --- | --- |
| :meth:`ExperimentLayout.ledger_file` | ``ledger/<cell_id>.parquet`` | the cell's worker, last |
| :attr:`ExperimentLayout.compacted_dir` | ``ledger/_compacted/`` (``manifest.json``, ``part-*.parquet``) | ``smn ledger compact`` |
| :meth:`ExperimentLayout.mask` | ``masks/<cell_id>.safetensors`` | the cell's worker |
| :meth:`ExperimentLayout.state` | ``states/<cell_id>/`` (final trainable state) | the cell's worker |
| :meth:`ExperimentLayout.checkpoint` | ``checkpoints/<cell_id>/`` (epoch checkpoint, removed on landing) | the cell's worker |
| :meth:`ExperimentLayout.artifact` | ``artifacts/<name>`` (pretrained backbones) | a pretraining task |
| :meth:`ExperimentLayout.cascade` | ``cascade/<cell_id>/<file>`` (router, routes, expert embeddings) | cascade stages |
| :meth:`ExperimentLayout.curves` | ``curves/<cell_id>.parquet`` (per-epoch history) | the engine, on landing |
| :meth:`ExperimentLayout.failure` | ``failures/<cell_id>.json`` | the driver, after the last retry |
| :attr:`ExperimentLayout.quarantine_dir` | ``quarantine/`` (unreadable ledger files set aside) | ledger readers |
| :attr:`ExperimentLayout.ray_train` / :attr:`ExperimentLayout.tune` | ``ray_train/``, ``tune/`` | Ray Train / Tune |
| :meth:`ExperimentLayout.figure` | ``<results>/figures/<name>.png`` (results level) | ``smn plot`` |

Every location method returns a *location*: an absolute local path for local results, or a URI on the
same filesystem that keeps the results URI's query (``s3://b/r/exp/masks/c.safetensors?scheme=http``),
which :mod:`smn_core.checkpoint`, Ray Train and Ray Tune all accept. :meth:`ExperimentLayout.inner`
gives the same place as a path *inside* :attr:`ExperimentLayout.fs` (no scheme, no query), for direct
``pyarrow.fs`` calls. The URI is parsed once per process (:func:`filesystem` is cached); parts are joined
by :func:`smn_core.checkpoint.location_join`, the one joiner (it keeps a URI's query).

Every file is written through :func:`smn_core.checkpoint.atomic_write`, the project's one atomic write
(a temporary sibling, then a move; in place on object stores), so readers never see half a file.

:func:`check_experiment_name` is the one rule for an experiment's name, applied by the spec (``name:``),
by :meth:`ExperimentLayout.of` and by every ledger reader.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from smn_core.checkpoint import location_join

from orchestrator.spec.keys import config_hash

__all__ = ["ExperimentLayout", "filesystem", "normalise_results", "check_experiment_name",
           "check_results_uri", "figure_location", "pretrain_artifact_path"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def normalise_results(results: str | os.PathLike) -> str:
    """``results`` as the layout keeps it: a URI unchanged, a local path absolute and normalised.

    Ray workers may run in another working directory, so a relative path must be made absolute where the
    user typed it.
    """
    text = os.fspath(results)
    if "://" in text:
        return text
    return os.path.abspath(text)


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` of a local path or a URI (a relative path is made absolute
    first); the URI is parsed once per process.

    Raises:
        ValueError: if the URI's filesystem is not supported by pyarrow.
    """
    return _filesystem(normalise_results(location))


@functools.lru_cache(maxsize=64)
def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    fs, inner = _resolve(location, "results location")
    return fs, (inner.rstrip("/") or "/") if "://" in location else inner


def check_results_uri(results: str) -> str:
    """``results`` if it is a local path or a URI whose filesystem pyarrow supports (the storage itself is
    not contacted).

    Raises:
        ValueError: naming the URI and what is allowed.
    """
    if "://" in str(results):
        try:
            filesystem(results)
        except ValueError as exc:
            raise ValueError(f"{exc}; allowed: a folder, s3://bucket/prefix or another pyarrow.fs URI") from None
    return results


def check_experiment_name(experiment: str) -> str:
    """``experiment`` if it is a plain folder name: letters, digits, ``.``, ``_``, ``-``, starting with a
    letter or digit, no ``..``; so that nothing a reader, a writer or quarantine does can reach outside
    the results folder. The one rule for experiment names (specs, layouts, ledger readers).

    Raises:
        ValueError: naming the value and what is allowed.
    """
    if not isinstance(experiment, str) or not _NAME.fullmatch(experiment) or ".." in experiment:
        raise ValueError(f"experiment {experiment!r} is not a plain name; allowed: letters, digits, '.', '_', '-' "
                         "(an experiment folder directly under the results folder)")
    return experiment


def _resolve(location: str, what: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` of a local path or URI; ValueError names an unsupported URI."""
    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"{what} {location!r} is not supported: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(location)


def _check_part(name: str, experiment: str) -> None:
    if not name or name in (".", "..") or any(c in name for c in "?#") or "/" in name:
        raise ValueError(f"artifact path part {name!r} (experiment {experiment!r}) is not a plain name")


@dataclass(frozen=True)
class ExperimentLayout:
    """Every location of one experiment's files (see the module docstring for the table).

    Build it with :meth:`of` (which normalises ``results``); it is a small frozen value, cheap to pickle
    into Ray tasks, actors and Tune trials.

    Attributes:
        results: the normalised results location (absolute local path, or URI with its query).
        experiment: the experiment's name (a plain folder name).
    """

    results: str
    experiment: str

    @classmethod
    def of(cls, results: str | os.PathLike | "ExperimentLayout", experiment: str) -> "ExperimentLayout":
        """The layout of ``experiment`` under ``results`` (a path, a URI, or a layout whose root is kept).

        Raises:
            ValueError: if ``experiment`` is not a plain name (:func:`check_experiment_name`).
        """
        root = results.results if isinstance(results, ExperimentLayout) else normalise_results(results)
        return cls(root, check_experiment_name(experiment))

    # --- the filesystem -------------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        """The ``pyarrow.fs`` filesystem of the results (parsed once per process)."""
        return filesystem(self.results)[0]

    @property
    def is_uri(self) -> bool:
        """Whether the results are a URI (object store, ``file://``) rather than a local path."""
        return "://" in self.results

    def inner(self, *parts: str) -> str:
        """Path inside :attr:`fs` (no scheme, no query) of ``<experiment>/<parts...>``."""
        for p in parts:
            _check_part(p, self.experiment)
        return "/".join([filesystem(self.results)[1].rstrip("/"), self.experiment, *parts])

    def location(self, *parts: str) -> str:
        """Location (local path or URI) of ``<results>/<experiment>/<parts...>``.

        Raises:
            ValueError: if a part is empty, ``.``, ``..``, or holds ``/``, ``?`` or ``#``.
        """
        for p in parts:
            _check_part(p, self.experiment)
        return location_join(self.results, self.experiment, *parts)

    # --- named locations ------------------------------------------------------------------------
    @property
    def root(self) -> str:
        """``<results>/<experiment>``."""
        return self.location()

    @property
    def ledger_dir(self) -> str:
        """Inner path of the ledger folder (``<experiment>/ledger``)."""
        return self.inner("ledger")

    def ledger_file(self, cell_id: str) -> str:
        """Inner path of one cell's ledger file (``ledger/<cell_id>.parquet``)."""
        return self.inner("ledger", f"{cell_id}.parquet")

    @property
    def compacted_dir(self) -> str:
        """Inner path of the compacted ledger's folder (``ledger/_compacted``: merged cells, written by
        :mod:`orchestrator.results.compact`)."""
        return self.inner("ledger", "_compacted")

    def compacted(self, name: str) -> str:
        """Inner path of one file of the compacted ledger (``ledger/_compacted/<name>``: ``manifest.json``,
        ``part-<id>.parquet``)."""
        return self.inner("ledger", "_compacted", name)

    @property
    def failures_dir(self) -> str:
        """Inner path of the failure records' folder."""
        return self.inner("failures")

    def failure(self, cell_id: str) -> str:
        """Inner path of a cell's failure record (``failures/<cell_id>.json``)."""
        return self.inner("failures", f"{cell_id}.json")

    @property
    def quarantine_dir(self) -> str:
        """Inner path of the folder where unreadable ledger files are set aside."""
        return self.inner("quarantine")

    def curves(self, cell_id: str) -> str:
        """Inner path of a cell's per-epoch curves (``curves/<cell_id>.parquet``)."""
        return self.inner("curves", f"{cell_id}.parquet")

    def mask(self, cell_id: str) -> str:
        """Location of a finished cell's masks (``masks/<cell_id>.safetensors``)."""
        return self.location("masks", f"{cell_id}.safetensors")

    def probe(self, cell_id: str) -> str:
        """Location of a finished cell's linear-probe head (``probes/<cell_id>.safetensors``)."""
        return self.location("probes", f"{cell_id}.safetensors")

    def state(self, cell_id: str) -> str:
        """Location of a finished cell's final trainable state folder (``states/<cell_id>/``)."""
        return self.location("states", cell_id)

    def checkpoint(self, cell_id: str) -> str:
        """Location of a running cell's epoch checkpoint folder (``checkpoints/<cell_id>/``)."""
        return self.location("checkpoints", cell_id)

    def artifact(self, name: str) -> str:
        """Location of a shared artifact (``artifacts/<name>``, e.g. a pretrained backbone)."""
        return self.location("artifacts", name)

    def cascade(self, cell_id: str, *parts: str) -> str:
        """Location of a cascade stage's files (``cascade/<cell_id>/<parts...>``)."""
        return self.location("cascade", cell_id, *parts)

    @property
    def ray_train(self) -> str:
        """Ray Train's ``storage_path`` (a URI is given to Ray as it is)."""
        return self.location("ray_train")

    @property
    def tune(self) -> str:
        """Ray Tune's ``storage_path``."""
        return self.location("tune")

    def figure(self, name: str) -> str:
        """Location of a figure, at the results level: ``<results>/figures/<name>.png``."""
        return figure_location(self.results, name)


def figure_location(results: str, name: str) -> str:
    """``<results>/figures/<name>.png``, in the form ``results`` was given (``smn plot``'s default output).

    Raises:
        ValueError: if ``name`` is not a plain name.
    """
    _check_part(name, "figures")
    return location_join(os.fspath(results), "figures", f"{name}.png")


def pretrain_artifact_path(results: str | ExperimentLayout, experiment: str, cell) -> str:
    """Where the pipeline's pretrained backbone for ``cell`` (a ``CellConfig``) lives (a local path, or a URI
    for URI results): ``artifacts/pretrain-<key>.safetensors``, the key a hash of the arch and the ``pretrain``
    section, so cells that share them share one pretraining (read by ``smn run --dry-run`` without the engine)."""
    key = config_hash({"arch": cell.backbone.arch, "pretrain": dataclasses.asdict(cell.pretrain), "seed": 0})
    return ExperimentLayout.of(results, experiment).artifact(f"pretrain-{key}.safetensors")
