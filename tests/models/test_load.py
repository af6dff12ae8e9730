"""``load_model``: the one dispatch over architectures passes its options to the kind's loader
and refuses what that loader does not take."""

from pathlib import Path

import jax
import numpy as np
import pytest

from mmh_jax.models import load_model, load_stylegan2

PICKLE = Path(__file__).parent / "fixtures" / "stylegan2" / "skip_cond.pkl"


def test_options_reach_the_kinds_loader():
    for network in ("G", "G_ema"):
        got = load_model(PICKLE, kind="stylegan2", network=network)
        want = load_stylegan2(PICKLE, network=network)
        assert got.module == want.module
        jax.tree.map(np.testing.assert_array_equal, got.params, want.params)
    # G and G_ema differ in this snapshot, so the option was not dropped on the way
    g, g_ema = (load_model(PICKLE, kind="stylegan2", network=n).params for n in ("G", "G_ema"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ema)))


def test_bad_kind_and_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of .*got 'ddpm'"):
        load_model(tmp_path, kind="ddpm")
    with pytest.raises(ValueError, match="'unet2d' takes no options, got network"):
        load_model(tmp_path, kind="unet2d", network="G")
