"""Square: nut placement (x, y, yaw) at reset, our cpu backend against robosuite itself."""
import sys
sys.path.insert(0, "/work/main/tests")
import numpy as np
from test_manipulation_tasks import ENV_KWARGS, _robosuite
from flowrl.envs import make

def yaw(q):  # x y z w
    x, y, z, w = q.T
    return np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))

def stats(name, pos, q):
    a = yaw(q)
    print(f"{name}: x [{pos[:,0].min():.4f}, {pos[:,0].max():.4f}] y [{pos[:,1].min():.4f}, {pos[:,1].max():.4f}] "
          f"z [{pos[:,2].min():.4f}, {pos[:,2].max():.4f}] yaw [{a.min():.2f}, {a.max():.2f}] yaw std {a.std():.2f} "
          f"|yaw| mean {np.abs(a).mean():.2f}")
    print("   yaw histogram (8 bins over [-pi, pi]):", np.histogram(a, bins=8, range=(-np.pi, np.pi))[0])

def main():
    ours = make("robosuite/NutAssemblySquare", 400, backend="cpu", seed=0)
    o = ours.reset(seed=100000).numpy()
    stats("ours (cpu backend)", o[:, 7:10], o[:, 10:14])
    ours.close()
    rs = _robosuite().make("NutAssemblySquare", **ENV_KWARGS)
    pos, q = [], []
    for s in range(150):
        rs.rng.bit_generator.state = np.random.default_rng(s).bit_generator.state
        obs = rs.reset()
        pos.append(obs["SquareNut_pos"]); q.append(obs["SquareNut_quat"])
    stats("robosuite", np.array(pos), np.array(q))

if __name__ == "__main__":
    main()
