#!/usr/bin/env bash
# GPU session 10 on the 2 x H200 machine, in the background across several calls (runs and logs under /tmp/w).
# GPU 0: Can behaviour cloning (seeds 0-2 side by side, Python-bound), then ReinFlow on warp Can without the
#        W2 anchor (seeds 0-2 one after another), evaluations every 2 iterations.
# GPU 1: the ReinFlow ablation on Hopper (two processes side by side, four variants each, seed 0) from the
#        behaviour-cloned Hopper made on the dev machine (.gpu/bc_hopper0).
# Host CPUs: MLE fine-tuning seeds 1 and 2 on Hopper (device cpu, 4 threads each).
# Then, both GPUs alone: benchmarks/scaling.py (weak, strong, time to 3200).
set -u
REPO=$1; FTMIN=${2:-3}
export PYTHONPATH=/tmp/site WARP_CACHE_PATH=/tmp/warpcache PYTHONUNBUFFERED=1 FLOWRL_RESULTS=/tmp/w/results
W=/tmp/w; mkdir -p $W/logs $W/results; cd $W; rm -rf configs data; cp -r $REPO/configs $REPO/data .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $W/logs/gpu.txt
date +%s > $W/logs/t0
say() { echo "$* at $(( $(date +%s) - $(cat $W/logs/t0) )) s" >> $W/logs/pipeline.log; }
HOPPER=/tmp/bch/10000  # the dev machine's Hopper BC (configs/hopper/pretrain_reflow.yaml, seed 0), copied there
bc() {  # gpu task seed
  CUDA_VISIBLE_DEVICES=$1 python3 -m flowrl pretrain configs/$2/pretrain_reflow.yaml --out $W/bc_$2$3 seed=$3 device=cuda \
    --no-eval train.eval_every=0 > $W/logs/bc_$2$3.log 2>&1
  say "bc_$2$3 rc $?"
}
ft() {  # gpu task seed
  CUDA_VISIBLE_DEVICES=$1 python3 -m flowrl finetune configs/$2/finetune_reflow_warp.yaml --init $W/bc_$2$3 --out $W/ft_$2$3 \
    seed=$3 device=cuda train.max_minutes=$FTMIN train.w2_coef=0 train.eval_every=2 train.checkpoint_every=2 \
    > $W/logs/ft_$2$3.log 2>&1
  say "ft_$2$3 rc $?"
}
ablation() {  # tag variants...
  local tag=$1; shift
  CUDA_VISIBLE_DEVICES=1 python3 $REPO/benchmarks/reinflow_ablation.py --tasks hopper --seeds 0 --variants "$@" \
    --pretrained $HOPPER --device cuda --runs $W/abl --tag h200_$tag train.backend=warp train.num_envs=2048 \
    train.rollout_steps=10 > $W/logs/ablation_$tag.log 2>&1
  say "ablation $tag rc $?"
}
mle() {  # seed
  OMP_NUM_THREADS=4 CUDA_VISIBLE_DEVICES= python3 $REPO/benchmarks/mle_finetune.py --tasks hopper --seeds $1 --ks 1 2 4 \
    --pretrain-steps 5000 --steps 1000 --episodes 10 --max-episodes 200 --eval-backend cpu --device cpu \
    --runs $W/mle --tag h200host_s$1 > $W/logs/mle_s$1.log 2>&1
  say "mle s$1 rc $?"
}
warm() {  # gpu task
  CUDA_VISIBLE_DEVICES=$1 python3 -c "
import torch, flowrl.envs as E
env = E.make('$2', 64, backend='warp', device='cuda', seed=0); env.reset()
for _ in range(3): env.step(torch.zeros(64, env.act_dim, device='cuda'))
torch.cuda.synchronize(); print('warm $2 ok')" > $W/logs/warm_$(echo $2 | tr '/' '_').log 2>&1
  say "warm $2 rc $?"
}
(mle 1) & (mle 2) &
pids=""
(warm 0 robosuite/PickPlaceCan) & pids="$pids $!"
(bc 0 can 0; ft 0 can 0; ft 0 can 1; ft 0 can 2) & pids="$pids $!"
(bc 0 can 1) & pids="$pids $!"
(bc 0 can 2) & pids="$pids $!"
warm 1 Hopper  # before the two ablation processes, so that they load the compiled kernels
(ablation a base flow_sde critic_ev norm_initial) & pids="$pids $!"
(ablation b full_batch target_kl low_noise long_rollouts) & pids="$pids $!"
wait $pids
say "gpu work done"
python3 $REPO/benchmarks/scaling.py --gpus 1 2 --init $HOPPER --iterations 5 --reach 3200 --runs $W/scaling \
  --tag h200x2 > $W/logs/scaling.log 2>&1
say "scaling rc $?"
wait
say "all done"
