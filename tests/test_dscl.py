"""dscl.py: the DSCL / PBSD losses against direct formulas, the queue, the boxes, the dataset defaults and
paper settings, and tiny two-stage runs on synthetic-lt (CPU)."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import data
import dscl
import eval as evaluation
import harness
from conftest import run_function, tensors

TAU = 0.07


def load_checkpoint(path):
    """A checkpoint as eval.py --ckpt and --resume read it: weights_only, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _case(B=6, K=20, D=8, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g)
    k = torch.randn(B, D, generator=g)
    queue = F.normalize(torch.randn(K, D, generator=g), dim=1)
    labels = torch.randint(0, C, (B,), generator=g)
    queue_labels = torch.randint(0, C, (K,), generator=g)
    return q, k, labels, queue, queue_labels


def _eq8_loop(q, k, labels, queue, queue_labels, alpha, tau, contrast_batch=False, anchor=None):
    """Eq. (8)-(9) literally, one anchor at a time:
    -1/(|P|+1) sum_t log[exp(w_t s_t / tau) / sum_m exp(s_m / tau)]. anchor: rows scored in place of q's
    (a multi-crop patch of image i), against q's columns."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    anchor = q if anchor is None else F.normalize(anchor.double(), dim=1)
    queue = queue.double()
    B, total = q.shape[0], 0.0
    for i in range(B):
        cols, pos = [k[i]], []                               # own key first
        if contrast_batch:
            for j in range(B):
                if j != i:
                    cols += [q[j], k[j]]
                    pos += [bool(labels[j] == labels[i])] * 2
        for m in range(queue.shape[0]):
            cols.append(queue[m])
            pos.append(bool(queue_labels[m] == labels[i]))
        sims = [float(c @ anchor[i]) / tau for c in cols]
        lse = math.log(sum(math.exp(s) for s in sims))
        n_p = sum(pos)
        a = (1.0 / (n_p + 1)) if alpha == "scl" else (alpha if n_p > 0 else 1.0)
        w = [a * (n_p + 1)] + [(1 - a) * (n_p + 1) / n_p if p else 0.0 for p in pos]   # Eq. (9)
        terms = [w[0] * sims[0] - lse] + [w[t + 1] * sims[t + 1] - lse for t, p in enumerate(pos) if p]
        total += -sum(terms) / (n_p + 1)                                                # Eq. (8)
    return total / B


@pytest.mark.parametrize("contrast_batch", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 0.5, "scl"])
def test_dscl_loss_matches_loop_eq8(alpha, contrast_batch):
    q, k, labels, queue, queue_labels = _case()
    got = dscl.dscl_loss(q, k, labels, queue, queue_labels, alpha, TAU, contrast_batch=contrast_batch)
    ref = _eq8_loop(q, k, labels, queue, queue_labels, alpha, TAU, contrast_batch)
    assert got.item() == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_dscl_loss_equals_scl_with_per_anchor_alpha():
    q, k, labels, queue, queue_labels = _case(seed=1)
    # SCL, eq. (1): mean of -log p over {own key} + P_i, written independently with cross_entropy
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.T], 1) / TAU
    target = torch.cat([torch.ones(len(q), 1), (labels[:, None] == queue_labels[None]).float()], 1)
    n_pos = target.sum(1) - 1
    scl = F.cross_entropy(logits, target / target.sum(1, keepdim=True))
    per_anchor = 1.0 / (n_pos + 1)
    got = dscl.dscl_loss(q, k, labels, queue, queue_labels, per_anchor, TAU)
    assert got.item() == pytest.approx(scl.item(), rel=1e-5)
    got = dscl.dscl_loss(q, k, labels, queue, queue_labels, "scl", TAU)
    assert got.item() == pytest.approx(scl.item(), rel=1e-5)
    # a constant alpha is different from SCL whenever |P_i| varies
    got = dscl.dscl_loss(q, k, labels, queue, queue_labels, 0.1, TAU)
    assert got.item() != pytest.approx(scl.item(), rel=1e-3)


def test_dscl_loss_alpha_one_is_moco_infonce():
    q, k, labels, queue, queue_labels = _case(seed=2)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.T], 1) / TAU
    moco = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    got = dscl.dscl_loss(q, k, labels, queue, queue_labels, 1.0, TAU)
    assert got.item() == pytest.approx(moco.item(), rel=1e-5)


@pytest.mark.parametrize("contrast_batch", [False, True])
def test_dscl_loss_no_positive_is_finite(contrast_batch):
    q, k, _, queue, _ = _case(B=4, seed=3)
    q.requires_grad_(True)
    labels = torch.arange(4)                                # unique labels in the batch
    queue_labels = torch.full((queue.shape[0],), 7)        # never a positive
    loss = dscl.dscl_loss(q, k, labels, queue, queue_labels, 0.1, TAU, contrast_batch=contrast_batch)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
    assert loss.item() == pytest.approx(_eq8_loop(q.detach(), k, labels, queue, queue_labels, 0.1, TAU,
                                                  contrast_batch), rel=1e-4)


def test_dscl_loss_bf16_inputs_match_fp32():
    q, k, labels, queue, queue_labels = _case(seed=4)
    ref = dscl.dscl_loss(q, k, labels, queue, queue_labels, 0.1, TAU)
    low = dscl.dscl_loss(q.bfloat16(), k.bfloat16(), labels, queue.bfloat16(), queue_labels, 0.1, TAU)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(ref.item(), rel=0.05)


def _pbsd_case(seed=0, B=3, L=2, K=7, D=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g),
            torch.randn(B, D, generator=g),
            F.normalize(torch.randn(K, D, generator=g), dim=1))


def test_pbsd_loss_matches_direct_eq14():
    s, c, k, queue = _pbsd_case()
    got = dscl.pbsd_loss(s, c, k, queue, TAU).item()
    s, c, k, queue = (F.normalize(t.double(), dim=-1) for t in (s, c, k, queue))
    B, L, total = s.shape[0], s.shape[1], 0.0
    for i in range(B):
        D_i = [k[i]] + list(queue)                          # {z_i^+} + M
        for j in range(L):
            t_exp = [math.exp(float(z @ c[i, j]) / TAU) for z in D_i]
            s_exp = [math.exp(float(z @ s[i, j]) / TAU) for z in D_i]
            total += -sum(te / sum(t_exp) * math.log(se / sum(s_exp)) for te, se in zip(t_exp, s_exp)) / L
    assert got == pytest.approx(total / B, rel=1e-4)


def test_pbsd_loss_is_teacher_entropy_when_equal_and_no_teacher_grad():
    s, _, k, queue = _pbsd_case(seed=1)
    teacher = s.clone().requires_grad_(True)
    student = s.clone().requires_grad_(True)
    loss = dscl.pbsd_loss(student, teacher, k, queue, TAU)
    sn, kn = F.normalize(s, dim=-1), F.normalize(k, dim=-1)
    logits = torch.cat([(sn * kn[:, None]).sum(-1, keepdim=True), sn @ queue.T], -1) / TAU
    entropy = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_enqueue_wraps_and_keeps_labels_aligned():
    K, D, B = 10, 3, 4
    queue, labels = torch.zeros(K, D), torch.full((K,), -1)
    ptr, written = 0, []
    for step in range(4):                                   # 16 keys into 10 slots: wraps around
        ids = torch.arange(step * B, step * B + B)
        keys = ids[:, None].float().expand(B, D)            # the key encodes its id, its label = id % 5
        ptr = dscl.enqueue(queue, labels, ptr, keys, ids % 5)
        written.extend(ids.tolist())
    assert ptr == (4 * B) % K
    newest = written[-K:]                                   # slot s holds the last id written to it
    for s in range(K):
        expect = [i for n, i in enumerate(written) if n % K == s][-1]
        assert queue[s, 0].item() == expect and labels[s].item() == expect % 5
    assert sorted(queue[:, 0].long().tolist()) == sorted(newest)


def test_roi_boxes_inside_image_with_areas_in_scale():
    g = torch.Generator().manual_seed(0)
    H = W = 224
    boxes = data.sample_boxes(64, 5, H, W, scale=(0.05, 0.6), generator=g)
    assert boxes.shape == (64, 5, 4)
    x1, y1, x2, y2 = boxes.unbind(-1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= W).all() and (y2 <= H).all()
    assert (x2 > x1).all() and (y2 > y1).all()
    area = (x2 - x1) * (y2 - y1) / (H * W)
    assert area.min() >= 0.05 * 0.95 and area.max() <= 0.6 * 1.05
    assert area.max() - area.min() > 0.3                    # spread over the range, not one size


def test_roi_teacher_pools_the_box_region():
    # a feature map whose channels are the x and y coordinates of each cell centre (stride 4)
    H = W = 8
    ys, xs = torch.meshgrid(torch.arange(H) * 4 + 2.0, torch.arange(W) * 4 + 2.0, indexing="ij")
    fmap = torch.stack([xs, ys])[None]                      # (1, 2, 8, 8)
    boxes = torch.tensor([[[0.0, 0.0, 32.0, 32.0], [16.0, 8.0, 32.0, 24.0]]])
    c = dscl.roi_teacher(torch.nn.Identity(), fmap, boxes, stride=4)
    assert c.shape == (1, 2, 2)
    # roi_align(aligned=False) reads map cell u at pixel 4u, where this map holds 4u + 2: box centre + 2
    assert c[0, 1, 0].item() == pytest.approx(24.0 + 2, abs=1.0)
    assert c[0, 1, 1].item() == pytest.approx(16.0 + 2, abs=0.5)
    assert c[0, 0].tolist() == pytest.approx([16.0 + 2, 16.0 + 2], abs=0.5)


def test_losses_keep_fp32_logits_inside_autocast():
    """dscl.py calls both losses inside the autocast region; their logits must still be fp32. CPU autocast
    casts matmuls to bf16 just as CUDA autocast does, so a bf16 matmul would show here."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    queue = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    y, qy = torch.randint(0, 4, (16,), generator=g), torch.randint(0, 4, (64,), generator=g)
    s, c = torch.randn(16, 3, 32, generator=g), torch.randn(16, 3, 32, generator=g)
    plain = (dscl.dscl_loss(q, k, y, queue, qy, 0.1, 0.07, contrast_batch=True),
             dscl.pbsd_loss(s, c, k, queue, 0.07))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = (dscl.dscl_loss(q, k, y, queue, qy, 0.1, 0.07, contrast_batch=True),
                dscl.pbsd_loss(s, c, k, queue, 0.07))
    for a, b in zip(plain, auto):
        assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Dataset defaults, the demo profile and the paper settings
# ---------------------------------------------------------------------------------------------------------
def parse(*argv):
    return harness.parse_args(dscl.Args, list(argv), dscl.DEFAULTS)


def paper_of(args, rho=None):
    """The rule: a run is a paper setting exactly when PAPER_TOP1 has a number for its (dataset, variant,
    rho); rho None is what a list dataset (ImageNet-LT, iNaturalist, Places-LT) has."""
    variant = harness.variant_label(args, dscl.DEFAULTS)
    return harness.paper_value(dscl.PAPER_TOP1, args.dataset, variant, rho)


def test_paper_datasets_start_with_the_paper_settings():
    a, filled = parse("--dataset", "imagenet-lt")
    paper = dict(arch="resnet50", finetune="all", queue_size=65536, ema_decay=0.999, tau=0.07,
                 alpha=0.1, pbsd_weight=1.5, num_patches=5, patch_scale=[0.05, 0.6], patch_size=64,
                 crop_scale=[0.08, 1.0],
                 batch_size=256, lr=0.1, lr_warmup_epochs=10, weight_decay=5e-4, momentum=0.9, epochs=200,
                 linear_lr=10.0, linear_epochs=40, linear_milestones=[20, 30], linear_batch_size=2048,
                 proj_dim=128)
    assert {k: getattr(a, k) for k in paper} == paper
    assert filled["arch"] == "resnet50" and "alpha" not in filled
    assert harness.variant_label(a, dscl.DEFAULTS) == "default" and paper_of(a) == 57.7
    assert paper_of(a, rho=100.0) is None                             # a list dataset has no rho
    base = parse("--dataset", "imagenet-lt", "--scl", "--pbsd-weight", "0")[0]           # Table 1 baseline
    assert harness.variant_label(base, dscl.DEFAULTS) == "--scl --pbsd-weight 0.0" and paper_of(base) == 51.2
    assert paper_of(parse("--dataset", "imagenet-lt", "--linear-lr", "2.5")[0]) == 57.4   # Table 3, Ours*
    assert paper_of(parse("--dataset", "imagenet-lt", "--alpha", "0.3")[0]) is None     # not in the paper
    inat = parse("--dataset", "inat2018")[0]
    assert inat.linear_lr == 30.0 and paper_of(inat) == 72.0
    assert paper_of(parse("--dataset", "inat2018", "--linear-lr", "10")[0]) is None
    places = parse("--dataset", "places-lt")[0]
    assert (places.arch, places.finetune, places.epochs, places.linear_lr) == ("resnet152", "layer4", 30, 2.5)
    assert harness.variant_label(places, dscl.DEFAULTS) == "default" and paper_of(places) is None
    places = parse("--dataset", "places-lt", "--pretrained", "resnet152-imagenet1k.pth")[0]
    assert harness.variant_label(places, dscl.DEFAULTS) == "--pretrained resnet152-imagenet1k.pth"
    assert paper_of(places) is None                                     # no cell: compared by hand
    assert paper_of(parse("--dataset", "imagenet100-lt")[0]) is None


def test_old_flag_names_are_gone():
    assert parse("--tau", "0.2", "--proj-dim", "64")[0].tau == 0.2
    for old in (["--temperature", "0.2"], ["--feat-dim", "64"]):
        with pytest.raises(SystemExit) as e:
            parse(*old)
        assert e.value.code == 2


def test_cifar_adaptation_is_filled_and_is_never_a_paper_setting():
    a, filled = parse("--dataset", "cifar10-lt")
    assert (a.arch, a.queue_size, a.ema_decay, a.patch_size) == ("resnet32", 8192, 0.99, 16)
    assert a.crop_scale == [0.2, 1.0]
    assert (a.linear_batch_size, a.linear_lr, a.alpha, a.pbsd_weight) == (512, 2.5, 0.1, 1.5)
    assert (a.batch_size, a.epochs, a.num_patches, a.protocol) == (256, 200, 5, "ldam")
    assert filled["queue_size"] == 8192 and harness.variant_label(a, dscl.DEFAULTS) == "default"
    for name in dscl.SMALL:                                 # the adaptation: no rho, no variant has a cell
        assert not [key for key in dscl.PAPER_TOP1 if key[0] == name]
        args = parse("--dataset", name)[0]
        for rho in (None, 10.0, 50.0, 100.0):
            assert paper_of(args, rho) is None
    b, filled = parse("--dataset", "cifar10-lt", "--queue-size", "4096", "--arch=resnet8")
    assert (b.queue_size, b.arch, b.ema_decay) == (4096, "resnet8", 0.99)
    assert "queue_size" not in filled and "arch" not in filled


# a value different from the ImageNet-LT default for every method flag (a variant of its own; only --scl alone
# is a paper row, Table 1's SCL + PBSD)
CHANGED = {"data_seed": 3, "num_classes": 7, "synthetic_n_test": 5,
           "arch": "resnet18", "finetune": "layer4", "pretrained": "weights.pth", "proj_dim": 64,
           "queue_size": 32768, "ema_decay": 0.99, "tau": 0.1, "alpha": 0.2, "scl": True,
           "contrast_batch": False, "queue_label_init": "none", "multicrop": True, "pbsd_weight": 1.0,
           "num_patches": 4, "patch_scale": [0.1, 0.6], "patch_size": 32, "fuse_patch_passes": True,
           "crop_scale": [0.2, 1.0], "shuffle_bn_chunks": 4, "epochs": 100, "batch_size": 128, "lr": 0.05,
           "lr_warmup_epochs": 5, "momentum": 0.8, "weight_decay": 1e-4, "linear_epochs": 30,
           "linear_lr": 5.0, "linear_milestones": [10, 20], "linear_batch_size": 1024, "linear_bn": "eval"}
IN_PAPER = {"scl": 56.3}


def test_changed_covers_every_method_flag():
    method = {f.name for f in dataclasses.fields(dscl.Args)
              if f.name not in harness.SHARED_FLAGS and not f.metadata.get("runtime")}
    assert set(CHANGED) == method


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_a_changed_method_flag_is_the_variant_and_leaves_the_paper_setting(name):
    value = CHANGED[name]
    flag = harness.as_flag(name, value)
    args = parse("--dataset", "imagenet-lt", *flag.split())[0]
    assert harness.same(getattr(args, name), value)
    assert harness.variant_label(args, dscl.DEFAULTS) == flag
    assert paper_of(args) == IN_PAPER.get(name)
    assert paper_of(parse("--dataset", "imagenet-lt")[0]) == 57.7


def test_synthetic_demo_profile_fills_only_unset_fields(monkeypatch):
    a, filled = parse("--dataset", "synthetic-lt")
    assert (a.arch, a.batch_size, a.queue_size, a.epochs, a.lr_warmup_epochs, a.num_patches) == \
        ("resnet8", 128, 1024, 40, 2, 2)
    assert (a.ema_decay, a.patch_size, a.crop_scale, a.linear_lr) == (0.99, 16, [0.2, 1.0], 2.5)  # CIFAR
    assert filled["queue_size"] == 1024 and filled["ema_decay"] == 0.99
    n_train = sum(data.lt_counts(a.n_max, a.num_classes, a.imb_ratio))
    assert a.queue_size % a.batch_size == 0 and a.queue_size < n_train
    b, filled = parse("--arch", "resnet20", "--dataset", "synthetic-lt", "--epochs=3", "--no-contrast-batch")
    assert (b.arch, b.epochs, b.contrast_batch, b.queue_size) == ("resnet20", 3, False, 1024)
    assert "arch" not in filled and "epochs" not in filled and filled["queue_size"] == 1024
    c = parse("--dataset", "cifar10-lt")[0]                          # the CIFAR defaults are untouched
    assert (c.arch, c.batch_size, c.queue_size, c.epochs, c.num_patches) == ("resnet32", 256, 8192, 200, 5)
    monkeypatch.setenv("COLUMNS", "1000")                               # --help without line wrapping
    helps = harness.make_parser(dscl.Args, dscl.DEFAULTS).format_help()
    assert "synthetic-lt: resnet8" in helps and "--ema-decay" in helps and "--lr-warmup-epochs" in helps


def test_lt_subset_uses_data_seed_not_training_seed():
    def train_images(*flags):
        return dscl.load_data(parse("--dataset", "synthetic-lt", "--n-max", "8",
                                    "--synthetic-n-test", "1", "--num-classes", "3", "--imb-ratio", "4",
                                    *flags)[0]).train.x
    assert dscl.Args().data_seed == 0
    ref = train_images()
    assert torch.equal(ref, train_images("--seed", "7"))               # the subset ignores --seed
    assert not torch.equal(ref, train_images("--data-seed", "7"))


# ---------------------------------------------------------------------------------------------------------
# Tiny runs on synthetic-lt (CPU, resnet8)
# ---------------------------------------------------------------------------------------------------------
def _tiny(out_dir, *extra):
    # every option of the demo profile is given except --num-patches, which the profile fills in (2);
    # 12, 5, 2 and 1 training images: rho 12 exactly
    return ["--dataset", "synthetic-lt", "--num-classes", "4", "--n-max", "12",
            "--synthetic-n-test", "6", "--imb-ratio", "12", "--arch", "resnet8", "--queue-size", "32",
            "--batch-size", "8", "--epochs", "2",
            "--lr-warmup-epochs", "1", "--linear-epochs", "1", "--linear-milestones", "1",
            "--linear-batch-size", "16", "--device", "cpu", "--amp", "off", "--workers", "0",
            "--out-dir", str(out_dir), "--print-every", "1000", *extra]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted tiny run of both stages on synthetic-lt (CPU, resnet8, 2 + 1 epochs)."""
    out = tmp_path_factory.mktemp("dscl_tiny")
    res = dscl.main(_tiny(out))
    return res, next(out.glob("dscl-synthetic-lt-*"))


def test_tiny_two_stage_run_writes_results_and_records_the_filled_defaults(tiny_run):
    res, run_dir = tiny_run
    saved = json.loads((run_dir / "results.json").read_text())
    for groups in (saved["at_last"]["groups_strict"], res["at_last"]["groups_thirds"]):
        assert {"many", "medium", "few"} <= set(groups)
    assert saved["method"] == "dscl + pbsd (CIFAR adaptation)" and saved["paper_setting"] is False
    assert saved["protocol"] == "dscl-linear-cb" and saved["extra"]["alpha"] == 0.1
    assert saved["extra"]["beta"] == pytest.approx(9.0) and saved["epochs"] == {"stage1": 2, "stage2": 1}
    cfg = json.loads((run_dir / "config.json").read_text())
    filled = saved["defaults_filled"]
    assert filled["num_patches"] == 2 and cfg["filled_defaults"] == filled and cfg["args"]["num_patches"] == 2
    assert "arch" not in filled and "queue_size" not in filled and cfg["args"]["arch"] == "resnet8"
    assert "--queue-size 32" in saved["variant"] and "--num-patches" not in saved["variant"]
    assert saved["paper_value"] is None and saved["variant"].startswith("--n-max 12 --num-classes 4")
    ck = load_checkpoint(run_dir / "checkpoint.pt")
    iters = saved["dataset"]["n_train"] // 8
    assert {"model", "key_model", "optimizer", "scaler", "state"} <= set(ck)
    state = ck["state"]
    assert ck["epoch"] == 2 and state["queue"].shape == (32, 128)
    assert state["queue_ptr"] == (2 * iters * 8) % 32
    assert (state["queue_labels"] >= 0).all() and (state["queue_labels"] < 4).all()
    assert torch.allclose(state["queue"].norm(dim=1), torch.ones(32), atol=1e-4)
    assert ck["method"] == "dscl + pbsd (CIFAR adaptation)" and ck["script"] == "dscl"
    assert ck["filled"] == filled and ck["stage"] == "pretrain"
    backbone = common.build_backbone(ck["arch"], ck["image_size"])                     # eval.py --ckpt
    backbone.load_state_dict(evaluation.submodule_state(ck["model"], "backbone"))
    key_head = evaluation.submodule_state(ck["key_model"], "head")
    assert key_head and all(not torch.equal(v, ck["model"]["head." + k]) for k, v in key_head.items()
                            if v.dtype.is_floating_point)                              # EMA, not a copy
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_pbsd"] for r in lines if r.get("stage") == "pretrain"]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert lines[-1]["stage"] == "linear" and lines[-1]["top1"] == saved["at_last"]["top1_overall"]


def test_stage_linear_on_a_stage_one_checkpoint(tiny_run, tmp_path):
    ck_path = tiny_run[1] / "checkpoint.pt"
    res = dscl.main(_tiny(tmp_path, "--stage", "linear", "--ckpt", str(ck_path)))
    assert res["extra"]["stage1_checkpoint"] == str(ck_path) and res["epochs"] == {"stage1": 2, "stage2": 1}
    assert res["backbone"] == "resnet8" and "--stage" not in res["variant"]
    with pytest.raises(common.UserError, match="--ckpt"):
        dscl.main(_tiny(tmp_path, "--stage", "linear"))


def test_demo_profile_is_announced(tmp_path, capsys):
    dscl.main(_tiny(tmp_path, "--stage", "pretrain", "--epochs", "0"))
    line = [s for s in capsys.readouterr().out.splitlines() if "defaults for synthetic-lt" in s]
    assert len(line) == 1 and "not a paper setting" in line[0] and "--num-patches 2" in line[0]
    assert "--arch" not in line[0] and "--queue-size" not in line[0]



def test_resume_is_exact(tiny_run, tmp_path, monkeypatch):
    ref = load_checkpoint(tiny_run[1] / "checkpoint.pt")
    saves = []
    real_save = harness.save_checkpoint

    def save_then_stop(path, state):                   # interrupt right after the first epoch's checkpoint
        real_save(path, state)
        saves.append(path)
        if len(saves) == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(harness, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        dscl.main(_tiny(tmp_path, "--stage", "pretrain"))
    monkeypatch.setattr(harness, "save_checkpoint", real_save)
    ck_path = next(tmp_path.glob("dscl-*")) / "checkpoint.pt"
    cut = load_checkpoint(ck_path)
    assert cut["epoch"] == 1 and cut["state"]["queue_ptr"] != ref["state"]["queue_ptr"]
    dscl.main(_tiny(tmp_path, "--stage", "pretrain", "--resume", str(ck_path)))
    got = load_checkpoint(ck_path)
    assert got["epoch"] == 2 and got["state"]["queue_ptr"] == ref["state"]["queue_ptr"]
    a, b = tensors(ref), tensors(got)
    assert a.keys() == b.keys() and any(k.startswith("/optimizer/") for k in a) and "/rng/torch" in a
    for key, val in a.items():                         # bit for bit: weights, optimiser, queue, RNG state
        assert torch.equal(val, b[key]), f"{key} differs after resume"
    assert not torch.equal(tensors(cut)["/state/queue"], a["/state/queue"])


def _fake_imagenet_lt(root):
    from PIL import Image
    (root / "train" / "n0").mkdir(parents=True)
    Image.new("RGB", (40, 30), (120, 30, 200)).save(root / "train" / "n0" / "a.jpg")
    (root / "ImageNet_LT_train.txt").write_text("train/n0/a.jpg 0\ntrain/n0/a.jpg 1\ntrain/n0/a.jpg 2\n")
    (root / "ImageNet_LT_test.txt").write_text("train/n0/a.jpg 0\ntrain/n0/a.jpg 2\n")


def test_dry_run_prints_the_paper_setting_and_makes_no_run_dir(tmp_path, capsys):
    _fake_imagenet_lt(tmp_path)
    base = ["--dataset", "imagenet-lt", "--data-dir", str(tmp_path), "--dry-run", "--out-dir",
            str(tmp_path / "runs")]
    dscl.main(base)
    out = capsys.readouterr().out
    assert "paper setting: True (variant default; paper top-1 57.7)" in out
    cfg = json.loads(out.split("resolved settings:\n", 1)[1].splitlines()[0])
    assert (cfg["arch"], cfg["ema_decay"], cfg["queue_size"]) == ("resnet50", 0.999, 65536)
    dscl.main(base + ["--scl", "--pbsd-weight", "0"])
    out = capsys.readouterr().out
    assert "paper setting: True (variant --scl --pbsd-weight 0.0; paper top-1 51.2)" in out
    dscl.main(base + ["--alpha", "0.3"])
    assert "paper setting: False (variant --alpha 0.3; paper top-1 None)" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    for argv in (["--dataset", "imagenet-lt", "--data-dir", str(tmp_path), "--dry-run"],      # no list files
                 ["--dataset", "synthetic-lt", "--queue-size", "64", "--dry-run"],            # K < B = 128
                 ["--dataset", "synthetic-lt", "--ema-decay", "1.5"]):
        with pytest.raises(SystemExit) as e:
            harness.main_guard(dscl.main, argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1
    assert "ImageNet_LT_train.txt" not in err


def views_and_step(m, x, y, args):
    """make_views, then stage1_step on them, as the loop runs them (LR 0.05, 32 px, fp32, global RNG)."""
    views = dscl.make_views(x, args, 32, args.dataset in dscl.SMALL)
    return dscl.stage1_step(m, *views, y, 0.05, args, None)


@pytest.mark.parametrize("switches", [["--scl", "--pbsd-weight", "0"],
                                      ["--no-contrast-batch", "--fuse-patch-passes"],
                                      ["--multicrop", "--pbsd-weight", "0"], ["--patch-scale", "1.0", "1.0"],
                                      ["--queue-label-init", "none"]])
def test_ablation_switches_run_one_step(switches, tmp_path):
    args = parse(*_tiny(tmp_path, *switches))[0]
    torch.manual_seed(0)
    m = dscl.build_stage1(args, num_classes=4, image_size=32, device=torch.device("cpu"), amp_dtype=None)
    before = [p.detach().clone() for p in m.net.parameters()]
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 0])
    loss, l_dscl, l_pbsd = views_and_step(m, x, y, args)
    assert torch.isfinite(loss) and loss > 0
    assert (l_pbsd == 0) == (args.pbsd_weight == 0)
    assert m.ptr == 8 and torch.equal(m.queue_labels[:8], y)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.net.parameters()))
    if args.queue_label_init == "none":
        assert (m.queue_labels[8:] == -1).all()


# ---------------------------------------------------------------------------------------------------------
# Against the released code: stage-2 BN and LR schedule, zero-init residual BN, multi-crop, Places-LT
# ---------------------------------------------------------------------------------------------------------
def _bn_spy():
    """Global hooks on every BatchNorm2d forward: its statistics and weights before the first and after the
    last forward, and the (training, grad enabled) flags of every forward."""
    first, last, flags = {}, {}, set()

    def state(mod):
        return (torch.cat([mod.running_mean, mod.running_var]).clone(),
                torch.cat([mod.weight, mod.bias]).detach().clone())

    def pre(mod, inp):
        if isinstance(mod, torch.nn.BatchNorm2d):
            first.setdefault(id(mod), state(mod))

    def post(mod, inp, out):
        if isinstance(mod, torch.nn.BatchNorm2d):
            last[id(mod)] = state(mod)
            flags.add((mod.training, torch.is_grad_enabled()))
    hooks = (torch.nn.modules.module.register_module_forward_pre_hook(pre),
             torch.nn.modules.module.register_module_forward_hook(post))
    return first, last, flags, hooks


@pytest.mark.parametrize("flags", [[], ["--linear-bn", "eval"]])
def test_stage2_bn_trains_by_default_and_eval_on_flag(tiny_run, tmp_path, flags):
    """Stage 2 (released equal_lincls.py): the frozen backbone runs with BN in train mode, so its running
    statistics move, with no gradient and no weight change; --linear-bn eval leaves the statistics alone."""
    first, last, seen, hooks = _bn_spy()
    try:
        dscl.main(_tiny(tmp_path, "--stage", "linear", "--ckpt", str(tiny_run[1] / "checkpoint.pt"), *flags))
    finally:
        for h in hooks:
            h.remove()
    assert last and not any(grad for _, grad in seen)                           # never a backbone gradient
    assert all(torch.equal(first[i][1], w) for i, (_, w) in last.items())       # weights unchanged
    moved = any(not torch.equal(first[i][0], stats) for i, (stats, _) in last.items())
    assert moved == (not flags) and ((True, False) in seen) == (not flags)


def test_stage2_lr_milestones_count_epochs_from_zero(tiny_run, tmp_path):
    """Milestones 20, 30 over 40 epochs: 20 / 10 / 10 epochs at lr, lr/10, lr/100 (released code: 0-based
    epochs, x0.1 once epoch >= milestone)."""
    res = dscl.main(_tiny(tmp_path, "--stage", "linear", "--ckpt", str(tiny_run[1] / "checkpoint.pt"),
                          "--linear-epochs", "40", "--linear-milestones", "20", "30", "--linear-bn", "eval"))
    lrs = [h["lr"] for h in res["history"]]
    assert lrs == pytest.approx([2.5] * 20 + [0.25] * 10 + [0.025] * 10)


def test_dscl_resnet50_starts_with_zero_residual_bn_and_plain_backbones_do_not():
    """The released main.py builds its ResNet-50 with zero_init_residual=True: every residual block's last BN
    (bn3 of the 16 bottlenecks) starts at gamma = 0. common.build_backbone keeps gamma = 1 unless asked, and
    the CIFAR ResNets keep LDAM's initialisation (zero-init stalled the resnet8 demo's stage 1)."""
    def bn_weights(backbone, last):
        layers = [layer for name, layer in backbone.named_children() if name.startswith("layer")]
        return [getattr(block, last).weight for layer in layers for block in layer]
    zero = bn_weights(dscl.DSCLNet("resnet50", 224).backbone, "bn3")
    assert len(zero) == 16 and all(torch.count_nonzero(w) == 0 for w in zero)
    for arch, size in (("resnet50", 224), ("resnet18", 32), ("resnet8", 32)):
        plain = common.build_backbone(arch, size)
        assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in plain.modules()
                   if isinstance(m, torch.nn.BatchNorm2d))
    cifar = bn_weights(dscl.DSCLNet("resnet8", 32).backbone, "bn2")
    assert all(torch.equal(w, torch.ones_like(w)) for w in cifar)
    assert all(torch.count_nonzero(w) == 0 for w in bn_weights(dscl.DSCLNet("resnet18", 32).backbone, "bn2"))


def test_dscl_loss_extra_anchor_equal_to_the_query_changes_nothing():
    q, k, labels, queue, queue_labels = _case(seed=5)
    for cb in (False, True):
        ref = dscl.dscl_loss(q, k, labels, queue, queue_labels, 0.1, TAU, contrast_batch=cb)
        got = dscl.dscl_loss(q, k, labels, queue, queue_labels, 0.1, TAU, cb, torch.stack([q, q]))
        assert got.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("contrast_batch", [True, False])
def test_multicrop_patch_anchors_use_the_main_anchors_contrast_set(tmp_path, monkeypatch, contrast_batch):
    """--multicrop: every patch embedding s_i[j] is scored as z_i is (own key k_i, the same columns, the same
    same-class positives) and the DSCL loss averages the L + 1 anchors. Hand-built batch: two pairs of
    classes and a queue labelled -1, so the in-batch columns hold the only positives."""
    flags = ["--multicrop", "--pbsd-weight", "0", "--queue-label-init", "none"]
    args = parse(*_tiny(tmp_path, *flags, *([] if contrast_batch else ["--no-contrast-batch"])))[0]
    torch.manual_seed(0)
    m = dscl.build_stage1(args, num_classes=4, image_size=32, device=torch.device("cpu"), amp_dtype=None)
    heads, keys, real_keys = [], [], dscl.encode_keys      # query head outputs in call order: z, s_1 .. s_L
    m.net.head.register_forward_hook(lambda mod, inp, out: heads.append(out.detach()))
    monkeypatch.setattr(dscl, "encode_keys", lambda *a: keys.append(real_keys(*a)) or keys[-1])
    queue, queue_labels = m.queue.clone(), m.queue_labels.clone()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 0, 1, 1])
    l_dscl = views_and_step(m, x, y, args)[1]
    z, k = heads[0], keys[0]
    assert len(heads) == 1 + args.num_patches == 3
    want = [_eq8_loop(z, k, y, queue, queue_labels, 0.1, TAU, contrast_batch, anchor=a) for a in heads]
    assert l_dscl.item() == pytest.approx(sum(want) / len(want), rel=1e-4, abs=1e-6)


def test_places_lt_layer4_finetuning_keeps_the_frozen_layers_bn_statistics(tmp_path):
    """--finetune layer4 (Places-LT): only layer4 learns; the frozen layers' BN stays in eval mode, in the
    query and in the key encoder, so their running statistics never move; layer4's do."""
    args = parse(*_tiny(tmp_path, "--arch", "resnet18", "--finetune", "layer4"))[0]
    torch.manual_seed(0)
    m = dscl.build_stage1(args, num_classes=4, image_size=32, device=torch.device("cpu"), amp_dtype=None)
    encs = [common.unwrap(e).backbone for e in (m.net, m.key)]
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in encs]
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    views_and_step(m, x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 0]), args)
    for enc, ref in zip(encs, before):
        now = enc.state_dict()
        stats = [k for k in now if "running_" in k or "num_batches" in k]
        assert all(torch.equal(now[k], ref[k]) for k in stats if not k.startswith("layer4."))
        assert any(not torch.equal(now[k], ref[k]) for k in stats if k.startswith("layer4."))
    frozen = [k for k, _ in encs[0].named_parameters() if not k.startswith("layer4.")]
    assert all(torch.equal(encs[0].state_dict()[k], before[0][k]) for k in frozen)


def test_stage1_step_makes_no_host_sync(tmp_path, no_host_sync):
    args = parse(*_tiny(tmp_path))[0]
    torch.manual_seed(0)
    m = dscl.build_stage1(args, num_classes=4, image_size=32, device=torch.device("cpu"), amp_dtype=None)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 4, (8,))
    with no_host_sync():
        out = views_and_step(m, x, y, args)
    assert torch.isfinite(torch.stack(out)).all() and m.ptr == 8


# ---------------------------------------------------------------------------------------------------------
# Several processes (torchrun, 2 gloo processes): the global batch's losses, gradients, keys and queue
# ---------------------------------------------------------------------------------------------------------
WORLD, PART = 2, 3                         # processes, images per process
DIST_CASES = [(0.1, True, False), ("scl", True, False), (0.1, False, False), (0.1, True, True),
              ("scl", False, True)]        # (alpha, contrast_batch, --multicrop anchors)


def _global_batch():
    q, k, labels, queue, queue_labels = _case(B=WORLD * PART, K=10, D=8, C=2, seed=6)
    g = torch.Generator().manual_seed(7)
    extra, s, c = (torch.randn(*shape, 8, generator=g) for shape in ((2, WORLD * PART), (WORLD * PART, 2),
                                                                      (WORLD * PART, 2)))
    return q, k, labels, queue, queue_labels, extra, s, c, torch.rand(WORLD * PART, 3, 6, 6, generator=g)


def _key_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(64, 8)).train()


def _step_losses(z, y, extra, s, c, k, queue, queue_labels, alpha, contrast_batch, multicrop):
    """stage1_step's lines: queries and labels gathered, this process's anchors, PBSD on its own rows."""
    zg, yg = common.gather(z), common.gather(y)
    mine = common.local_part(torch.arange(len(zg)))
    l_dscl = dscl.dscl_loss(zg, k, yg, queue, queue_labels, alpha, TAU, contrast_batch,
                            extra if multicrop else None, mine)
    return l_dscl, dscl.pbsd_loss(s, c, k[mine], queue, TAU), yg


def _dist_losses(out):                      # every process: its rows of the global batch
    rank = common.get_rank_world()[0]
    q, k, labels, queue, queue_labels, extra, s, c, x = _global_batch()
    mine, got = slice(rank * PART, (rank + 1) * PART), {}
    for case in DIST_CASES:
        z, e, sl = (t.clone().requires_grad_() for t in (q[mine], extra[:, mine], s[mine]))
        l_dscl, l_pbsd, yg = _step_losses(z, labels[mine], e, sl, c[mine], k, queue, queue_labels, *case)
        (l_dscl + l_pbsd).backward()
        got[case] = [l_dscl.detach(), l_pbsd.detach(), z.grad, e.grad, sl.grad]
    net = _key_net()
    torch.manual_seed(5 + rank)             # process 1's own permutation must not be used
    got["keys"] = dscl.encode_keys(net, x[mine], chunks=5)
    qu, ql = queue.clone(), queue_labels.clone()
    got["queue"] = [qu, ql, dscl.enqueue(qu, ql, 7, got["keys"], yg)]
    torch.save(got, out + f"/rank{rank}.pt")


def test_two_processes_give_the_global_batch_losses_gradients_keys_and_queue(dist_outputs):
    """Under torchrun each process scores its anchors against the gathered batch: the mean of the processes'
    losses is the single-process loss of the global batch, and each process's rows get W times the
    single-process gradient (every process's loss sees them; DDP divides by W). The keys: MoCo's shuffled
    BN, one chunk per process, equal to one process with as many chunks; the queue gets the global batch."""
    tmp_path = run_function(dist_outputs, "test_dscl:_dist_losses")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    q, k, labels, queue, queue_labels, extra, s, c, x = _global_batch()
    for case in DIST_CASES:
        alpha, contrast_batch, multicrop = case
        z, e, sg = (t.clone().requires_grad_() for t in (q, extra, s))
        l_dscl = dscl.dscl_loss(z, k, labels, queue, queue_labels, alpha, TAU, contrast_batch,
                                e if multicrop else None)
        l_pbsd = dscl.pbsd_loss(sg, c, k, queue, TAU)
        (l_dscl + l_pbsd).backward()
        for i, ref in enumerate((l_dscl, l_pbsd)):
            torch.testing.assert_close((got[0][case][i] + got[1][case][i]) / WORLD, ref.detach(),
                                       atol=1e-6, rtol=0)
        assert multicrop or e.grad is None
        for r, mine in enumerate((slice(0, PART), slice(PART, 2 * PART))):
            torch.testing.assert_close(got[r][case][2] / WORLD, z.grad[mine], atol=1e-6, rtol=0)
            torch.testing.assert_close(got[r][case][4] / WORLD, sg.grad[mine], atol=1e-6, rtol=0)
            if multicrop:
                torch.testing.assert_close(got[r][case][3] / WORLD, e.grad[:, mine], atol=1e-6, rtol=0)
    net = _key_net()
    torch.manual_seed(5)
    keys = dscl.encode_keys(net, x, chunks=WORLD)              # process 0's permutation, BN per process
    for r in range(WORLD):
        torch.testing.assert_close(got[r]["keys"], keys, atol=1e-6, rtol=0)
        qu, ql, ptr = got[r]["queue"]
        assert ptr == (7 + WORLD * PART) % 10 and torch.equal(ql[[7, 8, 9, 0, 1, 2]], labels)
        assert torch.equal(qu[[7, 8, 9, 0, 1, 2]], got[r]["keys"]) and torch.equal(qu[3:7], queue[3:7])
    net = _key_net()
    torch.manual_seed(5)
    assert not torch.allclose(dscl.encode_keys(net, x, chunks=1), keys, atol=1e-3)   # BN over each chunk
