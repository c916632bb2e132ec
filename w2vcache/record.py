"""What a run did, written next to its results so it can be traced and repeated."""

import datetime
import json
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


def write_json(path, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
