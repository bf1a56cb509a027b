"""SmoothGrad engine: vectorised, compiled once, reproducible per example.

The numerical core of smoothgrad-audit. It knows nothing of Beam: it takes a
Keras model and a batch of preprocessed images, and returns numpy arrays.

Semantics, following Smilkov et al. 2017 (arXiv:1706.03825):

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

This module validates, batches, pads, compiles and calls; the pieces are in
``transforms.engine.noise``, ``targets``, ``scores``, ``reductions``, ``variants``,
``jit`` and ``precision`` (names callers import from here are re-exported).

Example:

>>> explainer = SmoothGrad(model, samples=20, noise=0.1, batch_size=4)
>>> result = explainer(images, keys=["a", "b"])
>>> result.maps.shape            # (2, H, W)
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import tensorflow as tf

from transforms.engine.adaptive import DEFAULT_MAX_SAMPLES, DEFAULT_MIN_SAMPLES, DEFAULT_TARGET, AdaptiveSamples
from transforms.engine.device import current_device_kind
from transforms.engine.settings import check_settings
from transforms.engine.methods import DEFAULT_IG_STEPS, IG_BASELINES, METHODS, check_method, find_gradcam_layer
from transforms.engine.inputs import ModelInputs
from transforms.engine.jit import (JIT_MODES, XLA_COMPILE_ERRORS, choose_jit, graph_fallback, has_xla_slow_layers,
                                   visible_accelerators)
from transforms.engine.noise import NOISE_MODES, key_seed, sigma_per_image
from transforms.engine.precision import PRECISIONS, with_precision
from transforms.engine.result import SmoothGradResult
from transforms.engine.reductions import REDUCTIONS
from transforms.engine.scores import score_function
from transforms.engine.targets import TARGET_FORMS, Target
from transforms.engine.stages import AdaptiveStages
from transforms.engine.statistics import split_half_reliability, stopping_reliability
from transforms.engine.steps import CompiledSteps
from transforms.engine.variants import VARIANTS, SplitHalves, default_chunk, get_variant

__all__ = ["SmoothGrad", "SmoothGradResult",  # and, re-exported for callers:
           "METHODS", "IG_BASELINES", "VARIANTS", "REDUCTIONS", "NOISE_MODES", "JIT_MODES", "TARGET_FORMS",
           "PRECISIONS", "Target", "key_seed", "choose_jit", "score_function", "has_xla_slow_layers"]

logger = logging.getLogger(__name__)


class SmoothGrad(ModelInputs, CompiledSteps, AdaptiveStages):
    """SmoothGrad explainer for a Keras model, compiled once per instance.

    Args:
        model: a Keras 3 model (Sequential, Functional, subclassed, or loaded from
            a ``.keras`` file) mapping ``[B, H, W, C]`` float32 images to class
            scores ``[B, classes]``.
        samples: N, the number of noisy copies per image (>= 1). All are noisy.
            Or ``"auto"``: each image gets as many as its map needs to converge
            (see :mod:`transforms.engine.adaptive`), between ``min_samples`` and
            ``max_samples``; ``result.samples_used`` says how many.
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
        chunk: noisy samples per image processed at once. Default: the fewest
            chunks of at most 8 noisy images per step on a CPU (32 with a GPU
            or TPU), each chunk as small as covers ``samples`` with that count
            (see :meth:`default_chunk`). A chunk that does not divide ``samples`` is followed by one
            smaller remainder chunk: exactly ``samples`` gradients are computed.
        jit: ``xla``, ``graph`` or ``auto`` (see :func:`choose_jit`).
        seed: global noise seed.
        logits: explain pre-softmax/sigmoid scores (True) or the outputs as
            they are (False).
        sample_offset: index of the first noise sample (default 0). Two
            explainers with ``samples=n`` and offsets 0 and n draw disjoint
            noise, as the split-half convergence check needs.
        precision: the model's compute dtype, ``float32`` (default),
            ``bfloat16`` or ``float16`` (a mixed-precision clone of the model;
            noise, sums and maps stay float32).
        reliability: also accumulate the even- and odd-numbered samples apart
            (in the same compiled step; the map is unchanged) and return each
            map's split-half rank correlation (default True; needed by ``samples="auto"``).
        target_reliability, min_samples, max_samples: the ``samples="auto"``
            settings (:class:`transforms.engine.adaptive.AdaptiveSamples`): the
            estimated rank correlation with the converged map at which an image
            stops (0.95), its first stage (8) and its most samples (64).
        method: what each noisy sample contributes (:mod:`transforms.engine.methods`):
            ``gradient`` (default), ``integrated_gradients`` or ``gradcam``.
        ig_steps: integrated gradients' path points per noisy sample (>= 2; 32).
            Their ``chunk`` counts path points per image at once (the samples
            then go one at a time), so memory does not grow with ``ig_steps``.
        ig_baseline: ``black``, ``uniform`` or ``blur``.
        gradcam_layer: ``auto`` (the last spatial layer before the model's
            global pooling or flatten, nested models searched) or a layer name.
        pixel_range: ``(black, white)``, a black and a white pixel in model
            input units (per channel, or one value); integrated gradients'
            ``black`` and ``uniform`` baselines read it. Default ``(0, 1)``.

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
                 logits: bool = True, sample_offset: int = 0, precision: str = "float32",
                 reliability: bool = True, target_reliability: float = DEFAULT_TARGET,
                 min_samples: int = DEFAULT_MIN_SAMPLES, max_samples: int = DEFAULT_MAX_SAMPLES,
                 method: str = "gradient", ig_steps: int = DEFAULT_IG_STEPS, ig_baseline: str = "black",
                 gradcam_layer: str = "auto", pixel_range=None):
        self.adaptive = None
        if isinstance(samples, str) and samples == "auto":
            self.adaptive = AdaptiveSamples(target_reliability, min_samples, max_samples)
        check_settings(samples, noise, noise_mode, variant, reduce, batch_size, seed, sample_offset, chunk, reliability)
        check_method(method, variant, reduce, ig_steps, ig_baseline, gradcam_layer)
        self.method = method
        self.ig_steps = int(ig_steps)
        self.ig_baseline = ig_baseline
        self.target = Target.parse(target)
        self._accumulator = get_variant(variant, reduce)
        self.samples = "auto" if self.adaptive else int(samples)
        self.noise = float(noise)
        self.noise_mode = noise_mode
        self.variant = variant
        self.reduce = reduce
        self.batch_size = int(batch_size)
        self.chunk = self._choose_chunk(chunk)
        self.seed = int(seed)
        self.logits = bool(logits)
        self.sample_offset = int(sample_offset)
        self.reliability = bool(reliability)
        self.model = model
        self.jit_used, self.jit_reason = choose_jit(model, jit)
        self._jit_requested = jit
        # On a CPU each image's clean forward pass runs alone (see CompiledSteps._clean_scores); on a GPU or
        # TPU a loop of single-image passes would cost a large share of the batch, so it stays batched.
        self.clean_alone = not visible_accelerators()
        self._calls_done = 0
        self.precision = precision
        scoring_model = with_precision(model, precision)
        self._score_fn, self.scores_from = score_function(scoring_model, logits=self.logits)
        self._gradcam_layer = find_gradcam_layer(scoring_model, gradcam_layer) if method == "gradcam" else None
        self.gradcam_layer = self._gradcam_layer.name if self._gradcam_layer is not None else None
        black, white = ([0.0], [1.0]) if pixel_range is None else pixel_range
        self.pixel_range = ([float(value) for value in np.ravel(black)], [float(value) for value in np.ravel(white)])
        self._black, self._white = (tf.constant(value, tf.float32) for value in self.pixel_range)
        self.input_shape = self._model_input_shape(model)
        self.num_classes: int | None = None
        self._function = None
        self._function_shape = None
        self._traces = 0

    #: The default chunk for ``samples`` and ``batch_size`` (:func:`transforms.engine.variants.default_chunk`).
    default_chunk = staticmethod(default_chunk)

    def _choose_chunk(self, chunk: int | None) -> int:
        if self.method == "integrated_gradients":  # path points per image at once; samples go one at a time
            return self.default_chunk(self.ig_steps, self.batch_size) if chunk is None else min(self.ig_steps,
                                                                                                 int(chunk))
        if self.adaptive is None:
            return self.default_chunk(self.samples, self.batch_size) if chunk is None else min(self.samples, int(chunk))
        # Adaptive: every stage after the first has its length as an input of one compiled function, so
        # the chunk must divide each of those lengths (no remainder chunk of another shape).
        wanted = self.default_chunk(self.adaptive.min_samples, self.batch_size) if chunk is None else int(chunk)
        common = self.adaptive.continue_gcd() or wanted
        return max(size for size in range(1, min(wanted, common) + 1) if common % size == 0)

    @property
    def sample_chunk(self) -> int:
        """Noisy samples per image folded in at once: ``chunk``, or 1 for integrated gradients (whose
        ``chunk`` counts path points)."""
        return 1 if self.method == "integrated_gradients" else self.chunk

    def map_channels(self, channels: int) -> int:
        """The channels of one sample's map: the image's, or 1 for Grad-CAM."""
        return 1 if self.method == "gradcam" else channels

    @functools.cached_property
    def device(self) -> str:
        """The kind of device the maps are computed on (:func:`transforms.engine.device.device_kind`)."""
        return current_device_kind()

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
            "logits": self.logits, "scores_from": self.scores_from, "precision": self.precision,
            "adaptive": self.adaptive.as_dict() if self.adaptive else None,
            "jit_used": self.jit_used, "jit_reason": self.jit_reason,
            "method": self.method, **self.method_settings(),
        }

    def method_settings(self) -> dict:
        """The method's own settings (none for ``gradient``), for provenance records."""
        if self.method == "integrated_gradients":
            black, white = self.pixel_range
            return {"ig_steps": self.ig_steps, "ig_baseline": self.ig_baseline, "ig_black": black, "ig_white": white}
        if self.method == "gradcam":
            return {"gradcam_layer": self.gradcam_layer}
        return {}

    # ------------------------------------------------------------------ call
    def __call__(self, images, keys: Sequence[str], targets=None) -> SmoothGradResult:
        """Explains a batch of any size (split into, and padded to, the compiled batch).

        Args:
            images: float32 ``[B, H, W, C]``, preprocessed.
            keys: one string key per image; the noise depends on (seed, key, sample).
            targets: ``[B]`` (or ``[B, 1]``) classes, required for ``target="label"``.

        Returns:
            A :class:`SmoothGradResult` of numpy arrays.
        """
        images = self._check_images(images)
        keys = [str(key) for key in keys]
        if len(keys) != images.shape[0]:
            raise ValueError(f"Got {images.shape[0]} images but {len(keys)} keys; give one key per image.")
        given = self.target.given_classes(targets, images.shape[0])
        if self._function is None:
            self._build(images.shape[1:])
        if self.adaptive is not None:
            merged = self._run_adaptive(images, keys, given)
        else:
            parts = [self._run_fixed(images[start:start + self.batch_size], keys[start:start + self.batch_size],
                                     given[start:start + self.batch_size])
                     for start in range(0, images.shape[0], self.batch_size)]
            if not parts:
                parts = [self._run_fixed(images, keys, given)]
            merged = {field: np.concatenate([part[field] for part in parts]) for field in parts[0]}
            merged["samples_used"] = np.full(images.shape[0], self.samples, np.int32)
        if self.target.mode != "topk":
            for field in ("maps", "targets", "target_ranks", "scores", "reliability", "stopping"):
                if field in merged:
                    merged[field] = merged[field][:, 0]
        return SmoothGradResult(**merged)

    def _build(self, image_shape) -> None:
        # Validate before keeping the function: otherwise a second call would
        # skip the check and run with a class out of range (which XLA's gather
        # clamps silently instead of failing).
        self.check_model(image_shape)
        height, width, channels = (int(dim) for dim in image_shape)
        self._function_shape = (height, width, channels)
        batch, k = self.batch_size, self.target.maps_per_record
        self._signature = [tf.TensorSpec([batch, height, width, channels], tf.float32),
                           tf.TensorSpec([batch], tf.int64), tf.TensorSpec([batch, k], tf.int32),
                           tf.TensorSpec([batch], tf.float32)]
        if self.adaptive is not None:  # a later stage: first sample, sample count, the carried state's leaves
            start = SplitHalves(self._accumulator).start(batch, k, height, width, self.map_channels(channels))
            self._state_structure = start
            self._continue_signature = self._signature + [tf.TensorSpec([], tf.int32)] * 2 + [
                tf.TensorSpec(leaf.shape, leaf.dtype) for leaf in tf.nest.flatten(start)]
        self._compile()

    def _compile(self):
        self._function = tf.function(self._step, input_signature=self._signature,
                                     jit_compile=self.jit_used == "xla", autograph=False)
        if self.adaptive is not None:
            self._continue_function = tf.function(self._continue_step, input_signature=self._continue_signature,
                                                  jit_compile=self.jit_used == "xla", autograph=False)
        self._concrete = {}

    def _concrete_function(self, name):
        """The one trace of a compiled function, called directly: the signature is fixed, so the call skips
        ``tf.function``'s lookup of its traces and binding of arguments (about 1 ms a call here, a few
        percent of a small model's step)."""
        if name not in self._concrete:
            self._concrete[name] = getattr(self, name).get_concrete_function()
        return self._concrete[name]

    def _call_compiled(self, name, *tensors):
        try:
            outputs = self._concrete_function(name)(*tensors)
        except XLA_COMPILE_ERRORS as error:
            fallback = graph_fallback(self._jit_requested, self.jit_used, self._calls_done, error)
            if fallback is None:
                raise
            self.jit_used, self.jit_reason = fallback
            self._compile()
            outputs = self._concrete_function(name)(*tensors)
        self._calls_done += 1
        return outputs

    def _padded_inputs(self, images: np.ndarray, keys: list[str], given: np.ndarray, sigma: np.ndarray) -> list:
        pad = self.batch_size - images.shape[0]
        seeds = np.array([key_seed(self.seed, key) for key in keys], np.int64)
        if self.target.mode == "label":
            bad = (given < 0) | (given >= self.num_classes)
            if bad.any():
                raise ValueError(f"'targets' must be classes in [0, {self.num_classes}); "
                                 f"got {given[bad].tolist()}.")
        arrays = [images, seeds, given.astype(np.int32, copy=False), sigma.astype(np.float32, copy=False)]
        if pad:
            arrays = [np.concatenate([array, np.zeros((pad,) + array.shape[1:], array.dtype)]) for array in arrays]
        return [tf.constant(array) for array in arrays]

    def _run_fixed(self, images: np.ndarray, keys: list[str], given: np.ndarray) -> dict:
        count = images.shape[0]
        sigma = sigma_per_image(images, self.noise, self.noise_mode)
        maps, targets, ranks, scores, predicted, *halves = self._call_compiled(
            "_function", *self._padded_inputs(images, keys, given, sigma))
        out = {
            "maps": maps.numpy()[:count], "targets": targets.numpy()[:count],
            "target_ranks": ranks.numpy()[:count], "scores": scores.numpy()[:count],
            "predicted": predicted.numpy()[:count], "noise_sigma": sigma,
        }
        if self.reliability:
            out["reliability"] = split_half_reliability(*(half.numpy()[:count] for half in halves[:2])) \
                if halves else np.full(out["targets"].shape, np.nan, np.float32)
        if self.adaptive is not None:
            out["state"] = [leaf.numpy() for leaf in halves[2:]]
            out["stopping"] = stopping_reliability(*(half.numpy()[:count] for half in halves[:2]))
        return out
