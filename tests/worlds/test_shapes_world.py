"""Tests of the shapes world (mmh_jax.worlds.shapes) and of its judges (mmh_jax.worlds.judge)
against the ground truth the world records: its scenes, pairs and planted duplicates."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import jax
import numpy as np
import pytest
from transformers import CLIPTokenizer

from mmh_jax.worlds import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SYNONYMS,
    ShapesWorld,
    WorldSpec,
    attribute_probabilities,
    caption_of,
    draw_scene,
    fidelity,
    fit_copy_judge,
    judge_copies,
    made_up_words,
    parse_caption,
    render,
    tokenizer_files,
    train_attribute_classifier,
)

#: each relation's converse, from the geometry: the direction reversed
FLIP = {
    r: next(q for q, v in RELATIONS.items() if v == (-d[0], -d[1])) for r, d in RELATIONS.items()
}


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(WorldSpec(seed=3, num_normal=50))


def _renders(scenes):
    return np.stack([render(s) for s in scenes])


def _meaning(caption):
    """What a caption says, the same for ``A above B`` and ``B below A``."""
    d = parse_caption(caption)
    if d.relation is None:
        return frozenset({(d.objects, None)})
    return frozenset({(d.objects, d.relation), (d.objects[::-1], FLIP[d.relation])})


# --- the world -----------------------------------------------------------------------------------


def test_a_spec_seed_keeps_the_words_and_captions_it_always_gave(world):
    """Recorded before the worlds took PRNG keys: the committed world model was trained on
    these, so a spec's integer seed must keep giving them."""
    assert made_up_words(6, key=jax.random.key(3)) == [
        "rupenok",
        "zoges",
        "tiseboz",
        "rapat",
        "tamukud",
        "seradub",
    ]
    assert world.captions[:3] == [
        "tukokit sibif a little white box",
        "a little green box above ropid a nobekug little purple hoop",
        "a dapomos large violet hoop right selupis of a small crimson box",
    ]


def test_the_world_is_a_function_of_its_spec(world):
    again = ShapesWorld(WorldSpec(seed=3, num_normal=50))
    np.testing.assert_array_equal(again.images, world.images)
    assert again.pairs == world.pairs
    other = ShapesWorld(WorldSpec(seed=4, num_normal=50))
    assert other.images.shape == world.images.shape
    assert not np.array_equal(other.images, world.images)
    assert other.captions != world.captions


def test_images_are_distinct_renders_of_the_scenes(world):
    assert world.images.shape == (len(world.scenes), 3, 32, 32)
    assert world.images.dtype == np.float32
    assert world.images.min() >= -1 and world.images.max() <= 1
    np.testing.assert_array_equal(world.images[:5], _renders(world.scenes[:5]))
    flat = world.images.reshape(len(world.images), -1)
    assert len(np.unique(flat, axis=0)) == len(flat)
    assert sorted({p.image_id for p in world.pairs}) == list(range(len(world.scenes)))


def test_every_caption_says_its_scene(world):
    synonyms_seen = set()
    for pair in world.pairs:
        scene = world.scenes[pair.image_id]
        said = parse_caption(pair.caption)
        truth = [(o.size, o.colour, o.shape) for o in scene.objects]
        objects, relation = list(said.objects), said.relation
        if (
            scene.relation is not None
            and relation == FLIP[scene.relation]
            and (objects[0][1:] == truth[1][1:])
        ):
            assert pair.kind == "template", pair  # only template captions turn the scene around
            objects, relation = objects[::-1], scene.relation
        assert relation == scene.relation, pair
        assert [o[1:] for o in objects] == [t[1:] for t in truth], pair
        for (size, _, _), (true_size, _, _) in zip(objects, truth):
            assert size == true_size or (size is None and pair.kind == "template"), pair
        assert sorted(said.extra_words) == sorted(pair.triggers), pair
        assert said.extra_positions == tuple(sorted(pair.trigger_positions)), pair
        synonyms_seen.update(w for w in pair.caption.split() if w in SYNONYMS.values())
    assert len(synonyms_seen) > len(SYNONYMS) // 2  # captions do use synonyms


def test_scenes_satisfy_their_relations(world):
    for scene in world.scenes:
        if scene.relation is None:
            assert len(scene.objects) == 1
            continue
        first, second = scene.objects
        dx, dy = RELATIONS[scene.relation]
        along = (first.x - second.x) * dx + (first.y - second.y) * dy
        assert along > first.radius + second.radius, scene


def test_trigger_positions_point_at_the_triggers(world):
    for pair in world.pairs:
        words = pair.caption.split()
        assert tuple(words[i] for i in pair.trigger_positions) == pair.triggers, pair


def test_planted_duplicates_are_where_the_record_says(world):
    spec = world.spec
    captions = Counter(world.captions)
    words = Counter(w for c in world.captions for w in c.split())
    pairs_of = defaultdict(list)
    for pair in world.pairs:
        pairs_of[pair.image_id].append(pair)
    for pair in world.pairs:
        assert pair.count == len(pairs_of[pair.image_id]), pair
        assert (pair.kind == "normal") == (pair.triggers == ()), pair

    verbatim = world.memorized_prompts("verbatim")
    assert sorted(p.count for p in verbatim) == sorted(spec.verbatim_counts)
    for pair in verbatim:
        assert captions[pair.caption] == pair.count
        # every pair of this image has this caption, and every pair of this caption this image
        assert {q.caption for q in pairs_of[pair.image_id]} == {pair.caption}
        assert {q.image_id for q in world.pairs if q.caption == pair.caption} == {pair.image_id}
        assert all(words[w] == pair.count for w in pair.triggers)

    template = world.memorized_prompts("template")
    images = {p.image_id for p in template}
    assert len(images) == spec.num_template
    for image_id in images:
        pairs = pairs_of[image_id]
        assert {q.kind for q in pairs} == {"template"}
        assert len({q.caption for q in pairs}) == len(pairs) == spec.template_captions
        assert len({q.triggers for q in pairs}) == 1 and len(pairs[0].triggers) == 1
        assert words[pairs[0].triggers[0]] == spec.template_captions

    rare = world.memorized_prompts("rare")
    assert len(rare) == spec.num_rare
    for pair in rare:
        assert pairs_of[pair.image_id] == [pair]
        assert len(pair.triggers) == 1 and words[pair.triggers[0]] == 1

    normal = [p for p in world.pairs if p.kind == "normal"]
    assert len(normal) == spec.num_normal
    assert all(pairs_of[p.image_id] == [p] for p in normal)
    assert not set(world.fresh_words) & set(words)


def _said(caption):
    """What a caption says, word order of the objects kept."""
    d = parse_caption(caption)
    return d.objects, d.relation


def test_heldout_prompts_are_new_captions_of_new_scenes(world):
    taken = {_said(c) for c in world.captions}
    for split in (0, 1):
        prompts = world.heldout_prompts(200, split=split)
        scenes = world.heldout_scenes(200, split=split)
        said = [_said(p) for p in prompts]
        assert not taken & set(said)
        assert len(set(said)) == len(said)
        for prompt, scene in zip(prompts, scenes):
            assert _said(prompt) == (
                (tuple((o.size, o.colour, o.shape) for o in scene.objects)),
                scene.relation,
            )
    assert world.heldout_prompts(20, split=0) != world.heldout_prompts(20, split=1)


def test_heldout_prompts_never_restate_a_training_caption(world):
    taken = {_meaning(c) for c in world.captions}
    for split in (0, 1):
        assert not taken & {_meaning(p) for p in world.heldout_prompts(200, split=split)}


def test_the_tokenizer_has_one_token_per_world_word(world, tmp_path):
    for name, text in tokenizer_files(world.vocabulary).items():
        (tmp_path / name).write_text(text)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ids = {}
    for word in world.vocabulary:
        tokens = tokenizer(word, add_special_tokens=False).input_ids
        assert len(tokens) == 1 and tokens[0] != tokenizer.unk_token_id, word
        ids[word] = tokens[0]
    assert len(set(ids.values())) == len(ids)
    assert len(tokenizer("blorptastic", add_special_tokens=False).input_ids) > 1
    pair = next(p for p in world.pairs if p.triggers)
    tokens = tokenizer(pair.caption).input_ids
    assert tokens[1:-1] == [ids[w] for w in pair.caption.split()]
    world.check_prompt(pair.caption)
    with pytest.raises(ValueError, match="blorptastic"):
        world.check_prompt("a red blorptastic circle")


def test_spec_round_trips_and_refuses_unknown_keys():
    spec = WorldSpec(seed=3, num_normal=50)
    assert WorldSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="colour_count, num_shapes"):
        WorldSpec.from_dict({**spec.to_dict(), "num_shapes": 3, "colour_count": 2})


@pytest.mark.parametrize(
    "bad",
    [
        {"num_normal": -1},
        {"seed": 1.5},
        {"num_rare": True},
        {"image_size": 4},
        {"template_captions": 9},
        {"verbatim_counts": (2, 0)},
        {"two_object_fraction": 1.5},
    ],
)
def test_bad_spec_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        WorldSpec(**bad)


# --- the copy judge ------------------------------------------------------------------------------

QUANTILE = 0.1


@pytest.fixture(scope="module")
def copy_judge(world):
    return fit_copy_judge(
        world.images, _renders(world.heldout_scenes(200, split=0)), quantile=QUANTILE
    )


def test_training_images_are_copies(world, copy_judge):
    noise = 0.02 * np.random.default_rng(0).standard_normal(world.images.shape)
    for images in (world.images, world.images + noise.astype(np.float32)):
        verdict = judge_copies(copy_judge, images)
        assert verdict.is_copy.all()
        np.testing.assert_array_equal(verdict.nearest, np.arange(len(world.images)))
        assert (verdict.score <= copy_judge.threshold).all()
    assert (judge_copies(copy_judge, world.images).score == 0).all()


def test_new_images_are_copies_at_about_the_quantile(world, copy_judge):
    fresh = _renders(world.heldout_scenes(300, split=1))
    rate = judge_copies(copy_judge, fresh).is_copy.mean()
    # the calibration quantile and the rate are both binomial estimates
    sd = math.sqrt(QUANTILE * (1 - QUANTILE) * (1 / 200 + 1 / 300))
    assert abs(rate - QUANTILE) < 3 * sd, rate


@pytest.mark.slow
def test_copy_judge_refuses_bad_arguments(world):
    held = _renders(world.heldout_scenes(120, split=0))
    with pytest.raises(ValueError, match="quantile"):
        fit_copy_judge(world.images, held, quantile=1.0)
    with pytest.raises(ValueError, match="n=500"):
        fit_copy_judge(world.images, held, n=500)
    with pytest.raises(ValueError, match="heldout holds 120"):
        fit_copy_judge(world.images, held, quantile=0.005)
    with pytest.raises(ValueError, match=r"heldout\[3\] equals references\[7\]"):
        fit_copy_judge(world.images, np.concatenate([held[:3], world.images[7:8], held[3:]]))
    with pytest.raises(ValueError, match="heldout"):
        fit_copy_judge(world.images, held[:, :, :16])
    judge = fit_copy_judge(world.images, held)
    with pytest.raises(ValueError, match="images"):
        judge_copies(judge, held[:, :2])
    with pytest.raises(ValueError, match="images"):
        judge_copies(judge, np.full_like(held[:2], np.nan))


# --- prompt fidelity -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    return train_attribute_classifier(key=jax.random.key(0), num_images=2000, steps=700)


@pytest.fixture(scope="module")
def fresh():
    """Scenes no world and not the classifier's training holds, with their renders."""
    rng = np.random.default_rng(2024)
    scenes = [draw_scene(rng, two_objects=bool(rng.random() < 0.7)) for _ in range(150)]
    return scenes, _renders(scenes)


def _other_objects(scene):
    """The scene with each object's colour and shape changed to a combination it lacks."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    held = {(o.colour, o.shape) for o in scene.objects}
    objects = []
    for i, obj in enumerate(scene.objects):
        start = combos.index((obj.colour, obj.shape)) + 11 * (i + 1)
        colour, shape = next(
            combos[(start + j) % len(combos)]
            for j in range(len(combos))
            if combos[(start + j) % len(combos)] not in held
        )
        objects.append(obj._replace(colour=colour, shape=shape))
    return scene._replace(objects=tuple(objects))


@pytest.mark.slow
def test_fidelity_is_high_for_true_captions_and_low_for_false_ones(classifier, fresh):
    scenes, images = fresh
    rng = np.random.default_rng(0)
    true = fidelity(classifier, images, [caption_of(s, rng=rng) for s in scenes])
    assert true.shape == (len(scenes),) and true.min() >= 0 and true.max() <= 1
    assert true.mean() >= 0.9, true.mean()
    false = fidelity(classifier, images, [caption_of(_other_objects(s)) for s in scenes])
    assert false.mean() <= 0.1, false.mean()
    with_triggers = [f"zorvak {caption_of(s)} blimp" for s in scenes]
    np.testing.assert_array_equal(
        fidelity(classifier, images, with_triggers),
        fidelity(classifier, images, [caption_of(s) for s in scenes]),
    )


@pytest.mark.slow
def test_the_classifier_is_deterministic_and_checks_its_inputs(classifier, fresh):
    _, images = fresh
    a = train_attribute_classifier(key=jax.random.key(1), num_images=20, steps=3)
    b = train_attribute_classifier(key=jax.random.key(1), num_images=20, steps=3)
    np.testing.assert_array_equal(
        attribute_probabilities(a, images[:4]), attribute_probabilities(b, images[:4])
    )
    probs = attribute_probabilities(classifier, images[:4])
    assert probs.shape == (4, len(COLOURS), len(SHAPES))
    with pytest.raises(ValueError, match="captions"):
        fidelity(classifier, images[:3], ["a red circle"] * 2)
    with pytest.raises(ValueError, match="a red blob"):
        fidelity(classifier, images[:1], ["a red blob"])
    with pytest.raises(ValueError, match="images"):
        attribute_probabilities(classifier, images[:, :, :16])
    with pytest.raises(ValueError, match="learning_rate"):
        train_attribute_classifier(key=jax.random.key(0), learning_rate=0.0)
    with pytest.raises(TypeError, match="steps"):
        train_attribute_classifier(key=jax.random.key(0), steps=2.5)


@pytest.mark.slow
def test_the_classifier_trains_on_the_preprocessed_renders(fresh):
    """``preprocess`` is the domain the windows are cut from: the identity changes nothing, an
    inversion of the colours another classifier; a wrong shape is refused."""
    _, images = fresh
    base = train_attribute_classifier(key=jax.random.key(1), num_images=20, steps=3)
    same = train_attribute_classifier(
        key=jax.random.key(1), num_images=20, steps=3, preprocess=lambda x: x.copy()
    )
    other = train_attribute_classifier(
        key=jax.random.key(1), num_images=20, steps=3, preprocess=lambda x: -x
    )
    np.testing.assert_array_equal(
        attribute_probabilities(base, images[:4]), attribute_probabilities(same, images[:4])
    )
    assert not np.allclose(
        attribute_probabilities(base, images[:4]), attribute_probabilities(other, images[:4])
    )
    with pytest.raises(ValueError, match="preprocess"):
        train_attribute_classifier(
            key=jax.random.key(1), num_images=20, steps=3, preprocess=lambda x: x[:, :, :16]
        )
