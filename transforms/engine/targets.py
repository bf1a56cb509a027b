"""Which class(es) SmoothGrad explains for each image.

A target is written ``top1`` (the top-scoring class), ``label`` (a class given
with each image), ``class:K`` (always class ``K``) or ``topk:K`` (the ``K``
top-scoring classes, one map each, in score order).

Example:

>>> target = Target.parse("topk:3")
>>> str(target), target.maps_per_record
('topk:3', 3)
>>> target.check_classes(2)
Traceback (most recent call last):
...
ValueError: 'target' must be 'topk:K' with K <= 2 (the model's classes); got 'topk:3'.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow as tf

from transforms.engine.options import bad_option

#: The forms a target can be written in.
TARGET_FORMS = ("top1", "label", "class:K", "topk:K")


@dataclasses.dataclass(frozen=True)
class Target:
    """Which class(es) to explain.

    Attributes:
        mode: ``top1``, ``topk`` (``k`` maps per image, in score order),
            ``label`` (classes given with each call) or ``class`` (the fixed
            ``class_id``).
        k: maps per image (``topk`` only; 1 otherwise).
        class_id: the class explained in ``class`` mode.
    """

    mode: str
    k: int = 1
    class_id: int | None = None

    @classmethod
    def parse(cls, text: str | "Target") -> "Target":
        """Parses ``top1``, ``label``, ``class:K`` or ``topk:K``.

        Args:
            text: the written target, or a :class:`Target` (returned as is).

        Returns:
            The :class:`Target`.

        Raises:
            ValueError: for any other text, or ``topk:0``.

        Example:

        >>> Target.parse("topk:3")
        Target(mode='topk', k=3, class_id=None)
        """
        if isinstance(text, Target):
            return text
        allowed = "one of 'top1', 'label', 'class:K' or 'topk:K' (K a whole number)"
        if not isinstance(text, str):
            raise bad_option("target", allowed, text)
        if text in ("top1", "label"):
            return cls(mode=text)
        match = re.fullmatch(r"(class|topk):(\d+)", text)
        if not match:
            raise bad_option("target", allowed, text)
        number = int(match.group(2))
        if match.group(1) == "class":
            return cls(mode="class", class_id=number)
        if number < 1:
            raise bad_option("target", "'topk:K' with K >= 1", text)
        return cls(mode="topk", k=number)

    def __str__(self) -> str:
        """The written form, which :meth:`parse` reads back."""
        if self.mode == "class":
            return f"class:{self.class_id}"
        if self.mode == "topk":
            return f"topk:{self.k}"
        return self.mode

    @property
    def maps_per_record(self) -> int:
        """How many maps each image gets: ``k`` for ``topk``, else 1."""
        return self.k if self.mode == "topk" else 1

    def check_classes(self, num_classes: int) -> None:
        """Checks that this target fits a model with ``num_classes`` classes.

        ``class:K`` needs ``0 <= K < num_classes`` and ``topk:K`` needs
        ``K <= num_classes``; ``top1`` and ``label`` always fit (labels are
        checked with each call).

        Args:
            num_classes: the model's class count.

        Raises:
            ValueError: naming the target and the class count.

        Example:

        >>> Target.parse("class:4").check_classes(5)  # fits: returns None
        """
        if self.mode == "class" and not 0 <= self.class_id < num_classes:
            raise bad_option("target", f"'class:K' with 0 <= K < {num_classes} (the model's classes)",
                             str(self))
        if self.mode == "topk" and self.k > num_classes:
            raise bad_option("target", f"'topk:K' with K <= {num_classes} (the model's classes)",
                             str(self))

    def given_classes(self, targets, count: int) -> np.ndarray:
        """The classes given with a call, as the compiled step takes them.

        Args:
            targets: None, or ``count`` whole numbers (shape ``[B]`` or
                ``[B, K]``); required for ``label`` (one class per image) and
                ignored for the other modes.
            count: the number of images in the call.

        Returns:
            int32 ``[count, maps_per_record]``: the labels for ``label``,
            ``class_id`` for ``class``, zeros for ``top1``/``topk`` (whose
            classes are chosen from the scores, see :meth:`choose`).

        Raises:
            ValueError: when ``targets`` is missing for ``label`` or has the
                wrong shape or dtype.
        """
        k = self.maps_per_record
        if self.mode == "class":
            return np.full((count, 1), self.class_id, np.int32)
        if targets is None:
            if self.mode == "label":
                raise ValueError("target='label' needs 'targets' (one class per image) in each call.")
            return np.zeros((count, k), np.int32)
        targets = np.asarray(targets)
        if targets.ndim == 1:
            targets = targets[:, None]
        if targets.shape[0] != count or targets.ndim != 2 or targets.dtype.kind not in "iu":
            raise ValueError(f"'targets' must be {count} whole numbers (shape [B] or [B, K]); "
                             f"got shape {targets.shape} of dtype {targets.dtype}.")
        if self.mode in ("top1", "topk"):
            return np.zeros((count, k), np.int32)  # chosen in the compiled step
        if targets.shape[1] != 1:
            raise ValueError(f"target='label' takes one class per image: 'targets' of shape [{count}] "
                             f"or [{count}, 1]; got shape {targets.shape}.")
        return targets.astype(np.int32)

    def choose(self, clean_scores, given_targets):
        """The classes to explain, inside the compiled step.

        Args:
            clean_scores: float32 ``[B, classes]``, the scores of the clean images.
            given_targets: int32 ``[B, maps_per_record]``, the classes given
                with the call (used for ``label`` and ``class``).

        Returns:
            int32 ``[B, maps_per_record]``: the top classes in score order for
            ``top1``/``topk``, else ``given_targets``.
        """
        if self.mode in ("top1", "topk"):
            return tf.math.top_k(clean_scores, k=self.maps_per_record).indices
        return given_targets
