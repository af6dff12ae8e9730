"""Stable Diffusion (v1.x, 2.x) from a local diffusers pipeline folder or a converted file.

:func:`load_stable_diffusion` reads a folder saved by ``StableDiffusionPipeline.save_pretrained``
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)
or the single ``.safetensors`` file :func:`save_stable_diffusion` writes (``mmh-jax convert
stable-diffusion``; no torch needed to read it). Every component is converted strictly, checked
against the others (the text encoder's width is the UNet's ``cross_attention_dim``, the VAE's
latent channels are the UNet's input channels), and nothing is downloaded.
:func:`save_stable_diffusion_folder` writes Flax networks back as such a pipeline folder (no
torch needed to write it), which both :func:`load_stable_diffusion` and diffusers'
``StableDiffusionPipeline.from_pretrained`` read.

The result, :class:`StableDiffusion`, holds the Flax modules and parameters, the exact discrete
schedule of ``scheduler/`` and jit-compiled pure functions in latent space: the noise predictor
``eps(z_t, t, context)`` (continuous ``t`` in ``(0, 1]``, ``t = (timestep + 1) / T``),
classifier-free guidance, score functions in the estimators' ``score_fn(x_t, t)`` convention,
prompt encoding, the VAE's ``encode_image``/``decode`` and DDIM sampling.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from mmh_jax._src.files import atomic_folder
from mmh_jax._src.noise import images_noise
from mmh_jax.convert.autoencoder_kl import (
    autoencoder_kl_abstract_params,
    autoencoder_kl_rename_table,
    convert_autoencoder_kl,
)
from mmh_jax.convert.clip import (
    clip_text_abstract_params,
    clip_text_rename_table,
    convert_clip_text,
)
from mmh_jax.convert.core import ConversionError, check_params, export_state_dict
from mmh_jax.convert.io import read_state_dict, save_params
from mmh_jax.convert.unet2d_condition import (
    convert_unet2d_condition,
    unet2d_condition_abstract_params,
    unet2d_condition_rename_table,
)
from mmh_jax.guidance import cfg_eps, cfg_score_fn, conditional_score_fn
from mmh_jax.models.autoencoder_kl import AutoencoderKL, scale_latents, unscale_latents
from mmh_jax.models.clip import CLIPTextModel
from mmh_jax.models.loaders import (
    _load_converted,
    ddpm_from_scheduler_config,
    prediction_type_from_scheduler_config,
    read_json,
)
from mmh_jax.models.pretrained import EpsModel, Pretrained
from mmh_jax.models.unet2d_condition import UNet2DCondition
from mmh_jax.sampling import DDIMGrid, DDIMResult, ddim_sample
from mmh_jax.schedules import DDPM

__all__ = [
    "StableDiffusion",
    "load_stable_diffusion",
    "save_stable_diffusion",
    "save_stable_diffusion_folder",
    "stable_diffusion_components",
    "encode_text",
    "encode_image",
    "decode_latents",
]

_ARCHITECTURE = "stable-diffusion"
_CONVERT = "`mmh-jax convert stable-diffusion FOLDER -o OUT.safetensors`"


class _Port(NamedTuple):
    """One network of the pipeline: its library and class in ``model_index.json``, its weight
    files in order of preference (the first is the one written), the Flax module class, the
    converter, the expected-shapes function and the rename table written."""

    library: str
    classes: tuple[str, ...]
    weights: tuple[str, ...]
    module: type
    convert: Any
    abstract: Any
    table: Any


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_PORTS = {
    "unet": _Port(
        "diffusers",
        ("UNet2DConditionModel",),
        _DIFFUSERS_WEIGHTS,
        UNet2DCondition,
        convert_unet2d_condition,
        unet2d_condition_abstract_params,
        unet2d_condition_rename_table,
    ),
    "vae": _Port(
        "diffusers",
        ("AutoencoderKL",),
        _DIFFUSERS_WEIGHTS,
        AutoencoderKL,
        convert_autoencoder_kl,
        autoencoder_kl_abstract_params,
        autoencoder_kl_rename_table,
    ),
    # written with transformers 4's "text_model." keys, as SD v1's files have them
    "text_encoder": _Port(
        "transformers",
        ("CLIPTextModel",),
        ("model.safetensors", "pytorch_model.bin"),
        CLIPTextModel,
        convert_clip_text,
        clip_text_abstract_params,
        clip_text_rename_table,
    ),
}
# the _diffusers_version save_stable_diffusion_folder writes: the release its layout was checked
# against (tests/models/test_sd_folder_export.py)
_DIFFUSERS_VERSION = "0.42.1"
# a tokenizer folder as transformers 4 (vocab.json, merges.txt) or 5 (tokenizer.json) wrote it
_TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# scheduler_config.json keys that set the DDIM grid (with diffusers' DDIMScheduler defaults)
_DDIM_KEYS = {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True}


class StableDiffusion(NamedTuple):
    """A loaded Stable Diffusion pipeline, in latent space.

    Attributes:
        unet: ``Pretrained(module, params, schedule, score_fn)`` of the UNet; its ``score_fn``
            is the unconditional model's (the empty prompt's), ready for :mod:`mmh_jax.lid`.
        eps: ``eps(z_t, t, context) -> eps``, the conditional noise predictor (``v``-prediction
            models are converted to noise), a :class:`~jax.tree_util.Partial` over the UNet's
            parameters and schedule; ``context`` is ``[1 or b, 77, dim]``.
        text_encoder: the Flax ``CLIPTextModel``.
        text_encoder_params: its parameters.
        vae: the Flax ``AutoencoderKL``.
        vae_params: its parameters.
        tokenizer: transformers' ``CLIPTokenizer`` of the pipeline.
        uncond_embedding: the empty prompt's embedding ``[1, 77, dim]`` (float32).
        scheduler_config: the pipeline's ``scheduler_config.json`` (its DDIM grid settings).
    """

    unet: Pretrained
    eps: Partial
    text_encoder: CLIPTextModel
    text_encoder_params: PyTree
    vae: AutoencoderKL
    vae_params: PyTree
    tokenizer: Any
    uncond_embedding: Float[Array, "1 n dim"]
    scheduler_config: dict

    @property
    def schedule(self) -> DDPM:
        """The exact discrete schedule of ``scheduler/`` (``scaled_linear`` for SD)."""
        return self.unet.schedule

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the latents at the UNet's training resolution."""
        size = self.unet.module.sample_size
        if size is None:
            raise ValueError("the UNet's config has no sample_size: pass latent_shape=(c, h, w)")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.module.in_channels, h, w)

    @property
    def ddim_grid(self) -> DDIMGrid:
        """The DDIM grid of the pipeline's scheduler config (``timestep_spacing``,
        ``steps_offset``, ``set_alpha_to_one``), as :func:`~mmh_jax.sampling.ddim_sample`
        takes it."""
        grid = {k: self.scheduler_config.get(k, v) for k, v in _DDIM_KEYS.items()}
        return DDIMGrid(grid["timestep_spacing"], grid["steps_offset"], grid["set_alpha_to_one"])

    def tokenize(self, prompts: str | Sequence[str]) -> Int[np.ndarray, "b n"]:
        """Token ids ``[b, max_length]`` (77 for CLIP), padded as the pipeline pads them.

        A prompt longer than the text encoder reads is truncated, with a warning naming the
        prompt and how many tokens were dropped.
        """
        return tokenize(self.tokenizer, prompts, self.text_encoder.max_position_embeddings)

    def encode_prompt(
        self, prompts: str | Sequence[str] | Int[ArrayLike, "b n"]
    ) -> Float[Array, "b n dim"]:
        """The UNet's conditioning: the text encoder's last hidden state, float32.

        Args:
            prompts: a string, a list of strings, or token ids ``[b, n]`` from :meth:`tokenize`.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts)
        ):
            ids = self.tokenize(prompts)
        else:
            ids = np.asarray(prompts)
            if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[0] == 0:
                raise ValueError(
                    f"prompts must be strings or integer token ids [b, n], got "
                    f"{type(prompts).__name__} of shape {np.shape(prompts)}"
                )
        return encode_text(self.text_encoder, self.text_encoder_params, jnp.asarray(ids))

    def cfg_eps(
        self,
        z_t: Float[Array, "b c h w"],
        t: Float[ArrayLike, " b"],
        cond: Array,
        uncond: Array,
        guidance: float | ArrayLike,
    ) -> Array:
        """Guided noise ``eps_u + guidance (eps_c - eps_u)``, both branches in one UNet call."""
        return _cfg_eps(self.eps, z_t, t, cond, uncond, jnp.asarray(guidance, jnp.float32))

    def score(self, context: Array) -> Partial:
        """``score_fn(z_t, t) = s(z_t; t, context)`` for :mod:`mmh_jax.lid` (the model
        conditioned on one embedding; ``uncond_embedding``: the unconditional model)."""
        return conditional_score_fn(self.eps, context, schedule=self.schedule)

    def cfg_score(self, cond: Array, uncond: Array | None = None, guidance: float = 7.5) -> Partial:
        """``score_fn(z_t, t) = s^CFG(z_t; t, c)`` (paper, Eq. 2) for :mod:`mmh_jax.lid`;
        ``uncond`` defaults to the empty prompt's embedding."""
        uncond = self.uncond_embedding if uncond is None else uncond
        return cfg_score_fn(self.eps, cond, uncond, schedule=self.schedule, guidance=guidance)

    def encode_image(
        self, images: Float[ArrayLike, "b 3 H W"], *, key: Array | None = None
    ) -> Float[Array, "b c h w"]:
        """Images in ``[-1, 1]`` (NCHW) -> the diffusion model's (scaled) latents.

        The posterior mean, or a draw from the posterior when ``key`` is given; then
        ``(z - shift_factor) * scaling_factor`` (0.18215 for SD v1).
        """
        images = jnp.asarray(images, jnp.float32)
        return encode_image(self.vae, self.vae_params, images, key)

    def decode(self, latents: Float[ArrayLike, "b c h w"]) -> Float[Array, "b 3 H W"]:
        """The diffusion model's latents -> images in about ``[-1, 1]`` (NCHW, float32)."""
        return decode_latents(self.vae, self.vae_params, jnp.asarray(latents, jnp.float32))

    def sample(
        self,
        cond: Float[Array, "p n dim"],
        *,
        key: Array,
        images_per_prompt: int = 1,
        guidance: float = 7.5,
        num_steps: int = 50,
        uncond: Array | None = None,
        return_trajectory: bool = False,
        latent_shape: tuple[int, int, int] | None = None,
    ) -> DDIMResult:
        """DDIM with classifier-free guidance for every prompt x image, in one compiled scan.

        Image ``j`` of every prompt starts from the noise ``normal(fold_in(key, j))``
        (:mod:`mmh_jax._src.noise`, the rule of every sampler), so an image does not depend on
        the batch it is drawn in, and the images of two prompts (or of a prompt before and
        after a change) share their starting noise. The DDIM grid follows
        the pipeline's scheduler config (``timestep_spacing``, ``steps_offset``,
        ``set_alpha_to_one``).

        Args:
            cond: prompt embeddings ``[p, n, dim]`` (:meth:`encode_prompt`).
            key: PRNG key of the starting noise.
            images_per_prompt: images per prompt; results are ordered prompt-major
                (``[p * images_per_prompt, ...]``).
            guidance: the guidance scale (7.5 as in the paper and Wen et al.).
            num_steps: DDIM steps (50).
            uncond: the unconditional embedding (default: the empty prompt's).
            return_trajectory: keep the latents and both noise predictions of every step.
            latent_shape: ``(c, h, w)``; default :attr:`latent_shape`.

        Returns:
            :class:`~mmh_jax.sampling.DDIMResult` with the clean latents as ``sample``
            (:meth:`decode` turns them into images).
        """
        cond = jnp.asarray(cond)
        if cond.ndim != 3 or cond.shape[0] == 0:
            raise ValueError(f"cond must be prompt embeddings [p, n, dim], got shape {cond.shape}")
        if images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
        shape = self.latent_shape if latent_shape is None else tuple(latent_shape)
        noise = jnp.tile(images_noise(key, images_per_prompt, shape), (cond.shape[0], 1, 1, 1))
        cond = jnp.repeat(cond, images_per_prompt, axis=0)
        uncond = self.uncond_embedding if uncond is None else uncond
        return ddim_sample(
            self.eps,
            noise,
            cond,
            uncond,
            schedule=self.schedule,
            guidance=guidance,
            num_steps=num_steps,
            grid=self.ddim_grid,
            return_trajectory=return_trajectory,
        )


@functools.partial(jax.jit, static_argnums=0)
def encode_text(module: CLIPTextModel, params: PyTree, ids: Array) -> Array:
    """The text encoder's last hidden states of token ids ``[b, n]``, float32 ``[b, n, dim]``
    (a prompt embedding, as the pipeline conditions on it)."""
    return module.apply({"params": params}, ids).last_hidden_state.astype(jnp.float32)


@jax.jit
def _cfg_eps(eps_fn, z_t, t, cond, uncond, guidance):
    return cfg_eps(eps_fn, z_t, t, cond, uncond, guidance=guidance)


@functools.partial(jax.jit, static_argnums=0)
def encode_image(module: AutoencoderKL, params: PyTree, images: Array, key: Array | None) -> Array:
    """Scaled latents of images ``[b, 3, h, w]`` in ``[-1, 1]``: the posterior mean, or a draw
    from it with ``key``."""
    posterior = module.apply({"params": params}, images, method="encode")
    z = posterior.mean if key is None else posterior.sample(key)
    return scale_latents(module, z.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(module: AutoencoderKL, params: PyTree, latents: Array) -> Array:
    """Images ``[b, 3, H, W]`` in about ``[-1, 1]`` (float32) of scaled latents ``[b, c, h, w]``."""
    images = module.apply({"params": params}, unscale_latents(module, latents), method="decode")
    return images.astype(jnp.float32)


#: transformers' fast tokenizers set padding and truncation on their shared Rust backend before
#: each call, so two threads tokenizing at once (the engine's decoding threads) can read each
#: other's settings (a prompt loses its padding); every call here holds this lock.
_TOKENIZER_LOCK = threading.Lock()


def tokenize(
    tokenizer: Any, prompts: str | Sequence[str], max_length: int
) -> Int[np.ndarray, "b n"]:
    """Token ids ``[b, max_length]`` (int32) of ``prompts``, padded and truncated to
    ``max_length`` as Stable Diffusion's pipeline does; truncation warns, naming the prompt and
    the number of tokens dropped. Safe to call from several threads at once (the tokenizer is
    not: its calls are serialised by a lock)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt ('' is the empty prompt)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    with _TOKENIZER_LOCK:
        # verbose=False: transformers' own too-long warning would stand beside the one below
        full = tokenizer(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="np",
        )["input_ids"]
    for i, row in enumerate(full):
        if len(row) > max_length:
            short = prompts[i] if len(prompts[i]) <= 60 else prompts[i][:57] + "..."
            warnings.warn(
                f"prompt {i} ({short!r}) has {len(row)} tokens with its start and end "
                f"tokens; the text encoder reads {max_length}, so the last "
                f"{len(row) - max_length} were dropped",
                stacklevel=3,
            )
    return ids.astype(np.int32)


# --- loading ----------------------------------------------------------------------------------


def _component_folder(root: Path, name: str, index: dict) -> Path:
    entry = index.get(name)
    if entry is None:
        raise FileNotFoundError(
            f"{str(root / 'model_index.json')!r} names no {name!r} component "
            "(expected a Stable Diffusion pipeline)"
        )
    classes = _PORTS[name].classes if name in _PORTS else None
    if classes and (not isinstance(entry, list) or len(entry) != 2 or entry[1] not in classes):
        raise ValueError(
            f"{str(root / 'model_index.json')!r}: {name} is {entry!r}; this port "
            f"reads {' or '.join(classes)}"
        )
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(root)!r} has no {name}/ folder")
    return folder


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    return read_json(path)


def _build(port: _Port, config: dict, where: Path, dtype: Any):
    try:
        return port.module.from_config(config, dtype=dtype)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{str(where)!r}: {err}") from None


def _check_compatible(modules: dict, source: str) -> None:
    unet, text, vae = modules["unet"], modules["text_encoder"], modules["vae"]
    if text.hidden_size != unet.cross_attention_dim:
        raise ValueError(
            f"{source}: the text encoder's hidden_size is {text.hidden_size} but the "
            f"UNet's cross_attention_dim is {unet.cross_attention_dim} (a text "
            "encoder from another model family?)"
        )
    if vae.latent_channels != unet.in_channels or vae.latent_channels != unet.out_channels:
        raise ValueError(
            f"{source}: the VAE has {vae.latent_channels} latent channels but the "
            f"UNet takes {unet.in_channels} and predicts {unet.out_channels} (a VAE "
            "from another model family?)"
        )


def _from_folder(root: Path, dtype: Any):
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} holds no model_index.json (expected a diffusers "
            "Stable Diffusion pipeline folder)"
        )
    index = read_json(index_file)
    folders = {
        name: _component_folder(root, name, index) for name in (*_PORTS, "scheduler", "tokenizer")
    }
    modules = {
        name: _build(
            port, _read_config(folders[name] / "config.json"), folders[name] / "config.json", dtype
        )
        for name, port in _PORTS.items()
    }
    _check_compatible(modules, repr(str(root)))
    scheduler_file = folders["scheduler"] / "scheduler_config.json"
    scheduler = _read_config(scheduler_file)
    schedule = _read_schedule(scheduler, repr(str(scheduler_file)))  # before any weight is read
    params = {}
    for name, port in _PORTS.items():
        found = [folders[name] / f for f in port.weights if (folders[name] / f).is_file()]
        if not found:
            raise FileNotFoundError(
                f"{str(folders[name])!r} holds none of {', '.join(port.weights)}"
            )
        params[name] = port.convert(
            read_state_dict(found[0]), modules[name], source=repr(str(found[0]))
        )
    tokenizer_files = {
        name: (folders["tokenizer"] / name).read_text()
        for name in _TOKENIZER_FILES
        if (folders["tokenizer"] / name).is_file()
    }
    return modules, params, scheduler, schedule, tokenizer_files


def _from_converted(path: Path, dtype: Any):
    what, folder = "Stable Diffusion pipeline", "pipeline folder (with model_index.json)"
    stored, metadata = _load_converted(path, _ARCHITECTURE, what, folder, _CONVERT)
    try:
        configs, scheduler = metadata["configs"], metadata["scheduler"]
        tokenizer_files = metadata["tokenizer"]
        modules = {name: _build(port, configs[name], path, dtype) for name, port in _PORTS.items()}
    except (KeyError, TypeError) as err:
        raise ConversionError(f"{str(path)!r}: bad metadata: {err}") from None
    _check_compatible(modules, repr(str(path)))
    schedule = _read_schedule(scheduler, repr(str(path)))
    params = {
        name: check_params(
            stored.get(name, {}),
            port.abstract(modules[name]),
            source=f"{str(path)!r} ({name})",
            dtype=modules[name].param_dtype,
        )
        for name, port in _PORTS.items()
    }
    return modules, params, scheduler, schedule, tokenizer_files


def _read_schedule(scheduler: dict, source: str) -> tuple[DDPM, str]:
    """The schedule and prediction type of a scheduler config; errors name ``source``."""
    try:
        return (
            ddpm_from_scheduler_config(scheduler),
            prediction_type_from_scheduler_config(scheduler),
        )
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def _has_vocabulary(files: dict[str, str]) -> bool:
    """Whether tokenizer files hold a vocabulary: tokenizer.json, or vocab.json and merges.txt."""
    return "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files.keys()


def _tokenizer(files: dict[str, str], source: str):
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        raise ImportError(
            "Stable Diffusion's tokenizer needs transformers: pip install transformers"
        ) from None
    if not _has_vocabulary(files):
        raise FileNotFoundError(
            f"{source}: the tokenizer has neither tokenizer.json nor vocab.json and merges.txt"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def load_stable_diffusion(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> StableDiffusion:
    """Load Stable Diffusion from a local pipeline folder or a converted ``.safetensors`` file.

    Args:
        path: a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``; weights as ``.safetensors`` or
            ``.bin``) or a file written by :func:`save_stable_diffusion`.
        dtype: the compute dtype of the three networks (``jnp.bfloat16`` for speed);
            parameters stay float32, and the embeddings, latents, scores and FLIPD traces are
            float32 whatever it is.

    Returns:
        :class:`StableDiffusion`.

    Raises:
        FileNotFoundError: no such path, a missing component, config or weight file.
        ConversionError: weights that do not match their config, or an unreadable file.
        ValueError: a config this port does not support, components from different model
            families, or a scheduler this schedule cannot represent (naming the file and key).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Stable Diffusion checkpoint {str(path)!r} does not exist")
    source = repr(str(path))
    read = _from_folder if path.is_dir() else _from_converted
    modules, params, scheduler, (schedule, prediction), tokenizer_files = read(path, dtype)
    params = jax.tree.map(jnp.asarray, params)
    unet = modules["unet"]
    eps = Partial(EpsModel(unet, prediction_type=prediction).bound("eps"), params["unet"], schedule)
    scheduler = dict(scheduler)
    if scheduler.get("steps_offset", _DDIM_KEYS["steps_offset"]) != 1:
        # diffusers' StableDiffusionPipeline replaces it with 1 (a deprecated config, with a
        # warning), so sampling here walks the timesteps its pipeline walks
        warnings.warn(
            f"{source}: scheduler_config.json has steps_offset="
            f"{scheduler.get('steps_offset', 'unset (0)')}; diffusers' "
            "StableDiffusionPipeline treats such a config as outdated and uses "
            "steps_offset=1, and so does this loader",
            UserWarning,
            stacklevel=2,
        )
        scheduler["steps_offset"] = 1
    tokenizer = _tokenizer(tokenizer_files, source)
    text = modules["text_encoder"]
    empty = tokenize(tokenizer, [""], text.max_position_embeddings)
    uncond = encode_text(text, params["text_encoder"], jnp.asarray(empty))
    unet_model = Pretrained(
        unet, params["unet"], schedule, conditional_score_fn(eps, uncond, schedule=schedule)
    )
    return StableDiffusion(
        unet_model,
        eps,
        text,
        params["text_encoder"],
        modules["vae"],
        params["vae"],
        tokenizer,
        uncond,
        scheduler,
    )


def save_stable_diffusion(
    path: str | os.PathLike, model: StableDiffusion, tokenizer_files: dict[str, str] | None = None
) -> Path:
    """Write a loaded pipeline to one ``.safetensors`` file that :func:`load_stable_diffusion`
    reads without torch or the folder: the three networks' parameters (under ``unet/``,
    ``vae/``, ``text_encoder/``), their configs, the scheduler config and the tokenizer files.

    Args:
        path: the target file; must end in ``.safetensors``.
        model: what :func:`load_stable_diffusion` returned.
        tokenizer_files: ``{file name: text}`` of the tokenizer; by default saved from
            ``model.tokenizer``.

    Returns:
        The path written.
    """
    if tokenizer_files is None:
        tokenizer_files = _tokenizer_files(model.tokenizer)
    metadata = {
        "architecture": _ARCHITECTURE,
        "configs": {
            "unet": model.unet.module.to_config(),
            "vae": model.vae.to_config(),
            "text_encoder": model.text_encoder.to_config(),
        },
        "scheduler": model.scheduler_config,
        "tokenizer": tokenizer_files,
    }
    params = {
        "unet": model.unet.params,
        "vae": model.vae_params,
        "text_encoder": model.text_encoder_params,
    }
    return save_params(path, jax.device_get(params), metadata=metadata)


def _tokenizer_files(tokenizer: Any) -> dict[str, str]:
    """``{file name: text}`` of the files ``tokenizer.save_pretrained`` writes that
    :func:`load_stable_diffusion` reads."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {
            name: Path(tmp, name).read_text()
            for name in _TOKENIZER_FILES
            if Path(tmp, name).is_file()
        }


# --- writing a pipeline folder ----------------------------------------------------------------


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _component_config(name: str, module: Any) -> dict[str, Any]:
    """``config.json`` of a component: the module's config and the keys that tell diffusers or
    transformers which class to build."""
    port = _PORTS[name]
    if port.library == "diffusers":
        return {
            "_class_name": port.classes[0],
            "_diffusers_version": _DIFFUSERS_VERSION,
            **module.to_config(),
        }
    return {"architectures": [port.classes[0]], **module.to_config()}


def save_stable_diffusion_folder(
    path: str | os.PathLike,
    *,
    unet: UNet2DCondition,
    unet_params: PyTree,
    vae: AutoencoderKL,
    vae_params: PyTree,
    text_encoder: CLIPTextModel,
    text_encoder_params: PyTree,
    scheduler_config: dict[str, Any],
    tokenizer_files: dict[str, str],
) -> Path:
    """Write Flax networks as a diffusers Stable Diffusion pipeline folder, atomically.

    The folder is what ``StableDiffusionPipeline.save_pretrained`` writes (without a safety
    checker or feature extractor): ``model_index.json``; ``unet/`` and ``vae/`` with
    ``config.json`` and ``diffusion_pytorch_model.safetensors``; ``text_encoder/`` with
    ``config.json`` and ``model.safetensors`` (keys prefixed ``text_model.``, as transformers 4
    and SD v1 write them); ``scheduler/scheduler_config.json``; ``tokenizer/``. Weights are
    float32 PyTorch layouts, written by the converters' rename tables run backwards
    (:func:`~mmh_jax.convert.export_state_dict`). :func:`load_stable_diffusion` and diffusers'
    ``StableDiffusionPipeline.from_pretrained`` both read it. The folder is built beside
    ``path`` and renamed into place, so ``path`` appears whole or not at all.
    :func:`stable_diffusion_components` gives these arguments for a loaded pipeline.

    Args:
        path: the folder to create; it must not exist or be empty, and its parent must exist.
        unet: the Flax ``UNet2DCondition``.
        unet_params: its parameters.
        vae: the Flax ``AutoencoderKL``.
        vae_params: its parameters.
        text_encoder: the Flax ``CLIPTextModel``.
        text_encoder_params: its parameters.
        scheduler_config: the scheduler's config (``scheduler_config.json``); its
            ``_class_name`` (default ``"DDIMScheduler"``) is the scheduler class named in
            ``model_index.json``.
        tokenizer_files: ``{file name: text}`` of the CLIP tokenizer: ``tokenizer.json`` or
            ``vocab.json`` and ``merges.txt``, and optionally ``tokenizer_config.json`` and
            ``special_tokens_map.json``.

    Returns:
        The folder written.

    Raises:
        FileExistsError: naming ``path`` if it exists and is not an empty folder.
        TypeError: naming the argument, when a module is not of its class or a config is not a
            mapping.
        ValueError: components from different model families, a scheduler config this port
            cannot read, or tokenizer files it does not know or that hold no vocabulary.
        ConversionError: naming the parameters argument, when parameters do not match their
            module.
    """
    path = Path(path)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_encoder_params}
    for name, module in modules.items():
        if not isinstance(module, _PORTS[name].module):
            raise TypeError(
                f"{name} must be a Flax {_PORTS[name].module.__name__}, got {type(module).__name__}"
            )
    _check_compatible(modules, "save_stable_diffusion_folder")
    if not isinstance(scheduler_config, dict):
        raise TypeError(
            f"scheduler_config must be a dict (a parsed scheduler_config.json), "
            f"got {type(scheduler_config).__name__}"
        )
    _read_schedule(scheduler_config, "scheduler_config")
    scheduler = {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": _DIFFUSERS_VERSION,
        **scheduler_config,
    }
    if not isinstance(tokenizer_files, dict):
        raise TypeError(
            f"tokenizer_files must be a dict of file names to texts, got "
            f"{type(tokenizer_files).__name__}"
        )
    unknown = sorted(set(tokenizer_files) - set(_TOKENIZER_FILES))
    if unknown:
        raise ValueError(
            f"tokenizer_files: {', '.join(map(repr, unknown))} are not tokenizer "
            f"files of this port ({', '.join(_TOKENIZER_FILES)})"
        )
    if not _has_vocabulary(tokenizer_files):
        raise ValueError(
            "tokenizer_files holds neither tokenizer.json nor vocab.json and merges.txt"
        )
    from safetensors.numpy import save_file

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _DIFFUSERS_VERSION,
        **{name: [port.library, port.classes[0]] for name, port in _PORTS.items()},
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    with atomic_folder(path) as tmp:
        for name, port in _PORTS.items():
            what = f"{name}_params"
            checked = check_params(params[name], port.abstract(modules[name]), source=what)
            state_dict = export_state_dict(checked, port.table(modules[name]), source=what)
            (tmp / name).mkdir()
            _write_json(tmp / name / "config.json", _component_config(name, modules[name]))
            save_file(state_dict, str(tmp / name / port.weights[0]), metadata={"format": "pt"})
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        (tmp / "tokenizer").mkdir()
        for name, text in tokenizer_files.items():
            (tmp / "tokenizer" / name).write_text(text)
        _write_json(tmp / "model_index.json", index)
    return path


def stable_diffusion_components(model: StableDiffusion) -> dict[str, Any]:
    """The keyword arguments of :func:`save_stable_diffusion_folder` that write a loaded
    pipeline: ``save_stable_diffusion_folder(path, **stable_diffusion_components(model))``.

    Args:
        model: what :func:`load_stable_diffusion` returned.

    Returns:
        ``{"unet": ..., "unet_params": ..., "vae": ..., "vae_params": ..., "text_encoder": ...,
        "text_encoder_params": ..., "scheduler_config": ..., "tokenizer_files": ...}``; the
        tokenizer files are those ``model.tokenizer.save_pretrained`` writes.
    """
    return {
        "unet": model.unet.module,
        "unet_params": model.unet.params,
        "vae": model.vae,
        "vae_params": model.vae_params,
        "text_encoder": model.text_encoder,
        "text_encoder_params": model.text_encoder_params,
        "scheduler_config": model.scheduler_config,
        "tokenizer_files": _tokenizer_files(model.tokenizer),
    }
