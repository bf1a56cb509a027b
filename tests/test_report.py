"""The report command: a real tiny run → index.html + PNGs; a 100k-row corpus read without its maps; gs://."""

from __future__ import annotations

import collections
import json
import os
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from pipelines.report import report, run_data
from pipelines import smoothgrad_audit
from tests import helpers
from transforms.write import schema as corpus_schema

MASK = "image/object_mask"


def masked_dataset(folder: str, files: int = 2, per_file: int = 6, size: int = 16, classes: int = 3,
                   broken: bool = False) -> list[str]:
    """TFRecord files of random PNG images with labels and an object mask; ``broken`` adds one undecodable image."""
    rng, paths = np.random.default_rng(0), []
    for number in range(files):
        records = []
        for index, image in enumerate(helpers.random_images(per_file, size, seed=number)):
            mask = np.zeros((size, size, 1), np.uint8)
            mask[4:11, 2 + index % 5:9 + index % 5] = 255
            feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[helpers.png(mask)]))
            records.append(helpers.example(helpers.png(image), int(rng.integers(0, classes)), extra={MASK: feature}))
        if broken and number == files - 1:
            records.append(helpers.example(b"these bytes are no image", 0))
        paths.append(helpers.write_tfrecords(os.path.join(folder, f"part-{number}.tfrecord"), records))
    return paths


class Page(HTMLParser):
    """What a test needs of a page: ids, image sources, counts, tiles per section, and all tags used."""

    def __init__(self, text: str):
        super().__init__()
        self.ids, self.images, self.tags = set(), [], set()
        self.counts, self.tiles, self.attributes = {}, collections.defaultdict(list), []
        self._containers, self._count = [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.attributes.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag in ("section", "article"):
            self._containers.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "figure" and "data-key" in attrs:
            self.tiles[self._containers[-1]].append(attrs["data-key"])
        for name, prefix in (("data-count", ""), ("data-count-a", "a:"), ("data-count-b", "b:")):
            if name in attrs:
                self._count = prefix + attrs[name]
                self.counts[self._count] = ""

    def handle_endtag(self, tag):
        if tag in ("section", "article"):
            self._containers.pop()
        if tag in ("td", "span"):
            self._count = None

    def handle_data(self, data):
        if self._count:
            self.counts[self._count] += data.strip()


def read_page(folder: str) -> tuple[str, Page]:
    """(HTML, parsed page) of ``folder/index.html`` (local or gs://)."""
    with FileSystems.open(FileSystems.join(folder, "index.html")) as handle:
        text = handle.read().decode("utf-8")
    return text, Page(text)


def assert_self_contained(text: str, page: Page, folder: str) -> None:
    """Every image is a file of the folder, and nothing is fetched from a network."""
    assert page.images
    for src in page.images:
        assert not src.startswith(("http:", "https:", "//", "/")), src
        assert FileSystems.exists(FileSystems.join(folder, src)), src
    assert not {"script", "link", "iframe"} & page.tags
    assert "url(" not in text and "@import" not in text
    assert not [attrs for _, attrs in page.attributes if any(str(value).startswith(("http:", "https:", "//"))
                                                             for value in attrs.values())]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    masked_dataset(str(folder / "data"), broken=True)
    model = helpers.save_tiny_cnn(str(folder), size=16, classes=3)
    smoothgrad_audit.run(["--input", str(folder / "data" / "*.tfrecord"), "--output", str(folder / "out"),
                          "--model", model, "--run_id", "tiny", "--samples", "4", "--batch_size", "4",
                          "--mask_feature", MASK, "--sanity_records", "3"])
    run_dir = str(folder / "out" / "run_id=tiny")
    with open(os.path.join(run_dir, "_MANIFEST.json")) as handle:
        manifest = json.load(handle)
    index = report.build_report(run_dir, top=5)
    text, page = read_page(os.path.dirname(index))
    return {"folder": folder, "run_dir": run_dir, "manifest": manifest, "out": os.path.dirname(index),
            "text": text, "page": page}


def test_the_report_has_every_section_and_only_local_images(tiny_run):
    page = tiny_run["page"]
    assert tiny_run["out"] == os.path.join(tiny_run["run_dir"], "report")  # the default
    assert {"summary", "classes", "histograms", "galleries", "errors", "gallery-border", "gallery-mask",
            "gallery-mistakes", "gallery-random"} <= page.ids
    assert_self_contained(tiny_run["text"], page, tiny_run["out"])
    assert {"img/hist-entropy.png", "img/hist-mass_in_mask.png", "img/density-com.png",
            "img/sanity-cascade.png"} <= set(page.images)


def test_the_counts_shown_are_the_manifests(tiny_run):
    manifest, counts = tiny_run["manifest"], tiny_run["page"].counts
    assert manifest["errors"]["decode"] == 1 and manifest["records_read"] == 13
    for name in report.COUNTS:
        assert counts[name] == str(manifest[name])
    for stage, count in manifest["errors"].items():
        assert counts[f"errors.{stage}"] == str(count)
    assert counts["invariant_holds"] == "yes"


def test_galleries_have_k_tiles_with_images_read_again_from_the_records(tiny_run):
    page, run = tiny_run["page"], run_data.open_run(tiny_run["run_dir"])
    assert run.num_rows == 12
    for gallery in ("gallery-border", "gallery-mask", "gallery-random"):
        assert len(page.tiles[gallery]) == 5
    assert "placeholder" not in tiny_run["text"].split("<main>")[1]  # every image was read again
    keys = page.tiles["gallery-border"]
    border = dict(zip(run.values("key"), run.values("border_mass")))
    assert [border[key] for key in keys] == sorted(border.values(), reverse=True)[:5]
    rows = [list(run.values("key")).index(key) for key in keys]
    pictures = run_data.load_pictures(run, rows)
    for row, values in zip(rows, run.rows(rows)):
        name, index = values["key"].split(":")
        expected = helpers.random_images(6, 16, seed=int(name[len("part-"):-len(".tfrecord")]))[int(index)]
        np.testing.assert_array_equal(np.round(pictures[row].image * 255).astype(np.uint8), expected)
        assert pictures[row].mask.sum() == 49 and pictures[row].note is None


def test_the_random_gallery_depends_only_on_the_seed(tiny_run, tmp_path):
    def random_keys(name, seed):
        report.build_report(tiny_run["run_dir"], out=str(tmp_path / name), top=4, seed=seed)
        return read_page(str(tmp_path / name))[1].tiles["gallery-random"]

    first = random_keys("first", 7)
    assert len(first) == 4
    assert random_keys("again", 7) == first
    run = run_data.open_run(tiny_run["run_dir"])
    chosen = {gallery.id: gallery.rows for gallery in report.choose_galleries(run, 4, 7)}
    assert [run.values("key")[row] for row in chosen["random"]] == first
    other = {gallery.id: gallery.rows for gallery in report.choose_galleries(run, 4, 8)}
    assert other["random"] != chosen["random"]


def test_the_errors_table_lists_the_failed_record(tiny_run):
    errors = tiny_run["text"].split('id="errors"')[1]
    assert "part-1.tfrecord:6" in errors and "decode" in errors and "not a decodable" in errors


def test_the_command_line_reports_mistakes_in_one_line(tiny_run, tmp_path, capsys):
    incomplete = tmp_path / "run_id=half"
    incomplete.mkdir()
    (incomplete / "saliency-00000-of-00001.parquet").write_bytes(b"")
    cases = [([str(incomplete)], f"{incomplete} has no _MANIFEST.json: the run is not complete"),
             ([str(tmp_path / "nowhere")], "does not exist"),
             ([tiny_run["run_dir"], "--top", "0"], "--top must be at least 1"),
             ([tiny_run["run_dir"], "--colour", "red"], "unrecognized arguments"),
             ([tiny_run["run_dir"], "--out", tiny_run["run_dir"]], "holds files but no index.html")]
    for argv, message in cases:
        assert report.main(argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("smoothgrad-audit report: error: ") and message in error
    assert report.main([tiny_run["run_dir"], "--out", str(tmp_path / "cli"), "--top", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "index.html")


def test_records_are_shown_as_the_model_saw_them_or_with_a_note():
    tensor = np.linspace(-2, 6, 4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    raw = helpers.example(extra={"x": tf.train.Feature(float_list=tf.train.FloatList(value=tensor.ravel()))})
    picture = run_data._picture(raw, "k", {"raw_feature": "x", "raw_shape": [4, 4, 3]}, (4, 4), 3)
    np.testing.assert_allclose(picture.image, (tensor + 2) / 8, atol=1e-6)  # min-max scaled
    big = helpers.example(helpers.png(helpers.random_images(1, 8)[0]))
    assert run_data._picture(big, "k", {"resize_method": "area"}, (4, 4), 3).image.shape == (4, 4, 3)
    grey = run_data._picture(big, "k", {}, (8, 8), 1).image
    assert grey.shape == (8, 8) and 0 <= grey.min() <= grey.max() <= 1
    renamed = helpers.example(helpers.png(helpers.random_images(1, 4)[0]),
                              extra={"image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"other"]))})
    changed = run_data._picture(renamed, "mine", {"id_feature": "image/id"}, (4, 4), 3)
    assert changed.image is None and "now holds key 'other'" in changed.note


# ------------------------------------------------------------------ a large corpus, without its maps
ROWS, SHARDS, GROUP = 100_000, 4, 5_000


def _synthetic_run(folder: str, records_file: str) -> str:
    """A run folder of ROWS rows of 8x8 float16 maps in SHARDS shards of GROUP-row row groups, with a manifest."""
    run_dir = os.path.join(folder, "run_id=big")
    os.makedirs(run_dir)
    schema = corpus_schema.saliency_schema((8, 8), "float16", mask_columns=False)
    if "reliability" not in schema.names:
        schema = schema.append(pa.field("reliability", pa.float32(), nullable=True))
    rng = np.random.default_rng(0)
    per_shard, names = ROWS // SHARDS, []
    for shard in range(SHARDS):
        start = shard * per_shard
        index = np.arange(start, start + per_shard)
        real = index % 2 == 0  # half the rows point at a real file, half at a file that is gone
        columns = {
            "key": [f"k{i:06d}" for i in index], "record_index": index % 8,
            "source_file": np.where(real, records_file, os.path.join(folder, "gone.tfrecord")),
            "label": index % 10, "target": (index * 7) % 10, "target_rank": np.zeros(per_shard, int),
            "score": rng.random(per_shard), "predicted": (index * 7) % 10, "noise_sigma": np.full(per_shard, 0.1),
            "samples_used": np.full(per_shard, 20),
            "height": np.full(per_shard, 8), "width": np.full(per_shard, 8),
        }
        columns.update({name: rng.random(per_shard) for name in schema.names if name not in columns})
        maps = rng.random((per_shard, 8, 8)).astype(np.float16)
        arrays = [pa.FixedShapeTensorArray.from_numpy_ndarray(maps) if name == "saliency"
                  else pa.array(columns[name]).cast(schema.field(name).type) for name in schema.names]
        table = pa.Table.from_arrays(arrays, schema=schema)
        names.append(f"saliency-{shard:05d}-of-{SHARDS:05d}.parquet")
        pq.write_table(table, os.path.join(run_dir, names[-1]), row_group_size=GROUP)
    pq.write_table(corpus_schema.errors_table([]), os.path.join(run_dir, "errors-00000-of-00001.parquet"))
    manifest = {"run_id": "big", "started_at": "2026-01-01T00:00:00+00:00",
                "smoothgrad": {"samples": 20, "target": "top1", "downsample": 1},
                "model": {"source": "model.keras", "sha256": "0" * 64, "input_shape": [8, 8, 3], "classes": 10},
                "input": [records_file], "config": {"image_feature": "image/encoded", "resize_method": "bilinear"},
                "records_read": ROWS, "records_explained": ROWS, "rows_written": ROWS,
                "errors": {"read": 0, "decode": 0, "explain": 0}, "errors_total": 0, "maps_per_record": 1,
                "invariant_holds": True, "files": {},
                "outputs": {"saliency": names, "errors": ["errors-00000-of-00001.parquet"]}}
    with open(os.path.join(run_dir, "_MANIFEST.json"), "w") as handle:
        json.dump(manifest, handle)
    return run_dir


def test_a_100k_row_corpus_reads_only_the_maps_it_shows(tmp_path, monkeypatch):
    images = helpers.random_images(8, 8, seed=3)
    records_file = helpers.write_tfrecords(str(tmp_path / "records.tfrecord"),
                                           [helpers.example(helpers.png(image), 1) for image in images])
    run_dir = _synthetic_run(str(tmp_path), records_file)
    map_reads, group_reads = [], []
    read_group_maps, read_row_group = run_data._read_group_maps, pq.ParquetFile.read_row_group

    def counting_maps(parquet, group, offsets):
        map_reads.append(len(offsets))
        return read_group_maps(parquet, group, offsets)

    def counting_groups(self, group, columns=None, **options):
        group_reads.append(tuple(columns or ("<every column>",)))
        return read_row_group(self, group, columns=columns, **options)

    monkeypatch.setattr(run_data, "_read_group_maps", counting_maps)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting_groups)
    index = report.build_report(run_dir, out=str(tmp_path / "report"), top=6)

    text, page = read_page(os.path.dirname(index))
    tiles = {key for keys in page.tiles.values() for key in keys}
    for gallery in ("gallery-border", "gallery-reliability", "gallery-mistakes", "gallery-random"):
        assert len(page.tiles[gallery]) == 6
    assert "gallery-mask" not in page.ids  # the corpus has no mask columns
    assert sum(map_reads) == len(tiles)  # one map per tile shown, no more
    saliency_reads = [columns for columns in group_reads if "saliency" in columns]
    assert all(columns == ("saliency",) for columns in saliency_reads) and len(saliency_reads) <= len(tiles)
    assert ("<every column>",) not in group_reads
    assert page.counts["rows_written"] == str(ROWS)
    assert "placeholder" in text and "gone.tfrecord" in text  # the rows whose file is gone
    assert_self_contained(text, page, os.path.dirname(index))


# ------------------------------------------------------------------ gs://
def test_a_report_of_a_run_on_gcs_is_written_to_gcs(tiny_run, gcs_bucket):
    remote_run = f"{gcs_bucket}/report-test/run_id=tiny"
    for name in os.listdir(tiny_run["run_dir"]):
        path = os.path.join(tiny_run["run_dir"], name)
        if os.path.isfile(path):
            with open(path, "rb") as source, FileSystems.create(f"{remote_run}/{name}") as target:
                target.write(source.read())
    out = f"{gcs_bucket}/report-test/pages/tiny"
    assert report.build_report(remote_run, out=out, top=3) == f"{out}/index.html"
    text, page = read_page(out)
    assert_self_contained(text, page, out)
    assert len(page.tiles["gallery-border"]) == 3 and "placeholder" not in text.split("<main>")[1]
    assert page.counts["records_read"] == str(tiny_run["manifest"]["records_read"])
