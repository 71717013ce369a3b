"""Where a mask store's files are and what a task may be called: the store's layout without torch.

The HTTP gateway of ``smn serve`` (:mod:`orchestrator.serve.gateway`) checks task names and task files with these,
so that its process never imports torch; :mod:`orchestrator.store.mask_store` (the store itself) builds on them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from orchestrator.results.layout import filesystem

__all__ = ["STORE_FORMAT", "TASK_SUFFIX", "StoreError", "StoreLayout", "validate_task_name", "exists"]

STORE_FORMAT = "smn-store/1"
TASK_SUFFIX = ".smnmask"
_TASK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StoreError(ValueError):
    """A store operation refused: no store there, store exists already, unknown or duplicate task."""


def validate_task_name(task: str) -> str:
    """Return ``task`` if it is a valid task name, else raise.

    Raises:
        StoreError: names must be 1-128 characters of letters, digits, ``.``, ``_``, ``-``, starting
            with a letter or digit.
    """
    if not isinstance(task, str) or not _TASK_RE.fullmatch(task):
        raise StoreError(f"task name {task!r} is not allowed; use 1-128 characters of letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return task


@dataclass(frozen=True)
class StoreLayout:
    """Where a store's files live (paths inside :attr:`fs`; the files are listed in
    :mod:`orchestrator.store.mask_store`).

    Build it with :meth:`of` from the store's folder or URI.
    """

    fs: pafs.FileSystem
    root: str

    @classmethod
    def of(cls, location: str) -> "StoreLayout":
        """The layout of the store at ``location`` (a folder or a ``pyarrow.fs`` URI).

        Raises:
            ValueError: if the URI's filesystem is not supported by pyarrow.
        """
        fs, root = filesystem(str(location))
        return cls(fs, root.rstrip("/"))

    @property
    def meta(self) -> str:
        """``store.json``."""
        return f"{self.root}/store.json"

    @property
    def backbone(self) -> str:
        """``backbone.safetensors``."""
        return f"{self.root}/backbone.safetensors"

    @property
    def tasks(self) -> str:
        """The ``tasks/`` folder."""
        return f"{self.root}/tasks"

    def task(self, task: str) -> str:
        """``tasks/<task>.smnmask`` (the name checked by :func:`validate_task_name`)."""
        return f"{self.tasks}/{validate_task_name(task)}{TASK_SUFFIX}"


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether anything (a file or a folder) is at ``path`` of ``fs``."""
    return fs.get_file_info(path).type != pafs.FileType.NotFound
