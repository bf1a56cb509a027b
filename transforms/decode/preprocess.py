"""Named input preprocessing modes: pixel values 0..255 to model input units.

A mode is parsed once into a :class:`Preprocessing` (the config holds it);
applying it never re-parses the name.
"""

from __future__ import annotations

import dataclasses
import importlib
import re

import numpy as np

PREPROCESS_MODES = ("tf", "torch", "caffe", "unit", "none")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
_KERAS_MODULE = re.compile(r"keras\.applications\.[a-z_][a-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """A parsed preprocessing mode.

    Attributes:
        mode: one of ``tf``, ``torch``, ``caffe``, ``unit``, ``none``, or
            ``keras.applications.<module>`` (that module's ``preprocess_input``).

    Example:
        >>> Preprocessing.parse("tf")(np.full((1, 1, 3), 255.0, np.float32))[0, 0]
        array([1., 1., 1.], dtype=float32)
    """

    mode: str

    @classmethod
    def parse(cls, text) -> "Preprocessing":
        """Checks ``text`` names a known mode; raises ``ValueError`` (one line) otherwise."""
        if isinstance(text, Preprocessing):
            return text
        if text in PREPROCESS_MODES:
            return cls(text)
        if isinstance(text, str) and _KERAS_MODULE.fullmatch(text):
            module = _keras_module(text)
            if module is None or not callable(getattr(module, "preprocess_input", None)):
                raise ValueError(f"{text!r} has no preprocess_input; use a module of keras.applications "
                                 "such as keras.applications.xception.")
            return cls(text)
        raise ValueError(f"expected one of {PREPROCESS_MODES} or keras.applications.<module>; got {text!r}.")

    def __str__(self) -> str:
        return self.mode

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Applies the mode to RGB pixel values in [0, 255] (float32 ``[..., H, W, C]``)."""
        return preprocess(pixels, self.mode)


def check_preprocess(mode: str) -> None:
    """Raises ValueError unless ``mode`` names a known preprocessing."""
    Preprocessing.parse(mode)


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
    module = _keras_module(mode) if _KERAS_MODULE.fullmatch(mode or "") else None
    if module is None or not callable(getattr(module, "preprocess_input", None)):
        Preprocessing.parse(mode)  # raises the one-line error
    return np.asarray(module.preprocess_input(pixels.copy()), np.float32)
