"""The noise of SmoothGrad: seeds, standard normal draws and σ per image.

The noise of sample ``s`` of the example with key ``k`` depends on
``(seed, k, s)`` only, so an example gets the same noise, and the same map,
whatever batch it lands in, its position there, the chunk size, the worker or
a retry:

* :func:`key_seed` hashes ``(seed, key)`` into a 63-bit example seed;
* :func:`sample_seeds` pairs each example seed with each sample index;
* :func:`standard_normal` draws one stream of N(0, 1) values per seed pair;
* :func:`sigma_per_image` gives the σ that scales the noise of each image.

Example:

>>> seeds = tf.constant([[key_seed(0, "img-0"), 0]], tf.int64)
>>> standard_normal(seeds, (8, 8, 3)).shape
TensorShape([1, 8, 8, 3])
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import tensorflow as tf

from transforms.engine.options import bad_option

#: Up to this many noise streams per step, one generator op each; beyond, a loop over them (a smaller graph).
MAX_UNROLLED_STREAMS = 256
#: ``absolute``: σ in the model's input units; ``relative``: σ × (max − min) of each image.
NOISE_MODES = ("absolute", "relative")


def key_seed(seed: int, key: str) -> int:
    """The 63-bit noise seed of one example: a hash of (global seed, key).

    Args:
        seed: the global noise seed.
        key: the example's key.

    Returns:
        A non-negative int below 2**63 (it fits an int64).

    Example:

    >>> key_seed(0, "img-0") == key_seed(0, "img-0") != key_seed(1, "img-0")
    True
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seeds(example_seeds, sample_indices):
    """The seed pairs of every (example, sample), example-major.

    Args:
        example_seeds: int64 ``[B]``, one :func:`key_seed` per example; ``B``
            must be known when tracing.
        sample_indices: int64 ``[S]``, the samples' indices (the sample offset
            included).

    Returns:
        int64 ``[B * S, 2]``: row ``b * S + s`` is
        ``(example_seeds[b], sample_indices[s])``.
    """
    repeats = int(sample_indices.shape[0])
    batch = int(example_seeds.shape[0])
    return tf.stack([tf.repeat(example_seeds, repeats), tf.tile(sample_indices, [batch])], axis=-1)


def standard_normal(seeds, shape):
    """Standard normal noise, one stream per row of ``seeds``.

    Random bits come from the stateless Philox generator, which gives the same
    bits with and without XLA; the Box-Muller transform is done here because
    TensorFlow's own normal sampler differs between XLA and the plain graph.

    Args:
        seeds: int64 ``[n, 2]``, one seed pair per stream (see
            :func:`sample_seeds`).
        shape: the shape of one stream, e.g. ``(H, W, C)``.

    Returns:
        float32 ``[n, *shape]``; row ``i`` depends on ``seeds[i]`` only.
    """
    bits_shape = [2] + list(shape)

    def one(seed):
        return tf.random.stateless_uniform(bits_shape, seed=seed, minval=None, maxval=None,
                                           dtype=tf.uint32, alg="philox")

    streams = seeds.shape[0]
    if streams is not None and streams <= MAX_UNROLLED_STREAMS:
        # One generator op per stream, side by side in the graph: the same bits as a loop over the rows,
        # without the loop's per-row overhead, and the executor runs the ops in parallel.
        bits = tf.stack([one(seeds[row]) for row in range(streams)]) if streams else \
            tf.zeros([0] + bits_shape, tf.uint32)
    else:
        bits = tf.map_fn(one, seeds, fn_output_signature=tf.TensorSpec(bits_shape, tf.uint32))
    scale = 1.0 / (1 << 24)
    u1 = (tf.cast(tf.bitwise.right_shift(bits[:, 0], 8), tf.float32) + 0.5) * scale
    u2 = tf.cast(tf.bitwise.right_shift(bits[:, 1], 8), tf.float32) * scale
    return tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos((2.0 * math.pi) * u2)


def sigma_per_image(images: np.ndarray, noise: float, noise_mode: str) -> np.ndarray:
    """The noise σ of each image.

    Args:
        images: ``[B, ...]`` float32 images, already preprocessed.
        noise: the σ setting (>= 0).
        noise_mode: ``absolute`` (σ = ``noise`` for every image) or
            ``relative`` (σ = ``noise`` × (max − min) of each image).

    Returns:
        float32 ``[B]``.

    Example:

    >>> images = np.stack([np.zeros((2, 2, 1)), np.full((2, 2, 1), 4.0)]).astype(np.float32)
    >>> images[1, 0, 0, 0] = 0.0
    >>> sigma_per_image(images, 0.5, "relative")
    array([0., 2.], dtype=float32)
    """
    if noise_mode not in NOISE_MODES:
        raise bad_option("noise_mode", f"one of {NOISE_MODES}", noise_mode)
    count = images.shape[0]
    if noise_mode == "relative":
        spread = images.reshape(count, -1).max(axis=1) - images.reshape(count, -1).min(axis=1)
        return (noise * spread).astype(np.float32)
    return np.full(count, noise, np.float32)
