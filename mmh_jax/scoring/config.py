"""``mmh-jax score --config FILE.toml``: a scoring run described by one TOML file.

Every key is listed in :data:`SECTIONS` and :data:`COLUMNS` with its type, default and meaning;
``mmh-jax score --template`` prints them as a commented TOML file. :func:`read_config` rejects
an unknown section or key, a value of the wrong type and a missing input path before anything
is loaded, initialised or computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

from mmh_jax._src.images import to_model_range
from mmh_jax.scoring import columns as cols
from mmh_jax.scoring import detector_columns as detector_cols

__all__ = [
    "ConfigError",
    "Config",
    "read_config",
    "template",
    "SECTIONS",
    "COLUMNS",
    "load_model",
    "build_columns",
    "initialize_distributed",
    "run",
    "write_merged",
    "command",
]

_REQUIRED = object()


class ConfigError(ValueError):
    """A config file that cannot be run, with the file, key and reason."""


class Key(NamedTuple):
    """One config key: its type (a typing hint), default and meaning."""

    type: Any
    default: Any
    doc: str


SECTIONS: dict[str, dict[str, Key]] = {
    "model": {
        "kind": Key(
            Literal["unet2d", "iddpm", "stable-diffusion", "factory"],
            _REQUIRED,
            "unet2d (diffusers UNet2DModel), iddpm (improved-diffusion), stable-diffusion "
            "(v1.x/2.x pipeline) or factory (your function returning a scoring.Model)",
        ),
        "path": Key(
            str,
            "",
            "the model: a local folder or converted .safetensors file (not for "
            "factory); relative paths are relative to the config file",
        ),
        "dtype": Key(
            Literal["float32", "bfloat16"],
            "float32",
            "compute dtype of the networks (estimates stay float32)",
        ),
        "factory": Key(
            str,
            "",
            "for kind = factory: 'package.module:function', the module on the "
            "Python path or beside the config file",
        ),
        "options": Key(
            dict,
            {},
            "keyword arguments: improved-diffusion's flags for iddpm "
            "(image_size, num_channels, ...), or the factory's",
        ),
    },
    "input": {
        "path": Key(
            str,
            _REQUIRED,
            "a folder of images (KEY.txt captions beside them), a .npy/.npz array file, "
            "webdataset .tar shards (a file, a folder, a glob or a brace range like "
            "'laion/{00000..00099}.tar'), a .parquet file or folder, or a .txt/.jsonl "
            "file of prompts",
        ),
        "resize": Key(
            Literal["none", "center_crop"],
            "none",
            "images of another size: 'none' puts them in the errors table, "
            "'center_crop' resizes the short side (bicubic) and crops the centre",
        ),
        "metadata": Key(
            tuple[str, ...],
            (),
            "fields of each item written beside its scores "
            "(labels, duplicate counts, ...): fields of the "
            ".jsonl lines, Parquet columns, or 1-D arrays of "
            "the .npz",
        ),
        "options": Key(
            dict,
            {},
            "options of the input's reader: key / ids_key (.npz), "
            "image_column / text_column / id_column (Parquet), recursive "
            "(folders)",
        ),
    },
    "output": {
        "dir": Key(
            str,
            _REQUIRED,
            "the run's folder: parts/, errors/, manifest/, run.json; a rerun resumes it",
        ),
        "chunk_size": Key(int, 1024, "items per Parquet part (the unit of resumption)"),
    },
    "run": {
        "batch_size": Key(
            int,
            64,
            "global batch over all devices of all hosts (a multiple of the number of devices)",
        ),
        "seed": Key(int, 0, "PRNG seed: item i's key is fold_in(key(seed), i)"),
        "threads": Key(int, 8, "decoding threads per process"),
    },
    "generate": {
        "guidance": Key(
            float,
            7.5,
            "for an input of prompts alone (Stable Diffusion): the "
            "guidance scale of the DDIM sampler that makes each image",
        ),
        "num_steps": Key(int, 50, "its DDIM steps"),
        "num_images": Key(
            int,
            1,
            "images per prompt, one row each (column image_index); image "
            "j is StableDiffusion.sample's image j of the prompt under "
            "the same seed",
        ),
    },
    "distributed": {
        "initialize": Key(
            bool,
            False,
            "call jax.distributed.initialize() before anything else "
            "(multi-host runs); the keys below are optional: JAX "
            "detects Slurm, Open MPI, Kubernetes and Cloud TPU",
        ),
        "coordinator_address": Key(str, "", "'host:port' of process 0"),
        "num_processes": Key(int, 0, "number of processes (0: detected)"),
        "process_id": Key(int, -1, "this process's index (-1: detected)"),
        "local_device_ids": Key(
            tuple[int, ...],
            (),
            "devices this process uses (empty: JAX's "
            "choice: all visible, or on Slurm / Open MPI "
            "one per local rank)",
        ),
    },
}
"""The sections and keys of a scoring config, each with its type, default and meaning (what
``mmh-jax score --template`` prints)."""

COLUMNS: dict[str, tuple[type, dict[str, Any], dict[str, str]]] = {
    "flipd": (
        cols.Flipd,
        {"conditional": False, "guidance": 7.5},
        {
            "t0": "diffusion time(s) in (0, 1]; one output column each (paper: 0.05)",
            "num_probes": "Hutchinson probes",
            "probe": "'rademacher' or 'gaussian'",
        },
    ),
    "conditional_flipd": (
        cols.Flipd,
        {"conditional": True},
        {
            "t0": "diffusion time(s) in (0, 1]",
            "num_probes": "Hutchinson probes",
            "probe": "'rademacher' or 'gaussian'",
            "guidance": "guidance scale of the CFG score given the caption",
        },
    ),
    "normal_bundle": (
        cols.NormalBundle,
        {},
        {
            "t0": "diffusion time(s) in (0, 1]",
            "num_scores": "scores per point (default 4 d)",
            "threshold": "'gap' or a singular-value threshold",
        },
    ),
    "cfg_norms": (
        cols.CFGNorms,
        {},
        {
            "guidance": "guidance scale of the CFG-adjusted score",
            "t0": "where the norms are read",
            "num_steps": "Euler steps of the conditional PF-ODE to t0",
        },
    ),
    "jacobian_rank": (cols.JacobianRank, {}, {"threshold": "singular values above it count"}),
    "nearest_neighbour": (
        cols.NearestNeighbour,
        {},
        {
            "reference": "a .npy/.npz of reference items (uint8 [n, h, w, c] images or float "
            "arrays shaped like the items), e.g. the training set",
            "chunk_size": "reference rows per distance block",
        },
    ),
    "png_size": (cols.PngSize, {}, {}),
    "cross_attention": (
        detector_cols.CrossAttentionStats,
        {},
        {
            "early_steps": "first generation steps averaged for Ren et al.'s entropy and "
            "beginning/end-token attention (bright ending: the last step); prompt inputs only",
        },
    ),
    "value_activations": (detector_cols.ValueActivations, {}, {}),
    "sharpness": (
        detector_cols.Sharpness,
        {},
        {
            "guidance": "guidance scale of the CFG score whose Hessian trace is read "
            "(Jeon et al.), at the starting noise; prompt inputs only",
            "num_probes": "Hutchinson probes",
        },
    ),
    "detector_images": (
        detector_cols.DetectorImages,
        {},
        {
            "guidance": "guidance scale of the one-step x_0 prediction (Webster's test; set "
            "it to [generate] guidance); prompt inputs only",
        },
    ),
}
"""The columns a config may name: ``name -> (class, fixed settings, {key: meaning})``; every
key of a ``[columns.NAME]`` table is one of these keys."""


class Config(NamedTuple):
    """A checked config: every section with its defaults filled in."""

    path: Path
    model: dict[str, Any]
    input: dict[str, Any]
    output: dict[str, Any]
    run: dict[str, Any]
    generate: dict[str, Any]
    distributed: dict[str, Any]
    columns: dict[str, dict[str, Any]]


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        element = typing.get_args(hint)[0]
        return "a list of " + {float: "numbers", int: "integers", str: "strings"}.get(
            element, "values"
        )
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a table",
        list: "a list",
        type(None): "absent",
    }.get(hint, str(hint))


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin is tuple:
        return isinstance(value, list) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is type(None):
        return False  # TOML has no null: leave the key out for None
    return isinstance(value, hint)


def _check_table(table: Any, spec: dict[str, tuple[Any, Any]], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - set(spec))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(spec) or 'none'}"
        )
    out = {}
    for key, (hint, default) in spec.items():
        if key not in table:
            if default is _REQUIRED:
                raise ConfigError(f"{where}: missing required key {key!r} ({_type_name(hint)})")
            out[key] = default
            continue
        value = table[key]
        _reject_non_finite(value, f"{where} {key}")
        if not _matches(value, hint):
            raise ConfigError(f"{where}.{key} must be {_type_name(hint)}, got {value!r}")
        out[key] = tuple(value) if typing.get_origin(hint) is tuple else value
    return out


def _reject_non_finite(value: Any, where: str) -> None:
    """Raise on a nan or inf anywhere in ``value``: TOML allows them, no key takes one."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if isinstance(value, list):
        for element in value:
            _reject_non_finite(element, where)
    elif isinstance(value, dict):
        for key, element in value.items():
            _reject_non_finite(element, f"{where}.{key}")


def _column_spec(name: str) -> dict[str, tuple[Any, Any]]:
    cls, fixed, _ = COLUMNS[name]
    hints = typing.get_type_hints(cls)
    spec = {}
    for field in dataclasses.fields(cls):
        if field.name in fixed:
            continue
        default = field.default if field.default is not dataclasses.MISSING else _REQUIRED
        hint = str if field.name == "reference" else hints[field.name]
        spec[field.name] = (hint, default)
    return spec


def read_config(path: str | os.PathLike, *, check_files: bool = True) -> Config:
    """Read and check a scoring config; nothing is loaded or computed.

    Args:
        path: the TOML file.
        check_files: also check that the model, input and reference paths exist (off to check
            a config written for another machine).

    Raises:
        ConfigError: the file is not TOML, or has an unknown section or key, a wrong type, a
            missing required key, a bad value, or names an input, model or reference that does
            not exist; the message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a TOML file: {err}") from None
    unknown = sorted(set(raw) - set(SECTIONS) - {"columns"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(unknown)}; known: "
            f"{', '.join([*SECTIONS, 'columns'])}"
        )
    sections = {
        name: _check_table(
            raw.get(name, {}),
            {k: (v.type, v.default) for k, v in keys.items()},
            f"{path}: [{name}]",
        )
        for name, keys in SECTIONS.items()
    }
    columns_raw = raw.get("columns", {})
    if not isinstance(columns_raw, dict) or not columns_raw:
        raise ConfigError(
            f"{path}: needs at least one [columns.NAME] table; NAME one of {', '.join(COLUMNS)}"
        )
    columns = {}
    for name, table in columns_raw.items():
        if name not in COLUMNS:
            raise ConfigError(
                f"{path}: unknown column [columns.{name}]; known: {', '.join(COLUMNS)}"
            )
        columns[name] = _check_table(table, _column_spec(name), f"{path}: [columns.{name}]")

    base = path.parent

    def resolve(value: str) -> str:
        return value if not value or Path(value).is_absolute() else str(base / value)

    model, inputs, output = sections["model"], sections["input"], sections["output"]
    inputs["path"] = resolve(inputs["path"])
    output["dir"] = resolve(output["dir"])
    if model["kind"] == "factory":
        if ":" not in model["factory"]:
            raise ConfigError(
                f"{path}: [model] kind = 'factory' needs factory = 'package.module:function'"
            )
    else:
        if not model["path"]:
            raise ConfigError(f"{path}: [model] kind = {model['kind']!r} needs a path")
        model["path"] = resolve(model["path"])
        if check_files and not Path(model["path"]).exists():
            raise ConfigError(f"{path}: [model] path {model['path']!r} does not exist")
    if (
        check_files
        and "{" not in inputs["path"]
        and not any(c in inputs["path"] for c in "*?[")
        and not Path(inputs["path"]).exists()
    ):
        raise ConfigError(f"{path}: [input] path {inputs['path']!r} does not exist")
    if "nearest_neighbour" in columns:
        reference = resolve(columns["nearest_neighbour"]["reference"])
        if check_files and not Path(reference).is_file():
            raise ConfigError(
                f"{path}: [columns.nearest_neighbour] reference {reference!r} does not exist"
            )
        columns["nearest_neighbour"]["reference"] = reference
    _check_options(path, model, inputs)
    for section, key in (
        ("output", "chunk_size"),
        ("run", "batch_size"),
        ("run", "threads"),
        ("generate", "num_steps"),
        ("generate", "num_images"),
    ):
        if sections[section][key] < 1:
            raise ConfigError(
                f"{path}: [{section}] {key} must be >= 1, got {sections[section][key]}"
            )
    config = Config(
        path,
        model,
        inputs,
        output,
        sections["run"],
        sections["generate"],
        sections["distributed"],
        columns,
    )
    try:  # the columns' own checks (times in (0, 1], ...) before any work
        build_columns(config, reference_loader=lambda p: None)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: [columns]: {err}") from None
    return config


def _check_options(path: Path, model: dict, inputs: dict) -> None:
    """The ``options`` tables name keys their reader or loader takes."""
    import inspect

    from mmh_jax.scoring import sources

    readers = (
        sources.ImageFolder,
        sources.ArrayFile,
        sources.TarShards,
        sources.ParquetTable,
        sources.PromptFile,
    )
    accepted = {
        name
        for cls in readers
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    } - {"metadata"}  # [input] metadata
    unknown = sorted(set(inputs["options"]) - accepted)
    if unknown:
        raise ConfigError(
            f"{path}: [input] options: unknown key(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(accepted))}"
        )
    if model["kind"] == "iddpm":
        from mmh_jax.models.iddpm import IDDPM_FLAGS

        unknown = sorted(set(model["options"]) - set(IDDPM_FLAGS))
        if unknown:
            raise ConfigError(
                f"{path}: [model] options: unknown improved-diffusion flag(s) "
                f"{', '.join(unknown)}; known: {', '.join(IDDPM_FLAGS)}"
            )
    elif model["kind"] != "factory" and model["options"]:
        raise ConfigError(f"{path}: [model] options are taken by kind = 'iddpm' and 'factory' only")


def build_columns(config: Config, *, reference_loader=None) -> list:
    """The column objects of a config (the nearest-neighbour reference read from its file)."""
    load = _read_reference if reference_loader is None else reference_loader
    out = []
    for name, settings in config.columns.items():
        cls, fixed, _ = COLUMNS[name]
        settings = dict(settings)
        if name == "nearest_neighbour":
            settings["reference"] = load(settings["reference"])
            if settings["reference"] is None:
                continue
        out.append(cls(**settings, **fixed))
    return out


def _read_reference(path: str):
    """A reference set as the engine's inputs are read: uint8 images to ``[-1, 1]`` NCHW."""
    import numpy as np

    from mmh_jax.scoring.sources import ArrayFile

    source = ArrayFile(path)
    rows = [source[i] for i in range(len(source))]
    bad = [r for r in rows if not hasattr(r, "image")]
    if bad:
        raise ConfigError(f"reference {path!r}: {bad[0].reason}")
    array = np.stack([r.image for r in rows])
    if array.dtype == np.uint8:
        array = to_model_range(array)
    return np.asarray(array, np.float32)


def load_model(config: Config):
    """The :class:`~mmh_jax.scoring.Model` a config names (loads the weights)."""
    import jax.numpy as jnp

    from mmh_jax.scoring.model import Model

    model = config.model
    dtype = jnp.bfloat16 if model["dtype"] == "bfloat16" else jnp.float32
    if model["kind"] == "factory":
        module_name, _, function = model["factory"].partition(":")
        folder = str(config.path.parent.resolve())
        if folder not in sys.path:  # a module beside the config, as relative paths are
            sys.path.append(folder)
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as err:
            raise ConfigError(
                f"{config.path}: [model] factory {model['factory']!r}: {err}"
            ) from None
        result = factory(**model["options"])
        if not isinstance(result, Model):
            raise ConfigError(
                f"{config.path}: [model] factory must return a "
                f"mmh_jax.scoring.Model, got {type(result).__name__}"
            )
        return result
    from mmh_jax import models

    loaded = models.load_model(model["path"], kind=model["kind"], dtype=dtype, **model["options"])
    if model["kind"] == "stable-diffusion":
        return Model.from_stable_diffusion(loaded, description=f"Stable Diffusion {model['path']}")
    name = {"iddpm": "iDDPM", "unet2d": "UNet2D"}[model["kind"]]
    return Model.from_pretrained(loaded, description=f"{name} {model['path']}")


def initialize_distributed(settings: dict[str, Any]) -> None:
    """``jax.distributed.initialize`` with the config's ``[distributed]`` settings (unset ones
    left to JAX's cluster detection). Must run before any other JAX call."""
    import jax

    if not settings["initialize"]:
        return
    kwargs = {}
    if settings["coordinator_address"]:
        kwargs["coordinator_address"] = settings["coordinator_address"]
    if settings["num_processes"]:
        kwargs["num_processes"] = settings["num_processes"]
    if settings["process_id"] >= 0:
        kwargs["process_id"] = settings["process_id"]
    if settings["local_device_ids"]:
        kwargs["local_device_ids"] = list(settings["local_device_ids"])
    jax.distributed.initialize(**kwargs)


def template() -> str:
    """Every key of a config, with its default and meaning, as a commented TOML file."""
    lines = [
        "# mmh-jax score --config FILE.toml: every key, with its default.",
        "# Required keys are uncommented; relative paths are relative to this file.",
        "",
    ]
    for name, keys in SECTIONS.items():
        lines.append(f"[{name}]")
        for key, spec in keys.items():
            lines.append(f"# {spec.doc} ({_type_name(spec.type)})")
            if spec.default is _REQUIRED:
                example = {"kind": '"unet2d"', "path": '"samples/"', "dir": '"scores/"'}[key]
                lines.append(f"{key} = {example}")
            else:
                lines.append(f"# {key} = {_toml(spec.default)}")
        lines.append("")
    lines.append("# Columns: one table per kind; give the table (even empty) to compute it.")
    for name, (_, _, docs) in COLUMNS.items():
        lines.append(f"# [columns.{name}]")
        for key, (hint, default) in _column_spec(name).items():
            shown = '"train.npy"' if default is _REQUIRED else _toml(default)
            lines.append(f"#   {key} = {shown}    # {docs.get(key, '')} ({_type_name(hint)})")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}"
    if value is None:
        return "(unset)"
    return repr(value)


def run(config: Config, *, dry_run: bool = False, console: Any = None):
    """Run a config on this process: initialise JAX's distributed runtime if asked, load the
    model, open the input, score, and on process 0 merge the parts when every chunk is there.

    Returns:
        The engine's :class:`~mmh_jax.scoring.Summary` for this process.
    """
    initialize_distributed(config.distributed)  # before any other JAX call
    import jax
    from jax.experimental import multihost_utils

    from mmh_jax.scoring import store
    from mmh_jax.scoring.engine import Generation, score
    from mmh_jax.scoring.sources import open_source

    model = load_model(config)
    try:
        metadata = {"metadata": list(config.input["metadata"])} if config.input["metadata"] else {}
        source = open_source(config.input["path"], **config.input["options"], **metadata)
    except (TypeError, ValueError, FileNotFoundError) as err:
        raise ConfigError(f"{config.path}: [input]: {err}") from None
    summary = score(
        model,
        build_columns(config),
        source,
        config.output["dir"],
        seed=config.run["seed"],
        batch_size=config.run["batch_size"],
        chunk_size=config.output["chunk_size"],
        resize=config.input["resize"],
        threads=config.run["threads"],
        dry_run=dry_run,
        generation=Generation(
            float(config.generate["guidance"]),
            config.generate["num_steps"],
            config.generate["num_images"],
        ),
        console=console,
        record={"model_path": config.model["path"] or config.model["factory"]},
    )
    if dry_run:
        return summary
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mmh-jax score: all chunks written")
    if jax.process_index() == 0:
        missing = set(range(summary.plan.num_chunks)) - store.done_chunks(config.output["dir"])
        if not missing:
            write_merged(config.output["dir"])
        elif console is not None:
            console.print(
                f"{len(missing)} chunks were written by other hosts to folders this "
                f"one does not see: gather the output folders, then run `mmh-jax "
                f"score merge DIR`"
            )
    return summary


def write_merged(out: str | os.PathLike, *, allow_partial: bool = False) -> tuple[Path, Path]:
    """Merge a run's parts into ``scores.parquet`` and ``errors.parquet`` in its folder."""
    import pyarrow.parquet as pq

    from mmh_jax._src.files import atomic_path
    from mmh_jax.scoring.store import merge

    merged = merge(out, allow_partial=allow_partial)
    out = Path(out)
    paths = out / "scores.parquet", out / "errors.parquet"
    for target in paths:  # the temporaries of a merge that was killed (one merger per run)
        for stale in out.glob(f".{target.name}.*.part"):
            stale.unlink(missing_ok=True)
    for table, target in zip((merged.scores, merged.errors), paths):
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp)
    return paths


def command(args: argparse.Namespace) -> int:
    """``mmh-jax score`` with parsed arguments: merge a run, print the template, or run a config
    (its ``[distributed]`` settings overridden by the process flags) and print a summary table;
    the exit status (2 for a config the engine refuses, with one line on stderr)."""
    from rich.console import Console

    if args.score_command == "merge":
        try:
            scores, errors = write_merged(args.dir, allow_partial=args.allow_partial)
        except (ValueError, FileNotFoundError) as err:
            print(f"mmh-jax: error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {scores} and {errors}")
        return 0
    if args.template:
        print(template(), end="")
        return 0
    console = Console(stderr=True)
    try:
        config = read_config(args.config)
        flags = {
            "process_id": args.process_id,
            "num_processes": args.num_processes,
            "coordinator_address": args.coordinator_address,
        }
        for key, value in flags.items():
            if value is not None:
                config.distributed[key] = value
                config.distributed["initialize"] = True
        summary = run(config, dry_run=args.dry_run, console=None if args.quiet else console)
    except ConfigError as err:
        print(f"mmh-jax: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a setting the engine refused before any work
        print(f"mmh-jax: error: {err}", file=sys.stderr)
        return 2
    _print_summary(console, summary, dry_run=args.dry_run)
    return 0


def _print_summary(console: Any, summary: Any, *, dry_run: bool) -> None:
    """The plan (and, after a run, what was done) as a table."""
    from rich.table import Table

    plan = summary.plan
    table = Table(title="dry run: the plan" if dry_run else f"process {plan.process_index}: done")
    table.add_column("")
    table.add_column("", justify="right")
    rows = [
        ("items", f"{plan.num_items:,}"),
        (
            "chunks (done / all)",
            f"{plan.chunks_done:,} / {plan.num_chunks:,} of {plan.chunk_size:,}",
        ),
        (
            "this process: chunks / items to score",
            f"{plan.chunks_pending:,} / {plan.items_pending:,}",
        ),
        ("devices / processes", f"{plan.devices} / {plan.processes}"),
        ("global batch / steps", f"{plan.global_batch} / {plan.steps:,}"),
        (
            "input",
            plan.mode
            + (f", {plan.images_per_item} images each" if plan.images_per_item > 1 else ""),
        ),
        ("columns", ", ".join(plan.columns)),
        ("compilation", f"{summary.compile_seconds:.1f} s"),
        ("seconds per step", f"{summary.seconds_per_step:.3f}"),
    ]
    if dry_run:
        rows.append(
            (
                "estimated time",
                f"{plan.steps * summary.seconds_per_step / 60:.1f} min (+ compilation)",
            )
        )
    else:
        rows += [
            ("scored / bad items", f"{summary.scored:,} / {summary.errors:,}"),
            ("chunks written", f"{summary.chunks_written:,}"),
            ("items/s (after compilation)", f"{summary.items_per_second:.1f}"),
            ("device idle", f"{100 * summary.device_idle:.1f}%"),
            ("wall time", f"{summary.seconds:.1f} s"),
        ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
