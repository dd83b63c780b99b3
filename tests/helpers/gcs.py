"""A local Google Cloud Storage for tests: `gcp-storage-emulator` (in memory, with the generation headers and
preconditions TensorStore needs: tests/helpers/gcs_server.py) on a free port.

`emulator()` starts it with one bucket and returns the environment that points both clients of a run at it:
gcsfs (what `etils.epath` uses for `gs://`) reads `STORAGE_EMULATOR_HOST`, TensorStore (what Orbax writes
arrays with) `TENSORSTORE_GCS_HTTP_URL`; `GOOGLE_AUTH_TOKEN_FOR_TESTING` keeps TensorStore from looking for
credentials; `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` stops gcsfs asking the storage-control gRPC API (which
the emulator lacks) for each bucket's layout, a slow failure on every call. `filesystem(env)` is an independent
gcsfs client for the test to look at what the run wrote.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

from launch.local_cluster import free_port

BUCKET = "bkt"


@contextlib.contextmanager
def emulator() -> Iterator[dict[str, str]]:
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.gcs_server", str(port), BUCKET], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert proc.poll() is None, "gcp-storage-emulator exited at start"
            assert time.time() - t0 < 30, "gcp-storage-emulator did not listen within 30 s"
            time.sleep(0.1)
        yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def filesystem(env: dict[str, str]):
    from gcsfs.core import GCSFileSystem  # the plain client (no bucket-layout lookups), whatever the environment

    return GCSFileSystem(endpoint_url=env["STORAGE_EMULATOR_HOST"], token="anon", skip_instance_cache=True)
