"""Compare robosuite's own Square camera images with our cpu backend's OpenGL images of the same state."""
import os, sys
sys.path.insert(0, "/work/main/tests")
import numpy as np
from test_manipulation_tasks import ENV_KWARGS, _copy_state, _robosuite
from flowrl.envs import make
from flowrl.envs.cameras import ROBOMIMIC_CAMERAS, CameraRenderer
os.environ["MUJOCO_GL"] = "egl"
scene = sys.argv[1] if len(sys.argv) > 1 else "NutAssemblySquare"
kwargs = {**ENV_KWARGS, "has_offscreen_renderer": True, "use_camera_obs": True,
          "camera_names": list(ROBOMIMIC_CAMERAS), "camera_heights": 84, "camera_widths": 84}
rs = _robosuite().make(scene, **kwargs)
rs.rng.bit_generator.state = np.random.default_rng(7).bit_generator.state
rs.reset()
rng = np.random.default_rng(0)
ours = make(f"robosuite/{scene}", 1, backend="cpu", seed=0)
ours.reset()
from PIL import Image
with CameraRenderer(ours) as cams:
    for step in range(3):
        obs, *_ = rs.step(rng.uniform(-1, 1, 7))
        _copy_state(rs, ours)
        images = cams.render()
        for cam in ROBOMIMIC_CAMERAS:
            theirs = np.flipud(obs[f"{cam}_image"]).astype(np.int16)
            mine = images[cam][0].numpy().astype(np.int16)
            print(step, cam, "mean abs diff", round(float(np.abs(mine - theirs).mean()), 2), "means", mine.mean().round(1), theirs.mean().round(1))
            if step == 2:
                Image.fromarray(np.concatenate([mine, theirs], 1).astype(np.uint8)).resize((336, 168)).save(f"/tmp/s14diag/{scene}_{cam}.png")
rs.close(); ours.close()
