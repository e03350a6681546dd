"""Tests for fassl.py: losses (Eq. S1, 2, 3), SDCLR pruning and dual BN, EMA (Eq. 4), end-to-end run and resume,
synthetic-lt demo profile."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn

import common
import fassl

TINY = ["--dataset", "synthetic-lt", "--synthetic-n-max", "24", "--synthetic-n-test", "4", "--imb-ratio", "10",
        "--arch", "resnet8", "--batch-size", "32", "--num-prototypes", "16", "--probe-epochs", "1",
        "--probe-aug", "none", "--device", "cpu", "--warmup-epochs", "1"]


# ---------------------------------------------------------------------------------------------------------------
# Eq. S1 (nt_xent, re-exported by fassl)
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# SDCLR: mask (S2) and dual BN (S3)
# ---------------------------------------------------------------------------------------------------------------
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
    m = torch.cat([net.mask(n).flatten() for n in net.prunable])
    assert w[m].min() >= w[~m].max()                           # global magnitude threshold
    # masks exist only for backbone convs: BN and head parameters are never masked
    mask_names = [n for n, _ in net.named_buffers() if n.startswith("mask__")]
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
    pruned_bn = net.pruned_bn[fassl.key("", net.bns[0])]
    head_bn = net.get_submodule([n for n in net.bns if n.startswith("head")][0])
    head_pruned_bn = net.pruned_bn[fassl.key("", [n for n in net.bns if n.startswith("head")][0])]
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
    grad, mask = net.get_parameter(conv + ".weight").grad, net.mask(conv)
    assert torch.all(grad[~mask] == 0) and grad[mask].abs().sum() > 0   # pruned weights get no pruned-branch grad


# ---------------------------------------------------------------------------------------------------------------
# Eq. (1)-(3): prototype loss, frequency weights, re-balanced loss
# ---------------------------------------------------------------------------------------------------------------
def test_prototype_contrastive_loss_trains_teacher_and_prototypes():
    torch.manual_seed(0)
    z1, z2, P = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16), torch.randn(32, 16, requires_grad=True)
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
    # without clipping, exactly phi_i / mean(phi) with phi = 1 / exp(s) (Eq. 3)
    s = torch.nn.functional.normalize(z, dim=-1) @ centre
    phi = torch.exp(-s.double())
    assert torch.allclose(fassl.frequency_weights(z, P, clip_sigma=0).double(), phi / phi.mean(), rtol=1e-4)


def test_frequency_weights_clipping_bounds_outliers():
    torch.manual_seed(0)
    P = torch.randn(64, 8)
    centre = torch.nn.functional.normalize(P, dim=-1).sum(0)
    z = torch.randn(32, 8)
    z[0] = -centre                                             # one sample far from every prototype
    s = torch.nn.functional.normalize(z, dim=-1) @ centre
    w_raw, w = fassl.frequency_weights(z, P, clip_sigma=0), fassl.frequency_weights(z, P, clip_sigma=2.0)
    assert w_raw[0] > 25                                       # unclipped: the outlier takes most of the weight
    assert w[0] < 0.75 * w_raw[0] and w[0] == w.max()         # clipped: still the largest, but bounded
    assert (w.max() / w.min()).log() <= 4 * s.std(unbiased=False) + 1e-4   # s clamped to mu +- 2 sigma
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_frequency_weights_are_finite_for_extreme_inputs(dtype):
    P = torch.ones(512, 4)                                     # every prototype identical: s in [-512, 512]
    z = torch.tensor([[1e4, 0, 0, 0], [-1e4, 0, 0, 0], [1, 1, 1, 1], [-3e3, 1, 0, 0]]).to(dtype)
    for clip in (0.0, 2.0):
        w = fassl.frequency_weights(z, P.to(dtype), clip_sigma=clip)
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


# ---------------------------------------------------------------------------------------------------------------
# Eq. (4): EMA teacher
# ---------------------------------------------------------------------------------------------------------------
def test_ema_update_matches_formula():
    torch.manual_seed(0)
    t, s = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    s(torch.randn(8, 4))                                       # give the student different BN statistics
    t0 = {k: v.clone() for k, v in t.state_dict().items()}
    fassl.update_teacher(t, s, 0.99)
    for k, v in t.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.99 * t0[k] + 0.01 * s.state_dict()[k], atol=1e-6), k
        else:
            assert torch.equal(v, s.state_dict()[k])


def test_ema_tau_zero_makes_teacher_equal_student_and_one_freezes_it():
    args = fassl.resolve_defaults(fassl.parse(TINY + ["--ema-tau", "0"]), 32)
    x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    mods, opt, _, step, _, _ = fassl.build_rebalance(args, 32, torch.device("cpu"), None)
    before = {k: v.clone() for k, v in mods["teacher"].state_dict().items()}
    out = step(x, y, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    student, teacher = mods["student"].state_dict(), mods["teacher"].state_dict()
    assert any(not torch.equal(before[k], teacher[k]) for k in before)
    for k in teacher:
        assert torch.allclose(teacher[k].float(), student[k].float(), atol=1e-6), k
    args.ema_tau = 1.0
    mods, opt, _, step, _, _ = fassl.build_rebalance(args, 32, torch.device("cpu"), None)
    before = {k: v.clone() for k, v in mods["teacher"].named_parameters()}
    step(x, y, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, before[k]) for k, v in mods["teacher"].named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# End to end: --stage all, interrupted mid-stage 2, resumed; exact resume of SDCLR
# ---------------------------------------------------------------------------------------------------------------
def test_stage_all_runs_end_to_end_and_resumes_mid_stage(tmp_path):
    argv = TINY + ["--out-dir", str(tmp_path), "--sdclr-epochs", "1", "--stage1-epochs", "1", "--stage2-epochs",
                   "2", "--knn-every", "1", "--no-probe-teacher"]
    run_dir = fassl.main(argv + ["--stop-after-epochs", "3"])
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert (ck["stage"], ck["epoch"]) == ("rebalance", 1)
    assert not (run_dir / "results.json").exists() and (run_dir / "stage_prototypes.pt").exists()
    assert fassl.main(["--resume", str(run_dir / "checkpoint.pt")]) == run_dir
    res = json.loads((run_dir / "results.json").read_text())
    assert res["method"] == "fassl" and res["network_evaluated"] == "student"
    assert "demo_profile" not in res["extra"] and res["variant"] == "--num-prototypes 16"   # demo fields all given
    assert res["epochs"] == {"stage0": 1, "stage1": 1, "stage2": 2, "probe": 1}
    for key in ("many", "medium", "few", "group_mean", "std"):
        assert res["at_selected"]["groups_thirds"][key] is not None
    assert res["extra"]["probe_few-shot"]["at_selected"]["groups_thirds"]["group_mean"] is not None
    share = res["extra"]["prototypes"]["share_percent"]
    assert sum(share.values()) == pytest.approx(100.0) and len(res["extra"]["prototypes"]["nearest_index"]) == 16
    assert [k["stage"] for k in res["knn"]] == ["sdclr", "prototypes", "rebalance", "rebalance"]
    assert (run_dir / "prototype_grid.png").stat().st_size > 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["epoch"]) for m in metrics] == [("sdclr", 1), ("prototypes", 1), ("rebalance", 1),
                                                           ("rebalance", 2)]
    assert 0.05 < metrics[0]["mask_kept"] < 0.15 and "protos_used" in metrics[1] and "w_mean_rare" in metrics[2]
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    bb = common.build_backbone("resnet8", 32)
    bb.load_state_dict(final["backbone"])                     # contract: plain build_backbone keys


def test_interrupted_sdclr_resumes_to_the_same_weights(tmp_path, capsys):
    argv = TINY + ["--stage", "sdclr", "--sdclr-epochs", "2", "--knn-every", "0", "--probes", "full",
                   "--no-analyze", "--synthetic-n-max", "16"]
    straight = fassl.main(argv + ["--out-dir", str(tmp_path / "a")])
    # the only fields left unset are the stage 1/2 epochs: the demo profile fills in those two, says so, records it
    demo = {k: fassl.SYNTHETIC_DEMO[k] for k in ("stage1_epochs", "stage2_epochs")}
    out = capsys.readouterr().out
    assert "synthetic-lt demo profile" in out and f"--stage1-epochs {demo['stage1_epochs']}" in out
    assert "--arch" not in out.split("synthetic-lt demo profile")[1].splitlines()[0]
    cut = fassl.main(argv + ["--out-dir", str(tmp_path / "b"), "--stop-after-epochs", "1"])
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["epoch"] == 1
    fassl.main(["--resume", str(cut)])
    a = torch.load(straight / "stage_sdclr.pt", weights_only=True)
    b = torch.load(cut / "stage_sdclr.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    res = json.loads((cut / "results.json").read_text())
    assert res["method"] == "sdclr" and res["at_selected"]["acc_class_mean"] is not None
    assert res["extra"]["demo_profile"]["set"] == demo                     # recorded, also after --resume
    assert res["variant"] == "synthetic-lt demo --stage sdclr --num-prototypes 16"
    assert res["paper_setting"] is False


def test_no_init_skips_stage0_with_a_random_teacher(tmp_path):
    assert fassl.parse(["--no-init"]).init == "scratch" and fassl.parse([]).init is None
    run_dir = fassl.main(TINY + ["--no-init", "--out-dir", str(tmp_path), "--stop-after-epochs", "1",
                                 "--knn-every", "0"])
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["stage"] == "prototypes" and not (run_dir / "stage_sdclr.pt").exists()
    with pytest.raises(common.UserError, match="needs a teacher"):
        fassl.main(TINY + ["--stage", "rebalance", "--out-dir", str(tmp_path)])


def test_prototype_loss_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    z, P = torch.randn(8, 16), torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = fassl.prototype_similarities(z.bfloat16(), P)
        w = fassl.frequency_weights(z.bfloat16(), P)
    assert h.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.allclose(h, fassl.prototype_similarities(z.bfloat16().float(), P), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# synthetic-lt demo profile: only for synthetic-lt, only for fields not given on the command line
# ---------------------------------------------------------------------------------------------------------------
def test_synthetic_demo_profile_fills_only_unset_fields():
    demo = fassl.resolve_defaults(fassl.parse(["--dataset", "synthetic-lt"]), 32)
    assert {k: getattr(demo, k) for k in fassl.SYNTHETIC_DEMO} == fassl.SYNTHETIC_DEMO
    assert demo.arch == "resnet8" and demo.probe_aug == "none"
    assert fassl.demo_defaults(fassl.parse(["--dataset", "synthetic-lt"])) == fassl.SYNTHETIC_DEMO
    explicit = ["--dataset", "synthetic-lt", "--arch", "resnet20", "--batch-size", "64", "--stage1-epochs", "7",
                "--probe-aug", "crop", "--knn-every", "2"]
    args = fassl.parse(explicit)
    assert fassl.demo_defaults(args) == {k: v for k, v in fassl.SYNTHETIC_DEMO.items()
                                         if k in ("sdclr_epochs", "stage2_epochs")}
    fassl.resolve_defaults(args, 32)
    assert (args.arch, args.batch_size, args.stage1_epochs, args.probe_aug, args.knn_every) == \
        ("resnet20", 64, 7, "crop", 2)                                   # explicit flags win
    assert (args.sdclr_epochs, args.stage2_epochs) == (fassl.SYNTHETIC_DEMO["sdclr_epochs"],
                                                       fassl.SYNTHETIC_DEMO["stage2_epochs"])
    assert fassl.stage_epochs(args, "prototypes") == 7


@pytest.mark.parametrize("dataset,size,expected", [
    ("cifar10-lt", 32, ("resnet18", 512, 2000, 100, 200, None, "crop")),
    ("folder", 32, ("resnet18", 512, 2000, 100, 200, None, "crop")),
    ("imagenet100-lt", 224, ("resnet50", 256, 500, 100, 200, None, "crop"))])
def test_paper_defaults_unchanged_outside_synthetic_lt(dataset, size, expected):
    args = fassl.parse(["--dataset", dataset])
    assert fassl.demo_defaults(args) == {}
    fassl.resolve_defaults(args, size)
    assert (args.arch, args.batch_size, args.sdclr_epochs, args.stage1_epochs, args.stage2_epochs, args.knn_every,
            args.probe_aug) == expected
    assert fassl.resolve_defaults(fassl.Args(), 32).stage1_epochs == 100     # Args() used by other modules


def test_help_of_every_demo_field_names_its_synthetic_lt_value():
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(fassl.Args)}
    for k, v in fassl.SYNTHETIC_DEMO.items():
        assert f"synthetic-lt demo: {v}" in helps[k], k
