#!/usr/bin/env bash
# GPU session 8, run in the background across several calls (logs and runs under /tmp/w):
# behaviour cloning of Square (3 seeds), the CUDA-graph test, then ReinFlow on warp Square:
# seeds 0 1 2 of configs/square/finetune_reflow_warp.yaml and seed 0 without the W2 anchor, side by side on one H200.
set -u
REPO=$1
export PYTHONPATH=/tmp/site WARP_CACHE_PATH=/tmp/warpcache PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W/logs; cd $W; rm -rf configs data; cp -r $REPO/configs $REPO/data .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $W/logs/gpu.txt
date +%s > $W/logs/t0
pids=""
for s in 0 1 2; do
  python3 -m flowrl pretrain configs/square/pretrain_reflow.yaml --out $W/bc$s seed=$s device=cuda \
    train.eval_every=0 eval.backend=warp eval.episodes=512 eval.max_envs=512 eval.steps=[4] > $W/logs/bc$s.log 2>&1 &
  pids="$pids $!"
done
(cd /tmp && python3 -m pytest -q -p no:cacheprovider $REPO/tests/test_manipulation_tasks.py -k control_step_graph -rs \
   > $W/logs/capture_test.log 2>&1; echo "rc $?" >> $W/logs/capture_test.log) &
wait $pids
echo "bc done at $(( $(date +%s) - $(cat $W/logs/t0) )) s" >> $W/logs/pipeline.log
run() {  # name seed overrides...
  local name=$1 seed=$2; shift 2
  python3 -m flowrl finetune configs/square/finetune_reflow_warp.yaml --init $W/bc$seed --out $W/$name seed=$seed \
    device=cuda "$@" > $W/logs/$name.log 2>&1
  echo "$name rc $? at $(( $(date +%s) - $(cat $W/logs/t0) )) s" >> $W/logs/pipeline.log
}
run ftA0 0 & run ftA1 1 & run ftA2 2 & run ftB0 0 train.w2_coef=0.0 &
wait
echo "all done at $(( $(date +%s) - $(cat $W/logs/t0) )) s" >> $W/logs/pipeline.log
