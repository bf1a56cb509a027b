"""What crosses a stage boundary of the audit graph on Beam's local runner (ARCHITECTURE.md keeps the list).

The local runner keeps every PCollection that crosses from one fused stage to
another (a shuffle, a side input, a flatten of several stages) in memory in
full, so none of them may carry a per-record payload (record bytes, decoded
images, maps, rows). This test builds the real graph, lets the runner fuse it
and checks every such PCollection against the documented list.
"""

from __future__ import annotations

import re

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.worker import bundle_processor

from pipelines import smoothgrad_audit
from pipelines.run.baseline import fingerprint, resolve
from pipelines.run.command_line import parse
from tests import helpers

#: Producers of the PCollections allowed to cross a stage boundary, and why they are small.
ALLOWED = {
    r"ReadRecords/SpreadFiles/": "file names and sizes, one per file",
    r"ReadRecords/SpreadChunks/": "chunk descriptors, one per <= 64 records",
    r"/ParDo\(\w+\)\[errors\]$": "error rows (key, file, index, stage, one-line message), one per error",
    r"^SanitySample/": "the top sanity_records decoded examples of each bundle",
    r"^(No)?SanityChecks": "the sanity figures, one dict",
    r"^WriteCorpus/\w+PerFile\w*/": "(kind, file) counts, combined in the producing stage",
    r"^WriteCorpus/AllCounts": "(kind, file) counts",
    r"^WriteCorpus/DistinctEngines/": "(jit mode, device kind) pairs, de-duplicated in the producing stage",
    r"^WriteCorpus/(No)?Quality": "three running sums",
    r"^WriteCorpus/CountOutcomes/": "the baseline join's outcome counts, combined in the producing stage",
    r"^WriteCorpus/(SaliencyFiles|QualityParts|QualityTotals\w*/)": "file names; one quality sum per branch",
    r"^ReadErrors\[": "read error rows (the read step's and the re-read's), one per error",
    r"^(NoBaseline|Baseline/Decide\[outcome\]|Baseline/Decide/ParDo\(Decide\)\[outcome\])":
        "outcome strings of the baseline join, counted in the producing stage",
    r"^Baseline/(KeyRecords|IndexBaseline|JoinByKey|SpreadParts|BaselineParts)":
        "Seen (key, hash, location) and Stored (hash, row positions): no record bytes or maps",
    r"^Baseline/Decide/ParDo\(Decide\)\[(explain|carry)\]$": "Seen descriptors and row positions to carry over",
    r"^Baseline/GroupByRowGroup/": "row positions grouped by (shard, row group)",
    r"^WriteCorpus/Write(Saliency\w*|Errors)/Write/WriteImpl/(DoOnce|InitializeWrite|Pair|Extract|PreFinalize|"
    r"FinalizeWrite)": "the Parquet sink's file names, one per bundle",
    r"^AuditAggregates/ClassSaliency/Precombine\[": "(count, sum, sum of squares) per (class, group) and bundle, "
                                                    "combined in the producing stage",
    r"^AuditAggregates/ClassSample/(Smallest/)?TopPerKey\(\d+\)/CombinePerKey\(TopCombineFn\)/Precombine\[":
        "the audit_samples pooled maps with the smallest key hashes, per class and bundle",
    r"^AuditAggregates/Partial(Saliency|Sample)\w*/": "with a baseline: each branch's per-class partial sums "
                                                      "and top-n lists, combined in the branch's stage",
    r"^AuditAggregates/(SaliencyParts|SampleParts)(/|\[)": "the branches' per-class partials, flattened",
    r"^AuditAggregates/(Write(ClassSaliency|ClassSample)/Write/WriteImpl/(DoOnce|InitializeWrite|Pair|Extract|"
    r"PreFinalize|FinalizeWrite)|AuditFiles)": "the audit files' names",
}


def _crossing(extra: list[str], folder, with_baseline: bool = False) -> dict[str, str]:
    """Producer step name → "output" or "side input", for every PCollection crossing a stage boundary."""
    helpers.write_image_dataset(str(folder / "data"), files=2, per_file=3, size=16)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    argv = ["--input", str(folder / "data" / "*.tfrecord"), "--output", str(folder / "out"), "--model", model, *extra]
    baseline = None
    if with_baseline:  # a completed run to join with
        smoothgrad_audit.run(argv + ["--run_id", "before"])
        argv += ["--baseline", "latest"]
    config, _ = parse(argv + ["--run_id", "graph"])
    planned = smoothgrad_audit.plan(config)
    if with_baseline:
        baseline = resolve(config, fingerprint(config, planned.info, planned.engine.chunk))
        assert baseline is not None
    pipeline = beam.Pipeline(runner=FnApiRunner())
    smoothgrad_audit.build(pipeline, config, planned, str(folder / "out"), "now", baseline=baseline)
    proto = pipeline.to_runner_api()
    _, stages = FnApiRunner().create_stages(proto)
    producer = {pcollection: f"{transform.unique_name}[{tag}]"  # the graph's own steps ...
                for transform in proto.components.transforms.values() if not transform.subtransforms
                for tag, pcollection in transform.outputs.items()}
    for stage in stages:  # ... and the ones the runner adds (e.g. a combine's pre-combining half)
        for transform in stage.transforms:
            if transform.spec.urn != bundle_processor.DATA_INPUT_URN:  # a stage's read of another's output
                for tag, pcollection in transform.outputs.items():
                    producer[pcollection] = f"{transform.unique_name}[{tag}]"
    crossing = {}
    for stage in stages:
        for transform in stage.transforms:
            if transform.spec.urn == bundle_processor.DATA_OUTPUT_URN:
                for pcollection in transform.inputs.values():
                    crossing.setdefault(producer.get(pcollection, pcollection), "output")
        for pcollection in stage.side_inputs():
            crossing[producer.get(pcollection, pcollection)] = "side input"
    return crossing


@pytest.mark.parametrize("extra", [[], ["--sanity_records", "4", "--mask_feature", "mask"],
                                   ["--samples", "auto", "--min_samples", "4", "--max_samples", "12"]])
def test_no_per_record_payload_crosses_a_stage_boundary(tmp_path, extra):
    crossing = _crossing(extra, tmp_path)
    unexpected = {name: kind for name, kind in crossing.items()
                  if not any(re.search(pattern, name) for pattern in ALLOWED)}
    assert not unexpected, ("new stage boundaries: say in ARCHITECTURE.md what crosses them, then list them "
                            f"here: {unexpected}")
    # the read step's own boundaries: descriptors cross, records do not
    assert any(name.startswith("ReadRecords/SpreadChunks/") for name in crossing)
    assert not any(name.startswith(("ReadRecords/ReadChunks/ParDo(_ReadChunk)[records]", "Decode/ParDo"
                                    "(DecodeRecords)[examples]", "ToRows/ParDo(ToRows)[rows]", "SmoothGrad/"))
                   for name in crossing)
    _assert_audit_maps_cross_only_combined(crossing, ["ClassSaliency/Precombine"])


def _assert_audit_maps_cross_only_combined(crossing: dict, precombines: list[str]) -> None:
    """The audit's pooled maps cross only as per-class partials combined in the producing stage."""
    for step in precombines:
        assert any(name.startswith(f"AuditAggregates/{step}") for name in crossing), (step, sorted(crossing))
    assert not any(name.startswith(("AuditAggregates/PoolMaps", "AuditAggregates/SaliencyKeys",
                                    "AuditAggregates/SampleKeys")) for name in crossing), sorted(crossing)


def test_the_baseline_join_carries_no_record_bytes_or_maps(tmp_path):
    crossing = _crossing([], tmp_path, with_baseline=True)
    unexpected = {name: kind for name, kind in crossing.items()
                  if not any(re.search(pattern, name) for pattern in ALLOWED)}
    assert not unexpected, ("new stage boundaries: say in ARCHITECTURE.md what crosses them, then list them "
                            f"here: {unexpected}")
    assert any(name.startswith("Baseline/JoinByKey/") for name in crossing)  # the join is a boundary ...
    assert not any(name.startswith(("Baseline/ReReadRecords/", "Baseline/CarryOverRows"))  # ... its payloads not
                   and not name.endswith("[errors]") for name in crossing), sorted(crossing)
    # the audit combines each branch where it is made, then merges the per-class partials
    _assert_audit_maps_cross_only_combined(crossing, ["PartialSaliency/Precombine", "PartialSaliencyReused/Precombine",
                                                      "PartialSample/", "PartialSampleReused/", "SampleParts",
                                                      "ClassSaliency/Precombine", "ClassSample/Smallest/"])
