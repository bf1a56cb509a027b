"""A scheduled audit's second run: how much of the first run's explain time it pays when 10 % of records changed.

The script:

1. writes dataset A: the first ``--records`` records of the demo's training
   files (``demo_data/``, made by ``python -m pipelines.demo``), split over 4
   TFRecord files;
2. writes dataset B: A with ``--changed`` (default 10 %) of its records, spread
   evenly, replaced by other demo records (same keys, other bytes);
3. runs, each in a fresh subprocess with the demo's settings (N=20, σ 0.1,
   batch 16, the in-process runner): run A over A; run B over B with
   ``baseline`` = run A; run C over B without a baseline;
4. reads for each run the wall time of ``smoothgrad_audit.run`` and the explain
   time, the sum of RunInference's ``inference_batch_latency_micro_secs``
   (the time spent in the SmoothGrad engine), and checks the manifests
   (invariant, reused/changed counts) and that B's rows equal C's.

Example (from the repository root, after ``python -m pipelines.demo --out demo_data``)::

    python benchmarks/baseline.py --records 1000 --changed 0.1
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN = r"""
import json, sys, time
from pipelines import smoothgrad_audit
argv = json.loads(sys.argv[1])
started = time.perf_counter()
result = smoothgrad_audit.run(argv)
wall = time.perf_counter() - started
explain = sum(item.committed.sum for item in result.metrics().query()["distributions"]
              if item.key.metric.name == "inference_batch_latency_micro_secs") / 1e6
print("RESULT " + json.dumps({"wall_seconds": wall, "explain_seconds": explain}))
"""


def _records(count: int) -> list[bytes]:
    import tensorflow as tf

    paths = sorted(glob.glob(str(ROOT / "demo_data" / "train-*.tfrecord")))
    if not paths:
        sys.exit("demo_data/ is missing: run python -m pipelines.demo --out demo_data first")
    records = []
    for data in tf.data.TFRecordDataset(paths).take(count).as_numpy_iterator():
        records.append(bytes(data))
    return records


def _write(folder: str, records: list[bytes], files: int = 4) -> str:
    import tensorflow as tf

    os.makedirs(folder, exist_ok=True)
    per_file = -(-len(records) // files)
    for index in range(files):
        with tf.io.TFRecordWriter(os.path.join(folder, f"part-{index}.tfrecord")) as writer:
            for data in records[index * per_file:(index + 1) * per_file]:
                writer.write(data)
    return os.path.join(folder, "*.tfrecord")


def _run(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(argv)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT)))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    """Builds the datasets, runs A, B (baseline A) and C, prints and returns the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--changed", type=float, default=0.1, help="share of records changed in B")
    args = parser.parse_args()
    records = _records(args.records * 2)
    first, spare = records[:args.records], records[args.records:]
    step = max(1, round(1 / args.changed))
    changed_positions = list(range(0, args.records, step))
    second = list(first)
    for count, position in enumerate(changed_positions):
        second[position] = spare[count]
    with tempfile.TemporaryDirectory() as folder:
        pattern_a, pattern_b = _write(os.path.join(folder, "a"), first), _write(os.path.join(folder, "b"), second)
        common = ["--output", os.path.join(folder, "out"), "--model", str(ROOT / "demo_data" / "model.keras"),
                  "--preprocess", "tf", "--samples", "20", "--noise", "0.1", "--batch_size", "16",
                  "--jit", "auto", "--progress_seconds", "0"]
        runs = {"A": _run(["--input", pattern_a, "--run_id", "A", *common])}
        runs["B"] = _run(["--input", pattern_b, "--run_id", "B", "--baseline",
                          os.path.join(folder, "out", "run_id=A"), *common])
        runs["C"] = _run(["--input", pattern_b, "--run_id", "C", *common])
        manifests = {}
        for name in runs:
            with open(os.path.join(folder, "out", f"run_id={name}", "_MANIFEST.json")) as handle:
                manifests[name] = json.load(handle)
            assert manifests[name]["invariant_holds"], name
        import pyarrow.parquet as pq

        tables = {name: pq.read_table(glob.glob(os.path.join(folder, "out", f"run_id={name}", "saliency-*.parquet")),
                                      partitioning=None).sort_by("key") for name in ("B", "C")}
        identical = all(tables["B"].column(column).equals(tables["C"].column(column))
                        for column in tables["B"].schema.names)
    figures = {
        "records": args.records, "changed": len(changed_positions),
        "reused_in_B": manifests["B"]["records_reused"], "changed_in_B": manifests["B"]["records_changed"],
        "rows_B_equal_C": identical, "runs": runs,
        "explain_B_over_A": runs["B"]["explain_seconds"] / runs["A"]["explain_seconds"],
        "wall_B_over_A": runs["B"]["wall_seconds"] / runs["A"]["wall_seconds"],
        "wall_C_over_A": runs["C"]["wall_seconds"] / runs["A"]["wall_seconds"],
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
