"""Where sslhub keeps files, and atomic writes: readers see the old file (or directory) or the new one, never a
half-written one."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "SSLHUB_CACHE"


def cache_root() -> Path:
    """sslhub's cache (converted releases, feature caches): ``$SSLHUB_CACHE``, else ``$XDG_CACHE_HOME/sslhub``, else
    ``~/.cache/sslhub``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sslhub"
    return Path(os.environ.get(CACHE_ENV, default))


def write_atomically(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0o600; these files are meant to be read
        with os.fdopen(fd, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


@contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A fresh staging directory next to ``directory``, renamed to ``directory`` when the block succeeds (replacing
    a non-empty one only with ``overwrite``) and deleted when it fails."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    staging = directory.with_name(f".{directory.name}.tmp-{token}")
    staging.mkdir()
    try:
        yield staging
        if directory.exists() and any(directory.iterdir()):
            previous = directory.rename(directory.with_name(f".{directory.name}.old-{token}"))
            staging.rename(directory)
            shutil.rmtree(previous)
        else:
            staging.replace(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move every entry of ``source`` into ``target`` (each an atomic rename), keeping ``target``'s other files."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(source):
        os.replace(os.path.join(source, name), target / name)
