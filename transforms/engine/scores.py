"""The scores SmoothGrad differentiates: a model's outputs, or its logits.

Gradients of a softmax or sigmoid output saturate, so by default SmoothGrad
explains the scores before that final activation. :func:`score_function`
splits it off a Functional or Sequential model without modifying the model.

Example:

>>> scores, note = score_function(model, logits=True)
>>> note
"pre-softmax scores of layer 'dense'"
>>> scores(images).shape            # [B, classes]
"""

from __future__ import annotations

import logging
from typing import Callable

import keras
import tensorflow as tf

logger = logging.getLogger(__name__)


def _activation_name(layer) -> str | None:
    """``softmax`` or ``sigmoid`` when ``layer`` ends in one, else None."""
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", None)
    return name if name in ("softmax", "sigmoid") else None


def score_function(model, logits: bool = True) -> tuple[Callable[[tf.Tensor], tf.Tensor], str]:
    """Returns ``f(images) -> scores [B, classes]`` and a note on what it scores.

    With ``logits=True`` and a model (Functional or Sequential) whose last layer
    ends in ``softmax``/``sigmoid``, ``f`` returns the scores before that
    activation. It does so with a new model that shares the body's layers and a
    copy of the last layer with a linear activation; the caller's model is not
    modified. A subclassed model is explained on its outputs as they are.

    Args:
        model: a Keras model, or any callable mapping images to scores.
        logits: split off a final softmax/sigmoid (True) or score the outputs
            as they are (False).

    Returns:
        ``(f, note)``: the score function (called with ``training=False`` on a
        Keras model) and a short description of what it returns.

    Raises:
        TypeError: when ``model`` is neither a Keras model nor callable.
    """
    if not isinstance(model, keras.Model):
        if not callable(model):
            raise TypeError(f"'model' must be a Keras model or a callable; got {type(model).__name__}.")
        return (lambda images: model(images)), "outputs of a callable"

    def call_model(images):
        return model(images, training=False)

    if not logits:
        return call_model, "model outputs (logits=False)"
    layers = getattr(model, "layers", None) or []
    last = layers[-1] if layers else None
    activation = _activation_name(last) if last is not None else None
    if activation is None:
        return call_model, "model outputs (no final softmax/sigmoid found)"
    try:
        body = keras.Model(model.inputs, last.input)
    except (AttributeError, ValueError, TypeError) as error:  # subclassed / unbuilt
        logger.warning("Cannot split the final %s off %s (%s); explaining its outputs.",
                       activation, model.name, error)
        return call_model, f"model outputs (final {activation} could not be split off)"
    if isinstance(last, (keras.layers.Activation, keras.layers.Softmax)):
        head = None
    else:
        config = dict(last.get_config(), activation="linear", name=f"{last.name}_logits")
        head = type(last).from_config(config)
        head.build(last.input.shape)
        head.set_weights(last.get_weights())

    def call_logits(images):
        features = body(images, training=False)
        return features if head is None else head(features)

    return call_logits, f"pre-{activation} scores of layer '{last.name}'"
