#!/usr/bin/env bash
# GPU session 9 on the 2 x H200 machine, in the background across several calls (runs and logs under /tmp/w).
# A: behaviour cloning (Lift seeds 0-2 on GPU 0, Can seeds 0-2 and Hopper on GPU 1, three or four side by
#    side, each Python-bound), kernel warm-up, the CUDA-graph test.
# C: ReinFlow on warp Lift (GPU 0) and Can (GPU 1), seeds 0-2 one after another, one process per GPU.
# B: benchmarks/scaling.py on 1 and 2 GPUs (weak, strong, time to 3200).
set -u
REPO=$1; FTMIN=${2:-2.5}
export PYTHONPATH=/tmp/site WARP_CACHE_PATH=/tmp/warpcache PYTHONUNBUFFERED=1
W=/tmp/w; mkdir -p $W/logs; cd $W; rm -rf configs data; cp -r $REPO/configs $REPO/data .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $W/logs/gpu.txt
date +%s > $W/logs/t0
say() { echo "$* at $(( $(date +%s) - $(cat $W/logs/t0) )) s" >> $W/logs/pipeline.log; }
bc() {  # gpu task seed
  CUDA_VISIBLE_DEVICES=$1 python3 -m flowrl pretrain configs/$2/pretrain_reflow.yaml --out $W/bc_$2$3 seed=$3 device=cuda \
    --no-eval train.eval_every=0 > $W/logs/bc_$2$3.log 2>&1
  say "bc_$2$3 rc $?"
}
ft() {  # gpu task seed
  CUDA_VISIBLE_DEVICES=$1 python3 -m flowrl finetune configs/$2/finetune_reflow_warp.yaml --init $W/bc_$2$3 --out $W/ft_$2$3 \
    seed=$3 device=cuda train.max_minutes=$FTMIN > $W/logs/ft_$2$3.log 2>&1
  say "ft_$2$3 rc $?"
}
warm() {  # gpu task
  CUDA_VISIBLE_DEVICES=$1 python3 -c "
import torch, flowrl.envs as E
env = E.make('$2', 64, backend='warp', device='cuda', seed=0); env.reset()
for _ in range(3): env.step(torch.zeros(64, env.act_dim, device='cuda'))
torch.cuda.synchronize(); print('warm $2 ok')" > $W/logs/warm_$(echo $2 | tr '/' '_').log 2>&1
  say "warm $2 rc $?"
}
(cd /tmp && CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -p no:cacheprovider $REPO/tests/test_manipulation_tasks.py -k "cuda or graph" -rs \
   > $W/logs/capture_test.log 2>&1; say "capture test rc $?") &
warm 1 robosuite/PickPlaceCan & warm 1 Hopper &
(bc 0 lift 0; ft 0 lift 0; ft 0 lift 1; ft 0 lift 2) &
(bc 0 lift 1) & (bc 0 lift 2) & (bc 1 hopper 0) &
(bc 1 can 0; ft 1 can 0; ft 1 can 1; ft 1 can 2) &
(bc 1 can 1) & (bc 1 can 2) &
wait
say "finetuning done"
python3 $REPO/benchmarks/scaling.py --gpus 1 2 --init $W/bc_hopper0 --iterations 5 --reach 3200 --runs $W/scaling \
  --tag h200x2 > $W/logs/scaling.log 2>&1
say "scaling rc $?"
say "all done"
