"""The gRPC policy server: round trip, concurrent clients, bad requests answered with
INVALID_ARGUMENT / NOT_FOUND while the server keeps serving, one log line per client, streaming,
``flowrl serve`` end to end."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")

import flowrl.deploy  # noqa: E402
from flowrl.deploy import server as server_mod  # noqa: E402
from flowrl.deploy.server import PolicyClient, PolicyServer, protos, to_tensor  # noqa: E402
from flowrl.errors import FlowrlError  # noqa: E402

from tests.test_deploy import make_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two eager policies (history 2 and 1) behind one server on a free loopback port."""
    root = tmp_path_factory.mktemp("serve")
    policies = {"reach": flowrl.deploy.load(make_checkpoint(root / "a", "reflow", obs_history=2)),
                "short": flowrl.deploy.load(make_checkpoint(root / "b", "shortcut", obs_history=1, seed=1))}
    server = PolicyServer(policies, port=0).start()
    yield server, policies
    server.stop()


def test_round_trip_equals_local_inference(served) -> None:
    server, policies = served
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(3, 2, 4)).astype(np.float32)
    noise = rng.normal(size=(3, 4, 2)).astype(np.float32)
    for raw in (True, False):
        with PolicyClient(server.address, policy="reach", raw=raw) as client:
            assert client.health() == "SERVING"
            got = client.act(obs, noise)
            np.testing.assert_array_equal(got, policies["reach"].infer(obs, noise))
    with PolicyClient(server.address) as client:  # empty name: the default (first) policy
        info = client.info()
        assert (info["name"], info["obs_history"], info["horizon"], info["act_steps"]) == ("reach", 2, 4, 3)
        assert info["action_low"] == [-1.0, -0.5]
        assert client.act(obs).shape == (3, 4, 2)  # noise drawn by the server
    with PolicyClient(server.address, policy="short") as client:
        o = obs[:, 1]  # history of one: (batch, obs_dim) is accepted
        np.testing.assert_array_equal(client.act(o, noise), policies["short"].infer(o[:, None], noise))


def test_streaming(served) -> None:
    server, policies = served
    rng = np.random.default_rng(1)
    obs = [rng.normal(size=(1, 2, 4)).astype(np.float32) for _ in range(5)]
    noise = [rng.normal(size=(1, 4, 2)).astype(np.float32) for _ in range(5)]
    with PolicyClient(server.address, policy="reach") as client:
        replies = list(client.stream(client.request(o, n) for o, n in zip(obs, noise)))
    assert len(replies) == 5
    for o, n, r in zip(obs, noise, replies):
        np.testing.assert_array_equal(r, policies["reach"].infer(o, n))


def test_concurrent_clients(served) -> None:
    server, policies = served
    errors: list[BaseException] = []

    def client_thread(i: int) -> None:
        try:
            rng = np.random.default_rng(100 + i)
            with PolicyClient(server.address, policy="reach") as client:
                for _ in range(15):
                    obs = rng.normal(size=(2, 2, 4)).astype(np.float32)
                    noise = rng.normal(size=(2, 4, 2)).astype(np.float32)
                    np.testing.assert_array_equal(client.act(obs, noise), policies["reach"].infer(obs, noise))
        except BaseException as e:  # noqa: BLE001 (collected for the main thread)
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(served) -> None:
    server, _ = served
    pb2, services = protos()
    channel = grpc.insecure_channel(server.address)
    stub = services.PolicyServiceStub(channel)
    good = np.zeros((1, 2, 4), np.float32)
    bad = [
        (pb2.ActRequest(policy="nope", obs=to_tensor(good)), grpc.StatusCode.NOT_FOUND, "unknown policy 'nope'"),
        (pb2.ActRequest(obs=to_tensor(np.zeros((1, 3, 4)))), grpc.StatusCode.INVALID_ARGUMENT, "obs must be (batch, 2, 4)"),
        (pb2.ActRequest(obs=to_tensor(np.full((1, 2, 4), np.nan))), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (pb2.ActRequest(obs=pb2.Tensor(shape=[1, 2, 4], data=[0.0] * 5)), grpc.StatusCode.INVALID_ARGUMENT, "5 values"),
        (pb2.ActRequest(obs=pb2.Tensor(shape=[1, 2, 4], raw=b"abc")), grpc.StatusCode.INVALID_ARGUMENT, "raw bytes"),
        (pb2.ActRequest(obs=pb2.Tensor(shape=[])), grpc.StatusCode.INVALID_ARGUMENT, "shape must be non-empty"),
        (pb2.ActRequest(obs=to_tensor(good), noise=to_tensor(np.zeros((1, 4, 3)))), grpc.StatusCode.INVALID_ARGUMENT,
         "noise must be (1, 4, 2)"),
    ]
    for request, code, fragment in bad:
        with pytest.raises(grpc.RpcError) as info:
            stub.Act(request, timeout=5)
        assert info.value.code() == code and fragment in info.value.details()
        assert stub.Act(pb2.ActRequest(obs=to_tensor(good)), timeout=5).actions.shape == [1, 4, 2]  # still serving
    with pytest.raises(grpc.RpcError) as info:
        stub.Info(pb2.InfoRequest(policy="nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # a bad request inside a stream ends that stream with the error
    stream = stub.StreamAct(iter([pb2.ActRequest(obs=to_tensor(good)), pb2.ActRequest(obs=to_tensor(good[:, :1]))]),
                            timeout=5)
    assert next(stream).actions.shape == [1, 4, 2]
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    with PolicyClient(server.address, policy="nope") as client, pytest.raises(FlowrlError, match="^NOT_FOUND: "):
        client.act(good)


def test_one_log_line_per_client(served, caplog) -> None:
    server, _ = served
    with caplog.at_level(logging.INFO, logger="flowrl.deploy.server"):
        clients = [PolicyClient(server.address) for _ in range(2)]
        for client in clients:
            for _ in range(3):
                client.act(np.zeros((1, 2, 4), np.float32))
            client.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "flowrl.deploy.server"]
    assert len(lines) == 2 and all(line.startswith("client ") and "first request Act" in line for line in lines)


def test_missing_grpc_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setattr(server_mod, "_modules", None)
    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(FlowrlError, match=r"grpcio is not installed.*deploy extra"):
        protos()


def test_cli_serve(tmp_path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "reflow", obs_history=1)
    proc = subprocess.Popen([sys.executable, "-m", "flowrl", "serve", str(ckpt), "--port", "0", "--name", "p"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 'p' (eager, K=4"), line + proc.stderr.read() if proc.poll() else line
        address = line.rsplit(" on ", 1)[1].strip()
        with PolicyClient(address, policy="p") as client:
            assert client.act(np.zeros((2, 4), np.float32)).shape == (2, 4, 2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "flowrl", "serve", str(tmp_path / "missing")], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("flowrl: error: policy not found")
