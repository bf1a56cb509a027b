"""The engine, the graph loop and the pipeline under TensorFlow's two CPU kernel libraries.

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it is imported, so every
figure comes from a fresh process per configuration: oneDNN or Eigen, on this
CPU as it is and with its vector extensions capped at AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``, ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``: the code
paths of CPUs without AVX-512, such as AMD EPYC before Zen 4; Eigen's own
kernels are compiled into TensorFlow and are the same either way).
Configurations alternate (A B A B ...) so that a busy machine weighs on all alike.

* ``engine``: images/s of ``SmoothGrad`` (its defaults, ``jit: auto``), of the
  same engine with its clean forward pass batched instead of one image at a
  time (what it did before), and of the graph loop of ``keras_explainable``
  (one noisy batch per sample, ``benchmarks/peers.py``), called in turn for
  ``--repeats`` rounds in one process: the median of each, and the median of
  the rounds' engine / loop ratios, one line per model.
* ``pipeline``: the demo job end to end (``smoothgrad-audit --config
  configs/demo.yaml`` on the demo's test records) with ``--cpu_kernels``:
  wall and CPU seconds of the whole process (needs ``python -m pipelines.demo
  --out demo_data``).
* ``guarantees`` (alone, for the first model, in this process and its kernel
  library): what each of the engine's guarantees costs against the graph loop
  (:func:`guarantee_figures`), printed as table rows.

Examples (from the repository root)::

    python benchmarks/cpu_kernels.py --parts engine,pipeline --models small_cnn,MobileNetV2,ResNet50 \\
        --configurations onednn,eigen --rounds 2 --repeats 7 --samples 10 --batch 4 \\
        --out benchmarks/cpu_kernels.json
    python benchmarks/cpu_kernels.py --parts guarantees --models small_cnn --samples 10 --batch 4 --repeats 25
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}
CONFIGURATIONS = {
    "onednn": {"TF_ENABLE_ONEDNN_OPTS": "1"},
    "eigen": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "onednn-avx2": {"TF_ENABLE_ONEDNN_OPTS": "1", **AVX2_CAP},
    "eigen-avx2": {"TF_ENABLE_ONEDNN_OPTS": "0", **AVX2_CAP},
}


def _environment(extra: dict) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "XLA_FLAGS")}
    environment.update(extra, TF_CPP_MIN_LOG_LEVEL="3",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / "benchmarks"),
                                                                environment.get("PYTHONPATH")])))
    return environment


def _case(name: str, samples: int, batch: int):
    """A model of ``benchmarks/peers.py``, its images, keys, and the graph loop's call on them."""
    import numpy as np
    from peers import Case, build_model, kex_loop_runner, logits_model, random_images

    model = build_model(name, 0)
    logits, _ = logits_model(model)
    images = random_images(batch, int(model.input_shape[1]), 0)
    targets = np.argmax(np.asarray(logits(images, training=False)), axis=-1).astype(np.int32)
    keys = [f"img-{index}" for index in range(batch)]
    run, _ = kex_loop_runner(Case(model=model, logits=logits, images=images, targets=targets, samples=samples,
                                  sigma=0.1, seed=0, engine_chunk=0))
    return model, images, keys, lambda: run(images, targets)


def _paired_seconds(calls: dict, repeats: int) -> dict:
    """Seconds of each call over ``repeats`` rounds, the calls taken in turn in every round, after one untimed
    call of each (tracing and compiling)."""
    for call in calls.values():
        call()
    seconds = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            started = time.perf_counter()
            call()
            seconds[label].append(time.perf_counter() - started)
    return seconds


def engine_figures(models: list[str], samples: int, batch: int, repeats: int) -> dict:
    """In this process: images/s of the engine (clean pass alone and batched) and of the graph loop, per model.

    The three are called in turn, ``repeats`` rounds (A B C A B C ...), so a
    busy moment weighs on all alike; each figure is the median over the rounds,
    and ``engine / graph loop`` is the median of the rounds' ratios.
    """
    from transforms.engine.device import current_device_kind
    from transforms.smoothgrad import SmoothGrad

    figures = {"device": current_device_kind(), "models": {}}
    for name in models:
        model, images, keys, loop = _case(name, samples, batch)
        calls, jit = {}, None
        for label, clean_alone in (("engine", True), ("engine, clean pass batched", False)):
            engine = SmoothGrad(model, samples=samples, noise=0.1, batch_size=batch)
            engine.clean_alone = clean_alone  # before the first call: it is read while tracing
            calls[label] = lambda engine=engine: engine(images, keys).maps
            jit = engine.jit_used
        calls["graph loop"] = loop
        seconds = _paired_seconds(calls, repeats)
        row = {label: batch / statistics.median(values) for label, values in seconds.items()}
        row["engine / graph loop"] = statistics.median(
            loop / engine for engine, loop in zip(seconds["engine"], seconds["graph loop"]))
        row["jit"] = jit
        figures["models"][name] = row
    return figures


def guarantee_figures(model_name: str, samples: int, batch: int, repeats: int) -> dict:
    """In this process: what each of the engine's guarantees costs against the graph loop (paired rounds).

    The engine as shipped; with ``reliability=False``; with its clean pass
    batched (what it does on a GPU); with the noise from TensorFlow's global
    generator instead of a stream per (seed, key, sample) (not a product option:
    patched in here, it gives up reproducibility); and with all three off.
    """
    import tensorflow as tf

    import transforms.engine.steps as steps
    from transforms.engine.device import current_device_kind
    from transforms.smoothgrad import SmoothGrad

    model, images, keys, loop = _case(model_name, samples, batch)
    per_example = steps.standard_normal

    def global_noise(seeds, shape):
        return tf.random.normal([seeds.shape[0], *shape])

    def engine(noise=per_example, clean_alone=True, reliability=True):
        steps.standard_normal = noise  # read while tracing, by the first call below
        explainer = SmoothGrad(model, samples=samples, noise=0.1, batch_size=batch, reliability=reliability)
        explainer.clean_alone = clean_alone
        explainer(images, keys)
        steps.standard_normal = per_example
        return lambda: explainer(images, keys)

    calls = {"graph loop": loop, "engine as shipped": engine(),
             "split-half reliability off": engine(reliability=False),
             "clean pass batched": engine(clean_alone=False),
             "noise from the global generator": engine(noise=global_noise),
             "all three off": engine(global_noise, False, False)}
    seconds = _paired_seconds(calls, repeats)
    return {"device": current_device_kind(), "model": model_name, "rows": {
        label: {"images_per_s": batch / statistics.median(values),
                "against the graph loop": statistics.median(
                    loop_s / value for loop_s, value in zip(seconds["graph loop"], values))}
        for label, values in seconds.items()}}


def _timed(command: list[str], environment: dict) -> dict:
    """Wall and CPU seconds (user + system of the process and its children) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="engine,pipeline")
    parser.add_argument("--models", default="small_cnn,ResNet50")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15, help="paired rounds of warm calls per process")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configurations")
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)  # one configuration's worker
    args = parser.parse_args(argv)
    models = [name for name in args.models.split(",") if name]
    if args.engine_only:
        print(json.dumps(engine_figures(models, args.samples, args.batch, args.repeats)))
        return {}
    if args.parts == "guarantees":  # in this process, with the kernel library it was started with
        import transforms  # noqa: F401  (picks oneDNN unless TF_ENABLE_ONEDNN_OPTS is set)
        figures = guarantee_figures(models[0], args.samples, args.batch, args.repeats)
        print(f"{figures['device']}, {figures['model']}, N = {args.samples}, batch {args.batch}, "
              f"{args.repeats} paired rounds")
        for label, row in figures["rows"].items():
            print(f"| {label} | {row['images_per_s']:.1f} | {row['against the graph loop']:.2f} |")
        return figures
    names = [name.strip() for name in args.configurations.split(",") if name.strip()]
    report = {"command": " ".join(["python", "benchmarks/cpu_kernels.py", *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "load_average_at_start": os.getloadavg(), "engine": {}, "pipeline": {}}
    for round_index in range(args.rounds):
        for name in names:
            environment = _environment(CONFIGURATIONS[name])
            if "engine" in args.parts:
                done = subprocess.run([sys.executable, __file__, "--engine-only", "--models", args.models,
                                       "--samples", str(args.samples), "--batch", str(args.batch),
                                       "--repeats", str(args.repeats)], cwd=REPO, env=environment,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                report["engine"].setdefault(name, []).append(figures)
                print(f"round {round_index + 1} {name:18s} {figures['device']}: "
                      + "; ".join(f"{model} " + ", ".join(f"{label} {value:.2f}" for label, value in row.items()
                                                          if label != "jit")
                                  for model, row in figures["models"].items()), flush=True)
            if "pipeline" in args.parts:
                kernels = "onednn" if CONFIGURATIONS[name]["TF_ENABLE_ONEDNN_OPTS"] == "1" else "eigen"
                timing = _timed([sys.executable, "-m", "pipelines.smoothgrad_audit", "--config", "configs/demo.yaml",
                                 "--run_id", f"kernels-{kernels}", "--sanity_records", "0", "--progress_seconds", "0",
                                 "--cpu_kernels", kernels], environment)
                report["pipeline"].setdefault(name, []).append(timing)
                print(f"round {round_index + 1} {name:18s} pipeline: {timing['wall_s']:.1f} s wall, "
                      f"{timing['cpu_s']:.1f} s CPU", flush=True)
    report["load_average_at_end"] = os.getloadavg()
    summary = {}
    for name in names:
        rows = report["engine"].get(name, [])
        for model in models:
            for label in ("engine", "engine, clean pass batched", "graph loop", "engine / graph loop"):
                values = [row["models"][model][label] for row in rows if model in row["models"]]
                if values:
                    summary.setdefault(name, {}).setdefault(model, {})[label] = statistics.median(values)
        if report["pipeline"].get(name):
            summary.setdefault(name, {})["pipeline wall s"] = statistics.median(
                run["wall_s"] for run in report["pipeline"][name])
            summary[name]["pipeline CPU s"] = statistics.median(run["cpu_s"] for run in report["pipeline"][name])
    report["summary"] = summary
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
