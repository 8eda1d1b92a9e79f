"""Latency of the deploy runtime on the CPU: ``act`` at batch 1, throughput at larger batches, and
the gRPC round trip on loopback.

    python benchmarks/deploy_latency.py [--iters 2000] [--batches 64 256] [--grpc-iters 1000] [--cpp-client PATH]

Policies (random weights: latency does not depend on them), Hopper's dims (obs 11, act 3), chunks of
4, ReinFlow's architecture (residual MLP 3x512):
- ``3x512 reflow`` at K = 4 and K = 1;
- ``3x512 shortcut`` at K = 1 (a 1-step shortcut policy).
Each runs eagerly (torch), from ONNX (ONNX Runtime, one intra-op and one inter-op thread, sequential)
and from a torch.export program, all with one thread. ``act`` is measured with ``act_steps = 1``,
so that every call runs the network (a call that pops the action queue costs microseconds): the
observation history update, the seeded noise draw, inference and the queue.
Throughput: chunks per second from ``act_chunk`` at each ``--batches`` size, one thread.
Matmul floor: the network's matrix-vector products alone (numpy, batch 1), K times, on the same machine
in the same run: no runtime can run the policy faster on one thread, so it says whether a missed
latency target is the runtime's or the machine's (at batch 1 every step reads all the weights).
gRPC: ``flowrl serve`` of the ONNX exports in a separate process, a client in this one sending one
observation and receiving its chunk (raw float32 bytes), per request; with ``--cpp-client
build/cpp_client/flowrl_client`` also the C++ client, unary and over one stream.

Targets (exit code 1 when missed):
- ONNX Runtime, 4-step 3x512, batch 1: act p99 < 0.5 ms;
- ONNX Runtime, 1-step shortcut, batch 1: act p99 < 0.2 ms;
- gRPC round trip on loopback (4-step 3x512 ONNX): p99 < 2 ms, for each client.
Writes benchmarks/results/deployment/deploy_latency[_<tag>].json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report_checks, run_main, write_result  # noqa: E402

import flowrl.deploy  # noqa: E402
from flowrl.checkpoint import load_policy, save_checkpoint  # noqa: E402
from flowrl.config import PolicyConfig  # noqa: E402
from flowrl.deploy.control import latency_summary  # noqa: E402
from flowrl.deploy.export import export  # noqa: E402
from flowrl.policy import FlowPolicy  # noqa: E402

OBS_DIM, ACT_DIM = 11, 3
POLICIES = [("3x512 reflow", "reflow", 4), ("3x512 reflow", "reflow", 1), ("3x512 shortcut", "shortcut", 1)]


def make_checkpoint(folder: Path, head: str) -> Path:
    torch.manual_seed(0)
    cfg = PolicyConfig(head=head, obs_history=1, horizon=4, act_steps=1, k=4, hidden_dim=512, depth=3)
    return save_checkpoint(folder, FlowPolicy(cfg, OBS_DIM, ACT_DIM), {"task": "Hopper"})


def time_act(policy, iters: int) -> dict:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(iters + 100, OBS_DIM)).astype(np.float32)
    policy.reset(0)
    times = []
    for i, o in enumerate(obs):
        start = time.perf_counter()
        policy.act(o)
        if i >= 100:  # warm-up
            times.append(time.perf_counter() - start)
    return latency_summary(times)


def matmul_floor(checkpoint: Path, k: int, iters: int = 2000) -> float:
    """Median ms of K passes of the velocity network's matrix-vector products at batch 1 (numpy)."""
    policy, _ = load_policy(checkpoint, "cpu")
    weights = [m.weight.detach().numpy().T.copy() for m in policy.velocity_net.modules()
               if isinstance(m, torch.nn.Linear)]
    x = [np.ones((1, w.shape[0]), dtype=np.float32) for w in weights]
    times = []
    for i in range(iters + 100):
        start = time.perf_counter()
        for _ in range(k):
            for v, w in zip(x, weights):
                np.dot(v, w)
        if i >= 100:
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def throughput(policy, batch: int, seconds: float = 1.0) -> float:
    obs = np.random.default_rng(1).normal(size=(batch, 1, OBS_DIM)).astype(np.float32)
    policy.act_chunk(obs)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        policy.act_chunk(obs)
        n += 1
    return n * batch / (time.perf_counter() - start)


def cpp_round_trip(binary: str, address: str, iters: int, stream: bool) -> dict:
    """The C++ client's own timing of ``iters`` round trips (flowrl_client --requests)."""
    out = subprocess.run([binary, "--address", address, "--requests", str(iters), *(["--stream"] if stream else [])],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    line = next(s for s in out.splitlines() if s.startswith("round trip"))
    value = {key: float(line.split(f"{key} ")[1].split(" ms")[0]) for key in ("p50", "p99", "max")}
    return {"count": iters, "p50_ms": value["p50"], "p99_ms": value["p99"], "max_ms": value["max"]}


def grpc_round_trip(path: Path, iters: int, cpp_client: str | None = None) -> dict[str, dict]:
    """Round trips to ``flowrl serve PATH`` in another process: the Python client (unary Act), and with
    ``cpp_client`` the C++ client (unary Act and one StreamAct stream)."""
    from flowrl.deploy.server import PolicyClient

    proc = subprocess.Popen([sys.executable, "-m", "flowrl", "serve", str(path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("serving"):
            raise RuntimeError(f"flowrl serve did not start: {line!r}")
        address = line.rsplit(" on ", 1)[1].strip()
        obs = np.random.default_rng(2).normal(size=(iters + 100, 1, 1, OBS_DIM)).astype(np.float32)
        times = []
        with PolicyClient(address, raw=True) as client:
            for i, o in enumerate(obs):
                start = time.perf_counter()
                client.act(o)
                if i >= 100:
                    times.append(time.perf_counter() - start)
        result = {"python": latency_summary(times)}
        if cpp_client:
            result["cpp"] = cpp_round_trip(cpp_client, address, iters, stream=False)
            result["cpp_stream"] = cpp_round_trip(cpp_client, address, iters, stream=True)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000, help="act calls per row (after 100 of warm-up)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="batch sizes of the throughput rows")
    ap.add_argument("--grpc-iters", type=int, default=1000, help="gRPC round trips (after 100 of warm-up)")
    ap.add_argument("--cpp-client", help="also time this build of flowrl_client (flowrl/deploy/cpp_client)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploy-latency-") as tmp:
        return measure(args, Path(tmp))


def measure(args: argparse.Namespace, tmp: Path) -> int:
    """Export the policies into ``tmp``, time them and the gRPC round trips, write the results, check the targets."""
    ckpts = {head: make_checkpoint(tmp / head, head) for head in ("reflow", "shortcut")}
    rows, record = [], {"machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                                    "load_avg_before": os.getloadavg(), "torch": torch.__version__}}
    exports = {}
    for name, head, k in POLICIES:
        for fmt, suffix in (("onnx", "onnx"), ("torch-export", "pt2")):
            path = tmp / f"{head}_k{k}.{suffix}"
            export(ckpts[head], path, fmt, k=k)
            exports[head, k, fmt] = path
    print(f"{'policy':<16}{'K':>3} {'backend':<14}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          + "".join(f"{'b=' + str(b) + ' /s':>13}" for b in args.batches))
    for name, head, k in POLICIES:
        for backend in ("eager", "onnx", "torch-export"):
            src = ckpts[head] if backend == "eager" else exports[head, k, backend]
            policy = flowrl.deploy.load(src, k=k if backend == "eager" else None)
            lat = time_act(policy, args.iters if backend == "onnx" else max(args.iters // 2, 200))
            tput = {b: throughput(policy, b) for b in args.batches}
            row = {"policy": name, "K": k, "backend": backend, "act": lat, "throughput_per_s": tput}
            rows.append(row)
            print(f"{name:<16}{k:>3} {backend:<14}{lat['p50_ms']:>9.3f}{lat['p99_ms']:>9.3f}{lat['max_ms']:>9.3f}"
                  + "".join(f"{tput[b]:>13.0f}" for b in args.batches), flush=True)
    grpc = {}
    for head, k in (("reflow", 4), ("shortcut", 1)):
        grpc[f"{head} K={k}"] = clients = grpc_round_trip(exports[head, k, "onnx"], args.grpc_iters, args.cpp_client)
        for client, s in clients.items():
            print(f"gRPC round trip, ONNX {head} K={k}, batch 1, {client} client: p50 {s['p50_ms']:.3f} ms, "
                  f"p99 {s['p99_ms']:.3f} ms, max {s['max_ms']:.3f} ms", flush=True)
    floors = {f"{head} K={k}": matmul_floor(ckpts[head], k) for _, head, k in POLICIES}
    for name, ms in floors.items():
        print(f"matmul floor {name}: {ms:.3f} ms (the network's matrix-vector products alone, numpy, batch 1)")
    record.update(rows=rows, grpc=grpc, matmul_floor_ms=floors, load_avg_after=os.getloadavg())
    path = write_result("deploy_latency", record, args.tag, "deployment")
    print(f"load average before {record['machine']['load_avg_before'][0]:.2f}, after {os.getloadavg()[0]:.2f}; "
          f"wrote {path}")

    def p99(head_name: str, k: int) -> float:
        return next(r["act"]["p99_ms"] for r in rows if r["policy"] == head_name and r["K"] == k
                    and r["backend"] == "onnx")

    checks = [
        (f"ONNX 4-step 3x512 act p99 {p99('3x512 reflow', 4):.3f} ms < 0.5 ms (matmul floor "
         f"{floors['reflow K=4']:.3f} ms)", p99("3x512 reflow", 4) < 0.5),
        (f"ONNX 1-step shortcut act p99 {p99('3x512 shortcut', 1):.3f} ms < 0.2 ms (matmul floor "
         f"{floors['shortcut K=1']:.3f} ms)", p99("3x512 shortcut", 1) < 0.2),
    ]
    for client, stats in grpc["reflow K=4"].items():
        checks.append((f"gRPC round trip ({client} client) p99 {stats['p99_ms']:.3f} ms < 2 ms", stats["p99_ms"] < 2.0))
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(run_main(main))
