"""Where sslhub keeps files, and atomic writes: readers see the old file (or directory) or the new one, never a
half-written one."""

from __future__ import annotations

import os
import re
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


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` (with its parents) and write and delete a probe file in it: an output directory that is a
    file, read-only or on a read-only file system (``/sys``) is a ``ValueError`` naming it before any work, not an
    ``OSError`` at the first checkpoint."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"output directory {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".sslhub-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"output directory {directory} is not writable: {error.strerror or error}") from None
    return directory


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


# Weight files of an earlier save that a new one into the same directory removes when it does not write them
# (transformers' shards and their index, the legacy pickle), so that no loader picks old weights beside the new ones.
STALE_WEIGHTS = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|pytorch_model\.bin")


class OutputDirectoryError(FileExistsError, ValueError):
    """An output directory sslhub refuses to write into; the message names it and the flag that would allow it."""


def check_output_directory(directory: str | os.PathLike, overwrite: bool, flag: str = "overwrite=True") -> Path:
    """``directory`` if sslhub may write its files there: absent, empty, or non-empty with ``overwrite``;
    ``OutputDirectoryError`` naming ``flag`` (``--overwrite`` on the command line) otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputDirectoryError(f"{directory} exists and is not a directory; choose another output")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise OutputDirectoryError(
            f"{directory} is not empty; pass {flag} to replace sslhub's files in it (other files are kept)"
        )
    return directory


MANIFEST = ".sslhub-files"  # the names of the files sslhub wrote into an output directory, one per line


def _written_by_sslhub(directory: Path) -> set[str]:
    """The names ``directory``'s ``MANIFEST`` lists (none without one: a directory sslhub did not write)."""
    manifest = directory / MANIFEST
    return set(manifest.read_text(encoding="utf-8").splitlines()) if manifest.is_file() else set()


@contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A fresh staging directory next to ``directory``, for files only; deleted when the block fails. When it
    succeeds, a new or empty ``directory`` is replaced by it in one rename; a non-empty one (only with
    ``overwrite``) gets its files, each moved in with one atomic rename, and loses the ``STALE_WEIGHTS`` this save
    does not write. Only files an earlier sslhub save wrote (its ``MANIFEST`` lists them) are replaced: a file of the
    same name that sslhub did not write, such as the user's own ``README.md``, is an ``OutputDirectoryError`` naming
    it, before anything moves; other files are never touched."""
    directory = check_output_directory(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.tmp-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        yield staging
        written = set(os.listdir(staging))
        if not (directory.is_dir() and any(directory.iterdir())):
            (staging / MANIFEST).write_text("".join(f"{name}\n" for name in sorted(written)), encoding="utf-8")
            staging.replace(directory)
            return
        ours = _written_by_sslhub(directory)
        foreign = sorted(name for name in written if (directory / name).exists() and name not in ours)
        if foreign:
            raise OutputDirectoryError(
                f"{directory} holds {foreign}, which sslhub did not write there (its {MANIFEST} does not list them): "
                "they are not replaced; move them away or choose another output"
            )
        for stale in os.listdir(directory):
            if STALE_WEIGHTS.fullmatch(stale) and stale not in written and (directory / stale).is_file():
                (directory / stale).unlink()
        for name in sorted(written, key=lambda name: name == "config.json"):  # the config last: readers find it
            os.replace(staging / name, directory / name)  # with the new weights already in place
        write_atomically(directory / MANIFEST, "".join(f"{name}\n" for name in sorted(ours | written)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move every entry of ``source`` into ``target`` (each an atomic rename), keeping ``target``'s other files."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(source):
        os.replace(os.path.join(source, name), target / name)
