#!/usr/bin/env bash
# robosuite evaluations of session 14's fine-tuned pixel Square policies (last checkpoints), 2-core dev machine.
. /work/main/.venv/bin/activate
cd /tmp/s14res/x
for run in ft_square0_pixels/checkpoints/409600 ft_square1_pixels/checkpoints/409600 ft_square2_pixels/checkpoints/921600; do
  n=$(echo $run | cut -d/ -f1)_$(basename $run)
  /usr/bin/time -f "%e s" flowrl eval $run --k 4 --episodes 100 --end-on-success --backend robosuite --max-envs 2 --json > /tmp/s14res/robosuite_eval_$n.json 2> /tmp/s14res/robosuite_eval_$n.log
  echo "$n rc $?" >> /tmp/s14res/evals.done
done
