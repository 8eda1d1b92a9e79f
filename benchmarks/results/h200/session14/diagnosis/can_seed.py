"""The robosuite backend's Can at env seed 100013 (failed by every state policy) against other seeds: the can's pose."""
import numpy as np, torch
from flowrl.envs import make

def yaw(q):
    x, y, z, w = q
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))

def main():
    env = make("robosuite/PickPlaceCan", 1, backend="robosuite", seed=0)
    for seed in (100011, 100012, 100013, 100014, 100015):
        o = env.reset(seed=seed)[0].numpy()
        print(seed, "can pos", np.round(o[7:10], 3), "yaw", round(yaw(o[10:14]), 2), "eef", np.round(o[14:17], 3))
    env.close()

if __name__ == "__main__":
    main()
