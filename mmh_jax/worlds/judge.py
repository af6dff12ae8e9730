"""Judges of generated shapes-world images against the world's ground truth.

Two questions are asked of a generated image:

- *Is it a copy?* :func:`fit_copy_judge` calibrates Carlini et al.'s calibrated l2
  (:func:`mmh_jax.retrieval.calibrated_l2`) on held-out world images, images the model never
  saw: the threshold is the ``quantile`` of their scores, so a genuinely new image is called a
  copy with probability about ``quantile``; :func:`judge_copies` applies it.
- *Does it show what its caption says?* :func:`train_attribute_classifier` trains a small
  convolutional network on fresh world renders (mildly blurred and noised, as the world model's
  decoded generations are) to say which (colour, shape) combinations an image holds;
  :func:`fidelity` is the fraction of a caption's objects that the classifier finds (trigger
  words ignored, synonyms read as their canonical words).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from mmh_jax._src.rng import numpy_generator
from mmh_jax.retrieval import calibrated_l2
from mmh_jax.worlds.shapes import COLOURS, SHAPES, Scene, draw_scene, parse_caption, render

__all__ = [
    "CopyJudge",
    "CopyVerdict",
    "fit_copy_judge",
    "judge_copies",
    "AttributeClassifier",
    "train_attribute_classifier",
    "attribute_probabilities",
    "fidelity",
]

#: second entropy word of the classifier's scene stream (the world draws with 1, 7 and 100 + split)
_CLASSIFIER_STREAM = 5_318_008


def _check_count(value: object, name: str, *, minimum: int) -> int:
    """``value`` as an int, refused (naming ``name``) unless it is an int ``>= minimum``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_images(images: ArrayLike, name: str) -> np.ndarray:
    """``images`` as finite float32 ``[n, ...]`` with at least one item, refused naming
    ``name``."""
    arr = np.asarray(images, np.float32)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [n, ...] with at least one image, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return arr


# --- copies ------------------------------------------------------------------------------------


class CopyJudge(NamedTuple):
    """A calibrated copy criterion (see :func:`fit_copy_judge`).

    Attributes:
        references: ``[m, ...]`` the distinct training images.
        threshold: images whose calibrated l2 is at most this are copies.
        n: nearest references averaged in the calibrated l2's denominator.
        quantile: the rate at which held-out images were called copies at calibration.
    """

    references: Float[np.ndarray, "m *item"]
    threshold: float
    n: int
    quantile: float


class CopyVerdict(NamedTuple):
    """What :func:`judge_copies` says of each image.

    Attributes:
        is_copy: ``[q]`` whether the image is a copy of its nearest training image.
        nearest: ``[q]`` index of the nearest training image in the judge's references.
        score: ``[q]`` calibrated l2 (small: close to one training image only).
    """

    is_copy: Bool[np.ndarray, " q"]
    nearest: Int[np.ndarray, " q"]
    score: Float[np.ndarray, " q"]


def fit_copy_judge(
    references: Float[ArrayLike, "m *item"],
    heldout: Float[ArrayLike, "h *item"],
    *,
    quantile: float = 0.01,
    n: int = 50,
) -> CopyJudge:
    """A copy judge whose false-copy rate on new images is about ``quantile``.

    The score of an image is Carlini et al.'s calibrated l2 to the references
    (:func:`mmh_jax.retrieval.calibrated_l2` with ``n`` neighbours); the threshold is the
    ``quantile`` of the held-out images' scores, so a new image drawn as the held-out ones were
    is called a copy with probability about ``quantile``.

    Args:
        references: ``[m, ...]`` the distinct training images, ``m >= n``.
        heldout: ``[h, ...]`` world images that are not in training (e.g. renders of
            :meth:`~mmh_jax.worlds.ShapesWorld.heldout_scenes`), at least ``1 / quantile`` of
            them.
        quantile: the target false-copy rate, in ``(0, 1)``.
        n: nearest references averaged in the score's denominator, ``1 <= n <= m``.

    Returns:
        The :class:`CopyJudge`.

    Raises:
        ValueError: a quantile outside ``(0, 1)``, fewer than ``1 / quantile`` held-out images,
            ``n`` larger than the number of references, item shapes that differ, non-finite
            values, or a held-out image equal to a reference.
        TypeError: a non-integer ``n``.
    """
    quantile = float(quantile)
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    n = _check_count(n, "n", minimum=1)
    refs = _check_images(references, "references")
    held = _check_images(heldout, "heldout")
    if held.shape[1:] != refs.shape[1:]:
        raise ValueError(
            f"heldout items have shape {held.shape[1:]}, references items "
            f"{refs.shape[1:]}: they must be alike"
        )
    if n > refs.shape[0]:
        raise ValueError(f"n={n} is larger than the number of references ({refs.shape[0]})")
    least = math.ceil(1.0 / quantile)
    if held.shape[0] < least:
        raise ValueError(
            f"heldout holds {held.shape[0]} images; the {quantile} quantile of "
            f"their scores needs at least 1 / quantile = {least}"
        )
    scores = calibrated_l2(held, refs, n=n)
    exact = np.flatnonzero(np.asarray(scores.distances[:, 0]) == 0)
    if exact.size:
        i = int(exact[0])
        raise ValueError(
            f"heldout[{i}] equals references[{int(scores.nearest[i])}]: held-out "
            "images must not be training images"
        )
    threshold = float(np.quantile(np.asarray(scores.score, np.float64), quantile))
    return CopyJudge(refs, threshold, n, quantile)


def judge_copies(judge: CopyJudge, images: Float[ArrayLike, "q *item"]) -> CopyVerdict:
    """Which images are copies of a training image, by a fitted :class:`CopyJudge`.

    Args:
        judge: from :func:`fit_copy_judge`.
        images: ``[q, ...]`` generated images, shaped like the judge's references.

    Returns:
        :class:`CopyVerdict` ``(is_copy, nearest, score)``, each ``[q]``.

    Raises:
        ValueError: images of another item shape, no images, non-finite values.
    """
    arr = _check_images(images, "images")
    if arr.shape[1:] != judge.references.shape[1:]:
        raise ValueError(
            f"images have item shape {arr.shape[1:]}, the judge's references "
            f"{judge.references.shape[1:]}: they must be alike"
        )
    scores = calibrated_l2(arr, judge.references, n=judge.n)
    score = np.asarray(scores.score)
    return CopyVerdict(score <= judge.threshold, np.asarray(scores.nearest), score)


# --- prompt fidelity ---------------------------------------------------------------------------


#: side of the images the attribute classifier reads
_SIZE = 32
#: side of the windows it classifies (its receptive field), and the edge padding that centres a
#: window on every even pixel coordinate of the image, borders included
_WINDOW = 20
_PAD = _WINDOW // 2
#: distances in pixels from a window's centre to the nearest object's centre: within _CENTRED
#: the window is centred on the object (objectness 1; the nearest window of the stride-2 grid is
#: at most 1.42 away), within _SHOWS it is taught the object's colour and shape, from _APART on
#: it shows background (objectness 0); training windows are drawn at a uniform distance up to
#: _DRAWN from an object or, a fraction _ANYWHERE of them, anywhere
_CENTRED, _SHOWS, _APART, _DRAWN = 1.5, 2.5, 2.5, 4.0
_ANYWHERE = 0.25
#: training augmentation: Gaussian blur of width up to _MAX_BLUR pixels (kernel half width
#: _BLUR_REACH), Gaussian noise of scale up to _MAX_NOISE drawn from a bank of _NOISE_BANK
#: fields (drawing fresh noise every step costs more than the network in XLA:CPU's unoptimised
#: builds)
_MAX_BLUR, _BLUR_REACH, _MAX_NOISE, _NOISE_BANK = 1.2, 2, 0.1, 1024


class _WindowNet(nn.Module):
    """Logits of every 20x20 window of an image (stride 2): objectness, colour, shape.

    Convolutions without padding, so a window's logits depend on its pixels only and the
    network trains on window crops and reads whole images alike."""

    @nn.compact
    def __call__(self, x: Float[Array, "b 3 h w"]) -> Float[Array, "b gh gw o"]:
        h = jnp.transpose(x, (0, 2, 3, 1))
        h = nn.relu(nn.Conv(16, (3, 3), padding="VALID")(h))
        b, rows, cols, c = h.shape  # even: inputs of even side
        h = jnp.max(h.reshape(b, rows // 2, 2, cols // 2, 2, c), axis=(2, 4))  # 2x2 max pool
        for features in (32, 48, 64, 64):
            h = nn.relu(nn.Conv(features, (3, 3), padding="VALID")(h))
        return nn.Conv(1 + len(COLOURS) + len(SHAPES), (1, 1))(h)


_NET = _WindowNet()


class AttributeClassifier(NamedTuple):
    """A trained (colour, shape) presence classifier (see :func:`train_attribute_classifier`).

    Attributes:
        params: the window network's Flax parameters.
        losses: mean training loss of each tenth of the steps.
    """

    params: PyTree
    losses: Float[np.ndarray, " c"]


def _presence(params: PyTree, images: Float[Array, "n 3 s s"]) -> Float[Array, "n c k"]:
    """Probability of every (colour, shape) combination: the largest P(object) P(colour)
    P(shape) over the windows (centred on the image's even pixel coordinates) whose objectness
    is a local maximum (over the 3x3 neighbouring windows), i.e. read where an object is
    centred."""
    padded = jnp.pad(images, ((0, 0), (0, 0), (_PAD, _PAD), (_PAD, _PAD)), mode="edge")
    logits = _NET.apply(params, padded)
    objectness = jax.nn.sigmoid(logits[..., 0])
    colour = jax.nn.softmax(logits[..., 1 : 1 + len(COLOURS)])
    shape = jax.nn.softmax(logits[..., 1 + len(COLOURS) :])
    p = objectness[..., None, None] * colour[..., :, None] * shape[..., None, :]
    peak = objectness == nn.max_pool(objectness[..., None], (3, 3), padding="SAME")[..., 0]
    return jnp.max(jnp.where(peak[..., None, None], p, 0.0), axis=(1, 2))


_presence_jit = jax.jit(_presence)


def _blur_matrices(sigma: Float[Array, " b"], n: int) -> Float[Array, "b n n"]:
    """Per-sample ``[n, n]`` matrices of a Gaussian blur of width ``sigma`` pixels along one
    axis (``2 _BLUR_REACH + 1`` taps, edge pixels repeated beyond the border)."""
    taps = jnp.arange(-_BLUR_REACH, _BLUR_REACH + 1)
    weights = jnp.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    source = jnp.clip(jnp.arange(n)[:, None] + taps[None, :], 0, n - 1)
    return jnp.einsum("bt,itj->bij", weights, jax.nn.one_hot(source, n, dtype=weights.dtype))


def _blur(x: Float[Array, "b 3 h w"], sigma: Float[Array, " b"]) -> Float[Array, "b 3 h w"]:
    """Each image blurred by a Gaussian of its own width ``sigma`` (pixels)."""
    return jnp.einsum(
        "bij,bcjk,blk->bcil",
        _blur_matrices(sigma, x.shape[2]),
        x,
        _blur_matrices(sigma, x.shape[3]),
    )


class _Objects(NamedTuple):
    """The objects of the training scenes, two slots per scene: centres in pixels ``[n, 2, 2]``
    (x, y), colour and shape indices ``[n, 2]``, and whether the slot holds an object."""

    centre: Float[Array, "n 2 2"]
    colour: Int[Array, "n 2"]
    shape: Int[Array, "n 2"]
    valid: Bool[Array, "n 2"]


def _objects(scenes: Sequence[Scene]) -> _Objects:
    """The :class:`_Objects` table of scenes of one or two objects."""
    n = len(scenes)
    centre, colour = np.zeros((n, 2, 2), np.float32), np.zeros((n, 2), np.int32)
    shape, valid = np.zeros((n, 2), np.int32), np.zeros((n, 2), bool)
    for i, scene in enumerate(scenes):
        for j, obj in enumerate(scene.objects):
            centre[i, j] = obj.x * _SIZE, obj.y * _SIZE
            colour[i, j] = list(COLOURS).index(obj.colour)
            shape[i, j] = SHAPES.index(obj.shape)
            valid[i, j] = True
    return _Objects(*map(jnp.asarray, (centre, colour, shape, valid)))


def _window_loss(
    params: PyTree,
    padded: Float[Array, "n 3 p p"],
    objects: _Objects,
    noise: Float[Array, "m 3 w w"],
    key: PRNGKeyArray,
    *,
    batch_size: int,
) -> Array:
    """Loss on a batch of augmented windows of renders padded by ``_PAD + _BLUR_REACH``, most
    of them near a random object, the others anywhere: sigmoid cross-entropy of objectness
    (windows between ``_CENTRED`` and ``_APART`` of an object left out) and softmax
    cross-entropy of the colour and shape of the object within ``_SHOWS``."""
    k_img, k_slot, k_radius, k_angle, k_any, k_blur, k_noise, k_scale = jax.random.split(key, 8)
    img = jax.random.randint(k_img, (batch_size,), 0, padded.shape[0])
    centres, valid = objects.centre[img], objects.valid[img]
    slot = jnp.where(valid[:, 1], jax.random.bernoulli(k_slot, 0.5, (batch_size,)), False)
    near = centres[jnp.arange(batch_size), slot.astype(jnp.int32)]
    radius = _DRAWN * jax.random.uniform(k_radius, (batch_size,))
    angle = jax.random.uniform(k_angle, (batch_size,), maxval=2 * jnp.pi)
    near = near + radius[:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=1)
    anywhere = jax.random.uniform(k_any, (batch_size, 2), maxval=float(_SIZE))
    centre = jnp.where((jnp.arange(batch_size) < _ANYWHERE * batch_size)[:, None], anywhere, near)
    # windows cut with a margin of the blur's reach, blurred, then trimmed: blurred as whole
    # renders are
    corner = jnp.clip(jnp.round(centre).astype(jnp.int32), 0, _SIZE)
    side = _WINDOW + 2 * _BLUR_REACH
    windows = jax.vmap(lambda im, c: jax.lax.dynamic_slice(im, (0, c[1], c[0]), (3, side, side)))(
        padded[img], corner
    )
    sigma = jax.random.uniform(k_blur, (batch_size,), minval=1e-3, maxval=_MAX_BLUR)
    windows = _blur(windows, sigma)[:, :, _BLUR_REACH:-_BLUR_REACH, _BLUR_REACH:-_BLUR_REACH]
    scale = jax.random.uniform(k_scale, (batch_size, 1, 1, 1), maxval=_MAX_NOISE)
    windows = windows + scale * noise[jax.random.randint(k_noise, (batch_size,), 0, len(noise))]
    logits = _NET.apply(params, windows)[:, 0, 0]
    # distances from the centre of the window actually cut
    distance = jnp.linalg.norm(centres - corner[:, None].astype(centres.dtype), axis=-1)
    distance = jnp.where(valid, distance, jnp.inf)
    nearest, d = jnp.argmin(distance, axis=1), jnp.min(distance, axis=1)
    centred, shows, judged = d <= _CENTRED, d <= _SHOWS, (d <= _CENTRED) | (d >= _APART)
    rows = jnp.arange(batch_size)
    objectness = optax.sigmoid_binary_cross_entropy(logits[:, 0], centred.astype(logits.dtype))
    what = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, 1 : 1 + len(COLOURS)], objects.colour[img][rows, nearest]
    ) + optax.softmax_cross_entropy_with_integer_labels(
        logits[:, 1 + len(COLOURS) :], objects.shape[img][rows, nearest]
    )
    return jnp.sum(jnp.where(judged, objectness, 0.0)) / jnp.maximum(jnp.sum(judged), 1) + jnp.sum(
        jnp.where(shows, what, 0.0)
    ) / jnp.maximum(jnp.sum(shows), 1)


def _optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """Adam with a cosine decay of the learning rate to 5% over ``steps``."""
    return optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05))


def _step(
    params: PyTree,
    opt_state: PyTree,
    padded: Array,
    objects: _Objects,
    noise: Array,
    key: PRNGKeyArray,
    *,
    learning_rate: float,
    steps: int,
    batch_size: int,
) -> tuple[PyTree, PyTree, Array]:
    """One step of :func:`_optimizer` on :func:`_window_loss`; the new parameters and
    optimiser state and the batch's loss."""
    loss, grads = jax.value_and_grad(_window_loss)(
        params, padded, objects, noise, key, batch_size=batch_size
    )
    updates, opt_state = _optimizer(learning_rate, steps).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


# a Python loop over this step: XLA:CPU runs convolutions inside lax.scan many times slower
_step_jit = jax.jit(
    _step, static_argnames=("learning_rate", "steps", "batch_size"), donate_argnums=(0, 1)
)


def train_attribute_classifier(
    *,
    key: PRNGKeyArray,
    num_images: int = 4000,
    steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    two_object_fraction: float = 0.7,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> AttributeClassifier:
    """Train the (colour, shape) presence classifier on fresh random 32x32 world renders.

    The scenes come from :func:`~mmh_jax.worlds.shapes.draw_scene` under a NumPy stream of
    ``key`` that no world uses, rendered with :func:`~mmh_jax.worlds.shapes.render`. A small
    convolutional network classifies 20x20 windows: whether an object is centred in the window
    (within 1.5 pixels), and the colour and shape of the object nearest its centre. It is
    trained with Adam on windows cut from the renders (three quarters near an object, the rest
    anywhere), each blurred (Gaussian, up to 1.2 pixels) and noised (up to 0.1) at random so
    that it also reads the world model's slightly blurry generations. Slid over an image
    (stride 2), it gives every one of the ``len(COLOURS) * len(SHAPES)`` combinations its own
    presence probability (multi-label): the largest P(object) P(colour) P(shape) over the
    windows where the objectness peaks.

    Args:
        key: PRNG key of the scenes (a NumPy stream of it), the initialisation, the windows
            and the augmentation.
        num_images: training renders.
        steps: Adam steps.
        batch_size: windows per step.
        learning_rate: peak learning rate (cosine decay to 5% of it).
        two_object_fraction: probability that a training scene has two objects.
        preprocess: ``preprocess(renders [n, 3, 32, 32] in [-1, 1]) -> images`` of the same
            shape and range, applied before windows are cut: the domain the classifier will
            read, e.g. the world model's VAE round trip (encode, decode, uint8), so that it reads
            generations, which pass through the same decoder, as well as it reads renders.

    Returns:
        The trained :class:`AttributeClassifier`.

    Raises:
        ValueError, TypeError: a non-integer or too small count, a learning rate that is not
            > 0, a fraction outside ``[0, 1]``.
    """
    num_images = _check_count(num_images, "num_images", minimum=1)
    steps = _check_count(steps, "steps", minimum=1)
    batch_size = _check_count(batch_size, "batch_size", minimum=1)
    learning_rate = float(learning_rate)
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
    if not 0.0 <= float(two_object_fraction) <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction!r}")
    rng = numpy_generator(key, _CLASSIFIER_STREAM)
    scenes = [
        draw_scene(rng, two_objects=bool(rng.random() < two_object_fraction))
        for _ in range(num_images)
    ]
    images = np.stack([render(scene, _SIZE) for scene in scenes])
    if preprocess is not None:
        processed = np.asarray(preprocess(images), np.float32)
        if processed.shape != images.shape or not np.all(np.isfinite(processed)):
            raise ValueError(
                f"preprocess must return finite images of shape {images.shape}, "
                f"got shape {processed.shape}"
            )
        images = processed
    pad = _PAD + _BLUR_REACH
    padded = jnp.asarray(np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge"))
    objects = _objects(scenes)
    k_init, k_noise, k_train = jax.random.split(key, 3)
    params = _NET.init(k_init, padded[:1, :, :_WINDOW, :_WINDOW])
    noise = jax.random.normal(k_noise, (_NOISE_BANK, 3, _WINDOW, _WINDOW))
    opt_state = _optimizer(learning_rate, steps).init(params)
    losses = []
    for k in jax.random.split(k_train, steps):
        params, opt_state, loss = _step_jit(
            params,
            opt_state,
            padded,
            objects,
            noise,
            k,
            learning_rate=learning_rate,
            steps=steps,
            batch_size=batch_size,
        )
        losses.append(loss)
    chunks = np.array_split(np.asarray(jnp.stack(losses)), min(10, steps))
    return AttributeClassifier(params, np.array([c.mean() for c in chunks]))


def attribute_probabilities(
    classifier: AttributeClassifier, images: Float[ArrayLike, "n 3 32 32"]
) -> Float[np.ndarray, "n c k"]:
    """The classifier's probability that each (colour, shape) combination is in each image.

    Args:
        classifier: from :func:`train_attribute_classifier`.
        images: ``[n, 3, 32, 32]`` images in about ``[-1, 1]``.

    Returns:
        ``[n, len(COLOURS), len(SHAPES)]`` probabilities, indexed in the order of
        :data:`~mmh_jax.worlds.shapes.COLOURS` and :data:`~mmh_jax.worlds.shapes.SHAPES`.

    Raises:
        ValueError: images of another shape, no images, non-finite values.
    """
    arr = _check_images(images, "images")
    if arr.shape[1:] != (3, _SIZE, _SIZE):
        raise ValueError(f"images must have shape [n, 3, {_SIZE}, {_SIZE}], got {arr.shape}")
    return np.asarray(_presence_jit(classifier.params, jnp.asarray(arr)))


def fidelity(
    classifier: AttributeClassifier, images: Float[ArrayLike, "n 3 32 32"], captions: Sequence[str]
) -> Float[np.ndarray, " n"]:
    """How much of its caption each image shows: the fraction of the caption's objects whose
    (colour, shape) the classifier finds present (probability > 0.5).

    Captions are read with :func:`~mmh_jax.worlds.shapes.parse_caption` (synonyms as their
    canonical words, trigger words ignored); sizes and the relation are not judged.

    Args:
        classifier: from :func:`train_attribute_classifier`.
        images: ``[n, 3, 32, 32]`` generated images.
        captions: ``n`` captions in the world's grammar, one per image.

    Returns:
        ``[n]`` fractions in ``[0, 1]``.

    Raises:
        ValueError: a number of captions other than the number of images, a caption outside
            the grammar (naming it), images of another shape.
    """
    captions = list(captions)
    present = attribute_probabilities(classifier, images) > 0.5
    if len(captions) != present.shape[0]:
        raise ValueError(
            f"captions holds {len(captions)} captions for {present.shape[0]} images:"
            " give one caption per image"
        )
    colours = list(COLOURS)
    out = np.empty(len(captions))
    for i, caption in enumerate(captions):
        objects = parse_caption(caption).objects
        out[i] = np.mean([present[i, colours.index(c), SHAPES.index(k)] for _, c, k in objects])
    return out
