r"""The specification of dino_minimal.py: each test states a claim of the paper (Caron et al.
2021), of the official code or of the file, and fails when the code breaks it.

    python3 -m pytest -q test_dino_minimal.py        # about 1 minute on 2 quiet cores

Part I: the invariants of the algorithm, on tensors built here (hypothesis draws shapes,
temperatures and logits from tiny to huge). Part II: the program's behaviour on images generated
into pytest's tmp_path (resume, stop, errors, torchrun). Nothing needs the network.
"""
import contextlib
import copy
import inspect
import io
import itertools
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import InterpolationMode, RandomResizedCrop

import dino_minimal as dm

# Deterministic property tests: the same examples on every run and every machine (CI).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
# Tiny models on a shared 2-core machine: more threads only add contention (subprocesses get
# the same through OMP_NUM_THREADS).
torch.set_num_threads(1)
SCRIPT = Path(__file__).resolve().parent / "dino_minimal.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
EPS32 = torch.finfo(torch.float32).eps
CPU = torch.device("cpu")
MEAN = torch.tensor(dm.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(dm.IMAGENET_STD).view(3, 1, 1)
# Exact checks hold in fp32: in this process --precision auto means fp32 even on a CPU with bf16
# units; the real rule is tested on mocked hardware (section 9).
REAL_RESOLVE_PRECISION = dm.resolve_precision
dm.resolve_precision = lambda precision, *_: "fp32" if precision == "auto" else precision

def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale

def rng(seed):
    return torch.Generator().manual_seed(seed)

def params(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}

def monotone(xs, up):
    return all(a <= b if up else a >= b for a, b in itertools.pairwise(xs))

# ==============================================================================================
#                               PART I: THE INVARIANTS OF DINO
# ==============================================================================================
# 1. The Vision Transformer -------------------------------------------------------------------
def test_vit_has_the_official_names_and_gives_attention_maps():
    """Released weights load (official parameter names); the last block's attention is one
    row-stochastic (1+N) x (1+N) map per head (Fig. 1)."""
    vit = dm.VisionTransformer(img_size=32, patch_size=8, dim=16, depth=2, heads=4)
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "norm.weight", "norm.bias"}
    for i, m in itertools.product(range(2), ("norm1", "attn.qkv", "attn.proj", "norm2",
                                             "mlp.fc1", "mlp.fc2")):
        names |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    assert set(vit.state_dict()) == names
    a = vit.get_last_selfattention(torch.randn(3, 3, 32, 32))
    assert a.shape == (3, 4, 17, 17) and a.min() >= 0
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 17))

@given(heads=st.sampled_from([1, 2, 4]), n=st.integers(1, 6), seed=st.integers(0, 1000))
def test_attention_is_softmax_qkT_over_sqrt_d_times_v(heads, n, seed):
    """softmax(Q K^T / sqrt(d)) V per head from the module's own weights, by the explicit formula
    and by the fused kernel (FusedAttention) alike; return_attention gives the maps."""
    torch.manual_seed(seed)
    D, d = 8, 8 // heads
    attn, fused, x = dm.Attention(D, heads), dm.FusedAttention(D, heads), torch.randn(2, n, D)
    fused.load_state_dict(attn.state_dict())
    with torch.no_grad():
        qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (B, n, 3D): [q | k | v], heads in order
        maps, outs = [], []
        for h in range(heads):
            q, k, v = (qkv[..., j * D + h * d: j * D + (h + 1) * d] for j in range(3))
            maps.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1))
            outs.append(maps[-1] @ v)
        expected = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
        for module in (attn, fused):
            torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(module(x, return_attention=True), torch.stack(maps, 1),
                                       rtol=1e-5, atol=1e-6)

def official_pos_encoding(pos_embed, x, patch):
    """facebookresearch/dino vision_transformer.py's interpolate_pos_encoding, transcribed (its
    `w` is x.shape[2], the rows, as in its forward's `B, nc, w, h = x.shape`)."""
    w, h = x.shape[2:]
    N = pos_embed.shape[1] - 1
    if (w // patch) * (h // patch) == N and w == h:
        return pos_embed
    class_pos_embed, patch_pos_embed, dim = pos_embed[:, 0], pos_embed[:, 1:], pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

@pytest.mark.parametrize("n0,h,w,patch", [(14, 6, 6, 16), (14, 30, 30, 16), (14, 6, 9, 16),
                                          (14, 14, 14, 16), (4, 2, 3, 4), (4, 7, 5, 4)])
def test_position_embedding_interpolation_is_the_official_one(n0, h, w, patch):
    """Local crops (and 480 px = 30 x 30 patches of 16): the released weights were trained with
    the official scale-factor interpolation (+0.1), which samples other points than a size."""
    torch.manual_seed(n0 + h + w)
    vit = dm.VisionTransformer(img_size=n0 * patch, patch_size=patch, dim=8, depth=1, heads=2)
    x = torch.randn(1, 3, h * patch, w * patch)
    with torch.no_grad():
        official = official_pos_encoding(vit.pos_embed, x, patch)
        assert torch.equal(vit.interpolate_pos_encoding(h, w), official)
        assert vit.prepare_tokens(x).shape == (1, 1 + h * w, 8) and vit(x).shape == (1, 8)
        if (h, w) == (6, 6):  # the test has power: interpolating to a size differs
            grid = vit.pos_embed[:, 1:].reshape(1, n0, n0, 8).permute(0, 3, 1, 2)
            by_size = F.interpolate(grid, size=(h, w), mode="bicubic")
            assert not torch.allclose(by_size.flatten(2).transpose(1, 2), official[:, 1:])

def test_stochastic_depth_drops_whole_samples_and_rescales_the_rest():
    """A sample's branch is zero with probability p, else divided by 1 - p: the mean is the
    input (within 5 binomial sigmas). Rates grow linearly from 0 over the blocks; off in eval."""
    torch.manual_seed(0)
    p, x = 0.3, torch.rand(20000, 2, 3) + 0.5
    y = dm.drop_path(x, p, True)
    dropped, kept = (y == 0).all(2).all(1), (y != 0).all(2).all(1)
    assert (dropped | kept).all()  # a whole sample, never part of one
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert abs(dropped.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / len(x))
    assert abs((y / x).mean().item() - 1) < 5 * math.sqrt(p / (1 - p) / len(x))
    assert dm.drop_path(x, p, False) is x and dm.drop_path(x, 0.0, True) is x
    vit = dm.VisionTransformer(16, 4, dim=8, depth=4, heads=2, drop_path_rate=0.3)
    assert [b.drop_path_rate for b in vit.blocks] == pytest.approx([0, 0.1, 0.2, 0.3])
    x = torch.randn(64, 3, 16, 16)
    assert not torch.equal(vit(x), vit(x)) and torch.equal(vit.eval()(x), vit(x))

# 2. The DINO head and the multi-crop forward -------------------------------------------------
def test_multicrop_forward_is_view_major_with_one_call_per_resolution():
    """Rows v*B:(v+1)*B are view v, as if each view went alone; one backbone call per size."""
    torch.manual_seed(0)
    net = dm.MultiCropNet(dm.VisionTransformer(32, 8, 16, 2, 2), dm.DINOHead(16, 10, 32, 8)).eval()
    views, calls = [torch.randn(3, 3, s, s) for s in (32, 32, 16, 16, 16)], []
    net.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    feats, logits = net(views)
    assert calls == [6, 9] and feats.shape == (15, 16) and logits.shape == (15, 10)
    for v, x in enumerate(views):
        torch.testing.assert_close(feats[3 * v:3 * v + 3], net.backbone(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits[3 * v:3 * v + 3], net.head(net.backbone(x)),
                                   rtol=1e-4, atol=1e-5)

@given(scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e3, 1e6]),
       proto_scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 1000))
def test_head_logits_are_cosines_to_the_prototypes(scale, proto_scale, seed):
    """norm_last_layer: an L2 bottleneck and unit prototypes (gain fixed to 1), so the logits are
    the cosines, in [-1, 1]; without it the gain trains."""
    torch.manual_seed(seed)
    head, z = dm.DINOHead(12, 20, hidden=16, bottleneck=8), torch.randn(5, 12) * scale
    V = head.last_layer.parametrizations.weight.original1
    with torch.no_grad():
        V.mul_(proto_scale)  # its norm cancels
        logits, cos = head(z), F.normalize(head.mlp(z), dim=-1) @ F.normalize(V, dim=-1).T
    torch.testing.assert_close(logits, cos, rtol=1e-4, atol=1e-5)
    assert logits.shape == (5, 20) and logits.abs().max() <= 1 + 1e-5
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.equal(gain, torch.ones(20, 1))
    free = dm.DINOHead(12, 20, 16, 8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad

# 3. The loss: centering, sharpening, cross-entropy over pairs of views (Eq. 1-4) -------------
@st.composite
def loss_inputs(draw):
    """Logits of V = 2 + L views of B images over K prototypes, a center, two temperatures.
    Logit scales from 1e-6 (a uniform softmax) to 1e3 (one-hot); K = 2 and L = 0 are reached."""
    K = draw(st.sampled_from([2, 3, 5, 64]) | st.integers(2, 300))
    B, L = draw(st.integers(1, 5)), draw(st.integers(0, 4))
    scale, seed = draw(st.sampled_from([1e-6, 0.05, 1.0, 10.0, 1e3])), draw(st.integers(0, 2**30))
    return dict(K=K, B=B, V=2 + L, student=randn((2 + L) * B, K, seed=seed, scale=scale),
                teacher=randn(2 * B, K, seed=seed + 1, scale=scale),
                center=randn(1, K, seed=seed + 2, scale=draw(st.sampled_from([0.0, 0.1, scale]))),
                tps=draw(st.sampled_from([0.05, 0.1, 0.2])),
                tpt=draw(st.sampled_from([0.01, 0.04, 0.07, 0.1, 1.0])))

def dino_loss_of(x, **changes):
    x = {**x, **changes}
    loss_fn = dm.DINOLoss(x["K"], student_temp=x["tps"])
    loss_fn.center.copy_(x["center"])
    return loss_fn(x["student"], x["teacher"], x["tpt"])

def tol(x):
    """Rounding budget of the fp32 loss: softmax inputs z = logits / tau carry an absolute error
    of about eps |z|, summed over K (measured: at most 13 eps (1 + |z|) (1 + log K))."""
    zs = (x["student"] / x["tps"]).abs().max().item()
    zt = ((x["teacher"] - x["center"]) / x["tpt"]).abs().max().item()
    return 64 * EPS32 * (1 + zs + zt) * (1 + math.log(x["K"]))

def algorithm1_loss(student_out, teacher_out, center, tps, tpt):
    """The oracle: Algorithm 1 with the official double loop over views, in float64."""
    B = teacher_out.shape[0] // 2
    total, terms = 0.0, 0
    for iq, t in enumerate(teacher_out.double().split(B)):  # the 2 global views
        pt = F.softmax((t - center.double()) / tpt, dim=1)  # centering, sharpening
        for v, s in enumerate(student_out.double().split(B)):  # every view
            if v == iq:
                continue  # a view is never compared with itself
            total = total + (-(pt * F.log_softmax(s / tps, dim=1)).sum(dim=1).mean())
            terms += 1
    return total / terms, terms

@given(loss_inputs())
def test_loss_matches_algorithm_1_over_its_2V_minus_2_pairs(x):
    """Eq. 3: the mean of H(P_t(x), P_s(x')) over the 2V - 2 pairs x' != x."""
    loss, pt = dino_loss_of(x)
    oracle, terms = algorithm1_loss(x["student"], x["teacher"], x["center"], x["tps"], x["tpt"])
    assert terms == 2 * x["V"] - 2 and abs(loss.item() - oracle.item()) <= tol(x)
    expected = F.softmax((x["teacher"].double() - x["center"].double()) / x["tpt"], dim=-1)
    torch.testing.assert_close(pt.double(), expected.view(2, x["B"], x["K"]), rtol=0, atol=tol(x))

@given(loss_inputs())
def test_cross_entropy_is_teacher_entropy_plus_kl(x):
    """Sec. 5.3: H(P_t, P_s) = h(P_t) + KL(P_t || P_s), KL >= 1/2 |P_t - P_s|_1^2 (Pinsker);
    KL = 0 when every student view matches the teacher; a uniform student costs log K."""
    loss, pt = dino_loss_of(x)
    kl = dm.collapse_metrics(loss, pt, torch.randn(2 * x["B"], 4))["kl"]
    ps = F.softmax(x["student"].double() / x["tps"], dim=-1).view(x["V"], x["B"], x["K"])
    pinsker = [0.5 * ((pt[t].double() - ps[v]).abs().sum(-1) ** 2).mean()
               for t in range(2) for v in range(x["V"]) if v != t]
    assert kl >= (sum(pinsker) / len(pinsker)).item() - tol(x)
    t = x["teacher"][:x["B"]].repeat(2, 1)  # both global views alike, every view matching them
    s = ((t[:x["B"]] - x["center"]) * (x["tps"] / x["tpt"])).repeat(x["V"], 1)
    loss, pt = dino_loss_of(x, teacher=t, student=s)
    assert abs(loss.item() - dm.entropy(pt.double()).mean().item()) <= tol({**x, "student": s})
    loss, _ = dino_loss_of(x, student=x["student"][:, :1].expand_as(x["student"]).contiguous())
    assert abs(loss.item() - math.log(x["K"])) <= 64 * EPS32 * (1 + math.log(x["K"]))

@given(loss_inputs(), st.data())
def test_loss_ignores_row_shifts_image_order_and_global_view_order(x, data):
    """Softmax shift invariance; a batch mean (permuting images on all views); symmetric in the
    2 global views."""
    B, V = x["B"], x["V"]
    loss, pt = dino_loss_of(x)
    shifted = x["student"].clone()
    shifted[data.draw(st.integers(0, V * B - 1))] += 7 * x["student"].abs().max().clamp(min=1)
    assert abs(dino_loss_of(x, student=shifted)[0].item() - loss.item()) <= tol(
        {**x, "student": shifted})
    perm = torch.tensor(data.draw(st.permutations(range(B))))
    rows = torch.cat([v * B + perm for v in range(V)])
    permuted, pt_p = dino_loss_of(x, student=x["student"][rows], teacher=x["teacher"][rows[:2 * B]])
    assert abs(permuted.item() - loss.item()) <= tol(x)
    torch.testing.assert_close(pt_p, pt[:, perm])
    swap = torch.cat([torch.arange(B, 2 * B), torch.arange(B), torch.arange(2 * B, V * B)])
    swapped, _ = dino_loss_of(x, student=x["student"][swap], teacher=x["teacher"][swap[:2 * B]])
    assert abs(swapped.item() - loss.item()) <= tol(x)

@given(loss_inputs())
def test_gradient_reaches_the_student_only_from_its_pairs(x):
    """d loss / d s_v = sum over teacher views t != v of (P_s(v) - P_t(t)) / (tau_s B (2V-2));
    Algorithm 1's stop-gradient: none reaches the teacher or the center."""
    B, V = x["B"], x["V"]
    student, teacher = x["student"].clone().requires_grad_(), x["teacher"].clone().requires_grad_()
    loss, pt = dino_loss_of(x, student=student, teacher=teacher)
    loss.backward()
    ps = F.softmax(x["student"].double() / x["tps"], dim=-1).view(V, B, -1)
    expected = torch.stack([sum(ps[v] - pt[t].double() for t in range(2) if t != v)
                            for v in range(V)]) / (x["tps"] * B * (2 * V - 2))
    torch.testing.assert_close(student.grad.double().view(V, B, -1), expected, rtol=1e-4,
                               atol=tol(x) / (x["tps"] * B * (2 * V - 2)))
    assert teacher.grad is None and not pt.requires_grad
    loss_fn = dm.DINOLoss(x["K"])
    loss_fn.update_center(teacher)
    assert loss_fn.center.grad_fn is None and not loss_fn.center.requires_grad

@given(K=st.integers(2, 50), B=st.integers(1, 6),
       m=st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0]) | st.floats(0, 1), seed=st.integers(0, 1000))
def test_center_update_is_an_ema_of_the_raw_batch_mean(K, B, m, seed):
    """Eq. 4: C <- m C + (1 - m) mean of the teacher's raw outputs; the loss leaves C alone."""
    loss_fn = dm.DINOLoss(K, center_momentum=m)
    c0, t = randn(1, K, seed=seed), randn(2 * B, K, seed=seed + 1, scale=3.0)
    loss_fn.center.copy_(c0)
    loss_fn(randn(4 * B, K, seed=seed + 2), t, 0.04)
    assert torch.equal(loss_fn.center, c0)
    loss_fn.update_center(t)
    torch.testing.assert_close(loss_fn.center, c0 * m + (1 - m) * t.mean(0, keepdim=True),
                               rtol=1e-5, atol=1e-6)

@given(K=st.integers(2, 300), seed=st.integers(0, 1000), tpt=st.sampled_from([0.01, 0.04, 0.1]))
def test_centering_a_constant_teacher_leaves_no_information(K, seed, tpt):
    """Under a constant teacher output, C = (1 - m^n) t from C = 0, and P_t becomes uniform."""
    loss_fn, t = dm.DINOLoss(K, center_momentum=0.9), randn(1, K, seed=seed).expand(6, K)
    for n in range(1, 301):
        loss_fn.update_center(t)
        if n in (1, 10, 100):
            torch.testing.assert_close(loss_fn.center, (1 - 0.9**n) * t[:1], rtol=1e-5, atol=1e-6)
    _, pt = loss_fn(randn(6, K, seed=seed + 1), t, tpt)
    torch.testing.assert_close(pt, torch.full_like(pt, 1 / K), rtol=1e-3, atol=0)

@given(loss_inputs(), st.data())
def test_sharpening_lowers_the_teacher_entropy_down_to_the_argmax(x, data):
    """h(softmax(z / tau)) is nondecreasing in tau, row by row; tau_t -> 0 gives the one-hot
    argmax of the centered output, a huge tau_t the uniform distribution."""
    taus = st.sampled_from([0.001, 0.01, 0.04, 0.07, 0.1, 1.0, 100.0])
    t1, t2 = sorted(data.draw(st.lists(taus, min_size=2, max_size=2)))
    h1, h2 = (dm.entropy(dino_loss_of(x, tpt=t)[1]) for t in (t1, t2))
    assert (h1 <= h2 + 1e-5 * (1 + math.log(x["K"]))).all()
    K, B = x["K"], x["B"]
    z = torch.stack([torch.randperm(K, generator=rng(b)).float() * 0.1 for b in range(2 * B)])
    z = z + x["teacher"][:, :1]  # a constant per row changes no softmax; gaps >= 0.1
    _, cold = dino_loss_of(x, teacher=z + x["center"], tpt=1e-3)
    torch.testing.assert_close(cold.reshape(2 * B, K), F.one_hot(z.argmax(1), K).float(),
                               rtol=0, atol=1e-6)
    _, hot = dino_loss_of(x, teacher=x["center"] + z - z.mean(1, keepdim=True), tpt=1e5)
    torch.testing.assert_close(hot, torch.full_like(hot, 1 / K), rtol=2e-3, atol=0)

# 4. Schedules and the EMA teacher ------------------------------------------------------------
@given(m=st.sampled_from([0.0, 1.0, 0.5, 0.996]) | st.floats(0, 1), seed=st.integers(0, 1000))
def test_ema_is_the_convex_combination(m, seed):
    """theta_t <- m theta_t + (1 - m) theta_s; m = 1 keeps, m = 0 copies; the student stays."""
    torch.manual_seed(seed)
    teacher, student = (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)) for _ in range(2))
    t0, s0 = params(teacher), params(student)
    dm.ema_update(teacher, student, m)
    for k, t in params(teacher).items():
        assert torch.equal(params(student)[k], s0[k])
        if m in (0, 1):
            assert torch.equal(t, t0[k] if m == 1 else s0[k])
        torch.testing.assert_close(t, m * t0[k] + (1 - m) * s0[k], rtol=1e-6, atol=1e-6)

@given(epochs=st.integers(1, 6), iters=st.integers(1, 7), warmup=st.integers(0, 6),
       base=st.floats(0, 10), final=st.floats(0, 10), start=st.floats(0, 10))
def test_cosine_schedule_hits_its_endpoints_and_is_monotone(epochs, iters, warmup, base, final,
                                                            start):
    """Per iteration: a linear warmup start -> base, then a cosine base -> final ending exactly
    at final (the official one stops a step short)."""
    warmup = min(warmup, epochs)
    values = dm.cosine_schedule(base, final, epochs, iters, warmup, start)
    w, n = warmup * iters, (epochs - warmup) * iters
    warm, cos = values[:w], values[w:]
    assert len(values) == epochs * iters
    if w:
        assert warm[0] == start and monotone(warm, base >= start)
        assert w < 2 or math.isclose(warm[-1], base, rel_tol=1e-12, abs_tol=1e-12)
    if n:
        assert math.isclose(cos[0], base, rel_tol=1e-12, abs_tol=1e-12)
        assert monotone(cos, final >= base) and (n < 2 or cos[-1] == final)
    if n >= 3 and n % 2:  # the cosine's midpoint is the mean of its ends
        assert math.isclose(cos[n // 2], (base + final) / 2, rel_tol=1e-9, abs_tol=1e-9)

@given(start=st.floats(0.01, 0.1), final=st.floats(0.01, 0.1), warmup=st.integers(0, 9),
       epochs=st.integers(1, 9))
def test_teacher_temperature_warms_up_linearly_per_epoch(start, final, warmup, epochs):
    args = dm.parse_args(["--smoke", "--warmup_teacher_temp", str(start), "--teacher_temp",
                          str(final), "--warmup_teacher_temp_epochs", str(warmup), "--epochs",
                          str(epochs)])
    tt, k = dm.schedules(args, iters_per_epoch=1).teacher_temp, min(warmup, epochs)
    assert len(tt) == epochs and tt[k:] == [final] * (epochs - k)
    if k >= 2:
        expected = [start + (final - start) * e / (k - 1) for e in range(k)]
        assert tt[:k] == pytest.approx(expected, rel=1e-9)

# 5. Multi-crop augmentation: 2 global + L local views, each with its view's probabilities ----
@pytest.mark.parametrize("local_number", [0, 1, 3])
def test_multicrop_gives_two_global_and_L_local_normalized_views(local_number, monkeypatch):
    """[g1, g2, l1..lL], each cropped at its view's size and scale; ImageNet-normalized [0, 1]
    pixels (black stays black); uint8 crops alone without the photometric half."""
    crops = dm.MultiCrop(32, 16, (0.4, 1.0), (0.05, 0.4), local_number, (0.1, 0.5))
    img = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=rng(0))
    sizes, asked, crop = [32, 32] + [16] * local_number, [], dm.random_resized_crop
    monkeypatch.setattr(dm, "random_resized_crop", lambda img, size, scale, rng: asked.append(
        (size, scale)) or crop(img, size, scale, rng))
    views = crops(img, rng(1))
    assert asked == [(32, (0.4, 1.0))] * 2 + [(16, (0.05, 0.4))] * local_number
    assert [(v.dtype, tuple(v.shape)) for v in views] == [(torch.float32, (3, s, s)) for s in sizes]
    assert all(-1e-6 <= (v * STD + MEAN).min() <= (v * STD + MEAN).max() <= 1 + 1e-6 for v in views)
    raw = crops(img, rng(1), photometric=False)
    assert [(v.dtype, tuple(v.shape)) for v in raw] == [(torch.uint8, (3, s, s)) for s in sizes]
    for v in crops(torch.zeros(3, 40, 40, dtype=torch.uint8), rng(2)):
        torch.testing.assert_close(v, (-MEAN / STD).expand_as(v), rtol=0, atol=1e-6)

S = 16  # One image per operation, such that the other four cannot imitate or hide it, and a
# detector of the operation on [0, 1] crops (n, 3, S, S); blur sigma in (1, 2) to be visible.
DETECTORS = {
    "flip": ((torch.arange(S) * 4).view(1, 1, S).expand(3, S, S),  # a dark left-right ramp
             lambda x: x[..., :S // 2].mean((1, 2, 3)) > x[..., S // 2:].mean((1, 2, 3))),
    "jitter": (torch.full((3, S, S), 64),  # a gray: brightness alone moves it
               lambda x: (x - 64 / 255).abs().amax((1, 2, 3)) > 1e-6),
    "gray": (torch.tensor([200, 100, 30]).view(3, 1, 1).expand(3, S, S),  # an orange
             lambda x: (x.amax(1) - x.amin(1)).amax((1, 2)) < 1e-5),
    "blur": (((torch.arange(S).view(S, 1) + torch.arange(S)) % 2 * 64).expand(3, S, S),  # checks
             lambda x: (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)) < 0.03),
    "solarize": (torch.full((3, S, S), 255),  # white: > 0.6 after any jitter, < 0.4 solarized
                 lambda x: x.mean((1, 2, 3)) < 0.5),
}

def crops_of(op, n):
    return DETECTORS[op][0].to(torch.uint8).expand(n, 3, S, S).contiguous()

def test_photometric_applies_operation_j_where_column_j_says():
    """photometric(x, p): p[:, j] switches flip, jitter, gray, blur, solarize (in that order);
    the detectors are exact with every other operation on."""
    for j, (op, (_, detect)) in enumerate(DETECTORS.items()):
        for on in (0.0, 1.0):
            p = torch.ones(200, 5)
            p[:, j] = on
            hits = detect(dm.photometric(crops_of(op, 200), p, (1.0, 2.0), rng(j)))
            assert hits.all() if on else not hits.any(), (op, on)

def test_each_view_is_augmented_with_its_own_probabilities():
    """DataAugmentationDINO's probabilities, measured by finish_views() on 2000 crops per view (2 x
    2000 local), within 5 binomial sigmas (exact at 0 and 1)."""
    expected = {"flip": (0.5, 0.5, 0.5), "jitter": (0.8, 0.8, 0.8), "gray": (0.2, 0.2, 0.2),
                "blur": (1.0, 0.1, 0.5), "solarize": (0.0, 0.2, 0.0)}
    for seed, (op, rates) in enumerate(expected.items()):
        out = dm.finish_views([crops_of(op, 2000)] * 4, (1.0, 2.0), rng(seed))
        hits = [DETECTORS[op][1](v * STD + MEAN) for v in out]
        for view, h, p in zip(("global 1", "global 2", "local"), hits[:2] + [torch.cat(hits[2:])],
                              rates):
            sigma = math.sqrt(p * (1 - p) / len(h))
            assert abs(h.float().mean().item() - p) <= 5 * sigma, (op, view)

@pytest.mark.parametrize("hw,scale", [((10, 300), (0.4, 1.0)), ((300, 10), (0.4, 1.0)),
                                      ((50, 50), (1.5, 2.0)), ((40, 90), (1.2, 1.5))])
def test_random_resized_crop_falls_back_to_torchvisions_centre_crop(hw, scale):
    """When 10 tries find no box: torchvision's fallback, a centre crop with the aspect ratio
    clamped to [3/4, 4/3] (get_params is deterministic here), resized (antialiased bilinear)."""
    img = torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=rng(0))
    i, j, h, w = RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
    expected = F.interpolate(img[None, :, i:i + h, j:j + w], size=(24, 24), mode="bilinear",
                             antialias=True)[0]
    assert torch.equal(dm.random_resized_crop(img, 24, scale, rng(1)), expected)

def test_gray_and_solarize_are_pils():
    """to_gray is ITU-R 601 luma (PIL's convert("L")); solarize inverts pixels >= 128 (128 too:
    in a gray pixel and in the blue of a dark blue one, where rounding could hide it)."""
    arr = torch.randint(0, 256, (12, 9, 3), dtype=torch.uint8, generator=rng(0))
    arr[0, :2] = torch.tensor([[128, 128, 128], [0, 0, 128]])
    pil, x = Image.fromarray(arr.numpy(), "RGB"), arr.permute(2, 0, 1)[None]
    luma = torch.from_numpy(np.array(pil.convert("L"))).float()
    assert (dm.to_gray(x.float() / 255)[0, 0] * 255 - luma).abs().max() <= 0.5 + 1e-4
    solar = torch.from_numpy(np.array(ImageOps.solarize(pil, 128))).permute(2, 0, 1).float()
    out = dm.photometric(x, torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0]]), (0.1, 2.0), rng(0))
    torch.testing.assert_close(out[0], solar / 255, rtol=0, atol=1e-6)

# 6. One training step, in the official order ------------------------------------------------
def tiny_state(optimizer=torch.optim.AdamW, freeze=0, clip=3.0, n=8, **schedules):
    """A 2-block ViT on 16 px (patch 4) with a K = 32 head; an independent teacher; the
    optimizer over param_groups; schedules of n iterations (constant unless given)."""
    torch.manual_seed(0)
    student = dm.MultiCropNet(dm.VisionTransformer(16, 4, 16, 2, 2), dm.DINOHead(16, 32, 32, 8))
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    s = {"lr": [1e-3] * n, "wd": [0.04] * n, "momentum": [0.9] * n, "teacher_temp": [0.04] * n}
    return dm.TrainState(student, teacher, dm.DINOLoss(32),
                         optimizer(dm.param_groups(student), lr=0.0),
                         dm.Schedules(**{**s, **schedules}), clip, freeze)

def random_views(B=4):
    """2 global views of 16 px and 2 local views of 8 px."""
    return [randn(B, 3, s, s, seed=v) for v, s in enumerate((16, 16, 8, 8))]

def test_weight_decay_reaches_the_weights_only_and_lr_every_group():
    """AdamW's first step decays a weight by (1 - lr wd), then moves it by at most lr: with
    lr wd = 0.45 the decay shows on every parameter not .bias and not 1-D (pos_embed and
    cls_token too), on no other; lr and wd of the step's iteration; both groups move."""
    state = tiny_state(lr=[1e-5, 2e-5, 3e-5, 4e-5], wd=[1e4, 2e4, 1.5e4, 5e3], n=4)
    state.it, before, moved = 2, params(state.student), set()
    dm.train_step(state, random_views(), epoch=0)
    lr, wd = 3e-5, 1.5e4
    for name, p in state.student.named_parameters():
        if p.requires_grad:
            decayed = not name.endswith(".bias") and p.ndim > 1
            expected = before[name] * (1 - lr * wd) if decayed else before[name]
            error = (p.detach() - expected).abs()
            assert (error <= lr * (1 + 1e-3) + 4 * EPS32 * before[name].abs()).all(), name
            moved |= {decayed} if (p.detach() - before[name]).abs().max() > lr / 2 else set()
    assert moved == {True, False}

def test_the_prototypes_stay_fixed_during_the_first_epoch():
    """freeze_last_layer = 1: no update of the last layer (not even its decay) in epoch 0 while
    the rest trains; from epoch 1 on it trains."""
    for epoch in (0, 1, 2):
        state = tiny_state(freeze=1)
        before = params(state.student)
        dm.train_step(state, random_views(), epoch)
        changed = {k for k, p in params(state.student).items() if not torch.equal(p, before[k])}
        last = {k for k in before if "last_layer" in k}
        assert last and changed - last and (changed & last == set()) == (epoch == 0), epoch

@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_step_uses_the_teacher_on_global_views_and_the_temperature_of_its_epoch(amp):
    """The loss is DINOLoss(student(all views), teacher(2 global views), tau_t[epoch], the center
    before the step), in fp32 also after bf16 forwards; tau_t by epoch, not iteration."""
    state = tiny_state(teacher_temp=[0.9, 0.3, 0.05, 0.02, 0.5, 0.7], n=6)
    state.it, state.amp_dtype, views = 4, amp, random_views()
    c0 = randn(1, 32, seed=9, scale=0.3)
    state.dino_loss.center.copy_(c0)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        teacher_feats, teacher_out = state.teacher(views[:2])
        student_out = state.student(views)[1]
    reference = dm.DINOLoss(32)
    reference.center.copy_(c0)
    loss, pt = reference(student_out, teacher_out, 0.3)
    seen = {"teacher": [], "student": []}
    for name, shapes in seen.items():
        getattr(state, name).backbone.register_forward_hook(
            lambda m, i, o, shapes=shapes: shapes.append(tuple(i[0].shape)))
    got_loss, got_pt, got_feats = dm.train_step(state, views, epoch=1)
    assert seen == {"teacher": [(8, 3, 16, 16)], "student": [(8, 3, 16, 16), (8, 3, 8, 8)]}
    torch.testing.assert_close(got_pt, pt, rtol=1e-5, atol=1e-7)
    assert got_loss.dtype == torch.float32 and torch.equal(got_feats, teacher_feats)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)

def test_a_step_moves_the_center_then_the_teacher_by_ema():
    """After the loss, C <- m C + (1 - m) mean of the batch's raw teacher outputs (Eq. 4); after
    the optimizer step, theta_t <- l[it] theta_t + (1 - l[it]) theta_s(new); no teacher grad."""
    state = tiny_state(momentum=[0.5, 0.7, 0.9, 0.99], n=4)
    state.it, views, t0, c0 = 1, random_views(), params(state.teacher), randn(1, 32, seed=3)
    state.dino_loss.center.copy_(c0)
    with torch.no_grad():
        teacher_out = state.teacher(views[:2])[1]
    dm.train_step(state, views, 0)
    torch.testing.assert_close(state.dino_loss.center,
                               0.9 * c0 + 0.1 * teacher_out.mean(0, keepdim=True))
    s1 = params(state.student)
    assert state.it == 2 and any(not torch.equal(s1[k], t0[k]) for k in s1)
    for name, t in state.teacher.named_parameters():
        assert t.grad is None and not t.requires_grad
        torch.testing.assert_close(t.detach(), 0.7 * t0[name] + 0.3 * s1[name], rtol=1e-5,
                                   atol=1e-7)

def test_gradients_are_clipped_per_parameter_before_the_step():
    """Each gradient alone is scaled to norm <= clip: a small one beside a huge one stays. In a
    step with SGD (lr 0.5, no decay) the weights move by -lr times the clipped gradients."""
    net = nn.Linear(4, 3)
    net.weight.grad, net.bias.grad = randn(3, 4, seed=0), randn(3, seed=1)
    net.weight.grad *= 100 / net.weight.grad.norm()
    net.bias.grad *= 0.5 / net.bias.grad.norm()
    big, small = net.weight.grad.clone(), net.bias.grad.clone()
    dm.clip_gradients(net, 3.0)
    assert torch.equal(net.bias.grad, small)
    torch.testing.assert_close(net.weight.grad, big * 3 / 100, rtol=1e-5, atol=0)
    state = tiny_state(optimizer=torch.optim.SGD, clip=1e-3, lr=[0.5] * 8, wd=[0.0] * 8)
    before, norms = params(state.student), []
    dm.train_step(state, random_views(), 0)
    for name, p in state.student.named_parameters():
        if p.grad is not None:
            norms.append(p.grad.norm().item())
            torch.testing.assert_close(before[name] - p.detach(), 0.5 * p.grad, rtol=1e-4,
                                       atol=1e-6 * before[name].abs().max().item())
    assert max(norms) <= 1e-3 * (1 + 1e-5) and max(norms) == pytest.approx(1e-3, rel=1e-4)

def test_a_non_finite_loss_stops_before_any_update():
    state = tiny_state()
    with torch.no_grad():
        state.student.backbone.cls_token.fill_(float("nan"))
    before, center = params(state.student), state.dino_loss.center.clone()
    with pytest.raises(FloatingPointError):
        dm.train_step(state, random_views(), 0)
    after = params(state.student)
    assert state.it == 0 and torch.equal(state.dino_loss.center, center)
    assert all(torch.equal(after[k], before[k]) for k in after if k != "backbone.cls_token")

def test_overfitting_one_batch_lowers_the_kl():
    """With teacher and center frozen (momenta 1), repeating one batch drives the KL down."""
    state = tiny_state(momentum=[1.0] * 25, lr=[3e-3] * 25, n=25)
    state.dino_loss.center_momentum, views, kls = 1.0, random_views(B=8), []
    for _ in range(25):
        loss, pt, _ = dm.train_step(state, views, 0)
        kls.append(loss.item() - dm.entropy(pt).mean().item())
    assert kls[-1] < 0.5 * kls[0]

# 7. Collapse diagnostics (Sec. 5.3) and the weighted k-NN (App. F.1) -------------------------
@given(n=st.integers(1, 8), K=st.integers(2, 50), scale=st.sampled_from([0.01, 1.0, 30.0]),
       seed=st.integers(0, 999))
def test_entropies_of_the_collapse_table(n, K, scale, seed):
    """h(uniform) = log K, h(one-hot) = 0; h(mean P_t) >= mean h(P_t) (concavity), the healthy
    gap; KL = loss - h(P_t); uniform collapse: h_teacher = h_batch_mean = log K, KL = 0."""
    assert dm.entropy(torch.full((K,), 1 / K)).item() == pytest.approx(math.log(K), rel=1e-5)
    assert dm.entropy(F.one_hot(torch.tensor(K // 2), K).float()).item() == 0
    p = F.softmax(randn(2, n, K, seed=seed, scale=scale), dim=-1)
    m = dm.collapse_metrics(torch.tensor(5.0), p, randn(2 * n, 4, seed=seed))
    assert m["h_teacher"] == pytest.approx(dm.entropy(p).mean().item(), abs=1e-6)
    assert m["h_teacher"] - 1e-5 <= m["h_batch_mean"] <= math.log(K) + 1e-5
    assert m["kl"] == pytest.approx(5.0 - m["h_teacher"], abs=1e-5)
    loss, pt = dm.DINOLoss(K)(torch.zeros(4 * n, K), torch.zeros(2 * n, K), 0.04)  # uniform
    m = dm.collapse_metrics(loss, pt, randn(2 * n, 4, seed=seed))
    assert m["h_teacher"] == pytest.approx(math.log(K), rel=1e-5) and abs(m["kl"]) < 1e-5
    assert m["h_batch_mean"] == pytest.approx(math.log(K), rel=1e-5)

@given(n=st.integers(2, 12), d=st.integers(2, 12), seed=st.integers(0, 999))
def test_effective_rank_and_feature_spread(n, d, seed):
    """1 <= effective rank <= min(n, d): 1 for rank one, min(n, d) for orthonormal rows; the
    same feature for every image (one-dimension collapse) gives feat_std 0 and rank 1."""
    assert 1 - 1e-5 <= dm.effective_rank(randn(n, d, seed=seed)) <= min(n, d) + 1e-4
    u, v = randn(n, 1, seed=seed + 1), randn(1, d, seed=seed + 2)
    assert dm.effective_rank(u @ v) == pytest.approx(1, abs=1e-3)
    assert dm.effective_rank(torch.eye(n, d)) == pytest.approx(min(n, d), rel=1e-5)
    p = F.softmax(randn(2, n, 8, seed=seed), dim=-1)
    same = dm.collapse_metrics(torch.tensor(2.0), p, v.expand(2 * n, d) * 3)
    assert same["feat_std"] < 1e-6 and same["eff_rank"] == pytest.approx(1, abs=1e-3)

@given(n=st.integers(1, 30), q=st.integers(1, 10), C=st.integers(2, 4), k=st.integers(1, 40),
       T=st.sampled_from([0.02, 0.07, 1.0]), seed=st.integers(0, 999))
def test_knn_is_a_weighted_vote_of_the_k_nearest_by_cosine(n, q, C, k, T, seed):
    """Each query takes the class with the largest sum of exp(cos / T) over its k nearest
    training features by cosine: features of any length (x 1e-2 .. 1e2) are normalized."""
    train_f = randn(n, 6, seed=seed) * torch.exp(randn(n, 1, seed=seed + 3, scale=2.0))
    test_f = randn(q, 6, seed=seed + 1) * torch.exp(randn(q, 1, seed=seed + 4, scale=2.0))
    g = rng(seed)
    train_y, test_y = torch.randint(0, C, (n,), generator=g), torch.randint(0, C, (q,), generator=g)
    train_y[0], correct = C - 1, 0  # every class index can appear
    for f, y in zip(F.normalize(test_f.double(), dim=1), test_y):
        sims, votes = F.normalize(train_f.double(), dim=1) @ f, [0.0] * C
        for i in sims.argsort(descending=True)[:min(k, n)].tolist():
            votes[train_y[i]] += math.exp(sims[i].item() / T)
        correct += max(range(C), key=votes.__getitem__) == y.item()
    assert dm.knn_classify(train_f, train_y, test_f, test_y, k, T) == pytest.approx(
        100 * correct / q)

def test_knn_counts_every_chunk_of_queries():
    """600 queries, voted in chunks of 256 (or 7): the accuracy of one pass over them all."""
    train_f, test_f = randn(50, 8, seed=1), randn(600, 8, seed=2)
    train_y, test_y = (torch.randint(0, 3, (n,), generator=rng(n)) for n in (50, 600))
    whole = dm.knn_classify(train_f, train_y, test_f, test_y, chunk=600)
    assert dm.knn_classify(train_f, train_y, test_f, test_y) == whole
    assert dm.knn_classify(train_f, train_y, test_f, test_y, chunk=7) == whole

def test_eval_view_is_resize_centre_crop_and_imagenet_normalization():
    """The k-NN's input: torchvision's Resize(size * 256/224) + CenterCrop(size) + Normalize
    (bilinear here), up to the uint8 rounding of the resize; a constant c gives (c - mean)/std."""
    img = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=rng(0))
    resized = TF.resize(img, 32, interpolation=InterpolationMode.BILINEAR, antialias=True)
    expected = TF.normalize(TF.center_crop(resized, 28).float() / 255, dm.IMAGENET_MEAN,
                            dm.IMAGENET_STD)
    got = dm.eval_view(img, 28)
    assert got.shape == (3, 28, 28)
    assert (got - expected).abs().max() <= 1 / 255 / min(dm.IMAGENET_STD) + 1e-5
    c = torch.tensor([10, 128, 250], dtype=torch.uint8).view(3, 1, 1)
    flat = dm.eval_view(c.expand(3, 50, 70).contiguous(), 28)
    torch.testing.assert_close(flat, ((c / 255 - MEAN) / STD).expand(3, 28, 28), rtol=0, atol=1e-6)

# ==============================================================================================
#                               PART II: THE PROGRAM'S BEHAVIOUR
# ==============================================================================================
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 classes x 12 generated 40-px images: 36 to train on (9 per class), 12 k-NN queries."""
    return dm.make_synthetic_images(tmp_path_factory.mktemp("tiny"), 4, 12, 40, seed=0)

# --preset smoke written out as flags: the same run without a preset
SMOKE_AS_FLAGS = [f for k, v in dm.PRESETS["smoke"].items()
                  for f in (f"--{k}", *map(str, v if isinstance(v, tuple) else (v,)))]

def tiny_argv(data, out, *extra, preset=("--preset", "smoke")):
    """The smoke model on tiny_data: 4 steps of 8 images per epoch, no k-NN, fp32, a log line
    per step."""
    return [*preset, "--data", str(data), "--output_dir", str(out), "--batch_size_per_gpu", "8",
            "--epochs", "1", "--eval_every", "0", "--log_every", "1", "--num_workers", "0",
            "--precision", "fp32", *map(str, extra)]

def caller_handler(signum, frame):
    pass

def main_captured(argv):
    """main(argv) in this process: (exit code, stdout, stderr). As in a notebook, main() must give
    the caller's Ctrl-C and SIGTERM handlers back."""
    mine = {s: signal.signal(s, caller_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = dm.main([str(a) for a in argv])
        assert all(signal.getsignal(s) is caller_handler for s in mine), "handlers not restored"
    finally:
        for s, h in mine.items():
            signal.signal(s, h)
    return rc, out.getvalue(), err.getvalue()

def run_main(argv):
    rc, out, err = main_captured(argv)
    assert rc == 0 and err == "", err
    return out

def expect_one_error_line(argv):
    """main(argv) fails with one stderr line "error: ..." and no traceback."""
    rc, out, err = main_captured(argv)
    assert rc != 0 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in out + err
    return err.strip()

def run_cli(argv, timeout):
    """The command line in a subprocess (its own process group): (exit code, stdout, stderr).
    A run still going after timeout seconds hung: killed with its workers, the test fails."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, argv)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout} s: it hangs. {proc.communicate()}")
    return proc.returncode, out, err

def read_log(out, kind=None):
    """The complete JSON lines of out/log.jsonl (a line still being written is left out)."""
    path = Path(out) / "log.jsonl"
    lines = [json.loads(x) for x in path.read_text().split("\n")[:-1]] if path.exists() else []
    return [r for r in lines if kind is None or r["type"] == kind]

def load_ckpt(out):
    return torch.load(Path(out) / "checkpoint.pth", map_location="cpu", weights_only=True)

def assert_bitwise_equal(a, b):
    """Nested state dicts equal bit for bit (tensors, their dtypes, numbers, lists)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0)

def assert_same_training(a, b):
    for part in ("student", "teacher", "dino_loss", "optimizer", "scaler", "it"):
        assert_bitwise_equal(a[part], b[part])

def distance(a, b):
    return math.sqrt(sum(((a[k] - b[k]).double() ** 2).sum().item() for k in a))

# 8. Data: image trees, keyed randomness, the k-NN's features, downloads ----------------------
WIDE = {"I;16": (np.uint16, 65535), "I": (np.int32, 2**31 - 1), "F": (np.float32, 1.0)}

@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", *WIDE])
def test_any_image_loads_as_8_bit_rgb(tmp_path, mode):
    """load_rgb: (3, H, W) uint8 RGB from PNG and BMP: gray replicated, alpha dropped, palette
    looked up; 16-bit, 32-bit and float gray (TIFF) mapped from their own range onto 0-255,
    neither black nor white."""
    g = rng(0)
    if mode in WIDE:
        dtype, top = WIDE[mode]
        wide = (torch.rand(5, 7, generator=g).double() * 0.3 + 0.1).numpy() * top
        img, wide = Image.fromarray(wide.astype(dtype)), wide.astype(dtype).astype(np.float64)
        gray = np.round(255 * (wide - wide.min()) / (wide.max() - wide.min()))
        expected = torch.from_numpy(gray.astype(np.uint8)).expand(3, 5, 7)
        img.save(tmp_path / "x.tiff")
        assert torch.equal(dm.load_rgb(tmp_path / "x.tiff"), expected)
        return
    pixels = torch.randint(0, 4 if mode == "P" else 256, (5, 7, len(mode)), generator=g)
    img = Image.fromarray(pixels.byte().squeeze(-1).numpy(), mode)
    if mode == "P":
        img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * 756)
    expected = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    img.save(tmp_path / "x.png")
    assert torch.equal(dm.load_rgb(tmp_path / "x.png"), expected)
    Image.fromarray(expected.permute(1, 2, 0).numpy()).save(tmp_path / "x.bmp")
    assert torch.equal(dm.load_rgb(tmp_path / "x.bmp"), expected)

@given(n=st.integers(1, 70), batch=st.integers(1, 8), world=st.integers(1, 4),
       epoch=st.integers(0, 3), seed=st.integers(0, 1000), start=st.integers(0, 5))
def test_sampler_gives_each_rank_its_slice_of_the_one_process_batch(n, batch, world, epoch, seed,
                                                                    start):
    """W processes with batch B see exactly the batches of one process with B * W; no image
    twice in an epoch; the last incomplete batch dropped; resumable mid-epoch; reshuffled."""
    one, ranks = dm.EpochSampler(n, batch * world, 0, 1, seed), [
        dm.EpochSampler(n, batch, r, world, seed) for r in range(world)]
    for s in [one, *ranks]:
        s.epoch = epoch
    one_keys, rank_keys, steps = list(one), [list(s) for s in ranks], n // (batch * world)
    assert len(one_keys) == steps * batch * world == len(one)
    assert all(len(keys) == len(s) == steps * batch for keys, s in zip(rank_keys, ranks))
    for step in range(steps):
        merged = [k for keys in rank_keys for k in keys[step * batch:(step + 1) * batch]]
        assert merged == one_keys[step * batch * world:(step + 1) * batch * world]
    indices = [i for e, i in one_keys]
    assert all(e == epoch for e, _ in one_keys) and len(set(indices)) == len(indices)
    one.start_step = start = min(start, steps)
    assert list(one) == one_keys[start * batch * world:]
    one.epoch, one.start_step = epoch + 1, 0
    assert len(indices) < 8 or [i for _, i in one] != indices

def test_crops_are_a_pure_function_of_seed_epoch_and_image(tiny_data, tmp_path, monkeypatch):
    """Exact resume: the crops of (seed, epoch, index) are the same whenever drawn; with
    --augment_on_device the photometric draws of a batch follow (seed, iteration, rank). An
    unreadable last image is replaced by the first (the index wraps around)."""
    items, _ = dm.list_images(Path(tiny_data) / "train")
    crops = dm.MultiCrop(32, 16, local_number=2, blur_sigma=(0.1, 0.5))
    first = dm.MultiCropDataset(items, crops, 3)[(1, 5)]
    dm.MultiCropDataset(items, crops, 3)[(0, 2)]  # other draws in between change nothing
    again, other_epoch, other_seed = (dm.MultiCropDataset(items, crops, seed)[(epoch, 5)]
                                      for seed, epoch in ((3, 1), (3, 2), (4, 1)))
    assert first[1] == again[1] == items[5][1]
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert not torch.equal(first[0][0], other_epoch[0][0])
    assert not torch.equal(first[0][0], other_seed[0][0])
    (tmp_path / "bad.png").write_bytes(items[0][0].read_bytes()[:200])
    last = dm.MultiCropDataset([*items, (tmp_path / "bad.png", 3)], crops, 3)[(1, len(items))]
    wrapped = dm.MultiCropDataset(items, crops, 3)[(1, 0)]
    assert last[1:] == (items[0][1], str(tmp_path / "bad.png")) and wrapped[2] == ""
    assert all(torch.equal(x, y) for x, y in zip(last[0], wrapped[0]))
    args = dm.parse_args(["--preset", "smoke", "--augment_on_device", "yes"])
    raw = dm.MultiCropDataset(items, crops, 0, photometric=False)
    batch = torch.utils.data.default_collate([raw[(0, i)] for i in range(4)])[0]
    assert all(v.dtype == torch.uint8 for v in batch)
    a, b, c = (dm.to_device(batch, args, CPU, it) for it in (3, 3, 4))
    assert [(v.dtype, tuple(v.shape)) for v in a] == [(torch.float32, (4, 3, s, s))
                                                      for s in (32, 32, 16, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    monkeypatch.setattr(dm, "rank", lambda: 1)  # under torchrun: rank 1 draws its own, again
    d, e = (dm.to_device(batch, args, CPU, 3) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(d, e)) and not torch.equal(a[0], d[0])

def test_knn_features_are_extracted_in_fp32_from_a_bf16_run(tiny_data, tmp_path):
    """The k-NN's features: the fp32 forward of eval_view images even when training runs in
    bf16; an image that cannot be decoded is left out with its label."""
    args = dm.parse_args(["--preset", "smoke", "--precision", "bf16"])
    backbone = dm.bare(dm.build(args, CPU, 4).teacher).backbone
    items = dm.list_images(Path(tiny_data) / "val")[0]
    (tmp_path / "bad.png").write_bytes(items[0][0].read_bytes()[:200])
    feats, labels = dm.extract_features(backbone, [(tmp_path / "bad.png", 9), *items], 32, CPU)
    with torch.no_grad():
        expected = backbone(torch.stack([dm.eval_view(dm.load_rgb(p), 32) for p, _ in items]))
    assert feats.dtype == torch.float32 and labels.tolist() == [y for _, y in items]
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)

KNN_SCRIPT = """
import json, sys, torch, torch.distributed as dist
import dino_minimal as dm
dist.init_process_group("gloo")
torch.manual_seed(0)
vit, seen = dm.VisionTransformer(32, 8, 16, 1, 2).eval(), []
def backbone(x):
    seen.extend(x.flatten(1)[:, 0].tolist())  # one number per image this process embedded
    return vit(x)
items = [(p, y) for p, y in json.loads(sys.argv[1])]
feats, labels = dm.extract_features(backbone, items, 32, "cpu")
result = {"feats": feats, "labels": labels, "seen": list(seen), "acc": dm.knn_classify(
    feats, labels, feats[::3], labels[::3], k=3)}
result["one"] = dm.extract_features(backbone, items[:1], 32, "cpu")  # 1 image, 2 processes
torch.save(result, sys.argv[2] + f"/{dist.get_rank()}.pt")
dist.destroy_process_group()
"""

def test_the_knn_shares_the_images_between_processes_and_gives_the_one_process_result(
        tiny_data, tmp_path):
    """torchrun (gloo): each of 2 processes embeds only its half of the images (no process
    idles at a barrier); gathered, both hold the one-process features in item order, labels
    and accuracy, with an undecodable image left out wherever it falls (named once per run); with
    a number of images that the processes do not divide (the shares padded to one length, then
    cut) and with fewer images than processes."""
    items = dm.list_images(Path(tiny_data) / "train")[0][:12]  # 13 with bad.png: shares differ
    (tmp_path / "bad.png").write_bytes(items[0][0].read_bytes()[:200])
    items.insert(6, (tmp_path / "bad.png", 1))
    (tmp_path / "script.py").write_text(KNN_SCRIPT)
    proc = torchrun([json.dumps([(str(p), y) for p, y in items]), tmp_path],
                    script=tmp_path / "script.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    vit = dm.VisionTransformer(32, 8, 16, 1, 2).eval()
    run = types.SimpleNamespace(requested=False, skipped=set())  # what a Run lends the k-NN
    with contextlib.redirect_stdout(io.StringIO()) as said:
        feats, labels = dm.extract_features(vit, items, 32, CPU, run=run)
        assert_bitwise_equal(dm.extract_features(vit, items, 32, CPU, run=run), (feats, labels))
    assert said.getvalue() == f"{tmp_path / 'bad.png'}: cannot read it, left out of the k-NN\n"
    assert labels.tolist() == [y for p, y in items if p.name != "bad.png"]
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(len(r["seen"]) for r in ranks) == [6, 7]  # 13 images, the bad one included
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    for r in ranks:
        torch.testing.assert_close(r["feats"], feats, rtol=1e-5, atol=1e-6)
        assert torch.equal(r["labels"], labels)
        assert r["acc"] == dm.knn_classify(feats, labels, feats[::3], labels[::3], k=3)
        assert_bitwise_equal(r["one"], (feats[:1], labels[:1]))

class FakeDataset:
    """torchvision's CIFAR10 / FashionMNIST without the network: `classes`, (PIL image, label)
    pairs; 1005 training and 205 test images of class 0, then 3 of class 1."""
    classes, made = ("T-shirt/top", "airplane"), []

    def __init__(self, root, train=True, download=False):
        g, self.n = rng(int(train)), 1005 if train else 205
        self.items = [(Image.fromarray(torch.randint(0, 256, (4, 5, 3), generator=g).byte()
                                       .numpy()), int(i >= self.n)) for i in range(self.n + 3)]
        FakeDataset.made.append((train, download))

    def __iter__(self):
        return iter(self.items)

class DyingDataset(FakeDataset):
    """The connection drops after 500 images of the training split."""

    def __iter__(self):
        for i, item in enumerate(self.items):
            if i == 500 and self.n == 1005:
                raise OSError("Connection reset by peer")
            yield item

def test_download_writes_capped_class_folders_of_lossless_pngs(tmp_path, monkeypatch):
    """root/train/<class>/0000.png.. the first 1000 images of each class, root/val/<class>/ the
    first 200, equal to the originals; a class name is cut at "/"; a rerun fetches nothing. A
    download cut in the middle of a split is done again on the rerun, not taken as finished."""
    for name, attr in (("cifar10", "CIFAR10"), ("fashion_mnist", "FashionMNIST")):
        monkeypatch.setattr(torchvision.datasets, attr, FakeDataset)
        root, FakeDataset.made = tmp_path / name, []
        assert dm.download(name, root) == str(root) and FakeDataset.made == [(False, True),
                                                                             (True, True)]
        for split, cap in (("train", 1000), ("val", 200)):
            source, files = FakeDataset(None, split == "train"), sorted((root / split).rglob("*.*"))
            assert [f.relative_to(root / split).as_posix() for f in files] == [
                f"T-shirt/{i:04d}.png" for i in range(cap)] + [f"airplane/{i:04d}.png"
                                                               for i in range(3)]
            for f, (img, _) in zip(files, source.items[:cap] + source.items[source.n:]):
                assert torch.equal(dm.load_rgb(f), TF.pil_to_tensor(img))
        FakeDataset.made = []
        dm.download(name, root)
        assert FakeDataset.made == []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", DyingDataset)
    with pytest.raises(dm.UsageError, match="could not download cifar10"):
        dm.download("cifar10", tmp_path / "cut")
    assert (tmp_path / "cut" / "val").is_dir() and not (tmp_path / "cut" / "train").exists()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeDataset)  # the rerun: train again
    dm.download("cifar10", tmp_path / "cut")
    assert len(list((tmp_path / "cut" / "train").rglob("*.png"))) == 1003

def test_imagenette_downloads_into_data_itself_and_the_same_data_trains_without_download(
        tmp_path, monkeypatch):
    """--download imagenette unpacks the release as D/imagenette2-320/{train,val}: it is moved
    up, so --data D names the images with or without --download (10 classes, not 1). A folder
    left by an earlier download is moved up without fetching; D/imagenette2-320 alone is
    refused in one line that names it."""
    def fake_imagenette(root, size, download):  # the release's layout, without the network
        assert size == "320px" and download
        dm.make_synthetic_images(Path(root) / "imagenette2-320", classes=3, per_class=8, size=40)
        fetched.append(root)

    fetched, data = [], tmp_path / "imagenette"
    monkeypatch.setattr(torchvision.datasets, "Imagenette", fake_imagenette)
    args = dm.parse_args(tiny_argv(data, tmp_path / "o", "--download", "imagenette"))
    assert dm.download("imagenette", data) == str(data) and fetched == [data]
    train_items, val_items, classes = dm.load_splits(args)
    assert classes == ["class0", "class1", "class2"] and (len(train_items), len(val_items)) == (
        18, 6)
    assert dm.download("imagenette", data) == str(data) and len(fetched) == 1  # nothing fetched
    assert "18 training / 6 k-NN query images, 3 classes" in run_main(tiny_argv(data,
                                                                                 tmp_path / "o"))
    old = tmp_path / "old"  # an earlier version's download: the release's folder inside --data
    dm.make_synthetic_images(old / "imagenette2-320", classes=3, per_class=8, size=40)
    err = expect_one_error_line(tiny_argv(old, tmp_path / "o2"))
    assert f"pass --data {old / 'imagenette2-320'}" in err
    assert dm.download("imagenette", old) == str(old) and len(fetched) == 1
    assert dm.load_splits(dm.parse_args(tiny_argv(old, "o")))[2] == classes

def test_download_offline_or_under_torchrun_is_one_error_line(tmp_path, monkeypatch):
    """--download cifar10 without a network (a dead proxy makes any machine offline)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    argv = ["--data", tmp_path / "c", "--download", "cifar10", "--output_dir", tmp_path / "o"]
    err = expect_one_error_line(argv)
    assert "could not download cifar10" in err and "are you online?" in err
    monkeypatch.setenv("RANK", "0")  # under torchrun every process would write the folder
    assert "torchrun" in expect_one_error_line(argv)

# 9. Building the run: the teacher, the schedules, precision and speed ------------------------
def test_the_teacher_is_an_independent_copy_without_drop_path_but_batch_statistics():
    """build(): the teacher starts equal to the student, shares no storage, runs without
    drop-path (eval) while its BatchNorm head normalizes with the batch's statistics."""
    args = dm.parse_args(["--preset", "smoke", "--use_bn_in_head", "yes", "--drop_path_rate",
                          "0.5", "--precision", "fp32"])
    state = dm.build(args, CPU, iters_per_epoch=4)
    student, teacher = dm.bare(state.student), dm.bare(state.teacher)
    assert_bitwise_equal(teacher.state_dict(), student.state_dict())
    assert not {p.data_ptr() for p in teacher.parameters()} & {
        p.data_ptr() for p in student.parameters()}
    x = randn(6, 3, 32, 32, seed=1)
    with torch.no_grad():
        assert torch.equal(teacher.backbone(x), teacher.backbone(x))  # no drop-path
        assert not torch.equal(student.backbone(x), student.backbone(x))
        hidden = teacher.head.mlp[1](teacher.head.mlp[0](randn(6, 64, seed=0, scale=5.0) + 3))
    torch.testing.assert_close(hidden.mean(0), torch.zeros(256), rtol=0, atol=1e-5)

def test_under_torchrun_on_gpus_the_head_syncs_its_batchnorms_and_the_teachers_train(
        monkeypatch):
    """The decisions build() makes only on GPUs under torchrun, made here on the CPU: in a
    process group (1 gloo process) with a device of type cuda (the moves to it and DDP, which
    refuses CPU modules with SyncBatchNorms, stubbed), the head's BatchNorms become
    SyncBatchNorms, the student is wrapped for DDP, and the teacher's SyncBatchNorms normalize
    with the batch's statistics (train mode)."""
    monkeypatch.setattr(nn.Module, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel",
                        lambda module: types.SimpleNamespace(module=module))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        args = dm.parse_args(["--preset", "smoke", "--use_bn_in_head", "yes",
                              "--precision", "fp32"])
        state = dm.build(args, torch.device("cuda"), iters_per_epoch=4)
    finally:
        dist.destroy_process_group()
    assert type(state.student) is types.SimpleNamespace  # DDP(student) gives it as .module
    for net in (state.student, state.teacher):
        norms = [m for m in dm.bare(net).modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        assert len(norms) == 2 and all(type(m) is nn.SyncBatchNorm and m.training for m in norms)

def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """torchrun's LOCAL_RANK 3 (of a node's GPUs), not its global RANK: cuda:3."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as if torchrun's group were up
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dm.setup_device("cuda") == torch.device("cuda", 3) and chosen == [3]

def test_a_resnet_backbone_trains_by_the_same_step_and_its_teacher_follows_by_ema(tiny_data,
                                                                                tmp_path):
    """--arch resnet18 (Sec. 3.1: "a ViT or a ResNet"): torchvision's network without its
    classifier, under the same head, loss and step, with SGD (momentum 0.9). After a step the
    teacher is the EMA of the student; its BatchNorms normalized with the batch's statistics,
    as official. No attention maps; the command line trains it."""
    args = dm.parse_args(["--preset", "smoke", "--arch", "resnet18", "--optimizer", "sgd",
                          "--warmup_epochs", "0", "--freeze_last_layer", "0", "--lr", "0.3"])
    torch.manual_seed(0)
    state = dm.build(args, CPU, iters_per_epoch=4)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    student, teacher = dm.bare(state.student), dm.bare(state.teacher)
    x = randn(4, 3, 32, 32, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(student.backbone.eval()(x), reference.eval()(x))
    student.train()
    assert student.backbone.embed_dim == 512 and student.head.mlp[0].in_features == 512
    assert type(state.optimizer) is torch.optim.SGD
    assert state.optimizer.defaults["momentum"] == 0.9
    t0, bn = params(teacher), teacher.backbone.bn1
    dm.train_step(state, [randn(4, 3, s, s, seed=v) for v, s in enumerate((32, 32, 16, 16))], 0)
    s1, m = params(student), state.schedules.momentum[0]
    assert any(not torch.equal(s1[k], t0[k]) for k in s1)
    for name, t in teacher.named_parameters():
        torch.testing.assert_close(t, m * t0[name] + (1 - m) * s1[name], rtol=1e-5, atol=1e-7)
    assert bn.training and bn.running_mean.abs().sum() > 0  # it saw the batch's statistics
    with pytest.raises(TypeError, match="no self-attention"):
        teacher.backbone.get_last_selfattention(x)
    run_main(tiny_argv(tiny_data, tmp_path / "cli", "--arch", "resnet18"))
    assert load_ckpt(tmp_path / "cli")["it"] == 4
    assert dm.parse_args(["--smoke", "--arch", "resnet18", "--local_crop_size", "12"])  # no patches

@settings(max_examples=15)
@given(epochs=st.integers(2, 20), iters=st.integers(2, 10), data=st.data())
def test_built_schedules_follow_the_paper(epochs, iters, data):
    """App. B: lr warmup from 0 to lr x batch / 256, cosine to min_lr; wd 0.04 -> 0.4 and the
    momentum 0.996 -> 1 rise; tau_t per epoch."""
    warmup, batch = data.draw(st.integers(1, epochs)), data.draw(st.sampled_from([8, 16, 64]))
    args = dm.parse_args(["--preset", "smoke", "--epochs", str(epochs), "--warmup_epochs",
                          str(warmup), "--lr", "0.003", "--batch_size_per_gpu", str(batch),
                          "--precision", "fp32"])
    s = dm.build(args, CPU, iters).schedules
    peak, w = 0.003 * batch / 256, warmup * iters  # the linear scaling rule
    assert len(s.lr) == len(s.wd) == len(s.momentum) == epochs * iters == iters * len(
        s.teacher_temp)
    assert s.lr[0] == 0 and math.isclose(s.lr[w - 1], peak, rel_tol=1e-12)
    assert monotone(s.lr[:w], True) and monotone(s.lr[w - 1:], False)
    assert w == len(s.lr) or s.lr[-1] == args.min_lr
    assert s.wd[0] == pytest.approx(0.04) and s.wd[-1] == 0.4 and monotone(s.wd, True)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == 1.0

@pytest.mark.parametrize("device,capability,cpuinfo,expected", [
    ("cuda", (7, 5), "", "fp16"), ("cuda", (7, 0), "", "fp16"),  # T4, V100
    ("cuda", (8, 0), "", "bf16"), ("cuda", (9, 0), "", "bf16"),  # A100, H100
    ("cpu", None, "flags\t: fpu sse2 avx2 avx512f", "fp32"),
    ("cpu", None, "flags\t: fpu sse2 avx512f avx512_bf16", "bf16"),
    ("cpu", None, "flags\t: fpu sse2 amx_bf16 amx_tile", "bf16"),
    ("mps", None, "flags\t: fpu avx512_bf16", "fp32")])
def test_auto_precision_follows_the_hardware(monkeypatch, device, capability, cpuinfo, expected):
    """--precision auto: bf16 on GPUs of compute capability >= 8.0, fp16 before; on a CPU bf16
    only with AVX512-BF16 or AMX (/proc/cpuinfo), else fp32; an explicit choice stays."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    read_text, exists, cpu = Path.read_text, Path.exists, "/proc/cpuinfo"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: cpuinfo if str(self) == cpu
                        else read_text(self, *a, **k))
    monkeypatch.setattr(Path, "exists", lambda self, *a, **k: str(self) == cpu or exists(self))
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert REAL_RESOLVE_PRECISION("auto", torch.device(device)) == expected
    assert ("not tried on mps" in said.getvalue()) == (device == "mps")  # the device's reason
    with contextlib.redirect_stdout(io.StringIO()):
        # a convnet on a CPU: fp32 (bf16 convolutions' backward fails on 1 x 1 inputs there)
        convnet = expected if device == "cuda" else "fp32"
        assert REAL_RESOLVE_PRECISION("auto", torch.device(device), convnet=True) == convnet
    for explicit in ("fp32", "bf16", "fp16"):
        assert REAL_RESOLVE_PRECISION(explicit, torch.device(device)) == explicit

def one_step(tiny_data, *flags):
    """The smoke student's weights before and after a step on 8 crops of tiny_data."""
    args = dm.parse_args(["--preset", "smoke", "--warmup_epochs", "0", "--freeze_last_layer", "0",
                          *flags])
    torch.manual_seed(0)
    state, items = dm.build(args, CPU, 4), dm.list_images(Path(tiny_data) / "train")[0]
    data = dm.MultiCropDataset(items, dm.MultiCrop(32, 16, local_number=2), 0)
    views = torch.utils.data.default_collate([data[(0, i)] for i in range(8)])[0]
    before = copy.deepcopy(dm.bare(state.student).state_dict())
    loss, _, _ = dm.train_step(state, views, 0)
    return before, dm.bare(state.student).state_dict(), loss.item()

def test_a_bf16_step_follows_the_fp32_step(tiny_data):
    """bf16 autocast: the loss within bf16's rounding of fp32's (8 significant bits), and a step
    in the same direction, differing by much less than its own size."""
    init, fp32, loss32 = one_step(tiny_data, "--precision", "fp32")
    init16, bf16, loss16 = one_step(tiny_data, "--precision", "bf16")
    assert_bitwise_equal(init, init16)
    assert abs(loss16 - loss32) <= 2**-8 * loss32 and distance(fp32, bf16) < 0.3 * distance(
        fp32, init)

def test_benchmark_prints_one_json_line(tmp_path):
    """--benchmark: one JSON line, the device, the resolved precision, and positive finite
    images/s (the batch over the step's seconds), seconds per step and peak memory."""
    rc, out, err = run_cli(["--smoke", "--benchmark", "--output_dir", tmp_path], timeout=300)
    assert rc == 0 and err == "", err[-2000:]
    r = json.loads(out.strip().splitlines()[-1])  # after the notes that any run prints
    assert r.keys() == {"device", "precision", "train_img_per_s", "step_s", "peak_mem_mb"}
    for key in ("train_img_per_s", "step_s", "peak_mem_mb"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["train_img_per_s"] == pytest.approx(16 / r["step_s"]) and r["peak_mem_mb"] > 10
    assert r["device"] == "cpu x 1"
    with contextlib.redirect_stdout(io.StringIO()):
        assert r["precision"] == REAL_RESOLVE_PRECISION("auto", CPU)
    rc, out, _ = main_captured(["--smoke", "--benchmark", "--output_dir", tmp_path,
                                "--precision", "fp32"])
    assert rc == 0 and json.loads(out.splitlines()[-1])["precision"] == "fp32"

# 10. Training runs: seeds, logs, collapse in miniature (Fig. 7), resume, stop, errors --------
@pytest.fixture(scope="module")
def seeded_runs(tiny_data, tmp_path_factory):
    """2 epochs of the smoke model: seed 5 twice, seed 7, and seed 5 without --preset (its
    values written out as flags); their output dirs and stdouts."""
    root, result = tmp_path_factory.mktemp("seeds"), {}
    for name, seed, preset in (("a", 5, ("--preset", "smoke")), ("b", 5, ("--preset", "smoke")),
                               ("c", 7, ("--preset", "smoke")), ("no_preset", 5, SMOKE_AS_FLAGS)):
        argv = tiny_argv(tiny_data, root / name, "--epochs", 2, "--seed", seed, preset=preset)
        result[name] = (root / name, run_main(argv))
    return result

def test_two_seeded_runs_give_bitwise_equal_weights(seeded_runs):
    """--seed: same seed, same flags, bitwise-equal weights on the CPU; another seed differs."""
    (a, _), (b, _), (c, _) = (seeded_runs[k] for k in "abc")
    assert_same_training(load_ckpt(a), load_ckpt(b))
    wa, wc = (torch.load(o / "teacher_backbone.pth", weights_only=True) for o in (a, c))
    assert wa.keys() == wc.keys() and any(not torch.equal(wa[k], wc[k]) for k in wa)

def test_log_lines_show_epoch_of_epochs_and_time_left(seeded_runs):
    """Printed step lines read `epoch e/E ... left X min`; log.jsonl keeps a 0-based epoch."""
    out, stdout = seeded_runs["a"]
    lines, steps = [x for x in stdout.splitlines() if x.startswith("epoch")], read_log(out, "step")
    assert len(lines) == len(steps) == 8 and lines[-1].endswith("left 0.0 min")
    for line, record in zip(lines, steps):
        m = re.fullmatch(r"epoch (\d+)/(\d+)  it (\d+)  .*  left (\d+\.\d) min", line)
        assert m and (int(m[1]), int(m[2]), int(m[3])) == (record["epoch"] + 1, 2, record["it"])
    assert [r["epoch"] for r in steps] == [0] * 4 + [1] * 4

def test_a_cpu_run_without_preset_says_the_defaults_are_for_gpus_and_runs_the_same(seeded_runs):
    """Without --preset a CPU run says once that the defaults are the paper's GPU recipe and
    names the laptop preset; its weights are bitwise those of the same run with --preset."""
    (a, with_preset), (d, without) = seeded_runs["a"], seeded_runs["no_preset"]
    notes = [x for x in without.splitlines() if "--preset laptop" in x]
    assert len(notes) == 1 and "the paper's recipe for 16 GPUs" in notes[0]
    assert "--preset laptop" not in with_preset
    assert_same_training(load_ckpt(a), load_ckpt(d))

def test_fig7_in_miniature_either_half_alone_collapses(tmp_path):
    """Sec. 5.3, Fig. 7: the smoke model for 44 steps with centering and sharpening, without
    centering, without sharpening. A high lr and teacher momentum 0.99 let the teacher move; the
    sharper tau_t = 0.02 keeps the full run away from the uniform end at this tiny scale."""
    root, runs = tmp_path, {}
    data = dm.make_synthetic_images(root / "data", classes=10, per_class=24, size=40, seed=0)
    common = tiny_argv(data, root, "--epochs", 4, "--warmup_epochs", 0, "--lr", 0.005,
                       "--momentum_teacher", 0.99, "--batch_size_per_gpu", 16)
    sharp = ["--teacher_temp", "0.02", "--warmup_teacher_temp", "0.02"]
    regimes = {"full": sharp, "no_centering": [*sharp, "--center_momentum", "1"],
               "no_sharpening": ["--teacher_temp", "0.1", "--warmup_teacher_temp", "0.1"]}
    for name, flags in regimes.items():
        run_main([*common, *flags, "--output_dir", root / name])
        steps = read_log(root / name, "step")
        last = {k: sum(r[k] for r in steps[-4:]) / 4 for k in ("h_teacher", "h_batch_mean", "kl")}
        runs[name] = dict(last, h_first=steps[0]["h_teacher"],
                          center=load_ckpt(root / name)["dino_loss"]["center"])
    full, one, flat = runs["full"], runs["no_centering"], runs["no_sharpening"]
    log_k = math.log(256)
    # with both, KL stays > 0 and 0 < h(P_t) < h(mean P_t) < log K
    assert full["kl"] > 0.5 and 1.0 < full["h_teacher"] < log_k - 0.3
    assert full["h_teacher"] < full["h_batch_mean"]
    # sharpening alone lets one dimension dominate: h(P_t) -> 0, KL -> 0
    assert torch.equal(one["center"], torch.zeros_like(one["center"]))  # --center_momentum 1
    assert one["h_teacher"] < min(0.2 * log_k, one["h_first"], full["h_teacher"] / 4)
    # centering alone (tau_t = tau_s) flattens the teacher: h(P_t) -> log K, KL -> 0
    assert flat["h_first"] < flat["h_teacher"] and log_k - flat["h_teacher"] < 0.1
    assert one["kl"] < full["kl"] / 2 and flat["kl"] < full["kl"] / 2

def test_a_stopped_run_resumes_bitwise_exact_whatever_the_worker_count(tiny_data, tmp_path,
                                                                       monkeypatch):
    """SIGTERM mid-epoch (2 workers): the step is finished and saved, one line, status 130; the
    rerun (no workers) ends bitwise equal to a straight run, with drop-path on (the network's
    randomness resumes too): the same losses, the same weights."""
    extra = ["--epochs", "2", "--drop_path_rate", "0.1"]
    run_main(tiny_argv(tiny_data, tmp_path / "straight", *extra))
    log_step = dm.log_step

    def term_at_5(state, *args, **kwargs):  # a scheduler's SIGTERM, twice, after step 5
        log_step(state, *args, **kwargs)
        if state.it == 5:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # a second SIGTERM changes nothing

    monkeypatch.setattr(dm, "log_step", term_at_5)
    argv = tiny_argv(tiny_data, tmp_path / "stopped", *extra, "--num_workers", "2")
    rc, out, err = main_captured(argv)
    assert rc == 130 and err == "" and load_ckpt(tmp_path / "stopped")["it"] == 5
    assert out.strip().splitlines()[-1] == (f"stopped at iteration 5: saved {tmp_path / 'stopped'}"
                                           "/checkpoint.pth; the same command resumes")
    monkeypatch.setattr(dm, "log_step", log_step)
    second = run_main(tiny_argv(tiny_data, tmp_path / "stopped", *extra))
    assert "resumed from" in second and "done:" in second
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "stopped")
    assert a["it"] == 8 and (tmp_path / "stopped" / "teacher_backbone.pth").exists()
    assert_same_training(a, b)
    assert [r["loss"] for r in read_log(tmp_path / "straight", "step")] == [
        r["loss"] for r in read_log(tmp_path / "stopped", "step")]

def test_a_second_ctrl_c_interrupts_at_once(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C asks for a stop after the step; a second Ctrl-C before it is taken interrupts at
    once (KeyboardInterrupt: nothing saved, the caller's handlers given back)."""
    log_step = dm.log_step

    def two_at_2(state, *args, **kwargs):
        log_step(state, *args, **kwargs)
        if state.it == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(dm, "log_step", two_at_2)
    previous = signal.signal(signal.SIGINT, caller_handler)  # the caller's own handler
    try:
        with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
            dm.main([str(a) for a in tiny_argv(tiny_data, tmp_path)])
        assert signal.getsignal(signal.SIGINT) is caller_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [r["it"] for r in read_log(tmp_path, "step")] == [1, 2]
    assert not (tmp_path / "checkpoint.pth").exists()

def test_timed_saves_restart_their_clock_and_the_speed_is_each_epochs_own(tiny_data, tmp_path,
                                                                          monkeypatch):
    """A clock that runs 24 s per step (4 steps per epoch): --save_every_minutes 1 saves within
    an epoch once a minute has passed since the last save of either kind, not at every step
    after the first minute; 0 saves at the ends of epochs only. img_per_s and the time left
    come from the epoch's own steps, in the second epoch as in the first."""
    now, step, save, saves = [time.time()], dm.train_step, dm.save_checkpoint, []

    def slow_step(state, views, epoch):
        now[0] += 24
        return step(state, views, epoch)

    def counted_save(state, *args):
        saves.append(state.it)
        save(state, *args)

    monkeypatch.setattr(dm, "train_step", slow_step)
    monkeypatch.setattr(dm, "save_checkpoint", counted_save)
    monkeypatch.setattr(dm, "time", types.SimpleNamespace(time=lambda: now[0],
                                                          perf_counter=lambda: now[0]))
    for minutes, expected in ((1, [3, 4, 7, 8]), (0, [4, 8])):
        saves.clear()
        out = run_main(tiny_argv(tiny_data, tmp_path / str(minutes), "--epochs", 2,
                                 "--save_every_minutes", minutes))
        assert saves == expected
    steps = read_log(tmp_path / "0", "step")
    assert [r["img_per_s"] for r in steps] == pytest.approx([8 / 24] * 8)
    assert re.findall(r"left (\S+) min", out) == [f"{(8 - r['it']) * 0.4:.1f}" for r in steps]

@pytest.fixture(scope="module")
def data48(tmp_path_factory):
    return dm.make_synthetic_images(tmp_path_factory.mktemp("d48"), 4, 16, 40, seed=1)

def start_run(data, out, *extra):
    """The command line on 48 images in batches of 4 (12 steps per epoch), in the background."""
    argv = tiny_argv(data, out, "--batch_size_per_gpu", "4", "--epochs", "3", *extra)
    return argv, subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=ENV, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)  # a terminal's job

def wait_for_step(proc, out, predicate, timeout=180):
    """Poll log.jsonl until a step record satisfies predicate, the run still going."""
    deadline = time.monotonic() + timeout
    while not any(predicate(r) for r in read_log(out, "step")):
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no step record in time")
        time.sleep(0.005)

def test_sigkill_mid_epoch_leaves_a_loadable_checkpoint_and_the_rerun_finishes(data48, tmp_path):
    """Atomic save: a run killed at any moment leaves the last checkpoint whole; rerun resumes."""
    out = tmp_path / "run"
    argv, proc = start_run(data48, out)
    wait_for_step(proc, out, lambda r: r["epoch"] >= 1 and r["it"] % 12 != 0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    ckpt = load_ckpt(out)
    assert ckpt["it"] > 0 and ckpt["it"] % 12 == 0
    (out / "checkpoint.tmp").write_bytes(b"half a checkpoint")  # as if killed inside torch.save
    stdout = run_main(argv)
    assert f"resumed from {out / 'checkpoint.pth'} at iteration {ckpt['it']}" in stdout
    assert (out / "teacher_backbone.pth").exists() and load_ckpt(out)["it"] == 36

@pytest.fixture(scope="module")
def straight48(data48, tmp_path_factory):
    """start_run's command, run straight through: the reference for exact resumes."""
    out = tmp_path_factory.mktemp("straight48")
    run_main(tiny_argv(data48, out, "--batch_size_per_gpu", "4", "--epochs", "3"))
    return load_ckpt(out)

def children(pid):
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

def test_a_killed_loader_worker_ends_in_one_line_and_the_rerun_is_exact(data48, straight48,
                                                                        tmp_path):
    """The out-of-memory killer takes a loader worker mid-epoch: one line, status 1, naming the
    checkpoint kept (the epoch's end: at most --save_every_minutes old) and its age; the same
    command resumes from it and ends bitwise equal to a straight run."""
    out = tmp_path / "run"
    argv, proc = start_run(data48, out, "--num_workers", "1")
    wait_for_step(proc, out, lambda r: r["epoch"] >= 1 and r["it"] % 12 != 0)
    os.kill(children(proc.pid)[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: a loader worker died (") and lines[0].endswith(
        "the same command resumes from it; if it recurs, lower --num_workers")
    saved, logged = load_ckpt(out)["it"], read_log(out, "step")[-1]["it"]
    assert saved == 12 * (logged // 12) > 0 and f"holds iteration {saved}, saved 0 min" in lines[0]
    assert f"at iteration {saved}" in run_main(argv)
    assert_same_training(straight48, load_ckpt(out))

def test_a_timed_checkpoint_mid_epoch_resumes_exactly(data48, straight48, tmp_path):
    """--save_every_minutes writes checkpoints inside an epoch: after a SIGKILL the same
    command resumes from the last of them and ends bitwise equal to a straight run."""
    out = tmp_path / "run"
    argv, proc = start_run(data48, out, "--save_every_minutes", "1e-6")  # after every step
    wait_for_step(proc, out, lambda r: r["epoch"] >= 1 and r["it"] % 12 > 2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = load_ckpt(out)["it"]
    assert saved % 12 != 0 and f"resumed from {out / 'checkpoint.pth'} at iteration {saved}" in (
        run_main(argv))
    assert_same_training(straight48, load_ckpt(out))

def test_a_nan_loss_ends_in_one_line_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    """A loss that is not finite stops the run before the step is taken: one line that says
    what to try, status 1, the last checkpoint (of the epoch before) kept as it was, and its
    true age (the file's, 30 min: the run resumed from it)."""
    run_main(tiny_argv(tiny_data, tmp_path, "--epochs", "1"))
    before, old = load_ckpt(tmp_path), time.time() - 30 * 60
    os.utime(tmp_path / "checkpoint.pth", (old, old))  # resumed, it names the file's own age
    rc, _, err = main_captured(tiny_argv(tiny_data, tmp_path, "--epochs", "2",
                                         "--teacher_temp", "1e-45"))
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: FloatingPointError: loss is nan") and "--precision fp32" in err
    assert f"holds iteration {before['it']}, saved 30 min ago" in err
    assert_same_training(before, load_ckpt(tmp_path))

class PowerCut(BaseException):
    """The process dies here: dino_minimal catches no BaseException."""

def test_a_checkpoint_reaches_the_disk_before_its_rename_and_the_rename_after(tiny_data,
                                                                              tmp_path,
                                                                              monkeypatch):
    """Durable writes: the temporary file is fsync'd before it is renamed over checkpoint.pth,
    and the folder after, so a power cut cannot leave an empty checkpoint.pth."""
    events, fsync, replace = [], os.fsync, os.replace

    def fsync_of(fd):
        events.append(("fsync", "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        fsync(fd)

    def replace_of(source, target):
        events.append(("replace", Path(target).name))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync_of)
    monkeypatch.setattr(os, "replace", replace_of)
    run_main(tiny_argv(tiny_data, tmp_path))
    saves = [e for e in events if e[0] == "fsync" or e[1] == "checkpoint.pth"]
    assert saves == [("fsync", "file"), ("replace", "checkpoint.pth"), ("fsync", "folder")]

@pytest.mark.parametrize("death", [PowerCut, OSError], ids=["killed", "disk full"])
def test_a_write_cut_short_leaves_the_last_checkpoint_whole(tiny_data, tmp_path, monkeypatch,
                                                            death):
    """The second checkpoint fails halfway through its writing, the process killed there or the
    disk full (then one error line, status 1, no temporary file left): the first checkpoint is
    whole, and the same command resumes from it and finishes."""
    out, real_save, argv = tmp_path / "out", torch.save, tiny_argv(tiny_data, tmp_path / "out",
                                                                   "--epochs", 2)

    def save_then_fail(obj, f, *args, **kwargs):
        if not (out / "checkpoint.pth").exists():
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        raise death(28, "No space left on device") if death is OSError else death()

    monkeypatch.setattr(torch, "save", save_then_fail)
    if death is OSError:
        rc, _, err = main_captured(argv)
        assert rc == 1 and len(err.splitlines()) == 1 and "No space left on device" in err, err
        assert "holds iteration 4, saved 0 min ago" in err and not (out / "checkpoint.tmp").exists()
    else:
        with pytest.raises(PowerCut):
            main_captured(argv)
    monkeypatch.undo()
    assert load_ckpt(out)["it"] == 4
    run_main(argv)
    assert load_ckpt(out)["it"] == 8 and (out / "teacher_backbone.pth").exists()

@pytest.mark.parametrize("how", ["SIGTERM to the process", "Ctrl-C to the group, 2 workers"])
def test_a_stop_signal_finishes_the_step_saves_and_the_rerun_continues(data48, tmp_path, how):
    """SIGTERM / Ctrl-C: finish the step, save, name the checkpoint, exit; rerun continues."""
    out = tmp_path / "run"
    argv, proc = start_run(data48, out, *(["--num_workers", "2"] if "workers" in how else []))
    wait_for_step(proc, out, lambda r: r["it"] >= 2)
    assert f"another run is using --output_dir {out}" in expect_one_error_line(argv)  # locked
    if how.startswith("SIGTERM"):  # a scheduler stopping the job
        proc.send_signal(signal.SIGTERM)
    else:  # a terminal's Ctrl-C reaches the whole process group: the loader's workers too
        os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    it, last_line = load_ckpt(out)["it"], stdout.strip().splitlines()[-1]
    assert str(out / "checkpoint.pth") in last_line and f"iteration {it}" in last_line
    assert read_log(out, "step")[-1]["it"] == it  # the step in flight was finished and saved
    before, stdout = len(read_log(out, "step")), run_main(argv)
    assert f"resumed from {out / 'checkpoint.pth'} at iteration {it}" in stdout
    assert [r["it"] for r in read_log(out, "step")[before:]] == list(range(it + 1, 37))

# One value other than the smoke model's for each flag that resume compares: each alone is
# refused (--arch and --num_heads change no weight's shape, but what the weights mean).
OTHER_MODEL = {"arch": "vit_small", "optimizer": "sgd", "patch_size": 4, "embed_dim": 32,
               "depth": 3, "num_heads": 4, "out_dim": 128, "head_hidden_dim": 128,
               "bottleneck_dim": 32, "norm_last_layer": "no", "use_bn_in_head": "yes",
               "global_crop_size": 24}

def test_a_checkpoint_holds_its_data_by_absolute_path_and_refuses_another_model(tiny_data,
                                                                               tmp_path,
                                                                               monkeypatch):
    """--data relative to where training ran is found from anywhere; resuming into a checkpoint
    of another model (any one of its flags alone), another --data (another length of an
    epoch) or another global batch is one error line naming the difference."""
    monkeypatch.chdir(Path(tiny_data).parent)
    run_main(tiny_argv(Path(tiny_data).name, tmp_path / "out"))
    assert load_ckpt(tmp_path / "out")["args"]["data"] == str(Path(tiny_data).resolve())
    shutil.copytree(tiny_data, tmp_path / "copy")
    for flags, says in ((("--embed_dim", 32), "was trained with --embed_dim 64"),
                        (("--batch_size_per_gpu", 4), "global batch of 8"),
                        (("--data", tmp_path / "copy"),
                         f"was trained with --data {Path(tiny_data).resolve()}: pass the same")):
        assert says in expect_one_error_line(tiny_argv(tiny_data, tmp_path / "out", *flags))
    for name, value in OTHER_MODEL.items():  # resume refuses before it touches the state
        args = dm.parse_args(tiny_argv(tiny_data, tmp_path / "out", f"--{name}", value))
        with pytest.raises(dm.UsageError, match=f"was trained with --{name} [^:]*: pass the same"):
            dm.resume(None, args, tmp_path / "out" / "checkpoint.pth")
    assert {*OTHER_MODEL, "data"} == set(dm.RESUME_FLAGS)  # a flag added there is added here

def test_a_run_resumes_in_another_precision(tiny_data, tmp_path):
    """bf16 -> fp16 -> fp32: a checkpoint saved without a GradScaler's state resumes with one,
    and one saved with it resumes without; each run continues the schedule where it stopped."""
    out = tmp_path / "out"
    for epochs, precision in ((1, "bf16"), (2, "fp16"), (3, "fp32")):
        run_main(tiny_argv(tiny_data, out, "--epochs", epochs, "--precision", precision))
        assert load_ckpt(out)["it"] == 4 * epochs
    assert [r["it"] for r in read_log(out, "step")] == list(range(1, 13))

def test_init_weights_starts_both_backbones_from_a_file_and_a_resume_ignores_it(
        tiny_data, tmp_path, monkeypatch):
    """--init_weights: at the first step the student's and the teacher's backbones hold the
    file's tensors (a teacher_backbone.pth, or a checkpoint.pth's teacher), their heads are those
    the seed gives without it, and training moves the backbone. A resume ignores the flag (the
    checkpoint holds the weights, the file may be gone). A file that does not fit the model is
    one error line naming the first mismatch, before any step."""
    source = tmp_path / "source"
    run_main(tiny_argv(tiny_data, source))  # the smoke model, 4 steps
    backbone = torch.load(source / "teacher_backbone.pth", weights_only=True)
    first, step = [], dm.train_step

    def recording_step(state, views, epoch):  # the networks as the step finds them
        first.append({net: copy.deepcopy(dm.bare(getattr(state, net)).state_dict())
                      for net in ("student", "teacher")})
        return step(state, views, epoch)

    def part(weights, prefix):
        return {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}

    monkeypatch.setattr(dm, "train_step", recording_step)
    run_main(tiny_argv(tiny_data, tmp_path / "fresh", "--seed", 1))
    fresh = first[0]["student"]
    assert distance(part(fresh, "backbone."), backbone) > 1  # the file is not the seed's init
    for name in ("teacher_backbone.pth", "checkpoint.pth"):
        first.clear()
        out = tmp_path / name
        run_main(tiny_argv(tiny_data, out, "--seed", 1, "--init_weights", source / name))
        for net in ("student", "teacher"):
            assert_bitwise_equal(part(first[0][net], "backbone."), backbone)
            assert_bitwise_equal(part(first[0][net], "head."), part(fresh, "head."))
        assert distance(part(load_ckpt(out)["student"], "backbone."), backbone) > 0
    saved, first[:] = load_ckpt(out), []
    argv = tiny_argv(tiny_data, out, "--seed", 1, "--epochs", 2, "--init_weights", "gone.pth")
    assert f"resumed from {out / 'checkpoint.pth'} at iteration 4" in run_main(argv)
    assert_bitwise_equal(first[0]["student"], saved["student"])
    file, refused, first[:] = source / "teacher_backbone.pth", tmp_path / "refused", []
    for flags, says in ((["--global_crop_size", 40], "pos_embed is (1, 17, 64) there, (1, 26, 64)"),
                        (["--depth", 3], "blocks.2.norm1.weight is missing there, (64,)"),
                        (["--depth", 1], "blocks.1.norm1.weight is (64,) there, missing")):
        err = expect_one_error_line(tiny_argv(tiny_data, refused, "--init_weights", file, *flags))
        assert err == f"error: {file} does not fit this model: {says} here"
    err = expect_one_error_line(tiny_argv(tiny_data, refused, "--init_weights", tmp_path / "no"))
    assert err.startswith(f"error: cannot load {tmp_path / 'no'} (FileNotFoundError)")
    assert not first and not (refused / "log.jsonl").exists()  # refused before any step

def test_a_checkpoint_of_another_number_of_processes_resumes_only_at_the_same_global_batch(
        tiny_data, tmp_path):
    """The schedules count iterations: a checkpoint of 2 processes x 4 images resumes in one
    process with 8 (the same images per step), and is refused with 4, naming both batches."""
    out = tmp_path / "out"
    run_main(tiny_argv(tiny_data, out, "--batch_size_per_gpu", 4))
    torch.save({**load_ckpt(out), "world_size": 2}, out / "checkpoint.pth")  # as torchrun's
    err = expect_one_error_line(tiny_argv(tiny_data, out, "--batch_size_per_gpu", 4))
    assert "global batch of 8 (2 processes), this run has 4" in err
    assert "resumed from" in run_main(tiny_argv(tiny_data, out, "--epochs", 3))  # 1 x 8

def test_bad_data_or_output_dir_is_one_error_line(tiny_data, tmp_path):
    """--data missing, a file, not given; class folders without images; class folders without
    train/ above them; images smaller than the crops; fewer images than a batch (also the global
    batch of 2 processes); an --output_dir that cannot be created (below a regular file: root
    ignores chmod), with --data or --smoke."""
    (tmp_path / "file").write_text("x")
    for data in ([], ["--data", tiny_data]):
        argv = ["--smoke", "--output_dir", tmp_path / "file" / "out", *data]
        assert "output_dir" in expect_one_error_line(argv)
    for data in (tmp_path / "nope", tmp_path / "file"):
        assert str(data) in expect_one_error_line(["--data", data, "--output_dir", tmp_path / "o"])
    assert "--data" in expect_one_error_line(["--output_dir", tmp_path / "o"])
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "cat" / "readme.txt").write_text("no images here")
    (tmp_path / "flat" / "cat").mkdir(parents=True)  # class folders, but no train/ above them
    Image.new("RGB", (40, 40)).save(tmp_path / "flat" / "cat" / "a.png")
    small = dm.make_synthetic_images(tmp_path / "small", classes=2, per_class=4, size=12)
    few = dm.make_synthetic_images(tmp_path / "few", classes=2, per_class=4, size=40)
    for data, says in ((tmp_path / "empty", f"{tmp_path / 'empty' / 'train' / 'cat'} holds no"),
                       (tmp_path / "flat", "holds no train/ folder"), (small, "smaller than"),
                       (few, "batch")):
        assert says in expect_one_error_line(tiny_argv(data, tmp_path / "o"))
    with pytest.MonkeyPatch.context() as mp:  # 36 images: 2 processes of 20 need 40
        mp.setattr(dm, "world_size", lambda: 2)
        with pytest.raises(dm.UsageError, match="36 training images .* but a batch of 40"):
            dm.load_splits(dm.parse_args(tiny_argv(tiny_data, "o", "--batch_size_per_gpu", 20)))

def test_an_undecodable_image_is_replaced_named_once_and_changes_nothing_else(tiny_data,
                                                                              tmp_path):
    """Non-images are skipped and counted. An image cut short is found when decoded (in a worker
    or not), replaced by the next image and logged once; 0 or 2 workers alike. With the k-NN
    on (3 evaluations, each 2 networks x memory and queries), each file that cannot be read is
    named once in the whole run, the training image by the first pass that meets it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train" / "class0" / "notes.png").write_text("not an image")
    (data / "train" / "class1" / "junk.jpg").write_bytes(os.urandom(300))
    bad, query = data / "train" / "class1" / "002.png", data / "val" / "class2" / "004.png"
    for path in (bad, query):
        path.write_bytes(path.read_bytes()[:200])
    said = {}
    for name, workers, knn in (("0", 0, 0), ("2", 2, 0), ("knn", 0, 1)):
        said[name] = run_main(tiny_argv(data, tmp_path / name, "--epochs", 2, "--num_workers",
                                        workers, "--eval_every", knn))
        assert f"skipped 2 files under {data / 'train'} that are not images" in said[name]
        assert said[name].count(str(bad)) == 1 and said[name].count(str(query)) == knn
    for name in ("0", "2"):
        assert [r["file"] for r in read_log(tmp_path / name, "skipped")] == [str(bad)]
        assert f"{bad}: cannot read it, replaced by another image" in said[name]
    assert f"{query}: cannot read it, left out of the k-NN" in said["knn"]
    assert_same_training(load_ckpt(tmp_path / "0"), load_ckpt(tmp_path / "2"))
    assert_same_training(load_ckpt(tmp_path / "0"), load_ckpt(tmp_path / "knn"))

def test_each_surprise_in_the_data_folders_is_one_error_line(tiny_data, tmp_path, monkeypatch):
    """Refused before any work, each in one line: an empty class folder, a k-NN query class that
    train/ lacks or an image loose in val/, an image over PIL's pixel limit (named; it would fail
    every rerun), one that cannot be opened (named: not counted among the non-images)."""
    for extra, says in (("train/zebra", "zebra holds no images"),
                        ("val/zebra/1.png", "a k-NN query class that train/ does not have"),
                        ("val/1.png", "1.png: a k-NN query class that train/ does not have")):
        data = tmp_path / extra.replace("/", "_")
        shutil.copytree(tiny_data, data)
        (data / extra.removesuffix("1.png")).mkdir(parents=True, exist_ok=True)
        if extra.endswith(".png"):
            shutil.copy(next((data / "train" / "class0").iterdir()), data / extra)
        assert says in expect_one_error_line(tiny_argv(data, tmp_path / "o"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40 x 40 is then over twice the limit
    err = expect_one_error_line(tiny_argv(tiny_data, tmp_path / "o"))
    assert "over PIL's pixel limit" in err and str(tiny_data) in err
    locked = Path(tiny_data) / "train" / "class2" / "005.png"

    def open_as_without_permission(path, *a, **k):  # chmod 000 as a user; root reads anything
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    real_open = Image.open
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(Image, "open", open_as_without_permission)
    err = expect_one_error_line(tiny_argv(tiny_data, tmp_path / "o"))
    assert f"cannot read {locked} (Permission denied)" in err

def test_unlabelled_images_train_without_a_knn_and_say_why_once(tiny_data, tmp_path):
    """DINO needs no labels: train/ holding images directly or in one folder trains on every
    image at any depth, with one line at start that says why there is no k-NN and what turns it
    on; labelled without val/ says so too. With classes, images below a class folder count, and
    an image exactly the local crop's size is taken where one a pixel smaller is refused."""
    images = sorted(Path(tiny_data, "train").rglob("*.png"))  # 36 images, 9 per class
    for layout in ("flat", "one_folder", "no_val"):
        data = tmp_path / layout
        for i, path in enumerate(images):
            dest = {"flat": f"train/{i:02d}.png", "one_folder": f"train/all/{i % 3}/{i:02d}.png",
                    "no_val": f"train/{path.parent.name}/{path.name}"}[layout]
            (data / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, data / dest)
        if layout != "no_val":
            shutil.copytree(Path(tiny_data) / "val", data / "val")  # unlabelled: not queries
        stdout = run_main(tiny_argv(data, tmp_path / f"o_{layout}", "--eval_every", 1))
        why = {"no_val": f"no {data / 'val'}"}.get(layout, "is not split into 2+ class folders")
        assert stdout.count("no k-NN: ") == 1 and why in stdout.split("no k-NN: ")[1]
        assert "36 training / 0 k-NN query images" in stdout and "done: " in stdout
        assert read_log(tmp_path / f"o_{layout}", "knn") == []
    deep = tmp_path / "deep"  # class folders with images one level further down, and val/
    shutil.copytree(tiny_data, deep)
    shutil.move(deep / "train" / "class1", tmp_path / "class1")
    (deep / "train" / "class1").mkdir()
    shutil.move(tmp_path / "class1", deep / "train" / "class1" / "2024")
    train_items, _, classes = dm.load_splits(dm.parse_args(tiny_argv(deep, "o")))
    assert len(train_items) == 36 and sorted(y for _, y in train_items) == sorted([0, 1, 2, 3] * 9)
    assert sum(p.parent.name == "2024" and classes[y] == "class1" for p, y in train_items) == 9
    for size, taken in ((16, True), (15, False)):  # the smoke preset's local crops: 16 px
        Image.new("RGB", (size, 40)).save(deep / "train" / "class0" / "edge.png")
        args = dm.parse_args(tiny_argv(deep, "o"))
        if taken:
            assert len(dm.load_splits(args)[0]) == 37
        else:
            with pytest.raises(dm.UsageError, match="smaller than the 16-px local crops"):
                dm.load_splits(args)

def test_query_labels_follow_class_names_not_positions(tmp_path):
    """train/ {a, b, c} and val/ {a, c}: each query keeps its class's index in train/ (c = 2,
    not 1), so the k-NN compares like with like."""
    for split, names in (("train", "abc"), ("val", "ac")):
        for i, name in enumerate(names):
            Image.new("RGB", (40, 40), (80 * i, 0, 0)).save(tmp_path / "x.png")
            for k in range(8):
                (tmp_path / "d" / split / name).mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp_path / "x.png", tmp_path / "d" / split / name / f"{k}.png")
    train_items, val_items, classes = dm.load_splits(dm.parse_args(tiny_argv(tmp_path / "d", "o")))
    assert classes == ["a", "b", "c"] and [y for _, y in val_items] == [0] * 8 + [2] * 8
    assert all(classes[y] == path.parent.name for path, y in train_items + val_items)

def test_a_damaged_or_older_checkpoint_is_one_line_or_resumes(tiny_data, tmp_path):
    """A checkpoint cut short, empty or missing a key is one error line that says what to do;
    one written before --optimizer was recorded resumes as AdamW."""
    out, argv = tmp_path / "out", tiny_argv(tiny_data, tmp_path / "out", "--epochs", 2)
    run_main(tiny_argv(tiny_data, out, "--epochs", 1))
    whole = (out / "checkpoint.pth").read_bytes()
    ckpt = load_ckpt(out)
    for damage in (whole[:len(whole) // 2], b"", None):
        if damage is None:
            torch.save({k: v for k, v in ckpt.items() if k != "teacher"}, out / "checkpoint.pth")
        else:
            (out / "checkpoint.pth").write_bytes(damage)
        assert "damaged or incomplete: move it away" in expect_one_error_line(argv)
    del ckpt["args"]["optimizer"]
    torch.save(ckpt, out / "checkpoint.pth")
    assert "resumed from" in run_main(argv) and load_ckpt(out)["it"] == 8

def test_one_run_per_output_dir(tiny_data, tmp_path):
    """A second run on an --output_dir that a run holds is refused in one line naming it."""
    import fcntl
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "lock", "w") as held:  # as a run in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = expect_one_error_line(tiny_argv(tiny_data, tmp_path / "out"))
    assert f"another run is using --output_dir {tmp_path / 'out'}" in err
    assert "done:" in run_main(tiny_argv(tiny_data, tmp_path / "out"))  # released: it trains

def test_a_folder_that_cannot_be_locked_trains_without_the_lock_and_says_so(tiny_data, tmp_path,
                                                                             monkeypatch):
    """Some Lustre and FUSE mounts (a multi-node run's shared folder) have no flock: the run
    trains unlocked and says so in one line."""
    import errno
    import fcntl

    def no_flock(file, how):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = run_main(tiny_argv(tiny_data, tmp_path / "out"))
    notes = [x for x in out.splitlines() if "lock" in x]
    says = f"({os.strerror(errno.ENOSYS)}): training unlocked"
    assert notes == [f"note: cannot lock --output_dir {tmp_path / 'out'} {says}"]
    assert "done:" in out and load_ckpt(tmp_path / "out")["it"] == 4

def test_a_device_that_is_not_there_is_one_error_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "mps"):
        err = expect_one_error_line(tiny_argv(tiny_data, tmp_path, "--device", name))
        assert f"--device {name}, but torch finds no such device" in err

def test_a_stop_during_the_knn_ends_it_early_with_the_checkpoint_of_the_epoch(tiny_data,
                                                                              tmp_path,
                                                                              monkeypatch):
    """SIGTERM while the k-NN after epoch 1 embeds its first batch: the pass is cut short (the
    next pass takes one batch: every process must reach its gather), no k-NN is logged for it,
    status 130, and the checkpoint holds the epoch (written before the k-NN)."""
    calls, eval_batch = [], dm.eval_batch

    def term_in_fifth(batch):  # 4 batches at the start (memory and queries, 2 networks)
        calls.append(len(batch))
        if len(calls) == 5:
            signal.raise_signal(signal.SIGTERM)
        return eval_batch(batch)

    monkeypatch.setattr(dm, "eval_batch", term_in_fifth)
    rc, out, err = main_captured(tiny_argv(tiny_data, tmp_path, "--epochs", 2, "--eval_every", 1))
    assert rc == 130 and err == "" and len(calls) == 6 and load_ckpt(tmp_path)["it"] == 4
    assert [r["epoch"] for r in read_log(tmp_path, "knn")] == [0]
    assert out.strip().splitlines()[-1].startswith("stopped at iteration 4: saved")
    monkeypatch.undo()  # resumed, the run does not evaluate the random initialization again
    run_main(tiny_argv(tiny_data, tmp_path, "--epochs", 2, "--eval_every", 1))
    assert [r["epoch"] for r in read_log(tmp_path, "knn")] == [0, 2]

def test_the_fault_line_for_shared_memory_gives_remedies_not_a_rerun():
    """A loader worker out of /dev/shm: the line names --num_workers 0 and a larger shm, and
    does not promise that the same command resumes (it would fail again)."""
    run = types.SimpleNamespace(ckpt=Path("out/checkpoint.pth"), saved_it=12, saved_at=time.time())
    bus = RuntimeError("DataLoader worker (pid 9) is killed by signal: Bus error. It is possible "
                       "that dataloader's workers are out of shared memory. Please try to raise "
                       "your shared memory limit.")
    line = str(dm.fault(bus, dm.TrainState(*[None] * 5, it=15), run))
    assert "--num_workers 0" in line and "--shm-size" in line and "same command" not in line
    assert "(iteration 15); out/checkpoint.pth holds iteration 12, saved 0 min ago" in line

@pytest.mark.parametrize("error", [
    ConnectionResetError(104, "Connection reset by peer"), EOFError(),
    RuntimeError("DataLoader worker (pid(s) 9) exited unexpectedly"),
    RuntimeError("DataLoader worker (pid 9) is killed by signal: Killed.")])
def test_a_killed_loader_worker_is_named_whichever_exception_the_loader_raises(error):
    """The kernel kills a worker (out of memory): torch says so, or the batch it was sending
    breaks off (a connection reset, 2 of 6 tries). Each line says a loader worker died, what
    was raised, that the same command resumes and what to try if it recurs; another fault
    does not blame a worker."""
    run = types.SimpleNamespace(ckpt=Path("out/checkpoint.pth"), saved_it=12, saved_at=time.time())
    line = str(dm.fault(error, dm.TrainState(*[None] * 5, it=15), run))
    assert line.startswith(f"a loader worker died ({type(error).__name__}") and line.endswith(
        "saved 0 min ago: the same command resumes from it; if it recurs, lower --num_workers")
    nan = str(dm.fault(FloatingPointError("loss is nan"), dm.TrainState(*[None] * 5, it=15), run))
    assert "worker" not in nan and nan.endswith("the same command resumes from it")

@pytest.mark.parametrize("cores,processes,expected", [(16, None, 10), (16, "8", 2), (4, "8", 1),
                                                     (1, None, 1)])
def test_the_default_workers_share_the_nodes_cores_among_its_processes(monkeypatch, cores,
                                                                       processes, expected):
    """At most 10 loader workers per process, the node's cores shared by its processes."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    if processes is None:  # one process
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert dm.default_workers() == expected

RANKS_SCRIPT = """
import itertools, os, pathlib, signal, sys, time, types
import dino_minimal as dm
mode, argv, rank = sys.argv[1], sys.argv[2:], int(os.environ["RANK"])
if mode == "fault" and rank == 1:  # rank 1's loader fails at iteration 5; its clock runs fast
    clock = itertools.count(time.time(), 1200)  # 20 minutes a reading: a save is due at once
    dm.time = types.SimpleNamespace(time=lambda: next(clock), perf_counter=time.perf_counter)
    step = dm.train_step
    def failing(state, views, epoch):
        if state.it == 5:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed.")
        return step(state, views, epoch)
    dm.train_step = failing
if mode == "stop" and rank == 1:  # a stop asked of rank 1 alone, after iteration 7
    log_step = dm.log_step
    def stop_at_7(state, *args, **kwargs):
        log_step(state, *args, **kwargs)
        if state.it == 7:
            signal.raise_signal(signal.SIGTERM)
    dm.log_step = stop_at_7
if mode == "own_disk" and rank == 1:  # --output_dir on each node's own disk
    argv[argv.index("--output_dir") + 1] += "_node2"
rc = dm.main(argv)
if mode == "own_disk":  # torchrun ends the other ranks at the first exit: each waits until
    shared = pathlib.Path(argv[argv.index("--output_dir") + 1]).parent  # both have returned
    (shared / f"rank{rank}.done").touch()
    deadline = time.time() + 60
    while not (shared / f"rank{1 - rank}.done").exists() and time.time() < deadline:
        time.sleep(0.1)
sys.exit(rc)
"""

def test_under_torchrun_a_fault_on_any_rank_names_the_checkpoint_that_rank_0_wrote(tmp_path):
    """2 gloo processes, 3 steps per epoch. Rank 1's clock says a timed save is due at every
    step, rank 0's never: the decision is shared, so both save after each step, and when rank 1
    fails in the step after iteration 5, every error line names the checkpoint that rank 0 wrote
    (iteration 5); the rerun resumes from it. A stop asked of rank 1 alone stops both ranks
    after the same step (rank 0 saves it; torchrun then ends with its own status 1). Ranks
    that find different checkpoints (a folder on each node's own disk) both refuse, the one
    ahead as the one behind: none goes on, and each refusal is a line of its own (the ranks
    write to one stderr at the same moment). Each rank waits for the other to return from
    main() before it exits: torchrun ends the other ranks as soon as one exits."""
    data = dm.make_synthetic_images(tmp_path / "data", classes=2, per_class=16, size=40, seed=2)
    (tmp_path / "ranks.py").write_text(RANKS_SCRIPT)
    argv = tiny_argv(data, tmp_path / "out", "--batch_size_per_gpu", 4, "--epochs", 3)
    failed = torchrun(["fault", *argv], script=tmp_path / "ranks.py")
    errors = [x for x in failed.stderr.splitlines() if x.startswith("error: ")]
    assert failed.returncode != 0 and errors, failed.stderr[-3000:]
    assert load_ckpt(tmp_path / "out")["it"] == 5
    assert all("holds iteration 5, saved" in x for x in errors), errors
    rerun = torchrun(["stop", *argv], script=tmp_path / "ranks.py")
    assert rerun.returncode == 1 and rerun.stdout.count("at iteration 5") == 1, rerun.stderr
    stopped = [x for x in rerun.stdout.splitlines() if x.startswith("stopped")]
    line = f"stopped at iteration 7: saved {tmp_path / 'out'}/checkpoint.pth; the same command"
    assert stopped == [f"{line} resumes"], rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert load_ckpt(tmp_path / "out")["it"] == 7
    refused = torchrun(["own_disk", *argv], script=tmp_path / "ranks.py")
    errors = [x for x in refused.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 2 and all("must be a folder that every node sees" in x for x in errors), \
        refused.stdout[-2000:] + refused.stderr[-4000:]

def test_under_torchrun_sigterm_to_the_group_stops_every_rank_at_one_step_with_one_line(
        tmp_path):
    """SLURM's or systemd's SIGTERM to the process group (torchrun, its ranks, their loader
    workers): every rank finishes the same step, rank 0 saves it, one "stopped" line."""
    data = dm.make_synthetic_images(tmp_path / "data", classes=2, per_class=16, size=40, seed=2)
    out = tmp_path / "out"
    argv = tiny_argv(data, out, "--batch_size_per_gpu", 4, "--epochs", 30, "--num_workers", 1)
    proc = subprocess.Popen([*TORCHRUN, str(SCRIPT), *map(str, argv)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    wait_for_step(proc, out, lambda r: r["it"] >= 4)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    stopped = [x for x in stdout.splitlines() if x.startswith("stopped at iteration")]
    # torchrun's own agent prints a traceback for the signal it got, and ends with status 1;
    # none comes from a rank
    assert len(stopped) == 1 and "dino_minimal.py" not in stderr, stdout[-2000:] + stderr[-3000:]
    assert proc.returncode == 1 and "Traceback" in stderr
    assert stopped[0].startswith(f"stopped at iteration {load_ckpt(out)['it']}: saved")

IMPOSSIBLE_FLAGS = [
    "--global_crop_size 36", "--local_crop_size 12",  # not multiples of --patch_size 8
    "--embed_dim 65", "--epochs 0", "--batch_size_per_gpu 0", "--batch_size_per_gpu -4",
    "--local_crops_number -1", "--num_workers -1", "--log_every 0", "--out_dim 0", "--depth 0",
    "--warmup_epochs -1", "--epochs 1 --warmup_epochs 2", "--warmup_teacher_temp_epochs -1",
    "--teacher_temp 0", "--teacher_temp -0.04",
    "--warmup_teacher_temp 0", "--student_temp 0", "--global_crops_scale 0 1",
    "--local_crops_scale 0.05 1.5", "--global_crops_scale 0.8 0.4", "--momentum_teacher 1.5",
    "--momentum_teacher_end 1.01", "--center_momentum -0.1", "--drop_path_rate 1.5",
    "--drop_path_rate 1", "--drop_path_rate -0.1", "--save_every_minutes -1"]

@pytest.mark.parametrize("flags", IMPOSSIBLE_FLAGS)
def test_impossible_flags_are_one_error_line(tiny_data, tmp_path, flags):
    """An impossible flag is refused before any work, in one line naming it."""
    err = expect_one_error_line(tiny_argv(tiny_data, tmp_path / "out", *flags.split()))
    err = re.sub(r"\((_\w+)\)", r"\1", err)  # "--momentum_teacher(_end)" names both
    assert flags.split()[0] in err and not (tmp_path / "out" / "log.jsonl").exists()

def readme_snippet(heading):
    """The first ```python block of the README section under `heading`, as printed."""
    section = (SCRIPT.parent / "README.md").read_text().split(f"## {heading}\n")[1]
    return section.split("```python\n")[1].split("```")[0]

def test_command_line_smoke_run_end_to_end(tmp_path, monkeypatch):
    """The file's first command: it trains in the resolved precision, logs the loss, collapse
    diagnostics and k-NN (well above chance), and saves loadable weights; the README's snippets
    embed a folder of images with them, one row per image, each its own nearest neighbour,
    draw an image file's attention maps and 60% masks, and evaluate the teacher (k-NN, probe)."""
    out = tmp_path / "dino_output"  # the default --output_dir, which the README's snippet reads
    rc, stdout, stderr = run_cli(["--smoke", "--output_dir", out], timeout=300)
    assert rc == 0 and stderr == "", stderr
    with contextlib.redirect_stdout(io.StringIO()):
        assert f"in {REAL_RESOLVE_PRECISION('auto', CPU)}" in stdout
    assert "done: teacher backbone in" in stdout and "--preset laptop" not in stdout
    # the pinned torch is a CUDA build: on a machine without a GPU, auto says why it takes the CPU
    assert ("note: no usable GPU" in stdout) == (torch.version.cuda is not None)
    steps, knn = read_log(out, "step"), read_log(out, "knn")
    assert steps and [r["epoch"] for r in knn] == [0, 1, 2, 3]
    for r in steps:
        for key in ("loss", "h_teacher", "h_batch_mean", "kl", "feat_std", "eff_rank", "lr"):
            assert math.isfinite(r[key]), key
        assert 0 <= r["h_teacher"] <= math.log(256) + 1e-4 and r["eff_rank"] >= 1 - 1e-4
    assert knn[-1]["knn_top1"] > 2 * 100 / 10  # 10 generated classes: well above chance
    ckpt = load_ckpt(out)
    assert ckpt["it"] == steps[-1]["it"]
    vit = dm.build_vit(dm.parse_args(["--smoke"]))
    vit.load_state_dict(torch.load(out / "teacher_backbone.pth", weights_only=True), strict=True)
    assert_bitwise_equal(vit.state_dict(), {k.removeprefix("backbone."): v for k, v in
                                            ckpt["teacher"].items() if k.startswith("backbone.")})
    dm.make_synthetic_images(tmp_path / "my_images", classes=3, per_class=5, size=40, seed=1)
    monkeypatch.chdir(tmp_path)
    Path("snippet.py").write_text(readme_snippet("Your own images, labelled or not, and what "
                                                 "it learned"))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        snippet = runpy.run_path("snippet.py")  # as `python snippet.py`, returning its names
    features = snippet["features"]
    assert features.shape == (15, 64) and printed.getvalue() == "torch.Size([15, 64])\n"
    assert [path for path, _ in snippet["images"]] == sorted(Path("my_images").rglob("*.png"))
    cos = F.normalize(features, dim=1) @ F.normalize(features, dim=1).T  # (15, 15)
    assert torch.equal(cos.argmax(1), torch.arange(15))
    patches = snippet["patches"]  # 32-px crops of 8-px patches: a 4 x 4 grid
    assert patches.shape == (15, 16, 64) and not patches.requires_grad
    torch.testing.assert_close(snippet["backbone"].norm(snippet["tokens"])[:, 0], features)
    check_attention_snippet(vit)
    check_evaluation_snippet(knn[-1]["knn_top1"])

def check_evaluation_snippet(logged_knn):
    """The README's evaluation snippet, as printed, in the current folder on the smoke run's
    teacher and images: the k-NN that training logged for them, give or take the one query that
    training's fused attention kernel can round the other way (as the README says), and a linear
    probe's accuracy (a whole number of the 60 queries) above chance."""
    Path("my_labelled_images").symlink_to(Path("dino_output", "smoke_data").resolve())
    Path("evaluation.py").write_text(readme_snippet("Evaluate a backbone without training"))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        snippet = runpy.run_path("evaluation.py")
    knn, linear = snippet["knn"], snippet["linear"]
    assert printed.getvalue() == f"weighted k-NN: {knn:.2f}%\nlinear probe: {linear:.2f}%\n"
    assert abs(knn - logged_knn) <= 100 / 60 + 1e-6 and len(snippet["val_y"]) == 60
    assert 100 / 10 < linear <= 100 and abs(linear * 60 / 100 - round(linear * 60 / 100)) < 1e-4

def check_attention_snippet(vit):
    """The README's attention snippet, as printed, in the current folder (the smoke run's
    dino_output, its teacher loaded in `vit`) on a generated 40 x 56 photo: a PNG of the map and
    one of the 60% mask per head, nothing else; each map's patches grow lighter with the head's
    attention on them; each mask shows the image on the patches it keeps and black elsewhere,
    and keeps the fewest patches holding >= 60% of the head's attention, computed here."""
    yy, xx = torch.meshgrid(torch.arange(40), torch.arange(56), indexing="ij")
    photo = torch.stack([xx * 2, yy * 3, 255 - 2 * xx - yy]).float() / 255  # smooth, no black
    Image.fromarray((40 + 175 * photo).byte().permute(1, 2, 0).numpy()).save("my_image.jpg")
    Path("attention.py").write_text(readme_snippet("Attention maps of an image file"))
    snippet = runpy.run_path("attention.py")
    heads, p, size = 2, 8, 64  # the smoke ViT's heads and patch, twice its 32-px crops
    assert sorted(map(str, Path().glob("*-head*.png"))) == [
        f"{kind}-head{h}.png" for kind in ("attn", "mask") for h in range(heads)]
    img = snippet["img"][0]  # (3, size, size) uint8: the photo as the snippet resized it
    assert img.shape == (3, size, size) and img.min() > 0
    att = vit.eval().get_last_selfattention(dm.normalize(img[None].float() / 255))[0, :, 0, 1:]
    share = att / att.sum(1, keepdim=True)  # (heads, N): each head's mass over the patches

    def patches(png, mode):  # (size, size) image -> (N, p * p * C): row-major p x p patches
        x = torch.from_numpy(np.array(Image.open(png).convert(mode))).view(size, size, -1)
        return x.view(size // p, p, size // p, p, -1).transpose(1, 2).flatten(0, 1).flatten(1)

    Image.fromarray(img.permute(1, 2, 0).numpy()).save("resized.png")
    for h in range(heads):
        # inferno's colours grow lighter from the least to the most attended patch
        light = patches(f"attn-head{h}.png", "L").float()  # (N, p * p): one grey per patch
        assert (light == light[:, :1]).all() and light.max() > light.min()
        assert (light[share[h].argsort(), 0].diff() >= 0).all()
        shown, resized = patches(f"mask-head{h}.png", "RGB"), patches("resized.png", "RGB")
        kept = (shown != 0).any(1)  # (N,)
        assert torch.equal(shown[kept], resized[kept]) and (shown[~kept] == 0).all()
        mass, weakest = share[h][kept].sum(), share[h][kept].min()
        assert mass >= 0.6 - 1e-6 and mass - weakest < 0.6 + 1e-6, (mass, weakest)

def torchrun(argv, script=SCRIPT, timeout=300):
    """The command line (or another script that imports dino_minimal) as 2 processes of
    torchrun (gloo on the CPU). Still going after timeout seconds, it hung (ranks waiting on
    each other): torchrun is stopped, which ends its ranks (in their own sessions: killing it
    would leave them hanging), and the test fails."""
    proc = subprocess.Popen([*TORCHRUN, str(script), *map(str, argv)],
                            env={**ENV, "PYTHONPATH": str(SCRIPT.parent)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun sends its ranks SIGTERM, then SIGKILL 30 s later
        pytest.fail(f"still running after {timeout} s: it hangs. {proc.communicate()[1][-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

def test_torchrun_two_cpu_processes_match_one_process_with_twice_the_batch(tmp_path):
    """torchrun (gloo): 2 x B equals 1 x 2B: the same center (a mean over both processes'
    batches) and the same steps, up to the reduction order's rounding. Without --preset (the
    smoke values as flags): its note is printed once, by rank 0."""
    data = dm.make_synthetic_images(tmp_path / "data", classes=2, per_class=16, size=40, seed=2)
    two = torchrun(tiny_argv(data, tmp_path / "two", "--batch_size_per_gpu", 4,
                             "--warmup_epochs", 0, preset=SMOKE_AS_FLAGS))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("--preset laptop") == 1 and two.stdout.count("done:") == 1
    run_main(tiny_argv(data, tmp_path / "one", "--warmup_epochs", 0))  # 3 steps of 8, lr > 0
    run_main(tiny_argv(data, tmp_path / "init", "--warmup_epochs", 0, "--lr", 0))  # initial
    two, one, init = (load_ckpt(tmp_path / n) for n in ("two", "one", "init"))
    assert two["it"] == one["it"] == 3
    torch.testing.assert_close(two["dino_loss"]["center"], one["dino_loss"]["center"], rtol=0,
                               atol=1e-6)
    for net in ("student", "teacher"):
        assert distance(two[net], one[net]) < 1e-2 * distance(one[net], init[net])

# 11. The values the program really uses, and its random draws (issue 29) ----------------------
# Each official default with its line in facebookresearch/dino (main_dino.py unless named): the
# flags of get_args_parser(), then the values that the official code hard-codes and this file
# makes flags.
OFFICIAL_DEFAULTS = {
    "arch": "vit_small",  # main_dino.py:45
    "patch_size": 16,  # main_dino.py:50
    "out_dim": 65536,  # main_dino.py:55
    "norm_last_layer": True,  # main_dino.py:57
    "momentum_teacher": 0.996,  # main_dino.py:61
    "use_bn_in_head": False,  # main_dino.py:64
    "warmup_teacher_temp": 0.04,  # main_dino.py:68
    "teacher_temp": 0.04,  # main_dino.py:71
    "warmup_teacher_temp_epochs": 0,  # main_dino.py:74
    "weight_decay": 0.04,  # main_dino.py:82
    "weight_decay_end": 0.4,  # main_dino.py:84
    "clip_grad": 3.0,  # main_dino.py:87
    "batch_size_per_gpu": 64,  # main_dino.py:90
    "epochs": 100,  # main_dino.py:92
    "freeze_last_layer": 1,  # main_dino.py:93
    "lr": 0.0005,  # main_dino.py:96
    "warmup_epochs": 10,  # main_dino.py:99
    "min_lr": 1e-6,  # main_dino.py:101
    "optimizer": "adamw",  # main_dino.py:103
    "drop_path_rate": 0.1,  # main_dino.py:105
    "global_crops_scale": (0.4, 1.0),  # main_dino.py:108
    "local_crops_number": 8,  # main_dino.py:112
    "local_crops_scale": (0.05, 0.4),  # main_dino.py:115
    "seed": 0,  # main_dino.py:124
    # main_dino.py:125 says 10; here at most the cores per process on the node
    "num_workers": min(10, os.cpu_count() or 1),
    "momentum_teacher_end": 1.0,  # main_dino.py:250, cosine_scheduler(args.momentum_teacher, 1, ..)
    "student_temp": 0.1,  # main_dino.py:365, DINOLoss(..., student_temp=0.1,
    "center_momentum": 0.9,  # main_dino.py:366, center_momentum=0.9)
    "global_crop_size": 224,  # main_dino.py:436, RandomResizedCrop(224, ...)
    "local_crop_size": 96,  # main_dino.py:452, RandomResizedCrop(96, ...)
    "blur_sigma": (0.1, 2.0),  # utils.py:40, GaussianBlur(radius_min=0.1, radius_max=2.)
    "head_hidden_dim": 2048,  # vision_transformer.py, DINOHead(..., hidden_dim=2048,
    "bottleneck_dim": 256,  # bottleneck_dim=256)
    # vision_transformer.py, vit_small(): embed_dim=384, depth=12, num_heads=6, from --arch
    "embed_dim": None, "depth": None, "num_heads": None,
}

def test_every_official_flag_defaults_to_main_dino_py():
    args = vars(dm.parse_args([]))
    assert {k: args[k] for k in OFFICIAL_DEFAULTS} == OFFICIAL_DEFAULTS
    assert dm.ARCHS["vit_small"] == (384, 12, 6)
    # the objects built from the defaults: Part I's own defaults are the official ones too
    official_crops = dm.MultiCrop(224, 96, (0.4, 1.0), (0.05, 0.4), 8, (0.1, 2.0))
    assert dm.multicrop_of(dm.parse_args([])) == dm.MultiCrop() == official_crops
    loss = dm.DINOLoss(16)
    assert (loss.student_temp, loss.center_momentum) == (0.1, 0.9)

@pytest.mark.parametrize("preset", list(dm.PRESETS))
def test_a_preset_changes_its_own_values_only_and_explicit_flags_win(preset):
    default = vars(dm.parse_args([]))
    got = vars(dm.parse_args(["--preset", preset]))
    assert {k: got[k] for k in dm.PRESETS[preset]} == dm.PRESETS[preset]
    assert {k: v for k, v in got.items() if k not in dm.PRESETS[preset]} == {
        **{k: v for k, v in default.items() if k not in dm.PRESETS[preset]}, "preset": preset}
    explicit = dm.parse_args(["--preset", preset, "--lr", "0.0123", "--local_crops_number", "5"])
    assert (explicit.lr, explicit.local_crops_number) == (0.0123, 5)
    # a value equal to the default still wins: the preset is a default, not an override
    assert dm.parse_args(["--preset", preset, "--epochs", "100"]).epochs == default["epochs"]
    if preset == "smoke":  # --smoke is --preset smoke
        assert {**vars(dm.parse_args(["--smoke"])), "smoke": False, "preset": preset} == got

# A small ViT (2 blocks on 16-px crops of patch 4) built from the flags: each row parses one
# non-default value (over these) and reads it back from what build() made, from its schedules
# (3 iterations per epoch) or from a step.
FLAG_BASE = ["--arch", "vit_tiny", "--depth", "2", "--patch_size", "4", "--global_crop_size", "16",
             "--local_crop_size", "8", "--out_dim", "16", "--head_hidden_dim", "32",
             "--bottleneck_dim", "8", "--epochs", "4", "--warmup_epochs", "1",
             "--batch_size_per_gpu", "16", "--precision", "fp32"]

def student(state):
    return dm.bare(state.student)

def step_at_epoch_1(state):
    dm.train_step(state, random_views(), 1)
    return student(state)

FLAG_REACHES = [  # flags, what they reach (state, multicrop, networks given to torch.compile)
    ("--arch vit_base", lambda s, mc, c: (student(s).backbone.embed_dim,
                                          student(s).backbone.blocks[0].attn.heads), (768, 12)),
    ("--arch resnet18", lambda s, mc, c: (
        isinstance(student(s).backbone, torchvision.models.ResNet),
        student(s).head.mlp[0].in_features), (True, 512)),
    ("--optimizer sgd", lambda s, mc, c: (type(s.optimizer), s.optimizer.defaults["momentum"]),
     (torch.optim.SGD, 0.9)),  # main_dino.py:229
    ("--patch_size 8", lambda s, mc, c: student(s).backbone.patch_embed.proj.stride, (8, 8)),
    ("--embed_dim 24", lambda s, mc, c: (student(s).backbone.norm.normalized_shape,
                                         student(s).head.mlp[0].in_features), ((24,), 24)),
    ("--depth 3", lambda s, mc, c: len(student(s).backbone.blocks), 3),
    ("--num_heads 4", lambda s, mc, c: student(s).backbone.blocks[1].attn.heads, 4),
    ("--out_dim 48", lambda s, mc, c: (student(s).head(torch.randn(2, 192)).shape,
                                       s.dino_loss.center.shape), ((2, 48), (1, 48))),
    ("--head_hidden_dim 40", lambda s, mc, c: student(s).head.mlp[0].out_features, 40),
    ("--bottleneck_dim 24", lambda s, mc, c: (student(s).head.mlp[-1].out_features,
                                              student(s).head.last_layer.in_features), (24, 24)),
    ("--norm_last_layer no",
     lambda s, mc, c: student(s).head.last_layer.parametrizations.weight.original0.requires_grad,
     True),
    ("--use_bn_in_head yes", lambda s, mc, c: sum(isinstance(m, nn.BatchNorm1d)
                                                  for m in student(s).head.modules()), 2),
    ("--drop_path_rate 0.3",  # linear over the 2 blocks
     lambda s, mc, c: [b.drop_path_rate for b in student(s).backbone.blocks],
     pytest.approx([0.0, 0.3])),
    ("--momentum_teacher 0.9", lambda s, mc, c: s.schedules.momentum[0], 0.9),
    ("--momentum_teacher_end 0.99", lambda s, mc, c: s.schedules.momentum[-1], 0.99),
    ("--warmup_teacher_temp 0.02 --warmup_teacher_temp_epochs 2",
     lambda s, mc, c: s.schedules.teacher_temp, pytest.approx([0.02, 0.04, 0.04, 0.04])),
    ("--warmup_teacher_temp 0.01 --warmup_teacher_temp_epochs 3",
     lambda s, mc, c: s.schedules.teacher_temp, pytest.approx([0.01, 0.025, 0.04, 0.04])),
    ("--teacher_temp 0.06", lambda s, mc, c: s.schedules.teacher_temp, [0.06] * 4),
    ("--student_temp 0.2", lambda s, mc, c: s.dino_loss.student_temp, 0.2),
    ("--center_momentum 0.8", lambda s, mc, c: s.dino_loss.center_momentum, 0.8),
    ("--lr 0.004", lambda s, mc, c: max(s.schedules.lr), pytest.approx(0.004 * 16 / 256)),
    ("--batch_size_per_gpu 32", lambda s, mc, c: max(s.schedules.lr),
     pytest.approx(0.0005 * 32 / 256)),
    ("--min_lr 0.0001", lambda s, mc, c: s.schedules.lr[-1], pytest.approx(1e-4)),
    ("--warmup_epochs 2", lambda s, mc, c: s.schedules.lr.index(max(s.schedules.lr)), 2 * 3 - 1),
    ("--epochs 6", lambda s, mc, c: (len(s.schedules.lr), len(s.schedules.teacher_temp)),
     (6 * 3, 6)),
    ("--weight_decay 0.1", lambda s, mc, c: s.schedules.wd[0], pytest.approx(0.1)),
    ("--weight_decay_end 0.2", lambda s, mc, c: s.schedules.wd[-1], pytest.approx(0.2)),
    ("--clip_grad 0.001",  # every gradient is larger: each is clipped to norm 0.001 (+- 1e-6)
     lambda s, mc, c: max(p.grad.norm().item() for p in step_at_epoch_1(s).parameters()
                          if p.grad is not None), pytest.approx(0.001, rel=1e-3)),
    ("--freeze_last_layer 2",  # still frozen in epoch 1 (the default 1 frees it)
     lambda s, mc, c: {p.grad is None for n, p in step_at_epoch_1(s).named_parameters()
                       if "last_layer" in n}, {True}),
    ("--precision bf16", lambda s, mc, c: (s.amp_dtype, s.scaler.is_enabled()),
     (torch.bfloat16, False)),
    ("--precision fp16", lambda s, mc, c: (s.amp_dtype, s.scaler.is_enabled()),
     (torch.float16, True)),
    ("--compile",  # both networks, nothing else
     lambda s, mc, c: [m is n for m, n in zip(c, (s.student, s.teacher))] + c[2:], [True, True]),
    ("--global_crop_size 32",  # the crops and the ViT's position embedding (8 x 8 patches)
     lambda s, mc, c: (mc.global_size, student(s).backbone.pos_embed.shape[1]), (32, 1 + 64)),
    ("--local_crop_size 12", lambda s, mc, c: mc.local_size, 12),
    ("--global_crops_scale 0.3 0.9", lambda s, mc, c: mc.global_scale, (0.3, 0.9)),
    ("--local_crops_scale 0.1 0.3", lambda s, mc, c: mc.local_scale, (0.1, 0.3)),
    ("--local_crops_number 3", lambda s, mc, c: mc.local_number, 3),
    ("--blur_sigma 0.2 0.7", lambda s, mc, c: mc.blur_sigma, (0.2, 0.7)),
]

@pytest.mark.parametrize("flags,reached,expected", FLAG_REACHES, ids=[r[0] for r in FLAG_REACHES])
def test_each_flag_reaches_the_object_or_step_that_uses_it(flags, reached, expected, monkeypatch):
    compiled = []  # torch.compile takes minutes: recorded, not run
    monkeypatch.setattr(torch, "compile", lambda model, **_: compiled.append(model) or model)
    args = dm.parse_args([*FLAG_BASE, *flags.split()])
    torch.manual_seed(0)
    state = dm.build(args, CPU, iters_per_epoch=3)
    assert reached(state, dm.multicrop_of(args), compiled) == expected

def test_resume_compares_every_flag_that_shapes_a_weight(monkeypatch):
    """Each flag of FLAG_REACHES whose value changes the name or shape of a weight of the
    student or the loss, or the optimizer, is one that resume compares: another value would
    end in load_state_dict's traceback (--global_crop_size: the position embeddings)."""
    monkeypatch.setattr(torch, "compile", lambda model, **_: model)

    def shapes(*flags):
        state = dm.build(dm.parse_args([*FLAG_BASE, *flags]), CPU, iters_per_epoch=3)
        weights = {**dm.bare(state.student).state_dict(), **state.dino_loss.state_dict()}
        return type(state.optimizer), {k: v.shape for k, v in weights.items()}

    base = shapes()
    shaping = {flags.split()[0][2:] for flags, _, _ in FLAG_REACHES
               if shapes(*flags.split()) != base}
    assert "global_crop_size" in shaping and shaping <= set(dm.RESUME_FLAGS)

@pytest.fixture(scope="module")
def spied_run(tiny_data, tmp_path_factory):
    """One in-process run of 3 epochs of 3 steps (12 of the 36 images each), with every flag
    of the loop off its default, and what it passed to the functions it calls."""
    out, seen = tmp_path_factory.mktemp("spied") / "run", {}

    def spy(owner, name, record, call=True):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.setdefault(name, []).append(record(real, *args, **kwargs))
            return real(*args, **kwargs) if call else None
        mp.setattr(owner, name, wrapper)

    def knn_args(real, *args, **kwargs):  # the k and T it computes with, defaults included
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        return [bound.arguments["k"], bound.arguments["T"]]

    def features(real, backbone, *args, **kwargs):  # the same features twice, those of eval()
        feats = [real(net, *args, **kwargs)[0] for net in (backbone, backbone,
                                                            copy.deepcopy(backbone).eval())]
        return args[1], all(torch.equal(feats[0], f) for f in feats[1:])  # and the image size

    class Loader(torch.utils.data.DataLoader):  # the workers asked for, loading in-process
        def __init__(self, *args, num_workers=0, **kwargs):
            seen.setdefault("num_workers", []).append(num_workers)
            seen.setdefault("worker_init_fn", []).append(kwargs.get("worker_init_fn"))
            super().__init__(*args, **{**kwargs, "persistent_workers": False})

    with pytest.MonkeyPatch.context() as mp:
        spy(dm, "build", lambda real, args, device, *_, **__: (torch.initial_seed(), device))
        spy(dm, "random_resized_crop", lambda real, img, size, scale, *_: (size, scale))
        spy(dm, "finish_views", lambda real, views, blur_sigma, rng: (len(views[0]), blur_sigma))
        spy(dm, "train_step", lambda real, state, views, epoch: (
            epoch, [tuple(v.shape) for v in views]))
        spy(torch, "save", lambda real, obj, *_, **__: isinstance(obj, dict) and obj.get("it"))
        spy(dm, "extract_features", features)
        spy(dm, "knn_classify", knn_args)
        mp.setattr(torch.utils.data, "DataLoader", Loader)
        run_main(tiny_argv(
            tiny_data, out, "--epochs", 3, "--batch_size_per_gpu", 12, "--eval_every", 2,
            "--log_every", 2, "--num_workers", 3, "--seed", 5, "--device", "cpu",
            "--augment_on_device", "yes", "--save_every_minutes", 1e-6, "--drop_path_rate", 0.2,
            "--global_crop_size", 24, "--local_crop_size", 8, "--local_crops_number", 3,
            "--global_crops_scale", 0.5, 0.9, "--local_crops_scale", 0.1, 0.3,
            "--blur_sigma", 0.2, 0.7))
    return seen, out

def test_the_loop_flags_reach_the_loader_crops_steps_log_and_checkpoints(spied_run):
    seen, out = spied_run
    assert seen["build"] == [(5, CPU)]  # --seed: the initial weights; --device
    assert set(seen["num_workers"]) == {3}  # --num_workers: training and k-NN loaders
    # every loader's workers, the k-NN's too, leave Ctrl-C and SIGTERM to the main process
    assert set(seen["worker_init_fn"]) == {dm.ignore_signals}
    crops = seen["random_resized_crop"]  # 2 global + 3 local crops per image, 9 x 12 images
    assert crops == ([(24, (0.5, 0.9))] * 2 + [(8, (0.1, 0.3))] * 3) * 108
    assert set(seen["finish_views"]) == {(12, (0.2, 0.7))}  # --augment_on_device: batches of 12
    assert seen["train_step"] == [(e, [(12, 3, 24, 24)] * 2 + [(12, 3, 8, 8)] * 3)
                                  for e in (0, 0, 0, 1, 1, 1, 2, 2, 2)]  # --epochs
    assert [r["it"] for r in read_log(out, "step")] == [2, 3, 4, 6, 8, 9]  # --log_every 2
    assert [r["epoch"] for r in read_log(out, "knn")] == [0, 2, 3]  # --eval_every 2
    # --save_every_minutes 1e-6: a checkpoint after every step, besides those of the epochs
    assert {it for it in seen["save"] if it} == set(range(1, 10))

def test_the_knn_of_training_takes_k_20_t_007_and_eval_features_of_teacher_and_student(
        spied_run):
    seen, out = spied_run
    knn = read_log(out, "knn")
    assert len(knn) == 3 and all({"knn_top1", "knn_top1_student"} <= set(r) for r in knn)
    assert seen["knn_classify"] == [[20, 0.07]] * 2 * 3  # App. F.1, teacher and student
    # drop-path 0.2 in both backbones: a network left in train mode gives other features
    # at the global crop size (24)
    assert seen["extract_features"] == [(24, True)] * 2 * 2 * 3  # train and val, 2 nets, 3 times

def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: max |F_a(x) - F_b(x)| over the pooled x."""
    a, b = (torch.as_tensor(v, dtype=torch.float64).sort().values for v in (a, b))
    x = torch.cat([a, b])
    return (torch.searchsorted(a, x, right=True) / len(a)
            - torch.searchsorted(b, x, right=True) / len(b)).abs().max().item()

def ks_critical(n, m, alpha=1e-3):
    # two samples of one law exceed c(alpha) sqrt((n + m) / (n m)) with probability alpha,
    # c(alpha) = sqrt(-ln(alpha / 2) / 2) = 1.95 at 1e-3 (and the seeds are fixed)
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))

@pytest.mark.parametrize("H,W", [(400, 400), (300, 500)])
def test_crop_boxes_of_the_default_views_are_distributed_as_torchvisions(H, W, monkeypatch):
    boxes = []  # (size, h, w) of each crop, recorded where it is resized
    monkeypatch.setattr(dm.F, "interpolate", lambda crop, size, **_: boxes.append(
        (size[0], *crop.shape[-2:])) or crop.new_zeros(1, 3, *size))
    multicrop, img, g = dm.multicrop_of(dm.parse_args([])), torch.zeros(3, H, W), rng(0)
    for _ in range(2000):  # 4,000 global and 16,000 local boxes
        multicrop(img, g, photometric=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        # main_dino.py:436 and :452 with the scales of :108 and :115; torchvision's ratio
        for size, scale in ((224, (0.4, 1.0)), (96, (0.05, 0.4))):
            mine = torch.tensor([(h, w) for s, h, w in boxes if s == size], dtype=torch.float64)
            theirs = torch.tensor([RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))[2:]
                                   for _ in mine], dtype=torch.float64)
            for what, f in (("area fraction", lambda b: b[:, 0] * b[:, 1] / (H * W)),
                            ("log aspect ratio", lambda b: (b[:, 1] / b[:, 0]).log())):
                assert ks_distance(f(mine), f(theirs)) < ks_critical(len(mine), len(theirs)), (
                    size, what)

def hsv_hue(x):
    """HSV hue in turns [0, 1) of (..., 3) RGB, as torchvision's adjust_hue sees it."""
    r, g, b = x.unbind(-1)
    top, d = x.amax(-1), x.amax(-1) - x.amin(-1)
    h = torch.where(top == r, (g - b) / d, torch.where(top == g, 2 + (b - r) / d, 4 + (r - g) / d))
    return (h / 6) % 1

def test_jitter_factors_are_distributed_as_torchvisions_colorjitter():
    n = 4000

    def jitter(*pixels):  # n crops of these pixels, jittered with the same n factor draws
        x = torch.tensor(pixels).T.reshape(1, 3, 1, -1).expand(n, -1, -1, -1).contiguous()
        return dm.color_jitter(x, torch.ones(n, dtype=torch.bool), rng(0)).flatten(2).mT

    # brightness: a uniform gray, which contrast, saturation and hue leave as it is
    b = jitter([0.5] * 3)[:, 0].mean(1) / 0.5
    # contrast: 2 grays p < q; c (q' - p') / (q' + p') = (q - p) / (q + p), whatever b
    p, q = jitter([0.4] * 3, [0.6] * 3)[..., 0].unbind(1)
    c = (q - p) / (q + p) * (0.6 + 0.4) / (0.6 - 0.4)
    # saturation: a pale colour (never clipped); b scales its luma, b c s its chroma, and the
    # hue rotation turns its chroma (I, Q) in YIQ without changing either
    colour = torch.tensor([0.5, 0.45, 0.4])
    out = jitter(colour.tolist())[:, 0]
    assert 0 < out.min() and out.max() < 1
    yiq_in, yiq_out = dm.RGB_TO_YIQ @ colour, out @ dm.RGB_TO_YIQ.T
    torch.testing.assert_close(yiq_out[:, 0], b * yiq_in[0])
    s = yiq_out[:, 1:].norm(dim=1) / yiq_in[1:].norm() / (b * c)
    # hue: the turn of 6 saturated hues (primaries and secondaries, value 0.6)
    hues = torch.tensor([[.6, 0, 0], [.6, .6, 0], [0, .6, 0], [0, .6, .6], [0, 0, .6], [.6, 0, .6]])
    turn = (hsv_hue(jitter(*hues.tolist())) - hsv_hue(hues) + 0.5) % 1 - 0.5
    with torch.random.fork_rng():
        torch.manual_seed(0)  # ColorJitter(0.4, 0.4, 0.2, 0.1) of main_dino.py:424
        draws = [torchvision.transforms.ColorJitter.get_params((0.6, 1.4), (0.6, 1.4),
                                                               (0.8, 1.2), (-0.1, 0.1))[1:]
                 for _ in range(n)]
    tb, tc, ts, th = torch.tensor(draws).T
    for name, mine, theirs in (("brightness", b, tb), ("contrast", c, tc), ("saturation", s, ts)):
        assert ks_distance(mine, theirs) < ks_critical(n, n), name
    theirs = torch.stack([TF.adjust_hue(hues.T[:, None], h.item())[:, 0].T for h in th[:1000]])
    their_turn = (hsv_hue(theirs) - hsv_hue(hues) + 0.5) % 1 - 0.5
    torch.testing.assert_close(their_turn, th[:1000, None].expand(-1, 6), rtol=0, atol=1e-6)
    # The YIQ rotation turns hues by 0.7 to 1.4 times the HSV turn of torchvision's adjust_hue
    # (0.07 to 0.14 for h = 0.1, issue 29), the other way round: with symmetric draws the mean
    # magnitudes compare, their ratio in [0.7, 1.4]. A tenfold error gives 0.1 (or 10); the
    # sampling error of the 4,000-draw mean |turn| (sd 0.029 / sqrt(4000) = 5e-4 of 0.05) is 1%.
    ratio = turn.abs().mean() / th.abs().mean()
    assert 0.7 < ratio < 1.4, ratio

def fp_step(tiny_data, precision, scaler=None):
    """One SGD step of the smoke model from the same weights on the same 8 images: the
    weights before and after, and the state (its gradients are the clipped ones)."""
    args = dm.parse_args(["--preset", "smoke", "--warmup_epochs", "0", "--freeze_last_layer", "0",
                          "--optimizer", "sgd", "--clip_grad", "0.3", "--precision", precision])
    torch.manual_seed(0)
    state, items = dm.build(args, CPU, 4), dm.list_images(Path(tiny_data) / "train")[0]
    state.scaler = scaler or state.scaler
    data = dm.MultiCropDataset(items, dm.MultiCrop(32, 16, local_number=2), 0)
    views = torch.utils.data.default_collate([data[(0, i)] for i in range(8)])[0]
    before = copy.deepcopy(dm.bare(state.student).state_dict())
    dm.train_step(state, views, 0)
    return before, dm.bare(state.student).state_dict(), state

def test_an_fp16_step_with_a_grad_scaler_clips_the_unscaled_gradients_as_fp32(tiny_data):
    init, fp32, state = fp_step(tiny_data, "fp32")
    norms = [p.grad.norm().item() for p in student(state).parameters() if p.grad is not None]
    assert min(norms) < 0.3 < max(norms) * (1 + 1e-5)  # some gradients clipped, some not
    # The loss scale 2^16 and its inverse are exact in binary floating point: with the fp32
    # forward, the scaled step is the fp32 step bit for bit.
    _, scaled, state = fp_step(tiny_data, "fp32", torch.amp.GradScaler("cpu"))
    assert_bitwise_equal(scaled, fp32)
    # fp16 autocast: from 2^12 up the gradients overflow on this batch, where GradScaler skips
    # the step and halves the scale (as official); at 2^8 the step is taken (the scale stays).
    # fp16 rounds to 2^-11 relative; through the ~20 roundings in sequence of 2 blocks and a
    # 3-layer head, forward and backward, the gradients are within 20 x 2^-11 = 1% (measured:
    # 0.2%), and SGD's first step is lr x the clipped gradient. Clipping before unscale_ would
    # shrink the clipped gradients 2^8 times: an error of 100%.
    _, fp16, state = fp_step(tiny_data, "fp16", torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert state.amp_dtype == torch.float16 and state.scaler.get_scale() == 2.0**8
    assert distance(fp16, fp32) < 20 * 2**-11 * distance(fp32, init)
