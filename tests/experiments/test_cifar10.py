"""``mmh-jax cifar10 run`` / ``report`` end to end on a tiny random StyleGAN2 (8x8 RGB, two
classes) and upscaled scikit-learn digits as the training set."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmh_jax.cli import main

GAN = Path(__file__).parents[1] / "models" / "fixtures" / "stylegan2" / "orig.pkl"
N = 8


def _digits(n: int = 120) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().images[:n]  # [n, 8, 8] in 0..16
    x = np.clip(np.round(x * 255 / 16), 0, 255).astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=-1)  # 8x8x3


def _run(train: Path, out: Path) -> int:
    return main(
        [
            "cifar10",
            "run",
            "--train",
            str(train),
            "--model",
            str(GAN),
            "--arch",
            "stylegan2",
            "-n",
            str(N),
            "-o",
            str(out),
            "--top-k",
            "4",
            "--lpca-k",
            "10",
            "--calibration-n",
            "10",
            "--batch-size",
            "4",
            "--quiet",
        ]
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    train = root / "train.npz"
    np.savez(train, x=_digits().transpose(0, 3, 1, 2))  # NCHW is accepted too
    assert _run(train, root / "out") == 0
    return root


def _table(out: Path) -> dict:
    return pq.read_table(out / "results.parquet").to_pydict()


def _samples(out: Path) -> np.ndarray:
    """The samples as the scoring engine wrote them to ``out/scores``: uint8 NHWC."""
    from mmh_jax.scoring import merge, vectors

    pixels = vectors(merge(out / "scores").scores, "pixels")
    return pixels.reshape(len(pixels), 8, 8, 3)


def _scores(out: Path):
    from mmh_jax.scoring import merge

    return merge(out / "scores").scores


@pytest.mark.slow
def test_run_writes_files_and_columns(run_dir):
    out = run_dir / "out"
    for name in (
        "results.parquet",
        "results.csv",
        "pairs_calibrated_l2.png",
        "to_label.csv",
        "scores/run.json",
        "latents.npz",
        "lid_star_train.npy",
    ):
        assert (out / name).is_file(), name
    table = _table(out)
    assert list(table) == [
        "id",
        "train_index",
        "calibrated_l2",
        "l2",
        "lid_theta",
        "lid_star",
        "png_length",
        "train_png_length",
        "lid_theta_normalised",
        "lid_star_normalised",
    ]
    assert table["id"] == list(range(N))
    np.testing.assert_allclose(
        table["lid_theta_normalised"], np.array(table["lid_theta"]) / np.array(table["png_length"])
    )
    with open(out / "to_label.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["distance"] for r in rows] == ["calibrated_l2"] * 4
    assert all(r["label"] == "" for r in rows)
    # the top-k rows are the k smallest calibrated l2
    assert sorted(int(r["id"]) for r in rows) == sorted(
        np.argsort(table["calibrated_l2"], kind="stable")[:4].tolist()
    )


@pytest.mark.slow
def test_nearest_is_bruteforce_argmin(run_dir):
    table = _table(run_dir / "out")
    samples = _samples(run_dir / "out").astype(np.float64) / 127.5 - 1
    train = _digits().astype(np.float64) / 127.5 - 1
    d = np.linalg.norm(samples.reshape(N, 1, -1) - train.reshape(1, len(train), -1), axis=-1)
    assert table["train_index"] == d.argmin(1).tolist()
    np.testing.assert_allclose(table["l2"], d.min(1), rtol=1e-4, atol=1e-4)


def test_planted_copy_gets_smallest_calibrated_l2(run_dir):
    copy = _samples(run_dir / "out")[3:4]
    train = np.concatenate([_digits(), copy])
    np.savez(run_dir / "planted.npz", x=train)
    assert _run(run_dir / "planted.npz", run_dir / "planted") == 0
    table = _table(run_dir / "planted")
    assert table["train_index"][3] == len(train) - 1
    assert table["calibrated_l2"][3] == 0.0
    assert int(np.argmin(table["calibrated_l2"])) == 3


def test_report_matches_sklearn(run_dir, capsys):
    from sklearn.metrics import roc_auc_score

    out = run_dir / "out"
    labels = run_dir / "labels.csv"
    given = {0: "exact", 1: "not", 2: "reconstructive", 3: "not", 5: "not"}
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows(given.items())
        w.writerow([6, ""])  # an empty label is skipped
    assert (
        main(
            [
                "cifar10",
                "report",
                str(out),
                "--labels",
                str(labels),
                "--unlabelled",
                "drop",
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    for name in ("detection.csv", "histograms.png", "roc.png"):
        assert (out / name).is_file(), name
    table = _table(out)
    ids = sorted(given)
    y = np.array([given[i] != "not" for i in ids])
    with open(out / "detection.csv", newline="") as f:
        rows = {r["signal"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"lid_theta", "lid_theta_normalised", "lid_star", "lid_star_normalised"}
    for signal, row in rows.items():
        expected = roc_auc_score(y, -np.array(table[signal])[ids])
        assert float(row["auroc"]) == pytest.approx(expected, abs=1e-12)
        assert float(row["auroc_low"]) <= float(row["auroc_high"])
    assert "AUROC" in capsys.readouterr().out


def test_bad_inputs_exit_2(run_dir, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(folder / "b.png")
    capsys.readouterr()
    assert _run(folder, tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert "b.png" in err and "\n" not in err

    # a truncated .npz, one without x, one of floats: the scoring sources' reader and its errors
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 8, 8, 3), np.uint8))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    np.savez(tmp_path / "other.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "floats.npz", x=np.zeros((4, 8, 8, 3), np.float32))
    for name, fragment in (
        ("truncated.npz", "cannot read"),
        ("other.npz", "no array 'x'"),
        ("floats.npz", "x must be uint8"),
    ):
        assert _run(tmp_path / name, tmp_path / "o") == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and name in err and "\n" not in err, err

    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n0,exact\n99,not\n")
    assert main(["cifar10", "report", str(run_dir / "out"), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err.strip()
    assert "99" in err and "\n" not in err


def _save_unet2d(path: Path) -> Path:
    """A tiny random diffusers-style UNet2D (8x8 RGB) written by save_unet2d."""
    import jax
    import jax.numpy as jnp

    from mmh_jax.models import (
        Pretrained,
        UNet2D,
        ddpm_from_scheduler_config,
        eps_score_fn,
        save_unet2d,
    )

    m = UNet2D(
        sample_size=8,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        attention_head_dim=None,
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
    )
    params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 8, 8)), jnp.zeros((1,)))["params"]
    s = ddpm_from_scheduler_config({"num_train_timesteps": 100})
    return save_unet2d(path, Pretrained(m, params, s, eps_score_fn(m, params, s)))


@pytest.mark.slow
def test_diffusion_unet2d_flipd(tmp_path):
    """A tiny random diffusers-style UNet2D written by save_unet2d: DDIM + FLIPD end to end."""
    _save_unet2d(tmp_path / "unet.safetensors")
    np.savez(tmp_path / "train.npz", x=_digits(60))
    assert (
        main(
            [
                "cifar10",
                "run",
                "--train",
                str(tmp_path / "train.npz"),
                "--model",
                str(tmp_path / "unet.safetensors"),
                "--arch",
                "unet2d",
                "-n",
                "4",
                "--steps",
                "2",
                "-o",
                str(tmp_path / "out"),
                "--lpca-k",
                "5",
                "--calibration-n",
                "5",
                "--top-k",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    table = _table(tmp_path / "out")
    assert len(table["id"]) == 4 and np.all(np.isfinite(table["lid_theta"]))


def _unet_run(train: Path, model: Path, out: Path, n: int, *extra: str) -> int:
    return main(
        [
            "cifar10",
            "run",
            "--train",
            str(train),
            "--model",
            str(model),
            "--arch",
            "unet2d",
            "-n",
            str(n),
            "--steps",
            "2",
            "-o",
            str(out),
            "--lpca-k",
            "5",
            "--calibration-n",
            "5",
            "--top-k",
            "2",
            "--quiet",
            *extra,
        ]
    )


def _pooled_normal_lid(spectra: np.ndarray, q: float = 10.0) -> np.ndarray:
    """d minus the number of singular values above the q-th percentile of all of them."""
    threshold = np.percentile(spectra.astype(np.float64).ravel(), q)
    return spectra.shape[1] - np.sum(spectra > threshold, axis=1)


@pytest.mark.slow
def test_diffusion_normal_bundle(tmp_path):
    """``--lid normal_bundle``: spectra of d = 192 singular values per sample, LID_theta their
    count below the pooled 10th percentile (Appendix C.1), recomputed here with numpy; a rerun
    with another ``--percentile`` reuses the scored samples (nothing rescored) and pools its
    own threshold; a rerun with fewer samples in the same folder is refused."""
    from mmh_jax.scoring import vectors

    model = _save_unet2d(tmp_path / "unet.safetensors")
    np.savez(tmp_path / "train.npz", x=_digits(40))
    out = tmp_path / "out"
    args = ("--lid", "normal_bundle", "--nb-scores", "256", "--batch-size", "2")
    assert _unet_run(tmp_path / "train.npz", model, out, 4, *args) == 0
    spectra = vectors(_scores(out), "normal_bundle_sv_0.1")
    assert spectra.shape == (4, 192) and np.all(np.isfinite(spectra))
    assert np.all(spectra > 0) and np.all(np.diff(spectra, axis=1) <= 0)  # K > d, descending
    table = _table(out)
    np.testing.assert_array_equal(table["lid_theta"], _pooled_normal_lid(spectra))
    np.testing.assert_allclose(
        table["lid_theta_normalised"], np.array(table["lid_theta"]) / np.array(table["png_length"])
    )
    parts = {p.name: p.stat().st_mtime_ns for p in (out / "scores" / "parts").iterdir()}
    assert _unet_run(tmp_path / "train.npz", model, out, 4, *args, "--percentile", "30") == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "scores" / "parts").iterdir()} == parts
    np.testing.assert_array_equal(_table(out)["lid_theta"], _pooled_normal_lid(spectra, 30.0))
    assert _unet_run(tmp_path / "train.npz", model, out, 3, *args) == 2


def _random_sscd_state_dict(seed: int = 0) -> dict:
    """A random ResNet-50 SSCD (``sscd_disc_mixup`` layout) as a torchvision-named state dict."""
    from mmh_jax.convert.core import conv_kernel, flatten_params, linear_kernel
    from mmh_jax.convert.sscd import sscd_abstract_params, sscd_rename_table
    from mmh_jax.models import SSCD

    module = SSCD(arch="resnet50", embedding_dim=512)
    shapes = flatten_params(sscd_abstract_params(module))
    rng = np.random.default_rng(seed)
    state = {}
    for key, rename in sscd_rename_table(module).items():
        shape = tuple(shapes[rename.path].shape)
        if rename.transform is conv_kernel:  # [kh, kw, in, out] -> [out, in, kh, kw]
            kh, kw, cin, cout = shape
            w = rng.standard_normal((cout, cin, kh, kw)) * np.sqrt(2.0 / (cin * kh * kw))
        elif rename.transform is linear_kernel:
            w = rng.standard_normal(shape[::-1]) / np.sqrt(shape[0])
        elif key.endswith("running_var"):
            w = rng.uniform(0.75, 1.25, shape)
        elif key.endswith(".weight"):  # batch-norm scale
            w = rng.uniform(0.5, 1.0, shape)
        else:  # biases, running means
            w = 0.1 * rng.standard_normal(shape)
        state[key] = w.astype(np.float32)
    return state


@pytest.mark.slow
def test_sscd_retrieval(tmp_path):
    """``--sscd`` with a random ResNet-50 SSCD saved as a plain torchvision-named state dict
    (no architecture recorded: the ResNeXt-101 reading fails, the ResNet-50 one is used).  A
    training image planted as an exact copy of sample 1 is its SSCD nearest neighbour with
    cosine similarity 1, and every sample's SSCD neighbour and similarity are the brute-force
    argmax and max of the cosine similarities of the descriptors computed here."""
    from safetensors.numpy import save_file

    from mmh_jax.models import load_sscd, sscd_preprocess

    model = _save_unet2d(tmp_path / "unet.safetensors")
    sscd = tmp_path / "sscd_disc_mixup.safetensors"
    save_file(_random_sscd_state_dict(), str(sscd))
    np.savez(tmp_path / "train.npz", x=_digits(12))
    # the samples depend on the model and seed only: generate them once, then plant a copy
    assert _unet_run(tmp_path / "train.npz", model, tmp_path / "first", 3) == 0
    samples = _samples(tmp_path / "first")
    train = np.concatenate([_digits(12), samples[1:2]])
    np.savez(tmp_path / "planted.npz", x=train)
    out = tmp_path / "out"
    assert _unet_run(tmp_path / "planted.npz", model, out, 3, "--sscd", str(sscd)) == 0
    table = _table(out)
    assert table["sscd_train_index"][1] == 12 and table["train_index"][1] == 12
    assert table["sscd_similarity"][1] == pytest.approx(1.0, abs=1e-5)

    net = load_sscd(sscd, arch="resnet50")
    emb_s = np.asarray(net.embed(sscd_preprocess(samples)), np.float64)
    emb_t = np.asarray(net.embed(sscd_preprocess(train)), np.float64)
    cos = emb_s @ emb_t.T / np.outer(np.linalg.norm(emb_s, axis=1), np.linalg.norm(emb_t, axis=1))
    assert table["sscd_train_index"] == cos.argmax(1).tolist()
    np.testing.assert_allclose(table["sscd_similarity"], cos.max(1), atol=1e-5)
    with open(out / "to_label.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["distance"] == "sscd"]
    assert [int(r["id"]) for r in rows] == np.argsort(
        -np.array(table["sscd_similarity"]), kind="stable"
    )[:2].tolist()
    assert (out / "pairs_sscd.png").is_file()
