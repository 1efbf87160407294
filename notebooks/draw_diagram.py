"""Draws notebooks/dino_step.png: one DINO training step (the paper's Fig. 2 and Algorithm 1),
labelled with the names dino_minimal.py uses. From the repository root:

    python notebooks/draw_diagram.py

The views are real: dino_minimal.MultiCrop applied to the photo that ships with matplotlib,
drawn at 96 and 48 px (the paper's views are 224 and 96 px, the laptop preset's 32 and 16).
"""
import sys
from pathlib import Path

import matplotlib.cbook
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import to_rgb
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root: dino_minimal.py
import dino_minimal as dm  # noqa: E402

STUDENT, TEACHER, LOSS = "#2f6db5", "#c8651b", "#444444"
GRAD, EMA, CENTER = "#c0392b", "#2e8b57", "#8e44ad"
MONO = "DejaVu Sans Mono"
plt.rcParams.update({"font.family": "DejaVu Sans", "mathtext.fontset": "dejavusans"})
# the layout, in axes units (100 across): the columns, and the height of each row
SX, TX = 17, 62  # the student's column, the teacher's
MID = (SX + TX) / 2
VIEWS_Y, NETS_Y, CENTER_Y, SOFTMAX_Y, LOSS_Y = 57, 43, 29, 17.5, 4.5
NET_W, NET_H, OP_W, OP_H = 24, 10, 21, 6


def box(ax, x, y, w, h, color, fill=0.08):
    """A rounded box centred at (x, y), edged in color, filled with a tint of it."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, linewidth=1.6, edgecolor=color,
                                facecolor=(*to_rgb(color), fill),
                                boxstyle="round,pad=0,rounding_size=1.2"))


def text(ax, x, y, s, size=11, mono=False, **kw):
    kw = {"ha": "center", "va": "center", **kw}
    ax.text(x, y, s, fontsize=size, family=MONO if mono else None, **kw)


def arrow(ax, start, end, color=LOSS, style="-", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=13, color=color,
                                 linewidth=1.5, linestyle=style, shrinkA=0, shrinkB=0,
                                 connectionstyle=f"arc3,rad={rad}"))


def photo_and_views():
    """The photo (H, W, 3) uint8 and its views [g1, g2, l1, l2], each (h, w, 3) in [0, 1]."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB")).copy()
    crops = dm.MultiCrop(global_size=96, local_size=48, local_number=2)
    views = crops(torch.from_numpy(photo).permute(2, 0, 1), torch.Generator().manual_seed(3))
    mean = torch.tensor(dm.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(dm.IMAGENET_STD).view(3, 1, 1)
    return photo, [(v * std + mean).clamp(0, 1).permute(1, 2, 0) for v in views]


def thumb(ax, image, x, y, side, edge):
    """image drawn as a side x side square centred at (x, y), framed in edge."""
    extent = (x - side / 2, x + side / 2, y - side / 2, y + side / 2)
    ax.imshow(image, extent=extent, zorder=3)
    ax.add_patch(Rectangle(extent[::2], side, side, fill=False, edgecolor=edge, linewidth=1.5,
                           zorder=4))


def draw_views(ax):
    """The image, then its views: all of them to the student, the global ones to the teacher."""
    photo, views = photo_and_views()
    h, w, _ = photo.shape
    y = VIEWS_Y
    ax.imshow(photo, extent=(MID - 4, MID + 4, y + 7, y + 7 + 8 * h / w))
    text(ax, MID + 6, y + 14, "an image x of the batch", ha="left")
    text(ax, MID + 6, y + 10.8, "MultiCrop draws its V = 2 + L views", ha="left", size=10.5)
    names = ["$x_1^g$", "$x_2^g$", "$x_1^l$", "$x_2^l$"]
    for i, (view, name) in enumerate(zip(views, names)):
        x = SX + (-9.7, -2.2, 4.8, 10.8)[i]
        thumb(ax, view, x, y, 6.5 if i < 2 else 4.2, STUDENT)
        text(ax, x, y - 4.8, name, size=12)
    for i, (view, name) in enumerate(zip(views[:2], names)):
        thumb(ax, view, TX - 4 + 8 * i, y, 6.5, TEACHER)
        text(ax, TX - 4 + 8 * i, y - 4.8, name, size=12)
    arrow(ax, (MID - 4.5, y + 9), (SX + 9, y + 5.8), rad=0.15)
    arrow(ax, (MID + 4.5, y + 9), (TX - 9, y + 5.8), rad=-0.15)
    text(ax, SX - 13, y + 5.3, "all V views to the student", color=STUDENT, size=10.5, ha="left")
    text(ax, TX - 1, y + 5.3, "the 2 global views to the teacher", color=TEACHER, size=10.5,
         ha="left")
    for x, color in ((SX, STUDENT), (TX, TEACHER)):
        arrow(ax, (x, y - 6.8), (x, NETS_Y + NET_H / 2), color=color)


def draw_networks(ax):
    """Student and teacher, and the EMA that makes the one from the other."""
    y = NETS_Y
    for x, color, name, code, what in (
            (SX, STUDENT, r"student  $g_{\theta_s}$", "MultiCropNet:", "ViT + DINOHead"),
            (TX, TEACHER, r"teacher  $g_{\theta_t}$", "make_teacher(student):",
             "a copy, no gradients")):
        box(ax, x, y, NET_W, NET_H, color)
        text(ax, x, y + 2.6, name, size=12.5, color=color, weight="bold")
        text(ax, x, y - 0.6, code, size=10, mono=True)
        text(ax, x, y - 3.2, what, size=10)
    arrow(ax, (SX + NET_W / 2, y), (TX - NET_W / 2, y), color=EMA)
    text(ax, MID, y + 2.3, "ema_update()", size=10.5, mono=True, color=EMA)
    text(ax, MID, y - 2.3, r"$\theta_t \leftarrow \lambda\theta_t + (1-\lambda)\theta_s$",
         size=11, color=EMA)
    text(ax, MID, y - 5.4, r"$\lambda$ = momentum: 0.996 $\to$ 1", size=10, color=EMA)
    text(ax, SX + 1, y - 8, "(V·B, K)", size=10, ha="left", color=STUDENT)
    text(ax, TX - 1, y - 8, "(2·B, K)", size=10, ha="right", color=TEACHER)
    bottom = y - NET_H / 2
    arrow(ax, (SX, bottom), (SX, SOFTMAX_Y + OP_H / 2), color=STUDENT)
    arrow(ax, (TX, bottom), (TX, CENTER_Y + OP_H / 2), color=TEACHER)


def draw_heads(ax):
    """Centering and sharpening on the teacher's side, the temperature on the student's."""
    y = CENTER_Y
    box(ax, TX, y, OP_W, OP_H, TEACHER)
    text(ax, TX, y + 1.2, "centering:  $-\\,C$", size=11.5)
    text(ax, TX, y - 1.5, "DINOLoss.center", size=10, mono=True)
    arrow(ax, (TX, y - OP_H / 2), (TX, SOFTMAX_Y + OP_H / 2), color=TEACHER)
    # the center follows the teacher's raw outputs
    note = TX + OP_W / 2 + 2
    arrow(ax, (TX + 0.3, y + 7), (note + 1, y + 5.2), color=CENTER, style=":", rad=-0.3)
    text(ax, note, y + 3.6, "update_center(), after the loss:", size=10, ha="left",
         color=CENTER)
    text(ax, note, y + 0.6, r"$C \leftarrow m\,C + (1-m)\,\mathrm{mean}\ g_{\theta_t}(x)$",
         size=10.5, ha="left", color=CENTER)
    text(ax, note, y - 2.4, "m = center_momentum = 0.9", size=10, ha="left", color=CENTER)
    for x, color, tau, note in (
            (SX, STUDENT, r"$\tau_s$", "student_temp = 0.1"),
            (TX, TEACHER, r"$\tau_t$", "teacher_temp = 0.04\n" + r"$\tau_t < \tau_s$: sharpening")):
        box(ax, x, SOFTMAX_Y, OP_W, OP_H, color)
        text(ax, x, SOFTMAX_Y, f"softmax( $\\cdot$ / {tau})", size=11.5)
        text(ax, x + OP_W / 2 + 2, SOFTMAX_Y, note, size=10, ha="left", color=color)


def draw_loss(ax):
    """The cross-entropy over pairs, the stop-gradient and the student's gradient."""
    y, w, h = LOSS_Y, 64, 8.5
    box(ax, MID, y, w, h, LOSS, fill=0.05)
    text(ax, MID, y + 1.8, r"DINOLoss:  $H(P_t(x), P_s(x')) = -\Sigma_k\, P_t(x)_k"
         r"\,\log P_s(x')_k$", size=12)
    text(ax, MID, y - 2, "mean over the 2V − 2 pairs: x a global view, x' any other view",
         size=10)
    top = SOFTMAX_Y - OP_H / 2
    label_y = (top + y + h / 2) / 2
    arrow(ax, (SX, top), (SX, y + h / 2), color=STUDENT)
    arrow(ax, (TX, top), (TX, y + h / 2), color=TEACHER)
    text(ax, SX + 1.2, label_y, "$P_s(x')$", size=12, color=STUDENT, ha="left")
    text(ax, TX - 1.2, label_y, "$P_t(x)$", size=12, color=TEACHER, ha="right")
    ax.plot([TX - 1.4, TX + 1.4], [label_y - 1, label_y + 1], color=GRAD, linewidth=2.4)  # cut
    text(ax, TX + 2, label_y, "sg", size=11, ha="left", color=GRAD, weight="bold")
    text(ax, TX + 5.5, label_y, "stop-gradient", size=10, ha="left", color=GRAD)
    # the only gradient: from the loss to the student's parameters
    x = 2.8
    ax.plot([MID - w / 2, x, x], [y, y, NETS_Y], color=GRAD, linewidth=1.5, linestyle="--")
    arrow(ax, (x, NETS_Y), (SX - NET_W / 2, NETS_Y), color=GRAD, style="--")
    text(ax, x - 1.5, (y + NETS_Y) / 2, "loss.backward(); optimizer.step()", size=10, mono=True,
         rotation=90, color=GRAD)


def draw(out):
    fig = plt.figure(figsize=(10, 7.8))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 78)
    ax.axis("off")
    text(ax, 50, 75.5, "One DINO step:  train_step(state, views, epoch)", size=14, weight="bold")
    draw_views(ax)
    draw_networks(ax)
    draw_heads(ax)
    draw_loss(ax)
    fig.savefig(out, dpi=150, facecolor="white")


if __name__ == "__main__":
    draw(HERE / "dino_step.png")
