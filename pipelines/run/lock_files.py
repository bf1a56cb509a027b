"""Where a run folder's lock lives: a local file or a ``gs://`` object, changed only by atomic, conditional steps.

Both stores offer the same five steps to :mod:`pipelines.run.lock`:

* ``create(data)``: an exclusive create; the new lock's version, or None when a lock exists;
* ``read()``: ``(fields or None when unreadable, version, last written in Unix seconds)``, or None;
* ``rewrite(version, data)``: the holder's heartbeat; the new version, or None when the lock is no longer that version;
* ``remove(version)``: deletes the lock only while it is still that version; whether it did;
* ``close()``.

A version names one lock and never another: locally ``(device, inode, token)``
(an inode number is reused once its file is gone, the token written in the
lock is not), on ``gs://`` the object's generation.
"""

from __future__ import annotations

import json
import os
import time
import uuid

#: A local removal marker older than this was left by a remover that died (a removal takes milliseconds).
MARKER_SECONDS = 30.0


def _fields(data: bytes) -> dict | None:
    try:
        fields = json.loads(data.decode("utf-8"))
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


class LocalLock:
    """The lock as a local file, created with ``O_CREAT | O_EXCL``; its holder keeps it open, rewrites it in place."""

    def __init__(self, path: str):
        self.path = path
        self.fd = None

    def create(self, data: bytes):
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        os.write(fd, data)
        self.fd = fd
        stat = os.fstat(fd)
        return stat.st_dev, stat.st_ino, (_fields(data) or {}).get("token")

    def _look(self):
        """(fields, version, mtime) of the file there now, or None."""
        try:
            with open(self.path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                data = handle.read()
        except FileNotFoundError:
            return None
        fields = _fields(data)
        return fields, (stat.st_dev, stat.st_ino, (fields or {}).get("token")), stat.st_mtime

    def read(self):
        for attempt in range(5):  # a lock is empty between its exclusive create and its first write
            found = self._look()
            if found is None or found[0] is not None:
                return found
            time.sleep(0.05 * (attempt + 1))
        return found

    def _version(self):
        found = self._look()
        return found and found[1]

    def rewrite(self, version, data: bytes):
        """Writes the holder's file in place, through its descriptor: never into another run's lock."""
        if self.fd is None or self._version() != version:
            return None
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))
        return version

    def remove(self, version) -> bool:
        """Deletes the lock only if it is still ``version``.

        Removers (a taker, the holder releasing) take turns through a marker
        beside the lock, created with ``O_EXCL``, so no other removal falls
        between the check and the delete; a run that creates a lock never
        deletes one.
        """
        marker = f"{self.path}.removing"
        for _ in range(20):
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                _drop_stale_marker(marker)
                time.sleep(0.05)
        else:
            return False
        try:
            if self._version() != version:
                return False
            os.unlink(self.path)
            return True
        finally:
            os.close(fd)
            os.unlink(marker)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _drop_stale_marker(marker: str) -> None:
    """Deletes a removal marker older than ``MARKER_SECONDS``: its remover died between creating and deleting it.

    It is moved aside atomically, then checked to be the old one (else linked back), so a fresh marker stays.
    """
    try:
        stat = os.stat(marker)
    except FileNotFoundError:
        return
    if time.time() - stat.st_mtime < MARKER_SECONDS:
        return
    aside = f"{marker}.{uuid.uuid4().hex}.stale"
    try:
        os.rename(marker, aside)
    except FileNotFoundError:
        return
    if os.stat(aside).st_ino != stat.st_ino:
        try:
            os.link(aside, marker)
        except FileExistsError:
            pass
    os.unlink(aside)


class GcsLock:
    """The lock as a ``gs://`` object: every change is conditional on its generation (``ifGenerationMatch``).

    The client is Beam's (:class:`apache_beam.io.gcp.gcsio.GcsIO`), with the run's pipeline options, so it
    uses the credentials the run's file access uses.
    """

    def __init__(self, path: str, beam_args=()):
        from apache_beam.io.gcp import gcsio
        from apache_beam.options.pipeline_options import PipelineOptions
        from google.api_core import exceptions

        bucket, _, self.name = path[len("gs://"):].partition("/")
        self.bucket = gcsio.GcsIO(pipeline_options=PipelineOptions(list(beam_args))).client.bucket(bucket)
        self.lost = (exceptions.PreconditionFailed, exceptions.NotFound)

    def _upload(self, data: bytes, generation):
        if generation is None:  # never an unconditional write
            return None
        blob = self.bucket.blob(self.name)
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
        except self.lost:
            return None
        return blob.generation

    def create(self, data: bytes):
        return self._upload(data, 0)  # generation 0: only if no such object exists

    def read(self):
        for _ in range(5):
            blob = self.bucket.get_blob(self.name)
            if blob is None:
                return None
            generation, updated = blob.generation, blob.updated  # a download may reset them from its headers
            try:
                data = blob.download_as_bytes(if_generation_match=generation)
            except self.lost:  # changed between the two requests: read it again
                continue
            return _fields(data), generation, updated.timestamp() if updated else 0.0
        raise RuntimeError("it kept changing while it was read")

    def rewrite(self, version, data: bytes):
        return self._upload(data, version)

    def remove(self, version) -> bool:
        if version is None:  # never an unconditional delete
            return False
        try:
            self.bucket.blob(self.name).delete(if_generation_match=version)
        except self.lost:
            return False
        return True

    def close(self) -> None:
        pass
