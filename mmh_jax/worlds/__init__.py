"""Worlds made in code where the truth about memorization is known: the captioned shapes world
(:mod:`mmh_jax.worlds.shapes`) and the small Stable-Diffusion-shaped model trained on it
(:mod:`mmh_jax.worlds.model`)."""

import mmh_jax.worlds.judge as _judge
import mmh_jax.worlds.model as _model
import mmh_jax.worlds.shapes as _shapes
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
from mmh_jax.worlds.model import (
    SCHEDULER_CONFIG,
    TrainSpec,
    WorldModelFolder,
    train_world_model,
    world_modules,
)
from mmh_jax.worlds.shapes import (
    COLOURS,
    GRAMMAR_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
    Description,
    Kind,
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

# Each module's public names, listed once, in its own __all__.
__all__ = [*_shapes.__all__, *_model.__all__, *_judge.__all__]
