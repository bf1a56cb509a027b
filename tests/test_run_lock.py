"""The run folder's lock: a folder in use is refused in one line, a crashed run's lock is taken over, the lock goes.

Two runs of one run_id started seconds apart (a scheduler firing twice) must
not delete each other's files: the second refuses while the first's lock is
live, locally and on gs:// (the GCS emulator, with generation preconditions).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems

from pipelines import smoothgrad_audit
from pipelines.run import lock
from pipelines.run.config import ConfigError
from tests import helpers
from transforms.support import storage

#: Files of a first run that is still going: Beam's temporary shards, an errors shard already in place.
FIRST_RUNS_FILES = ("beam-temp-saliency-5e1f0c/1a2b3c.parquet", "errors-00000-of-00001.parquet")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lock")
    helpers.write_image_dataset(str(folder / "data"), files=1, per_file=4, size=16, classes=3)
    return {"folder": folder, "pattern": str(folder / "data" / "*.tfrecord"),
            "model": helpers.save_tiny_cnn(str(folder), size=16, classes=3)}


@pytest.fixture(scope="module")
def remote(dataset, gcs_bucket):
    model = f"{gcs_bucket}/lock/tiny.keras"
    _write(model, open(dataset["model"], "rb").read())
    for path in FileSystems.match([dataset["pattern"]])[0].metadata_list:
        _write(f"{gcs_bucket}/lock/data/{os.path.basename(path.path)}", open(path.path, "rb").read())
    return {"pattern": f"{gcs_bucket}/lock/data/*.tfrecord", "model": model, "output": f"{gcs_bucket}/lock/out"}


def _args(data, output, run_id, *extra):
    return ["--input", data["pattern"], "--output", output, "--model", data["model"], "--run_id", run_id,
            "--samples", "2", "--batch_size", "4", "--progress_seconds", "0", "--audit=false", *extra]


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def _read(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def _files(run_dir: str) -> list[str]:
    return [path[len(run_dir) + 1:] for path in storage.files_under(run_dir)]


def _first_run_is_writing(run_dir: str) -> list[str]:
    for name in FIRST_RUNS_FILES:
        _write(FileSystems.join(run_dir, name), b"written by the first run")
    return _files(run_dir)


def _crashed_runs_lock(run_dir: str, minutes: float) -> None:
    """The lock of a run that died ``minutes`` after its last heartbeat."""
    beat = time.time() - 60 * minutes
    _write(FileSystems.join(run_dir, lock.LOCK), json.dumps(
        {"run_id": "crashed", "host": "elsewhere", "pid": 4242, "started_at": lock._iso(beat - 300),
         "heartbeat_at": lock._iso(beat), "token": "0" * 32}).encode())


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smoothgrad-audit: error: ")]
    assert len(lines) == 1, lines
    return lines[0][len("smoothgrad-audit: error: "):]


def _complete(run_dir: str) -> dict:
    """The manifest of a complete run folder, which holds exactly the files the manifest lists (no lock)."""
    manifest = json.loads(_read(FileSystems.join(run_dir, "_MANIFEST.json")))
    assert _files(run_dir) == helpers.files_listed(manifest)
    assert manifest["invariant_holds"] and manifest["records_read"] == 4
    return manifest


def _refused_while_held(data, output, run_id, capsys):
    """A second run (also with --overwrite, also --validate_only) while this process holds the lock: exit 2."""
    run_dir = f"{output}/run_id={run_id}"
    first = lock.acquire(run_dir, run_id)  # the first run, which has started writing
    try:
        before, lock_before = _first_run_is_writing(run_dir), _read(FileSystems.join(run_dir, lock.LOCK))
        holder = (f"{run_dir} is in use by another run (run_id {run_id}, host {socket.gethostname()}, "
                  f"pid {os.getpid()}, started ")
        for extra in ((), ("--overwrite",), ("--validate_only",)):
            assert smoothgrad_audit.main(_args(data, output, run_id, *extra)) == 2
            line = _error_line(capsys)
            assert line.startswith(holder) and ", last heartbeat " in line, line
            assert line.endswith("; nothing was changed. Wait for it to end, or choose another run_id."), line
            assert _files(run_dir) == before  # nothing of the first run was deleted
            assert _read(FileSystems.join(run_dir, lock.LOCK)) == lock_before
        assert first.refresh()  # still the first run's lock
    finally:
        first.release()
    assert _files(run_dir) == sorted(FIRST_RUNS_FILES)  # the lock went with the first run


def test_a_second_run_is_refused_in_one_line_while_the_first_holds_the_folder(dataset, tmp_path, capsys):
    _refused_while_held(dataset, str(tmp_path / "out"), "twice", capsys)


def test_a_second_run_on_gcs_is_refused_in_one_line_while_the_first_holds_the_folder(remote, capsys):
    _refused_while_held(remote, remote["output"], "twice", capsys)


def test_validate_only_takes_no_lock(dataset, tmp_path):
    output = str(tmp_path / "out")
    assert smoothgrad_audit.main(_args(dataset, output, "checked", "--validate_only")) == 0
    assert not os.path.exists(output)  # no run folder, no lock


def _take_over(data, output, capsys, monkeypatch):
    """A crashed run's lock: refused while its heartbeat is 3 min old, taken over once past the expiry."""
    run_dir = f"{output}/run_id=again"
    _crashed_runs_lock(run_dir, minutes=3)
    before = _first_run_is_writing(run_dir)
    assert smoothgrad_audit.main(_args(data, output, "again")) == 2
    line = _error_line(capsys)
    assert line.startswith(f"{run_dir} is locked by a run whose heartbeat stopped (run_id crashed, host elsewhere, "
                           "pid 4242, started "), line
    assert line.endswith("Its lock is taken over 10 min after its last heartbeat, or now with --overwrite."), line
    assert _files(run_dir) == before
    monkeypatch.setattr(lock, "EXPIRY_SECONDS", 120.0)  # 3 min without heartbeat is now past the expiry
    assert smoothgrad_audit.main(_args(data, output, "again")) == 0
    taken = [line for line in capsys.readouterr().err.splitlines() if "Took over the lock" in line]
    assert len(taken) == 1 and taken[0].startswith(
        f"WARNING pipelines.run.lock: Took over the lock of {run_dir} from run_id crashed, host elsewhere, pid 4242, "
        "started "), taken
    assert taken[0].endswith(" (3 min ago) (no heartbeat for over 2 min)."), taken
    _complete(run_dir)  # the crashed run's files are gone, the lock too


def test_a_crashed_runs_lock_is_taken_over_after_the_expiry(dataset, tmp_path, capsys, monkeypatch):
    _take_over(dataset, str(tmp_path / "out"), capsys, monkeypatch)


def test_a_crashed_runs_lock_on_gcs_is_taken_over_after_the_expiry(remote, capsys, monkeypatch):
    _take_over(remote, remote["output"], capsys, monkeypatch)


def test_overwrite_takes_over_a_stopped_lock_at_once_and_a_submitted_run_releases_it(dataset, tmp_path, capsys):
    output = str(tmp_path / "out")
    run_dir = os.path.join(output, "run_id=forced")
    _crashed_runs_lock(run_dir, minutes=2)
    assert smoothgrad_audit.main(_args(dataset, output, "forced", "--overwrite"), wait=False) == 0
    err = capsys.readouterr().err
    assert "(its heartbeat stopped; --overwrite)." in err
    assert "The run folder's lock is released now: the job itself holds none." in err  # wait=False: at submission
    _complete(run_dir)


def _explode(_):
    raise RuntimeError("the pipeline failed here")


def test_the_lock_is_released_when_the_pipeline_fails(dataset, tmp_path, monkeypatch):
    built = smoothgrad_audit.build

    def failing(pipeline, *args, **kwargs):
        manifest = built(pipeline, *args, **kwargs)
        _ = manifest | "Explode" >> beam.Map(_explode)
        return manifest

    monkeypatch.setattr(smoothgrad_audit, "build", failing)
    output = str(tmp_path / "out")
    with pytest.raises(Exception, match="the pipeline failed here"):
        smoothgrad_audit.run(_args(dataset, output, "failing"))
    assert not os.path.exists(os.path.join(output, "run_id=failing", lock.LOCK))


def test_the_heartbeat_goes_on_and_a_release_never_deletes_another_runs_lock(tmp_path, monkeypatch):
    clock = [1_000_000.0]
    monkeypatch.setattr(lock, "_now", lambda: clock[0])
    monkeypatch.setattr(lock, "HEARTBEAT_SECONDS", 0.05)
    run_dir = str(tmp_path / "run_id=beating")
    path = os.path.join(run_dir, lock.LOCK)
    held = lock.acquire(run_dir, "beating")
    clock[0] += 42
    deadline = time.monotonic() + 10
    while json.load(open(path))["heartbeat_at"] != lock._iso(clock[0]) and time.monotonic() < deadline:
        time.sleep(0.02)
    fields = json.load(open(path))
    assert fields["heartbeat_at"] == lock._iso(clock[0]) and fields["started_at"] == lock._iso(clock[0] - 42)
    assert (fields["run_id"], fields["host"], fields["pid"]) == ("beating", socket.gethostname(), os.getpid())
    # another run takes the lock over (this one stopped beating for too long): this run's release leaves it
    held._stop.set()
    held._thread.join()
    clock[0] += lock.EXPIRY_SECONDS + 1
    other = lock.acquire(run_dir, "other")
    assert not held.refresh()
    held.release()
    assert json.load(open(path))["run_id"] == "other"
    other.release()
    assert os.listdir(run_dir) == []


def test_clearing_an_interrupted_run_keeps_the_lock(tmp_path, gcs_bucket):
    for folder in (str(tmp_path / "run_id=x"), f"{gcs_bucket}/clear/run_id=x"):
        for name in (lock.LOCK, "saliency-00000-of-00002.parquet", "_audit/class_saliency-0.parquet",
                     "beam-temp-errors-1/part"):
            _write(FileSystems.join(folder, name), b"x")
        assert storage.clear_folder(folder, keep=(lock.LOCK,)) == 3
        assert _files(folder) == [lock.LOCK]


def _racer(run_dir: str, index: int, start: float, results: str) -> None:
    """One of several processes that try to take the same lock at the same moment; writes what happened, and when."""
    while time.time() < start:
        time.sleep(0.001)
    tried = time.time()
    try:
        held = lock.acquire(run_dir, f"racer-{index}")
    except ConfigError as error:
        outcome = {"refused": str(error), "tried": tried, "answered": time.time()}
    else:
        outcome = {"held": True, "tried": tried, "answered": time.time()}
        time.sleep(1.5)  # longer than the others take to try
        outcome["released"] = time.time()
        held.release()
    with open(os.path.join(results, str(index)), "w") as handle:
        json.dump(outcome, handle)


@pytest.mark.parametrize("where", ["local", "gcs"])
@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_of_processes_racing_for_one_folder_one_at_a_time_takes_it(where, stale, tmp_path, request, monkeypatch):
    # google-cloud-storage fetches bucket metadata in a background thread after a request; a process forked while
    # such a thread resolves a host name inherits the resolver's lock held, and hangs on its first request
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "1")
    racers = 3
    root = str(tmp_path) if where == "local" else f"{request.getfixturevalue('gcs_bucket')}/race-{stale}"
    run_dir = f"{root}/run_id=race"
    if stale:  # takers race: each judges the crashed run's lock expired and tries to take it over
        _crashed_runs_lock(run_dir, minutes=11)
    elif where == "gcs":
        lock.check(run_dir)  # the GCS client's credential look-up, done once here rather than in every racer
    results = tmp_path / "results"
    results.mkdir()
    context = multiprocessing.get_context("fork")  # the racers start at once, with everything imported
    start = time.time() + 0.8
    processes = [context.Process(target=_racer, args=(run_dir, index, start, str(results))) for index in range(racers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    outcomes = {index: json.loads((results / str(index)).read_text()) for index in range(racers)}
    held = sorted((outcome["answered"], outcome["released"], index) for index, outcome in outcomes.items()
                  if outcome.get("held"))
    # never two holders at once (a racer the machine started late may take the lock after the winner let it go)
    assert held and all(first[1] < second[0] for first, second in zip(held, held[1:])), outcomes
    refused = [outcome["refused"] for outcome in outcomes.values() if "refused" in outcome]
    assert refused, outcomes  # they did race
    for message in refused:  # each was refused naming a racer that held the lock
        assert any(message.startswith(f"{run_dir} is in use by another run (run_id racer-{index}, ")
                   for *_, index in held), outcomes
    assert not storage.files_under(run_dir)  # the winner released it; the crashed run's lock is gone
