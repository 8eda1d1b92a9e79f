"""Square: the robosuite backend's images after steps against robosuite's own camera obs after the same steps."""
import sys
sys.path.insert(0, "/work/main/tests")
import numpy as np, torch
from test_manipulation_tasks import ENV_KWARGS, _robosuite, _copy_state
from flowrl.envs import make
from flowrl.envs.cameras import ROBOMIMIC_CAMERAS, camera_renderer, CameraRenderer

def main():
    scene = sys.argv[1] if len(sys.argv) > 1 else "NutAssemblySquare"
    env = make(f"robosuite/{scene}", 1, backend="robosuite", seed=0, render=True, horizon=400)
    kwargs = {**ENV_KWARGS, "has_offscreen_renderer": True, "use_camera_obs": True,
              "camera_names": list(ROBOMIMIC_CAMERAS), "camera_heights": 84, "camera_widths": 84}
    rs = _robosuite().make(scene, **kwargs)
    ours = make(f"robosuite/{scene}", 1, backend="cpu", seed=0); ours.reset()
    cams = CameraRenderer(ours)
    renderer = camera_renderer(env, list(ROBOMIMIC_CAMERAS), 84, 84)
    env.reset(seed=7)
    rs.rng.bit_generator.state = np.random.default_rng(7).bit_generator.state
    obs = rs.reset()
    rng = np.random.default_rng(0)
    for chunk in range(4):
        acts = rng.uniform(-1, 1, (4, 7)).astype(np.float32)
        res = env.step_chunk(torch.as_tensor(acts)[None])
        for a in acts:
            obs, *_ = rs.step(a.astype(np.float64))
        images = renderer.render()
        _copy_state(rs, ours)
        mine = cams.render()
        st = res.obs[0].numpy()
        for cam in ROBOMIMIC_CAMERAS:
            w = images[cam][0].numpy().astype(np.int16); theirs = np.flipud(obs[f"{cam}_image"]).astype(np.int16)
            o = mine[cam][0].numpy().astype(np.int16)
            print(chunk, cam, "worker vs robosuite obs", round(float(np.abs(w - theirs).mean()), 2),
                  "| ours(copied state) vs robosuite obs", round(float(np.abs(o - theirs).mean()), 2),
                  "| worker vs ours", round(float(np.abs(w - o).mean()), 2))
        print(chunk, "eef pos worker", st[:0].shape, "robosuite", np.round(obs["robot0_eef_pos"], 4))
    renderer.close(); env.close(); rs.close(); cams.close(); ours.close()

if __name__ == "__main__":
    main()
