"""Image complexity as PNG compression length, and LID normalised by it (paper, App. C.2).

LID is correlated with image complexity, and simple images are more often memorized, so the
paper divides LID by the image's PNG length at OpenCV's maximum compression level 9 (after
Kamkari et al. 2024b) to remove that confound.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmh_jax._src.images import to_uint8

__all__ = ["png_length", "normalized_lid", "to_uint8_nhwc"]


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("png_length needs OpenCV: pip install opencv-python-headless") from err
    return cv2


def to_uint8_nhwc(images: Any) -> np.ndarray:
    """Images as uint8 ``[n, h, w, c]``.

    Args:
        images: uint8 ``[n, h, w, c]`` / ``[h, w, c]`` (``c`` in 1, 3, 4) or ``[n, h, w]``
            gray; or float ``[n, c, h, w]`` / ``[c, h, w]`` in ``[-1, 1]``, converted as the
            scoring engine does, ``clip(round((x + 1) * 127.5), 0, 255)``.

    Returns:
        A uint8 array of shape ``[n, h, w, c]``.

    Raises:
        ValueError: Another dtype or rank, or a channel count other than 1, 3 or 4.
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        if x.ndim == 3 and x.shape[-1] not in (1, 3, 4):
            x = x[..., None]  # [n, h, w] gray
        elif x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"uint8 images must be [n, h, w, c], got shape {x.shape}")
    elif np.issubdtype(x.dtype, np.floating):
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"float images must be [n, c, h, w] in [-1, 1], got shape {x.shape}")
        x = to_uint8(x)
    else:
        raise ValueError(f"images must be uint8 NHWC or float NCHW in [-1, 1], got {x.dtype}")
    if x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels, got shape {x.shape}")
    return x


def png_length(images: Any, *, level: int = 9) -> np.ndarray:
    """The length in bytes of each image encoded as PNG by OpenCV, the paper's complexity proxy.

    Each image is encoded with ``cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION,
    level])``. OpenCV reads 3- and 4-channel arrays as BGR(A), so RGB(A) images are reordered
    to BGR(A) first and the bytes are those of the image as given.

    Args:
        images: See :func:`to_uint8_nhwc` (RGB channel order).
        level: The PNG compression level, 0-9 (the paper uses 9).

    Returns:
        An int64 array of shape ``[n]``.

    Raises:
        ImportError: OpenCV is not installed.
        ValueError: Bad images (see :func:`to_uint8_nhwc`), a level outside 0-9, or a
            failed encoding.
    """
    if not 0 <= level <= 9:
        raise ValueError(f"PNG compression level must be in 0-9, got {level}")
    cv2 = _cv2()
    x = to_uint8_nhwc(images)
    out = np.empty(x.shape[0], dtype=np.int64)
    for i, img in enumerate(x):
        if img.shape[-1] == 1:
            img = img[..., 0]
        elif img.shape[-1] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        else:
            img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
        ok, encoded = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, int(level)])
        if not ok:  # pragma: no cover - OpenCV failure
            raise ValueError(f"OpenCV could not encode image {i} as PNG")
        out[i] = encoded.size
    return out


def normalized_lid(lid: Any, png_length: Any) -> np.ndarray:
    """LID normalised by image complexity: ``LID / PNG length`` (paper, Appendix C.2).

    The paper "normalize[s] it [LID] by PNG compression length, using it as a proxy for image
    complexity", so the normalised value of item ``i`` is ``lid[i] / png_length[i]`` (LID per
    byte of compressed image). Low values flag memorization, as for LID itself.

    Args:
        lid: LID estimates, shape ``[n]``.
        png_length: PNG lengths in bytes, shape ``[n]`` (from :func:`png_length`).

    Returns:
        A float64 array of shape ``[n]``.

    Raises:
        ValueError: Shapes that differ, or a PNG length that is not positive.
    """
    lid = np.asarray(lid, dtype=np.float64)
    length = np.asarray(png_length, dtype=np.float64)
    if lid.shape != length.shape:
        raise ValueError(f"lid has shape {lid.shape} but png_length has shape {length.shape}")
    bad = ~(length > 0)
    if bad.any():
        i = int(np.argmax(bad.ravel()))
        raise ValueError(f"png_length must be positive, got {length.ravel()[i]} at index {i}")
    return lid / length
