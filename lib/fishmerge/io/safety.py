"""What fishmerge may touch: path relations to the inputs, liveness locks, stale-leftover cleanup.

The rules (README, "What fishmerge will and will not touch"):
- fishmerge deletes or replaces only what it can prove it wrote: a Fisher store by its format
  attributes, a merge output by its marker, a staging folder by its name *and* a lock nobody holds;
- never a path that is an input, holds an input, or lies inside one.
A writer holds an exclusive `flock` on a lock file inside its staging folder for as long as it
lives (the kernel drops it when the process dies, SIGKILL included), so a leftover of a killed run
is told from the work of a live concurrent run without guessing from timestamps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from fishmerge.errors import FishmergeError

LOCK_NAME = ".fishmerge-lock"
UNLOCKED_GRACE_S = 60.0  # a staging folder created this recently without its lock may be starting up


def _real(p: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def relation(path: str | Path, other: str | Path) -> str | None:
    """'is', 'inside' (path lies in other), 'contains' (other lies in path), or None."""
    a, b = _real(path), _real(other)
    if a == b:
        return "is"
    if b in a.parents:
        return "inside"
    if a in b.parents:
        return "contains"
    return None


def check_not_input(path: str | Path, inputs: Iterable[tuple[str, str | None]], what: str, fix: str) -> None:
    """Refuse a path to be written that is, lies inside or contains an input (name, path) pair."""
    words = {"is": "is", "inside": "lies inside", "contains": "contains"}
    for name, p in inputs:
        if not p or "://" in str(p):
            continue
        rel = relation(path, p)
        if rel:
            raise FishmergeError(
                f"{what} '{path}' {words[rel]} the {name} at '{p}': fishmerge never writes over its inputs; {fix}"
            )


def is_empty_dir(path: str | Path) -> bool:
    """A real (not linked) folder holding nothing: there is nothing in it to lose."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and not any(p.iterdir())


def existing_ancestor(path: str | Path) -> Path:
    """The path itself or its nearest ancestor that exists (where a write would land first)."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    while not p.exists():
        p = p.parent
    return p


def probe_writable(folder: str | Path) -> None:
    """Raise OSError unless a file can be created in `folder`; the probe is an unnamed temporary
    file, so a kill during the check leaves nothing behind."""
    with tempfile.TemporaryFile(dir=folder):
        pass


class Lock:
    """An exclusive flock on `<folder>/.fishmerge-lock`, held until release() or process death.

    The folder is created when missing. If another holder removed the folder (or the lock file)
    while we waited, the lock is taken again on the new file, so two holders never coexist.
    """

    def __init__(self, folder: str | Path, blocking: bool = True):
        self.folder = Path(folder)
        path = self.folder / LOCK_NAME
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder vanished between mkdir and open
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd: int | None = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


DEAD_PREFIX = ".fishmerge-dead-"  # a stale folder renamed here (under its lock) before it is removed


def _take_if_stale(staging: Path) -> int | None:
    """Lock a staging folder no live process holds; the descriptor holding the lock, or None.

    A folder without a lock file counts as stale once it is older than UNLOCKED_GRACE_S (its
    creator died between mkdir and taking the lock, or it predates the locks); -1 is returned then.
    """
    lock = staging / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        try:
            return -1 if time.time() - os.stat(staging).st_mtime > UNLOCKED_GRACE_S else None
        except FileNotFoundError:
            return None
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(lock).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


def drop_lock_file(folder: str | Path) -> None:
    """Remove a lock file no live process holds (left inside a committed folder by a kill)."""
    fd = _take_if_stale(Path(folder))
    if fd is not None and fd >= 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(folder) / LOCK_NAME)
        os.close(fd)


def is_stale(staging: str | Path) -> bool:
    """A staging folder no live process holds: its lock can be taken (or it never got one and is old)."""
    fd = _take_if_stale(Path(staging))
    if fd is not None and fd >= 0:
        os.close(fd)
    return fd is not None


def remove_stale(parent: str | Path, pattern: str, markers: tuple[str, ...] = ()) -> list[Path]:
    """Remove folders matching `pattern` (fishmerge's own staging names) that hold fishmerge's lock
    file or one of `markers` (files fishmerge writes there) and that no live process holds (this
    process included: its own lock, taken through another descriptor, counts as held).

    Each is renamed to a unique `.fishmerge-dead-*` name while its lock is still held, then removed:
    a process that takes the freed lock afterwards finds the folder gone and starts afresh, never
    inside a folder being deleted.
    """
    root = Path(parent)
    if not root.is_dir():
        return []
    for dead in root.glob(DEAD_PREFIX + "*"):  # a removal killed half-way
        if dead.is_dir() and not dead.is_symlink() and (dead / LOCK_NAME).exists():
            shutil.rmtree(dead, ignore_errors=True)
    removed = []
    for p in root.glob(pattern):
        if not p.is_dir() or p.is_symlink():
            continue
        if not any((p / m).exists() for m in (LOCK_NAME, *markers)):
            continue  # not provably fishmerge's: left alone
        fd = _take_if_stale(p)
        if fd is None:
            continue
        dead = root / f"{DEAD_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            if not (p / LOCK_NAME).exists():
                (p / LOCK_NAME).touch()  # so a half-done removal is recognised as fishmerge's
            os.rename(p, dead)
        except OSError:
            continue
        finally:
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(dead, ignore_errors=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def commit_lock(dest: str | Path) -> Iterator[None]:
    """Serialise the final rename into `dest` among fishmerge processes: a flock on its parent
    folder, or where the filesystem refuses that (NFS), a lock folder beside `dest`."""
    dest = Path(dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            beside = dest.parent / f".{dest.name}.commit"
            with Lock(beside):
                try:
                    yield
                finally:  # only what Lock made: the lock file, then the folder if it is empty
                    with contextlib.suppress(OSError):
                        os.unlink(beside / LOCK_NAME)
                        os.rmdir(beside)
            return
        yield
    finally:
        os.close(fd)


def replace_owned(src: Path, dest: Path, owned, what: str, keep=None) -> bool:
    """Rename `src` over `dest`. An existing `dest` is replaced only when `owned(dest)` proves
    fishmerge wrote it: it is moved aside, the new one renamed in, the old one removed. When
    `keep(dest)` says the existing one is to stay (it holds all `src` would bring), `src` is removed
    instead and False returned.

    Runs under the commit lock, so a `.<dest>.old-*` found here is a leftover of a killed commit
    (it was proven owned before it was moved aside) and is removed too.
    """
    with commit_lock(dest):
        if keep is not None and dest.is_dir() and not dest.is_symlink() and owned(dest) and keep(dest):
            shutil.rmtree(src, ignore_errors=True)
            return False
        for leftover in dest.parent.glob(f".{dest.name}.old-*"):
            if leftover.is_dir() and not leftover.is_symlink() and owned(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        old = None
        if dest.exists() or dest.is_symlink():
            if dest.is_symlink() or not dest.is_dir() or not owned(dest):
                raise FishmergeError(
                    f"'{dest}' exists and is not {what} that fishmerge wrote: it is never replaced; choose "
                    "another path, or move it away yourself"
                )
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        os.rename(src, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return True
