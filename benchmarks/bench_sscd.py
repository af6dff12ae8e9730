"""Benchmark: SSCD descriptors (ResNet-50 trunk, GeM, 512-d head) in Flax against PyTorch.

Run it through the runner: ``python -m benchmarks run sscd [--set sscd.batch=16]``.

Random weights (seeded, batch-norm statistics randomised), converted with
``mmh_jax.convert.convert_sscd``; both frameworks embed the same batch of ``batch`` random images
of ``size`` x ``size`` (224 for the figure of record) in fp32. The PyTorch model is
``torchvision.models.resnet50`` when torchvision imports, otherwise an equivalent module defined
here with torchvision's layout and parameter names (the torchvision wheel available in some
environments is a CUDA build that does not load with a CPU torch). Sides ``jax`` and ``torch``,
interleaved round by round after one warm-up call each, so load drift on a shared machine hits
both alike.

Ratio of record: ``torch / jax`` (the JAX / PyTorch images-per-second ratio). Notes: the torch
model's source, its thread count, and the largest difference of the two frameworks'
descriptors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks._common import case_record, interleaved


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the sscd benchmark (defaults: RESULTS.md's record)."""

    batch: int = 32
    size: int = 224


TINY = Config(batch=1, size=32)


def _torch_model(dim: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    try:
        import torchvision

        trunk = torchvision.models.resnet50(num_classes=dim)
        source = f"torchvision {torchvision.__version__}"
    except Exception:  # not installed, or a build that does not load with this torch
        trunk, source = None, "local torchvision-layout ResNet-50"

    class Bottleneck(nn.Module):
        def __init__(self, inp, planes, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
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

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            inp = 64
            for i, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
                blocks = []
                for j in range(n):
                    blocks.append(Bottleneck(inp, planes, 2 if (j == 0 and i > 1) else 1))
                    inp = planes * 4
                setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.fc = nn.Linear(2048, dim)

    class TorchSSCD(nn.Module):
        def __init__(self, trunk):
            super().__init__()
            self.trunk = trunk

        def forward(self, x):
            t = self.trunk
            x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
            x = t.layer4(t.layer3(t.layer2(t.layer1(x))))
            x = x.clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
            return F.normalize(t.fc(x), dim=-1)

    torch.manual_seed(0)
    trunk = trunk if trunk is not None else ResNet50()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
    return TorchSSCD(trunk).eval(), trunk, source


def run(config: Config, *, repeats: int) -> list[dict[str, Any]]:
    """Measure the Flax SSCD against PyTorch on the same weights and images; one case."""
    import jax
    import jax.numpy as jnp
    import torch

    from mmh_jax.convert.sscd import convert_sscd
    from mmh_jax.models.sscd import SSCD

    model, trunk, source = _torch_model(512)
    state = {k: v.detach().numpy() for k, v in trunk.state_dict().items()}
    module = SSCD(arch="resnet50", embedding_dim=512)
    params = jax.tree.map(jnp.asarray, convert_sscd(state, module))
    b, s = config.batch, config.size
    x_np = np.random.default_rng(0).standard_normal((b, 3, s, s)).astype(np.float32)
    x, xt = jnp.asarray(x_np), torch.from_numpy(x_np)
    apply = jax.jit(module.apply)

    def run_torch():
        with torch.no_grad():
            return model(xt)

    def sync(out):
        return jax.block_until_ready(out) if isinstance(out, jax.Array) else out

    diff = float(np.max(np.abs(np.asarray(apply({"params": params}, x)) - run_torch().numpy())))
    timings = interleaved(
        {"jax": lambda: apply({"params": params}, x), "torch": run_torch}, repeats, sync
    )
    return [
        case_record(
            f"SSCD resnet50 -> 512, batch {b}, {s}x{s}",
            timings,
            ratios={"JAX / PyTorch images/s": ("torch", "jax")},
            notes={
                "torch_model": source,
                "torch_threads": torch.get_num_threads(),
                "max_abs_descriptor_difference": diff,
            },
        )
    ]
