"""Where a store lives: local paths, fsspec URLs and zip packs, opened read-only as a zarr store.

`url_protocol` tells a URL from a path, `local_root` is the local directory that writing needs,
and `_open_group` opens the root group of a store given by path, URL, pack or zarr store object.
"""

from __future__ import annotations

import asyncio
import os
import re
import urllib.parse
import zipfile
from pathlib import Path
from typing import Any

import zarr
from zarr.storage import FsspecStore, LocalStore, ZipStore

from w2vcache.errors import W2VCacheError

# The fsspec package each common protocol needs, for the message when it is not installed.
FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
                   "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}


def local_root(path: str | os.PathLike) -> Path:
    """The local directory of a store path; writing needs one (locks live on the file system)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise W2VCacheError(f"store {text}: writing needs a local path (writer locks live on the "
                            f"local file system); write locally and copy the finished store")
    return Path(text)


def _store_label(path_or_store: Any) -> str:
    if isinstance(path_or_store, (str, os.PathLike)):
        return os.fspath(path_or_store)
    return str(path_or_store)


def url_protocol(url: str) -> str | None:
    """'s3' for 's3://bucket/x', the first protocol of a chained URL ('zip::https://...'), or None."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)(::|://)", url)
    return match[1].lower() if match and len(match[1]) > 1 else None  # 'C:\\x' is a path


def public_url(path: Any) -> str:
    """Where a store is, as recorded in provenance: an absolute local path, or the URL without
    credentials (user:password@, query strings such as pre-signed signatures)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    if url_protocol(text) is None:
        return str(Path(text).absolute())
    return "::".join(_without_credentials(part) for part in text.split("::"))  # zip::https://...


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme:
        return url  # a bare protocol name in a chain ("zip")
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _reading_store(path: Any, label: str) -> tuple[Any, bool]:
    """A read-only zarr store for `path`, and whether the caller owns it (must close it).

    Local directories open as a read-only LocalStore, a local zip file (a pack) as a ZipStore,
    anything else with a protocol as a read-only FsspecStore; a remote .zip is read in place
    through fsspec's zip file system (the server must answer range requests).
    """
    if not isinstance(path, str):
        return path, False  # a zarr Store (or StorePath) given by the caller
    protocol = url_protocol(path)
    if protocol == "file" and "::" not in path:
        path, protocol = path[len("file://"):], None
    if protocol is None:
        local = Path(path)
        if local.is_file():
            if not zipfile.is_zipfile(local):
                raise W2VCacheError(f"{label} is a file but not a zip pack; a store is a directory, "
                                    f"a .zip made by `w2vcache pack`, or a URL")
            return ZipStore(local, mode="r"), True
        if not local.is_dir():
            raise W2VCacheError(f"no store at {label}")
        return LocalStore(local, read_only=True), True
    if path.rstrip("/").lower().endswith(".zip") and "::" not in path:
        path = f"zip::{path.rstrip('/')}"
    try:
        return FsspecStore.from_url(path, read_only=True), True
    except ImportError as e:
        package = FSSPEC_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise W2VCacheError(f"reading {label} needs {package}: pip install {package} ({e})") from None
    except ValueError as e:
        raise W2VCacheError(_without_ranges(label, e) or f"cannot read {label}: {e}") from None
    except Exception as e:
        if _is_access_error(e):
            raise W2VCacheError(f"cannot read {label}: {type(e).__name__}: {e}") from None
        raise


def _without_ranges(label: str, e: Exception) -> str | None:
    """The refusal of a pack on a web server that ignores range requests, if that is what `e` is."""
    # fsspec's http files raise this ValueError when a server sends the whole file where a part
    # was asked for; a pack is read in place, a part at a time.
    if "support range requests" not in str(e):
        return None
    return (f"cannot read {label}: the web server does not answer range requests, which reading a pack "
            f"in place needs; serve the store's directory instead of its pack, or serve the pack from a "
            f"server that answers range requests (nginx, Apache, S3 and other object stores do)")


def _is_access_error(e: Exception) -> bool:
    """An error reaching a store (missing file, network, permission), as opposed to a bug."""
    if isinstance(e, (OSError, zipfile.BadZipFile, asyncio.TimeoutError)):
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(e, aiohttp.ClientError)


def _close_store(store: Any) -> None:
    """Release what opening a store took: a zip file's handle (other stores hold nothing)."""
    if isinstance(store, ZipStore) and store._is_open:
        store.close()


def _open_group(path_or_store: Any, label: str) -> tuple[zarr.Group, Any]:
    """The store's root group opened read-only, and the store object to close (or None)."""
    store, owned = _reading_store(path_or_store, label)
    try:
        return zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False), store if owned else None
    except FileNotFoundError:
        error = f"no store at {label} (no zarr v3 group there: {label}/zarr.json is missing)"
    except zipfile.BadZipFile as e:
        error = f"{label} is not a readable zip pack: {e}"
    except ValueError as e:
        error = _without_ranges(label, e) or f"{label} is not a readable zarr v3 store: {e}"
    except Exception as e:
        if not _is_access_error(e):
            raise
        error = f"cannot read {label}: {type(e).__name__}: {e}"
    if owned:
        _close_store(store)
    raise W2VCacheError(error)
