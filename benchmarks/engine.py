"""Throughput of the bare SmoothGrad engine against this machine's ceiling.

For each model and ``jit`` mode, in one process: the forward FLOPs of the model,
the time of the first call (trace + compile + one run) and of ``repeats`` timed
calls on random images, images/s, and the achieved FLOP/s counted as
``images/s × forward FLOPs × 3 × samples`` (a backward pass costs about two
forwards; the one clean forward per image is not counted) against a dense
float32 matmul measured in the same run. ``--all-variants`` instead checks
that every variant runs on each model and gives finite maps.

Examples (from the repository root)::

    python benchmarks/engine.py --models MobileNetV2,ResNet50,Xception \\
        --samples 8 --batch 2 --jit xla,graph --repeats 2 --out engine.json
    python benchmarks/engine.py --models Xception,ResNet50 --samples 2 --batch 1 \\
        --jit auto --all-variants
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from tensorflow.python.framework.convert_to_constants import (  # noqa: E402
    convert_variables_to_constants_v2,
)

from transforms.engine.smoothgrad import VARIANTS, SmoothGrad, choose_jit  # noqa: E402

FLOP_METHOD = ("tf.compat.v1.profiler float_operation on the frozen forward graph at batch 1 "
               "(cross-check: 2 x multiply-adds of Conv2D/DepthwiseConv2D/SeparableConv2D/Dense)")


def matmul_flops(size: int = 2048, repeats: int = 10) -> dict:
    """Dense float32 ``size x size`` matmul FLOP/s: best and median of ``repeats``."""
    rng = np.random.default_rng(0)
    left = tf.constant(rng.standard_normal((size, size), np.float32))
    right = tf.constant(rng.standard_normal((size, size), np.float32))
    tf.matmul(left, right).numpy()  # warm-up: thread pools, kernels
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.matmul(left, right).numpy()
        seconds.append(time.perf_counter() - start)
    work = 2.0 * size ** 3
    return {"size": size, "repeats": repeats, "best_flops": work / min(seconds),
            "median_flops": work / statistics.median(seconds)}


def profiler_flops(model, image_size: int) -> int:
    """Forward FLOPs at batch 1 counted by TensorFlow's graph profiler."""
    forward = tf.function(lambda images: model(images, training=False))
    concrete = forward.get_concrete_function(tf.TensorSpec([1, image_size, image_size, 3], tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return int(tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops)


def analytic_flops(model) -> int:
    """2 × multiply-adds of the convolution and dense layers (batch 1)."""
    multiply_adds = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense"):
            continue
        out = layer.output.shape
        positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
        if kind == "Conv2D":
            height, width, channels_in, _ = layer.kernel.shape
            multiply_adds += positions * out[-1] * height * width * channels_in
        elif kind == "DepthwiseConv2D":
            height, width, _, _ = layer.kernel.shape
            multiply_adds += positions * out[-1] * height * width
        elif kind == "SeparableConv2D":
            height, width, channels_in, multiplier = layer.depthwise_kernel.shape
            multiply_adds += positions * channels_in * multiplier * (height * width + out[-1])
        else:
            multiply_adds += layer.kernel.shape[0] * layer.kernel.shape[1]
    return 2 * int(multiply_adds)


def _build_model(name: str, image_size: int):
    keras.utils.set_random_seed(0)
    if name == "demo":  # the demo's CNN architecture (untrained), e.g. --image-size 64
        from pipelines.demo.demo_model import build_model

        return build_model(image_size)
    return getattr(keras.applications, name)(weights=None, input_shape=(image_size, image_size, 3))


def _random_batch(batch: int, image_size: int, call_index: int):
    rng = np.random.default_rng(call_index)
    images = rng.uniform(-1.0, 1.0, (batch, image_size, image_size, 3)).astype(np.float32)
    return images, [f"call{call_index}-img{index}" for index in range(batch)]


def time_engine(model, jit: str, args) -> dict:
    """First-call time and timed calls of one explainer."""
    explainer = SmoothGrad(model, samples=args.samples, noise=0.1, batch_size=args.batch,
                           chunk=args.chunk, jit=jit, seed=0)
    images, keys = _random_batch(args.batch, args.image_size, 0)
    start = time.perf_counter()
    result = explainer(images, keys)
    first_call = time.perf_counter() - start
    seconds = []
    for call_index in range(1, args.repeats + 1):
        images, keys = _random_batch(args.batch, args.image_size, call_index)
        start = time.perf_counter()
        result = explainer(images, keys)
        seconds.append(time.perf_counter() - start)
    if not np.all(np.isfinite(result.maps)):
        raise RuntimeError(f"non-finite maps for {model.name} with jit={jit}")
    median = statistics.median(seconds)
    return {"jit_requested": jit, "jit": explainer.jit_used, "chunk": explainer.chunk, "first_call_s": first_call,
            "call_s": seconds, "median_call_s": median, "images_per_s": args.batch / median,
            "compile_count": explainer.compile_count}


def forward_seconds(model, images: int, image_size: int, repeats: int) -> float:
    """Median time of a plain forward pass (tf.function, no XLA) over ``images`` images.

    A yardstick independent of FLOP counting: a SmoothGrad call costs about
    N noisy forwards plus their input-gradient backward passes.
    """
    forward = tf.function(lambda batch: model(batch, training=False), jit_compile=False)
    batch = tf.constant(_random_batch(images, image_size, 99)[0])
    forward(batch).numpy()
    seconds = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        forward(batch).numpy()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def check_all_variants(model, jit: str, args) -> list[dict]:
    """Runs every variant once on random images; checks shape, finiteness, not all zero."""
    rows = []
    images, keys = _random_batch(args.batch, args.image_size, 0)
    for variant in VARIANTS:
        explainer = SmoothGrad(model, samples=args.samples, noise=0.1, variant=variant,
                               batch_size=args.batch, chunk=args.chunk, jit=jit)
        start = time.perf_counter()
        maps = explainer(images, keys).maps
        seconds = time.perf_counter() - start
        ok = (maps.shape == (args.batch, args.image_size, args.image_size)
              and bool(np.all(np.isfinite(maps))) and float(np.abs(maps).max()) > 0)
        rows.append({"model": model.name, "variant": variant, "jit": explainer.jit_used,
                     "seconds": seconds, "shape": list(maps.shape), "ok": ok,
                     "map_mean": float(maps.mean()), "map_max_abs": float(np.abs(maps).max())})
        print(f"  {model.name:12s} {variant:18s} jit={explainer.jit_used:5s} {seconds:7.1f} s "
              f"shape={maps.shape} ok={ok} mean={maps.mean():.3g} max|.|={np.abs(maps).max():.3g}",
              flush=True)
    return rows


def _xla_over_graph(rows: list[dict]) -> dict:
    """Median call time under XLA divided by the plain graph's, per model."""
    times = {(row["model"], row["jit"]): row["median_call_s"] for row in rows}
    return {model: times[(model, "xla")] / times[(model, "graph")]
            for model, jit in times if jit == "xla" and (model, "graph") in times}


def markdown_table(rows: list[dict], ceiling: float) -> str:
    lines = [
        "| model | jit | fwd GFLOP/img | first call s (trace+compile+run) | call s (median) | images/s | "
        "achieved GFLOP/s | of matmul ceiling | call ÷ forward of the B·N noisy images |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        jit = row["jit"] if row["jit_requested"] == row["jit"] else f"{row['jit_requested']}→{row['jit']}"
        lines.append(
            f"| {row['model']} | {jit} | {row['forward_flops'] / 1e9:.2f} | "
            f"{row['first_call_s']:.1f} | {row['median_call_s']:.2f} | {row['images_per_s']:.3f} | "
            f"{row['achieved_flops'] / 1e9:.1f} | {row['achieved_flops'] / ceiling:.1%} | {row['call_over_forward']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="MobileNetV2,ResNet50,Xception",
                        help="comma-separated keras.applications names, or demo (the demo's CNN) "
                             "(default: %(default)s)")
    parser.add_argument("--samples", type=int, default=8, help="SmoothGrad N (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="engine batch size (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="noisy samples per image per step (default: the engine's)")
    parser.add_argument("--jit", default="xla,graph",
                        help="comma-separated jit modes among xla, graph, auto (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the first (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="square input size (default: %(default)s)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="matmul ceiling size (default: %(default)s)")
    parser.add_argument("--matmul-repeats", type=int, default=20,
                        help="matmul repetitions, at the start and again at the end (default: %(default)s)")
    parser.add_argument("--all-variants", action="store_true",
                        help="only check that every variant runs on each model (no throughput)")
    parser.add_argument("--out", default=None, help="optional JSON file for the full results")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    jits = [mode.strip() for mode in args.jit.split(",") if mode.strip()]
    report = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "gpus": [device.name for device in tf.config.list_logical_devices("GPU")],
                    "python": platform.python_version(), "tensorflow": tf.__version__,
                    "keras": keras.__version__, "load_average_at_start": os.getloadavg()},
        "settings": vars(args),
    }
    print(f"# {report['date']}  TF {tf.__version__}  Keras {keras.__version__}  "
          f"{os.cpu_count()} CPUs  GPUs: {report['machine']['gpus'] or 'none'}", flush=True)

    if args.all_variants:
        report["all_variants"] = []
        for name in models:
            model = _build_model(name, args.image_size)
            for jit in jits:
                report["all_variants"] += check_all_variants(model, jit, args)
            del model
            keras.backend.clear_session()
            gc.collect()
        report["all_ok"] = all(row["ok"] for row in report["all_variants"])
        print(f"all variants ok: {report['all_ok']}")
    else:
        report["matmul_before"] = before = matmul_flops(args.matmul_size, args.matmul_repeats)
        print(f"matmul {args.matmul_size}^2 float32: best {before['best_flops'] / 1e9:.1f} GFLOP/s, "
              f"median {before['median_flops'] / 1e9:.1f} GFLOP/s", flush=True)
        rows = []
        for name in models:
            model = _build_model(name, args.image_size)
            forward, cross_check = profiler_flops(model, args.image_size), analytic_flops(model)
            auto_choice, auto_reason = choose_jit(model, "auto")
            print(f"{name}: forward {forward / 1e9:.3f} GFLOP/img (profiler), "
                  f"{cross_check / 1e9:.3f} (analytic); jit=auto -> {auto_choice} ({auto_reason})", flush=True)
            forward_cache = {}
            for jit in jits:
                timing = time_engine(model, jit, args)
                noisy_per_step = args.batch * timing["chunk"]
                if noisy_per_step not in forward_cache:
                    forward_cache[noisy_per_step] = forward_seconds(model, noisy_per_step, args.image_size,
                                                                    args.repeats)
                steps = -(-args.samples // timing["chunk"])
                timing["forward_s_per_step"] = forward_cache[noisy_per_step]
                timing["call_over_forward"] = timing["median_call_s"] / (forward_cache[noisy_per_step] * steps)
                row = {"model": name, "forward_flops": forward, "forward_flops_analytic": cross_check,
                       "auto_would_choose": auto_choice, **timing}
                row["achieved_flops"] = row["images_per_s"] * forward * 3 * args.samples
                rows.append(row)
                print(f"  jit={timing['jit']:5s} first call {timing['first_call_s']:.1f} s, calls "
                      f"{', '.join(f'{s:.2f}' for s in timing['call_s'])} s -> "
                      f"{timing['images_per_s']:.3f} images/s, {row['achieved_flops'] / 1e9:.1f} GFLOP/s, "
                      f"{timing['call_over_forward']:.1f}x the plain "
                      f"forward of the noisy images, compile_count={timing['compile_count']}",
                      flush=True)
            del model
            keras.backend.clear_session()
            gc.collect()
        report["matmul_after"] = after = matmul_flops(args.matmul_size, args.matmul_repeats)
        print(f"matmul again at the end: best {after['best_flops'] / 1e9:.1f} GFLOP/s", flush=True)
        # Other processes may share the CPU: the best of both measurements is the ceiling.
        ceiling = max(before["best_flops"], after["best_flops"])
        for row in rows:
            row["fraction_of_matmul_best"] = row["achieved_flops"] / ceiling
        report.update(rows=rows, flop_method=FLOP_METHOD, ceiling_flops=ceiling,
                      xla_over_graph=_xla_over_graph(rows))
        print(f"\nFLOPs: {FLOP_METHOD}. Achieved = images/s x forward FLOPs x 3 x N (N={args.samples}); "
              f"ceiling = best {args.matmul_size}^2 matmul, start or end ({ceiling / 1e9:.1f} GFLOP/s). "
              f"Last column: median call time / (graph-mode forward time of the same B·N noisy images).\n")
        print(markdown_table(rows, ceiling))
        for name, ratio in report["xla_over_graph"].items():
            print(f"{name}: xla call time / graph call time = {ratio:.1f}")
    report["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {report['machine']['load_average_at_start']}, "
          f"at end {report['load_average_at_end']}")
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {report['peak_rss_mb']:.0f} MB")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
