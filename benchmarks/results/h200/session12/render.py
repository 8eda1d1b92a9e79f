"""GPU smoke (argv[1] == 'smoke': compiles, checks layout) or timing ('bench') of MuJoCo Warp camera
rendering on Lift (session 12)."""
import sys, time, json
import torch
sys.path.insert(0, "benchmarks")
import flowrl.envs as E
from flowrl.envs.cameras import camera_renderer
t0 = time.time()
if sys.argv[1] == "smoke":
    env = E.make("robosuite/Lift", 64, backend="warp", device="cuda", seed=0)
    env.reset(seed=3)
    for _ in range(3):
        env.step(0.3 * torch.randn(64, env.act_dim, device="cuda"))
    torch.cuda.synchronize()
    print(f"env ready {time.time() - t0:.1f} s", flush=True)
    r = camera_renderer(env, ["agentview", "robot0_eye_in_hand"], 84, 84)
    imgs = r.render()
    for cam, img in imgs.items():
        print("image", cam, tuple(img.shape), img.dtype, img.device, float(img.float().mean()),
              f"{time.time() - t0:.1f} s", flush=True)
        assert img.shape == (64, 84, 84, 3) and img.dtype == torch.uint8 and img.is_cuda
        assert not torch.equal(img[0], img[1])
    img = imgs["agentview"]
    sub = r.render([5, 1])["agentview"]
    assert torch.equal(sub[1], img[1]) and torch.equal(sub[0], img[5])
    import numpy as np
    np.save("/tmp/w/logs/warp_agentview.npy", img[:4].cpu().numpy())
    env.close()
    print("smoke ok", flush=True)
else:
    from env_throughput import chunk_loop, policy_loop
    out = {}
    for n in (1024, 4096):
        out[n] = {"render_every_step": chunk_loop("robosuite/Lift", n, 3.0, "warp", "cuda", chunk_len=1,
                                                  cameras=["agentview"])}
        print(n, out[n], f"{time.time() - t0:.1f} s", flush=True)
        out[n]["pixel_policy"] = policy_loop("robosuite/Lift", n, 3.0, 0, "cuda", "warp", ["agentview"])
        print(n, out[n], f"{time.time() - t0:.1f} s", flush=True)
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": out}))
