#!/usr/bin/env bash
# robosuite evaluations of session 13's checkpoints on the dev machine, one after another
. /work/main/.venv/bin/activate; export OMP_NUM_THREADS=1; X=/tmp/s13res/x; O=/tmp/s13ev
ev() { # run ckpt
  local start=$(date +%s)
  flowrl eval $X/$1/checkpoints/$2 --k 4 --episodes 100 --end-on-success --backend robosuite --max-envs 2 --json > $O/robosuite_eval_$1_$2.json 2> $O/robosuite_eval_$1_$2.log
  echo "$1 $2 rc $? $(( $(date +%s) - start )) s: $(python3 -c "import json;r=json.load(open('$O/robosuite_eval_$1_$2.json'))['results'][0];print(r['success_rate'], r['length_mean'])" 2>&1)" >> $O/summary.txt
}
ev ft_can0_pixels 921600
ev ft_square0 2048000
ev ft_can1_pixels 921600
ev ft_square1 2457600
ev ft_can2_pixels 921600
ev ft_square2 2457600
ev ft_square1 best
ev ft_square2 best
echo done >> $O/summary.txt
