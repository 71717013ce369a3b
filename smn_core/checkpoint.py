"""Pickle-free checkpoints: tensors in safetensors, metadata in JSON, written atomically.

A checkpoint is a folder with ``tensors.safetensors`` and ``meta.json``. Both are written to
temporary names and renamed, so a reader never sees a half-written checkpoint (``meta.json`` is
written last, so a folder holding only the tensors is not a checkpoint yet).

Every function takes a local path (an NFS mount is one) or a URI that ``pyarrow.fs`` understands
(``s3://bucket/prefix/...``, ``file:///...``; for S3 the endpoint and credentials come from the URI's
query, e.g. ``?endpoint_override=host:port&scheme=http``, or from the ``AWS_*`` environment variables).
Local paths are written with ``os.replace``; on a URI's filesystem a file is written to a temporary
name and moved, except on object stores (S3, GCS), where an object appears whole when its upload
completes and a "move" would be a copy, so the object is written in place.
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
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "has_checkpoint", "delete_checkpoint", "save_tensors",
           "load_tensors", "is_uri", "location_exists", "local_copy"]

_TENSORS = "tensors.safetensors"
_META = "meta.json"
_OBJECT_STORES = ("s3", "gcs")


def is_uri(location: str | os.PathLike | None) -> bool:
    """True if ``location`` is a URI (``scheme://...``) rather than a local path."""
    return location is not None and "://" in os.fspath(location)


def _resolve(location: str | os.PathLike):
    """``(pyarrow filesystem, path inside it)`` of a URI.

    Raises:
        ValueError: if pyarrow does not support the URI's filesystem (names the URI).
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(os.fspath(location))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        raise ValueError(f"location {os.fspath(location)!r} is not a URI that pyarrow.fs supports: {exc}") from None


def _child(location: str | os.PathLike, name: str) -> str:
    """``location/name`` for a URI, keeping its query (``s3://b/p?x=y`` -> ``s3://b/p/name?x=y``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(os.fspath(location))
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def _fs_write(fs, path: str, blob: bytes) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if fs.type_name in _OBJECT_STORES:
        with fs.open_output_stream(path) as out:
            out.write(blob)
        return
    tmp = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as out:
        out.write(blob)
    fs.move(tmp, path)


def _fs_is_file(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


def _fs_read(fs, path: str, what: str) -> bytes:
    if not _fs_is_file(fs, path):
        raise FileNotFoundError(f"no {what} at {_where(fs, path)}")
    with fs.open_input_stream(path) as src:
        return src.read()


def _where(fs, path: str) -> str:
    """``scheme://path`` of a path inside a pyarrow filesystem, for messages."""
    return f"{fs.type_name}://{path}" if fs.type_name != "local" else path


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``{name: tensor}`` to a ``.safetensors`` file atomically (tensors made contiguous, on CPU).

    ``path`` is a local path or a ``pyarrow.fs`` URI; missing parent folders are created.

    Raises:
        ValueError: if ``path`` is a URI that pyarrow does not support.
        OSError: if the file cannot be written (the storage's own error).
    """
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if is_uri(path):
        fs, inner = _resolve(path)
        _fs_write(fs, inner, save(clean, metadata=metadata))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: save_file(clean, str(p), metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file (no pickle) from a local path or a ``pyarrow.fs`` URI.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if the file is not a valid safetensors file (truncated, corrupted), or ``path`` is a URI
            that pyarrow does not support.
    """
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
        save_tensors(_child(folder, _TENSORS), tensors)
        fs, inner = _resolve(_child(folder, _META))
        _fs_write(fs, inner, json.dumps(meta, sort_keys=True).encode())
        return folder
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / _TENSORS, tensors)
    _atomic_write(folder / _META, lambda p: p.write_text(json.dumps(meta, sort_keys=True)))
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
        fs, inner = _resolve(_child(folder, _META))
        try:
            meta = json.loads(_fs_read(fs, inner, _META))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{_child(folder, _META)} is corrupted: {exc}") from exc
        return load_tensors(_child(folder, _TENSORS)), meta
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
        import pyarrow.fs as pafs

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
