"""Peak memory of the CLI against the dataset size: does it grow with the records?

For each case this script writes two datasets into a temporary folder, each
over 8 TFRecord files, with a label per record:

* ``png64``: 64×64 random-noise PNG images (about 12 KB a record), 5,000 and
  40,000 records by default, explained by a tiny CNN with a 64×64×3 input;
* ``jpeg224``: 224×224 photo-like JPEG images (smooth random blobs with a
  little noise, quality 90; the mean record size is printed), 2,000 and 16,000
  records by default, explained by a tiny CNN with a 224×224×3 input (the input
  size of ResNet50, without its cost).

The tiny CNN (one 3×3 convolution of 4 filters, global pooling, a 10-class
softmax head, random weights) is built here and saved as ``.keras``. Each run
is the real command line in a fresh process tree::

    python -m pipelines.smoothgrad_audit --input TMP/CASE-R/part-*.tfrecord --output TMP/out \\
        --model TMP/tiny-SIZE.keras --samples 1 --noise 0 --batch_size B --jit auto \\
        --overwrite --run_id RUN

(B = 64 for ``png64``, 32 for ``jpeg224``), on Beam's default in-process
runner, with the working directory and ``PYTHONPATH`` set to one code tree:
``--trees before:/tmp/old-checkout,after:.`` measures two versions of the
code on the same datasets in one session, alternating (before, after, after,
before, ... per dataset) against drift. Peak RSS is the largest sum of RSS
over the CLI's process tree, sampled every ``--interval`` seconds with psutil
(``benchmarks/pipeline.py``'s sampler); each run's manifest must show every
record read and explained with no error.

Commands (from the repository root; needs psutil)::

    python benchmarks/memory.py --trees before:/tmp/wt-before,after:. --repeats 2 --markdown memory.md
    # a check that everything runs (a minute or two; not a measurement):
    python benchmarks/memory.py --png64 200,800 --jpeg224 100,400

What is measured: peak RSS, wall time and CPU time (user + system, from
``wait4``; less sensitive than wall time to other work on a shared machine) of
the whole CLI. What is not:
Dataflow, several worker processes, real photographs or trained models, any
SmoothGrad setting but N=1 (the engine's own memory does not depend on the
record count). Wall times on a shared machine are indicative; compare the
trees within one run only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import MIB, TreeSampler, check_manifest  # noqa: E402 - the sibling benchmark's sampler

import numpy as np  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FILES = 8
CASES = {
    "png64": {"size": 64, "format": "png", "batch": 64, "records": (5_000, 40_000)},
    "jpeg224": {"size": 224, "format": "jpeg", "batch": 32, "records": (2_000, 16_000)},
}


def build_tiny_cnn(path: Path, size: int, classes: int = 10) -> Path:
    """Saves a tiny untrained CNN with a ``size``×``size``×3 input to ``path``."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    keras.Model(inputs, outputs).save(path)
    return path


def _image(rng, size: int, kind: str):
    """Random pixels: noise for PNG; smooth blobs plus a little noise for JPEG (photo-like sizes)."""
    import tensorflow as tf

    if kind == "png":
        return tf.io.encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).numpy()
    coarse = rng.uniform(0, 255, (1, size // 16, size // 16, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, (size, size), method="bicubic")[0].numpy()
    pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    return tf.io.encode_jpeg(pixels, quality=90).numpy()


def write_dataset(folder: Path, records: int, size: int, kind: str, seed: int) -> float:
    """Writes ``records`` labelled images over :data:`FILES` TFRecord files; returns the mean record size in bytes."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    total = 0
    for index in range(FILES):
        count = records // FILES + (index < records % FILES)
        with tf.io.TFRecordWriter(str(folder / f"part-{index}-of-{FILES}.tfrecord")) as writer:
            for _ in range(count):
                feature = {
                    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_image(rng, size, kind)])),
                    "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(rng.integers(10))])),
                }
                data = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
                total += len(data)
                writer.write(data)
    return total / records


def run_tree(tree: Path, data: Path, output: Path, model: Path, batch: int, run_id: str, log: Path,
             interval: float, extra: tuple = ()) -> dict:
    """One CLI run with ``tree``'s code (and ``extra`` options); wall time and the peak RSS of its process tree."""
    command = [sys.executable, "-m", "pipelines.smoothgrad_audit", "--input", str(data / "part-*.tfrecord"),
               "--output", str(output), "--model", str(model), "--samples", "1", "--noise", "0",
               "--batch_size", str(batch), "--jit", "auto", "--overwrite", "--run_id", run_id, *extra]
    return run_command(command, tree, log, interval)


def run_command(command: list, tree: Path, log: Path, interval: float) -> dict:
    """Runs ``command`` with ``tree``'s code; wall and CPU time and the peak RSS of its process tree."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    with open(log, "wb") as handle:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=tree, env=env)
        sampler = TreeSampler(process.pid, interval)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)  # with the CPU time the tree's waited-for processes used
        wall = time.perf_counter() - start
        process.returncode = returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    if returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"exit status {returncode}: {shlex.join(command)} (in {tree})\n{tail}")
    return {"command": command, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": sampler.peak_rss, "max_processes": sampler.max_processes}


def _commit(tree: Path) -> str:
    result = subprocess.run(["git", "-C", str(tree), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return result.stdout.strip()[:80] or "?"


def summarise(runs: list[dict]) -> list[dict]:
    """Per case and tree: the largest peak and the median wall time at each record count."""
    rows = []
    for case in dict.fromkeys(run["case"] for run in runs):
        for tree in dict.fromkeys(run["tree"] for run in runs):
            mine = [run for run in runs if run["case"] == case and run["tree"] == tree]
            r1, r2 = sorted({run["records"] for run in mine})
            pick = {records: [run for run in mine if run["records"] == records] for records in (r1, r2)}
            peak = {records: max(run["peak_rss_bytes"] for run in chosen) / MIB for records, chosen in pick.items()}
            wall = {records: statistics.median(run["wall_s"] for run in chosen) for records, chosen in pick.items()}
            cpu = {records: statistics.median(run["cpu_s"] for run in chosen) for records, chosen in pick.items()}
            rows.append({"case": case, "tree": tree, "r1": r1, "r2": r2, "peak_mib_r1": peak[r1],
                         "peak_mib_r2": peak[r2], "ratio": peak[r2] / peak[r1],
                         "kib_per_record": (peak[r2] - peak[r1]) * 1024 / (r2 - r1),
                         "wall_s_r1": wall[r1], "wall_s_r2": wall[r2], "cpu_s_r2": cpu[r2],
                         "walls_r2": [round(run["wall_s"], 1) for run in pick[r2]], "runs": len(mine)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The result rows as a markdown table (the one RESULTS.md shows)."""
    lines = ["| case | code | R1 → R2 | peak RSS R1 MiB | peak RSS R2 MiB | R2 ÷ R1 | KiB per extra record | "
             "wall s R1 | wall s R2 (runs) | CPU s R2 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['tree']} | {row['r1']:,} → {row['r2']:,} | {row['peak_mib_r1']:.0f} | "
                     f"{row['peak_mib_r2']:.0f} | {row['ratio']:.2f} | {row['kib_per_record']:.1f} | "
                     f"{row['wall_s_r1']:.1f} | {row['wall_s_r2']:.1f} ({', '.join(map(str, row['walls_r2']))}) | "
                     f"{row['cpu_s_r2']:.0f} |")
    return "\n".join(lines)


def _counts(text: str) -> tuple[int, int]:
    values = tuple(int(part) for part in text.split(","))
    if len(values) != 2 or not 0 < values[0] < values[1]:
        raise argparse.ArgumentTypeError(f"two record counts R1,R2 with 0 < R1 < R2 expected, got {text!r}")
    return values


def _trees(text: str) -> dict[str, Path]:
    trees = {}
    for part in text.split(","):
        name, _, path = part.partition(":")
        if not path or not (Path(path) / "pipelines" / "smoothgrad_audit.py").exists():
            raise argparse.ArgumentTypeError(f"NAME:PATH of a code tree expected, got {part!r}")
        trees[name] = Path(path).resolve()
    return trees


def parse_args(argv=None):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="png64,jpeg224", help="comma-separated: png64, jpeg224 (default: both)")
    parser.add_argument("--png64", type=_counts, default=CASES["png64"]["records"], help="R1,R2 (default 5000,40000)")
    parser.add_argument("--jpeg224", type=_counts, default=CASES["jpeg224"]["records"],
                        help="R1,R2 (default 2000,16000)")
    parser.add_argument("--trees", type=_trees, default={"this": Path(__file__).resolve().parents[1]},
                        help="NAME:PATH,... code trees to run the CLI from (default: this repository)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tree and dataset (default: 1)")
    parser.add_argument("--interval", type=float, default=0.1, help="RSS sampling interval, s (default: 0.1)")
    parser.add_argument("--out", help="JSON file for every run")
    parser.add_argument("--markdown", help="markdown file with the table and settings")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Writes the datasets, runs every tree on each, prints the table; returns its rows."""
    args = parse_args(argv)
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    trees = args.trees
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()
    print(f"# {started}, load average {load_start[0]:.1f}; trees: "
          + "; ".join(f"{name} = {path} ({_commit(path)})" for name, path in trees.items()), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="smoothgrad-memory-bench-"))
    runs, sizes = [], {}
    try:
        for case in cases:
            spec = CASES[case]
            model = build_tiny_cnn(workdir / f"tiny-{spec['size']}.keras", spec["size"])
            for records in getattr(args, case):
                data = workdir / f"{case}-{records}"
                sizes[f"{case}-{records}"] = write_dataset(data, records, spec["size"], spec["format"], seed=records)
                print(f"{case}: {records:,} records, {sizes[f'{case}-{records}'] / 1024:.1f} KiB each on average",
                      flush=True)
                order = list(trees)
                for repeat in range(args.repeats):
                    for name in (order if repeat % 2 == 0 else order[::-1]):  # alternate against drift
                        run_id = f"{name}-{records}-{repeat}"
                        measured = run_tree(trees[name], data, workdir / "out", model, spec["batch"], run_id,
                                            workdir / f"log-{case}-{run_id}.txt", args.interval)
                        check_manifest(workdir / "out" / f"run_id={run_id}", records)
                        shutil.rmtree(workdir / "out" / f"run_id={run_id}", ignore_errors=True)
                        runs.append({"case": case, "tree": name, "records": records, "repeat": repeat, **measured})
                        print(f"  {name:>8} R={records:>6,}: {measured['wall_s']:6.1f} s "
                              f"({measured['cpu_s']:.0f} s CPU), peak RSS "
                              f"{measured['peak_rss_bytes'] / MIB:6.0f} MiB", flush=True)
                shutil.rmtree(data, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = summarise(runs)
    table = markdown_table(rows)
    load_end = os.getloadavg()
    print()
    print(table)
    print(f"load average (1 min) {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end")
    command = shlex.join(["python", "benchmarks/memory.py", *(sys.argv[1:] if argv is None else argv)])
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "started": started, "trees": {
            name: {"path": str(path), "commit": _commit(path)} for name, path in trees.items()},
            "mean_record_bytes": sizes, "runs": runs, "rows": rows}, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text("\n".join([
            f"Command: `{command}`, run {started} (load average {load_start[0]:.1f} at the start, "
            f"{load_end[0]:.1f} at the end).", "",
            "Code trees: " + "; ".join(f"{name} = {_commit(path)}" for name, path in trees.items()) + ".",
            "Mean record size: " + ", ".join(f"{key} {value / 1024:.1f} KiB" for key, value in sizes.items()) + ".",
            "", table, ""]))
    return rows


if __name__ == "__main__":
    main()
