"""The output folder of a scoring run: exactly-once Parquet parts with per-chunk manifests.

Items are scored in fixed chunks (items ``[c * chunk_size, (c + 1) * chunk_size)``). A chunk is
done when, and only when, its manifest exists. The order of writes makes that exact:

1. the chunk's rows go to ``parts/part-<c>.parquet`` and its bad items to
   ``errors/errors-<c>.parquet``, each written under a temporary name in the same folder,
   fsynced, renamed (:func:`mmh_jax._src.files.atomic_path`);
2. then ``manifest/chunk-<c>.json`` (the item ids, row and error counts, the part's SHA-256)
   is written the same way.

A process killed anywhere leaves each chunk either with its manifest (done, whole) or without
(redone on restart, rewriting the same part name: never a second copy). ``run.json`` records
the run's settings; a restart with different settings is refused. Reading ``parts/`` as one
Parquet dataset, or :func:`merge`, gives one table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmh_jax._src.files import atomic_path, sha256_file

__all__ = [
    "RunMismatch",
    "open_run",
    "done_chunks",
    "write_chunk",
    "merge",
    "Merged",
    "remove_stale_temporaries",
]


class RunMismatch(ValueError):
    """The output folder holds a run with other settings."""


def _part(out: Path, chunk: int) -> Path:
    return out / "parts" / f"part-{chunk:08d}.parquet"


def _errors(out: Path, chunk: int) -> Path:
    return out / "errors" / f"errors-{chunk:08d}.parquet"


def _manifest(out: Path, chunk: int) -> Path:
    return out / "manifest" / f"chunk-{chunk:08d}.json"


def open_run(out: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Create the output folder for a run, or check that it holds the same run.

    Args:
        out: the output folder.
        record: the run's settings (JSON-serialisable): input fingerprint, model, columns, seed,
            chunk size, ...; everything that changes a value or a chunk's items.

    Raises:
        RunMismatch: ``out`` holds a run whose ``run.json`` differs, naming the keys.
    """
    out = Path(out)
    for sub in ("parts", "errors", "manifest"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    record = json.loads(json.dumps(record))
    if path.exists():
        old = json.loads(path.read_text())
        if old != record:
            keys = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
            raise RunMismatch(
                f"{str(out)!r} holds a run with other settings ({', '.join(keys)} differ): "
                f"use another output folder, or delete it to start over"
            )
        return out
    with atomic_path(path) as tmp:  # every process writes the same bytes: any order is fine
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    return out


def done_chunks(out: str | os.PathLike) -> set[int]:
    """The chunks whose manifest exists."""
    folder = Path(out) / "manifest"
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("-")[1]) for p in folder.glob("chunk-*.json")}


def remove_stale_temporaries(out: str | os.PathLike, chunks: set[int] | range) -> int:
    """Delete temporary files a killed process left for ``chunks`` (only this process's own
    chunks, so a live process's write is never touched). Returns how many were removed."""
    out = Path(out)
    removed = 0
    for sub, stem in (("parts", "part"), ("errors", "errors"), ("manifest", "chunk")):
        for tmp in (out / sub).glob(f".{stem}-*.part"):
            try:
                chunk = int(tmp.name.split("-")[1].split(".")[0])
            except (IndexError, ValueError):
                continue
            if chunk in chunks:
                tmp.unlink(missing_ok=True)
                removed += 1
    return removed


def write_chunk(
    out: str | os.PathLike,
    chunk: int,
    *,
    start: int,
    stop: int,
    rows: pa.Table,
    errors: pa.Table,
    ids: list[str],
    process: int,
) -> None:
    """Write one finished chunk: its rows, its errors, then its manifest (in that order).

    Args:
        out: the run's folder (:func:`open_run`).
        chunk: the chunk's number.
        start, stop: its item range.
        rows: the scored items, sorted by ``index`` (columns ``index``, ``id``, values); with
            an ``image_index`` column, each item's images ``0 .. m - 1`` once each.
        errors: the bad items (``index``, ``id``, ``reason``); may be empty.
        ids: every item's id, in index order (scored and bad).
        process: the writing process (recorded).
    """
    out = Path(out)
    scored = len(set(rows["index"].to_pylist()))
    if (
        scored + errors.num_rows != stop - start
        or len(ids) != stop - start
        or not _one_row_per_image(rows)
    ):
        raise ValueError(
            f"chunk {chunk} has {rows.num_rows} rows of {scored} items and "
            f"{errors.num_rows} errors for {stop - start} items"
        )
    part = _part(out, chunk)
    with atomic_path(part) as tmp:
        pq.write_table(rows, tmp)
    errors_file = None
    if errors.num_rows:
        errors_file = _errors(out, chunk)
        with atomic_path(errors_file) as tmp:
            pq.write_table(errors, tmp)
    manifest = {
        "chunk": chunk,
        "start": start,
        "stop": stop,
        "rows": rows.num_rows,
        "errors": errors.num_rows,
        "part": str(part.relative_to(out)),
        "part_sha256": sha256_file(part),
        "errors_file": None if errors_file is None else str(errors_file.relative_to(out)),
        "process": process,
        "ids": ids,
    }
    with atomic_path(_manifest(out, chunk)) as tmp:
        tmp.write_text(json.dumps(manifest))


class Merged(NamedTuple):
    """A run's rows and errors as single tables, sorted by item index."""

    scores: pa.Table
    errors: pa.Table
    missing: list[int]
    """Chunks without a manifest (not yet scored)."""


def merge(out: str | os.PathLike, *, allow_partial: bool = False) -> Merged:
    """Read a run's finished chunks into one scores table and one errors table.

    Every part is checked against its manifest (SHA-256, row count, item ids), so a table
    with a lost or duplicated row cannot come out.

    Args:
        out: the run's folder.
        allow_partial: merge the finished chunks even if some are missing.

    Raises:
        FileNotFoundError: ``out`` holds no run.
        ValueError: chunks are missing (unless ``allow_partial``) or a part disagrees with its
            manifest.
    """
    out = Path(out)
    if not (out / "run.json").is_file():
        raise FileNotFoundError(f"{str(out)!r} holds no scoring run (no run.json)")
    record = json.loads((out / "run.json").read_text())
    num_chunks = int(record["num_chunks"])
    done = done_chunks(out)
    missing = sorted(set(range(num_chunks)) - done)
    if missing and not allow_partial:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{len(missing)} of {num_chunks} chunks are not finished ({shown}): "
            f"resume the run, or merge with allow_partial"
        )
    scores, errors = [], []
    for chunk in sorted(done):
        manifest = json.loads(_manifest(out, chunk).read_text())
        part = out / manifest["part"]
        if sha256_file(part) != manifest["part_sha256"]:
            raise ValueError(f"{str(part)!r} does not match its manifest (SHA-256)")
        table = pq.read_table(part)
        bad = pq.read_table(out / manifest["errors_file"]) if manifest["errors_file"] else None
        got = dict(zip(table["index"].to_pylist(), table["id"].to_pylist()))
        if bad is not None:
            got.update(zip(bad["index"].to_pylist(), bad["id"].to_pylist()))
        expected = dict(zip(range(manifest["start"], manifest["stop"]), manifest["ids"]))
        if got != expected or table.num_rows != manifest["rows"] or not _one_row_per_image(table):
            raise ValueError(
                f"chunk {chunk}: its rows and errors do not cover its items exactly once"
            )
        scores.append(table)
        if bad is not None:
            errors.append(bad)
    scores_table = pa.concat_tables(scores) if scores else None
    errors_table = pa.concat_tables(errors) if errors else _empty_errors()
    if scores_table is None:
        scores_table = pa.table(
            {"index": pa.array([], pa.int64()), "id": pa.array([], pa.string())}
        )
    return Merged(scores_table, errors_table, missing)


def _one_row_per_image(rows: pa.Table) -> bool:
    """Whether every item of ``rows`` has the same number ``m`` of rows, one for each image
    ``0 .. m - 1`` (column ``image_index``; without it, ``m`` is 1)."""
    index = rows["index"].to_numpy()
    if not len(index):
        return True
    image = (
        rows["image_index"].to_numpy()
        if "image_index" in rows.column_names
        else np.zeros_like(index)
    )
    items = len(np.unique(index))
    per_item = len(index) // items
    return (
        len(index) == per_item * items
        and 0 <= image.min()
        and image.max() < per_item
        and np.unique(np.stack([index, image]), axis=1).shape[1] == len(index)
    )


def _empty_errors() -> pa.Table:
    return errors_table([], [], [])


def errors_table(index: list[int], ids: list[str], reasons: list[str]) -> pa.Table:
    """The errors table's layout: ``index`` (int64), ``id``, ``reason``."""
    return pa.table(
        {
            "index": pa.array(index, pa.int64()),
            "id": pa.array(ids, pa.string()),
            "reason": pa.array(reasons, pa.string()),
        }
    )


def rows_table(
    index: np.ndarray, ids: list[str], values: dict[str, np.ndarray | pa.Array]
) -> pa.Table:
    """The scores table's layout: ``index`` (int64), ``id``, then one column per value; a value
    of shape ``[rows, k]`` (a vector per row, e.g. a spectrum) is a ``fixed_size_list`` of ``k``."""
    columns = {"index": pa.array(np.asarray(index, np.int64)), "id": pa.array(ids, pa.string())}
    columns.update(
        {
            name: v if isinstance(v, pa.Array) else _arrow(np.asarray(v), name)
            for name, v in values.items()
        }
    )
    return pa.table(columns)


def _arrow(v: np.ndarray, name: str) -> pa.Array:
    if v.ndim == 1:
        return pa.array(v)
    if v.ndim != 2:
        raise ValueError(
            f"column {name!r}: a value per row must be a scalar or a vector, got "
            f"shape {v.shape[1:]}"
        )
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(v).reshape(-1)), v.shape[1]
    )


def vectors(table: pa.Table, name: str) -> np.ndarray:
    """A column that holds a vector per row (a ``fixed_size_list``, e.g. a spectrum or an
    image) as a ``[rows, k]`` NumPy array.

    Args:
        table: a scores table (:attr:`Merged.scores`).
        name: the column's name.

    Returns:
        The rows' vectors, one per row, in the table's order.
    """
    column = table[name].combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(f"column {name!r} holds {column.type}, not a vector per row")
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
