"""The pipeline's overhead and memory against the bare SmoothGrad engine.

For one model and two record counts R1 < R2, this script:

1. writes two datasets into a temporary folder: R1 and R2 random-noise PNG
   images at the model's input size (64x64 for ``small_cnn``, a small
   untrained CNN built here and saved as ``.keras``; 224x224 for
   ``keras.applications:ResNet50`` with random weights), each spread over
   4 TFRecord files;
2. runs the real command line, ``python -m pipelines.smoothgrad_audit``, on each
   dataset in a fresh subprocess, timing its wall time (start to exit) and
   sampling the resident memory of its whole process tree (the CLI and every
   child, e.g. Beam's SDK worker processes) with psutil every ``--interval``
   seconds; the sum of RSS over the tree at each sample, maximum over the run;
3. checks each run's ``_MANIFEST.json`` (``invariant_holds``,
   ``records_read == records_explained == R``, no errors) and stops with an
   error otherwise;
4. computes the pipeline's **marginal** throughput (R2 - R1) / (t2 - t1):
   interpreter start-up, imports, model loading, compilation and the fixed
   costs of Beam cancel out;
5. measures the bare engine, ``transforms.smoothgrad.SmoothGrad(model,
   samples=N, noise=0.1, batch_size=B, jit="auto")``, in a fresh subprocess of
   its own, on R2 - R1 images of the R2 dataset decoded and preprocessed by the
   pipeline's own decode step (``transforms.decode``; ``preprocess: tf``, i.e.
   ``x/127.5 - 1``), in calls of B images with the same keys as the pipeline;
   the first call (trace + compile) is not timed;
6. prints and writes (``--out`` JSON, ``--markdown``) per runner: the pipeline's
   marginal images/s, the engine's images/s, their ratio, the pipeline's extra
   time per image, and the peak tree RSS at R1 and R2 with the growth in %.

``--workers 1`` is Beam's default in-process runner (no Beam flag);
``--workers 2`` adds ``--direct_num_workers 2 --direct_running_mode
multi_processing`` (any W >= 2 likewise). The engine is measured once and
compared with every runner.

Commands (from the repository root; needs psutil: ``pip install psutil``)::

    python benchmarks/pipeline.py --model ResNet50 --records 32,256 --samples 10 --batch 4 \\
        --workers 1,2 --out pipeline.json --markdown pipeline.md
    python benchmarks/pipeline.py --model small_cnn --records 32,256 --samples 10 --batch 4 \\
        --workers 1,2 --out pipeline_small.json --markdown pipeline_small.md
    # a check that everything runs (about a minute on 2 cores; not a measurement):
    python benchmarks/pipeline.py --model small_cnn --records 8,32 --samples 2 --batch 4 --workers 1,2

Each pipeline run is::

    python -m pipelines.smoothgrad_audit --input TMP/data-R/part-*.tfrecord --output TMP/out-R \\
        --model MODEL [--weights null] --samples N --noise 0.1 --batch_size B --jit auto \\
        --overwrite --run_id RUN [--direct_num_workers W --direct_running_mode multi_processing]

What is measured: wall time of the whole CLI process (so the marginal figure is
the steady-state cost per record of reading, decoding, batching, explaining,
converting to rows and writing Parquet, as the runner schedules it); the sum of
RSS over the CLI's process tree; the bare engine's warm call time.

What is not: anything on Dataflow or a GPU; ImageNet weights (random weights
cost the same); real photographs (random-noise PNGs are large and slow to
decode compared with JPEG photographs, so they overstate decode cost);
``model_copies``; other variants, targets or chunk sizes. RSS summed over
processes counts pages they share (the TensorFlow libraries mapped by every
worker) once per process, so with several workers it overstates the memory
actually in use; the sampler sees peaks that last at least ``--interval``.
The pipeline's wall times include start-up, which the marginal cancels only if
it is the same at R1 and R2; ``--repeats 3`` runs R1 R2 R2 R1 R1 R2 and takes
the median wall time, against drift and noise. On a busy machine all figures
are indicative only (with tiny settings t2 may even come out below t1: the
marginal is then reported as n/a).

Checks kept in the JSON: the kernel's peak RSS of the largest single process
(``wait4``; equal to the sampled peak when the tree is one process), the
processes seen, and the CPU time the sampler itself used. The engine runs in a
subprocess of this script (the internal ``--engine-child`` option).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import psutil
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("benchmarks/pipeline.py needs psutil: pip install psutil")

import numpy as np

#: The models this benchmark knows: how the pipeline is told about them, and their input size.
MODELS = {
    "small_cnn": {"image_size": 64, "classes": 10},
    "ResNet50": {"image_size": 224, "source": "keras.applications:ResNet50", "weights": "null"},
}
FILES_PER_DATASET = 4
NOISE = 0.1
MIB = 2 ** 20


# ----------------------------------------------------------------------------- data and model
def build_small_cnn(path: Path, image_size: int, classes: int) -> Path:
    """Saves an untrained small CNN (three conv stages, global pooling, softmax head) to ``path``."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name="small_cnn")
    model.save(path)
    return path


def write_dataset(folder: Path, records: int, image_size: int, classes: int, seed: int) -> list[Path]:
    """Writes ``records`` random PNG images with labels over ``FILES_PER_DATASET`` TFRecord files."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = [records // FILES_PER_DATASET + (index < records % FILES_PER_DATASET)
              for index in range(FILES_PER_DATASET)]
    paths = []
    for index, count in enumerate(counts):
        path = folder / f"part-{index}-of-{FILES_PER_DATASET}.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for _ in range(count):
                pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                feature = {
                    "image/encoded": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[tf.io.encode_png(pixels).numpy()])),
                    "image/class/label": tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[int(rng.integers(0, classes))])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        paths.append(path)
    return paths


def decode_like_the_pipeline(paths: list[Path], pipeline_args: list[str], image_size: int,
                             count: int) -> tuple[np.ndarray, list[str]]:
    """The first ``count`` records of ``paths``, decoded by the pipeline's own decode step.

    The decode settings come from the same command-line flags as the pipeline
    run, so resizing and preprocessing (``tf``: ``x/127.5 - 1``) are the
    pipeline's; the keys are the pipeline's ``<file name>:<index>``.
    """
    from pipelines.run.command_line import parse
    from transforms.decode.decode import DecodeSettings, Example, decode_batch
    from transforms.read.records import Record, read_records

    config, _ = parse(pipeline_args)
    settings = DecodeSettings.from_config(config, (image_size, image_size), 3, None)
    records = []
    for path in paths:
        with open(path, "rb") as handle:
            records += [item for item in read_records(handle, str(path)) if isinstance(item, Record)]
    decoded = decode_batch(records[:count], settings)
    failed = [item for item in decoded if not isinstance(item, Example)]
    if len(decoded) != count or failed:
        raise SystemExit(f"decoding for the engine failed: {len(decoded)} of {count} records, "
                         f"{len(failed)} failed (first: {failed[:1]})")
    return np.stack([example.image for example in decoded]), [example.key for example in decoded]


# ----------------------------------------------------------------------------- measuring a process tree
class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants until stopped.

    Attributes:
        peak_rss: the largest sum of RSS seen (bytes).
        peak_at: seconds after the sampler started when that peak was seen.
        max_processes: the most processes seen in the tree at once.
        samples: how many samples were taken.
        cpu_seconds: CPU time the sampler itself used (it shares the machine).
        seen: every process seen in the tree, pid -> its command line (shortened).
    """

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss, self.peak_at, self.max_processes, self.samples, self.cpu_seconds = 0, 0.0, 0, 0, 0.0
        self.seen: dict[int, str] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        cpu_start, started = time.thread_time(), time.perf_counter()
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop_event.is_set():
            self._sample(root, time.perf_counter() - started)
            self._stop_event.wait(self.interval)
        self.cpu_seconds = time.thread_time() - cpu_start

    def _sample(self, root: "psutil.Process", elapsed: float) -> None:
        try:
            tree = [root] + root.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return
        total, alive = 0, 0
        for process in tree:
            try:
                total += process.memory_info().rss
                alive += 1
                if process.pid not in self.seen:
                    self.seen[process.pid] = shlex.join(process.cmdline())[:160]
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                pass  # a process that ended between listing and reading
        self.samples += 1
        self.max_processes = max(self.max_processes, alive)
        if total > self.peak_rss:
            self.peak_rss, self.peak_at = total, elapsed

    def stop(self) -> None:
        """Stops sampling and waits for the thread to end."""
        self._stop_event.set()
        self.join()


def run_measured(command: list[str], log_path: Path, interval: float) -> dict:
    """Runs ``command`` to completion, timing it and sampling its process tree's RSS.

    Output goes to ``log_path``; a non-zero exit stops the benchmark with the log's tail.
    """
    with open(log_path, "wb") as log:  # the child inherits TF_CPP_MIN_LOG_LEVEL set above
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(process.pid, interval)
        sampler.start()
        # wait4 rather than wait: the kernel's own peak RSS of the process (the largest of it and
        # the descendants it waited for), a check on the sampled figure.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    if returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"command failed with exit status {returncode}: {shlex.join(command)}\n"
                         f"--- last lines of {log_path} (kept with --keep) ---\n{tail}")
    return {"wall_s": wall, "peak_rss_bytes": sampler.peak_rss, "peak_rss_at_s": sampler.peak_at,
            "max_processes": sampler.max_processes, "rss_samples": sampler.samples,
            "sampler_cpu_s": sampler.cpu_seconds, "largest_process_peak_rss_bytes": usage.ru_maxrss * 1024,
            "processes_seen": sampler.seen}


# ----------------------------------------------------------------------------- the pipeline
def pipeline_args(data: Path, output: Path, model: dict, args, run_id: str) -> list[str]:
    """The smoothgrad-audit flags of one run (without Beam's)."""
    flags = ["--input", str(data / "part-*.tfrecord"), "--output", str(output), "--model", model["source"]]
    if model.get("weights"):
        flags += ["--weights", model["weights"]]
    return flags + ["--samples", str(args.samples), "--noise", str(NOISE), "--batch_size", str(args.batch),
                    "--jit", "auto", "--overwrite", "--run_id", run_id]


def beam_args(workers: int) -> list[str]:
    """Beam flags for a worker count: none for 1 (the default in-process runner)."""
    if workers == 1:
        return []
    return ["--direct_num_workers", str(workers), "--direct_running_mode", "multi_processing"]


def runner_name(workers: int) -> str:
    return "default (in-process)" if workers == 1 else f"{workers} workers, multi_processing"


def check_manifest(run_dir: Path, records: int) -> dict:
    """Reads a run's manifest; stops the benchmark unless every record was explained."""
    path = run_dir / "_MANIFEST.json"
    if not path.exists():
        raise SystemExit(f"no manifest at {path}: the pipeline run did not complete")
    manifest = json.loads(path.read_text())
    summary = {key: manifest.get(key) for key in
               ("records_read", "records_explained", "rows_written", "errors_total", "invariant_holds", "jit_used")}
    if not (summary["invariant_holds"] and summary["records_read"] == records
            and summary["records_explained"] == records and summary["errors_total"] == 0):
        raise SystemExit(f"{path}: expected {records} records read and explained with no error and "
                         f"invariant_holds; got {summary} (errors by stage: {manifest.get('errors')})")
    return summary


def run_pipeline(workdir: Path, records: int, workers: int, repeat: int, model: dict, args) -> dict:
    """One timed run of the CLI on the dataset of ``records`` records."""
    run_id = f"w{workers}-r{records}-{repeat}"
    output = workdir / f"out-{records}"
    flags = pipeline_args(workdir / f"data-{records}", output, model, args, run_id)
    command = [sys.executable, "-m", "pipelines.smoothgrad_audit", *flags, *beam_args(workers)]
    measured = run_measured(command, workdir / f"log-{run_id}.txt", args.interval)
    manifest = check_manifest(output / f"run_id={run_id}", records)
    print(f"  pipeline {runner_name(workers)}, R={records}, run {repeat + 1}: {measured['wall_s']:.1f} s, "
          f"peak tree RSS {measured['peak_rss_bytes'] / MIB:.0f} MiB over {measured['max_processes']} "
          f"process(es), jit {manifest['jit_used']}", flush=True)
    return {"workers": workers, "records": records, "repeat": repeat, "run_id": run_id,
            "command": command, **measured, "manifest": manifest}


# ----------------------------------------------------------------------------- the bare engine
def engine_child(spec_path: str) -> None:
    """Runs in the engine subprocess: warm SmoothGrad calls on the saved images; writes a JSON result."""
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    from transforms.support.models import load_model
    from transforms.engine.smoothgrad import SmoothGrad

    images = np.load(spec["images"])
    keys = spec["keys"]
    model = load_model(spec["model"], spec["weights"], safe_mode=True)
    explainer = SmoothGrad(model, samples=spec["samples"], noise=NOISE, batch_size=spec["batch"], jit="auto")
    ready = time.perf_counter()
    batch = spec["batch"]
    first = time.perf_counter()
    explainer(images[:batch], keys[:batch])  # trace + compile + one run: not timed
    first_call = time.perf_counter() - first
    seconds, maps_ok = [], True
    for start in range(0, len(images), batch):
        tick = time.perf_counter()
        result = explainer(images[start:start + batch], keys[start:start + batch])
        seconds.append(time.perf_counter() - tick)
        maps_ok = maps_ok and bool(np.all(np.isfinite(result.maps)))
    total = sum(seconds)
    Path(spec["result"]).write_text(json.dumps({
        "images": len(images), "calls": len(seconds), "call_s": seconds, "total_s": total,
        "images_per_s": len(images) / total, "median_call_s": statistics.median(seconds),
        "first_call_s": first_call, "import_and_load_s": ready - started, "jit_used": explainer.jit_used,
        "compile_count": explainer.compile_count, "maps_finite": maps_ok,
        "own_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


def run_engine(workdir: Path, model: dict, args, r1: int, r2: int) -> dict:
    """Measures the bare engine in a fresh subprocess on R2 - R1 images decoded like the pipeline's."""
    count = r2 - r1
    data = workdir / f"data-{r2}"
    flags = pipeline_args(data, workdir / "out-engine", model, args, "engine")
    images, keys = decode_like_the_pipeline(sorted(data.glob("part-*.tfrecord")), flags,
                                            model["image_size"], count)
    np.save(workdir / "engine_images.npy", images)
    spec = {"images": str(workdir / "engine_images.npy"), "keys": keys, "result": str(workdir / "engine.json"),
            "model": model["source"], "weights": None if model.get("weights") in (None, "null") else model["weights"],
            "samples": args.samples, "batch": args.batch}
    spec_path = workdir / "engine_spec.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--engine-child", str(spec_path)]
    measured = run_measured(command, workdir / "log-engine.txt", args.interval)
    result = json.loads((workdir / "engine.json").read_text())
    if result["compile_count"] != 1 or not result["maps_finite"]:
        raise SystemExit(f"engine check failed: compile_count={result['compile_count']}, "
                         f"finite maps={result['maps_finite']}")
    print(f"  engine: {result['images']} images in {result['calls']} warm calls of {args.batch}: "
          f"{result['total_s']:.2f} s -> {result['images_per_s']:.2f} images/s (first call "
          f"{result['first_call_s']:.1f} s not timed, jit {result['jit_used']}); peak RSS "
          f"{measured['peak_rss_bytes'] / MIB:.0f} MiB", flush=True)
    return {**result, "process": measured, "command": command}


# ----------------------------------------------------------------------------- summary
def summarise(runs: list[dict], engine: dict, workers: int, r1: int, r2: int) -> dict:
    """One result row: a runner's marginal throughput and memory against the engine."""
    def pick(records):
        chosen = [run for run in runs if run["workers"] == workers and run["records"] == records]
        return (statistics.median(run["wall_s"] for run in chosen), max(run["peak_rss_bytes"] for run in chosen),
                max(run["max_processes"] for run in chosen),
                max(run["largest_process_peak_rss_bytes"] for run in chosen))

    (t1, rss1, procs1, largest1), (t2, rss2, procs2, largest2) = pick(r1), pick(r2)
    marginal = (r2 - r1) / (t2 - t1) if t2 > t1 else None
    if marginal is None:
        print(f"WARNING: {runner_name(workers)}: t(R2)={t2:.1f} s <= t(R1)={t1:.1f} s; the marginal throughput "
              "cannot be measured: use more records (R2 - R1 larger).", flush=True)
    engine_rate = engine["images_per_s"]
    return {
        "runner": runner_name(workers), "workers": workers, "beam_args": beam_args(workers),
        "r1": r1, "r2": r2, "wall_s_r1": t1, "wall_s_r2": t2,
        "pipeline_marginal_images_per_s": marginal, "engine_images_per_s": engine_rate,
        "pipeline_over_engine": marginal / engine_rate if marginal else None,
        "extra_ms_per_image": (1000 / marginal - 1000 / engine_rate) if marginal else None,
        "peak_rss_mib_r1": rss1 / MIB, "peak_rss_mib_r2": rss2 / MIB,
        "peak_rss_growth_pct": 100.0 * (rss2 - rss1) / rss1 if rss1 else None,
        "max_processes": max(procs1, procs2),
        "largest_process_peak_rss_mib_r1": largest1 / MIB, "largest_process_peak_rss_mib_r2": largest2 / MIB,
    }


def _load(averages) -> str:
    return ", ".join(f"{value:.1f}" for value in averages)


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| runner | R1 → R2 | wall s R1 | wall s R2 | pipeline marginal images/s | engine images/s | "
        "pipeline ÷ engine | extra ms/image | peak RSS R1 MiB | peak RSS R2 MiB | RSS growth | processes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['runner']} | {row['r1']} → {row['r2']} | {row['wall_s_r1']:.1f} | {row['wall_s_r2']:.1f} | "
            f"{_fmt(row['pipeline_marginal_images_per_s'], '.2f')} | {row['engine_images_per_s']:.2f} | "
            f"{_fmt(row['pipeline_over_engine'], '.2f')} | {_fmt(row['extra_ms_per_image'], '.1f')} | "
            f"{row['peak_rss_mib_r1']:.0f} | {row['peak_rss_mib_r2']:.0f} | "
            f"{_fmt(row['peak_rss_growth_pct'], '+.1f')}% | {row['max_processes']} |")
    return "\n".join(lines)


def markdown_report(report: dict) -> str:
    """The section to paste into benchmarks/RESULTS.md."""
    env, settings, engine = report["environment"], report["settings"], report["engine"]
    r1, r2 = settings["records"]
    model = settings["model"]
    model_text = ("`small_cnn` (an untrained 3-stage CNN built by the script, 64×64×3 → 10 classes, .keras)"
                  if model == "small_cnn" else f"`keras.applications:{model}` with random weights (`--weights null`)")
    size = MODELS[model]["image_size"]
    load, load_end = _load(env["load_average_at_start"]), _load(report["load_average_at_end"])
    return "\n".join([
        "## Pipeline overhead and memory against the bare engine",
        "",
        f"Command (from the repository root), run {env['date']} "
        f"(load average {load} at the start, {load_end} at the end):",
        "",
        "```",
        report["command"],
        "```",
        "",
        "Each pipeline run, in a fresh process tree, timed from start to exit:",
        "",
        "```",
        "python -m pipelines.smoothgrad_audit --input TMP/data-R/part-*.tfrecord --output TMP/out-R \\",
        f"    --model {MODELS[model].get('source', 'TMP/small_cnn.keras')}"
        f"{' --weights null' if MODELS[model].get('weights') else ''} --samples {settings['samples']} "
        f"--noise {NOISE} --batch_size {settings['batch']} --jit auto --overwrite --run_id RUN \\",
        "    [--direct_num_workers W --direct_running_mode multi_processing]",
        "```",
        "",
        f"Machine: {env['cpus']} CPUs ({env['cpu_model']}), {env['memory_gib']:.0f} GiB RAM, "
        f"GPUs: {', '.join(env['gpus']) or 'none'}; {env['platform']}; Python {env['python']}, "
        f"TensorFlow {env['tensorflow']}, Keras {env['keras']}, Apache Beam {env['apache_beam']}.",
        "",
        f"Model {model_text}; R random-noise PNG images of {size}×{size} over {FILES_PER_DATASET} TFRecord "
        f"files; N = {settings['samples']}, σ = {NOISE} absolute, batch {settings['batch']}, jit auto "
        f"(→ {engine['jit_used']}); {settings['repeats']} run(s) per record count"
        f"{' (median wall time, largest peak)' if settings['repeats'] > 1 else ''}.",
        f"Pipeline marginal images/s = (R2 − R1) / (t(R2) − t(R1)) on wall times; engine images/s = "
        f"{engine['images']} images (R2 − R1, decoded by the pipeline's decode step) / the time of "
        f"{engine['calls']} warm `SmoothGrad` calls of {settings['batch']} images in a fresh process "
        f"(first call, {engine['first_call_s']:.1f} s, not timed; peak RSS of that process "
        f"{engine['process']['peak_rss_bytes'] / MIB:.0f} MiB), with TensorFlow's default thread pools: "
        f"the same engine figure is the yardstick for every runner. Extra ms/image = 1000/pipeline − 1000/engine. "
        f"Peak RSS = the largest sum of RSS over the CLI's process tree, sampled every "
        f"{settings['interval'] * 1000:.0f} ms.",
        "",
        markdown_table(report["rows"]),
        "",
        "Processes: the most seen at once in the tree (the CLI, and with W workers each of Beam's SDK "
        "worker processes with the `/bin/sh` that starts it). "
        "Check on the sampling: the kernel's peak RSS of the largest single process of the tree "
        "(`wait4`; with one process it is the tree's peak) was "
        + "; ".join(f"{row['largest_process_peak_rss_mib_r1']:.0f} MiB at R1 and "
                    f"{row['largest_process_peak_rss_mib_r2']:.0f} MiB at R2 ({row['runner']})"
                    for row in report["rows"]) + ".",
        "",
        "Not measured: Dataflow, GPUs, ImageNet weights, photographs (random-noise PNGs are slow to decode), "
        "`model_copies`, other variants/targets/chunks. Summed RSS counts memory shared between processes "
        "(TensorFlow's libraries) once per process.",
        "",
    ])


def environment() -> dict:
    import tensorflow as tf
    from transforms.write.corpus import versions

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(), "cpu_model": cpu_model, "cpus": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / 2 ** 30,
        "gpus": [device.name for device in tf.config.list_logical_devices("GPU")],
        **versions(), "psutil": psutil.__version__, "load_average_at_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- command line
def _counts(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: comma-separated whole numbers expected, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what}: numbers >= 1 expected, got {text!r}")
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn",
                        help="small_cnn (64x64, built here) or ResNet50 (224x224, random weights) "
                             "(default: %(default)s)")
    parser.add_argument("--records", type=lambda text: _counts(text, "--records"), default=[32, 256],
                        help="two record counts R1,R2 with R1 < R2 (default: 32,256)")
    parser.add_argument("--samples", type=int, default=10, help="SmoothGrad N (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4,
                        help="the engine's batch size and the pipeline's --batch_size (default: %(default)s)")
    parser.add_argument("--workers", type=lambda text: _counts(text, "--workers"), default=[1],
                        help="runners to measure: 1 = Beam's default in-process runner, W >= 2 = "
                             "--direct_num_workers W --direct_running_mode multi_processing (default: 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pipeline runs per record count and runner, in the order R1 R2 R2 R1 ...; "
                             "the median wall time is used (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=0.05,
                        help="RSS sampling interval in seconds (default: %(default)s)")
    parser.add_argument("--out", default=None, help="JSON file for the full results")
    parser.add_argument("--markdown", default=None, help="markdown file with the section for RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (datasets, outputs, logs)")
    parser.add_argument("--engine-child", default=None, help=argparse.SUPPRESS)  # internal: the engine subprocess
    args = parser.parse_args(argv)
    if args.engine_child is None:
        if len(args.records) != 2 or args.records[0] >= args.records[1]:
            parser.error(f"--records: two counts R1,R2 with R1 < R2 expected, got {args.records}")
        if args.samples < 1 or args.batch < 1 or args.repeats < 1 or args.interval <= 0:
            parser.error("--samples, --batch and --repeats must be >= 1 and --interval > 0")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.engine_child:
        engine_child(args.engine_child)
        return None
    r1, r2 = args.records
    workers = list(dict.fromkeys(args.workers))
    report = {"command": shlex.join(["python", *sys.argv]) if argv is None
              else shlex.join(["python", "benchmarks/pipeline.py", *argv]),
              "environment": environment(),
              "settings": {key: value for key, value in vars(args).items() if key != "engine_child"}}
    env = report["environment"]
    print(f"# {env['date']}  {env['cpus']} CPUs  Python {env['python']}  TF {env['tensorflow']}  "
          f"Beam {env['apache_beam']}  load average {_load(env['load_average_at_start'])}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="smoothgrad-pipeline-bench-"))
    try:
        spec = MODELS[args.model]
        model = {"image_size": spec["image_size"], "source": spec.get("source"), "weights": spec.get("weights")}
        if args.model == "small_cnn":
            model["source"] = str(build_small_cnn(workdir / "small_cnn.keras", spec["image_size"], spec["classes"]))
        for records in (r1, r2):
            write_dataset(workdir / f"data-{records}", records, spec["image_size"], spec.get("classes", 1000),
                          seed=records)
        print(f"datasets of {r1} and {r2} records ({spec['image_size']}x{spec['image_size']} PNG, "
              f"{FILES_PER_DATASET} files each) in {workdir}", flush=True)

        report["engine"] = engine = run_engine(workdir, model, args, r1, r2)
        runs = []
        for worker_count in workers:
            for repeat in range(args.repeats):
                for records in ((r1, r2) if repeat % 2 == 0 else (r2, r1)):  # alternate against drift
                    runs.append(run_pipeline(workdir, records, worker_count, repeat, model, args))
        for run in runs:
            if run["manifest"]["jit_used"] != [engine["jit_used"]]:
                print(f"WARNING: run {run['run_id']} used jit {run['manifest']['jit_used']}, "
                      f"the engine {engine['jit_used']}", flush=True)
        report["runs"] = runs
        report["rows"] = [summarise(runs, engine, worker_count, r1, r2) for worker_count in workers]
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["load_average_at_end"] = os.getloadavg()

    print()
    print(markdown_table(report["rows"]))
    print(f"load average (1, 5, 15 min) at start {_load(env['load_average_at_start'])}, "
          f"at end {_load(report['load_average_at_end'])}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(markdown_report(report))
    return report


if __name__ == "__main__":
    main()
