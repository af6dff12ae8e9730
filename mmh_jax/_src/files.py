"""Atomic file output, file digests and the existence check of input files, shared by the command
line, the converters, the model loaders, the experiments and the scoring engine."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_folder", "atomic_path", "require_file", "sha256_file"]


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`, checked to be a file.

    Raises:
        FileNotFoundError: ``"{what} '{path}' does not exist"`` (or ``is a folder``).
    """
    path = Path(path)
    if not path.is_file():
        reason = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {str(path)!r} {reason}")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    The temporary file lives in the same folder (so ``os.replace`` is atomic) and is
    removed if the block raises, including on ``KeyboardInterrupt``: an interrupted
    run never leaves a complete-looking but truncated file under the final name. The
    file's data is flushed to disk (``fsync``) before the rename and the folder's entry
    after it, so a file that exists under its final name survives a crash whole.
    """
    target = Path(target)
    prefix = f".{target.name}."
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=".part")
    except OSError as err:
        raise _about(err, str(target.parent / prefix), target) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        _fsync(tmp_path)
        os.replace(tmp_path, target)
        _fsync(target.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise _about(err, str(tmp_path), target) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success rename it onto ``target``.

    The folder version of :func:`atomic_path`: ``target`` appears whole or not at all. Every
    file and folder inside is flushed to disk before the rename, and the temporary folder is
    removed if the block raises.

    Raises:
        FileExistsError: naming ``target`` if it exists and is not an empty folder (checked
            before the block runs, and again by the rename).
    """
    target = Path(target)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{str(target)!r} already exists and is not an empty folder")
    prefix = f".{target.name}."
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=".part"))
    except OSError as err:
        raise _about(err, str(target.parent / prefix), target) from None
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the usual permissions
        for folder, _, files in os.walk(tmp, topdown=False):
            for name in files:
                _fsync(Path(folder, name))
            _fsync(Path(folder))
        try:
            os.replace(tmp, target)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            # filled, or made a file, since the check
            raise FileExistsError(
                f"{str(target)!r} already exists and is not an empty folder"
            ) from None
        _fsync(target.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _about(err, str(tmp), target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _about(err: OSError, temporary: str, target: Path) -> OSError:
    """``err`` about ``target`` where it names the temporary file or folder (a path starting
    with ``temporary``), so that a failed write names the output the user asked for; ``err``
    itself where it is about another file."""
    named = [str(n) for n in (err.filename, err.filename2) if n is not None]
    if not any(n.startswith(temporary) for n in named) and temporary not in str(err):
        return err
    inner = ""
    for name in named:
        if name.startswith(temporary) and name != temporary:
            inner = name[len(temporary) :].partition(os.sep)[2]  # a file inside the folder
    where = str(target / inner) if inner else str(target)
    reason = (err.strerror or str(err)).replace(temporary, str(target))
    return OSError(reason) if err.errno is None else OSError(err.errno, reason, where)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
