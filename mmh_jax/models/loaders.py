"""Loading diffusers ``UNet2DModel`` checkpoints (local files only) as :class:`Pretrained`.

:func:`load_unet2d` reads a diffusers model folder (``config.json`` plus
``diffusion_pytorch_model.safetensors`` or ``.bin``), a pipeline folder holding it under
``unet/``, or a single ``.safetensors`` file written by :func:`save_unet2d` (converted
parameters, config and schedule; no torch needed). The noise schedule comes from the
scheduler config saved beside the model unless one is passed. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmh_jax.convert.core import ConversionError, check_params
from mmh_jax.convert.io import load_params, read_state_dict, save_params
from mmh_jax.convert.unet2d import convert_unet2d, unet2d_abstract_params
from mmh_jax.models.pretrained import Prediction, Pretrained, eps_score_fn
from mmh_jax.models.unet2d import UNet2D
from mmh_jax.schedules import DDPM

__all__ = [
    "load_unet2d",
    "save_unet2d",
    "ddpm_from_scheduler_config",
    "prediction_type_from_scheduler_config",
    "read_json",
]

_ARCHITECTURE = "unet2d"
_CONVERT = "`mmh-jax convert unet2d FOLDER -o OUT.safetensors`"
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTIONS = ("epsilon", "v_prediction")


def ddpm_from_scheduler_config(config: Mapping[str, Any]) -> DDPM:
    """The :class:`DDPM` schedule of a diffusers scheduler config (``scheduler_config.json``).

    Reads ``num_train_timesteps`` (default 1000), ``beta_schedule`` (``"linear"``,
    ``"scaled_linear"`` or ``"squaredcos_cap_v2"``), ``beta_start``, ``beta_end`` and
    ``trained_betas`` with diffusers' defaults, as ``DDPMScheduler`` and its siblings do; the
    sampling settings are irrelevant here and skipped.

    Args:
        config: the parsed scheduler config.

    Returns:
        The schedule (cumulative products in float64 arithmetic, stored in JAX's default float).

    Raises:
        ValueError: ``prediction_type`` other than ``"epsilon"`` or ``"v_prediction"`` (see
            :func:`prediction_type_from_scheduler_config`), ``rescale_betas_zero_snr``
            (``abar_T = 0`` has no finite score), or an unsupported ``beta_schedule``.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}")
    prediction_type_from_scheduler_config(config)
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError(
            "scheduler config: rescale_betas_zero_snr=True is not supported "
            "(abar_T = 0 gives an infinite score)"
        )
    if config.get("trained_betas") is not None:
        return DDPM.from_betas(config["trained_betas"])
    steps = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    start, end = config.get("beta_start", 0.0001), config.get("beta_end", 0.02)
    if kind == "linear":
        return DDPM.linear(T=steps, beta_start=start, beta_end=end)
    if kind == "scaled_linear":
        return DDPM.scaled_linear(T=steps, beta_start=start, beta_end=end)
    if kind == "squaredcos_cap_v2":
        return DDPM.cosine(T=steps)
    raise ValueError(
        f"scheduler config: beta_schedule={kind!r} is not supported; expected one of "
        f"{_BETA_SCHEDULES} or trained_betas"
    )


def prediction_type_from_scheduler_config(config: Mapping[str, Any]) -> Prediction:
    """What the network of a diffusers scheduler config predicts (``prediction_type``, default
    ``"epsilon"``); ``"sample"`` (x_0) models are refused, naming the key."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ValueError(
            f"scheduler config: prediction_type={prediction!r} is not supported; "
            f"expected one of {_PREDICTIONS}"
        )
    return prediction


def read_json(path: Path) -> dict:
    """A JSON file's contents; a parse error names the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from None


def _model_folder(path: Path) -> Path:
    for folder in (path, path / "unet"):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(
        f"{str(path)!r} holds neither config.json nor unet/config.json "
        "(expected a diffusers model or pipeline folder)"
    )


def _scheduler_config(path: Path) -> Path:
    candidates = [path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"]
    if path.name == "unet":  # a pipeline's unet folder: its scheduler lies beside it
        candidates.append(path.parent / "scheduler" / "scheduler_config.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no scheduler config for {str(path)!r} (looked for "
        f"{', '.join(repr(str(c)) for c in candidates)}); pass schedule= explicitly"
    )


def _from_folder(folder: Path, dtype: Any) -> tuple[UNet2D, dict]:
    config_file = folder / "config.json"
    try:
        module = UNet2D.from_config(read_json(config_file), dtype=dtype)
    except ValueError as err:
        raise ValueError(f"{str(config_file)!r}: {err}") from None
    weights = [folder / name for name in _WEIGHTS if (folder / name).is_file()]
    if not weights:
        raise FileNotFoundError(f"{str(folder)!r} holds none of {', '.join(_WEIGHTS)}")
    params = convert_unet2d(read_state_dict(weights[0]), module, source=repr(str(weights[0])))
    return module, params


def _load_converted(
    path: Path, architecture: str, what: str, folder: str, convert: str
) -> tuple[dict, dict]:
    """``(params, metadata)`` of a ``.safetensors`` file that :func:`save_params` wrote for
    ``architecture``, else a :class:`ConversionError` naming ``what`` model it should hold, the
    ``folder`` to pass instead and the ``convert`` command."""
    if path.suffix != ".safetensors":
        raise ConversionError(
            f"{str(path)!r}: expected a {folder} or a .safetensors file written by {convert}"
        )
    params, metadata = load_params(path)
    held = metadata.get("architecture")
    if held != architecture:
        held = (
            f"holds a {held!r} model, not a {what}"
            if held
            else f"is not a converted {what} (it has no mmh-jax metadata)"
        )
        raise ConversionError(
            f"{str(path)!r} {held}: pass the {folder}, or convert it with {convert}"
        )
    return params, metadata


def _from_converted(path: Path, dtype: Any) -> tuple[UNet2D, dict, DDPM, Prediction]:
    what, folder = "diffusers UNet2DModel", "diffusers folder (with config.json)"
    params, metadata = _load_converted(path, _ARCHITECTURE, what, folder, _CONVERT)
    try:
        module = UNet2D.from_config(metadata["config"], dtype=dtype)
        stored = metadata["schedule"]
        dtype = jnp.result_type(float)
        schedule = DDPM(
            jnp.asarray(np.asarray(stored["alphas_cumprod"]), dtype),
            jnp.asarray(np.asarray(stored["log_alphas_cumprod"]), dtype),
        )
        prediction = prediction_type_from_scheduler_config(metadata)
    except (KeyError, TypeError, ValueError) as err:
        raise ConversionError(f"{str(path)!r}: bad config or schedule metadata: {err}") from None
    params = check_params(
        params, unet2d_abstract_params(module), source=repr(str(path)), dtype=module.param_dtype
    )
    return module, params, schedule, prediction


def load_unet2d(
    path: str | os.PathLike, *, schedule: DDPM | None = None, dtype: Any = jnp.float32
) -> Pretrained:
    """Load a diffusers ``UNet2DModel`` (a noise or v predictor) from local files.

    Args:
        path: a diffusers model folder (``config.json`` and
            ``diffusion_pytorch_model.safetensors`` or ``.bin``), a pipeline folder with the
            model in ``unet/``, or a ``.safetensors`` file written by :func:`save_unet2d`.
        schedule: the noise schedule; by default a folder's ``scheduler_config.json``
            (in the folder, its ``scheduler/`` child, or for a pipeline's ``unet/`` folder the
            pipeline's ``scheduler/``), or the schedule stored in a converted file. The
            scheduler config's ``prediction_type`` (``"epsilon"`` when there is none) decides
            how the score is read off the network.
        dtype: the module's compute dtype (parameters stay float32).

    Returns:
        ``Pretrained(module, params, schedule, score_fn)``.

    Raises:
        FileNotFoundError: no such path, no config or weights in the folder, or no scheduler
            config (and no ``schedule``).
        ConversionError: weights that do not match the config, or an unreadable file.
        ValueError: a config this port does not support (naming the key and the file).
    """
    if schedule is not None and not isinstance(schedule, DDPM):
        raise TypeError(f"schedule must be a DDPM schedule or None, got {type(schedule).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"UNet2D checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        folder = _model_folder(path)
        module, params = _from_folder(folder, dtype)
        prediction = "epsilon"
        if schedule is None:
            config_file = _scheduler_config(folder)
            try:
                config = read_json(config_file)
                schedule = ddpm_from_scheduler_config(config)
                prediction = prediction_type_from_scheduler_config(config)
            except ValueError as err:
                raise ValueError(f"{str(config_file)!r}: {err}") from None
    else:
        module, params, stored, prediction = _from_converted(path, dtype)
        schedule = stored if schedule is None else schedule
    params = jax.tree.map(jnp.asarray, params)
    score_fn = eps_score_fn(module, params, schedule, prediction_type=prediction)
    return Pretrained(module, params, schedule, score_fn)


def save_unet2d(path: str | os.PathLike, model: Pretrained) -> Path:
    """Write a loaded UNet2D (parameters, config, schedule) to one ``.safetensors`` file.

    :func:`load_unet2d` reads it back without torch. The config, the schedule's
    ``alphas_cumprod`` and ``log_alphas_cumprod`` and the prediction type of its score function
    are stored as JSON metadata.

    Args:
        path: the target file; must end in ``.safetensors``.
        model: what :func:`load_unet2d` returned (its ``module`` must be a :class:`UNet2D`).

    Returns:
        The path written.
    """
    if not isinstance(model.module, UNet2D):
        raise TypeError(f"model.module must be a UNet2D, got {type(model.module).__name__}")
    metadata = {
        "architecture": _ARCHITECTURE,
        "config": model.module.to_config(),
        "schedule": {
            name: np.asarray(getattr(model.schedule, name), np.float64).tolist()
            for name in ("alphas_cumprod", "log_alphas_cumprod")
        },
        "prediction_type": model.score_fn.func.__self__.prediction_type,
    }
    return save_params(path, jax.device_get(model.params), metadata=metadata)
