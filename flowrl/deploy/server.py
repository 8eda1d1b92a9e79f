"""A gRPC policy server and its Python client: observations in, action chunks out.

The schema is ``flowrl/deploy/policy.proto`` (package ``flowrl.deploy.v1``): typed messages, float32
tensors as packed repeated floats or raw little-endian bytes with their shape, no pickle on the wire.
Services: ``Act`` (one request, one chunk), ``StreamAct`` (a bidirectional stream of them, for a
controller that keeps one stream open), ``Info`` (dims, chunking, bounds of a policy) and
``Health``. Requests carry observations only: the served policies are state-only
:class:`DeployedPolicy` objects (:func:`flowrl.deploy.runtime.load` refuses a pixel policy, one that
sees camera images, with a one-line error before a server starts).

Python stubs are compiled from the .proto when first needed, by grpcio-tools
(``grpc.protos_and_services``), rather than committed: the .proto is the one source for Python and
C++, and generated Python code pins the protobuf runtime's major version it was generated for
(protobuf refuses gencode newer than the runtime), which would make the ``deploy`` extra fragile
across protobuf releases. The modules are imported as ``policy_pb2`` and ``policy_pb2_grpc``.

Bad requests get error replies and the server keeps serving: a wrong shape, NaN or infinite values,
bad noise are ``INVALID_ARGUMENT``; an unknown policy is ``NOT_FOUND``. Each client (gRPC peer) gets
one log line, at its first request.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent import futures
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from flowrl.deploy._deps import require
from flowrl.deploy.runtime import DeployedPolicy
from flowrl.errors import FlowrlError

log = logging.getLogger("flowrl.deploy.server")
DEFAULT_PORT = 50151
MAX_ELEMENTS = 1 << 24
"""Largest tensor a request may carry (elements): a guard against absurd shapes."""

_modules: tuple[ModuleType, ModuleType] | None = None
_modules_lock = threading.Lock()


def proto_path() -> Path:
    """The .proto file of the service (installed as package data)."""
    return Path(str(resources.files("flowrl.deploy").joinpath("policy.proto")))


def protos() -> tuple[ModuleType, ModuleType]:
    """``(policy_pb2, policy_pb2_grpc)``, compiled from :func:`proto_path` on first use."""
    global _modules
    with _modules_lock:
        if _modules is None:
            grpc = require("grpc", "grpcio")
            require("grpc_tools", "grpcio-tools")
            folder = str(proto_path().parent)
            sys.path.insert(0, folder)
            try:
                _modules = grpc.protos_and_services("policy.proto")
            finally:
                sys.path.remove(folder)
        return _modules


# -- tensors ---------------------------------------------------------------------------------------
class BadRequest(ValueError):
    """A request the server answers with INVALID_ARGUMENT."""


def to_tensor(array: np.ndarray, raw: bool = False) -> Any:
    """A numpy array as a ``Tensor`` message (float32; ``raw``: as bytes)."""
    pb2, _ = protos()
    a = np.ascontiguousarray(array, dtype="<f4")
    if raw:
        return pb2.Tensor(shape=list(a.shape), raw=a.tobytes())
    return pb2.Tensor(shape=list(a.shape), data=a.ravel())


def from_tensor(msg: Any, what: str) -> np.ndarray:
    """A ``Tensor`` message as a float32 array; an inconsistent one raises :class:`BadRequest`."""
    shape = tuple(int(s) for s in msg.shape)
    if not shape or any(s < 1 for s in shape):
        raise BadRequest(f"{what}: shape must be non-empty with positive sizes, got {list(shape)}")
    n = int(np.prod(shape))
    if n > MAX_ELEMENTS:
        raise BadRequest(f"{what}: {n} elements is more than the server accepts ({MAX_ELEMENTS})")
    if msg.raw:
        if len(msg.raw) != 4 * n:
            raise BadRequest(f"{what}: {len(msg.raw)} raw bytes, shape {list(shape)} needs {4 * n}")
        a = np.frombuffer(msg.raw, dtype="<f4").copy()  # writable: torch warns on read-only buffers
    else:
        if len(msg.data) != n:
            raise BadRequest(f"{what}: {len(msg.data)} values, shape {list(shape)} needs {n}")
        a = np.asarray(msg.data, dtype=np.float32)
    return a.reshape(shape).astype(np.float32, copy=False)


# -- server ----------------------------------------------------------------------------------------
class PolicyService:
    """The servicer: named :class:`DeployedPolicy` objects behind Act, StreamAct, Info and Health."""

    def __init__(self, policies: dict[str, DeployedPolicy], default: str | None = None) -> None:
        if not policies:
            raise FlowrlError("a policy server needs at least one policy")
        self.policies = policies
        self.default = default or next(iter(policies))
        self._locks = {name: threading.Lock() for name in policies}  # one inference at a time per policy
        self._peers: set[str] = set()
        self._peers_lock = threading.Lock()

    def _log_peer(self, context: Any, method: str, policy: str) -> None:
        peer = context.peer()
        with self._peers_lock:
            if peer in self._peers:
                return
            self._peers.add(peer)
        log.info("client %s: first request %s (policy %s)", peer, method, policy or self.default)

    def _policy(self, name: str) -> tuple[str, DeployedPolicy]:
        name = name or self.default
        if name not in self.policies:
            raise KeyError(f"unknown policy '{name}'; this server has {', '.join(sorted(self.policies))}")
        return name, self.policies[name]

    def _act(self, request: Any) -> Any:
        pb2, _ = protos()
        name, policy = self._policy(request.policy)
        obs = from_tensor(request.obs, "obs")
        if obs.ndim == 2 and policy.obs_history == 1:
            obs = obs[:, None]
        want = (policy.obs_history, policy.obs_dim)
        if obs.ndim != 3 or obs.shape[1:] != want:
            raise BadRequest(f"obs must be (batch, {want[0]}, {want[1]}) for policy '{name}', got {list(obs.shape)}")
        if not np.isfinite(obs).all():
            raise BadRequest("obs contains NaN or infinity")
        noise = None
        if request.HasField("noise"):
            noise = from_tensor(request.noise, "noise")
            if noise.shape != (obs.shape[0], policy.horizon, policy.act_dim):
                raise BadRequest(f"noise must be ({obs.shape[0]}, {policy.horizon}, {policy.act_dim}), "
                                 f"got {list(noise.shape)}")
            if not np.isfinite(noise).all():
                raise BadRequest("noise contains NaN or infinity")
        start = time.perf_counter()
        with self._locks[name]:
            actions = policy.infer(obs, noise)
        ms = 1e3 * (time.perf_counter() - start)
        return pb2.ActReply(actions=to_tensor(actions, request.raw_reply), act_steps=policy.act_steps,
                            inference_ms=ms, request_id=request.request_id)

    def _abort(self, context: Any, e: Exception) -> None:
        grpc = require("grpc", "grpcio")
        code = grpc.StatusCode.NOT_FOUND if isinstance(e, KeyError) else grpc.StatusCode.INVALID_ARGUMENT
        context.abort(code, str(e.args[0]) if e.args else str(e))

    def Act(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's method names)
        self._log_peer(context, "Act", request.policy)
        try:
            return self._act(request)
        except (BadRequest, KeyError, FlowrlError) as e:
            self._abort(context, e)

    def StreamAct(self, requests: Any, context: Any) -> Any:  # noqa: N802
        for request in requests:
            self._log_peer(context, "StreamAct", request.policy)
            try:
                reply = self._act(request)
            except (BadRequest, KeyError, FlowrlError) as e:
                self._abort(context, e)
                return
            yield reply

    def Info(self, request: Any, context: Any) -> Any:  # noqa: N802
        pb2, _ = protos()
        self._log_peer(context, "Info", request.policy)
        try:
            name, p = self._policy(request.policy)
        except KeyError as e:
            self._abort(context, e)
            return None
        return pb2.PolicyInfo(name=name, task=p.meta.get("task") or "", backend=p.backend, obs_dim=p.obs_dim,
                              act_dim=p.act_dim, obs_history=p.obs_history, horizon=p.horizon,
                              act_steps=p.act_steps, k=p.k, action_low=p.action_low.tolist(),
                              action_high=p.action_high.tolist())

    def Health(self, request: Any, context: Any) -> Any:  # noqa: N802
        pb2, _ = protos()
        return pb2.HealthReply(status=pb2.HealthReply.SERVING, policies=sorted(self.policies))


def check_port(host: str, port: int) -> None:
    """Refuse, as one line, an address the server cannot listen on: a port in use, a host that is not
    an address of this machine or that does not resolve, a port below 1024 without the right. Binds
    a plain socket as gRPC would (SO_REUSEADDR, so a port in TIME_WAIT stays usable) and closes it;
    port 0 (any free one) is always fine."""
    import errno
    import socket

    if port == 0:
        return
    if not 0 < port < 65536:
        raise FlowrlError(f"--port {port}: not a TCP port (1-65535, or 0 for a free one)")
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FlowrlError(f"cannot listen on {host}:{port}: host {host!r} does not resolve ({e.strerror})") from None
    failures: list[OSError] = []
    for family, kind, proto, _, address in addresses:  # gRPC listens if any of them binds, as here
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
                return
            except OSError as e:
                failures.append(e)
    in_use = [e for e in failures if e.errno == errno.EADDRINUSE]
    if in_use:
        raise FlowrlError(f"cannot listen on {host}:{port}: the port is in use (another server?); "
                          "choose another --port, or --port 0 for a free one")
    if all(e.errno == errno.EADDRNOTAVAIL for e in failures):
        raise FlowrlError(f"cannot listen on {host}:{port}: {host} is not an address of this machine "
                          "(--host 127.0.0.1 or 0.0.0.0)")
    raise FlowrlError(f"cannot listen on {host}:{port} ({failures[0].strerror})")


class PolicyServer:
    """A running gRPC server (``start`` returns at once; ``port`` is the bound port, 0 picks one)."""

    def __init__(self, policies: dict[str, DeployedPolicy], port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                 max_workers: int = 8) -> None:
        grpc = require("grpc", "grpcio")
        _, services = protos()
        self.service = PolicyService(policies)
        check_port(host, port)  # before gRPC tries: its failed bind logs a C-core line of its own
        options = [("grpc.so_reuseport", 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        services.add_PolicyServiceServicer_to_server(self.service, self.server)
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:
            raise FlowrlError(f"cannot listen on {host}:{port} ({e})") from None
        if self.port == 0:
            raise FlowrlError(f"cannot listen on {host}:{port} (in use?)")
        self.address = f"{host}:{self.port}"

    def start(self) -> "PolicyServer":
        self.server.start()
        return self

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace: float | None = 0.5) -> None:
        self.server.stop(grace).wait()

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- client ----------------------------------------------------------------------------------------
class PolicyClient:
    """A Python client: ``act(obs_history, noise=None)`` -> chunk; ``stream()`` for one open stream.

    Errors of the server come back as :class:`FlowrlError` with the gRPC status name in front
    (``INVALID_ARGUMENT: obs must be ...``)."""

    def __init__(self, address: str, policy: str = "", timeout: float = 5.0, raw: bool = True) -> None:
        grpc = require("grpc", "grpcio")
        pb2, services = protos()
        self._grpc, self._pb2 = grpc, pb2
        # its own connection (gRPC Python otherwise shares one between channels to the same address): a
        # client is one peer for the server, which logs each peer once
        self.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = services.PolicyServiceStub(self.channel)
        self.policy, self.timeout, self.raw = policy, timeout, raw
        self._next_id = 0

    def _error(self, e: Any) -> FlowrlError:
        return FlowrlError(f"{e.code().name}: {e.details()}")

    def request(self, obs_history: np.ndarray, noise: np.ndarray | None = None) -> Any:
        """The ``ActRequest`` message for ``obs_history`` (and ``noise``)."""
        self._next_id += 1
        req = self._pb2.ActRequest(policy=self.policy, obs=to_tensor(np.asarray(obs_history), self.raw),
                                   request_id=self._next_id, raw_reply=self.raw)
        if noise is not None:
            req.noise.CopyFrom(to_tensor(np.asarray(noise), self.raw))
        return req

    def act(self, obs_history: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """(batch, obs_history, obs_dim) -> (batch, horizon, act_dim) chunks in env units."""
        try:
            reply = self.stub.Act(self.request(obs_history, noise), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return from_tensor(reply.actions, "actions")

    def stream(self, requests: Any) -> Any:
        """Replies of ``StreamAct`` for an iterable of requests (:meth:`request`), as arrays."""
        try:
            for reply in self.stub.StreamAct(requests, timeout=self.timeout):
                yield from_tensor(reply.actions, "actions")
        except self._grpc.RpcError as e:
            raise self._error(e) from None

    def info(self) -> dict[str, Any]:
        try:
            m = self.stub.Info(self._pb2.InfoRequest(policy=self.policy), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return {"name": m.name, "task": m.task, "backend": m.backend, "obs_dim": m.obs_dim, "act_dim": m.act_dim,
                "obs_history": m.obs_history, "horizon": m.horizon, "act_steps": m.act_steps,
                "k": m.k, "action_low": list(m.action_low), "action_high": list(m.action_high)}

    def health(self) -> str:
        try:
            reply = self.stub.Health(self._pb2.HealthRequest(), timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise self._error(e) from None
        return self._pb2.HealthReply.Status.Name(reply.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
