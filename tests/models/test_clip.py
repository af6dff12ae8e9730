"""CLIPTextModel against PyTorch transformers' ``CLIPTextModel`` (random weights, built offline)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmh_jax.convert import ConversionError, flatten_params
from mmh_jax.convert.clip import PREFIX, clip_text_rename_table, convert_clip_text
from mmh_jax.models.clip import CLIPTextModel, CLIPTextOutput

BOS, EOS, ADDED = 49406, 49407, 49409
# CLIP's vocabulary (so the token ids are the tokenizer's) plus two added tokens, as textual
# inversion adds them: legacy configs (eos_token_id=2) pool at the largest id, which is then
# not the end token. Everything else is tiny.
TINY = dict(
    vocab_size=49410,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=1,
)
# Stable Diffusion 1.x's text_encoder/config.json (transformers 4.22), with its sizes
SD1_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}


def torch_clip(config: dict, seed: int = 0) -> transformers.CLIPTextModel:
    """A transformers CLIPTextModel with random weights; biases and norm scales are perturbed
    too (their default init, 0 and 1, would hide a mix-up between them)."""
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def numpy_state_dict(model: torch.nn.Module) -> dict:
    """The state dict as transformers 5 holds and saves it (no ``text_model.`` prefix)."""
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def transformers4_layout(sd: dict) -> dict:
    """The keys as transformers 4 saved them (Stable Diffusion's ``text_encoder/`` files)."""
    return {PREFIX + k: v for k, v in sd.items()}


def token_ids(n: int, seed: int = 0) -> np.ndarray:
    """Rows as CLIP tokenizers make them: start, text, end, then padding; the padding is the
    end token (Stable Diffusion 1.x) or id 0 (2.x), and the rows have different lengths
    (one fills the row, one is the empty prompt). The last row holds an added token."""
    rng = np.random.default_rng(seed)
    rows = []
    for words, pad in [(5, EOS), (11, 0), (n - 2, EOS), (0, EOS), (3, 0), (n - 2, 0), (4, EOS)]:
        words = min(words, n - 2)
        row = [BOS, *rng.integers(0, BOS, words), EOS]
        rows.append(row + [pad] * (n - len(row)))
    rows[-1][2] = ADDED
    return np.array(rows, np.int32)


def torch_forward(model: transformers.CLIPTextModel, ids: np.ndarray):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


# One sequence length per case (each length compiles anew): 77 is Stable Diffusion's context,
# 13 uses fewer positions than max_position_embeddings.
@pytest.mark.parametrize(
    "hidden_act, eos_token_id, n",
    [
        ("quick_gelu", EOS, 77),  # OpenAI CLIP as transformers >= 4.31 configures it
        ("quick_gelu", 2, 77),  # Stable Diffusion 1.x
        ("gelu", 2, 77),  # Stable Diffusion 2.x (OpenCLIP)
        ("gelu_new", EOS, 13),
    ],
)
def test_matches_transformers(hidden_act, eos_token_id, n):
    model = torch_clip(dict(TINY, hidden_act=hidden_act, eos_token_id=eos_token_id))
    module = CLIPTextModel.from_config(model.config.to_dict())
    assert (module.hidden_act, module.eos_token_id) == (hidden_act, eos_token_id)
    params = convert_clip_text(numpy_state_dict(model), module)
    ids = token_ids(n, seed=n)
    out = jax.jit(module.apply)({"params": params}, ids)
    assert isinstance(out, CLIPTextOutput)
    hidden, pooled = torch_forward(model, ids)
    assert out.last_hidden_state.shape == hidden.shape and out.pooled.shape == pooled.shape
    err = np.abs(np.asarray(out.last_hidden_state) - hidden).max()
    assert err <= 1e-4, err
    err = np.abs(np.asarray(out.pooled) - pooled).max()
    assert err <= 1e-4, err


def test_bfloat16_close_to_float32():
    model = torch_clip(TINY)
    module = CLIPTextModel.from_config(model.config.to_dict(), dtype=jnp.bfloat16)
    params = convert_clip_text(numpy_state_dict(model), module)
    assert {v.dtype for v in flatten_params(params).values()} == {np.dtype(np.float32)}
    ids = token_ids(77)
    out = jax.jit(module.apply)({"params": params}, ids)
    for got, ref in zip(out, torch_forward(model, ids)):
        assert got.dtype == jnp.bfloat16
        # tolerance: 5% of the largest output magnitude
        assert np.abs(np.asarray(got, np.float32) - ref).max() <= 0.05 * np.abs(ref).max()


# --- config -------------------------------------------------------------------------------


def test_defaults_and_config_keys_are_transformers():
    reference = transformers.CLIPTextConfig()
    ours = CLIPTextModel().to_config()
    for key, value in ours.items():
        assert getattr(reference, key) == value, key
    assert CLIPTextModel.from_config({}) == CLIPTextModel()
    assert CLIPTextModel.from_config(reference.to_dict()) == CLIPTextModel()
    module = CLIPTextModel(**dict(TINY, hidden_act="gelu", eos_token_id=2))
    rebuilt = transformers.CLIPTextConfig(**module.to_config())
    assert CLIPTextModel.from_config(rebuilt.to_dict()) == module


def test_stable_diffusion_config():
    module = CLIPTextModel.from_config(SD1_CONFIG, dtype=jnp.bfloat16)
    assert (module.hidden_size, module.num_hidden_layers, module.eos_token_id) == (768, 12, 2)
    assert module.dtype == jnp.bfloat16 and module.param_dtype == jnp.float32


@pytest.mark.parametrize(
    "key, value",
    [
        ("vision_hidden_size", 768),
        ("hidden_act", "relu"),
        ("model_type", "clip_vision_model"),
        ("num_attention_heads", 5),
        ("pruned_heads", {"0": [1]}),
        ("eos_token_id", [EOS, 2]),
        ("layer_norm_eps", 0.0),
    ],
)
def test_from_config_names_unsupported_key(key, value):
    with pytest.raises(ValueError, match=key):
        CLIPTextModel.from_config(dict(TINY, **{key: value}))


def test_from_config_wants_a_mapping():
    with pytest.raises(TypeError, match="config"):
        CLIPTextModel.from_config(transformers.CLIPTextConfig(**TINY))


# --- conversion strictness ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = torch_clip(TINY)
    return CLIPTextModel.from_config(model.config.to_dict()), numpy_state_dict(model)


def test_rename_table_is_the_state_dict(tiny):
    module, sd = tiny
    assert set(clip_text_rename_table(module, prefix="")) == set(sd)
    table = clip_text_rename_table(module)
    assert set(table) == set(transformers4_layout(sd))
    assert table["text_model.encoder.layers.1.self_attn.q_proj.weight"].path == (
        "encoder",
        "layers_1",
        "self_attn",
        "q_proj",
        "kernel",
    )
    assert table["text_model.embeddings.token_embedding.weight"].path == (
        "embeddings",
        "token_embedding",
        "embedding",
    )


def test_both_key_layouts_convert_alike_but_not_mixed(tiny):
    module, sd = tiny
    chex.assert_trees_all_equal(
        convert_clip_text(transformers4_layout(sd), module), convert_clip_text(sd, module)
    )
    mixed = dict(transformers4_layout(sd))
    mixed["final_layer_norm.bias"] = mixed.pop("text_model.final_layer_norm.bias")
    with pytest.raises(ConversionError, match=r"final_layer_norm\.bias"):
        convert_clip_text(mixed, module)


def test_missing_extra_and_misshaped_keys_are_all_named(tiny):
    module, sd = tiny
    sd = dict(sd)
    del sd["encoder.layers.1.mlp.fc2.bias"]
    sd["encoder.layers.1.mlp.fc3.weight"] = np.zeros((64, 128), np.float32)
    sd["encoder.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_clip_text(sd, module, source="model.safetensors")
    for name in (
        "model.safetensors",
        "encoder.layers.1.mlp.fc2.bias",
        "encoder.layers.1.mlp.fc3.weight",
        "encoder.layers.0.self_attn.k_proj.weight",
    ):
        assert name in str(err.value)


def test_checkpoint_of_another_config_is_refused(tiny):
    module, _ = tiny
    other = numpy_state_dict(torch_clip(dict(TINY, num_hidden_layers=3)))
    with pytest.raises(ConversionError, match=r"encoder\.layers\.2\.mlp\.fc1\.weight"):
        convert_clip_text(other, module)


def test_position_ids_buffer(tiny):
    module, sd = tiny
    sd = transformers4_layout(sd)
    key = "text_model.embeddings.position_ids"  # saved by transformers < 4.31
    chex.assert_trees_all_equal(
        convert_clip_text(dict(sd, **{key: np.arange(77)[None]}), module),
        convert_clip_text(sd, module),
    )
    shifted = np.arange(77)[None].copy()
    shifted[0, 50] = 49
    for bad in (shifted, np.arange(76)[None], np.arange(77)):
        with pytest.raises(ConversionError, match=key):
            convert_clip_text(dict(sd, **{key: bad}), module, source="old.bin")


def test_clip_model_checkpoint_is_named():
    config = transformers.CLIPConfig(
        text_config=TINY,
        projection_dim=16,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
    )
    sd = numpy_state_dict(transformers.CLIPModel(config))
    module = CLIPTextModel.from_config(config.text_config.to_dict())
    with pytest.raises(ConversionError, match="CLIPModel"):
        convert_clip_text(sd, module)
    # its text tower alone converts
    convert_clip_text({k: v for k, v in sd.items() if k.startswith("text_model.")}, module)


def test_text_model_with_projection_checkpoint_is_named(tiny):
    module, _ = tiny
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(**TINY, projection_dim=16)
    )
    with pytest.raises(ConversionError, match="CLIPTextModelWithProjection"):
        convert_clip_text(numpy_state_dict(model), module)


def test_converter_wants_a_clip_text_module(tiny):
    _, sd = tiny
    with pytest.raises(TypeError, match="module"):
        convert_clip_text(sd, object())


# --- call arguments -----------------------------------------------------------------------


def test_bad_input_ids_are_named(tiny):
    module, sd = tiny
    params = convert_clip_text(sd, module)
    ids = token_ids(77)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        module.apply({"params": params}, np.concatenate([ids, ids[:, :1]], axis=1))
    with pytest.raises(TypeError, match="input_ids"):
        module.apply({"params": params}, ids.astype(np.float32))
    with pytest.raises(ValueError, match="input_ids"):
        module.apply({"params": params}, ids[0])
