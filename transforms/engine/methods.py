"""What one noisy sample contributes: its gradient, its integrated gradients, or its Grad-CAM.

SmoothGrad averages a per-sample map over noisy copies of the input. The
per-sample map need not be the plain gradient (Smilkov et al. smooth other
explainers too, as PAIR ``saliency``, captum's ``NoiseTunnel`` and
``keras_explainable``'s ``meta.smooth`` do):

* ``gradient``: the gradient of the target score with respect to the noisy
  input ``x̃ = x + σ ε`` (the default, and the original SmoothGrad);
* ``integrated_gradients`` (Sundararajan et al. 2017): ``(x̃ − b) ×`` the
  path integral of the gradient from a baseline ``b`` to ``x̃``, by the
  trapezoid rule on ``ig_steps`` points evenly spaced with both ends included
  (PAIR ``saliency`` averages the same points with equal weights, which is
  off by O(1/steps); the trapezoid's error is O(1/steps²)). Per sample the
  attributions add up to about ``f(x̃) − f(b)``. Baselines: ``black`` (the
  black image in pixel space, passed through the run's preprocessing),
  ``uniform`` (per pixel uniform between black and white, drawn per (seed,
  key, sample) from a stream apart from the noise's) or ``blur`` (the clean
  image blurred by a Gaussian of σ one tenth of its shorter side);
* ``gradcam`` (Selvaraju et al. 2017): on a layer's spatial activations ``A``,
  ``ReLU(Σ_c mean_ij(∂score/∂A_ijc) A_c)``, resized bilinearly to the input.
  The layer is ``gradcam_layer``, or with ``auto`` the last layer with a
  spatial 4-D output before the model's last global pooling or flatten,
  searched inside nested models too.

Every variant folds these per-sample maps as it folds gradients; a variant or
reduction that makes no sense for a method is refused (:func:`check_method`).

Example:

>>> find_gradcam_layer(keras.applications.ResNet50(weights=None), "auto").name
'conv5_block3_out'
"""

from __future__ import annotations

import contextlib
import math
import threading

import keras
import numpy as np
import tensorflow as tf

from transforms.engine.options import bad_option

#: The per-sample explainers, by name.
METHODS = ("gradient", "integrated_gradients", "gradcam")
#: Integrated gradients' baselines.
IG_BASELINES = ("black", "uniform", "blur")
#: ``ig_steps`` by default (the gradients per noisy sample).
DEFAULT_IG_STEPS = 32
#: The blur baseline's Gaussian σ, as a share of the image's shorter side.
BLUR_SHARE = 0.1
#: Layers after which a model has no spatial axes any more.
_POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D, keras.layers.Flatten)
#: How many candidate layers an unknown ``gradcam_layer`` lists.
_LISTED = 12
_CAPTURE_LOCK = threading.Lock()


def check_method(method: str, variant: str, reduce: str, ig_steps, ig_baseline: str, gradcam_layer) -> None:
    """Raises ``ValueError`` (one line) for a method, or a method's setting, that cannot be used.

    ``grad_x_input`` multiplies the mean by the clean input: integrated
    gradients already multiply by ``x̃ − b``, and Grad-CAM's maps are not
    gradients. Grad-CAM's maps are non-negative and have no channels, so
    ``signed`` would equal ``smoothgrad`` and ``reduce: none`` has nothing to keep.
    """
    if method not in METHODS:
        raise bad_option("method", f"one of {METHODS}", method)
    if method != "gradient" and variant == "grad_x_input":
        raise bad_option("variant", f"one of smoothgrad, smoothgrad_squared, vargrad, signed with method "
                         f"'{method}' (grad_x_input multiplies by the input: use method 'gradient')", variant)
    if method == "gradcam" and variant == "signed":
        raise bad_option("variant", "smoothgrad, smoothgrad_squared or vargrad with method 'gradcam' "
                         "(its maps are non-negative: signed would equal smoothgrad)", variant)
    if method == "gradcam" and reduce == "none":
        raise bad_option("reduce", "mean_abs, max_abs or sum_abs with method 'gradcam' "
                         "(its maps have no channels to keep)", reduce)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, (int, np.integer)) or ig_steps < 2:
        raise bad_option("ig_steps", "a whole number >= 2", ig_steps)
    if ig_baseline not in IG_BASELINES:
        raise bad_option("ig_baseline", f"one of {IG_BASELINES}", ig_baseline)
    if not isinstance(gradcam_layer, str) or not gradcam_layer:
        raise bad_option("gradcam_layer", "'auto' or a layer name", gradcam_layer)


# ------------------------------------------------------------------ Grad-CAM's layer
def _flat_layers(model) -> list:
    """The model's layers in order, each nested model replaced by its own layers (depth first)."""
    layers = []
    for layer in getattr(model, "layers", None) or []:
        if isinstance(layer, keras.Model) and getattr(layer, "layers", None):
            layers += _flat_layers(layer)
        else:
            layers.append(layer)
    return layers


def _output_shape(layer):
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError, RuntimeError):
        return None


def _is_spatial(layer) -> bool:
    shape = _output_shape(layer)
    return (shape is not None and len(shape) == 4 and None not in shape[1:3]
            and shape[1] * shape[2] > 1)


def spatial_layers(model) -> list:
    """The layers (nested ones included) with a spatial 4-D output ``[B, h, w, c]``, ``h × w > 1``, in order."""
    return [layer for layer in _flat_layers(model) if _is_spatial(layer)]


def find_gradcam_layer(model, name: str = "auto"):
    """The layer Grad-CAM reads: the named one, or with ``auto`` the last spatial one before the head.

    Args:
        model: a Keras model (Functional or Sequential; nested models are searched).
        name: ``auto`` or a layer name.

    Returns:
        The layer object.

    Raises:
        ValueError: (one line) when the model has no such layer, or no layer
            with a spatial 4-D output; the message lists candidates.
    """
    if not isinstance(model, keras.Model):
        raise bad_option("method", "'gradient' or 'integrated_gradients' for a model that is not a Keras model "
                         "(Grad-CAM reads a layer's activations)", "gradcam")
    layers = _flat_layers(model)
    candidates = [layer for layer in layers if _is_spatial(layer)]
    if name == "auto":
        pooled = [index for index, layer in enumerate(layers) if isinstance(layer, _POOLING)]
        before = [layer for layer in layers[:pooled[-1]] if _is_spatial(layer)] if pooled else candidates
        chosen = before or candidates
        if not chosen:
            raise ValueError(f"gradcam_layer 'auto': model {model.name!r} has no layer with a spatial 4-D output "
                             "[B, h, w, c]; Grad-CAM needs one (use method 'gradient' or "
                             "'integrated_gradients').")
        return chosen[-1]
    for layer in layers:
        if layer.name == name:
            if not _is_spatial(layer):
                raise ValueError(f"gradcam_layer {name!r}: its output {_output_shape(layer)} is not a spatial "
                                 f"4-D [B, h, w, c]; {_listing(candidates)}.")
            return layer
    raise ValueError(f"gradcam_layer {name!r}: model {model.name!r} has no layer of that name; "
                     f"{_listing(candidates)}.")


def _listing(candidates) -> str:
    if not candidates:
        return "it has no layer with a spatial 4-D output"
    names = [layer.name for layer in candidates[-_LISTED:]]
    more = len(candidates) - len(names)
    return ("layers with a spatial 4-D output, last first: " + ", ".join(reversed(names))
            + (f" (and {more} earlier)" if more else ""))


@contextlib.contextmanager
def captured(layer, tape):
    """Within the block, every call of ``layer`` stores its output in the yielded list, watched by ``tape``.

    The layer's ``call`` is wrapped on the instance for the block only (the
    model is the caller's, and is left as it was), so the activations come
    from the very forward pass that produces the scores, wherever the layer
    sits (a nested model included).
    """
    outputs = []
    original = layer.__dict__.get("call")
    bound = layer.call

    def call(*args, **kwargs):
        output = bound(*args, **kwargs)
        tape.watch(output)
        outputs.append(output)
        return output

    with _CAPTURE_LOCK:
        object.__setattr__(layer, "call", call)
        try:
            yield outputs
        finally:
            if original is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", original)


def gradcam_from(activations, gradients, size):
    """Grad-CAM maps ``[n, H, W]`` from activations and their gradients ``[n, h, w, c]``, resized bilinearly."""
    activations = tf.cast(activations, tf.float32)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1))
    return tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]


# ------------------------------------------------------------------ integrated gradients' baselines
def pixel_range(preprocessing, channels: int) -> tuple[list[float], list[float]]:
    """The model-input values of a black and of a white pixel, per channel, under ``preprocessing``.

    Args:
        preprocessing: a callable mapping RGB pixel values in [0, 255]
            (float32 ``[..., C]``) to model input units, or None (the model
            takes pixels scaled to [0, 1]).
        channels: the model's input channels.
    """
    if preprocessing is None:
        return [0.0] * channels, [1.0] * channels
    ends = np.asarray(preprocessing(np.stack([np.zeros((1, 1, channels), np.float32),
                                              np.full((1, 1, channels), 255.0, np.float32)])), np.float64)
    return [float(value) for value in ends[0, 0, 0]], [float(value) for value in ends[1, 0, 0]]


def _gaussian_blur(images, sigma: float):
    """Each image blurred by a separable Gaussian of ``sigma`` pixels (edges reflected)."""
    height, width, channels = images.shape[1:]
    radius = max(1, min(int(math.ceil(3 * sigma)), height - 1, width - 1))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = tf.constant((taps / taps.sum()).astype(np.float32))
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    rows = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, channels, 1])
    columns = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(blurred, columns, [1, 1, 1, 1], "VALID")


def ig_baselines(kind: str, images, seeds, black, white):
    """The baseline of each row ``[n, H, W, C]``.

    Args:
        kind: one of :data:`IG_BASELINES`.
        images: float32 ``[n, H, W, C]``, the clean image of each row.
        seeds: int64 ``[n, 2]``, (example seed, sample index) of each row: the
            uniform baseline is drawn from ``(example seed, -1 - sample index)``,
            a stream the noise never uses.
        black, white: float32 ``[C]``, a black and a white pixel in model units.
    """
    if kind == "black":
        return tf.broadcast_to(black, tf.shape(images))
    if kind == "blur":
        height, width = images.shape[1:3]
        return _gaussian_blur(images, BLUR_SHARE * min(height, width))
    shape = images.shape[1:]
    streams = tf.stack([seeds[:, 0], -1 - seeds[:, 1]], axis=-1)
    uniform = tf.map_fn(lambda seed: tf.random.stateless_uniform(shape, seed=seed, alg="philox"), streams,
                        fn_output_signature=tf.float32)
    return black + uniform * (white - black)


def ig_path(steps: int):
    """The ``steps`` path positions, 0 to 1 inclusive, and their trapezoid-rule weights (they sum to 1)."""
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] *= 0.5
    return tf.constant(np.linspace(0.0, 1.0, steps, dtype=np.float32)), tf.constant(weights.astype(np.float32))
