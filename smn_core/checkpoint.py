"""Pickle-free checkpoints: tensors in safetensors, metadata in JSON, written atomically.

A checkpoint is a folder with ``tensors.safetensors`` and ``meta.json``. Both are written to
temporary names and renamed, so a reader never sees a half-written checkpoint (``meta.json`` is
written last, so a folder holding only the tensors is not a checkpoint yet).

Every function takes a local path (an NFS mount is one) or a URI that ``pyarrow.fs`` understands
(``s3://bucket/prefix/...``, ``file:///...``; for S3 the endpoint and credentials come from the URI's
query, e.g. ``?endpoint_override=host:port&scheme=http``, or from the ``AWS_*`` environment variables).
Every file goes through :func:`atomic_write`, the one atomic write of the project (the orchestrator's
ledger, curves, failure records, figures and mask store call it too): a temporary sibling, then a move
(``os.replace`` semantics on a local disk), except on object stores (S3, GCS), where an object appears
whole when its upload completes and a "move" would be a copy, so the object is written in place.

This module imports neither torch nor ray at import time (``safetensors.torch`` is imported by the
functions that handle tensors), so that ledger readers (``smn table``) can use :func:`atomic_write`
without loading PyTorch.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

if TYPE_CHECKING:
    import torch

__all__ = ["save_checkpoint", "load_checkpoint", "has_checkpoint", "delete_checkpoint", "save_tensors",
           "load_tensors", "is_uri", "location_exists", "local_copy", "atomic_write", "location_join", "OBJECT_STORES"]

_TENSORS = "tensors.safetensors"
_META = "meta.json"
OBJECT_STORES = frozenset({"s3", "gcs"})
"""``pyarrow.fs`` type names whose writes are whole-object (no temporary name and move needed)."""


def is_uri(location: str | os.PathLike | None) -> bool:
    """True if ``location`` is a URI (``scheme://...``) rather than a local path."""
    return location is not None and "://" in os.fspath(location)


def _resolve(location: str | os.PathLike):
    """``(pyarrow filesystem, path inside it)`` of a URI.

    Raises:
        ValueError: if pyarrow does not support the URI's filesystem (names the URI).
    """
    try:
        return pafs.FileSystem.from_uri(os.fspath(location))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise ValueError(f"location {os.fspath(location)!r} is not a URI that pyarrow.fs supports: {exc}") from None


def location_join(base: str | os.PathLike, *parts: str) -> str:
    """``base/parts...`` for a local path or a URI, whose query is kept after the new path
    (``s3://b/p?x=y`` + ``name`` -> ``s3://b/p/name?x=y``). The one joiner of locations in smn.

    Do not build these with ``pathlib``: ``Path("s3://b/x")`` collapses the ``//``.
    """
    base = os.fspath(base)
    if "://" in base:
        split = urlsplit(base)
        return urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))
    return "/".join([base.rstrip("/") or "/", *parts]) if parts else base


def atomic_write(location: str | os.PathLike, blob: bytes, fs: pafs.FileSystem | None = None) -> str:
    """Write ``blob`` to ``location`` so that no reader ever sees half of it; the parent folder is created.

    Local disks and ``file://`` (and any filesystem with a cheap rename): written to a temporary sibling
    ``.<name>.<random>.tmp``, then moved into place, replacing an older file whole. Object stores
    (:data:`OBJECT_STORES`): written in place, as an object appears whole once its upload completes.

    Args:
        location: a local path or a ``pyarrow.fs`` URI; with ``fs``, a path inside ``fs`` (no scheme).
        blob: the file's bytes.
        fs: an already-resolved ``pyarrow.fs`` filesystem (e.g. ``ExperimentLayout.fs``), or None.

    Returns:
        The path written, inside its filesystem (an absolute path for a local file).

    Raises:
        ValueError: if ``location`` is a URI that pyarrow does not support.
        OSError: if the storage refuses the write.
    """
    if fs is not None:
        path = os.fspath(location)
    elif is_uri(location):
        fs, path = _resolve(location)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(location)
    folder = posixpath.dirname(path)
    fs.create_dir(folder, recursive=True)
    if fs.type_name in OBJECT_STORES:
        with fs.open_output_stream(path) as out:
            out.write(blob)
        return path
    tmp = f"{folder}/.{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(blob)
    fs.move(tmp, path)
    return path


def _fs_is_file(fs, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def _fs_read(fs, path: str, what: str) -> bytes:
    if not _fs_is_file(fs, path):
        raise FileNotFoundError(f"no {what} at {_where(fs, path)}")
    with fs.open_input_stream(path) as src:
        return src.read()


def _where(fs, path: str) -> str:
    """``scheme://path`` of a path inside a pyarrow filesystem, for messages."""
    return f"{fs.type_name}://{path}" if fs.type_name != "local" else path


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: tensor}`` to a ``.safetensors`` file atomically (tensors made contiguous, on CPU).

    ``path`` is a local path or a ``pyarrow.fs`` URI; missing parent folders are created.

    Raises:
        ValueError: if ``path`` is a URI that pyarrow does not support.
        OSError: if the file cannot be written (the storage's own error).
    """
    from safetensors.torch import save  # here, not at the top: importing this module must not load torch

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, save(clean, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file (no pickle) from a local path or a ``pyarrow.fs`` URI.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if the file is not a valid safetensors file (truncated, corrupted), or ``path`` is a URI
            that pyarrow does not support.
    """
    from safetensors.torch import load as load_bytes  # here: importing this module must not load torch
    from safetensors.torch import load_file

    if is_uri(path):
        fs, inner = _resolve(path)
        blob = _fs_read(fs, inner, "tensor file")
        try:
            return load_bytes(blob)
        except Exception as exc:  # safetensors raises SafetensorError on bad bytes
            raise ValueError(f"{os.fspath(path)} is not a readable safetensors file: {exc}") from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tensor file at {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path | str:
    """Save a checkpoint folder (tensors + JSON-serialisable ``meta``); returns the folder (a ``Path`` for a
    local folder, the URI string for a URI).

    Raises:
        ValueError: if ``folder`` is a URI that pyarrow does not support.
        OSError: if a file cannot be written (the storage's own error).
    """
    if is_uri(folder):
        folder = os.fspath(folder)
        save_tensors(location_join(folder, _TENSORS), tensors)
        atomic_write(location_join(folder, _META), json.dumps(meta, sort_keys=True).encode())  # meta last
        return folder
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / _TENSORS, tensors)
    atomic_write(folder / _META, json.dumps(meta, sort_keys=True).encode())  # meta last
    return folder


def has_checkpoint(folder: str | os.PathLike | None) -> bool:
    """True if ``folder`` (a local path or a ``pyarrow.fs`` URI) holds a complete checkpoint.

    Raises:
        ValueError: if ``folder`` is a URI that pyarrow does not support.
        OSError: if the URI's storage cannot be reached.
    """
    if folder is None:
        return False
    if is_uri(folder):
        fs, inner = _resolve(folder)
        inner = inner.rstrip("/")
        return _fs_is_file(fs, f"{inner}/{_TENSORS}") and _fs_is_file(fs, f"{inner}/{_META}")
    return (Path(folder) / _TENSORS).is_file() and (Path(folder) / _META).is_file()


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint folder written by :func:`save_checkpoint` (a local path or a ``pyarrow.fs`` URI).

    Raises:
        FileNotFoundError: if the folder is incomplete.
        ValueError: if a file is corrupted, or ``folder`` is a URI that pyarrow does not support.
    """
    if is_uri(folder):
        folder = os.fspath(folder)
        if not has_checkpoint(folder):
            raise FileNotFoundError(f"no complete checkpoint in {folder} (need {_TENSORS} and {_META})")
        fs, inner = _resolve(location_join(folder, _META))
        try:
            meta = json.loads(_fs_read(fs, inner, _META))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{location_join(folder, _META)} is corrupted: {exc}") from exc
        return load_tensors(location_join(folder, _TENSORS)), meta
    folder = Path(folder)
    if not has_checkpoint(folder):
        raise FileNotFoundError(f"no complete checkpoint in {folder} (need {_TENSORS} and {_META})")
    try:
        meta = json.loads((folder / _META).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / _META} is corrupted: {exc}") from exc
    return load_tensors(folder / _TENSORS), meta


def delete_checkpoint(folder: str | os.PathLike) -> None:
    """Remove a checkpoint folder and everything in it (a missing folder is fine).

    A local folder goes with ``shutil.rmtree`` (errors ignored, as a spent checkpoint left behind is
    harmless); a URI's folder through its ``pyarrow.fs`` filesystem (``delete_dir``).

    Raises:
        ValueError: if ``folder`` is a URI that pyarrow does not support.
    """
    if is_uri(folder):
        fs, inner = _resolve(folder)
        try:
            if fs.get_file_info(inner).type == pafs.FileType.Directory:
                fs.delete_dir(inner)
        except OSError:
            pass  # as for a local folder: a spent checkpoint left behind is harmless
        return
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def location_exists(location: str | os.PathLike) -> bool:
    """True if a file exists at ``location`` (a local path or a ``pyarrow.fs`` URI).

    Raises:
        ValueError: if ``location`` is a URI that pyarrow does not support.
        OSError: if the URI's storage cannot be reached.
    """
    if is_uri(location):
        fs, inner = _resolve(location)
        return _fs_is_file(fs, inner)
    return Path(location).is_file()


@contextlib.contextmanager
def local_copy(location: str | os.PathLike) -> Iterator[str]:
    """A local path holding the file at ``location``: the path itself for a local file, else a temporary
    copy of the URI's file (removed on exit), for readers that need a file name (weight loaders).

    Raises:
        FileNotFoundError: if there is no file at ``location``.
        ValueError: if ``location`` is a URI that pyarrow does not support.
    """
    if not is_uri(location):
        yield os.fspath(location)
        return
    fs, inner = _resolve(location)
    blob = _fs_read(fs, inner, "file")
    with tempfile.TemporaryDirectory(prefix="smn-fetch-") as tmp:
        path = os.path.join(tmp, posixpath.basename(inner.rstrip("/")) or "file")
        with open(path, "wb") as out:
            out.write(blob)
        yield path
