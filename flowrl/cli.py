"""The ``flowrl`` command: every stage of the pipeline from the shell.

Errors a user can cause print one line and exit with code 2; see ``flowrl COMMAND --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from flowrl.errors import FlowrlError

EPILOG = """stages:
  flowrl expert Hopper --out experts/hopper           train a Stable-Baselines3 expert (with snapshots)
  flowrl collect experts/hopper --level medium --episodes 100 --out data/hopper-medium.hdf5
  flowrl pretrain configs/hopper/pretrain_reflow.yaml  behaviour cloning, then evaluation
  flowrl finetune configs/hopper/finetune_reflow.yaml --init runs/NAME   ReinFlow fine-tuning
  flowrl eval runs/NAME --steps 1 2 4 8                evaluate a checkpoint at several K
  flowrl data info data/hopper-medium.hdf5             summarise any supported dataset
  flowrl config describe                               every config key, its default and meaning
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl", description="Flow-matching robot policies: pretrain, fine-tune, "
                                "evaluate, deploy.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser("pretrain", help="behaviour cloning of a flow policy on demonstrations",
                         description="Behaviour cloning of a flow or shortcut policy on demonstrations, with "
                         "periodic evaluation, checkpoints, TensorBoard logs and a final evaluation table.")
    pre.add_argument("config", help="YAML preset (only overrides of the defaults; see `flowrl config describe`)")
    pre.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 policy.head=shortcut")
    pre.add_argument("--steps", type=int, help="total gradient steps (same as train.steps=N)")
    pre.add_argument("--out", help="run folder (default: runs/<task>-pretrain-<head>-<time>)")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    pre.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")

    ft = sub.add_parser("finetune", help="fine-tune a pretrained policy online with ReinFlow (noise-injected PPO)",
                        description="ReinFlow: PPO over the flow's Euler chain with injected noise, from a pretrained "
                        "checkpoint; periodic evaluation of the deterministic policy, best and last checkpoints, "
                        "TensorBoard logs, a final evaluation table.")
    ft.add_argument("config", help="YAML preset (see `flowrl config describe finetune`)")
    ft.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.num_envs=512")
    ft.add_argument("--init", help="pretrained checkpoint (or run folder) to start from (same as init=PATH)")
    ft.add_argument("--steps", type=int, help="env-step budget (same as train.env_steps=N)")
    ft.add_argument("--out", help="run folder (default: runs/<task>-finetune-<head>-<time>)")
    ft.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    ft.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser("eval", help="evaluate a checkpoint at several K",
                        description="Evaluate the deterministic policy of a checkpoint (or of a run folder's "
                        "latest checkpoint) at each K; prints a table and writes eval.json in the run folder.")
    ev.add_argument("checkpoint", help="checkpoint folder or run folder")
    ev.add_argument("--episodes", type=int, default=10, help="episodes per K (default 10)")
    ev.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="values of K (default 1 2 4 8)")
    ev.add_argument("--seed", type=int, default=100000, help="env i is seeded seed+i (default 100000)")
    ev.add_argument("--backend", default="auto", help="simulation backend (default auto)")
    ev.add_argument("--device", default="cpu", help="torch device of the policy (default cpu)")
    ev.add_argument("--max-envs", type=int, default=0,
                    help="envs stepped at once; episodes run in rounds of this many (default 64; robosuite: "
                    "the number of CPU cores, one worker process each)")
    ev.add_argument("--end-on-success", action="store_true",
                    help="end each episode at its first success (robomimic's rollouts; same success rate, faster)")
    ev.add_argument("--video", action="store_true", help="also write one mp4 per K into the run folder's videos/")
    ev.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")

    data = sub.add_parser("data", help="inspect datasets").add_subparsers(dest="data_command", required=True,
                                                                           metavar="SUBCOMMAND")
    info = data.add_parser("info", help="format, episodes, transitions, dims and return statistics of a dataset")
    info.add_argument("path", help="HDF5 file: flowrl, D4RL, robomimic or Minari layout (detected)")
    info.add_argument("--json", action="store_true", help="print JSON with keys format, episodes, transitions, "
                      "obs_dim, act_dim, return_mean, return_std")

    ex = sub.add_parser("expert", help="train a Stable-Baselines3 PPO expert with snapshots",
                        description="Train PPO on a MuJoCo task; snapshots every --snapshot-every steps are "
                        "evaluated; expert.json names the best (`expert`) and the one closest to the task's "
                        "medium return (`medium`).")
    ex.add_argument("task", help="Hopper, Walker2d, HalfCheetah, Ant, Humanoid or Humanoid-Newton (Newton solver; "
                    "needs --backend cpu or warp)")
    ex.add_argument("--steps", type=int, default=1_000_000, help="env steps (default 1e6)")
    ex.add_argument("--out", help="expert folder (default experts/<task>)")
    ex.add_argument("--seed", type=int, default=0, help="seed of PPO and of the envs (default 0)")
    ex.add_argument("--num-envs", type=int, default=8, help="envs stepped together (default 8)")
    ex.add_argument("--snapshot-every", type=int, default=50_000,
                    help="env steps between evaluated snapshots (default 50000)")
    ex.add_argument("--backend", default="gymnasium", choices=["gymnasium", "cpu", "warp"],
                    help="gymnasium (default; SB3's vector env, small PPO batches, how the shipped data was "
                    "made) or one of our batched envs with ~32k-step PPO batches, for hundreds of envs "
                    "(e.g. flowrl expert Humanoid-Newton --backend warp --device cuda --num-envs 2048)")
    ex.add_argument("--device", default="cpu", help="torch device of PPO and of a batched env (default cpu)")

    co = sub.add_parser("collect", help="roll a policy out into a demonstration dataset",
                        description="Roll an expert (flowrl expert folder) or a flowrl checkpoint out into an "
                        "HDF5 dataset of our layout.")
    co.add_argument("source", help="expert folder, policy checkpoint, or `scripted` (robosuite tasks; needs --task)")
    co.add_argument("--out", required=True, help="dataset file to write (.hdf5)")
    co.add_argument("--level", default="expert", help="expert folders: medium, expert or a snapshot step")
    co.add_argument("--episodes", type=int, default=100)
    co.add_argument("--noise", type=float, default=0.0, help="std of Gaussian action noise (default 0)")
    co.add_argument("--seed", type=int, default=0, help="episode i is seeded seed+i")
    co.add_argument("--task", help="the task (scripted experts; overrides a checkpoint's or an expert folder's, "
                    "e.g. Humanoid for an expert trained on Humanoid-Newton)")
    co.add_argument("--format", default="flowrl", choices=["flowrl", "robomimic"], help="dataset layout to write")
    co.add_argument("--num-envs", type=int, default=16)
    co.add_argument("--backend", default="gymnasium", choices=["gymnasium", "cpu"],
                    help="MuJoCo tasks: gymnasium (default) or our cpu backend (needed for Humanoid-Newton)")
    co.add_argument("--after-success", type=int, default=10,
                    help="tasks with success (robosuite): cut each episode this many steps after its first "
                    "success, as robomimic's demonstrations end (default 10; -1 keeps whole episodes)")
    co.add_argument("--keep-failures", action="store_true",
                    help="keep episodes that never succeed (default: drop them and collect more)")

    cf = sub.add_parser("config", help="show the config schema or a resolved config").add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND")
    desc = cf.add_parser("describe", help="every config key with its default and meaning")
    desc.add_argument("stage", nargs="?", default="pretrain", choices=["pretrain", "finetune"])
    show = cf.add_parser("show", help="the resolved config of a preset plus overrides")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    return p


def cmd_pretrain(args: argparse.Namespace) -> None:
    from flowrl.agents.bc import BehaviorCloning
    from flowrl.config import PretrainConfig, load_config
    from flowrl.run import RunFolder

    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    cfg = load_config(PretrainConfig, args.config, overrides)
    if args.resume and not args.out:
        raise FlowrlError("--resume needs --out RUN_FOLDER")
    out = args.out or os.path.join("runs", RunFolder.default_name("pretrain", cfg.task, cfg.policy.head))
    bc = BehaviorCloning(cfg, out, resume=args.resume, progress=not args.quiet)
    print(f"run folder: {bc.run.path}  (tensorboard --logdir {bc.run.path})", file=sys.stderr)
    try:
        bc.learn()
        if not args.no_eval:
            bc.final_evaluation()
    finally:
        bc.close()
    bc.run.close()


def cmd_finetune(args: argparse.Namespace) -> None:
    from flowrl.agents.reinflow import ReinFlow
    from flowrl.checkpoint import read_config, resolve_checkpoint
    from flowrl.config import FinetuneConfig, load_config
    from flowrl.run import RunFolder

    overrides = list(args.overrides)
    if args.init:
        overrides.append(f"init={resolve_checkpoint(args.init)}")
    if args.steps is not None:
        overrides.append(f"train.env_steps={args.steps}")
    cfg = load_config(FinetuneConfig, args.config, overrides)
    if args.resume and not args.out:
        raise FlowrlError("--resume needs --out RUN_FOLDER")
    if not cfg.init:
        raise FlowrlError("config: init: the pretrained checkpoint is required (--init PATH)")
    init = read_config(resolve_checkpoint(cfg.init))
    task = cfg.task or init.get("task", "task")
    out = args.out or os.path.join("runs", RunFolder.default_name("finetune", task, init["policy"]["head"]))
    agent = ReinFlow(cfg, out, resume=args.resume, progress=not args.quiet)
    print(f"run folder: {agent.run.path}  (tensorboard --logdir {agent.run.path}); {agent.iterations} iterations "
          f"of {agent.steps_per_iteration} env steps", file=sys.stderr)
    try:
        agent.learn()
        if not args.no_eval:
            agent.final_evaluation()
    finally:
        agent.close()
    agent.run.close()


def cmd_eval(args: argparse.Namespace) -> None:
    from flowrl.checkpoint import load_policy, resolve_checkpoint
    from flowrl.evaluation import Evaluator, record_video
    from flowrl.io import write_json
    from flowrl.run import format_eval_table

    if args.episodes < 1 or any(k < 1 for k in args.steps):
        raise FlowrlError("--episodes and --steps must be >= 1")
    folder = resolve_checkpoint(args.checkpoint)
    policy, config = load_policy(folder, args.device)
    task = config.get("task")
    if not task:
        raise FlowrlError(f"{folder}/config.json: missing key 'task'")
    if args.max_envs < 0:
        raise FlowrlError(f"--max-envs must be >= 1, got {args.max_envs}")
    evaluator = Evaluator(task, args.seed, args.backend, args.max_envs, args.device, args.end_on_success)
    try:
        rows = [evaluator(policy, k, args.episodes) for k in args.steps]
    finally:
        evaluator.close()
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    result = {"checkpoint": str(folder), "task": task, "step": config.get("step"), "results": rows}
    if args.video:
        result["videos"] = [str(record_video(policy, task, k, run_dir / "videos" / f"{folder.name}_K{k}.mp4",
                                             seed=args.seed)) for k in args.steps]
    write_json(run_dir / "eval.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_eval_table(rows, f"evaluation of {folder} on {task}, {args.episodes} episodes per K"))
        for v in result.get("videos", []):
            print(f"video: {v}")


def cmd_data(args: argparse.Namespace) -> None:
    from flowrl.datasets import dataset_info

    info = dataset_info(args.path)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {v:.2f}" if isinstance(v, float) else f"{k:>12}: {v}")


def cmd_expert(args: argparse.Namespace) -> None:
    from flowrl.agents.expert import train_expert
    from flowrl.envs import resolve_task

    spec = resolve_task(args.task)
    if args.num_envs < 1 or args.snapshot_every < 1:
        raise FlowrlError(f"--num-envs and --snapshot-every must be >= 1, got {args.num_envs} and {args.snapshot_every}")
    if args.steps < args.snapshot_every:
        raise FlowrlError(f"--steps ({args.steps}) must be >= --snapshot-every ({args.snapshot_every})")
    out = args.out or os.path.join("experts", spec.name.lower())
    manifest = train_expert(spec.name, out, total_steps=args.steps, seed=args.seed, num_envs=args.num_envs,
                            snapshot_every=args.snapshot_every, backend=args.backend, device=args.device)
    print(f"expert: step {manifest['expert']}, medium: step {manifest['medium']}  ({out}/expert.json)")


def cmd_collect(args: argparse.Namespace) -> None:
    from flowrl.agents.collect import collect

    data = collect(args.source, args.out, episodes=args.episodes, noise=args.noise, seed=args.seed,
                   level=args.level, task=args.task, num_envs=args.num_envs, backend=args.backend,
                   created_by="flowrl " + shlex.join(args.argv), fmt=args.format,
                   after_success=args.after_success, keep_failures=args.keep_failures)
    info = data.info()
    print(f"wrote {args.out}: {info['episodes']} episodes, {info['transitions']} transitions, "
          f"return {info['return_mean']:.1f} ± {info['return_std']:.1f}")


def cmd_config(args: argparse.Namespace) -> None:
    from flowrl.config import FinetuneConfig, PretrainConfig, describe, load_config, to_yaml

    if args.config_command == "describe":
        for key, default, doc in describe(FinetuneConfig if args.stage == "finetune" else PretrainConfig):
            print(f"{key:<26} {default:<12} {doc}")
    else:
        print(to_yaml(load_config(PretrainConfig, args.config, args.overrides)), end="")


COMMANDS = {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "eval": cmd_eval, "data": cmd_data, "expert": cmd_expert,
            "collect": cmd_collect, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv
    # key=value overrides may stand anywhere, also after options
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        COMMANDS[args.command](args)
    except FlowrlError as e:
        print(f"flowrl: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("flowrl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
