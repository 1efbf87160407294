r"""Tests of dino_minimal.py: each one proves a claim of the paper (Caron et al. 2021) or of the file.

    python -m pytest -q test_dino_minimal.py        # about 1 minute on an idle 2-core CPU

Sections follow dino_minimal.py. Unit tests build tensors directly; property tests (hypothesis) draw
shapes, temperatures and logits from tiny to huge; whole-program tests run main() or the command
line on images generated into pytest's tmp_path: nothing here needs the network or a data set.
"""
import contextlib
import copy
import io
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

import dino_minimal as dm

# Deterministic property tests: the same examples on every run and every machine (CI).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

# Tiny models on a shared 2-core machine: more than one thread only adds contention (up to 100x slower
# when other jobs use the cores). Subprocesses get the same through OMP_NUM_THREADS.
torch.set_num_threads(1)
SCRIPT = Path(__file__).resolve().parent / "dino_minimal.py"
# Algorithm 1's exact checks hold in fp32: in this process --precision auto means fp32 even on a CPU with
# bf16 units; the speed layer's bf16 path has tests of its own (section 10 below).
dm.native_bf16 = lambda device: False
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
EPS32 = torch.finfo(torch.float32).eps
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Helpers shared by the sections
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 classes x 12 generated 40-px images: 36 to train on (9 per class), 12 k-NN queries."""
    return dm.make_synthetic_images(tmp_path_factory.mktemp("tiny"), classes=4, per_class=12, size=40, seed=0)


def tiny_argv(data, out, *extra):
    """The smoke model on tiny_data: 4 iterations of 8 images per epoch, no k-NN, one log line per step."""
    return ["--smoke", "--data", str(data), "--output_dir", str(out), "--batch_size_per_gpu", "8", "--epochs", "1",
            "--eval_every", "0", "--log_every", "1", "--num_workers", "0", "--threads", "1", *extra]


def run_main(argv):
    """main(argv) in this process, output silenced; the caller's signal handlers are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return dm.main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def main_captured(argv, capsys):
    """main(argv) in this process under capsys: (exit code, stdout, stderr); signal handlers put back."""
    capsys.readouterr()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = dm.main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001  the program would die with a traceback
        pytest.fail(f"main raised {type(e).__name__}: {e}")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    out, err = capsys.readouterr()
    return rc, out, err


def expect_one_error_line(argv, capsys):
    """main(argv) must fail with exit code != 0, one stderr line "error: ...", and no traceback."""
    rc, out, err = main_captured(argv, capsys)
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in out + err
    return err.strip()


def run_cli(argv, timeout, env=ENV, from_python=False):
    """The command line in a subprocess (its own process group): (exit code, stdout, stderr). A run still
    going after timeout seconds is killed with its loader workers and fails the test: it hung.
    from_python: main(argv) called by a Python program that then ends, as a notebook's kernel does."""
    program = (f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import dino_minimal; "
               "sys.exit(dino_minimal.main(sys.argv[1:]))")
    caller = ["-c", program] if from_python else [str(SCRIPT)]
    proc = subprocess.Popen([sys.executable, *caller, *map(str, argv)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s: it hangs. stderr: {err[-2000:]}")
    return proc.returncode, out, err


@contextlib.contextmanager
def attention_kernel(fused):
    """Attention through F.scaled_dot_product_attention (True) or the explicit formula (False)."""
    before, dm.Attention.fused = dm.Attention.fused, fused
    try:
        yield
    finally:
        dm.Attention.fused = before


def read_log(out):
    """The complete JSON lines of out/log.jsonl (a line still being written is left out)."""
    path = Path(out) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def steps_of(out):
    return [r for r in read_log(out) if r["type"] == "step"]


def load_ckpt(out):
    return torch.load(Path(out) / "checkpoint.pth", map_location="cpu", weights_only=True)


def assert_state_equal(a, b, what):
    """Bitwise equality of two nested state dicts (tensors, numbers, lists, dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_state_equal(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@st.composite
def loss_inputs(draw):
    """Logits of V = 2 + L views of B images over K prototypes, a center, and two temperatures. Logit
    scales run from 1e-6 (a uniform softmax) to 1e3 (a one-hot one); K = 2 and L = 0 or 1 are reached."""
    K = draw(st.sampled_from([2, 3, 5, 64]) | st.integers(2, 300))
    B = draw(st.integers(1, 5))
    L = draw(st.integers(0, 4))
    scale = draw(st.sampled_from([1e-6, 0.05, 1.0, 10.0, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(K=K, B=B, V=2 + L, student=randn((2 + L) * B, K, seed=seed, scale=scale),
                teacher=randn(2 * B, K, seed=seed + 1, scale=scale),
                center=randn(1, K, seed=seed + 2, scale=draw(st.sampled_from([0.0, 0.1, scale]))),
                tps=draw(st.sampled_from([0.05, 0.1, 0.2])), tpt=draw(st.sampled_from([0.01, 0.04, 0.07, 0.1, 1.0])))


def dino_loss_of(x):
    """(loss, teacher probabilities) of dino_minimal's DINOLoss on the drawn inputs."""
    loss_fn = dm.DINOLoss(x["K"], student_temp=x["tps"])
    loss_fn.center.copy_(x["center"])
    return loss_fn(x["student"], x["teacher"], x["tpt"])


def softmax_inputs(x):
    """The largest |z| entering the student's and the teacher's softmax: logits / tau (after centering)."""
    return (x["student"] / x["tps"]).abs().max().item(), ((x["teacher"] - x["center"]) / x["tpt"]).abs().max().item()


def float32_tol(x):
    """Rounding budget of the float32 loss: softmax inputs z = logits / tau of size |z| carry an absolute
    error of about eps * |z|, summed over K prototypes (measured: at most 13 eps (1 + |z|) (1 + log K))."""
    zs, zt = softmax_inputs(x)
    return 64 * EPS32 * (1 + zs + zt) * (1 + math.log(x["K"]))


def algorithm1_loss(student_out, teacher_out, center, tps, tpt):
    """The oracle: the paper's Algorithm 1 with the official loop over views, literally, in float64."""
    B = teacher_out.shape[0] // 2
    s_views, t_views = student_out.double().split(B), teacher_out.double().split(B)
    total, terms = 0.0, 0
    for iq, t in enumerate(t_views):  # the teacher sees the 2 global views
        pt = F.softmax((t - center.double()) / tpt, dim=1)  # centering, sharpening
        for v, s in enumerate(s_views):  # the student sees every view
            if v == iq:
                continue  # a view is never compared with itself
            total = total + (-(pt * F.log_softmax(s / tps, dim=1)).sum(dim=1).mean())
            terms += 1
    return total / terms, terms


# ----------------------------------------------------------------------------------------------
# 1. Multi-crop augmentation (Sec. 3.1, App. E)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("local_crops", [0, 1, 3])
def test_multicrop_gives_two_global_and_L_local_views_in_imagenet_normalized_range(local_crops):
    """Multi-crop: 2 global + L local views of the right sizes, values ImageNet-normalized [0, 1] pixels."""
    args = dm.parse_args(["--smoke", "--local_crops_number", str(local_crops)])
    img = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = dm.multicrop(img, args, torch.Generator().manual_seed(1))
    assert len(views) == 2 + local_crops
    sizes = [args.global_crop_size] * 2 + [args.local_crop_size] * local_crops
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in sizes]
    mean, std = torch.tensor(dm.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(dm.IMAGENET_STD).view(3, 1, 1)
    for v in views:
        assert v.dtype == torch.float32
        pixels = v * std + mean  # undo the normalization: back in [0, 1]
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_multicrop_of_a_black_image_is_exactly_minus_mean_over_std():
    """Normalization: (x - ImageNet mean) / std of [0, 1] pixels (black survives every augmentation)."""
    args = dm.parse_args(["--smoke", "--local_crops_number", "2"])
    views = dm.multicrop(torch.zeros(3, 40, 40, dtype=torch.uint8), args, torch.Generator().manual_seed(0))
    expected = -torch.tensor(dm.IMAGENET_MEAN) / torch.tensor(dm.IMAGENET_STD)
    for v in views:
        torch.testing.assert_close(v, expected.view(3, 1, 1).expand_as(v), rtol=0, atol=1e-6)


def test_crops_are_a_pure_function_of_seed_epoch_and_image(tiny_data):
    """Exact resume: the crops of (seed, epoch, index) are identical whenever and wherever drawn."""
    items, _ = dm.list_images(Path(tiny_data) / "train")
    args = dm.parse_args(["--smoke", "--seed", "3"])
    first = dm.MultiCropDataset(items, args)[(1, 5)]
    dm.MultiCropDataset(items, args)[(0, 2)]  # other draws in between change nothing
    again = dm.MultiCropDataset(items, args)[(1, 5)]
    other_epoch = dm.MultiCropDataset(items, args)[(2, 5)]
    other_seed = dm.MultiCropDataset(items, dm.parse_args(["--smoke", "--seed", "4"]))[(1, 5)]
    assert first[1] == again[1]
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert not torch.equal(first[0][0], other_epoch[0][0])
    assert not torch.equal(first[0][0], other_seed[0][0])


def test_augment_on_device_is_a_function_of_seed_and_iteration(tiny_data):
    """--augment_on_device: workers crop only (uint8); the batch's colour/blur draws follow (seed, iteration)."""
    args = dm.parse_args(["--smoke", "--augment_on_device"])
    items, _ = dm.list_images(Path(tiny_data) / "train")
    samples = [dm.MultiCropDataset(items, args)[(0, i)][0] for i in range(4)]
    assert all(v.dtype == torch.uint8 for s in samples for v in s)
    batch = [torch.stack([s[v] for s in samples]) for v in range(4)]
    a, b, c = (dm.prepare_views(batch, args, CPU, it) for it in (3, 3, 4))
    assert [tuple(v.shape) for v in a] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    mean, std = torch.tensor(dm.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(dm.IMAGENET_STD).view(3, 1, 1)
    assert all(v.dtype == torch.float32 and (v * std + mean).min() >= -1e-6 and (v * std + mean).max() <= 1 + 1e-6
               for v in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])


@given(n=st.integers(1, 70), batch=st.integers(1, 8), world=st.integers(1, 4), epoch=st.integers(0, 3),
       seed=st.integers(0, 1000))
def test_sampler_gives_each_rank_its_slice_of_the_one_process_batch(n, batch, world, epoch, seed):
    """Distributed: W processes with batch B see exactly the batches of one process with B * W."""
    one = dm.EpochSampler(n, batch * world, 0, 1, seed)
    ranks = [dm.EpochSampler(n, batch, r, world, seed) for r in range(world)]
    for s in [one, *ranks]:
        s.epoch = epoch
    one_keys = list(one)
    rank_keys = [list(s) for s in ranks]
    steps = n // (batch * world)
    assert len(one_keys) == steps * batch * world == len(one)
    for keys, s in zip(rank_keys, ranks):
        assert len(keys) == len(s) == steps * batch
    for step in range(steps):
        merged = [key for keys in rank_keys for key in keys[step * batch:(step + 1) * batch]]
        assert merged == one_keys[step * batch * world:(step + 1) * batch * world]
    indices = [i for e, i in one_keys]
    assert all(e == epoch for e, _ in one_keys)
    assert len(set(indices)) == len(indices) and all(0 <= i < n for i in indices)  # no image twice per epoch


@given(n=st.integers(10, 70), batch=st.integers(1, 4), start=st.integers(0, 5), seed=st.integers(0, 1000))
def test_sampler_resumes_mid_epoch_and_reshuffles_each_epoch(n, batch, start, seed):
    """Exact resume: starting at step s yields the rest of the same epoch; the next epoch is reshuffled."""
    full, resumed = dm.EpochSampler(n, batch, seed=seed), dm.EpochSampler(n, batch, seed=seed)
    start = min(start, full.steps)
    resumed.start_step = start
    assert list(resumed) == list(full)[start * batch:]
    full.epoch = 1
    assert [i for _, i in full] != [i for _, i in dm.EpochSampler(n, batch, seed=seed)]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_grayscale_rgba_and_palette_pngs_load_as_rgb(tmp_path, mode):
    """load_rgb: every image becomes (3, H, W) uint8 RGB: gray replicated, alpha dropped, palette looked up."""
    g = torch.Generator().manual_seed(0)
    if mode == "P":
        img = Image.fromarray(torch.randint(0, 4, (5, 7), dtype=torch.uint8, generator=g).numpy(), "P")
        img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * 756)
    else:
        img = Image.fromarray(torch.randint(0, 256, (5, 7, len(mode)), dtype=torch.uint8, generator=g)
                              .squeeze(-1).numpy(), mode)
    img.save(tmp_path / "x.png")
    expected = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    got = dm.load_rgb(tmp_path / "x.png")
    assert got.dtype == torch.uint8 and got.shape == (3, 5, 7)
    assert torch.equal(got, expected)
    if mode in ("L", "LA"):
        assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])


def test_formats_torchvision_cannot_decode_load_through_pil(tmp_path):
    """load_rgb: a BMP (decoded by PIL, not libpng/libjpeg) gives the same RGB tensor."""
    rgb = torch.randint(0, 256, (6, 4, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    Image.fromarray(rgb.numpy(), "RGB").save(tmp_path / "x.bmp")
    assert torch.equal(dm.load_rgb(tmp_path / "x.bmp"), rgb.permute(2, 0, 1))


# ----------------------------------------------------------------------------------------------
# 2. The Vision Transformer (Sec. 3.2)
# ----------------------------------------------------------------------------------------------
def test_module_names_are_the_official_ones():
    """Released weights load: the ViT's parameter names are those of the official vision_transformer.py."""
    vit = dm.VisionTransformer(img_size=32, patch_size=8, dim=16, depth=2, heads=2)
    official = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"}
    for i in range(2):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            official |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    assert set(vit.state_dict()) == official


@given(n0=st.integers(2, 6), h=st.integers(1, 8), w=st.integers(1, 8))
def test_position_embedding_interpolation(n0, h, w):
    """Local crops: pos. embeddings are the identity at the native grid, 1 + h*w tokens elsewhere, CLS kept."""
    vit = dm.VisionTransformer(img_size=4 * n0, patch_size=4, dim=8, depth=1, heads=2)
    with torch.no_grad():  # a field that varies along rows only: a transposed grid would not be constant per row
        rows = torch.arange(n0, dtype=torch.float32).view(n0, 1, 1).expand(n0, n0, 8).reshape(1, n0 * n0, 8)
        vit.pos_embed[:, 1:] = rows
    pos = vit.interpolate_pos_encoding(n0, n0)
    assert torch.equal(pos, vit.pos_embed)
    pos = vit.interpolate_pos_encoding(h, w)
    assert pos.shape == (1, 1 + h * w, 8)
    assert torch.equal(pos[:, 0], vit.pos_embed[:, 0])
    grid = pos[0, 1:].view(h, w, 8)
    torch.testing.assert_close(grid, grid[:, :1].expand(h, w, 8))  # still constant along each row
    x = torch.randn(2, 3, 4 * h, 4 * w)
    assert vit(x).shape == (2, 8)


def test_one_vit_takes_224_and_96_pixel_crops():
    """The paper's crop sizes through one ViT/16: 1 + 14 x 14 and 1 + 6 x 6 tokens, one CLS vector each."""
    vit = dm.VisionTransformer(img_size=224, patch_size=16, dim=16, depth=1, heads=2).eval()
    for size, grid in ((224, 14), (96, 6)):
        x = torch.randn(2, 3, size, size)
        assert vit.prepare_tokens(x).shape == (2, 1 + grid * grid, 16)
        assert vit(x).shape == (2, 16) and torch.isfinite(vit(x)).all()


@given(heads=st.sampled_from([1, 2, 4]), n=st.integers(1, 6), seed=st.integers(0, 1000))
def test_attention_is_softmax_qkT_over_sqrt_d_times_v(heads, n, seed):
    """Attention: softmax(Q K^T / sqrt(d)) V per head, from the module's own qkv and proj weights."""
    torch.manual_seed(seed)
    D, B = 8, 2
    attn = dm.Attention(D, heads)
    x = torch.randn(B, n, D)
    d = D // heads
    with torch.no_grad():
        qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # (B, n, 3D): [q | k | v], each [head 0 | head 1 | ...]
        maps, outs = [], []
        for h in range(heads):
            q, k, v = (qkv[..., j * D + h * d: j * D + (h + 1) * d] for j in range(3))
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
            maps.append(a)
            outs.append(a @ v)
        expected = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
        for fused in (True, False):  # the speed layer's kernel and the explicit formula
            with attention_kernel(fused):
                torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
                a = attn(x, return_attention=True)
                torch.testing.assert_close(a, torch.stack(maps, dim=1), rtol=1e-5, atol=1e-6)


def test_last_selfattention_is_a_distribution_over_tokens():
    """Attention maps (Fig. 1): one (1+N) x (1+N) row-stochastic map per head from the last block."""
    vit = dm.VisionTransformer(img_size=32, patch_size=8, dim=16, depth=2, heads=4)
    a = vit.get_last_selfattention(torch.randn(3, 3, 32, 32))
    assert a.shape == (3, 4, 17, 17)
    assert a.min() >= 0
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 17))


def test_multicrop_forward_is_view_major_with_one_call_per_resolution():
    """Multi-crop forward: rows v*B:(v+1)*B are view v, exactly as if each view went through alone."""
    torch.manual_seed(0)
    net = dm.MultiCropNet(dm.VisionTransformer(32, 8, 16, 2, 2), dm.DINOHead(16, 10, 32, 8)).eval()
    views = [torch.randn(3, 3, s, s) for s in (32, 32, 16, 16, 16)]
    calls = []
    net.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    feats, logits = net(views)
    assert calls == [6, 9] and feats.shape == (15, 16) and logits.shape == (15, 10)
    for v, x in enumerate(views):
        torch.testing.assert_close(feats[3 * v:3 * (v + 1)], net.backbone(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits[3 * v:3 * (v + 1)], net.head(net.backbone(x)), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. The DINO head (Sec. 3.1, App. C)
# ----------------------------------------------------------------------------------------------
@given(scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e3, 1e6]), proto_scale=st.sampled_from([1e-3, 1.0, 50.0]),
       seed=st.integers(0, 1000))
def test_head_logits_are_cosines_in_minus_one_one(scale, proto_scale, seed):
    """norm_last_layer: logits are cosines in [-1, 1] whatever the input and the prototypes' scale."""
    torch.manual_seed(seed)
    head = dm.DINOHead(12, 20, hidden=16, bottleneck=8)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original1.mul_(proto_scale)  # V: its norm cancels
        logits = head(torch.randn(5, 12) * scale)
    assert logits.shape == (5, 20)
    assert logits.abs().max() <= 1 + 1e-5
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.equal(gain, torch.ones(20, 1))


def test_head_gain_trains_without_norm_last_layer():
    """norm_last_layer=False: the weight-norm gain g is a trained parameter."""
    head = dm.DINOHead(12, 20, hidden=16, bottleneck=8, norm_last_layer=False)
    assert head.last_layer.parametrizations.weight.original0.requires_grad


def test_head_batchnorm_keeps_official_names_and_uses_batch_statistics_in_the_teacher():
    """--use_bn_in_head: BatchNorm after each hidden Linear (official key names mlp.0, mlp.3, mlp.6); the
    teacher, like the official one, normalizes its head with the batch's statistics, not running ones."""
    args = dm.parse_args(["--smoke", "--use_bn_in_head", "true"])
    run = dm.build(args, CPU, iters_per_epoch=4)
    head = run.teacher_core.head
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "BatchNorm1d", "GELU"] * 2 + ["Linear"]
    assert head.training and not run.teacher_core.backbone.training
    x = randn(6, args.embed_dim, seed=0, scale=5.0) + 3.0
    with torch.no_grad():
        hidden = head.mlp[1](head.mlp[0](x))  # (6, hidden)
    torch.testing.assert_close(hidden.mean(0), torch.zeros(args.head_hidden_dim), rtol=0, atol=1e-5)
    assert not dm.parse_args(["--smoke"]).use_bn_in_head


def test_head_deepcopy_is_an_independent_equal_copy():
    """The teacher is copy.deepcopy(student): it works with weight_norm, and shares no storage."""
    torch.manual_seed(0)
    head = dm.DINOHead(12, 20, hidden=16, bottleneck=8)
    twin = copy.deepcopy(head)
    x = torch.randn(4, 12)
    torch.testing.assert_close(twin(x), head(x), rtol=0, atol=0)
    with torch.no_grad():
        twin.last_layer.parametrizations.weight.original1.add_(1.0)
        twin.mlp[0].weight.add_(1.0)
    assert not torch.equal(twin(x), head(x))
    assert not {p.data_ptr() for p in twin.parameters()} & {p.data_ptr() for p in head.parameters()}


# ----------------------------------------------------------------------------------------------
# 4. The loss: centering, sharpening and cross-entropy over pairs of views (Sec. 3.1, Eq. 1-4)
# ----------------------------------------------------------------------------------------------
@given(loss_inputs())
def test_loss_matches_algorithm_1_over_its_2V_minus_2_pairs(x):
    """Eq. 3 / Algorithm 1: the mean of H(P_t(x), P_s(x')) over the 2V - 2 pairs x' != x, no same-view pair."""
    loss, pt = dino_loss_of(x)
    oracle, terms = algorithm1_loss(x["student"], x["teacher"], x["center"], x["tps"], x["tpt"])
    assert terms == 2 * x["V"] - 2
    assert abs(loss.item() - oracle.item()) <= float32_tol(x)
    expected_pt = F.softmax((x["teacher"].double() - x["center"].double()) / x["tpt"], dim=-1)
    torch.testing.assert_close(pt.double(), expected_pt.view(2, x["B"], x["K"]), rtol=0,
                               atol=64 * EPS32 * (1 + softmax_inputs(x)[1]))  # probabilities: eps * |z| at most


@given(loss_inputs())
def test_cross_entropy_is_entropy_plus_a_nonnegative_kl(x):
    """Sec. 5.3: H(P_t, P_s) = h(P_t) + KL(P_t || P_s) >= h(P_t); KL >= 1/2 |P_t - P_s|_1^2 (Pinsker)."""
    loss, pt = dino_loss_of(x)
    metrics = dm.collapse_metrics(loss, pt, torch.randn(2 * x["B"], 4))
    ps = F.softmax(x["student"].double() / x["tps"], dim=-1).view(x["V"], x["B"], x["K"])
    pinsker = [0.5 * ((pt[t].double() - ps[v]).abs().sum(-1) ** 2).mean()
               for t in range(2) for v in range(x["V"]) if v != t]
    tol = float32_tol(x)
    assert metrics["kl"] >= -tol
    assert metrics["kl"] >= (sum(pinsker) / len(pinsker)).item() - tol  # KL = 0 only if P_s = P_t


@given(loss_inputs())
def test_loss_equals_teacher_entropy_exactly_when_student_matches_teacher(x):
    """Sec. 5.3: with P_s = P_t for every pair, the loss is h(P_t): the KL term vanishes."""
    B, V = x["B"], x["V"]
    t = x["teacher"][:B].repeat(2, 1)  # both global views give the same teacher output...
    s = ((t[:B] - x["center"]) * (x["tps"] / x["tpt"])).repeat(V, 1)  # ...and every student view matches it
    x = {**x, "teacher": t, "student": s}
    loss, pt = dino_loss_of(x)
    h = dm.entropy(pt.double()).mean().item()
    assert abs(loss.item() - h) <= float32_tol(x)


@given(loss_inputs(), st.data())
def test_loss_ignores_a_constant_added_to_a_student_row(x, data):
    """Softmax shift invariance: adding a constant to any row of the student logits leaves the loss."""
    row = data.draw(st.integers(0, x["student"].shape[0] - 1))
    const = data.draw(st.sampled_from([-7.0, -0.5, 0.5, 3.0, 7.0])) * x["student"].abs().max().clamp(min=1)
    loss, _ = dino_loss_of(x)
    shifted = x["student"].clone()
    shifted[row] += const
    y = {**x, "student": shifted}
    assert abs(dino_loss_of(y)[0].item() - loss.item()) <= float32_tol(y)


@given(loss_inputs(), st.data())
def test_loss_ignores_the_order_of_images_and_of_the_two_global_views(x, data):
    """The loss is a batch mean (permuting images on all views) and symmetric in the 2 global views."""
    B, V = x["B"], x["V"]
    perm = torch.tensor(data.draw(st.permutations(range(B))))
    rows = torch.cat([v * B + perm for v in range(V)])
    loss, pt = dino_loss_of(x)
    permuted, pt_p = dino_loss_of({**x, "student": x["student"][rows], "teacher": x["teacher"][rows[:2 * B]]})
    tol = float32_tol(x)
    assert abs(permuted.item() - loss.item()) <= tol
    torch.testing.assert_close(pt_p, pt[:, perm])
    swap = torch.cat([torch.arange(B, 2 * B), torch.arange(B), torch.arange(2 * B, V * B)])
    swapped, _ = dino_loss_of({**x, "student": x["student"][swap], "teacher": x["teacher"][swap[:2 * B]]})
    assert abs(swapped.item() - loss.item()) <= tol


@given(loss_inputs())
def test_uniform_student_gives_log_K_whatever_the_teacher(x):
    """Uniform collapse (Sec. 5.3): a uniform P_s costs exactly log K, whatever P_t."""
    student = x["student"][:, :1].expand_as(x["student"]).contiguous()  # each row constant: uniform softmax
    loss, _ = dino_loss_of({**x, "student": student})
    assert abs(loss.item() - math.log(x["K"])) <= 64 * EPS32 * (1 + math.log(x["K"]))


@given(loss_inputs())
def test_loss_is_computed_in_fp32_under_bf16_autocast(x):
    """Mixed precision: the network may run in bf16, but the loss of its fp32 outputs is the fp32 loss, bit for bit."""
    loss, pt = dino_loss_of(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, pt16 = dino_loss_of(x)
    assert loss16.dtype == torch.float32 and torch.equal(loss16, loss) and torch.equal(pt16, pt)


@given(loss_inputs())
def test_gradient_reaches_each_student_view_from_its_pairs_only(x):
    """Eq. 3 by its gradient: d loss / d s_v = sum over teachers t != v of (P_s(v) - P_t(t)) / (tau_s B (2V-2))."""
    B, V = x["B"], x["V"]
    student = x["student"].clone().requires_grad_()
    loss, pt = dino_loss_of({**x, "student": student})
    loss.backward()
    ps = F.softmax(x["student"].double() / x["tps"], dim=-1).view(V, B, -1)
    expected = torch.stack([sum(ps[v] - pt[t].double() for t in range(2) if t != v) for v in range(V)])
    expected = expected / (x["tps"] * B * (2 * V - 2))
    torch.testing.assert_close(student.grad.double().view(V, B, -1), expected, rtol=1e-4,
                               atol=float32_tol(x) / (x["tps"] * B * (2 * V - 2)))


@given(loss_inputs())
def test_no_gradient_reaches_the_teacher_or_the_center(x):
    """Algorithm 1's stop-gradient: only the student is trained by the loss; teacher and center get none."""
    loss_fn = dm.DINOLoss(x["K"], student_temp=x["tps"])
    loss_fn.center.copy_(x["center"])
    student, teacher = x["student"].clone().requires_grad_(), x["teacher"].clone().requires_grad_()
    loss, pt = loss_fn(student, teacher, x["tpt"])
    loss.backward()
    assert student.grad is not None
    assert teacher.grad is None and not pt.requires_grad
    loss_fn.update_center(teacher)
    assert not loss_fn.center.requires_grad and loss_fn.center.grad_fn is None and loss_fn.center.grad is None


@given(K=st.integers(2, 50), B=st.integers(1, 6), m=st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0]) | st.floats(0, 1),
       seed=st.integers(0, 1000))
def test_center_update_is_an_ema_of_the_raw_batch_mean(K, B, m, seed):
    """Eq. 4: C <- m C + (1 - m) mean of the teacher's raw outputs; the loss itself leaves C alone."""
    loss_fn = dm.DINOLoss(K, center_momentum=m)
    c0, t = randn(1, K, seed=seed), randn(2 * B, K, seed=seed + 1, scale=3.0)
    loss_fn.center.copy_(c0)
    loss_fn(randn(4 * B, K, seed=seed + 2), t, 0.04)
    assert torch.equal(loss_fn.center, c0)  # the center used on a batch never contains that batch
    loss_fn.update_center(t)
    torch.testing.assert_close(loss_fn.center, c0 * m + (1 - m) * t.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)


@given(K=st.integers(2, 300), seed=st.integers(0, 1000), tpt=st.sampled_from([0.01, 0.04, 0.1]))
def test_centering_a_constant_teacher_leaves_no_information(K, seed, tpt):
    """Centering: under a constant teacher output the center converges to it and P_t becomes uniform."""
    loss_fn = dm.DINOLoss(K, center_momentum=0.9)
    t = randn(1, K, seed=seed).expand(6, K)  # every image, both views: the same output
    for n in range(1, 301):
        loss_fn.update_center(t)
        if n in (1, 10, 100):  # closed form from C = 0: (1 - m^n) t
            torch.testing.assert_close(loss_fn.center, (1 - 0.9 ** n) * t[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fn.center, t[:1], rtol=1e-5, atol=1e-6)
    _, pt = loss_fn(randn(6, K, seed=seed + 1), t, tpt)
    torch.testing.assert_close(pt, torch.full_like(pt, 1 / K), rtol=1e-3, atol=0)
    assert math.isclose(dm.entropy(pt).mean().item(), math.log(K), rel_tol=1e-5)


@given(loss_inputs(), st.data())
def test_lower_teacher_temperature_never_raises_teacher_entropy(x, data):
    """Sharpening: h(softmax(z / tau)) is nondecreasing in tau, row by row."""
    t1, t2 = sorted(data.draw(st.lists(st.sampled_from([0.001, 0.01, 0.04, 0.07, 0.1, 1.0, 100.0]),
                                       min_size=2, max_size=2)))
    loss_fn = dm.DINOLoss(x["K"])
    loss_fn.center.copy_(x["center"])
    h1 = dm.entropy(loss_fn(x["student"], x["teacher"], t1)[1])
    h2 = dm.entropy(loss_fn(x["student"], x["teacher"], t2)[1])
    assert (h1 <= h2 + 1e-5 * (1 + math.log(x["K"]))).all()


@given(K=st.integers(2, 100), B=st.integers(1, 4), seed=st.integers(0, 1000))
def test_teacher_temperature_limits_are_argmax_and_uniform(K, B, seed):
    """Sharpening: tau_t -> 0 gives the one-hot argmax of the centered output; a large tau_t the uniform."""
    g = torch.Generator().manual_seed(seed)
    z = torch.stack([torch.randperm(K, generator=g).float() * 0.1 for _ in range(2 * B)])  # gaps >= 0.1
    z = z + randn(2 * B, 1, seed=seed, scale=5.0)  # a constant per row changes no softmax
    loss_fn = dm.DINOLoss(K)
    _, cold = loss_fn(torch.zeros(4 * B, K), z, 1e-3)
    torch.testing.assert_close(cold.reshape(2 * B, K), F.one_hot(z.argmax(1), K).float(), rtol=0, atol=1e-6)
    _, hot = loss_fn(torch.zeros(4 * B, K), z - z.mean(1, keepdim=True), 1e4)
    torch.testing.assert_close(hot, torch.full_like(hot, 1 / K), rtol=2e-3, atol=0)  # |z / tau| <= 5e-4


# ----------------------------------------------------------------------------------------------
# 5. Schedules and the EMA teacher (Sec. 3.1, 5.2; App. B)
# ----------------------------------------------------------------------------------------------
def two_nets(seed):
    torch.manual_seed(seed)
    return (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))


@given(m=st.sampled_from([0.0, 1.0, 0.5, 0.996]) | st.floats(0, 1), seed=st.integers(0, 1000))
def test_ema_is_the_convex_combination(m, seed):
    """EMA teacher: theta_t <- m theta_t + (1 - m) theta_s; m = 1 keeps, m = 0 copies the student."""
    teacher, student = two_nets(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = [p.detach().clone() for p in student.parameters()]
    dm.ema_update(teacher, student, m)
    for t, a, b, s in zip(teacher.parameters(), t0, s0, student.parameters()):
        assert torch.equal(s, b)  # the student is not touched
        if m == 1:
            assert torch.equal(t, a)
        elif m == 0:
            assert torch.equal(t, b)
        else:
            torch.testing.assert_close(t.detach(), m * a + (1 - m) * b, rtol=1e-6, atol=1e-6)


def nondecreasing(xs):
    return all(a <= b for a, b in itertools.pairwise(xs))


def nonincreasing(xs):
    return all(a >= b for a, b in itertools.pairwise(xs))


@given(epochs=st.integers(1, 6), iters=st.integers(1, 7), warmup=st.integers(0, 6), base=st.floats(0, 10),
       final=st.floats(0, 10), start=st.floats(0, 10))
def test_cosine_schedule_hits_its_endpoints_and_is_monotone(epochs, iters, warmup, base, final, start):
    """Schedules: linear warmup start -> base, then a cosine base -> final ending exactly at final."""
    warmup = min(warmup, epochs)
    values = dm.cosine_schedule(base, final, epochs, iters, warmup, start)
    w, n = warmup * iters, (epochs - warmup) * iters
    assert len(values) == epochs * iters
    warm, cos = values[:w], values[w:]
    if w:
        assert warm[0] == start
        assert (nondecreasing if base >= start else nonincreasing)(warm)
    if w >= 2:
        assert math.isclose(warm[-1], base, rel_tol=1e-12, abs_tol=1e-12)
    if n:
        assert math.isclose(cos[0], base, rel_tol=1e-12, abs_tol=1e-12)
        assert (nonincreasing if base >= final else nondecreasing)(cos)
    if n >= 2:
        assert cos[-1] == final


@given(epochs=st.integers(2, 30), iters=st.integers(2, 20), data=st.data())
def test_training_schedules_follow_the_paper(epochs, iters, data):
    """App. B: lr warmup to lr * batch / 256 then cosine down; wd and momentum up; tau_t warms up."""
    warmup = data.draw(st.integers(1, epochs))
    tt_warmup = data.draw(st.integers(0, epochs + 3))
    world = data.draw(st.sampled_from([1, 2, 4]))
    momentum_end = data.draw(st.sampled_from([1.0, 0.998]))  # official 1; the laptop preset holds it below
    args = dm.parse_args(["--smoke", "--epochs", str(epochs), "--warmup_epochs", str(warmup), "--lr", "0.003",
                          "--momentum_teacher_end", str(momentum_end),
                          "--warmup_teacher_temp", "0.04", "--teacher_temp", "0.07",
                          "--warmup_teacher_temp_epochs", str(tt_warmup)])
    s = dm.Schedules(args, iters, world)
    peak = 0.003 * args.batch_size_per_gpu * world / 256  # the linear scaling rule
    w = warmup * iters
    assert len(s.lr) == len(s.wd) == len(s.momentum) == epochs * iters and len(s.teacher_temp) == epochs
    assert s.lr[0] == 0 and math.isclose(s.lr[w - 1], peak, rel_tol=1e-12) and max(s.lr) == pytest.approx(peak)
    assert nondecreasing(s.lr[:w]) and nonincreasing(s.lr[w - 1:])
    if w < len(s.lr):
        assert s.lr[-1] == args.min_lr
    assert s.wd[0] == pytest.approx(args.weight_decay, rel=1e-12) and s.wd[-1] == args.weight_decay_end
    assert s.momentum[0] == pytest.approx(args.momentum_teacher, rel=1e-12) and s.momentum[-1] == momentum_end
    assert nondecreasing(s.wd) and nondecreasing(s.momentum)
    tt = s.teacher_temp  # per epoch; the warmup is a float32 torch.linspace: compared at float32 resolution
    k = min(tt_warmup, epochs)
    assert tt[k:] == [0.07] * (epochs - k)
    if k:
        assert tt[0] == pytest.approx(0.04, rel=1e-6)
        assert all(a <= b * (1 + EPS32) for a, b in itertools.pairwise(tt))
    if k >= 2:
        assert tt[k - 1] == pytest.approx(0.07, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 6. Collapse diagnostics (Sec. 5.3, Fig. 7) and k-NN evaluation (App. F.1)
# ----------------------------------------------------------------------------------------------
@given(K=st.integers(2, 1000))
def test_entropy_of_uniform_is_log_K_and_of_one_hot_zero(K):
    """Collapse table: h(uniform) = log K (uniform collapse), h(one-hot) = 0 (one-dimension collapse)."""
    assert math.isclose(dm.entropy(torch.full((K,), 1 / K)).item(), math.log(K), rel_tol=1e-5)
    assert dm.entropy(F.one_hot(torch.tensor(K // 2), K).float()).item() == 0


@given(n=st.integers(1, 8), K=st.integers(2, 50), scale=st.sampled_from([0.01, 1.0, 30.0]), seed=st.integers(0, 999))
def test_entropy_of_the_batch_mean_is_at_least_the_mean_entropy(n, K, scale, seed):
    """Concavity of h: h(mean P_t) >= mean h(P_t), the healthy gap h_batch_mean > h_teacher."""
    p = F.softmax(randn(2, n, K, seed=seed, scale=scale), dim=-1)
    m = dm.collapse_metrics(torch.tensor(5.0), p, randn(2 * n, 4, seed=seed))
    assert m["h_batch_mean"] >= m["h_teacher"] - 1e-5
    assert m["h_teacher"] >= -1e-6 and m["h_batch_mean"] <= math.log(K) + 1e-5


@given(n=st.integers(2, 12), d=st.integers(2, 12), seed=st.integers(0, 999))
def test_effective_rank_lies_between_one_and_min_n_d(n, d, seed):
    """Effective rank: 1 <= exp(h(sigma / |sigma|_1)) <= min(n, d); 1 for rank one, min(n, d) for orthogonal."""
    r = dm.effective_rank(randn(n, d, seed=seed))
    assert 1 - 1e-5 <= r <= min(n, d) + 1e-4
    u, v = randn(n, 1, seed=seed + 1), randn(1, d, seed=seed + 2)
    assert dm.effective_rank(u @ v) == pytest.approx(1, abs=1e-3)
    assert dm.effective_rank(torch.eye(n, d)) == pytest.approx(min(n, d), rel=1e-5)


def test_identical_features_have_zero_std_and_rank_one():
    """One-dimension collapse: every image gives the same feature, so feat_std = 0 and eff_rank = 1."""
    feats = randn(1, 16, seed=0).expand(10, 16)
    p = F.softmax(randn(2, 5, 8, seed=1), dim=-1)
    m = dm.collapse_metrics(torch.tensor(2.0), p, feats)
    assert m["feat_std"] < 1e-6 and m["eff_rank"] == pytest.approx(1, abs=1e-3)
    healthy = dm.collapse_metrics(torch.tensor(2.0), p, randn(10, 16, seed=2))
    assert healthy["feat_std"] > 0.1 and healthy["eff_rank"] > 5


def test_uniform_collapse_signature():
    """Collapse table: uniform teacher and student give h_t = h_mean = log K and KL = 0."""
    K, B = 64, 4
    loss, pt = dm.DINOLoss(K)(torch.zeros(6 * B, K), torch.zeros(2 * B, K), 0.04)
    m = dm.collapse_metrics(loss, pt, randn(2 * B, 8, seed=0))
    assert m["h_teacher"] == pytest.approx(math.log(K), rel=1e-6)
    assert m["h_batch_mean"] == pytest.approx(math.log(K), rel=1e-6)
    assert abs(m["kl"]) < 1e-5


@given(n=st.integers(1, 30), q=st.integers(1, 10), C=st.integers(2, 4), k=st.integers(1, 40),
       T=st.sampled_from([0.02, 0.07, 1.0]), seed=st.integers(0, 999))
def test_knn_is_a_weighted_vote_of_the_k_nearest(n, q, C, k, T, seed):
    """k-NN monitor (App. F.1): each query takes the class with the largest sum of exp(cos / T) over its k NN."""
    train_f, test_f = F.normalize(randn(n, 6, seed=seed), dim=1), F.normalize(randn(q, 6, seed=seed + 1), dim=1)
    g = torch.Generator().manual_seed(seed)
    train_y, test_y = torch.randint(0, C, (n,), generator=g), torch.randint(0, C, (q,), generator=g)
    train_y[0] = C - 1  # every class index can appear
    correct = 0
    for f, y in zip(test_f.double(), test_y):
        sims = train_f.double() @ f
        votes = [0.0] * C
        for i in sims.argsort(descending=True)[:min(k, n)].tolist():
            votes[train_y[i]] += math.exp(sims[i].item() / T)
        correct += max(range(C), key=votes.__getitem__) == y.item()
    assert dm.knn_classify(train_f, train_y, test_f, test_y, k, T) == pytest.approx(100 * correct / q)


# ----------------------------------------------------------------------------------------------
# 7. Data: a class-per-folder tree, checked before any work is done
# ----------------------------------------------------------------------------------------------
def test_missing_data_folder_is_one_error_line(tmp_path, capsys):
    """Bad input: --data that does not exist, or is a file, or is not given."""
    (tmp_path / "file").write_text("x")
    for data in (tmp_path / "nope", tmp_path / "file"):
        err = expect_one_error_line(["--data", data, "--output_dir", tmp_path / "o"], capsys)
        assert str(data) in err
    expect_one_error_line(["--output_dir", tmp_path / "o"], capsys)


def test_folder_without_images_or_without_class_folders_is_one_error_line(tmp_path, capsys):
    """Bad input: class folders holding no image, and images with no class folder above them."""
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "dog").mkdir()
    (tmp_path / "empty" / "dog" / "readme.txt").write_text("no images here")
    err = expect_one_error_line(["--smoke", "--data", tmp_path / "empty", "--output_dir", tmp_path / "o"], capsys)
    assert "no images" in err
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "flat" / "a.png")
    err = expect_one_error_line(["--smoke", "--data", tmp_path / "flat", "--output_dir", tmp_path / "o"], capsys)
    assert "class folders" in err


def test_non_image_files_are_skipped_with_a_count(tiny_data, tmp_path, capsys):
    """Bad input: files that are not images (even named .png/.jpg) are skipped and counted; training runs."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train" / "class0" / "notes.png").write_text("not an image")
    (data / "train" / "class1" / "junk.jpg").write_bytes(os.urandom(300))
    (data / "train" / "class2" / "readme.txt").write_text("ignored: not an image extension")
    rc, out, err = main_captured(tiny_argv(data, tmp_path / "out"), capsys)
    assert rc == 0 and err == ""
    assert "skipped 2 files that are not images" in out


@pytest.mark.parametrize("workers,from_python", [(0, False), (2, False), (2, True)],
                         ids=["command", "command, 2 workers", "main() from Python, 2 workers"])
def test_a_truncated_image_fails_with_one_line_naming_it(tiny_data, tmp_path, workers, from_python):
    """Bad input: an image cut short is found when decoded (in a loader worker or not): the program ends
    with one line naming it. In a subprocess: a process left waiting for its workers would hang here."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "train" / "class1" / "002.png"
    bad.write_bytes(bad.read_bytes()[:200])
    argv = tiny_argv(data, tmp_path / "out", "--batch_size_per_gpu", "4", "--num_workers", workers)
    rc, out, err = run_cli(argv, timeout=60, from_python=from_python)  # 9 steps of 4 decode all 36 images
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(bad) in err, err
    assert "Traceback" not in out + err


def test_images_smaller_than_the_crops_and_too_small_a_dataset(tmp_path, capsys):
    """Bad input: images below the local crop size; a batch larger than the training set."""
    small = dm.make_synthetic_images(tmp_path / "small", classes=2, per_class=4, size=12)
    err = expect_one_error_line(["--smoke", "--data", small, "--output_dir", tmp_path / "o"], capsys)
    assert "smaller than" in err
    few = dm.make_synthetic_images(tmp_path / "few", classes=2, per_class=4, size=40)
    err = expect_one_error_line(["--smoke", "--data", few, "--output_dir", tmp_path / "o"], capsys)
    assert "batch" in err


def test_download_without_network_is_one_error_line(tmp_path):
    """--download offline: one clear line, no traceback, no hang (a dead proxy makes any machine offline)."""
    dead = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once
    env = {**ENV, "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "no_proxy": "",
           "NO_PROXY": ""}
    rc, out, err = run_cli(["--data", tmp_path / "imagenette", "--download", "--output_dir", tmp_path / "out"],
                           timeout=120, env=env)
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "download" in err, err
    assert "Traceback" not in out + err


# ----------------------------------------------------------------------------------------------
# 8. Training (Algorithm 1): one step, seeds, overfitting, collapse in miniature (Sec. 5.3, Fig. 7)
# ----------------------------------------------------------------------------------------------
def batch_views(data, args, n=8):
    items, _ = dm.list_images(Path(data) / "train")
    samples = [dm.MultiCropDataset(items, args)[(0, i)][0] for i in range(n)]
    return [torch.stack([s[v] for s in samples]) for v in range(2 + args.local_crops_number)]


def test_train_step_trains_the_student_and_moves_the_teacher_by_ema_only(tiny_data):
    """Algorithm 1: gradients reach the student only; the teacher, an independent copy, follows by EMA;
    the loss uses the center of the previous batches, then the center takes this batch in (Eq. 4)."""
    args = dm.parse_args(["--smoke", "--warmup_epochs", "0", "--freeze_last_layer", "0", "--lr", "0.01"])
    run = dm.build(args, CPU, iters_per_epoch=4)
    assert run.teacher_core is not run.core
    assert not {p.data_ptr() for p in run.teacher_core.parameters()} & {p.data_ptr() for p in run.core.parameters()}
    views = batch_views(tiny_data, args)
    t0 = [p.clone() for p in run.teacher_core.parameters()]
    s0 = [p.detach().clone() for p in run.core.parameters()]
    c0 = randn(1, args.out_dim, seed=0, scale=0.05)
    run.dino_loss.center.copy_(c0)
    with torch.no_grad():
        _, teacher_out = run.teacher_core(views[:2])
    loss, pt, feats = dm.train_step(run, views, 0, args)
    cm = args.center_momentum
    torch.testing.assert_close(pt.reshape(16, -1), F.softmax((teacher_out - c0) / run.sched.teacher_temp[0], dim=-1))
    torch.testing.assert_close(run.dino_loss.center, cm * c0 + (1 - cm) * teacher_out.mean(0, keepdim=True))
    assert all(not p.requires_grad and p.grad is None for p in run.teacher_core.parameters())
    assert all(p.grad is not None for p in run.core.parameters() if p.requires_grad)
    m = run.sched.momentum[0]
    for t, a, b, s in zip(run.teacher_core.parameters(), t0, s0, run.core.parameters()):
        torch.testing.assert_close(t, m * a + (1 - m) * s.detach(), rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(b, s) for b, s in zip(s0, run.core.parameters()))
    assert pt.shape == (2, 8, args.out_dim) and feats.shape == (16, args.embed_dim) and loss.ndim == 0


def test_overfitting_one_batch_lowers_the_loss(tiny_data):
    """Optimization: with the teacher and center frozen, repeating one batch drives the loss (its KL) down."""
    args = dm.parse_args(["--smoke", "--warmup_epochs", "0", "--epochs", "1", "--lr", "0.005",
                          "--momentum_teacher", "1", "--center_momentum", "1", "--freeze_last_layer", "0"])
    run = dm.build(args, CPU, iters_per_epoch=20)
    views = batch_views(tiny_data, args)
    losses, kls = [], []
    for _ in range(20):
        loss, pt, _ = dm.train_step(run, views, 0, args)
        losses.append(loss.item())
        kls.append(loss.item() - dm.entropy(pt).mean().item())
    assert losses[-1] < losses[0]
    assert kls[-1] < 0.75 * kls[0]


def test_two_seeded_runs_give_bitwise_equal_weights(tiny_data, tmp_path):
    """--seed: same seed, same flags give bitwise-equal weights on the CPU (and another seed differs)."""
    outs = {name: tmp_path / name for name in ("a", "b", "c")}
    for name, out in outs.items():
        assert run_main(tiny_argv(tiny_data, out, "--seed", "7" if name == "c" else "5")) == 0
    a, b, c = (torch.load(out / "teacher_backbone.pth", weights_only=True) for out in outs.values())
    assert_state_equal(a, b, "teacher_backbone")
    ckpt_a, ckpt_b = load_ckpt(outs["a"]), load_ckpt(outs["b"])
    for part in ("student", "teacher", "dino_loss", "optimizer", "scaler", "it"):
        assert_state_equal(ckpt_a[part], ckpt_b[part], part)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.fixture(scope="module")
def collapse_runs(tmp_path_factory):
    """Fig. 7 in miniature: the smoke model for 44 steps, with both, without centering, without sharpening.
    A high lr and teacher momentum 0.99 let the teacher move within 44 steps; the sharper tau_t = 0.02 keeps
    the full run clearly away from the uniform end at this tiny scale."""
    root = tmp_path_factory.mktemp("collapse")
    data = dm.make_synthetic_images(root / "data", classes=10, per_class=24, size=40, seed=0)
    common = ["--smoke", "--data", data, "--epochs", "4", "--warmup_epochs", "0", "--lr", "0.005",
              "--momentum_teacher", "0.99", "--eval_every", "0", "--log_every", "1", "--threads", "1"]
    sharp = ["--teacher_temp", "0.02", "--warmup_teacher_temp", "0.02"]
    regimes = {"full": sharp, "no_centering": [*sharp, "--center_momentum", "1"],
               "no_sharpening": ["--teacher_temp", "0.1", "--warmup_teacher_temp", "0.1"]}  # tau_t = tau_s
    result = {}
    for name, flags in regimes.items():
        assert run_main([*common, *flags, "--output_dir", str(root / name)]) == 0
        steps = steps_of(root / name)
        last = {k: sum(r[k] for r in steps[-4:]) / 4 for k in ("h_teacher", "h_batch_mean", "kl")}
        result[name] = dict(last, h_first=steps[0]["h_teacher"], center=load_ckpt(root / name)["dino_loss"]["center"])
    return result, math.log(256)


def test_full_dino_keeps_kl_positive_and_entropy_between_the_extremes(collapse_runs):
    """Sec. 5.3: with centering and sharpening KL stays > 0 and 0 < h(P_t) < h(mean P_t) < log K."""
    runs, log_k = collapse_runs
    full = runs["full"]
    assert full["kl"] > 0.5
    assert 1.0 < full["h_teacher"] < log_k - 0.3
    assert full["h_teacher"] < full["h_batch_mean"]  # each image's distribution is its own: no collapse


def test_without_centering_the_teacher_entropy_falls_toward_zero(collapse_runs):
    """Sec. 5.3, Fig. 7: sharpening alone lets one dimension dominate: h(P_t) -> 0, KL -> 0."""
    runs, log_k = collapse_runs
    run = runs["no_centering"]
    assert torch.equal(run["center"], torch.zeros_like(run["center"]))  # --center_momentum 1: no centering
    assert run["h_teacher"] < min(0.2 * log_k, run["h_first"]) and run["h_teacher"] < runs["full"]["h_teacher"] / 4
    assert run["kl"] < runs["full"]["kl"] / 2


def test_without_sharpening_the_teacher_entropy_rises_toward_log_K(collapse_runs):
    """Sec. 5.3, Fig. 7: centering alone (tau_t = tau_s) flattens the teacher: h(P_t) -> log K, KL -> 0."""
    runs, log_k = collapse_runs
    run = runs["no_sharpening"]
    assert run["h_first"] < run["h_teacher"] and log_k - run["h_teacher"] < 0.1
    assert run["kl"] < runs["full"]["kl"] / 2


# ----------------------------------------------------------------------------------------------
# 9. Checkpoints (atomic, exact resume), stopping, the output directory
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed_runs(tiny_data, tmp_path_factory):
    """--epochs 2 straight, and the same with --pause_after_epochs 1 (and 2 loader workers) run twice."""
    root = tmp_path_factory.mktemp("resume")
    extra = ["--epochs", "2", "--drop_path_rate", "0.1"]  # drop-path: the network's randomness resumes too
    assert run_main(tiny_argv(tiny_data, root / "straight", *extra)) == 0
    paused = tiny_argv(tiny_data, root / "paused", *extra, "--pause_after_epochs", "1", "--num_workers", "2")
    assert run_main(paused) == 0
    first_half = load_ckpt(root / "paused")["it"]
    assert run_main(paused) == 0
    return root / "straight", root / "paused", first_half


def test_pause_and_resume_is_bitwise_exact_whatever_the_worker_count(resumed_runs):
    """Exact resume: paused after 1 epoch and rerun, the run ends bitwise equal to a straight one."""
    straight, paused, first_half = resumed_runs
    assert first_half == 4  # the pause came after one epoch of 4 steps
    a, b = load_ckpt(straight), load_ckpt(paused)
    assert a["it"] == b["it"] == 8
    for part in ("student", "teacher", "dino_loss", "optimizer", "scaler"):
        assert_state_equal(a[part], b[part], part)
    assert [r["loss"] for r in steps_of(straight)] == [r["loss"] for r in steps_of(paused)]


def test_a_pause_that_lands_on_the_last_epoch_still_saves_the_final_weights(resumed_runs):
    """--pause_after_epochs: the run that completes training writes teacher_backbone.pth like a straight one."""
    straight, paused, _ = resumed_runs
    assert (straight / "teacher_backbone.pth").exists()
    assert (paused / "teacher_backbone.pth").exists()


def start_run(data, out, *extra):
    """The command line on 48 images in batches of 4 (12 steps per epoch), in the background; its flags."""
    argv = tiny_argv(data, out, "--batch_size_per_gpu", "4", "--epochs", "3", *extra)
    return argv, subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)  # a terminal's job


def wait_for_step(proc, out, predicate, timeout=180):
    """Poll log.jsonl until a step record satisfies predicate; the run must still be going."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = [r for r in steps_of(out) if predicate(r)]
        if hit:
            return hit[0]
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()}"
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no step record in time")


@pytest.fixture(scope="module")
def data48(tmp_path_factory):
    return dm.make_synthetic_images(tmp_path_factory.mktemp("d48"), classes=4, per_class=16, size=40, seed=1)


def test_sigkill_mid_epoch_leaves_a_loadable_checkpoint_and_the_rerun_finishes(data48, tmp_path, capsys):
    """Atomic save: a run killed at any moment (SIGKILL) leaves the last checkpoint whole; rerun resumes."""
    out = tmp_path / "run"
    argv, proc = start_run(data48, out)
    wait_for_step(proc, out, lambda r: r["epoch"] >= 1 and r["it"] % 12 != 0)  # a checkpoint exists, mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    ckpt = load_ckpt(out)  # whole and loadable
    assert ckpt["it"] > 0 and ckpt["it"] % 12 == 0
    (out / "checkpoint.tmp").write_bytes(b"half a checkpoint")  # as if killed inside torch.save
    rc, stdout, stderr = main_captured(argv, capsys)  # the same command again (in this process: faster)
    assert rc == 0 and stderr == ""
    assert f"resumed from {out / 'checkpoint.pth'} at iteration {ckpt['it']}" in stdout
    assert (out / "teacher_backbone.pth").exists() and load_ckpt(out)["it"] == 36


class PowerCut(BaseException):
    """The process dies here: dino_minimal catches no BaseException, so nothing after it runs."""


def test_a_kill_inside_the_save_leaves_the_previous_checkpoint_whole(tiny_data, tmp_path, monkeypatch):
    """Atomic save, deterministically: the second checkpoint is cut off halfway through its writing; the
    first one is still whole, and the same command resumes from it and finishes."""
    out, real_save, calls = tmp_path / "out", torch.save, []

    def save_then_die(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(f).write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])  # half of it is on disk
        raise PowerCut

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(PowerCut):
        run_main(tiny_argv(tiny_data, out, "--epochs", "2"))
    monkeypatch.undo()
    assert load_ckpt(out)["it"] == 4  # the end of epoch 1, whole
    assert run_main(tiny_argv(tiny_data, out, "--epochs", "2")) == 0
    assert load_ckpt(out)["it"] == 8 and (out / "teacher_backbone.pth").exists()


@pytest.mark.parametrize("how", ["SIGTERM to the process", "Ctrl-C to the group, 2 workers"])
def test_stop_signal_finishes_the_step_saves_and_resumes_from_that_iteration(data48, tmp_path, capsys, how):
    """SIGTERM / Ctrl-C: finish the step, save, name the checkpoint, exit; rerunning continues from there."""
    out = tmp_path / "run"
    argv, proc = start_run(data48, out, *(["--num_workers", "2"] if "workers" in how else []))
    wait_for_step(proc, out, lambda r: r["it"] >= 2)
    if how.startswith("SIGTERM"):  # a scheduler stopping the job
        proc.send_signal(signal.SIGTERM)
    else:  # a terminal's Ctrl-C reaches the whole process group: the loader's workers too
        os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in stderr
    stopped = [r for r in read_log(out) if r["type"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["checkpoint"] == str(out / "checkpoint.pth")
    it = stopped[0]["it"]
    last_line = stdout.strip().splitlines()[-1]  # names the iteration and the checkpoint
    assert str(out / "checkpoint.pth") in last_line and str(it) in last_line
    assert steps_of(out)[-1]["it"] == it == load_ckpt(out)["it"]  # the step in flight was finished and saved
    before = len(steps_of(out))
    rc, stdout, stderr = main_captured(argv, capsys)  # the same command again (in this process: faster)
    assert rc == 0 and stderr == ""
    assert f"resumed from {out / 'checkpoint.pth'} at iteration {it}" in stdout
    after = steps_of(out)[before:]
    assert [r["it"] for r in after] == list(range(it + 1, 37))


def test_main_gives_back_the_callers_signal_handlers(tiny_data, tmp_path):
    """main() from a notebook or a test: after it returns, Ctrl-C / SIGTERM behave as before the call."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert dm.main(tiny_argv(tiny_data, tmp_path / "out")) == 0
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_the_checkpoint_names_its_data_by_absolute_path(tiny_data, tmp_path, monkeypatch):
    """--data given relative to where training ran: the checkpoint's args find it from anywhere
    (notebook 4 reads its k-NN images from there)."""
    monkeypatch.chdir(Path(tiny_data).parent)
    assert run_main(tiny_argv(Path(tiny_data).name, tmp_path / "out")) == 0
    assert load_ckpt(tmp_path / "out")["args"]["data"] == str(Path(tiny_data).resolve())


def test_checkpoint_of_another_architecture_is_one_error_line(tiny_data, tmp_path, capsys):
    """Bad input: resuming into an output dir whose checkpoint holds another model names the flags."""
    assert run_main(tiny_argv(tiny_data, tmp_path / "out")) == 0
    err = expect_one_error_line(tiny_argv(tiny_data, tmp_path / "out", "--embed_dim", "32"), capsys)
    assert "--embed_dim 64" in err


@pytest.mark.parametrize("smoke_data", [False, True], ids=["--data", "--smoke"])
def test_unwritable_output_dir_is_one_error_line(tiny_data, tmp_path, capsys, smoke_data):
    """Bad input: an --output_dir that cannot be created (below a regular file: root ignores chmod)."""
    (tmp_path / "file").write_text("x")
    argv = ["--smoke", "--output_dir", tmp_path / "file" / "out", "--threads", "1"]
    err = expect_one_error_line(argv if smoke_data else [*argv, "--data", tiny_data], capsys)
    assert "output_dir" in err


# ----------------------------------------------------------------------------------------------
# 10. The speed layer: on or off, the same algorithm
# ----------------------------------------------------------------------------------------------
def test_speed_layer_off_is_the_plain_code():
    """--speed_layer false: the explicit attention formula, fp32, AdamW without foreach or fused kernels."""
    args = dm.parse_args(["--smoke", "--speed_layer", "false"])
    with attention_kernel(True):
        run = dm.build(args, CPU, iters_per_epoch=4)
        assert not dm.Attention.fused and args.precision == "fp32" and not isinstance(run.autocast, torch.autocast)
    assert all(not g["foreach"] and not g["fused"] for g in run.opt.param_groups)


def test_speed_layer_on_uses_the_fused_adamw_on_the_cpu():
    """The default: PyTorch's fused AdamW kernel, on a CPU as on a GPU (the fp32 step test below
    checks that it takes the same step as the for-loop AdamW)."""
    with attention_kernel(True):  # build() sets the kernel: leave it as the other tests expect
        run = dm.build(dm.parse_args(["--smoke", "--precision", "fp32"]), CPU, iters_per_epoch=4)
    assert all(g["fused"] and not g["foreach"] for g in run.opt.param_groups)


def one_step(tiny_data, *flags):
    """The student's weights before and after one training step of the smoke model on tiny_data."""
    args = dm.parse_args(["--smoke", "--warmup_epochs", "0", "--freeze_last_layer", "0", *flags])
    torch.manual_seed(0)
    with attention_kernel(True):
        run = dm.build(args, CPU, iters_per_epoch=4)
        before = copy.deepcopy(run.core.state_dict())
        loss, _, _ = dm.train_step(run, batch_views(tiny_data, args), 0, args)
    return before, run.core.state_dict(), loss.item()


def distance(a, b):
    return math.sqrt(sum(((a[k] - b[k]).double() ** 2).sum().item() for k in a))


def test_a_train_step_is_the_same_with_the_speed_layer_on_and_off(tiny_data):
    """fp32, speed layer on (SDPA, fused AdamW) or off: the same step up to float rounding, far below its size."""
    init, on, loss_on = one_step(tiny_data, "--precision", "fp32")
    init_off, off, loss_off = one_step(tiny_data, "--precision", "fp32", "--speed_layer", "false")
    assert_state_equal(init, init_off, "initial weights")
    assert abs(loss_on - loss_off) <= 1e-5 * loss_off
    assert distance(on, off) < 1e-3 * distance(on, init)


def test_a_bf16_step_on_the_cpu_follows_the_fp32_step(tiny_data):
    """bf16 autocast (explicit attention on a CPU): the loss within bf16's rounding of fp32's, and a step
    in the same direction, differing by much less than its own size."""
    init, fp32, loss32 = one_step(tiny_data, "--precision", "fp32")
    _, bf16, loss16 = one_step(tiny_data, "--precision", "bf16")
    assert abs(loss16 - loss32) <= 2 ** -8 * loss32  # bf16 keeps 8 significant bits
    assert distance(fp32, bf16) < 0.3 * distance(fp32, init)


@pytest.mark.parametrize("flags", [[], ["--augment_on_device", "--speed_layer", "false"]], ids=["default", "plain"])
def test_benchmark_prints_one_json_line_of_consistent_figures(tmp_path, capsys, flags):
    """--benchmark: one JSON line; images/s is batch / step time, achieved FLOP/s is FLOP per image x images/s,
    and the utilisation is that over the matmul rate of the same run."""
    rc, out, err = main_captured(["--smoke", "--benchmark", "--output_dir", tmp_path, "--bench_steps", "2",
                                  "--bench_warmup", "1", "--threads", "1", *flags], capsys)
    assert rc == 0 and err == "", err
    (line,) = out.strip().splitlines()
    r = json.loads(line)
    for key in ("train_img_per_s", "step_s", "gflop_per_img", "achieved_gflop_per_s", "matmul_gflop_per_s",
                "utilisation", "peak_mem_mb", "pipeline_img_per_s_per_worker"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["train_img_per_s"] == pytest.approx(16 / r["step_s"])  # the smoke batch: 16 images
    assert r["achieved_gflop_per_s"] == pytest.approx(r["gflop_per_img"] * r["train_img_per_s"])
    assert r["utilisation"] == pytest.approx(r["achieved_gflop_per_s"] / r["matmul_gflop_per_s"])
    assert ("device_augment_img_per_s" in r) == ("--augment_on_device" in flags)
    assert r["precision"] == ("fp32" if "--speed_layer" in flags else "bf16" if dm.native_bf16(CPU) else "fp32")


# ----------------------------------------------------------------------------------------------
# 11. Released weights, the command line, several processes (torchrun)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "backbone.", "module.backbone."])
def test_official_checkpoints_map_onto_the_vit(prefix):
    """official_state_dict: released and training checkpoints (teacher, module./backbone./head.) load strictly."""
    source = dm.VisionTransformer(img_size=32, patch_size=8, dim=16, depth=2, heads=2)
    state = {prefix + k: v for k, v in source.state_dict().items()}
    if prefix:  # a full training checkpoint: student and teacher with their heads
        head = {prefix.replace("backbone.", "head.") + "mlp.0.weight": torch.zeros(3, 16),
                prefix.replace("backbone.", "head.") + "last_layer.weight_g": torch.ones(5, 1)}
        state = {"teacher": {**state, **head}, "student": {"module.backbone.cls_token": torch.zeros(1)}, "epoch": 3}
    target = dm.VisionTransformer(img_size=32, patch_size=8, dim=16, depth=2, heads=2)
    target.load_state_dict(dm.official_state_dict(state), strict=True)
    assert_state_equal(target.state_dict(), source.state_dict(), "vit")


@pytest.mark.parametrize("speed", [["--precision", "bf16"], ["--speed_layer", "false"]],
                         ids=["speed layer, bf16", "plain fp32"])
def test_command_line_smoke_run_end_to_end(tmp_path, speed):
    """The file's first command: it trains, logs loss, collapse diagnostics and k-NN, and saves weights,
    with the speed layer in bf16 (emulated on a CPU without bf16 units) and without the speed layer."""
    out = tmp_path / "smoke"
    rc, stdout, stderr = run_cli(["--smoke", "--output_dir", out, *speed], timeout=300)
    assert rc == 0 and stderr == "", stderr
    assert "done: teacher backbone in" in stdout and f"in {'bf16' if 'bf16' in speed else 'fp32'}" in stdout
    log = read_log(out)
    steps, knn = [r for r in log if r["type"] == "step"], [r for r in log if r["type"] == "knn"]
    assert steps and knn
    for r in steps:
        for key in ("loss", "h_teacher", "h_batch_mean", "kl", "feat_std", "eff_rank", "lr", "momentum"):
            assert math.isfinite(r[key]), key
        assert 0 <= r["h_teacher"] <= math.log(256) + 1e-4 and r["eff_rank"] >= 1 - 1e-4
    assert all(0 <= r["knn_top1"] <= 100 for r in knn)
    assert knn[-1]["knn_top1"] > 2 * 100 / 10  # 10 generated classes: well above chance
    ckpt = load_ckpt(out)
    assert {"student", "teacher", "optimizer", "scaler", "dino_loss", "it", "args"} <= ckpt.keys()
    assert ckpt["it"] == steps[-1]["it"]
    args = dm.parse_args(["--smoke"])
    vit = dm.build_vit(args)
    vit.load_state_dict(torch.load(out / "teacher_backbone.pth", weights_only=True), strict=True)
    assert_state_equal(vit.state_dict(), {k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items()
                                          if k.startswith("backbone.")}, "teacher backbone")


IMPOSSIBLE_FLAGS = [
    ["--global_crop_size", "36"], ["--local_crop_size", "12"],  # not a multiple of --patch_size 8
    ["--embed_dim", "65"],  # not a multiple of --num_heads
    ["--epochs", "0"], ["--batch_size_per_gpu", "0"], ["--batch_size_per_gpu", "-4"], ["--local_crops_number", "-1"],
    ["--num_workers", "-1"], ["--log_every", "0"], ["--out_dim", "0"], ["--depth", "0"], ["--warmup_epochs", "-1"],
    ["--epochs", "1", "--warmup_epochs", "2"], ["--warmup_teacher_temp_epochs", "-1"], ["--threads", "-1"],
    ["--knn_k", "0"], ["--pause_after_epochs", "-1"],
    ["--teacher_temp", "0"], ["--teacher_temp", "-0.04"], ["--warmup_teacher_temp", "0"], ["--student_temp", "0"],
    ["--global_crops_scale", "0", "1"], ["--local_crops_scale", "0.05", "1.5"], ["--global_crops_scale", "0.8", "0.4"],
    ["--momentum_teacher", "1.5"], ["--momentum_teacher_end", "1.01"], ["--center_momentum", "-0.1"],
    ["--drop_path_rate", "1.5"],
    ["--drop_path_rate", "-0.1"],
]


@pytest.mark.parametrize("flags", IMPOSSIBLE_FLAGS, ids=[" ".join(f) for f in IMPOSSIBLE_FLAGS])
def test_impossible_flags_are_one_error_line(tiny_data, tmp_path, capsys, flags):
    """Bad input: an impossible flag is refused before any work, in one line naming it."""
    err = expect_one_error_line(tiny_argv(tiny_data, tmp_path / "out", *flags), capsys)
    assert flags[0].lstrip("-") in err


def test_torchrun_two_cpu_processes_match_one_process_with_twice_the_batch(tmp_path):
    """Distributed (gloo): 2 x B equals 1 x 2B: same center (mean over both processes' batches), same steps."""
    data = dm.make_synthetic_images(tmp_path / "data", classes=2, per_class=16, size=40, seed=2)  # 24 to train on
    flags = ["--warmup_epochs", "0", "--drop_path_rate", "0", "--precision", "fp32"]  # 3 steps of 8, lr > 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(SCRIPT), *tiny_argv(data, tmp_path / "two", "--batch_size_per_gpu", "4", *flags)],
                         env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    assert run_main(tiny_argv(data, tmp_path / "one", *flags)) == 0
    assert run_main(tiny_argv(data, tmp_path / "init", *flags, "--lr", "0")) == 0  # lr 0: the initial weights
    two, one, init = load_ckpt(tmp_path / "two"), load_ckpt(tmp_path / "one"), load_ckpt(tmp_path / "init")
    assert two["it"] == one["it"] == 3
    torch.testing.assert_close(two["dino_loss"]["center"], one["dino_loss"]["center"], rtol=0, atol=1e-6)

    # the same 3 steps up to float rounding (reduction order): far below the size of the steps themselves
    assert distance(two["student"], one["student"]) < 1e-2 * distance(one["student"], init["student"])
    assert distance(two["teacher"], one["teacher"]) < 1e-2 * distance(one["teacher"], init["teacher"])
