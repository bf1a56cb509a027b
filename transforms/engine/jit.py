"""How the SmoothGrad step is compiled: XLA or the plain TensorFlow graph.

:func:`choose_jit` resolves ``jit="auto"`` before the first call;
:func:`graph_fallback` decides, when XLA then fails to compile the step,
whether ``auto`` may fall back to the plain graph.

Example:

>>> choose_jit(model, "auto")        # on a CPU-only machine
('graph', 'auto: CPU, where XLA measured slower than the plain graph')
"""

from __future__ import annotations

import logging

import tensorflow as tf

from transforms.engine.options import bad_option

logger = logging.getLogger(__name__)

#: ``auto`` (decided by :func:`choose_jit`), ``xla`` or ``graph``.
JIT_MODES = ("auto", "xla", "graph")

#: Errors by which XLA refuses to compile a step (e.g. MaxPool gradients
#: under op determinism), after which ``auto`` falls back to the graph.
XLA_COMPILE_ERRORS = (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError)

# Layers whose gradients XLA compiles into very slow code on CPU: measured
# here, Xception ran 5.5x and MobileNetV2 about 10x slower than the plain graph.
_XLA_SLOW_ON_CPU = ("DepthwiseConv2D", "SeparableConv2D", "DepthwiseConv1D", "SeparableConv1D")


def _iter_layers(model) -> list:
    """All layers of ``model``, nested models' layers included."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))


def has_xla_slow_layers(model) -> bool:
    """Whether the model has depthwise/separable convolutions (slow under XLA on CPU).

    Args:
        model: a Keras model (nested models are searched) or any object.

    Returns:
        True when a depthwise or separable convolution layer is found.
    """
    return any(type(layer).__name__ in _XLA_SLOW_ON_CPU for layer in _iter_layers(model))


def visible_accelerators() -> list:
    """The GPUs and TPUs TensorFlow sees (logical devices); empty on a CPU-only machine."""
    return tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")


def choose_jit(model, requested: str = "auto") -> tuple[str, str]:
    """Resolves ``jit`` to ``xla`` or ``graph`` and says why.

    ``auto`` picks ``xla`` when a GPU or TPU is visible to TensorFlow and the
    plain graph on a CPU. Measured on this project's 2-core CPU (TF 2.21,
    benchmarks/RESULTS.md), XLA was slower than the graph for every model tried:
    about 1.5x for ResNet50 and several times for the demo CNN, and 5-10x for
    models with depthwise or separable convolutions (Xception, MobileNet),
    whose gradients XLA compiles into slow code on CPU.

    Args:
        model: the model to explain.
        requested: one of :data:`JIT_MODES`.

    Returns:
        ``(mode, reason)``: ``mode`` is ``xla`` or ``graph``; ``reason`` is
        ``"requested"`` or starts with ``"auto: "``.

    Raises:
        ValueError: when ``requested`` is not one of :data:`JIT_MODES`.
    """
    if requested not in JIT_MODES:
        raise bad_option("jit", f"one of {JIT_MODES}", requested)
    if requested != "auto":
        return requested, "requested"
    accelerators = visible_accelerators()
    if accelerators:
        return "xla", f"auto: accelerator {accelerators[0].name} visible"
    if has_xla_slow_layers(model):
        return "graph", "auto: CPU, and depthwise/separable convolutions are 5-10x slower under XLA on CPU"
    return "graph", "auto: CPU, where XLA measured slower than the plain graph"


def graph_fallback(requested: str, used: str, calls_done: int, error: BaseException) -> tuple[str, str] | None:
    """Whether a failed compiled call may be retried on the plain graph.

    ``auto`` must never leave a user without maps: when XLA cannot compile the
    step on the first call, ``auto`` falls back to the plain graph. An explicit
    ``jit="xla"``, a failure of the graph itself, or a failure after a
    successful call is an error to raise.

    Args:
        requested: the ``jit`` the user asked for.
        used: the mode the failing call ran with.
        calls_done: how many calls succeeded before.
        error: the error raised by the call.

    Returns:
        ``("graph", reason)`` (the new ``jit_used`` and ``jit_reason``), or
        None when the error must be raised.
    """
    if requested != "auto" or used != "xla" or calls_done or not isinstance(error, XLA_COMPILE_ERRORS):
        return None
    reason = " ".join(str(error).split())[:200]
    logger.warning("XLA could not compile the SmoothGrad step (%s); using the plain graph.", reason)
    return "graph", f"auto: XLA failed to compile ({reason}); plain graph"
