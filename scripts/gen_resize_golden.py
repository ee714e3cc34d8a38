#!/usr/bin/env python3
"""Goldens for zhijian-data's PIL-exact resize (`transforms::tests::resize_matches_torchvision_goldens`).

Run with the shared venv (torch 2.11, torchvision 0.26, Pillow):
    /root/.cache/zhijian/venv/bin/python scripts/gen_resize_golden.py

Sources (written to crates/zhijian-data/tests/fixtures/resize/): two small RGB
crops and one grey crop of foolbox's ImageNet sample photos (MIT licence,
`zhijian fetch foolbox-samples`), odd sizes on purpose. For each source it
writes, as lossless PNGs, torchvision's output on the PIL image for:
  down  Resize([23, 17]) bilinear antialias     up    Resize([101, 77])
  short Resize(29) (shorter side)               crop  resized_crop(5, 9, 31, 40, [16, 16])
  box   PIL resize to 11x13 with BOX, then Resize([40, 40])
  eval  Resize(floor(32 / 0.9) = 35), CenterCrop(32)

torchvision calls PIL's `Image.resize` for PIL inputs, which the Rust code
reimplements, so the test expects equality. The script also prints how far
torchvision's *tensor* path (uint8 and float32, antialias=True) is from the
PIL path, on the fixtures and on the 20 full-size foolbox photos resized to
224 for evaluation, since that is the other "torchvision resize" people use.
"""
import math
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "zhijian-data", "tests", "fixtures", "resize")
FOOLBOX = os.path.join(os.environ.get("ZHIJIAN_CACHE") or os.path.expanduser("~/.cache/zhijian/assets"), "foolbox-samples")
BILINEAR = InterpolationMode.BILINEAR

# (name, foolbox file, PIL crop box (left, upper, right, lower), mode)
SOURCES = [
    # The most textured windows of three photos, so every rounding shows.
    ("photo_a", "imagenet_00_243.jpg", (40, 464, 101, 511), "RGB"),  # 61 wide, 47 high
    ("photo_b", "imagenet_12_741.jpg", (80, 368, 132, 438), "RGB"),  # 52 wide, 70 high (portrait)
    ("grey", "imagenet_09_455.jpg", (40, 368, 96, 408), "L"),  # 56 wide, 40 high
]


def cases(img):
    """The golden cases of one source (a PIL image or a CHW tensor), by name; `box` for PIL only."""
    size, crop_pct = 32, 0.9
    out = {
        "down": F.resize(img, [23, 17], BILINEAR, antialias=True),
        "up": F.resize(img, [101, 77], BILINEAR, antialias=True),
        "short": F.resize(img, 29, BILINEAR, antialias=True),
        "crop": F.resized_crop(img, 5, 9, 31, 40, [16, 16], BILINEAR, antialias=True),
        "eval": F.center_crop(F.resize(img, math.floor(size / crop_pct), BILINEAR, antialias=True), [size, size]),
    }
    if isinstance(img, Image.Image):
        # PIL's size is (width, height): 11 wide, 13 high.
        out["box"] = F.resize(img.resize((11, 13), Image.BOX), [40, 40], BILINEAR, antialias=True)
    return out


def as_array(x):
    if isinstance(x, Image.Image):
        a = np.asarray(x).astype(np.int64)
        return a if a.ndim == 3 else a[:, :, None]
    t = x.float()
    if t.dtype != torch.uint8:
        t = t.round().clamp(0, 255)
    return t.permute(1, 2, 0).numpy().astype(np.int64)


def tensor_paths(img):
    """torchvision's tensor inputs: uint8 and float32 images in [0, 255]."""
    t = F.pil_to_tensor(img)
    return {"uint8": t, "float32": t.float()}


def main():
    if not os.path.isdir(FOOLBOX):
        sys.exit(f"{FOOLBOX} missing: run `zhijian fetch foolbox-samples` (or `cargo xtask fetch foolbox-samples`)")
    os.makedirs(OUT, exist_ok=True)
    worst = {"uint8": 0, "float32": 0}
    for name, file, box, mode in SOURCES:
        src = Image.open(os.path.join(FOOLBOX, file)).convert("RGB").crop(box).convert(mode)
        src.save(os.path.join(OUT, f"{name}.png"), optimize=True)
        for case, out in cases(src).items():
            out.save(os.path.join(OUT, f"{name}_{case}.png"), optimize=True)
            if case == "box":
                continue
            for kind, t in tensor_paths(src).items():
                d = int(np.abs(as_array(cases(t)[case]) - as_array(out)).max())
                worst[kind] = max(worst[kind], d)
        print(f"{name}: {src.size[0]}x{src.size[1]} {mode}")
    print(f"fixtures: torchvision tensor path vs PIL path, max |diff| (0-255): {worst}")

    # Full-size photos, the evaluation transform at 224 (crop_pct 0.875 -> 256).
    worst = {"uint8": 0, "float32": 0}
    for file in sorted(f for f in os.listdir(FOOLBOX) if f.endswith(".jpg")):
        img = Image.open(os.path.join(FOOLBOX, file)).convert("RGB")
        want = as_array(F.center_crop(F.resize(img, 256, BILINEAR, antialias=True), [224, 224]))
        for kind, t in tensor_paths(img).items():
            got = as_array(F.center_crop(F.resize(t, 256, BILINEAR, antialias=True), [224, 224]))
            worst[kind] = max(worst[kind], int(np.abs(got - want).max()))
    print(f"20 foolbox photos, eval at 224: torchvision tensor path vs PIL path, max |diff| (0-255): {worst}")


if __name__ == "__main__":
    main()
