"""Files through one layer, Beam's ``FileSystems``, for local paths and object stores alike.

An object store (``gs://``) is not a disk, and the code assumes only what both
offer:

* **No real folders.** A "folder" is a name prefix: it exists while an object
  under it exists, ``FileSystems.exists(folder)`` is False on GCS even then, and
  deleting the folder's name deletes nothing. So folders are listed
  (:func:`files_under`) and emptied object by object (:func:`clear_folder`).
* **Rename is copy + delete**, atomic per object, not per folder. The manifest
  is written to a temporary name and renamed last, so a reader sees either no
  manifest or a complete one, and only after every shard exists.
* **Listing is strongly consistent** on GCS (a written object is listed at once);
  nothing here relies on more than that.

Model files are read through the same layer (copied to a local temporary file
for Keras), so a model on ``gs://`` works wherever the data does.

A part of a file is read with one ranged request (:func:`open_range`): Beam's
``gs://`` reader otherwise fetches at least 16 MiB from where it is asked to
read, which for a chunk of small records is many times the chunk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_BLOCK = 1 << 20


def is_remote(path: str) -> bool:
    """Whether ``path`` names an object store (``gs://...``, ``s3://...``) rather than a local file."""
    return "://" in path


def files_under(folder: str) -> list[str]:
    """Every file below ``folder`` (recursively), sorted; [] when there is none.

    Example:
        >>> files_under("gs://bucket/out/run_id=a")
        ['gs://bucket/out/run_id=a/_MANIFEST.json', 'gs://bucket/out/run_id=a/errors-00000-of-00001.parquet', ...]
    """
    pattern = FileSystems.join(folder.rstrip("/"), "**")
    return sorted(metadata.path for metadata in FileSystems.match([pattern])[0].metadata_list)


def exists(path: str) -> bool:
    """Whether ``path`` is a file, or a folder (on an object store: a prefix) holding at least one file."""
    return FileSystems.exists(path) or bool(files_under(path))


def read_yaml(path: str, flag: str):
    """The YAML document of a file (local or ``gs://``); a ``ValueError`` of one line naming ``flag`` otherwise."""
    import yaml

    try:
        with FileSystems.open(path) as handle:
            return yaml.safe_load(handle.read().decode("utf-8"))
    except (OSError, IOError) as error:
        raise ValueError(f"{flag}: cannot read {path!r} ({type(error).__name__}: {error}).") from None
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{flag}: {path!r} is not valid YAML ({first}).") from None


def replace(path: str, data: bytes) -> str:
    """Writes ``data`` to ``path`` so that a reader sees the old file or the new one, never none or a part.

    On an object store a written object replaces the old one atomically when
    the upload completes; locally the bytes go to a temporary file in the same
    folder, then ``os.replace``.
    """
    if is_remote(path):
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def clear_folder(folder: str, keep: tuple[str, ...] = ()) -> int:
    """Deletes every file below ``folder`` but the names in ``keep``; returns how many files went.

    ``keep`` holds names directly in ``folder`` (e.g. the run's lock, ``_LOCK.json``). On an
    object store the folder's own name is not an object: each file is deleted by name, so no
    stale shard can survive. Locally the emptied sub-folders go too, and the folder itself when
    nothing is kept.
    """
    root = folder.rstrip("/")
    kept = {FileSystems.join(root, name) for name in keep}
    files = [path for path in files_under(folder) if path not in kept]
    if is_remote(folder):
        if files:
            FileSystems.delete(files)
    elif os.path.isdir(folder) and not keep:
        shutil.rmtree(folder)
    elif os.path.isdir(folder):
        kept = {os.path.join(folder, name) for name in keep}
        for parent, folders, names in os.walk(folder, topdown=False):
            for name in names:
                if os.path.join(parent, name) not in kept:
                    os.unlink(os.path.join(parent, name))
            for name in folders:
                path = os.path.join(parent, name)
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)
    return len(files)


def open_range(path: str, offset: int, length: int | None = None):
    """An uncompressed file opened through Beam's filesystems, positioned at ``offset``, to read ``length`` bytes.

    The caller may read past ``length``; it is a hint of how much to fetch. On
    ``gs://`` Beam's reader (google-cloud-storage's ``BlobReader``) fetches
    ``max(wanted, 16 MiB)`` bytes per request; its fetch size is set to
    ``length`` here, so a chunk costs one request of its own bytes. The setting
    is private to that reader: a reader without it keeps its default fetch size
    (correct, only more bytes fetched); ``tests/test_gcs.py`` checks the request
    sizes. A local file is an ordinary buffered file.

    Example:
        >>> with open_range("gs://bucket/train-0.tfrecord", 8_192_000, 780_000) as handle:
        ...     header = handle.read(12)   # one request for bytes 8,192,000 to 8,972,000
    """
    handle = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    try:
        if length and isinstance(getattr(handle, "_chunk_size", None), int):
            handle._chunk_size = max(int(length), 1)
        handle.seek(offset)
    except BaseException:
        handle.close()
        raise
    return handle


def copy_to_local(path: str) -> str:
    """A local path holding ``path``'s bytes: ``path`` itself when local, else a temporary copy (file or folder)."""
    if not is_remote(path):
        return path
    target = os.path.join(tempfile.mkdtemp(prefix="smoothgrad-"), os.path.basename(path.rstrip("/")))
    if FileSystems.exists(path):
        _copy_file(path, target)
        return target
    prefix = path.rstrip("/") + "/"
    for remote in files_under(path):
        _copy_file(remote, os.path.join(target, remote[len(prefix):]))
    return target


def _copy_file(source: str, target: str) -> None:
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as reader, \
            open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, _BLOCK)


def sha256(path: str) -> str | None:
    """SHA-256 of a file, or of a folder's files (each file's name relative to the folder, then its bytes,
    in sorted order); None when nothing is there."""
    digest = hashlib.sha256()
    if FileSystems.exists(path) and not (not is_remote(path) and os.path.isdir(path)):
        _hash_file(path, digest)
        return digest.hexdigest()
    files = files_under(path)
    if not files:
        return None
    root = path.rstrip("/")
    for name in files:
        digest.update(name[len(root):].encode())
        _hash_file(name, digest)
    return digest.hexdigest()


def _hash_file(path: str, digest) -> None:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
