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

from transforms.engine.methods import captured, gradcam_from, ig_baselines, ig_path
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

    def _input_gradients(self, inputs, row_targets):
        """The gradients ``[n, K, H, W, C]`` of each row's target scores with respect to ``inputs``."""
        k = self.target.maps_per_record
        with tf.GradientTape(persistent=k > 1) as tape:
            tape.watch(inputs)
            target_scores = tf.gather(self._scores(inputs), row_targets, batch_dims=1)
            objectives = [tf.reduce_sum(target_scores[:, index]) for index in range(k)]
        return tf.stack([tape.gradient(objective, inputs) for objective in objectives], axis=1)

    def _integrated_gradients(self, noisy, clean, row_seeds, row_targets):
        """Integrated gradients ``[n, K, H, W, C]`` from each row's baseline to its noisy input (trapezoid rule).

        The ``ig_steps`` path points run ``chunk`` at a time (a ``tf.while_loop``
        over full chunks, then one remainder chunk), so a step holds ``n × chunk``
        images whatever ``ig_steps`` is.
        """
        rows, height, width, channels = noisy.shape
        k, steps, block = self.target.maps_per_record, self.ig_steps, self.chunk
        baselines = ig_baselines(self.ig_baseline, clean, row_seeds, self._black, self._white)
        difference = noisy - baselines
        alphas, weights = ig_path(steps)

        def path_sum(first, size):
            positions = tf.reshape(tf.slice(alphas, [first], [size]), [1, size, 1, 1, 1])
            weighted = tf.reshape(tf.slice(weights, [first], [size]), [1, size, 1, 1, 1, 1])
            points = tf.reshape(baselines[:, None] + positions * difference[:, None], [rows * size, height, width,
                                                                                         channels])
            grads = self._input_gradients(points, tf.repeat(row_targets, size, axis=0))
            return tf.reduce_sum(weighted * tf.reshape(grads, [rows, size, k, height, width, channels]), axis=1)

        full, rest = divmod(steps, block)
        total = tf.zeros([rows, k, height, width, channels])
        if full == 1:
            total = path_sum(tf.constant(0), block)
        elif full > 1:
            _, total = tf.while_loop(lambda index, _: index < full,
                                     lambda index, total: (index + 1, total + path_sum(index * block, block)),
                                     (tf.constant(0), total))
        if rest:
            total = total + path_sum(tf.constant(full * block), rest)
        return total * difference[:, None]

    def _gradcam(self, noisy, row_targets):
        """Grad-CAM maps ``[n, K, H, W, 1]`` of each row's target scores, on ``gradcam_layer``'s activations."""
        k = self.target.maps_per_record
        with tf.GradientTape(persistent=k > 1, watch_accessed_variables=False) as tape:
            with captured(self._gradcam_layer, tape) as outputs:
                scores = self._scores(noisy)
            target_scores = tf.gather(scores, row_targets, batch_dims=1)
            objectives = [tf.reduce_sum(target_scores[:, index]) for index in range(k)]
        activations = outputs[-1]
        maps = [gradcam_from(activations, tape.gradient(objective, activations), noisy.shape[1:3])
                for objective in objectives]
        return tf.stack(maps, axis=1)[..., None]

    def _gradients(self, images, seeds, targets, sigma, stage_first=0):
        """``gradients(first, size)`` for :func:`accumulate`: samples ``stage_first + first ...``, noised.

        Each sample's map is the method's (:mod:`transforms.engine.methods`):
        ``[B, size, K, H, W, C]``, with one channel for Grad-CAM.
        """
        batch, height, width, channels = images.shape
        k = self.target.maps_per_record

        def gradients(first_sample, size):
            sample_index = tf.cast(first_sample + stage_first, tf.int64) + tf.range(size, dtype=tf.int64)
            row_seeds = sample_seeds(seeds, sample_index + self.sample_offset)
            noise = standard_normal(row_seeds, (height, width, channels))
            noisy = tf.repeat(images, size, axis=0) + tf.reshape(tf.repeat(sigma, size), [-1, 1, 1, 1]) * noise
            row_targets = tf.repeat(targets, size, axis=0)
            if self.method == "integrated_gradients":
                grads = self._integrated_gradients(noisy, tf.repeat(images, size, axis=0), row_seeds, row_targets)
            elif self.method == "gradcam":
                grads = self._gradcam(noisy, row_targets)
            else:
                grads = self._input_gradients(noisy, row_targets)
            return tf.reshape(grads, [batch, size, k, height, width, self.map_channels(channels)])
        return gradients

    def _step(self, images, seeds, given_targets, sigma):
        self._traces += 1  # runs only while tracing
        batch, height, width, channels = images.shape
        k, chunk = self.target.maps_per_record, self.sample_chunk
        samples = self.adaptive.min_samples if self.adaptive else self.samples
        clean = self._clean_scores(images)
        predicted = tf.argmax(clean, axis=-1, output_type=tf.int32)
        targets = self.target.choose(clean, given_targets)
        scores = tf.gather(clean, targets, batch_dims=1)
        ranks = tf.reduce_sum(tf.cast(clean[:, None, :] > scores[:, :, None], tf.int32), axis=-1)
        gradients = self._gradients(images, seeds, targets, sigma)
        shape = (batch, k, height, width, self.map_channels(channels))
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
        state = accumulate(halves, count, self.sample_chunk, self._gradients(images, seeds, targets, sigma, first),
                           (batch, self.target.maps_per_record, height, width, self.map_channels(channels)),
                           tf.nest.pack_sequence_as(self._state_structure, list(leaves)))
        maps, even, odd = halves.finish(state, images, first + count)
        return (maps, even, odd) + tuple(tf.nest.flatten(state))
