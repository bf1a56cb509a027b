"""SmoothGrad engine: vectorised, compiled once, reproducible per example.

The numerical core of smoothgrad-audit. It knows nothing of Beam: it takes a
Keras model and a batch of preprocessed images, and returns numpy arrays.

Semantics (SPEC §4), following Smilkov et al. 2017 (arXiv:1706.03825):

* ``samples`` noisy copies per image, **all** of them noisy. ``keras_explainable``
  counts the clean input as one of its repetitions; this engine does not, so
  ``samples=20`` here means 20 noisy gradients.
* The noise of sample ``s`` of the example with key ``k`` is drawn from a
  stateless generator seeded by ``(seed, k, s)`` only: the same example gives the
  same map whatever batch it lands in, its position there, the chunk size, the
  worker or a retry.
* Samples are vectorised in chunks of ``chunk`` inside one compiled function and
  folded into running sums (Chan et al.'s pairwise update for ``vargrad``), so
  memory does not grow with ``samples``.
* The function is compiled once for a fixed batch shape; smaller batches are
  padded, larger ones split. ``compile_count`` says how many traces happened.
* Scores are pre-softmax: a model whose last layer applies ``softmax`` or
  ``sigmoid`` is explained on the scores before that activation, through a
  copy of that last layer, so the caller's model object is left untouched.

Example:

>>> explainer = SmoothGrad(model, samples=20, noise=0.1, batch_size=4)
>>> result = explainer(images, keys=["a", "b"])
>>> result.maps.shape            # (2, H, W)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import keras

logger = logging.getLogger(__name__)

VARIANTS = ("smoothgrad", "smoothgrad_squared", "vargrad", "signed", "grad_x_input")
REDUCTIONS = ("mean_abs", "max_abs", "sum_abs", "none")
NOISE_MODES = ("absolute", "relative")
JIT_MODES = ("auto", "xla", "graph")
TARGET_FORMS = ("top1", "label", "class:K", "topk:K")

# Layers whose gradients XLA compiles into very slow code on CPU (SPEC §4:
# Xception 5.5x, MobileNetV2 ~10x slower than the plain graph on this CPU).
_XLA_SLOW_ON_CPU = ("DepthwiseConv2D", "SeparableConv2D", "DepthwiseConv1D", "SeparableConv1D")


def _bad_option(name: str, allowed: str, got) -> ValueError:
    return ValueError(f"'{name}' must be {allowed}; got {got!r}.")


@dataclasses.dataclass(frozen=True)
class Target:
    """Which class(es) to explain.

    ``mode`` is ``top1``, ``topk`` (``k`` maps per image, in score order),
    ``label`` (classes given with each call) or ``class`` (the fixed ``class_id``).
    """

    mode: str
    k: int = 1
    class_id: int | None = None

    @classmethod
    def parse(cls, text: str | "Target") -> "Target":
        """Parses ``top1``, ``label``, ``class:K`` or ``topk:K``.

        >>> Target.parse("topk:3")
        Target(mode='topk', k=3, class_id=None)
        """
        if isinstance(text, Target):
            return text
        allowed = "one of 'top1', 'label', 'class:K' or 'topk:K' (K a whole number)"
        if not isinstance(text, str):
            raise _bad_option("target", allowed, text)
        if text in ("top1", "label"):
            return cls(mode=text)
        match = re.fullmatch(r"(class|topk):(\d+)", text)
        if not match:
            raise _bad_option("target", allowed, text)
        number = int(match.group(2))
        if match.group(1) == "class":
            return cls(mode="class", class_id=number)
        if number < 1:
            raise _bad_option("target", "'topk:K' with K >= 1", text)
        return cls(mode="topk", k=number)

    def __str__(self) -> str:
        if self.mode == "class":
            return f"class:{self.class_id}"
        if self.mode == "topk":
            return f"topk:{self.k}"
        return self.mode

    @property
    def maps_per_record(self) -> int:
        return self.k if self.mode == "topk" else 1


@dataclasses.dataclass
class SmoothGradResult:
    """What one call of :class:`SmoothGrad` returns (numpy arrays).

    Attributes:
        maps: ``[B, H, W]`` (``[B, K, H, W]`` for ``topk:K``; a trailing channel
            axis when ``reduce="none"``), float32, raw (not normalised).
        targets: explained class per map, int32 ``[B]`` (``[B, K]`` for topk).
        target_ranks: rank of each target among the clean scores (0 = top).
        scores: score of each target on the clean input (pre-softmax when
            ``logits=True``), float32, same shape as ``targets``.
        predicted: clean top-1 class, int32 ``[B]``.
        noise_sigma: the σ used for each image, float32 ``[B]``.
    """

    maps: np.ndarray
    targets: np.ndarray
    target_ranks: np.ndarray
    scores: np.ndarray
    predicted: np.ndarray
    noise_sigma: np.ndarray


def key_seed(seed: int, key: str) -> int:
    """The 63-bit noise seed of one example: a hash of (global seed, key)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _iter_layers(model) -> list:
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))


def has_xla_slow_layers(model) -> bool:
    """Whether the model has depthwise/separable convolutions (XLA-on-CPU trap)."""
    return any(type(layer).__name__ in _XLA_SLOW_ON_CPU for layer in _iter_layers(model))


def choose_jit(model, requested: str = "auto") -> tuple[str, str]:
    """Resolves ``jit`` to ``xla`` or ``graph`` and says why.

    ``auto`` picks ``xla`` when a GPU or TPU is visible to TensorFlow and the
    plain graph on a CPU. Measured on this project's 2-core CPU (TF 2.21,
    benchmarks/RESULTS.md), XLA was slower than the graph for every model tried:
    about 1.5x for ResNet50 and several times for the demo CNN, and 5-10x for
    models with depthwise or separable convolutions (Xception, MobileNet),
    whose gradients XLA compiles into slow code on CPU (SPEC §4).
    """
    if requested not in JIT_MODES:
        raise _bad_option("jit", f"one of {JIT_MODES}", requested)
    if requested != "auto":
        return requested, "requested"
    accelerators = tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")
    if accelerators:
        return "xla", f"auto: accelerator {accelerators[0].name} visible"
    if has_xla_slow_layers(model):
        return "graph", "auto: CPU, and depthwise/separable convolutions are 5-10x slower under XLA on CPU"
    return "graph", "auto: CPU, where XLA measured slower than the plain graph"


def _activation_name(layer) -> str | None:
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


def _reduce_magnitude(values, how: str):
    """Channel reduction of a non-negative or magnitude quantity."""
    if how == "none":
        return tf.abs(values)
    if how == "mean_abs":
        return tf.reduce_mean(tf.abs(values), axis=-1)
    if how == "max_abs":
        return tf.reduce_max(tf.abs(values), axis=-1)
    return tf.reduce_sum(tf.abs(values), axis=-1)


def _reduce_signed(values, how: str):
    """Channel reduction that keeps the sign (for ``signed`` and ``grad_x_input``)."""
    if how == "none":
        return values
    if how == "mean_abs":
        return tf.reduce_mean(values, axis=-1)
    if how == "sum_abs":
        return tf.reduce_sum(values, axis=-1)
    strongest = tf.argmax(tf.abs(values), axis=-1)
    return tf.gather(values, strongest, axis=-1, batch_dims=values.shape.rank - 1)


def _standard_normal(seeds, shape):
    """Standard normal noise, one stream per row of ``seeds`` ([n, 2] int64).

    Random bits come from the stateless Philox generator, which gives the same
    bits with and without XLA; the Box-Muller transform is done here because
    TensorFlow's own normal sampler differs between XLA and the plain graph.
    """
    bits_shape = [2] + list(shape)

    def one(seed):
        return tf.random.stateless_uniform(bits_shape, seed=seed, minval=None, maxval=None,
                                           dtype=tf.uint32, alg="philox")

    bits = tf.map_fn(one, seeds, fn_output_signature=tf.TensorSpec(bits_shape, tf.uint32))
    scale = 1.0 / (1 << 24)
    u1 = (tf.cast(tf.bitwise.right_shift(bits[:, 0], 8), tf.float32) + 0.5) * scale
    u2 = tf.cast(tf.bitwise.right_shift(bits[:, 1], 8), tf.float32) * scale
    return tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos((2.0 * math.pi) * u2)


def _loop(iterations: int, body, state):
    """Runs ``body`` ``iterations`` times; a single chunk runs without a loop.

    Measured here on CPU: XLA ran ResNet50's input gradient 3x slower inside a
    one-iteration ``tf.while_loop`` than outside one.
    """
    if iterations == 1:
        return body(*state)
    return tf.while_loop(lambda index, *_: index < iterations, body, state)


class SmoothGrad:
    """SmoothGrad explainer for a Keras model, compiled once per instance.

    Args:
        model: a Keras 3 model (Sequential, Functional, subclassed, or loaded from
            a ``.keras`` file) mapping ``[B, H, W, C]`` float32 images to class
            scores ``[B, classes]``.
        samples: N, the number of noisy copies per image (>= 1). All are noisy.
        noise: σ (>= 0). See ``noise_mode``.
        noise_mode: ``absolute`` (σ in the model's input units) or ``relative``
            (σ × (max − min) of each preprocessed image, as in the paper).
        variant: ``smoothgrad`` (mean over samples of the reduced |gradient|),
            ``smoothgrad_squared`` (mean of squared gradients), ``vargrad``
            (variance over samples, population form), ``signed`` (mean signed
            gradient) or ``grad_x_input`` (clean input × mean signed gradient).
        reduce: channel reduction ``mean_abs``, ``max_abs``, ``sum_abs`` or
            ``none`` (keep channels). For ``signed`` and ``grad_x_input`` the sign
            is kept: channel mean, channel sum, the channel value of largest
            magnitude, or the channels as they are.
        target: ``top1``, ``label`` (targets given with each call), ``class:K``
            or ``topk:K``.
        batch_size: the fixed batch the function is compiled for.
        chunk: noisy samples per image processed at once (default: enough for
            about 32 noisy images per step, at most ``samples``).
        jit: ``xla``, ``graph`` or ``auto`` (see :func:`choose_jit`).
        seed: global noise seed.
        logits: explain pre-softmax/sigmoid scores (True) or the outputs as
            they are (False).
        sample_offset: index of the first noise sample (default 0). Two
            explainers with ``samples=n`` and offsets 0 and n draw disjoint
            noise, as the split-half convergence check needs.

    Call ``explainer(images, keys, targets=None)`` with float32 ``[B, H, W, C]``
    images already preprocessed and one string key per image; ``targets``
    (``[B]`` or ``[B, K]`` ints) is required for ``target="label"``.

    Example:

    >>> sg = SmoothGrad(model, samples=10, noise=0.15, noise_mode="relative")
    >>> sg(images, ["img-0", "img-1"]).maps.shape
    (2, 224, 224)
    """

    def __init__(self, model, samples: int = 20, noise: float = 0.1, noise_mode: str = "absolute",
                 variant: str = "smoothgrad", reduce: str = "mean_abs", target: str = "top1",
                 batch_size: int = 8, chunk: int | None = None, jit: str = "auto", seed: int = 0,
                 logits: bool = True, sample_offset: int = 0):
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise _bad_option("samples", "a whole number >= 1", samples)
        if isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating)) \
                or not math.isfinite(noise) or noise < 0:
            raise _bad_option("noise", "a finite number >= 0", noise)
        if noise_mode not in NOISE_MODES:
            raise _bad_option("noise_mode", f"one of {NOISE_MODES}", noise_mode)
        if variant not in VARIANTS:
            raise _bad_option("variant", f"one of {VARIANTS}", variant)
        if reduce not in REDUCTIONS:
            raise _bad_option("reduce", f"one of {REDUCTIONS}", reduce)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise _bad_option("batch_size", "a whole number >= 1", batch_size)
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer))
                                  or chunk < 1):
            raise _bad_option("chunk", "a whole number >= 1 or None", chunk)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise _bad_option("seed", "a whole number", seed)
        if variant == "vargrad" and (samples == 1 or noise == 0):
            logger.warning("variant='vargrad' with samples=%s and noise=%s: every map will be all zeros "
                           "(the variance of identical gradients).", samples, noise)
        self.target = Target.parse(target)
        self.samples = int(samples)
        self.noise = float(noise)
        self.noise_mode = noise_mode
        self.variant = variant
        self.reduce = reduce
        self.batch_size = int(batch_size)
        self.chunk = min(self.samples, int(chunk) if chunk else max(1, 32 // self.batch_size))
        self.seed = int(seed)
        self.logits = bool(logits)
        if isinstance(sample_offset, bool) or not isinstance(sample_offset, (int, np.integer)) or sample_offset < 0:
            raise _bad_option("sample_offset", "a whole number >= 0", sample_offset)
        self.sample_offset = int(sample_offset)
        self.model = model
        self.jit_used, self.jit_reason = choose_jit(model, jit)
        self._jit_requested = jit
        self._calls_done = 0
        self._score_fn, self.scores_from = score_function(model, logits=self.logits)
        self.input_shape = self._model_input_shape(model)
        self._function = None
        self._function_shape = None
        self._traces = 0

    @staticmethod
    def _model_input_shape(model) -> tuple[int, int, int] | None:
        shape = getattr(model, "input_shape", None) if isinstance(model, keras.Model) else None
        if isinstance(shape, list):
            raise ValueError(f"The model must take one image batch; it has {len(shape)} inputs.")
        if shape is None:
            return None
        if len(shape) != 4:
            raise ValueError("The model input must be an image batch [B, H, W, C]; "
                             f"it is {tuple(shape)}.")
        if any(dim is None for dim in shape[1:]):
            return None
        return tuple(int(dim) for dim in shape[1:])

    @property
    def compile_count(self) -> int:
        """How many times the SmoothGrad function was traced (and compiled)."""
        return self._traces

    def parameters(self) -> dict:
        """The settings that decide a map, for provenance records."""
        return {
            "samples": self.samples, "noise": self.noise, "noise_mode": self.noise_mode,
            "variant": self.variant, "reduce": self.reduce, "target": str(self.target),
            "batch_size": self.batch_size, "chunk": self.chunk, "seed": self.seed,
            "logits": self.logits, "scores_from": self.scores_from,
            "jit_used": self.jit_used, "jit_reason": self.jit_reason,
        }

    # ------------------------------------------------------------------ call
    def __call__(self, images, keys: Sequence[str], targets=None) -> SmoothGradResult:
        images = self._check_images(images)
        keys = [str(key) for key in keys]
        if len(keys) != images.shape[0]:
            raise ValueError(f"Got {images.shape[0]} images but {len(keys)} keys; give one key per image.")
        given = self._given_targets(targets, images.shape[0])
        if self._function is None:
            self._build(images.shape[1:])
        parts = [self._run_fixed(images[start:start + self.batch_size], keys[start:start + self.batch_size],
                                 given[start:start + self.batch_size])
                 for start in range(0, images.shape[0], self.batch_size)]
        if not parts:
            parts = [self._run_fixed(images, keys, given)]
        merged = {field: np.concatenate([part[field] for part in parts]) for field in parts[0]}
        if self.target.mode != "topk":
            for field in ("maps", "targets", "target_ranks", "scores"):
                merged[field] = merged[field][:, 0]
        return SmoothGradResult(**merged)

    def _check_images(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype.kind not in "fiu":
            raise ValueError(f"'images' must be a numeric array; got dtype {images.dtype}.")
        images = images.astype(np.float32, copy=False)
        if images.ndim != 4:
            raise ValueError("'images' must be a batch [B, H, W, C]; "
                             f"got an array of shape {images.shape} (rank {images.ndim}).")
        expected = self.input_shape or self._function_shape
        if expected is not None and tuple(images.shape[1:]) != tuple(expected):
            raise ValueError(f"Each image must be {tuple(expected)} (H, W, C) for this model; "
                             f"got {tuple(images.shape[1:])}. Resize the images first.")
        return images

    def _given_targets(self, targets, count: int) -> np.ndarray:
        k = self.target.maps_per_record
        if self.target.mode == "class":
            return np.full((count, 1), self.target.class_id, np.int32)
        if targets is None:
            if self.target.mode == "label":
                raise ValueError("target='label' needs 'targets' (one class per image) in each call.")
            return np.zeros((count, k), np.int32)
        targets = np.asarray(targets)
        if targets.ndim == 1:
            targets = targets[:, None]
        if targets.shape[0] != count or targets.ndim != 2 or targets.dtype.kind not in "iu":
            raise ValueError(f"'targets' must be {count} whole numbers (shape [B] or [B, K]); "
                             f"got shape {targets.shape} of dtype {targets.dtype}.")
        if self.target.mode in ("top1", "topk"):
            return np.zeros((count, k), np.int32)  # computed in the graph
        if targets.shape[1] != 1:
            raise ValueError(f"target='label' takes one class per image: 'targets' of shape [{count}] "
                             f"or [{count}, 1]; got shape {targets.shape}.")
        return targets.astype(np.int32)

    def _build(self, image_shape) -> None:
        height, width, channels = (int(dim) for dim in image_shape)
        # Validate before keeping the function: otherwise a second call would
        # skip the check and run with a class out of range (which XLA's gather
        # clamps silently instead of failing).
        num_classes = self._probe_classes(height, width, channels)
        if self.target.mode == "class" and not 0 <= self.target.class_id < num_classes:
            raise _bad_option("target", f"'class:K' with 0 <= K < {num_classes} (the model's classes)",
                              str(self.target))
        if self.target.mode == "topk" and self.target.k > num_classes:
            raise _bad_option("target", f"'topk:K' with K <= {num_classes} (the model's classes)",
                              str(self.target))
        self.num_classes = num_classes
        self._function_shape = (height, width, channels)
        batch, k = self.batch_size, self.target.maps_per_record
        signature = [
            tf.TensorSpec([batch, height, width, channels], tf.float32),
            tf.TensorSpec([batch], tf.int64),
            tf.TensorSpec([batch, k], tf.int32),
            tf.TensorSpec([batch], tf.float32),
        ]
        self._signature = signature
        self._function = self._compile()

    def _compile(self):
        return tf.function(self._step, input_signature=self._signature,
                           jit_compile=self.jit_used == "xla", autograph=False)

    def _call_compiled(self, *tensors):
        try:
            outputs = self._function(*tensors)
        except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError) as error:
            # ``auto`` must never leave a user without maps: when XLA cannot
            # compile the model (e.g. MaxPool gradients under op determinism),
            # the first call falls back to the plain graph.
            if self._jit_requested != "auto" or self.jit_used != "xla" or self._calls_done:
                raise
            reason = " ".join(str(error).split())[:200]
            logger.warning("XLA could not compile the SmoothGrad step (%s); using the plain graph.", reason)
            self.jit_used, self.jit_reason = "graph", f"auto: XLA failed to compile ({reason}); plain graph"
            self._function = self._compile()
            outputs = self._function(*tensors)
        self._calls_done += 1
        return outputs

    def _probe_classes(self, height, width, channels) -> int:
        scores = self._score_fn(tf.zeros([1, height, width, channels], tf.float32))
        if len(scores.shape) != 2:
            raise ValueError("The model must output class scores [B, classes]; "
                             f"its output has shape {tuple(scores.shape)}.")
        return int(scores.shape[-1])

    def _run_fixed(self, images: np.ndarray, keys: list[str], given: np.ndarray) -> dict:
        count = images.shape[0]
        pad = self.batch_size - count
        if self.noise_mode == "relative":
            spread = images.reshape(count, -1).max(axis=1) - images.reshape(count, -1).min(axis=1)
            sigma = (self.noise * spread).astype(np.float32)
        else:
            sigma = np.full(count, self.noise, np.float32)
        seeds = np.array([key_seed(self.seed, key) for key in keys], np.int64)
        if self.target.mode == "label":
            bad = (given < 0) | (given >= self.num_classes)
            if bad.any():
                raise ValueError(f"'targets' must be classes in [0, {self.num_classes}); "
                                 f"got {given[bad].tolist()}.")
        if pad:
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
            seeds = np.concatenate([seeds, np.zeros(pad, np.int64)])
            given = np.concatenate([given, np.zeros((pad,) + given.shape[1:], np.int32)])
            sigma_in = np.concatenate([sigma, np.zeros(pad, np.float32)])
        else:
            sigma_in = sigma
        maps, targets, ranks, scores, predicted = self._call_compiled(
            tf.constant(images), tf.constant(seeds), tf.constant(given), tf.constant(sigma_in))
        return {
            "maps": maps.numpy()[:count], "targets": targets.numpy()[:count],
            "target_ranks": ranks.numpy()[:count], "scores": scores.numpy()[:count],
            "predicted": predicted.numpy()[:count], "noise_sigma": sigma,
        }

    # --------------------------------------------------------- compiled step
    def _scores(self, images):
        scores = self._score_fn(images)
        return tf.reshape(tf.cast(scores, tf.float32), [tf.shape(images)[0], -1])

    def _step(self, images, seeds, given_targets, sigma):
        self._traces += 1  # runs only while tracing
        batch, height, width, channels = images.shape
        k, chunk, samples = self.target.maps_per_record, self.chunk, self.samples
        clean = self._scores(images)
        predicted = tf.argmax(clean, axis=-1, output_type=tf.int32)
        if self.target.mode in ("top1", "topk"):
            targets = tf.math.top_k(clean, k=k).indices
        else:
            targets = given_targets
        scores = tf.gather(clean, targets, batch_dims=1)
        ranks = tf.reduce_sum(tf.cast(clean[:, None, :] > scores[:, :, None], tf.int32), axis=-1)

        noisy_count = batch * chunk
        repeated_targets = tf.repeat(targets, chunk, axis=0)
        repeated_images = tf.repeat(images, chunk, axis=0)
        repeated_sigma = tf.reshape(tf.repeat(sigma, chunk), [noisy_count, 1, 1, 1])

        def gradients(first_sample):
            sample_index = first_sample + tf.range(chunk, dtype=tf.int64)
            noise_seeds = tf.stack([tf.repeat(seeds, chunk), tf.tile(sample_index + self.sample_offset, [batch])],
                                   axis=-1)
            noise = _standard_normal(noise_seeds, (height, width, channels))
            noisy = repeated_images + repeated_sigma * noise
            with tf.GradientTape(persistent=k > 1) as tape:
                tape.watch(noisy)
                target_scores = tf.gather(self._scores(noisy), repeated_targets, batch_dims=1)
                objectives = [tf.reduce_sum(target_scores[:, index]) for index in range(k)]
            grads = tf.stack([tape.gradient(objective, noisy) for objective in objectives], axis=1)
            weights = tf.cast(sample_index < samples, tf.float32)  # last chunk may overhang
            return tf.reshape(grads, [batch, chunk, k, height, width, channels]), weights

        n_chunks = -(-samples // chunk)
        weight_shape = [1, chunk, 1, 1, 1, 1]
        if self.variant == "vargrad":
            # Running mean and sum of squared deviations, merged chunk by chunk
            # (Chan, Golub & LeVeque) so that no sum of squares cancels.
            def body(index, count, mean, m2):
                grads, weights = gradients(tf.cast(index * chunk, tf.int64))
                chunk_count = tf.reduce_sum(weights)
                w = tf.reshape(weights, weight_shape)
                chunk_mean = tf.reduce_sum(w * grads, axis=1) / chunk_count
                chunk_m2 = tf.reduce_sum(w * tf.square(grads - chunk_mean[:, None]), axis=1)
                total = count + chunk_count
                delta = chunk_mean - mean
                mean = mean + delta * (chunk_count / total)
                m2 = m2 + chunk_m2 + tf.square(delta) * (count * chunk_count / total)
                return index + 1, total, mean, m2

            zeros = tf.zeros([batch, k, height, width, channels])
            _, count, _, m2 = _loop(n_chunks, body, (tf.constant(0), tf.constant(0.0), zeros, zeros))
            maps = _reduce_magnitude(m2 / count, self.reduce)
        else:
            def per_chunk(grads):
                if self.variant == "smoothgrad":
                    return _reduce_magnitude(grads, self.reduce)
                if self.variant == "smoothgrad_squared":
                    return _reduce_magnitude(tf.square(grads), self.reduce)
                return grads  # signed, grad_x_input: reduced after averaging

            keep_channels = self.reduce == "none" or self.variant in ("signed", "grad_x_input")
            acc_shape = [batch, k, height, width] + ([channels] if keep_channels else [])
            acc_weight_shape = weight_shape if keep_channels else weight_shape[:-1]

            def body(index, total):
                grads, weights = gradients(tf.cast(index * chunk, tf.int64))
                values = per_chunk(grads)
                return index + 1, total + tf.reduce_sum(tf.reshape(weights, acc_weight_shape) * values, axis=1)

            _, total = _loop(n_chunks, body, (tf.constant(0), tf.zeros(acc_shape)))
            mean = total / float(samples)
            if self.variant == "signed":
                maps = _reduce_signed(mean, self.reduce)
            elif self.variant == "grad_x_input":
                maps = _reduce_signed(images[:, None] * mean, self.reduce)
            else:
                maps = mean
        return maps, targets, ranks, scores, predicted
