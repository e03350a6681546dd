"""Tests for tase.py (TASE-R reconstruction, spec ssl.md §4; SimCLR and TS baselines, §1.4 and §2)."""
import dataclasses
import json
import math

import pytest
import torch

import common
import data
import tase


def _views(b=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


# ------------------------------------------------------------------------------------------ nt_xent (S1, T5, T6)
def test_nt_xent_scalar_temperature_equals_repeated_per_image_and_per_anchor():
    z1, z2 = _views()
    ref = tase.nt_xent(z1, z2, 0.3)
    assert torch.allclose(tase.nt_xent(z1, z2, torch.full((8,), 0.3)), ref, atol=1e-6)
    assert torch.allclose(tase.nt_xent(z1, z2, torch.full((16,), 0.3)), ref, atol=1e-6)
    per = tase.nt_xent(z1, z2, torch.full((8,), 0.3), reduction="none")
    assert per.shape == (16,) and torch.allclose(per.mean(), ref, atol=1e-6)


def test_nt_xent_unit_weights_equal_unweighted_and_weights_scale_both_views():
    z1, z2 = _views(seed=1)
    tau = torch.linspace(0.1, 0.5, 8)
    assert torch.allclose(tase.nt_xent(z1, z2, tau, weight=torch.ones(8)), tase.nt_xent(z1, z2, tau), atol=1e-6)
    w = torch.linspace(0.2, 1.8, 8)
    per = tase.nt_xent(z1, z2, tau, reduction="none")
    # T6: both views of image i carry w_i; the loss is the mean over the 2B anchors
    assert torch.allclose(tase.nt_xent(z1, z2, tau, weight=w), (w.repeat(2) * per).mean(), atol=1e-6)


def test_nt_xent_identical_vectors_give_log_2b_minus_1():
    z = torch.ones(6, 4)
    per = tase.nt_xent(z, z, torch.linspace(0.1, 1.0, 6), reduction="none")      # spec N7
    assert torch.allclose(per, torch.full((12,), math.log(11)), atol=1e-5)


def test_lower_temperature_row_is_sharper_and_only_its_rows_change():
    z1, z2 = _views(seed=2)
    hot = torch.full((8,), 1.0)
    cold = hot.clone()
    cold[3] = 0.1                                                                 # image 3: both its anchor rows

    def entropy(logp):
        return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(1)

    h_hot = entropy(tase.contrastive_log_probs(z1, z2, hot))
    h_cold = entropy(tase.contrastive_log_probs(z1, z2, cold))
    assert h_cold[3] < h_hot[3] - 0.5 and h_cold[11] < h_hot[11] - 0.5          # sharper rows 3 and 3 + B
    others = [j for j in range(16) if j not in (3, 11)]
    assert torch.allclose(h_cold[others], h_hot[others])                        # rows, not columns (§4.9)
    # the probabilities are the ones nt_xent uses: l_j = -log p[j, p(j)]
    logp = tase.contrastive_log_probs(z1, z2, cold)
    pos = (torch.arange(16) + 8) % 16
    assert torch.allclose(tase.nt_xent(z1, z2, cold, reduction="none"), -logp[torch.arange(16), pos], atol=1e-5)
    loss_hot = tase.nt_xent(z1, z2, hot, reduction="none")
    loss_cold = tase.nt_xent(z1, z2, cold, reduction="none")
    assert torch.allclose(loss_hot[others], loss_cold[others], atol=1e-6)
    assert not torch.allclose(loss_hot[[3, 11]], loss_cold[[3, 11]])


def test_nt_xent_safe_in_bf16():
    z1, z2 = _views(b=64, d=32, seed=3)
    tau = torch.full((64,), 0.1)
    ref = tase.nt_xent(z1, z2, tau)
    low = tase.nt_xent(z1.bfloat16(), z2.bfloat16(), tau)
    assert torch.isfinite(low) and abs(low.item() - ref.item()) < 0.05 * ref.item()


# ---------------------------------------------------------------------------------------------------- k-means (T1)
def _blobs(sizes=(60, 30, 12, 5), dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:len(sizes)] * 10.0
    x = torch.cat([c + 0.1 * torch.randn(n, dim, generator=g) for c, n in zip(centres, sizes)])
    y = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return x, y


def test_kmeans_recovers_long_tailed_blobs_and_is_reproducible():
    x, y = _blobs()
    a1, c1 = tase.kmeans(x, 4, iters=50, generator=torch.Generator().manual_seed(7))
    cont = torch.bincount(a1 * 4 + y, minlength=16).view(4, 4)
    purity = cont.max(1).values.sum().item() / len(y)
    assert purity == 1.0 and (cont > 0).sum().item() == 4                       # one cluster per blob
    assert sorted(torch.bincount(a1, minlength=4).tolist()) == [5, 12, 30, 60]
    a2, c2 = tase.kmeans(x, 4, iters=50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a1, a2) and torch.equal(c1, c2)


def test_kmeans_never_leaves_a_cluster_empty():
    x = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]).repeat_interleave(torch.tensor([40, 2, 1]), dim=0)
    a, c = tase.kmeans(x, 5, iters=20, generator=torch.Generator().manual_seed(0), restarts=2)
    assert a.shape == (43,) and c.shape == (5, 2)
    assert torch.bincount(a, minlength=5).min().item() >= 1                     # re-seeded, n_c >= 1 (T1)
    with pytest.raises(common.UserError):
        tase.kmeans(x[:3], 5, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------- T2-T4, TS1
def test_sample_temperatures_in_range_and_monotone_in_cluster_size():
    sizes = torch.tensor([500, 7, 120, 30, 1000, 7, 60])
    tau = tase.sample_temperatures(sizes, 0.1, 0.5)
    assert tau.min().item() == pytest.approx(0.1) and tau.max().item() == pytest.approx(0.5)
    order = torch.argsort(sizes, stable=True)
    assert torch.all(tau[order].diff() >= 0)
    assert torch.all(tau[sizes == 7] == tau[sizes == 7][0])                     # a function of the size only
    assert torch.all(tau[order][1:].diff() > 0)                                 # strictly, for distinct sizes
    half = tase.sample_temperatures(sizes, 0.1, 0.5, modulation=0.5)             # T3 with m(e) = 0.5
    assert half.max().item() == pytest.approx(0.3) and half.min().item() == pytest.approx(0.1)
    assert torch.allclose(tase.sample_temperatures(torch.tensor([50, 50]), 0.1, 0.5), torch.tensor([0.3, 0.3]))


def test_sample_weights_mean_one_and_decreasing_in_cluster_size():
    sizes = torch.tensor([1000, 7, 120, 30, 500, 7, 60, 1])
    w = tase.sample_weights(sizes, 0.5)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    order = torch.argsort(sizes, stable=True)
    assert torch.all(w[order].diff() <= 1e-7) and w[order][-1] < w[order][0]
    assert (w[7] / w[0]).item() == pytest.approx((1000 / 1) ** 0.5, rel=1e-4)   # n^(-a), T4
    assert torch.allclose(tase.sample_weights(sizes, 0.0), torch.ones(8))


def test_ts_temperature_follows_eq_ts1():
    assert tase.ts_temperature(200, 0.1, 1.0, 200) == pytest.approx(0.1)
    assert tase.ts_temperature(400, 0.1, 1.0, 200) == pytest.approx(1.0)
    assert tase.ts_temperature(100, 0.1, 1.0, 200) == pytest.approx(0.55)
    assert 0.99 < tase.ts_temperature(1, 0.1, 1.0, 200) < 1.0


def test_recluster_epochs_and_method_names_follow_the_spec():
    assert [e for e in range(1, 100) if tase.is_recluster_epoch(e, 50, 20)] == [51, 71, 91]
    a = tase.Args()
    assert tase.method_name(a) == "TASE-R (reconstruction)"
    a.sample_temperature = a.reweight = False
    assert tase.method_name(a) == "simclr"
    a.tau_schedule = "cosine"
    assert tase.method_name(a) == "simclr+ts" and tase.global_temperature(200, a) == pytest.approx(0.1)


def test_simclr_mode_equals_fassl_sdclr_with_prune_ratio_0():
    """Spec N7: tase.py with both TASE switches off is the SDCLR pipeline with --prune-ratio 0 (same net, same loss)."""
    fassl = pytest.importorskip("fassl")
    torch.manual_seed(0)
    ours = tase.SimCLRNet("resnet8", 32, 128)
    theirs = fassl.Encoder("resnet8", 32, 128, proj_layers=2, prune=False)      # SDCLR code path, p = 0
    theirs.load_state_dict(ours.state_dict())                                    # identical parameter names
    x = torch.rand(12, 3, 32, 32)
    a = tase.Args(sample_temperature=False, reweight=False)
    tau = tase.global_temperature(1, a)
    f = fassl.resolve_defaults(fassl.Args(prune_ratio=0.0), 32)
    assert tau == f.tau == 0.2 and f.proj_layers == 2 and f.batch_size == a.batch_size and f.arch == a.arch
    assert (f.lr, f.final_lr, f.momentum, f.weight_decay) == (a.lr, a.final_lr, a.momentum, a.weight_decay)
    z_ours, z_theirs = ours(x), theirs(x)
    assert torch.allclose(z_ours, z_theirs)
    assert torch.allclose(tase.nt_xent(z_ours[:6], z_ours[6:], tau), fassl.nt_xent(z_theirs[:6], z_theirs[6:], f.tau))


def test_bad_settings_raise_one_line_user_errors():
    for kw in (dict(tau_min=0.6), dict(clusters=1), dict(recluster_every=0), dict(batch_size=1)):
        with pytest.raises(common.UserError) as e:
            tase.check_args(tase.Args(**kw))
        assert "\n" not in str(e.value)
    tase.check_args(tase.Args())


# ------------------------------------------------------------------------------------ synthetic-lt demo profile
def test_demo_profile_only_for_synthetic_lt_and_only_for_options_not_given():
    args, demo = tase.resolve_args(["--dataset", "synthetic-lt"])
    assert demo == tase.SYNTHETIC_DEMO
    assert all(getattr(args, k) == v for k, v in tase.SYNTHETIC_DEMO.items())
    # the demo must re-cluster at least twice, so the TASE-R diagnostics show up
    assert sum(tase.is_recluster_epoch(e, args.warmup_epochs, args.recluster_every)
               for e in range(1, args.epochs + 1)) >= 2
    # explicit flags win, in every spelling argparse accepts (--opt v, --opt=v, an unambiguous prefix)
    args, demo = tase.resolve_args(["--arch", "resnet20", "--dataset", "synthetic-lt", "--epochs=7", "--batch", "64"])
    assert (args.arch, args.epochs, args.batch_size) == ("resnet20", 7, 64)
    assert not {"arch", "epochs", "batch_size"} & set(demo) and args.warmup_epochs == demo["warmup_epochs"]
    args, demo = tase.resolve_args(["--dataset", "synthetic-lt", "--epochs", "2000", "--probe-aug", "crop"])
    assert args.epochs == 2000 and args.probe_aug == "crop" and "epochs" not in demo   # a default value given
    # other datasets keep the paper / spec defaults untouched
    for ds in ("cifar10-lt", "cifar100-lt"):
        args, demo = tase.resolve_args(["--dataset", ds])
        assert demo == {} and args == tase.Args(dataset=ds)
    assert (tase.Args().arch, tase.Args().epochs, tase.Args().batch_size) == ("resnet18", 2000, 512)


def test_demo_defaults_are_documented_in_help():
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(tase.Args)}
    for k, v in tase.SYNTHETIC_DEMO.items():
        assert f"synthetic-lt demo: {v}" in helps[k], k


def test_demo_run_prints_the_profile_and_records_it(tmp_path, capsys):
    argv = ["--dataset", "synthetic-lt", "--num-classes", "4", "--synthetic-n-max", "24", "--synthetic-n-test", "6",
            "--imb-ratio", "4", "--epochs", "1", "--batch-size", "24", "--warmup-epochs", "0", "--kmeans-iters", "5",
            "--kmeans-restarts", "1", "--probe", "full", "--probe-epochs", "1", "--device", "cpu", "--amp", "off",
            "--out-dir", str(tmp_path), "--log-every", "100"]
    args, demo = tase.resolve_args(argv)
    assert demo == {k: tase.SYNTHETIC_DEMO[k] for k in ("arch", "lr_warmup_epochs", "recluster_every", "probe_aug")}
    run_dir = tase.main(args, demo)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "demo profile" in ln]
    assert len(lines) == 1 and "--arch resnet8" in lines[0] and "--batch-size" not in lines[0]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["paper_setting"] is False and res["extra"]["demo_profile"] == demo
    assert res["variant"].startswith("synthetic-lt demo profile") and res["backbone"] == "resnet8"


# ---------------------------------------------------------------------------------------------------- tiny runs
N_MAX, CLASSES, RHO = 24, 4, 4.0


def _tiny_args(out_dir, **kw):
    base = dict(dataset="synthetic-lt", num_classes=CLASSES, synthetic_n_max=N_MAX, synthetic_n_test=6,
                imb_ratio=RHO, arch="resnet8", epochs=3, batch_size=24, lr_warmup_epochs=1, warmup_epochs=1,
                recluster_every=1, kmeans_restarts=2, kmeans_iters=20, probe="none", device="cpu", amp="off",
                workers=0, out_dir=str(out_dir), log_every=100)
    base.update(kw)
    return tase.Args(**base)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted TASE-R run: 3 epochs, warm-up 1, re-cluster every epoch (at epochs 2 and 3), both probes."""
    return tase.main(_tiny_args(tmp_path_factory.mktemp("full"), probe="both", probe_epochs=1, probe_aug="none"))


def test_tiny_run_reclusters_and_writes_results_and_diagnostics(tiny_run):
    run_dir = tiny_run
    n_train = sum(data.lt_counts(N_MAX, CLASSES, RHO))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert "pseudo_labels" not in recs[0] and recs[0]["tau_global"] == 0.2       # warm-up epoch: plain SimCLR
    assert [r["reclustered"] for r in recs] == [False, True, True]
    for r in recs[1:]:
        d = r["pseudo_labels"]
        assert sum(d["cluster_sizes"]) == n_train and min(d["cluster_sizes"]) >= 1
        assert 0.1 - 1e-6 <= d["tau"]["min"] <= d["tau"]["max"] <= 0.5 + 1e-6
        assert d["weight"]["mean"] == pytest.approx(1.0, abs=1e-4)
        assert 1 / CLASSES <= d["purity"] <= 1.0 and 0.0 <= d["nmi"] <= 1.0 + 1e-9
        assert set(d["tau_by_group"]) == {"many", "medium", "few"}
    assert (run_dir / "tase_temperature_weight.png").stat().st_size > 1000
    res = json.loads((run_dir / "results.json").read_text())
    assert res["method"] == "TASE-R (reconstruction)" and res["paper_setting"] is False
    assert res["protocol"] == "sdclr-probe-full" and res["at_selected"]["groups_thirds"]["group_mean"] is not None
    assert res["extra"]["num_reclusters"] == 2
    few = json.loads((run_dir / "few-shot" / "results.json").read_text())
    assert few["protocol"] == "sdclr-probe-fewshot"
    ck = common.load_checkpoint(run_dir / "checkpoint.pt")
    assert ck["method"] == "tase" and ck["epoch"] == 3 and ck["assignments"].shape == (n_train,)
    assert torch.equal(torch.bincount(ck["assignments"], minlength=CLASSES), ck["cluster_sizes"])


def test_resume_reproduces_the_uninterrupted_run(tiny_run, tmp_path, monkeypatch):
    real_save = common.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tase.main(_tiny_args(tmp_path))
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    resumed = tase.main(_tiny_args(tmp_path, resume="auto"))
    a = common.load_checkpoint(tiny_run / "checkpoint.pt")
    b = common.load_checkpoint(resumed / "checkpoint.pt")
    assert b["epoch"] == 3 and b["num_reclusters"] == 2 and torch.equal(a["assignments"], b["assignments"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_simclr_switches_never_cluster(tmp_path):
    run_dir = tase.main(_tiny_args(tmp_path, epochs=2, sample_temperature=False, reweight=False,
                                   tau_schedule="cosine", ts_period=2))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("pseudo_labels" not in r and not r["reclustered"] for r in recs)
    assert [r["tau_global"] for r in recs] == pytest.approx([0.55, 0.1])         # eq. TS1 with T = 2
    assert run_dir.name.startswith("tase-simclr-ts-synthetic-lt-")
    assert not (run_dir / "tase_temperature_weight.png").exists()
