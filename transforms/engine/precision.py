"""Reduced-precision compute: a mixed-precision clone of the model.

With ``precision="bfloat16"`` or ``"float16"`` the model's layers compute in
that dtype (Keras' ``mixed_bfloat16`` / ``mixed_float16`` policies: variables
stay float32, each layer casts its inputs to the compute dtype). The engine
keeps the noise, the noisy images, the running sums and the maps in float32:
the gradient with respect to the float32 noisy input flows back through the
first layer's cast. The caller's model is never modified: a clone is made
with the policy and given the same weights.

Example:

>>> fast = with_precision(model, "bfloat16")
>>> fast.layers[1].dtype_policy.name
'mixed_bfloat16'
"""

from __future__ import annotations

import keras

from transforms.engine.options import bad_option

PRECISIONS = ("float32", "bfloat16", "float16")


def with_precision(model, precision: str = "float32"):
    """The model computing in ``precision``: the model itself for float32, else a mixed-precision clone.

    Args:
        model: a Keras model (Functional or Sequential; a subclassed model or a
            callable is only accepted at float32, since it cannot be cloned
            layer by layer).
        precision: ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        A Keras model with the same weights.

    Raises:
        ValueError: for an unknown precision or a model that cannot be cloned.
    """
    if precision not in PRECISIONS:
        raise bad_option("precision", f"one of {PRECISIONS}", precision)
    if precision == "float32":
        return model
    refusal = (f"precision={precision!r} needs a Functional or Sequential Keras model (it is cloned with a "
               f"mixed-precision policy); got {type(model).__name__}. Use precision='float32'.")
    if not isinstance(model, keras.Model):
        raise ValueError(refusal)
    policy = keras.DTypePolicy(f"mixed_{precision}")

    def clone_layer(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return type(layer).from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer)
    except (ValueError, TypeError, NotImplementedError, AttributeError) as error:
        raise ValueError(f"{refusal} ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None
    clone.set_weights(model.get_weights())
    return clone
