"""tase.py: TASE-R (reconstruction, docs/tase.md) and its SimCLR / SimCLR+TS baselines. The equations T1-T6
and TS1 against direct computations, the DEFAULTS through harness.parse_args, the paper rule (a paper setting
= a cell of PAPER_ALL), tiny CPU runs on synthetic-lt (and resume), the two-process step."""
import dataclasses
import json
import math
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import data
import fassl
import eval as evaluation
import harness
import tase
from conftest import Poison, run_function


def parse(*argv):
    return harness.parse_args(tase.Args, list(argv), tase.DEFAULTS)


def _views(b=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


# ------------------------------------------------------------- NT-Xent with tau and w per anchor (T5, T6)
def direct_terms(z1, z2, tau):
    """l_j of Eq. T5 from its formula, in float64, one anchor at a time: a = n([z1; z2]),
    p(j) = (j + B) mod 2B, l_j = -a_j . a_p(j) / tau_j + log sum_{k != j} exp(a_j . a_k / tau_j);
    tau: a float, (B,) or (2B,)."""
    a = F.normalize(torch.cat([z1, z2]).double(), dim=-1)
    n = a.shape[0]
    tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1)
    tau = tau.expand(n) if tau.numel() == 1 else tau.repeat(n // tau.numel())
    terms = []
    for j in range(n):
        s = a @ a[j] / tau[j]
        others = torch.cat([s[:j], s[j + 1:]])
        terms.append(-s[(j + n // 2) % n] + torch.logsumexp(others, 0))
    return torch.stack(terms).float()


def nt_xent_terms(z1, z2, tau):
    """common.nt_xent's own per-anchor terms l_j, through one-hot weights: nt_xent(..., weight=e_j) * 2B."""
    n = 2 * z1.shape[0]
    return torch.stack([common.nt_xent(z1, z2, tau, weight=torch.eye(n)[j]) * n for j in range(n)])


def test_nt_xent_scalar_temperature_equals_repeated_per_image_and_per_anchor():
    z1, z2 = _views()
    ref = common.nt_xent(z1, z2, 0.3)
    assert torch.allclose(ref, direct_terms(z1, z2, 0.3).mean(), atol=1e-5)          # Eq. T5, mean over 2B
    assert torch.allclose(common.nt_xent(z1, z2, torch.full((8,), 0.3)), ref, atol=1e-6)
    assert torch.allclose(common.nt_xent(z1, z2, torch.full((16,), 0.3)), ref, atol=1e-6)
    per = nt_xent_terms(z1, z2, torch.full((8,), 0.3))
    assert per.shape == (16,) and torch.allclose(per, direct_terms(z1, z2, 0.3), atol=1e-5)
    tau = torch.linspace(0.1, 0.8, 16)                                               # one tau per anchor
    assert torch.allclose(nt_xent_terms(z1, z2, tau), direct_terms(z1, z2, tau), atol=1e-4)


def test_nt_xent_unit_weights_equal_unweighted_and_weights_scale_both_views():
    z1, z2 = _views(seed=1)
    tau = torch.linspace(0.1, 0.5, 8)
    ones = common.nt_xent(z1, z2, tau, weight=torch.ones(8))
    assert torch.allclose(ones, common.nt_xent(z1, z2, tau), atol=1e-6)
    w = torch.linspace(0.2, 1.8, 8)
    per = direct_terms(z1, z2, tau)
    # T6: both views of image i carry w_i; the loss is the mean over the 2B anchors
    assert torch.allclose(common.nt_xent(z1, z2, tau, weight=w), (w.repeat(2) * per).mean(), atol=1e-5)


def test_nt_xent_identical_vectors_give_log_2b_minus_1():
    z = torch.ones(6, 4)
    tau = torch.linspace(0.1, 1.0, 6)
    for per in (nt_xent_terms(z, z, tau), direct_terms(z, z, tau)):
        assert torch.allclose(per, torch.full((12,), math.log(11)), atol=1e-5)


def test_lower_temperature_row_is_sharper_and_only_its_rows_change():
    z1, z2 = _views(seed=2)
    hot = torch.full((8,), 1.0)
    cold = hot.clone()
    cold[3] = 0.1                                                      # image 3: both its anchor rows

    def entropy(logp):
        return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(1)

    h_hot = entropy(tase.contrastive_log_probs(z1, z2, hot))
    h_cold = entropy(tase.contrastive_log_probs(z1, z2, cold))
    assert h_cold[3] < h_hot[3] - 0.5 and h_cold[11] < h_hot[11] - 0.5          # sharper rows 3 and 3 + B
    others = [j for j in range(16) if j not in (3, 11)]
    assert torch.allclose(h_cold[others], h_hot[others])                        # rows, not columns
    # the probabilities are the ones nt_xent uses: l_j = -log p[j, p(j)]
    logp = tase.contrastive_log_probs(z1, z2, cold)
    pos = (torch.arange(16) + 8) % 16
    per = nt_xent_terms(z1, z2, cold)
    assert torch.allclose(per, -logp[torch.arange(16), pos], atol=1e-5)
    assert torch.allclose(per, direct_terms(z1, z2, cold), atol=1e-5)
    loss_hot = nt_xent_terms(z1, z2, hot)
    loss_cold = nt_xent_terms(z1, z2, cold)
    assert torch.allclose(loss_hot[others], loss_cold[others], atol=1e-6)
    assert not torch.allclose(loss_hot[[3, 11]], loss_cold[[3, 11]])


def test_nt_xent_safe_in_bf16():
    z1, z2 = _views(b=64, d=32, seed=3)
    tau = torch.full((64,), 0.1)
    ref = common.nt_xent(z1, z2, tau)
    low = common.nt_xent(z1.bfloat16(), z2.bfloat16(), tau)
    assert torch.isfinite(low) and abs(low.item() - ref.item()) < 0.05 * ref.item()


# ---------------------------------------------------------------------------------------------- k-means (T1)
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


# ---------------------------------------------------------------------------------------------- T2-T4, TS1
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
    equal = tase.sample_temperatures(torch.tensor([50, 50]), 0.1, 0.5)
    assert torch.allclose(equal, torch.tensor([0.3, 0.3]))


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


def test_recluster_epochs_and_method_labels():
    """Eq. T1 on the 0-based epoch of the loop: cluster before epoch W (W epochs done), then every R."""
    assert [e for e in range(100) if tase.is_recluster_epoch(e, 50, 20)] == [50, 70, 90]
    assert [e for e in range(20) if tase.is_recluster_epoch(e, 4, 4)] == [4, 8, 12, 16]
    assert [e for e in range(5) if tase.is_recluster_epoch(e, 0, 2)] == [0, 2, 4]    # W = 0: from the start
    assert [e for e in range(4) if tase.is_recluster_epoch(e, 1, 1)] == [1, 2, 3]
    a = parse()[0]
    assert tase.method_name(a) == "TASE-R (reconstruction)"
    assert tase.RUN_NAMES[tase.method_name(a)] == "tase-r"
    a = parse("--no-sample-temperature", "--no-reweight")[0]
    assert tase.method_name(a) == "simclr" and tase.global_temperature(7, a) == 0.2
    a = parse("--no-sample-temperature", "--no-reweight", "--tau-schedule", "cosine")[0]
    assert tase.method_name(a) == "simclr+ts"
    # TS1 counts e = 1, 2, ...: the 0-based epoch e - 1 gets tau(e); the last of T = 200 reaches tau_min
    assert [tase.global_temperature(e, a) for e in (0, 99, 199, 399)] == pytest.approx(
        [tase.ts_temperature(e, 0.1, 1.0, 200) for e in (1, 100, 200, 400)])
    assert tase.global_temperature(199, a) == pytest.approx(0.1)
    assert tase.global_temperature(99, a) == pytest.approx(0.55)
    assert tase.global_temperature(399, a) == pytest.approx(1.0)
    assert tase.method_name(parse("--no-reweight")[0]) == "TASE-R (reconstruction)"   # one component alone


def test_cluster_diagnostics_on_perfect_clusters():
    ds = data.load_dataset("synthetic-lt", imb_ratio=4, num_classes=4, n_max=24, synthetic_n_test=4)
    y = ds.train.y
    sizes = torch.bincount(y, minlength=4)
    tau = tase.sample_temperatures(sizes, 0.1, 0.5)[y]
    w = tase.sample_weights(sizes[y], 0.5)
    d = tase.cluster_diagnostics(y, sizes, ds, tau, w)
    assert d["purity"] == 1.0 and d["nmi"] == pytest.approx(1.0)
    assert d["spearman_size_vs_class_count"] == pytest.approx(1.0)
    assert d["tau_by_group"]["many"] > d["tau_by_group"]["few"] and d["weight_by_group"]["few"] > 1.0


def test_simclr_mode_equals_fassl_sdclr_with_prune_ratio_0():
    """Both TASE-R switches off = the SDCLR pipeline with --prune-ratio 0 (net, loss, recipe)."""
    torch.manual_seed(0)
    ours = tase.SimCLRNet("resnet8", 32, 128)
    theirs = fassl.Encoder("resnet8", 32, 128, proj_layers=2, prune=False)      # SDCLR code path, p = 0
    theirs.load_state_dict(ours.state_dict())                                    # identical parameter names
    x = torch.rand(12, 3, 32, 32)
    a = parse("--dataset", "cifar10-lt", "--no-sample-temperature", "--no-reweight")[0]
    argv = ["--dataset", "cifar10-lt", "--prune-ratio", "0"]
    f = harness.parse_args(fassl.Args, argv, fassl.DEFAULTS, fassl.derived_defaults)[0]
    tau = tase.global_temperature(0, a)
    assert tau == f.tau == 0.2 and f.batch_size == a.batch_size and f.arch == a.arch
    assert (f.lr, f.final_lr, f.momentum, f.weight_decay) == (a.lr, a.final_lr, a.momentum, a.weight_decay)
    z_ours, z_theirs = ours(x), theirs(x)
    assert torch.allclose(z_ours, z_theirs)
    loss = common.nt_xent(z_ours[:6], z_ours[6:], tau)
    assert torch.allclose(loss, common.nt_xent(z_theirs[:6], z_theirs[6:], tau))


def test_settings_that_cannot_work_give_one_line_user_errors():
    base = parse("--dataset", "synthetic-lt")[0]
    for flags in (("--tau-min", "0.6"), ("--clusters", "1"), ("--batch-size", "1"), ("--ts-tau-min", "2")):
        with pytest.raises(common.UserError) as e:
            tase.check_settings(parse("--dataset", "synthetic-lt", *flags)[0])
        assert "\n" not in str(e.value) and flags[0] in str(e.value)
    tase.check_settings(base)
    for flags in (("--recluster-every", "0"), ("--tau", "0"), ("--probe", "linear"), ("--epochs", "-1")):
        with pytest.raises(SystemExit) as e:                                     # per-flag checks: exit 2
            parse(*flags)
        assert e.value.code == 2


# -------------------------------------------------------------------------------- DEFAULTS, demo profile
def test_dataset_defaults_and_the_synthetic_demo_profile():
    c, filled = parse("--dataset", "cifar10-lt")
    assert (c.arch, c.epochs, c.batch_size, c.lr_warmup_epochs) == ("resnet18", 2000, 512, 10)
    assert (c.protocol, c.cluster_warmup_epochs, c.recluster_every) == ("sdclr", 50, 20)
    assert (c.probe_aug, c.probe, c.knn_every) == ("crop", ["full", "few-shot"], None)   # kNN every E/20
    for name in ("imagenet100-lt", "imagenet-lt", "places-lt", "inat2018"):    # 224 px: ResNet-50 recipe
        i, filled = parse("--dataset", name)
        assert (i.arch, i.batch_size, i.epochs, i.lr, i.tau) == ("resnet50", 256, 500, 0.5, 0.2)
        assert {"arch", "batch_size", "epochs"} <= set(filled)
    demo, filled = parse("--dataset", "synthetic-lt")
    profile = {"arch": "resnet8", "n_max": 500, "epochs": 20, "batch_size": 128, "lr_warmup_epochs": 2,
               "cluster_warmup_epochs": 4, "recluster_every": 4, "probe_aug": "none", "knn_every": 0}
    filled.pop("imb_ratio", None)                                      # the shared rho default (common.py)
    assert filled == {"protocol": "sdclr", **profile}
    # the demo clusters at least twice, so the TASE-R diagnostics show up: before 0-based epochs 4, 8, 12, 16
    assert [e for e in range(demo.epochs) if tase.is_recluster_epoch(e, demo.cluster_warmup_epochs,
                                                                     demo.recluster_every)] == [4, 8, 12, 16]
    # explicit flags win, in every spelling argparse accepts (--opt v, --opt=v, an unambiguous prefix)
    r, filled = parse("--arch", "resnet20", "--dataset", "synthetic-lt", "--epochs=7", "--batch", "64")
    assert (r.arch, r.epochs, r.batch_size, r.cluster_warmup_epochs) == ("resnet20", 7, 64, 4)
    assert not {"arch", "epochs", "batch_size"} & set(filled)
    r, filled = parse("--dataset", "synthetic-lt", "--epochs", "2000", "--probe-aug", "crop", "--probe")
    assert (r.epochs, r.probe_aug, r.probe) == (2000, "crop", []) and "epochs" not in filled
    text = harness.make_parser(tase.Args, tase.DEFAULTS).format_help()
    assert "TASE-R (reconstruction)" in text and "synthetic-lt: 20" in text
    assert "--cluster-warmup-epochs" in text and "--lr-warmup-epochs" in text
    for old in (("--warmup-epochs", "3"), ("--log-every", "5"), ("--bench-steps", "2"), ("--probe", "both")):
        with pytest.raises(SystemExit):                                          # renamed flags are gone
            parse(*old)


# The paper rule: a run is a paper setting exactly when PAPER_ALL has a number for its (dataset, variant,
# rho). TASE-R has none; its SimCLR baseline is FASSL's Table 1 SimCLR row (the full-shot probe's All).
SIMCLR = ("--no-sample-temperature", "--no-reweight")
TS = SIMCLR + ("--tau-schedule", "cosine")
PAPER_CHANGES = {   # one change per flag that changes the SimCLR baseline's run or its headline probe
    "protocol": ("--protocol", "ldam"), "arch": ("--arch", "resnet34"), "epochs": ("--epochs", "1000"),
    "batch_size": ("--batch-size", "256"), "lr_warmup_epochs": ("--lr-warmup-epochs", "5"),
    "imb_ratio": ("--imb-ratio", "50"), "proj_dim": ("--proj-dim", "64"), "lr": ("--lr", "0.3"),
    "final_lr": ("--final-lr", "0"), "momentum": ("--momentum", "0.8"),
    "weight_decay": ("--weight-decay", "5e-4"), "augment": ("--augment", "mocov2_imagenet"),
    "sample_temperature": ("--sample-temperature",), "reweight": ("--reweight",),
    "probe_epochs": ("--probe-epochs", "10"), "probe_aug": ("--probe-aug", "none"), "tau": ("--tau", "0.5"),
    "tau_schedule": ("--tau-schedule", "cosine"), "split": ("--split", "3"),
    "data_seed": ("--data-seed", "1"), "split_file": ("--split-file", "d1.npy"),
    "sdclr_split_dir": ("--sdclr-split-dir", "splits")}
# flags the SimCLR baseline does not read (TASE-R's, SimCLR+TS's, synthetic-lt's); its variant names them all
IDLE_IN_SIMCLR = {"tau_min", "tau_max", "reweight_power", "clusters", "cluster_warmup_epochs",
                  "recluster_every", "kmeans_iters", "kmeans_restarts", "kmeans_tol", "oracle_labels",
                  "ts_tau_min", "ts_tau_max", "ts_period", "num_classes", "n_max",
                  "synthetic_n_test"}


def variant(args):
    return harness.variant_label(args, tase.DEFAULTS)


def _paper(*argv, dataset="cifar100-lt", rho="args"):
    """The paper's number for the run of these flags (None: not a paper setting); rho: the run's --imb-ratio
    unless given (the list datasets have none)."""
    args = parse("--dataset", dataset, *argv)[0]
    rho = args.imb_ratio if rho == "args" else rho
    return harness.paper_value(tase.PAPER_ALL, dataset, variant(args), rho)


def test_only_the_simclr_baseline_has_a_paper_number():
    assert variant(parse(*SIMCLR)[0]) == "--no-sample-temperature --no-reweight"
    assert _paper(*SIMCLR, dataset="cifar10-lt") == 75.37 and _paper(*SIMCLR) == 49.76     # FASSL Table 1
    for ds in ("cifar10-lt", "cifar100-lt"):
        assert _paper(dataset=ds) is None                                                # TASE-R: never
        assert _paper("--no-reweight", dataset=ds) is None
        assert _paper("--no-sample-temperature", dataset=ds) is None
        assert _paper(*TS, dataset=ds) is None                          # SimCLR+TS: none under this protocol
    assert _paper(*SIMCLR, dataset="synthetic-lt") is None
    assert _paper(*SIMCLR, dataset="imagenet100-lt", rho=None) is None
    assert _paper(*SIMCLR, "--imb-ratio", "50") is None and _paper(*SIMCLR, rho=10.0) is None       # rho
    # the seed, runtime flags and flags given at their default value leave it a paper setting
    assert _paper(*SIMCLR, "--seed", "1", "--device", "cpu", "--workers", "2", "--knn-every", "5") == 49.76
    assert _paper(*SIMCLR, "--lr", "0.5", "--tau", "0.2", "--split", "1", "--protocol", "sdclr") == 49.76
    # any other flag is in the variant, also one the baseline does not read: then there is no number
    assert _paper(*SIMCLR, "--ts-period", "100") is None and _paper(*SIMCLR, "--lr", "0.3") is None


@pytest.mark.parametrize("key", sorted(PAPER_CHANGES))
def test_paper_setting_turns_false_when_a_method_flag_changes(key):
    method_flags = {f.name for f in dataclasses.fields(tase.Args)
                    if not f.metadata.get("runtime") and f.name not in ("dataset", "seed")}
    assert set(PAPER_CHANGES) | IDLE_IN_SIMCLR == method_flags and not set(PAPER_CHANGES) & IDLE_IN_SIMCLR
    assert _paper(*SIMCLR) == 49.76
    args = parse("--dataset", "cifar100-lt", *SIMCLR, *PAPER_CHANGES[key])[0]
    assert _paper(*SIMCLR, *PAPER_CHANGES[key]) is None
    if key not in ("imb_ratio", "sample_temperature", "reweight"):   # rho: a column; switches: back to TASE-R
        assert PAPER_CHANGES[key][0] in variant(args)


# ---------------------------------------------------------------------------------------------- tiny runs
N_MAX, CLASSES, RHO = 24, 4, 4.0
TINY = ("--dataset", "synthetic-lt", "--num-classes", str(CLASSES), "--n-max", str(N_MAX),
        "--synthetic-n-test", "6", "--imb-ratio", str(RHO), "--arch", "resnet8", "--epochs", "3",
        "--batch-size", "24", "--lr-warmup-epochs", "1", "--cluster-warmup-epochs", "1",
        "--recluster-every", "1", "--kmeans-restarts", "2", "--kmeans-iters", "20", "--probe",
        "--device", "cpu", "--amp", "off", "--workers", "0", "--print-every", "100", "--knn-every", "1")


def tiny(out_dir, *flags):
    return tase.train(*parse(*TINY, "--out-dir", str(out_dir), *flags))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted TASE-R run: 3 epochs, W = 1, clusters at epochs 2 and 3, both probes."""
    return tiny(tmp_path_factory.mktemp("full"), "--probe", "full", "few-shot", "--probe-epochs", "1")


def test_tiny_run_reclusters_and_writes_results_and_diagnostics(tiny_run):
    run_dir = tiny_run
    assert run_dir.name.startswith("tase-r-synthetic-lt-")
    n_train = sum(data.lt_counts(N_MAX, CLASSES, RHO))
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert "pseudo_labels" not in recs[0] and recs[0]["tau_global"] == 0.2       # warm-up epoch: plain SimCLR
    assert [r["reclustered"] for r in recs] == [False, True, True]
    assert all(math.isfinite(r["loss"]) and r["row_entropy_last_batch"] > 0 for r in recs)
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
    assert "paper_value" in res and res["paper_value"] is None            # TASE-R: never a paper setting
    assert res["protocol"] == "sdclr-probe-full"
    assert res["at_selected"]["groups_thirds"]["group_mean"] is not None
    assert res["extra"]["num_reclusters"] == 2 and sum(res["extra"]["final_cluster_sizes"]) == n_train
    assert res["defaults_filled"] == {"protocol": "sdclr", "probe_aug": "none"}
    # the kNN monitor (--knn-every 1): every epoch, in metrics.jsonl and in results.json's knn list
    assert [k["epoch"] for k in res["knn"]] == [1, 2, 3] and res["knn"][-1] == {"epoch": 3, **recs[-1]["knn"]}
    assert all(0 <= k["acc_class_mean"] <= 100 and k["groups_thirds"]["n_classes"] == [2, 1, 1]
               for k in res["knn"])
    few = json.loads((run_dir / "few-shot" / "results.json").read_text())
    assert few["protocol"] == "sdclr-probe-fewshot" and few["method"] == "TASE-R (reconstruction)"
    assert (few["paper_setting"], few["paper_value"]) == (False, None)
    ck = data.load_checkpoint(run_dir / "checkpoint.pt")
    assign, sizes = ck["state"]["clusters"]
    assert (ck["method"], ck["stage"], ck["epoch"]) == ("TASE-R (reconstruction)", "simclr", 3)
    assert assign.shape == (n_train,) and torch.equal(torch.bincount(assign, minlength=CLASSES), sizes)
    assert ck["state"]["num_reclusters"] == 2 and ck["state"]["knn"] == res["knn"]
    assert ck["state"]["pseudo_labels"] == recs[-1]["pseudo_labels"]
    assert {"model", "optimizer", "scaler"} <= set(ck)
    backbone = evaluation.submodule_state(ck["model"], "backbone")             # eval.py --ckpt reads it
    common.build_backbone("resnet8").load_state_dict(backbone)


def test_resume_reproduces_the_uninterrupted_run(tiny_run, tmp_path, monkeypatch):
    real_save = harness.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(harness, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tiny(tmp_path)
    monkeypatch.setattr(harness, "save_checkpoint", real_save)
    (cut,) = tmp_path.iterdir()
    assert data.load_checkpoint(cut / "checkpoint.pt")["epoch"] == 2    # 2 epochs done, 1 clustering
    resumed = tiny(tmp_path, "--resume", "auto")
    assert resumed == cut
    a = data.load_checkpoint(tiny_run / "checkpoint.pt")
    b = data.load_checkpoint(resumed / "checkpoint.pt")
    sa, sb = a["state"], b["state"]
    assert b["epoch"] == 3 and sb["num_reclusters"] == 2
    assert all(torch.equal(x, y) for x, y in zip(sa["clusters"], sb["clusters"], strict=True))
    assert sb["knn"] == sa["knn"] and [k["epoch"] for k in sb["knn"]] == [1, 2, 3]    # kept across the resume
    assert sb["pseudo_labels"] == sa["pseudo_labels"]
    assert set(a["model"]) == set(b["model"]) and len(a["model"]) > 0
    for k, v in a["model"].items():                                     # backbone and head, bit for bit
        assert torch.equal(v, b["model"][k]), k


def test_demo_profile_is_announced_and_recorded(tmp_path, capsys):
    # arch, LR warm-up and probe views left unset: the demo profile fills them; the rest is explicit and tiny
    argv = list(TINY)
    for flag in ("--arch", "--lr-warmup-epochs"):
        del argv[argv.index(flag):argv.index(flag) + 2]
    args, filled = parse(*argv, "--epochs", "1", "--out-dir", str(tmp_path))
    assert filled == {"protocol": "sdclr", "arch": "resnet8", "lr_warmup_epochs": 2, "probe_aug": "none"}
    run_dir = tase.train(args, filled)
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "defaults for synthetic-lt" in ln]
    assert len(line) == 1 and "not a paper setting" in line[0] and "--arch resnet8" in line[0]
    assert "--batch-size" not in line[0] and "TASE-R (reconstruction)" in out
    assert json.loads((run_dir / "config.json").read_text())["filled_defaults"] == filled
    assert not (run_dir / "results.json").exists()                      # --probe with no mode: no probe


def test_simclr_switches_never_cluster_and_record_filled_defaults(tmp_path):
    run_dir = tiny(tmp_path, "--epochs", "2", *TS, "--ts-period", "2", "--probe", "full",
                   "--probe-epochs", "1")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("pseudo_labels" not in r and not r["reclustered"] for r in recs)
    assert [r["tau_global"] for r in recs] == pytest.approx([0.55, 0.1])         # eq. TS1 with T = 2
    assert run_dir.name.startswith("tase-simclr-ts-synthetic-lt-")
    assert not (run_dir / "tase_temperature_weight.png").exists()
    res = json.loads((run_dir / "results.json").read_text())
    assert res["method"] == "simclr+ts" and res["paper_setting"] is False and res["extra"]["clusters"] is None
    assert res["paper_value"] is None
    assert res["defaults_filled"]["probe_aug"] == "none" and not (run_dir / "few-shot").exists()


@pytest.mark.parametrize("probes", [("full", "few-shot"), ("few-shot", "full")])
def test_the_baselines_paper_value_goes_to_its_full_shot_results_only(tmp_path, monkeypatch, capsys, probes):
    """A SimCLR run of a cell of PAPER_ALL (here a stand-in cell for this tiny run: the real table has none on
    synthetic-lt) carries "paper_setting" and the paper's number in results.json when its headline is the
    full-shot probe, whose All the number is (FASSL Table 1); a few-shot probe's results never carry it
    (Table 2's few-shot number is another one: 62.98 on CIFAR-10-LT, docs/tase.md)."""
    base = (*SIMCLR, "--epochs", "1", "--probe-epochs", "1", "--knn-every", "0")
    cell = ("synthetic-lt", variant(parse(*TINY, *base, "--probe", "full", "few-shot")[0]))  # default probes
    assert " ".join(SIMCLR) in cell[1] and harness.paper_value(tase.PAPER_ALL, *cell, RHO) is None
    monkeypatch.setattr(tase, "PAPER_ALL", {cell: {RHO: 12.5}})
    run_dir = tiny(tmp_path, *base, "--probe", *probes)
    out = capsys.readouterr().out
    files = {probes[0]: run_dir / "results.json", probes[1]: run_dir / probes[1] / "results.json"}
    res = {mode: json.loads(path.read_text()) for mode, path in files.items()}
    assert res["full"]["protocol"] == "sdclr-probe-full"
    assert res["few-shot"]["protocol"] == "sdclr-probe-fewshot"
    if probes[0] == "full":
        assert res["full"]["paper_setting"] is True
        assert res["full"]["paper_value"] == {"metric": "groups_thirds.group_mean", "value": 12.5}
        ours = res["full"]["at_selected"]["groups_thirds"]["group_mean"]
        line = f"paper (groups_thirds.group_mean): 12.50 | ours {ours:.2f} | difference {ours - 12.5:+.2f}"
        assert line in out
    else:
        assert "paper (groups_thirds.group_mean)" not in out        # the final table's line is the headline's
    assert res["few-shot"]["paper_value"] is None


def test_knn_monitor_queries_the_validation_split_and_never_reads_the_test_set(tmp_path):
    args, filled = parse(*TINY, "--epochs", "2", "--out-dir", str(tmp_path))
    ds = data.load_dataset("synthetic-lt", imb_ratio=RHO, num_classes=CLASSES, n_max=N_MAX,
                           synthetic_n_test=6)
    ds.test = Poison(len(ds.test))
    run_dir = tase.train(args, filled, ds=ds)                          # --probe with no mode: no probe
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["knn"]["groups_thirds"]["n_classes"] for r in recs] == [[2, 1, 1]] * 2
    ck = data.load_checkpoint(run_dir / "checkpoint.pt")
    assert [k["epoch"] for k in ck["state"]["knn"]] == [1, 2]
    assert ck["state"]["knn"][-1]["acc_class_mean"] == recs[-1]["knn"]["acc_class_mean"]


def test_knn_every_and_the_demo_profile(tmp_path):
    """--knn-every N: epochs N, 2N, ... and the last; 0 = off (the demo profile); None = every E/20 epochs."""
    run_dir = tiny(tmp_path, "--epochs", "3", "--knn-every", "2", "--no-sample-temperature", "--no-reweight")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert ["knn" in r for r in recs] == [False, True, True]
    assert parse("--dataset", "synthetic-lt")[0].knn_every == 0


def test_a_training_step_makes_no_host_sync(no_host_sync):
    """The hot path (tau and weight per image, views, forward, loss T5-T6, SGD) never waits for the device."""
    cpu = torch.device("cpu")
    args = parse(*TINY)[0]
    model, net, optimizer, scaler, recipe = tase.setup(args, 32, cpu, None)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    sizes, assign, idx = torch.tensor([20, 6, 2]), torch.randint(0, 3, (16,), generator=g), torch.arange(8)
    # a warm-up step first: data.augment builds its constants once per device, not once per step
    tase.train_step(net.train(), optimizer, scaler, tase.two_views(x, recipe, g, 32, False), 0.2, None, None)
    with no_host_sync():
        tau_c = tase.sample_temperatures(sizes, 0.1, 0.5)                               # once per epoch
        tau, w = tase.batch_temperature_weight(idx, assign, sizes, tau_c, 3, args)     # every step
        views = tase.two_views(x, recipe, g, 32, False)
        loss, z1, z2 = tase.train_step(net.train(), optimizer, scaler, views, tau, w, None)
        views = tase.two_views(x, recipe, g, 32, False)
        simclr = tase.train_step(net, optimizer, scaler, views, 0.2, None, None)[0]
    assert torch.isfinite(loss) and torch.isfinite(simclr) and z1.shape == (8, 128)


# ------------------------------------------------ several processes (torchrun): T1, T4-T6 of the global batch
DIST_B, DIST_N, DIST_K = 4, 20, 3                  # images per process and step, in the data set; clusters


def _dist_case(world, pseudo: bool):
    """A global batch of images and the pseudo-labels of the whole data set (None: before any clustering)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (DIST_B * world, 3, 8, 8), dtype=torch.uint8, generator=g)
    idx = torch.randperm(DIST_N, generator=g)[:DIST_B * world]
    assign = torch.randint(0, DIST_K, (DIST_N,), generator=g)
    sizes = torch.bincount(assign, minlength=DIST_K)
    return x, idx, *((assign, sizes, tase.sample_temperatures(sizes, 0.1, 0.5)) if pseudo else (None,) * 3)


def _dist_step(x, idx, assign, sizes, tau_c, ddp: bool):
    """tase.py's step on `x` (this process's part of the batch) with a network without BatchNorm (so that one
    process's forward is a slice of the single-process forward): loss, tau, w, embedding and weight grads."""
    torch.manual_seed(1)
    lin, out = torch.nn.Linear(3 * 8 * 8, 5), {}

    def keep_grad(module, inputs, output):                    # the gradient w.r.t. this process's embeddings
        output.register_hook(lambda g: out.update(grad=g))
    lin.register_forward_hook(keep_grad)
    net = common.prepare_model(torch.nn.Sequential(torch.nn.Flatten(), lin), "cpu", False, ddp=ddp)
    optimizer, scaler = torch.optim.SGD(net.parameters(), lr=0.1), common.make_scaler(None)
    args = parse("--dataset", "synthetic-lt")[0]
    tau, w = tase.batch_temperature_weight(idx, assign, sizes, tau_c, 3, args)
    # test_cifar views: normalisation only, the same in every process
    views = tase.two_views(x, "test_cifar", torch.Generator(), 8, False)
    loss, z1, z2 = tase.train_step(net, optimizer, scaler, views, tau, w, None)
    return {"loss": loss, "z": torch.cat([z1, z2]), "tau": tau, "w": w, "grad_z": out["grad"],
            "grad_weight": lin.weight.grad}


def _dist_tase(out):
    rank, world = dist.get_rank(), dist.get_world_size()
    mine, got = slice(rank * DIST_B, (rank + 1) * DIST_B), {"world": world}
    for pseudo in (True, False):
        x, idx, assign, sizes, tau_c = _dist_case(world, pseudo)
        got[pseudo] = _dist_step(x[mine], idx[mine], assign, sizes, tau_c, ddp=True)
    # Eq. T1: one clustering on every process, even when the processes' features differ (here: their weights)
    ds = data.load_dataset("synthetic-lt", imb_ratio=2.0, num_classes=3, n_max=12,
                           synthetic_n_test=2)
    torch.manual_seed(rank)
    got["clusters"] = tase.pseudo_labels(common.build_backbone("resnet8", 32), ds, torch.device("cpu"),
                                         parse("--dataset", "synthetic-lt", "--kmeans-restarts", "1")[0], 2)
    torch.save(got, pathlib.Path(out) / f"rank{rank}.pt")


def test_two_processes_compute_the_single_process_step_of_the_global_batch(dist_outputs):
    """Under torchrun each process's loss is the single-process loss of the global batch (T5-T6, tau_i and
    w_i looked up for the global batch, T4 normalised over it) to 1e-6, and so are the gradients w.r.t. its
    embeddings (divided by W, as DDP's average) and the weight gradient; k-means gives one clustering (T1)."""
    tmp_path = run_function(dist_outputs, "test_tase:_dist_tase")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    world, bg = got[0]["world"], DIST_B * 2
    for pseudo in (True, False):
        x, idx, assign, sizes, tau_c = _dist_case(world, pseudo)
        want = _dist_step(x, idx, assign, sizes, tau_c, ddp=False)
        if pseudo:         # the weights are normalised over the global batch, not over one process's part
            assert want["w"].mean().item() == pytest.approx(1.0)
            local = tase.sample_weights(sizes[assign[idx[:DIST_B]]], 0.5)      # process 0's part alone
            assert not torch.allclose(want["w"][:DIST_B], local)
        for rank, part in enumerate(got):
            p = part[pseudo]
            rows = torch.arange(DIST_B) + rank * DIST_B
            rows = torch.cat([rows, rows + bg])                            # its images in view 1, view 2
            for key in ("loss", "z", "tau", "w", "grad_weight"):
                if want[key] is None or isinstance(want[key], float):
                    assert p[key] == want[key], key
                else:
                    torch.testing.assert_close(p[key], want[key], atol=1e-6, rtol=0, msg=key)
            # each process's embeddings receive the gradient of both copies of the loss; DDP divides by W
            torch.testing.assert_close(p["grad_z"] / world, want["grad_z"][rows], atol=1e-6, rtol=0)
    assert torch.equal(got[0]["clusters"][0], got[1]["clusters"][0])           # process 0's clusters
    assert torch.equal(got[0]["clusters"][1], got[1]["clusters"][1])
