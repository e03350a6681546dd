"""hybrid.py: SC / PSC losses against the paper's equations, the curriculum, the class-balanced sampler,
the resolved paper defaults, and tiny end-to-end runs on synthetic-lt (CPU)."""
import dataclasses
import json
import math
import pathlib
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
import data
import eval as evaluation
import harness
import hybrid
from conftest import run_function, tensors


def load_checkpoint(path):
    """A checkpoint as eval.py --ckpt and --resume read it: weights_only, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------
# SC loss, Eq. (2)-(3)
# ---------------------------------------------------------------------------------------------------------
def supcon_loop(z, labels, tau):
    """Direct float64 transcription of Eq. (2)-(3): explicit exp / log, one anchor at a time."""
    z = F.normalize(z.double(), dim=1)
    n, total = len(z), 0.0
    for i in range(n):
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        total += -sum(math.log(math.exp(float(z[i] @ z[j]) / tau) / denom) for j in pos) / len(pos)
    return total / n


def test_supcon_equals_nt_xent_when_every_image_has_its_own_label():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    labels = torch.arange(8).repeat(2)
    for tau in (0.1, 0.5):
        sc = hybrid.supcon_loss(torch.cat([z1, z2]), labels, tau)
        assert torch.allclose(sc, common.nt_xent(z1, z2, tau), atol=1e-5)


def test_supcon_matches_loop_eq2_eq3():
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3])          # classes with 3, 2, 1, 1 images: |P(i)| = 5, 3, 1, 1
    labels = torch.cat([y, y])
    z = torch.randn(len(labels), 6, generator=g)
    for tau in (0.1, 0.7):
        got = hybrid.supcon_loss(z, labels, tau).item()
        assert got == pytest.approx(supcon_loop(z, labels, tau), rel=1e-5, abs=1e-6)


def test_supcon_anchor_whose_only_positive_is_its_other_view():
    # one image, two views: the only other row is the positive, so the softmax is 1 and the loss is exactly 0
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss = hybrid.supcon_loss(z, torch.tensor([5, 5]), 0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # two images of different classes: each anchor's single positive is its own other view
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    loss = hybrid.supcon_loss(z, labels, 0.2)
    zn = F.normalize(z.detach().double(), dim=1)
    s = zn @ zn.t() / 0.2
    expect = sum(-(s[i, (i + 2) % 4] - torch.logsumexp(s[i][torch.arange(4) != i], 0)) for i in range(4)) / 4
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_supcon_is_safe_under_bf16_inputs():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(64, 32, generator=g) * 30            # large, unnormalised half-precision embeddings
    labels = torch.randint(0, 5, (32,), generator=g).repeat(2)
    ref = hybrid.supcon_loss(z, labels, 0.05)
    low = hybrid.supcon_loss(z.bfloat16(), labels, 0.05)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)


# ---------------------------------------------------------------------------------------------------------
# PSC loss, Eq. (4), and its gradient (Sec. 4.4)
# ---------------------------------------------------------------------------------------------------------
def test_psc_matches_eq4():
    g = torch.Generator().manual_seed(5)
    z, protos = torch.randn(10, 8, generator=g), torch.randn(4, 8, generator=g) * 3
    labels = torch.randint(0, 4, (10,), generator=g)
    tau = 0.3
    zn, pn = F.normalize(z.double(), dim=1), F.normalize(protos.double(), dim=1)
    expect = 0.0
    for i in range(10):
        a = [float(zn[i] @ pn[j]) for j in range(4)]
        y = int(labels[i])
        expect += -a[y] / tau + math.log(sum(math.exp(a[j] / tau) for j in range(4) if j != y))
    expect /= 10
    assert hybrid.psc_loss(z, labels, protos, tau).item() == pytest.approx(expect, rel=1e-5)
    # (C, 1, D) prototypes (MPSC with M = 1) reduce to Eq. (4)
    assert hybrid.psc_loss(z, labels, protos[:, None], tau).item() == pytest.approx(expect, rel=1e-5)
    # the softmax-style variant (positive kept in the denominator) is cross-entropy on cosine logits
    ce = F.cross_entropy((zn @ pn.t()).float() / tau, labels)
    got = hybrid.psc_loss(z, labels, protos, tau, include_pos=True).item()
    assert got == pytest.approx(ce.item(), rel=1e-5)


def test_psc_gradient_wrt_positive_affinity_is_minus_one_over_tau():
    g = torch.Generator().manual_seed(6)
    b, c, tau = 12, 7, 0.1
    a = (torch.rand(b, c, generator=g) * 2 - 1).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g)
    (hybrid.psc_from_affinity(a, labels, tau) * b).backward()             # the mean: b x it = the sum
    rows = torch.arange(b)
    assert torch.allclose(a.grad[rows, labels], torch.full((b,), -1 / tau), atol=1e-5)
    # negatives: (1/tau) softmax over j != y; they sum to 1/tau
    masked = (a.detach() / tau).masked_fill(F.one_hot(labels, c).bool(), float("-inf"))
    neg = torch.softmax(masked, dim=1) / tau
    grad_neg = a.grad.clone()
    grad_neg[rows, labels] = 0
    assert torch.allclose(grad_neg, neg, atol=1e-5)
    # with the positive in the denominator the positive gradient is no longer constant
    a2 = a.detach().clone().requires_grad_(True)
    (hybrid.psc_from_affinity(a2, labels, tau, include_pos=True) * b).backward()
    assert not torch.allclose(a2.grad[rows, labels], torch.full((b,), -1 / tau), atol=1e-3)


def test_psc_trains_prototypes_and_mpsc_runs():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 8, generator=g, requires_grad=True)
    protos = torch.randn(3, 2, 8, generator=g, requires_grad=True)      # MPSC, M = 2 (experimental)
    loss = hybrid.psc_loss(z, torch.tensor([0, 1, 2, 0, 1, 2]), protos, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and protos.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Curriculum, Eq. (1)
# ---------------------------------------------------------------------------------------------------------
def test_curriculum_shapes():
    par = [hybrid.curriculum_alpha(t, 200, "parabolic") for t in range(200)]
    lin = [hybrid.curriculum_alpha(t, 100, "linear") for t in range(100)]
    assert par[0] == 1.0 and lin[0] == 1.0
    assert par[-1] == pytest.approx(1 - (199 / 200) ** 2) and par[-1] < 0.011
    assert lin[-1] == pytest.approx(0.01)
    assert par[100] == pytest.approx(0.75) and lin[50] == pytest.approx(0.5)
    d_par = [b - a for a, b in zip(par, par[1:])]
    d_lin = [b - a for a, b in zip(lin, lin[1:])]
    assert all(d < 0 for d in d_par) and all(b < a for a, b in zip(d_par, d_par[1:]))   # decreasing, concave
    assert all(d == pytest.approx(-0.01) for d in d_lin)                                 # straight line
    assert hybrid.curriculum_alpha(37, 200, "parabolic", fixed=0.5) == 0.5              # Table 5 fixed alpha


# ---------------------------------------------------------------------------------------------------------
# Class-balanced sampler of the classifier branch
# ---------------------------------------------------------------------------------------------------------
def test_balanced_sampler_histogram_is_flat():
    counts = [600, 120, 40, 8]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    split = data.Split(y=y, x=torch.zeros(len(y), 3, 4, 4, dtype=torch.uint8))
    hist = {name: torch.zeros(4) for name in ("balanced", "random")}
    for name in hist:
        loader = data.make_loader(split, 64, "cpu", sampler=name, seed=0, image_size=4)
        for epoch in range(5):
            loader.set_epoch(epoch)
            for _, yb, _ in loader:
                hist[name] += torch.bincount(yb, minlength=4).float()
    n = hist["balanced"].sum()
    sigma = math.sqrt(n * 0.25 * 0.75)
    assert (hist["balanced"] - n / 4).abs().max() < 4 * sigma           # flat within sampling noise
    frac = hist["random"] / hist["random"].sum()                    # the random batch keeps the LT profile
    assert torch.allclose(frac, torch.tensor(counts, dtype=torch.float) / sum(counts), atol=0.02)


# ---------------------------------------------------------------------------------------------------------
# Paper defaults
# ---------------------------------------------------------------------------------------------------------
def parse(*argv):
    return harness.parse_args(hybrid.Args, list(argv), hybrid.DEFAULTS, hybrid.derived_defaults)


def variant(args):
    return harness.variant_label(args, hybrid.DEFAULTS, hybrid.derived_defaults)


def paper_of(args):
    """The rule: a run is a paper setting exactly when PAPER_TOP1 has a number for its (dataset, variant,
    rho)."""
    return harness.paper_value(hybrid.PAPER_TOP1, args.dataset, variant(args), args.imb_ratio)


def test_cifar10_lt_starts_with_the_paper_settings():
    a, filled = parse("--dataset", "cifar10-lt")
    assert (a.arch, a.batch_size, a.cb_batch_size, a.epochs) == ("resnet32", 512, 512, 200)
    assert (a.lr, a.momentum, a.weight_decay, a.milestones, a.lr_gamma) == (0.5, 0.9, 1e-4, [120, 160], 0.1)
    assert (a.loss, a.tau, a.alpha_schedule, a.protocol) == ("sc", 0.1, "parabolic", "ldam")
    assert a.no_curriculum is None and not a.two_stage and not a.fused_forward and a.con_sampler == "random"
    assert filled["arch"] == "resnet32" and "momentum" not in filled and a.imb_ratio == 100.0
    psc10, psc100 = parse("--loss", "psc")[0], parse("--dataset", "cifar100-lt", "--loss", "psc")[0]
    assert psc10.tau == 1.0 and psc100.tau == 0.1
    assert parse("--loss", "psc", "--tau", "0.3")[0].tau == 0.3
    inat = parse("--dataset", "inat2018", "--loss", "psc")[0]
    assert (inat.arch, inat.batch_size, inat.epochs, inat.milestones, inat.alpha_schedule, inat.tau) == \
        ("resnet50", 100, 100, [60, 80], "linear", 0.1)
    # a flag that derived_defaults sets is compared with what the run's other flags give it
    assert (variant(a), variant(psc10), variant(psc100)) == ("default", "--loss psc", "--loss psc")
    assert variant(parse("--loss", "psc", "--tau", "0.1")[0]) == "--loss psc --tau 0.1"
    psc100_tau1 = parse("--dataset", "cifar100-lt", "--loss", "psc", "--tau", "1.0")[0]
    assert variant(psc100_tau1) == "--loss psc --tau 1.0"
    assert paper_of(a) == 81.40 and paper_of(psc10) == 78.82 and paper_of(psc100) == 44.97
    assert paper_of(parse("--imb-ratio", "50")[0]) == 85.36
    assert paper_of(parse("--dataset", "cifar100-lt", "--imb-ratio", "10", "--loss", "psc")[0]) == 62.37
    assert paper_of(parse("--imb-ratio", "20")[0]) is None                # a rho the paper does not report
    assert paper_of(parse("--loss", "psc", "--tau", "0.1")[0]) is None
    assert paper_of(parse("--lr", "0.1")[0]) is None and paper_of(inat) is None
    runtime = parse("--seed", "3", "--workers", "2", "--eval-every", "5")[0]      # not method flags
    assert paper_of(runtime) == 81.40
    two = parse("--dataset", "cifar100-lt", "--two-stage", "--imb-ratio", "50")[0]            # Table 5
    assert variant(two) == "--two-stage" and paper_of(two) == 46.76
    assert paper_of(parse("--two-stage", "--imb-ratio", "50")[0]) is None                     # CIFAR-100 only


def test_a_folder_tree_is_paper_data_only_as_a_cifar_copy_with_a_rho():
    tree = parse("--dataset", "folder")[0]
    assert tree.imb_ratio is None and variant(tree) == "default"
    copy = types.SimpleNamespace(name="folder", image_source="jpeg-copy", num_classes=10)
    assert harness.paper_dataset(copy) == "cifar10-lt"
    tree_ds = types.SimpleNamespace(name="folder", image_source="folder", num_classes=10)
    assert harness.paper_dataset(tree_ds) == "folder"
    assert harness.paper_value(hybrid.PAPER_TOP1, "cifar10-lt", "default", tree.imb_ratio) is None
    ratio = parse("--dataset", "folder", "--imb-ratio", "100")[0].imb_ratio
    assert harness.paper_value(hybrid.PAPER_TOP1, "cifar10-lt", "default", ratio) == 81.40


@pytest.mark.parametrize("flags", [("--epochs", "100"), ("--batch-size", "256"), ("--lr", "0.1"),
                                   ("--milestones", "100", "150"), ("--tau", "0.2"), ("--protocol", "sdclr"),
                                   ("--fused-forward",), ("--cb-batch-size", "128")])
def test_paper_setting_turns_false_when_a_paper_fixed_argument_changes(flags):
    assert paper_of(parse("--dataset", "cifar100-lt")[0]) == 46.72
    args = parse("--dataset", "cifar100-lt", *flags)[0]
    assert paper_of(args) is None
    assert variant(args) == " ".join(flags)


def test_synthetic_lt_demo_profile_fills_only_unset_fields_and_keeps_paper_defaults():
    demo, filled = parse("--dataset", "synthetic-lt")
    assert (demo.arch, demo.epochs, demo.batch_size, demo.cb_batch_size) == ("resnet8", 16, 128, 128)
    assert demo.lr == 0.1 and demo.milestones == [10, 13]          # 60% / 80%, like 120 / 160 of 200
    assert (demo.tau, demo.alpha_schedule, demo.loss) == (0.1, "parabolic", "sc")   # the method unchanged
    assert filled["epochs"] == 16 and filled["milestones"] == [10, 13]
    alphas = [hybrid.curriculum_alpha(t, demo.epochs, demo.alpha_schedule) for t in range(demo.epochs)]
    assert alphas[0] == 1.0 and alphas[demo.epochs // 2] == pytest.approx(0.75)
    assert alphas[-1] == pytest.approx(1 - (15 / 16) ** 2)                  # the full course, 1 -> 0.12
    # explicit flags win; the milestones follow an explicit --epochs
    r, filled = parse("--arch", "resnet20", "--dataset", "synthetic-lt", "--epochs", "50", "--lr", "0.5")
    assert (r.arch, r.epochs, r.lr, r.batch_size, r.milestones) == ("resnet20", 50, 0.5, 128, [30, 40])
    assert "arch" not in filled and "epochs" not in filled and filled["milestones"] == [30, 40]
    r = parse("--dataset", "synthetic-lt", "--milestones", "5", "--batch-size", "64")[0]
    assert (r.milestones, r.batch_size, r.cb_batch_size, r.epochs) == ([5], 64, 64, 16)
    c = parse("--dataset", "cifar10-lt")[0]
    assert (c.arch, c.epochs, c.batch_size, c.lr, c.milestones) == ("resnet32", 200, 512, 0.5, [120, 160])
    helps = harness.make_parser(hybrid.Args, hybrid.DEFAULTS, hybrid.derived_defaults).format_help()
    assert "synthetic-lt: 16" in helps


# ---------------------------------------------------------------------------------------------------------
# Tiny end-to-end runs on synthetic-lt (CPU, resnet8)
# ---------------------------------------------------------------------------------------------------------
def tiny(n_max=48, n_test=40):
    return data.load_dataset("synthetic-lt", imb_ratio=4, num_classes=4, seed=0, n_max=n_max,
                             synthetic_n_test=n_test)


def tiny_args(tmp_path, **kw):
    base = dict(dataset="synthetic-lt", arch="resnet8", batch_size=16, lr=0.1, milestones=[1000], epochs=6,
                eval_every=3, device="cpu", out_dir=str(tmp_path), print_every=1000, workers=0)
    args = dataclasses.replace(hybrid.Args(), **{**base, **kw})
    harness.fill_defaults(args, hybrid.DEFAULTS, hybrid.derived_defaults, given=set(base) | set(kw))
    return args


def test_tiny_synthetic_run_beats_chance_and_writes_results(tmp_path, monkeypatch, capsys):
    args = tiny_args(tmp_path, loss="sc", tau=0.2)
    label = variant(args)
    # a paper cell for this very run: results.json and the final table carry its number
    cells = {("synthetic-lt", label): {4.0: 50.0, 10.0: 97.0}, ("synthetic-lt", "default"): {4.0: 99.0},
             ("cifar10-lt", label): {4.0: 98.0}}
    monkeypatch.setattr(hybrid, "PAPER_TOP1", cells)
    res = hybrid.train(args, None, tiny())
    (run_dir,) = list(tmp_path.iterdir())
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["method"] == "hybrid-sc" and saved["protocol"] == "hybrid-e2e" and saved["variant"] == label
    assert saved["paper_setting"] is True
    assert saved["paper_value"] == {"metric": "top1_overall", "value": 50.0}
    ours = saved["at_selected"]["top1_overall"]
    out = capsys.readouterr().out
    assert f"paper (top1_overall): 50.00 | ours {ours:.2f} | difference {ours - 50:+.2f}" in out
    assert saved["best_test"]["selected_on_test"] is True and saved["selection"]["rule"] == "last-epoch"
    assert res["at_last"]["top1_overall"] > 25.0 + 15.0                  # 4 balanced test classes: chance 25%
    assert [h["epoch"] for h in saved["extra"]["test_history"]] == [3, 6]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["alpha"] for x in lines] == [pytest.approx(1 - (t / 6) ** 2) for t in range(6)]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert {(x["stage"], x["phase"]) for x in lines} == {("train", "joint")}
    ck = load_checkpoint(run_dir / "checkpoint.pt")
    assert ck["method"] == "hybrid-sc" and ck["epoch"] == 6 and ck["stage"] == "train"
    assert {"model", "optimizer", "classifier_optimizer", "scaler", "state"} <= set(ck)
    assert "backbone" not in ck and "classifier" not in ck                # the network is the part "model"
    assert ck["state"]["history"] == saved["extra"]["test_history"]
    assert ck["state"]["best_test"] == saved["best_test"] and saved["best_test"]["epoch"] in (3, 6)
    bb = common.build_backbone("resnet8")
    bb.load_state_dict(evaluation.submodule_state(ck["model"], "backbone"))   # as eval.py --ckpt reads it
    fc = torch.nn.Linear(bb.out_dim, 4)
    fc.load_state_dict(evaluation.submodule_state(ck["model"], "classifier"))


def test_demo_profile_is_announced_and_recorded(tmp_path, capsys):
    # milestones left unset: the demo fills them (60% / 80% of --epochs 5); the other fields are explicit
    args, filled = parse("--dataset", "synthetic-lt", "--arch", "resnet8", "--batch-size", "16", "--lr",
                         "0.1", "--epochs", "5", "--eval-every", "100", "--device", "cpu", "--out-dir",
                         str(tmp_path), "--print-every", "1000", "--workers", "0")
    res = hybrid.train(args, filled, tiny(n_max=24, n_test=8))
    out = capsys.readouterr().out
    assert "defaults for synthetic-lt (a CPU demo profile, not a paper setting)" in out
    assert "--milestones 3 4" in out
    assert res["paper_setting"] is False and res["defaults_filled"]["milestones"] == [3, 4]
    (run_dir,) = list(tmp_path.iterdir())
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["defaults_filled"]["milestones"] == [3, 4] and saved["paper_setting"] is False
    assert "paper_value" in saved and saved["paper_value"] is None and "paper (" not in out
    assert json.loads((run_dir / "config.json").read_text())["filled_defaults"]["milestones"] == [3, 4]
    assert [json.loads(x)["lr"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == \
        pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001])     # 0-based epochs 3 and 4 decay, as LDAM-DRW's loop



def test_resume_is_exact_and_psc_prototypes_are_saved(tmp_path):
    ds = tiny(n_max=24, n_test=8)
    args = tiny_args(tmp_path / "a", loss="psc", epochs=3, eval_every=2)
    hybrid.train(args, None, ds)
    (ref_dir,) = list((tmp_path / "a").iterdir())
    ref = load_checkpoint(ref_dir / "checkpoint.pt")
    with pytest.raises(harness.StopRun):                               # --stop-after-epochs 2
        hybrid.train(dataclasses.replace(args, out_dir=str(tmp_path / "b"), stop_after_epochs=2), None, ds)
    (b_dir,) = list((tmp_path / "b").iterdir())
    cut = load_checkpoint(b_dir / "checkpoint.pt")
    assert cut["epoch"] == 2 and [h["epoch"] for h in cut["state"]["history"]] == [2]
    hybrid.train(dataclasses.replace(args, out_dir=str(tmp_path / "b"), resume=str(b_dir / "checkpoint.pt")),
                 None, ds)
    got = load_checkpoint(b_dir / "checkpoint.pt")
    assert got["epoch"] == 3 and got["state"] == ref["state"]          # test history and best epoch
    a, b = tensors(ref), tensors(got)
    assert a.keys() == b.keys() and "/model/prototypes" in a and "/rng/torch" in a
    assert any(k.startswith("/optimizer/state/") for k in a)
    for key, val in a.items():                        # bit for bit: weights, prototypes, optimiser, RNG state
        assert torch.equal(val, b[key]), key
    assert not torch.equal(tensors(cut)["/model/prototypes"], a["/model/prototypes"])
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref_dir, b_dir))
    assert ra["at_last"]["per_class_acc"] == rb["at_last"]["per_class_acc"]


def test_two_stage_freezes_the_backbone_in_stage_two(tmp_path, monkeypatch):
    ds = tiny(n_max=24, n_test=8)
    states = []
    real_save = harness.save_checkpoint

    def keep(path, state):   # state_dict tensors share storage with the live model: copy them
        states.append({k: ({n: t.clone() for n, t in v.items()} if k == "model" else v)
                       for k, v in state.items()})
        real_save(path, state)

    monkeypatch.setattr(harness, "save_checkpoint", keep)
    hybrid.train(tiny_args(tmp_path, loss="sc", two_stage=True, epochs=1, stage2_epochs=3, eval_every=100,
                           stage2_milestones=[1, 2]), None, ds)
    assert [s["epoch"] for s in states] == [1, 2, 3, 4] and {s["stage"] for s in states} == {"train"}
    (run_dir,) = list(tmp_path.iterdir())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in lines] == ["feature", "classifier", "classifier", "classifier"]
    assert [x["lr"] for x in lines] == pytest.approx([0.1, 0.5, 0.05, 0.005])   # stage 2: from its epoch 0
    first, last = states[0]["model"], states[-1]["model"]
    backbone = [k for k in first if k.startswith("backbone.")]
    assert backbone and all(torch.equal(first[k], last[k]) for k in backbone)  # weights and BN statistics
    assert not torch.equal(first["classifier.weight"], last["classifier.weight"])


def test_ce_ce_head_and_fused_forward_step():
    torch.manual_seed(0)
    args = parse("--loss", "ce", "--fused-forward", "--arch", "resnet8", "--lr", "0.1")[0]
    model = hybrid.HybridNet("resnet8", 4, 32, "ce", None, 128, 1)
    assert isinstance(model.head, torch.nn.Linear) and model.prototypes is None     # CE-CE: a linear head
    opt, scaler = hybrid.make_optimizer(model, args), common.make_scaler(None)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(8) % 4
    head0, cls0 = model.head.weight.detach().clone(), model.classifier.weight.detach().clone()
    views = hybrid.make_views((x, y), (x, y), 0.5, g, 32, False)
    l_con, l_ce = hybrid.train_step(model, model, opt, scaler, views, 0.5, args, None)
    assert l_con.item() == pytest.approx(math.log(4), rel=0.5) and torch.isfinite(l_ce)
    assert not torch.equal(head0, model.head.weight) and not torch.equal(cls0, model.classifier.weight)
    out_con, logits = model(torch.randn(6, 3, 32, 32), torch.randn(4, 3, 32, 32), fused=True)
    assert out_con.shape == (6, 4) and logits.shape == (4, 4)


def test_paper_schedule_decays_at_epochs_120_and_160():
    """The LDAM-DRW loop: lr 0.5 for epochs 0..119, 0.05 for 120..159, 0.005 for 160..199 (0-based)."""
    a = parse("--dataset", "cifar10-lt")[0]
    lrs = [common.multistep_lr(e, a.lr, a.milestones, a.lr_gamma) for e in range(a.epochs)]
    assert lrs.count(0.5) == 120 and lrs[120] == pytest.approx(0.05) and lrs[160] == pytest.approx(0.005)
    assert sum(1 for x in lrs if x == pytest.approx(0.05)) == 40
    import inspect
    assert "multistep_lr(epoch, args.lr" in inspect.getsource(hybrid.train)    # the loop passes epoch 0..199


def test_predictions_come_from_fp32_logits_under_bf16_autocast():
    """Logits 1.0 (class 0) and 1.001 (class 3) are one value in bf16; the argmax must still say class 3."""
    ds = tiny(n_max=24, n_test=8)

    class Ones(torch.nn.Module):
        def forward(self, x):
            return torch.ones(len(x), 1, device=x.device)

    fc = torch.nn.Linear(1, 4, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0], [0.5], [0.5], [1.001]]))
    ds.test.y = torch.full_like(ds.test.y, 3)
    m = evaluation.classifier_eval(Ones(), fc, ds, torch.device("cpu"), torch.bfloat16)
    assert m["top1_overall"] == 100.0


@pytest.mark.parametrize("loss", ["sc", "psc", "ce"])
def test_training_step_makes_no_host_synchronisation(no_host_sync, loss):
    args = parse("--loss", loss, "--arch", "resnet8", "--lr", "0.1")[0]
    model = hybrid.HybridNet("resnet8", 4, 32, loss, None, 128, 1)
    opt, scaler = hybrid.make_optimizer(model, args), common.make_scaler(None)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 4
    def step():
        views = hybrid.make_views((x, y), (x, y), 0.5, g, 32, False)
        return hybrid.train_step(model, model, opt, scaler, views, 0.5, args, None)
    step()                                                              # warm
    with no_host_sync():
        l_con, l_ce = step()
    assert torch.isfinite(l_con) and torch.isfinite(l_ce)


def test_a_branch_of_weight_zero_is_not_updated():
    """alpha = 1 (epoch 0) leaves the classifier as it was: no gradient, no weight decay, no momentum;
    alpha = 0 likewise the feature branch (head and prototypes). Under DDP it gets a zero gradient first."""
    args = parse("--loss", "psc", "--arch", "resnet8", "--lr", "0.1")[0]
    model = hybrid.HybridNet("resnet8", 4, 32, "psc", None, 16, 1)
    opt, scaler = hybrid.make_optimizer(model, args), common.make_scaler(None)
    x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 4
    for alpha, idle in ((1.0, ("classifier.",)), (0.0, ("head.", "prototypes"))):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        views = hybrid.make_views((x, y), (x, y), alpha, torch.Generator(), 32, False)
        hybrid.train_step(model, model, opt, scaler, views, alpha, args, None)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) == n.startswith(idle), n
            assert p.grad is None if n.startswith(idle) else p.grad is not None, n


# ---------------------------------------------------------------------------------------------------------
# Several processes (torchrun): the global batch's losses, gradients and SGD steps
# ---------------------------------------------------------------------------------------------------------
B, C, D = 4, 4, 4            # per-process batch, classes, embedding dimension (= C for the CE-CE head)


def feature_case(loss, world):
    """The global batch of one feature loss: both views' embeddings, labels, a holder of the prototypes."""
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(B * world, D, generator=g), torch.randn(B * world, D, generator=g)
    y = torch.randint(0, C, (B * world,), generator=g)
    protos = torch.nn.Parameter(torch.randn(C, D, generator=g)) if loss == "psc" else None
    return za, zb, y, types.SimpleNamespace(prototypes=protos), hybrid.Args(loss=loss, tau=0.3)


def step_case(loss, world):
    """A HybridNet (eval-mode BN: per-sample maths) and the global random and class-balanced batches."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2 * B * world, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, C, (2 * B * world,), generator=g)
    torch.manual_seed(0)
    net = hybrid.HybridNet("resnet8", C, 16, loss, None, D, 1).eval()
    return net, x.chunk(2), y.chunk(2), hybrid.Args(loss=loss, tau=0.3, lr=0.1)


def two_steps(model, net, batches, args, shard=slice(None)):
    """Epoch 0 (alpha = 1, the classifier idle), a joint step (alpha = 0.5), a two-stage classifier step."""
    (x, xc), (y, yc) = batches
    opt = hybrid.make_optimizer(net, args)
    for alpha in (1.0, 0.5):
        views = hybrid.make_views((x[shard], y[shard]), (xc[shard], yc[shard]), alpha, None, 16, False)
        hybrid.train_step(model, net, opt, common.make_scaler(None), views, alpha, args, None)
    head = torch.optim.SGD(net.classifier.parameters(), lr=0.5, momentum=0.9)
    hybrid.classifier_step(net, head, (xc[shard], yc[shard]), None, 16, False, None)
    return {k: v.clone() for k, v in net.state_dict().items()}


def plain(x, *_):                    # a deterministic stand-in for the augmentation (same in every process)
    return x.float() / 255


def _dist_hybrid(out):
    rank, world = dist.get_rank(), dist.get_world_size()
    mine, got = slice(rank * B, (rank + 1) * B), {"world": world}
    for loss in ("sc", "psc", "ce"):        # the local views [A; B] of this process's images
        za, zb, y, holder, args = feature_case(loss, world)
        z = torch.cat([za[mine], zb[mine]]).requires_grad_()
        value = hybrid.feature_loss(holder, z, torch.cat([y[mine], y[mine]]), args)
        value.backward()
        protos = holder.prototypes
        got[loss] = value.detach(), z.grad, None if protos is None else common.all_mean(protos.grad)
    augment = hybrid.data.augment
    hybrid.data.augment = plain          # in this process only, until the two steps are done
    try:
        for loss in ("sc", "psc"):
            net, xs, ys, args = step_case(loss, world)
            model = common.prepare_model(net, "cpu", ddp=True)
            got["step", loss] = two_steps(model, net, (xs, ys), args, mine)
    finally:
        hybrid.data.augment = augment
    torch.save(got, pathlib.Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(dist_outputs):
    out = run_function(dist_outputs, "test_hybrid:_dist_hybrid")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("loss", ["sc", "psc", "ce"])
def test_feature_losses_of_two_processes_are_the_global_batch_ones(two_processes, loss):
    """SC: every process computes the loss of the gathered batch; PSC and CE-CE: local means, which the loss
    guard and DDP average. Either way the single-process loss, and the embeddings' gradients times W."""
    za, zb, y, holder, args = feature_case(loss, 2)
    z = torch.cat([za, zb]).requires_grad_()
    value = hybrid.feature_loss(holder, z, torch.cat([y, y]), args)
    value.backward()
    values = torch.stack([got[loss][0] for got in two_processes])
    if loss == "sc":
        torch.testing.assert_close(values, value.detach().expand(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(values.mean(), value.detach(), atol=1e-6, rtol=0)
    assert not torch.allclose(values[0], values[1]) or loss == "sc"       # the local means do differ
    n = len(za)
    for rank, got in enumerate(two_processes):
        mine = slice(rank * B, (rank + 1) * B)
        want = torch.cat([z.grad[:n][mine], z.grad[n:][mine]])
        torch.testing.assert_close(got[loss][1] / got["world"], want, atol=1e-6, rtol=0)
        if loss == "psc":                                               # after DDP's average
            torch.testing.assert_close(got[loss][2], holder.prototypes.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", ["sc", "psc"])
def test_ddp_steps_of_two_processes_are_the_single_process_steps(two_processes, loss, monkeypatch):
    """An epoch-0 step (classifier idle), a joint step and a two-stage classifier step on shards of the global
    batches end with the weights of the same steps in one process (BN in eval mode: per-sample maths)."""
    monkeypatch.setattr(data, "augment", plain)
    net, xs, ys, args = step_case(loss, 2)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    want = two_steps(net, net, (xs, ys), args)
    assert not torch.equal(want["classifier.weight"], start["classifier.weight"])
    for got in two_processes:
        for k, v in want.items():
            torch.testing.assert_close(got["step", loss][k], v, atol=1e-6, rtol=1e-5, msg=k)
