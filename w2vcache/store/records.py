"""The records of the runs that wrote a store: one group per run, `_runs/<kind>-<time>-<host>-<pid>`,
its attributes saying what ran (command, config, versions, when it finished, what it did).

A group of its own per run, so concurrent writers (extraction shards, a copy beside them) never
race on one attribute file. Kinds: extract, copy, repair, pack.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import zarr

from w2vcache import record

from .location import local_root

RUNS_GROUP = "_runs"


def run_name(kind: str) -> str:
    """A new run's group name: its kind, when, and which host and process."""
    return f"{kind}-{record.now().replace(':', '').replace('+', '')}-{socket.gethostname()}-{os.getpid()}"


def write_run_record(root: str | os.PathLike, kind: str, fields: dict) -> None:
    """Record a run in the local store at `root`: `fields`, with the command line, the versions
    and the time it finished."""
    attrs = {"command": record.command_line(), **fields, "versions": record.versions(), "finished": record.now()}
    # A plain path: zarr opens file:// through fsspec, which does not make the record's folders.
    root, name = local_root(root), run_name(kind)
    # One process may record twice in a second (a copy of a copy holds its source's records too).
    taken = {p.name for p in (Path(root) / RUNS_GROUP).glob(f"{name}*")}
    name = next(f"{name}{suffix}" for suffix in ("", *(f".{i}" for i in range(2, len(taken) + 2)))
                if f"{name}{suffix}" not in taken)
    group = zarr.open_group(str(root), path=f"{RUNS_GROUP}/{name}", mode="a", zarr_format=3)
    group.attrs.put(json.loads(json.dumps(attrs, default=str)))


def run_records(store, kind: str | None = None) -> dict[str, dict] | None:
    """The store's run records by group name, those of one kind when given; {} when it has none,
    None where it cannot list them (a plain http server without an index page)."""
    try:
        runs = store._root[RUNS_GROUP]
    except KeyError:
        return {}
    except Exception:  # a remote store refusing the lookup (403 without list rights, 5xx, no network)
        return None
    try:
        return {name: group.attrs.asdict() for name, group in runs.groups()
                if kind is None or name.startswith(f"{kind}-")}
    except Exception:  # listing a remote store: fsspec's errors differ by protocol
        return None


def latest(records: dict[str, dict] | None, has=lambda r: True) -> dict | None:
    """The last finished of `records` for which `has` holds; None if none does."""
    found = [r for r in (records or {}).values() if has(r)]
    return max(found, key=lambda r: str(r.get("finished", ""))) if found else None


def has_records(root: Path, kind: str, where=lambda attributes: True) -> bool:
    """Whether the local store at `root` holds a record of this kind (one whose attributes `where` holds for)."""
    for path in (Path(root) / RUNS_GROUP).glob(f"{kind}-*/zarr.json"):
        try:
            attributes = json.loads(path.read_text()).get("attributes") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if where(attributes):
            return True
    return False
