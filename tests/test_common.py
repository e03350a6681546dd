"""Tests of common.py: backbones, nt_xent (SimCLR's NT-Xent), EMA, LR schedules, checkpoints and resume,
run directories, the dataclass -> argparse helper and the progress line. CPU only, tiny models."""
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typing import Optional
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
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


def test_nt_xent_identical_vectors_give_log_2b_minus_1():
    b = 5
    z = torch.randn(1, 8).repeat(b, 1)
    loss = common.nt_xent(z, z.clone(), 0.1, reduction="none")
    assert loss.shape == (2 * b,) and loss.dtype == torch.float32
    assert torch.allclose(loss, torch.full((2 * b,), math.log(2 * b - 1)), atol=1e-5)


def test_nt_xent_temperature_forms_and_weights_agree():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 16), torch.randn(6, 16)
    scalar = common.nt_xent(z1, z2, 0.2, reduction="none")
    assert torch.allclose(common.nt_xent(z1, z2, torch.full((6,), 0.2), reduction="none"), scalar)
    assert torch.allclose(common.nt_xent(z1, z2, torch.full((12,), 0.2), reduction="none"), scalar)
    assert torch.allclose(common.nt_xent(z1, z2, torch.tensor(0.2), reduction="none"), scalar)
    ones = common.nt_xent(z1, z2, 0.2, weight=torch.ones(12))
    assert torch.allclose(ones, scalar.mean()) and torch.allclose(common.nt_xent(z1, z2, 0.2), scalar.mean())
    # per image (B,) temperature = the same values repeated for both views (2B,)
    tau_b = torch.rand(6) * 0.5 + 0.1
    assert torch.allclose(common.nt_xent(z1, z2, tau_b, reduction="none"),
                          common.nt_xent(z1, z2, torch.cat([tau_b, tau_b]), reduction="none"))


def test_nt_xent_per_anchor_matches_loop():
    torch.manual_seed(1)
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    tau, weight = torch.rand(8) * 0.5 + 0.05, torch.rand(8) * 2
    got = common.nt_xent(z1, z2, tau, weight=weight, reduction="none")
    want = nt_xent_loop(z1, z2, tau.double(), weight.double())
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(common.nt_xent(z1, z2, tau, weight=weight), want.mean().float(), atol=1e-5)
    with pytest.raises(ValueError):
        common.nt_xent(z1, z2, torch.rand(5))


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
# EMA and schedules
# ------------------------------------------------------------------------------------------------------------


def _bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    net[1].running_mean.normal_()
    net[1].running_var.uniform_(0.5, 2)
    net[1].num_batches_tracked += seed + 1
    return net


def test_ema_update_formula_and_buffers():
    src = _bn_net(1)
    for tau in (0.0, 1.0, 0.9):
        tgt = _bn_net(2)
        before = {k: v.clone() for k, v in tgt.state_dict().items()}
        common.ema_update(tgt, src, tau, buffers="none")
        for (name, p), q in zip(tgt.named_parameters(), src.parameters()):
            want = tau * before[name] + (1 - tau) * q
            if tau in (0.0, 1.0):
                assert torch.equal(p, q if tau == 0.0 else before[name])
            assert torch.allclose(p, want, atol=1e-7)
        assert torch.equal(tgt[1].running_mean, before["1.running_mean"])  # "none": buffers untouched
    tgt, old = _bn_net(2), _bn_net(2)
    common.ema_update(tgt, src, 0.9, buffers="ema")
    want = 0.9 * old[1].running_mean + 0.1 * src[1].running_mean
    assert torch.allclose(tgt[1].running_mean, want, atol=1e-7)
    assert tgt[1].num_batches_tracked == src[1].num_batches_tracked  # integer buffers are copied
    with pytest.raises(ValueError):
        common.ema_update(tgt, src, 0.9, buffers="mean")


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


def test_set_lr_sets_every_group():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1.0)
    common.set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]


# ------------------------------------------------------------------------------------------------------------
# Checkpoints, resume, run directories
# ------------------------------------------------------------------------------------------------------------


def _train(model, opt, steps, start):
    """Deterministic toy training: fixed data plus noise from the global torch / numpy / python RNGs."""
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    head_w = torch.randn(4, 64, generator=g)
    for step in range(start, start + steps):
        common.set_lr(opt, common.cosine_lr(step, 6, 2, 0.1))
        noise = torch.randn_like(x) * 0.1 + float(np.random.rand()) * 0.01 + random.random() * 0.01
        loss = F.cross_entropy(model(x + noise) @ head_w.T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _fresh():
    model = common.build_backbone("resnet8")
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def test_resume_reproduces_straight_run(tmp_path):
    common.seed_everything(0)
    model, opt = _fresh()
    _train(model, opt, 5, 0)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    common.seed_everything(0)
    model, opt = _fresh()
    _train(model, opt, 3, 0)
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                                  "rng": common.rng_state(), "args": {"lr": 0.1, "milestones": [1, 2]}})
    _train(model, opt, 4, 3)  # the interrupted run goes on and draws random numbers: resume must not care

    common.seed_everything(99)
    model, opt = _fresh()
    state = common.load_checkpoint(path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    common.set_rng_state(state["rng"])
    assert state["epoch"] == 3 and state["args"] == {"lr": 0.1, "milestones": [1, 2]}
    _train(model, opt, 2, state["epoch"])
    resumed = model.state_dict()
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_rng_state_round_trip(tmp_path):
    common.seed_everything(3)
    state = common.rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random())
    common.save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    common.seed_everything(4)
    common.set_rng_state(common.load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_killed_checkpoint_write_keeps_previous_and_truncated_file_is_a_user_error(tmp_path):
    # a child process saves a good checkpoint, then is SIGKILLed half-way through writing the next one
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        import common
        path = {str(tmp_path / "checkpoint.pt")!r}
        common.save_checkpoint(path, {{"epoch": 1, "w": torch.arange(50000.0)}})
        def dying_save(obj, f):
            f.write(b"PK\\x03\\x04 partial checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        common.save_checkpoint(path, {{"epoch": 2, "w": torch.zeros(50000)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode != 0  # killed
    good = common.load_checkpoint(tmp_path / "checkpoint.pt")
    assert good["epoch"] == 1 and torch.equal(good["w"], torch.arange(50000.0))
    leftover = tmp_path / "checkpoint.tmp"  # only the tmp file is lost
    assert leftover.is_file()
    with pytest.raises(UserError) as err:
        common.load_checkpoint(leftover)
    msg = str(err.value)
    assert "\n" not in msg and str(leftover) in msg and "--resume" in msg

    # a checkpoint truncated outside the program (e.g. a partial copy)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        common.load_checkpoint(cut)
    assert "\n" not in str(err.value) and str(cut) in str(err.value)
    assert common.load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    with pytest.raises(UserError, match="does not exist"):
        common.load_checkpoint(tmp_path / "nope.pt")


def test_failed_write_in_process_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    common.save_checkpoint(path, {"epoch": 1})

    def failing_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError):
        common.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert common.load_checkpoint(path) == {"epoch": 1}
    assert not (tmp_path / "checkpoint.tmp").exists()


def test_non_weights_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": common.Progress(1, 1)}, path)  # arbitrary pickled class: weights_only must refuse it
    with pytest.raises(UserError, match="unreadable"):
        common.load_checkpoint(path)


def test_make_run_dir_new_auto_and_paths(tmp_path):
    out = tmp_path / "runs"
    first = common.make_run_dir("simclr", "cifar10-lt", out_dir=out)
    assert first.is_dir() and first.parent == out and first.name.startswith("simclr-cifar10-lt-")
    second = common.make_run_dir("simclr", "cifar10-lt", out_dir=out)
    assert second != first
    # auto without any checkpoint -> a new dir
    third = common.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume="auto")
    assert third not in (first, second) and third.is_dir()
    common.save_checkpoint(first / "checkpoint.pt", {"epoch": 1})
    other = common.make_run_dir("simclr", "cifar100-lt", out_dir=out)
    common.save_checkpoint(other / "checkpoint.pt", {"epoch": 1})
    assert common.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume="auto") == first
    common.save_checkpoint(second / "checkpoint.pt", {"epoch": 1})
    os.utime(second / "checkpoint.pt", (1e10, 1e10))  # written last
    assert common.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume="auto") == second
    assert common.make_run_dir("simclr", "cifar10-lt", out_dir=out,
                               resume=str(first / "checkpoint.pt")) == first
    assert common.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume=str(first)) == first
    with pytest.raises(UserError, match="does not exist") as err:
        common.make_run_dir("simclr", "cifar10-lt", out_dir=out,
                            resume=str(out / "missing" / "checkpoint.pt"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="without checkpoint.pt"):
        common.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume=str(third))


def test_json_metrics_and_config(tmp_path):
    common.save_json(tmp_path / "r.json", {"a": np.float32(1.5), "b": torch.tensor(2), "c": np.arange(3),
                                           "d": torch.tensor([1.0, 2.0]), "p": tmp_path})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1.5, "b": 2, "c": [0, 1, 2],
                                                             "d": [1.0, 2.0],
                                                             "p": str(tmp_path)}
    common.append_metrics(tmp_path, {"epoch": 1, "loss": torch.tensor(0.5)})
    common.append_metrics(tmp_path, {"epoch": 2, "loss": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s) for s in lines] == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]



# ------------------------------------------------------------------------------------------------------------
# Command line, errors, device, progress
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DemoArgs(common.RunArgs):
    """Demo method: the description shown by --help."""
    lr: Optional[float] = common.arg(None, "base LR (SDCLR code)", check=">0")
    amp_on: bool = common.arg(True, "use autocast")
    milestones: list[int] = common.arg([], "LR milestones", check=">=1")
    limit: Optional[int] = common.arg(None, "INFERRED: optional step limit", check=">=0")
    arch: str = common.arg("resnet18", "backbone", choices=["resnet18", "resnet32"])
    tau: float = common.arg(0.2, "temperature", check=">0")
    ratio: float = common.arg(0.5, "a ratio", check="[0,1)")
    batch_size: int = common.arg(64, "batch", check="batch")
    every: int = common.arg(5, "a diagnostic interval", runtime=True)


DEMO_DEFAULTS = {"*": {"lr": 0.5, "milestones": [10, 20]},
                 ("cifar10-lt", "cifar100-lt"): {"arch": "resnet32"},
                 "synthetic-lt": {"lr": 0.1, "milestones": lambda a: [a.limit or 3]}}


def test_parse_args_defaults_and_overrides():
    a, filled = common.parse_args(DemoArgs, [], DEMO_DEFAULTS)
    assert (a.lr, a.milestones, a.arch) == (0.5, [10, 20], "resnet32")
    assert filled == {"imb_ratio": 100.0, "lr": 0.5, "milestones": [10, 20], "arch": "resnet32"}
    b, filled = common.parse_args(DemoArgs, ["--lr", "0.1", "--no-amp-on", "--milestones", "3", "4", "5",
                                             "--resume", "auto", "--limit", "7", "--arch", "resnet18",
                                             "--imb-ratio", "10"], DEMO_DEFAULTS)
    assert (b.lr, b.amp_on, b.milestones, b.resume, b.limit, b.arch) == (0.1, False, [3, 4, 5], "auto", 7,
                                                                         "resnet18")
    assert filled == {}                                        # every flag given: the command line wins
    c, filled = common.parse_args(DemoArgs, ["--dataset", "synthetic-lt", "--limit", "9"], DEMO_DEFAULTS)
    assert (c.lr, c.milestones, c.arch) == (0.1, [9], "resnet18")
    assert filled == {"imb_ratio": 100.0, "lr": 0.1, "milestones": [9]}
    folder, filled = common.parse_args(DemoArgs, ["--dataset", "folder"], DEMO_DEFAULTS)
    assert folder.imb_ratio is None and filled["imb_ratio"] is None            # the tree as it is
    assert common.parse_args(DemoArgs, ["--amp-on", "--limit", "none"])[0].limit is None


def test_variant_label_and_paper_setting():
    paper = {"cifar100-lt": {"lr": 0.5, "arch": "resnet32", "protocol": None}}
    a = common.parse_args(DemoArgs, ["--dataset", "cifar100-lt"], DEMO_DEFAULTS)[0]
    assert common.variant_label(a, DEMO_DEFAULTS) == "default"
    assert common.paper_setting(a, paper, "cifar100-lt")
    assert not common.paper_setting(a, paper, "synthetic-lt")  # a dataset the paper does not name
    for flags in (["--lr", "0.4"], ["--arch", "resnet18"], ["--protocol", "ldam"]):
        b = common.parse_args(DemoArgs, ["--dataset", "cifar100-lt", *flags], DEMO_DEFAULTS)[0]
        assert not common.paper_setting(b, paper, "cifar100-lt")
        assert common.variant_label(b, DEMO_DEFAULTS) == " ".join(flags)
    b = common.parse_args(DemoArgs, ["--dataset", "cifar100-lt", "--no-amp-on", "--milestones", "5", "7"],
                          DEMO_DEFAULTS)[0]
    assert common.variant_label(b, DEMO_DEFAULTS) == "--no-amp-on --milestones 5 7"
    c = common.parse_args(DemoArgs, ["--dataset", "cifar100-lt", "--every", "2", "--seed", "3", "--device",
                                     "cpu"], DEMO_DEFAULTS)[0]
    assert common.variant_label(c, DEMO_DEFAULTS) == "default"
    assert common.paper_setting(c, paper, "cifar100-lt")


@pytest.mark.parametrize("bad", [["--arch", "vgg"], ["--lr", "fast"], ["--bogus"], ["--lr", "0"],
                                 ["--lr", "nan"], ["--tau", "-1"], ["--ratio", "1"], ["--limit", "-1"],
                                 ["--batch-size", "0"],
                                 ["--milestones", "0"], ["--imb-ratio", "0.5"], ["--dataset", "mnist"]])
def test_parse_args_errors_are_one_line(capsys, bad):
    flag = bad[0]
    with pytest.raises(SystemExit) as e:
        common.parse_args(DemoArgs, bad, DEMO_DEFAULTS)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and flag in err


def test_batch_size_is_checked_against_the_training_set():
    a = common.parse_args(DemoArgs, ["--batch-size", "64"])[0]
    common.check_args(a, train_size=64)
    with pytest.raises(UserError, match="--batch-size 64 is impossible.*at most the 63 training images"):
        common.check_args(a, train_size=63)


def test_parse_args_help_shows_docs_and_defaults(capsys):
    with pytest.raises(SystemExit):
        common.parse_args(DemoArgs, ["--help"], DEMO_DEFAULTS)
    text = " ".join(capsys.readouterr().out.split())
    assert "Demo method: the description shown by --help." in text
    assert "base LR (SDCLR code) (default: synthetic-lt: 0.1; others: 0.5; > 0)" in text
    assert "--amp-on, --no-amp-on use autocast (default: True)" in text
    assert "(default: cifar10-lt/cifar100-lt: resnet32; > 0)" not in text and "{resnet18,resnet32}" in text
    assert "INFERRED: optional step limit (default: None; >= 0)" in text
    assert text.index("method flags:") < text.index("runtime (shared by the four scripts):")


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


def test_device_amp_and_wrappers():
    dev, amp = common.setup_device("cpu", "auto")
    assert dev == torch.device("cpu") and amp is None
    assert common.setup_device("cpu", "bf16")[1] == torch.bfloat16
    assert common.setup_device("cpu", "off")[1] is None
    with pytest.raises(UserError, match="--amp"):
        common.setup_device("cpu", "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            common.setup_device("cuda", "auto")
    assert not common.make_scaler(torch.bfloat16).is_enabled() and not common.make_scaler(None).is_enabled()
    with common.autocast(dev, None):
        assert (nn.Linear(4, 4)(torch.randn(2, 4))).dtype == torch.float32
    with common.autocast(dev, torch.bfloat16):
        assert (nn.Linear(4, 4)(torch.randn(2, 4))).dtype == torch.bfloat16
    net = nn.Linear(2, 2)
    assert common.prepare_model(net, dev, compile=True) is net  # no compile on CPU unless forced
    assert common.unwrap(nn.DataParallel(net)) is net
    assert common.get_rank_world() == (0, 1) and common.is_main()


def test_seed_everything_reproduces():
    common.seed_everything(7)
    a = (torch.rand(2), np.random.rand(2), random.random())
    common.seed_everything(7)
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_progress_line(capsys):
    prog = common.Progress(total_steps=10, batch_size=4, every=3, prefix="simclr")
    lines = []
    for epoch in (1, 2):
        prog.set_epoch(epoch, 2)
        for it in range(5):
            step = (epoch - 1) * 5 + it
            lines.append(prog.step(step, loss=torch.tensor(1.23456), lr=0.4812))
    printed = [s for s in lines if s]
    # every 3 steps (steps 2, 5, 8), at the end of each epoch (4, 9) and at the last step
    assert [i for i, s in enumerate(lines) if s] == [2, 4, 5, 8, 9]
    assert capsys.readouterr().out.splitlines() == printed
    assert printed[0].startswith("[simclr] ep 1/2 it 3/5 | loss 1.2346 | lr 0.4812 | ")
    assert printed[-1].startswith("[simclr] ep 2/2 it 5/5 |") and printed[-1].endswith("ETA 0s")
    assert all(" img/s | ETA " in s for s in printed)
    assert common._fmt_duration(3725) == "1h02m" and common._fmt_duration(65) == "1m05s"
