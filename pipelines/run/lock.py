"""The run folder's lock: one run at a time deletes or writes ``OUTPUT/run_id=<RUN_ID>/``.

Schedulers deliver at least once (Cloud Scheduler) or retry (Airflow), so two
runs of one ``run_id`` can start seconds apart. Before a run deletes or writes
anything in its folder it creates ``_LOCK.json`` there, atomically: locally
with an exclusive create (``O_CREAT | O_EXCL``), on ``gs://`` with a create
that fails when the object exists (``ifGenerationMatch=0``). The lock names its
holder (run id, host, process id, start time) and holds a heartbeat time, which
a thread refreshes every ``HEARTBEAT_SECONDS`` while the run goes on; the run
deletes it when it ends, success or failure. The corpus readers, the manifest's
listings and the clean-up of an interrupted run (which keeps it) never see it.

A run that finds a lock judges it by the age of its heartbeat:

* **live** (younger than ``STOPPED_SECONDS``): the run refuses, in one line
  naming the holder, before it has changed anything; ``overwrite`` changes
  nothing here: nothing of a live run is ever deleted;
* **stopped** (no heartbeat for ``STOPPED_SECONDS``: a crashed or killed run):
  refused too, unless ``overwrite``, which takes the lock over at once;
* **expired** (no heartbeat for ``EXPIRY_SECONDS``, 10 minutes): taken over.

Taking over is safe against two (or more) takers: the stale lock is removed
only while it is still the one judged stale (on ``gs://``: a delete with
``ifGenerationMatch`` of its generation; locally: a check of its inode and
token, then the delete, while holding a marker created with ``O_EXCL`` that
removers take in turns), and the new lock is then created exclusively as
above. Of two takers one gets the lock; the other finds it live and refuses.

Heartbeats are compared with the reader's clock, so the machines' clocks must
agree to well within ``STOPPED_SECONDS`` (NTP does). Other object stores
(``s3://`` ...) offer no exclusive create through this code: a run there logs
that it takes no lock.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

from apache_beam.io.filesystems import FileSystems

from pipelines.run import lock_files
from pipelines.run.config import ConfigError
from transforms.support.errors import one_line

logger = logging.getLogger(__name__)

#: The lock's name in the run folder (a leading "_": skipped by Parquet dataset readers, matched by no corpus glob).
LOCK = "_LOCK.json"
#: Seconds between two heartbeats of a running run.
HEARTBEAT_SECONDS = 30.0
#: A lock without a heartbeat for this long belongs to a run that stopped; ``overwrite`` takes it over.
STOPPED_SECONDS = 3 * HEARTBEAT_SECONDS
#: A lock without a heartbeat for this long (10 minutes) has expired: any run takes it over.
EXPIRY_SECONDS = 600.0
#: Tries to create the lock when others keep changing it (each try reads and judges it anew).
_ATTEMPTS = 5


def _now() -> float:
    return time.time()


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def _seconds(text) -> float | None:
    try:
        return datetime.datetime.fromisoformat(str(text)).timestamp()
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _encode(fields: dict) -> bytes:
    return json.dumps(fields, indent=2).encode("utf-8")


class Found:
    """A lock as read: its fields (None when unreadable), its version, when it was last written.

    ``version`` is what a conditional remove checks (see :mod:`pipelines.run.lock_files`).
    """

    def __init__(self, fields: dict | None, version, written: float):
        self.fields, self.version, self.written = fields, version, written

    def heartbeat(self) -> float:
        """The last heartbeat (Unix seconds); for an unreadable lock, when it was last written."""
        beat = _seconds((self.fields or {}).get("heartbeat_at"))
        return self.written if beat is None else beat

    def holder(self, now: float) -> str:
        """Who holds the lock, in words: run id, host, pid, start, last heartbeat and its age."""
        age = _duration(now - self.heartbeat())
        if self.fields is None:
            return f"an unreadable lock, last written {_iso(self.written)} ({age} ago)"
        field = self.fields.get
        return (f"run_id {field('run_id')}, host {field('host')}, pid {field('pid')}, started {field('started_at')}, "
                f"last heartbeat {field('heartbeat_at')} ({age} ago)")


def _store(path: str, beam_args=()):
    """The lock's store for ``path`` (see :mod:`pipelines.run.lock_files`); None where no lock can be made."""
    if path.startswith("gs://"):
        try:
            return lock_files.GcsLock(path, beam_args)
        except ImportError as error:
            raise ConfigError(f"config key 'output': gs:// needs the gcp extra ({one_line(error)}).") from None
    if "://" in path:
        return None
    return lock_files.LocalLock(path)


def _read(store) -> Found | None:
    found = store.read()
    return Found(*found) if found is not None else None


def _refusal(run_dir: str, found: Found, now: float, overwrite: bool) -> str | None:
    """Why a run may not take this lock, in one line; None when it may (stopped and ``overwrite``, or expired)."""
    age = now - found.heartbeat()
    if age < STOPPED_SECONDS:
        return (f"{run_dir} is in use by another run ({found.holder(now)}); nothing was changed. "
                "Wait for it to end, or choose another run_id.")
    if age < EXPIRY_SECONDS and not overwrite:
        return (f"{run_dir} is locked by a run whose heartbeat stopped ({found.holder(now)}); nothing was changed. "
                f"Its lock is taken over {_duration(EXPIRY_SECONDS)} after its last heartbeat, "
                "or now with --overwrite.")
    return None


class RunLock:
    """A lock this process holds on a run folder, and the thread that keeps its heartbeat.

    Get it with :func:`acquire`; :meth:`release` it when the run ends (also on failure).
    """

    def __init__(self, store, path: str, fields: dict, version):
        self.store, self.path, self.fields, self.version = store, path, fields, version
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._beat, args=(HEARTBEAT_SECONDS,), name="run-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.refresh()

    def refresh(self) -> bool:
        """Writes a new heartbeat; False when the lock is no longer this run's (or could not be written now)."""
        with self._mutex:
            if self.version is None:
                return False
            fields = dict(self.fields, heartbeat_at=_iso(_now()))
            try:
                version = self.store.rewrite(self.version, _encode(fields))
            except Exception as error:  # noqa: BLE001 - a network hiccup: the next beat tries again
                if not self._failing:
                    logger.warning("Could not refresh the heartbeat of the lock %s (%s); retrying every %s.",
                                   self.path, one_line(error), _duration(HEARTBEAT_SECONDS))
                self._failing = True
                return False
            self._failing = False
            if version is None:
                logger.error("The lock %s is no longer this run's: another run took it over (no heartbeat for "
                             "too long); this run's files may be deleted by it.", self.path)
                self.version = None
                return False
            self.fields, self.version = fields, version
            return True

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock if it is still this run's. Safe to call twice."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        with self._mutex:
            version, self.version = self.version, None
            if version is None:
                return
            try:
                if not self.store.remove(version):
                    logger.warning("The lock %s was no longer this run's when it ended; left as it is.", self.path)
            except Exception as error:  # noqa: BLE001 - the run is over; the lock expires on its own
                logger.warning("Could not delete the lock %s (%s): another run takes it over %s after this run's "
                               "last heartbeat.", self.path, one_line(error), _duration(EXPIRY_SECONDS))
            finally:
                self.store.close()


def check(run_dir: str, overwrite: bool = False, beam_args=()) -> None:
    """Raises :class:`ConfigError` when a run could not take ``run_dir``'s lock now; changes nothing."""
    path = FileSystems.join(run_dir, LOCK)
    try:
        store = _store(path, beam_args)
        found = _read(store) if store is not None else None
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - no permission, no such bucket, network...
        raise ConfigError(f"cannot read the lock {path}: {one_line(error)}") from None
    refusal = _refusal(run_dir, found, _now(), overwrite) if found is not None else None
    if refusal:
        raise ConfigError(refusal)


def acquire(run_dir: str, run_id: str, overwrite: bool = False, beam_args=()) -> RunLock | None:
    """Takes the lock on ``run_dir`` before anything there is deleted or written; None where no lock can be made.

    Raises:
        ConfigError: (one line) the folder is in use, naming the holder; or the lock cannot be written.
    """
    path = FileSystems.join(run_dir, LOCK)
    try:
        store = _store(path, beam_args)
        if store is None:
            logger.warning("No lock on %s: locks are made on local folders and gs:// only, so two runs of this "
                           "run_id there are not kept apart.", run_dir)
            return None
        started = _iso(_now())
        fields = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": started,
                  "heartbeat_at": started, "token": uuid.uuid4().hex, "heartbeat_seconds": HEARTBEAT_SECONDS,
                  "expires_after_seconds": EXPIRY_SECONDS}
        taken_from = None
        for _ in range(_ATTEMPTS):
            version = store.create(_encode(fields))
            if version is not None:
                if taken_from is not None:
                    logger.warning("Took over the lock of %s from %s (%s).", run_dir, *taken_from)
                return RunLock(store, path, fields, version)
            found = _read(store)
            if found is None:  # released meanwhile
                continue
            if (found.fields or {}).get("token") == fields["token"]:  # a retried create whose first try went through
                return RunLock(store, path, fields, found.version)
            now = _now()
            refusal = _refusal(run_dir, found, now, overwrite)
            if refusal:
                raise ConfigError(refusal)
            if store.remove(found.version):  # still the stale lock: gone; else another taker was first
                expired = now - found.heartbeat() >= EXPIRY_SECONDS
                taken_from = (found.holder(now), f"no heartbeat for over {_duration(EXPIRY_SECONDS)}" if expired
                              else "its heartbeat stopped; --overwrite")
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - no permission, no such bucket, network...
        raise ConfigError(f"cannot take the lock {path}: {one_line(error)}") from None
    raise ConfigError(f"cannot take the lock {path}: other runs kept changing it; try again.")
