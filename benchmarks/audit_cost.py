"""What the audit costs: its share of a run's time, and its memory against the record count.

Two parts, each the real command line in a fresh process tree, audit on and off
alternating (on, off, off, on, ...) so that drift on a shared machine weighs on
both alike; peak RSS is the largest sum over the process tree
(``benchmarks/memory.py``'s sampler), CPU time is user + system from ``wait4``.

* ``demo``: the demo job (``configs/demo.yaml``: the demo's test records, N =
  20, batch 16) with ``--audit true`` and ``--audit false``; the audit's share
  is (on − off) / off, of wall and of CPU time. Needs ``python -m pipelines.demo
  --out demo_data``.
* ``memory``: ``benchmarks/memory.py``'s ``png64`` datasets (64×64 noise PNGs,
  a tiny CNN, N = 1, 10 classes) at two record counts, audit on and off: does
  the audit's memory grow with the records?

Example (from the repository root; needs psutil)::

    python benchmarks/audit_cost.py --parts demo,memory --repeats 2 --records 5000,40000 --out audit_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import MIB, build_tiny_cnn, run_command, run_tree, write_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _alternating(repeats: int):
    for repeat in range(repeats):
        yield from ((repeat, audit) for audit in (("true", "false") if repeat % 2 == 0 else ("false", "true")))


def demo_part(workdir: Path, repeats: int, interval: float) -> list[dict]:
    """The demo job with the audit on and off."""
    runs = []
    for repeat, audit in _alternating(repeats):
        run_id = f"audit-{audit}-{repeat}"
        command = [sys.executable, "-m", "pipelines.smoothgrad_audit", "--config", "configs/demo.yaml",
                   "--output", str(workdir / "demo-out"), "--run_id", run_id, "--sanity_records", "0",
                   "--progress_seconds", "0", f"--audit={audit}"]
        measured = run_command(command, REPO, workdir / f"log-demo-{run_id}.txt", interval)
        runs.append({"part": "demo", "audit": audit, "repeat": repeat, **measured})
        print(f"demo audit={audit:5s}: {measured['wall_s']:6.1f} s wall, {measured['cpu_s']:6.1f} s CPU, peak RSS "
              f"{measured['peak_rss_bytes'] / MIB:6.0f} MiB", flush=True)
    return runs


def memory_part(workdir: Path, counts: list[int], repeats: int, interval: float) -> list[dict]:
    """``png64`` datasets of ``counts`` records with the audit on and off."""
    model = build_tiny_cnn(workdir / "tiny-64.keras", 64)
    runs = []
    for records in counts:
        data = workdir / f"png64-{records}"
        write_dataset(data, records, 64, "png", seed=records)
        for repeat, audit in _alternating(repeats):
            run_id = f"{records}-{audit}-{repeat}"
            measured = run_tree(REPO, data, workdir / "out", model, 64, run_id, workdir / f"log-{run_id}.txt",
                                interval, extra=(f"--audit={audit}",))
            shutil.rmtree(workdir / "out" / f"run_id={run_id}", ignore_errors=True)
            runs.append({"part": "memory", "records": records, "audit": audit, "repeat": repeat, **measured})
            print(f"png64 R={records:>6,} audit={audit:5s}: {measured['wall_s']:6.1f} s wall, "
                  f"{measured['cpu_s']:6.1f} s CPU, peak RSS {measured['peak_rss_bytes'] / MIB:6.0f} MiB", flush=True)
        shutil.rmtree(data, ignore_errors=True)
    return runs


def summary(runs: list[dict]) -> list[dict]:
    """Medians per (part, records, audit), and the audit's share against the same case without it."""
    groups = {}
    for run in runs:
        groups.setdefault((run["part"], run.get("records"), run["audit"]), []).append(run)
    rows = []
    for (part, records, audit), members in sorted(groups.items(), key=lambda item: str(item[0])):
        rows.append({"part": part, "records": records, "audit": audit,
                     "wall_s": statistics.median(run["wall_s"] for run in members),
                     "cpu_s": statistics.median(run["cpu_s"] for run in members),
                     "peak_rss_mib": statistics.median(run["peak_rss_bytes"] for run in members) / MIB})
    for row in rows:
        off = next((other for other in rows if other["part"] == row["part"] and other["records"] == row["records"]
                    and other["audit"] == "false"), None)
        if off and row["audit"] == "true":
            row["wall_ratio"] = row["wall_s"] / off["wall_s"]
            row["cpu_ratio"] = row["cpu_s"] / off["cpu_s"]
            row["rss_ratio"] = row["peak_rss_mib"] / off["peak_rss_mib"]
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="demo,memory")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--records", default="5000,40000", help="png64 record counts (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="smoothgrad-audit-cost-"))
    load_start = os.getloadavg()
    runs = []
    try:
        if "demo" in args.parts:
            runs += demo_part(workdir, args.repeats, args.interval)
        if "memory" in args.parts:
            runs += memory_part(workdir, [int(value) for value in args.records.split(",")], args.repeats,
                                args.interval)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = summary(runs)
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["python", "benchmarks/audit_cost.py",
                                                                    *(sys.argv[1:] if argv is None else argv)]),
                                              "load_average": [load_start, os.getloadavg()], "runs": runs,
                                              "rows": rows}, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
