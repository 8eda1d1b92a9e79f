"""Env steps per second of each backend, beside the raw simulator and gymnasium's vector envs.

    python benchmarks/env_throughput.py [--task Hopper] [--num-envs 64 256 1024 4096 16384 65536]
                                        [--seconds 2] [--device cuda] [--threads 0] [--tag NAME]
    python benchmarks/env_throughput.py --task robosuite/Lift --num-envs 1024 4096 16384 [--robosuite-envs 16]
        [--cameras agentview --image-size 84]

Manipulation tasks (``robosuite/...``, OSC_POSE at robosuite's timing: 20 Hz control, 25 physics
substeps): our warp backend with random actions (each control step one CUDA graph, and for comparison
the controller launched between per-stage graphs) and with a K=4 flow policy (3x512) choosing chunks
of 4 actions, the cpu backend at up to ``--cpu-max-envs``, beside robosuite's own worker processes
(one per env, ``--robosuite-envs``, default one per core). Target: warp >= 50k env steps/s and
>= 40x robosuite's workers on the same machine. With ``--cameras agentview [--image-size 84]``: the warp
backend with MuJoCo Warp's batched renderer drawing the cameras after every env step, and a K=4 pixel
flow policy choosing 4-action chunks from the images rendered at each decision; target (one 84x84
camera): >= 30k env steps/s rendered every step.

Rows (env steps/s; an env step of Hopper/Walker2d is 4 physics steps, Ant/Humanoid 5):
- raw mujoco.batch: ``Batch.step(nstep=frame_skip)`` with constant controls, no task logic;
- cpu: our cpu backend with random actions (observations, rewards, resets included);
- cpu + policy: the rollout loop with a K=4 flow policy (3x512) choosing chunks of 4 actions;
- gymnasium sync / async: gymnasium's own vector envs, random actions, at ``--gym-envs`` (async:
  one process per env; the reference ReinFlow setup is 40).
Targets (exit code 1 when missed, at the largest num_envs measured for both):
- cpu env loop >= 80% of the raw mujoco.batch rate;
- cpu env loop >= 5x gymnasium's async vector env.
Writes benchmarks/results/throughput/env_throughput_<task>[_<tag>].json (with ``--cameras``:
benchmarks/results/pixels/).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from common import report_checks, results_dir, run_main, write_json
from flowrl.config import PolicyConfig
from flowrl.envs import make
from flowrl.envs.cameras import camera_renderer
from flowrl.envs import resolve_task
from flowrl.rollout import ObsHistory
from flowrl.policy import FlowPolicy


def timed(step, seconds: float, warmup: int = 3) -> float:
    """Calls per second of ``step`` over at least ``seconds``."""
    for _ in range(warmup):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        step()
        n += 1
    return n / (time.perf_counter() - start)


def raw_batch(task: str, n: int, seconds: float, threads: int) -> float:
    from mujoco.batch import Batch

    spec = resolve_task(task).task()
    batch = Batch(spec.load_model(), n, threads, persistent=True)
    ctrl = batch.bind("ctrl")
    ctrl[:] = 0.1
    return n * timed(lambda: batch.step(nstep=spec.frame_skip), seconds)


def backend_loop(task: str, n: int, seconds: float, threads: int, backend: str = "cpu", device: str = "cpu") -> float:
    env = make(task, n, backend=backend, seed=0, device=device, **({"threads": threads} if backend == "cpu" else {}))
    env.reset()
    gen = torch.Generator().manual_seed(0)
    actions = [(torch.rand(n, env.act_dim, generator=gen) * 2 - 1).to(device) for _ in range(8)]
    i = [0]

    def step():
        env.step(actions[i[0] % 8])
        i[0] += 1

    rate = n * timed(step, seconds)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return rate


def policy_loop(task: str, n: int, seconds: float, threads: int, device: str, backend: str = "cpu",
                cameras: Sequence[str] = (), image_size: int = 84) -> float:
    """Env steps/s of a K=4 flow policy (3x512) choosing 4-action chunks; with ``cameras`` a pixel policy
    (image encoder) that sees them, rendered at each decision by the backend's renderer."""
    env = make(task, n, backend=backend, seed=0, device=device, images=bool(cameras),
               **({"threads": threads} if backend == "cpu" else {}))
    renderer = camera_renderer(env, cameras, image_size, image_size) if cameras else None
    torch.manual_seed(0)
    policy = FlowPolicy(PolicyConfig(cameras=list(cameras), image_size=image_size), env.obs_dim,
                        env.act_dim).to(device).eval()
    history = ObsHistory(env.reset(), 1)
    gen = torch.Generator(device=device).manual_seed(0)

    def chunk():
        images = renderer.render() if renderer else None
        actions = policy.predict(history.get(), k=4, generator=gen, images=images)
        history.push_chunk(env.step_chunk(actions.clamp(-1, 1)))

    rate = 4 * n * timed(chunk, seconds, warmup=1)
    if renderer:
        renderer.close()
    env.close()
    return rate


def chunk_loop(task: str, n: int, seconds: float, backend: str, device: str, chunk_len: int = 4,
               cameras: Sequence[str] = (), image_size: int = 84, **env_kwargs) -> float:
    """Env steps/s of random ``chunk_len``-action chunks (robosuite's workers take a chunk in one round
    trip); with ``cameras`` their images rendered after every chunk by the backend's renderer."""
    env = make(task, n, backend=backend, seed=0, device=device, images=bool(cameras), **env_kwargs)
    env.reset()
    renderer = camera_renderer(env, cameras, image_size, image_size) if cameras else None
    gen = torch.Generator().manual_seed(0)
    actions = [(torch.rand(n, chunk_len, env.act_dim, generator=gen) * 2 - 1).to(device) for _ in range(4)]
    i = [0]

    def step():
        env.step_chunk(actions[i[0] % 4])
        if renderer:
            renderer.render()
        i[0] += 1

    rate = chunk_len * n * timed(step, seconds, warmup=1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if renderer:
        renderer.close()
    env.close()
    return rate


def manipulation(args: argparse.Namespace, machine: dict, use_warp: bool) -> int:
    """Rows and targets of a manipulation task (see the module docstring)."""
    robo_n = args.robosuite_envs or os.cpu_count() or 1
    if args.robosuite_rate:  # measured before on this machine (a machine without robosuite installed)
        robosuite_rate = args.robosuite_rate
    else:
        robosuite_rate = chunk_loop(args.task, robo_n, max(args.seconds, 5.0), "robosuite", "cpu")
    print(f"  robosuite workers ({robo_n}): {robosuite_rate:.0f} env steps/s", file=sys.stderr, flush=True)
    rows = []
    for n in args.num_envs:
        row: dict = {"num_envs": n}
        if n <= args.cpu_max_envs:
            row["cpu"] = chunk_loop(args.task, n, args.seconds, "cpu", "cpu")
        if use_warp:
            row["warp"] = chunk_loop(args.task, n, args.seconds, "warp", "cuda")
            row["warp_stage_graphs"] = chunk_loop(args.task, n, args.seconds, "warp", "cuda", capture_controller=False)
            row["warp_policy"] = policy_loop(args.task, n, args.seconds, 0, "cuda", "warp")
        if args.cameras and (use_warp or args.warp_device == "cpu"):
            dev = args.warp_device
            row["warp_render"] = chunk_loop(args.task, n, args.seconds, "warp", dev, chunk_len=1, cameras=args.cameras,
                                            image_size=args.image_size)
            row["warp_render_policy"] = policy_loop(args.task, n, args.seconds, 0, dev, "warp", args.cameras,
                                                    args.image_size)
        rows.append(row)
        print(f"  measured num_envs={n}: {row}", file=sys.stderr, flush=True)
    print(f"\n{args.task} env steps/s (OSC_POSE, 25 substeps per env step) on {machine['cores']} cores"
          f"{', ' + machine['gpu'] if machine['gpu'] else ''}; robosuite's {robo_n} worker processes: "
          f"{robosuite_rate:.0f}")
    head = (f"{'num_envs':>9} {'cpu':>11} {'warp (GPU)':>11} {'stage graphs':>13} {'warp+policy':>12}"
            f" {'warp / robosuite':>17}")
    print(head)
    print("-" * len(head))
    f = lambda r, k: f"{r[k]:>11.0f}" if k in r else f"{'-':>11}"  # noqa: E731
    for r in rows:
        ratio = f"{r['warp'] / robosuite_rate:>16.0f}x" if "warp" in r else f"{'-':>17}"
        print(f"{r['num_envs']:>9} {f(r, 'cpu')} {f(r, 'warp')} {f(r, 'warp_stage_graphs'):>13}"
              f" {f(r, 'warp_policy'):>12} {ratio}")
    print("warp: each control step (goal, 25 substeps of torques and physics) replayed as one CUDA graph; "
          "stage graphs: the controller's torch code launched between captured physics stages")
    rendered = [r for r in rows if "warp_render" in r]
    if rendered:
        size = args.image_size
        print(f"\nwith {', '.join(args.cameras)} at {size}x{size} (MuJoCo Warp's ray tracer on {args.warp_device})")
        print(f"{'num_envs':>9} {'render every step':>18} {'K=4 pixel policy':>17}")
        for r in rendered:
            print(f"{r['num_envs']:>9} {r['warp_render']:>18.0f} {r['warp_render_policy']:>17.0f}")
    checks = []
    if use_warp:
        top = max(r["warp"] for r in rows)
        checks += [(f"warp >= 50k env steps/s ({top:.0f})", top >= 5e4),
                   (f"warp >= 40x robosuite's {robo_n} workers ({top / robosuite_rate:.0f}x)", top >= 40 * robosuite_rate)]
        if rendered and len(args.cameras) == 1 and args.image_size == 84:
            best = max(r["warp_render"] for r in rendered)
            checks.append((f"warp with one 84x84 camera rendered every step >= 30k env steps/s ({best:.0f})",
                           best >= 3e4))
    name = args.task.lower().replace("/", "_") + (f"_{args.tag}" if args.tag else "")
    write_json(results_dir("pixels" if args.cameras else "throughput") / f"env_throughput_{name}.json",
               {"task": args.task, "machine": machine, "robosuite_workers": robo_n, "robosuite": robosuite_rate,
                "rows": rows, "checks": [{"check": t, "pass": bool(ok)} for t, ok in checks]})
    return report_checks(checks, require_some=use_warp)


def gymnasium_loop(task: str, n: int, seconds: float, mode: str) -> float:
    import gymnasium as gym

    spec = resolve_task(task)
    venv = gym.make_vec(spec.gym_id, num_envs=n, vectorization_mode=mode,
                        vector_kwargs=dict(autoreset_mode=gym.vector.AutoresetMode.SAME_STEP))
    venv.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = [rng.uniform(-1, 1, size=venv.action_space.shape).astype(np.float32) for _ in range(8)]
    i = [0]

    def step():
        venv.step(actions[i[0] % 8])
        i[0] += 1

    try:
        return n * timed(step, seconds)
    finally:
        venv.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="Hopper")
    ap.add_argument("--num-envs", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384, 65536])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=0, help="mujoco.batch threads (0: all cores)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="policy device")
    ap.add_argument("--cpu-max-envs", type=int, default=16384, help="largest num_envs for the cpu backend")
    ap.add_argument("--gym-envs", type=int, nargs="+", default=[16, 40, 128],
                    help="num_envs for gymnasium's sync and async vector envs")
    ap.add_argument("--robosuite-envs", type=int, default=0,
                    help="manipulation tasks: robosuite worker processes to compare with (0: one per core)")
    ap.add_argument("--robosuite-rate", type=float, default=0.0,
                    help="robosuite's env steps/s measured before on this machine with --robosuite-envs workers "
                         "(benchmarks/robosuite_throughput.py), instead of measuring it here")
    ap.add_argument("--cameras", nargs="+", default=[],
                    help="manipulation tasks: also measure the warp backend with these cameras rendered by MuJoCo "
                         "Warp (e.g. agentview)")
    ap.add_argument("--image-size", type=int, default=84, help="with --cameras: square image size")
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. the machine)")
    ap.add_argument("--warp-device", default="cuda",
                    help="with --cameras: device of the rendering rows (cpu: Warp's CPU device, a smoke run)")
    args = ap.parse_args()

    from flowrl.envs import warp_available

    use_warp = torch.cuda.is_available() and warp_available()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if resolve_task(args.task).family == "robosuite":
        return manipulation(args, machine, use_warp)
    # gymnasium's subprocesses first, while this process is small (fork copies its address space)
    gym_rows = [{"num_envs": n, "gym_sync": gymnasium_loop(args.task, n, args.seconds, "sync"),
                 "gym_async": gymnasium_loop(args.task, n, args.seconds, "async")} for n in args.gym_envs]
    rows = []
    for n in args.num_envs:
        row = {"num_envs": n}
        if n <= args.cpu_max_envs:
            row.update(raw=raw_batch(args.task, n, args.seconds, args.threads),
                       cpu=backend_loop(args.task, n, args.seconds, args.threads),
                       cpu_policy=policy_loop(args.task, n, args.seconds, args.threads, args.device))
        if use_warp:
            row.update(warp=backend_loop(args.task, n, args.seconds, 0, "warp", "cuda"),
                       warp_policy=policy_loop(args.task, n, args.seconds, 0, "cuda", "warp"))
        rows.append(row)
        print(f"  measured num_envs={n}", file=sys.stderr, flush=True)
    best_async = max((r["gym_async"] for r in gym_rows), default=float("nan"))
    print(f"\n{args.task} env steps/s on {machine['cores']} cores ({machine['cpu']}); policy on {args.device}"
          f"{' (' + machine['gpu'] + ')' if machine['gpu'] and args.device.startswith('cuda') else ''}")
    head = (f"{'num_envs':>9} {'raw batch':>11} {'cpu':>11} {'cpu/raw':>8} {'cpu+policy':>11}"
            f"{'  warp (GPU)':>12} {'warp+policy':>12}")
    print(head)
    print("-" * len(head))
    f = lambda r, k: f"{r[k]:>11.0f}" if k in r else f"{'-':>11}"  # noqa: E731
    for r in rows:
        ratio = f"{r['cpu'] / r['raw']:>8.0%}" if "cpu" in r else f"{'-':>8}"
        print(f"{r['num_envs']:>9} {f(r, 'raw')} {f(r, 'cpu')} {ratio} {f(r, 'cpu_policy')} {f(r, 'warp')} "
              f"{f(r, 'warp_policy')}")
    print(f"\n{'num_envs':>9} {'gym sync':>11} {'gym async':>11}")
    for r in gym_rows:
        print(f"{r['num_envs']:>9} {r['gym_sync']:>11.0f} {r['gym_async']:>11.0f}")
    best = max((r for r in rows if "cpu" in r), key=lambda r: r["cpu"])
    checks = [(f"cpu env loop >= 80% of raw mujoco.batch (at {best['num_envs']} envs: {best['cpu'] / best['raw']:.0%})",
               best["cpu"] >= 0.8 * best["raw"])]
    if best_async == best_async:
        checks.append((f"cpu env loop >= 5x gymnasium async ({best['cpu']:.0f} vs {best_async:.0f}: "
                       f"{best['cpu'] / best_async:.1f}x)", best["cpu"] >= 5 * best_async))
    if use_warp:
        big = [r for r in rows if r["num_envs"] >= 16384 and "warp_policy" in r]
        top = max((r["warp_policy"] for r in big), default=0.0)
        checks.append((f"warp rollout loop with the policy >= 1.5M env steps/s at 16k+ envs ({top:.0f})", top >= 1.5e6))
    name = args.task.lower() + (f"_{args.tag}" if args.tag else "")
    write_json(results_dir("throughput") / f"env_throughput_{name}.json",
               {"task": args.task, "machine": machine, "policy_device": args.device, "rows": rows,
                "gymnasium": gym_rows, "checks": [{"check": t, "pass": bool(ok)} for t, ok in checks]})
    return report_checks(checks)


if __name__ == "__main__":
    sys.exit(run_main(main))
