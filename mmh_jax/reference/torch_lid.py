"""PyTorch reference implementations of FLIPD and the normal-bundle spectrum (needs torch).

For parity checks of a Flax port against the PyTorch model it was converted from, and for
benchmarks. They take the probes and the noise explicitly, so both sides can be fed the same
numbers. ``score_fn(x_t, t)`` is a torch callable with the convention of :mod:`mmh_jax.lid`:
``x_t [b, *event]``, ``t [b]`` continuous in ``(0, 1]``, returning ``grad log p_t(x_t)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

__all__ = [
    "eps_score_fn_torch",
    "cfg_score_fn_torch",
    "flipd_torch",
    "normal_bundle_spectrum_torch",
]

TorchScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _event(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape + (1,) * (like.ndim - 1))


def eps_score_fn_torch(
    eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    alphas_cumprod: torch.Tensor,
) -> TorchScoreFn:
    """``score(x_t, t) = -eps(x_t, T t - 1) / sqrt(1 - abar(t))`` for ``t`` on the grid ``i / T``.

    Args:
        eps_model: ``eps_model(x_t, timesteps) -> eps`` (e.g. ``lambda x, s: unet(x, s).sample``).
        alphas_cumprod: the model's ``[T]`` cumulative alphas.

    Returns:
        The score function. ``t`` must be a multiple of ``1 / T`` (no interpolation here).
    """
    T = alphas_cumprod.shape[0]

    def score_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = torch.round(t * T).long() - 1
        sigma = torch.sqrt(1.0 - alphas_cumprod[step]).to(x_t.dtype)
        return -eps_model(x_t, step.to(x_t.dtype)) / _event(sigma, x_t)

    return score_fn


def cfg_score_fn_torch(
    eps_model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    alphas_cumprod: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    *,
    detach_uncond: bool = False,
) -> TorchScoreFn:
    """The CFG-adjusted score ``-(eps_u + guidance (eps_c - eps_u)) / sigma`` of a text-conditional
    noise predictor (paper, Eq. 2), both branches in one call on the doubled batch.

    Args:
        eps_model: ``eps_model(x_t, timesteps, context) -> eps`` (e.g.
            ``lambda x, s, c: unet(x, s, encoder_hidden_states=c).sample``).
        alphas_cumprod: the model's ``[T]`` cumulative alphas.
        cond, uncond: the prompt's and the empty prompt's embeddings, batch 1 or that of ``x_t``.
        guidance: the guidance scale.
        detach_uncond: compute the unconditional branch without gradient (the public code's
            mistake: its Jacobian then misses that branch); for tests that show the difference.

    Returns:
        The score function; ``t`` must be a multiple of ``1 / T``.
    """
    T = alphas_cumprod.shape[0]

    def score_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        step = torch.round(t * T).long() - 1
        sigma = torch.sqrt(1.0 - alphas_cumprod[step]).to(x_t.dtype)
        c, u = cond.expand(b, *cond.shape[1:]), uncond.expand(b, *uncond.shape[1:])
        steps = step.to(x_t.dtype)
        if detach_uncond:
            eps_c = eps_model(x_t, steps, c)
            with torch.no_grad():
                eps_u = eps_model(x_t, steps, u)
        else:
            both = eps_model(torch.cat([x_t, x_t]), torch.cat([steps, steps]), torch.cat([u, c]))
            eps_u, eps_c = both[:b], both[b:]
        return -(eps_u + guidance * (eps_c - eps_u)) / _event(sigma, x_t)

    return score_fn


def flipd_torch(
    score_fn: TorchScoreFn,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    psi: torch.Tensor,
    sigma: torch.Tensor,
    probes: torch.Tensor,
    mode: Literal["reverse", "forward"] = "reverse",
) -> torch.Tensor:
    """FLIPD (paper Eq. 6) with the trace estimated from the given probes.

    ``FLIPD = d + sigma^2 (mean_i v_i^T J v_i + ||s||^2)`` with ``J`` the Jacobian of the score
    at ``psi x``. Reverse mode takes ``v^T J v = (J^T v) . v`` (one backward pass per probe);
    forward mode uses ``torch.func.jvp``.

    Args:
        score_fn: torch score function.
        x: ``[b, *event]`` points.
        t: ``[b]`` times.
        psi, sigma: ``[b]`` schedule values at ``t``.
        probes: ``[num_probes, b, *event]`` probe vectors.
        mode: differentiation mode.

    Returns:
        ``[b]`` FLIPD values.
    """
    d = x[0].numel()
    y = _event(psi, x) * x
    vjv = torch.zeros(x.shape[0], dtype=x.dtype)
    score = None
    for v in probes:
        if mode == "forward":
            s, jv = torch.func.jvp(lambda z: score_fn(z, t), (y,), (v,))
            vjv = vjv + (jv * v).flatten(1).sum(1)
        else:
            z = y.detach().requires_grad_(True)
            s = score_fn(z, t)
            (jtv,) = torch.autograd.grad(s, z, grad_outputs=v)
            vjv = vjv + (jtv * v).flatten(1).sum(1)
        score = s.detach() if score is None else score
    sq = (score**2).flatten(1).sum(1)
    return (d + sigma**2 * (vjv.detach() / probes.shape[0] + sq)).detach()


@torch.no_grad()
def normal_bundle_spectrum_torch(
    score_fn: TorchScoreFn,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    psi: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    center: bool = True,
) -> torch.Tensor:
    """Singular values of ``sigma S / sqrt(K)`` (Stanczuk et al. 2024), descending.

    ``S`` stacks the ``K`` scores at ``psi x + sigma noise_j``, centred over ``j`` if ``center``.

    Args:
        noise: ``[b, K, *event]`` standard normal draws.

    Returns:
        ``[b, d]`` singular values (zero-padded when ``K < d``).
    """
    b, K = noise.shape[:2]
    d = x[0].numel()
    out = torch.zeros(b, d, dtype=x.dtype)
    for i in range(b):
        x_t = psi[i] * x[i : i + 1] + sigma[i] * noise[i]
        s = score_fn(x_t, t[i].expand(K)).reshape(K, d) * sigma[i]
        if center:
            s = s - s.mean(0, keepdim=True)
        sv = torch.linalg.svdvals(s / K**0.5)
        out[i, : sv.shape[0]] = sv
    return out
