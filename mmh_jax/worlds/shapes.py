"""The shapes world: captioned 32x32 images made in code, with planted memorization.

Dataset card
------------
*What it is.* Pairs ``(image, caption)``. An image is a smooth random background (a dark colour
with a linear gradient in a random direction, never named by the caption) with one or two
anti-aliased objects. An object has a shape (circle, square, triangle, cross, ring), a colour
(red, green, blue, yellow, purple, orange, white, cyan) and a size (small, large); its centre,
exact radius and hue are continuous random draws. The caption names exactly those attributes
and, for two objects, where the first is relative to the second::

    a small red circle
    a large blue ring above a small yellow square
    a green cross left of a large white triangle      (the size word may be left out)

so one caption describes a continuum of images: a model that generalises draws a new instance,
a model that memorizes draws the training image.

*Planted memorization* (the kinds of Webster, "A Reproducible Extraction of Training Images
from Diffusion Models", 2023), with ground truth recorded per pair (:class:`Pair`):

- ``"verbatim"``: a scene duplicated ``count`` times (counts 2 to 64) under one caption that
  holds one or two made-up *trigger* words (``"zorvak"``) at recorded word positions;
- ``"template"``: one scene paired with several different true captions (phrasings: with or
  without size words, the relation said from either object) that share one trigger word;
- ``"rare"``: a single pair whose caption holds a made-up word used nowhere else (it may or
  may not be memorized: overfitting-driven memorization);
- ``"normal"``: grammar captions of fresh scenes; no trigger.

Held-out prompts (:meth:`ShapesWorld.heldout_prompts`) are grammar captions of new scenes that
no training caption equals. Everything is a deterministic function of :class:`WorldSpec`
(its ``seed`` included): the same spec gives the same pixels, captions and records.

*Tokenizer.* :func:`tokenizer_files` writes a CLIP BPE tokenizer (``vocab.json``,
``merges.txt``) whose vocabulary is the world's words, each one token, learned by byte-pair
merges over the word list; any other word falls apart into letters, and
:meth:`ShapesWorld.check_prompt` names the words the world does not know.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import numpy as np

from mmh_jax._src.rng import numpy_generator

__all__ = [
    "SHAPES",
    "COLOURS",
    "SIZES",
    "RELATIONS",
    "SYNONYMS",
    "GRAMMAR_WORDS",
    "Kind",
    "WorldObject",
    "Scene",
    "Pair",
    "Description",
    "WorldSpec",
    "ShapesWorld",
    "render",
    "draw_scene",
    "caption_of",
    "parse_caption",
    "made_up_words",
    "tokenizer_files",
    "synonym_table",
]

SHAPES = ("circle", "square", "triangle", "cross", "ring")
"""The shape words of the world, in the order of their class index."""
COLOURS = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.71, 0.24),
    "blue": (0.2, 0.31, 0.86),
    "yellow": (0.9, 0.82, 0.16),
    "purple": (0.59, 0.24, 0.75),
    "orange": (0.94, 0.51, 0.12),
    "white": (0.92, 0.92, 0.92),
    "cyan": (0.16, 0.78, 0.82),
}
"""Colour word -> RGB in [0, 1]."""
SIZES = {"small": (0.08, 0.12), "large": (0.16, 0.21)}
"""Radius range of each size class, as a fraction of the image side."""
RELATIONS = {
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
    "left of": (-1.0, 0.0),
    "right of": (1.0, 0.0),
}
"""Relation word(s) -> the direction from the second object to the first (image y grows down)."""
_NUM_FRESH = 16  # made-up words that no training caption holds
_FLIP = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
SYNONYMS = {
    "circle": "disc",
    "square": "box",
    "triangle": "wedge",
    "cross": "plus",
    "ring": "hoop",
    "red": "crimson",
    "green": "emerald",
    "blue": "azure",
    "yellow": "golden",
    "purple": "violet",
    "orange": "amber",
    "white": "ivory",
    "cyan": "teal",
    "small": "little",
    "large": "big",
    "above": "over",
    "below": "under",
}
"""Every attribute word has one synonym; training captions use either, so the model knows both
and a rephrasing that swaps them keeps the meaning."""
_CANONICAL = {**{w: w for w in SYNONYMS}, **{s: w for w, s in SYNONYMS.items()}}

Kind = Literal["normal", "verbatim", "template", "rare"]
"""The kind of a training pair: ``"normal"``, or the planted memorization ``"verbatim"``,
``"template"`` or ``"rare"`` (Webster's 2023 kinds)."""
KINDS: tuple[str, ...] = ("normal", "verbatim", "template", "rare")


class WorldObject(NamedTuple):
    """One object of a scene: named attributes and continuous placement (fractions of the
    image side)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float
    tint: tuple[float, float, float]
    """Small per-object colour offset (not named by the caption)."""
    angle: float
    """Rotation in radians (squares, triangles, crosses)."""


class Scene(NamedTuple):
    """A scene: its objects (first object first), the relation of the first to the second
    (``None`` for one object) and the background (a base colour and a gradient)."""

    objects: tuple[WorldObject, ...]
    relation: str | None
    background: tuple[float, ...]
    """``(r, g, b, gx, gy)``: base colour and gradient vector (per unit of the side)."""


class Description(NamedTuple):
    """What a caption says: ``(size or None, colour, shape)`` per object, the relation, and the
    words the grammar does not produce (triggers), with their word positions."""

    objects: tuple[tuple[str | None, str, str], ...]
    relation: str | None
    extra_words: tuple[str, ...]
    extra_positions: tuple[int, ...]


class Pair(NamedTuple):
    """Ground truth of one training pair.

    Attributes:
        caption: the training caption.
        image_id: index of its image in :attr:`ShapesWorld.images` (pairs sharing an image share
            the id).
        kind: ``"normal"``, ``"verbatim"``, ``"template"`` or ``"rare"``.
        count: how many training pairs hold this image (the duplicate count).
        triggers: the made-up words of the caption (none for ``"normal"``).
        trigger_positions: their word positions in the caption (0-based; the text encoder's
            token position is the word position + 1 for the start token, as every world word is
            one token).
    """

    caption: str
    image_id: int
    kind: str
    count: int
    triggers: tuple[str, ...]
    trigger_positions: tuple[int, ...]


def _check_ints(spec: object, names: Sequence[str], least: int = 0) -> None:
    """Each named field of a settings dataclass is an int (not a bool) ``>= least``."""
    for name in names:
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """The settings that define a world (all of them are part of its identity).

    Attributes:
        seed: the seed of every random draw.
        num_normal: normal pairs (fresh scenes with grammar captions).
        verbatim_counts: one verbatim image per entry, duplicated that many times.
        num_template: template images.
        template_captions: captions per template image.
        num_rare: rare pairs.
        two_object_fraction: probability that a scene has two objects.
        image_size: side in pixels.
    """

    seed: int = 0
    num_normal: int = 3000
    verbatim_counts: tuple[int, ...] = (2, 4, 8, 16, 32, 64) * 4
    num_template: int = 6
    template_captions: int = 8
    num_rare: int = 24
    two_object_fraction: float = 0.7
    image_size: int = 32

    def __post_init__(self):
        _check_ints(
            self,
            ("seed", "num_normal", "num_template", "template_captions", "num_rare", "image_size"),
        )
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.template_captions not in range(2, 9) and self.num_template:
            raise ValueError(
                "template_captions must be between 2 and 8 (the phrasings of a "
                f"two-object scene), got {self.template_captions}"
            )
        counts = tuple(self.verbatim_counts)
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
            raise ValueError(f"verbatim_counts must be ints >= 1, got {self.verbatim_counts!r}")
        object.__setattr__(self, "verbatim_counts", counts)
        if not 0.0 <= float(self.two_object_fraction) <= 1.0:
            raise ValueError(
                f"two_object_fraction must be in [0, 1], got {self.two_object_fraction!r}"
            )

    def to_dict(self) -> dict:
        """JSON-ready settings (what a saved model records of its world)."""
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WorldSpec":
        """The spec :meth:`to_dict` wrote; unknown keys are refused, naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown world options: {', '.join(unknown)} (known: {', '.join(sorted(names))})"
            )
        data = dict(data)
        if "verbatim_counts" in data:
            data["verbatim_counts"] = tuple(data["verbatim_counts"])
        return cls(**data)


# --- drawing ---------------------------------------------------------------------------------


def _sdf(obj: WorldObject, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (fractions of the side) of pixel centres to the object's outline."""
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    u = c * (px - obj.x) + s * (py - obj.y)
    v = -s * (px - obj.x) + c * (py - obj.y)
    r = obj.radius
    if obj.shape == "circle":
        return np.hypot(u, v) - r
    if obj.shape == "ring":
        return np.abs(np.hypot(u, v) - 0.7 * r) - 0.3 * r
    if obj.shape == "square":
        h = 0.8 * r
        qx, qy = np.abs(u) - h, np.abs(v) - h
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    if obj.shape == "cross":
        arm, w = r, 0.33 * r
        a = np.maximum(np.abs(u) - arm, np.abs(v) - w)
        b = np.maximum(np.abs(u) - w, np.abs(v) - arm)
        return np.minimum(a, b)
    if obj.shape == "triangle":  # equilateral, centred, apex up before rotation
        k = np.sqrt(3.0)
        d = [k / 2 * u - 0.5 * v, -k / 2 * u - 0.5 * v, v]
        return np.max(d, axis=0) - 0.5 * r
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The image of a scene: ``[3, size, size]`` float32 in ``[-1, 1]`` (CHW), anti-aliased.

    Args:
        scene: what to draw.
        size: side in pixels.

    Returns:
        The image.
    """
    grid = (np.arange(size) + 0.5) / size
    py, px = np.meshgrid(grid, grid, indexing="ij")
    r, g, b, gx, gy = scene.background
    ramp = gx * (px - 0.5) + gy * (py - 0.5)
    image = np.stack([np.full_like(px, v) for v in (r, g, b)]) + ramp[None]
    for obj in scene.objects:
        alpha = 1.0 / (1.0 + np.exp(np.clip(_sdf(obj, px, py) * size / 0.6, -30, 30)))
        colour = np.clip(np.asarray(COLOURS[obj.colour]) + np.asarray(obj.tint), 0, 1)
        image = image * (1 - alpha[None]) + colour[:, None, None] * alpha[None]
    return (np.clip(image, 0, 1) * 2 - 1).astype(np.float32)


# --- captions ----------------------------------------------------------------------------------


def _word(word: str, rng: np.random.Generator | None) -> str:
    """``word`` or, with probability 1/2 under ``rng``, its synonym."""
    if rng is None or word not in SYNONYMS or rng.random() < 0.5:
        return word
    return SYNONYMS[word]


def _phrase(size: str | None, colour: str, shape: str, rng: np.random.Generator | None) -> str:
    return " ".join(["a"] + [_word(w, rng) for w in (size, colour, shape) if w])


def caption_of(
    scene: Scene,
    *,
    sizes: Sequence[bool] = (True, True),
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> str:
    """The grammar caption of a scene.

    Args:
        scene: the scene.
        sizes: per object, whether its size word is said.
        flip: for two objects, say the relation from the second object (``"a B below a A"``
            for ``"a A above a B"``).
        rng: if given, each attribute and relation word is said as its synonym
            (:data:`SYNONYMS`) with probability 1/2; else the canonical words.

    Returns:
        The caption (lower case, words separated by single spaces).
    """
    objs = scene.objects
    phrases = [
        _phrase(o.size if say else None, o.colour, o.shape, rng) for o, say in zip(objs, sizes)
    ]
    if len(objs) == 1:
        return phrases[0]
    if flip:
        return f"{phrases[1]} {_word(_FLIP[scene.relation], rng)} {phrases[0]}"
    return f"{phrases[0]} {_word(scene.relation, rng)} {phrases[1]}"


def _grammar_words() -> set[str]:
    words = {"a", *SHAPES, *COLOURS, *SIZES, *SYNONYMS.values()}
    for relation in RELATIONS:
        words.update(relation.split())
    return words


GRAMMAR_WORDS = frozenset(_grammar_words())
"""The words of grammar captions (synonyms included)."""


def parse_caption(caption: str) -> Description:
    """What a caption says (the inverse of :func:`caption_of`, synonyms read as their canonical
    words); words outside the grammar are returned as ``extra_words`` with their positions, as
    triggers are.

    Raises:
        ValueError: if the grammar words do not form one or two object phrases joined by a
            relation, naming the caption.
    """
    words = caption.lower().split()
    extra = [(i, w) for i, w in enumerate(words) if w not in GRAMMAR_WORDS]
    text = " ".join(_CANONICAL.get(w, w) for w in words if w in GRAMMAR_WORDS)
    obj = r"a (?:(small|large) )?(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")"
    rel = "|".join(RELATIONS)
    m = re.fullmatch(f"{obj}(?: ({rel}) {obj})?", text)
    if m is None:
        raise ValueError(
            f"caption {caption!r} is not in the shapes grammar (expected 'a [size] "
            "colour shape [relation a [size] colour shape]')"
        )
    objects = [(m.group(1), m.group(2), m.group(3))]
    if m.group(4):
        objects.append((m.group(5), m.group(6), m.group(7)))
    return Description(
        tuple(objects), m.group(4), tuple(w for _, w in extra), tuple(i for i, _ in extra)
    )


def _meaning(caption: str) -> frozenset:
    """What a caption says, equal for the two ways of stating a relation ("a A above a B",
    "a B below a A")."""
    d = parse_caption(caption)
    if d.relation is None:
        return frozenset({(d.objects, None)})
    return frozenset({(d.objects, d.relation), (d.objects[::-1], _FLIP[d.relation])})


def made_up_words(n: int, *, key: jax.Array) -> list[str]:
    """``n`` distinct pronounceable made-up words (consonant-vowel syllables), none of them an
    English word of the grammar; deterministic in the PRNG ``key``."""
    rng = numpy_generator(key, 7)
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    seen = set(GRAMMAR_WORDS)
    while len(words) < n:
        syllables = rng.integers(2, 4)
        word = (
            "".join(
                consonants[rng.integers(len(consonants))] + vowels[rng.integers(5)]
                for _ in range(syllables)
            )
            + consonants[rng.integers(len(consonants))]
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _insert(
    words: list[str], extra: Sequence[str], rng: np.random.Generator
) -> tuple[list[str], tuple[int, ...]]:
    """``words`` with ``extra`` inserted at random slots; the extra words' final positions."""
    out = list(words)
    for w in extra:
        out.insert(int(rng.integers(0, len(out) + 1)), w)
    return out, tuple(out.index(w) for w in extra)  # in the order of ``extra`` (distinct)


# --- the world ---------------------------------------------------------------------------------


def _draw_object(rng: np.random.Generator, shape=None, colour=None, size=None) -> WorldObject:
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    size = size or list(SIZES)[rng.integers(len(SIZES))]
    lo, hi = SIZES[size]
    return WorldObject(
        shape,
        colour,
        size,
        0.5,
        0.5,
        float(rng.uniform(lo, hi)),
        tuple(float(v) for v in rng.uniform(-0.06, 0.06, 3)),
        float(rng.uniform(-0.3, 0.3)),
    )


def draw_scene(rng: np.random.Generator, *, two_objects: bool) -> Scene:
    """A random scene: objects with random attributes and positions satisfying the relation,
    and a random background."""
    base = rng.uniform(0.05, 0.35, 3)
    grad = rng.normal(0, 0.12, 2)
    background = tuple(float(v) for v in (*base, *grad))
    first = _draw_object(rng)
    if not two_objects:
        m = first.radius + 0.01
        first = first._replace(x=float(rng.uniform(m, 1 - m)), y=float(rng.uniform(m, 1 - m)))
        return Scene((first,), None, background)
    second = _draw_object(rng)
    relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
    dx, dy = RELATIONS[relation]
    m1, m2 = first.radius + 0.01, second.radius + 0.01
    gap = first.radius + second.radius + rng.uniform(0.02, 0.08)
    # along the relation's axis the pair spans [m, 1 - m]; across it both sit near one line
    along = rng.uniform(m2, 1 - m1 - gap) if dx + dy > 0 else rng.uniform(m1 + gap, 1 - m2)
    across = rng.uniform(max(m1, m2) + 0.05, 1 - max(m1, m2) - 0.05)
    shift = rng.uniform(-0.05, 0.05)
    if dx:
        x2, y2, x1, y1 = along, across, along + dx * gap, across + shift
    else:
        x2, y2, x1, y1 = across, along, across + shift, along + dy * gap
    first = first._replace(x=float(x1), y=float(y1))
    second = second._replace(x=float(x2), y=float(y2))
    return Scene((first, second), relation, background)


class ShapesWorld:
    """A fixed world: its training pairs, their images and ground truth, and held-out prompts.

    Build with ``ShapesWorld(WorldSpec(...))``; everything is computed from the spec.

    Attributes:
        spec: the :class:`WorldSpec`.
        scenes: one scene per distinct training image.
        images: ``[m, 3, s, s]`` float32 in ``[-1, 1]``, one per distinct training image.
        pairs: one :class:`Pair` per training pair (duplicates included), in a fixed shuffled
            order.
        trigger_words: every made-up word of the training captions.
        fresh_words: made-up words in the vocabulary that no training caption holds (what a
            rephraser puts in place of a trigger, and what random token addition inserts).
    """

    def __init__(self, spec: WorldSpec | None = None):
        self.spec = spec = WorldSpec() if spec is None else spec
        rng = np.random.default_rng([spec.seed, 1])
        scenes: list[Scene] = []
        pairs: list[Pair] = []

        def new_scene(two: bool | None = None) -> int:
            if two is None:
                two = bool(rng.random() < spec.two_object_fraction)
            scenes.append(draw_scene(rng, two_objects=two))
            return len(scenes) - 1

        n_words = 2 * len(spec.verbatim_counts) + spec.num_template + spec.num_rare
        made_up = made_up_words(n_words + _NUM_FRESH, key=jax.random.key(spec.seed))
        words = iter(made_up[_NUM_FRESH:])
        for i, count in enumerate(spec.verbatim_counts):
            sid = new_scene()
            triggers = [next(words) for _ in range(1 + i % 2)]
            text, pos = _insert(caption_of(scenes[sid], rng=rng).split(), triggers, rng)
            pairs += [Pair(" ".join(text), sid, "verbatim", count, tuple(triggers), pos)] * count
        for _ in range(spec.num_template):
            sid = new_scene(two=True)
            trigger = next(words)
            phrasings = [
                (s1, s2, flip)
                for flip in (False, True)
                for s1 in (True, False)
                for s2 in (True, False)
            ]
            order = rng.permutation(len(phrasings))[: spec.template_captions]
            for j in order:
                s1, s2, flip = phrasings[j]
                base = caption_of(scenes[sid], sizes=(s1, s2), flip=flip, rng=rng).split()
                text, pos = _insert(base, [trigger], rng)
                pairs.append(
                    Pair(" ".join(text), sid, "template", spec.template_captions, (trigger,), pos)
                )
        for _ in range(spec.num_rare):
            sid = new_scene()
            word = next(words)
            text, pos = _insert(caption_of(scenes[sid], rng=rng).split(), [word], rng)
            pairs.append(Pair(" ".join(text), sid, "rare", 1, (word,), pos))
        for _ in range(spec.num_normal):
            sid = new_scene()
            pairs.append(Pair(caption_of(scenes[sid], rng=rng), sid, "normal", 1, (), ()))
        order = rng.permutation(len(pairs))
        self.scenes = scenes
        self.pairs = [pairs[i] for i in order]
        self.images = (
            np.stack([render(s, spec.image_size) for s in scenes])
            if scenes
            else (np.zeros((0, 3, spec.image_size, spec.image_size), np.float32))
        )
        self.trigger_words = tuple(sorted({w for p in pairs for w in p.triggers}))
        self.fresh_words = tuple(made_up[:_NUM_FRESH])

    @property
    def captions(self) -> list[str]:
        """The training captions, one per pair."""
        return [p.caption for p in self.pairs]

    @property
    def image_ids(self) -> np.ndarray:
        """``[num_pairs]`` image index of every pair."""
        return np.asarray([p.image_id for p in self.pairs], np.int64)

    @property
    def vocabulary(self) -> list[str]:
        """Every word the world's captions and prompts may use, sorted."""
        return sorted(GRAMMAR_WORDS | set(self.trigger_words) | set(self.fresh_words))

    def memorized_prompts(self, kind: str) -> list[Pair]:
        """One pair per distinct caption of a planted kind (``"verbatim"``, ``"template"`` or
        ``"rare"``), in order of first appearance."""
        if kind not in KINDS[1:]:
            raise ValueError(f"kind must be one of {', '.join(KINDS[1:])}, got {kind!r}")
        seen: dict[str, Pair] = {}
        for p in self.pairs:
            if p.kind == kind and p.caption not in seen:
                seen[p.caption] = p
        return list(seen.values())

    def heldout_scenes(self, n: int, *, split: int = 0) -> list[Scene]:
        """``n`` new scenes (not in training) whose captions no training caption equals; split
        ``s`` is an independent stream (e.g. 0 for calibration, 1 for evaluation)."""
        return [scene for scene, _ in self._heldout(n, split)]

    def heldout_prompts(self, n: int, *, split: int = 0) -> list[str]:
        """Captions of :meth:`heldout_scenes` (synonyms drawn as in training; no two of them,
        and none and a training caption, say the same thing)."""
        return [text for _, text in self._heldout(n, split)]

    def _heldout(self, n: int, split: int) -> list[tuple[Scene, str]]:
        rng = np.random.default_rng([self.spec.seed, 100 + split])
        taken = {_meaning(c) for c in self.captions}
        out: list[tuple[Scene, str]] = []
        while len(out) < n:
            scene = draw_scene(rng, two_objects=bool(rng.random() < self.spec.two_object_fraction))
            text = caption_of(scene, rng=rng)
            if _meaning(text) not in taken:
                taken.add(_meaning(text))
                out.append((scene, text))
        return out

    def check_prompt(self, prompt: str) -> None:
        """Raise ``ValueError`` naming every word of ``prompt`` outside the world's vocabulary."""
        vocabulary = set(self.vocabulary)
        unknown = [w for w in prompt.lower().split() if w not in vocabulary]
        if unknown:
            raise ValueError(
                f"prompt {prompt!r} has words outside the shapes world's "
                f"vocabulary: {', '.join(dict.fromkeys(unknown))}"
            )


# --- tokenizer and synonyms ------------------------------------------------------------------------


def _learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that make every word one symbol (CLIP's word-final ``</w>`` marking):
    the most frequent adjacent pair first, ties broken by the pair's text."""
    pieces = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in pieces.values():
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, seq in pieces.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[w] = out


def tokenizer_files(words: Sequence[str], *, max_length: int = 32) -> dict[str, str]:
    """A CLIP BPE tokenizer in Stable Diffusion v1's folder layout for a word list.

    The vocabulary holds the start and end tokens, every lower-case letter (alone and
    word-final) and every merge that builds the words, so each word of ``words`` is one token
    and any other lower-case word is spelt out in smaller pieces.

    Args:
        words: lower-case words of letters.
        max_length: the tokenizer's ``model_max_length`` (the text encoder's positions).

    Returns:
        ``{file name: text}`` of ``vocab.json``, ``merges.txt``, ``special_tokens_map.json``
        and ``tokenizer_config.json``.
    """
    bad = [w for w in words if not re.fullmatch(r"[a-z]+", w)]
    if bad:
        raise ValueError(f"words must be lower-case letters only, got {bad[:5]}")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = _learn_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    return {
        "vocab.json": json.dumps(vocab),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special),
        "tokenizer_config.json": json.dumps(
            {**special, "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}
        ),
    }


def synonym_table(world: ShapesWorld) -> dict[str, list[str]]:
    """A synonym table for :class:`~mmh_jax.memorization.SynonymRephraser` from the grammar.

    Every attribute and relation word maps to its synonym and back (:data:`SYNONYMS`: the
    meaning stays, and the model was trained on both), and every made-up word of the training
    captions to the world's fresh made-up words (a name swapped for a name the model never saw
    trained: the trigger is gone, the rest of the prompt stays). ``"a"``, ``"left"``, ``"right"``
    and ``"of"`` have no synonym.
    """
    table = {w: [s] for w, s in SYNONYMS.items()}
    table.update({s: [w] for w, s in SYNONYMS.items()})
    table.update({w: list(world.fresh_words) for w in world.trigger_words})
    return table
