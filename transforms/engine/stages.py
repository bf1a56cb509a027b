"""The adaptive stages of the engine (``samples="auto"``): begin, resume, and every stage in one process.

:class:`AdaptiveStages` is a part of :class:`transforms.smoothgrad.SmoothGrad`
(a mixin: it uses the engine's compiled functions, checks and batching). The
first stage runs the engine's step with ``min_samples`` samples and returns
each image's running sums besides its map; each later stage runs one compiled
function whose first sample and sample count are inputs, continuing the sums
it is given. Between stages an image is a :class:`transforms.engine.adaptive.Partial`,
so the stages can run in one process (:meth:`AdaptiveStages._run_adaptive`,
what a call of the engine does) or as separate Beam steps
(:mod:`transforms.explain`), with the same maps.

Example:

>>> engine = SmoothGrad(model, samples="auto")
>>> partials = engine.begin(images, keys)             # 8 samples each
>>> todo = [i for i, p in enumerate(partials) if not p.done]
>>> engine.resume(images[todo], [keys[i] for i in todo], [partials[i] for i in todo])  # to 12
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from transforms.engine.adaptive import Partial, split_states, stack_states
from transforms.engine.statistics import split_half_reliability, stopping_reliability


class AdaptiveStages:
    """The ``samples="auto"`` stages of :class:`transforms.smoothgrad.SmoothGrad`."""

    def begin(self, images, keys: Sequence[str], targets=None) -> list[Partial]:
        """The first stage of ``samples="auto"``: ``min_samples`` samples per image.

        Args:
            images, keys, targets: as for :meth:`__call__`.

        Returns:
            One :class:`~transforms.engine.adaptive.Partial` per image; those not
            ``done`` go on with :meth:`resume`.
        """
        images = self._check_images(images)
        keys = [str(key) for key in keys]
        given = self.target.given_classes(targets, images.shape[0])
        if self._function is None:
            self._build(images.shape[1:])
        partials = []
        for start in range(0, images.shape[0], self.batch_size):
            part = self._run_fixed(images[start:start + self.batch_size], keys[start:start + self.batch_size],
                                   given[start:start + self.batch_size])
            partials += self._partials(part, split_states(part["state"], len(part["maps"])),
                                       self.adaptive.min_samples)
        return partials

    def resume(self, images, keys: Sequence[str], partials: Sequence[Partial]) -> list[Partial]:
        """The next stage for images that all stopped at the same sample count.

        Args:
            images: float32 ``[B, H, W, C]``, the same preprocessed images.
            keys: their keys.
            partials: their :class:`~transforms.engine.adaptive.Partial` from the
                previous stage (none ``done``, all at the same ``samples``).

        Returns:
            The next stage's :class:`~transforms.engine.adaptive.Partial` per image.
        """
        images = self._check_images(images)
        keys = [str(key) for key in keys]
        if self._function is None:
            self._build(images.shape[1:])
        done = {partial.samples for partial in partials}
        if len(done) != 1 or any(partial.done for partial in partials):
            raise ValueError(f"resume() takes unfinished images at one sample count; got counts {sorted(done)}.")
        first = done.pop()
        end = self.adaptive.next_boundary(first)
        if end is None:
            raise ValueError(f"resume(): {first} samples is the last stage (max_samples).")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = list(partials[start:start + self.batch_size])
            tensors = self._padded_inputs(images[start:start + self.batch_size], keys[start:start + self.batch_size],
                                          np.stack([partial.targets for partial in batch]),
                                          np.array([partial.noise_sigma for partial in batch], np.float32))
            leaves = stack_states(batch, self.batch_size - len(batch))
            maps, even, odd, *state = self._call_compiled(
                "_continue_function", *tensors, tf.constant(first, tf.int32), tf.constant(end - first, tf.int32),
                *(tf.constant(leaf) for leaf in leaves))
            count = len(batch)
            part = {"maps": maps.numpy()[:count],
                    "reliability": split_half_reliability(even.numpy()[:count], odd.numpy()[:count]),
                    "stopping": stopping_reliability(even.numpy()[:count], odd.numpy()[:count])}
            for field in ("targets", "target_ranks", "scores", "predicted", "noise_sigma"):
                part[field] = np.array([getattr(partial, field) for partial in batch])
            out += self._partials(part, split_states([leaf.numpy() for leaf in state], count), end)
        return out

    def _partials(self, part: dict, states: list[tuple], samples: int) -> list[Partial]:
        k = self.target.maps_per_record
        reliability = part["reliability"].reshape(len(states), k)
        stopping = part["stopping"].reshape(len(states), k)
        stop = self.adaptive.converged(stopping, samples) | (samples >= self.adaptive.max_samples)
        return [Partial(state=states[i], samples=samples, targets=part["targets"][i].reshape(k),
                        target_ranks=part["target_ranks"][i].reshape(k), scores=part["scores"][i].reshape(k),
                        predicted=int(part["predicted"][i]), noise_sigma=float(part["noise_sigma"][i]),
                        maps=part["maps"][i].reshape((k,) + part["maps"].shape[2:]),
                        reliability=reliability[i], stopping=stopping[i], done=bool(stop[i]))
                for i in range(len(states))]

    def _run_adaptive(self, images: np.ndarray, keys: list[str], given: np.ndarray) -> dict:
        """Every stage in this process: the unfinished images of each stage re-batched for the next."""
        if not images.shape[0]:  # no image: empty fields of the right shapes
            empty = self._run_fixed(images, keys, given)
            empty.pop("state")
            return dict(empty, samples_used=np.zeros(0, np.int32))
        partials = self.begin(images, keys, given)
        while True:
            todo = [index for index, partial in enumerate(partials) if not partial.done]
            if not todo:
                break
            resumed = self.resume(images[todo], [keys[index] for index in todo], [partials[index] for index in todo])
            for index, partial in zip(todo, resumed):
                partials[index] = partial
        return finished_fields(partials)


def finished_fields(partials: Sequence[Partial]) -> dict:
    """The result fields (class axis kept) of finished :class:`~transforms.engine.adaptive.Partial`, one per image."""
    fields = {field: np.stack([getattr(partial, field) for partial in partials])
              for field in ("maps", "targets", "target_ranks", "scores", "reliability", "stopping")}
    fields.update(predicted=np.array([partial.predicted for partial in partials], np.int32),
                  noise_sigma=np.array([partial.noise_sigma for partial in partials], np.float32),
                  samples_used=np.array([partial.samples for partial in partials], np.int32))
    return fields
