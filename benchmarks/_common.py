"""The one way the benchmarks time things, and the record they write.

Every benchmark compares *sides* (ours against a reference, or an estimator against the
forward pass it builds on). :func:`interleaved` runs each side once to warm up (compilation),
then ``repeats`` rounds in which every side runs once, in turn (A B A B ...): load drift on a
shared machine then hits all sides alike, and ratios are taken round by round.
:func:`case_record` turns one such measurement into the JSON record ``python -m benchmarks``
writes (min and median of the rounds, the warm-up times apart, the order the calls ran in).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, NamedTuple

#: Distributions whose versions every run file records (absent ones are recorded as null).
LIBRARIES = (
    "jax",
    "jaxlib",
    "numpy",
    "scipy",
    "torch",
    "diffusers",
    "scikit-learn",
    "scikit-dimension",
    "grain",
    "flax",
)


class Timings(NamedTuple):
    """Wall times of an interleaved measurement.

    Attributes:
        warmup: seconds of each side's first (compiling) call.
        times: each side's seconds per round, in round order.
        order: the side of every timed call, in the order they ran (``A B A B ...``).
    """

    warmup: dict[str, float]
    times: dict[str, list[float]]
    order: list[str]


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[Any], Any] = lambda out: out
) -> Timings:
    """Time ``fns`` in ``repeats`` interleaved rounds after one warm-up call each.

    Args:
        fns: the sides, name to a call of no arguments; run in this order every round.
        repeats: timed rounds (at least 1).
        sync: waits for a result (``jax.block_until_ready`` for JAX).

    Returns:
        :class:`Timings`: warm-up seconds per side, seconds per side and round, call order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    warmup = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        sync(fn())
        warmup[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = []
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - start)
            order.append(name)
    return Timings(warmup, times, order)


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict[str, Any]:
    """Round-by-round ratios of two series: ``{"median", "min", "max", "rounds"}``."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": ratios,
    }


def case_record(
    name: str,
    timings: Timings,
    *,
    ratios: dict[str, tuple[str, str]],
    derived: dict[str, list[float]] | None = None,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record of one measured comparison.

    Args:
        name: what was compared (a line of the table).
        timings: the :func:`interleaved` measurement.
        ratios: label to ``(numerator, denominator)`` side names (measured or derived).
        derived: per-round series computed from the measured ones (an extrapolated total),
            reported like sides but marked ``derived``.
        notes: anything else to keep (agreement of the answers, search path, sizes).

    Returns:
        ``{"name", "order", "sides": {side: {"warmup_s", "times_s", "min_s", "median_s",
        "derived"}}, "ratios": {label: {...}}, "notes"}``.
    """
    series = dict(timings.times, **(derived or {}))
    sides = {
        side: {
            "warmup_s": timings.warmup.get(side),
            "times_s": values,
            "min_s": min(values),
            "median_s": statistics.median(values),
            "derived": side not in timings.times,
        }
        for side, values in series.items()
    }
    return {
        "name": name,
        "order": timings.order,
        "sides": sides,
        "ratios": {
            label: dict(ratio_stats(series[a], series[b]), numerator=a, denominator=b)
            for label, (a, b) in ratios.items()
        },
        "notes": notes or {},
    }


def machine() -> dict[str, Any]:
    """The machine and software a run happened on: CPU model, cores, Python, library versions."""
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def write_text(path: str, text: str) -> None:
    """Write ``text`` atomically (a temporary file in the same folder, then ``os.replace``), so
    a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`write_text`)."""
    write_text(path, json.dumps(obj, indent=1) + "\n")


def sd_unet_config(
    width: int, levels: int, layers_per_block: int, norm_groups: int
) -> dict[str, Any]:
    """Stable Diffusion v1.5's UNet config (``SD15_UNET_CONFIG``: width 320, 4 levels, 2 layers
    per block, 32 GroupNorm groups) with block_out_channels the first ``levels`` of ``(w, 2w, 4w,
    4w)``, cross-attention at every level but the last, ``layers_per_block`` and ``norm_groups``:
    the SD-scale benchmarks' full shape and their reduced ones."""
    from mmh_jax.models import SD15_UNET_CONFIG

    if not 2 <= levels <= 4:
        raise ValueError(f"levels must be 2, 3 or 4, got {levels}")
    return dict(
        SD15_UNET_CONFIG,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width)[:levels],
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_groups,
    )
