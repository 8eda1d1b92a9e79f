"""Image encoders of pixel policies: camera images in, a feature vector per image out.

:class:`ImageEncoder` is one small convolutional trunk per camera ending in a spatial softmax
(expected image coordinates of each feature map, as robomimic's visuomotor policies use), then a
linear map to ``features`` values. Images are uint8 ``(B, H, W, 3)`` RGB, top row first (what
:class:`flowrl.envs.cameras.CameraRenderer` and ``flowrl collect --cameras`` produce). While the
module trains (training mode, gradients on), :func:`random_shift` augments each image by a random shift
of up to ``shift`` pixels (DrQ's pad-and-crop), the augmentation DPPO and ReinFlow use for pixel
policies, and with ``jitter`` > 0 :func:`random_photometric` varies each image's brightness, contrast
and colour balance, so that a policy trained on one renderer's images (MuJoCo Warp's ray tracer) is
less tied to its lighting when another draws them (robosuite's OpenGL, a real camera); inference and
targets computed without gradients see the images as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, C, H, W)`` float images, each translated by a random whole number of pixels in
    ``[-shift, shift]`` per axis, the border replicated (pad by ``shift``, crop at a random offset)."""
    if shift <= 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator, device=images.device)
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)[None]  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)[None]  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_photometric(images: torch.Tensor, jitter: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, C, H, W)`` float images in [0, 1], each with its own random contrast (about its mean), brightness
    and per-channel gain, each factor uniform in ``[1 - jitter, 1 + jitter]``, clipped to [0, 1]."""
    if jitter <= 0:
        return images
    b, c = images.shape[:2]

    def factors(*shape: int) -> torch.Tensor:
        u = torch.rand(*shape, generator=generator, device=images.device, dtype=images.dtype)
        return 1.0 + jitter * (2.0 * u - 1.0)

    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * factors(b, 1, 1, 1) + mean
    return (out * factors(b, 1, 1, 1) * factors(b, c, 1, 1)).clamp(0.0, 1.0)


class SpatialSoftmax(nn.Module):
    """``(B, C, H, W)`` feature maps -> ``(B, 2C)``: the softmax-weighted mean (x, y) position of each
    map, in [-1, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weights = torch.softmax(x.flatten(2), dim=-1).view(b, c, h, w)
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        return torch.cat([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], dim=1)


class CameraTrunk(nn.Module):
    """One camera's encoder: four 3x3 convolutions (the first two with stride 2), spatial softmax,
    a linear map to ``features``."""

    def __init__(self, features: int, channels: int = 32) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.keypoints = SpatialSoftmax()
        self.out = nn.Linear(2 * channels, features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.keypoints(self.conv(images)))


class ImageEncoder(nn.Module):
    """``{camera: (B, H, W, 3) uint8}`` -> ``(B, len(cameras) * features)``, cameras in the given order."""

    def __init__(self, cameras: list[str] | tuple[str, ...], image_size: int, features: int, shift: int,
                 jitter: float = 0.0) -> None:
        super().__init__()
        self.cameras, self.image_size, self.features, self.shift = tuple(cameras), image_size, features, shift
        self.jitter = jitter
        self.trunks = nn.ModuleDict({c: CameraTrunk(features) for c in self.cameras})

    @property
    def out_dim(self) -> int:
        return len(self.cameras) * self.features

    def forward(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise ValueError(f"images of camera(s) {', '.join(missing)} are missing (the policy sees "
                             f"{', '.join(self.cameras)})")
        parts = []
        for camera in self.cameras:
            x = images[camera]
            want = (self.image_size, self.image_size, 3)
            if tuple(x.shape[1:]) != want:
                raise ValueError(f"images of camera {camera} have shape {tuple(x.shape)}, expected (B, {want[0]}, "
                                 f"{want[1]}, 3)")
            x = x.permute(0, 3, 1, 2).float() / 255.0
            if self.training and torch.is_grad_enabled():  # augment what gradients flow through, not inference
                x = random_photometric(random_shift(x, self.shift), self.jitter)
            parts.append(self.trunks[camera](x))
        return torch.cat(parts, dim=1)


__all__ = ["CameraTrunk", "ImageEncoder", "SpatialSoftmax", "random_photometric", "random_shift"]
