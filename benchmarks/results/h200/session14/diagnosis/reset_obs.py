import numpy as np
from flowrl.envs import make
def main():
    for backend in ("cpu", "robosuite"):
        env = make("robosuite/NutAssemblySquare", 2, backend=backend, seed=0)
        o = env.reset(seed=100000).numpy()
        print(backend, "reset obs object[:7]:", np.round(o[:, :7], 3).tolist())
        r = env.step_chunk(__import__("torch").zeros(2, 1, 7))
        print(backend, "after one step object[:7]:", np.round(r.obs.numpy()[:, :7], 3).tolist())
        env.close()
if __name__ == "__main__":
    main()
