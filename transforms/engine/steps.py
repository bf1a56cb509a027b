"""The engine's compiled step: what runs inside ``tf.function`` (and XLA).

:class:`CompiledSteps` is a part of :class:`transforms.smoothgrad.SmoothGrad`
(a mixin: it reads the engine's settings). :meth:`CompiledSteps._step` scores
the clean batch, chooses the targets and folds the noisy samples' gradients
into the variant's running sums; with ``samples="auto"`` it is the first
stage and also returns the sums. :meth:`CompiledSteps._continue_step` is every
later stage: the first sample and the sample count are inputs, so one trace
serves every stage of a batch shape.
"""

from __future__ import annotations

import tensorflow as tf

from transforms.engine.noise import sample_seeds, standard_normal
from transforms.engine.variants import SplitHalves, accumulate


class CompiledSteps:
    """The traced functions of :class:`transforms.smoothgrad.SmoothGrad`."""

    def _scores(self, images):
        scores = self._score_fn(images)
        return tf.reshape(tf.cast(scores, tf.float32), [tf.shape(images)[0], -1])

    def _clean_scores(self, images):
        """The clean scores ``[B, classes]``, each image scored alone, as a batch of one.

        Matrix kernels may give a row different last bits depending on where it
        sits in the batch (Eigen's do on CPUs without AVX-512). Scored alone, an
        image's score, and so its target, rank and prediction, are the same
        whatever its batch and position. A loop of single-image forward passes
        costs a little against the ``samples`` noisy gradients of each image on
        a CPU; on a GPU or TPU (``clean_alone`` False) the batch is scored at once.
        """
        if not self.clean_alone:
            return self._scores(images)
        return tf.map_fn(lambda image: self._scores(image[None])[0], images, fn_output_signature=tf.float32)

    def _gradients(self, images, seeds, targets, sigma, stage_first=0):
        """``gradients(first, size)`` for :func:`accumulate`: samples ``stage_first + first ...``, noised."""
        batch, height, width, channels = images.shape
        k = self.target.maps_per_record

        def gradients(first_sample, size):
            sample_index = tf.cast(first_sample + stage_first, tf.int64) + tf.range(size, dtype=tf.int64)
            noise = standard_normal(sample_seeds(seeds, sample_index + self.sample_offset),
                                    (height, width, channels))
            noisy = tf.repeat(images, size, axis=0) + tf.reshape(tf.repeat(sigma, size), [-1, 1, 1, 1]) * noise
            with tf.GradientTape(persistent=k > 1) as tape:
                tape.watch(noisy)
                target_scores = tf.gather(self._scores(noisy), tf.repeat(targets, size, axis=0), batch_dims=1)
                objectives = [tf.reduce_sum(target_scores[:, index]) for index in range(k)]
            grads = tf.stack([tape.gradient(objective, noisy) for objective in objectives], axis=1)
            return tf.reshape(grads, [batch, size, k, height, width, channels])
        return gradients

    def _step(self, images, seeds, given_targets, sigma):
        self._traces += 1  # runs only while tracing
        batch, height, width, channels = images.shape
        k, chunk = self.target.maps_per_record, self.chunk
        samples = self.adaptive.min_samples if self.adaptive else self.samples
        clean = self._clean_scores(images)
        predicted = tf.argmax(clean, axis=-1, output_type=tf.int32)
        targets = self.target.choose(clean, given_targets)
        scores = tf.gather(clean, targets, batch_dims=1)
        ranks = tf.reduce_sum(tf.cast(clean[:, None, :] > scores[:, :, None], tf.int32), axis=-1)
        gradients = self._gradients(images, seeds, targets, sigma)
        shape = (batch, k, height, width, channels)
        if self.reliability and samples >= 2:
            halves = SplitHalves(self._accumulator, self.sample_offset)
            state = accumulate(halves, samples, chunk, gradients, shape)
            maps, even, odd = halves.finish(state, images, samples)
            carried = tuple(tf.nest.flatten(state)) if self.adaptive else ()
            return (maps, targets, ranks, scores, predicted, even, odd) + carried
        maps = self._accumulator.finish(accumulate(self._accumulator, samples, chunk, gradients, shape),
                                        images, samples)
        return maps, targets, ranks, scores, predicted

    def _continue_step(self, images, seeds, targets, sigma, first, count, *leaves):
        """A later adaptive stage: ``count`` more samples from sample ``first``, continuing the carried state."""
        self._traces += 1
        batch, height, width, channels = images.shape
        halves = SplitHalves(self._accumulator, self.sample_offset + first)
        state = accumulate(halves, count, self.chunk, self._gradients(images, seeds, targets, sigma, first),
                           (batch, self.target.maps_per_record, height, width, channels),
                           tf.nest.pack_sequence_as(self._state_structure, list(leaves)))
        maps, even, odd = halves.finish(state, images, first + count)
        return (maps, even, odd) + tuple(tf.nest.flatten(state))
