"""Test set-up: 8 simulated CPU devices (chex) for sharding tests, fast XLA:CPU compilation, a
float64 switch and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # read when jax is imported (chex imports it)
# The suite compiles a few thousand small programs and runs most of them once or twice. Without
# LLVM's optimisation passes (XLA:CPU's default is level 3) compilation is several times faster
# (FLIPD with Hutchinson probes on a toy score: 2.9 s -> 0.8 s) and the suite, tests/scoring
# aside, took 14:28 instead of 18:53 on 2 CPU cores. XLA's HLO passes and floating-point
# semantics (no fast math) are the same. XLA_FLAGS naming --xla_backend_optimization_level wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
    ).strip()

import chex  # noqa: E402

chex.set_n_cpu_devices(8)  # before any JAX computation initialises the CPU backend

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module. XLA:CPU maps about three memory
    regions per live executable, and the suite compiles enough of them to reach Linux's default
    limit of 65,530 mappings per process (vm.max_map_count): LLVM then fails with "Cannot
    allocate memory" and the process aborts, with gigabytes of RAM still free."""
    yield
    jax.clear_caches()


@pytest.fixture
def x64():
    """Run the test in float64 (``jnp.asarray`` of Python floats gives float64)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def jit_call():
    """``jit_call(fn, *args) == fn(*args)``, compiled once per function and argument shapes, for
    the whole session. Score and noise functions are Partials over network weights: called
    directly they run the network op by op, each operation compiled on first use."""
    return jax.jit(lambda fn, *args: fn(*args))


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Run the test once per precision; yields the dtype name with x64 switched accordingly."""
    with jax.enable_x64(request.param == "float64"):
        yield request.param


def _tiny_tokenizer_files() -> dict[str, str]:
    """A CLIP BPE tokenizer folder in Stable Diffusion v1's layout (vocab.json, merges.txt,
    tokenizer and special-token configs; 77 tokens), with a tiny vocabulary: the special tokens,
    every letter alone and word-final, and a few merges."""
    import json
    import string

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + ",.!'":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "t h", "th e</w>"]
    for token in ("ca", "cat</w>", "th", "the</w>"):
        vocab[token] = len(vocab)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    return {
        "vocab.json": json.dumps(vocab),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(special),
        "tokenizer_config.json": json.dumps(
            {**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
        ),
    }


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny random Stable Diffusion v1-style pipeline saved with diffusers' save_pretrained
    (UNet 2 levels with cross-attention, 2-level VAE, 2-layer CLIP text encoder, a tiny BPE
    tokenizer, SD v1's DDIM scheduler config); 16x16 images, 4x8x8 latents. No network."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=70,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    with torch.no_grad():  # biases and norm scales off their default 0 and 1
        for model in (unet, vae, text):
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    root = tmp_path_factory.mktemp("sd")
    tokenizer_dir = root / "tokenizer_src"
    tokenizer_dir.mkdir()
    for name, text_ in _tiny_tokenizer_files().items():
        (tokenizer_dir / name).write_text(text_)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / "pipeline"
    pipe.save_pretrained(folder)
    for path in (folder / "tokenizer").iterdir():  # SD v1's tokenizer layout, not transformers 5's
        path.unlink()
    for name, text_ in _tiny_tokenizer_files().items():
        (folder / "tokenizer" / name).write_text(text_)
    return folder, pipe


@pytest.fixture(scope="session")
def sd(sd_folder):
    """``sd_folder``'s pipeline loaded in float32 (shared: loading compiles the text encoder)."""
    from mmh_jax.models import load_stable_diffusion

    return load_stable_diffusion(sd_folder[0])


@pytest.fixture(scope="session")
def sd16(sd_folder):
    """``sd_folder``'s pipeline computing in bfloat16."""
    import jax.numpy as jnp

    from mmh_jax.models import load_stable_diffusion

    return load_stable_diffusion(sd_folder[0], dtype=jnp.bfloat16)
