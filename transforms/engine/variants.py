"""SmoothGrad variants as accumulators over chunks of noisy gradients.

The engine draws the noisy samples of each image in chunks and folds the
gradients of each chunk into a running state, so memory does not grow with
the number of samples. Every variant has the same interface:

* ``start(batch, k, height, width, channels) -> state``: the initial state, a
  tuple of tensors (it goes through ``tf.while_loop``);
* ``add(state, grads, weights=None) -> state``: folds in one chunk of
  gradients ``[B, chunk, K, H, W, C]`` (every sample of a chunk is real: the
  engine never computes a gradient it does not use); ``weights`` (0 or 1 per
  sample of the chunk) folds in only the samples weighted 1;
* ``finish(state, images, samples) -> maps``: the maps ``[B, K, H, W]``
  (``[B, K, H, W, C]`` for ``reduce="none"``) from the final state, the clean
  images ``[B, H, W, C]`` and the number of samples.

Example:

>>> accumulator = get_variant("vargrad", reduce="mean_abs")
>>> state = accumulator.start(batch=2, k=1, height=8, width=8, channels=3)
>>> for grads in chunks:            # grads [2, chunk, 1, 8, 8, 3]
...     state = accumulator.add(state, grads)
>>> accumulator.finish(state, images, samples).shape
TensorShape([2, 1, 8, 8])

:func:`accumulate` runs that loop inside a compiled function. :class:`SplitHalves`
feeds one variant three states at once: every sample (the map), the
even-numbered samples and the odd-numbered ones (the two half-maps whose rank
correlation is the map's split-half reliability).
"""

from __future__ import annotations

import tensorflow as tf

from transforms.engine.options import bad_option
from transforms.engine.jit import visible_accelerators
from transforms.engine.reductions import REDUCTIONS, reduce_magnitude, reduce_signed


class Accumulator:
    """Base of the variants: the interface and the channel reduction setting.

    Args:
        reduce: one of :data:`transforms.engine.reductions.REDUCTIONS`.
    """

    #: The variant's name in :data:`VARIANTS`.
    name = ""

    def __init__(self, reduce: str):
        if reduce not in REDUCTIONS:
            raise bad_option("reduce", f"one of {REDUCTIONS}", reduce)
        self.reduce = reduce

    def start(self, batch: int, k: int, height: int, width: int, channels: int) -> tuple:
        """The state before any sample.

        Args:
            batch, k, height, width, channels: the sizes of the gradients
                (images per batch, maps per image, image size and channels).

        Returns:
            A tuple of tensors.
        """
        raise NotImplementedError

    def add(self, state: tuple, grads, weights=None) -> tuple:
        """Folds one chunk of gradients into ``state``.

        Args:
            state: the tuple returned by :meth:`start` or the last :meth:`add`.
            grads: float32 ``[B, chunk, K, H, W, C]``.
            weights: None (every sample), or float32 ``[chunk]`` of 0 and 1:
                only the samples weighted 1 are folded in.

        Returns:
            The new state, a tuple of the same structure.
        """
        raise NotImplementedError

    def finish(self, state: tuple, images, samples: int):
        """The maps from the final state.

        Args:
            state: the state after the last chunk.
            images: float32 ``[B, H, W, C]``, the clean images.
            samples: the number of (real) samples folded in (an int, or an
                int32 scalar tensor when a compiled stage's count is an input).

        Returns:
            float32 ``[B, K, H, W]`` (``[B, K, H, W, C]`` for ``reduce="none"``).
        """
        raise NotImplementedError


class _MeanAccumulator(Accumulator):
    """A mean over samples of a per-sample quantity, kept as a running sum.

    Subclasses say what each sample contributes (:meth:`per_sample`), whether
    the channels are kept until :meth:`from_mean`, and how the mean becomes
    the map.
    """

    #: Whether the running sum keeps the channel axis (reduced after averaging).
    reduce_after_mean = False

    def _keeps_channels(self) -> bool:
        return self.reduce == "none" or self.reduce_after_mean

    def per_sample(self, grads):
        """What one sample adds to the sum (``grads`` keep their shape)."""
        raise NotImplementedError

    def from_mean(self, mean, images):
        """The map from the mean over samples."""
        return mean

    def start(self, batch, k, height, width, channels):
        shape = [batch, k, height, width] + ([channels] if self._keeps_channels() else [])
        return (tf.zeros(shape),)

    def add(self, state, grads, weights=None):
        (total,) = state
        values = self.per_sample(grads)
        if weights is not None:
            values = values * tf.reshape(weights, [1, -1] + [1] * (len(values.shape) - 2))
        return (total + tf.reduce_sum(values, axis=1),)

    def finish(self, state, images, samples):
        (total,) = state
        return self.from_mean(total / tf.cast(samples, total.dtype), images)


class SmoothGradAccumulator(_MeanAccumulator):
    """``smoothgrad``: the mean over samples of the channel-reduced |gradient|."""

    name = "smoothgrad"

    def per_sample(self, grads):
        """The channel-reduced |gradient| of each sample."""
        return reduce_magnitude(grads, self.reduce)


class SmoothGradSquaredAccumulator(_MeanAccumulator):
    """``smoothgrad_squared``: the mean over samples of the reduced squared gradient."""

    name = "smoothgrad_squared"

    def per_sample(self, grads):
        """The channel-reduced squared gradient of each sample."""
        return reduce_magnitude(tf.square(grads), self.reduce)


class SignedAccumulator(_MeanAccumulator):
    """``signed``: the mean signed gradient, its channels reduced with their sign."""

    name = "signed"
    reduce_after_mean = True

    def per_sample(self, grads):
        """The signed gradient, channels kept."""
        return grads

    def from_mean(self, mean, images):
        """The mean gradient's channels reduced with their sign."""
        return reduce_signed(mean, self.reduce)


class GradXInputAccumulator(SignedAccumulator):
    """``grad_x_input``: the clean input times the mean signed gradient, reduced with its sign."""

    name = "grad_x_input"

    def from_mean(self, mean, images):
        """Clean input times the mean gradient, channels reduced with their sign."""
        return reduce_signed(images[:, None] * mean, self.reduce)


class VarGradAccumulator(Accumulator):
    """``vargrad``: the variance over samples of the gradient (population form).

    The state is ``(count, mean, m2)``: the samples so far, their mean gradient
    and their sum of squared deviations. Chunks are merged with the pairwise
    update of Chan, Golub & LeVeque, so no large sum of squares cancels. The
    channel reduction of magnitudes is applied to the variance.
    """

    name = "vargrad"

    def start(self, batch, k, height, width, channels):
        """``(count 0, mean 0, m2 0)``, channels kept."""
        zeros = tf.zeros([batch, k, height, width, channels])
        return (tf.constant(0.0), zeros, zeros)

    def add(self, state, grads, weights=None):
        """Merges the chunk's count, mean and m2 into the running ones (Chan et al.)."""
        if weights is not None:
            return self._add_weighted(state, grads, weights)
        count, mean, m2 = state
        chunk_count = tf.constant(float(grads.shape[1]))
        chunk_mean = tf.reduce_sum(grads, axis=1) / chunk_count
        chunk_m2 = tf.reduce_sum(tf.square(grads - chunk_mean[:, None]), axis=1)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean = mean + delta * (chunk_count / total)
        m2 = m2 + chunk_m2 + tf.square(delta) * (count * chunk_count / total)
        return (total, mean, m2)

    @staticmethod
    def _add_weighted(state, grads, weights):
        # The same merge over the samples weighted 1; a chunk may hold none of them.
        count, mean, m2 = state
        weight = tf.reshape(weights, [1, -1, 1, 1, 1, 1])
        chunk_count = tf.reduce_sum(weights)
        chunk_mean = tf.math.divide_no_nan(tf.reduce_sum(grads * weight, axis=1), chunk_count)
        chunk_m2 = tf.reduce_sum(weight * tf.square(grads - chunk_mean[:, None]), axis=1)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean = mean + delta * tf.math.divide_no_nan(chunk_count, total)
        m2 = m2 + chunk_m2 + tf.square(delta) * tf.math.divide_no_nan(count * chunk_count, total)
        return (total, mean, m2)

    def finish(self, state, images, samples):
        """The population variance m2 / count, channel-reduced as a magnitude."""
        count, _, m2 = state
        return reduce_magnitude(m2 / count, self.reduce)


class SplitHalves:
    """One variant fed three states: every sample, the even-numbered samples, the odd-numbered ones.

    The first state gives the map exactly as the variant alone would (the same
    operations on the same chunks); the two others give the half-maps of the
    split-half reliability. Used by :func:`accumulate` like an accumulator,
    with the index of each chunk's first sample.

    Args:
        accumulator: the variant's :class:`Accumulator`.
        offset: the global index of the first sample (even and odd are global:
            a run continued from sample 8 keeps the parity of every sample); an
            int, or an int32 scalar tensor for a stage that starts where the
            previous one stopped.
    """

    def __init__(self, accumulator: Accumulator, offset=0):
        self.accumulator = accumulator
        self.offset = offset if isinstance(offset, tf.Tensor) else int(offset)

    def start(self, *shape) -> tuple:
        """``(all, even, odd)`` initial states."""
        return tuple(self.accumulator.start(*shape) for _ in range(3))

    def add(self, state: tuple, grads, first) -> tuple:
        """Folds one chunk whose first sample has index ``first`` (an int32 scalar tensor)."""
        every, even, odd = state
        size = grads.shape[1]
        is_odd = tf.cast((first + self.offset + tf.range(size)) % 2, tf.float32)
        return (self.accumulator.add(every, grads), self.accumulator.add(even, grads, 1.0 - is_odd),
                self.accumulator.add(odd, grads, is_odd))

    def finish(self, state: tuple, images, samples: int) -> tuple:
        """``(map, even half-map, odd half-map)``; needs ``samples >= 2``."""
        every, even, odd = state
        return (self.accumulator.finish(every, images, samples),
                self.accumulator.finish(even, images, (samples + 1) // 2),
                self.accumulator.finish(odd, images, samples // 2))


def default_chunk(samples: int, batch_size: int, noisy_per_step: int | None = None) -> int:
    """The default chunk: the fewest chunks of at most ``noisy_per_step`` noisy images, each as small as covers.

    ``noisy_per_step`` defaults to 8 on a CPU, where steps of about one batch
    measured as fast as larger ones or faster (MobileNetV2 5-9 % faster than
    with 32), and to 32 when a GPU or TPU is visible, which needs large batches.

    Example:
        >>> default_chunk(10, 4, noisy_per_step=32)     # 2 chunks of 5, not 8 + 8
        5
    """
    if noisy_per_step is None:
        noisy_per_step = 32 if visible_accelerators() else 8
    largest = max(1, noisy_per_step // batch_size)
    chunks = -(-samples // largest)
    return -(-samples // chunks)


def chunk_plan(samples: int, chunk: int) -> tuple[int, int]:
    """How ``samples`` noisy samples split into chunks: ``(full chunks of size chunk, remainder)``.

    Example:
        >>> chunk_plan(10, 4)
        (2, 2)
    """
    return divmod(samples, min(chunk, samples))


def accumulate(accumulator: Accumulator, samples, chunk: int, gradients, shape, state: tuple | None = None) -> tuple:
    """Folds exactly ``samples`` noisy samples, ``chunk`` at a time, into an accumulator's state.

    The full chunks run in a ``tf.while_loop`` (a single one without a loop:
    measured here on CPU, XLA ran ResNet50's input gradient 3x slower inside a
    one-iteration loop than outside one); a remainder smaller than ``chunk``
    runs once after them at its own size, so no gradient is computed and
    thrown away.

    Args:
        accumulator: the variant's :class:`Accumulator`, or a :class:`SplitHalves`.
        samples: the number of samples (>= 1); or an int32 scalar tensor, a
            multiple of ``chunk`` (a stage whose length is an input of the
            compiled function: the loop's trip count is then dynamic).
        chunk: samples per chunk (>= 1).
        gradients: ``gradients(first_sample, size) -> grads`` for samples
            ``first_sample .. first_sample + size - 1`` (``first_sample`` an int32
            scalar tensor, ``size`` a Python int), shaped as :meth:`Accumulator.add`
            takes them.
        shape: ``(batch, k, height, width, channels)`` for :meth:`Accumulator.start`.
        state: the state to continue from (None: start from no sample).

    Returns:
        The final state, for :meth:`Accumulator.finish`.
    """
    dynamic = isinstance(samples, tf.Tensor)
    if dynamic:
        full, rest = samples // chunk, 0
    else:
        full, rest = chunk_plan(samples, chunk)
        chunk = min(chunk, samples)
    halves = isinstance(accumulator, SplitHalves)

    def add(state, first, size):
        grads = gradients(first, size)
        return tuple(accumulator.add(state, grads, first) if halves else accumulator.add(state, grads))

    def body(index, *state):
        return (index + 1,) + add(state, index * chunk, chunk)

    state = (tf.constant(0),) + tuple(accumulator.start(*shape) if state is None else state)
    if not dynamic and full == 1:
        state = body(*state)
    elif dynamic or full > 1:
        state = tf.while_loop(lambda index, *_: index < full, body, state)
    state = tuple(state[1:])
    if rest:
        state = add(state, tf.constant(full * chunk), rest)
    return state


_ACCUMULATORS = {cls.name: cls for cls in (SmoothGradAccumulator, SmoothGradSquaredAccumulator,
                                           VarGradAccumulator, SignedAccumulator, GradXInputAccumulator)}

#: Variant names, in the order they are documented.
VARIANTS = ("smoothgrad", "smoothgrad_squared", "vargrad", "signed", "grad_x_input")


def get_variant(name: str, reduce: str) -> Accumulator:
    """The accumulator of a variant.

    Args:
        name: one of :data:`VARIANTS`.
        reduce: one of :data:`transforms.engine.reductions.REDUCTIONS`.

    Returns:
        A new :class:`Accumulator` for that variant and reduction.

    Raises:
        ValueError: for an unknown variant or reduction.

    Example:

    >>> get_variant("signed", "mean_abs").name
    'signed'
    """
    if name not in _ACCUMULATORS:
        raise bad_option("variant", f"one of {VARIANTS}", name)
    return _ACCUMULATORS[name](reduce)
