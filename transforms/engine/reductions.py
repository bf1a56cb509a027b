"""Channel reductions: from a ``[..., C]`` gradient-shaped tensor to a map.

Two families share the names in :data:`REDUCTIONS`:

* :func:`reduce_magnitude` for magnitudes (``smoothgrad``,
  ``smoothgrad_squared``, ``vargrad``): mean, max or sum of ``|x|`` over the
  channels, or ``|x|`` with the channels kept (``none``);
* :func:`reduce_signed` for signed maps (``signed``, ``grad_x_input``): the
  channel mean, the channel value of largest magnitude (its sign kept), the
  channel sum, or the channels as they are (``none``).

Example:

>>> values = tf.constant([[1.0, -3.0, 2.0]])
>>> reduce_magnitude(values, "max_abs").numpy(), reduce_signed(values, "max_abs").numpy()
(array([3.], dtype=float32), array([-3.], dtype=float32))
"""

from __future__ import annotations

import tensorflow as tf

from transforms.engine.options import bad_option

#: Channel reductions, by name.
REDUCTIONS = ("mean_abs", "max_abs", "sum_abs", "none")


def reduce_magnitude(values, how: str):
    """Reduces the channel (last) axis of a magnitude.

    Args:
        values: float tensor ``[..., C]``.
        how: one of :data:`REDUCTIONS`.

    Returns:
        ``[...]`` (``[..., C]`` for ``none``), never negative.
    """
    if how == "none":
        return tf.abs(values)
    if how == "mean_abs":
        return tf.reduce_mean(tf.abs(values), axis=-1)
    if how == "max_abs":
        return tf.reduce_max(tf.abs(values), axis=-1)
    if how == "sum_abs":
        return tf.reduce_sum(tf.abs(values), axis=-1)
    raise bad_option("reduce", f"one of {REDUCTIONS}", how)


def reduce_signed(values, how: str):
    """Reduces the channel (last) axis, keeping the sign.

    Args:
        values: float tensor ``[..., C]`` with a known rank.
        how: one of :data:`REDUCTIONS`: ``mean_abs`` gives the channel mean,
            ``sum_abs`` the channel sum, ``max_abs`` the channel value of
            largest magnitude and ``none`` the values unchanged.

    Returns:
        ``[...]`` (``[..., C]`` for ``none``).
    """
    if how == "none":
        return values
    if how == "mean_abs":
        return tf.reduce_mean(values, axis=-1)
    if how == "sum_abs":
        return tf.reduce_sum(values, axis=-1)
    if how == "max_abs":
        strongest = tf.argmax(tf.abs(values), axis=-1)
        return tf.gather(values, strongest, axis=-1, batch_dims=values.shape.rank - 1)
    raise bad_option("reduce", f"one of {REDUCTIONS}", how)
