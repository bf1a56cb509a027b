"""Progress of a running audit: a log line every few seconds, per worker process.

The steps that account for records (read errors, decode errors, explained
records, explain errors) report them to the :class:`Progress` of their run in
their own process; while a run goes, a daemon thread logs one line every
``interval`` seconds with the records done so far, the rate and, when the
total is known, the ETA::

    Progress: 1,200 of 5,000 records done (1,180 explained, 20 errors), 24.5 records/s, ETA 2 min 35 s

On the local runners every step runs in the launcher's process, so the line
covers the whole run. On Dataflow each worker logs its own share, and the run's
totals are Beam metrics in the ``smoothgrad_audit`` namespace
(``records_read``, ``records_explained``, ``errors_*``, ``records_expected``),
which the Dataflow UI shows while the job runs.

The total comes from the launcher, which counts the records of local input
files by walking their headers (:func:`transforms.read.records.count_records`); for
remote or compressed inputs it is unknown and the line has no ETA.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.support.errors import NAMESPACE

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProgressSettings:
    """What the steps need to report progress.

    Attributes:
        run: the run's name (its output folder): progress is kept per run.
        interval: seconds between two log lines; 0 turns the lines off.
        expected: the number of input records when the launcher could count them, else None.
    """

    run: str
    interval: float = 10.0
    expected: int | None = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Progress:
    """The records one process has accounted for in one run, and the thread that logs them.

    Get it with :meth:`of`; steps call :meth:`start` when set up, :meth:`add`
    per record and :meth:`stop` when torn down (the thread ends with the last
    user, or with the process).

    Example:
        >>> progress = Progress.of(ProgressSettings("run-a", interval=10, expected=100))
        >>> progress.add("explained", 40)
        >>> progress.line(elapsed=20.0)
        'Progress: 40 of 100 records done (40 explained, 0 errors), 2.0 records/s, ETA 30 s'
    """

    _runs: dict[str, "Progress"] = {}
    _runs_lock = threading.Lock()

    def __init__(self, settings: ProgressSettings):
        self.settings = settings
        self.explained = 0
        self.reused = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._users = 0
        self._started: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, settings: ProgressSettings) -> "Progress":
        """The progress of ``settings.run`` in this process (made on first use)."""
        with cls._runs_lock:
            if settings.run not in cls._runs:
                cls._runs[settings.run] = cls(settings)
            return cls._runs[settings.run]

    @classmethod
    def finish(cls, run: str) -> "Progress | None":
        """Stops and forgets the progress of ``run`` in this process; returns it (None if it never started)."""
        with cls._runs_lock:
            progress = cls._runs.pop(run, None)
        if progress is not None:
            progress._stop.set()
        return progress

    def start(self) -> None:
        """A step starts using this progress: the clock and the log thread start with the first one."""
        with self._lock:
            self._users += 1
            if self._started is None:
                self._started = time.monotonic()
            if self._thread is None and self.settings.interval > 0:
                self._thread = threading.Thread(target=self._log_every_interval, daemon=True,
                                                name=f"progress-{self.settings.run}")
                self._thread.start()

    def stop(self) -> None:
        """A step is done with this progress; the thread stops with the last one."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                self._stop.set()

    def add(self, kind: str, count: int = 1) -> None:
        """Counts ``count`` records as ``explained``, ``reused`` (from a baseline) or ``error`` (at any stage)."""
        with self._lock:
            if kind == "explained":
                self.explained += count
            elif kind == "reused":
                self.reused += count
            else:
                self.errors += count

    def line(self, elapsed: float | None = None) -> str:
        """The progress line now (``elapsed`` seconds since the start; measured when None)."""
        with self._lock:
            explained, reused, errors = self.explained, self.reused, self.errors
            started = self._started
        if elapsed is None:
            elapsed = time.monotonic() - started if started is not None else 0.0
        done = explained + reused + errors
        rate = done / elapsed if elapsed > 0 else 0.0
        expected = self.settings.expected
        parts = f"({explained:,} explained, " + (f"{reused:,} reused, " if reused else "") + f"{errors:,} errors)"
        if expected and done >= expected:
            return (f"Progress: all {done:,} records done {parts} in "
                    f"{_duration(elapsed)}, {rate:.1f} records/s; finishing the corpus")
        text = f"Progress: {done:,}" + (f" of {expected:,}" if expected else "")
        text += f" records done {parts}, {rate:.1f} records/s"
        if expected and rate > 0 and done < expected:
            text += f", ETA {_duration((expected - done) / rate)}"
        return text

    def _log_every_interval(self) -> None:
        while not self._stop.wait(self.settings.interval):
            line = self.line()
            logger.info(line)
            if line.startswith("Progress: all"):  # said once; the rest is writing
                return


class CountProgress:
    """A step's handle on its run's progress: start on setup, count per record, stop on teardown.

    Steps (DoFns) hold one and call it from their own ``setup``, ``process``
    and ``teardown``; it pickles with the step (the :class:`Progress` itself is
    looked up in the worker's process).

    Args:
        settings: the run's progress settings, or None to count nothing.
    """

    def __init__(self, settings: ProgressSettings | None):
        self.settings = settings
        self._progress: Progress | None = None

    def setup(self) -> None:
        """Starts this process's progress of the run (and its log thread)."""
        if self.settings is not None:
            self._progress = Progress.of(self.settings)
            self._progress.start()

    def publish_expected(self) -> None:
        """Sets the ``records_expected`` gauge (a Beam metric) when the total is known; call it per bundle."""
        if self.settings is not None and self.settings.expected is not None:
            Metrics.gauge(NAMESPACE, "records_expected").set(self.settings.expected)

    def add(self, kind: str, count: int = 1) -> None:
        """Counts records (see :meth:`Progress.add`)."""
        if self._progress is not None:
            self._progress.add(kind, count)

    def teardown(self) -> None:
        """Releases the progress; its thread stops with the last user."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class ReportProgress(beam.DoFn):
    """A sink step that counts each element as one record of ``kind`` (e.g. the error rows of every stage).

    Args:
        settings: the run's progress settings.
        kind: ``explained``, ``reused`` or ``error``.
    """

    def __init__(self, settings: ProgressSettings, kind: str = "error"):
        self.counter = CountProgress(settings)
        self.kind = kind

    def setup(self):
        """Starts the run's progress in this process."""
        self.counter.setup()

    def process(self, element):
        """Counts the element; yields nothing."""
        self.counter.add(self.kind)
        return ()

    def teardown(self):
        """Releases the run's progress."""
        self.counter.teardown()
