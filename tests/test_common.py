"""Tests of common.py: backbones, nt_xent (SimCLR's NT-Xent), EMA, LR schedules, one optimiser step,
device and autocast set-up, safe file writes and checkpoint loads, the user-facing error. CPU only, tiny
models. The run harness (command line, run directories, a run's checkpoints, progress line) is tested in
test_harness.py."""
import json
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import harness
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------------------
# Backbones
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, map_size", [(32, 4), (64, 8), (224, 7)])
def test_resnet18_shapes(size, map_size):
    net = common.build_backbone("resnet18", image_size=size).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        pooled = net(x)
        pooled2, fmap = net(x, return_map=True)
    assert net.out_dim == 512 and pooled.shape == (1, 512)
    assert fmap.shape == (1, 512, map_size, map_size)
    assert net.feature_stride == size // map_size
    assert torch.equal(pooled, pooled2)
    assert torch.allclose(pooled, fmap.mean(dim=(2, 3)), atol=1e-6)
    if size <= 64:  # CIFAR stem: 3x3 stride-1 conv without bias, no max-pool (SDCLR / SimCLR CIFAR code)
        assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.bias is None
        assert isinstance(net.maxpool, nn.Identity)
    else:
        assert net.conv1.kernel_size == (7, 7) and isinstance(net.maxpool, nn.MaxPool2d)
    assert not any(k.startswith("fc.") for k in net.state_dict())


def test_resnet50_cifar_stem_at_64px():
    net = common.build_backbone("resnet50", image_size=64).eval()
    with torch.no_grad():
        pooled, fmap = net(torch.randn(1, 3, 64, 64), return_map=True)
    assert net.out_dim == 2048 and pooled.shape == (1, 2048) and fmap.shape == (1, 2048, 8, 8)
    assert net.feature_stride == 8


def test_resnet32_ldam_layout_and_size():
    net = common.build_backbone("resnet32")
    n_params = sum(p.numel() for p in net.parameters())
    assert 0.44e6 <= n_params <= 0.48e6, n_params
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3)] == [5, 5, 5]
    assert [s[0].conv1.out_channels for s in (net.layer1, net.layer2, net.layer3)] == [16, 32, 64]
    # option-A shortcuts have no parameters: every conv is a 3x3 conv of a block or the stem
    assert all(m.kernel_size == (3, 3) for m in net.modules() if isinstance(m, nn.Conv2d))
    pooled, fmap = net(torch.randn(2, 3, 32, 32), return_map=True)
    assert net.out_dim == 64 and pooled.shape == (2, 64) and fmap.shape == (2, 64, 8, 8)
    assert net.feature_stride == 4


def test_option_a_shortcut_is_subsample_and_zero_pad():
    block = common.build_backbone("resnet8").layer2[0]
    x = torch.randn(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_resnet8_trains_and_unknown_arch():
    net = common.build_backbone("resnet8")
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3)] == [1, 1, 1]
    out = net(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (4, 64) and all(p.grad is not None for p in net.parameters())
    with pytest.raises(UserError, match="resnet8"):
        common.build_backbone("vgg16")


def test_projection_mlp():
    head = common.projection_mlp(64, 32, 16, num_layers=3, bn=True, last_bn=True, bias_last=False)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 16)]
    assert linears[-1].bias is None and isinstance(head[-1], nn.BatchNorm1d) and head[-1].affine  # SDCLR
    assert head(torch.randn(5, 64)).shape == (5, 16)
    plain = common.projection_mlp(8, 8, 4, bn=False)
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]


# ------------------------------------------------------------------------------------------------------------
# nt_xent (SimCLR, Chen et al. 2020)
# ------------------------------------------------------------------------------------------------------------


def nt_xent_loop(z1, z2, tau, weight):
    """NT-Xent written anchor by anchor, in float64."""
    a = F.normalize(torch.cat([z1, z2]).double(), dim=-1)
    n, b = a.shape[0], z1.shape[0]
    losses = []
    for j in range(n):
        others = [k for k in range(n) if k != j]
        logits = torch.stack([a[j] @ a[k] for k in others]) / tau[j]
        pos = a[j] @ a[(j + b) % n] / tau[j]
        losses.append(weight[j] * (-pos + torch.logsumexp(logits, 0)))
    return torch.stack(losses)


def per_anchor_terms(z1, z2, tau, weight=None):
    """The (2B,) terms w_j l_j of nt_xent, read through one-hot weights: nt_xent(weight=e_j w) * 2B."""
    n = 2 * z1.shape[0]
    weight = torch.ones(n) if weight is None else weight
    return torch.stack([common.nt_xent(z1, z2, tau, weight=torch.eye(n)[j] * weight) * n for j in range(n)])


def test_nt_xent_identical_vectors_give_log_2b_minus_1():
    b = 5
    z = torch.randn(1, 8).repeat(b, 1)
    terms = per_anchor_terms(z, z.clone(), 0.1)
    assert terms.shape == (2 * b,) and terms.dtype == torch.float32
    assert torch.allclose(terms, torch.full((2 * b,), math.log(2 * b - 1)), atol=1e-5)
    assert common.nt_xent(z, z.clone(), 0.1) == pytest.approx(math.log(2 * b - 1), abs=1e-5)


def test_nt_xent_temperature_forms_and_weights_agree():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    scalar = per_anchor_terms(z1, z2, 0.2)
    assert torch.allclose(per_anchor_terms(z1, z2, torch.full((6,), 0.2)), scalar)
    assert torch.allclose(per_anchor_terms(z1, z2, torch.full((12,), 0.2)), scalar)
    assert torch.allclose(per_anchor_terms(z1, z2, torch.tensor(0.2)), scalar)
    ones = common.nt_xent(z1, z2, 0.2, weight=torch.ones(12))
    assert torch.allclose(ones, scalar.mean()) and torch.allclose(common.nt_xent(z1, z2, 0.2), scalar.mean())
    assert torch.allclose(common.nt_xent(z1, z2, 0.2, weight=2.0), 2 * scalar.mean())   # a float weight
    # per image (B,) temperature = the same values repeated for both views (2B,)
    tau_b = torch.rand(6) * 0.5 + 0.1
    per_image = per_anchor_terms(z1, z2, tau_b)
    assert torch.allclose(per_image, per_anchor_terms(z1, z2, torch.cat([tau_b, tau_b])))
    assert not torch.allclose(per_image, scalar)
    with pytest.raises(TypeError):
        common.nt_xent(z1, z2, 0.2, reduction="none")         # always the weighted mean now


def test_nt_xent_per_anchor_matches_loop():
    torch.manual_seed(1)
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    tau, weight = torch.rand(8) * 0.5 + 0.05, torch.rand(8) * 2
    want = nt_xent_loop(z1, z2, tau.double(), weight.double())
    assert torch.allclose(per_anchor_terms(z1, z2, tau, weight).double(), want, atol=1e-5)
    assert torch.allclose(common.nt_xent(z1, z2, tau, weight=weight), want.mean().float(), atol=1e-5)
    w_b = torch.rand(4)                                       # a (B,) weight: both views of image i get w_i
    assert torch.allclose(common.nt_xent(z1, z2, tau, weight=w_b),
                          common.nt_xent(z1, z2, tau, weight=torch.cat([w_b, w_b])))
    with pytest.raises(ValueError, match="temperature"):
        common.nt_xent(z1, z2, torch.rand(5))
    with pytest.raises(ValueError, match="weight"):
        common.nt_xent(z1, z2, 0.1, weight=torch.rand(3))


def test_per_anchor_shapes():
    v = torch.tensor([1.0, 2.0, 3.0])
    assert common.per_anchor(v, 3, "x").tolist() == [1, 2, 3, 1, 2, 3]
    assert common.per_anchor(torch.arange(6), 3, "x").tolist() == list(range(6))
    assert common.per_anchor(torch.tensor(0.5), 3, "x").tolist() == [0.5]
    with pytest.raises(ValueError, match="x has 4 entries"):
        common.per_anchor(torch.ones(4), 3, "x")


def test_nt_xent_fp32_under_autocast_and_finite_gradients():
    torch.manual_seed(2)
    z1 = torch.randn(8, 16, requires_grad=True)
    z2 = torch.randn(8, 16)
    ref = common.nt_xent(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = common.nt_xent(z1, z2, 0.1)
    assert amp.dtype == torch.float32 and torch.allclose(amp, ref)  # logits stay fp32
    ref.backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------
# EMA, schedules, one optimiser step
# ------------------------------------------------------------------------------------------------------------


def _bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2)
    net[1].num_batches_tracked += seed + 1
    return net


def test_ema_update_formula_on_parameters_only():
    src = _bn_net(1)
    for decay in (0.0, 1.0, 0.9):
        tgt = _bn_net(2)
        before = {k: v.clone() for k, v in tgt.state_dict().items()}
        common.ema_update(tgt, src, decay)
        for (name, p), q in zip(tgt.named_parameters(), src.parameters()):
            want = decay * before[name] + (1 - decay) * q
            if decay in (0.0, 1.0):
                assert torch.equal(p, q if decay == 0.0 else before[name])
            assert torch.allclose(p, want, atol=1e-7)
        for name, buf in tgt.named_buffers():                    # buffers are left to the caller
            assert torch.equal(buf, before[name]), name
    wrapped = _bn_net(2)
    common.ema_update(nn.DataParallel(wrapped), src, 0.0)            # wrappers are looked through
    assert all(torch.equal(p, q) for p, q in zip(wrapped.parameters(), src.parameters()))
    with pytest.raises(TypeError):
        common.ema_update(_bn_net(2), src, 0.9, buffers="ema")       # no buffers argument any more
    with pytest.raises(ValueError, match="parameters"):
        common.ema_update(nn.Linear(4, 3), src, 0.9)


def test_cosine_lr_warmup_and_end():
    lr = [common.cosine_lr(s, 100, 10, 0.5, 0.01) for s in range(101)]
    assert lr[0] == pytest.approx(0.05) and lr[4] == pytest.approx(0.25) and lr[9] == pytest.approx(0.5)
    assert lr[10] == pytest.approx(0.5)
    assert lr[55] == pytest.approx((0.5 + 0.01) / 2)
    assert lr[100] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert common.cosine_lr(0, 10, 0, 1.0) == 1.0


def test_multistep_lr_sdclr_probe_epochs():
    lrs = {e: common.multistep_lr(e, 30.0, [10, 20]) for e in range(1, 31)}
    assert all(lrs[e] == pytest.approx(30.0) for e in range(1, 10))
    assert all(lrs[e] == pytest.approx(3.0) for e in range(10, 20))
    assert all(lrs[e] == pytest.approx(0.3) for e in range(20, 31))
    # the 0-based loops (LDAM / DSCL): milestones 120, 160 give x0.1 from the 121st epoch (index 120)
    assert common.multistep_lr(119, 0.1, [120, 160]) == pytest.approx(0.1)
    assert common.multistep_lr(120, 0.1, [120, 160]) == pytest.approx(0.01)
    assert common.multistep_lr(160, 0.1, [120, 160], gamma=0.5) == pytest.approx(0.025)


def test_set_lr_sets_every_group():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1.0)
    common.set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]


def _two_layers(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


def test_optimizer_step_clears_steps_and_keeps():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    ref, ref_opt = _two_layers()
    ref_opt.zero_grad()
    ref(x).square().mean().backward()
    ref_opt.step()
    for scaler in (None, common.make_scaler(None)):          # a disabled scaler is the plain step
        net, opt = _two_layers()
        for p in net.parameters():
            p.grad = torch.full_like(p, 100.0)                    # stale gradients are cleared first
        common.optimizer_step(net(x).square().mean(), opt, scaler)
        for p, q in zip(net.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-7)
    net, opt = _two_layers()
    kept = [p.detach().clone() for p in net[0].parameters()]
    common.optimizer_step(net(x).square().mean(), opt, keep=list(net[0].parameters()))
    assert all(torch.equal(p, k) for p, k in zip(net[0].parameters(), kept))     # kept: unchanged
    assert all(p.grad is None for p in net[0].parameters())
    assert all(torch.allclose(p, q) for p, q in zip(net[1].parameters(), ref[1].parameters()))


def test_broadcast_buffers_is_a_no_op_in_one_process():
    net = _bn_net(3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    common.broadcast_buffers(net)
    assert not common.several_processes()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------------------------------------
# Safe files: atomic writes, JSON, weights-only checkpoint loads
# ------------------------------------------------------------------------------------------------------------


def test_killed_write_keeps_previous_and_truncated_file_is_a_user_error(tmp_path):
    # a child process writes a good checkpoint, then is SIGKILLed half-way through writing the next one
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        import data
        path = {str(tmp_path / "checkpoint.pt")!r}
        data.atomic_write(path, lambda f: torch.save({{"epoch": 1, "w": torch.arange(50000.0)}}, f))
        def dying_save(obj, f):
            f.write(b"PK\\x03\\x04 partial checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        data.atomic_write(path, lambda f: dying_save({{"epoch": 2}}, f))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode != 0  # killed
    good = data.load_checkpoint(tmp_path / "checkpoint.pt")
    assert good["epoch"] == 1 and torch.equal(good["w"], torch.arange(50000.0))
    leftover = tmp_path / "checkpoint.pt.tmp"  # only the tmp file (<name>.tmp) is lost
    assert leftover.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt",
                                                                                 "checkpoint.pt.tmp"]
    with pytest.raises(UserError) as err:
        data.load_checkpoint(leftover)
    msg = str(err.value)
    assert "\n" not in msg and str(leftover) in msg and "--resume" in msg and "unreadable" in msg

    # a checkpoint truncated outside the program (e.g. a partial copy); the message names the flag given
    raw = (tmp_path / "checkpoint.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError) as err:
        data.load_checkpoint(cut, flag="--ckpt")
    msg = str(err.value)
    assert "\n" not in msg and str(cut) in msg and "--ckpt" in msg and "--resume" not in msg
    assert data.load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    with pytest.raises(UserError, match="--ckpt .*no such checkpoint file"):
        data.load_checkpoint(tmp_path / "nope.pt", flag="--ckpt")


def test_failed_write_in_process_keeps_previous(tmp_path):
    path = tmp_path / "out.json"
    data.save_json(path, {"epoch": 1})

    def failing_write(f):
        f.write(b"partial")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        data.atomic_write(path, failing_write)
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert not (tmp_path / "out.json.tmp").exists()
    data.atomic_write(tmp_path / "new" / "deeper" / "f.bin", lambda f: f.write(b"x"))   # parents made
    assert (tmp_path / "new" / "deeper" / "f.bin").read_bytes() == b"x"


class Opaque:
    """An arbitrary class: a weights-only load must refuse its pickle."""


def test_non_weights_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Opaque()}, path)
    with pytest.raises(UserError, match="unreadable"):
        data.load_checkpoint(path)
    torch.save({"w": torch.ones(2), "n": 3, "s": "x", "l": [1, (2, 3)]}, path)      # weights, plain data
    got = data.load_checkpoint(path)
    assert torch.equal(got["w"], torch.ones(2)) and got["n"] == 3 and got["l"] == [1, (2, 3)]


def test_save_json_converts_numbers_arrays_and_paths(tmp_path):
    data.save_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": torch.tensor(2), "c": np.arange(3),
                                           "d": torch.tensor([1.0, 2.0]), "p": tmp_path,
                                           "t": (1, 2), "dt": torch.float32, "dev": torch.device("cpu")})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1.5, "b": 2, "c": [0, 1, 2],
                                                             "d": [1.0, 2.0], "p": str(tmp_path),
                                                             "t": [1, 2], "dt": "torch.float32",
                                                             "dev": "cpu"}
    assert (tmp_path / "r.json").read_text().endswith("}\n")
    assert data.to_json({3, 1}) in ([1, 3], [3, 1])
    with pytest.raises(TypeError, match="Opaque"):
        data.to_json(Opaque())


# ------------------------------------------------------------------------------------------------------------
# Errors, device, seeds
# ------------------------------------------------------------------------------------------------------------


def test_user_errors_and_fatal(capsys):
    with pytest.raises(SystemExit) as e:
        with common.user_errors():
            raise UserError("dataset folder ./data/x is missing; pass --data-dir")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: dataset folder ./data/x is missing; pass --data-dir\n"
    with pytest.raises(SystemExit) as e:
        with common.user_errors():
            raise KeyboardInterrupt
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        common.fatal("two\n   lines", code=1)
    assert e.value.code == 1 and capsys.readouterr().err == "error: two lines\n"     # always one line


def test_device_amp_and_wrappers():
    dev, amp = common.setup_device("cpu", "auto")
    assert dev == torch.device("cpu") and amp is None
    assert common.setup_device("cpu", "bf16")[1] == torch.bfloat16
    assert common.setup_device("cpu", "off")[1] is None
    assert [common.amp_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "off"]
    with pytest.raises(UserError, match="--amp"):
        common.setup_device("cpu", "fp8")
    with pytest.raises(UserError, match="--device"):
        common.setup_device("gpu7", "auto")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            common.setup_device("cuda", "auto")
    assert not common.make_scaler(torch.bfloat16).is_enabled() and not common.make_scaler(None).is_enabled()
    with common.autocast(dev, None):
        assert (nn.Linear(4, 4)(torch.randn(2, 4))).dtype == torch.float32
    with common.autocast(dev, torch.bfloat16):
        assert (nn.Linear(4, 4)(torch.randn(2, 4))).dtype == torch.bfloat16
    net = nn.Linear(2, 2)
    compiled = common.prepare_model(net, dev, compile=True)  # on the CPU too (compiled at its first call)
    assert compiled is not net and common.unwrap(compiled) is net
    assert common.unwrap(nn.DataParallel(net)) is net
    assert common.get_rank_world() == (0, 1) and common.is_main()


def test_prepare_model_channels_last_only_when_asked_and_on_cuda():
    conv = nn.Conv2d(3, 8, 3)
    assert common.prepare_model(conv, "cpu") is conv
    assert conv.weight.is_contiguous()                           # default: channels_last off
    common.prepare_model(conv, "cpu", channels_last=True)        # CPU: left as it is
    assert conv.weight.is_contiguous()
    if torch.cuda.is_available():
        assert not common.prepare_model(nn.Conv2d(3, 8, 3), "cuda").weight.is_contiguous(
            memory_format=torch.channels_last)
        cl = common.prepare_model(nn.Conv2d(3, 8, 3), "cuda", channels_last=True)
        assert cl.weight.is_contiguous(memory_format=torch.channels_last)


def test_seed_everything_reproduces():
    harness.seed_everything(7)
    a = (torch.rand(2), np.random.rand(2), random.random())
    harness.seed_everything(7)
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_epoch_seed_is_a_function_of_seed_epoch_stream_and_rank(monkeypatch):
    seeds = {common.epoch_seed(s, e, k) for s in (0, 1) for e in (0, 1, 2) for k in (0, 1)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert common.epoch_seed(3, 5, 1) == common.epoch_seed(3, 5, 1)
    single = common.epoch_seed(3, 5)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert common.epoch_seed(3, 5) != single                               # each process its own stream
    assert common.epoch_seed(3, 5, per_process=False) == single            # the shared data order
    monkeypatch.setenv("RANK", "0")
    assert common.epoch_seed(3, 5) == single                               # process 0: the 1-process one
