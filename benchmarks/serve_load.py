"""The policy server under load and faults, on loopback: controllers streaming at a fixed rate while
others are killed and restarted, send malformed requests, hold idle streams or send large batches.

    python benchmarks/serve_load.py [--clients 8] [--rate 100] [--seconds 60] [--restarting 2] [--garbage 1]
                                    [--idle-streams 16] [--bulk-period 0.5] [--max-batch B] [--tag TAG]

Everything runs on this machine, each part in a process of its own (the clients share its cores with
the server: the record says how busy they were):
- ``flowrl serve`` of deploy_latency's policy (Hopper's dims, ReinFlow's 3x512 residual MLP, K = 4,
  chunks of 4) exported to ONNX, its max batch measured at start (the default) or ``--max-batch``;
- ``--clients`` well-behaved controllers: one ``StreamAct`` stream each, one observation every
  1/``--rate`` s with one request in flight (a reply later than the next tick delays it and counts as
  late), each round trip timed;
- ``--restarting`` controllers of the same kind, each killed with SIGKILL 2 to 5 s after it started
  (mid-stream) and started again, until the end;
- ``--garbage`` clients cycling through malformed requests (shapes that overflow, of rank 70, negative,
  of the wrong size; values that do not fit the shape, NaN; a batch over the max batch; a 100k-character
  unknown policy name; bytes that are no message; bad noise; a stream ended by a bad request), each
  answer's status checked against the one expected;
- one process holding ``--idle-streams`` open, idle ``StreamAct`` streams for the whole run (over as
  many connections as the per-client limit needs);
- one client sending a request of max-batch rows every ``--bulk-period`` s;
- from this process, a ``Health`` call every 0.1 s, timed, and the server's resident memory every second.

Reported: the well-behaved controllers' round trips (p50, p99, max over all of them), their errors,
late replies and missed ticks; Health's p50, p99 and max; the garbage answers by status; the restarts;
the bulk requests' round trips; the server's memory and CPU time, and how busy the machine's cores
were. Targets (exit code 1 when one is missed): no error for the well-behaved controllers and the bulk
client, every malformed request answered with its expected status, every Health call answered within
50 ms, the server's memory at the end within 10 MB of its memory 10 s into the run. Writes benchmarks/results/serving/serve_load[_<tag>].json.

``python benchmarks/serve_load.py --role ...`` runs one client (the processes the study starts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWRL_CLI, cpu_model, report_checks, run_main, write_result  # noqa: E402

HEALTH_PERIOD_S = 0.1
HEALTH_TARGET_MS = 50.0
MEMORY_GROWTH_TARGET_MB = 10.0
MEMORY_BASELINE_S = 10.0


# -- the clients (each runs as `serve_load.py --role ROLE` in a process of its own) --------------------
def _policy_shape(address: str) -> tuple[int, int, int, int]:
    """``(obs_history, obs_dim, horizon, act_dim)`` of the served policy (its Info)."""
    from flowrl.deploy.server import PolicyClient

    with PolicyClient(address, timeout=30) as client:
        info = client.info()
    return info["obs_history"], info["obs_dim"], info["horizon"], info["act_dim"]


def controller(address: str, rate: float, seconds: float, out: Path | None) -> None:
    """One StreamAct stream for ``seconds``, one observation at each tick of ``rate`` Hz, one request in
    flight: a reply that comes after the next tick is late, and the ticks that passed while waiting for
    it are skipped (missed), as a controller would. With ``out``, the round trips (ms), late replies, missed ticks and errors are
    written there as JSON. An error ends the stream, is counted and a new stream is opened."""
    import queue

    from flowrl.deploy.server import PolicyClient
    from flowrl.errors import FlowrlError

    history, obs_dim, _, _ = _policy_shape(address)
    rng = np.random.default_rng(os.getpid())
    period = 1.0 / rate
    round_trips, late, missed, errors = [], 0, 0, []
    with PolicyClient(address, timeout=seconds + 60) as client:
        requests: queue.Queue = queue.Queue()
        replies = client.stream(iter(requests.get, None))
        tick = time.perf_counter()
        end = tick + seconds
        while tick < end:
            time.sleep(max(0.0, tick - time.perf_counter()))
            sent = time.perf_counter()
            requests.put(client.request(rng.normal(size=(1, history, obs_dim)).astype(np.float32)))
            try:
                next(replies)
                round_trips.append(1e3 * (time.perf_counter() - sent))
            except (FlowrlError, StopIteration) as e:
                errors.append(str(e) or "the stream ended")
                requests = queue.Queue()
                replies = client.stream(iter(requests.get, None))
            overran = int((time.perf_counter() - tick) // period)  # the ticks that passed meanwhile
            late += overran > 0
            missed += overran
            tick += period * (overran + 1)
        requests.put(None)
    if out is not None:
        out.write_text(json.dumps({"round_trips_ms": round_trips, "late": late, "missed_ticks": missed,
                                   "errors": errors}))


def garbage_cases(history: int, obs_dim: int, horizon: int, act_dim: int, max_batch: int) -> list[tuple]:
    """``(name, method, request bytes, expected status)`` of each malformed request."""
    from flowrl.deploy.server import protos, to_tensor

    pb2, _ = protos()
    good = to_tensor(np.zeros((1, history, obs_dim), np.float32), raw=True)

    def act(**fields: Any) -> bytes:
        return pb2.ActRequest(**fields).SerializeToString()

    bad_noise = to_tensor(np.zeros((1, horizon, act_dim + 1), np.float32), raw=True)
    return [
        ("shape overflowing int64", "Act", act(obs=pb2.Tensor(shape=[2**32, 2**32, 11])), "INVALID_ARGUMENT"),
        ("rank 70", "Act", act(obs=pb2.Tensor(shape=[1] * 70)), "INVALID_ARGUMENT"),
        ("negative size", "Act", act(obs=pb2.Tensor(shape=[-1, history, obs_dim])), "INVALID_ARGUMENT"),
        ("wrong obs_dim", "Act", act(obs=to_tensor(np.zeros((1, history, obs_dim + 1)))), "INVALID_ARGUMENT"),
        ("values not fitting the shape", "Act", act(obs=pb2.Tensor(shape=[1, history, obs_dim], data=[0.0])),
         "INVALID_ARGUMENT"),
        ("NaN", "Act", act(obs=to_tensor(np.full((1, history, obs_dim), np.nan))), "INVALID_ARGUMENT"),
        ("batch over the max batch", "Act",
         act(obs=to_tensor(np.zeros((max_batch + 1, history, obs_dim), np.float32), raw=True)), "INVALID_ARGUMENT"),
        ("100k-character unknown policy", "Act", act(policy="x" * 100_000, obs=good), "NOT_FOUND"),
        ("bytes that are no message", "Act", b"\xff\xff\xff garbage", "INVALID_ARGUMENT"),
        ("noise of the wrong shape", "Act", act(obs=good, noise=bad_noise), "INVALID_ARGUMENT"),
        ("unknown policy's Info", "Info", pb2.InfoRequest(policy="y" * 100_000).SerializeToString(), "NOT_FOUND"),
        ("stream ended by a bad request", "StreamAct", act(obs=pb2.Tensor(shape=[1] * 70)), "INVALID_ARGUMENT"),
    ]


def garbage(address: str, max_batch: int, rate: float, seconds: float, out: Path) -> None:
    """Malformed requests (:func:`garbage_cases`) in turn at ``rate`` per second; the status of each
    answer, by case, written to ``out``."""
    import grpc

    from flowrl.deploy.server import protos, to_tensor

    pb2, _ = protos()
    shape = _policy_shape(address)
    cases = garbage_cases(*shape, max_batch)
    history, obs_dim = shape[:2]
    good = pb2.ActRequest(obs=to_tensor(np.zeros((1, history, obs_dim), np.float32), raw=True)).SerializeToString()
    codes: dict[str, dict[str, int]] = {name: {} for name, *_ in cases}
    with grpc.insecure_channel(address) as channel:
        path = "/flowrl.deploy.v1.PolicyService/"
        end, i = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            name, method, request, _ = cases[i % len(cases)]
            i += 1
            try:
                if method == "StreamAct":  # one good request answered, then the bad one ends the stream
                    for _ in channel.stream_stream(path + method)(iter([good, request]), timeout=10):
                        pass
                else:
                    channel.unary_unary(path + method)(request, timeout=10)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            codes[name][code] = codes[name].get(code, 0) + 1
            time.sleep(1.0 / rate)
    expected = {name: status for name, _, _, status in cases}
    out.write_text(json.dumps({"codes": codes, "expected": expected}))


def idle_streams(address: str, count: int, per_client: int, seconds: float, out: Path) -> None:
    """``count`` StreamAct streams, each answered once and then left open and idle for ``seconds``,
    over as many connections as ``per_client`` streams a connection need; the number opened to ``out``."""
    import queue

    import grpc

    from flowrl.deploy.server import protos, to_tensor

    pb2, services = protos()
    history, obs_dim = _policy_shape(address)[:2]
    request = pb2.ActRequest(obs=to_tensor(np.zeros((1, history, obs_dim), np.float32), raw=True))
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(-(-count // per_client))]
    held = []
    for i in range(count):
        requests: queue.Queue = queue.Queue()
        requests.put(request)
        replies = services.PolicyServiceStub(channels[i // per_client]).StreamAct(iter(requests.get, None))
        next(replies)
        held.append((requests, replies))
    out.write_text(json.dumps({"opened": len(held)}))
    time.sleep(seconds)
    for requests, _ in held:
        requests.put(None)


def bulk(address: str, max_batch: int, period: float, seconds: float, out: Path) -> None:
    """A request of ``max_batch`` rows every ``period`` s (unary Act); round trips and errors to ``out``."""
    from flowrl.deploy.server import PolicyClient
    from flowrl.errors import FlowrlError

    history, obs_dim = _policy_shape(address)[:2]
    obs = np.random.default_rng(0).normal(size=(max_batch, history, obs_dim)).astype(np.float32)
    round_trips, errors = [], []
    with PolicyClient(address, timeout=30) as client:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            sent = time.perf_counter()
            try:
                client.act(obs)
                round_trips.append(1e3 * (time.perf_counter() - sent))
            except FlowrlError as e:
                errors.append(str(e))
            time.sleep(period)
    out.write_text(json.dumps({"round_trips_ms": round_trips, "errors": errors}))


# -- the study ---------------------------------------------------------------------------------------
def _spawn(workdir: Path, role: str, *args: object) -> subprocess.Popen:
    """``serve_load.py --role ROLE ARGS`` in a new process, its stderr in ``workdir/ROLE_<n>.err``."""
    with open(workdir / f"{role}_{time.monotonic_ns()}.err", "w") as err:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--role", role,
                                 *(str(a) for a in args)], stdout=subprocess.DEVNULL, stderr=err)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[int, int]:
    """``(idle, total)`` CPU time of the machine so far, in clock ticks (/proc/stat)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)  # idle and iowait


def _busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The fraction of all cores' time that was not idle between two :func:`_machine_cpu` readings."""
    return 1.0 - (after[0] - before[0]) / max(1, after[1] - before[1])


def _quantiles(values_ms: list[float]) -> dict[str, float]:
    a = np.asarray(values_ms)
    if a.size == 0:
        return {"count": 0}
    return {"count": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max())}


def start_server(policy: Path, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, str, int]:
    """``flowrl serve POLICY --port 0`` in its own process (log in ``workdir``): the process, its address
    and its max batch (from its first line)."""
    proc = subprocess.Popen([*FLOWRL_CLI, "serve", str(policy), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=open(workdir / "server.log", "w"), text=True)
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        raise RuntimeError(f"flowrl serve did not start: {line!r} ({(workdir / 'server.log').read_text()[-500:]})")
    max_batch = int(line.split("max batch ")[1].split(")")[0])
    return proc, line.rsplit(" on ", 1)[1].strip(), max_batch


def run_study(policy: Path, workdir: Path, clients: int = 8, rate: float = 100.0, seconds: float = 60.0,
              restarting: int = 2, garbage_clients: int = 1, idle: int = 16, bulk_period: float = 0.5,
              max_client_streams: int = 8, max_batch: int | None = None) -> dict:
    """Serve ``policy`` (``max_batch``: the server's --max-batch, None for its default) and run the load
    and faults of the module doc for ``seconds``; the record."""
    from flowrl.deploy.server import PolicyClient
    from flowrl.errors import FlowrlError

    flags = ["--max-client-streams", str(max_client_streams)] + ([] if max_batch is None else
                                                                 ["--max-batch", str(max_batch)])
    server, address, max_batch = start_server(policy, workdir, flags)
    procs: list[subprocess.Popen] = []
    stop = threading.Event()
    health_ms: list[float] = []
    health_errors: list[str] = []
    memory: list[tuple[float, float]] = []
    restarts = [0]
    try:
        idle_proc = _spawn(workdir, "idle", address, idle, max_client_streams, seconds + 30, workdir / "idle.json")
        procs.append(idle_proc)
        deadline = time.monotonic() + 60
        while not (workdir / "idle.json").exists():  # the streams are open before the load starts
            if idle_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the idle-streams client failed: {_errors(workdir, 'idle')}")
            time.sleep(0.1)
        start, server_cpu_start, machine_start = time.monotonic(), _cpu_seconds(server.pid), _machine_cpu()

        def probe() -> None:
            with PolicyClient(address, timeout=5) as client:
                while not stop.wait(HEALTH_PERIOD_S):
                    sent = time.perf_counter()
                    try:
                        client.health()
                        health_ms.append(1e3 * (time.perf_counter() - sent))
                    except FlowrlError as e:
                        health_errors.append(str(e))

        def sample_memory() -> None:
            while not stop.wait(1.0):
                memory.append((time.monotonic() - start, _rss_mb(server.pid)))

        def restart_loop(slot: int) -> None:
            rng = random.Random(slot)
            while not stop.is_set():
                proc = _spawn(workdir, "restarting", address, rate, seconds + 30, "-")
                stop.wait(rng.uniform(2.0, 5.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                restarts[0] += not stop.is_set()

        for i in range(clients):
            procs.append(_spawn(workdir, "controller", address, rate, seconds, workdir / f"controller_{i}.json"))
        for i in range(garbage_clients):
            procs.append(_spawn(workdir, "garbage", address, max_batch, 50, seconds, workdir / f"garbage_{i}.json"))
        if bulk_period > 0:
            procs.append(_spawn(workdir, "bulk", address, max_batch, bulk_period, seconds, workdir / "bulk.json"))
        threads = [threading.Thread(target=probe), threading.Thread(target=sample_memory),
                   *(threading.Thread(target=restart_loop, args=(s,)) for s in range(restarting))]
        for t in threads:
            t.start()
        for proc in procs[1:]:
            proc.wait(timeout=seconds + 120)
        stop.set()
        for t in threads:
            t.join()
        server_alive = server.poll() is None
        server_cores = (_cpu_seconds(server.pid) - server_cpu_start) / (time.monotonic() - start)
        machine_busy = _busy_fraction(machine_start, _machine_cpu())
    finally:
        stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        server.terminate()
        server.wait(timeout=10)
    return _record(workdir, clients, garbage_clients, bulk_period, max_batch, health_ms, health_errors, memory,
                   restarts[0], server_alive, server_cores, machine_busy,
                   {"clients": clients, "rate_hz": rate, "seconds": seconds, "restarting": restarting,
                    "garbage_clients": garbage_clients, "idle_streams": idle, "bulk_period_s": bulk_period,
                    "max_client_streams": max_client_streams})


def _errors(workdir: Path, role: str) -> str:
    texts = [p.read_text().strip() for p in sorted(workdir.glob(f"{role}_*.err")) if p.read_text().strip()]
    return texts[-1][-800:] if texts else "no error output"


def _read(path: Path, role: str) -> dict:
    if not path.exists():
        raise RuntimeError(f"{path.name} was not written: {_errors(path.parent, role)}")
    return json.loads(path.read_text())


def _record(workdir: Path, clients: int, garbage_clients: int, bulk_period: float, max_batch: int,
            health_ms: list[float], health_errors: list[str], memory: list[tuple[float, float]], restarts: int,
            server_alive: bool, server_cores: float, machine_busy: float, setup: dict) -> dict:
    """The study's record from the files its clients wrote."""
    runs = [_read(workdir / f"controller_{i}.json", "controller") for i in range(clients)]
    garbage_runs = [_read(workdir / f"garbage_{i}.json", "garbage") for i in range(garbage_clients)]
    codes: dict[str, dict[str, int]] = {}
    for run in garbage_runs:
        for name, counts in run["codes"].items():
            for code, n in counts.items():
                codes.setdefault(name, {})[code] = codes.get(name, {}).get(code, 0) + n
    expected = garbage_runs[0]["expected"] if garbage_runs else {}
    unexpected = {name: {c: n for c, n in counts.items() if c != expected[name]} for name, counts in codes.items()}
    bulk_run = _read(workdir / "bulk.json", "bulk") if bulk_period > 0 else {"round_trips_ms": [], "errors": []}
    baseline = [mb for t, mb in memory if t <= MEMORY_BASELINE_S]
    return {
        "setup": {**setup, "max_batch": max_batch},
        "controllers": {**_quantiles([ms for run in runs for ms in run["round_trips_ms"]]),
                        "errors": [e for run in runs for e in run["errors"]],
                        "late": sum(run["late"] for run in runs),
                        "missed_ticks": sum(run["missed_ticks"] for run in runs),
                        "per_client": [_quantiles(run["round_trips_ms"]) for run in runs]},
        "health": {**_quantiles(health_ms), "errors": health_errors,
                   "over_target": sum(ms >= HEALTH_TARGET_MS for ms in health_ms)},
        "garbage": {"codes": codes, "unexpected": {k: v for k, v in unexpected.items() if v}},
        "restarts": restarts,
        "idle_streams_opened": _read(workdir / "idle.json", "idle")["opened"],
        "bulk": {**_quantiles(bulk_run["round_trips_ms"]), "errors": bulk_run["errors"]},
        "server_memory_mb": {"at_10s": round(baseline[-1], 1) if baseline else None,
                             "end": round(memory[-1][1], 1) if memory else None,
                             "max": round(max(mb for _, mb in memory), 1) if memory else None,
                             "samples": [[round(t, 1), round(mb, 1)] for t, mb in memory]},
        "server_alive_at_end": server_alive,
        "server_cpu_cores": server_cores,
        "machine_cpu_busy": machine_busy,
    }


def checks(record: dict) -> list[tuple[str, bool]]:
    """The study's targets (module doc) as PASS/FAIL lines."""
    c, h, m = record["controllers"], record["health"], record["server_memory_mb"]
    growth = m["end"] - m["at_10s"] if m["end"] is not None and m["at_10s"] is not None else float("inf")
    garbage_answers = sum(n for counts in record["garbage"]["codes"].values() for n in counts.values())
    setup = record["setup"]
    return [
        (f"well-behaved controllers: {c['count']} round trips, {len(c['errors'])} errors", c["count"] > 0
         and not c["errors"]),
        *([(f"bulk client: {record['bulk']['count']} requests, {len(record['bulk']['errors'])} errors",
            record["bulk"]["count"] > 0 and not record["bulk"]["errors"])] if setup["bulk_period_s"] > 0 else []),
        *([(f"malformed requests: {garbage_answers} answered, unexpected statuses "
            f"{record['garbage']['unexpected'] or 'none'}", garbage_answers > 0 and not record["garbage"]["unexpected"])]
          if setup["garbage_clients"] else []),
        (f"Health: {h['count']} calls, max {h.get('max_ms', float('nan')):.1f} ms < {HEALTH_TARGET_MS:.0f} ms, "
         f"{len(h['errors'])} errors", h["count"] > 0 and not h["errors"] and h["max_ms"] < HEALTH_TARGET_MS),
        (f"server memory {m['at_10s']} MB at {MEMORY_BASELINE_S:.0f} s -> {m['end']} MB at the end "
         f"(growth {growth:.1f} MB < {MEMORY_GROWTH_TARGET_MB:.0f} MB)", growth < MEMORY_GROWTH_TARGET_MB),
        ("the server still running at the end", record["server_alive_at_end"]),
    ]


def summary(record: dict) -> str:
    c, h, b = record["controllers"], record["health"], record["bulk"]
    s = record["setup"]
    return (f"{s['clients']} controllers at {s['rate_hz']:g} Hz for {s['seconds']:g} s (max batch {s['max_batch']}): "
            f"round trip p50 {c['p50_ms']:.2f} ms, p99 {c['p99_ms']:.2f} ms, max {c['max_ms']:.2f} ms, "
            f"{len(c['errors'])} errors, {c['late']} late, {c['missed_ticks']} ticks missed\n"
            f"Health: p50 {h['p50_ms']:.2f} ms, p99 {h['p99_ms']:.2f} ms, max {h['max_ms']:.2f} ms, "
            f"{h['over_target']} of {h['count']} at or over {HEALTH_TARGET_MS:g} ms\n"
            f"bulk ({s['max_batch']} rows every {s['bulk_period_s']:g} s): "
            + (f"p50 {b['p50_ms']:.1f} ms, max {b['max_ms']:.1f} ms" if b["count"] else "none")
            + f"\nrestarts {record['restarts']}, idle streams {record['idle_streams_opened']}, "
            f"server memory {record['server_memory_mb']['at_10s']} -> {record['server_memory_mb']['end']} MB, "
            f"server CPU {record['server_cpu_cores']:.2f} cores, all cores {100 * record['machine_cpu_busy']:.0f}% busy")


def export_policy(folder: Path) -> Path:
    """deploy_latency's 4-step 3x512 reflow policy (Hopper's dims) exported to ONNX in ``folder``."""
    from deploy_latency import make_checkpoint

    from flowrl.deploy.export import export

    path = folder / "reflow_k4.onnx"
    export(make_checkpoint(folder / "reflow", "reflow"), path, "onnx", k=4)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8, help="well-behaved controllers (default 8)")
    ap.add_argument("--rate", type=float, default=100.0, help="their control rate in Hz (default 100)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long they run (default 60)")
    ap.add_argument("--restarting", type=int, default=2, help="controllers killed and restarted (default 2)")
    ap.add_argument("--garbage", type=int, default=1, help="clients sending malformed requests (default 1)")
    ap.add_argument("--idle-streams", type=int, default=16, help="idle streams held open (default 16)")
    ap.add_argument("--bulk-period", type=float, default=0.5, help="seconds between max-batch requests (0: none)")
    ap.add_argument("--max-batch", type=int, help="the server's --max-batch (default: its own, measured at start)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        workdir = Path(tmp)
        policy = export_policy(workdir)
        load_before = os.getloadavg()
        record = run_study(policy, workdir, args.clients, args.rate, args.seconds, args.restarting, args.garbage,
                           args.idle_streams, args.bulk_period, max_batch=args.max_batch)
    record["machine"] = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "load_avg_before": load_before,
                         "load_avg_after": os.getloadavg()}
    record["policy"] = "3x512 reflow, K = 4, ONNX Runtime (deploy_latency's), obs 11, act 3, chunks of 4"
    path = write_result("serve_load", record, args.tag, "serving")
    print(summary(record))
    print(f"wrote {path}")
    return report_checks(checks(record))


def client_main(argv: list[str]) -> None:
    """One client of the study: ``--role ROLE ARGS...`` (see :func:`run_study`)."""
    role, args = argv[0], argv[1:]
    if role in ("controller", "restarting"):
        address, rate, seconds, out = args
        controller(address, float(rate), float(seconds), None if out == "-" else Path(out))
    elif role == "garbage":
        address, max_batch, rate, seconds, out = args
        garbage(address, int(max_batch), float(rate), float(seconds), Path(out))
    elif role == "idle":
        address, count, per_client, seconds, out = args
        idle_streams(address, int(count), int(per_client), float(seconds), Path(out))
    elif role == "bulk":
        address, max_batch, period, seconds, out = args
        bulk(address, int(max_batch), float(period), float(seconds), Path(out))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        client_main(sys.argv[2:])
    else:
        sys.exit(run_main(main))
