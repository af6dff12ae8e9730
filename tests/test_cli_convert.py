"""``mmh-jax convert``: outputs against PyTorch / the original code, and one-line errors."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import safe_open
from safetensors.numpy import save_file

from mmh_jax.cli import main
from mmh_jax.models import load_iddpm, load_unet2d

FIXTURE = Path(__file__).parent / "models" / "fixtures" / "iddpm_tiny.safetensors"


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A tiny random diffusers UNet2DModel and a DDPM scheduler saved in one folder."""
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    with torch.no_grad():  # biases and norm scales off their default 0 and 1
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("diffusers")
    model.save_pretrained(folder)
    DDPMScheduler().save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def iddpm_tiny(tmp_path_factory):
    """The iddpm_tiny fixture (see tests/models/test_iddpm.py) as a torch.save checkpoint."""
    with safe_open(str(FIXTURE), framework="numpy") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    io = {k.split("/")[1]: v for k, v in tensors.items() if k.startswith("fixture/")}
    state_dict = {
        k: torch.from_numpy(v.astype(np.float32) * np.float32(2.0 ** -meta["exponents"][k]))
        for k, v in tensors.items()
        if not k.startswith("fixture/")
    }
    path = tmp_path_factory.mktemp("iddpm") / "tiny.pt"
    torch.save(state_dict, path)
    return path, io, meta["flags"]


def _options(flags):
    """improved-diffusion flags as ``convert iddpm`` options."""
    out = []
    for name, value in flags.items():
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(option if value else option.replace("--", "--no-", 1))
        else:
            out += [option, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return out


def _run(argv, capsys):
    """``main(argv)``'s exit status, stdout and stderr (argparse errors included)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(err, *fragments):
    assert "Traceback" not in err and err.startswith("mmh-jax")
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.slow
def test_unet2d_matches_diffusers(diffusers_folder, tmp_path, capsys):
    folder, model = diffusers_folder
    out = tmp_path / "unet.safetensors"
    code, stdout, err = _run(["convert", "unet2d", str(folder), "-o", str(out)], capsys)
    assert code == 0, err
    assert f"{sum(p.numel() for p in model.parameters()):,}" in stdout
    assert "block_out_channels" in stdout and "T = 1000" in stdout

    loaded = load_unet2d(out)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    t = np.array([10.0, 700.5], np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    got = np.asarray(jax.jit(loaded.module.apply)({"params": loaded.params}, x, t))
    assert np.max(np.abs(got - ref)) <= 1e-4
    np.testing.assert_allclose(
        loaded.schedule.alphas_cumprod, DDPMScheduler().alphas_cumprod.numpy(), rtol=1e-6
    )


@pytest.mark.slow
def test_iddpm_matches_original(iddpm_tiny, tmp_path, capsys):
    path, io, flags = iddpm_tiny
    out = tmp_path / "iddpm.safetensors"
    code, stdout, err = _run(
        ["convert", "iddpm", str(path), "-o", str(out), *_options(flags)], capsys
    )
    assert code == 0, err
    loaded = load_iddpm(out)  # the flags come from the file
    n = sum(leaf.size for leaf in jax.tree.leaves(loaded.params))
    assert f"{n:,}" in stdout and "cosine" in stdout and "T = 4000" in stdout
    got = jax.jit(loaded.module.apply)({"params": loaded.params}, io["x"], io["timesteps"])
    assert np.max(np.abs(np.asarray(got) - io["out"])) <= 1e-4


def test_iddpm_wrong_flags_lists_the_mismatch(iddpm_tiny, tmp_path, capsys):
    path, _, flags = iddpm_tiny
    out = tmp_path / "iddpm.safetensors"
    argv = ["convert", "iddpm", str(path), "-o", str(out), *_options(flags)]
    code, _, err = _run([*argv, "--num-res-blocks", "2"], capsys)
    assert code == 1 and "Traceback" not in err and err.startswith("mmh-jax: error: ")
    assert "missing from the checkpoint" in err and "input_blocks.3.0.op.weight" in err
    assert "unexpected keys" in err and "input_blocks.2.0.op.weight" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--num-heads", "3"], ["--num-heads"]),  # 3 heads do not divide 32 channels
        (["--noise-schedule", "quadratic"], ["--noise-schedule"]),  # argparse's choices
        (["--channel-mult", "1,x"], ["--channel-mult"]),
        (["--image-size", "big"], ["--image-size"]),
    ],
)
def test_iddpm_bad_flag_values(iddpm_tiny, tmp_path, capsys, options, fragments):
    path, _, flags = iddpm_tiny
    out = tmp_path / "iddpm.safetensors"
    code, _, err = _run(
        ["convert", "iddpm", str(path), "-o", str(out), *_options(flags), *options], capsys
    )
    assert code == 2
    _one_line_error(err, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("architecture", ["unet2d", "iddpm"])
def test_missing_input(architecture, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code, _, err = _run(
        ["convert", architecture, str(tmp_path / "nowhere.pt"), "-o", str(out)], capsys
    )
    assert code == 2
    _one_line_error(err, "nowhere.pt", "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "output, fragment",
    [
        ("unet.pt", ".safetensors"),
        ("no-such-folder/unet.safetensors", "does not exist"),
    ],
)
def test_bad_output_path(diffusers_folder, tmp_path, capsys, output, fragment):
    folder, _ = diffusers_folder
    code, _, err = _run(["convert", "unet2d", str(folder), "-o", str(tmp_path / output)], capsys)
    assert code == 2
    _one_line_error(err, "-o/--output", fragment)
    assert list(tmp_path.iterdir()) == []


def test_output_is_the_checkpoint(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    save_file({"a": np.zeros(1, np.float32)}, str(source))
    before = source.read_bytes()
    code, _, err = _run(["convert", "iddpm", str(source), "-o", str(source)], capsys)
    assert code == 2
    _one_line_error(err, "the checkpoint itself")
    assert source.read_bytes() == before


def test_unet2d_without_scheduler_config(diffusers_folder, tmp_path, capsys):
    folder, _ = diffusers_folder
    model_only = tmp_path / "model"
    shutil.copytree(folder, model_only)
    (model_only / "scheduler_config.json").unlink()
    out = tmp_path / "unet.safetensors"
    code, _, err = _run(["convert", "unet2d", str(model_only), "-o", str(out)], capsys)
    assert code == 2
    _one_line_error(err, "scheduler_config.json")
    assert "schedule=" not in err  # the Python API's hint is no use on the command line
    assert not out.exists()


def test_help(capsys):
    for argv, fragments in [
        (["convert", "--help"], ["unet2d", "iddpm", "stylegan2"]),
        (
            ["convert", "stylegan2", "--help"],
            ["--network", "G_ema", "--init-kwargs", "never imports or executes"],
        ),
        (["gan", "lid", "--help"], ["--num-samples", "--wrt", "--percentile", "--labels"]),
        (["convert", "unet2d", "--help"], ["FOLDER", "--output", "scheduler_config.json"]),
        (
            ["convert", "iddpm", "--help"],
            [
                "--learn-sigma",
                "--no-learn-sigma",
                "--channel-mult",
                "--noise-schedule",
                "(default: 1000)",
                "(default: linear)",
            ],
        ),
    ]:
        code, stdout, _ = _run(argv, capsys)
        assert code == 0
        for fragment in fragments:
            assert fragment in stdout, (argv, fragment)


STYLEGAN2 = Path(__file__).parent / "models" / "fixtures" / "stylegan2"


@pytest.mark.parametrize("network, outputs", [("G_ema", "img_const"), ("G", "G_img_const")])
def test_stylegan2_pickle_matches_original(tmp_path, capsys, network, outputs):
    out = tmp_path / "g.safetensors"
    code, stdout, err = _run(
        [
            "convert",
            "stylegan2",
            str(STYLEGAN2 / "skip_cond.pkl"),
            "-o",
            str(out),
            "--network",
            network,
        ],
        capsys,
    )
    assert code == 0, err
    assert "skip" in stdout and "16 / 16 / 3" in stdout and "num_ws" in stdout
    assert "schedule" not in stdout
    from mmh_jax.models import load_stylegan2

    loaded = load_stylegan2(out)
    n = sum(leaf.size for leaf in jax.tree.leaves(loaded.params))
    assert f"{n:,}" in stdout
    ref = np.load(STYLEGAN2 / "skip_cond.npz")
    got = jax.jit(loaded.generate)(ref["z"], ref["c"])
    assert np.max(np.abs(np.asarray(got) - ref[outputs])) <= 1e-4


@pytest.mark.slow
def test_stylegan2_state_dict_needs_init_kwargs(tmp_path, capsys):
    from mmh_jax.convert.safe_pickle import read_network_pickle

    record = read_network_pickle(STYLEGAN2 / "orig.pkl")["G_ema"]
    source = tmp_path / "G_ema.safetensors"
    save_file({k: np.asarray(v, order="C") for k, v in record.state_dict().items()}, str(source))
    out = tmp_path / "out.safetensors"
    code, _, err = _run(["convert", "stylegan2", str(source), "-o", str(out)], capsys)
    assert code == 2
    _one_line_error(err, "plain state dict", "init_kwargs")
    kwargs = tmp_path / "kwargs.json"
    kwargs.write_text(json.dumps(record.init_kwargs))
    code, _, err = _run(
        ["convert", "stylegan2", str(source), "-o", str(out), "--init-kwargs", str(kwargs)], capsys
    )
    assert code == 0, err
    ref = np.load(STYLEGAN2 / "orig.npz")
    from mmh_jax.models import load_stylegan2

    got = load_stylegan2(out).generate(ref["z"], ref["c"], truncation_psi=0.7)
    assert np.max(np.abs(np.asarray(got) - ref["img_const_psi07"])) <= 1e-4


def test_stylegan2_refuses_code_in_the_pickle(tmp_path, capsys):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    source = tmp_path / "evil.pkl"
    source.write_bytes(pickle.dumps({"G_ema": Exploit()}, protocol=3))
    out = tmp_path / "out.safetensors"
    code, _, err = _run(["convert", "stylegan2", str(source), "-o", str(out)], capsys)
    assert code == 1
    _one_line_error(err, "system")
    assert not marker.exists() and not out.exists()


def test_stylegan2_text_file_is_not_called_a_state_dict(tmp_path, capsys):
    source = tmp_path / "generator.txt"
    source.write_text("hello")
    code, _, err = _run(
        ["convert", "stylegan2", str(source), "-o", str(tmp_path / "o.safetensors")], capsys
    )
    assert code == 1
    _one_line_error(err, "generator.txt", ".pkl", "'.txt'")
    assert "plain state dict" not in err


@pytest.mark.parametrize(
    "name, content",
    [
        ("model.txt", b"hello"),
        ("model.pt", b"hello"),
        ("model.safetensors", FIXTURE.read_bytes()[:100]),
    ],
    ids=["text", "not-torch", "truncated"],
)
def test_iddpm_unreadable_file_has_no_flags_hint(name, content, tmp_path, capsys):
    source = tmp_path / name
    source.write_bytes(content)
    code, _, err = _run(
        ["convert", "iddpm", str(source), "-o", str(tmp_path / "o.safetensors")], capsys
    )
    assert code == 1
    _one_line_error(err, name)
    assert "flags" not in err


@pytest.fixture
def plain_iddpm(iddpm_tiny, tmp_path):
    """The iddpm_tiny state dict as a plain (unconverted) .safetensors file."""
    path, _, flags = iddpm_tiny
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.numpy() for k, v in torch.load(path).items()}, str(plain))
    return plain, flags


def test_plain_iddpm_safetensors_suggests_convert(plain_iddpm):
    from mmh_jax.convert import ConversionError

    plain, _ = plain_iddpm
    with pytest.raises(ConversionError, match="mmh-jax convert iddpm") as err:
        load_iddpm(plain)  # improved-diffusion's default flags: not this network
    assert "does not match" in str(err.value)


@pytest.mark.parametrize(
    "loader, command",
    [
        ("load_unet2d", "mmh-jax convert unet2d"),
        ("load_stable_diffusion", "mmh-jax convert stable-diffusion"),
    ],
)
def test_unconverted_file_names_the_command(plain_iddpm, loader, command):
    import mmh_jax.models
    from mmh_jax.convert import ConversionError

    plain, _ = plain_iddpm
    with pytest.raises(ConversionError) as err:
        getattr(mmh_jax.models, loader)(plain)
    message = str(err.value)
    assert command in message and "save_" not in message and "None" not in message
    other = plain.with_suffix(".pt")
    other.write_bytes(b"x")
    with pytest.raises(ConversionError) as err:
        getattr(mmh_jax.models, loader)(other)
    assert command in str(err.value) and "save_" not in str(err.value)
