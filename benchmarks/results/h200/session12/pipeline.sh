#!/usr/bin/env bash
# GPU session 12 (one H200), in the background (runs and logs under /tmp/w).
# Phase 1: Can behaviour cloning seeds 0-2 side by side; beside them the compiles: Can's warp kernels,
#          and the warp renderer's smoke test on Lift (two cameras, layout checks).
# Phase 2: alone on the GPU, Lift rendering throughput (render after every step; K=4 pixel policy).
# Phase 3: ReinFlow Can seeds 0-2 one at a time (preset, advantages not standardised).
set -u
REPO=$1; FTMIN=${2:-3}
export PYTHONPATH=/tmp/site WARP_CACHE_PATH=/tmp/warpcache PYTHONUNBUFFERED=1 FLOWRL_RESULTS=/tmp/w/results
W=/tmp/w; mkdir -p $W/logs $W/results; cd $W; rm -rf configs data; cp -r $REPO/configs $REPO/data .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $W/logs/gpu.txt
date +%s > $W/logs/t0
say() { echo "$* at $(( $(date +%s) - $(cat $W/logs/t0) )) s" >> $W/logs/pipeline.log; }
bc() {  # task seed
  python3 -m flowrl pretrain configs/$1/pretrain_reflow.yaml --out $W/bc_$1$2 seed=$2 device=cuda \
    --no-eval train.eval_every=0 > $W/logs/bc_$1$2.log 2>&1
  say "bc_$1$2 rc $?"
}
ft() {  # task seed
  python3 -m flowrl finetune configs/$1/finetune_reflow_warp.yaml --init $W/bc_$1$2 --out $W/ft_$1$2 \
    seed=$2 device=cuda train.max_minutes=$FTMIN train.normalize_advantages=false train.eval_every=2 \
    train.checkpoint_every=2 > $W/logs/ft_$1$2.log 2>&1
  say "ft_$1$2 rc $?"
}
warm() {  # task: compile the task's kernels once
  python3 -c "
import torch, flowrl.envs as E
env = E.make('$1', 64, backend='warp', device='cuda', seed=0); env.reset()
for _ in range(3): env.step(torch.zeros(64, env.act_dim, device='cuda'))
torch.cuda.synchronize(); print('warm $1 ok')" > $W/logs/warm.log 2>&1
  say "warm $1 rc $?"
}
pids=""
(warm robosuite/PickPlaceCan) & pids="$pids $!"
(cd $REPO && python3 .gpu/s12_render.py smoke > $W/logs/render_smoke.log 2>&1; say "render smoke rc $?") & pids="$pids $!"
for s in 0 1 2; do (bc can $s) & pids="$pids $!"; done
wait $pids
say "phase 1 done"
(cd $REPO && python3 .gpu/s12_render.py bench > $W/logs/render_bench.log 2>&1); say "render bench rc $?"
for s in 0 1 2; do ft can $s; done
say "all done"
