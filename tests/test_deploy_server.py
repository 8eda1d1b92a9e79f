"""The gRPC policy server: round trip, concurrent clients, bad requests answered with
INVALID_ARGUMENT / NOT_FOUND while the server keeps serving, one log line per client, streaming,
``flowrl serve`` end to end; and its limits: idle streams that hold no thread, Health and Info answered
while inference is in flight, small requests served before large ones waiting, the batch limit, the
stream limits, malformed shapes and messages, bounded error messages, port checks. The load and fault
study is tests/test_deploy_server_load.py (slow)."""

from __future__ import annotations

import logging
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_tools")

import flowrl.deploy  # noqa: E402
from flowrl.deploy import server as server_mod  # noqa: E402
from flowrl.cli import main  # noqa: E402
from flowrl.deploy.runtime import DeployedPolicy  # noqa: E402
from flowrl.deploy.server import (MAX_DETAILS_CHARS, PolicyClient, PolicyServer, auto_max_batch,  # noqa: E402
                                  check_port, protos, to_tensor)
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


# -- limits ----------------------------------------------------------------------------------------
class GatedBackend:
    """A backend whose calls wait for ``gate`` and record their batch sizes in order: inference held
    in flight for as long as a test needs."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.rows: list[int] = []
        self.started = threading.Semaphore(0)

    def __call__(self, obs: np.ndarray, noise: np.ndarray, images: object = None) -> np.ndarray:
        self.rows.append(obs.shape[0])
        self.started.release()
        assert self.gate.wait(10), "the test never opened the gate"
        return np.zeros_like(noise)


def _open_stream(stub, request) -> tuple[queue.Queue, object]:
    """A StreamAct stream that has been answered once (so the server holds it) and then stays open and
    idle until None is put into its queue."""
    requests: queue.Queue = queue.Queue()
    requests.put(request)
    replies = stub.StreamAct(iter(requests.get, None), timeout=30)
    next(replies)
    return requests, replies


def _ms(call) -> float:
    start = time.perf_counter()
    call()
    return 1e3 * (time.perf_counter() - start)


def test_idle_streams_hold_no_thread_and_health_and_info_answer_at_once(served) -> None:
    server, _ = served
    pb2, services = protos()
    good = pb2.ActRequest(obs=to_tensor(np.zeros((1, 2, 4), np.float32)))
    channels = [grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(3)]
    streams = [_open_stream(services.PolicyServiceStub(ch), good) for ch in channels for _ in range(6)]  # 18 > 8
    try:
        with PolicyClient(server.address, policy="reach") as client:
            health = [_ms(client.health) for _ in range(5)]
            info = [_ms(client.info) for _ in range(5)]
            assert client.act(np.zeros((1, 2, 4), np.float32)).shape == (1, 4, 2)
        assert statistics.median(health) < 50 and statistics.median(info) < 50, (health, info)
        assert max(health + info) < 1000
    finally:
        for requests, _ in streams:
            requests.put(None)
        for ch in channels:
            ch.close()


@pytest.fixture()
def gated(served):
    """A server of one policy whose inference waits for a gate, max batch 64."""
    _, policies = served
    backend = GatedBackend()
    server = PolicyServer({"gated": DeployedPolicy(backend, policies["reach"].meta, "eager")}, port=0,
                          max_batch=64).start()
    server.service.queues["gated"].starvation_s = 60.0  # however slow this machine, nothing counts as starved
    yield server, backend
    backend.gate.set()
    server.stop()


def test_small_requests_go_before_large_ones_waiting_which_are_not_starved(gated) -> None:
    server, backend = gated
    errors: list[BaseException] = []

    def act(rows: int) -> None:
        try:
            with PolicyClient(server.address, timeout=20) as client:
                client.act(np.zeros((rows, 2, 4), np.float32))
        except BaseException as e:  # noqa: BLE001 (collected for the main thread)
            errors.append(e)

    threads = [threading.Thread(target=act, args=(64,))]
    threads[0].start()
    assert backend.started.acquire(timeout=10)  # a large request is being inferred, held at the gate
    for queued, rows in enumerate((64, 1, 1, 1), start=1):  # then, in this order: large, small, small, small
        threads.append(threading.Thread(target=act, args=(rows,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(server.service.queues["gated"]) < queued:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.005)
    with PolicyClient(server.address) as client:  # inference in flight and four requests queued
        assert statistics.median(_ms(client.health) for _ in range(5)) < 50
        assert statistics.median(_ms(client.info) for _ in range(5)) < 50
    backend.gate.set()
    for t in threads:
        t.join(timeout=20)
    assert not errors, errors[0]
    # the small ones go ahead of the large one waiting: they wait for the one in flight only
    assert backend.rows == [64, 1, 1, 1, 64]


def test_the_queue_runs_the_fewest_rows_first_and_a_starved_request_next() -> None:
    """Three large requests then three small ones: the small ones go first, in arrival order, then the large;
    a request that has waited over starvation_s goes next whatever its size (a large one is not starved by
    a stream of small ones), and a request whose client went away is dropped."""
    from concurrent.futures import Future

    from flowrl.deploy.server import InferenceQueue

    queue = InferenceQueue(None, starvation_s=1.0)  # type: ignore[arg-type]  (the policy is not run here)
    for arrival, (rows, at) in enumerate([(64, 0.0), (64, 0.1), (64, 0.2), (1, 0.3), (1, 0.4), (1, 0.5)]):
        queue._waiting[arrival] = (np.zeros((rows, 2, 4), np.float32), None, Future(), at)
    gone = queue._waiting[4][2]
    gone.cancel()
    order = [queue._take(now=0.6)[0].shape[0] for _ in range(2)]
    assert order == [1, 1] and len(queue) == 3  # the cancelled small one was dropped unrun
    assert queue._take(now=1.05)[0].shape[0] == 64  # the oldest large one has waited over 1 s: it goes
    queue._waiting[6] = (np.zeros((1, 2, 4), np.float32), None, Future(), 1.0)
    assert [queue._take(now=1.08)[0].shape[0] for _ in range(2)] == [1, 64]  # no other request starved yet
    assert queue._take(now=1.09)[0].shape[0] == 64 and queue._take(now=1.1) is None


def test_a_batch_over_max_batch_is_refused_before_any_work(gated) -> None:
    server, backend = gated
    with PolicyClient(server.address) as client:
        with pytest.raises(FlowrlError, match=r"^INVALID_ARGUMENT: batch of 65 is more than .*max batch 64"):
            client.act(np.zeros((65, 2, 4), np.float32))
    assert backend.rows == []


def test_auto_max_batch_is_the_largest_power_of_two_within_the_budget(served) -> None:
    _, policies = served

    def slow(obs: np.ndarray, noise: np.ndarray, images: object = None) -> np.ndarray:
        time.sleep(1e-4 * obs.shape[0])  # 0.1 ms a row: 128 rows take 12.8 ms, 256 rows 25.6 ms
        return np.zeros_like(noise)

    policy = DeployedPolicy(slow, policies["reach"].meta, "eager")
    assert auto_max_batch(policy, budget_s=0.025) == 128
    assert auto_max_batch(policy, budget_s=1e-6) == 1  # never less than one row
    assert auto_max_batch(policies["reach"], ceiling=4) == 4  # a fast policy stops at the ceiling


def test_stream_limits_in_all_and_per_client(served) -> None:
    _, policies = served
    pb2, services = protos()
    good = pb2.ActRequest(obs=to_tensor(np.zeros((1, 2, 4), np.float32)))
    with PolicyServer(policies, port=0, max_batch=8, max_streams=3, max_client_streams=2) as server:
        channels = [grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(3)]
        stubs = [services.PolicyServiceStub(ch) for ch in channels]
        held = [_open_stream(stubs[0], good), _open_stream(stubs[0], good)]
        with pytest.raises(grpc.RpcError) as info:
            _open_stream(stubs[0], good)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-client-streams 2" in info.value.details()
        held.append(_open_stream(stubs[1], good))
        with pytest.raises(grpc.RpcError) as info:
            stubs[2].Act(good, timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams 3" in info.value.details()
        assert stubs[2].Health(pb2.HealthRequest(), timeout=5).status == pb2.HealthReply.SERVING  # not limited
        for requests, replies in held:  # closed streams free their places
            requests.put(None)
            assert list(replies) == []
        assert stubs[2].Act(good, timeout=5).actions.shape == [1, 4, 2]
        for ch in channels:
            ch.close()


def test_malformed_requests_get_invalid_argument_naming_the_problem(served) -> None:
    server, _ = served
    pb2, services = protos()
    channel = grpc.insecure_channel(server.address)
    stub = services.PolicyServiceStub(channel)
    good = to_tensor(np.zeros((1, 2, 4), np.float32))
    invalid = [
        (pb2.ActRequest(obs=pb2.Tensor(shape=[2**32, 2**32, 11])), "holds more than"),  # its product overflows int64
        (pb2.ActRequest(obs=pb2.Tensor(shape=[2**62] * 8)), "holds more than"),
        (pb2.ActRequest(obs=pb2.Tensor(shape=[1] * 70)), "70 dimensions"),
        (pb2.ActRequest(obs=pb2.Tensor(shape=[-1, 2, 4])), "sizes must be positive"),
        (pb2.ActRequest(obs=pb2.Tensor(shape=[0, 2, 4])), "sizes must be positive"),
        (pb2.ActRequest(obs=pb2.Tensor(shape=[2, 2, 4], data=[0.0] * 8)), "8 values, shape [2, 2, 4] needs 16"),
        (pb2.ActRequest(obs=pb2.Tensor(shape=[1, 2, 4])), "0 values"),
        (pb2.ActRequest(obs=good, noise=pb2.Tensor(shape=[2**32, 2**32, 11])), "noise: shape"),
        (pb2.ActRequest(obs=good, noise=pb2.Tensor(shape=[1, 4, 2], raw=b"\0" * 3)), "noise: 3 raw bytes"),
        (pb2.ActRequest(obs=good, noise=to_tensor(np.full((1, 4, 2), np.inf))), "noise contains NaN or infinity"),
    ]
    for request, fragment in invalid:
        with pytest.raises(grpc.RpcError) as info:
            stub.Act(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (fragment, info.value.details())
        assert fragment in info.value.details()
    for method in ("Act", "Info", "Health"):  # bytes that are no protobuf message
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"/flowrl.deploy.v1.PolicyService/{method}")(b"\xff\xff garbage", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in info.value.details()
    long_name = "x" * 200_000  # echoed whole, it would overflow gRPC's header limit (RESOURCE_EXHAUSTED)
    for call in (lambda: stub.Act(pb2.ActRequest(policy=long_name, obs=good), timeout=5),
                 lambda: stub.Info(pb2.InfoRequest(policy=long_name), timeout=5)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and info.value.details().startswith("unknown policy 'xxx")
        assert len(info.value.details()) <= MAX_DETAILS_CHARS
    assert stub.Act(pb2.ActRequest(obs=good), timeout=5).actions.shape == [1, 4, 2]  # still serving
    channel.close()


def test_ports_out_of_range_and_in_use_are_one_line_errors(tmp_path, capsys) -> None:
    for port in (-1, 65536, 70000):
        with pytest.raises(FlowrlError, match=rf"^--port {port}: not a TCP port \(1-65535, or 0"):
            check_port("127.0.0.1", port)
    ckpt = make_checkpoint(tmp_path / "ckpt", "reflow", obs_history=1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(ckpt), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flowrl: error: cannot listen on 127.0.0.1:{port}: the port is in use") and err.count("\n") == 1
    assert main(["serve", str(ckpt), "--port", "0", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "flowrl: error: --max-batch must be at least 1, got 0\n"


STREAMING_CLIENT = """
import queue, sys
import numpy as np
from flowrl.deploy.server import PolicyClient
client = PolicyClient(sys.argv[1], policy="reach")
requests = queue.Queue()
requests.put(client.request(np.zeros((1, 2, 4), np.float32)))
replies = client.stream(iter(requests.get, None))  # kept: a stream whose iterator is collected is cancelled
next(replies)
print("streaming", flush=True)
sys.stdin.read()  # the stream stays open until the process is killed
"""


def test_a_killed_client_frees_its_stream(served) -> None:
    _, policies = served
    with PolicyServer(policies, port=0, max_batch=8) as server:
        proc = subprocess.Popen([sys.executable, "-c", STREAMING_CLIENT, server.address], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "streaming\n"
            assert server.service.in_progress == 1
        finally:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 5
        while server.service.in_progress:
            assert time.monotonic() < deadline, "the killed client's stream was never freed"
            time.sleep(0.01)


def test_a_failing_policy_is_an_internal_error_reply_and_the_server_keeps_serving(served, caplog) -> None:
    _, policies = served
    failures = iter([RuntimeError("the backend broke\nsecond line"), FlowrlError("a model file went missing"), None])

    def flaky(obs: np.ndarray, noise: np.ndarray, images: object = None) -> np.ndarray:
        failure = next(failures)
        if failure is not None:
            raise failure
        return np.zeros_like(noise)

    with PolicyServer({"flaky": DeployedPolicy(flaky, policies["reach"].meta, "eager")}, port=0,
                      max_batch=8) as server, PolicyClient(server.address) as client:
        with caplog.at_level(logging.ERROR, logger="flowrl.deploy.server"), \
                pytest.raises(FlowrlError, match=r"^INTERNAL: inference failed \(RuntimeError: the backend broke\)$"):
            client.act(np.zeros((1, 2, 4), np.float32))
        # a FlowrlError raised by the policy itself is still the server's fault, not the request's
        with pytest.raises(FlowrlError, match=r"^INTERNAL: inference failed \(FlowrlError: a model file went missing\)$"):
            client.act(np.zeros((1, 2, 4), np.float32))
        assert client.act(np.zeros((1, 2, 4), np.float32)).shape == (1, 4, 2)
    assert any(r.exc_info and "policy 'flaky' failed" in r.getMessage() for r in caplog.records)  # logged whole


def test_the_python_client_imports_without_torch() -> None:
    """A controller's machine needs numpy and gRPC only: importing the client pulls in no torch."""
    code = "import sys; from flowrl.deploy.server import PolicyClient; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_server_fault_before_inference_is_an_internal_reply_not_unknown(served, monkeypatch) -> None:
    """Whatever fails while the server reads a request, the client gets INTERNAL naming it, never gRPC's UNKNOWN,
    and the server keeps serving."""
    server, _ = served
    calls = iter([RuntimeError("the log broke"), None])

    def log_client(*args: object) -> None:
        failure = next(calls)
        if failure is not None:
            raise failure

    monkeypatch.setattr(server.service, "_log_client", log_client)
    with PolicyClient(server.address, policy="reach") as client:
        with pytest.raises(FlowrlError, match=r"^INTERNAL: reading the request failed \(RuntimeError: the log broke\)$"):
            client.act(np.zeros((1, 2, 4), np.float32))
        assert client.act(np.zeros((1, 2, 4), np.float32)).shape == (1, 4, 2)
