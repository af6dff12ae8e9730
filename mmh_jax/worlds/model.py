"""A small Stable-Diffusion-shaped model trained on the shapes world, saved as a diffusers folder.

:func:`train_world_model` trains, with the library's own Flax ports and optax,

1. a small ``AutoencoderKL`` (3 levels, 8 latent channels: 32x32 images -> 8x8 latents) on the
   world's distinct training images (reconstruction loss and a small KL term), whose
   ``scaling_factor`` is then set to one over the standard deviation of the latents, as
   Stable Diffusion's was;
2. the ``UNet2DCondition`` and the ``CLIPTextModel`` together, from scratch, on the training
   pairs' latents and captions with Stable Diffusion's noise-prediction loss and DDPM schedule
   (``scaled_linear``, 1000 steps) and caption dropout (the empty prompt, so classifier-free
   guidance works);

and writes ``pipeline/``, a diffusers ``StableDiffusionPipeline`` folder that
:func:`~mmh_jax.models.load_stable_diffusion` and diffusers' PyTorch pipeline both load, so
every ``mmh-jax sd ...`` command runs on it. Training checkpoints after every chunk of steps
and resumes from the last one; a folder that holds a finished model of the same world and
settings is reused, and one of another world or settings is refused, never mixed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PyTree

from mmh_jax._src.files import atomic_path
from mmh_jax.convert.io import load_params, save_params
from mmh_jax.models.autoencoder_kl import AutoencoderKL, scale_latents
from mmh_jax.models.clip import CLIPTextModel
from mmh_jax.models.loaders import ddpm_from_scheduler_config
from mmh_jax.models.pretrained import EpsModel
from mmh_jax.models.stable_diffusion import save_stable_diffusion_folder
from mmh_jax.models.unet2d_condition import UNet2DCondition
from mmh_jax.worlds.shapes import ShapesWorld, WorldSpec, _check_ints, tokenizer_files

__all__ = [
    "TrainSpec",
    "WorldModelFolder",
    "train_world_model",
    "world_modules",
    "SCHEDULER_CONFIG",
]

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
"""Stable Diffusion v1's DDIM scheduler settings."""
_FORMAT = 2  # bumped when the training recipe changes what a given spec produces


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """How the world's model is trained (part of the saved model's identity).

    Attributes:
        seed: seed of the initialisations, batches, times and noise.
        vae_steps: autoencoder steps.
        vae_batch: autoencoder batch size.
        vae_learning_rate: autoencoder peak learning rate.
        kl_weight: weight of the autoencoder's KL term.
        steps: UNet and text-encoder steps.
        batch_size: pairs per step.
        learning_rate: peak AdamW learning rate (warm-up, then cosine decay to 10%; gradients
            clipped to global norm 1).
        caption_dropout: probability that a caption is replaced by the empty prompt.
        unet_channels: the UNet's ``block_out_channels``.
        text_width: the text encoder's ``hidden_size`` (the UNet's ``cross_attention_dim``).
        text_layers: text-encoder layers.
        max_length: tokens the text encoder reads (start and end tokens included).
        chunk: steps per compiled chunk (and per checkpoint).
    """

    seed: int = 0
    vae_steps: int = 500
    vae_batch: int = 32
    vae_learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    steps: int = 8000
    batch_size: int = 64
    learning_rate: float = 2e-3
    caption_dropout: float = 0.1
    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 64
    text_layers: int = 2
    max_length: int = 24
    chunk: int = 100

    def __post_init__(self):
        _check_ints(self, ("seed",))
        counts = ("vae_steps", "vae_batch", "steps", "batch_size", "text_width", "text_layers")
        _check_ints(self, (*counts, "max_length", "chunk"), least=1)
        for name in ("vae_learning_rate", "learning_rate"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 < float(self.caption_dropout) < 1.0:
            raise ValueError(f"caption_dropout must be in (0, 1), got {self.caption_dropout!r}")
        object.__setattr__(self, "unet_channels", tuple(self.unet_channels))
        if len(self.unet_channels) != 2 or any(c % 16 for c in self.unet_channels):
            raise ValueError(
                f"unet_channels must be two multiples of 16, got {self.unet_channels!r}"
            )
        if self.text_width % 4:
            raise ValueError(f"text_width must be a multiple of 4, got {self.text_width}")

    def to_dict(self) -> dict:
        """JSON-ready settings."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)
        }


class WorldModelFolder:
    """The layout of a world-model folder: ``world.json`` (the world and training settings),
    ``train/`` (checkpoints while training) and ``pipeline/`` (the diffusers folder, once
    finished)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.settings = self.root / "world.json"
        self.checkpoints = self.root / "train"
        self.pipeline = self.root / "pipeline"

    def finished(self) -> bool:
        """Whether the diffusers folder is complete."""
        return (self.pipeline / "model_index.json").is_file()


def world_modules(
    world: ShapesWorld, spec: TrainSpec, *, scaling_factor: float = 1.0
) -> tuple[AutoencoderKL, UNet2DCondition, CLIPTextModel]:
    """The three (untrained) Flax modules of the world's model."""
    vocab = json.loads(tokenizer_files(world.vocabulary)["vocab.json"])
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=8,
        sample_size=world.spec.image_size,
        mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=float(scaling_factor),
    )
    unet = UNet2DCondition(
        sample_size=world.spec.image_size // 4,
        in_channels=8,
        out_channels=8,
        block_out_channels=spec.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=spec.text_width,
        attention_head_dim=4,
        norm_num_groups=16,
        use_linear_projection=True,
    )
    text = CLIPTextModel(
        vocab_size=len(vocab),
        hidden_size=spec.text_width,
        intermediate_size=2 * spec.text_width,
        projection_dim=spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=4,
        max_position_embeddings=spec.max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return vae, unet, text


def _tokenize(words_to_ids: dict[str, int], captions: list[str], max_length: int) -> np.ndarray:
    """CLIP ids of captions made of world words (each one token): start, words, end, padding
    with the end token (what the CLIP tokenizer gives for these captions; checked in tests)."""
    out = np.ones((len(captions), max_length), np.int32)
    out[:, 0] = 0
    for i, caption in enumerate(captions):
        ids = [words_to_ids[w + "</w>"] for w in caption.split()]
        if len(ids) + 2 > max_length:
            raise ValueError(
                f"caption {caption!r} needs {len(ids) + 2} tokens; max_length is {max_length}"
            )
        out[i, 1 : 1 + len(ids)] = ids
    return out


# --- checkpoints -------------------------------------------------------------------------------


def _save_state(path: Path, stage: str, step: int, state: PyTree, extra: dict) -> None:
    leaves = jax.tree.leaves(jax.device_get(state))
    tree = {str(i): np.asarray(v) for i, v in enumerate(leaves)}
    save_params(path, tree, metadata={"stage": stage, "step": step, **extra})


def _load_state(path: Path, like: PyTree) -> tuple[int, PyTree, dict]:
    stored, metadata = load_params(path)
    leaves, treedef = jax.tree.flatten(like)
    if len(stored) != len(leaves):
        raise ValueError(
            f"{str(path)!r} holds {len(stored)} arrays, the model has {len(leaves)}:"
            " a checkpoint of other settings (delete the folder to start over)"
        )
    restored = [jnp.asarray(stored[str(i)], leaf.dtype) for i, leaf in enumerate(leaves)]
    return int(metadata["step"]), jax.tree.unflatten(treedef, restored), metadata


def _check_settings(folder: WorldModelFolder, settings: dict) -> None:
    if folder.settings.is_file():
        stored = json.loads(folder.settings.read_text())
        if stored != settings:
            diff = sorted(
                k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k)
            )
            raise ValueError(
                f"{str(folder.root)!r} holds a model of another world or training settings "
                f"(differs in: {', '.join(diff)}); choose another folder or delete it"
            )
        return
    if folder.root.exists() and any(folder.root.iterdir()):
        raise ValueError(
            f"{str(folder.root)!r} exists and is not a world-model folder (no "
            "world.json); choose an empty or new folder"
        )
    folder.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder.settings) as tmp:
        tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))


# --- training ---------------------------------------------------------------------------------


def _chunked(
    stage: str,
    batch_loss,
    opt: optax.GradientTransformation,
    params: PyTree,
    data: PyTree,
    num_steps: int,
    chunk: int,
    key,
    checkpoint: Path,
    progress,
) -> tuple[PyTree, list[float]]:
    """Train ``params`` with ``opt`` on ``loss = batch_loss(params, key_i, data)`` (the batch
    drawn inside) for ``num_steps`` steps, resuming from and saving to ``checkpoint`` after
    every ``chunk`` steps; the trained parameters and the mean loss of every chunk.

    One compiled step called from Python: on XLA:CPU the same step inside ``lax.scan`` ran 22x
    slower (the autoencoder's, 6.5 s against 0.30 s), and ``data`` is an argument, not a
    constant folded into the program (XLA compiles large constants slowly).
    """

    def step_fn(state, k, data):
        p, s = state
        loss, grads = jax.value_and_grad(batch_loss)(p, k, data)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    state = (params, opt.init(params))
    run = jax.jit(step_fn, donate_argnums=0)
    done, losses = 0, []
    if checkpoint.is_file():
        done, state, meta = _load_state(checkpoint, state)
        losses = json.loads(meta.get("losses", "[]"))
    if progress is not None:
        progress(stage, done, num_steps, None)
    keys = jax.random.split(key, num_steps)
    while done < num_steps:
        n = min(chunk, num_steps - done)
        chunk_losses = []
        for i in range(done, done + n):
            state, loss = run(state, keys[i], data)
            chunk_losses.append(loss)
        done += n
        losses.append(float(jnp.mean(jnp.stack(chunk_losses))))
        _save_state(checkpoint, stage, done, state, {"losses": json.dumps(losses)})
        if progress is not None:
            progress(stage, done, num_steps, losses[-1])
    return state[0], losses


def _train_vae(
    vae: AutoencoderKL, images: np.ndarray, spec: TrainSpec, checkpoint: Path, progress
) -> tuple[PyTree, list[float]]:
    key = jax.random.key(spec.seed)
    params = vae.init(jax.random.fold_in(key, 0), jnp.asarray(images[:1]))["params"]
    opt = optax.adam(
        optax.warmup_cosine_decay_schedule(
            0.0,
            spec.vae_learning_rate,
            min(50, spec.vae_steps // 10),
            spec.vae_steps,
            0.1 * spec.vae_learning_rate,
        )
    )
    n = images.shape[0]

    def loss_fn(p, x, k):
        posterior = vae.apply({"params": p}, x, method="encode")
        recon = vae.apply({"params": p}, posterior.sample(k), method="decode")
        var = jnp.square(posterior.std)
        kl = 0.5 * jnp.mean(
            jnp.sum(jnp.square(posterior.mean) + var - 1.0 - jnp.log(var), axis=(1, 2, 3))
        )
        return jnp.mean(jnp.square(recon - x)) + spec.kl_weight * kl

    def batch_loss(p, k, data):
        kb, kz = jax.random.split(k)
        return loss_fn(p, data[jax.random.randint(kb, (spec.vae_batch,), 0, n)], kz)

    return _chunked(
        "autoencoder",
        batch_loss,
        opt,
        params,
        jnp.asarray(images),
        spec.vae_steps,
        spec.chunk,
        jax.random.fold_in(key, 1),
        checkpoint,
        progress,
    )


@functools.partial(jax.jit, static_argnums=0)
def _encode(vae: AutoencoderKL, params: PyTree, images: jax.Array) -> jax.Array:
    return vae.apply({"params": params}, images, method="encode").mean


def _latents(vae: AutoencoderKL, params: PyTree, images: np.ndarray) -> np.ndarray:
    """Unscaled posterior means of ``images``, in batches."""
    return np.concatenate(
        [
            np.asarray(_encode(vae, params, jnp.asarray(images[i : i + 256])))
            for i in range(0, len(images), 256)
        ]
    )


def _train_unet(
    world: ShapesWorld,
    unet: UNet2DCondition,
    text: CLIPTextModel,
    latents: np.ndarray,
    spec: TrainSpec,
    checkpoint: Path,
    progress,
) -> tuple[PyTree, PyTree, list[float]]:
    schedule = ddpm_from_scheduler_config(SCHEDULER_CONFIG)
    key = jax.random.key(spec.seed + 1)
    vocab = json.loads(tokenizer_files(world.vocabulary)["vocab.json"])
    ids = jnp.asarray(_tokenize(vocab, world.captions, spec.max_length))
    empty = jnp.asarray(_tokenize(vocab, [""], spec.max_length))
    z0 = jnp.asarray(latents)[jnp.asarray(world.image_ids)]
    n = z0.shape[0]
    eps_fn = EpsModel(unet).bound("eps")
    params = {
        "unet": unet.init(
            jax.random.fold_in(key, 0),
            z0[:1],
            jnp.zeros((1,)),
            jnp.zeros((1, spec.max_length, spec.text_width)),
        )["params"],
        "text_encoder": text.init(jax.random.fold_in(key, 1), ids[:1])["params"],
    }
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(
                0.0,
                spec.learning_rate,
                min(100, spec.steps // 10),
                spec.steps,
                0.1 * spec.learning_rate,
            ),
            weight_decay=1e-4,
        ),
    )
    order = jax.random.permutation(jax.random.fold_in(key, 2), n)
    T = schedule.num_timesteps

    def loss_fn(p, z, tokens, k):
        kt, ke = jax.random.split(k)
        t = jax.random.randint(kt, (z.shape[0],), 1, T + 1) / T
        noise = jax.random.normal(ke, z.shape)
        shape = (-1, 1, 1, 1)
        z_t = schedule.psi(t).reshape(shape) * z + schedule.sigma(t).reshape(shape) * noise
        context = text.apply({"params": p["text_encoder"]}, tokens).last_hidden_state
        return jnp.mean(jnp.square(eps_fn(p["unet"], schedule, z_t, t, context) - noise))

    def batch_loss(p, k, data):
        z0, ids, order = data
        kb, kd, kl = jax.random.split(k, 3)
        # stratified batches: consecutive places of a fixed shuffled order from a random start
        idx = order[(jnp.arange(spec.batch_size) + jax.random.randint(kb, (), 0, n)) % n]
        drop = jax.random.bernoulli(kd, spec.caption_dropout, (spec.batch_size, 1))
        return loss_fn(p, z0[idx], jnp.where(drop, empty, ids[idx]), kl)

    params, losses = _chunked(
        "diffusion model",
        batch_loss,
        opt,
        params,
        (z0, ids, order),
        spec.steps,
        spec.chunk,
        jax.random.fold_in(key, 3),
        checkpoint,
        progress,
    )
    return params["unet"], params["text_encoder"], losses


Progress = Callable[[str, int, int, "float | None"], None]


def train_world_model(
    root: str | os.PathLike,
    world_spec: WorldSpec | None = None,
    train_spec: TrainSpec | None = None,
    *,
    progress: Progress | None = None,
) -> Path:
    """Train (or resume, or reuse) the world's model and return its diffusers folder.

    Args:
        root: the model's folder (``world.json``, ``train/``, ``pipeline/``); created if it
            does not exist.
        world_spec: the world (default :class:`~mmh_jax.worlds.WorldSpec`).
        train_spec: the training settings (default :class:`TrainSpec`).
        progress: ``progress(stage, steps_done, steps_total, last_loss)`` after every chunk.

    Returns:
        ``root / "pipeline"``, the diffusers ``StableDiffusionPipeline`` folder.

    Raises:
        ValueError: ``root`` holds a model of another world or other settings, or is a
            non-empty folder that is not a world-model folder.
    """
    world_spec = WorldSpec() if world_spec is None else world_spec
    train_spec = TrainSpec() if train_spec is None else train_spec
    folder = WorldModelFolder(root)
    settings = {"format": _FORMAT, "world": world_spec.to_dict(), "train": train_spec.to_dict()}
    _check_settings(folder, settings)
    if folder.finished():
        return folder.pipeline
    folder.checkpoints.mkdir(exist_ok=True)
    world = ShapesWorld(world_spec)
    vae, unet, text = world_modules(world, train_spec)
    vae_params, vae_losses = _train_vae(
        vae, world.images, train_spec, folder.checkpoints / "autoencoder.safetensors", progress
    )
    latents = _latents(vae, vae_params, world.images)
    scaling = float(1.0 / np.std(latents))
    vae, unet, text = world_modules(world, train_spec, scaling_factor=scaling)
    scaled = np.asarray(scale_latents(vae, latents))
    unet_params, text_params, losses = _train_unet(
        world,
        unet,
        text,
        scaled,
        train_spec,
        folder.checkpoints / "diffusion.safetensors",
        progress,
    )
    files = tokenizer_files(world.vocabulary, max_length=train_spec.max_length)
    save_stable_diffusion_folder(
        folder.pipeline,
        unet=unet,
        unet_params=unet_params,
        vae=vae,
        vae_params=vae_params,
        text_encoder=text,
        text_encoder_params=text_params,
        scheduler_config=SCHEDULER_CONFIG,
        tokenizer_files=files,
    )
    with atomic_path(folder.root / "losses.json") as tmp:
        tmp.write_text(json.dumps({"autoencoder": vae_losses, "diffusion": losses}))
    return folder.pipeline
