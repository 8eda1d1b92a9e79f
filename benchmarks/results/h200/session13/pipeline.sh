#!/usr/bin/env bash
# GPU session 13 on nvidia-h200-x2, in the background (runs and logs under /tmp/w). Two chains, one per GPU:
#   GPU 0: Square behaviour cloning seeds 0-2 side by side (+ Square's warp kernels), then ReinFlow Square
#          seeds 0-2 one at a time (unscaled advantages), then pixel ReinFlow Can seed 2 if time is left.
#   GPU 1: Can image demonstrations collected on warp (compiles Can + renderer), pixel behaviour cloning
#          Can seeds 0-2 side by side, then pixel ReinFlow Can seeds 0, 1 one at a time.
# A fine-tuning run starts only if it can end before DEADLINE seconds from the start.
set -u
REPO=$1; FTMIN=${2:-2.5}; DEADLINE=${3:-1300}
export PYTHONPATH=/tmp/site WARP_CACHE_PATH=/tmp/warpcache PYTHONUNBUFFERED=1 FLOWRL_RESULTS=/tmp/w/results
W=/tmp/w; mkdir -p $W/logs $W/results; cd $W; rm -rf configs data; cp -r $REPO/configs $REPO/data .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $W/logs/gpu.txt
date +%s > $W/logs/t0
el() { echo $(( $(date +%s) - $(cat $W/logs/t0) )); }
say() { echo "$* at $(el) s" >> $W/logs/pipeline.log; }
fits() { [ $(( $(el) + $1 )) -le $DEADLINE ] || { say "skip $2 (would end after the deadline)"; return 1; }; }
bc() {  # gpu task seed [preset suffix] [minutes]
  CUDA_VISIBLE_DEVICES=$1 python3 -m flowrl pretrain configs/$2/pretrain_reflow${4:-}.yaml --out $W/bc_$2$3${4:-} \
    seed=$3 device=cuda --no-eval train.eval_every=0 train.max_minutes=${5:-0} > $W/logs/bc_$2$3${4:-}.log 2>&1
  say "bc_$2$3${4:-} rc $?"
}
ft() {  # gpu task seed eval_every [preset suffix]
  fits $(( ${FTMIN%.*} * 60 + 120 )) ft_$2$3${5:-} || return
  [ -d $W/bc_$2$3${5:-} ] || { say "skip ft_$2$3${5:-} (no bc)"; return; }
  CUDA_VISIBLE_DEVICES=$1 python3 -m flowrl finetune configs/$2/finetune_reflow${5:-}_warp.yaml --init $W/bc_$2$3${5:-} \
    --out $W/ft_$2$3${5:-} seed=$3 device=cuda train.max_minutes=$FTMIN train.normalize_advantages=false \
    train.eval_every=$4 train.checkpoint_every=$4 > $W/logs/ft_$2$3${5:-}.log 2>&1
  say "ft_$2$3${5:-} rc $?"
}
warm() {  # gpu task
  CUDA_VISIBLE_DEVICES=$1 python3 -c "
import torch, flowrl.envs as E
env = E.make('$2', 64, backend='warp', device='cuda', seed=0); env.reset()
for _ in range(3): env.step(torch.zeros(64, env.act_dim, device='cuda'))
torch.cuda.synchronize(); print('warm $2 ok')" > $W/logs/warm_$(basename $2).log 2>&1
  say "warm $2 rc $?"
}
collect_can_images() {
  CUDA_VISIBLE_DEVICES=1 python3 -m flowrl collect scripted --task robosuite/PickPlaceCan --episodes 200 --format robomimic \
    --backend warp --device cuda --num-envs 200 --seed 0 --cameras agentview robot0_eye_in_hand \
    --out data/can-images.hdf5 > $W/logs/collect_can_images.log 2>&1
  say "collect can images rc $?"
}
gpu0() {
  local p=""
  (warm 0 robosuite/NutAssemblySquare) & p="$p $!"
  for s in 0 1 2; do (bc 0 square $s) & p="$p $!"; done
  wait $p; say "gpu0 phase 1 done"
  for s in 0 1 2; do ft 0 square $s 3; done
  while [ ! -f $W/logs/pixel_bc_done ]; do sleep 10; done
  ft 0 can 2 2 _pixels
  say "gpu0 done"
}
gpu1() {
  local p=""
  collect_can_images
  for s in 0 1 2; do (bc 1 can $s _pixels 6) & p="$p $!"; done
  wait $p; touch $W/logs/pixel_bc_done; say "gpu1 phase 1 done"
  for s in 0 1; do ft 1 can $s 2 _pixels; done
  say "gpu1 done"
}
gpu0 & a=$!
gpu1 & b=$!
wait $a $b
say "all done"
