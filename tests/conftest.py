import os
import shutil
import socket
import subprocess
import time

import torch

# Without a GPU the kernels run under Triton's interpreter. @triton.jit reads this when it
# decorates, so it must be set before any kvblocks.kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def start_nats_server(port: int, store_dir=None) -> subprocess.Popen:
    """A nats-server on 127.0.0.1:``port``, with JetStream keeping its streams in
    ``store_dir`` when given, once it takes connections (skips without nats-server or
    nats-py)."""
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("nats-server is not installed")
    pytest.importorskip("nats")
    jetstream = [] if store_dir is None else ["-js", "-sd", str(store_dir)]
    server = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port), *jetstream],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"nats-server did not listen on port {port}")


@pytest.fixture
def nats_server():
    """The URL of a NATS server of its own."""
    from tests.helpers import free_port

    port = free_port()
    server = start_nats_server(port)
    yield f"nats://127.0.0.1:{port}"
    server.terminate()
    server.wait()


@pytest.fixture
def nats_jetstream_server(tmp_path):
    """The URL of a NATS server of its own, with JetStream."""
    from tests.helpers import free_port

    port = free_port()
    server = start_nats_server(port, tmp_path / "jetstream")
    yield f"nats://127.0.0.1:{port}"
    server.terminate()
    server.wait()
