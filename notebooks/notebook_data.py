"""The images the walkthroughs train on, the same on every machine.

Real photos where the README's laptop command has made ./data/cifar10-10k (CIFAR-10); else,
offline or on a fresh clone, 32-px crops of the one photo that ships with matplotlib (a
portrait of Grace Hopper, 512 x 600 px). Crops of a photo have the statistics of photos: edges,
textures, flat sky and cloth. The gratings that `dino_minimal.make_synthetic_images` draws
for `--smoke` do not: on them even a healthy run's teacher stays near the uniform output, so
the collapse diagnostics cannot tell it from a collapsed one (notebooks/RESULTS.md, section 9).
"""
import shutil
from pathlib import Path

import matplotlib.cbook
import torch
from PIL import Image

CIFAR = Path("../data/cifar10-10k")  # made by the README's laptop command, from the notebooks/


def photo_crops(root, per_class, size=32, seed=0):
    """root/{train,val}/cellC/*.png: square crops of 30-90% of the photo's width, resized to
    size px; class C is the cell of a 2 x 5 grid over the photo that holds the crop's centre,
    every 4th crop of a class is a k-NN query."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    (W, H), rng, count = photo.size, torch.Generator().manual_seed(seed), [0] * 10
    while min(count) < per_class:
        side = (0.3 + 0.6 * torch.rand(1, generator=rng).item()) * W
        x, y = (torch.rand(2, generator=rng) * torch.tensor([W - side, H - side])).tolist()
        cell = int(2 * (x + side / 2) / W) + 2 * int(5 * (y + side / 2) / H)  # 0 .. 9
        if count[cell] == per_class:
            continue
        split = "val" if count[cell] % 4 == 0 else "train"
        path = Path(root) / split / f"cell{cell}" / f"{count[cell]:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side)).save(path)
        count[cell] += 1
    return Path(root)


def reading_data(runs, train_per_class, val=True):
    """A fresh runs/data with train_per_class training images per class and, with val, k-NN
    queries: the first CIFAR-10 photos of each class (links) and all 2,000 queries, or photo
    crops (a third as many queries). Prints which."""
    data = Path(runs) / "data"
    shutil.rmtree(data, ignore_errors=True)
    if CIFAR.is_dir():
        for c in sorted((CIFAR / "train").iterdir()):
            (data / "train" / c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[:train_per_class]:
                (data / "train" / c.name / f.name).symlink_to(f.resolve())
        if val:
            (data / "val").symlink_to((CIFAR / "val").resolve())
        queries = " and its val/ as k-NN queries" if val else ""
        print(f"real photos: {10 * train_per_class:,} training images{queries} of {CIFAR}")
        return data
    photo_crops(data, per_class=train_per_class * 4 // 3)
    if not val:
        shutil.rmtree(data / "val")
    print(f"{CIFAR} not found (the README's laptop command makes it): {10 * train_per_class:,} "
          "training images cropped from matplotlib's sample photo instead")
    return data
