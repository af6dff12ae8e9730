"""The scoring engine on 8 simulated CPU devices: values against closed forms and the plain
estimators, independence of devices and batch size, bad items, resumption, Stable Diffusion."""

from __future__ import annotations

import json

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
import toy_model
from PIL import Image

from mmh_jax.scoring import (
    ArrayFile,
    CFGNorms,
    Flipd,
    ImageFolder,
    Model,
    NearestNeighbour,
    NormalBundle,
    PngSize,
    RunMismatch,
    data_mesh,
    merge,
    score,
    vectors,
)


def _table(out) -> dict[str, np.ndarray]:
    merged = merge(out)
    return {name: merged.scores[name].to_numpy() for name in merged.scores.column_names}


@pytest.mark.slow
def test_values_match_the_closed_form_on_any_mesh_and_batch(tmp_path):
    x = toy_model.points(30)
    np.save(tmp_path / "x.npy", x)
    model = toy_model.make()
    reference = x[::3] + 0.01
    columns = [
        Flipd(t0=(0.01, 0.1)),
        NormalBundle(t0=0.01, num_scores=24),
        NearestNeighbour(reference=reference, chunk_size=4),
    ]
    runs = {
        "1 device, batch 4": dict(mesh=data_mesh(jax.devices()[:1]), batch_size=4, chunk_size=8),
        "8 devices, batch 8": dict(batch_size=8, chunk_size=8),
        "8 devices, batch 24": dict(batch_size=24, chunk_size=7),
    }
    tables = {}
    for name, settings in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        summary = score(model, columns, ArrayFile(tmp_path / "x.npy"), str(out), seed=3, **settings)
        assert summary.scored == 30 and summary.errors == 0
        tables[name] = _table(out)

    first = tables["1 device, batch 4"]
    np.testing.assert_array_equal(first["index"], np.arange(30))
    for t0 in (0.01, 0.1):  # one Rademacher probe is exact for a diagonal Jacobian
        np.testing.assert_allclose(
            first[f"flipd_{t0:g}"], toy_model.flipd_closed_form(x, t0), rtol=1e-4, atol=1e-4
        )
    np.testing.assert_array_equal(first["normal_bundle_0.01"], 2)  # the subspace's dimension
    distances = np.linalg.norm(x[:, None] - reference[None], axis=-1)
    np.testing.assert_array_equal(first["nn_index"], distances.argmin(1))
    np.testing.assert_allclose(first["nn_l2"], distances.min(1), rtol=1e-5, atol=1e-6)
    for name, table in tables.items():
        assert list(table) == [
            "index",
            "id",
            "flipd_0.01",
            "flipd_0.1",
            "normal_bundle_0.01",
            "nn_l2",
            "nn_index",
        ], name
        for column in table:
            np.testing.assert_allclose(
                table[column].astype(float) if column != "id" else 0,
                first[column].astype(float) if column != "id" else 0,
                rtol=1e-5,
                err_msg=f"{name}: {column}",
            )


@pytest.mark.slow
def test_item_keys_follow_the_documented_rule(tmp_path):
    """Item i's key is fold_in(fold_in(key(seed), i >> 32), i & 0xffffffff), then the column's
    name: the engine equals the plain estimator called with those keys."""
    from mmh_jax.lid import normal_bundle
    from mmh_jax.scoring.columns import column_keys

    x = toy_model.points(10, shape=(4,), rank=1, seed=1)
    np.save(tmp_path / "x.npy", x)
    model = toy_model.make(shape=(4,), rank=1)
    column = NormalBundle(t0=0.3, num_scores=8, threshold=0.5)
    score(
        model, [column], ArrayFile(tmp_path / "x.npy"), str(tmp_path / "out"), seed=7, batch_size=8
    )
    base = jax.random.key(7)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, 0), i))(np.arange(10))
    expected = normal_bundle(
        model.score_fn,
        x,
        t0=0.3,
        schedule=model.schedule,
        num_scores=8,
        threshold=0.5,
        key=column_keys(keys, column),
    ).lid
    got = _table(tmp_path / "out")["normal_bundle_0.3"]
    np.testing.assert_array_equal(got, expected)
    assert len(set(got.tolist())) > 1  # a threshold inside the spectrum: keys matter


def _png(path, pixels):
    Image.fromarray(pixels).save(path)


def test_bad_items_go_to_the_errors_table_and_the_run_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    good = {f"ok{i}": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for i in range(5)}
    for name, pixels in good.items():
        _png(folder / f"{name}.png", pixels)
    _png(folder / "big.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = toy_model.make(shape=(3, 4, 4), rank=5, images=True)
    summary = score(
        model,
        [Flipd(t0=0.5), PngSize()],
        ImageFolder(folder),
        str(tmp_path / "out"),
        batch_size=8,
        chunk_size=3,
    )
    assert (summary.scored, summary.errors) == (5, 2)
    merged = merge(tmp_path / "out")
    errors = dict(zip(merged.errors["id"].to_pylist(), merged.errors["reason"].to_pylist()))
    assert set(errors) == {"big", "broken"}
    assert "8x8" in errors["big"] and "4x4" in errors["big"]
    assert "broken" in errors["broken"]
    table = merged.scores.to_pandas().set_index("id")
    assert sorted(table.index) == sorted(good)
    for name, pixels in good.items():
        import cv2  # the paper's encoder, level 9, on the BGR image

        ok, encoded = cv2.imencode(
            ".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9]
        )
        assert ok and table.loc[name, "png_bytes"] == encoded.size
        x = pixels.transpose(2, 0, 1)[None].astype(np.float64) / 127.5 - 1
        expected = toy_model.flipd_closed_form(x, 0.5, shape=(3, 4, 4), rank=5)[0]
        assert table.loc[name, "flipd_0.5"] == pytest.approx(expected, rel=1e-4)


def test_a_rerun_redoes_only_missing_chunks_and_refuses_other_settings(tmp_path):
    x = toy_model.points(20)
    np.save(tmp_path / "x.npy", x)
    model, source, out = toy_model.make(), ArrayFile(tmp_path / "x.npy"), tmp_path / "out"
    columns = [Flipd(t0=0.05)]
    first = score(model, columns, source, str(out), batch_size=8, chunk_size=5)
    assert first.chunks_written == 4
    before = _table(out)
    (out / "manifest" / "chunk-00000002.json").unlink()  # as if killed before the manifest
    (out / "parts" / "part-00000003.parquet").write_bytes(b"torn")  # and a torn part, no manifest
    (out / "manifest" / "chunk-00000003.json").unlink()
    (out / "parts" / ".part-00000003.parquet.abc.part").write_bytes(b"stale")
    again = score(model, columns, source, str(out), batch_size=8, chunk_size=5)
    assert (again.plan.chunks_done, again.chunks_written, again.scored) == (2, 2, 10)
    assert not list((out / "parts").glob(".*"))
    after = _table(out)
    np.testing.assert_array_equal(after["index"], np.arange(20))
    np.testing.assert_array_equal(after["flipd_0.05"], before["flipd_0.05"])
    manifest = json.loads((out / "manifest" / "chunk-00000001.json").read_text())
    assert manifest["ids"] == [f"{i:02d}" for i in range(5, 10)] and manifest["rows"] == 5
    assert pq.read_table(out / "parts").num_rows == 20  # the folder reads as one dataset
    # a merge killed before its renames left its temporaries: the next merge sweeps them
    from mmh_jax.scoring.config import write_merged

    for name in ("scores", "errors"):
        (out / f".{name}.parquet.k1ll3d.part").write_bytes(b"torn")
    scores, errors = write_merged(out)
    assert pq.read_table(scores).num_rows == 20 and pq.read_table(errors).num_rows == 0
    assert not list(out.glob(".*.part"))
    with pytest.raises(RunMismatch, match="seed"):
        score(model, columns, source, str(out), batch_size=8, chunk_size=5, seed=1)
    with pytest.raises(RunMismatch, match="chunk_size"):
        score(model, columns, source, str(out), batch_size=8, chunk_size=4)


def test_item_metadata_is_written_once_beside_the_scores_and_survives_a_resume(tmp_path):
    x = toy_model.points(12)
    x[4] = np.nan  # a bad item: in the errors table, its metadata in no row
    memorized, duplicates = np.arange(12) % 3 == 0, np.arange(12) * 10
    np.savez(tmp_path / "x.npz", x=x, memorized=memorized, duplicates=duplicates)
    source = ArrayFile(tmp_path / "x.npz", metadata=["memorized", "duplicates"])
    model, out, columns = toy_model.make(), tmp_path / "out", [Flipd(t0=0.05)]
    score(model, columns, source, str(out), batch_size=8, chunk_size=5)
    (out / "manifest" / "chunk-00000000.json").unlink()  # as if killed before its manifest
    again = score(model, columns, source, str(out), batch_size=8, chunk_size=5)
    assert (again.chunks_written, again.scored, again.errors) == (1, 4, 1)

    table = merge(out).scores.to_pandas()
    good = [i for i in range(12) if i != 4]
    assert list(table.columns) == ["index", "id", "memorized", "duplicates", "flipd_0.05"]
    np.testing.assert_array_equal(table["index"], good)
    np.testing.assert_array_equal(table["memorized"], memorized[good])
    np.testing.assert_array_equal(table["duplicates"], duplicates[good])
    np.testing.assert_allclose(
        table["flipd_0.05"], toy_model.flipd_closed_form(x[good], 0.05), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(RunMismatch, match="metadata"):
        score(
            model,
            columns,
            ArrayFile(tmp_path / "x.npz", metadata=["memorized"]),
            str(out),
            batch_size=8,
            chunk_size=5,
        )
    for clash in ("id", "flipd_0.05", "image_index"):
        np.savez(tmp_path / "clash.npz", x=x[:4], **{clash: np.arange(4)})
        with pytest.raises(ValueError, match=f"metadata \\['{clash}'\\] would collide"):
            score(
                model,
                columns,
                ArrayFile(tmp_path / "clash.npz", metadata=[clash]),
                str(tmp_path / "clash"),
                batch_size=8,
            )
    assert not (tmp_path / "clash").exists()


def test_a_config_writes_the_metadata_it_names(tmp_path):
    from mmh_jax.scoring.config import read_config, run

    x = toy_model.points(6)
    np.savez(tmp_path / "x.npz", x=x, label=np.array(list("abcdef")))
    (tmp_path / "run.toml").write_text(
        "[model]\nkind = 'factory'\nfactory = 'toy_model:make'\n"
        "[input]\npath = 'x.npz'\nmetadata = ['label']\n[output]\ndir = 'out'\n"
        "[run]\nbatch_size = 8\n[columns.flipd]\n"
    )
    run(read_config(tmp_path / "run.toml"))
    table = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert table.column_names == ["index", "id", "label", "flipd_0.05"]
    assert table["label"].to_pylist() == list("abcdef")


@pytest.mark.parametrize(
    "index, image",
    [
        ([0, 0, 1, 1], [0, 0, 0, 1]),
        ([0, 0, 1], [0, 1, 0]),
        ([0, 0, 1, 1], [0, 2, 0, 1]),
        ([0, 1, 1], [0, 0, 0]),
    ],
)
def test_a_part_must_hold_each_image_of_each_item_once(tmp_path, index, image):
    from mmh_jax.scoring import store

    store.open_run(tmp_path, {"run": "test"})
    ids = ["a" if i == 0 else "b" for i in index]
    rows = store.rows_table(np.array(index), ids, {"image_index": np.array(image, np.int32)})
    with pytest.raises(ValueError, match="rows of 2 items"):
        store.write_chunk(
            tmp_path,
            0,
            start=0,
            stop=2,
            rows=rows,
            ids=["a", "b"],
            process=0,
            errors=store.errors_table([], [], []),
        )
    good = store.rows_table(
        np.array([0, 0, 1, 1]),
        ["a", "a", "b", "b"],
        {"image_index": np.array([1, 0, 0, 1], np.int32)},
    )
    store.write_chunk(
        tmp_path,
        0,
        start=0,
        stop=2,
        rows=good,
        ids=["a", "b"],
        process=0,
        errors=store.errors_table([], [], []),
    )


def test_settings_are_checked_before_any_work(tmp_path):
    x = toy_model.points(4)
    np.save(tmp_path / "x.npy", x)
    model, source = toy_model.make(), ArrayFile(tmp_path / "x.npy")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        score(model, [Flipd()], source, str(out), batch_size=12)
    with pytest.raises(ValueError, match="text-conditional"):
        score(model, [CFGNorms()], source, str(out))
    with pytest.raises(ValueError, match="unique"):
        score(model, [Flipd(), Flipd()], source, str(out))
    with pytest.raises(ValueError, match="generator"):
        from mmh_jax.scoring import JacobianRank

        score(model, [JacobianRank()], source, str(out))
    with pytest.raises(ValueError, match="t0"):
        Flipd(t0=1.5)
    assert not out.exists()


@pytest.mark.slow
def test_stable_diffusion_columns_equal_the_direct_metrics(sd, tmp_path):
    """Image-caption pairs through Model.from_stable_diffusion (images encoded by the VAE and
    captions by the text encoder, on the devices): the engine's CFG norms equal image_cfg_norms
    on the encoded latents. (Conditional FLIPD is the CFG score of mmh_jax.guidance through
    flipd, both tested on their own; a second jvp program through the UNet costs a minute.)"""
    from mmh_jax.memorization import image_cfg_norms

    rng = np.random.default_rng(0)
    folder = tmp_path / "pairs"
    folder.mkdir()
    captions = ["a cat", "the cat", "cat"]
    images = []
    for i, caption in enumerate(captions):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        _png(folder / f"{i}.png", pixels)
        (folder / f"{i}.txt").write_text(caption)
        images.append(pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
    model = Model.from_stable_diffusion(sd)
    columns = [CFGNorms(guidance=7.5, t0=0.02, num_steps=2)]
    score(
        model,
        columns,
        ImageFolder(folder),
        str(tmp_path / "out"),
        batch_size=8,
        mesh=data_mesh(jax.devices()[:2]),
        seed=5,
    )
    table = _table(tmp_path / "out")

    z = sd.encode_image(np.stack(images))
    cond = sd.encode_prompt(captions)
    norms = image_cfg_norms(
        sd.eps,
        z,
        cond,
        sd.uncond_embedding,
        schedule=sd.schedule,
        guidance=7.5,
        t0=0.02,
        num_steps=2,
    )
    np.testing.assert_allclose(table["cfg_vector_norm"], norms.cfg_vector, rtol=1e-4)
    np.testing.assert_allclose(table["cfg_score_norm"], norms.cfg_score, rtol=1e-4)


@pytest.mark.slow
def test_prompts_alone_are_generated_then_scored(sd, tmp_path):
    """A prompt file with Stable Diffusion, two images per prompt: image j of each prompt is the
    image j that StableDiffusion.sample draws for it with the same seed (one noise rule for
    every sampler); the CFG norms are read off that trajectory and equal generation_cfg_norms
    of it. One row per (prompt, image), with the prompt's metadata, exactly once after a
    resume."""
    from mmh_jax.memorization import generation_cfg_norms
    from mmh_jax.scoring import Generation, PromptFile

    prompts = ["a cat", "the cat, the cat", "cat!"]
    lines = [{"caption": p, "memorized": i == 1} for i, p in enumerate(prompts)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    source = PromptFile(tmp_path / "prompts.jsonl", metadata=["memorized"])
    model, out = Model.from_stable_diffusion(sd), tmp_path / "out"
    settings = dict(
        batch_size=8,
        chunk_size=2,
        mesh=data_mesh(jax.devices()[:2]),
        seed=2,
        generation=Generation(guidance=5.0, num_steps=3, num_images=2),
    )
    summary = score(model, [CFGNorms(guidance=5.0)], source, str(out), **settings)
    assert summary.plan.mode == "prompts" and summary.plan.images_per_item == 2
    assert summary.scored == 3 and summary.plan.steps == 1  # 6 images in one batch of 8
    (out / "manifest" / "chunk-00000000.json").unlink()  # as if killed before its manifest
    again = score(model, [CFGNorms(guidance=5.0)], source, str(out), **settings)
    assert (again.chunks_written, again.scored) == (1, 2)
    table = _table(out)
    np.testing.assert_array_equal(table["index"], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(table["image_index"], [0, 1] * 3)
    np.testing.assert_array_equal(table["memorized"], [False, False, True, True, False, False])

    result = sd.sample(
        sd.encode_prompt(prompts),
        key=jax.random.key(2),
        guidance=5.0,
        num_steps=3,
        images_per_prompt=2,
        return_trajectory=True,
    )  # prompt-major
    norms = generation_cfg_norms(result, schedule=sd.schedule, guidance=5.0)
    np.testing.assert_allclose(table["cfg_vector_norm"], norms.cfg_vector, rtol=1e-4)
    np.testing.assert_allclose(table["cfg_score_norm"], norms.cfg_score, rtol=1e-4)
    assert not np.allclose(table["cfg_score_norm"][0::2], table["cfg_score_norm"][1::2], rtol=1e-3)
    # a host column reads the generated image (decoded as StableDiffusion.decode does); a
    # model that cannot decode has no image for it
    import dataclasses

    from mmh_jax.evaluation import png_length, to_uint8_nhwc

    score(model, [PngSize()], source, str(tmp_path / "png"), **settings)
    pixels = to_uint8_nhwc(np.asarray(sd.decode(result.sample)))
    truth = [png_length(image[None], level=9)[0] for image in pixels]
    np.testing.assert_allclose(_table(tmp_path / "png")["png_bytes"], truth, rtol=0.02)
    with pytest.raises(ValueError, match="needs images"):
        score(dataclasses.replace(model, decode=None), [PngSize()], source, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="num_images must be a positive int"):
        score(model, [CFGNorms()], source, str(tmp_path / "x"), generation=Generation(num_images=0))


@pytest.mark.slow
def test_a_config_runs_the_detector_columns_on_prompts(sd, sd_folder, tmp_path):
    """[columns.cross_attention], value_activations and detector_images from a TOML config on a
    prompt file: Ren et al.'s and Chen et al.'s statistics of each generated image
    equal the detectors' own (one image per prompt, the same noise rule), NeMo's activations
    equal value_activations; bad settings are refused when the config is read."""
    from mmh_jax.memorization import detectors as D
    from mmh_jax.scoring import Sharpness
    from mmh_jax.scoring.config import ConfigError, build_columns, read_config, run

    prompts = ["a cat", "the cat, the cat", "cat!"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n" for c in prompts))
    head = (
        f"[model]\nkind = 'stable-diffusion'\npath = '{sd_folder[0]}'\n"
        "[input]\npath = 'p.jsonl'\n[output]\ndir = 'out'\n[run]\nbatch_size = 8\nseed = 4\n"
        "[generate]\nguidance = 5.0\nnum_steps = 3\n"
    )
    (tmp_path / "run.toml").write_text(
        head + "[columns.cross_attention]\nearly_steps = 2\n[columns.value_activations]\n"
        "[columns.detector_images]\nguidance = 5.0\n"
    )
    run(read_config(tmp_path / "run.toml"))
    scores = merge(tmp_path / "out").scores
    table = {name: scores[name].to_numpy() for name in scores.column_names}
    key = jax.random.key(4)
    ren = D.attention_entropy(sd, prompts, key=key, num_steps=3, early_steps=2, guidance=5.0)
    for name, value in zip(("ren_entropy", "ren_begin", "ren_end"), ren):
        np.testing.assert_allclose(table[name], value, rtol=1e-5, err_msg=name)
    bright = D.bright_ending(sd, prompts, key=key, num_steps=3, guidance=5.0)
    np.testing.assert_allclose(table["bright_ending"], bright.score, rtol=1e-5)
    np.testing.assert_allclose(
        vectors(scores, "value_activations"), D.value_activations(sd, prompts), rtol=1e-5
    )
    # sharpness (a jvp through the UNet: a minute to compile) is read, not run
    (tmp_path / "sharp.toml").write_text(head + "[columns.sharpness]\nnum_probes = 2\n")
    assert build_columns(read_config(tmp_path / "sharp.toml")) == [
        Sharpness(guidance=7.5, num_probes=2)
    ]
    assert vectors(scores, "one_step_pixels").shape == (3, 16 * 16 * 3)
    for body, message in [
        ("[columns.cross_attention]\nearly_steps = 0\n", "early_steps must be an int >= 1"),
        ("[columns.sharpness]\nnum_probes = 0\n", "num_probes must be an integer >= 1"),
        ("[columns.detector_images]\nguidence = 5.0\n", "unknown key"),
    ]:
        (tmp_path / "bad.toml").write_text(head.replace("'out'", "'bad'") + body)
        with pytest.raises(ConfigError, match=message):
            read_config(tmp_path / "bad.toml")
    assert not (tmp_path / "bad").exists()


def test_generator_jacobian_rank(tmp_path):
    """Latents of a generator through a rank-2 linear map (then tanh): LID 2 everywhere."""
    from jax.tree_util import Partial

    from mmh_jax.scoring import JacobianRank

    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(6, 2)) @ rng.normal(size=(2, 4))).astype(np.float32)  # rank 2
    z = rng.normal(size=(12, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    model = Model.from_generator(Partial(lambda w, z: jax.numpy.tanh(z @ w.T), weight), (4,))
    summary = score(
        model,
        [JacobianRank(threshold=1e-4)],
        ArrayFile(tmp_path / "z.npy"),
        str(tmp_path / "out"),
        batch_size=8,
    )
    assert summary.plan.mode == "points"
    np.testing.assert_array_equal(_table(tmp_path / "out")["jacobian_rank"], 2)


def test_a_vector_per_item_is_written_as_a_fixed_size_list(tmp_path):
    """A column may give a vector per item (a spectrum): the Parquet holds it unchanged."""
    import dataclasses
    import functools

    from jax.tree_util import Partial

    @functools.partial(jax.tree_util.register_dataclass, data_fields=[], meta_fields=[])
    @dataclasses.dataclass(frozen=True)
    class Doubled:
        on_host = False
        needs_text = False
        names = ("doubled",)

        def check(self, model):
            pass

        def __call__(self, model, inputs, keys):
            return {"doubled": 2 * inputs.points}

    z = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    model = Model.from_generator(Partial(lambda z: z), (3,))
    score(
        model,
        [Doubled()],
        ArrayFile(tmp_path / "z.npy"),
        str(tmp_path / "out"),
        batch_size=8,
        chunk_size=4,
    )
    scores = merge(tmp_path / "out").scores
    assert scores["doubled"].type.list_size == 3
    np.testing.assert_array_equal(np.stack(scores["doubled"].to_pylist()), 2 * z)
    np.testing.assert_array_equal(vectors(scores, "doubled"), 2 * z)
    with pytest.raises(ValueError, match="'index' holds int64, not a vector"):
        vectors(scores, "index")


def test_a_factory_module_beside_the_config_is_found(tmp_path, capsys):
    from mmh_jax.cli import main

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "model_beside_the_config.py").write_text(
        "import toy_model\n\n\ndef build(rank):\n    return toy_model.make(rank=rank)\n"
    )
    x = toy_model.points(6)
    np.save(folder / "x.npy", x)
    (folder / "run.toml").write_text(
        "[model]\nkind = 'factory'\nfactory = 'model_beside_the_config:build'\n"
        "options = {rank = 2}\n[input]\npath = 'x.npy'\n[output]\ndir = 'out'\n"
        "[columns.flipd]\nt0 = 0.05\n"
    )
    assert main(["score", "--config", str(folder / "run.toml"), "--quiet"]) == 0, (
        capsys.readouterr().err
    )
    np.testing.assert_allclose(
        _table(folder / "out")["flipd_0.05"],
        toy_model.flipd_closed_form(x, 0.05),
        rtol=1e-4,
        atol=1e-4,
    )


def test_from_score_fn_reads_images_off_the_shape():
    from jax.tree_util import Partial

    from mmh_jax.schedules import VP

    score_fn = Partial(toy_model._score, 1.0)
    assert Model.from_score_fn(score_fn, VP(), (6,)).image_shape is None  # points
    assert Model.from_score_fn(score_fn, VP(), (3, 4, 4)).image_shape == (3, 4, 4)
    assert Model.from_score_fn(score_fn, VP(), (3, 4, 4), images=False).image_shape is None
    with pytest.raises(ValueError, match="image_shape"):
        Model.from_score_fn(score_fn, VP(), (6,), images=True)
