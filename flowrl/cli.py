"""The ``flowrl`` command: every stage of the pipeline from the shell.

Errors a user can cause print one line and exit with code 2; see ``flowrl COMMAND --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

from flowrl.errors import FlowrlError

from flowrl.config import EVAL_SEED, MIN_SELECTION_EPISODES, EvalConfig, RenamedWarning, warn_renamed  # noqa: E402

EPILOG = """stages:
  flowrl expert Hopper --out experts/hopper           train a Stable-Baselines3 expert (with snapshots)
  flowrl collect experts/hopper --level medium --episodes 100 --out data/my-hopper.hdf5
  flowrl pretrain configs/hopper/pretrain_reflow.yaml  behaviour cloning, then evaluation
  flowrl finetune configs/hopper/finetune_reflow.yaml --init runs/NAME   ReinFlow fine-tuning
  flowrl distill runs/NAME --k 1                      distil into a one-step student (prior noise, no actions)
  flowrl distill runs/NAME --grid --k 2 4             the optimal Euler grid of each K, stored in the checkpoint
  flowrl eval runs/NAME --k 1 2 4 8                    evaluate a checkpoint at several K
  flowrl data info data/hopper-medium.hdf5             summarise any supported dataset
  flowrl describe runs/NAME                            observation layout, action bounds, policy of a checkpoint
  flowrl plot runs/A runs/B --out curves.png           learning curves of runs (mean and spread over seeds)
  flowrl config describe                               every config key, its default and meaning

A run folder (runs/NAME) stands for one checkpoint wherever a command takes a checkpoint: its `best`
when the periodic evaluations that chose it ran at least {MIN_SELECTION_EPISODES} episodes each
(train.eval_episodes), else its last. The final table of pretrain and finetune is of that checkpoint.
""".format(MIN_SELECTION_EPISODES=MIN_SELECTION_EPISODES)

RUN_FOLDER = (f"a run folder stands for its `best` checkpoint when chosen on at least {MIN_SELECTION_EPISODES} "
              "episodes per evaluation, else for its last")
"""How commands that take a checkpoint read a run folder (flowrl.checkpoint.checkpoint_choice)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowrl", description="Flow-matching robot policies: pretrain, fine-tune, "
                                "evaluate, deploy.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser("pretrain", help="behaviour cloning of a flow policy on demonstrations",
                         description="Behaviour cloning of a flow or shortcut policy on demonstrations, with "
                         "periodic evaluation, checkpoints, TensorBoard logs and a final evaluation table of the "
                         f"checkpoint the run folder stands for ({RUN_FOLDER}; the one `flowrl eval RUN` takes).")
    pre.add_argument("config", nargs="?", help="YAML preset (only overrides of the defaults; see `flowrl config "
                     "describe`); optional with --resume, which reads the run's own config.yaml")
    pre.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 policy.head=shortcut")
    pre.add_argument("--steps", type=int, help="gradient-step budget (same as train.steps=N)")
    pre.add_argument("--out", help="run folder (default: runs/<task>-pretrain-<head>-<time>)")
    pre.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                     "(from the beginning if it has none yet, so a requeued job can always pass it)")
    pre.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")

    ft = sub.add_parser("finetune", help="fine-tune a pretrained policy: ReinFlow (online PPO, the default), DSRL "
                        "(online PPO over the frozen flow's initial noise) or MLE reconstruction (algo: mle, "
                        "demonstrations only)",
                        description="Fine-tune a pretrained checkpoint with the algorithm the config's `algo` names: "
                        "reinflow (PPO over the flow's Euler chain with injected noise, in simulation), dsrl (PPO "
                        "over the initial noise of the frozen flow: a steering head, starting exactly at the "
                        "pretrained policy) or mle (maximum likelihood of the policy's own K-step reconstructions "
                        "of demonstrations). "
                        "Periodic evaluation of the deterministic policy, best and last checkpoints, TensorBoard "
                        "logs, a final evaluation table of the checkpoint the run folder stands for "
                        f"({RUN_FOLDER}; the one `flowrl eval RUN` takes).")
    ft.add_argument("config", nargs="?", help="YAML preset (see `flowrl config describe finetune`); optional with "
                    "--resume, which reads the run's own config.yaml (its init included)")
    ft.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.num_envs=512")
    ft.add_argument("--init", help="pretrained checkpoint or run folder to start from (same as init=PATH; "
                    f"{RUN_FOLDER})")
    ft.add_argument("--env-steps", type=int, help="env-step budget of online algorithms (same as train.env_steps=N)")
    ft.add_argument("--steps", type=int, help="gradient-step budget of offline algorithms such as mle (same as "
                    "train.steps=N); for ReinFlow the old name of --env-steps")
    ft.add_argument("--out", help="run folder (default: runs/<task>-finetune-<head>-<time>)")
    ft.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                    "(from the beginning if it has none yet, so a requeued job can always pass it)")
    ft.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")

    di = sub.add_parser("distill", help="a few-step policy from a trained one: a K-step student distilled from prior "
                        "noise (no actions read), or the optimal Euler grid of a fixed K (--grid)",
                        description="Distil a trained policy (the teacher) into a student whose K-step sampler "
                        "(--k, default 1) lands where the teacher's lands from the same prior noise, conditioned on "
                        "the observations of the demonstrations the teacher descends from (their actions are not "
                        "read); a fine-tuning run (algo distill) with periodic evaluation, checkpoints and a final "
                        "table, like `flowrl finetune`. With --grid: choose, for each K of --k, the Euler steps that "
                        "bring the K-step solution closest to the policy's own fine solution (dynamic programming "
                        "over candidate times, BOSS) and store the grids that beat the uniform one in the checkpoint "
                        "(or in a copy, --out); `flowrl eval`, `flowrl export` and the deploy runtime step on them.")
    di.add_argument("run", help=f"the teacher: checkpoint folder or run folder ({RUN_FOLDER})")
    di.add_argument("overrides", nargs="*", help="key=value overrides of the distillation config, e.g. train.lr=3e-4 "
                    "(`flowrl config describe finetune --algo distill`)")
    di.add_argument("--k", type=int, nargs="+", default=[1], help="the student's Euler steps K (default 1); with "
                    "--grid, every K whose grid to choose")
    di.add_argument("--steps", type=int, help="gradient-step budget (same as train.steps=N)")
    di.add_argument("--data", help="demonstrations whose observations condition the samples (default: the dataset "
                    "the checkpoint records, followed back through fine-tunings)")
    di.add_argument("--out", help="run folder (default: runs/<task>-finetune-<head>-<time>); with --grid, a new "
                    "checkpoint folder (default: the grids are written into the checkpoint itself)")
    di.add_argument("--resume", action="store_true", help="continue the distillation run in --out from its latest "
                    "checkpoint")
    di.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    di.add_argument("--quiet", action="store_true", help="no progress bar")
    di.add_argument("--device", help="torch device (default: the config's, auto; --grid: cpu)")
    di.add_argument("--grid", action="store_true", help="choose the optimal Euler grid of each K instead of training")
    di.add_argument("--samples", type=int, help="--grid: observations and noises the grid is fitted on, and as many "
                    "held out to check it against the uniform grid (default 512)")
    di.add_argument("--resolution", type=int, help="--grid: candidate times j/N, N of them (default 64)")
    di.add_argument("--refine", type=int, help="--grid: Euler steps of the reference solution per candidate interval "
                    "(default 4)")
    di.add_argument("--seed", type=int, help="--grid: seed of the observations and noises drawn (default 0); "
                    "training: the run's seed (same as seed=N; default the config's)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint at several K",
                        description="Evaluate the deterministic policy of a checkpoint at each K; prints a table "
                        "and writes eval.json in the run folder. A run folder means its `best` checkpoint when the "
                        f"periodic evaluations that chose it ran at least {MIN_SELECTION_EPISODES} episodes each "
                        "(train.eval_episodes), else its last: the checkpoint of the training's final table.")
    ev.add_argument("checkpoint", help=f"checkpoint folder or run folder ({RUN_FOLDER})")
    ev.add_argument("--episodes", type=int, default=10, help="episodes per K (default 10)")
    ev.add_argument("--k", type=int, nargs="+", help="numbers of Euler steps K to evaluate (default 1 2 4 8)")
    ev.add_argument("--steps", type=int, nargs="+", help=argparse.SUPPRESS)  # the old name of --k (RENAMED_FLAGS)
    ev.add_argument("--seed", type=int, default=EVAL_SEED,
                    help=f"env i is seeded seed+i (default {EVAL_SEED}; training's periodic evaluations, which "
                    "choose `best`, use other seeds)")
    ev.add_argument("--backend", default="auto", help="simulation backend (default auto)")
    ev.add_argument("--device", default="auto", help="torch device of the policy (default auto: cuda when available)")
    ev.add_argument("--max-envs", type=int, default=0,
                    help="envs stepped at once; episodes run in rounds of this many (default 64; robosuite: "
                    "the number of CPU cores, one worker process each)")
    ev.add_argument("--end-on-success", action="store_true",
                    help="end each episode at its first success (robomimic's rollouts; same success rate, faster)")
    ev.add_argument("--video", action="store_true", help="also write one mp4 per K into the run folder's videos/")
    ev.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ev.add_argument("--per-episode", action="store_true",
                    help="also each episode's return, length and success (episode i: env seed seed+i); the table "
                    "then names the env seeds of failed episodes (--seed S --episodes 1 --video starts a video from "
                    "the same state; the flow's noise draws differ)")
    ev.add_argument("--info", action="store_true", help="print what the checkpoint expects and produces (as "
                    "`flowrl describe`) and evaluate nothing")

    de = sub.add_parser("describe", help="task, policy, observation layout and action bounds of a checkpoint",
                        description="What a checkpoint expects and produces: its task, its policy (head, K, chunk, "
                        "history, parameters), the observation's named parts in order with their indices, and the "
                        "action's dimensions with their bounds; what a robot or another simulator must feed it.")
    de.add_argument("checkpoint", help=f"checkpoint folder or run folder ({RUN_FOLDER})")
    de.add_argument("--json", action="store_true", help="print it as JSON")

    pl = sub.add_parser("plot", help="learning curves of run folders as a PNG",
                        description="Learning curves from the run folders' TensorBoard logs: evaluation return, "
                        "success rate and training return against steps or wall-clock, several runs in one "
                        "figure. Runs whose configs differ only in seed are drawn as their mean with a band of one "
                        "standard deviation over seeds; a single run's evaluations with a band of one standard "
                        "deviation over their episodes. The demonstrations' mean return (recorded in the "
                        "checkpoints, or in those of the checkpoint a fine-tuning started from) is a dashed line, "
                        "and return axes include 0 and that line.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    pl.add_argument("--out", help="PNG to write (default: RUN/curves.png for one run, curves.png for several)")
    pl.add_argument("--x", default="env_steps", choices=["env_steps", "wall_clock"],
                    help="x axis: the logged step (env steps when fine-tuning, gradient steps when pretraining; "
                    "default) or wall-clock minutes")

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
    ex.add_argument("--env-steps", type=int, help="env steps (default 1e6)")
    ex.add_argument("--steps", type=int, help=argparse.SUPPRESS)  # the old name of --env-steps (RENAMED_FLAGS)
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
    co.add_argument("source", help="expert folder, policy checkpoint, or `scripted` (a task's own scripted expert; needs --task)")
    co.add_argument("--out", required=True, help="dataset file to write (.hdf5); an existing file is kept "
                    "unless --force")
    co.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    co.add_argument("--level", default="expert", help="expert folders: medium, expert or a snapshot step")
    co.add_argument("--episodes", type=int, default=100)
    co.add_argument("--noise", type=float, default=0.0, help="std of Gaussian action noise (default 0)")
    co.add_argument("--label", choices=("executed", "source"), default="executed",
                    help="the action recorded with --noise: the one executed (default), or the source's own "
                         "noise-free action at the state the noisy execution reached (DART: demonstrations that "
                         "show how the source recovers from small errors)")
    co.add_argument("--seed", type=int, default=0, help="episode i is seeded seed+i")
    co.add_argument("--task", help="the task (scripted experts; overrides a checkpoint's or an expert folder's, "
                    "e.g. Humanoid for an expert trained on Humanoid-Newton)")
    co.add_argument("--format", default="flowrl", choices=["flowrl", "robomimic"], help="dataset layout to write")
    co.add_argument("--num-envs", type=int, default=16)
    co.add_argument("--backend", default="auto", choices=["auto", "gymnasium", "cpu", "warp", "robosuite"],
                    help="auto (default: the task's own default, robosuite for robosuite's tasks on a CPU machine), "
                    "gymnasium, cpu (Humanoid-Newton; robosuite's scenes batched), warp or robosuite")
    co.add_argument("--device", default="cpu", help="device of the batched env and of a checkpoint policy "
                    "(default cpu; --backend warp --device cuda simulates and renders on the GPU)")
    co.add_argument("--after-success", type=int, default=10,
                    help="tasks with success (robosuite): cut each episode this many steps after its first "
                    "success, as robomimic's demonstrations end (default 10; -1 keeps whole episodes)")
    co.add_argument("--keep-failures", action="store_true",
                    help="keep episodes that never succeed (default: drop them and collect more)")
    co.add_argument("--cameras", nargs="+", default=[], metavar="CAMERA",
                    help="also record these cameras' RGB images before each step as obs/<camera>_image (robosuite "
                    "scenes on the cpu backend (OpenGL) or warp (MuJoCo Warp's ray tracer; default auto picks one of them), "
                    "--format robomimic, 1-step experts; e.g. agentview robot0_eye_in_hand)")
    co.add_argument("--image-size", type=int, default=84, help="height and width of the images (default 84)")

    cf = sub.add_parser("config", help="show the config schema or a resolved config").add_subparsers(
        dest="config_command", required=True, metavar="SUBCOMMAND")
    desc = cf.add_parser("describe", help="every config key with its default and meaning")
    desc.add_argument("stage", nargs="?", default="pretrain", choices=["pretrain", "finetune"])
    desc.add_argument("--algo", help="the algorithm whose train.* keys to list (default: the stage's default)")
    show = cf.add_parser("show", help="the resolved config of a preset plus overrides (pretrain or finetune, "
                         "told apart by the algo it names or by its data section); keys given only when the "
                         "stage runs, such as a fine-tuning's init (--init RUN), are shown as ??? (unset)",
                         description="The resolved config of a preset plus key=value overrides, as YAML. Keys "
                         "given only when the stage runs, such as a fine-tuning's init (--init RUN), are shown "
                         "as ??? (unset) unless an override sets them; the device is not checked against this "
                         "machine.")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    _deploy_parsers(sub)
    return p


def _deploy_parsers(sub: argparse._SubParsersAction) -> None:
    """export, deploy-sim and serve: taking a policy to a controller (flowrl.deploy)."""
    xp = sub.add_parser("export", help="export the deterministic K-step sampler as ONNX or a torch.export program",
                        description="Unroll the policy's K-step deterministic sampler into one graph (observation "
                        "normalisation, clipping and scaling to the action bounds inside): inputs obs (batch, "
                        "obs_history, obs_dim) and noise (batch, horizon, act_dim), output actions (batch, horizon, "
                        "act_dim) in env units (pixel policies: also one uint8 input image_<camera> (batch, obs_history, "
                        "size, size, 3) per camera); writes OUT and OUT.json (task, dims, K, chunking, bounds, version). "
                        "The export is checked against eager on random inputs and refused above 1e-4.")
    xp.add_argument("checkpoint", help=f"checkpoint folder or run folder ({RUN_FOLDER})")
    xp.add_argument("--format", required=True, choices=["onnx", "torch-export"], help="onnx (ONNX Runtime, C++ "
                    "controllers) or torch-export (a .pt2 torch.export program)")
    xp.add_argument("--out", required=True, help="file to write (e.g. policy.onnx or policy.pt2)")
    xp.add_argument("--k", type=int, help="Euler steps K unrolled into the graph (default: the policy's own; "
                    "shortcut heads use step size 1/K)")

    ds = sub.add_parser("deploy-sim", help="run a policy in a fixed-rate control loop against a simulated robot",
                        description="The deploy control loop (flowrl.deploy.control) at a fixed rate against one env "
                        "of a task behind the robot interface: receding horizon over act_steps, deadline accounting "
                        "(a chunk not ready by the deadline holds the last action and counts a miss), optional "
                        "asynchronous inference; prints the latency table (p50, p99, max) and each episode's return.")
    ds.add_argument("checkpoint", help=f"checkpoint or run folder (eager; {RUN_FOLDER}), or an exported .onnx / "
                    ".pt2 file")
    ds.add_argument("--task", help="task to simulate (default: the policy's own)")
    ds.add_argument("--rate", type=float, required=True, help="control rate in Hz")
    ds.add_argument("--episodes", type=int, default=1, help="episodes to run (default 1)")
    ds.add_argument("--k", type=int, help="Euler steps K (checkpoints only; an export has its own)")
    ds.add_argument("--async", dest="async_inference", action="store_true",
                    help="compute the next chunk while the current one executes (LeRobot's asynchronous inference)")
    ds.add_argument("--threshold", type=float, default=0.5, help="--async: ask for the next chunk when the queue "
                    "holds at most this fraction of act_steps (default 0.5)")
    ds.add_argument("--deadline", type=float, default=0.8, help="an action is due this fraction of the period after "
                    "its tick starts (default 0.8)")
    ds.add_argument("--seed", type=int, default=0, help="env and noise seed (default 0)")
    ds.add_argument("--json", action="store_true", help="print the statistics as JSON")

    sv = sub.add_parser("serve", help="serve a policy over gRPC (flowrl/deploy/policy.proto)",
                        description="A gRPC policy server (schema flowrl/deploy/policy.proto: Act, StreamAct, Info, "
                        "Health): observation histories in, action chunks in env units out; typed messages, no "
                        "pickle. Open streams hold no thread; Health and Info answer whatever is in flight; each "
                        "policy runs one request at a time, the fewest rows first (a large one is not starved). Bad "
                        "requests get INVALID_ARGUMENT or NOT_FOUND, calls beyond the limits RESOURCE_EXHAUSTED, and "
                        "the server keeps serving; one log line per client. Ctrl-C stops it.")
    sv.add_argument("policy", help=f"checkpoint or run folder (eager; {RUN_FOLDER}), or an exported .onnx / .pt2 "
                    "file")
    sv.add_argument("--port", type=int, default=50151, help="TCP port (default 50151; 0 picks a free one)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                    "every interface)")
    sv.add_argument("--name", default="default", help="the policy's name in requests (default: default; an empty "
                    "name in a request means this policy)")
    sv.add_argument("--k", type=int, help="Euler steps K (checkpoints only; an export has its own)")
    sv.add_argument("--seed", type=int, default=0, help="seed of the noise the server draws (default 0)")
    sv.add_argument("--max-batch", type=int, help="most rows one request may carry; larger ones get "
                    "INVALID_ARGUMENT (default: measured at start, the largest power of two inferred within 25 ms)")
    sv.add_argument("--max-streams", type=int, default=64, help="most Act calls in progress and open StreamAct "
                    "streams in all; beyond it RESOURCE_EXHAUSTED (default 64)")
    sv.add_argument("--max-client-streams", type=int, default=8, help="the same per client (one connection; "
                    "default 8)")


def _train(stage: str, args: argparse.Namespace, presets_required: bool = True) -> None:
    """pretrain, finetune and distill: config -> agent (through the registry) -> the training loop.
    ``presets_required=False``: the overrides alone may make the config (distill's)."""
    from flowrl.config import load_stage_config
    from flowrl.registry import agent_info
    from flowrl.run import RunFolder
    from flowrl.training import Trainer

    if args.resume and not args.out:
        raise FlowrlError("--resume needs --out RUN_FOLDER")
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not os.path.isfile(args.config):
        overrides.insert(0, args.config)  # `--resume --out RUN key=value`: no preset, only overrides
        args.config = None
    if stage == "finetune" and args.init:
        from flowrl.checkpoint import resolve_checkpoint

        overrides.append(f"init={resolve_checkpoint(args.init)}")
    presets = [args.config] if args.config else []
    run_config = os.path.join(args.out, "config.yaml") if args.resume and args.out else None
    if run_config and os.path.isfile(run_config):
        presets.insert(0, run_config)  # the run's own resolved config: --resume --out RUN needs nothing else
    if not presets and presets_required:
        raise FlowrlError(f"a config is required (flowrl {stage} CONFIG), or --resume --out RUN of a run that "
                          "has a config.yaml")
    cfg = load_stage_config(stage, presets, overrides)
    _apply_budget(cfg, args.steps, getattr(args, "env_steps", None))
    from flowrl import distributed

    ranks = distributed.init_from_env(cfg.device)  # a no-op outside torchrun
    try:
        agent = agent_info(stage, cfg.algo).agent_class()(cfg)
        head = agent.policy.cfg.head
        out = args.out or os.path.join("runs", RunFolder.default_name(stage, agent.task, head))
        if ranks.active and not args.out:
            out = ranks.broadcast_object(out)  # the folder name holds the time: rank 0's
        trainer = Trainer(agent, out, resume=args.resume, progress=not args.quiet)
        if ranks.is_main:
            print(f"run folder: {trainer.run.path}  (tensorboard --logdir {trainer.run.path}); {agent.iterations} "
                  "iterations" + (f" of {agent.steps_per_iteration} {agent.step_unit}s" if agent.steps_per_iteration > 1
                                  else "") + (f" on {ranks.world_size} ranks" if ranks.active else ""), file=sys.stderr)
        try:
            trainer.fit()
            if not args.no_eval:
                trainer.final_evaluation()
        finally:
            trainer.close()
    finally:
        distributed.shutdown()


RENAMED_FLAGS = {
    ("eval", "steps"): ("--steps", "--k", "k"),
    ("expert", "steps"): ("--steps", "--env-steps", "env_steps"),
}
"""Old flags still read (hidden from --help): (command, the old flag's dest) -> (old flag, new flag,
the new flag's dest). ``--steps`` was K for eval and env steps for expert; it now means gradient steps
only. finetune's ``--steps`` of an env-step algorithm (ReinFlow) is read as ``--env-steps`` the same
way (:func:`_apply_budget`: which one it is depends on the config's algorithm)."""


RENAMED_FLAG_DEFAULTS = {"k": lambda: EvalConfig().k, "env_steps": lambda: 1_000_000}
"""The defaults of the new flags of :data:`RENAMED_FLAGS`, filled in once it is known which name was given
(eval's K: the eval section's own default)."""


def _renamed_flags(args: argparse.Namespace) -> None:
    """Each old flag of :data:`RENAMED_FLAGS` given is read as its new one, with one note
    (:func:`flowrl.config.warn_renamed`, as for old config keys)."""
    for (command, dest), (old, new, new_dest) in RENAMED_FLAGS.items():
        if args.command != command:
            continue
        if getattr(args, dest, None) is not None:
            if getattr(args, new_dest, None) is not None:
                raise FlowrlError(f"{command}: {new} and its old name {old} given together; keep {new}")
            warn_renamed(old, new, command)
            setattr(args, new_dest, getattr(args, dest))
            setattr(args, dest, None)
        if getattr(args, new_dest, None) is None:
            setattr(args, new_dest, RENAMED_FLAG_DEFAULTS[new_dest]())


def _apply_budget(cfg: object, steps: int | None, env_steps: int | None) -> None:
    """``--steps`` (gradient steps: train.steps) and ``--env-steps`` (train.env_steps), for the algorithms
    whose config has that budget; ``--steps`` of an env-step algorithm is the old name of ``--env-steps``."""
    train = cfg.train  # type: ignore[attr-defined]
    if steps is not None and not hasattr(train, "steps") and hasattr(train, "env_steps") and env_steps is None:
        warn_renamed("--steps", "--env-steps", f"finetune (algo {cfg.algo})")  # type: ignore[attr-defined]
        steps, env_steps = None, steps
    for key, value in (("steps", steps), ("env_steps", env_steps)):
        if value is None:
            continue
        if not hasattr(train, key):
            raise FlowrlError(f"--{key.replace('_', '-')}: algorithm '{cfg.algo}' has no train.{key} budget")  # type: ignore[attr-defined]
        setattr(train, key, value)
    train.validate()


def cmd_pretrain(args: argparse.Namespace) -> None:
    _train("pretrain", args)


def cmd_finetune(args: argparse.Namespace) -> None:
    _train("finetune", args)


def cmd_distill(args: argparse.Namespace) -> None:
    if args.grid:
        _time_grids(args)
        return
    given = [f"--{name}" for name in ("samples", "resolution", "refine") if getattr(args, name) is not None]
    if given:
        raise FlowrlError(f"{', '.join(given)}: only with --grid (training a student takes train.* overrides)")
    if len(args.k) != 1:
        raise FlowrlError(f"--k: distillation trains one student; give one K, got {' '.join(map(str, args.k))} "
                          "(several Ks are for --grid)")
    overrides = ["algo=distill", f"train.k={args.k[0]}"]
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.data:
        overrides.append(f"train.data={args.data}")
    if args.device:
        overrides.append(f"device={args.device}")
    args.config, args.init, args.env_steps = None, args.run, None
    args.overrides = overrides + list(args.overrides)
    _train("finetune", args, presets_required=False)


def _time_grids(args: argparse.Namespace) -> None:
    """``flowrl distill --grid``: the optimal Euler grid of each K, into the checkpoint or a copy of it."""
    from flowrl.checkpoint import resolve_checkpoint
    from flowrl.registry import tool

    if args.overrides or args.steps is not None or args.resume:
        raise FlowrlError("--grid takes no config overrides, --steps or --resume (it trains nothing)")
    if any(k < 1 for k in args.k):
        raise FlowrlError(f"--k must be >= 1, got {' '.join(map(str, args.k))}")
    source = resolve_checkpoint(args.run)
    samples = 512 if args.samples is None else args.samples
    rows = tool("time-grid")(source, args.k, args.out, data=args.data or "", samples=samples,
                             resolution=64 if args.resolution is None else args.resolution,
                             refine=4 if args.refine is None else args.refine,
                             seed=0 if args.seed is None else args.seed, device=args.device or "cpu")
    print(f"optimal Euler grids of {source} (mean squared error per element against the policy's fine solution, "
          f"{samples} held-out noises and observations)")
    print(f"{'K':>3}  {'uniform error':>13}  {'grid error':>10}  grid")
    for row in rows:
        kept = "" if row["kept"] else "  (not better: uniform kept)"
        print(f"{row['k']:>3}  {row['uniform_error']:>13.3g}  {row['error']:>10.3g}  "
              f"{' '.join(f'{t:.3f}' for t in row['times'])}{kept}")
    print(f"wrote {Path(args.out) if args.out else source / 'config.json'}")


def cmd_eval(args: argparse.Namespace) -> None:
    from flowrl.checkpoint import checkpoint_choice, load_policy
    from flowrl.evaluation import Evaluator
    from flowrl.run import append_eval, format_eval_table

    if args.info:
        cmd_describe(args)
        return
    ks = args.k
    if args.episodes < 1 or any(k < 1 for k in ks):
        raise FlowrlError("--episodes and --k must be >= 1")
    folder, why = checkpoint_choice(args.checkpoint)
    if why:
        print(f"evaluating {folder} ({why})", file=sys.stderr)
    policy, config = load_policy(folder, args.device if args.device != "auto" else _auto_device())
    task = config.get("task")
    if not task:
        raise FlowrlError(f"{folder}/config.json: missing key 'task'")
    if args.max_envs < 0:
        raise FlowrlError(f"--max-envs must be >= 1, got {args.max_envs}")
    evaluator = Evaluator(task, args.seed, args.backend, args.max_envs, policy.obs_mean.device, args.end_on_success)
    try:
        rows = [evaluator(policy, k, args.episodes, per_episode=args.per_episode) for k in ks]
    finally:
        evaluator.close()
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    result = {"checkpoint": str(folder), "task": task, "step": config.get("step"), "stage": "eval", "results": rows}
    # the evaluation is on disk and on screen before any video is tried: a rendering problem never loses it
    append_eval(run_dir / "eval.json", result)
    if not args.json:
        print(format_eval_table(rows, f"evaluation of {folder} on {task}, {args.episodes} episodes per K"))
        for row in rows:
            if "episode_success" in row:
                failed = [args.seed + i for i, ok in enumerate(row["episode_success"]) if not ok]
                print(f"K={row['k']}: {len(failed)} failed episode(s)"
                      + (f", env seeds {' '.join(map(str, failed))}" if failed else ""))
    if args.video:
        from flowrl.video import record_video

        result["videos"] = []
        for k in ks:
            path = record_video(policy, task, k, run_dir / "videos" / f"{folder.name}_K{k}.mp4", seed=args.seed,
                                end_on_success=args.end_on_success)
            result["videos"].append(str(path))
            if not args.json:
                print(f"video: {path}")
    if args.json:
        print(json.dumps(result, indent=2))


def cmd_describe(args: argparse.Namespace) -> None:
    from flowrl.describe import describe_checkpoint, format_description

    info = describe_checkpoint(args.checkpoint)
    print(json.dumps(info, indent=2) if args.json else format_description(info))


def cmd_plot(args: argparse.Namespace) -> None:
    from flowrl.plot import plot_runs, summary

    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "curves.png")
    output_file(out)
    drawn = plot_runs(args.runs, out, args.x)
    print(summary(drawn["runs"]))
    print(f"wrote {drawn['out']} ({', '.join(drawn['panels'])}; {len(drawn['groups'])} curve(s) from "
          f"{len(args.runs)} run(s))")


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_data(args: argparse.Namespace) -> None:
    from flowrl.datasets import dataset_info

    info = dataset_info(args.path)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>12}: {v:.2f}" if isinstance(v, float) else f"{k:>12}: {v}")


def cmd_expert(args: argparse.Namespace) -> None:
    from flowrl.envs import resolve_task
    from flowrl.registry import tool

    spec = resolve_task(args.task)
    if args.num_envs < 1 or args.snapshot_every < 1:
        raise FlowrlError(f"--num-envs and --snapshot-every must be >= 1, got {args.num_envs} and {args.snapshot_every}")
    if args.env_steps < args.snapshot_every:
        raise FlowrlError(f"--env-steps ({args.env_steps}) must be >= --snapshot-every ({args.snapshot_every})")
    out = args.out or os.path.join("experts", spec.name.lower())
    manifest = tool("expert")(spec.name, out, total_steps=args.env_steps, seed=args.seed, num_envs=args.num_envs,
                            snapshot_every=args.snapshot_every, backend=args.backend, device=args.device)
    print(f"expert: step {manifest['expert']}, medium: step {manifest['medium']}  ({out}/expert.json)")


def output_file(path: str, flag: str = "--out", force: bool = True) -> None:
    """Refuse, before any work, an output file that cannot be written (its folder cannot be made or
    written to, or it is a folder) or, without ``force``, one that exists: one line naming the path."""
    import tempfile

    target = Path(path)
    if target.is_dir():
        raise FlowrlError(f"{flag} {path}: is a folder; give a file path")
    if target.exists() and not force:
        raise FlowrlError(f"{flag} {path}: exists; pass --force to overwrite it, or choose another {flag}")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folders that do not exist yet are made when the file is written
    if not parent.is_dir():
        raise FlowrlError(f"{flag} {path}: cannot be written ({parent} is not a folder)")
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as e:
        raise FlowrlError(f"{flag} {path}: cannot write in {parent} ({e.strerror or type(e).__name__})") from None


def cmd_collect(args: argparse.Namespace) -> None:
    from flowrl.registry import tool

    output_file(args.out, force=args.force)
    data = tool("collect")(args.source, args.out, episodes=args.episodes, noise=args.noise, seed=args.seed,
                   level=args.level, task=args.task, num_envs=args.num_envs, backend=args.backend,
                   created_by="flowrl " + shlex.join(args.argv), fmt=args.format,
                   after_success=args.after_success, keep_failures=args.keep_failures, cameras=args.cameras,
                   image_size=args.image_size, device=args.device, label=args.label)
    info = data.info()
    print(f"wrote {args.out}: {info['episodes']} episodes, {info['transitions']} transitions, "
          f"return {info['return_mean']:.1f} ± {info['return_std']:.1f}")


def cmd_config(args: argparse.Namespace) -> None:
    from flowrl.config import describe, detect_stage, load_stage_config, stage_schema
    from flowrl.registry import DEFAULT_ALGO, agents

    if args.config_command == "describe":
        algo = args.algo or DEFAULT_ALGO[args.stage]
        known = agents(args.stage)
        print(f"{args.stage} algorithms: " + ", ".join(f"{k} ({v.description})" for k, v in sorted(known.items())))
        print(f"keys of `algo: {algo}`:")
        for key, default, doc in describe(stage_schema(args.stage, algo)):
            print(f"{key:<30} {default:<12} {doc}")
    else:
        stage = detect_stage(args.config, args.overrides)
        cfg = load_stage_config(stage, [args.config], args.overrides, for_run=False)
        text, unset = run_time_unset(cfg, stage)
        if unset:
            print(f"# unset, given when the {stage} runs: " + ", ".join(unset))
        print(text, end="")


def run_time_unset(cfg: object, stage: str) -> tuple[str, list[str]]:
    """A resolved config as YAML with the keys a preset leaves to the command line and that are not set
    (``init``, the CLI's --init) shown as ``???``, OmegaConf's mark for a value still missing; and
    those keys, each with where its value comes from."""
    from omegaconf import OmegaConf

    from flowrl.config import RUN_TIME_KEYS

    node = OmegaConf.structured(cfg)
    unset = [key for key in RUN_TIME_KEYS[stage] if not OmegaConf.select(node, key)]
    for key in unset:
        OmegaConf.update(node, key, "???")
    sources = {"init": "init (the pretrained checkpoint: --init RUN)"}
    return OmegaConf.to_yaml(node), [sources.get(key, key) for key in unset]


def cmd_export(args: argparse.Namespace) -> None:
    from flowrl.deploy.export import export, metadata_path

    output_file(args.out)
    meta = export(args.checkpoint, args.out, args.format, args.k)
    print(f"wrote {args.out} ({args.format}, K={meta['k']}, {meta['head']} head, obs "
          f"({meta['obs_history']}, {meta['obs_dim']}) -> actions ({meta['horizon']}, {meta['act_dim']})) and "
          f"{metadata_path(args.out)}; max |export - eager| = {meta['max_abs_error']:.2g}")


def cmd_deploy_sim(args: argparse.Namespace) -> None:
    from flowrl.deploy.control import run_simulated
    from flowrl.deploy.runtime import load

    if args.episodes < 1:
        raise FlowrlError(f"--episodes must be >= 1, got {args.episodes}")
    policy = load(args.checkpoint, k=args.k, seed=args.seed)
    task = args.task or policy.meta.get("task")
    if not task:
        raise FlowrlError(f"{args.checkpoint}: records no task; pass --task")
    stats = run_simulated(policy, task, args.rate, args.episodes, args.seed, args.async_inference, args.threshold,
                          args.deadline)
    if args.json:
        print(json.dumps({"task": task, **policy.describe(), **stats.summary()}, indent=2))
        return
    mode = f"async (threshold {args.threshold:g})" if args.async_inference else "sync"
    print(f"deploy-sim: {task} at {args.rate:g} Hz, {policy.backend}, K={policy.k}, {mode}")
    print(stats.table())
    for i, ep in enumerate(stats.episodes):
        print(f"episode {i}: return {ep['return']:.2f}, length {ep['length']}")


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    from flowrl.deploy.runtime import load
    from flowrl.deploy.server import PolicyServer

    policy = load(args.policy, k=args.k, seed=args.seed)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    server = PolicyServer({args.name: policy}, port=args.port, host=args.host, max_batch=args.max_batch,
                          max_streams=args.max_streams, max_client_streams=args.max_client_streams).start()
    print(f"serving '{args.name}' ({policy.backend}, K={policy.k}, obs ({policy.obs_history}, "
          f"{policy.obs_dim}) -> actions ({policy.horizon}, {policy.act_dim}), max batch "
          f"{server.max_batch[args.name]}) on {server.address}", flush=True)
    try:
        server.wait()
    finally:
        server.stop()


COMMANDS = {"pretrain": cmd_pretrain, "finetune": cmd_finetune, "distill": cmd_distill, "eval": cmd_eval,
            "data": cmd_data, "expert": cmd_expert, "collect": cmd_collect, "config": cmd_config, "describe": cmd_describe, "plot": cmd_plot,
            "export": cmd_export, "deploy-sim": cmd_deploy_sim, "serve": cmd_serve}


def _notes(show: object) -> object:
    """A ``warnings.showwarning`` that prints each :class:`flowrl.config.RenamedWarning` of one command
    once, as ``flowrl: note: config: policy.num_steps is now policy.k``, and hands other warnings to
    ``show``."""
    seen: set[str] = set()

    def showwarning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if not issubclass(category, RenamedWarning):
            return show(message, category, filename, lineno, file, line)  # type: ignore[operator]
        if str(message) not in seen:
            seen.add(str(message))
            print(f"flowrl: note: {message}", file=sys.stderr)

    return showwarning


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
    # old names of keys and flags: one note each (the other warnings' filters are left as they are)
    warnings.filterwarnings("always", category=RenamedWarning)
    show = warnings.showwarning
    warnings.showwarning = _notes(show)
    try:
        _renamed_flags(args)
        if getattr(args, "device", None) is not None:  # eval, expert, collect: before any work starts
            from flowrl.config import check_device

            check_device(args.device)
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
    finally:
        warnings.showwarning = show
    return 0


if __name__ == "__main__":
    sys.exit(main())
