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
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from lib.errors import FishmergeError

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

    def unlink(self) -> None:
        """Remove the lock file but keep holding the lock (before the folder is renamed into place)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / LOCK_NAME)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_stale(staging: str | Path) -> bool:
    """A staging folder no live process holds: its lock can be taken (or it never got one and is old)."""
    lock = Path(staging) / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - os.stat(staging).st_mtime > UNLOCKED_GRACE_S
        except FileNotFoundError:
            return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def remove_stale(
    parent: str | Path, pattern: str, keep: Iterable[str | Path] = (), markers: tuple[str, ...] = ()
) -> list[Path]:
    """Remove folders matching `pattern` (fishmerge's own staging names) that hold fishmerge's lock
    file or one of `markers` (files fishmerge writes there) and that no live process holds."""
    keep_set = {_real(k) for k in keep}
    if not Path(parent).is_dir():
        return []
    removed = []
    for p in Path(parent).glob(pattern):
        if _real(p) in keep_set or not p.is_dir() or p.is_symlink():
            continue
        if not any((p / m).exists() for m in (LOCK_NAME, *markers)):
            continue  # not provably fishmerge's: left alone
        if is_stale(p):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def commit_lock(dest: str | Path) -> Iterator[None]:
    """Serialise the final rename into `dest` among fishmerge processes (a flock on its parent folder)."""
    parent = Path(dest).parent
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_owned(src: Path, dest: Path, owned, what: str) -> None:
    """Rename `src` over `dest`. An existing `dest` is replaced only when `owned(dest)` proves
    fishmerge wrote it: it is moved aside, the new one renamed in, the old one removed.

    Runs under the commit lock, so a `.<dest>.old-*` found here is a leftover of a killed commit
    (it was proven owned before it was moved aside) and is removed too.
    """
    import uuid

    with commit_lock(dest):
        for leftover in dest.parent.glob(f".{dest.name}.old-*"):
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
