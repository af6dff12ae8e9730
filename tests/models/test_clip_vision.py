"""CLIPVisionModel / CLIPModel against transformers (random weights, built offline), and
clip_score against a direct torch computation with the same model and preprocessing."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import _tiny_tokenizer_files

from mmh_jax.convert import ConversionError
from mmh_jax.convert.clip import clip_rename_table, convert_clip, convert_clip_vision
from mmh_jax.evaluation.clip_score import CLIP, clip_preprocess, clip_score, load_clip
from mmh_jax.models.clip import CLIPModel, CLIPVisionModel, CLIPVisionOutput

# the tiny tokenizer's ids: <|startoftext|> 0, <|endoftext|> 1, 66 tokens
TEXT = dict(
    vocab_size=66,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
PROMPTS = ["a cat", "the cat", "cat, cat!", "a the"]


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random 1-D parameters (biases, norm scales, class token) too: their default init would
    hide a mix-up between them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def numpy_sd(model: torch.nn.Module) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def torch_model(hidden_act: str = "quick_gelu", seed: int = 3) -> transformers.CLIPModel:
    """A random tiny CLIPModel; with seed 3 its image-text cosines take both signs."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(TEXT, hidden_act=hidden_act),
        vision_config=dict(VISION, hidden_act=hidden_act),
        projection_dim=16,
    )
    return perturb(transformers.CLIPModel(config), seed)


def tensor(output) -> torch.Tensor:
    """transformers 5's get_*_features return the tensor or an output holding it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def torch_unit(features: torch.Tensor) -> np.ndarray:
    return (features / features.norm(dim=-1, keepdim=True)).numpy()


@pytest.fixture(scope="module")
def tiny():
    model = torch_model()
    module = CLIPModel.from_config(model.config.to_dict())
    return model, module, convert_clip(numpy_sd(model), module)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny):
    """A CLIPModel folder: save_pretrained, the image processor and the tiny tokenizer."""
    root = tmp_path_factory.mktemp("clip")
    tiny[0].save_pretrained(root)
    transformers.CLIPImageProcessor(**PROCESSOR).save_pretrained(root)
    src = tmp_path_factory.mktemp("tokenizer_src")
    for name, text in _tiny_tokenizer_files().items():
        (src / name).write_text(text)
    transformers.CLIPTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(root)
    return root


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


# --- parity -------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.slow
def test_embeddings_match_transformers(hidden_act):
    model = torch_model(hidden_act)
    module = CLIPModel.from_config(model.config.to_dict())
    params = convert_clip(numpy_sd(model), module)
    x = pixels(3)
    ids = np.array([[0, 5, 9, 1] + [1] * 3, [0, 7, 1] + [1] * 4], np.int32)
    out = jax.jit(module.apply)({"params": params}, x, ids)
    vision = jax.jit(lambda p, x: module.vision_model.apply({"params": p}, x))(
        params["vision_model"], x
    )
    assert isinstance(vision, CLIPVisionOutput)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.from_numpy(x))
        image = tensor(model.get_image_features(pixel_values=torch.from_numpy(x)))
        text = tensor(model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))))
    for got, want in [
        (vision.last_hidden_state, ref.last_hidden_state.numpy()),
        (vision.pooled, ref.pooler_output.numpy()),
        (out.image_embeds, torch_unit(image)),
        (out.text_embeds, torch_unit(text)),
    ]:
        assert got.shape == want.shape
        err = np.abs(np.asarray(got) - want).max()
        assert err <= 1e-4, err
    logits = np.exp(model.logit_scale.item()) * torch_unit(image) @ torch_unit(text).T
    np.testing.assert_allclose(np.asarray(out.logits_per_image), logits, atol=1e-3)


def test_vision_only_checkpoints_convert(tiny):
    model, module, params = tiny
    vision = CLIPVisionModel.from_config(model.config.vision_config.to_dict())
    assert vision == module.vision_model
    prefixed = {k: v for k, v in numpy_sd(model).items() if k.startswith("vision_model.")}
    chex.assert_trees_all_equal(convert_clip_vision(prefixed, vision), params["vision_model"])
    torch.manual_seed(0)
    bare = transformers.CLIPVisionModel(model.config.vision_config)  # transformers 5: no prefix
    bare.load_state_dict(
        {k.removeprefix("vision_model."): torch.from_numpy(v) for k, v in prefixed.items()}
    )
    chex.assert_trees_all_equal(convert_clip_vision(numpy_sd(bare), vision), params["vision_model"])
    with pytest.raises(ConversionError, match="CLIPVisionModelWithProjection"):
        convert_clip_vision(
            dict(prefixed, **{"visual_projection.weight": np.zeros((16, 32))}), vision
        )
    with pytest.raises(ConversionError, match="convert_clip"):
        convert_clip_vision(numpy_sd(model), vision)


def test_clip_score_matches_torch(tiny, folder):
    model = tiny[0]
    clip = load_clip(folder)
    assert isinstance(clip, CLIP) and clip.module == tiny[1]
    rng = np.random.default_rng(1)
    # smooth-ish images (a random field, upsampled) of a non-square size: resize and crop
    base = rng.integers(0, 256, (4, 9, 12, 3)).astype(np.float32)
    images = np.clip(
        np.kron(base, np.ones((1, 5, 5, 1))) + rng.normal(0, 20, (4, 45, 60, 3)), 0, 255
    ).astype(np.uint8)
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    ref_pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
    ours = clip_preprocess(clip.preprocessor, images)
    assert ours.shape == ref_pixels.shape == (4, 3, 32, 32)
    # PIL's fixed-point filter can round a pixel the other way: 1 level / std
    assert np.abs(ours - ref_pixels).max() <= 1.01 / 255 / 0.26
    assert np.mean(np.abs(ours - ref_pixels) > 1e-5) < 0.01
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image = tensor(model.get_image_features(pixel_values=torch.from_numpy(ref_pixels)))
        text = tensor(model.get_text_features(input_ids=ids))
    cos = np.sum(torch_unit(image) * torch_unit(text), axis=-1)
    want = 100 * np.maximum(cos, 0)
    assert (want > 1).any(), cos
    got = clip_score(clip, images, PROMPTS)
    assert got.shape == (4,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=0.05)
    # the same images as floats in [0, 1] (NCHW) and [-1, 1] (a list of NHWC images)
    f01 = np.transpose(images, (0, 3, 1, 2)).astype(np.float32) / 255
    s01 = clip_score(clip, f01, PROMPTS, value_range=(0, 1))
    s11 = clip_score(
        clip, list(images.astype(np.float32) / 127.5 - 1), PROMPTS, value_range=(-1, 1)
    )
    np.testing.assert_allclose(np.asarray(s01), np.asarray(s11), atol=1e-3)
    np.testing.assert_allclose(np.asarray(s01), want, atol=0.5)


def test_clip_score_definition_with_cosines_of_both_signs(tiny, folder):
    """Direct check of 100 * max(cos, 0) on images already at the crop size (no resize)."""
    model = tiny[0]
    clip = load_clip(folder)
    images = np.random.default_rng(2).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    prompts = (PROMPTS * 2)[:8]
    x = clip_preprocess(clip.preprocessor, images)
    mean, std = np.array(clip.preprocessor["image_mean"]), np.array(clip.preprocessor["image_std"])
    np.testing.assert_allclose(x, ((images / 255 - mean) / std).transpose(0, 3, 1, 2), atol=1e-5)
    ids = transformers.CLIPTokenizer.from_pretrained(folder)(
        prompts, padding=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        cos = np.sum(
            torch_unit(tensor(model.get_image_features(pixel_values=torch.from_numpy(x))))
            * torch_unit(tensor(model.get_text_features(input_ids=ids))),
            axis=-1,
        )
    assert (cos > 0).any() and (cos < 0).any(), cos  # both branches of the max are checked
    got = np.asarray(clip_score(clip, images, prompts))
    np.testing.assert_allclose(got, 100 * np.maximum(cos, 0), atol=1e-3)


# --- config and conversion ------------------------------------------------------------------


def test_config_round_trip_and_errors(tiny):
    model, module, _ = tiny
    assert CLIPModel.from_config(module.to_config()) == module
    rebuilt = transformers.CLIPConfig(**module.to_config())
    assert CLIPModel.from_config(rebuilt.to_dict()) == module
    assert CLIPVisionModel().to_config()["patch_size"] == transformers.CLIPVisionConfig().patch_size
    config = model.config.to_dict()
    config["vision_config"] = dict(config["vision_config"], patch_size=7)
    with pytest.raises(ValueError, match="vision_config.*patch_size"):
        CLIPModel.from_config(config)
    with pytest.raises(ValueError, match="model_type"):
        CLIPModel.from_config(dict(model.config.to_dict(), model_type="clip_text_model"))
    with pytest.raises(ValueError, match="unknown key 'foo'"):
        CLIPModel.from_config(dict(model.config.to_dict(), foo=1))
    old = dict(model.config.to_dict(), vision_config_dict={"num_hidden_layers": 3})
    assert CLIPModel.from_config(old).vision_model.num_hidden_layers == 3


def test_conversion_is_strict(tiny):
    model, module, params = tiny
    sd = numpy_sd(model)
    assert set(clip_rename_table(module)) == set(sd)
    buffers = {
        "text_model.embeddings.position_ids": np.arange(77)[None],
        "vision_model.embeddings.position_ids": np.arange(17)[None],
    }
    chex.assert_trees_all_equal(convert_clip(dict(sd, **buffers), module), params)
    with pytest.raises(ConversionError, match="vision_model.embeddings.position_ids"):
        convert_clip(
            dict(sd, **{"vision_model.embeddings.position_ids": np.arange(16)[None]}), module
        )
    broken = dict(sd)
    del broken["vision_model.embeddings.class_embedding"]
    broken["visual_projection.bias"] = np.zeros(16, np.float32)
    with pytest.raises(ConversionError) as err:
        convert_clip(broken, module, source="model.safetensors")
    for name in ("model.safetensors", "class_embedding", "visual_projection.bias"):
        assert name in str(err.value)
    text_only = {k: v for k, v in sd.items() if not k.startswith("vision_model.")}
    with pytest.raises(ConversionError, match="text-only"):
        convert_clip(text_only, module)


# --- bad input ----------------------------------------------------------------------------


def test_load_clip_refuses_other_folders(tmp_path, folder):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="UNet2DConditionModel.*not a transformers CLIPModel"):
        load_clip(unet)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(tmp_path)


def test_bad_images_and_prompts_are_named(folder):
    clip = load_clip(folder)
    rng = np.random.default_rng(0)
    same = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    other = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"images\[2\] is 40x48 but images\[0\] is 40x40"):
        clip_score(clip, [*same, other], PROMPTS[:3])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        clip_score(clip, np.stack(same), PROMPTS[:3])
    floats = np.stack(same).astype(np.float32) / 255
    with pytest.raises(ValueError, match="value_range"):
        clip_score(clip, floats, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"images\[1\] has values"):
        clip_score(
            clip, floats * np.array([1, 2])[:, None, None, None], PROMPTS[:2], value_range=(0, 1)
        )
    with pytest.raises(TypeError, match="uint8 or floating"):
        clip_score(clip, np.stack(same).astype(np.int32), PROMPTS[:2])
    with pytest.raises(ValueError, match="layout"):
        clip_score(clip, np.zeros((1, 3, 8, 3), np.uint8), PROMPTS[:1])
    with pytest.raises(ValueError, match="RGB"):
        clip_score(clip, np.zeros((1, 8, 8, 4), np.uint8), PROMPTS[:1])
