"""ResFT probe (session 15): held-out reconstruction error of ResFT on Square at initialisation and after
a few hundred MLE steps, with the preset's learning rate or another, optionally after first fitting the
residual's target m(t, obs) to the frozen K-step chain's mean path.

    python resft_probe.py --pretrained CKPT --k 2 --steps 300 [--lr 1e-3] [--warm 300]
"""

import argparse
import time
from pathlib import Path

import torch

from flowrl.agents.mle import MLEFineTuning, held_out_reconstruction
from flowrl.checkpoint import load_policy
from flowrl.config import load_stage_config
from flowrl.datasets import ChunkDataset, read_dataset
from flowrl.sampler import time_grid
from flowrl.training import Trainer

REPO = Path(__file__).resolve().parents[4]


def fit_target_to_mean_path(agent: MLEFineTuning, frozen, k: int, steps: int, draws: int = 8) -> float:
    """Regress the residual's m(t_k, obs) on the mean over noise draws of the frozen chain's state at t_k."""
    residual = agent.model.residual
    opt = torch.optim.Adam(residual.parameters(), lr=1e-3)
    loss = torch.zeros(())
    for _ in range(steps):
        obs, _ = agent.data.batch(torch.randint(0, len(agent.data), (64,)))
        with torch.no_grad():
            cond = frozen.encode(obs).repeat_interleave(draws, 0)
            x = torch.randn(cond.shape[0], *frozen.chunk_shape)
            velocity, targets = frozen.velocity_fn(cond, k), []
            for t in time_grid(k, x.shape[0], x.device, x.dtype):
                targets.append(x.view(-1, draws, *frozen.chunk_shape).mean(1))
                x = x + velocity(t, x) / k
        cond = frozen.encode(obs)
        loss = sum((residual.target_and_gain(t, cond)[0] - target).square().mean()
                   for t, target in zip(time_grid(k, obs.shape[0], obs.device, obs.dtype), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.0, help="0: the preset's")
    ap.add_argument("--warm", type=int, default=0, help="mean-path regression steps before MLE")
    ap.add_argument("--out", default="/tmp/resft-probe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = str(REPO / "data/square-scripted.hdf5")
    frozen, _ = load_policy(args.pretrained, torch.device("cpu"))
    frozen.eval()
    held = ChunkDataset(read_dataset(data).tail(20), 1, 4, torch.device("cpu"))
    overrides = [f"init={args.pretrained}", "seed=1", "device=cpu", "train.method=resft", f"train.num_steps={args.k}",
                 f"train.data={data}", "train.max_episodes=200", "train.eval_every=0", f"train.steps={args.steps}",
                 "eval.backend=cpu", *([f"train.lr={args.lr}"] if args.lr else [])]
    agent = MLEFineTuning(load_stage_config("finetune", REPO / "configs/square/finetune_mle.yaml", overrides))
    start = time.time()
    if args.warm:
        fit_target_to_mean_path(agent, frozen, args.k, args.warm)
    agent.policy.eval()
    before = held_out_reconstruction(agent.policy, held, args.k, reference=frozen)
    agent.policy.train()
    run = Trainer(agent, Path(args.out) / f"k{args.k}-{int(start)}", progress=False)
    try:
        run.fit()
    finally:
        run.close()
    agent.policy.eval()
    after = held_out_reconstruction(agent.policy, held, args.k, reference=frozen)
    print(f"K={args.k} lr={agent.cfg.train.lr:g} warm={args.warm}: gain_min {float(agent.model.residual.gain_min):.3f}, "
          f"held-out MSE {before:.5f} -> {after:.5f} after {args.steps} steps ({time.time() - start:.0f} s); "
          f"pretrained {held_out_reconstruction(frozen, held, args.k, reference=frozen):.5f}")


if __name__ == "__main__":
    main()
