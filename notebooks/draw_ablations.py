"""Draws the crop-count and teacher-momentum ablations of RESULTS.md as curves: weighted k-NN
top-1 of the teacher (2,000 queries) against training, with error bars of one standard error.
From the repository root:

    python notebooks/draw_ablations.py

writes notebooks/ablation_crops.png and notebooks/ablation_momentum.png. The numbers are the
ones RESULTS.md measured (the section is named beside each); the two 60-epoch CIFAR-10 curves
are read from laptop_runs_knn.jsonl, the knn records of those runs' logs.
"""
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
QUERIES = 2000  # k-NN queries of every run below: 200 per class
PIXELS = {"CIFAR-10": 38.4, "Fashion-MNIST": 81.05}  # k-NN on the raw pixels (section 1)

# run -> {epoch: k-NN}: the same CPU time for each run of a set (sections 2, "2 local crops";
# 3.3, 3.4, 3.5). The laptop preset otherwise, momentum ending at 1; 0 local crops take the
# official advice of global crops of 14-100%; the 8-crop runs warm the lr up for 1 epoch, not 5.
CROPS = {
    "CIFAR-10": {
        "0 local crops, 62 epochs": {16: 36.9, 32: 41.2, 48: 41.1, 62: 42.35},
        "2 local crops, 48 epochs": {16: 38.05, 32: 40.75, 48: 42.2},
        "8 local crops, 32 epochs": {8: 34.3, 16: 37.5, 24: 39.4, 32: 39.65},
    },
    "Fashion-MNIST": {
        "0 local crops, 62 epochs": {16: 73.05, 32: 77.5, 48: 80.05, 62: 79.65},
        "2 local crops, 48 epochs": {16: 76.25, 32: 80.6, 48: 81.15},
        "8 local crops, 32 epochs": {32: 79.85},
    },
}
# Fashion-MNIST, 48 epochs, the teacher momentum's cosine from its start to its end (3.5)
MOMENTUM_48 = {
    "0.98 → 1": {16: 76.85, 32: 80.5, 48: 80.9},
    "0.99 → 1": {16: 76.25, 32: 80.6, 48: 81.15},
    "0.99 → 0.995": {16: 75.9, 32: 81.3, 48: 81.5},
}
# CIFAR-10, 60 epochs (sections 1 and 6): set in laptop_runs_knn.jsonl -> schedule
MOMENTUM_60 = {"cifar10": "0.99 → 0.995 (the preset)",
               "cifar10_momentum_paper": "0.996 → 1 (the paper)"}
COLORS = ["#1b9e77", "#d95f02", "#7570b3"]


def se(p, n=QUERIES):
    """One standard error of an accuracy p (in %) measured on n queries, in points."""
    return 100 * math.sqrt(p / 100 * (1 - p / 100) / n)


def curve(ax, points, label, color, x_scale=1.0, style="o-"):
    """points {x: k-NN}: a line with error bars of one standard error."""
    xs = sorted(points)
    ys = [points[x] for x in xs]
    ax.errorbar([x * x_scale for x in xs], ys, [se(y) for y in ys], fmt=style, color=color,
                capsize=3, markersize=5, linewidth=1.6, label=label)


def pixels(ax, name, x):
    """k-NN on the raw pixels: a horizontal line, named at x."""
    ax.axhline(PIXELS[name], color="gray", linestyle="--", linewidth=1)
    ax.text(x, PIXELS[name] + 0.15, f"raw pixels {PIXELS[name]}%", color="gray", fontsize=8.5,
            ha="center", va="bottom")


def style(ax, title, xlabel, legend="upper left"):
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel, fontsize=10)
    ax.set_ylabel("teacher k-NN top-1 (%)", fontsize=10)
    ax.grid(alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8.5, loc=legend, frameon=False)


def draw_crops(out):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, runs), legend in zip(axes, CROPS.items(), ("upper left", "lower right")):
        for color, (label, points) in zip(COLORS, runs.items()):
            curve(ax, points, label, color, x_scale=1 / max(points))
        pixels(ax, name, 0.12)
        ax.set_xlim(0, 1.05)
        style(ax, f"{name}: local crops in the same CPU time",
              "share of the run (epoch / its last epoch)", legend)
    fig.suptitle("Multi-crop at 32 px: 2 x 32-px global views + L x 16-px local views "
                 "(error bars: 1 SE, 2,000 queries)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130, facecolor="white")


def draw_momentum(out):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    lines = (HERE / "laptop_runs_knn.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for color, (key, label) in zip(COLORS[1:], MOMENTUM_60.items()):
        curve(a1, {r["epoch"]: r["knn_top1"] for r in records if r["set"] == key}, label, color)
    pixels(a1, "CIFAR-10", 8)
    style(a1, "CIFAR-10, 60 epochs: the preset's schedule and the paper's", "epoch")
    for color, (label, points) in zip(COLORS, MOMENTUM_48.items()):
        curve(a2, points, label, color)
    pixels(a2, "Fashion-MNIST", 21)
    a2.set_xticks([16, 32, 48])
    style(a2, "Fashion-MNIST, 48 epochs: the start, or the end", "epoch", "lower right")
    fig.suptitle(r"Teacher momentum $\lambda$: a cosine from $\lambda_0$ to $\lambda_T$ "
                 "(error bars: 1 SE, 2,000 queries)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=130, facecolor="white")


if __name__ == "__main__":
    draw_crops(HERE / "ablation_crops.png")
    draw_momentum(HERE / "ablation_momentum.png")
