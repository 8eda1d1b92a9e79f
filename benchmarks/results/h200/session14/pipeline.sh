#!/usr/bin/env bash
# GPU session 14 on nvidia-h200-x2 (runs and logs under /tmp/w): Square from pixels, and SB3 PPO on Hopper.
#   GPU 1: Square image demonstrations collected on warp (400 episodes; compiles Square + renderer).
#   GPU 0 from the start: SB3 PPO on Hopper (warp, seeds 0 1 2 in turn, ReinFlow's 30M env-step budget),
#          until the deadline.
#   Then pixel behaviour cloning: seeds 0, 1 on GPU 1, seed 2 on GPU 0, for as many minutes as leave room
#   for fine-tuning before the deadline; then pixel ReinFlow: seed 2 on GPU 0, seeds 0 and 1 side by side
#   on GPU 1, FTMIN minutes each.
set -u
REPO=$1; FTMIN=${2:-3}; BCMAX=${3:-11}; DEADLINE=${4:-1320}
export PYTHONPATH=/tmp/site WARP_CACHE_PATH=/tmp/warpcache PYTHONUNBUFFERED=1 FLOWRL_RESULTS=/tmp/w/results
W=/tmp/w; mkdir -p $W/logs $W/results; cd $W; rm -rf configs data; cp -r $REPO/configs $REPO/data .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $W/logs/gpu.txt
date +%s > $W/logs/t0
el() { echo $(( $(date +%s) - $(cat $W/logs/t0) )); }
say() { echo "$* at $(el) s" >> $W/logs/pipeline.log; }
fits() { [ $(( $(el) + $1 )) -le $DEADLINE ] || { say "skip $2 (would end after the deadline)"; return 1; }; }
bc() {  # gpu seed minutes
  CUDA_VISIBLE_DEVICES=$1 python3 -m flowrl pretrain configs/square/pretrain_reflow_pixels.yaml --out $W/bc_square$2_pixels \
    seed=$2 device=cuda --no-eval train.eval_every=0 train.max_minutes=$3 > $W/logs/bc_square$2_pixels.log 2>&1
  say "bc_square$2_pixels rc $?"
}
ft() {  # gpu seed
  fits $(( ${FTMIN%.*} * 60 + 120 )) ft_square$2_pixels || return
  CUDA_VISIBLE_DEVICES=$1 python3 -m flowrl finetune configs/square/finetune_reflow_pixels_warp.yaml \
    --init $W/bc_square$2_pixels --out $W/ft_square$2_pixels seed=$2 device=cuda train.max_minutes=$FTMIN \
    train.normalize_advantages=false train.eval_every=3 train.checkpoint_every=3 > $W/logs/ft_square$2_pixels.log 2>&1
  say "ft_square$2_pixels rc $?"
}
(cd $REPO && CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=4 timeout $(( DEADLINE - 30 )) python3 benchmarks/sb3_baselines.py \
  --tasks hopper --algos ppo --seeds 0 1 2 --backend warp --device cuda --ppo-num-envs 1024 --ppo-n-steps 32 \
  --tag h200_s14 > $W/logs/sb3_hopper_ppo.log 2>&1; say "sb3 hopper ppo rc $?") &
sb3=$!
CUDA_VISIBLE_DEVICES=1 python3 -m flowrl collect scripted --task robosuite/NutAssemblySquare --episodes 400 \
  --format robomimic --backend warp --device cuda --num-envs 400 --seed 0 --cameras agentview robot0_eye_in_hand \
  --out data/square-images.hdf5 > $W/logs/collect_square_images.log 2>&1
say "collect square images rc $?"
ls -la data/square-images.hdf5 >> $W/logs/pipeline.log
BCMIN=$(( (DEADLINE - $(el) - FTMIN * 60 - 120 - 100) / 60 )); [ $BCMIN -gt $BCMAX ] && BCMIN=$BCMAX
say "behaviour cloning for $BCMIN minutes"
p=""; (bc 1 0 $BCMIN) & p="$p $!"; (bc 1 1 $BCMIN) & p="$p $!"; (bc 0 2 $BCMIN) & p="$p $!"; wait $p; say "bc done"
(ft 0 2) & a=$!
(ft 1 0) & b=$!
(ft 1 1) & c=$!
wait $a $b $c
say "fine-tuning done"; wait $sb3
say "all done"
