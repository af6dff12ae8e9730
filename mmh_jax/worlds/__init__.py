"""Worlds made in code where the truth about memorization is known: the captioned shapes world
(:mod:`mmh_jax.worlds.shapes`) and the small Stable-Diffusion-shaped model trained on it
(:mod:`mmh_jax.worlds.model`)."""

from mmh_jax.worlds.judge import (
    AttributeClassifier,
    CopyJudge,
    CopyVerdict,
    attribute_probabilities,
    fidelity,
    fit_copy_judge,
    judge_copies,
    train_attribute_classifier,
)
from mmh_jax.worlds.model import TrainSpec, WorldModelFolder, train_world_model, world_modules
from mmh_jax.worlds.shapes import (
    COLOURS,
    GRAMMAR_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
    Description,
    Pair,
    Scene,
    ShapesWorld,
    WorldObject,
    WorldSpec,
    caption_of,
    draw_scene,
    made_up_words,
    parse_caption,
    render,
    synonym_table,
    tokenizer_files,
)

__all__ = [
    "WorldSpec", "ShapesWorld", "Pair", "Scene", "WorldObject", "Description", "SHAPES",
    "COLOURS", "SIZES", "RELATIONS", "SYNONYMS", "GRAMMAR_WORDS", "render", "draw_scene",
    "caption_of", "parse_caption", "made_up_words", "tokenizer_files", "synonym_table",
    "TrainSpec", "WorldModelFolder", "train_world_model", "world_modules",
    "CopyJudge", "CopyVerdict", "fit_copy_judge", "judge_copies", "AttributeClassifier",
    "train_attribute_classifier", "attribute_probabilities", "fidelity",
]
