"""Named input preprocessing modes (SPEC §3): pixel values 0..255 to model input units."""

from __future__ import annotations

import importlib
import re

import numpy as np

PREPROCESS_MODES = ("tf", "torch", "caffe", "unit", "none")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
_KERAS_MODULE = re.compile(r"keras\.applications\.[a-z_][a-z0-9_]*")


def check_preprocess(mode: str) -> None:
    """Raises ValueError unless ``mode`` names a known preprocessing."""
    if mode in PREPROCESS_MODES:
        return
    if _KERAS_MODULE.fullmatch(mode or ""):
        module = _keras_module(mode)
        if module is None or not callable(getattr(module, "preprocess_input", None)):
            raise ValueError(f"{mode!r} has no preprocess_input; use a module of keras.applications "
                             "such as keras.applications.xception.")
        return
    raise ValueError(f"expected one of {PREPROCESS_MODES} or keras.applications.<module>; got {mode!r}.")


def _keras_module(mode: str):
    import keras  # imported lazily: only this mode needs it

    name = mode.split(".", 2)[2]
    return getattr(keras.applications, name, None) or _import_or_none(f"keras.applications.{name}")


def _import_or_none(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def preprocess(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Maps RGB pixel values in [0, 255] (float32 [..., H, W, C]) to model input units.

    ``tf``: x/127.5 − 1; ``torch``: ImageNet mean/std on x/255; ``caffe``: RGB→BGR
    and ImageNet BGR means subtracted; ``unit``: x/255; ``none``: unchanged;
    ``keras.applications.<module>``: that module's ``preprocess_input``.

    >>> preprocess(np.full((1, 1, 3), 255.0, np.float32), "tf")[0, 0]
    array([1., 1., 1.], dtype=float32)
    """
    pixels = np.asarray(pixels, np.float32)
    if mode == "tf":
        return pixels / 127.5 - 1.0
    if mode == "unit":
        return pixels / 255.0
    if mode == "none":
        return pixels
    channels = pixels.shape[-1]
    if mode == "torch":
        if channels != 3:
            raise ValueError(f"preprocess 'torch' needs 3 channels; got {channels}.")
        return (pixels / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
    if mode == "caffe":
        if channels != 3:
            raise ValueError(f"preprocess 'caffe' needs 3 channels; got {channels}.")
        return pixels[..., ::-1] - _CAFFE_MEAN_BGR
    check_preprocess(mode)
    return np.asarray(_keras_module(mode).preprocess_input(pixels.copy()), np.float32)
