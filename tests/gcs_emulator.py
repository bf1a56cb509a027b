"""``gcp-storage-emulator`` with GCS's generation preconditions, which the emulator ignores.

GCS fails a request that carries ``ifGenerationMatch=G`` with 412 when the
object's generation is not G (0: when the object exists). The run lock
(:mod:`pipelines.run.lock`) relies on that for its exclusive create, its
heartbeat and its conditional delete, so the tests run the emulator with its
object handlers wrapped to honour the precondition on uploads, reads and
deletes. The emulator serves one request at a time, so a check and the write
after it cannot interleave with another request. Run as the emulator itself::

    python -m tests.gcs_emulator start --host localhost --port 9023 --in-memory --default-bucket BUCKET
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _object_name(request) -> str | None:
    params = request.params or {}
    if params.get("object_id"):
        return params["object_id"]
    if request.query.get("name"):
        return request.query["name"][0]
    data = request.data  # an upload names its object in its metadata (reading it also drains the body)
    if isinstance(data, dict):
        return (data.get("meta") or {}).get("name") or data.get("name")
    return None


def with_preconditions(handler):
    """``handler`` answering 412 when ``ifGenerationMatch`` does not hold, as GCS does."""

    def checked(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if wanted and "upload_id" not in request.query:  # a resumable upload is checked when it starts
            bucket, name = (request.params or {}).get("bucket_name"), _object_name(request)
            try:
                current = str(storage.get_file_obj(bucket, name)["generation"])
            except NotFound:
                current = "0"
            if current != wanted[0]:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                         "specified did not hold.", "errors": [{"reason": "conditionNotMet"}]}})
                return None
        return handler(request, response, storage, *args, **kwargs)

    return checked


def install() -> None:
    """Wraps the emulator's object upload, read, download and delete handlers (idempotent)."""
    if getattr(objects, "_preconditions_installed", False):
        return
    wrapped = {handler: with_preconditions(handler)
               for handler in (objects.insert, objects.get, objects.download, objects.delete)}
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler in wrapped:
                methods[method] = wrapped[handler]
    objects.insert = wrapped[objects.insert]  # the router's fallback for uploads posted without /upload
    objects._preconditions_installed = True


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
