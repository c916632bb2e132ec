"""What a run did, written next to its results so it can be traced and repeated."""

import datetime
import json
from contextlib import contextmanager
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("w2vcache", "torch", "transformers", "zarr", "numcodecs", "numpy", "soundfile", "jiwer")


def versions() -> dict:
    """Python and the versions of the packages whose behaviour the results depend on."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


@contextmanager
def replacing(path, durable: bool = False):
    """A temporary name beside `path` to write to; renamed over `path` when the block succeeds, so
    a reader (or a kill mid-write) finds the old file or the new one, never half of one. The name
    holds host and pid: a runs directory on a shared file system has writers on several hosts.

    `durable`: the new file is on disk before the rename, so a crash of the host (not only of the
    process) cannot leave it empty. Records ask for it; checkpoints, which are large and written
    every epoch, do not (training would wait for the disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    with replacing(path, durable=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
