r"""DINO in one file: "Emerging Properties in Self-Supervised Vision Transformers"
(Caron et al. 2021, arXiv 2104.14294), to be read top to bottom beside the paper.

    python dino_minimal.py --smoke                         # the whole loop on a CPU, in seconds
    python dino_minimal.py --data ./data/cifar10-10k --download cifar10 --preset laptop
    python dino_minimal.py --data ./imagenette --download  # one CUDA GPU, the paper's recipe
    torchrun --nproc_per_node=4 dino_minimal.py --data ./imagenette

Part I is all of DINO, each piece before its first use: backbone, head, loss, what Algorithm 1
starts from, the views, the training step (Section 6: the top-down view starts there), the
diagnostics. Part II runs it: data, loop, checkpoints, batched augmentation, precision, presets,
command line. Departures from the paper and official code: named where made; why: README.md.

    Algorithm 1  meaning                              here
    gs, gt       student and teacher networks         MultiCropNet(f, DINOHead), make_teacher()
    tps, tpt     student and teacher temperatures     DINOLoss.student_temp, Schedules.teacher_temp
    C            the center, a (1, K) buffer          DINOLoss.center, DINOLoss.update_center()
    H(t, s)      cross-entropy -sum t log s           DINOLoss.forward()
    update(gs)   a step of the student's optimizer    make_optimizer(), in train_step()
    l            teacher momentum, 0.996 -> 1         Schedules.momentum, ema_update()
    m            center momentum, 0.9                 DINOLoss.center_momentum
    augment(x)   one random view of x, drawn twice;   MultiCrop() draws all V views of x at
                 multi-crop (Eq. 3) draws 2 + L       once, each as VIEWS says

Shapes: B images, V = 2 + L views, N patches (1 + N tokens), D width, K prototypes (--out_dim).
Multi-crop outputs are *view-major*: rows [v*B:(v+1)*B] of a (V*B, ...) tensor are view v, so
row b of every view comes from image b (the official code relies on it without a word).
"""
import argparse
import copy
import json
import math
import os
import signal
import sys
import time
from collections import Counter, OrderedDict, namedtuple
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby, product
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.amp import GradScaler
from torch.nn.utils.parametrizations import weight_norm
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.transforms.functional import pil_to_tensor

# ==============================================================================================
#                                       PART I: DINO
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# 1. The backbone f: a Vision Transformer (Sec. 3.2; Dosovitskiy et al. 2021) or a ResNet. ARCHS:
#    (width D, blocks, heads); module names as official, so the released DINO weights load.
# ----------------------------------------------------------------------------------------------
ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}

def init_linear(m):
    """Official init: truncated normal (std 0.02) weights and zero biases for every Linear."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

def drop_path(x, p, training):
    """Stochastic depth: drop a sample's whole residual branch with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p)  # (B, 1, 1)
    # divided by 1 - p, so the branch's expected output is the same as at test time
    return x * keep / (1 - p)

class Attention(nn.Module):
    """Self-attention over T = 1 + N tokens, h heads of width d = D/h: softmax(q k^T/sqrt(d)) v."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # with bias, as official
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)
        if return_attention:
            return self.weights(q, k)  # (B, h, T, T): the maps of Fig. 1 and 3
        x = self.attend(q, k, v)  # (B, h, T, d)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)

    def weights(self, q, k):
        # A = softmax(q k^T / sqrt(d)), the softmax in fp32 as under CUDA autocast
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, h, T, T)
        return scores.softmax(-1, dtype=torch.float32)

    def attend(self, q, k, v):
        # A v; Part II may swap in one fused kernel (FusedAttention)
        return self.weights(q, k).to(v.dtype) @ v

class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, heads, drop_path_rate):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(),
                                             fc2=nn.Linear(4 * dim, dim)))
        self.drop_path_rate = drop_path_rate

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)

class VisionTransformer(nn.Module):
    """ViT: p x p patches embedded, a CLS token, position embeddings, pre-norm blocks; the
    final CLS token is the image's feature (the paper's backbone f)."""

    def __init__(self, img_size=224, patch_size=16, dim=384, depth=12, heads=6, drop_path_rate=0.0):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, dim
        self.patch_embed = nn.Module()  # official name: patch_embed.proj
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # drop-path, linear from 0
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    def interpolate_pos_encoding(self, h, w):
        """Bicubic resize of the patch position embeddings to an (h, w) grid (local views)."""
        n0 = math.isqrt(self.pos_embed.shape[1] - 1)
        if (h, w) == (n0, n0):
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, n0, n0, -1).permute(0, 3, 1, 2)  # (1, D, n0, n0)
        # by the factor (h + 0.1) / n0, as official (dino #8): for a 96-px view the 14 x 14 table
        # becomes 6 x 6, read at points 14/6.1 patches apart, not 14/6 as with size=(6, 6); the
        # released weights were trained with those points
        scale = ((h + 0.1) / n0, (w + 0.1) / n0)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")  # (1, D, h, w)
        grid = grid.flatten(2).transpose(1, 2)  # (1, h*w, D)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)  # (1, 1+h*w, D)

    def prepare_tokens(self, x):
        # z = [x_cls; x_1 E; ...; x_N E] + E_pos: a linear embedding E of each p x p patch
        # (a strided convolution), the CLS token in front, a learned position embedding added
        B, _, H, W = x.shape
        patches = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), patches], dim=1)  # (B, 1+N, D)
        return x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]  # (B, D): the CLS token is the image's representation

    @torch.no_grad()
    def get_last_selfattention(self, x):
        """The last block's attention, (B, h, 1+N, 1+N); row 0 is the CLS query (Fig. 1)."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1].attn(self.blocks[-1].norm1(x), return_attention=True)

RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}

class ResNet(torchvision.models.ResNet):
    """f may be "a ViT or a ResNet" (Sec. 3.1, Table 2): torchvision's resnet18 or resnet50, no
    classifier; f(x) is the average-pooled feature of the last stage, (B, 512) or (B, 2048)."""

    def __init__(self, arch):
        super().__init__(*RESNETS[arch])  # torchvision's block and blocks per stage
        self.embed_dim, self.fc = self.fc.in_features, nn.Identity()

    def get_last_selfattention(self, x):
        raise TypeError("a convnet has no self-attention, hence no attention maps: use a ViT")

# ----------------------------------------------------------------------------------------------
# 2. The DINO head and the multi-crop forward (Sec. 3.1, App. C)
# ----------------------------------------------------------------------------------------------
class DINOHead(nn.Module):
    """3-layer MLP (D -> 2048 -> 2048 -> 256), L2 normalization, weight-normalized Linear to K."""

    def __init__(self, in_dim, out_dim, hidden=2048, bottleneck=256, norm_last_layer=True,
                 use_bn=False):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                  nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.GELU(),
                  nn.Linear(hidden, bottleneck)]
        # the BatchNorms only with the official --use_bn_in_head; the kept ones named 0, 1, ...
        self.mlp = nn.Sequential(*(m for m in layers if use_bn or type(m) is not nn.BatchNorm1d))
        self.mlp.apply(init_linear)
        # W = g v / ||v|| per row; with g fixed to 1 (norm_last_layer) every logit is a cosine
        # in [-1, 1] between the bottleneck vector and one of the K prototypes
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # g, (K, 1)
        gain.data.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)  # (n, 256) on the unit sphere: the L2 bottleneck
        return self.last_layer(x)  # (n, K)

class MultiCropNet(nn.Module):
    """g = head o backbone over the views, one backbone call per size; features for diagnostics."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views):  # V tensors (B, 3, h_v, w_v), the global views first
        feats = []
        for _, same_size in groupby(views, key=lambda v: v.shape[-2:]):
            feats.append(self.backbone(torch.cat(list(same_size))))  # (n*B, D) for n views
        feats = torch.cat(feats)  # (V*B, D), view-major
        return feats, self.head(feats)  # (V*B, D), (V*B, K)

# ----------------------------------------------------------------------------------------------
# 3. The loss: centering, sharpening and cross-entropy over pairs of views (Sec. 3.1, Eq. 1-4)
# ----------------------------------------------------------------------------------------------
class DINOLoss(nn.Module):
    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # C, (1, K), zero at start

    def forward(self, student_out, teacher_out, teacher_temp):
        """student_out (V*B, K), teacher_out (2*B, K) -> (loss, teacher probabilities (2, B, K))."""
        B = teacher_out.shape[0] // 2
        V = student_out.shape[0] // B
        # P_s(x) = softmax(g_s(x) / tau_s), as log-probabilities
        log_ps = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        log_ps = log_ps.view(V, B, -1)  # (V, B, K)
        # P_t(x) = softmax((g_t(x) - C) / tau_t): centering, then sharpening (tau_t < tau_s);
        # no gradient flows into the teacher (Algorithm 1: gt.detach())
        pt = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)
        pt = pt.detach().view(2, B, -1)  # (2, B, K)
        # H(P_t(x), P_s(x')) = -sum_k P_t(x)_k log P_s(x')_k, averaged over the batch,
        # for every teacher view t and student view v at once
        ce = -torch.einsum("tbk,vbk->tv", pt, log_ps) / B  # (2, V)
        # Eq. 3 sums over x in {x1g, x2g} and x' != x, 2V - 2 pairs; here their mean, as official
        pairs = ~torch.eye(2, V, dtype=torch.bool, device=ce.device)
        return ce[pairs].mean(), pt

    @torch.no_grad()
    def update_center(self, teacher_out):
        """Eq. 4: C <- m C + (1 - m) mean_i g_t(x_i), over the batches of every process."""
        batch_sum = teacher_out.float().sum(0, keepdim=True)  # (1, K), raw (uncentered) outputs
        n = torch.tensor(teacher_out.shape[0], device=batch_sum.device)
        if dist.is_initialized():  # the official code averages over all GPUs
            dist.all_reduce(batch_sum)
            dist.all_reduce(n)
        self.center.mul_(self.center_momentum).add_(batch_sum / n, alpha=1 - self.center_momentum)

# ----------------------------------------------------------------------------------------------
# 4. What Algorithm 1 starts from: teacher, optimizer, schedules (Sec. 3.1, App. B); the EMA
# ----------------------------------------------------------------------------------------------
def make_teacher(student):
    """gt: a copy of gs (the same initial weights, no storage shared), never given gradients."""
    teacher = copy.deepcopy(student).eval().requires_grad_(False)  # eval(): no drop-path
    for m in teacher.modules():  # but, as official, its BatchNorms use the batch's statistics
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)):
            m.train()
    return teacher

def param_groups(model):
    """Weight decay on weights only: not on biases and 1-D parameters (norms); the official
    rule, so pos_embed and cls_token are decayed. Group 0 receives the wd schedule."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

def make_optimizer(student, name="adamw", **speed):
    """update(gs): AdamW as official for a ViT, SGD (momentum 0.9) for a convnet."""
    if name == "sgd":  # lr (and weight decay): set by every step from the schedules
        return torch.optim.SGD(param_groups(student), lr=0.0, momentum=0.9)
    return torch.optim.AdamW(param_groups(student), lr=0.0, **speed)

def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """One value per iteration: a linear warmup to base, then a cosine from base to final."""
    n = warmup_epochs * iters_per_epoch
    warmup = torch.linspace(warmup_start, base, n, dtype=torch.float64)
    n = epochs * iters_per_epoch - n
    # t = 0 .. 1 inclusive: ends exactly at final (the official schedule stops a step short)
    t = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    # v(t) = final + (base - final) (1 + cos(pi t)) / 2
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t))
    return torch.cat([warmup, cosine]).tolist()

Schedules = namedtuple("Schedules", "lr wd momentum teacher_temp")  # per iteration; tau_t per epoch

def schedules(args, iters_per_epoch):
    """Sec. 3.1 and App. B, from the flags (named as official); B is the global batch."""
    E, n, B = args.epochs, iters_per_epoch, args.batch_size_per_gpu * world_size()
    # tau_t: the paper's rises linearly from 0.04 to 0.07 over 30 epochs (official: stays 0.04)
    tau = torch.linspace(args.warmup_teacher_temp, args.teacher_temp,
                         min(args.warmup_teacher_temp_epochs, E), dtype=torch.float64).tolist()
    return Schedules(
        # lr: a linear warmup from 0 to 0.0005 x B / 256 over 10 epochs, then a cosine to 1e-6
        lr=cosine_schedule(args.lr * B / 256, args.min_lr, E, n, args.warmup_epochs),
        # weight decay: a cosine from 0.04 up to 0.4
        wd=cosine_schedule(args.weight_decay, args.weight_decay_end, E, n),
        # l, the teacher's momentum: a cosine from 0.996 up to 1, where the teacher stops moving
        momentum=cosine_schedule(args.momentum_teacher, args.momentum_teacher_end, E, n),
        teacher_temp=tau + [args.teacher_temp] * (E - len(tau)))

@torch.no_grad()
def ema_update(teacher, student, momentum):
    """theta_t <- l theta_t + (1 - l) theta_s (Algorithm 1); as official, BatchNorm statistics
    (buffers) are not averaged: the teacher's come from its own forward passes."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)

# ----------------------------------------------------------------------------------------------
# 5. Multi-crop augmentation (Sec. 3.1, App. E)
# ----------------------------------------------------------------------------------------------
# Each image becomes 2 global views (224 px, 40-100% of its area) and L local views (96 px,
# 5-40%). The teacher sees the global views, the student all: matching a local view to a global
# one teaches "local-to-global" correspondence. Each crop is flipped, jittered, grayed, blurred,
# solarized with its view's probabilities. The global views follow BYOL (Grill et al. 2020): view
# 1 always blurred, view 2 blurred at 0.1 and solarized at 0.2, so the two differ beyond crops.
VIEWS = {  #     flip  jitter  gray  blur  solarize          (official DataAugmentationDINO)
    "global 1": (0.5, 0.8, 0.2, 1.0, 0.0),
    "global 2": (0.5, 0.8, 0.2, 0.1, 0.2),
    "local": (0.5, 0.8, 0.2, 0.5, 0.0),
}

@dataclass
class MultiCrop:
    """The V views of Eq. 3, each a draw of Algorithm 1's augment(x); official defaults."""
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple = (0.4, 1.0)
    local_scale: tuple = (0.05, 0.4)
    local_number: int = 8
    blur_sigma: tuple = (0.1, 2.0)

    def __call__(self, img, rng, photometric=True):
        """(3, H, W) uint8 -> [g1, g2, l1, ..., lL], each (3, h, w); photometric=False: the uint8
        crops only. The functions called are in Part II: Python finds a name when a call runs."""
        crops = [random_resized_crop(img, self.global_size, self.global_scale, rng) for _ in "12"]
        for _ in range(self.local_number):
            crops.append(random_resized_crop(img, self.local_size, self.local_scale, rng))
        if not photometric:
            return crops
        return [v[0] for v in finish_views([c[None] for c in crops], self.blur_sigma, rng)]

# ----------------------------------------------------------------------------------------------
# 6. One training step (Algorithm 1, in the official order)
# ----------------------------------------------------------------------------------------------
def clip_gradients(model, clip):
    """Per-parameter clipping, as official: each gradient alone is scaled to norm <= clip."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_((clip / (p.grad.norm() + 1e-6)).clamp(max=1.0))

@dataclass
class TrainState:
    """What one step reads and changes; Part II may wrap the networks (DDP, torch.compile)."""
    student: nn.Module  # g_s
    teacher: nn.Module  # g_t = make_teacher(g_s)
    dino_loss: DINOLoss  # holds the center C
    optimizer: torch.optim.Optimizer  # make_optimizer(g_s)
    schedules: Schedules  # schedules(args, ...)
    clip_grad: float = 3.0
    freeze_last_layer: int = 1  # epochs during which the prototypes stay fixed
    amp_dtype: torch.dtype = None  # bf16 or fp16 autocast of the forward passes, or fp32
    scaler: torch.amp.GradScaler = field(default_factory=partial(GradScaler, enabled=False))  # fp16
    it: int = 0  # the global iteration: the schedules' index

def train_step(state, views, epoch):
    """One iteration of Algorithm 1 on V views [(B, 3, h, w)], globals first; returns the loss,
    the teacher's probabilities and its features (for the collapse diagnostics)."""
    # this iteration's lr on every group, its weight decay on the decayed group (0) only
    for i, group in enumerate(state.optimizer.param_groups):
        group["lr"] = state.schedules.lr[state.it]
        if i == 0:
            group["weight_decay"] = state.schedules.wd[state.it]
    # t1, t2 = gt(x1), gt(x2) on the 2 global views; s = gs(x) on all V views
    dtype = state.amp_dtype
    with torch.autocast(views[0].device.type, dtype=dtype, enabled=dtype is not None):
        teacher_feats, teacher_out = state.teacher(views[:2])
        _, student_out = state.student(views)
    # Eq. 3, in fp32; Algorithm 1's line when V = 2: loss = H(t1, s2)/2 + H(t2, s1)/2
    tau_t = state.schedules.teacher_temp[epoch]
    loss, teacher_probs = state.dino_loss(student_out, teacher_out, tau_t)
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()}: try --precision fp32, a lower --lr "
                                 "or --teacher_temp")
    # C = m*C + (1-m)*cat([t1, t2]).mean(0): Algorithm 1's last line, here as official (same effect)
    state.dino_loss.update_center(teacher_out)
    # loss.backward(); update(gs): AdamW, each gradient clipped to norm <= clip_grad, and the
    # prototypes (last layer) left unchanged during the first epoch(s): stabler
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()  # loss.backward(), the loss scaled up if fp16
    state.scaler.unscale_(state.optimizer)  # fp16: the gradients scaled back down
    if state.clip_grad:
        clip_gradients(state.student, state.clip_grad)
    if epoch < state.freeze_last_layer:
        for name, p in state.student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    state.scaler.step(state.optimizer)  # optimizer.step(); skipped if fp16 overflowed
    state.scaler.update()  # fp16: the scale for the next step
    # gt.params = l*gt.params + (1-l)*gs.params, with l of this iteration
    ema_update(state.teacher, state.student, state.schedules.momentum[state.it])
    state.it += 1
    return loss.detach(), teacher_probs, teacher_feats

# ----------------------------------------------------------------------------------------------
# 7. Collapse diagnostics: the teacher's entropy and the KL (Sec. 5.3, Fig. 7), and this file's
#    batch-mean entropy, feature std, effective rank; the weighted k-NN (App. F.1)
# ----------------------------------------------------------------------------------------------
def entropy(p, dim=-1):
    """h(p) = -sum_k p_k log p_k, with 0 log 0 = 0."""
    return torch.special.entr(p).sum(dim)

def effective_rank(x):
    """exp(entropy of the normalized singular values): 1 for rank one, min(n, d) at most."""
    s = torch.linalg.svdvals(x.float())
    return entropy(s / s.sum()).exp().item()

@torch.no_grad()
def collapse_metrics(loss, teacher_probs, teacher_feats):
    """Uniform collapse: h_teacher = h_batch_mean = log K, kl = 0. One-dimension collapse:
    both entropies 0, kl = 0, feat_std = 0. Healthy: kl > 0, 0 < h_teacher < h_batch_mean."""
    h_t = entropy(teacher_probs).mean()  # mean per-sample teacher entropy h(P_t)
    feats = F.normalize(teacher_feats.float(), dim=-1)  # (2B, D)
    return {"h_teacher": h_t.item(),
            "h_batch_mean": entropy(teacher_probs.flatten(0, 1).mean(0)).item(),  # h(mean P_t)
            # H(P_t, P_s) = h(P_t) + KL(P_t || P_s) (Sec. 5.3), averaged over the same pairs
            "kl": (loss - h_t).item(),
            "feat_std": feats.std(0).mean().item(),  # healthy: about 1/sqrt(D)
            "eff_rank": effective_rank(feats)}

def eval_view(img, size):
    """The k-NN's input (App. F.1): resize the short side to size * 256/224 (bilinear here),
    centre crop to size, normalize. img (3, H, W) uint8 -> (3, size, size)."""
    _, H, W = img.shape
    s = round(size * 256 / 224) / min(H, W)
    hw = (max(size, round(H * s)), max(size, round(W * s)))
    img = F.interpolate(img[None], size=hw, mode="bilinear", antialias=True)[0]  # (3, h, w)
    top, left = (img.shape[1] - size) // 2, (img.shape[2] - size) // 2
    return normalize(img[None, :, top:top + size, left:left + size].float() / 255)[0]

def knn_classify(train_f, train_y, test_f, test_y, k=20, T=0.07, chunk=256):
    """Weighted k-NN top-1 in %: each class scores sum over the k nearest of exp(cos / T)."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    k, classes, correct = min(k, len(train_f)), int(train_y.max()) + 1, 0
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)  # (q, k) cosines
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / T).exp())  # (q, C)
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / len(test_f)

# ==============================================================================================
#                          PART II: RUNNING IT (all of DINO is above)
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# 8. Data: image folders (classes optional) checked before any work, keyed randomness, downloads
# ----------------------------------------------------------------------------------------------
class UsageError(Exception):
    """Bad input from the user: main() prints it as one line and exits with status 2."""
    status = 2

class Fault(UsageError):
    """A fault while training (a loader worker killed, a NaN loss, a failed write): status 1."""
    status = 1

def rank():
    return dist.get_rank() if dist.is_initialized() else 0

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1

def say(text):
    """Print on rank 0 only: W processes under torchrun print each line once."""
    if rank() == 0:
        print(text, flush=True)

def agree(*values):
    """Each value's maximum over all processes: they take the same decisions (stop, save)."""
    x = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        x = x.cuda() if dist.get_backend() == "nccl" else x
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.tolist()

def seed_for(*keys):
    """A 63-bit seed that is a pure function of its integer keys (int hashing is not salted)."""
    return hash(tuple(keys)) & 0x7FFF_FFFF_FFFF_FFFF

def load_rgb(path):
    """Decode an image file with PIL to a (3, H, W) uint8 tensor; any mode becomes RGB."""
    try:
        with Image.open(path) as im:
            if im.mode[0] in "IF":  # 16- or 32-bit integers, floats: their own range -> 0-255
                a = np.asarray(im, dtype=np.float64)
                a = 255 * (a - a.min()) / max(a.max() - a.min(), 1e-12)
                im = Image.fromarray(a.round().astype(np.uint8))
            return pil_to_tensor(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"cannot read {path} ({e}): delete or replace it, then rerun") from None

def list_images(folder, min_size=0, classes=None):
    """(path, label) of every image under folder, at any depth, and the class names: `classes` if
    given (val/ takes train's), else its folders if 2+ hold every image, else none (labels 0)."""
    items, skipped, small = [], 0, []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            with Image.open(path) as im:  # reads the header only
                small += [path] if min(im.size) < min_size else []
            items.append((path, path.relative_to(folder).parts[0]))  # its top folder, or name
        except Image.DecompressionBombError:  # refused here, not mid-run on every rerun
            raise UsageError(f"{path} is over PIL's pixel limit: shrink it") from None
        except PermissionError as e:  # perhaps an image: not a file to skip in silence
            raise UsageError(f"cannot read {path} ({e.strerror}): fix or remove it") from None
        except (OSError, ValueError, SyntaxError):
            skipped += 1
    folders, tops = sorted(d.name for d in folder.iterdir() if d.is_dir()), {t for _, t in items}
    missing = [name for name in folders if name not in tops]
    if missing or not items:
        raise UsageError(f"{folder.joinpath(*missing[:1])} holds no images: remove or fill it")
    if small:
        raise UsageError(f"{len(small)} images (e.g. {small[0]}) are smaller than the {min_size}"
                         "-px local crops: lower --global_crop_size and --local_crop_size")
    if skipped:
        say(f"skipped {skipped} files under {folder} that are not images")
    if classes is None:  # train/: labelled when 2 or more folders hold every image
        classes = folders if len(folders) >= 2 and tops <= set(folders) else []
    if classes and not tops <= set(classes):
        stray = folder / min(tops - set(classes))
        raise UsageError(f"{stray}: a k-NN query class that train/ does not have")
    index = {name: i for i, name in enumerate(classes)}  # one lookup per class, not per image
    return [(path, index.get(top, 0)) for path, top in items], classes

def load_splits(args):
    """DIR/train/**/* to learn from; DIR/val/<class>/* as k-NN queries if train/ has classes."""
    root = Path(args.data)
    if not (root / "train").is_dir():
        inner = next(root.glob("*/train"), None)  # a dataset's own folder inside --data
        fix = f"pass --data {inner.parent}" if inner else "put the images there, or add --download"
        raise UsageError(f"--data {root} holds no train/ folder: {fix}")
    train_items, classes = list_images(root / "train", args.local_crop_size)
    val, val_items = root / "val", []
    if classes and val.is_dir():
        val_items = list_images(val, classes=classes)[0]
    elif args.eval_every:  # DINO needs no labels; only its evaluation does
        why = f"no {val}" if classes else f"{root / 'train'} is not split into 2+ class folders"
        say(f"no k-NN: {why} (train/<class>/ and val/<class>/ turn it on); the collapse "
            "diagnostics tell whether it learns (README: Troubleshooting)")
    batch = args.batch_size_per_gpu * world_size()
    if len(train_items) < batch:
        raise UsageError(f"{len(train_items)} training images under {root} but a batch of "
                         f"{batch}: lower --batch_size_per_gpu")
    return train_items, val_items, classes

class MultiCropDataset(torch.utils.data.Dataset):
    """Items keyed (epoch, index), crops drawn from seed_for(seed, epoch, index): exact resume."""

    def __init__(self, items, multicrop, seed, photometric=True):
        self.items, self.multicrop, self.seed = items, multicrop, seed
        self.photometric = photometric

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        """Crops, label, and "" or the unreadable file that the next image replaces."""
        epoch, index, bad = *key, ""
        while True:  # a loop, not recursion: a long run of bad files must not hit a limit
            path, label = self.items[index]
            try:
                img = load_rgb(path)
                break
            except UsageError:
                bad, index = bad or str(path), (index + 1) % len(self.items)
        rng = torch.Generator().manual_seed(seed_for(self.seed, epoch, index))
        return self.multicrop(img, rng, self.photometric), label, bad

class EpochSampler(torch.utils.data.Sampler):
    """A shuffle per epoch; step s, process r of W: the r-th B of perm[s*B*W : (s+1)*B*W]."""

    def __init__(self, n, batch, rank=0, world=1, seed=0):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.steps = n // (batch * world)  # the incomplete last batch is dropped, as official
        self.epoch, self.start_step = 0, 0

    def __len__(self):
        return (self.steps - self.start_step) * self.batch

    def __iter__(self):
        rng = torch.Generator().manual_seed(seed_for(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=rng).tolist()
        for s in range(self.start_step, self.steps):
            first = (s * self.world + self.rank) * self.batch
            yield from ((self.epoch, i) for i in perm[first:first + self.batch])

def eval_batch(batch):
    """[(path, label, size)] -> (n, 3, size, size), labels (-1: unreadable, left out)."""
    views, labels = [], []
    for path, label, size in batch:
        try:
            views.append(eval_view(load_rgb(path), size))
        except UsageError:
            views.append(torch.zeros(3, size, size))
            label = -1
        labels.append(label)
    return torch.stack(views), torch.tensor(labels)

@torch.no_grad()
def extract_features(backbone, items, size, device, workers=0, run=None):
    """(n, D) fp32 backbone(eval_view(image)), (n,) labels of readable items; process r: r::W."""
    share = [(path, label, size) for path, label in items[rank()::world_size()]]
    share = share or [(items[0][0], -1, size)]  # fewer items than processes: gather cuts it off
    loader = torch.utils.data.DataLoader(share, batch_size=256, num_workers=workers,
                                         collate_fn=eval_batch, worker_init_fn=ignore_signals)
    feats, labels = [], []
    for x, y in loader:
        feats.append(backbone(x.to(device)).float())
        labels.append(y.to(device))
        if run and run.requested:  # the caller drops this pass
            break
    feats, labels = torch.cat(feats), torch.cat(labels)
    if dist.is_initialized():
        feats, labels = gather_shares(feats, len(items)), gather_shares(labels, len(items))
    if run and not run.requested:  # each file that cannot be read is named once per run
        for path in {str(p) for (p, _), y in zip(items, labels.tolist()) if y < 0} - run.skipped:
            say(f"{path}: cannot read it, left out of the k-NN")
            run.skipped.add(path)
    return feats[labels >= 0], labels[labels >= 0]

def gather_shares(x, n):
    """Every process's share items[r::W] of n items (padded with -1), back in item order."""
    x = torch.cat([x, x.new_full((math.ceil(n / world_size()) - len(x), *x.shape[1:]), -1)])
    shares = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(shares, x)  # no process waits on another's k-NN: all compute the same
    return torch.stack(shares, 1).flatten(0, 1)[:n]  # row j*W + r is item j*W + r

def knn_accuracy(backbone, train_items, val_items, args, device, run=None):
    """Weighted k-NN top-1 (App. F.1), training set as memory, val as queries; None: stopped."""
    memory, queries = (extract_features(backbone, x, args.global_crop_size, device,
                                        args.num_workers, run) for x in (train_items, val_items))
    if run and agree(run.requested)[0]:  # a stop in any process ends the evaluation
        return None
    return knn_classify(*memory, *queries)

def make_synthetic_images(root, classes=10, per_class=24, size=48, seed=0):
    """Toy classes: coloured gratings of their own orientation and frequency, under noise."""
    rng = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for c, i in product(range(classes), range(per_class)):
        angle, freq = math.pi * c / classes, 0.15 + 0.05 * (c % 3)
        phase = 2 * math.pi * torch.rand(1, generator=rng).item()
        wave = torch.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
        color = torch.tensor([c * 0.37 % 1, c * 0.61 % 1, c * 0.13 % 1]).view(3, 1, 1)
        img = 0.5 + 0.35 * wave * (2 * color - 1) + 0.12 * torch.randn(3, size, size, generator=rng)
        path = Path(root) / ("val" if i % 4 == 0 else "train") / f"class{c}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole, then renamed: the processes of a --smoke torchrun write side by side
        tmp = path.with_name(f".{os.getpid()}.{path.name}")  # ends in .png: saved as a PNG
        Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).save(tmp)
        os.replace(tmp, path)
    return str(root)

def download(name, root):
    """root/{train,val}/<class>/ from torchvision: Imagenette (320 px), cifar10, fashion_mnist."""
    tvd, root = torchvision.datasets, Path(root)
    try:
        release = root / "imagenette2-320"  # where the archive unpacks: moved up into root
        if name == "imagenette" and not (root / "train").is_dir() and not release.is_dir():
            tvd.Imagenette(root, size="320px", download=True)
        for split, per_class in (("val", 200), ("train", 1000)):  # train last: done
            if name == "imagenette" and not (root / split).is_dir():
                os.replace(release / split, root / split)
            if (root / split).is_dir():  # moved up, or written before
                continue
            dataset = {"cifar10": tvd.CIFAR10, "fashion_mnist": tvd.FashionMNIST}[name]
            images, count = dataset(root / "raw", train=split == "train", download=True), Counter()
            for img, label in images:  # PIL images; PNG keeps the originals, lossless
                folder = root / f"{split}.tmp" / images.classes[label].split("/")[0]
                if count[folder] < per_class:
                    folder.mkdir(parents=True, exist_ok=True)
                    img.save(folder / f"{count[folder]:04d}.png")
                    count[folder] += 1
            os.replace(root / f"{split}.tmp", root / split)  # whole, or not at all
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UsageError(f"could not download {name} into {root} ({type(e).__name__}): are "
                         "you online?") from None
    return str(root)

# ----------------------------------------------------------------------------------------------
# 9. Speed: Part I's augmentation as batched tensor ops on uint8 crops (3x PIL per worker; a
#    batch on the GPU), device, precision (RESULTS.md, Performance); 2 departures, at their lines.
# ----------------------------------------------------------------------------------------------
def random_resized_crop(img, size, scale, rng, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop: a box of random area (scale) and w / h (ratio), 10 tries."""
    _, H, W = img.shape
    for _ in range(10):
        u = torch.rand(4, generator=rng).tolist()
        area = H * W * (scale[0] + (scale[1] - scale[0]) * u[0])
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
        w, h = round(math.sqrt(area * r)), round(math.sqrt(area / r))
        if 0 < w <= W and 0 < h <= H:
            i, j = int(u[2] * (H - h + 1)), int(u[3] * (W - w + 1))
            break
    else:  # no box fitted: the largest centred box with w / h in [3/4, 4/3], often the image
        w, h = min(W, round(H * ratio[1])), min(H, round(W / ratio[0]))
        i, j = (H - h) // 2, (W - w) // 2
    crop = img[None, :, i:i + h, j:j + w]  # (1, 3, h, w) uint8
    # a departure: bilinear resize (antialiased); the official RandomResizedCrop is bicubic
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]

def finish_views(views, blur_sigma, rng):
    """The photometric half and normalization of V views (n, 3, h, w) uint8, batched by size."""
    n, out, names = views[0].shape[0], [], ["global 1", "global 2"] + ["local"] * (len(views) - 2)
    for first, last in ((0, 2), (2, len(views))):  # the global views, then the local ones
        if last > first:
            p = torch.tensor([VIEWS[name] for name in names[first:last]]).repeat_interleave(n, 0)
            x = photometric(torch.cat(views[first:last]), p, blur_sigma, rng)  # (m*n, 3, h, w)
            out += normalize(x).split(n)
    return out  # V tensors (n, 3, h, w), float, normalized

def photometric(x, p, blur_sigma, rng):
    """Flip, jitter, gray, blur, solarize x (n, 3, h, w) uint8 -> [0, 1]; p (n, 5): its view's."""
    coin = torch.rand(p.shape, generator=rng) < p  # (n, 5) which crop gets what
    x = where(coin[:, 0], x.float() / 255, lambda c: c.flip(-1))
    x = color_jitter(x, coin[:, 1], rng)
    x = where(coin[:, 2], x, lambda c: to_gray(c).expand_as(c))
    x = gaussian_blur(x, coin[:, 3], blur_sigma, rng)
    # solarize as PIL: invert the pixels at or above the threshold 128
    return where(coin[:, 4], x, lambda c: torch.where(c >= 128 / 255, 1 - c, c))

def where(on, x, fn):
    """fn applied to the crops where `on` (n,) only; most augmentations touch a few crops."""
    idx = on.nonzero().squeeze(1).to(x.device)
    return x.index_copy(0, idx, fn(x[idx])) if len(idx) else x

def to_gray(x):
    """ITU-R 601 luma, as PIL: (n, 3, h, w) -> (n, 1, h, w)."""
    return (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

def color_jitter(x, on, rng):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) where on: b, c ~ U(0.6, 1.4), s ~ U(0.8, 1.2), hue +-0.1."""
    draws = [centre + spread * (2 * torch.rand(len(x), generator=rng) - 1)
             for centre, spread in ((1, 0.4), (1, 0.4), (1, 0.2), (0, 0.1))]
    b, c, s = (d[on].view(-1, 1, 1, 1).to(x.device) for d in draws[:3])  # (m, 1, 1, 1)
    theta = 2 * math.pi * draws[3][on]  # (m,)

    def jitter(x):  # (m, 3, h, w): the crops where on
        # a departure: this fixed order; torchvision's ColorJitter draws a random one per call
        x = (b * x).clamp(0, 1)  # brightness: a blend with black
        x = (c * x + (1 - c) * to_gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)  # contrast
        x = (s * x + (1 - s) * to_gray(x)).clamp(0, 1)  # saturation: a blend with the gray image
        # hue: x <- T^-1 R(theta) T x, a rotation of the chroma plane (I, Q) of YIQ
        R = torch.zeros(len(theta), 3, 3)
        R[:, 0, 0], R[:, 1, 1], R[:, 2, 2] = 1, theta.cos(), theta.cos()
        R[:, 1, 2], R[:, 2, 1] = -theta.sin(), theta.sin()
        M = torch.linalg.inv(RGB_TO_YIQ) @ R @ RGB_TO_YIQ  # (m, 3, 3)
        return torch.einsum("nij,njhw->nihw", M.to(x.device), x).clamp(0, 1)
    return where(on, x, jitter)

def gaussian_blur(x, on, sigma_range, rng):
    """Separable Gaussian blur, sigma ~ U(sigma_range) per crop, of the crops where `on`."""
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(x.shape[0], generator=rng)
    r = min(math.ceil(3 * hi), x.shape[-2] - 1, x.shape[-1] - 1)  # 3 x the largest sigma
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    # k(t) = exp(-t^2 / (2 sigma^2)) / sum, one kernel per blurred crop and channel
    k = torch.exp(-t**2 / (2 * sigma[on, None] ** 2))  # (m, 2r+1)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0).to(x.device)  # (3m, 2r+1)

    def blur(c):  # (m, 3, h, w) -> the same, blurred along rows, then columns
        m, _, h, w = c.shape
        y = F.pad(c.reshape(1, 3 * m, h, w), (r, r, 0, 0), mode="reflect")
        y = F.conv2d(y, k.view(3 * m, 1, 1, -1), groups=3 * m)
        y = F.pad(y, (0, 0, r, r), mode="reflect")
        return F.conv2d(y, k.view(3 * m, 1, -1, 1), groups=3 * m).view(m, 3, h, w)
    return where(on, x, blur)

def normalize(x):
    """ImageNet mean and std per channel, as the official ToTensor + Normalize."""
    mean, std = x.new_tensor(IMAGENET_MEAN), x.new_tensor(IMAGENET_STD)
    return (x - mean.view(-1, 3, 1, 1)) / std.view(-1, 3, 1, 1)

def setup_device(name):
    """auto: cuda, mps, else the CPU. Under torchrun one process per GPU (gloo on CPUs)."""
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not found.get(name, True):
        raise UsageError(f"--device {name}, but torch finds no such device: pass auto or cpu")
    auto = name == "auto"  # the first of cuda, mps, cpu that torch finds
    name = next(d for d in ("cuda", "mps", "cpu") if found.get(d, True)) if auto else name
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if name == "cuda" else "gloo")
    if auto and name == "cpu" and torch.version.cuda:
        say(f"note: no usable GPU, so the CPU (this torch is a CUDA {torch.version.cuda} build: "
            "it needs an NVIDIA driver >= 580 and a GPU of compute capability >= 7.5)")
    if name == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)

def resolve_precision(precision, device, convnet=False):
    """auto: bf16 where native, fp16 with a GradScaler on older GPUs, else fp32 (no emulation)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        precision = "bf16" if major >= 8 else "fp16"
        why = f"compute capability {major}.{minor}: bf16 units from 8.0 on"
    elif device.type != "cpu":
        precision, why = "fp32", f"autocast is not tried on {device.type}"
    elif convnet:
        precision, why = "fp32", "a convnet: bf16 convolutions fail on 1 x 1 inputs on a CPU"
    else:
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        native = " avx512_bf16" in flags or " amx_bf16" in flags
        precision, why = ("bf16", "bf16 units") if native else ("fp32", "no bf16 units")
    say(f"--precision auto: {precision} ({why})")
    return precision

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

class FusedAttention(Attention):
    """The same attention in one kernel (no (N, N) matrix); not in CPU bf16: 3-6x slower there."""

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

def build(args, device, iters_per_epoch):
    """Student, teacher, loss, optimizer and schedules, in the precision and speed chosen."""
    args.precision = resolve_precision(args.precision, device, args.arch in RESNETS)
    # the backbone first: the seed's order
    backbone = ResNet(args.arch) if args.arch in RESNETS else build_vit(args, args.drop_path_rate)
    head = DINOHead(backbone.embed_dim, args.out_dim, args.head_hidden_dim, args.bottleneck_dim,
                    args.norm_last_layer, args.use_bn_in_head)
    student = MultiCropNet(backbone, head).to(device)
    for m in student.modules():  # same weights and names, another kernel
        if type(m) is Attention and not (device.type == "cpu" and args.precision == "bf16"):
            m.__class__ = FusedAttention
    if dist.is_initialized() and device.type == "cuda":  # a BatchNorm head over all GPUs
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    teacher = make_teacher(student)
    # fused AdamW: one pass over the weights, 4x faster than the foreach version on a CPU
    opt = make_optimizer(student, args.optimizer, fused=device.type in ("cuda", "cpu"))
    dino_loss = DINOLoss(args.out_dim, args.student_temp, args.center_momentum).to(device)
    scaler = GradScaler(device.type, enabled=args.precision == "fp16")
    state = TrainState(student, teacher, dino_loss, opt, schedules(args, iters_per_epoch),
                       args.clip_grad, args.freeze_last_layer, AMP_DTYPES[args.precision], scaler)
    if dist.is_initialized():
        state.student = nn.parallel.DistributedDataParallel(student)
    if args.compile:  # faster on a GPU after minutes of compiling; no faster on a CPU
        state.student, state.teacher = torch.compile(state.student), torch.compile(teacher)
    return state

def build_vit(args, drop_path_rate=0.0):
    dim, depth, heads = ARCHS[args.arch]
    return VisionTransformer(args.global_crop_size, args.patch_size, args.embed_dim or dim,
                             args.depth or depth, args.num_heads or heads, drop_path_rate)

def bare(model):
    """The module inside the DistributedDataParallel and torch.compile wrappers, if any."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)

# ----------------------------------------------------------------------------------------------
# 10. The loop: checkpoints (durable, exact resume), stopping, faults, logging, evaluation
# ----------------------------------------------------------------------------------------------
RESUME_FLAGS = ("arch", "optimizer", "patch_size", "embed_dim", "depth", "num_heads", "out_dim",
                "head_hidden_dim", "bottleneck_dim", "norm_last_layer", "use_bn_in_head",
                "global_crop_size", "data")  # the model's (weights' shapes and use), the data
STATES = ("student", "teacher", "optimizer", "scaler", "dino_loss")  # each saved as its state_dict

def save_checkpoint(state, args, path):
    """A temporary file flushed to the disk, then renamed: path is always one whole checkpoint."""
    ckpt = {name: bare(getattr(state, name)).state_dict() for name in STATES}
    ckpt |= {"it": state.it, "world_size": world_size(), "args": vars(args)}
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a full disk, a failing device: no temporary file is left behind
        tmp.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: the rename itself reaches the disk too
        folder = os.open(path.parent, os.O_DIRECTORY)
        os.fsync(folder)
        os.close(folder)

def resume(state, args, path):
    """Continue from path if it exists; refuse a damaged one, another model, data, global batch."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}
        damaged = path.exists() and not {*STATES, "it", "args"} <= ckpt.keys()
    except Exception:  # cut short, empty, not a checkpoint
        damaged = True
    if damaged:
        raise UsageError(f"{path} is damaged or incomplete: move it away to start again")
    it = ckpt.get("it", -1)
    if agree(it, -it) != [it, -it]:  # the max and the min over the processes differ
        raise UsageError(f"the processes found different checkpoints: --output_dir "
                         f"{args.output_dir} must be a folder that every node sees")
    if not ckpt:
        return
    theirs = {"optimizer": "adamw", **ckpt["args"]}  # adamw: saved before --optimizer existed
    # epoch and schedules count iterations: other data or another global batch shift them
    diff = [f"--{k} {theirs.get(k)}" for k in RESUME_FLAGS if theirs.get(k) != getattr(args, k)]
    processes = ckpt.get("world_size", 1)
    saved, batch = theirs["batch_size_per_gpu"] * processes, args.batch_size_per_gpu * world_size()
    if saved != batch:
        diff.append(f"a global batch of {saved} ({processes} processes), this run has {batch}")
    if diff:
        raise UsageError(f"{path} was trained with {' and '.join(diff)}: pass the same, or "
                         "another --output_dir")
    for name in STATES:
        if ckpt[name]:  # the scaler's is empty unless fp16: another --precision is fine
            bare(getattr(state, name)).load_state_dict(ckpt[name])
    state.it = ckpt["it"]
    say(f"resumed from {path} at iteration {state.it}")

def load_backbone(path, *backbones):
    """teacher_backbone.pth, a checkpoint.pth's teacher or the released weights into backbones."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("module.").removeprefix("backbone."): v
                 for k, v in state.get("teacher", state).items() if "head." not in k}
    except Exception as e:  # no such file, not a torch file, not a state dict
        raise UsageError(f"cannot load {path} ({type(e).__name__}): pass a backbone file") from None
    ours = backbones[0].state_dict()
    for key in [*ours, *state]:  # the model's keys in order, then the file's others
        a, b = (tuple(d[key].shape) if key in d else "missing" for d in (state, ours))
        if a != b:
            raise UsageError(f"{path} does not fit this model: {key} is {a} there, {b} here")
    for backbone in backbones:
        backbone.load_state_dict(state)

def log(out, record, shown=None):
    """Rank 0: record as a JSON line of out/log.jsonl with its time; print it (or `shown`)."""
    if rank() != 0:
        return
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 2)}) + "\n")
    shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in (shown or record).items()}
    print("  ".join(f"{k} {v}" for k, v in shown.items() if k != "type"), flush=True)

def ignore_signals(_worker_id):
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which saves, then ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

def to_device(views, args, device, it):
    """To the device; --augment_on_device: the photometric half there, keyed (seed, it, rank)."""
    views = [v.to(device, non_blocking=True) for v in views]
    if not args.augment_on_device:
        return views
    rng = torch.Generator().manual_seed(seed_for(args.seed, it, rank()))
    return finish_views(views, args.blur_sigma, rng)

class Run:
    """The loop's data, output and stops: inside `with run:` Ctrl-C or SIGTERM asks for a stop (the
    step in flight finishes, the run saves and ends); a second Ctrl-C interrupts at once."""

    def __init__(self, args, device):
        self.args, self.device, self.out = args, device, Path(args.output_dir)
        self.ckpt = self.out / "checkpoint.pth"  # the one checkpoint, rewritten in place
        self.data = load_splits(args)  # training items, k-NN query items, class names
        self.sampler = EpochSampler(len(self.data[0]), args.batch_size_per_gpu, rank(),
                                    world_size(), args.seed)
        dataset = MultiCropDataset(self.data[0], multicrop_of(args), args.seed,
                                   not args.augment_on_device)
        self.loader = torch.utils.data.DataLoader(
            dataset, args.batch_size_per_gpu, sampler=self.sampler, num_workers=args.num_workers,
            pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
            worker_init_fn=ignore_signals)
        self.saved_it, self.saved_at = None, time.time()  # checkpoint.pth's iteration, and when
        self.skipped, self.requested = set(), False  # unreadable files named; a stop asked for

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():  # give the caller its handlers back
            signal.signal(sig, handler)
        if getattr(self.loader, "_iterator", None) is not None:  # the workers ignore SIGTERM:
            self.loader._iterator._shutdown_workers()  # end them through their queues

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def save(self, state):
        if rank() == 0:
            save_checkpoint(state, self.args, self.ckpt)
        if dist.is_initialized():  # the others learn of the save once it is on the disk
            dist.barrier()
        self.saved_it, self.saved_at = state.it, time.time()

def train(args):
    device = setup_device(args.device)
    run = Run(args, device)
    args.data = str(Path(args.data).resolve())  # as the checkpoint records it: found from anywhere
    torch.manual_seed(args.seed)  # the initial weights
    state = build(args, device, run.sampler.steps)
    resume(state, args, run.ckpt)
    if state.it:  # the checkpoint resumed from, and its age
        run.saved_it, run.saved_at = state.it, run.ckpt.stat().st_mtime
    elif args.init_weights:  # a new run: both backbones start from the file, the heads fresh
        load_backbone(args.init_weights, bare(state.student).backbone, bare(state.teacher).backbone)
    say(f"{len(run.data[0])} training / {len(run.data[1])} k-NN query images, {len(run.data[2])} "
        f"classes; views 2 x {args.global_crop_size} px + {args.local_crops_number} x "
        f"{args.local_crop_size} px; {run.sampler.steps} iterations per epoch on {world_size()} "
        f"x {device} in {args.precision}")
    if device.type == "cpu" and not (args.preset or args.smoke):
        say("note: without --preset the defaults are the paper's recipe for 16 GPUs, days on a "
            "CPU; --preset laptop trains a small ViT on 32-px images in about 30 minutes")
    with run:
        try:
            return train_epochs(state, run)
        except Exception as e:  # every fault takes this path (a killed worker raises any kind)
            raise fault(e, state, run) from None

def fault(e, state, run):
    """A fault while training, as one line: what happened, and what the checkpoint holds."""
    what = ": ".join([type(e).__name__, *str(e).strip().splitlines()[-1:]])
    kept, then = "nothing saved yet", "the same command starts again"
    if run.saved_it is not None:
        age = (time.time() - run.saved_at) / 60
        kept = f"{run.ckpt} holds iteration {run.saved_it}, saved {age:.0f} min ago"
        then = "the same command resumes from it"
    if "DataLoader worker" in what or isinstance(e, (ConnectionError, EOFError)):  # worker killed
        what, then = f"a loader worker died ({what})", f"{then}; if it recurs, lower --num_workers"
    if "shared memory" in what:  # the loader workers' batches overflowed /dev/shm
        then = "rerun with --num_workers 0, or with more /dev/shm (docker run --shm-size=8g)"
    return Fault(f"{what} (iteration {state.it}); {kept}: {then}")

def train_epochs(state, run):
    """Epochs from where the checkpoint left off; returns the exit status (130: stopped)."""
    args, epoch = run.args, state.it // run.sampler.steps
    finished = state.it > 0 or not args.eval_every or evaluate(state, run, 0)  # k-NN of random init
    while finished and epoch < args.epochs:
        finished = train_one_epoch(state, run, epoch)
        run.save(state)
        epoch += 1
        if finished and args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs):
            finished = evaluate(state, run, epoch)
    if not finished:
        held = "saved" if run.saved_it == state.it else "nothing saved in"
        say(f"stopped at iteration {state.it}: {held} {run.ckpt}; the same command resumes")
        return 130
    if rank() == 0:
        torch.save(bare(state.teacher).backbone.state_dict(), run.out / "teacher_backbone.pth")
    say(f"done: teacher backbone in {run.out / 'teacher_backbone.pth'}")
    return 0

def train_one_epoch(state, run, epoch):
    """Returns False when a stop was requested (the step in flight is finished first)."""
    args, sampler, t0 = run.args, run.sampler, time.perf_counter()
    sampler.epoch, sampler.start_step = epoch, state.it - epoch * sampler.steps
    for steps, (views, _, bad) in enumerate(run.loader, 1):
        for path in set(bad) - run.skipped - {""}:  # named once, replaced by another image
            log(run.out, {"type": "skipped", "it": state.it, "file": path},
                {"skipped": f"{path}: cannot read it, replaced by another image"})
            run.skipped.add(path)
        views = to_device(views, args, run.device, state.it)
        torch.manual_seed(seed_for(args.seed, state.it))  # drop-path: a function of the step
        stats = train_step(state, views, epoch)  # the loss, the teacher's probabilities, features
        if state.it % args.log_every == 0 or state.it == (epoch + 1) * sampler.steps:
            log_step(state, run, epoch, *stats, seconds_per_step=(time.perf_counter() - t0) / steps)
        due = 0 < args.save_every_minutes < (time.time() - run.saved_at) / 60
        stop, due = agree(run.requested, due)  # every process decides the same
        if stop:
            return False
        if due:
            run.save(state)
    return True

def log_step(state, run, epoch, loss, teacher_probs, teacher_feats, seconds_per_step):
    """Loss, collapse diagnostics, schedules; shown with the epoch as e/E and the time left."""
    s, it, B = state.schedules, state.it - 1, run.args.batch_size_per_gpu * world_size()
    steps_left = run.args.epochs * run.sampler.steps - state.it
    record = {"type": "step", "epoch": epoch, "it": state.it, "loss": loss.item(),
              **collapse_metrics(loss, teacher_probs, teacher_feats),
              "lr": s.lr[it], "wd": s.wd[it], "momentum": s.momentum[it],
              "teacher_temp": s.teacher_temp[epoch], "img_per_s": B / seconds_per_step}
    log(run.out, record, {**record, "epoch": f"{epoch + 1}/{run.args.epochs}",
                          "left": f"{steps_left * seconds_per_step / 60:.1f} min"})

def evaluate(state, run, epoch):
    """k-NN of the teacher, and of the student beside it (Fig. 6); False if a stop cut it."""
    if not run.data[1]:
        return True
    record = {"type": "knn", "epoch": epoch, "it": state.it}
    for net, key in ((state.teacher, "knn_top1"), (state.student, "knn_top1_student")):
        backbone = copy.deepcopy(bare(net).backbone).eval()  # eval(): no drop-path
        record[key] = knn_accuracy(backbone, *run.data[:2], run.args, run.device, run)
        if record[key] is None:
            return False
    log(run.out, record)
    return True

def benchmark(args):
    """One JSON line: the step's images/s (the loader left out), seconds and peak memory."""
    device, B, rng = setup_device(args.device), args.batch_size_per_gpu, torch.Generator()
    img = torch.randint(0, 256, (3, 320, 426), dtype=torch.uint8)  # Imagenette's image size
    crops = [multicrop_of(args)(img, rng, not args.augment_on_device) for _ in range(B)]
    cuda, views = device.type == "cuda", [torch.stack(v) for v in zip(*crops)]  # (B, 3, h, w)
    views = [v.pin_memory() for v in views] if cuda else views  # as the loader hands them over
    state = build(args, device, iters_per_epoch=100)  # schedules long enough for the timed steps
    for i in range(6):
        if i == 1:  # after one warm-up step, 5 timed ones
            t0 = time.perf_counter()
        train_step(state, to_device(views, args, device, state.it), 1)  # loss.item() syncs
    step_s = (time.perf_counter() - t0) / 5
    if cuda:
        name, peak = torch.cuda.get_device_name(), torch.cuda.max_memory_allocated(device)
    else:  # the process's peak resident memory (Unix: in KiB)
        import resource
        name = f"cpu x {torch.get_num_threads()}"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"device": name, "precision": args.precision, "train_img_per_s": B / step_s,
              "step_s": step_s, "peak_mem_mb": peak / 2**20}
    print(json.dumps(result))
    return result

# ----------------------------------------------------------------------------------------------
# 11. Presets and the command line
# ----------------------------------------------------------------------------------------------
PRESETS = {
    # The whole loop in seconds on a CPU: a 2-block ViT on 32-px crops of generated images.
    "smoke": dict(arch="vit_tiny", patch_size=8, embed_dim=64, depth=2, num_heads=2, out_dim=256,
                  head_hidden_dim=256, bottleneck_dim=64, global_crop_size=32, local_crop_size=16,
                  local_crops_number=2, blur_sigma=(0.1, 0.5), batch_size_per_gpu=16, epochs=3,
                  warmup_epochs=1, lr=0.002, num_workers=0, eval_every=1, log_every=2,
                  drop_path_rate=0.0),
    # 32-px photos on a 2-core CPU in 30 minutes. Each departure from the paper was measured
    # on CIFAR-10 or Fashion-MNIST: notebooks/RESULTS.md, "Why each preset value".
    "laptop": dict(
        arch="vit_tiny", embed_dim=128, depth=4, num_heads=4,  # 0.8M parameters
        patch_size=8,  # a 4 x 4 grid on 32 px: 3x the images/s of patch 4
        out_dim=1024,  # small data converges faster with a smaller K (App. C)
        head_hidden_dim=1024,  # 2048 makes the head 6x the ViT: 16% slower, no better
        use_bn_in_head=True,  # the official option: 42.2% k-NN against 37.15% without
        global_crop_size=32, local_crop_size=16,  # the images' own size
        global_crops_scale=(0.25, 1.0), local_crops_scale=(0.2, 0.5),  # 5% of 32 px is a blob
        local_crops_number=2,  # 16-px views hold 2 x 2 patches: 2 of them and more epochs win
        blur_sigma=(0.1, 0.5),  # the paper's 0.1-2 px wipes out a 32-px crop
        batch_size_per_gpu=64, lr=0.002,  # 156 steps per epoch
        momentum_teacher=0.99,  # the teacher averages ~100 steps of 9,360, not ~250
        momentum_teacher_end=0.995,  # level with the official 1 at 60 epochs
        epochs=60,  # what 30 minutes on 2 cores hold; passes the raw pixels on both sets
        warmup_epochs=5,  # the paper's 10% of the epochs
        drop_path_rate=0.0,  # 0.1 costs 2 points at this size
        num_workers=1, augment_on_device=True, eval_every=4),
}

def default_workers():
    """The node's cores shared among its processes (torchrun's LOCAL_WORLD_SIZE), 10 at most."""
    return max(1, min(10, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

# Every flag: (name, type, default, why it is that value); names as in the official main_dino.py.
SWITCHES = ("smoke", "benchmark", "compile")
FLAGS = [
    ("data", str, None, "DIR/train/ (any depth) to learn from; DIR/val/<class>/* as k-NN queries"),
    ("download", str, None, "first fetch imagenette (the default), cifar10 or fashion_mnist"),
    ("output_dir", str, "./dino_output", "checkpoint.pth, log.jsonl; the same command resumes"),
    ("init_weights", str, None, "backbone weights to start from, heads new; a resume ignores them"),
    ("preset", str, None, "a set of defaults (smoke, laptop); explicit flags still win"),
    ("smoke", bool, False, "= --preset smoke on generated images: the loop in seconds on a CPU"),
    ("benchmark", bool, False, "print one JSON line: the step's images/s, seconds, memory"),
    ("device", str, "auto", "auto picks cuda, then mps, then cpu"),
    ("arch", str, "vit_small", "the paper's main model; vit_tiny, vit_base, resnet18, resnet50"),
    ("optimizer", str, "adamw", "adamw (official for ViTs) or sgd (momentum 0.9: convnets)"),
    ("patch_size", int, 16, "8 is better (Table 2: 78.3 against 74.5 k-NN), 4x the tokens"),
    ("embed_dim", int, None, "override the width D of --arch (small CPU runs)"),
    ("depth", int, None, "override the number of blocks of --arch"),
    ("num_heads", int, None, "override the number of heads of --arch"),
    ("out_dim", int, 65536, "K: 65536 is best on ImageNet (App. C); smaller for small data"),
    ("head_hidden_dim", int, 2048, "width of the head's 3-layer MLP"),
    ("bottleneck_dim", int, 256, "the L2-normalized bottleneck before the prototypes"),
    ("norm_last_layer", bool, True, "prototypes' gain fixed to 1: stabler; no trains better"),
    ("use_bn_in_head", bool, False, "BatchNorm in the head's MLP (official option)"),
    ("drop_path_rate", float, 0.1, "stochastic depth of the student, growing with depth"),
    ("momentum_teacher", float, 0.996, "lambda at start; 0.9995 (batch 256) for small batches"),
    ("momentum_teacher_end", float, 1.0, "lambda at the end of its cosine (official: 1)"),
    ("warmup_teacher_temp", float, 0.04, "tau_t at start; lower sharpens more"),
    ("teacher_temp", float, 0.04, "tau_t after warmup; > 0.07 unstable, 0.08 unwarmed collapses"),
    ("warmup_teacher_temp_epochs", int, 0, "epochs of linear tau_t warmup (paper: 30)"),
    ("student_temp", float, 0.1, "tau_s, fixed in the paper"),
    ("center_momentum", float, 0.9, "m of Eq. 4: 0.999 collapses; 1 means no centering"),
    ("batch_size_per_gpu", int, 64, "official 64 x 16 GPUs = 1024 images per step"),
    ("epochs", int, 100, "official 100 (69.3 k-NN on ImageNet); the paper's best run 800"),
    ("lr", float, 0.0005, "peak lr at a total batch of 256, scaled linearly with the batch"),
    ("min_lr", float, 1e-6, "end of the cosine lr schedule"),
    ("warmup_epochs", int, 10, "linear lr warmup from 0"),
    ("weight_decay", float, 0.04, "start of the cosine weight-decay schedule"),
    ("weight_decay_end", float, 0.4, "its end: a larger decay late in training helps ViTs"),
    ("clip_grad", float, 3.0, "per-parameter gradient norm clip; 0 disables"),
    ("freeze_last_layer", int, 1, "epochs the prototypes stay fixed: stabler"),
    ("global_crop_size", int, 224, "global views; also the k-NN image size"),
    ("local_crop_size", int, 96, "local views"),
    ("global_crops_scale", tuple, (0.4, 1.0), "area fraction of the global views (App. E)"),
    ("local_crops_scale", tuple, (0.05, 0.4), "area fraction of the local views"),
    ("local_crops_number", int, 8, "L local views; 0 disables multi-crop (Table 8)"),
    ("blur_sigma", tuple, (0.1, 2.0), "Gaussian blur sigma range in pixels, as official"),
    ("precision", str, "auto", "auto: bf16 where native, fp16 on older GPUs, else fp32"),
    ("augment_on_device", bool, False, "workers decode and crop; the rest runs on the device"),
    ("compile", bool, False, "torch.compile the networks (a GPU, after minutes of compiling)"),
    ("seed", int, 0, "same seed, same flags: bitwise-equal weights on the CPU"),
    ("num_workers", int, default_workers(), "loader processes per process (and for the k-NN)"),
    ("eval_every", int, 10, "epochs between weighted k-NN evaluations (and one at start); 0: none"),
    ("log_every", int, 10, "iterations between log lines"),
    ("save_every_minutes", float, 10.0, "also save a checkpoint this often; 0: once per epoch"),
]
CHOICES = {"arch": [*ARCHS, *RESNETS], "preset": list(PRESETS), "precision": [*AMP_DTYPES, "auto"],
           "optimizer": ["adamw", "sgd"], "download": ["imagenette", "cifar10", "fashion_mnist"]}
POSITIVE = ("patch_size", "out_dim", "batch_size_per_gpu", "epochs", "global_crop_size",
            "local_crop_size", "teacher_temp", "warmup_teacher_temp", "student_temp", "log_every",
            "head_hidden_dim", "bottleneck_dim", "embed_dim", "depth", "num_heads")

def parse_args(argv=None):
    parser = argparse.ArgumentParser("dino_minimal", description=__doc__.split("\n\n")[0],
                                     usage="python dino_minimal.py --data DIR [--flag value ...]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, kind, default, why in FLAGS:
        opts = {"type": kind, "choices": CHOICES.get(name)}
        if kind is bool:  # yes or no; the switches take nothing
            opts = ({"action": "store_true"} if name in SWITCHES else
                    {"type": lambda text: text.lower() in ("1", "true", "yes")})
        if kind is tuple:  # two numbers
            opts = {"type": float, "nargs": 2}
        if name == "download":  # --download alone means Imagenette
            opts |= {"nargs": "?", "const": "imagenette"}
        parser.add_argument(f"--{name}", default=default, help=why, **opts)
    first, _ = parser.parse_known_args(argv)
    if first.smoke or first.preset:
        parser.set_defaults(**PRESETS["smoke" if first.smoke else first.preset])
    args = parser.parse_args(argv)
    for name in ("global_crops_scale", "local_crops_scale", "blur_sigma"):
        setattr(args, name, tuple(getattr(args, name)))
    check_args(args)
    return args

def check_args(args):
    """Refuse impossible flags before any work is done, in one line."""
    for name, value in vars(args).items():
        if type(value) in (int, float) and (value < 0 or value == 0 and name in POSITIVE):
            raise UsageError(f"--{name} must be {'>' if name in POSITIVE else '>='} 0, got {value}")
    for name in ("global_crops_scale", "local_crops_scale"):
        if not 0 < getattr(args, name)[0] <= getattr(args, name)[1] <= 1:
            raise UsageError(f"--{name} must be two numbers with 0 < min <= max <= 1")
    if args.arch in ARCHS:  # a ViT: its patches tile the crops, its heads divide the width
        for name in ("global_crop_size", "local_crop_size"):
            if getattr(args, name) % args.patch_size:
                raise UsageError(f"--{name} must be a multiple of --patch_size {args.patch_size}")
        dim, _, heads = ARCHS[args.arch]
        if (args.embed_dim or dim) % (args.num_heads or heads):
            raise UsageError("--embed_dim must be a multiple of --num_heads")
    if max(args.momentum_teacher, args.momentum_teacher_end, args.center_momentum) > 1:
        raise UsageError("--momentum_teacher(_end) and --center_momentum must lie in [0, 1]")
    if args.drop_path_rate >= 1 or args.warmup_epochs > args.epochs:
        raise UsageError("--drop_path_rate must be < 1 and --warmup_epochs at most --epochs")

def multicrop_of(args):
    return MultiCrop(args.global_crop_size, args.local_crop_size, args.global_crops_scale,
                     args.local_crops_scale, args.local_crops_number, args.blur_sigma)

def claim(folder):
    """Make --output_dir and lock it for this run (rank 0): a second run there is refused."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        lock = os.fdopen(os.open(Path(folder) / "lock", os.O_CREAT | os.O_WRONLY), "w")
    except OSError as e:
        raise UsageError(f"cannot write to --output_dir {folder} ({e.strerror}): pick another "
                         "folder") from None
    if os.environ.get("RANK", "0") == "0" and os.name == "posix":
        import fcntl
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:
            raise UsageError(f"another run is using --output_dir {folder}: wait for it to end, "
                             "or pass another folder") from None
        except OSError as e:  # no locks on some Lustre and FUSE mounts (ENOSYS, EOPNOTSUPP)
            print(f"note: cannot lock --output_dir {folder} ({e.strerror}): training unlocked")
    return lock

def main(argv=None):
    try:
        args = parse_args(argv)
        with claim(args.output_dir):
            if args.benchmark:
                return benchmark(args) and 0
            if args.smoke and args.data is None:
                args.data = make_synthetic_images(Path(args.output_dir) / "smoke_data")
            if args.data is None:
                raise UsageError("pass --data DIR (or --smoke to try the loop on generated images)")
            if args.download and "RANK" in os.environ:  # every process would write the folder
                raise UsageError("--download under torchrun: download first in one process")
            args.data = download(args.download, args.data) if args.download else args.data
            return train(args)
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: lines of several ranks do not interleave
        return e.status
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
