"""Tests for fassl.py: the losses of Eq. (1)-(4) and SDCLR's NT-Xent, pruning and dual BN; the Eq. (3)
weights on a CIFAR-10-LT-like toy; the frozen teacher of --ema-decay 1; the DEFAULTS (seeds, derived
defaults) and the paper rule (a paper setting = a cell of PAPER_ALL); the probe settings at 224 px and on
Places-LT; end-to-end runs on synthetic-lt with exact resume, also alternating (Table 7); the training steps
without host synchronisation."""
import contextlib
import copy
import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import data
import eval as evaluation
import fassl
import harness

# rho 8: a tail of exactly 3 (of 24) or 2 (of 16) images, a tail the data can build (data.check_buildable)
TINY = ["--dataset", "synthetic-lt", "--n-max", "24", "--synthetic-n-test", "4", "--imb-ratio",
        "8", "--arch", "resnet8", "--batch-size", "32", "--num-prototypes", "16", "--probe-epochs", "1",
        "--probe-aug", "none", "--device", "cpu", "--lr-warmup-epochs", "1", "--workers", "0",
        "--print-every", "1000"]


def parse(*argv):             # as fassl.main parses: --no-init is --init scratch
    argv = [w for a in argv for w in (["--init", "scratch"] if a == "--no-init" else [a])]
    return harness.parse_args(fassl.Args, argv, fassl.DEFAULTS, fassl.derived_defaults)


# ----------------------------------------------------------------------------------------------------------
# NT-Xent of SDCLR / SimCLR (common.nt_xent, re-exported by fassl)
# ----------------------------------------------------------------------------------------------------------
def test_nt_xent_identical_embeddings_gives_log_2b_minus_1():
    B = 6
    z = torch.ones(B, 5)
    assert fassl.nt_xent is common.nt_xent
    assert fassl.nt_xent(z, z, 0.2).item() == pytest.approx(math.log(2 * B - 1), rel=1e-5)


def test_nt_xent_near_zero_when_pairs_coincide_and_negatives_are_far():
    z = torch.eye(4, 8) * 3.0                                  # positives identical, negatives orthogonal
    assert fassl.nt_xent(z, z.clone(), 0.05).item() < 1e-6
    assert fassl.nt_xent(z, z.clone(), 1.0).item() > 0.5       # not a degenerate zero: depends on tau


def test_nt_xent_decreases_when_embeddings_are_optimised():
    torch.manual_seed(0)
    z1 = torch.randn(8, 16, requires_grad=True)
    z2 = torch.randn(8, 16, requires_grad=True)
    opt = torch.optim.SGD([z1, z2], lr=0.5)
    losses = []
    for _ in range(20):
        loss = fassl.nt_xent(z1, z2, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_nt_xent_bf16_inputs_are_finite():
    z = torch.randn(16, 32).bfloat16() * 100
    assert torch.isfinite(fassl.nt_xent(z, z + 1, 0.1))


# ----------------------------------------------------------------------------------------------------------
# SDCLR: global magnitude mask and dual BN
# ----------------------------------------------------------------------------------------------------------
def make_net(prune=True):
    torch.manual_seed(0)
    return fassl.Encoder("resnet8", 32, 16, proj_layers=3, prune=prune)


def test_pruning_mask_keeps_top_magnitudes_of_backbone_convs_only():
    net = make_net()
    convs = {f"backbone.{n}" for n, m in net.backbone.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(net.prunable) == convs and len(convs) > 0
    assert not any(n.startswith("head") for n in net.prunable)
    kept = fassl.update_mask(net, 0.9)
    n_total = sum(net.get_parameter(n + ".weight").numel() for n in net.prunable)
    assert kept == pytest.approx(0.1, abs=2.0 / n_total)
    w = torch.cat([net.get_parameter(n + ".weight").abs().flatten() for n in net.prunable])
    m = torch.cat([net.get_buffer(f"mask{net.prunable.index(n)}").flatten() for n in net.prunable])
    assert w[m].min() >= w[~m].max()                           # global magnitude threshold
    # masks exist only for backbone convs: BN and head parameters are never masked
    mask_names = [n for n, _ in net.named_buffers() if n.startswith("mask")]
    assert len(mask_names) == len(convs)
    # the dense weights themselves are untouched by pruning
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("mask__")}
    net.train()
    net(torch.randn(4, 3, 32, 32), pruned=True)
    for k, v in net.named_parameters():
        assert torch.equal(v, before[k])


def test_pruned_branch_equals_dense_when_nothing_is_pruned_and_differs_after_pruning():
    net = make_net().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), net(x, pruned=True), atol=1e-5)   # all-ones mask, identical BN copies
        fassl.update_mask(net, 0.9)
        assert not torch.allclose(net(x), net(x, pruned=True), atol=1e-3)


def test_branches_keep_separate_batchnorm_statistics_and_affine_parameters():
    net = make_net().train()
    dense_bn = net.get_submodule(net.bns[0])
    pruned_bn = net.pruned_bn[0]
    head_bn = net.get_submodule([n for n in net.bns if n.startswith("head")][0])
    head_pruned_bn = net.pruned_bn[[i for i, n in enumerate(net.bns) if n.startswith("head")][0]]
    d0, p0 = dense_bn.running_mean.clone(), pruned_bn.running_mean.clone()
    hd0, hp0 = head_bn.running_var.clone(), head_pruned_bn.running_var.clone()
    net(torch.rand(8, 3, 32, 32) + 1.0).sum()                 # dense branch only
    assert not torch.equal(dense_bn.running_mean, d0) and torch.equal(pruned_bn.running_mean, p0)
    assert not torch.equal(head_bn.running_var, hd0) and torch.equal(head_pruned_bn.running_var, hp0)
    d1 = dense_bn.running_mean.clone()
    fassl.update_mask(net, 0.5)
    out = net(torch.rand(8, 3, 32, 32) - 1.0, pruned=True)   # pruned branch only
    assert torch.equal(dense_bn.running_mean, d1) and not torch.equal(pruned_bn.running_mean, p0)
    out.pow(2).sum().backward()
    assert pruned_bn.weight.grad is not None and dense_bn.weight.grad is None
    conv = net.prunable[0]
    grad, mask = net.get_parameter(conv + ".weight").grad, net.get_buffer(f"mask{net.prunable.index(conv)}")
    assert torch.all(grad[~mask] == 0) and grad[mask].abs().sum() > 0    # pruned-away weights: no grad here


# ----------------------------------------------------------------------------------------------------------
# Eq. (1)-(3): prototype loss, frequency weights, re-balanced loss
# ----------------------------------------------------------------------------------------------------------
def test_prototype_contrastive_loss_trains_teacher_and_prototypes():
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    P = torch.randn(32, 16, requires_grad=True)
    loss = fassl.prototype_contrastive_loss(z1, z2, P, beta=0.2)
    loss.backward()
    assert torch.isfinite(loss) and z1.grad.abs().sum() > 0 and P.grad.abs().sum() > 0
    h = fassl.prototype_similarities(z1, P)
    assert h.shape == (8, 32) and h.abs().max() <= 1 + 1e-5   # cosine similarities (Eq. 1 with normalisation)
    assert fassl.prototype_contrastive_loss(z1, z1, P, 0.2).item() == pytest.approx(
        fassl.nt_xent(h, h, 0.2).item(), rel=1e-5)


def test_frequency_weights_favour_samples_far_from_the_prototypes():
    torch.manual_seed(0)
    P = torch.randn(16, 8)
    centre = torch.nn.functional.normalize(P, dim=-1).sum(0)
    z = torch.randn(10, 8)
    z[0], z[1] = centre, -centre                               # most / least prototype-similar samples
    w = fassl.frequency_weights(z, P)
    assert w[0] < w[1] and w[0] == w.min() and w[1] == w.max()
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    # without clipping, exactly phi_i / mean(phi) with phi = 1 / exp(s) (Eq. 3, --weight-norm literal)
    s = torch.nn.functional.normalize(z, dim=-1) @ centre
    phi = torch.exp(-s.double())
    w0 = fassl.frequency_weights(z, P, clip_sigma=0, norm="literal").double()
    assert torch.allclose(w0, phi / phi.mean(), rtol=1e-4)
    u = (s - s.mean()) / s.std(unbiased=False)                 # zscore: the same form in batch std units
    w1 = fassl.frequency_weights(z, P, clip_sigma=0).double()
    assert torch.allclose(w1, torch.exp(-u.double()) / torch.exp(-u.double()).mean(), rtol=1e-4)


def test_frequency_weights_clipping_bounds_outliers():
    torch.manual_seed(0)
    P = torch.randn(64, 8)
    centre = torch.nn.functional.normalize(P, dim=-1).sum(0)
    z = torch.randn(32, 8)
    z[0] = -centre                                             # one sample far from every prototype
    s = torch.nn.functional.normalize(z, dim=-1) @ centre
    w_raw, w = (fassl.frequency_weights(z, P, clip_sigma=c, norm="literal") for c in (0.0, 2.0))
    assert w_raw[0] > 25                                       # unclipped: the outlier takes most weight
    assert w[0] < 0.75 * w_raw[0] and w[0] == w.max()          # clipped: still the largest, but bounded
    assert (w.max() / w.min()).log() <= 4 * s.std(unbiased=False) + 1e-4     # s within mu +- 2 sigma
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    wz = fassl.frequency_weights(z, P)                         # zscore: w_max / w_min <= e^(2c), any sigma
    assert wz[0] == wz.max() and (wz.max() / wz.min()).log() <= 4 + 1e-4
    assert wz.mean().item() == pytest.approx(1.0, abs=1e-5)


def lt_toy(seed=0, D=128, K=128, B=512):
    """The toy of the issue: CIFAR-10-LT counts (rho = 100), embeddings clustered by class, K prototypes drawn
    from the data (so they follow the class frequencies), a random batch of B. Returns z, P, y, counts."""
    counts = [round(5000 * 0.01 ** (i / 9)) for i in range(10)]          # 5000 ... 50
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(torch.tensor(counts))
    centres = torch.nn.functional.normalize(torch.randn(10, D, generator=g), dim=-1)
    noise = 0.5 * torch.randn(len(y), D, generator=g) / D ** 0.5               # within-class cosine ~ 0.9
    z = torch.nn.functional.normalize(centres[y] + noise, dim=-1)
    P = z[torch.randperm(len(y), generator=g)[:K]]
    batch = torch.randperm(len(y), generator=g)[:B]
    return z[batch], P, y[batch], counts


def ess(w):
    return float(w.sum() ** 2 / (w ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_weights_are_bounded_ordered_and_keep_the_sample_size_on_the_lt_toy(seed):
    z, P, y, counts = lt_toy(seed)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])[y]              # thirds: frequent / medium / rare
    inverse = 1.0 / torch.tensor(counts, dtype=torch.float)[y]           # class-balanced weights, same batch
    w = fassl.frequency_weights(z, P)                                    # the default post-processing
    assert torch.isfinite(w).all() and w.min() > 0 and w.max() / w.min() <= math.exp(4) + 1e-3   # bounded
    means = [float(w[group == g].mean()) for g in range(3)]
    assert means[0] < means[1] < means[2], means                         # frequent < medium < rare
    assert ess(w) >= ess(inverse), (ess(w), ess(inverse))
    literal = fassl.frequency_weights(z, P, norm="literal")              # what the issue measured
    assert ess(literal) < ess(inverse) and float(literal[group == 0].mean()) < 0.1       # collapsed
    stats = fassl.weight_stats(w, group)                                 # what metrics.jsonl logs
    assert set(stats) == {"w_sum", "count", "ess", "max", "min"}
    assert stats["ess"].item() == pytest.approx(ess(w), rel=1e-5)
    assert stats["count"].tolist() == [float((group == g).sum()) for g in range(3)]
    assert (stats["w_sum"] / stats["count"]).tolist() == pytest.approx(means, rel=1e-5)
    assert (stats["max"].item(), stats["min"].item()) == (w.max().item(), w.min().item())


def test_fixed_scale_weights_follow_the_mean_cosine_and_stay_uniform_without_a_signal():
    """--weight-norm fixed: w = B softmax(-s/K) with s/K clipped at its mean -+ c std; random
    prototypes (no frequency signal) leave the weights uniform, where the default's batch
    temperature still spreads them (ESS about half the batch, w_max / w_min = e^4)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 16, generator=g)
    P = torch.randn(128, 16, generator=g)
    fixed = fassl.frequency_weights(z, P, norm="fixed")
    zscore = fassl.frequency_weights(z, P, norm="zscore")
    assert ess(fixed) > 500 and ess(zscore) < 300
    assert float(zscore.max() / zscore.min()) == pytest.approx(math.exp(4), rel=1e-3)
    m = (torch.nn.functional.normalize(z, dim=-1)
         @ torch.nn.functional.normalize(P, dim=-1).sum(0)) / 128        # the mean cosine
    want = 512 * torch.softmax(-m.clamp(m.mean() - 2 * m.std(unbiased=False),
                                        m.mean() + 2 * m.std(unbiased=False)), dim=0)
    torch.testing.assert_close(fixed, want, rtol=1e-5, atol=1e-6)
    z, P, y, counts = lt_toy(0)                            # with a frequency signal: ordered, bounded
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])[y]
    w = fassl.frequency_weights(z, P, norm="fixed")
    means = [float(w[group == g].mean()) for g in range(3)]
    assert means[0] < means[1] < means[2] and float(w.max() / w.min()) <= math.exp(2) + 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_frequency_weights_are_finite_for_extreme_inputs(dtype):
    P = torch.ones(512, 4)                                     # every prototype identical: s in [-512, 512]
    z = torch.tensor([[1e4, 0, 0, 0], [-1e4, 0, 0, 0], [1, 1, 1, 1], [-3e3, 1, 0, 0]]).to(dtype)
    for clip, norm in ((0.0, "literal"), (2.0, "literal"), (0.0, "zscore"), (2.0, "zscore"),
                       (2.0, "fixed")):
        w = fassl.frequency_weights(z, P.to(dtype), clip_sigma=clip, norm=norm)
        assert w.dtype == torch.float32 and torch.isfinite(w).all()
        assert w.mean().item() == pytest.approx(1.0, abs=1e-4)
    w = fassl.frequency_weights(torch.zeros(3, 4, dtype=dtype), P)   # zero embeddings, sigma = 0
    assert torch.allclose(w, torch.ones(3))


def test_rebalanced_loss_is_weighted_normalised_mse():
    torch.manual_seed(0)
    p, z, w = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True), torch.rand(6) * 2
    loss = fassl.rebalanced_loss(p.bfloat16(), z, w)
    n = torch.nn.functional.normalize
    expected = (w * ((n(p.bfloat16().float(), dim=-1) - n(z, dim=-1)) ** 2).sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert z.grad is None and p.grad is not None              # teacher target is stop-gradient
    assert fassl.rebalanced_loss(z, z, torch.ones(6)).item() == pytest.approx(0.0, abs=1e-6)




# ----------------------------------------------------------------------------------------------------------
# Eq. (4): EMA teacher, inside the Stage-2 step
# ----------------------------------------------------------------------------------------------------------
def test_ema_update_matches_formula():
    torch.manual_seed(0)
    t, s = (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(2))
    s(torch.randn(8, 4))                                       # give the student different BN statistics
    t0 = {k: v.clone() for k, v in t.state_dict().items()}
    fassl.update_teacher(t, s, 0.99)
    for k, v in t.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.99 * t0[k] + 0.01 * s.state_dict()[k], atol=1e-6), k
        else:                                                  # num_batches_tracked: the teacher's own
            assert torch.equal(v, t0[k])


def stage2_step(args, steps=1, weight_view="target", seed=0):
    """Stage 2 as train_fassl sets it up (F^S <- F^T, the teacher's BN statistics by the EMA alone): `steps`
    steps of rebalance_step on random images. Returns: teacher state before, teacher, student, (loss, w)."""
    torch.manual_seed(seed)
    args.weight_view = weight_view
    teacher, protos, q = fassl.networks(args, 32, None)
    student = copy.deepcopy(teacher)
    for bn in teacher.bns:
        teacher.get_submodule(bn).track_running_stats = False
    opt, scaler = fassl.sgd(args, [*student.parameters(), *q.parameters()]), common.make_scaler(None)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
        views = fassl.two_views(x, g, 32, False)
        out = fassl.rebalance_step(student, q, teacher, protos, opt, scaler, *views, args, None)
    return before, teacher, student, out


def test_ema_decay_zero_makes_the_teacher_the_student():
    before, teacher, student, (loss, w) = stage2_step(parse(*TINY, "--ema-decay", "0")[0])
    assert torch.isfinite(loss) and w.mean().item() == pytest.approx(1.0, abs=1e-5)
    after, moved = teacher.state_dict(), student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.allclose(after[k], moved[k], atol=1e-6) for k in after if after[k].is_floating_point())


def test_ema_decay_one_leaves_every_teacher_tensor_bit_identical(tmp_path):
    """Table 3's frozen teacher (tau = 1): parameters, BN running statistics and num_batches_tracked, after
    whole Stage-2 epochs (train_fassl) and after a few steps of rebalance_step."""
    args = parse(*TINY)[0]
    teacher, protos, _ = fassl.networks(args, 32, None)
    init = {"model": teacher.state_dict(), "prototypes": protos.state_dict(),      # a stage output's layout
            "state": {"proj_layers": args.proj_layers, "epochs": {"prototypes": 1}}}
    torch.save(init, tmp_path / "init.pt")
    run = fassl.main(TINY + ["--stage", "rebalance", "--init", str(tmp_path / "init.pt"), "--ema-decay", "1",
                             "--stage2-epochs", "2", "--knn-every", "0", "--probe", "--no-analyze",
                             "--out-dir", str(tmp_path / "runs")])
    out = torch.load(run / "stage_rebalance.pt", weights_only=True)
    want = init["model"]
    assert set(out["teacher"]) == set(want) == set(out["model"])    # "model": the student F^S
    assert all(torch.equal(out["teacher"][k], v) for k, v in want.items()), \
        [k for k, v in want.items() if not torch.equal(out["teacher"][k], v)]
    assert any(not torch.equal(out["model"][k], v) for k, v in want.items())       # the student did learn
    assert torch.equal(out["prototypes"]["weight"], init["prototypes"]["weight"])  # P frozen in Stage 2
    assert out["state"] == {"proj_layers": args.proj_layers, "epochs": {"rebalance": 2}}
    before, teacher, _, _ = stage2_step(parse(*TINY, "--ema-decay", "1")[0], steps=3)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_weights_from_the_mean_of_both_views():
    torch.manual_seed(0)
    t1, t2, P = torch.randn(16, 8), torch.randn(16, 8), torch.randn(32, 8)
    n = torch.nn.functional.normalize
    s = (n(t1, dim=-1) @ n(P, dim=-1).sum(0) + n(t2, dim=-1) @ n(P, dim=-1).sum(0)) / 2
    w = fassl.frequency_weights(torch.stack([t1, t2]), P, clip_sigma=0, norm="literal")
    assert torch.allclose(w, 16 * torch.softmax(-s, 0), atol=1e-6)
    _, _, _, (loss, w) = stage2_step(parse(*TINY)[0], weight_view="mean")
    assert torch.isfinite(loss) and w.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert parse()[0].weight_view == "target"


def test_prototype_loss_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    z, P = torch.randn(8, 16), torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = fassl.prototype_similarities(z.bfloat16(), P)
        w = fassl.frequency_weights(z.bfloat16(), P)
    assert h.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.allclose(h, fassl.prototype_similarities(z.bfloat16().float(), P), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# DEFAULTS (per dataset, synthetic-lt demo profile, derived defaults) and the paper rule: a run is a paper
# setting exactly when PAPER_ALL has a number for its (dataset, variant, rho)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,expected", [
    ("cifar10-lt", ("resnet18", 512, 2000, 100, 200, None, "crop", 0.9, 0.2, 3, "sdclr")),
    ("folder", ("resnet18", 512, 2000, 100, 200, None, "crop", 0.9, 0.2, 3, "sdclr")),
    ("imagenet100-lt", ("resnet50", 256, 500, 100, 200, None, "crop", 0.3, 0.3, 3, "sdclr")),
    ("places-lt", ("resnet50", 256, 500, 100, 200, None, "crop", 0.3, 0.3, 3, "sdclr"))])
def test_dataset_defaults(dataset, expected):
    a = parse("--dataset", dataset)[0]
    assert (a.arch, a.batch_size, a.sdclr_epochs, a.stage1_epochs, a.stage2_epochs, a.knn_every, a.probe_aug,
            a.prune_ratio, a.tau, a.proj_layers, a.protocol) == expected
    simclr = parse("--dataset", dataset, "--prune-ratio", "0")[0]
    assert (simclr.tau, simclr.proj_layers) == (0.2, 2)               # SimCLR: tau 0.2, 2-layer head


def test_derived_defaults_follow_the_other_flags_and_yield_to_given_ones():
    args, filled = parse("--dataset", "imagenet100-lt", "--prune-ratio", "0")
    assert filled["proj_layers"] == 2 and filled["tau"] == 0.2 and "prune_ratio" not in filled
    args, filled = parse("--dataset", "imagenet100-lt", "--tau", "0.5", "--proj-layers", "4")
    assert (args.tau, args.proj_layers) == (0.5, 4) and not {"tau", "proj_layers"} & set(filled)
    assert parse("--tau", "0.3")[0].tau == 0.3 and parse()[0].tau == 0.2       # 0.3: the 224-px SDCLR only
    # a flag set by derived_defaults is compared with what the run's other flags give it
    assert variant(parse("--prune-ratio", "0")[0]) == "--prune-ratio 0.0"
    assert variant(parse("--prune-ratio", "0", "--proj-layers", "2")[0]) == "--prune-ratio 0.0"
    assert variant(parse("--proj-layers", "2")[0]) == "--proj-layers 2"
    assert variant(parse("--dataset", "places-lt", "--prune-ratio", "0", "--tau", "0.3")[0]) == \
        "--prune-ratio 0.0 --tau 0.3"


@pytest.mark.parametrize("dataset,seed", [("cifar10-lt", 10), ("cifar100-lt", 10), ("imagenet100-lt", 1),
                                          ("places-lt", 0), ("tiny-imagenet-lt", 0), ("synthetic-lt", 0)])
def test_default_seed_is_the_sdclr_scripts_one(dataset, seed):
    args, filled = parse("--dataset", dataset)
    assert args.seed == seed and filled["seed"] == seed
    args, filled = parse("--dataset", dataset, "--seed", "3")
    assert args.seed == 3 and "seed" not in filled                       # an explicit flag wins
    assert variant(args) == "default"                                    # the seed is not a variant
    parser = harness.make_parser(fassl.Args, fassl.DEFAULTS, fassl.derived_defaults)
    helptext = " ".join(parser.format_help().split())
    assert "cifar10-lt/cifar100-lt: 10; imagenet100-lt: 1" in helptext


def test_synthetic_lt_demo_profile_fills_only_unset_fields():
    profile = fassl.DEFAULTS["synthetic-lt"]                            # the CPU demo
    assert profile == {"arch": "resnet8", "n_max": 500, "batch_size": 128, "sdclr_epochs": 30,
                       "stage1_epochs": 10, "stage2_epochs": 15, "knn_every": 0, "probe_aug": "none"}
    demo, filled = parse("--dataset", "synthetic-lt")
    assert {k: getattr(demo, k) for k in profile} == profile
    assert {k: filled[k] for k in profile} == profile
    assert (filled["proj_layers"], filled["protocol"], filled["tau"]) == (3, "sdclr", 0.2)
    assert (demo.prune_ratio, demo.tau, demo.num_prototypes, demo.ema_decay) == (0.9, 0.2, 128, 0.99)
    args, filled = parse("--dataset", "synthetic-lt", "--arch", "resnet20", "--batch-size", "64",
                         "--stage1-epochs", "7", "--probe-aug", "crop", "--knn-every", "2")
    assert (args.arch, args.batch_size, args.stage1_epochs, args.probe_aug, args.knn_every) == \
        ("resnet20", 64, 7, "crop", 2)                                    # explicit flags win
    assert not {"arch", "batch_size", "stage1_epochs", "probe_aug", "knn_every"} & set(filled)
    assert (args.sdclr_epochs, args.stage2_epochs) == (30, 15)
    assert variant(demo) == "default"
    assert variant(args).startswith("--arch resnet20")
    assert "--knn-every" not in variant(args)                             # a runtime flag: not a variant
    helptext = " ".join(harness.make_parser(fassl.Args, fassl.DEFAULTS, fassl.derived_defaults)
                        .format_help().split())
    for k, v in profile.items():
        assert f"synthetic-lt: {v}" in helptext, k


def variant(args):
    return harness.variant_label(args, fassl.DEFAULTS, fassl.derived_defaults)


def paper(*flags, ds="cifar10-lt", rho="args"):
    """The paper's number for the run of these flags (None: not a paper setting); rho: the dataset's,
    by default the run's --imb-ratio (the list datasets have none: pass None)."""
    args = parse("--dataset", ds, *flags)[0]
    return harness.paper_value(fassl.PAPER_ALL, ds, variant(args), args.imb_ratio if rho == "args" else rho)


def test_paper_rows_are_paper_settings():
    assert paper() == 80.69 and paper("--stage", "sdclr") == 80.49                                  # Tab. 1
    assert paper("--stage", "sdclr", "--prune-ratio", "0") == 75.37                                # SimCLR
    assert paper("--stage", "rebalance", "--no-init", "--no-reweight", "--stage2-epochs", "2000") == 75.66
    assert paper("--num-prototypes", "64") == 80.69 and paper("--ema-decay", "0.9") == 79.74        # Tab. 3
    assert paper("--ema-decay", "1") == 79.63 and paper("--ema-decay", "0") == 49.74
    assert paper("--no-init") == 76.11 and paper("--prune-ratio", "0") == 76.42                   # Tab. 9
    assert paper("--arch", "resnet34", ds="cifar100-lt") == 54.19 and paper("--arch", "resnet34") is None
    assert paper("--alternate-every", "10", ds="cifar100-lt") == 55.07                             # Tab. 7
    assert paper("--alternate-every", "5", ds="cifar100-lt") is None
    assert paper("--alternate-every", "10") is None                                           # cifar10-lt
    assert paper(ds="cifar100-lt") == 55.27 and paper(ds="tiny-imagenet-lt") == 45.85
    assert paper(ds="imagenet100-lt", rho=None) == 68.92 and paper(ds="places-lt", rho=None) == 22.89
    assert paper("--stage", "sdclr", "--prune-ratio", "0", ds="imagenet100-lt", rho=None) == 65.46
    assert paper("--stage", "sdclr", "--prune-ratio", "0", ds="places-lt", rho=None) is None   # not reported
    assert paper(ds="synthetic-lt") is None and paper(ds="imagenet-lt", rho=None) is None
    assert paper("--imb-ratio", "50") is None and paper(ds="tiny-imagenet-lt", rho=20.0) is None  # rho
    # the seed, runtime flags and a flag given at its default value leave it a paper setting
    assert paper("--seed", "3", "--device", "cpu", "--workers", "2", "--no-analyze", "--lr", "0.5") == 80.69
    assert paper("--proj-layers", "3", "--tau", "0.2") == 80.69                  # derived and plain defaults
    assert paper("--tau", "0.3", ds="imagenet100-lt", rho=None) == 68.92         # the 224-px SDCLR tau
    # an un-reported change makes it none, also on top of a reported row
    assert paper("--lr", "0.3") is None and paper("--epochs-scale", "0.5") is None
    assert paper("--probe-aug", "none") is None and paper("--stage", "sdclr", "--lr", "0.3") is None


NOT_PAPER = {"protocol": "ldam", "split": "2", "data_seed": "1", "imb_ratio": "50", "arch": "resnet34",
             "prune_ratio": "0.5", "tau": "0.5", "batch_size": "256", "sdclr_epochs": "1000",
             "proj_dim": "64", "proj_layers": "2", "dual_bn": None, "num_prototypes": "100", "beta": "0.1",
             "predictor_hidden": "256", "ema_decay": "0.95", "clip_sigma": "0", "lr": "0.3", "final_lr": "0",
             "momentum": "0.8", "weight_decay": "5e-4", "lr_warmup_epochs": "5", "stage1_epochs": "50",
             "stage2_epochs": "100", "epochs_scale": "0.5", "probe_aug": "none", "probe_epochs": "5",
             "weight_norm": "literal", "weight_view": "mean", "alternate_every": "5", "stage": "prototypes",
             "init": "stage_sdclr.pt", "reweight": None, "split_file": "d1.npy", "sdclr_split_dir": "splits",
             "num_classes": "5", "n_max": "100", "synthetic_n_test": "10", "probe": "full"}


@pytest.mark.parametrize("field", sorted(NOT_PAPER))
def test_paper_setting_turns_false_when_a_method_flag_changes(field):
    method_flags = {f.name for f in dataclasses.fields(fassl.Args)
                    if not f.metadata.get("runtime") and f.name not in ("dataset", "seed")}
    assert set(NOT_PAPER) == method_flags                              # every method flag is tried
    flag = "--" + field.replace("_", "-")
    flags = ["--no-" + flag[2:]] if NOT_PAPER[field] is None else [flag, NOT_PAPER[field]]
    assert paper() == 80.69
    assert paper(*flags) is None
    if field != "imb_ratio":                                          # rho is a column, not a variant
        assert flag[2:] in variant(parse("--dataset", "cifar10-lt", *flags)[0])  # e.g. "--no-dual-bn"


# ----------------------------------------------------------------------------------------------------------
# Final probes: eval.py's probe settings (batch 512 at 224 px; Places-LT trains on its train list)
# ----------------------------------------------------------------------------------------------------------
def _split(n_per_class, size, classes=3, seed=0):
    y = torch.arange(classes).repeat_interleave(n_per_class)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (len(y), 3, size, size), dtype=torch.uint8, generator=gen)
    return data.Split(y=y, x=x)


def _probe_args(*flags):
    args = parse("--arch", "resnet8", "--probe-aug", "none", "--probe-epochs", "1", "--device", "cpu",
                 *flags)[0]
    return args, common.build_backbone("resnet8", 224).state_dict()


def test_probe_at_224px_uses_the_datasets_probe_batch(monkeypatch):
    calls, real = [], evaluation.linear_probe

    def recording(*a, **kw):
        out = real(*a, **kw)
        calls.append(out["probe"])
        return out

    monkeypatch.setattr(evaluation, "linear_probe", recording)
    ds = data.LTDataset(name="imagenet100-lt", num_classes=3, class_names=["a", "b", "c"], image_size=224,
                        train=_split(2, 224), test=_split(2, 224, seed=1), val=_split(1, 224, seed=2),
                        probe=_split(3, 224, seed=3), fewshot=None, class_counts=[2, 2, 2],
                        class_rank=[0, 1, 2], lt_convention="list", image_source="canonical", imb_ratio=None,
                        split=None, tensor_resident=True)
    args, state = _probe_args()
    out = fassl.probe(state, args, ds, torch.device("cpu"), None)
    assert list(out) == ["full"] and len(calls) == 1                  # no few-shot split: skipped
    assert calls[0]["batch_size"] == 512 == evaluation.probe_settings(ds)["batch_size"]
    assert calls[0]["train_split"] == "probe" and calls[0]["n_train"] == 9


def test_places_lt_probes_on_its_train_list(tmp_path):
    from PIL import Image
    rs, lines = np.random.RandomState(0), []
    for c, n in enumerate([4, 2, 1]):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(n):
            pixels = rs.randint(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / f"c{c}" / f"{i}.jpg")
            lines.append(f"train/c{c}/{i}.jpg {c}")
    for name, rows in (("train", lines), ("val", lines[::2]), ("test", lines)):
        (tmp_path / f"Places_LT_{name}.txt").write_text("\n".join(rows) + "\n")
    ds = data.load_dataset("places-lt", str(tmp_path))
    assert ds.probe is None and ds.fewshot is None and ds.image_size == 224
    args, state = _probe_args("--dataset", "places-lt", "--workers", "0")
    out = fassl.probe(state, args, ds, torch.device("cpu"), None)
    assert list(out) == ["full"]
    settings = out["full"]["probe"]
    assert settings["train_split"] == "train" and settings["n_train"] == len(ds.train) == 7
    assert settings["batch_size"] == 512 and out["full"]["at_selected"]["acc_class_mean"] is not None


# ----------------------------------------------------------------------------------------------------------
# End to end: --stage all, interrupted in Stage 2 and resumed; exact resume of SDCLR; --init / --no-init
# ----------------------------------------------------------------------------------------------------------
def stopped(argv, out):
    """fassl.main ended by --stop-after-epochs (harness.StopRun; main_guard exits 0): the one run directory
    under `out`, its checkpoint written."""
    with pytest.raises(harness.StopRun, match="--resume"):
        fassl.main(argv)
    (run_dir,) = pathlib.Path(out).iterdir()
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "results.json").exists()
    return run_dir


def test_stage_all_runs_end_to_end_and_resumes_mid_stage(tmp_path):
    argv = TINY + ["--out-dir", str(tmp_path), "--sdclr-epochs", "1", "--stage1-epochs", "1",
                   "--stage2-epochs", "2", "--knn-every", "1", "--no-probe-teacher"]
    run_dir = stopped(argv + ["--stop-after-epochs", "3"], tmp_path)
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert (ck["stage"], ck["epoch"], ck["method"]) == ("rebalance", 1, "fassl")
    assert {"model", "teacher", "predictor", "prototypes", "optimizer_rebalance", "scaler"} <= set(ck)
    assert ck["state"] == {"proj_layers": 3, "epochs": {"rebalance": 1}}
    stage1 = torch.load(run_dir / "stage_prototypes.pt", weights_only=True)      # Stage 1's output
    assert (stage1["stage"], stage1["epoch"], stage1["state"]) == \
        ("prototypes", 1, {"proj_layers": 3, "epochs": {"prototypes": 1}})
    assert {"model", "prototypes", "optimizer_prototypes", "scaler"} <= set(stage1)
    assert not (run_dir / "results.json").exists() and (run_dir / "stage_prototypes.pt").exists()
    assert fassl.main(["--resume", str(run_dir / "checkpoint.pt")]) == run_dir    # the budget was per call
    res = json.loads((run_dir / "results.json").read_text())
    assert (res["method"], res["network_evaluated"], res["paper_setting"]) == ("fassl", "student", False)
    assert "paper_value" in res and res["paper_value"] is None
    assert "--num-prototypes 16" in res["variant"] and "--stage2-epochs 2" in res["variant"]
    assert res["epochs"] == {"stage0": 1, "stage1": 1, "stage2": 2, "probe": 1}
    for key in ("many", "medium", "few", "group_mean", "std"):
        assert res["at_selected"]["groups_thirds"][key] is not None
    assert res["extra"]["probe_few-shot"]["at_selected"]["groups_thirds"]["group_mean"] is not None
    assert "teacher_probe" not in res["extra"]
    share = res["extra"]["prototypes"]["share_percent"]
    assert sum(share.values()) == pytest.approx(100.0)
    assert len(res["extra"]["prototypes"]["nearest_index"]) == 16
    assert [k["stage"] for k in res["knn"]] == ["sdclr", "prototypes", "rebalance", "rebalance"]
    assert (run_dir / "prototype_grid.png").stat().st_size > 0
    rules = res["extra"]["prototypes"]["weight_rules"]           # the three Eq. (3) rules side by side
    assert list(rules) == ["zscore", "fixed", "literal"] and (run_dir / "weight_rules.png").is_file()
    for r in rules.values():
        assert 1 <= r["w_ess"] <= 32 and r["w_max_over_min"] >= 1
        assert {"w_mean_frequent", "w_mean_medium", "w_mean_rare"} <= set(r)
    assert rules["fixed"]["w_max_over_min"] <= math.exp(2) + 1e-3
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["epoch"]) for m in metrics] == [("sdclr", 1), ("prototypes", 1), ("rebalance", 1),
                                                           ("rebalance", 2)]
    assert 0.05 < metrics[0]["mask_kept"] < 0.15
    assert "protos_used" in metrics[1] and "w_mean_rare" in metrics[2]
    assert 1 <= metrics[2]["w_ess"] <= 32 and metrics[2]["w_min"] <= 1 <= metrics[2]["w_max"]    # batch 32
    assert all(k in metrics[3] for k in ("w_mean_frequent", "w_mean_medium", "w_ess"))
    assert len(res["extra"]["tsne"]["classes"]) == 5                  # Fig. 3: five classes, head to tail
    assert all((run_dir / f).stat().st_size > 0 for f in ("tsne_student.png", "tsne_sdclr.png"))
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    backbone = evaluation.submodule_state(final["model"], "backbone")        # eval.py --ckpt contract
    common.build_backbone("resnet8", 32).load_state_dict(backbone)
    assert all(torch.equal(v, fassl.backbone_of(final)[k]) for k, v in backbone.items())


def test_interrupted_sdclr_resumes_to_the_same_weights_and_records_the_demo_profile(tmp_path, capsys,
                                                                                    monkeypatch):
    argv = TINY + ["--stage", "sdclr", "--sdclr-epochs", "2", "--knn-every", "0", "--probe", "full",
                   "--no-analyze", "--n-max", "16"]
    # a paper table with a number for this run's (dataset, variant, rho): results.json and the final table
    # must carry it (the real PAPER_ALL has none on synthetic-lt)
    cell = ("synthetic-lt", variant(parse(*argv)[0]))
    assert cell[1].startswith("--n-max 16")
    assert harness.paper_value(fassl.PAPER_ALL, *cell, 8.0) is None
    monkeypatch.setattr(fassl, "PAPER_ALL", {cell: {8.0: 12.5}})
    straight = fassl.main(argv + ["--out-dir", str(tmp_path / "a")])
    out = capsys.readouterr().out               # stage 1 / 2 epochs are the only demo values left unset
    assert "defaults for synthetic-lt (a CPU demo profile, not a paper setting)" in out
    assert "--stage1-epochs 10" in out and "--arch resnet8" not in out.split("defaults for synthetic-lt")[1]
    cut = stopped(argv + ["--out-dir", str(tmp_path / "b"), "--stop-after-epochs", "1"], tmp_path / "b")
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] == 1
    capsys.readouterr()
    fassl.main(["--resume", str(cut)])
    out = capsys.readouterr().out
    assert "paper (groups_thirds.group_mean): 12.50 | ours" in out
    a = torch.load(straight / "stage_sdclr.pt", weights_only=True)
    b = torch.load(cut / "stage_sdclr.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["stage"] == b["stage"] == "sdclr"
    assert a["state"] == b["state"] == {"proj_layers": 3, "epochs": {"sdclr": 2}}
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    res = json.loads((cut / "results.json").read_text())
    assert res["method"] == "sdclr" and res["at_selected"]["acc_class_mean"] is not None
    assert (res["defaults_filled"]["stage1_epochs"], res["defaults_filled"]["stage2_epochs"]) == (10, 15)
    config = json.loads((cut / "config.json").read_text())
    assert config["filled_defaults"] == res["defaults_filled"] and "arch" not in config["filled_defaults"]
    assert res["variant"].startswith("--n-max 16") and "--stage sdclr" in res["variant"]
    assert res["paper_setting"] is True and list(res["extra"]) == ["probe_variant", "probe_full"]
    assert res["paper_value"] == {"metric": "groups_thirds.group_mean", "value": 12.5}
    # Stage 1 alone from that Stage-0 output, without a probe
    run = fassl.main(TINY + ["--stage", "prototypes", "--init", str(straight / "stage_sdclr.pt"), "--probe",
                             "--stage1-epochs", "1", "--no-analyze", "--n-max", "16",
                             "--out-dir", str(tmp_path / "c")])
    res = json.loads((run / "results.json").read_text())
    assert res["network_evaluated"] == "teacher" and res["at_selected"] is None
    assert (res["paper_setting"], res["paper_value"]) == (False, None)              # another variant
    assert res["epochs"] == {"stage0": 0, "stage1": 1, "stage2": 0, "probe": 0}


def test_no_init_skips_stage0_with_a_random_teacher(tmp_path):
    assert parse("--no-init")[0].init == "scratch" and parse()[0].init is None
    run_dir = stopped(TINY + ["--no-init", "--out-dir", str(tmp_path), "--stop-after-epochs", "1",
                              "--knn-every", "0"], tmp_path)
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["stage"] == "prototypes" and not (run_dir / "stage_sdclr.pt").exists()
    with pytest.raises(common.UserError, match="needs a teacher"):
        fassl.main(TINY + ["--stage", "rebalance", "--out-dir", str(tmp_path)])
    no_protos = {k: v for k, v in ck.items() if k != "prototypes"}          # e.g. a stage_sdclr.pt
    torch.save(no_protos, tmp_path / "no_protos.pt")
    with pytest.raises(common.UserError, match="has no prototypes"):
        fassl.main(TINY + ["--stage", "rebalance", "--init", str(tmp_path / "no_protos.pt")])


def test_alternate_every_takes_turns_and_resumes_exactly(tmp_path):
    """Table 7: --alternate-every 1 with 2 Stage-1 and 3 Stage-2 epochs runs P R P R R inside the Stage-2 loop
    (no stage_prototypes.pt); a run interrupted between blocks resumes to the same weights."""
    argv = TINY + ["--sdclr-epochs", "1", "--stage1-epochs", "2", "--stage2-epochs", "3", "--alternate-every",
                   "1", "--knn-every", "0", "--probe", "--no-analyze"]
    straight = fassl.main(argv + ["--out-dir", str(tmp_path / "a")])
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m.get("block")) for m in metrics] == [
        ("sdclr", None), *[("rebalance", b) for b in ("prototypes", "rebalance", "prototypes", "rebalance",
                                                       "rebalance")]]
    assert "protos_used" in metrics[1] and "w_ess" in metrics[2] and "w_ess" not in metrics[3]
    assert not (straight / "stage_prototypes.pt").exists()
    res = json.loads((straight / "results.json").read_text())
    assert res["epochs"] == {"stage0": 1, "stage1": 2, "stage2": 3, "probe": 0}
    assert "--alternate-every 1" in res["variant"]
    cut = stopped(argv + ["--out-dir", str(tmp_path / "b"), "--stop-after-epochs", "3"], tmp_path / "b")
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] == 2        # after 0, P, R
    fassl.main(["--resume", str(cut)])
    a, b = (torch.load(d / "stage_rebalance.pt", weights_only=True) for d in (straight, cut))
    for part in ("model", "teacher", "prototypes", "predictor"):
        for k, v in a[part].items():
            assert torch.allclose(v.float(), b[part][k].float(), atol=1e-6), (part, k)


@pytest.mark.parametrize("norm,view", [("zscore", "target"), ("literal", "mean")])
def test_training_steps_make_no_host_synchronisation(no_host_sync, norm, view):
    args = parse(*TINY, "--weight-norm", norm, "--weight-view", view)[0]
    torch.manual_seed(0)
    net = fassl.Encoder("resnet8", 32, 16, proj_layers=3, prune=True)
    fassl.update_mask(net, 0.5)                                            # once per epoch: may sync
    teacher, protos, q = fassl.networks(args, 32, None)
    student, K = copy.deepcopy(teacher), args.num_prototypes
    for bn in teacher.bns:
        teacher.get_submodule(bn).track_running_stats = False
    o0, o1 = fassl.sgd(args, net.parameters()), fassl.sgd(args, teacher.parameters(), protos.parameters())
    o2, sc = fassl.sgd(args, [*student.parameters(), *q.parameters()]), common.make_scaler(None)
    g, group = torch.Generator().manual_seed(0), torch.arange(8) % 3
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    for check in (False, True):                                            # warm up, then under the check
        views, usage, stats = fassl.two_views(x, g, 32, False), torch.zeros(K), {}
        with no_host_sync() if check else contextlib.nullcontext():
            l0 = fassl.sdclr_step(net, o0, sc, *views, args, None)
            l1, z1 = fassl.prototype_step(teacher, protos, o1, sc, *views, args, None)
            h = fassl.prototype_similarities(z1, protos.weight)
            usage += torch.nn.functional.one_hot(h.argmax(1), K).sum(0)
            l2, w = fassl.rebalance_step(student, q, teacher, protos, o2, sc, *views, args, None)
            for key, value in fassl.weight_stats(w, group).items():      # as train_fassl sums them
                stats[key] = stats.get(key, 0) + value
    assert all(torch.isfinite(v) for v in (l0, l1, l2)) and usage.sum() == 8
    assert stats["w_sum"].sum() == pytest.approx(8.0, rel=1e-5) and stats["count"].tolist() == [3, 3, 2]
    record = fassl.weight_record(stats, 1)                                 # the metrics.jsonl entries
    assert record["w_ess"] == pytest.approx(ess(w), rel=1e-5) and record["w_min"] <= 1 <= record["w_max"]


# ----------------------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo): each step on its part of the global batch computes the single-process
# loss of the whole batch (Stage 0, Eq. 2) or Eq. (3) weights of the whole batch, with the same gradients
# ----------------------------------------------------------------------------------------------------------
B, IN, D, K = 4, 6, 5, 3        # per-process batch, input, embedding and prototype dimensions


class Twin(nn.Module):          # SDCLR's dense and pruned branch: two maps, one forward each, one backward
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(IN, D), nn.Linear(IN, D)

    def forward(self, x, pruned=False):
        return (self.b if pruned else self.a)(x)


@contextlib.contextmanager
def outputs(*modules):
    """The outputs of the modules' forwards inside, their gradients kept."""
    outs = []

    def keep(module, inputs, out):                      # returns None: the output stays as it is
        out.retain_grad()
        outs.append(out)
    hooks = [m.register_forward_hook(keep) for m in modules]
    yield outs
    for h in hooks:
        h.remove()


def three_steps(rank=0, world=1, ddp=False):
    """fassl's steps on linear stand-ins, fed this process's part of a global batch of B * world images."""
    args, sc, got = parse(*TINY)[0], common.make_scaler(None), {}
    x1, x2 = torch.randn(2, B * world, IN, generator=torch.Generator().manual_seed(0))
    if ddp:                                                          # this process's part of the batch
        x1, x2 = x1[rank * B:(rank + 1) * B], x2[rank * B:(rank + 1) * B]
    wrap = lambda m: common.prepare_model(m, "cpu", False, ddp=ddp)                  # noqa: E731
    for prune in (0.0, 0.5):                   # SimCLR: one forward of both views; SDCLR: the twin
        torch.manual_seed(1)
        net, a = Twin() if prune else nn.Linear(IN, D), dataclasses.replace(args, prune_ratio=prune)
        with outputs(*([net.a, net.b] if prune else [net])) as z:
            loss = fassl.sdclr_step(wrap(net), fassl.sgd(a, net.parameters()), sc, x1, x2, a, None)
        got[f"sdclr{prune}"] = {"loss": loss, "z": [o.grad for o in z],
                                "p": [t.grad for t in net.parameters()]}
    torch.manual_seed(2)
    enc, protos = nn.Linear(IN, D), nn.Linear(D, K, bias=False)
    with outputs(enc) as z:
        opt = fassl.sgd(args, enc.parameters(), protos.parameters())
        loss, z1 = fassl.prototype_step(wrap(enc), protos, opt, sc, x1, x2, args, None)
    got["prototypes"] = {"loss": loss, "z": [o.grad for o in z], "p": [enc.weight.grad, protos.weight.grad],
                         "out": z1}
    for view in ("target", "mean"):
        torch.manual_seed(3)
        student, q, protos = nn.Linear(IN, D), nn.Linear(D, D), nn.Linear(D, K, bias=False)
        teacher, a = nn.Linear(IN, D), dataclasses.replace(args, weight_view=view)
        for m in (student, teacher):                    # a floating buffer, as BN's, for Eq. (4)'s EMA
            m.register_buffer("stat", torch.randn(D))
        trained = [*student.parameters(), *q.parameters()]
        with outputs(q) as p:
            loss, w = fassl.rebalance_step(wrap(student), wrap(q), teacher, protos, fassl.sgd(a, trained), sc,
                                           x1, x2, a, None)
        got[view] = {"loss": loss, "z": [o.grad for o in p], "p": [t.grad for t in trained], "out": w,
                     "teacher": torch.cat([teacher.weight.flatten(), teacher.stat])}
    return got


def _dist_steps(out):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.save(three_steps(rank, world, ddp=True), pathlib.Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(dist_outputs):
    from conftest import run_function
    out = run_function(dist_outputs, "test_fassl:_dist_steps")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)], three_steps(world=2)


def rows(t, rank, world=1):       # (V * B * world, D) -> process `rank`'s (V, B, D)
    return t.reshape(-1, world, B, t.shape[-1])[:, rank]


@pytest.mark.parametrize("step", ["sdclr0.0", "sdclr0.5", "prototypes", "target", "mean"])
def test_two_processes_compute_the_single_process_step_of_the_global_batch(two_processes, step):
    """Stage 0 and Eq. (2): each process's loss is the single-process loss of the global batch; Eq. (3): the
    weights are standardised and clipped over the global batch and the per-process losses average to the
    single-process one. The embeddings' gradients / the world size and the parameters' gradients after DDP
    (P, not DDP-wrapped, on its own) are the single-process ones; so is the teacher after Eq. (4)."""
    parts, single = two_processes
    one = single[step]
    if step in ("target", "mean"):
        torch.testing.assert_close(sum(p[step]["loss"] for p in parts) / 2, one["loss"], atol=1e-6, rtol=0)
    for rank, part in enumerate(parts):
        got = part[step]
        if step not in ("target", "mean"):
            torch.testing.assert_close(got["loss"], one["loss"], atol=1e-6, rtol=0)
        mine = torch.cat([rows(g, 0) for g in got["z"]]) / 2
        torch.testing.assert_close(mine, torch.cat([rows(g, rank, 2) for g in one["z"]]), atol=1e-6, rtol=0)
        for a, b in zip(got["p"], one["p"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        for key in ("out", "teacher"):          # Eq. (2)'s gathered z, Eq. (3)'s weights, Eq. (4)'s F^T
            if key in one:
                torch.testing.assert_close(got[key], one[key], atol=1e-6, rtol=0)
    if step == "target":
        assert one["out"].std() > 0.1          # weights that differ: the global normalisation is tested
