"""What the engine accepts: the model's input and output, and the images of a call.

:class:`ModelInputs` is a part of :class:`transforms.smoothgrad.SmoothGrad` (a
mixin, like :class:`transforms.engine.steps.CompiledSteps`): it reads the
engine's score function, target and input shape. Every refusal is one line.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


class ModelInputs:
    """The input and model checks of :class:`transforms.smoothgrad.SmoothGrad`."""

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

    def check_model(self, image_shape) -> int:
        """Checks the model and the target on images of ``image_shape``, without compiling.

        Scores one zero image, checks that the model returns ``[1, classes]``
        and that the target fits (:meth:`Target.check_classes`). Sets
        ``num_classes``. The first call runs it before compiling.

        Args:
            image_shape: ``(H, W, C)`` of the preprocessed images.

        Returns:
            The model's class count.

        Raises:
            ValueError: when the image shape does not fit the model's input,
                the model does not output ``[B, classes]``, or the target
                names a class the model does not have.

        Example:

        >>> resnet = keras.applications.ResNet50(weights=None)
        >>> SmoothGrad(resnet, target="topk:3").check_model((224, 224, 3))
        1000
        """
        height, width, channels = (int(dim) for dim in image_shape)
        if self.input_shape is not None and (height, width, channels) != tuple(self.input_shape):
            raise ValueError(f"Each image must be {tuple(self.input_shape)} (H, W, C) for this model; "
                             f"got {(height, width, channels)}. Resize the images first.")
        scores = self._score_fn(tf.zeros([1, height, width, channels], tf.float32))
        if len(scores.shape) != 2:
            raise ValueError("The model must output class scores [B, classes]; "
                             f"its output has shape {tuple(scores.shape)}.")
        num_classes = int(scores.shape[-1])
        self.target.check_classes(num_classes)
        self.num_classes = num_classes
        return num_classes
