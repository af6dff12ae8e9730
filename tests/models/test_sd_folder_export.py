"""Writing Stable Diffusion as a diffusers pipeline folder from Flax parameters: the rename tables
run backwards give back every tensor of the PyTorch networks, and diffusers' own
``StableDiffusionPipeline.from_pretrained`` of the written folder computes what the original
pipeline computes (tests/conftest.py's ``sd_folder``, an SD v1-style pipeline whose transformers
have 1x1-convolution ``proj_in``/``proj_out``)."""

import json

import jax
import numpy as np
import pytest
import torch

from mmh_jax.convert import (
    ConversionError,
    Rename,
    autoencoder_kl_rename_table,
    clip_text_rename_table,
    conv1x1_kernel,
    convert_autoencoder_kl,
    convert_clip_text,
    convert_unet2d_condition,
    export_state_dict,
    linear_kernel,
    read_state_dict,
    unet2d_condition_rename_table,
)
from mmh_jax.models import (
    load_stable_diffusion,
    save_stable_diffusion_folder,
    stable_diffusion_components,
)


def _torch_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_same_state_dict(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == np.float32 and got[key].flags.c_contiguous, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("name", ["unet", "vae", "text_encoder"])
def test_export_inverts_conversion_exactly(sd, sd_folder, name):
    _, pipe = sd_folder
    truth = _torch_state_dict(getattr(pipe, name))
    if name == "unet":
        module = sd.unet.module
        assert not module.use_linear_projection  # SD v1's 1x1-convolution proj_in / proj_out
        assert truth["down_blocks.0.attentions.0.proj_in.weight"].ndim == 4
        table = unet2d_condition_rename_table(module)
        assert table["down_blocks.0.attentions.0.proj_in.weight"].transform is conv1x1_kernel
        params = convert_unet2d_condition(truth, module)
    elif name == "vae":
        table = autoencoder_kl_rename_table(sd.vae)
        params = convert_autoencoder_kl(truth, sd.vae)
    else:  # the torch model's own keys (transformers 5: no "text_model." prefix)
        truth.pop("embeddings.position_ids", None)  # a non-persistent buffer, not a parameter
        table = clip_text_rename_table(sd.text_encoder, prefix="")
        params = convert_clip_text(truth, sd.text_encoder)
    _assert_same_state_dict(export_state_dict(params, table), truth)


def test_export_is_strict():
    table = {
        "a.weight": Rename(("a", "kernel"), linear_kernel),
        "b.weight": Rename(("b", "kernel"), lambda w: w),
    }
    params = {"a": {"kernel": np.ones((2, 3))}, "c": {"bias": np.zeros(3)}}
    with pytest.raises(ConversionError) as err:
        export_state_dict(params, table, source="my params")
    message = str(err.value)
    assert "my params does not match" in message
    assert "b.weight <- b/kernel" in message and "c/bias" in message
    with pytest.raises(ConversionError, match="transforms without an inverse"):
        export_state_dict({"b": {"kernel": np.ones(2)}}, {"b.weight": table["b.weight"]})
    with pytest.raises(ConversionError, match="wrong shapes"):  # a 1x1 conv from a 3-D leaf
        export_state_dict(
            {"p": {"kernel": np.ones((2, 3, 4))}},
            {"p.weight": Rename(("p", "kernel"), conv1x1_kernel)},
        )


@pytest.fixture(scope="module")
def exported(sd, tmp_path_factory):
    """``sd`` written with save_stable_diffusion_folder (into an existing empty folder)."""
    folder = tmp_path_factory.mktemp("export") / "pipeline"
    folder.mkdir()
    assert save_stable_diffusion_folder(folder, **stable_diffusion_components(sd)) == folder
    return folder


def test_written_folder_layout(exported, sd_folder):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    keys = read_state_dict(exported / "text_encoder" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in keys)  # SD v1's files' layout
    original = json.loads((sd_folder[0] / "scheduler" / "scheduler_config.json").read_text())
    written = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert written == original
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_diffusers_reads_the_folder_as_the_original_pipeline(exported, sd_folder):
    from diffusers import StableDiffusionPipeline

    _, pipe = sd_folder
    loaded = StableDiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert loaded.safety_checker is None
    assert not loaded.unet.config.use_linear_projection
    ids = pipe.tokenizer(
        ["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    np.testing.assert_array_equal(
        loaded.tokenizer(
            ["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids,
        ids,
    )
    rng = np.random.default_rng(0)
    z = torch.as_tensor(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    t = torch.tensor([321.0])
    with torch.no_grad():
        text = [m.text_encoder(ids).last_hidden_state.numpy() for m in (pipe, loaded)]
        context = torch.as_tensor(text[0])
        eps = [m.unet(z, t, encoder_hidden_states=context).sample.numpy() for m in (pipe, loaded)]
        images = [
            m.vae.decode(z / m.vae.config.scaling_factor).sample.numpy() for m in (pipe, loaded)
        ]
    for got, expected in (text[::-1], eps[::-1], images[::-1]):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert loaded.scheduler.config.steps_offset == pipe.scheduler.config.steps_offset


@pytest.mark.slow
def test_our_loader_reads_the_folder_back_identically(exported, sd):
    back = load_stable_diffusion(exported)
    for got, expected in (
        (back.unet.params, sd.unet.params),
        (back.vae_params, sd.vae_params),
        (back.text_encoder_params, sd.text_encoder_params),
    ):
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert back.unet.module == sd.unet.module and back.vae == sd.vae
    assert back.text_encoder == sd.text_encoder
    assert back.scheduler_config == sd.scheduler_config
    np.testing.assert_array_equal(back.tokenize("a cat"), sd.tokenize("a cat"))


def test_non_empty_target_is_refused_and_nothing_is_left(sd, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    components = stable_diffusion_components(sd)
    with pytest.raises(FileExistsError, match="taken"):
        save_stable_diffusion_folder(target, **components)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(ConversionError, match="vae_params"):  # the UNet's weights as the VAE's
        save_stable_diffusion_folder(
            tmp_path / "new", **{**components, "vae_params": sd.unet.params}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folder left
    with pytest.raises(ValueError, match="tokenizer_files"):
        save_stable_diffusion_folder(
            tmp_path / "new", **{**components, "tokenizer_files": {"a.txt": ""}}
        )
    with pytest.raises(TypeError, match="vae must be a Flax AutoencoderKL"):
        save_stable_diffusion_folder(tmp_path / "new", **{**components, "vae": sd.unet.module})
