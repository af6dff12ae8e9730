"""Tests of mmh_jax.evaluation.plots (PNG files written, input errors) and
mmh_jax.evaluation.complexity (OpenCV PNG length, complexity-normalised LID)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mmh_jax.evaluation import (
    density_histograms,
    normalized_lid,
    pair_grid,
    png_length,
    roc_curves,
    to_uint8_nhwc,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path, min_bytes=2000):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > min_bytes


def _scores(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    return {"flipd": rng.standard_normal(n) - y, "cfg_norm": rng.standard_normal(n) + 2 * y}, y


def test_density_histograms(tmp_path):
    cols, y = _scores()
    table = {**cols, "id": np.arange(200)}
    hand = np.where(y, "exact", "not")
    out = density_histograms(table, ["flipd", "cfg_norm"], hand, path=tmp_path / "dens.png", dpi=50)
    assert out == tmp_path / "dens.png" and _is_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["dens.png"]  # no temporary left behind
    pa = pytest.importorskip("pyarrow")
    density_histograms(pa.table(table), ["flipd"], y, path=tmp_path / "pa.png")
    assert _is_png(tmp_path / "pa.png")
    with pytest.raises(KeyError, match="no column 'lid'"):
        density_histograms(table, ["lid"], y, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="200 values but labels has 199"):
        density_histograms(table, ["flipd"], y[:-1], path=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_roc_curves(tmp_path):
    scores, y = _scores()
    for log_x in (False, True):
        out = roc_curves(
            scores,
            y,
            path=tmp_path / f"roc{log_x}.png",
            higher_is_positive={"flipd": False},
            log_x=log_x,
            title="ROC",
            dpi=60,
        )
        assert _is_png(out)
    bad = dict(scores, flipd=np.r_[scores["flipd"][:-1], np.nan])
    with pytest.raises(ValueError, match="signal 'flipd'.*NaN"):
        roc_curves(bad, y, path=tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_pair_grid(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    m = rng.uniform(-1, 1, (5, 3, 16, 16)).astype(np.float32)  # NCHW float in [-1, 1]
    out = pair_grid(
        q,
        m,
        rng.random(5),
        path=tmp_path / "pairs.png",
        ncols=3,
        titles=[f"gen{i}" for i in range(5)],
    )
    assert _is_png(out)
    gray = [rng.integers(0, 256, (8, 8, 1), dtype=np.uint8) for _ in range(2)]
    assert _is_png(pair_grid(gray, gray, [0.0, 1.0], path=tmp_path / "gray.png"), 500)
    mixed = [q[0], q[1][:8, :8]]
    with pytest.raises(ValueError, match=r"item 1: query is 8x8x3 but its match is 16x16x3"):
        pair_grid(mixed, list(q[:2]), [0.0, 1.0], path=tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"item gen1"):
        pair_grid(
            mixed, list(q[:2]), [0.0, 1.0], path=tmp_path / "bad.png", titles=["gen0", "gen1"]
        )
    with pytest.raises(ValueError, match=r"queries=5, matches=4, distances=5"):
        pair_grid(q, m[:4], rng.random(5), path=tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_png_length_is_opencv_bytes_of_bgr():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    images[1] = np.arange(24 * 20 * 3).reshape(24, 20, 3) % 7 * 30  # some structure
    got = png_length(images)
    assert got.dtype == np.int64 and got.shape == (3,)
    for img, n in zip(images, got):
        ok, enc = cv2.imencode(".png", img[..., ::-1].copy(), [cv2.IMWRITE_PNG_COMPRESSION, 9])
        assert ok and n == len(enc.tobytes())
        # and decoding those bytes (BGR) back as RGB gives the image as given
        decoded = cv2.cvtColor(cv2.imdecode(enc, cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded, img)
    assert (png_length(images, level=0) >= got).all()


def test_png_length_complexity_and_formats():
    rng = np.random.default_rng(1)
    constant = np.full((1, 32, 32, 3), 120, np.uint8)
    noise = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    assert png_length(constant)[0] < png_length(noise)[0] / 10
    # float NCHW in [-1, 1] is the same image as its uint8 NHWC conversion
    x = noise.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(to_uint8_nhwc(x), noise)
    assert png_length(x)[0] == png_length(noise)[0]
    assert png_length(noise[0]).shape == (1,)  # a single [h, w, c] image
    gray = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    ok, enc = cv2.imencode(".png", gray[0], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert png_length(gray)[0] == enc.size
    rgba = rng.integers(0, 256, (1, 8, 8, 4), dtype=np.uint8)
    assert png_length(rgba)[0] > 0
    with pytest.raises(ValueError, match="level"):
        png_length(noise, level=10)
    with pytest.raises(ValueError, match="uint8 NHWC or float NCHW"):
        png_length(noise.astype(np.int32))
    with pytest.raises(ValueError, match="channels"):
        png_length(rng.integers(0, 256, (1, 8, 8, 2), dtype=np.uint8))


def test_normalized_lid():
    lid = np.array([10.0, 30.0, 5.0])
    length = np.array([1000, 3000, 250])
    np.testing.assert_allclose(normalized_lid(lid, length), lid / length)
    with pytest.raises(ValueError, match=r"shape \(3,\).*shape \(2,\)"):
        normalized_lid(lid, length[:2])
    with pytest.raises(ValueError, match="positive.*index 1"):
        normalized_lid(lid, [1000, 0, 250])
