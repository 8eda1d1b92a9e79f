"""The C++ client of the policy server (flowrl/deploy/cpp_client), built with CMake against the system's
gRPC and protobuf and run against a Python server: the same action chunk as local inference, bit for bit;
unary and streaming round trips; two clients at once; error replies (unknown policy, NaN) with exit code 3
while the server keeps serving. Slow (the build takes about a minute); skipped without the toolchain."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")

import flowrl.deploy  # noqa: E402
from flowrl.deploy.server import PolicyClient  # noqa: E402

from tests.test_deploy_server import served  # noqa: E402,F401  (two policies behind one server: a fixture)

SOURCE = Path(flowrl.deploy.__file__).parent / "cpp_client"


def _toolchain_missing() -> str:
    for tool in ("cmake", "c++", "pkg-config", "protoc", "grpc_cpp_plugin"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        return "pkg-config finds no grpc++/protobuf (libgrpc++-dev, libprotobuf-dev)"
    return ""


@pytest.fixture(scope="module")
def client_binary(tmp_path_factory) -> Path:
    missing = _toolchain_missing()
    if missing:
        pytest.skip(f"C++ client not built: {missing}")
    build = tmp_path_factory.mktemp("cpp_client")
    subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    return build / "flowrl_client"


def _run(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)


def test_cpp_client_gets_the_local_chunk_bit_for_bit(client_binary, served, tmp_path) -> None:
    server, policies = served
    rng = np.random.default_rng(0)
    for name, history in (("reach", 2), ("short", 1)):
        obs = rng.normal(size=(3, history, 4)).astype("<f4")
        noise = rng.normal(size=(3, 4, 2)).astype("<f4")
        obs.tofile(tmp_path / "obs.bin")
        noise.tofile(tmp_path / "noise.bin")
        out = _run(client_binary, "--address", server.address, "--policy", name, "--batch", "3",
                   "--obs", str(tmp_path / "obs.bin"), "--noise", str(tmp_path / "noise.bin"),
                   "--out", str(tmp_path / "actions.bin"))
        assert out.returncode == 0, out.stderr
        assert "health SERVING" in out.stdout
        assert f"policy {name} task PointReach" in out.stdout and f"obs_history {history} obs_dim 4" in out.stdout
        got = np.fromfile(tmp_path / "actions.bin", dtype="<f4").reshape(3, 4, 2)
        np.testing.assert_array_equal(got, policies[name].infer(obs, noise))


def test_cpp_client_unary_and_streaming_round_trips_and_two_clients_at_once(client_binary, served) -> None:
    server, _ = served
    results: dict[str, subprocess.CompletedProcess] = {}

    def go(key: str, *extra: str) -> None:
        results[key] = _run(client_binary, "--address", server.address, "--requests", "50", *extra)

    threads = [threading.Thread(target=go, args=("unary",)), threading.Thread(target=go, args=("stream", "--stream"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, out in results.items():
        assert out.returncode == 0, out.stderr
        line = next(s for s in out.stdout.splitlines() if s.startswith("round trip"))
        assert f"({key}, 50 requests)" in line
        p50, p99 = float(line.split("p50 ")[1].split(" ms")[0]), float(line.split("p99 ")[1].split(" ms")[0])
        assert 0 < p50 <= p99


def test_cpp_client_error_replies_and_the_server_keeps_serving(client_binary, served, tmp_path) -> None:
    server, policies = served
    out = _run(client_binary, "--address", server.address, "--policy", "nope")
    assert out.returncode == 3 and "unknown policy 'nope'" in out.stderr
    obs = np.full((1, 2, 4), np.nan, dtype="<f4")
    obs.tofile(tmp_path / "nan.bin")
    out = _run(client_binary, "--address", server.address, "--obs", str(tmp_path / "nan.bin"))
    assert out.returncode == 3 and "obs contains NaN" in out.stderr
    (tmp_path / "short.bin").write_bytes(b"\0" * 12)
    out = _run(client_binary, "--address", server.address, "--obs", str(tmp_path / "short.bin"))
    assert out.returncode == 2 and "holds 12 bytes, expected 32" in out.stderr
    out = _run(client_binary, "--address", server.address, "--bogus")
    assert out.returncode == 2 and "unknown argument --bogus" in out.stderr
    out = _run(client_binary, "--help")
    assert out.returncode == 0 and out.stdout.count("usage: flowrl_client --address HOST:PORT") == 1
    out = _run(client_binary, "--address", "127.0.0.1:1", "--timeout-ms", "500")
    assert out.returncode == 3 and "server error 14" in out.stderr  # UNAVAILABLE: nothing listens there
    with PolicyClient(server.address, policy="reach") as client:
        obs = np.zeros((1, 2, 4), dtype=np.float32)
        noise = np.zeros((1, 4, 2), dtype=np.float32)
        np.testing.assert_array_equal(client.act(obs, noise), policies["reach"].infer(obs, noise))
