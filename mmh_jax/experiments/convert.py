"""``mmh-jax convert``: load a PyTorch checkpoint strictly, write it as one safetensors file that
the JAX loaders read without torch, and print a summary table.

The command line (:mod:`mmh_jax.cli`) parses the arguments into a :class:`ConvertConfig`;
:func:`run` does the rest and returns the exit status.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ConvertConfig",
    "IDDPM_MODEL_OPTIONS",
    "IDDPM_DIFFUSION_OPTIONS",
    "int_list",
    "config_from_args",
    "run",
]

Architecture = Literal["unet2d", "iddpm", "stable-diffusion", "stylegan2"]


def int_list(text: str) -> tuple[int, ...]:
    """argparse type of ``--channel-mult``: comma-separated ints."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints such as 1,2,2,2, got {text!r}"
        ) from None


IDDPM_MODEL_OPTIONS: tuple[tuple[str, Any, str | None, str], ...] = (
    ("image_size", int, "SIZE", "height and width of the images"),
    ("num_channels", int, "N", "base channel count"),
    ("num_res_blocks", int, "N", "ResBlocks per resolution level"),
    (
        "channel_mult",
        int_list,
        "M1,M2,...",
        "channel multipliers per resolution level (not a "
        "flag of improved-diffusion, which derives them "
        "from the image size)",
    ),
    ("learn_sigma", bool, None, "the model also outputs variances (6 output channels)"),
    ("attention_resolutions", str, "R1,R2,...", "resolutions whose blocks have attention"),
    ("num_heads", int, "N", "attention heads"),
    ("num_heads_upsample", int, "N", "attention heads of the output blocks (-1: --num-heads)"),
    ("use_scale_shift_norm", bool, None, "FiLM conditioning of the ResBlocks"),
    ("dropout", float, "P", "training dropout rate (recorded only)"),
)
"""The model flags of ``convert iddpm`` (``load_iddpm``'s keyword arguments, named as
improved-diffusion's flags), each ``(name, argparse type, metavar, help)``: a ``bool`` type gives
``--flag/--no-flag``, a tuple the choices; the defaults shown in ``--help`` are ``load_iddpm``'s."""
IDDPM_DIFFUSION_OPTIONS: tuple[tuple[str, Any, str | None, str], ...] = (
    ("diffusion_steps", int, "T", "number of diffusion steps"),
    ("noise_schedule", ("linear", "cosine"), None, "beta schedule"),
    ("rescale_timesteps", bool, None, "the network saw step i as i * 1000 / T"),
)
"""The diffusion flags of ``convert iddpm``, in the layout of :data:`IDDPM_MODEL_OPTIONS`."""
_IDDPM_NAMES = tuple(option[0] for option in IDDPM_MODEL_OPTIONS + IDDPM_DIFFUSION_OPTIONS)


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Settings of ``mmh-jax convert`` (the CLI arguments map one to one onto these).

    Attributes:
        architecture: what the checkpoint holds.
        path: the checkpoint (a file, or a diffusers folder).
        output: the ``.safetensors`` file to write.
        network: StyleGAN2: which generator of a training snapshot.
        init_kwargs: StyleGAN2: a JSON file with a plain state dict's constructor arguments.
        iddpm_flags: improved-diffusion: the flags given (the others take its defaults).
    """

    architecture: Architecture
    path: Path
    output: Path
    network: Literal["G", "G_ema"] = "G_ema"
    init_kwargs: Path | None = None
    iddpm_flags: dict[str, Any] = dataclasses.field(default_factory=dict)


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    """The :class:`ConvertConfig` of parsed ``mmh-jax convert`` arguments."""
    stylegan2 = {
        name: getattr(args, name) for name in ("network", "init_kwargs") if hasattr(args, name)
    }  # only `convert stylegan2` has them
    return ConvertConfig(
        architecture=args.architecture,
        path=args.path,
        output=args.output,
        **stylegan2,
        iddpm_flags={name: getattr(args, name) for name in _IDDPM_NAMES if hasattr(args, name)},
    )


class _ConvertError(Exception):
    """A reason ``convert`` stops, with its exit status (reported without a traceback)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


# what a loader returns: the parameters, the summary rows (name, value) and the function that
# writes the converted model to a path
_Loaded = tuple[Any, list[tuple[str, str]], Callable[[Path], Path]]


def _schedule_row(schedule: Any) -> tuple[str, str]:
    """A diffusion model's noise schedule as a summary row."""
    import numpy as np

    abar = np.asarray(schedule.alphas_cumprod)
    return (
        "schedule",
        f"T = {schedule.num_timesteps}, alphas_cumprod from {abar[0]:.6g} to {abar[-1]:.6g}",
    )


def _check_output(out: Path, source: Path) -> None:
    """Refuse an output path that cannot receive a .safetensors file, before any work."""
    if out.exists() and source.exists() and out.samefile(source):
        raise _ConvertError(
            f"-o/--output {str(out)!r} is the checkpoint itself; write the converted file elsewhere"
        )
    if out.suffix != ".safetensors":
        raise _ConvertError(f"-o/--output {str(out)!r} must end in .safetensors")
    if out.is_dir():
        raise _ConvertError(f"-o/--output {str(out)!r} is a folder; name the file to write")
    if not out.parent.is_dir():
        raise _ConvertError(f"-o/--output {str(out)!r}: folder {str(out.parent)!r} does not exist")


def _with_options(message: str) -> str:
    """A ValueError from ``load_iddpm`` with the command-line options of the flags it names."""
    named = [
        f"--{name.replace('_', '-')}" for name in _IDDPM_NAMES if re.search(rf"\b{name}\b", message)
    ]
    if not named:
        return message
    return f"{message} (option{'s' if len(named) > 1 else ''} {', '.join(named)})"


def _load_unet2d(config: ConvertConfig) -> _Loaded:
    """Load a diffusers UNet2DModel folder; the model, its summary rows and its writer."""
    from mmh_jax.models.loaders import load_unet2d, save_unet2d

    try:
        model = load_unet2d(config.path)
    except FileNotFoundError as err:
        message = str(err)
        if message.startswith("no scheduler config"):  # its hint names the Python API
            message = (
                message.split("; pass schedule=")[0] + "; save the scheduler with the "
                "model (scheduler.save_pretrained(FOLDER)) or copy its "
                "scheduler_config.json there"
            )
        raise _ConvertError(message) from None
    module = model.module
    heads = module.attention_head_dim
    rows = [
        ("architecture", "unet2d (diffusers UNet2DModel)"),
        ("sample_size", str(module.sample_size)),
        ("in / out channels", f"{module.in_channels} / {module.out_channels}"),
        ("block_out_channels", ", ".join(map(str, module.block_out_channels))),
        ("layers_per_block", str(module.layers_per_block)),
        ("down blocks", ", ".join(module.down_block_types)),
        ("up blocks", ", ".join(module.up_block_types)),
        ("mid-block attention", "yes" if module.mid_block_type and module.add_attention else "no"),
        ("attention_head_dim", "one head per block" if heads is None else str(heads)),
        _schedule_row(model.schedule),
    ]
    return model.params, rows, lambda out: save_unet2d(out, model)


def _load_iddpm(config: ConvertConfig) -> _Loaded:
    """Load an improved-diffusion checkpoint; the model, its summary rows and its writer."""
    from mmh_jax.convert.core import ConversionError
    from mmh_jax.convert.io import save_params
    from mmh_jax.models.iddpm import DIFFUSION_FLAGS, MODEL_FLAGS, load_iddpm

    given = config.iddpm_flags
    try:
        model = load_iddpm(config.path, **given)
    except ConversionError as err:
        raise _ConvertError(str(err), status=1) from None
    except ValueError as err:
        raise _ConvertError(_with_options(str(err))) from None
    defaults = {**MODEL_FLAGS, **DIFFUSION_FLAGS}
    flags = {name: given.get(name, defaults[name]) for name in _IDDPM_NAMES}
    shown = {**flags, "channel_mult": ", ".join(map(str, model.module.channel_mult))}
    rows = [("architecture", "iddpm (improved-diffusion UNetModel)")] + [
        (name, f"{value}" + ("" if name in given else " (default)"))
        for name, value in shown.items()
        if name != "diffusion_steps"
    ]  # in the schedule row
    rows.append(_schedule_row(model.schedule))
    metadata = {"architecture": "iddpm", "flags": flags}
    return model.params, rows, lambda out: save_params(out, model.params, metadata=metadata)


def _load_stable_diffusion(config: ConvertConfig) -> _Loaded:
    """Load a Stable Diffusion pipeline folder; the model, its summary rows and its writer."""
    from mmh_jax.models.stable_diffusion import load_stable_diffusion, save_stable_diffusion

    model = load_stable_diffusion(config.path)
    unet = model.unet.module
    rows = [
        ("architecture", "stable-diffusion (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)"),
        ("latents", " x ".join(map(str, model.latent_shape))),
        ("block_out_channels", ", ".join(map(str, unet.block_out_channels))),
        ("cross_attention_dim", str(unet.cross_attention_dim)),
        (
            "text encoder",
            f"{model.text_encoder.num_hidden_layers} layers, width "
            f"{model.text_encoder.hidden_size}, {model.text_encoder.hidden_act}",
        ),
        ("VAE scaling_factor", str(model.vae.scaling_factor)),
        ("prediction_type", model.scheduler_config.get("prediction_type", "epsilon")),
        _schedule_row(model.unet.schedule),
    ]
    every = {
        "unet": model.unet.params,
        "vae": model.vae_params,
        "text_encoder": model.text_encoder_params,
    }  # all three in the parameter count
    return every, rows, lambda out: save_stable_diffusion(out, model)


def _load_stylegan2(config: ConvertConfig) -> _Loaded:
    """Load a StyleGAN2-ADA checkpoint; its parameters, summary rows and writer."""
    from mmh_jax.models.stylegan2 import load_stylegan2, save_stylegan2

    init_kwargs = None
    if config.init_kwargs is not None:
        try:
            init_kwargs = json.loads(Path(config.init_kwargs).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise _ConvertError(f"--init-kwargs {str(config.init_kwargs)!r}: {err}") from None
    model = load_stylegan2(config.path, network=config.network, init_kwargs=init_kwargs)
    m = model.module
    channels = ", ".join(f"{r}: {m.channels(r)}" for r in m.block_resolutions)
    rows = [
        ("architecture", f"stylegan2 (StyleGAN2-ADA Generator, {m.architecture})"),
        ("network", config.network if Path(config.path).suffix == ".pkl" else "-"),
        ("z_dim / w_dim / c_dim", f"{m.z_dim} / {m.w_dim} / {m.c_dim}"),
        ("image", f"{m.img_channels} x {m.img_resolution} x {m.img_resolution}"),
        ("mapping layers", str(m.num_layers)),
        ("channels per resolution", channels),
        ("num_ws", str(m.num_ws)),
        ("conv_clamp", str(m.conv_clamp)),
    ]
    return model.params, rows, lambda out: save_stylegan2(out, model)


def run(config: ConvertConfig) -> int:
    """Convert: load strictly, write atomically, print a summary table; the exit status.

    Errors in the input are one line on stderr with status 2; a checkpoint that does not match
    its architecture (its full listing printed), or a .pt/.bin file without torch installed,
    status 1.
    """
    import jax
    from rich.filesize import decimal

    from mmh_jax.convert.core import ConversionError
    from mmh_jax.experiments.common import key_value_table, output_console

    console = output_console()
    start = time.perf_counter()
    path, output = Path(config.path), Path(config.output)
    try:
        _check_output(output, path)
        load = {
            "unet2d": _load_unet2d,
            "iddpm": _load_iddpm,
            "stable-diffusion": _load_stable_diffusion,
            "stylegan2": _load_stylegan2,
        }[config.architecture]
        with console.status(f"converting {path} ..."):
            params, rows, write = load(config)
            written = write(output)
    except (_ConvertError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"mmh-jax: error: {err}", file=sys.stderr)
        if isinstance(err, _ConvertError):
            return err.status
        return 1 if isinstance(err, (ConversionError, ImportError)) else 2
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        print(f"mmh-jax: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    leaves = jax.tree.leaves(params)
    rows = [
        ("source", str(path)),
        ("output", f"{written} ({decimal(written.stat().st_size)})"),
        ("parameters", f"{sum(leaf.size for leaf in leaves):,} in {len(leaves)} tensors"),
        *rows,
        ("time", f"{seconds:.1f} s"),
    ]
    console.print(
        key_value_table(rows, title=f"mmh-jax convert {config.architecture}", align="left")
    )
    return 0
