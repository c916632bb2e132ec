"""Writer locks: <store>/.locks/<name>.lock holding {pid, host, started, pid_start, pid_ns,
heartbeat_s}.

One lock for the whole store or one per shard, a create lock that serialises creation, pid
liveness (`pid_alive`), and the takeover of a stale lock whose holder is dead: provably, by its
pid, on the same host; on another host (or in another container), when it has stopped renewing
the lock. `try_lock` offers the same lock to others (a sweep locks each run directory with it).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from w2vcache.errors import W2VCacheError

LOCK_DIR = ".locks"
ALL_LOCK = "all"
CREATE_LOCK = "create"
CREATE_WAIT_S = 600  # how long a creator waits for another live creator before giving up
BREAKER_STALE_S = 30  # a stale-lock breaker older than this was killed mid-way (it takes ms)
# A holder touches its lock file this often, from a thread, while it holds it. Another host cannot
# see whether the holder's pid lives, so a lock untouched for SILENT_AFTER_S (by the file system's
# clock, not the hosts', which may differ) is a dead holder's, and is taken over: a node lost with
# its job, or a process killed with SIGKILL in another container. Ten missed beats: a holder
# merely slow (a loaded host, a long step) is never taken for dead.
HEARTBEAT_S = 60.0
SILENT_AFTER_S = 600.0


def _pid_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), to tell a reused pid from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has finished: not alive


def pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would signal the process on Windows; assume it lives
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if Path("/proc").is_dir():
        return _pid_start(pid) is not None
    return True


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux: 'pid:[4026531836]'). Containers sharing a hostname
    (host networking) see each other's pids as absent or as someone else's: a holder in another
    namespace is treated as on another host, never proved dead by its pid."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_alive(holder: dict, lock_path: Path) -> bool:
    """False only when the holder is dead: on the same host and pid namespace, its pid gone or
    reused; elsewhere, its lock silent for SILENT_AFTER_S (a lock written by a w2vcache without
    heartbeats is trusted, as that w2vcache did)."""
    if holder.get("host") != socket.gethostname() or (
            holder.get("pid_ns") is not None and holder.get("pid_ns") != _pid_namespace()):
        return not _silent(holder, lock_path)
    pid = holder.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    started = holder.get("pid_start")
    return started is None or started == _pid_start(pid)


def _silent(holder: dict, lock_path: Path) -> bool:
    """Whether a beating holder has not touched its lock for SILENT_AFTER_S (and ten of its beats)."""
    beat = holder.get("heartbeat_s")
    if not isinstance(beat, (int, float)) or beat <= 0:
        return False
    now = _file_system_now(lock_path.parent)
    try:
        age = None if now is None else now - lock_path.stat().st_mtime
    except FileNotFoundError:
        return True  # released meanwhile: nothing is held, and the caller takes it
    except OSError:
        return False
    return age is not None and age > max(SILENT_AFTER_S, 10 * beat)


def _file_system_now(directory: Path) -> float | None:
    """The time as the file system stamps it (a shared file system's server may disagree with
    this host's clock): the modification time of a file made for the purpose; None if no file
    can be made there (then nothing is judged by age)."""
    probe = directory / f".now.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def _shard_of_lock(name: str) -> tuple[int, int] | None:
    """ "shard-i-of-n" -> (i, n); None for any other name."""
    match = re.fullmatch(r"shard-(\d+)-of-(\d+)", name)
    return (int(match[1]), int(match[2])) if match and int(match[2]) > 0 else None


def _locks_conflict(a: str, b: str) -> bool:
    """Whether two writer locks may own a common block (other lock names never conflict)."""
    if a == ALL_LOCK or b == ALL_LOCK:
        return all(name == ALL_LOCK or _shard_of_lock(name) for name in (a, b))
    shard_a, shard_b = _shard_of_lock(a), _shard_of_lock(b)
    if shard_a is None or shard_b is None:
        return False
    (i, n), (j, m) = shard_a, shard_b
    # blocks b with b % n == i and b % m == j exist iff i == j (mod gcd(n, m))
    return (i - j) % math.gcd(n, m) == 0


def _lock_name(shard: tuple[int, int] | None) -> str:
    return ALL_LOCK if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


class _Lock:
    """One held lock file, touched every HEARTBEAT_S by a thread while held; `release` stops the
    thread and removes the file only if it is still ours. `lost` turns true when the thread finds
    the file gone or someone else's (taken over after this process was stopped or cut off for
    SILENT_AFTER_S): the holder must stop writing."""

    def __init__(self, path: Path, content: bytes):
        self.path, self.content = path, content
        self.lost = False
        self._released = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="w2vcache-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._released.wait(HEARTBEAT_S):
            try:
                if self.path.read_bytes() != self.content:
                    self.lost = True
                    return
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = not self._released.is_set()
                return
            except OSError:
                pass  # a passing file-system error: tried again at the next beat

    def check_held(self, what: str) -> None:
        """Refuse to write on to `what` (the store or run this lock guards) once the lock is lost."""
        if self.lost:
            raise W2VCacheError(
                f"{what}: this process lost its lock {self.path} (it went unrenewed for "
                f"{SILENT_AFTER_S / 60:.0f} minutes, as when a process is stopped, and another process took "
                "it over); it stops here without writing to it again, keeping what it finished")

    def still_ours(self) -> bool:
        """Whether the lock file is this process's now (looked at, not the heartbeat's last look)."""
        try:
            return not self.lost and self.path.read_bytes() == self.content
        except OSError:
            return False

    def release(self) -> None:
        self._released.set()
        try:
            if self.path.read_bytes() == self.content:
                self.path.unlink()
        except FileNotFoundError:
            pass
        try:
            self.path.parent.rmdir()  # leave no .locks behind once nobody writes
        except OSError:
            pass


def _read_holder(path: Path) -> tuple[bytes, dict] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = {}
    return raw, holder if isinstance(holder, dict) else {}


def held_by_another(root, name: str) -> bool:
    """Whether a live process other than this one holds lock `name` under `root` (nothing taken)."""
    path = Path(root) / LOCK_DIR / f"{name}.lock"
    found = _read_holder(path)
    if found is None:
        return False
    holder = found[1]
    mine = holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()
    return not mine and _holder_alive(holder, path)


def _busy_message(label: str, holder: dict, lock_path: Path) -> str:
    return (f"store {label} is being written by pid {holder.get('pid')} on host "
            f"{holder.get('host')} since {holder.get('started')} (lock {lock_path.name}); wait "
            f"for it to finish (a holder on another host that stops renewing the lock is taken for dead "
            f"after {SILENT_AFTER_S / 60:.0f} minutes; or delete {lock_path})")


def _break_stale(lock_path: Path, seen: bytes) -> None:
    """Remove a stale lock, unless someone replaced it since we read it.

    A second O_EXCL file serialises breakers, so two processes that both saw the same stale lock
    cannot remove each other's fresh lock.
    """
    breaker = lock_path.with_name(lock_path.name + ".breaking")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:  # by the file system's clock: breakers may run on other hosts
            now = _file_system_now(breaker.parent)
            if now is not None and now - breaker.stat().st_mtime > BREAKER_STALE_S:
                breaker.unlink()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return
    try:
        current = _read_holder(lock_path)
        if current is not None and current[0] == seen:
            lock_path.unlink()
    finally:
        os.close(fd)
        breaker.unlink(missing_ok=True)


def _try_lock(root: Path, name: str, label: str) -> _Lock | dict:
    """Take lock `name` (taking over a stale one); return it, or the live holder's record."""
    lock_dir = root / LOCK_DIR
    lock_path = lock_dir / f"{name}.lock"
    while True:
        content = json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "pid_start": _pid_start(os.getpid()), "pid_ns": _pid_namespace(), "lock": name,
            "heartbeat_s": HEARTBEAT_S,
        }).encode()
        lock_dir.mkdir(parents=True, exist_ok=True)
        # Write the record first, then link it into place: the link is atomic and fails if the lock
        # exists, so nobody ever reads a half-written lock.
        tmp = lock_dir / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(content)
            os.link(tmp, lock_path)
            return _Lock(lock_path, content)
        except FileExistsError:
            pass
        except FileNotFoundError:
            continue  # a releaser removed the empty .locks directory under us
        finally:
            tmp.unlink(missing_ok=True)
        found = _read_holder(lock_path)
        if found is None:
            continue
        raw, holder = found
        if _holder_alive(holder, lock_path):
            return holder
        _break_stale(lock_path, raw)


Lock = _Lock  # public name for holders outside the store (run directories: w2vcache/spread.py)


def try_lock(root, name: str) -> _Lock | dict:
    """Take lock `name` in `root`/.locks, taking over a stale one (its holder dead, as after kill -9
    here, or silent for SILENT_AFTER_S elsewhere); returns the held `Lock`, or the record of the live
    process holding it."""
    return _try_lock(Path(root), name, name)


def _acquire_writer_lock(root: Path, shard: tuple[int, int] | None, label: str) -> _Lock:
    name = _lock_name(shard)
    got = _try_lock(root, name, label)
    if isinstance(got, dict):
        raise W2VCacheError(_busy_message(label, got, root / LOCK_DIR / f"{name}.lock"))
    for other in sorted((root / LOCK_DIR).glob("*.lock")):
        other_name = other.name[: -len(".lock")]
        if other_name in (name, CREATE_LOCK) or not _locks_conflict(name, other_name):
            continue
        found = _read_holder(other)
        if found is not None and _holder_alive(found[1], other):
            got.release()
            raise W2VCacheError(_busy_message(label, found[1], other))
    return got


def _acquire_create_lock(root: Path, label: str) -> _Lock:
    deadline = time.monotonic() + CREATE_WAIT_S
    while True:
        got = _try_lock(root, CREATE_LOCK, label)
        if isinstance(got, _Lock):
            return got
        if time.monotonic() > deadline:
            raise W2VCacheError(_busy_message(label, got, root / LOCK_DIR / f"{CREATE_LOCK}.lock"))
        time.sleep(0.1)
