"""What a run did, written next to its results so it can be traced and repeated."""

import datetime
import json
from contextlib import contextmanager
import os
import platform
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
def replacing(path):
    """A temporary name beside `path` to write to; renamed over `path` when the block succeeds, so
    a reader (or a kill mid-write) finds the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, obj) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
