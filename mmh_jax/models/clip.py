"""Flax ports of transformers' CLIP: ``CLIPTextModel`` (the text encoder of Stable Diffusion),
``CLIPVisionModel`` and the two-tower ``CLIPModel`` (projected, normalised image and text
embeddings, as CLIP score uses them). The vision tower reuses the text tower's transformer
layers, without the causal mask.

The text tower's attributes are the keys of a transformers ``CLIPTextConfig`` that change the
inference forward pass, with transformers' defaults; :meth:`CLIPTextModel.from_config` reads a
parsed ``config.json`` strictly. Parameter scopes follow the PyTorch module names with the
``text_model.`` prefix dropped and every list index attached to its list
(``text_model.encoder.layers.3.self_attn.q_proj`` is ``encoder/layers_3/self_attn/q_proj``),
see :mod:`mmh_jax.convert.clip`.

The network: token plus learned position embeddings, ``num_hidden_layers`` pre-LayerNorm
transformer layers with causal self-attention, and a final LayerNorm. The call takes integer
token ids ``[b, n]`` (no attention mask: Stable Diffusion's pipelines pass none, and with the
causal mask the states up to the end-of-text token do not depend on the padding after it) and
returns every position's final state and the pooled state at the end-of-text token. Dropout is
accepted in the config and ignored (inference only).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from mmh_jax.models._config import ConfigPort, config_kwargs, module_config, unsupported
from mmh_jax.models.layers import attention

__all__ = [
    "CLIPModel",
    "CLIPOutput",
    "CLIPTextModel",
    "CLIPTextOutput",
    "CLIPVisionModel",
    "CLIPVisionOutput",
]

_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new")
# Keys of a transformers config.json that describe the file, the training set-up or the
# PyTorch call's output format, not the numbers the inference forward pass computes.
_BOOKKEEPING = (
    # the file and the class ("dtype", "torch_dtype": the PyTorch weights' dtype)
    "_name_or_path",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    # initialisation and training
    "initializer_range",
    "initializer_factor",
    "attention_dropout",
    "dropout",
    "hidden_dropout",
    "use_bfloat16",
    "tf_legacy_loss",
    "finetuning_task",
    "problem_type",
    "id2label",
    "label2id",
    "task_specific_params",
    "tokenizer_class",
    "prefix",
    # which outputs the PyTorch call returns, and how
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "chunk_size_feed_forward",
    # encoder-decoder and generation settings, which a text encoder never reads
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "tie_word_embeddings",
    "decoder_start_token_id",
    "sep_token_id",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
)


class CLIPTextOutput(NamedTuple):
    """What :class:`CLIPTextModel` returns.

    Attributes:
        last_hidden_state: the final LayerNorm's output at every position, ``[b, n, hidden]``
            (Stable Diffusion's UNet conditioning).
        pooled: ``last_hidden_state`` at each row's end-of-text token, ``[b, hidden]``
            (transformers' ``pooler_output``).
    """

    last_hidden_state: Float[Array, "b n hidden"]
    pooled: Float[Array, "b hidden"]


def _activation(name: str, x: Array) -> Array:
    """transformers' ``ACT2FN[name]`` for the supported names."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=name == "gelu_new")  # "gelu" is the exact erf form


def _layer_norm(epsilon: float, name: str, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
    """``torch.nn.LayerNorm`` over the last axis, its statistics two-pass in float32."""
    # Flax computes the statistics in float32 for any input dtype; the default one-pass
    # variance E[x^2] - E[x]^2 loses precision on CLIP's large-mean hidden states.
    return nn.LayerNorm(
        epsilon=epsilon, use_fast_variance=False, name=name, dtype=dtype, param_dtype=param_dtype
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_tower(module: Any, what: str, sizes: tuple[str, ...]):
    """Check the config keys the text and vision towers share, and ``sizes`` (positive ints);
    returns the error factory ``bad(key, expected)`` for the tower's own checks."""
    bad = functools.partial(unsupported, what, module)

    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        *sizes,
    ):
        if not _positive_int(getattr(module, key)):
            raise bad(key, "a positive int")
    if module.projection_dim is not None and not _positive_int(module.projection_dim):
        raise bad("projection_dim", "None or a positive int")
    if module.hidden_size % module.num_attention_heads:
        raise bad("num_attention_heads", f"a divisor of hidden_size={module.hidden_size}")
    if module.hidden_act not in _ACTIVATIONS:
        raise bad("hidden_act", " or ".join(map(repr, _ACTIVATIONS)))
    if not isinstance(module.layer_norm_eps, (int, float)) or not module.layer_norm_eps > 0:
        raise bad("layer_norm_eps", "a positive number")
    return bad


class _Tower(ConfigPort):
    """What the text and the vision tower share: their transformers config, ``model_type``
    ``KIND[1]``, read by :meth:`from_config` (the keys that do not change the inference forward
    pass skipped, ``pruned_heads`` empty) and written by :meth:`to_config`."""

    SKIP_KEYS: ClassVar[tuple[str, ...]] = _BOOKKEEPING
    FIXED_KEYS: ClassVar[Mapping[str, tuple]] = {"pruned_heads": ({},)}
    KEY_HINTS: ClassVar[Mapping[str, str]] = {
        "pruned_heads": "pruned heads change the layer shapes"
    }

    def to_config(self) -> dict[str, Any]:
        """The transformers config (JSON-serialisable, with its ``model_type``) that
        :meth:`from_config` reads back."""
        return {"model_type": self.KIND[1], **module_config(self)}


class _SelfAttention(nn.Module):
    """transformers' ``CLIPAttention``: q, k, v and out projections; ``causal`` for the text
    tower's mask (the vision tower attends to every token)."""

    heads: int
    causal: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, width = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (
            nn.Dense(width, name=name, **kw)(x).reshape(b, n, self.heads, -1)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        out = attention(q, k, v, causal=self.causal).reshape(b, n, width)
        return nn.Dense(width, name="out_proj", **kw)(out)


class _MLP(nn.Module):
    """transformers' ``CLIPMLP``: ``fc2(act(fc1(x)))``."""

    intermediate_size: int
    hidden_act: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.intermediate_size, name="fc1", **kw)(x)
        return nn.Dense(x.shape[-1], name="fc2", **kw)(_activation(self.hidden_act, h))


class _LayerSettings(NamedTuple):
    """The hyper-parameters of every encoder layer of a tower (its transformers config keys:
    ``num_attention_heads``, ``intermediate_size``, ``hidden_act``, ``layer_norm_eps``);
    ``causal`` for the text tower's mask."""

    heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    causal: bool


class _EncoderLayer(nn.Module):
    """transformers' ``CLIPEncoderLayer``: pre-LayerNorm attention and MLP, each residual."""

    settings: _LayerSettings
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        s = self.settings
        h = h + _SelfAttention(s.heads, s.causal, name="self_attn", **kw)(
            _layer_norm(s.eps, "layer_norm1", **kw)(h)
        )
        return h + _MLP(s.intermediate_size, s.hidden_act, name="mlp", **kw)(
            _layer_norm(s.eps, "layer_norm2", **kw)(h)
        )


class _Encoder(nn.Module):
    """transformers' ``CLIPEncoder``: the stack of layers (scopes ``layers_0``, ...), shared by
    the text tower (``causal=True``) and the vision tower (``causal=False``)."""

    num_layers: int
    settings: _LayerSettings
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, h: Array) -> Array:
        for i in range(self.num_layers):
            h = _EncoderLayer(
                self.settings, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype
            )(h)
        return h


def _encoder(tower: _Tower, *, causal: bool, **kw) -> _Encoder:
    """A tower's encoder (scope ``encoder``), its layers' settings read off the tower's config;
    called inside the tower's ``__call__``."""
    layer = _LayerSettings(
        tower.num_attention_heads,
        tower.intermediate_size,
        tower.hidden_act,
        tower.layer_norm_eps,
        causal,
    )
    return _Encoder(tower.num_hidden_layers, layer, name="encoder", **kw)


class _Embeddings(nn.Module):
    """transformers' ``CLIPTextEmbeddings``: token embedding plus position embedding."""

    vocab_size: int
    hidden_size: int
    max_positions: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding", **kw)
        positions = nn.Embed(self.max_positions, self.hidden_size, name="position_embedding", **kw)
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[1]))[None]


class CLIPTextModel(_Tower):
    """transformers' ``CLIPTextModel`` (the text tower of CLIP), in Flax.

    Attributes are transformers' ``CLIPTextConfig`` keys (same names, same defaults);
    ``projection_dim`` is accepted and unused (it sizes the projection of
    ``CLIPTextModelWithProjection``, which this module does not have). ``hidden_act`` is
    ``"quick_gelu"`` (OpenAI CLIP, Stable Diffusion 1.x), ``"gelu"`` (exact, OpenCLIP, Stable
    Diffusion 2.x) or ``"gelu_new"`` (tanh approximation). ``pad_token_id`` and
    ``bos_token_id`` are recorded only; ``eos_token_id`` picks the pooled position: the first
    ``input_ids == eos_token_id``, or for legacy configs with ``eos_token_id == 2`` the
    position of the largest id (CLIP's end-of-text token has the largest id of its
    vocabulary). A row without that token pools position 0, as transformers does. ``dtype``
    is the compute dtype (LayerNorm statistics and the attention softmax stay in float32) and
    ``param_dtype`` the parameters' dtype.

    Call: ``module.apply({"params": params}, input_ids [b, n])`` with integer ids,
    ``n <= max_position_embeddings``, returns a :class:`CLIPTextOutput` in ``dtype``. Ids
    outside ``[0, vocab_size)`` cannot be checked under ``jit``: they embed as NaN, which
    makes their whole row's outputs NaN.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: Literal["quick_gelu", "gelu", "gelu_new"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    KIND: ClassVar[tuple[str, str]] = ("model_type", "clip_text_model")

    def __post_init__(self):
        super().__post_init__()
        bad = _check_tower(self, "CLIPTextModel", ("vocab_size", "max_position_embeddings"))
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise bad("eos_token_id", "an int (it selects the pooled position)")
        for key in ("pad_token_id", "bos_token_id"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad(key, "None or an int")

    @nn.compact
    def __call__(self, input_ids: Int[ArrayLike, "b n"]) -> CLIPTextOutput:
        """Encode token ids.

        Args:
            input_ids: integer token ids ``[b, n]``, ``n <= max_position_embeddings``,
                as a CLIP tokenizer makes them (start token, text, end token, padding).

        Returns:
            :class:`CLIPTextOutput` ``(last_hidden_state [b, n, hidden_size],
            pooled [b, hidden_size])`` in the compute dtype.

        Raises:
            TypeError: if ``input_ids`` are not integers.
            ValueError: if ``input_ids`` is not 2-D or longer than ``max_position_embeddings``.
        """
        input_ids = jnp.asarray(input_ids)
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [b, n], got {input_ids.shape}")
        if input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per row, more than "
                f"max_position_embeddings={self.max_position_embeddings}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _Embeddings(
            self.vocab_size, self.hidden_size, self.max_position_embeddings, name="embeddings", **kw
        )(input_ids)
        h = _encoder(self, causal=True, **kw)(h)
        h = _layer_norm(self.layer_norm_eps, "final_layer_norm", **kw)(h)
        if self.eos_token_id == 2:  # legacy configs: the end token is the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(h, eos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(h, pooled)


# --- the vision tower and the two-tower model -----------------------------------------------


class CLIPVisionOutput(NamedTuple):
    """What :class:`CLIPVisionModel` returns.

    Attributes:
        last_hidden_state: the encoder's output at the class token and every patch,
            ``[b, 1 + patches, hidden]`` (before ``post_layernorm``, as transformers returns it).
        pooled: ``post_layernorm`` of the class token's state, ``[b, hidden]`` (transformers'
            ``pooler_output``).
    """

    last_hidden_state: Float[Array, "b n hidden"]
    pooled: Float[Array, "b hidden"]


class _VisionEmbeddings(nn.Module):
    """transformers' ``CLIPVisionEmbeddings``: patch convolution (no bias), class token, and
    learned position embeddings. Takes NHWC pixels."""

    hidden_size: int
    patch_size: int
    num_positions: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        patches = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            name="patch_embedding",
            **kw,
        )(pixels)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, self.hidden_size)  # row-major, as torch's flatten(2)
        cls = self.param(
            "class_embedding", nn.initializers.normal(0.02), (self.hidden_size,), self.param_dtype
        )
        cls = jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, self.hidden_size))
        h = jnp.concatenate([cls, patches.astype(self.dtype)], axis=1)
        positions = nn.Embed(self.num_positions, self.hidden_size, name="position_embedding", **kw)
        return h + positions(jnp.arange(self.num_positions))[None]


class CLIPVisionModel(_Tower):
    """transformers' ``CLIPVisionModel`` (the ViT image tower of CLIP), in Flax.

    Attributes are transformers' ``CLIPVisionConfig`` keys (same names, same defaults);
    ``projection_dim`` is accepted and unused (the projection belongs to :class:`CLIPModel`).
    The network: a ``patch_size`` convolution without bias, a learned class token, learned
    position embeddings, ``pre_layrnorm`` (transformers' spelling), ``num_hidden_layers``
    pre-LayerNorm transformer layers without mask (the text tower's layers), and
    ``post_layernorm`` of the class token. Parameter scopes follow the PyTorch names without
    the ``vision_model.`` prefix (``embeddings/patch_embedding``, ``encoder/layers_0/...``), see
    :mod:`mmh_jax.convert.clip`. ``dtype`` is the compute dtype, ``param_dtype`` the
    parameters'.

    Call: ``module.apply({"params": params}, pixel_values [b, num_channels, image_size,
    image_size])`` (NCHW, normalised as the model's image processor does) returns a
    :class:`CLIPVisionOutput` in ``dtype``. Other image sizes are refused (transformers'
    ``interpolate_pos_encoding`` is not ported).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int | None = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: Literal["quick_gelu", "gelu", "gelu_new"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    KIND: ClassVar[tuple[str, str]] = ("model_type", "clip_vision_model")

    def __post_init__(self):
        super().__post_init__()
        bad = _check_tower(self, "CLIPVisionModel", ("num_channels", "image_size", "patch_size"))
        if self.image_size % self.patch_size:
            raise bad("patch_size", f"a divisor of image_size={self.image_size}")

    @property
    def num_positions(self) -> int:
        """The class token plus ``(image_size / patch_size) ** 2`` patches."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @nn.compact
    def __call__(self, pixel_values: Float[ArrayLike, "b c h w"]) -> CLIPVisionOutput:
        """Encode images.

        Args:
            pixel_values: ``[b, num_channels, image_size, image_size]`` floats (NCHW), as the
                model's image processor makes them.

        Returns:
            :class:`CLIPVisionOutput` ``(last_hidden_state [b, 1 + patches, hidden_size],
            pooled [b, hidden_size])`` in the compute dtype.

        Raises:
            TypeError: if ``pixel_values`` are not floats.
            ValueError: if the shape is not ``[b, num_channels, image_size, image_size]``.
        """
        pixel_values = jnp.asarray(pixel_values)
        if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
            raise TypeError(
                f"pixel_values must be floats (normalised pixels), got dtype {pixel_values.dtype}"
            )
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            raise ValueError(
                f"pixel_values must have shape [b, {', '.join(map(str, expected))}] "
                f"(NCHW), got {pixel_values.shape}"
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pixels = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        h = _VisionEmbeddings(
            self.hidden_size, self.patch_size, self.num_positions, name="embeddings", **kw
        )(pixels)
        h = _layer_norm(self.layer_norm_eps, "pre_layrnorm", **kw)(h)
        h = _encoder(self, causal=False, **kw)(h)
        pooled = _layer_norm(self.layer_norm_eps, "post_layernorm", **kw)(h[:, 0])
        return CLIPVisionOutput(h, pooled)


class CLIPOutput(NamedTuple):
    """What :class:`CLIPModel` returns.

    Attributes:
        image_embeds: projected, L2-normalised image embeddings ``[b, projection_dim]``.
        text_embeds: projected, L2-normalised text embeddings ``[t, projection_dim]``.
        logits_per_image: ``exp(logit_scale) * image_embeds @ text_embeds.T``, ``[b, t]``.
    """

    image_embeds: Float[Array, "b dim"]
    text_embeds: Float[Array, "t dim"]
    logits_per_image: Float[Array, "b t"]


def _l2_normalise(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """transformers' ``CLIPModel``: both towers and their projections (no bias), in Flax.

    Attributes:
        text_model: the :class:`CLIPTextModel` (parameter scope ``text_model``).
        vision_model: the :class:`CLIPVisionModel` (parameter scope ``vision_model``).
        projection_dim: the joint embedding width (``visual_projection`` and
            ``text_projection``, scopes of those names, kernels without bias).
        logit_scale_init_value: the initial ``logit_scale`` (a scalar parameter, kept from
            the checkpoint).
        dtype, param_dtype: compute and parameter dtypes of the projections (the towers have
            their own; :meth:`from_config` sets all alike).

    Call: ``module.apply(variables, pixel_values, input_ids)`` returns a :class:`CLIPOutput`;
    ``method="embed_images"`` / ``"embed_texts"`` give one side's normalised embeddings
    (float32) and ``"image_features"`` / ``"text_features"`` the projected, unnormalised
    features (transformers' ``get_image_features`` / ``get_text_features``).
    """

    text_model: CLIPTextModel
    vision_model: CLIPVisionModel
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        if not _positive_int(self.projection_dim):
            raise ValueError(
                f"CLIPModel: projection_dim={self.projection_dim!r} is not "
                "supported; expected a positive int"
            )

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        self.visual_projection = nn.Dense(self.projection_dim, **kw)
        self.text_projection = nn.Dense(self.projection_dim, **kw)
        self.logit_scale = self.param(
            "logit_scale",
            nn.initializers.constant(self.logit_scale_init_value),
            (),
            self.param_dtype,
        )

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
    ) -> "CLIPModel":
        """The module a transformers ``CLIPModel`` ``config.json`` describes, read strictly.

        Args:
            config: the parsed ``config.json`` (or ``CLIPConfig.to_dict()``): ``model_type``
                ``"clip"`` if present, ``text_config`` and ``vision_config`` (read by
                :meth:`CLIPTextModel.from_config` and :meth:`CLIPVisionModel.from_config`;
                transformers 4's ``text_config_dict`` / ``vision_config_dict`` override them
                key by key, as transformers reads them), ``projection_dim``,
                ``logit_scale_init_value``; bookkeeping keys are skipped.
            dtype: compute dtype of every part.
            param_dtype: parameter dtype of every part.

        Raises:
            TypeError: if ``config`` or a sub-config is not a mapping.
            ValueError: naming the first key (``text_config.`` / ``vision_config.`` prefixed
                for the towers' keys) this port does not know or does not support.
        """
        if not isinstance(config, Mapping):
            raise TypeError(
                f"config must be a mapping (a parsed config.json), got {type(config).__name__}"
            )
        config = dict(config)
        towers = {}
        for side, tower in (("text", CLIPTextModel), ("vision", CLIPVisionModel)):
            sub = config.pop(f"{side}_config", None) or {}
            override = config.pop(f"{side}_config_dict", None) or {}
            if not isinstance(sub, Mapping) or not isinstance(override, Mapping):
                raise TypeError(f"CLIPModel config: {side}_config must be a mapping")
            try:
                towers[f"{side}_model"] = tower.from_config(
                    {**sub, **override}, dtype=dtype, param_dtype=param_dtype
                )
            except ValueError as err:
                raise ValueError(f"CLIPModel config: {side}_config: {err}") from None
        for key in towers:
            if key in config:
                raise ValueError(f"CLIPModel config: unknown key {key!r}")
        kwargs = config_kwargs(
            cls, config, what="CLIPModel", kind=("model_type", "clip"), skip=_BOOKKEEPING
        )
        return cls(**towers, **kwargs, dtype=dtype, param_dtype=param_dtype)

    def to_config(self) -> dict[str, Any]:
        """The transformers ``CLIPConfig`` dict (JSON-serialisable) :meth:`from_config` reads."""
        return {
            "model_type": "clip",
            "text_config": self.text_model.to_config(),
            "vision_config": self.vision_model.to_config(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }

    def image_features(self, pixel_values: Float[ArrayLike, "b c h w"]) -> Array:
        """``visual_projection`` of the vision tower's pooled state, ``[b, projection_dim]``."""
        return self.visual_projection(self.vision_model(pixel_values).pooled)

    def text_features(self, input_ids: Int[ArrayLike, "b n"]) -> Array:
        """``text_projection`` of the text tower's pooled state, ``[b, projection_dim]``."""
        return self.text_projection(self.text_model(input_ids).pooled)

    def embed_images(self, pixel_values: Float[ArrayLike, "b c h w"]) -> Float[Array, "b dim"]:
        """Projected, L2-normalised image embeddings (float32)."""
        return _l2_normalise(self.image_features(pixel_values))

    def embed_texts(self, input_ids: Int[ArrayLike, "b n"]) -> Float[Array, "b dim"]:
        """Projected, L2-normalised text embeddings (float32)."""
        return _l2_normalise(self.text_features(input_ids))

    def __call__(
        self, pixel_values: Float[ArrayLike, "b c h w"], input_ids: Int[ArrayLike, "t n"]
    ) -> CLIPOutput:
        image, text = self.embed_images(pixel_values), self.embed_texts(input_ids)
        logits = jnp.exp(self.logit_scale.astype(jnp.float32)) * image @ text.T
        return CLIPOutput(image, text, logits)
