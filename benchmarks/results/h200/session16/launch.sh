#!/usr/bin/env bash
# One H200 machine (16 cores), from the project root, flowrl and its wheels on PYTHONPATH: every SB3 baseline
# still missing, 3 seeds each, all at once in the background (setsid), each run's training capped at
# $MINUTES minutes:
#   PPO on Ant and Humanoid-Newton: MuJoCo Warp, 1024 envs x 32 steps per update, networks on the GPU,
#     ReinFlow's env-step budget (10M, 6.06M);
#   SAC on Hopper, Walker2d, Ant and Humanoid-Newton: cpu backend (one thread, 8 envs), networks on the GPU,
#     one gradient step per env step, as many env steps as the time cap allows (target 1M).
# Results: /tmp/s16/res/sb3_<task>_h200_s16[_sac]_s<seed>.json, logs in /tmp/s16/logs.
set -u
MINUTES=${MINUTES:-19}
R=/tmp/s16/res L=/tmp/s16/logs
mkdir -p $R $L
export FLOWRL_RESULTS=$R OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
cd benchmarks
for task in ant humanoid; do
  for s in 0 1 2; do
    WARP_CACHE_PATH=/tmp/s16/warp_${task}_$s setsid nohup python3 sb3_baselines.py --tasks $task --algos ppo \
      --seeds $s --backend warp --device cuda --ppo-num-envs 1024 --ppo-n-steps 32 --threads 1 \
      --max-minutes $MINUTES --tag h200_s16_s$s > $L/ppo_${task}_$s.log 2>&1 < /dev/null &
  done
done
for task in hopper walker2d ant humanoid; do
  for s in 0 1 2; do
    setsid nohup python3 sb3_baselines.py --tasks $task --algos sac --seeds $s --backend cpu --device cuda \
      --sac-steps 1000000 --sac-num-envs 8 --threads 1 --max-minutes $MINUTES --tag h200_s16_sac_s$s \
      > $L/sac_${task}_$s.log 2>&1 < /dev/null &
  done
done
echo "launched 18 runs at $(date +%T), training capped at $MINUTES min"
