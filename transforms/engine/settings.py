"""The checks of :class:`transforms.smoothgrad.SmoothGrad`'s plain settings, each refusal one line.

Example:

>>> check_settings(20, 0.1, "absolute", "smoothgrad", "mean_abs", batch_size=0, seed=0, sample_offset=0,
...                chunk=None, reliability=True)
Traceback (most recent call last):
ValueError: 'batch_size' must be a whole number >= 1; got 0.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from transforms.engine.noise import NOISE_MODES
from transforms.engine.options import bad_option
from transforms.engine.reductions import REDUCTIONS
from transforms.engine.variants import VARIANTS

logger = logging.getLogger("transforms.engine.smoothgrad")


def is_whole(value, minimum: int | None = None) -> bool:
    """Whether ``value`` is an int (not a bool), at least ``minimum`` if given."""
    return (not isinstance(value, bool) and isinstance(value, (int, np.integer))
            and (minimum is None or value >= minimum))


def check_settings(samples, noise, noise_mode: str, variant: str, reduce: str, batch_size, seed, sample_offset,
                   chunk, reliability) -> None:
    """Raises ``ValueError`` (one line naming the setting) for a setting outside its allowed values.

    ``samples`` is a whole number >= 1 or ``"auto"`` (which needs ``reliability``).
    Warns when ``vargrad`` can only give zeros (one sample, or no noise).
    """
    if isinstance(samples, str) and samples == "auto":
        if not reliability:
            raise bad_option("reliability", "True with samples='auto' (the stopping rule reads the half-maps)",
                             reliability)
    elif not is_whole(samples, 1):
        raise bad_option("samples", "a whole number >= 1 or 'auto'", samples)
    for name, value, minimum in (("batch_size", batch_size, 1), ("seed", seed, None),
                                 ("sample_offset", sample_offset, 0)):
        if not is_whole(value, minimum):
            raise bad_option(name, "a whole number" + ("" if minimum is None else f" >= {minimum}"), value)
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating)) \
            or not math.isfinite(noise) or noise < 0:
        raise bad_option("noise", "a finite number >= 0", noise)
    for name, value, allowed in (("noise_mode", noise_mode, NOISE_MODES), ("variant", variant, VARIANTS),
                                 ("reduce", reduce, REDUCTIONS)):
        if value not in allowed:
            raise bad_option(name, f"one of {allowed}", value)
    if chunk is not None and not is_whole(chunk, 1):
        raise bad_option("chunk", "a whole number >= 1 or None", chunk)
    if variant == "vargrad" and (samples == 1 or noise == 0):
        logger.warning("variant='vargrad' with samples=%s and noise=%s: every map will be all zeros "
                       "(the variance of identical gradients).", samples, noise)
