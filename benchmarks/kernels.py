"""Small measurements behind the engine's defaults: step size, noise cost, reduced-precision kernels.

Three parts, each printed as one line per figure (median of ``--repeats`` warm calls):

* ``chunk``: images/s of the engine at chunks 1, 2, 4 and the default against a
  graph loop of one noisy batch per sample (``keras_explainable``'s strategy),
  for a ``keras.applications`` model with random weights;
* ``noise``: the engine's reproducible noise (``transforms.engine.noise.standard_normal``:
  one Philox stream per (key, sample) and a hand-made Box-Muller) against
  ``tf.random.normal`` for 8 images of 64×64×3 and of 224×224×3;
* ``dtypes``: a 2048² matmul and a 3×3 convolution of 16×56×56×256 in float32
  and bfloat16 (no engine involved).

Example (from the repository root)::

    python benchmarks/kernels.py --parts chunk,noise,dtypes --model MobileNetV2 --samples 20 --batch 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from transforms.engine.noise import standard_normal  # noqa: E402
from transforms.engine.scores import score_function  # noqa: E402
from transforms.engine.smoothgrad import SmoothGrad  # noqa: E402


def median_seconds(call, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def chunk_part(args) -> None:
    """Engine images/s per chunk against the graph loop."""
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, args.model)(weights=None)
    size = tuple(model.input_shape[1:])
    images = np.random.default_rng(0).uniform(-1, 1, (args.batch,) + size).astype(np.float32)
    keys = [f"k{index}" for index in range(args.batch)]
    for chunk in (1, 2, 4, None):
        engine = SmoothGrad(model, samples=args.samples, noise=0.1, batch_size=args.batch, chunk=chunk, jit="graph")
        seconds = median_seconds(lambda: engine(images, keys), args.repeats)
        label = f"chunk {engine.chunk}" + (" (default)" if chunk is None else "")
        print(f"chunk  {args.model} N={args.samples} batch={args.batch}  {label}: "
              f"{args.batch / seconds:.3f} images/s", flush=True)
    scores, _ = score_function(model)

    @tf.function(autograph=False)
    def loop(batch):
        total = tf.zeros(batch.shape[:3])
        target = tf.argmax(scores(batch), -1)
        for _ in range(args.samples):
            noisy = batch + 0.1 * tf.random.normal(batch.shape)
            with tf.GradientTape() as tape:
                tape.watch(noisy)
                objective = tf.reduce_sum(tf.gather(scores(noisy), target, batch_dims=1))
            total += tf.reduce_mean(tf.abs(tape.gradient(objective, noisy)), -1)
        return total / args.samples

    seconds = median_seconds(lambda: loop(tf.constant(images)).numpy(), args.repeats)
    print(f"chunk  {args.model} N={args.samples} batch={args.batch}  graph loop: "
          f"{args.batch / seconds:.3f} images/s", flush=True)


def noise_part(args) -> None:
    """Milliseconds per 8 noisy images: the engine's noise against tf.random.normal."""
    rows = 8
    seeds = tf.constant(np.stack([np.arange(rows), np.arange(rows)], 1).astype(np.int64))
    for shape in ((64, 64, 3), (224, 224, 3)):
        engine_noise = tf.function(lambda s, shape=shape: standard_normal(s, shape))
        plain_noise = tf.function(lambda shape=shape: tf.random.normal((rows,) + shape))
        for name, call in (("engine noise", lambda: engine_noise(seeds).numpy()),
                           ("tf.random.normal", lambda: plain_noise().numpy())):
            seconds = median_seconds(call, max(args.repeats, 20))
            print(f"noise  {rows}x{shape}  {name}: {seconds * 1000:.2f} ms", flush=True)


def dtypes_part(args) -> None:
    """Seconds of a matmul and a convolution in float32 and bfloat16."""
    for dtype in (tf.float32, tf.bfloat16):
        matrix = tf.cast(tf.random.normal([2048, 2048]), dtype)
        features = tf.cast(tf.random.normal([16, 56, 56, 256]), dtype)
        kernel = tf.cast(tf.random.normal([3, 3, 256, 256]), dtype)
        matmul = tf.function(lambda a: tf.matmul(a, a))
        conv = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))
        for name, call in (("matmul 2048²", lambda: matmul(matrix).numpy()),
                           ("conv 3x3 16x56x56x256", lambda: conv(features, kernel).numpy())):
            seconds = median_seconds(call, max(args.repeats, 5))
            print(f"dtypes {dtype.name} {name}: {seconds:.4f} s", flush=True)


def main(argv=None) -> None:
    """Runs the chosen parts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="chunk,noise,dtypes")
    parser.add_argument("--model", default="MobileNetV2")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    parts = {"chunk": chunk_part, "noise": noise_part, "dtypes": dtypes_part}
    for name in args.parts.split(","):
        parts[name](args)


if __name__ == "__main__":
    main()
