"""A local S3 for tests and benchmarks: moto's server on 127.0.0.1 and a count of the requests it answers.

:func:`moto_s3` starts ``moto.server.ThreadedMotoServer`` on a free port, creates a bucket and yields a
:class:`LocalS3`: a ``pyarrow.fs.S3FileSystem`` on it, the URI of a prefix in pyarrow's form, and
:class:`RequestLog`, which counts the requests by HTTP method from the one log line werkzeug writes per request
(``benchmarks/bench_ledger.py``'s GET figure and ``tests/test_compact.py``'s request bound both read it).
Plain Python: no torch, no Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import pyarrow.fs as pafs

__all__ = ["RequestLog", "LocalS3", "moto_s3"]


class RequestLog(logging.Handler):
    """The request lines of moto's server (werkzeug logs one line per request, ``"GET /bucket/key ..."``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, method: str = "GET") -> int:
        """Requests of one HTTP method since the last ``lines.clear()``."""
        return sum(f"{method} /" in line for line in self.lines)


@dataclass
class LocalS3:
    """A running local S3: its filesystem, bucket, endpoint ``host:port`` and request log."""

    fs: pafs.S3FileSystem
    bucket: str
    endpoint: str
    requests: RequestLog

    def uri(self, prefix: str) -> str:
        """``s3://test:test@<bucket>/<prefix>?endpoint_override=...&scheme=http&region=us-east-1``: a results
        URI that every pyarrow-based reader of smn accepts."""
        return (f"s3://test:test@{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"
                "&region=us-east-1")


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[LocalS3]:
    """Start moto's S3 server on 127.0.0.1 (a free port), create ``bucket``, count requests; stop it on exit.

    Raises:
        ImportError: moto is not installed (tests skip with ``pytest.importorskip("moto.server")`` first).
    """
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    requests = RequestLog()
    log = logging.getLogger("werkzeug")
    log.addHandler(requests)
    log.setLevel(logging.INFO)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                               access_key="test", secret_key="test", allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield LocalS3(fs, bucket, f"{host}:{port}", requests)
    finally:
        log.removeHandler(requests)
        log.setLevel(logging.ERROR)
        server.stop()
