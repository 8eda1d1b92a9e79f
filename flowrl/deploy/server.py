"""A gRPC policy server and its Python client: observations in, action chunks out.

The schema is ``flowrl/deploy/policy.proto`` (package ``flowrl.deploy.v1``): typed messages, float32
tensors as packed repeated floats or raw little-endian bytes with their shape, no pickle on the wire.
Services: ``Act`` (one request, one chunk), ``StreamAct`` (a bidirectional stream of them, for a
controller that keeps one stream open), ``Info`` (dims, chunking, bounds of a policy) and
``Health``. Requests carry observations only: the served policies are state-only
:class:`DeployedPolicy` objects (:func:`flowrl.deploy.runtime.load` refuses a pixel policy, one that
sees camera images, with a one-line error before a server starts).

How the server bounds its work, so that a robot can depend on it:

- It is gRPC's asyncio server on one event loop: an open stream waiting for its next request holds no
  thread, and ``Health`` and ``Info`` are answered on the loop whatever streams and inference are in
  progress.
- Each policy's inference runs in one thread of its own, one request at a time, the request with the
  fewest rows first (:class:`InferenceQueue`): a batch-1 controller waits for the request in flight and
  the requests of as few rows that came before it, never for a queue of larger ones. Only a request
  that has waited over :data:`STARVATION_S` (small ones keep the server busy without a pause) goes
  ahead of smaller ones, so a large request is not starved. Requests are not merged, so each chunk is
  bit for bit what local inference of its request gives.
- A request of more rows than ``max_batch`` is refused before any work (``INVALID_ARGUMENT``). By
  default ``max_batch`` is measured when the server starts (:func:`auto_max_batch`): the largest power
  of two whose inference takes at most 25 ms on this machine, so that the larger request a controller's
  request may wait for (the one in flight) takes at most 25 ms.
- ``Act`` calls in progress and open ``StreamAct`` streams are limited in all (``max_streams``) and per
  client (``max_client_streams``, a client being one connection); beyond a limit a call is refused
  with ``RESOURCE_EXHAUSTED`` naming it. The server pings idle connections (keepalive), so the streams
  of a client that vanished without closing them are freed.
- Every bad request gets an error reply and the server keeps serving: a malformed message, a wrong,
  negative, overflowing or too high-rank shape, NaN or infinite values, bad noise are
  ``INVALID_ARGUMENT``; an unknown policy is ``NOT_FOUND``; a policy that fails on a request (its
  fault, not the request's) is ``INTERNAL``, logged with its traceback, never gRPC's ``UNKNOWN``.
  Messages name the problem and are at most :data:`MAX_DETAILS_CHARS` long (a name echoed in one is
  cut). A message over gRPC's 4 MiB limit is refused by gRPC itself with ``RESOURCE_EXHAUSTED``. Each
  client (gRPC peer) gets one log line, at its first request.

Python stubs are compiled from the .proto when first needed, by grpcio-tools
(``grpc.protos_and_services``), rather than committed: the .proto is the one source for Python and
C++, and generated Python code pins the protobuf runtime's major version it was generated for
(protobuf refuses gencode newer than the runtime), which would make the ``deploy`` extra fragile
across protobuf releases. The modules are imported as ``policy_pb2`` and ``policy_pb2_grpc``. The
server decodes requests itself (its handlers take the message bytes) so that a message that does not
parse is an ``INVALID_ARGUMENT`` reply like any other bad request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import sys
import threading
import time
from collections import OrderedDict
from concurrent import futures
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, AsyncIterator, Coroutine, TypeVar

import numpy as np

from flowrl.deploy._deps import require
from flowrl.errors import FlowrlError

if TYPE_CHECKING:  # the client side runs without torch, which the runtime imports
    from flowrl.deploy.runtime import DeployedPolicy

log = logging.getLogger("flowrl.deploy.server")
DEFAULT_PORT = 50151
MAX_ELEMENTS = 1 << 24
"""Largest tensor a request may carry (elements): a guard against absurd shapes."""
MAX_RANK = 8
"""Most dimensions a tensor of a request may have."""
MAX_DETAILS_CHARS = 300
"""Longest error message the server sends (gRPC carries it in a header, whose size is limited)."""
MAX_NAME_CHARS = 64
"""Longest part of a requested policy name that an error message repeats."""
BATCH_BUDGET_S = 0.025
"""Inference time one request of the default ``max_batch`` may take (:func:`auto_max_batch`)."""
BATCH_CEILING = 4096
"""Most rows :func:`auto_max_batch` allows, however fast the policy."""
STARVATION_S = 1.0
"""A request waiting longer than this goes next whatever its size (:class:`InferenceQueue`)."""
DEFAULT_MAX_STREAMS = 64
DEFAULT_MAX_CLIENT_STREAMS = 8
KEEPALIVE_MS = 20_000
"""The server pings a connection after this long without traffic and drops it when the ping goes
unanswered for ``KEEPALIVE_TIMEOUT_MS``: the streams of a client that vanished are freed."""
KEEPALIVE_TIMEOUT_MS = 10_000
SEEN_CLIENTS = 4096
"""How many clients the server remembers having logged (the oldest are forgotten first)."""

_modules: tuple[ModuleType, ModuleType] | None = None
_modules_lock = threading.Lock()
T = TypeVar("T")


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


def clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, ``...`` marking a cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- tensors ---------------------------------------------------------------------------------------
class PolicyFailure(Exception):
    """The server failed on a request, not the request on the server (``stage``: what failed, e.g. the
    policy's inference on a request that passed every check): answered INTERNAL."""

    def __init__(self, cause: BaseException, stage: str = "inference") -> None:
        super().__init__(str(cause))
        self.cause, self.stage = cause, stage


class BadRequest(ValueError):
    """A request the server answers with INVALID_ARGUMENT."""


class UnknownPolicy(LookupError):
    """A request for a policy the server does not serve: NOT_FOUND."""


def to_tensor(array: np.ndarray, raw: bool = False) -> Any:
    """A numpy array as a ``Tensor`` message (float32; ``raw``: as bytes)."""
    pb2, _ = protos()
    a = np.ascontiguousarray(array, dtype="<f4")
    if raw:
        return pb2.Tensor(shape=list(a.shape), raw=a.tobytes())
    return pb2.Tensor(shape=list(a.shape), data=a.ravel())


def tensor_shape(msg: Any, what: str) -> tuple[int, ...]:
    """The shape of a ``Tensor`` message, checked before any of its values are read: at least one
    and at most :data:`MAX_RANK` dimensions, each positive, at most :data:`MAX_ELEMENTS` elements
    (counted exactly, so sizes whose product overflows 64 bits are refused too); else
    :class:`BadRequest` naming the problem."""
    dims = [int(s) for s in msg.shape]
    if not dims:
        raise BadRequest(f"{what}: shape must be non-empty (at least one dimension)")
    if len(dims) > MAX_RANK:
        raise BadRequest(f"{what}: shape has {len(dims)} dimensions, more than the {MAX_RANK} the server accepts")
    if any(s < 1 for s in dims):
        raise BadRequest(f"{what}: shape sizes must be positive, got {dims}")
    if math.prod(dims) > MAX_ELEMENTS:
        raise BadRequest(f"{what}: shape {dims} holds more than the {MAX_ELEMENTS} elements the server accepts")
    return tuple(dims)


def tensor_values(msg: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The values of a ``Tensor`` message as a float32 array of ``shape`` (from :func:`tensor_shape`);
    a count of values that does not fit the shape raises :class:`BadRequest`."""
    n = math.prod(shape)
    if msg.raw:
        if len(msg.raw) != 4 * n:
            raise BadRequest(f"{what}: {len(msg.raw)} raw bytes, shape {list(shape)} needs {4 * n}")
        a = np.frombuffer(msg.raw, dtype="<f4").copy()  # writable: torch warns on read-only buffers
    else:
        if len(msg.data) != n:
            raise BadRequest(f"{what}: {len(msg.data)} values, shape {list(shape)} needs {n}")
        a = np.asarray(msg.data, dtype=np.float32)
    return a.reshape(shape).astype(np.float32, copy=False)


def from_tensor(msg: Any, what: str) -> np.ndarray:
    """A ``Tensor`` message as a float32 array; an inconsistent one raises :class:`BadRequest`."""
    return tensor_values(msg, tensor_shape(msg, what), what)


def parse(raw: bytes, message_type: Any) -> Any:
    """The bytes of a request as a ``message_type`` message; bytes that do not parse raise
    :class:`BadRequest`."""
    from google.protobuf.message import DecodeError

    msg = message_type()
    try:
        msg.ParseFromString(raw)
    except DecodeError as e:
        raise BadRequest(f"not a valid {message_type.DESCRIPTOR.full_name} message ({e})") from None
    return msg


# -- inference -------------------------------------------------------------------------------------
def auto_max_batch(policy: DeployedPolicy, budget_s: float = BATCH_BUDGET_S, ceiling: int = BATCH_CEILING) -> int:
    """The default ``max_batch`` of ``policy`` on this machine: the largest power of two, at most
    ``ceiling``, whose inference takes at most ``budget_s`` (the faster of two runs; at least 1). It
    runs on zeros with explicit noise, so the policy's noise generator is not drawn from."""
    best, rows = 1, 1
    while rows <= ceiling:
        obs = np.zeros((rows, policy.obs_history, policy.obs_dim), np.float32)
        noise = np.zeros((rows, policy.horizon, policy.act_dim), np.float32)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            policy.infer(obs, noise)
            seconds.append(time.perf_counter() - start)
        if min(seconds) > budget_s:
            break
        best, rows = rows, 2 * rows
    return best


class InferenceQueue:
    """One policy's requests waiting for inference, run in a thread of their own one at a time. The
    request with the fewest rows goes next (arrival order among equals): a request waits for the one in
    flight and the requests of at most its rows that came before it, so a batch-1 controller is not held up
    by a queue of large requests. The oldest request goes next instead once it has waited over
    ``starvation_s`` (the server saturated by smaller ones), so a large request is not starved. Requests
    are not merged: a chunk is bit for bit local inference of its request. A request whose client went
    away while it waited is dropped unrun."""

    def __init__(self, policy: DeployedPolicy, starvation_s: float = STARVATION_S) -> None:
        self.policy, self.starvation_s = policy, starvation_s
        # by arrival (dicts keep insertion order: the first is the oldest); the number of waiting
        # requests is bounded by the server's stream limits, so picking by a scan is cheap
        self._waiting: dict[int, tuple[np.ndarray, np.ndarray | None, asyncio.Future, float]] = {}
        """(obs, noise, future, arrival time by time.monotonic()) of each waiting request, by arrival."""
        self._arrival = itertools.count()
        self._ready = asyncio.Event()
        self._thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-infer")
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        """How many requests are waiting (not counting the one in flight)."""
        return len(self._waiting)

    def start(self) -> None:
        """Start serving the queue (on the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def infer(self, obs: np.ndarray, noise: np.ndarray | None) -> tuple[np.ndarray, float]:
        """The chunks of ``obs`` (``noise``: given, or None to draw it) and the inference time in ms."""
        done = asyncio.get_running_loop().create_future()
        arrival = next(self._arrival)
        self._waiting[arrival] = (obs, noise, done, time.monotonic())
        self._ready.set()
        return await done

    def _take(self, now: float) -> tuple[np.ndarray, np.ndarray | None, asyncio.Future] | None:
        """The next request to run at time ``now`` (class doc), out of the queue; None when none is waiting."""
        for gone in [arrival for arrival, (_, _, done, _) in self._waiting.items() if done.done()]:
            del self._waiting[gone]  # cancelled: its client went away or its deadline passed
        if not self._waiting:
            return None
        oldest = next(iter(self._waiting))
        if now - self._waiting[oldest][3] > self.starvation_s:
            arrival = oldest
        else:
            arrival = min(self._waiting, key=lambda a: (self._waiting[a][0].shape[0], a))
        obs, noise, done, _ = self._waiting.pop(arrival)
        return obs, noise, done

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request = self._take(time.monotonic())
            if request is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            obs, noise, done = request
            try:
                result = await loop.run_in_executor(self._thread, self._timed_infer, obs, noise)
            except Exception as e:  # noqa: BLE001 (handed to the request's handler, which answers it)
                if not done.done():
                    done.set_exception(e)
            else:
                if not done.done():
                    done.set_result(result)

    def _timed_infer(self, obs: np.ndarray, noise: np.ndarray | None) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        actions = self.policy.infer(obs, noise)
        return actions, 1e3 * (time.perf_counter() - start)

    def stop(self) -> None:
        """Stop serving (on the event loop); requests still waiting are not run."""
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        """Wait for the inference in flight and release the thread (after :meth:`stop`, off the loop)."""
        self._thread.shutdown(wait=True)


# -- server ----------------------------------------------------------------------------------------
class PolicyService:
    """The servicer: named :class:`DeployedPolicy` objects behind Act, StreamAct, Info and Health (asyncio
    handlers taking the request's bytes; see the module doc for the limits they hold)."""

    def __init__(self, policies: dict[str, DeployedPolicy], max_batch: dict[str, int],
                 max_streams: int = DEFAULT_MAX_STREAMS, max_client_streams: int = DEFAULT_MAX_CLIENT_STREAMS) -> None:
        if not policies:
            raise FlowrlError("a policy server needs at least one policy")
        self.policies = policies
        self.default = next(iter(policies))
        self.max_batch = max_batch
        self.max_streams, self.max_client_streams = max_streams, max_client_streams
        self.queues = {name: InferenceQueue(policy) for name, policy in policies.items()}
        self._open = 0  # Act calls in progress and open StreamAct streams (all on the event loop: no lock)
        self._open_by_client: dict[str, int] = {}
        self._logged: OrderedDict[str, None] = OrderedDict()

    @property
    def in_progress(self) -> int:
        """How many Act calls are in progress and StreamAct streams open."""
        return self._open

    def _log_client(self, context: Any, method: str, policy: str) -> None:
        peer = context.peer()
        if peer in self._logged:
            self._logged.move_to_end(peer)
            return
        self._logged[peer] = None
        if len(self._logged) > SEEN_CLIENTS:
            self._logged.popitem(last=False)
        log.info("client %s: first request %s (policy %s)", peer, method, clip(policy or self.default, MAX_NAME_CHARS))

    def _policy(self, name: str) -> tuple[str, DeployedPolicy]:
        name = name or self.default
        if name not in self.policies:
            raise UnknownPolicy(f"unknown policy '{clip(name, MAX_NAME_CHARS)}'; this server has "
                                f"{', '.join(sorted(self.policies))}")
        return name, self.policies[name]

    async def _abort(self, context: Any, e: Exception) -> None:
        """End the call with the error reply of ``e``: NOT_FOUND for an unknown policy, INTERNAL for a failure
        of the policy itself (:class:`PolicyFailure`), INVALID_ARGUMENT for a bad request."""
        grpc = require("grpc", "grpcio")
        if isinstance(e, UnknownPolicy):
            code, details = grpc.StatusCode.NOT_FOUND, str(e)
        elif isinstance(e, PolicyFailure):
            cause = e.cause
            first_line = str(cause).splitlines()[0] if str(cause) else "no message"
            code, details = grpc.StatusCode.INTERNAL, f"{e.stage} failed ({type(cause).__name__}: {first_line})"
        else:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        await context.abort(code, clip(details, MAX_DETAILS_CHARS))

    @asynccontextmanager
    async def _admitted(self, context: Any) -> AsyncIterator[None]:
        """One Act call or StreamAct stream counted against the limits for its life; beyond one of them,
        RESOURCE_EXHAUSTED."""
        grpc = require("grpc", "grpcio")
        client = context.peer()
        if self._open >= self.max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server busy: {self._open} streams and Act calls in progress, the most it takes "
                                f"(--max-streams {self.max_streams}); retry later")
        if self._open_by_client.get(client, 0) >= self.max_client_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this client has {self.max_client_streams} streams and Act calls in progress, the "
                                f"most one client may hold (--max-client-streams {self.max_client_streams})")
        self._open += 1
        self._open_by_client[client] = self._open_by_client.get(client, 0) + 1
        try:
            yield
        finally:
            self._open -= 1
            left = self._open_by_client.pop(client) - 1
            if left:
                self._open_by_client[client] = left

    async def _act(self, raw: bytes, context: Any, method: str) -> Any:
        """The reply to one ActRequest's bytes; a bad request ends the call with its error reply."""
        pb2, _ = protos()
        try:  # the request: its parse, its policy, its inputs (a FlowrlError here is the request's fault)
            request = parse(raw, pb2.ActRequest)
            self._log_client(context, method, request.policy)
            name, policy = self._policy(request.policy)
            obs, noise = self._inputs(request, name, policy)
        except (BadRequest, UnknownPolicy, FlowrlError) as e:
            await self._abort(context, e)
        except Exception as e:  # noqa: BLE001 (the server's fault: logged whole, answered INTERNAL)
            log.exception("reading a request of %s failed", method)
            await self._abort(context, PolicyFailure(e, "reading the request"))
        try:
            actions, ms = await self.queues[name].infer(obs, noise)
        except Exception as e:  # noqa: BLE001 (the policy failed, not the request: logged whole, answered INTERNAL)
            log.exception("policy '%s' failed on a request of %s", name, method)
            await self._abort(context, PolicyFailure(e))
        return pb2.ActReply(actions=to_tensor(actions, request.raw_reply), act_steps=policy.act_steps,
                            inference_ms=ms, request_id=request.request_id)

    def _inputs(self, request: Any, name: str, policy: DeployedPolicy) -> tuple[np.ndarray, np.ndarray | None]:
        """The request's observations and noise, every shape checked (the batch against ``max_batch``)
        before any value is read."""
        shape = tensor_shape(request.obs, "obs")
        if len(shape) == 2 and policy.obs_history == 1:
            shape = (shape[0], 1, shape[1])
        want = (policy.obs_history, policy.obs_dim)
        if len(shape) != 3 or shape[1:] != want:
            raise BadRequest(f"obs must be (batch, {want[0]}, {want[1]}) for policy '{name}', got {list(shape)}")
        if shape[0] > self.max_batch[name]:
            raise BadRequest(f"batch of {shape[0]} is more than this server takes in one request (max batch "
                             f"{self.max_batch[name]} for policy '{name}'); split it")
        want_noise = (shape[0], policy.horizon, policy.act_dim)
        if request.HasField("noise") and tensor_shape(request.noise, "noise") != want_noise:
            raise BadRequest(f"noise must be {want_noise}, got {list(request.noise.shape)}")
        obs = tensor_values(request.obs, tuple(request.obs.shape), "obs").reshape(shape)
        if not np.isfinite(obs).all():
            raise BadRequest("obs contains NaN or infinity")
        if not request.HasField("noise"):
            return obs, None
        noise = tensor_values(request.noise, want_noise, "noise")
        if not np.isfinite(noise).all():
            raise BadRequest("noise contains NaN or infinity")
        return obs, noise

    async def Act(self, raw: bytes, context: Any) -> Any:  # noqa: N802 (gRPC's method names)
        async with self._admitted(context):
            return await self._act(raw, context, "Act")

    async def StreamAct(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async with self._admitted(context):
            async for raw in requests:
                yield await self._act(raw, context, "StreamAct")

    async def Info(self, raw: bytes, context: Any) -> Any:  # noqa: N802
        pb2, _ = protos()
        try:
            request = parse(raw, pb2.InfoRequest)
            self._log_client(context, "Info", request.policy)
            name, p = self._policy(request.policy)
        except (BadRequest, UnknownPolicy) as e:
            error: Exception = e
        else:
            return pb2.PolicyInfo(name=name, task=p.meta.get("task") or "", backend=p.backend, obs_dim=p.obs_dim,
                                  act_dim=p.act_dim, obs_history=p.obs_history, horizon=p.horizon,
                                  act_steps=p.act_steps, k=p.k, action_low=p.action_low.tolist(),
                                  action_high=p.action_high.tolist())
        await self._abort(context, error)

    async def Health(self, raw: bytes, context: Any) -> Any:  # noqa: N802
        pb2, _ = protos()
        try:
            parse(raw, pb2.HealthRequest)
        except BadRequest as e:
            await self._abort(context, e)
        return pb2.HealthReply(status=pb2.HealthReply.SERVING, policies=sorted(self.policies))

    def handler(self) -> Any:
        """The gRPC handler of the PolicyService methods (requests as bytes, replies serialised)."""
        grpc = require("grpc", "grpcio")
        pb2, _ = protos()
        service = pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
        methods = {
            "Act": grpc.unary_unary_rpc_method_handler(self.Act, response_serializer=pb2.ActReply.SerializeToString),
            "StreamAct": grpc.stream_stream_rpc_method_handler(self.StreamAct,
                                                               response_serializer=pb2.ActReply.SerializeToString),
            "Info": grpc.unary_unary_rpc_method_handler(self.Info, response_serializer=pb2.PolicyInfo.SerializeToString),
            "Health": grpc.unary_unary_rpc_method_handler(self.Health,
                                                          response_serializer=pb2.HealthReply.SerializeToString),
        }
        return grpc.method_handlers_generic_handler(service, methods)

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
    """A running gRPC server: its asyncio event loop runs in a thread of its own, so ``start`` returns
    at once and the caller's thread stays free; ``port`` is the bound port (0 picks one).

    ``max_batch``: the most rows one request may carry (None: :func:`auto_max_batch` per policy);
    ``max_streams`` and ``max_client_streams``: the most Act calls in progress and open StreamAct
    streams in all and per client."""

    def __init__(self, policies: dict[str, DeployedPolicy], port: int = DEFAULT_PORT, host: str = "127.0.0.1",
                 max_batch: int | None = None, max_streams: int = DEFAULT_MAX_STREAMS,
                 max_client_streams: int = DEFAULT_MAX_CLIENT_STREAMS) -> None:
        require("grpc", "grpcio")
        protos()
        for flag, value in (("--max-batch", max_batch), ("--max-streams", max_streams),
                            ("--max-client-streams", max_client_streams)):
            if value is not None and value < 1:
                raise FlowrlError(f"{flag} must be at least 1, got {value}")
        check_port(host, port)  # before gRPC tries: its failed bind logs a C-core line of its own
        batches = {name: auto_max_batch(p) if max_batch is None else max_batch for name, p in policies.items()}
        self.service = PolicyService(policies, batches, max_streams, max_client_streams)
        self.max_batch = batches
        self._stopped = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="flowrl-serve", daemon=True)
        self._thread.start()
        try:
            self.port = self._run(self._bind(host, port))
        except BaseException:
            self._close_loop()
            raise
        self.address = f"{host}:{self.port}"

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _bind(self, host: str, port: int) -> int:
        grpc = require("grpc", "grpcio")
        options = [("grpc.so_reuseport", 0), ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                   ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS)]
        self.server = grpc.aio.server(handlers=[self.service.handler()], options=options)
        try:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:
            raise FlowrlError(f"cannot listen on {host}:{port} ({e})") from None
        if bound == 0:
            raise FlowrlError(f"cannot listen on {host}:{port} (in use?)")
        return bound

    async def _start(self) -> None:
        for queue in self.service.queues.values():
            queue.start()
        await self.server.start()

    async def _shutdown(self, grace: float | None) -> None:
        await self.server.stop(grace)
        for queue in self.service.queues.values():
            queue.stop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def start(self) -> "PolicyServer":
        self._run(self._start())
        return self

    def wait(self) -> None:
        """Block until :meth:`stop` (from another thread) or Ctrl-C."""
        self._stopped.wait()

    def stop(self, grace: float | None = 0.5) -> None:
        """Stop serving: calls in progress get ``grace`` seconds to finish, then the loop and the
        inference threads end. A second call does nothing."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        try:
            self._run(self._shutdown(grace))
        finally:
            self._close_loop()
            for queue in self.service.queues.values():
                queue.close()

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
