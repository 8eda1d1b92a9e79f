"""Latency of the deploy runtime on the CPU, held to targets relative to the machine it runs on:
ONNX Runtime's batch-1 inference against the bare matrix-product floor of the same network.

    python benchmarks/deploy_latency.py [--iters 2000] [--batches 64 256] [--grpc-iters 1000] [--cpp-client PATH]

Policies (random weights: latency does not depend on them), Hopper's dims (obs 11, act 3), chunks of
4, ReinFlow's architecture (residual MLP 3x512): ``3x512 reflow`` at K = 4, 2 and 1, and ``3x512
meanflow`` at K = 1 (a one-step head: its step-size embedding is folded into the graph like the time's).

- Matmul floor: the matrix-vector products the exported graph does (numpy, batch 1, one thread), taken
  from the export's own :class:`~flowrl.deploy.export.UnrolledSampler`: the observation columns of the
  input layer once per call, then per Euler step its action columns, the residual blocks' layers and
  the output layer (the time embeddings are a per-step bias in the export, no product). No runtime
  runs that graph faster on one thread (at batch 1 every step reads all its weights), so it is the
  machine's bound, measured on the machine.
- ONNX Runtime inference: one call of the exported graph at batch 1 (one intra-op and one inter-op
  thread, sequential). The floor and ONNX Runtime are timed in 10 alternating blocks, each a warm loop of
  its own (100 calls of warm-up, then a tenth of the timed ones): call by call, each would find the
  caches holding the other's weights, which slows it; one loop each, a slow stretch of a shared machine
  would fall on one of them only. The floor's own p99 shows how much of a tail is the machine's.
- ``act`` at batch 1 with ``act_steps = 1`` (every call runs the network: the observation history, the
  seeded noise draw, inference and the action queue), eagerly (torch), from ONNX and from a
  torch.export program; chunks per second from ``act_chunk`` at each ``--batches`` size.
- gRPC: ``flowrl serve`` of the ONNX exports (4-step reflow, 1-step meanflow) in another process, the
  Python client here (and with ``--cpp-client build/cpp_client/flowrl_client`` the C++ client, unary and
  over one stream); reported, not held to a target (loopback networking is not the runtime's).

Targets, at K = 4 and K = 1 (exit code 1 when one is missed): ONNX Runtime inference p50 within 1.3x of
the matmul floor's p50, and its p99 within 2x of it. The record names the CPU model and the load
average before and after. Writes benchmarks/results/deployment/deploy_latency[_<tag>].json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLOWRL_CLI, cpu_model, report_checks, run_main, write_result  # noqa: E402

import flowrl.deploy  # noqa: E402
from flowrl.checkpoint import load_policy, save_checkpoint  # noqa: E402
from flowrl.config import PolicyConfig  # noqa: E402
from flowrl.deploy.control import latency_summary  # noqa: E402
from flowrl.deploy.export import UnrolledSampler, export  # noqa: E402
from flowrl.deploy.runtime import make_backend  # noqa: E402
from flowrl.policy import FlowPolicy  # noqa: E402

OBS_DIM, ACT_DIM = 11, 3
POLICIES = [("3x512 reflow", "reflow", 4), ("3x512 reflow", "reflow", 2), ("3x512 reflow", "reflow", 1),
            ("3x512 meanflow", "meanflow", 1)]
TARGET_KS = (1, 4)
P50_RATIO, P99_RATIO = 1.3, 2.0
"""ONNX Runtime inference p50 and p99 at most these multiples of the matmul floor's p50 (K in TARGET_KS)."""


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


def floor_pass(checkpoint: Path, k: int):
    """One call's matrix-vector products of the K-step export of ``checkpoint`` at batch 1 (numpy): the
    matmul floor. The matrices are the :class:`UnrolledSampler`'s: its observation columns once, then per
    step its action columns, each residual block's two layers and the output layer."""
    policy, _ = load_policy(checkpoint, "cpu")
    sampler = UnrolledSampler(policy, k)
    if not sampler.fused:
        raise RuntimeError(f"{checkpoint}: the export is not the fused graph; the floor knows that one only")
    w_obs = sampler.w_obs.numpy().copy()
    per_step = [sampler.w_action.numpy().copy()]
    per_step += [m.weight.detach().numpy().T.copy() for part in (sampler.blocks, sampler.out)
                 for m in part.modules() if isinstance(m, torch.nn.Linear)]
    z = np.ones((1, w_obs.shape[0]), dtype=np.float32)
    x = [np.ones((1, w.shape[0]), dtype=np.float32) for w in per_step]

    def run() -> None:
        np.dot(z, w_obs)
        for _ in range(k):
            for v, w in zip(x, per_step):
                np.dot(v, w)
    return run


BLOCKS = 10
"""The floor and ONNX Runtime are timed in this many alternating blocks (module doc)."""


def warm_times(fn, iters: int, warmup: int = 100) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones, nothing else in between."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def inference_against_floor(onnx_path: Path, checkpoint: Path, k: int, iters: int) -> dict:
    """ONNX Runtime's batch-1 inference of ``onnx_path`` (the export of ``checkpoint`` at K = ``k``) and the
    matmul floor of the same export, timed in :data:`BLOCKS` alternating warm loops of ``iters / BLOCKS``
    calls each: both latency summaries (over all their blocks) and the ratios the targets are on."""
    run = make_backend(onnx_path, "onnx", threads=1)
    policy, _ = load_policy(checkpoint, "cpu")
    rng = np.random.default_rng(3)
    obs = rng.normal(size=(1, policy.cfg.obs_history, policy.obs_dim)).astype(np.float32)
    noise = rng.normal(size=(1, *policy.chunk_shape)).astype(np.float32)
    floor, per_block = floor_pass(checkpoint, k), max(iters // BLOCKS, 1)
    mm_times, ort_times = [], []
    for _ in range(BLOCKS):
        mm_times += warm_times(floor, per_block)
        ort_times += warm_times(lambda: run(obs, noise), per_block)
    mm, ort = latency_summary(mm_times), latency_summary(ort_times)
    return {"onnx": ort, "floor": mm, "p50_ratio": ort["p50_ms"] / mm["p50_ms"],
            "p99_ratio": ort["p99_ms"] / mm["p50_ms"]}


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

    proc = subprocess.Popen([*FLOWRL_CLI, "serve", str(path), "--port", "0"],
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
    ap.add_argument("--iters", type=int, default=2000, help="timed calls per row (after 100 of warm-up)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="batch sizes of the throughput rows")
    ap.add_argument("--grpc-iters", type=int, default=1000, help="gRPC round trips (after 100 of warm-up; 0: none)")
    ap.add_argument("--cpp-client", help="also time this build of flowrl_client (flowrl/deploy/cpp_client)")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploy-latency-") as tmp:
        return measure(args, Path(tmp))


def measure(args: argparse.Namespace, tmp: Path) -> int:
    """Export the policies into ``tmp``, time them and the gRPC round trips, write the results, check the targets."""
    ckpts = {head: make_checkpoint(tmp / head, head) for head in {head for _, head, _ in POLICIES}}
    rows, record = [], {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_before": os.getloadavg(),
                                    "torch": torch.__version__, "onnxruntime": onnxruntime_version()}}
    exports = {}
    for name, head, k in POLICIES:
        for fmt, suffix in (("onnx", "onnx"), ("torch-export", "pt2")):
            path = tmp / f"{head}_k{k}.{suffix}"
            export(ckpts[head], path, fmt, k=k)
            exports[head, k, fmt] = path
    print(f"CPU: {record['machine']['cpu']} ({os.cpu_count()} cores), one thread")
    print(f"{'policy':<16}{'K':>3} {'ORT p50 ms':>11}{'ORT p99 ms':>11}{'floor ms':>10}{'p50/floor':>11}"
          f"{'p99/floor':>11}{'floor p99 ms':>14}")
    inference = {}
    for name, head, k in POLICIES:
        r = inference_against_floor(exports[head, k, "onnx"], ckpts[head], k, args.iters)
        inference[f"{head} K={k}"] = r
        print(f"{name:<16}{k:>3} {r['onnx']['p50_ms']:>11.3f}{r['onnx']['p99_ms']:>11.3f}{r['floor']['p50_ms']:>10.3f}"
              f"{r['p50_ratio']:>10.2f}x{r['p99_ratio']:>10.2f}x{r['floor']['p99_ms']:>14.3f}", flush=True)
    print(f"\n{'policy':<16}{'K':>3} {'act backend':<14}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
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
    if args.grpc_iters > 0:
        for head, k in (("reflow", 4), ("meanflow", 1)):
            grpc[f"{head} K={k}"] = clients = grpc_round_trip(exports[head, k, "onnx"], args.grpc_iters,
                                                              args.cpp_client)
            for client, stat in clients.items():
                print(f"gRPC round trip, ONNX {head} K={k}, batch 1, {client} client: p50 {stat['p50_ms']:.3f} ms, "
                      f"p99 {stat['p99_ms']:.3f} ms, max {stat['max_ms']:.3f} ms", flush=True)
    record["machine"]["load_avg_after"] = os.getloadavg()
    record.update(inference=inference, rows=rows, grpc=grpc,
                  targets={"ks": list(TARGET_KS), "p50_ratio": P50_RATIO, "p99_ratio": P99_RATIO})
    path = write_result("deploy_latency", record, args.tag, "deployment")
    print(f"load average before {record['machine']['load_avg_before'][0]:.2f}, after "
          f"{record['machine']['load_avg_after'][0]:.2f}; wrote {path}")
    checks = []
    for name, r in inference.items():
        if int(name.rsplit("=", 1)[1]) not in TARGET_KS:
            continue
        checks.append((f"ONNX Runtime {name} p50 {r['onnx']['p50_ms']:.3f} ms = {r['p50_ratio']:.2f}x the matmul floor "
                       f"({r['floor']['p50_ms']:.3f} ms) <= {P50_RATIO}x", r["p50_ratio"] <= P50_RATIO))
        checks.append((f"ONNX Runtime {name} p99 {r['onnx']['p99_ms']:.3f} ms = {r['p99_ratio']:.2f}x the matmul floor "
                       f"<= {P99_RATIO}x", r["p99_ratio"] <= P99_RATIO))
    return report_checks(checks)


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    sys.exit(run_main(main))
