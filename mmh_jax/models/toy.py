"""Small noise-prediction (epsilon) networks for CPU demos, written in plain JAX.

A network here is a frozen dataclass holding its architecture (static settings) with
two methods: ``init(key) -> params`` (a pytree of arrays) and
``apply(params, x_t, t) -> eps`` where ``x_t`` has shape ``[b, *event_shape]`` and
``t`` (continuous diffusion time in ``(0, 1]``) has shape ``[b]``. The output has
the shape of ``x_t``. Wrap ``functools.partial(net.apply, params)`` with
:func:`mmh_jax.schedules.score_from_eps` to get a score function (paper, Eq. 10).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from mmh_jax.schedules import Schedule, broadcast_to_event

__all__ = ["time_features", "MLPEpsNet", "ConvEpsNet"]


def time_features(
    t: Float[Array, " b"], *, num_frequencies: int = 8, t_min: float = 1e-4
) -> Float[Array, "b two_f"]:
    """Fourier features of ``log t`` rescaled to ``[-1, 0]`` over ``[t_min, 1]``.

    Args:
        t: diffusion times, shape ``[b]``.
        num_frequencies: number of octaves ``2^0 .. 2^(F-1)``.
        t_min: the smallest time the network is meant to see.

    Returns:
        Array of shape ``[b, 2 F]`` (sines, then cosines).
    """
    u = jnp.log(jnp.maximum(t, t_min * 1e-2)) / math.log(1.0 / t_min)
    freqs = math.pi * 2.0 ** jnp.arange(num_frequencies, dtype=u.dtype)
    ang = u[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


def _preconditioned_eps(
    schedule: Schedule | None,
    sigma_data: float,
    raw: "callable",
    x_t: Array,
    t: Array,
) -> Array:
    """Noise prediction from a raw network ``raw(x_in, t)`` with EDM preconditioning.

    With ``schedule`` None the raw output is the noise prediction. Otherwise the
    input is rescaled to the variance-exploding frame ``y = x_t / psi(t)`` with noise
    level ``s = sigma(t) / psi(t)`` and the network is a Karras et al. (2022)
    denoiser ``D(y) = c_skip y + c_out F(c_in y)`` with ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``; the returned
    noise prediction is ``(y - D(y)) / s``. Near a memorized point ``F`` only has to
    output a constant, which a small network learns far more easily than the steep
    ``eps`` field itself.
    """
    if schedule is None:
        return raw(x_t, t)
    psi = broadcast_to_event(schedule.psi(t), x_t)
    s = broadcast_to_event(schedule.sigma(t), x_t) / psi
    y = x_t / psi
    norm = jnp.sqrt(s**2 + sigma_data**2)
    c_skip = sigma_data**2 / norm**2
    c_out = s * sigma_data / norm
    d = c_skip * y + c_out * raw(y / norm, t)
    return (y - d) / s


def _dense_init(key: PRNGKeyArray, fan_in: int, fan_out: int, scale: float = 1.0) -> dict:
    w = jax.random.normal(key, (fan_in, fan_out)) * (scale / math.sqrt(fan_in))
    return {"w": w, "b": jnp.zeros((fan_out,))}


def _dense(p: dict, x: Array) -> Array:
    return x @ p["w"] + p["b"]


@dataclasses.dataclass(frozen=True)
class MLPEpsNet:
    """SiLU multilayer perceptron ``eps(x_t, t)`` for flat data ``[b, dim]``.

    The time enters as :func:`time_features` concatenated to the input of every
    hidden layer.

    Attributes:
        dim: data dimension ``d``.
        width: hidden width.
        depth: number of hidden layers.
        num_frequencies: octaves of the time features.
        schedule: if given, the network is EDM-preconditioned for this schedule
            (see ``_preconditioned_eps``); the output is still a noise prediction.
        sigma_data: data scale used by the preconditioning.
    """

    dim: int = 2
    width: int = 128
    depth: int = 3
    num_frequencies: int = 8
    schedule: Schedule | None = None
    sigma_data: float = 0.5

    def init(self, key: PRNGKeyArray) -> PyTree:
        """Random parameters (He-style normal weights, zero biases, zero last layer)."""
        keys = jax.random.split(key, self.depth + 1)
        tdim = 2 * self.num_frequencies
        layers = []
        fan_in = self.dim
        for i in range(self.depth):
            layers.append(_dense_init(keys[i], fan_in + tdim, self.width, scale=math.sqrt(2.0)))
            fan_in = self.width
        out = _dense_init(keys[-1], fan_in, self.dim, scale=0.0)
        return {"hidden": layers, "out": out}

    def apply(
        self, params: PyTree, x_t: Float[Array, "b d"], t: Float[Array, " b"]
    ) -> Float[Array, "b d"]:
        """Predicted noise ``eps_theta(x_t, t)``."""

        def raw(x, t):
            emb = time_features(t, num_frequencies=self.num_frequencies)
            h = x
            for p in params["hidden"]:
                h = jax.nn.silu(_dense(p, jnp.concatenate([h, emb], axis=-1)))
            return _dense(params["out"], h)

        return _preconditioned_eps(self.schedule, self.sigma_data, raw, x_t, t)


def _conv_init(key: PRNGKeyArray, c_in: int, c_out: int, scale: float = 1.0, k: int = 3) -> dict:
    w = jax.random.normal(key, (k, k, c_in, c_out)) * (scale / math.sqrt(k * k * c_in))
    return {"w": w, "b": jnp.zeros((c_out,))}


def _conv(p: dict, x: Array) -> Array:
    """'SAME' 3x3 (k x k) convolution of an NHWC batch, written as im2col + one matmul.

    Mathematically ``lax.conv_general_dilated(x, w, (1, 1), "SAME", ("NHWC", "HWIO",
    "NHWC")) + b``, but built from padding, ``k * k`` shifted slices and a dense
    matmul. On XLA:CPU the convolution primitive (its weight-gradient form in
    particular) is ~30x slower inside a ``lax.scan`` body -- where :func:`train_eps`
    runs its steps -- than outside it (measured: 2 s per training step instead of
    0.07 s for the 8x8 digits net); matmuls do not have that problem, and for tiny
    images the k*k-fold copy of the activations is cheap.
    """
    w = p["w"]
    k = w.shape[0]
    r = k // 2
    _, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (r, k - 1 - r), (r, k - 1 - r), (0, 0)))
    cols = jnp.concatenate(
        [xp[:, i : i + h, j : j + wd, :] for i in range(k) for j in range(k)], axis=-1
    )
    return cols @ w.reshape(k * k * c, -1) + p["b"]


@dataclasses.dataclass(frozen=True)
class ConvEpsNet:
    """Small residual convolutional ``eps(x_t, t)`` for tiny images ``[b, H, W]``.

    Layout: 3x3 input convolution to ``channels`` feature maps, ``num_blocks``
    residual blocks (two 3x3 convolutions with SiLU, time embedding added as a
    per-channel bias), a dense layer mixing all pixels (so the receptive field is the
    whole image), and a 3x3 output convolution back to one channel. No
    down-sampling: meant for 8x8 images.

    Attributes:
        height, width: image size.
        channels: feature maps per layer.
        num_blocks: residual blocks.
        num_frequencies: octaves of the time features.
        schedule: if given, the network is EDM-preconditioned for this schedule.
        sigma_data: data scale used by the preconditioning.
        mlp_width: if positive, the pixel-mixing dense layer is preceded by
            ``mlp_layers`` SiLU dense layers of this width (a conv front end with an
            MLP head: much more capacity per CPU second than wider convolutions, which
            is what lets the digits demo fit duplicated images within minutes); 0
            (default) keeps the single linear mixing layer.
        mlp_layers: hidden dense layers of the head when ``mlp_width > 0``.
    """

    height: int = 8
    width: int = 8
    channels: int = 32
    num_blocks: int = 2
    num_frequencies: int = 8
    schedule: Schedule | None = None
    sigma_data: float = 0.5
    mlp_width: int = 0
    mlp_layers: int = 1

    def init(self, key: PRNGKeyArray) -> PyTree:
        """Random parameters; the output convolution starts at zero."""
        c = self.channels
        tdim = 2 * self.num_frequencies
        extra = self.mlp_layers if self.mlp_width > 0 else 0
        keys = iter(jax.random.split(key, 4 + 3 * self.num_blocks + extra))
        blocks = []
        for _ in range(self.num_blocks):
            blocks.append(
                {
                    "temb": _dense_init(next(keys), tdim, c),
                    "conv1": _conv_init(next(keys), c, c, scale=math.sqrt(2.0)),
                    "conv2": _conv_init(next(keys), c, c, scale=0.5),
                }
            )
        hw = self.height * self.width
        params = {
            "temb": _dense_init(next(keys), tdim, tdim * 4, scale=math.sqrt(2.0)),
            "conv_in": _conv_init(next(keys), 1, c),
            "blocks": blocks,
        }
        fan_in = hw * c + tdim * 4
        if self.mlp_width > 0:
            hidden = []
            for _ in range(self.mlp_layers):
                hidden.append(_dense_init(next(keys), fan_in, self.mlp_width, scale=math.sqrt(2.0)))
                fan_in = self.mlp_width
            params["mlp"] = hidden
        params["mix"] = _dense_init(next(keys), fan_in, hw, scale=1.0)
        params["conv_out"] = _conv_init(next(keys), c + 1, 1, scale=0.0)
        return params

    def apply(
        self, params: PyTree, x_t: Float[Array, "b h w"], t: Float[Array, " b"]
    ) -> Float[Array, "b h w"]:
        """Predicted noise ``eps_theta(x_t, t)``."""
        return _preconditioned_eps(
            self.schedule, self.sigma_data, lambda x, t: self._raw(params, x, t), x_t, t
        )

    def _raw(self, params: PyTree, x_t: Array, t: Array) -> Array:
        b = x_t.shape[0]
        emb = jax.nn.silu(
            _dense(params["temb"], time_features(t, num_frequencies=self.num_frequencies))
        )
        h = _conv(params["conv_in"], x_t[..., None])
        for blk in params["blocks"]:
            tb = _dense(blk["temb"], time_features(t, num_frequencies=self.num_frequencies))
            r = jax.nn.silu(_conv(blk["conv1"], jax.nn.silu(h)) + tb[:, None, None, :])
            h = h + _conv(blk["conv2"], r)
        glob = jnp.concatenate([jax.nn.silu(h).reshape(b, -1), emb], axis=-1)
        for layer in params.get("mlp", ()):
            glob = jax.nn.silu(_dense(layer, glob))
        glob = _dense(params["mix"], glob)
        glob = glob.reshape(b, self.height, self.width, 1)
        return _conv(params["conv_out"], jnp.concatenate([jax.nn.silu(h), glob], axis=-1))[..., 0]
