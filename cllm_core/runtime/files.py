"""Outputs that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cllm_core.engine.errors import UserError


def parquet_schema(path: str | Path):
    """The schema of a Parquet file, or one UserError line when the file is not readable Parquet."""
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise UserError(f"{path} is not a readable Parquet file ({str(error).splitlines()[0]})") from None


@contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block, or fail at once in one line naming the holder's pid. An
    flock: the kernel releases it when its process ends however it ends, so a killed run leaves no stale lock."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise UserError(f"another process (pid {holder}) is {what}; wait for it to end, or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_until_exit(path: str | Path) -> None:
    """Hold a shared lock on `path` until this process ends (the descriptor is kept open): `wait_unheld` on the
    same path then waits for every such process to be gone."""
    import fcntl

    handle = open(path, "a+")  # noqa: SIM115 - open for the process's life
    fcntl.flock(handle, fcntl.LOCK_SH)
    _locks_kept.append(handle)


def wait_unheld(path: str | Path, seconds: float, what: str) -> None:
    """Wait until no process holds a lock on `path` (at most `seconds`), else one line naming `what` still runs."""
    import fcntl
    import time

    deadline = time.monotonic() + seconds
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"{what} still run after {seconds:g} s; stop them "
                                    "(pkill -f cllm_core.training.worker) and run again") from None
                time.sleep(0.2)


_locks_kept: list = []


def replace_file(path: str | Path, text: str) -> bool:
    """Make `path` hold `text`, whole or not at all: written beside it, fsynced and renamed into place, so a reader
    (a `generate` loading the file) sees the old text or the new, never a truncated one. A file that already holds
    `text` is left untouched. Returns whether it was written."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(staging, 0o666 & ~_umask())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return True


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def publish_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `target`; when the block succeeds it replaces `target` whole.

    On an error the staging directory is removed and `target` keeps its previous contents, so a reader
    sees the old output or the new one, never a mix or a half-written set.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-staging-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the published directory is an ordinary one
    try:
        yield staging
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
