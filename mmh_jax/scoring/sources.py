"""Input sources of the scoring engine: random access to images and captions on disk.

A source indexes its input once, in its constructor (it lists files, reads tar headers or
parquet metadata; it decodes nothing), and then hands out items by position:
``source[i]`` for ``0 <= i < len(source)``, in an order fixed by the input alone (sorted
names, shards in the order given), never by the file system's listing order.

* :class:`ImageFolder`: image files in a folder tree, with optional ``KEY.txt`` captions.
* :class:`ArrayFile`: the rows of a ``.npy`` array or of one array in a ``.npz``.
* :class:`TarShards`: webdataset tar shards as img2dataset writes them (``KEY.jpg``,
  ``KEY.txt``, ``KEY.json``), read by seeking to the member's bytes.
* :class:`ParquetTable`: a parquet file or folder with encoded images and/or captions.
* :class:`PromptFile`: prompts alone, one a line (``.txt``) or as JSON lines (``.jsonl``).

Chosen fields of each item (labels such as memorized or not, duplicate counts, prompt ids)
are a source's :attr:`~Source.metadata` (the ``metadata`` argument of :class:`ArrayFile`,
:class:`ParquetTable` and :class:`PromptFile`); the engine writes them beside the scores.

:func:`open_source` picks the class from what a path is; :func:`fit_image` brings a decoded
image to the model's size.

The item contract: ``source[i]`` is an :class:`Item` (decoded ``uint8`` image ``[h, w, c]``
and/or text) or, when that one item is broken (an undecodable or truncated image, a
damaged tar shard, a null parquet cell, a NaN row), a :class:`BadItem` whose ``reason``
says what is wrong; it never raises for a bad item, so one broken file among millions
becomes a row of the errors table instead of stopping the run. It raises ``IndexError``
outside ``0..len-1`` and is safe to call from many threads at once. A bad *argument* (no
such path, nothing to read, a missing column) raises in the constructor instead.

Images are decoded with PIL, which must keep ``ImageFile.LOAD_TRUNCATED_IMAGES`` at its
default ``False`` (nothing here changes it): truncated files then fail to decode instead
of coming out with grey bottoms. Images above ``Image.MAX_IMAGE_PIXELS`` (decompression
bombs) are bad items.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import inspect
import io
import json
import operator
import os
import posixpath
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

__all__ = [
    "Item",
    "BadItem",
    "Source",
    "ImageFolder",
    "ArrayFile",
    "TarShards",
    "ParquetTable",
    "PromptFile",
    "Seeds",
    "open_source",
    "fit_image",
]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # webdataset extensions, in order of preference


class Item(NamedTuple):
    """One input: the image and/or the text at position ``index`` of a source."""

    index: int  # position in the source, 0..len-1
    id: str  # stable id (file path without suffix, tar key, id column, ...)
    image: (
        np.ndarray | None
    )  # uint8 [h, w, c] (c = 3 for "RGB", 1 for "L"); an ArrayFile row as stored
    text: str | None  # caption or prompt; None when there is none


class BadItem(NamedTuple):
    """An input that cannot be used, with a human-readable ``reason``."""

    index: int
    id: str
    reason: str


@runtime_checkable
class Source(Protocol):
    """Random access to the items of an input; see the module docstring for the contract."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Item | BadItem: ...

    @property
    def fingerprint(self) -> str:
        """Kind, resolved path(s), item count and file sizes: a changed input changes it."""
        ...

    @property
    def has_images(self) -> bool: ...

    @property
    def has_text(self) -> bool: ...

    @property
    def metadata(self) -> dict[str, pa.Array]:
        """The item fields chosen to go beside each item's scores: ``{name: one value per
        item, in source order}`` (empty when none were chosen)."""
        ...

    def describe(self) -> str:
        """One line for a human."""
        ...


# ----------------------------------------------------------------------------- helpers


def _position(index: int, n: int) -> int:
    i = operator.index(index)
    if not 0 <= i < n:
        raise IndexError(f"index {index} out of range for a source of {n} items")
    return i


def _row_id(i: int, n: int) -> str:
    """The id of row ``i`` of ``n`` when the input has none: the zero-padded row number."""
    return f"{i:0{len(str(n - 1))}d}"


def _check_mode(mode: str, kind: str) -> str:
    if mode not in ("RGB", "L"):
        raise ValueError(f"{kind}: argument 'mode' must be 'RGB' or 'L', got {mode!r}")
    return mode


def _existing(path: str | os.PathLike, kind: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"{kind}: no such file or folder {os.fspath(path)!r} (argument 'path')"
        )
    return p.resolve()


def _fingerprint(
    kind: str, root: Path, count: int, files: Sequence[tuple[str, int]], *extra: str
) -> str:
    """``kind|root|count|total bytes|extra...|digest`` where the digest covers the names and
    sizes of ``files`` (metadata only: nothing is read)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, size in files:
        digest.update(f"{name}\0{size}\n".encode())
    total = sum(size for _, size in files)
    return "|".join(
        [kind, str(root), f"{count} items", f"{total} bytes", *extra, digest.hexdigest()]
    )


def _scan(root: Path, recursive: bool) -> Iterator[tuple[str, int]]:
    """Yield ``(relative posix path, size)`` of the files under ``root``, in no set order;
    symbolic links to files count, links to folders are not followed."""
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(root / rel) as entries:
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append(name)
                elif entry.is_file():
                    yield name, entry.stat().st_size


def _metadata_names(metadata: Sequence[str], kind: str) -> list[str]:
    """The checked names of a source's ``metadata`` argument."""
    names = None if isinstance(metadata, (str, bytes)) else list(metadata)
    if (
        names is None
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise ValueError(
            f"{kind}: argument 'metadata' must be a list of distinct non-empty names, got {metadata!r}"
        )
    return names


class _Indexed:
    """What the sources here share: the fingerprint and the metadata their constructor sets."""

    _fingerprint: str
    _metadata: dict[str, pa.Array] = {}

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def metadata(self) -> dict[str, pa.Array]:
        return dict(self._metadata)


def _decode(data: bytes | Path, mode: str, what: str) -> np.ndarray | str:
    """Decode an encoded image to uint8 ``[h, w, c]``, or return why it cannot be."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                return f"image {what} has {im.width * im.height:,} pixels, above PIL's decompression-bomb limit"
            im.load()
            image = np.array(im.convert(mode), dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return f"cannot decode image {what}: {e or type(e).__name__}"
    return image[..., None] if mode == "L" else image


def _read_caption(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {what} is not UTF-8 ({e.reason} at byte {e.start})") from None


def _expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{00..02}`` (numeric range, zero padding kept when an
    end has a leading zero) and ``{a,b}`` (alternatives, may nest); other braces stay as is."""
    start = pattern.find("{")
    while start != -1:
        parts, end = _brace_parts(pattern, start)
        if parts is not None:
            head, tail = pattern[:start], _expand_braces(pattern[end + 1 :])
            return [head + p + t for part in parts for p in _expand_braces(part) for t in tail]
        start = pattern.find("{", start + 1)
    return [pattern]


def _brace_parts(pattern: str, start: int) -> tuple[list[str] | None, int]:
    """The alternatives of the brace group opening at ``start`` and its closing position;
    ``None`` when it is not an expandable group."""
    depth, parts, begin = 0, [], start + 1
    for pos in range(start + 1, len(pattern)):
        char = pattern[pos]
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        elif char == "," and not depth:
            parts.append(pattern[begin:pos])
            begin = pos + 1
        elif char == "}":
            parts.append(pattern[begin:pos])
            if len(parts) > 1:
                return parts, pos
            match = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", parts[0])
            if match is None:
                return None, pos
            a, b = match.groups()
            padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in (a, b))
            width = max(len(a), len(b)) if padded else 0
            step = 1 if int(b) >= int(a) else -1
            return [f"{k:0{width}d}" for k in range(int(a), int(b) + step, step)], pos
    return None, len(pattern)


# ----------------------------------------------------------------------------- sources


class ImageFolder(_Indexed):
    """Image files in a folder tree, sorted by relative path, with optional captions.

    Files ending in .png .jpg .jpeg .webp .bmp (any case) are images; the id is the
    relative posix path without suffix (``"sub/img001"``) and the caption the stripped text
    of ``sub/img001.txt`` when that file exists.

    Args:
        path: the folder.
        mode: ``"RGB"`` (``[h, w, 3]``) or ``"L"`` (grey, ``[h, w, 1]``).
        recursive: include sub-folders.

    Raises:
        FileNotFoundError: no such path.
        ValueError: no image in it, or two images whose ids would be the same (``a.png``
            and ``a.jpg``).
    """

    def __init__(
        self, path: str | os.PathLike, *, mode: Literal["RGB", "L"] = "RGB", recursive: bool = True
    ):
        root = _existing(path, "ImageFolder")
        if not root.is_dir():
            raise NotADirectoryError(f"ImageFolder: {root} (argument 'path') is not a folder")
        self._root, self._mode = root, _check_mode(mode, "ImageFolder")
        images, captions = [], {}
        for rel, size in _scan(root, recursive):
            stem, suffix = posixpath.splitext(rel)
            if suffix.lower() in _IMAGE_SUFFIXES:
                images.append((rel, size))
            elif suffix == ".txt":
                captions[stem] = size
        if not images:
            where = "in it or its sub-folders" if recursive else "in it (recursive=False)"
            raise ValueError(
                f"ImageFolder: folder {root} (argument 'path') holds no image file "
                f"({' '.join(_IMAGE_SUFFIXES)}) {where}"
            )
        images.sort()
        self._files = [rel for rel, _ in images]
        self._ids = [posixpath.splitext(rel)[0] for rel in self._files]
        first: dict[str, str] = {}
        for rel, key in zip(self._files, self._ids):
            if first.setdefault(key, rel) != rel:
                raise ValueError(
                    f"ImageFolder: {first[key]!r} and {rel!r} in {root} would both have id {key!r}"
                )
        self._captioned = np.array([key in captions for key in self._ids], dtype=bool)
        caption_files = [(key + ".txt", captions[key]) for key in self._ids if key in captions]
        self._fingerprint = _fingerprint("images", root, len(images), images + caption_files, mode)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> Item | BadItem:
        i = _position(index, len(self._files))
        key = self._ids[i]
        image = _decode(self._root / self._files[i], self._mode, repr(self._files[i]))
        if isinstance(image, str):
            return BadItem(i, key, image)
        text = None
        if self._captioned[i]:
            try:
                text = _read_caption((self._root / (key + ".txt")).read_bytes(), repr(key + ".txt"))
            except (OSError, ValueError) as e:
                return BadItem(i, key, str(e))
        return Item(i, key, image, text)

    has_images = True

    @property
    def has_text(self) -> bool:
        return bool(self._captioned.any())

    def describe(self) -> str:
        return f"image folder {self._root} ({len(self):,} images, {int(self._captioned.sum()):,} captions)"


class ArrayFile(_Indexed):
    """The rows of an array stored in a ``.npy`` (memory-mapped) or ``.npz`` file.

    Each row ``arr[i]`` (a copy) is an item's image as stored, ``uint8`` or floating, in
    whatever layout the file uses. Float rows holding NaN or inf are bad items.

    Args:
        path: the ``.npy`` or ``.npz`` file.
        key: the array of a ``.npz``; by default its only array besides ``ids_key``, else
            the one named ``"images"`` or ``"x"``.
        ids_key: a 1-D array of a ``.npz`` holding one id per row; without one the ids are
            the zero-padded row numbers.
        metadata: 1-D arrays of a ``.npz`` holding one value per row (labels, duplicate
            counts, ...): the source's :attr:`metadata`, written beside the scores.
        captions_key: a 1-D string array of a ``.npz`` holding each row's caption (image-caption
            pairs as arrays, for the columns that read text); none by default.

    Raises:
        FileNotFoundError: no such path.
        ValueError: an unreadable file, an ambiguous or unknown ``key``, an array that is not
            ``[n >= 1, ...]`` uint8/float, bad ids, metadata or captions.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        key: str | None = None,
        ids_key: str | None = "ids",
        metadata: Sequence[str] = (),
        captions_key: str | None = None,
    ):
        p = _existing(path, "ArrayFile")
        suffix = p.suffix.lower()
        if suffix not in (".npy", ".npz"):
            raise ValueError(f"ArrayFile: {p} (argument 'path') is not a .npy or .npz file")
        metadata = _metadata_names(metadata, "ArrayFile")
        for argument, value in (
            ("key", key),
            ("metadata", metadata),
            ("captions_key", captions_key),
        ):
            if suffix == ".npy" and value:
                raise ValueError(
                    f"ArrayFile: argument {argument!r} applies to .npz files, {p} is a .npy"
                )
        ids, columns, captions = None, {}, None
        with _reading(p):
            loaded = np.load(p, mmap_mode="r" if suffix == ".npy" else None, allow_pickle=False)
        if isinstance(loaded, np.ndarray) != (suffix == ".npy"):
            raise ValueError(
                f"ArrayFile: the content of {p} (argument 'path') does not match its suffix"
            )
        if suffix == ".npy":
            array = loaded
        else:
            with loaded as npz:
                key = self._pick_key(npz.files, key, {ids_key, captions_key, *metadata}, p)
                if captions_key is not None and captions_key not in npz.files:
                    raise ValueError(
                        f"ArrayFile: {p} has no array {captions_key!r} (argument "
                        f"'captions_key'); arrays: {npz.files}"
                    )
                missing = [m for m in metadata if m not in npz.files]
                if missing:
                    raise ValueError(
                        f"ArrayFile: {p} has no array {missing} (argument 'metadata'); "
                        f"arrays: {npz.files}"
                    )
                with _reading(p):
                    array = npz[key]
                    ids = (
                        npz[ids_key]
                        if ids_key not in (None, key) and ids_key in npz.files
                        else None
                    )
                    columns = {m: npz[m] for m in metadata}
                    captions = npz[captions_key] if captions_key is not None else None
        name = f"{p}" + (f"[{key!r}]" if key is not None else "")
        if array.ndim < 2 or len(array) == 0:
            raise ValueError(
                f"ArrayFile: {name} has shape {array.shape}; expected [n >= 1, ...] with at least 2 dims"
            )
        if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"ArrayFile: {name} has dtype {array.dtype}; expected uint8 or a float dtype"
            )
        if ids is not None and (ids.ndim != 1 or len(ids) != len(array)):
            raise ValueError(
                f"ArrayFile: ids array {ids_key!r} of {p} has shape {ids.shape}; expected ({len(array)},) "
                f"(argument 'ids_key')"
            )
        for m, column in columns.items():
            if column.shape != (len(array),):
                raise ValueError(
                    f"ArrayFile: metadata array {m!r} of {p} has shape {column.shape}; "
                    f"expected ({len(array)},) (argument 'metadata')"
                )
        if captions is not None and (captions.shape != (len(array),) or captions.dtype.kind != "U"):
            raise ValueError(
                f"ArrayFile: captions array {captions_key!r} of {p} has shape "
                f"{captions.shape} and dtype {captions.dtype}; expected ({len(array)},) "
                f"strings (argument 'captions_key')"
            )
        self._metadata = {m: pa.array(column) for m, column in columns.items()}
        self._path, self._key, self._array, self._ids = p, key, array, ids
        self._captions = captions
        self.has_text = captions is not None
        shape = "x".join(map(str, array.shape[1:]))
        self._fingerprint = _fingerprint(
            "array",
            p,
            len(array),
            [(p.name, p.stat().st_size)],
            f"key={key}",
            f"{shape} {array.dtype}",
            *((f"captions={captions_key}",) if captions_key is not None else ()),
        )

    @staticmethod
    def _pick_key(names: list[str], key: str | None, others: set[str | None], p: Path) -> str:
        if key is not None:
            if key not in names:
                raise ValueError(
                    f"ArrayFile: {p} has no array {key!r} (argument 'key'); arrays: {names}"
                )
            return key
        candidates = [n for n in names if n not in others]
        if len(candidates) == 1:
            return candidates[0]
        for default in ("images", "x"):
            if default in candidates:
                return default
        raise ValueError(f"ArrayFile: choose the array of {p} with argument 'key'; arrays: {names}")

    def __getstate__(self) -> dict:
        # A memory map would pickle as a full copy of the data: reopen it instead.
        state = dict(self.__dict__)
        if isinstance(self._array, np.memmap):
            state["_array"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._array is None:
            self._array = np.load(self._path, mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return len(self._array)

    @property
    def array(self) -> np.ndarray:
        """The whole ``[n, ...]`` array (memory-mapped for ``.npy``), unchecked for NaN or inf."""
        return self._array

    def __getitem__(self, index: int) -> Item | BadItem:
        i = _position(index, len(self._array))
        key = _row_id(i, len(self._array)) if self._ids is None else _id_str(self._ids[i])
        row = np.array(self._array[i])
        if row.dtype != np.uint8 and not np.isfinite(row).all():
            return BadItem(i, key, f"row {i} of {self._path.name} contains NaN or inf")
        return Item(i, key, row, None if self._captions is None else str(self._captions[i]))

    has_images = True

    has_text = False
    """Whether the rows have captions (``captions_key``)."""

    def describe(self) -> str:
        key = f"[{self._key!r}]" if self._key is not None else ""
        shape = "x".join(map(str, self._array.shape[1:]))
        return f"array file {self._path}{key} ({len(self):,} rows of {shape} {self._array.dtype})"


@contextlib.contextmanager
def _reading(p: Path) -> Iterator[None]:
    """Turn the errors of reading an unreadable array file into a ValueError naming it."""
    try:
        yield
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"ArrayFile: cannot read {p} (argument 'path'): {e}") from e


def _id_str(value: np.generic) -> str:
    value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class TarShards(_Indexed):
    """Webdataset tar shards (img2dataset's output), read by random access.

    A sample is the members sharing a key (the member path up to the first ``.`` of its
    last component): an image (``.jpg`` ``.jpeg`` ``.png`` ``.webp``), an optional caption
    (``.txt``) and others (``.json``, ignored). The id is the key; keys must be unique across
    shards. Items come in order of first appearance within a shard, shards in the given
    order. A shard that cannot be opened, or is damaged partway, adds one bad item (id
    ``"SHARD:<unreadable>"``) after the samples read before the damage; the sample being
    read when the damage was found is counted as lost, since it may be incomplete.

    Args:
        paths: tar files; each may also be a folder (its ``*.tar``, sorted), a glob, or a
            brace pattern (``"data/{00000..00012}.tar"``, ``"{a,b}.tar"``).
        mode: ``"RGB"`` or ``"L"``.

    Raises:
        FileNotFoundError: a path or pattern matching nothing.
        ValueError: a folder without ``*.tar``, or a key found in two shards.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        mode: Literal["RGB", "L"] = "RGB",
    ):
        self._mode = _check_mode(mode, "TarShards")
        self._shards = _shard_paths(paths)
        ids: list[str] = []
        shard, image, text = (
            [],
            [],
            [],
        )  # per item: shard number, (offset, size) of image and caption
        self._bad: dict[int, str] = {}  # reasons of the items known bad from the index alone
        self._damaged = 0  # shards that could not be read to their end
        first_shard: dict[str, int] = {}
        for s, path in enumerate(self._shards):
            samples, damage = _index_shard(path)
            for key, members in samples.items():
                if first_shard.setdefault(key, s) != s:
                    raise ValueError(
                        f"TarShards: key {key!r} is in both {self._shards[first_shard[key]]} and {path} "
                        f"(argument 'paths'; the same shard listed twice?)"
                    )
                image_ext = next((e for e in _TAR_IMAGE_EXTS if e in members), None)
                if image_ext is None:
                    found = ", ".join(f".{e}" for e in members)
                    self._bad[len(ids)] = f"no image member (found: {found}) in {path.name}"
                ids.append(key)
                shard.append(s)
                image.append(members.get(image_ext, (-1, -1)))
                text.append(members.get("txt", (-1, -1)))
            if damage is not None:
                self._damaged += 1
                self._bad[len(ids)] = damage
                ids.append(f"{path.name}:<unreadable>")
                shard.append(s)
                image.append((-1, -1))
                text.append((-1, -1))
        if not ids:
            raise ValueError(
                f"TarShards: the shards given (argument 'paths') hold no sample: {self._shards}"
            )
        self._ids = ids
        self._shard = np.array(shard, dtype=np.int32)
        self._image = np.array(image, dtype=np.int64).reshape(-1, 2)
        self._text = np.array(text, dtype=np.int64).reshape(-1, 2)
        self._root = Path(os.path.commonpath([p.parent for p in self._shards]))
        files = [(p.relative_to(self._root).as_posix(), p.stat().st_size) for p in self._shards]
        self._fingerprint = _fingerprint(
            "tar", self._root, len(ids), files, f"{len(files)} shards", mode
        )

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> Item | BadItem:
        i = _position(index, len(self._ids))
        key = self._ids[i]
        if i in self._bad:
            return BadItem(i, key, self._bad[i])
        path = self._shards[self._shard[i]]
        try:
            with open(path, "rb") as f:
                data = _read_at(f, *self._image[i])
                caption = _read_at(f, *self._text[i]) if self._text[i, 0] >= 0 else None
        except OSError as e:
            return BadItem(i, key, f"cannot read sample {key!r} from {path}: {e}")
        image = _decode(data, self._mode, repr(f"{path.name}:{key}"))
        if isinstance(image, str):
            return BadItem(i, key, image)
        try:
            text = (
                None if caption is None else _read_caption(caption, repr(f"{path.name}:{key}.txt"))
            )
        except ValueError as e:
            return BadItem(i, key, str(e))
        return Item(i, key, image, text)

    has_images = True

    @property
    def has_text(self) -> bool:
        return bool((self._text[:, 0] >= 0).any())

    def describe(self) -> str:
        captions = int((self._text[:, 0] >= 0).sum())
        damaged = f", {self._damaged:,} damaged" if self._damaged else ""
        return (
            f"tar shards under {self._root} ({len(self._shards):,} shards{damaged}, "
            f"{len(self) - self._damaged:,} samples, {captions:,} captions)"
        )


def _shard_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Resolve ``TarShards``'s ``paths`` argument to a list of files."""
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not given:
        raise ValueError("TarShards: argument 'paths' is empty")
    shards = []
    for item in given:
        for pattern in _expand_braces(os.fspath(item)):
            p = Path(pattern)
            if p.is_dir():
                found = sorted(p.glob("*.tar"))
                if not found:
                    raise ValueError(
                        f"TarShards: folder {pattern!r} (argument 'paths') holds no *.tar file"
                    )
            elif p.is_file():
                found = [p]
            elif _has_magic(pattern) and (matches := sorted(glob.glob(pattern))):
                found = [Path(m) for m in matches]
            else:
                raise FileNotFoundError(f"TarShards: no such file {pattern!r} (argument 'paths')")
            shards.extend(found)
    return [p.resolve() for p in shards]


def _has_magic(pattern: str) -> bool:
    return re.search(r"[*?[]", pattern) is not None


def _index_shard(path: Path) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
    """Read a shard's headers: ``{key: {extension: (data offset, size)}}`` in order of first
    appearance, and why the shard is damaged (``None`` when it is whole)."""
    members: list[tarfile.TarInfo] = []
    opened = False
    try:
        with tarfile.open(path, "r:") as tar:
            opened = True
            for member in tar:
                members.append(member)
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            whole = f.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
        damage = None if whole else f"no member header nor end-of-archive marker at byte {end}"
    except (tarfile.TarError, OSError) as e:
        damage = str(e) or type(e).__name__
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for member in members:
        directory, _, name = member.name.rpartition("/")
        stem, dot, ext = name.partition(".")
        if member.isfile() and dot:
            key = f"{directory}/{stem}" if directory else stem
            samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    if damage is None:
        return samples, None
    if not opened:
        return samples, f"cannot open tar shard {path}: {damage}"
    lost = ""
    if samples:
        last = next(reversed(samples))
        del samples[last]
        lost = f"; sample {last!r}, being read there, and any later ones are lost"
    return samples, f"tar shard {path} is damaged after {len(members)} members: {damage}{lost}"


def _read_at(f: io.BufferedReader, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise OSError(f"member at byte {offset} is truncated ({len(data)} of {size} bytes)")
    return data


class ParquetTable(_Indexed):
    """Rows of a parquet file, or of a folder of them (sorted by name).

    The image column holds encoded image bytes (binary) or a struct with a binary field
    ``"bytes"`` (Hugging Face datasets' ``Image`` feature); images are read lazily, one row
    group at a time, with the last row group cached per thread. Ids and texts are read
    eagerly. A table without the default image column but with a text column is a prompt
    table (``has_images`` False); without the default text column there is no text.

    Args:
        path: a ``.parquet`` file or a folder of them (all with the columns used).
        image_column: the image column; ``None`` for a prompt table.
        text_column: the caption / prompt column (string); ``None`` for none.
        id_column: the id column (any type castable to string); without one, or for a null
            id, the id is the zero-padded row number.
        mode: ``"RGB"`` or ``"L"``.
        metadata: other columns (labels, duplicate counts, ...), read eagerly: the source's
            :attr:`metadata`, written beside the scores.

    Raises:
        FileNotFoundError: no such path.
        ValueError: no parquet file, an unreadable one, an absent or ill-typed column that
            was asked for, no image nor text, no rows.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_column: str | None = "image",
        text_column: str | None = "caption",
        id_column: str | None = "id",
        mode: Literal["RGB", "L"] = "RGB",
        metadata: Sequence[str] = (),
    ):
        root = _existing(path, "ParquetTable")
        metadata = _metadata_names(metadata, "ParquetTable")
        self._mode = _check_mode(mode, "ParquetTable")
        files = sorted(root.glob("*.parquet")) if root.is_dir() else [root]
        if not files:
            raise ValueError(
                f"ParquetTable: folder {root} (argument 'path') holds no *.parquet file"
            )
        try:
            schemas = [pq.read_schema(f) for f in files]
        except (OSError, pa.ArrowException) as e:
            raise ValueError(
                f"ParquetTable: cannot read parquet metadata under {root} (argument 'path'): {e}"
            ) from e
        schema = schemas[0]

        def pick(column: str | None, default: str, argument: str) -> str | None:
            if column is None or (column == default and column not in schema.names):
                return None
            if column not in schema.names:
                raise ValueError(
                    f"ParquetTable: {files[0]} has no column {column!r} (argument {argument!r}); "
                    f"columns: {schema.names}"
                )
            return column

        image_col = pick(image_column, "image", "image_column")
        text_col = pick(text_column, "caption", "text_column")
        id_col = pick(id_column, "id", "id_column")
        if image_col is None and text_col is None:
            raise ValueError(
                f"ParquetTable: {files[0]} has neither an image column ({image_column!r}, argument "
                f"'image_column') nor a text column ({text_column!r}, argument 'text_column'); "
                f"columns: {schema.names}"
            )
        self._struct = image_col is not None and pa.types.is_struct(schema.field(image_col).type)
        if image_col is not None:
            t = schema.field(image_col).type
            if self._struct:
                t = t.field("bytes").type if t.get_field_index("bytes") >= 0 else None
            if t is None or not (
                pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            ):
                raise ValueError(
                    f"ParquetTable: column {image_col!r} (argument 'image_column') has type "
                    f"{schema.field(image_col).type}; expected binary or a struct with a binary field 'bytes'"
                )
        if text_col is not None:
            t = schema.field(text_col).type
            if not (
                pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            ):
                raise ValueError(
                    f"ParquetTable: column {text_col!r} (argument 'text_column') has type {t}; "
                    "expected string"
                )
        absent = [c for c in metadata if c not in schema.names]
        if absent:
            raise ValueError(
                f"ParquetTable: {files[0]} has no column {absent} (argument 'metadata'); "
                f"columns: {schema.names}"
            )
        for f, s in zip(files, schemas):
            missing = [
                c
                for c in (image_col, text_col, id_col, *metadata)
                if c is not None and c not in s.names
            ]
            if missing:
                raise ValueError(
                    f"ParquetTable: {f} (under argument 'path') lacks columns {missing}"
                )

        eager = list(dict.fromkeys(c for c in (id_col, text_col, *metadata) if c is not None))
        group_rows, group_file, columns = [], [], {c: [] for c in eager}
        for k, f in enumerate(files):
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                group_rows.append(pf.metadata.row_group(g).num_rows)
                group_file.append((k, g))
            table = pf.read(columns=eager) if eager else None
            for c in eager:
                columns[c].extend(table.column(c).chunks)
        n = sum(group_rows)
        if n == 0:
            raise ValueError(f"ParquetTable: {root} (argument 'path') has no rows")
        try:
            self._id_array = None if id_col is None else _large_strings(columns[id_col])
        except pa.ArrowException as e:
            raise ValueError(
                f"ParquetTable: column {id_col!r} (argument 'id_column') is not castable to string: {e}"
            ) from e
        self._texts = None if text_col is None else _large_strings(columns[text_col])
        try:
            self._metadata = {
                c: pa.chunked_array(columns[c], schema.field(c).type).combine_chunks()
                for c in metadata
            }
        except pa.ArrowException as e:
            raise ValueError(
                f"ParquetTable: a metadata column (argument 'metadata') has another type "
                f"in another file under {root}: {e}"
            ) from e
        self._root, self._files, self._image_col, self._text_col = root, files, image_col, text_col
        self._group_start = np.cumsum([0, *group_rows])[:-1]
        self._group_file = group_file
        self._n = n
        self._local = threading.local()
        self._fingerprint = _fingerprint(
            "parquet",
            root,
            n,
            [(f.name, f.stat().st_size) for f in files],
            f"image={image_col}",
            f"text={text_col}",
            f"id={id_col}",
            mode,
        )

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _local=threading.local())

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Item | BadItem:
        i = _position(index, self._n)
        key = None if self._id_array is None else self._id_array[i].as_py()
        key = _row_id(i, self._n) if key is None else key
        text = None if self._texts is None else self._texts[i].as_py()
        if self._image_col is None:
            return Item(i, key, None, text)
        group = int(np.searchsorted(self._group_start, i, side="right")) - 1
        row = i - int(self._group_start[group])
        file, g = self._group_file[group]
        what = f"in row {row} of row group {g} of {self._files[file].name}"
        try:
            data = self._image_column(group)[row].as_py()
        except (OSError, pa.ArrowException) as e:
            return BadItem(i, key, f"cannot read the image {what}: {e}")
        if data is None:
            return BadItem(i, key, f"image is null {what}")
        image = _decode(data, self._mode, what)
        return BadItem(i, key, image) if isinstance(image, str) else Item(i, key, image, text)

    def _image_column(self, group: int) -> pa.Array:
        """The image bytes of a row group, from this thread's cache of the last one read."""
        local = self._local
        if getattr(local, "group", None) != group:
            file, g = self._group_file[group]
            if getattr(local, "file", None) != file:
                local.file, local.reader = file, pq.ParquetFile(self._files[file])
            column = (
                local.reader.read_row_group(g, columns=[self._image_col]).column(0).combine_chunks()
            )
            if self._struct:  # flatten() merges the struct's nulls into its fields'
                column = column.flatten()[column.type.get_field_index("bytes")]
            local.group, local.column = group, column
        return local.column

    @property
    def has_images(self) -> bool:
        return self._image_col is not None

    @property
    def has_text(self) -> bool:
        return self._text_col is not None

    def describe(self) -> str:
        kind = "parquet table" if self._image_col is not None else "parquet prompt table"
        columns = ", ".join(
            f"{role} column {c!r}"
            for role, c in (("image", self._image_col), ("text", self._text_col))
            if c
        )
        return f"{kind} {self._root} ({len(self._files):,} files, {self._n:,} rows; {columns})"


def _large_strings(chunks: list[pa.Array]) -> pa.Array:
    """``chunks`` as strings, in one array (indexing a chunked array walks its chunks)."""
    return pa.chunked_array(chunks).cast(pa.large_string()).combine_chunks()


class PromptFile(_Indexed):
    """Prompts, without images: a ``.txt`` with one a line, or a ``.jsonl``.

    ``.txt``: each non-blank line (stripped) is a prompt. ``.jsonl``: each non-blank line is
    a JSON object with a string ``"caption"`` (or ``"prompt"``) and an optional ``"id"``; its
    other fields (a ``"label"``, a URL, ...) are kept, read with :meth:`fields`. The id is the
    ``"id"`` field as a string, else ``"line{n}"`` (1-based line number). This is the one
    prompt-file reader of the library (``mmh-jax score``, ``sd detect``, ``sd mitigate``).

    Args:
        path: the ``.txt`` or ``.jsonl`` file (UTF-8).
        metadata: fields of the ``.jsonl`` lines (a ``"label"``, a duplicate count, ...; null
            where a line lacks it): the source's :attr:`metadata`, written beside the scores.

    Raises:
        FileNotFoundError: no such path.
        ValueError: another suffix, not UTF-8, a malformed line (``file:line``), no prompt at
            all, or a metadata field that no line has or that has values of different types.
    """

    def __init__(self, path: str | os.PathLike, *, metadata: Sequence[str] = ()):
        p = _existing(path, "PromptFile")
        suffix = p.suffix.lower()
        if suffix not in (".txt", ".jsonl"):
            raise ValueError(f"PromptFile: {p} (argument 'path') is not a .txt or .jsonl file")
        metadata = _metadata_names(metadata, "PromptFile")
        if suffix == ".txt" and metadata:
            raise ValueError(
                f"PromptFile: argument 'metadata' applies to .jsonl files, {p} is a .txt"
            )
        try:
            lines = p.read_text(encoding="utf-8-sig").split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"PromptFile: {p} (argument 'path') is not UTF-8: {e}") from None
        self._ids, self._prompts, self._lines, self._fields = [], [], [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record: dict = {}
            if suffix == ".txt":
                prompt = line
            else:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"PromptFile: {p}:{number}: not valid JSON ({e.msg})"
                    ) from None
                prompt = next(
                    (
                        record[k]
                        for k in ("caption", "prompt")
                        if isinstance(record, dict) and isinstance(record.get(k), str)
                    ),
                    None,
                )
                if prompt is None:
                    raise ValueError(
                        f"PromptFile: {p}:{number}: needs a string 'caption' (or "
                        f"'prompt') in a JSON object, got {line.strip()[:80]}"
                    )
            self._ids.append(f"line{number}" if record.get("id") is None else str(record["id"]))
            self._prompts.append(prompt.strip())
            self._lines.append(number)
            self._fields.append(record)
        if not self._prompts:
            raise ValueError(f"PromptFile: {p} (argument 'path') holds no prompt")
        for name in metadata:
            values = [record.get(name) for record in self._fields]
            if all(v is None for v in values):
                raise ValueError(
                    f"PromptFile: no line of {p} has a field {name!r} (argument 'metadata')"
                )
            try:
                self._metadata = {**self._metadata, name: pa.array(values)}
            except pa.ArrowException as e:
                raise ValueError(
                    f"PromptFile: field {name!r} of {p} (argument 'metadata') does not "
                    f"have one type on every line: {e}"
                ) from e
        self._path = p
        self._fingerprint = _fingerprint(
            "prompts", p, len(self._prompts), [(p.name, p.stat().st_size)]
        )

    def fields(self, index: int) -> tuple[int, dict[str, Any]]:
        """``(line number, the JSON object of the line)`` of prompt ``index`` (``{}`` for a
        ``.txt``)."""
        i = _position(index, len(self._prompts))
        return self._lines[i], dict(self._fields[i])

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, index: int) -> Item:
        i = _position(index, len(self._prompts))
        return Item(i, self._ids[i], None, self._prompts[i])

    has_images = False
    has_text = True

    def describe(self) -> str:
        return f"prompt file {self._path} ({len(self):,} prompts)"


# ----------------------------------------------------------------------------- choosing and fitting

_BY_SUFFIX: dict[str, type] = {
    ".npy": ArrayFile,
    ".npz": ArrayFile,
    ".tar": TarShards,
    ".parquet": ParquetTable,
    ".txt": PromptFile,
    ".jsonl": PromptFile,
}


class Seeds(_Indexed):
    """Items that are sample numbers alone, for a model that generates from them: item ``i``
    is sample ``i`` of a run (an unconditional diffusion model starts it from the noise of
    index ``i`` under the run's seed, :mod:`mmh_jax._src.noise`). No image, no text.

    Args:
        count: the number of samples (at most ``2^32``).

    Raises:
        ValueError: ``count`` not an int in ``[1, 2^32]``.
    """

    def __init__(self, count: int):
        if (
            isinstance(count, bool)
            or not isinstance(count, (int, np.integer))
            or not 1 <= count <= 2**32
        ):
            raise ValueError(f"Seeds: argument 'count' must be an int in [1, 2^32], got {count!r}")
        self._count = int(count)
        self._fingerprint = f"seeds {self._count}"

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Item | BadItem:
        i = _position(index, self._count)
        return Item(i, _row_id(i, self._count), None, None)

    has_images = False

    has_text = False

    def describe(self) -> str:
        return f"{self._count:,} samples"


def open_source(path: str | os.PathLike | Sequence[str | os.PathLike], **options) -> Source:
    """Open ``path`` with the source class that fits it.

    A folder holding ``*.tar`` files and no image is :class:`TarShards`, one holding
    ``*.parquet`` and no image a :class:`ParquetTable`, any other an :class:`ImageFolder`; a
    file goes by suffix (``.npy`` ``.npz`` ``.tar`` ``.parquet`` ``.txt`` ``.jsonl``); a path
    that does not exist but has braces or glob characters, or a list of paths, is
    :class:`TarShards`.

    Args:
        path: the input.
        **options: keyword arguments of the chosen class (``mode``, ``key``, ...).

    Returns:
        The source.

    Raises:
        TypeError: an option the chosen class does not take.
        ValueError: a file of another kind.
        FileNotFoundError: no such path.
    """
    cls = _source_class(path)
    accepted = [n for n, p in inspect.signature(cls).parameters.items() if p.kind is p.KEYWORD_ONLY]
    for name in options:
        if name not in accepted:
            raise TypeError(
                f"open_source: option {name!r} does not apply to {cls.__name__} sources "
                f"(accepted: {', '.join(accepted) or 'none'})"
            )
    return cls(path, **options)


def _source_class(path: str | os.PathLike | Sequence[str | os.PathLike]) -> type:
    if not isinstance(path, (str, os.PathLike)):
        return TarShards
    p = Path(path)
    if p.is_dir():
        for pattern, cls in (("*.tar", TarShards), ("*.parquet", ParquetTable)):
            if any(p.glob(pattern)) and not any(
                posixpath.splitext(rel)[1].lower() in _IMAGE_SUFFIXES
                for rel, _ in _scan(p, recursive=True)
            ):
                return cls
        return ImageFolder
    if p.is_file():
        if (cls := _BY_SUFFIX.get(p.suffix.lower())) is None:
            raise ValueError(
                f"open_source: cannot read {p} (argument 'path'); accepted: a folder of images, tar "
                f"shards or parquet files, a file ending in {' '.join(_BY_SUFFIX)}, or a brace or glob "
                "pattern of tar shards"
            )
        return cls
    if "{" in os.fspath(path) or _has_magic(os.fspath(path)):
        return TarShards
    raise FileNotFoundError(
        f"open_source: no such file or folder {os.fspath(path)!r} (argument 'path')"
    )


def fit_image(
    image: np.ndarray, size: int | tuple[int, int], *, resize: Literal["none", "center_crop"]
) -> np.ndarray | str:
    """Bring an image ``[h, w, c]`` to ``size``, or say why it cannot be.

    ``"none"`` accepts only images already of that size. ``"center_crop"`` resizes
    (bicubic, as Stable Diffusion pipelines do) so the image just covers the target, keeping
    its aspect ratio, and crops the centre; an image already of that size comes back as is.

    Args:
        image: ``uint8`` or floating ``[h, w, c]``.
        size: ``(height, width)``, or an int for a square.
        resize: ``"none"`` or ``"center_crop"``.

    Returns:
        The image ``[height, width, c]`` of the input's dtype, or an error message (for a
        :class:`BadItem`) such as ``"image is 64x48, expected 32x32 (resize='none')"``
        (sizes as height x width).
    """
    if resize not in ("none", "center_crop"):
        raise ValueError(
            f"fit_image: argument 'resize' must be 'none' or 'center_crop', got {resize!r}"
        )
    th, tw = (size, size) if isinstance(size, int) else size
    if image.ndim != 3 or 0 in image.shape:
        return f"expected an image [h, w, c], got shape {image.shape}"
    h, w, c = image.shape
    if (h, w) == (th, tw):
        return image
    if resize == "none":
        return f"image is {h}x{w}, expected {th}x{tw} (resize='none')"
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        return f"cannot resize an image of dtype {image.dtype}"
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    top, left = (nh - th) // 2, (nw - tw) // 2
    if image.dtype == np.uint8 and c in (1, 3):  # one PIL image, mode "L" or "RGB"
        pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if c == 1 else image))
        resized = np.asarray(pil.resize((nw, nh), Image.Resampling.BICUBIC)).reshape(nh, nw, c)
        return resized[top : top + th, left : left + tw]
    planes = image if image.dtype == np.uint8 else image.astype(np.float32)  # PIL modes "L" and "F"
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(planes[..., k])).resize(
                (nw, nh), Image.Resampling.BICUBIC
            )
        )
        for k in range(c)
    ]
    return np.stack(channels, axis=-1)[top : top + th, left : left + tw].astype(image.dtype)
