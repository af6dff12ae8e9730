"""SSCD port: parity with a torch reference in torchvision's layout, the TorchScript reader
(including refusal of malicious archives), the loaders and the preprocessing.

The reference trunk is written here in torch with torchvision's module names (conv1, bn1,
layer1-4 of Bottleneck blocks, downsample.0/.1, fc) because the torchvision wheel available to
this environment is a CUDA build that does not import with torch 2.13.0+cpu (the CPU build
is on download.pytorch.org only).
"""

from __future__ import annotations

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from mmh_jax.convert import ConversionError, UnsafePickleError  # noqa: E402
from mmh_jax.convert.sscd import convert_sscd  # noqa: E402
from mmh_jax.convert.torchscript import read_torchscript_archive  # noqa: E402
from mmh_jax.models import (  # noqa: E402
    SSCD,
    load_sscd,
    save_sscd,
    sscd_preprocess,
    sscd_similarity,
)
from mmh_jax.models.sscd import PretrainedSSCD  # noqa: E402


class _RefBottleneck(nn.Module):
    def __init__(self, inp, planes, stride, groups, width_per_group):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        self.conv1 = nn.Conv2d(inp, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inp != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inp, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _RefTrunk(nn.Module):
    """A ResNet/ResNeXt with torchvision's parameter names (no fc)."""

    def __init__(self, counts, groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inp = 64
        for i, (n, planes) in enumerate(zip(counts, (64, 128, 256, 512)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(
                    _RefBottleneck(
                        inp, planes, 2 if (j == 0 and i > 1) else 1, groups, width_per_group
                    )
                )
                inp = planes * 4
            setattr(self, f"layer{i}", nn.Sequential(*blocks))

    def features(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _TorchSSCD(nn.Module):
    """Trunk + GeM(p=3) + fc + L2 normalisation, the SSCD torchvision-format model."""

    def __init__(self, trunk, dim):
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(2048, dim)

    def forward(self, x):
        h = self.trunk.features(x)
        h = h.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
        return F.normalize(self.fc(h), dim=-1)


def _randomise_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.num_batches_tracked.fill_(7)
    return model.eval()


def _state_dict(model, trunk_prefix="trunk."):
    return {
        k.removeprefix(trunk_prefix): v.detach().numpy().copy()
        for k, v in model.state_dict().items()
    }


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    model = _randomise_bn(_TorchSSCD(_RefTrunk((3, 4, 6, 3)), 512), 1)
    module = SSCD(arch="resnet50", embedding_dim=512)
    params = jax.tree.map(jnp.asarray, convert_sscd(_state_dict(model), module))
    return model, module, params, jax.jit(module.apply)


@pytest.fixture(scope="module")
def x_small():
    return np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.slow
def test_resnet50_parity(r50, x_small):
    model, _, params, apply = r50
    ref = _torch_out(model, x_small)
    out = np.asarray(apply({"params": params}, x_small))
    assert out.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
    err = np.max(np.abs(out - ref))
    assert err <= 1e-4, err


def _traced_archive(model, path, head="fc"):
    class Flat(nn.Module):  # torchvision's key layout at the top level
        def __init__(self):
            super().__init__()
            for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
                setattr(self, name, getattr(model.trunk, name))
            setattr(self, head, model.fc)

        def forward(self, x):
            h = model.trunk.features(x)
            h = h.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
            return F.normalize(getattr(self, head)(h), dim=-1)

    flat = Flat().eval()
    traced = torch.jit.trace(flat, torch.zeros(1, 3, 32, 32))
    torch.jit.save(traced, str(path))
    return flat


@pytest.mark.slow
def test_torchscript_archive_converts_to_same_params(r50, x_small, tmp_path):
    model, module, params, apply = r50
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    _traced_archive(model, path)
    sd = read_torchscript_archive(path)
    assert set(sd) == set(_state_dict(model))
    np.testing.assert_array_equal(
        sd["layer3.5.bn2.running_var"], model.trunk.layer3[5].bn2.running_var.numpy()
    )
    jax.tree.map(np.testing.assert_array_equal, convert_sscd(sd, module), jax.device_get(params))
    loaded = load_sscd(path, arch="resnet50")
    assert loaded.module.embedding_dim == 512
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)


@pytest.mark.slow
def test_embeddings_head_name(r50):
    model, module, params, _ = r50
    sd = {k.replace("fc.", "embeddings."): v for k, v in _state_dict(model).items()}
    jax.tree.map(np.testing.assert_array_equal, convert_sscd(sd, module), jax.device_get(params))
    with pytest.raises(ConversionError, match="GeM exponent"):
        convert_sscd({**sd, "avgpool.p": np.array([2.0], np.float32)}, module)


def test_torchvision_pt_and_safetensors_roundtrip(r50, tmp_path):
    model, _, params, _ = r50
    pt = tmp_path / "sscd_disc_mixup.torchvision.pt"
    torch.save({k: torch.from_numpy(v) for k, v in _state_dict(model).items()}, pt)
    loaded = load_sscd(pt, arch="resnet50")
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    st = save_sscd(tmp_path / "sscd.safetensors", loaded)
    again = load_sscd(st, arch="resnext101_32x4d")  # the file's own config wins
    assert again.module.arch == "resnet50"
    jax.tree.map(np.testing.assert_array_equal, again.params, params)


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _fake_archive(path, data_pkl: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", data_pkl)
        z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("m/code/__torch__.py", "")
        z.writestr("m/version", "3\n")


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_archive_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Evil(os.system, f"touch {marker}")
    else:
        payload = _Evil(eval, f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "evil.torchscript.pt"
    _fake_archive(path, pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafePickleError, match=kind.split(".")[1]):
        read_torchscript_archive(path)
    with pytest.raises(UnsafePickleError):
        load_sscd(path, arch="resnet50")
    assert not marker.exists()


def test_wrong_files(r50, tmp_path):
    _, module, _, _ = r50
    clip = tmp_path / "clip.pt"
    torch.save(
        {
            "text_model.embeddings.token_embedding.weight": torch.zeros(10, 4),
            "text_model.final_layer_norm.weight": torch.zeros(4),
        },
        clip,
    )
    with pytest.raises(ConversionError, match="clip.pt"):
        load_sscd(clip, arch="resnet50")
    unet = tmp_path / "unet.pt"
    torch.save(
        {
            "conv_in.weight": torch.zeros(8, 3, 3, 3),
            "fc.weight": torch.zeros(4, 8),
            "fc.bias": torch.zeros(4),
        },
        unet,
    )
    with pytest.raises(ConversionError, match="unet.pt.*does not match"):
        load_sscd(unet, arch="resnet50")
    not_ts = tmp_path / "notes.zip"
    with zipfile.ZipFile(not_ts, "w") as z:
        z.writestr("a/readme.txt", "hello")
    with pytest.raises(ConversionError, match="notes.zip"):
        read_torchscript_archive(not_ts)
    with pytest.raises(ConversionError, match="notes.zip"):
        load_sscd(not_ts)
    saved = tmp_path / "state.pt"  # a torch.save zip is not a TorchScript archive
    torch.save({"a": torch.zeros(1)}, saved)
    with pytest.raises(ConversionError, match="lacks.*torch.save"):
        read_torchscript_archive(saved)
    from mmh_jax.convert import save_params

    other = save_params(
        tmp_path / "other.safetensors",
        {"w": np.zeros(2, np.float32)},
        metadata={"architecture": "unet2d"},
    )
    with pytest.raises(ConversionError, match="unet2d"):
        load_sscd(other)
    with pytest.raises(TypeError, match="SSCD"):
        convert_sscd({}, object())


def test_preprocess_memorization_values():
    img = np.full((1, 300, 400, 3), 128, np.uint8)
    out = np.asarray(sscd_preprocess(img))
    assert out.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(out, (128 / 255 - 0.5) / 0.5, atol=1e-6)
    # An image whose short side is already 256 is not resized: the crop is exact.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 256, 300, 3), dtype=np.uint8)
    out = np.asarray(sscd_preprocess(img, mode="memorization"))
    want = (img[:, 16:240, 38:262].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out, want.transpose(0, 3, 1, 2), atol=1e-6)


@pytest.mark.slow
def test_similarity_is_the_inner_product_of_descriptors():
    """On a stand-in descriptor (the normalised mean colour of the preprocessed image): image
    i of one batch against image i of the other, in SSCD calls of ``batch_size`` images."""

    def embed(x):
        v = jnp.mean(x, axis=(2, 3)) + 2.0
        return v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    model = PretrainedSSCD(None, None, embed)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 300, 260, 3), dtype=np.uint8)  # another size
    want = np.sum(
        np.asarray(embed(sscd_preprocess(a))) * np.asarray(embed(sscd_preprocess(b))), axis=-1
    )
    got = sscd_similarity(model, a, b, batch_size=2)
    assert got.dtype == np.float64 and got.shape == (5,)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(sscd_similarity(model, a, a), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="pairs image i"):
        sscd_similarity(model, a, b[:3])


def test_preprocess_sscd_modes():
    img = np.ones((2, 200, 100, 3), np.float32) * np.array([0.485, 0.456, 0.406], np.float32)
    img[..., 0] += 0.229  # one std above the ImageNet mean in the red channel
    out = np.asarray(sscd_preprocess(img, mode="sscd_short_side_288"))
    assert out.shape == (2, 3, 576, 288)
    np.testing.assert_allclose(out[:, 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(out[:, 1:], 0.0, atol=1e-5)
    out = np.asarray(sscd_preprocess(img, mode="sscd_320"))
    assert out.shape == (2, 3, 320, 320)
    np.testing.assert_allclose(out[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        sscd_preprocess(img, mode="bogus")
    with pytest.raises(ValueError, match="b, h, w, 3"):
        sscd_preprocess(img.transpose(0, 3, 1, 2))


@pytest.mark.slow
def test_resnext101_32x4d_parity():
    torch.manual_seed(0)
    model = _randomise_bn(_TorchSSCD(_RefTrunk((3, 4, 23, 3), 32, 4), 1024), 2)
    module = SSCD(arch="resnext101_32x4d", embedding_dim=1024)
    params = convert_sscd(_state_dict(model), module)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    out = np.asarray(jax.jit(module.apply)({"params": params}, x))
    assert np.max(np.abs(out - _torch_out(model, x))) <= 1e-4
    with pytest.raises(
        ConversionError, match="(?s)unexpected keys.*wrong shapes"
    ):  # trunk mismatch
        convert_sscd(_state_dict(model), SSCD(arch="resnet50", embedding_dim=1024))
