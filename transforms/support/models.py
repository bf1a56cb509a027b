"""Loading the model to explain, from every supported source, never as code.

Sources: a ``.keras`` file (Keras safe mode on: Lambda layers and other code are
refused unless the user opts out), a legacy ``.h5`` file, a TensorFlow
SavedModel folder (wrapped in ``keras.layers.TFSMLayer``), or
``keras.applications:<Name>`` with ``weights`` (``imagenet``, a file, or None).
Remote paths (``gs://``) are read through Beam's filesystems, like the data,
and copied to a local temporary file (or folder) for Keras.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

from transforms.support import storage
from transforms.support.errors import one_line

logger = logging.getLogger(__name__)

APPLICATIONS_PREFIX = "keras.applications:"


class ModelError(ValueError):
    """The model cannot be loaded or is not an image classifier; one-line message."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the manifest records about the model."""

    source: str
    weights: str | None
    sha256: str | None
    input_shape: tuple
    classes: int


def file_sha256(path: str) -> str | None:
    """SHA-256 of a file, or of a folder's files (names and bytes, sorted); None when absent."""
    return storage.sha256(path)


def _load_application(name: str, weights):
    import keras

    if not re.fullmatch(r"[A-Z][A-Za-z0-9_]*", name) or not callable(getattr(keras.applications, name, None)):
        raise ModelError(f"model 'keras.applications:{name}' is not a keras.applications model; "
                         "use a class name such as Xception, ResNet50 or MobileNetV2.")
    if weights not in (None, "imagenet") and not storage.exists(weights):
        raise ModelError(f"weights file {weights!r} does not exist.")
    local_weights = weights if weights in (None, "imagenet") else storage.copy_to_local(weights)
    try:
        return getattr(keras.applications, name)(weights=local_weights)
    except Exception as error:  # noqa: BLE001 - any Keras failure becomes one line
        raise ModelError(f"cannot build keras.applications:{name} with weights={weights!r}: "
                         f"{one_line(error)}") from None


def _load_saved_model(path: str):
    import keras

    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")  # loads the SavedModel once
    specs = list(layer.call_endpoint_fn.structured_input_signature[1].values())
    if len(specs) != 1:
        raise ModelError(f"SavedModel {path!r}: its serving_default signature takes {len(specs)} inputs; "
                         "one image batch is needed.")
    inputs = keras.Input(shape=tuple(specs[0].shape[1:]), dtype="float32")
    outputs = layer(inputs)
    if isinstance(outputs, dict):
        if len(outputs) != 1:
            raise ModelError(f"SavedModel {path!r} returns {len(outputs)} outputs "
                             f"({', '.join(outputs)}); one score tensor is needed.")
        outputs = next(iter(outputs.values()))
    return keras.Model(inputs, outputs, name=os.path.basename(path.rstrip("/")) or "saved_model")


def load_model(source: str, weights: str | None = None, safe_mode: bool = True):
    """Loads the model named by ``source``; raises :class:`ModelError` with one line.

    Args:
        source: ``path.keras``, ``path.h5``, a SavedModel folder, or
            ``keras.applications:<Name>``.
        weights: for applications, ``imagenet``, a weights file or None (random);
            for files, an optional ``.weights.h5`` to load on top.
        safe_mode: Keras safe mode for ``.keras`` files (refuses Lambda layers).

    Returns:
        A Keras model.

    Example:
        >>> model = load_model("keras.applications:ResNet50", weights=None)
    """
    import keras

    if source.startswith(APPLICATIONS_PREFIX):
        return _load_application(source[len(APPLICATIONS_PREFIX):], weights)
    if not storage.exists(source):
        raise ModelError(f"model {source!r} does not exist; give a .keras or .h5 file, a SavedModel "
                         "folder, or keras.applications:<Name>.")
    local = storage.copy_to_local(source)
    lower = source.lower().rstrip("/")
    try:
        if lower.endswith(".keras"):
            model = keras.saving.load_model(local, compile=False, safe_mode=safe_mode)
        elif lower.endswith((".h5", ".hdf5")):
            model = keras.saving.load_model(local, compile=False, safe_mode=safe_mode)
        elif os.path.isdir(local) and os.path.exists(os.path.join(local, "saved_model.pb")):
            model = _load_saved_model(local)
        else:
            raise ModelError(f"model {source!r}: expected a .keras or .h5 file or a SavedModel folder "
                             "(with saved_model.pb).")
    except ModelError:
        raise
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds; each becomes one line
        message = one_line(error)
        if safe_mode and ("safe_mode" in message or "Lambda" in message):
            raise ModelError(f"model {source!r} contains code (e.g. a Lambda layer) and safe mode refuses "
                             "to load it; pass --unsafe_model_loading only if you trust this file.") from None
        raise ModelError(f"cannot load model {source!r}: {message}") from None
    if weights is not None:
        if not storage.exists(weights):
            raise ModelError(f"weights file {weights!r} does not exist.")
        try:
            model.load_weights(storage.copy_to_local(weights))
        except Exception as error:  # noqa: BLE001
            raise ModelError(f"cannot load weights {weights!r} into {source!r}: {one_line(error)}") from None
    return model


def describe(model, source: str, weights: str | None) -> ModelInfo:
    """Checks that ``model`` maps one image batch to class scores; returns its :class:`ModelInfo`."""
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, list) or shape is None or len(shape) != 4:
        raise ModelError(f"model {source!r} must take one image batch [B, H, W, C]; its input is {shape}.")
    outputs = getattr(model, "output_shape", None)
    if isinstance(outputs, list) or outputs is None or len(outputs) != 2:
        raise ModelError(f"model {source!r} must output class scores [B, classes]; its output is {outputs}.")
    if source.startswith(APPLICATIONS_PREFIX):
        digest = file_sha256(weights) if weights not in (None, "imagenet") else None
    else:
        digest = file_sha256(source)
    return ModelInfo(source=source, weights=weights, sha256=digest,
                     input_shape=tuple(shape[1:]), classes=int(outputs[-1]))
