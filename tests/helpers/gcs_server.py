"""`python -m tests.helpers.gcs_server PORT BUCKET`: gcp-storage-emulator (in memory) with the two parts of the
GCS JSON API that TensorStore - Orbax's array writer - relies on and the emulator leaves out:

- downloads carry the object's generation in `x-goog-generation` (TensorStore reads it from there and sends it
  back as the precondition of its next write of that object: an OCDBT manifest is rewritten at every commit);
- uploads honour `ifGenerationMatch` (412 Precondition Failed when the live object's generation differs; 0:
  the object must not exist), so a lost race is an error as on GCS, not a silent overwrite.

Everything else is the emulator's own behaviour.
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert = objects.download, objects.insert


def _generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def download(request, response, storage, *args, **kwargs):
    gen = _generation(storage, request.params["bucket_name"], request.params["object_id"])
    if gen != "0":
        response["x-goog-generation"] = gen
    return _download(request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
    want = request.query.get("ifGenerationMatch")
    name = request.query.get("name")
    if want and name:
        if _generation(storage, request.params["bucket_name"], name[0]) != want[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
    return _insert(request, response, storage, *args, **kwargs)


# the server's routing table takes the handlers when its module is imported: patch first
objects.download, objects.insert = download, insert

from gcp_storage_emulator.server import create_server  # noqa: E402


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.run()


if __name__ == "__main__":
    main()
