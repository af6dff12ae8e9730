"""The scoring engine: columns over a source, on every device of every host, exactly once.

One jit-compiled step runs over a 1-D :class:`~jax.sharding.Mesh` with a ``data`` axis holding
all devices of all processes (ordered by process, so each process's devices hold one contiguous
block of the global batch). Its axis is ``Explicit``: the batch's sharding is part of its type,
and the step is a :func:`jax.shard_map` in which each device scores its own items with the plain
per-sample estimators; nothing is communicated between devices. The model's and the columns'
arrays are replicated.

Randomness: item ``i`` gets the key ``fold_in(fold_in(key(seed), i // 2^32), i mod 2^32)`` (image
``j`` of a prompt item: that key with ``j`` folded in) and each column folds in its name, so
every value depends only on the seed, the item and the column: not on the number of devices or
hosts, the batch size or a restart.

Hosts: with ``P`` processes (``jax.distributed.initialize`` already called), chunk ``c`` belongs
to process ``c mod P``. Each process reads its own chunks' items through a Grain pipeline
(decoding in threads, prefetched), builds its part of the global batch with
:func:`jax.make_array_from_process_local_data`, and writes its own chunks
(:mod:`mmh_jax.scoring.store`). All processes run the same number of steps (agreed at the
start; a process that runs out feeds padding), as SPMD requires.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial
from jaxtyping import Array
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mmh_jax._src.images import to_model_range, to_uint8
from mmh_jax._src.noise import image_noise
from mmh_jax.sampling import DDIMGrid, ddim_sample
from mmh_jax.schedules import eps_from_score
from mmh_jax.scoring import store
from mmh_jax.scoring.columns import Column, Inputs, column_keys
from mmh_jax.scoring.model import Model
from mmh_jax.scoring.sources import BadItem, Source, fit_image

__all__ = ["score", "Generation", "Plan", "Summary", "data_mesh"]

Resize = Literal["none", "center_crop"]
_RESERVED = ("index", "id", "image_index")
"""Output names the engine writes itself (``image_index``: of prompt items' images)."""
_PIXELS = "__pixels"
"""The step's output of the generated images (uint8 ``[b, h, w, c]``) that host columns read
for prompt items; never written."""


class Generation(NamedTuple):
    """How items that are prompts alone become latents: DDIM with classifier-free guidance on
    the model's own grid, ``num_images`` images per prompt, image ``j`` from the noise of image
    ``j`` under the run's seed (:mod:`mmh_jax._src.noise`): ``StableDiffusion.sample``'s image
    ``j`` of that prompt. Each image is one row of the output, its ``image_index`` ``j``.

    Items that are sample numbers alone (:class:`~mmh_jax.scoring.Seeds`) and an unconditional
    pixel-space diffusion model: sample ``i`` is DDIM (``num_steps``, on the model's
    ``ddim_grid`` or :func:`~mmh_jax.sampling.ddim_sample`'s default grid) from the noise of
    index ``i``, rounded to the uint8 grid (the image as saved); ``guidance`` and
    ``num_images`` do not apply."""

    guidance: float = 7.5
    num_steps: int = 50
    num_images: int = 1


class Plan(NamedTuple):
    """What a run will do (this process's view)."""

    num_items: int
    num_chunks: int
    chunk_size: int
    chunks_done: int
    """Chunks finished by earlier runs (skipped)."""
    chunks_pending: int
    """This process's chunks still to score."""
    items_pending: int
    devices: int
    processes: int
    process_index: int
    global_batch: int
    steps: int
    """Steps every process runs (the most any process needs)."""
    columns: tuple[str, ...]
    mode: Literal["images", "points", "prompts", "samples"]
    images_per_item: int
    """Rows per scored item: ``Generation.num_images`` for prompts, else 1."""


class Summary(NamedTuple):
    """What a run did (this process)."""

    plan: Plan
    scored: int
    errors: int
    chunks_written: int
    seconds: float
    compile_seconds: float
    items_per_second: float
    """Items (scored and bad) per second after the first step (compilation)."""
    device_idle: float
    """Fraction of the time after the first step in which no step was running or queued
    (the device waited for input or for the host)."""
    seconds_per_step: float
    """Measured (or, in a dry run, estimated from the warm-up) seconds per step."""


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (default: all of every process), ordered by
    process then device id, with an ``Explicit`` axis."""
    devices = sorted(
        jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id)
    )
    return Mesh(np.array(devices), ("data",), axis_types=(AxisType.Explicit,))


class _Loaded(NamedTuple):
    index: int
    id: str
    x: np.ndarray | None
    tokens: np.ndarray | None
    host: dict[str, float]
    error: str | None


class _Indices(Sequence):
    """The item indices of a list of chunks, lazily."""

    def __init__(self, chunks: list[int], chunk_size: int, num_items: int):
        self._starts = [c * chunk_size for c in chunks]
        sizes = [min(chunk_size, num_items - s) for s in self._starts]
        self._offsets = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self._starts[k] + i - int(self._offsets[k])


def _as_input(
    item, model: Model, mode: str, resize: Resize
) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """``(x for the device, uint8 image for host columns, error)`` of one item."""
    image = item.image
    if image is None:
        return None, None, "the item holds no image or array"
    if image.dtype == np.uint8:
        if model.image_shape is None:
            return None, None, "an image, but this model scores arrays only"
        if mode != "images":
            return None, None, f"an image, but this run scores arrays of shape {model.shape}"
        c, h, w = model.image_shape
        if image.ndim == 3 and image.shape[-1] == 3 and c == 1:  # ITU-R 601-2 luma, as PIL's "L"
            luma = image.astype(np.uint32) @ np.array([19595, 38470, 7471], np.uint32)
            image = ((luma + 0x8000) >> 16).astype(np.uint8)[..., None]
        if image.ndim != 3 or image.shape[-1] != c:
            return None, None, f"image of shape {image.shape}, expected [h, w, {c}]"
        fitted = fit_image(image, (h, w), resize=resize)
        if isinstance(fitted, str):
            return None, None, fitted
        x = to_model_range(fitted)
        return x, fitted, None
    expected = model.shape if mode == "points" else model.image_shape
    if tuple(image.shape) != tuple(expected):
        return None, None, f"array of shape {tuple(image.shape)}, expected {tuple(expected)}"
    x = np.asarray(image, np.float32)
    pixels = None
    if x.ndim == 3 and x.shape[0] in (1, 3):  # a [-1, 1] CHW image, for host columns
        pixels = to_uint8(x)
    return x, pixels, None


def _mode(source: Source, model: Model) -> Literal["images", "points", "prompts", "samples"]:
    """Whether the run feeds images (encoded on the device if the model has an encoder),
    points, prompts to generate from, or sample numbers to generate from unconditionally:
    decided by the input and its first readable item, the same on every process."""
    if not source.has_images:
        if (
            not source.has_text
            and model.score_fn is not None
            and model.encode is None
            and model.image_shape == model.shape
        ):
            return "samples"
        if not (source.has_text and model.eps_fn is not None and model.ddim_grid is not None):
            raise ValueError(
                "the input holds no images or arrays; prompts alone need a "
                "text-conditional model to generate from (Stable Diffusion), "
                "sample numbers alone an unconditional pixel-space diffusion model"
            )
        return "prompts"
    if model.image_shape is None:
        return "points"
    for i in range(min(len(source), 64)):
        item = source[i]
        if isinstance(item, BadItem) or item.image is None:
            continue
        if item.image.dtype == np.uint8 or tuple(item.image.shape) == tuple(model.image_shape):
            return "images"
        return "points"
    return "images"


def _load(source: Source, model: Model, mode: str, resize: Resize, host_columns, tokenize):
    def load(index: int) -> _Loaded:
        item = source[index]
        if isinstance(item, BadItem):
            return _Loaded(index, item.id, None, None, {}, item.reason)
        x, pixels, error = (
            (None, None, None)
            if mode in ("prompts", "samples")
            else _as_input(item, model, mode, resize)
        )
        tokens, host = None, {}
        if error is None and tokenize is not None:
            if item.text is None:
                error = "no caption, and a column needs one"
            else:
                tokens = np.asarray(tokenize([item.text])[0], np.int32)
        if error is None and host_columns and mode != "prompts":
            if pixels is None:
                error = "a host column needs an image"
            else:
                for column in host_columns:
                    host.update(_host_values(column, pixels, index, 0))
        return _Loaded(index, item.id, x if error is None else None, tokens, host, error)

    return load


def _host_values(column: Column, image: np.ndarray, index: int, image_index: int) -> dict:
    """A host column's values of one image (uint8 ``[h, w, c]``): ``column.host(image)``, or
    with ``per_item = True`` ``column.host(image, index=, image_index=)`` (a column whose value
    depends on the item, e.g. a reference image per item)."""
    if getattr(column, "per_item", False):
        return column.host(image, index=index, image_index=image_index)
    return column.host(image)


def _replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` as a global array replicated over ``mesh`` (works across
    processes: each process supplies its own, identical, copy)."""
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        if not isinstance(leaf, (np.ndarray, jax.Array)):
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


@functools.lru_cache(maxsize=16)
def _make_step(
    mesh: Mesh, seed: int, mode: str, generation: Generation, trajectory: bool, pixels: bool = False
):
    """The jitted step ``(model, columns, batch) -> {name: [global batch]}``; cached, so a second
    run with the same model and columns reuses the compiled program."""

    def local(model: Model, columns: tuple, batch: dict) -> dict:
        base = jax.random.key(seed)
        keys = jax.vmap(lambda hi, lo: jax.random.fold_in(jax.random.fold_in(base, hi), lo))(
            batch["hi"], batch["lo"]
        )
        context = model.embed(batch["tokens"]) if "tokens" in batch else None
        if mode == "prompts":
            keys = jax.vmap(jax.random.fold_in)(keys, batch["image"])
            inputs = _generate(model, base, batch["image"], context, generation, trajectory)
        elif mode == "samples":
            inputs = _sample(model, base, batch["lo"], generation)
        else:
            x = batch["x"]
            images = x if mode == "images" else None
            points = model.encode(x) if images is not None and model.encode is not None else x
            inputs = Inputs(points=points, images=images, context=context)
        if "labels" in batch:
            inputs = inputs._replace(labels=batch["labels"])
        if "tokens" in batch:
            inputs = inputs._replace(tokens=batch["tokens"])
        out = {}
        for column in columns:
            values = dict(column(model, inputs, column_keys(keys, column)))
            if getattr(column, "makes_points", False):  # later columns see its images
                inputs = inputs._replace(points=values.pop("points"), trajectory=None)
            out.update({name: jnp.asarray(v) for name, v in values.items()})
        if pixels:  # the generated images, for host columns
            out[_PIXELS] = to_uint8(model.decode(inputs.points))
        return out

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P("data"))
    return jax.jit(sharded)


def _generate(
    model: Model,
    base: Array,
    image: Array,
    context: Array,
    generation: Generation,
    trajectory: bool,
) -> Inputs:
    """Latents from prompts: DDIM with guidance, each from the noise of its image index under
    the run's key (:mod:`mmh_jax._src.noise`, as ``StableDiffusion.sample`` and the guarded
    sampler draw it: one prompt, image index and seed give one image in all three)."""
    noise = jax.vmap(lambda j: image_noise(base, j, model.shape))(image)
    result = ddim_sample(
        model.eps_fn,
        noise,
        context,
        model.uncond,
        schedule=model.schedule,
        guidance=generation.guidance,
        num_steps=generation.num_steps,
        grid=model.ddim_grid,
        return_trajectory=trajectory,
    )
    return Inputs(
        points=result.sample,
        images=None,
        context=context,
        trajectory=result if trajectory else None,
        noise=noise,
    )


def _without_context(eps_fn, x: Array, t: Array, context: Array) -> Array:
    """An unconditional ``eps_fn(x_t, t)`` in :func:`~mmh_jax.sampling.ddim_sample`'s
    ``eps_fn(x_t, t, context)`` form (context ignored)."""
    return eps_fn(x, t)


def _sample(model: Model, base: Array, index: Array, generation: Generation) -> Inputs:
    """Images of an unconditional pixel-space model: sample ``i`` by DDIM (guidance 0) from the
    noise of index ``i`` under the run's key (:mod:`mmh_jax._src.noise`), clipped and rounded to
    the uint8 grid, so every column sees the image as saved."""
    noise = jax.vmap(lambda i: image_noise(base, i, model.shape))(index)
    none = jnp.zeros((1, 1), jnp.float32)
    eps_fn = Partial(_without_context, eps_from_score(model.score_fn, schedule=model.schedule))
    x = ddim_sample(
        eps_fn,
        noise,
        none,
        none,
        schedule=model.schedule,
        guidance=0.0,
        num_steps=generation.num_steps,
        grid=model.ddim_grid or DDIMGrid(),
    ).sample
    x = jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
    return Inputs(points=x, images=x, context=None)


def _local_rows(out: dict, batch: int) -> dict[str, np.ndarray]:
    """This process's rows of the step's output (its addressable shards, in batch order)."""
    rows = {}
    for name, array in out.items():
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
        rows[name] = np.concatenate([np.asarray(s.data) for s in shards])[:batch]
    return rows


@dataclasses.dataclass
class _Chunk:
    start: int
    stop: int
    per_item: int
    ids: dict[int, str] = dataclasses.field(default_factory=dict)
    rows: dict[tuple[int, int], dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Values by (item index, image index)."""
    errors: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        items = self.stop - self.start
        return len(self.rows) + self.per_item * len(self.errors) == self.per_item * items


def score(
    model: Model,
    columns: Sequence[Column],
    source: Source,
    out: str,
    *,
    seed: int = 0,
    batch_size: int = 64,
    chunk_size: int = 1024,
    resize: Resize = "none",
    generation: Generation = Generation(),
    threads: int = 8,
    prefetch: int | None = None,
    mesh: Mesh | None = None,
    dry_run: bool = False,
    console: Console | None = None,
    record: dict[str, Any] | None = None,
    labels: str | None = None,
) -> Summary:
    """Score every item of ``source`` with ``columns`` and write one row per item to ``out``
    (per generated image, for prompts).

    A row holds the item's ``index`` and ``id``, for prompts the ``image_index`` of its image,
    the source's :attr:`~mmh_jax.scoring.Source.metadata` of the item, then the columns' values.

    Call it on every process of a multi-process run (after ``jax.distributed.initialize``),
    with the same arguments. A rerun into the same folder skips finished chunks.

    Args:
        model: the model (:class:`~mmh_jax.scoring.Model`).
        columns: what to compute (:mod:`mmh_jax.scoring.columns`); output names must be unique.
        source: the items (:mod:`mmh_jax.scoring.sources`).
        out: the output folder (:mod:`mmh_jax.scoring.store`).
        seed: the PRNG seed of every randomised column.
        batch_size: the global batch (all devices of all processes); a multiple of the number
            of devices.
        chunk_size: items per written part; the unit of resumption.
        resize: what to do with images of another size: refuse them (``"none"``: an error row)
            or resize the short side and centre-crop (``"center_crop"``).
        generation: for an input of prompts alone: the DDIM settings that turn each prompt
            into the latents of the ``num_images`` images the columns score.
        threads: decoding threads per process.
        prefetch: items decoded ahead (default: two local batches, and at least a group of up to
            32 items per thread).
        mesh: a 1-D mesh with a ``"data"`` axis; default :func:`data_mesh` over every device.
        dry_run: plan, compile and time three steps on the first items; write nothing.
        console: where progress and messages go (``None``: silent).
        record: extra settings to keep in ``run.json`` (e.g. the model's path); a resumed run
            must match them.
        labels: for a class-conditional model (``Model.num_classes``): the source's metadata
            field holding each item's integer class in ``[0, num_classes)``.

    Returns:
        :class:`Summary` of this process's work (its plan included).

    Raises:
        ValueError: bad settings, a column the model cannot compute, or a folder holding a run
            with other settings (:class:`~mmh_jax.scoring.store.RunMismatch`); all before any
            item is scored.
    """
    columns = tuple(columns)
    names = _check(
        model,
        columns,
        source,
        batch_size=batch_size,
        chunk_size=chunk_size,
        threads=threads,
        resize=resize,
    )
    for field in ("num_steps", "num_images"):
        value = getattr(generation, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"generation.{field} must be a positive int, got {value!r}")
    mesh = data_mesh() if mesh is None else mesh
    if mesh.axis_names != ("data",):
        raise ValueError(f"mesh must have the single axis 'data', got {mesh.axis_names}")
    devices, processes = mesh.devices.size, jax.process_count()
    if batch_size % devices:
        raise ValueError(
            f"batch_size must be a multiple of the {devices} devices, got {batch_size}"
        )
    local_batch = batch_size // processes
    num_items = len(source)
    num_chunks = -(-num_items // chunk_size)
    mode = _mode(source, model)
    metadata = source.metadata
    classes = _classes(model, metadata, labels)
    if mode != "prompts" and any(getattr(c, "makes_points", False) for c in columns):
        raise ValueError(
            "a column that makes points (makes_points) needs an input of prompts "
            "alone to generate from"
        )
    device_columns = tuple(c for c in columns if not c.on_host)
    host_columns = tuple(c for c in columns if c.on_host)
    tokenize = model.tokenize if mode == "prompts" or any(c.needs_text for c in columns) else None

    me = jax.process_index()
    run_record = {
        "format": 1,
        "source": source.fingerprint,
        "num_items": num_items,
        "chunk_size": chunk_size,
        "num_chunks": num_chunks,
        "seed": seed,
        "resize": resize,
        "mode": mode,
        "model": model.description,
        "columns": [_describe(c) for c in columns],
        "names": list(names),
        "metadata": list(metadata),
        **({"generation": generation._asdict()} if mode == "prompts" else {}),
        **({"generation": {"num_steps": generation.num_steps}} if mode == "samples" else {}),
        **({"labels": labels} if labels is not None else {}),
        **(record or {}),
    }
    mine = [c for c in range(num_chunks) if c % processes == me]
    if dry_run:
        done = store.done_chunks(out)
    else:
        store.open_run(out, run_record)
        store.remove_stale_temporaries(out, set(mine))
        done = store.done_chunks(out)
    pending = [c for c in mine if c not in done]
    indices = _Indices(pending, chunk_size, num_items)
    per_item = generation.num_images if mode == "prompts" else 1
    local_steps = -(-len(indices) * per_item // local_batch)
    steps = local_steps
    if processes > 1:
        steps = int(np.max(multihost_utils.process_allgather(np.array([local_steps]))))
    plan = Plan(
        num_items=num_items,
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        chunks_done=len(done),
        chunks_pending=len(pending),
        items_pending=len(indices),
        devices=devices,
        processes=processes,
        process_index=me,
        global_batch=batch_size,
        steps=steps,
        columns=names,
        mode=mode,
        images_per_item=per_item,
    )

    trajectory = mode == "prompts" and any(getattr(c, "reads_trajectory", False) for c in columns)
    pixels = mode == "prompts" and bool(host_columns)
    step = _make_step(mesh, seed, mode, generation, trajectory, pixels)
    replicated = _replicate((model, device_columns), mesh)
    batch_sharding = NamedSharding(mesh, P("data"))
    x_shape = model.shape if mode == "points" else model.image_shape

    def device_batch(loaded: list[tuple[_Loaded, int]]) -> dict:
        index = np.zeros(local_batch, np.int64)
        for k, (item, _) in enumerate(loaded):
            index[k] = item.index
        batch = {
            "hi": (index >> 32).astype(np.uint32),
            "lo": (index & 0xFFFFFFFF).astype(np.uint32),
        }
        if mode == "prompts":
            batch["image"] = np.zeros(local_batch, np.uint32)
            for k, (_, j) in enumerate(loaded):
                batch["image"][k] = j
        elif mode != "samples":
            batch["x"] = np.zeros((local_batch, *x_shape), np.float32)
            for k, (item, _) in enumerate(loaded):
                batch["x"][k] = item.x
        if classes is not None:
            batch["labels"] = np.zeros(local_batch, np.int32)
            for k, (item, _) in enumerate(loaded):
                batch["labels"][k] = classes[item.index]
        if tokenize is not None:
            width = loaded[0][0].tokens.shape[0] if loaded else _token_width(model)
            tokens = np.zeros((local_batch, width), np.int32)
            for k, (item, _) in enumerate(loaded):
                tokens[k] = item.tokens
            batch["tokens"] = tokens
        return {
            k: jax.make_array_from_process_local_data(batch_sharding, v, (batch_size, *v.shape[1:]))
            for k, v in batch.items()
        }

    shapes = jax.eval_shape(step, *replicated, device_batch([]))
    dtypes = {
        name: np.dtype(shapes[name].dtype) if name in shapes else np.dtype(np.float64)
        for name in names
    }
    load = _load(source, model, mode, resize, host_columns, tokenize)
    # Items are decoded in groups (one thread decodes a group) so that the pipeline's per-element
    # bookkeeping is paid once per group, not per item.
    group = max(1, min(local_batch, 32))
    read = (
        grain.MapDataset.source(indices)
        .map(load)
        .batch(group, batch_fn=list)
        .to_iter_dataset(
            grain.ReadOptions(
                num_threads=threads,
                prefetch_buffer_size=max(threads, -(-(prefetch or 2 * local_batch) // group)),
            )
        )
    )
    # One slot of the device batch per image of a good item; a bad item passes once.
    slots = (
        (item, j)
        for item in itertools.chain.from_iterable(read)
        for j in range(per_item if item.error is None else 1)
    )

    if dry_run:
        return _dry_run(plan, step, replicated, device_batch, slots, local_batch, console)
    return _run(
        plan,
        step,
        replicated,
        device_batch,
        slots,
        local_batch,
        out,
        pending,
        dtypes,
        metadata,
        console,
        host_columns if pixels else (),
    )


def _classes(model: Model, metadata: dict[str, pa.Array], labels: str | None) -> np.ndarray | None:
    """The items' classes for a class-conditional model (``None`` for another), checked."""
    if not model.num_classes:
        if labels is not None:
            raise ValueError(
                f"labels={labels!r} applies to a class-conditional model (Model num_classes > 0)"
            )
        return None
    if labels is None:
        raise ValueError(
            f"the model is class-conditional ({model.num_classes} classes): name "
            f"the input's metadata field holding each item's class with labels="
        )
    if labels not in metadata:
        raise ValueError(
            f"labels={labels!r} is not a metadata field of the input ({sorted(metadata)})"
        )
    column = metadata[labels]
    if column.null_count or not pa.types.is_integer(column.type):
        raise ValueError(
            f"labels={labels!r}: the classes must be integers without nulls, got {column.type}"
        )
    classes = column.to_numpy()
    if len(classes) and not (classes.min() >= 0 and classes.max() < model.num_classes):
        raise ValueError(
            f"labels={labels!r}: classes must lie in [0, {model.num_classes}), got "
            f"[{classes.min()}, {classes.max()}]"
        )
    return classes.astype(np.int32)


def _token_width(model: Model) -> int:
    return int(np.asarray(model.tokenize([""])).shape[1])


def _describe(column: Column) -> dict[str, Any]:
    """A column's settings for ``run.json`` (arrays by shape and a checksum)."""
    described = {"column": type(column).__name__}
    if hasattr(column, "describe"):  # a column holding a callable or data describes itself
        return {**described, **column.describe()}
    for field in dataclasses.fields(column):
        value = getattr(column, field.name)
        if isinstance(value, (np.ndarray, jax.Array)):
            host = np.ascontiguousarray(np.asarray(value))
            value = {
                "shape": list(host.shape),
                "sha256": hashlib.sha256(host.tobytes()).hexdigest(),
            }
        described[field.name] = value
    return described


def _check(model, columns, source, *, batch_size, chunk_size, threads, resize) -> tuple[str, ...]:
    if not columns:
        raise ValueError("columns must name at least one column to compute")
    for name, value in (
        ("batch_size", batch_size),
        ("chunk_size", chunk_size),
        ("threads", threads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if resize not in ("none", "center_crop"):
        raise ValueError(f"resize must be 'none' or 'center_crop', got {resize!r}")
    names = tuple(n for c in columns for n in c.names)
    reserved = set(_RESERVED) & set(names)
    if reserved or len(set(names)) != len(names):
        raise ValueError(
            f"column names must be unique and not "
            f"{' or '.join(map(repr, _RESERVED))}, got {list(names)}"
        )
    clash = sorted((set(_RESERVED) | set(names)) & set(source.metadata))
    if clash:
        raise ValueError(
            f"the input's metadata {clash} would collide with the output's "
            f"{'columns' if set(clash) & set(names) else 'reserved names'} "
            f"({', '.join(_RESERVED)}, {', '.join(names)}): choose other metadata "
            f"or rename them in the input"
        )
    for column in columns:
        column.check(model)
        if column.on_host and not source.has_images and model.decode is None:
            raise ValueError(f"{type(column).__name__} needs images, and the input has none")
        if column.needs_text:
            if model.tokenize is None:
                raise ValueError(
                    f"{type(column).__name__} needs captions, and the model has no tokenizer"
                )
            if not source.has_text:
                raise ValueError(f"{type(column).__name__} needs captions, and the input has none")
    if len(source) == 0:
        raise ValueError("the input holds no item")
    return names


def _in_flight(fetched: queue.Queue, results: queue.Queue, done_at: list[float]) -> None:
    """Fetcher thread: waits for each dispatched step, copies its rows to the host and notes
    when it finished."""
    while True:
        job = fetched.get()
        if job is None:
            results.put(None)
            return
        out, loaded, batch = job
        try:
            rows = _local_rows(out, batch)
        except BaseException as err:  # surface device errors in the main thread
            results.put(err)
            return
        done_at.append(time.perf_counter())
        results.put((loaded, rows))


def _progress(console: Console | None, plan: Plan) -> Progress:
    label = f"process {plan.process_index}/{plan.processes}" if plan.processes > 1 else "scoring"
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]} items/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
        transient=False,
    )


def _run(
    plan: Plan,
    step,
    replicated,
    device_batch,
    slots,
    local_batch: int,
    out: str,
    pending: list[int],
    dtypes: dict[str, np.dtype],
    metadata: dict[str, pa.Array],
    console: Console | None,
    generated_columns: tuple = (),
) -> Summary:
    chunk_size = plan.chunk_size
    chunks = {
        c: _Chunk(c * chunk_size, min((c + 1) * chunk_size, plan.num_items), plan.images_per_item)
        for c in pending
    }
    fetched: queue.Queue = queue.Queue(maxsize=2)
    results: queue.Queue = queue.Queue()
    done_at: list[float] = []
    fetcher = threading.Thread(target=_in_flight, args=(fetched, results, done_at), daemon=True)
    fetcher.start()
    stats = {"scored": 0, "bad": 0, "written": 0}
    dispatched_at: list[float] = []
    start = time.perf_counter()
    first_done = first_resolved = None

    def finish(result) -> None:
        if isinstance(result, BaseException):
            raise result
        loaded, rows = result
        images = rows.pop(_PIXELS, None)
        for k, (item, j) in enumerate(loaded):
            values = {name: v[k] for name, v in rows.items()}
            values.update(item.host)
            for column in generated_columns:  # host columns of a generated image
                values.update(_host_values(column, images[k], item.index, j))
            chunks[item.index // chunk_size].rows[item.index, j] = values
        stats["scored"] += sum(j == plan.images_per_item - 1 for _, j in loaded)

    def flush() -> None:
        for c in [c for c, state in chunks.items() if state.complete]:
            state = chunks.pop(c)
            _write(out, c, state, dtypes, metadata, plan)
            stats["written"] += 1

    progress = _progress(console, plan)
    with progress:
        task = progress.add_task("score", total=plan.items_pending, rate="-")
        exhausted = False
        for _ in range(plan.steps):
            loaded = []
            if not exhausted:
                loaded, bad, exhausted = _collect(slots, local_batch, chunks, chunk_size)
                stats["bad"] += bad
            batch = device_batch(loaded)
            dispatched_at.append(time.perf_counter())
            fetched.put((step(*replicated, batch), loaded, local_batch))
            while not results.empty():
                finish(results.get())
            flush()
            resolved = stats["scored"] + stats["bad"]
            if done_at and first_done is None:
                first_done, first_resolved = done_at[0], resolved
            rate = "-"
            if first_done is not None and len(done_at) > 1:
                rate = f"{(resolved - first_resolved) / (time.perf_counter() - first_done):.1f}"
            progress.update(task, completed=min(resolved, plan.items_pending), rate=rate)
        if next(slots, None) is not None:  # cannot happen: the steps were planned for them all
            raise RuntimeError("input items left after the planned steps")
        fetched.put(None)
        while (result := results.get()) is not None:
            finish(result)
        flush()
        progress.update(task, completed=plan.items_pending)
    if chunks:
        raise RuntimeError(f"chunks {sorted(chunks)} were not completed")
    seconds = time.perf_counter() - start
    summary = _summarise(plan, stats, seconds, dispatched_at, done_at, start)
    if console is not None:
        console.print(
            f"process {plan.process_index}: {summary.scored} items scored, "
            f"{summary.errors} bad, {summary.chunks_written} chunks written in "
            f"{seconds:.1f} s ({summary.items_per_second:.1f} items/s after compilation, "
            f"device idle {100 * summary.device_idle:.1f}%)"
        )
    return summary


def _collect(slots, local_batch: int, chunks: dict[int, _Chunk], chunk_size: int):
    """The next ``local_batch`` slots ``(good item, image index)`` (fewer at the end); bad items
    are recorded in their chunks as they pass. Returns ``(slots, number of bad items, input
    exhausted)``."""
    loaded, bad = [], 0
    for item, j in slots:
        chunk = chunks[item.index // chunk_size]
        chunk.ids[item.index] = item.id
        if item.error is not None:
            chunk.errors[item.index] = item.error
            bad += 1
            continue
        loaded.append((item, j))
        if len(loaded) == local_batch:
            return loaded, bad, False
    return loaded, bad, True


def _write(
    out: str,
    c: int,
    state: _Chunk,
    dtypes: dict[str, np.dtype],
    metadata: dict[str, pa.Array],
    plan: Plan,
) -> None:
    good = sorted(state.rows)
    index = [i for i, _ in good]
    values = {}
    if plan.mode == "prompts":
        values["image_index"] = np.array([j for _, j in good], np.int32)
    values.update({n: array.take(index) for n, array in metadata.items()})
    values.update(
        {n: np.array([state.rows[key][n] for key in good], dtype) for n, dtype in dtypes.items()}
    )
    rows = store.rows_table(np.array(index, np.int64), [state.ids[i] for i in index], values)
    bad = sorted(state.errors)
    errors = store.errors_table(bad, [state.ids[i] for i in bad], [state.errors[i] for i in bad])
    ids = [state.ids[i] for i in range(state.start, state.stop)]
    store.write_chunk(
        out,
        c,
        start=state.start,
        stop=state.stop,
        rows=rows,
        errors=errors,
        ids=ids,
        process=plan.process_index,
    )


def _summarise(plan, stats, seconds, dispatched_at, done_at, start) -> Summary:
    compile_seconds = (done_at[0] - start) if done_at else 0.0
    steady = seconds - compile_seconds
    idle = 0.0
    for k in range(1, min(len(dispatched_at), len(done_at))):
        idle += max(0.0, dispatched_at[k] - done_at[k - 1])
    resolved_after_first = plan.items_pending - min(
        plan.items_pending, plan.global_batch // plan.processes
    )
    per_step = steady / max(len(done_at) - 1, 1)
    return Summary(
        plan=plan,
        scored=stats["scored"],
        errors=stats["bad"],
        chunks_written=stats["written"],
        seconds=seconds,
        compile_seconds=compile_seconds,
        items_per_second=resolved_after_first / steady if steady > 0 else math.nan,
        device_idle=idle / steady if steady > 0 else 0.0,
        seconds_per_step=per_step,
    )


def _dry_run(plan, step, replicated, device_batch, slots, local_batch, console) -> Summary:
    chunks = {
        c: _Chunk(
            c * plan.chunk_size,
            min((c + 1) * plan.chunk_size, plan.num_items),
            plan.images_per_item,
        )
        for c in range(plan.num_chunks)
    }
    loaded = _collect(slots, local_batch, chunks, plan.chunk_size)[0] if plan.items_pending else []
    batch = device_batch(loaded)
    start = time.perf_counter()
    jax.block_until_ready(step(*replicated, batch))
    compile_seconds = time.perf_counter() - start
    timings = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(step(*replicated, batch))
        timings.append(time.perf_counter() - t)
    per_step = float(np.median(timings))
    summary = Summary(
        plan=plan,
        scored=0,
        errors=0,
        chunks_written=0,
        seconds=compile_seconds + sum(timings),
        compile_seconds=compile_seconds,
        items_per_second=plan.global_batch / per_step,
        device_idle=0.0,
        seconds_per_step=per_step,
    )
    return summary
