"""Shared plumbing for the demos and commands: flags, input checks and errors, atomic file
output, tables, progress bars, the toy demos' training and sampling."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from mmh_jax._src.files import atomic_path

__all__ = [
    "DemoInputError",
    "finite_float",
    "add_dtype_flag",
    "add_display_flags",
    "add_flags",
    "add_out_flag",
    "config_from_flags",
    "check_dtype",
    "add_percentile_flag",
    "check_percentile",
    "prepare_out_dir",
    "prepare_outputs",
    "atomic_path",
    "write_csv",
    "write_parquet",
    "host_stage",
    "write_prompt_file",
    "save_figure",
    "make_progress",
    "output_console",
    "results_table",
    "key_value_table",
    "require",
    "require_at_least",
    "require_positive",
    "check_seed_range",
    "input_errors",
    "read_csv_rows",
    "int_field",
    "train_with_progress",
    "TrainedSamples",
    "train_and_sample",
]


class DemoInputError(ValueError):
    """A user-facing problem with a demo's settings (reported as one line, no traceback)."""


def finite_float(text: str) -> float:
    """argparse ``type`` of a number flag: a finite float (``nan`` and ``inf`` are refused when
    the command line is parsed, before any work)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def require(condition: bool, message: str) -> None:
    """Raise :class:`DemoInputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DemoInputError(message)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def require_at_least(config: Any, minimum: int, *fields: str) -> None:
    """Raise :class:`DemoInputError` naming the first of ``fields`` of ``config`` below
    ``minimum``: ``--FIELD must be at least MINIMUM, got VALUE``."""
    for field in fields:
        value = getattr(config, field)
        require(value >= minimum, f"{_flag(field)} must be at least {minimum}, got {value}")


def require_positive(config: Any, *fields: str) -> None:
    """Raise :class:`DemoInputError` naming the first of ``fields`` of ``config`` that is not
    positive: ``--FIELD must be positive, got VALUE``."""
    for field in fields:
        value = getattr(config, field)
        require(value > 0, f"{_flag(field)} must be positive, got {value}")


def check_seed_range(seed: int, count: int) -> None:
    """Raise :class:`DemoInputError` unless the seeds ``seed .. seed + count - 1`` of ``count``
    samples are 32-bit (sample ``i`` is the official ``generate.py``'s seed ``seed + i``)."""
    require(
        0 <= seed and seed + count <= 2**32,
        f"--seed must lie in [0, 2^32 - --num-samples], got {seed}",
    )


@contextlib.contextmanager
def input_errors(*errors: type[Exception]) -> Iterator[None]:
    """Report ``errors`` raised inside the block as :class:`DemoInputError` of the same message
    (a bad input file or model named by the user: one line, no traceback)."""
    try:
        yield
    except errors as err:
        raise DemoInputError(str(err)) from None


def read_csv_rows(path: Path, *, flag: str, columns: Sequence[str]) -> list[tuple[int, dict]]:
    """The rows of the CSV file of ``flag`` (e.g. ``--labels``) with their line numbers.

    Raises:
        DemoInputError: no such file, or it lacks one of ``columns``.
    """
    require(path.is_file(), f"{flag} file {str(path)!r} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        require(
            reader.fieldnames is not None and set(columns) <= set(reader.fieldnames),
            f"{flag} {str(path)!r} must have the columns {' and '.join(columns)}",
        )
        return list(enumerate(reader, start=2))


def int_field(row: Mapping[str, str], column: str, *, where: str) -> int:
    """The integer in ``column`` of a CSV row (:func:`read_csv_rows`).

    Raises:
        DemoInputError: it is not an integer (naming ``where``, the file and line).
    """
    try:
        return int(row[column])
    except ValueError:
        raise DemoInputError(f"{where}: {column} must be an integer, got {row[column]!r}") from None


def add_dtype_flag(parser: argparse.ArgumentParser, default: str, *, of: str) -> None:
    """Add ``--dtype float32|bfloat16``, the compute dtype of ``of`` (e.g. "the networks")."""
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=default,
        help=f"compute dtype of {of} (default %(default)s)",
    )


def check_dtype(dtype: str) -> None:
    """Raise :class:`DemoInputError` unless ``dtype`` is one of ``--dtype``'s choices."""
    require(dtype in ("float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {dtype!r}")


def add_percentile_flag(parser: argparse.ArgumentParser, default: float, *, of: str) -> None:
    """Add ``--percentile Q``: the pooled singular-value percentile threshold (Appendix C.1) of
    ``of`` (e.g. "the Jacobian rank")."""
    parser.add_argument(
        "--percentile",
        type=finite_float,
        metavar="Q",
        default=default,
        help=f"threshold of {of}: the Q-th percentile of all singular values, "
        "pooled over the samples (default %(default)s, Appendix C.1)",
    )


def check_percentile(percentile: float) -> None:
    """Raise :class:`DemoInputError` unless ``--percentile`` lies in ``[0, 100)``."""
    require(0 <= percentile < 100, f"--percentile must lie in [0, 100), got {percentile}")


def add_display_flags(parser: Any) -> None:
    """Add ``--no-figure`` (skip the PNG figures) and ``--quiet`` (no progress bars) to a parser
    or an argument group."""
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_out_flag(parser: Any, default: str | os.PathLike) -> None:
    """Add ``-o/--out FOLDER`` (default ``default``), the output folder of a command that
    resumes an interrupted run there."""
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=default,
        help="output folder; a rerun resumes there (default ./%(default)s/)",
    )


def add_flags(
    parser: Any, defaults: Any, flags: Iterable[tuple[str, Callable[[str], Any], str | None, str]]
) -> None:
    """Add one ``--FIELD`` flag per ``(field, type, metavar, help)`` to a parser or an argument
    group: the flag of the config field ``field`` (dashes for underscores, so that
    :func:`config_from_flags` reads it back), parsed by ``type``, shown as ``metavar`` (``None``:
    argparse's), its default that field of ``defaults``.

    Args:
        parser: the parser or argument group.
        defaults: the config instance whose fields are the defaults.
        flags: the flags, in the order ``--help`` lists them; a help text that does not show
            the default itself (``%(default)s``) is followed by ``(default %(default)s)``.
    """
    for field, kind, metavar, text in flags:
        parser.add_argument(
            _flag(field),
            type=kind,
            metavar=metavar,
            default=getattr(defaults, field),
            help=text if "%(default" in text else f"{text} (default %(default)s)",
        )


_Config = TypeVar("_Config")


def config_from_flags(
    config_type: type[_Config], args: argparse.Namespace, **values: Any
) -> _Config:
    """A demo's config dataclass from its parsed flags: each field from the flag of the same
    name (``--num-steps`` sets ``num_steps``), ``progress`` from ``--quiet`` and ``figure`` from
    ``--no-figure`` (:func:`add_display_flags`); a field without a flag keeps its default.

    Args:
        config_type: the config dataclass.
        args: the parsed flags.
        values: fields whose flag is named otherwise (e.g. ``n_bootstrap=args.bootstrap``).

    Returns:
        ``config_type(**fields)``.
    """
    flags = dict(vars(args), **values)
    if "quiet" in flags:
        flags.setdefault("progress", not flags["quiet"])
    if "no_figure" in flags:
        flags.setdefault("figure", not flags["no_figure"])
    return config_type(
        **{
            f.name: flags[f.name]
            for f in dataclasses.fields(config_type)
            if f.init and f.name in flags
        }
    )


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check that files can be written into it.

    Raises:
        DemoInputError: if the folder cannot be created or written to.
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise DemoInputError(f"output folder {str(path)!r} is not writable: {reason}") from None
    return path


def prepare_outputs(
    out: str | os.PathLike, *, console: Console | None = None
) -> tuple[Path, Console, Console]:
    """Where a command's results go: its output folder (:func:`prepare_out_dir`), the console
    of its tables and summary (``console``, else :func:`output_console`) and the console of its
    progress and messages (stderr).

    Raises:
        DemoInputError: if the folder cannot be created or written to.
    """
    return prepare_out_dir(out), console or output_console(), Console(stderr=True)


def _columns(table: Mapping[str, Sequence[Any] | np.ndarray]) -> tuple[list[str], int]:
    names = list(table)
    lengths = {len(table[n]) for n in names}
    if len(lengths) != 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    return names, lengths.pop()


def write_csv(table: Mapping[str, Sequence[Any] | np.ndarray], target: str | os.PathLike) -> Path:
    """Write a column table as CSV atomically; floats keep full precision."""
    names, n = _columns(table)
    cols = [np.asarray(table[c]) for c in names]
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(names)
            for i in range(n):
                w.writerow([c[i].item() if hasattr(c[i], "item") else c[i] for c in cols])
    return Path(target)


def _arrow_table(table: Mapping[str, Sequence[Any] | np.ndarray]) -> Any:
    import pyarrow as pa

    names, _ = _columns(table)
    arrays = {}
    for c in names:
        col = np.asarray(table[c])
        arrays[c] = pa.array(col.tolist() if col.dtype.kind in "OUS" else col)
    return pa.table(arrays)


def write_parquet(
    table: Mapping[str, Sequence[Any] | np.ndarray], target: str | os.PathLike
) -> Path:
    """Write a column table as Parquet atomically (needs ``pyarrow``)."""
    import pyarrow.parquet as pq

    with atomic_path(target) as tmp:
        pq.write_table(_arrow_table(table), tmp)
    return Path(target)


def write_prompt_file(
    target: str | os.PathLike, ids: Sequence[str], captions: Sequence[str]
) -> Path:
    """Write prompts as the ``.jsonl`` that :class:`~mmh_jax.scoring.PromptFile` reads (one
    ``{"id", "caption"}`` object a line), atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(
            "".join(json.dumps({"id": i, "caption": c}) + "\n" for i, c in zip(ids, captions))
        )
    return Path(target)


_STAGE_RECORD = b"mmh_jax.host_stage"


def host_stage(
    target: str | os.PathLike,
    record: Mapping[str, Any],
    make: Callable[[], Mapping[str, Sequence[Any] | np.ndarray]],
    *,
    what: str,
) -> Any:
    """A recipe's stage that runs on the host (new prompts, a guarded sampler's table): the
    Parquet table ``target``, made by ``make()`` and written atomically with ``record`` (JSON)
    in its metadata, or, when it exists with the same record, read back without calling
    ``make`` (a rerun does not redo the stage). Returns the ``pyarrow.Table``.

    Raises:
        DemoInputError: ``target`` holds a table of another record (the differing keys are
            named; ``what`` says what the table holds).
    """
    import pyarrow.parquet as pq

    path = Path(target)
    wanted = json.loads(json.dumps(record))  # compared as JSON reads it back
    if path.is_file():
        old = json.loads((pq.read_schema(path).metadata or {}).get(_STAGE_RECORD, b"{}"))
        if old == wanted:
            return pq.read_table(path)
        keys = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
        raise DemoInputError(
            f"{str(path)!r} holds {what} of other inputs or settings "
            f"({', '.join(keys) or 'unreadable record'} differ); choose another --out"
        )
    table = _arrow_table(make()).replace_schema_metadata(
        {_STAGE_RECORD: json.dumps(wanted, sort_keys=True)}
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table


def save_figure(fig: Any, target: str | os.PathLike, *, dpi: int = 130) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(target)


PIPED_WIDTH = 200
"""Width of :func:`output_console` when stdout is not a terminal (and ``COLUMNS`` is unset)."""


def output_console() -> Console:
    """The console a command prints its tables and summary on (stdout).

    On a terminal it has the terminal's width. Piped or redirected, rich would assume 80
    columns and squeeze wide tables (``isolat…``); there the width is :data:`PIPED_WIDTH`
    unless ``COLUMNS`` says otherwise, so tables print in full.
    """
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


def results_table(columns: Sequence[str], *, title: str, caption: str | None = None) -> Table:
    """A table of results for the output console (rows added by the caller): its first column
    (what a row is about) left-aligned, the others (the values) right-aligned."""
    table = Table(title=title, caption=caption)
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i else "left")
    return table


def key_value_table(
    rows: Iterable[tuple[str, str]], *, title: str, align: Literal["left", "right"] = "right"
) -> Table:
    """A table of ``(name, value)`` rows without a header for the output console: names in
    bold, values aligned to ``align``."""
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify=align)
    for name, value in rows:
        table.add_row(name, value)
    return table


def make_progress(console: Console, *, enabled: bool) -> Progress:
    """A rich progress display (description, bar, m/n, elapsed) on ``console``."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def train_with_progress(
    progress: Progress,
    net: Any,
    params: Any,
    data: Any,
    *,
    schedule: Any,
    key: Any,
    steps: int,
    chunk: int,
    **train_kwargs: Any,
) -> tuple[Any, Callable, float]:
    """Train an epsilon-network with :func:`mmh_jax.training.train_eps` under a progress task.

    Args:
        progress: the display to add the "training" task to.
        net: a network of :mod:`mmh_jax.models.toy` (``net.apply(params, x_t, t)``).
        params: its initial parameters.
        data: training points ``[n, *event]``.
        schedule: the noise schedule.
        key: the training key.
        steps: optimiser steps.
        chunk: steps per compiled chunk (one progress update each).
        **train_kwargs: the other settings of ``train_eps``.

    Returns:
        ``(trained, score_fn, seconds)``: what ``train_eps`` returned (parameters, losses), the
        trained network's score function and the training wall time.
    """
    from mmh_jax.schedules import score_from_eps
    from mmh_jax.training import train_eps

    task = progress.add_task("training", total=-(-steps // chunk) * chunk)
    start = time.perf_counter()
    trained = train_eps(
        net.apply,
        params,
        data,
        schedule=schedule,
        key=key,
        steps=steps,
        chunk=chunk,
        progress=lambda n: progress.advance(task, n),
        **train_kwargs,
    )
    seconds = time.perf_counter() - start
    score_fn = score_from_eps(functools.partial(net.apply, trained.params), schedule=schedule)
    return trained, score_fn, seconds


class TrainedSamples(NamedTuple):
    """What :func:`train_and_sample` returns."""

    trained: Any
    """What :func:`mmh_jax.training.train_eps` returned (parameters, losses)."""
    score_fn: Callable
    """The trained network's score function."""
    samples: np.ndarray
    """``[num_samples, *event]`` samples of the reverse SDE."""
    timings: dict[str, float]
    """Wall times ``train_s`` and ``sample_s``."""


def train_and_sample(
    progress: Progress,
    net: Any,
    data: Any,
    config: Any,
    *,
    schedule: Any,
    keys: tuple[Any, Any, Any],
    chunk: int,
    **train_kwargs: Any,
) -> TrainedSamples:
    """Train a demo's epsilon-network on ``data`` (:func:`train_with_progress`) and draw
    ``config.num_samples`` samples from it with ``config.sample_steps`` Euler-Maruyama steps
    of the reverse SDE (:func:`mmh_jax.sampling.sample`, a "sampling" task): the first stage of
    the von Mises and digits demos.

    Args:
        progress: the display the tasks go to.
        net: a network of :mod:`mmh_jax.models.toy`.
        data: training points ``[n, *event]``.
        config: the demo's config; its ``steps``, ``batch_size``, ``learning_rate`` and
            ``train_t_min`` are the training settings, its ``num_samples`` and
            ``sample_steps`` the sampler's.
        schedule: the noise schedule.
        keys: the keys of the initial parameters, the training and the sampling.
        chunk: training steps per compiled chunk.
        **train_kwargs: the other settings of :func:`mmh_jax.training.train_eps`.

    Returns:
        :class:`TrainedSamples`.
    """
    import jax
    import jax.numpy as jnp

    from mmh_jax.sampling import sample

    k_init, k_train, k_sample = keys
    data = jnp.asarray(data)
    trained, score_fn, train_s = train_with_progress(
        progress,
        net,
        net.init(k_init),
        data,
        schedule=schedule,
        key=k_train,
        steps=config.steps,
        chunk=chunk,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        t_min=config.train_t_min,
        **train_kwargs,
    )
    task = progress.add_task("sampling", total=1)
    start = time.perf_counter()
    samples = jax.jit(
        lambda k: sample(
            score_fn,
            (config.num_samples, *data.shape[1:]),
            schedule=schedule,
            key=k,
            num_steps=config.sample_steps,
        )
    )(k_sample)
    samples = np.asarray(samples)
    timings = {"train_s": train_s, "sample_s": time.perf_counter() - start}
    progress.advance(task)
    return TrainedSamples(trained, score_fn, samples, timings)
