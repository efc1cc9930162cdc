"""Paths and URIs: which filesystem a location is on, absolute local paths, atomic writes, checksums.

Every place that reads or writes run files (checkpoints, input files, the prepared dataset) goes through
here, so "is this a URI?" has one answer. A location is a local path or any URI pyarrow reads (``s3://``,
``gs://``, ``file://``).

>>> is_uri("s3://bucket/run"), is_uri("/data/run")
(True, False)
"""

from __future__ import annotations

import hashlib
import os
import uuid

import pyarrow.fs as pafs

READ_BLOCK = 8 << 20


def is_uri(location: str) -> bool:
    return "://" in location


def scheme(location: str) -> str:
    """``s3://`` for ``s3://bucket/x``, empty for a local path.

    >>> scheme("gs://b/x"), scheme("runs/x")
    ('gs://', '')
    """
    return location.split("://", 1)[0] + "://" if is_uri(location) else ""


def absolute(location: str) -> str:
    """A local path made absolute (Ray Train workers run in another working directory); URIs and "" unchanged."""
    return location if (not location or is_uri(location)) else os.path.abspath(os.path.expanduser(location))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) of a local path or URI."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def sha256(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str, text: str) -> None:
    """A local file that either has all of `text` or does not exist (written aside, then renamed into place)."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
