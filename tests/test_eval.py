"""Tests of eval.py: group metrics, the probe settings table and the SDCLR probe (Jiang et al. 2021), DSCL's
cb-linear stage, kNN, t-SNE, results.json / plots and the CLI. Reference: docs/evaluation.md."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import common
import data
import eval as ev
import harness
from conftest import Poison

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
COLOURS = torch.tensor([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _images(per_class, size, gen, num_classes=4):
    """Images whose colour encodes the class (plus pixel noise): linearly separable after channel pooling."""
    y = torch.arange(num_classes).repeat_interleave(per_class)
    base = COLOURS[y][:, :, None, None].expand(-1, -1, size, size)
    x = (base + 25 * torch.randn(base.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    return data.Split(y=y, x=x)


def _toy_ds(size=8, n_probe=50, n_val=10, n_test=15, class_counts=(300, 120, 40, 10), seed=0):
    gen = torch.Generator().manual_seed(seed)
    probe = _images(n_probe, size, gen)
    return data.LTDataset(
        name="toy", num_classes=4, class_names=["r", "g", "b", "y"], image_size=size,
        train=_images(5, size, gen), test=_images(n_test, size, gen),
        val=_images(n_val, size, gen) if n_val else None, probe=probe, fewshot=_images(5, size, gen),
        class_counts=list(class_counts), class_rank=[0, 1, 2, 3], lt_convention="synthetic",
        image_source="synthetic", imb_ratio=30.0, split=None, tensor_resident=True)


class TinyNet(nn.Module):
    """1x1 conv + BatchNorm + ReLU + global average pooling: a small backbone that has BN buffers."""

    def __init__(self, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, width, 1)
        self.bn = nn.BatchNorm2d(width)
        self.out_dim = width

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


class CountingNet(nn.Module):
    """Wraps a backbone and records the batch size of every forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.out_dim = inner.out_dim
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.inner(x)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _lt_counts(n_max, C, rho):   # exponential LT profile of LDAM (Cao et al. 2019), int() truncation
    return [int(n_max * (1.0 / rho) ** (r / (C - 1))) for r in range(C)]


# ---------------------------------------------------------------------------------------------------------
# group metrics (docs/evaluation.md, Groupings)
# ---------------------------------------------------------------------------------------------------------
def test_thirds_ties_are_broken_by_rank_tail_first():
    counts = [100, 50, 50, 50, 50, 5]
    g = ev.group_masks(counts, class_rank=[0, 1, 2, 3, 4, 5])["thirds"]
    assert g == {"few": [4, 5], "medium": [2, 3], "many": [0, 1]}
    # the generator rank, not the class id, decides among equal counts
    g = ev.group_masks(counts, class_rank=[0, 4, 3, 2, 1, 5])["thirds"]
    assert g == {"few": [1, 5], "medium": [2, 3], "many": [0, 4]}
    # no rank (list datasets): descending class index goes first
    g = ev.group_masks(counts)["thirds"]
    assert g == {"few": [4, 5], "medium": [2, 3], "many": [0, 1]}
    # rho = 1: every count ties, groups follow the rank (C = 10 -> 4 / 3 / 3)
    rank = [3, 0, 9, 1, 8, 2, 7, 4, 6, 5]
    g = ev.group_masks([100] * 10, class_rank=rank)["thirds"]
    assert g["few"] == sorted(c for c in range(10) if rank[c] >= 7)
    assert g["medium"] == sorted(c for c in range(10) if 4 <= rank[c] <= 6)
    assert g["many"] == sorted(c for c in range(10) if rank[c] <= 3)


def test_strict_and_oltr_thresholds_at_exactly_20_and_100():
    counts = [101, 100, 20, 19, 21, 99]
    m = ev.group_masks(counts)
    assert m["strict"] == {"many": [0], "medium": [1, 2, 4, 5], "few": [3]}
    assert m["oltr"] == {"many": [0, 1], "medium": [4, 5], "few": [2, 3]}


@pytest.mark.parametrize("n_max,C,rho,thirds,strict,oltr", [
    (4500, 10, 100, [4, 3, 3], [8, 2, 0], [8, 2, 0]),       # CIFAR-10-LT sdclr
    (500, 100, 100, [34, 33, 33], [35, 35, 30], [35, 34, 31]),   # CIFAR-100-LT ldam
    (450, 100, 100, [34, 33, 33], [33, 34, 33], [33, 33, 34]),   # CIFAR-100-LT sdclr
    (500, 200, 100, [68, 66, 66], [70, 70, 60], [70, 67, 63]),   # Tiny-ImageNet-LT
])
def test_group_sizes_match_known_counts(n_max, C, rho, thirds, strict, oltr):
    counts = _lt_counts(n_max, C, rho)
    m = ev.compute_metrics(torch.zeros(C, dtype=torch.long), torch.arange(C), C, counts, list(range(C)))
    assert m["groups_thirds"]["n_classes"] == thirds
    assert m["groups_strict"]["n_classes"] == strict
    assert m["groups_oltr"]["n_classes"] == oltr


def test_worked_examples_group_mean_and_std():
    groups = {"many": [0], "medium": [1], "few": [2]}
    g = ev.group_stats([86.55, 76.73, 78.80], groups)        # FASSL CIFAR10-LT row (FASSL Table 1)
    assert round(g["group_mean"], 2) == 80.69
    assert round(g["std"], 2) == 4.23
    assert round(ev.group_stats([57.74, 54.52, 53.55], groups)["std"], 2) == 1.79
    assert round(ev.group_stats([32.47, 31.73, 32.12], groups)["std"], 2) == 0.30
    # group_mean (FASSL's "All") differs from the class mean with 3/3/4 groups
    per_class = [78.80] * 3 + [76.73] * 3 + [86.55] * 4
    counts = [10, 11, 12, 100, 101, 102, 1000, 1001, 1002, 1003]
    m = ev.compute_metrics(*_preds_for_accuracy(per_class, 10000), 10, counts)
    assert round(m["groups_thirds"]["group_mean"], 2) == 80.69
    assert round(m["acc_class_mean"], 2) == 81.28


def _preds_for_accuracy(per_class_acc, n_per_class):
    """Predictions giving exactly per_class_acc[c] % correct on n_per_class test images of class c."""
    preds, labels = [], []
    C = len(per_class_acc)
    for c, acc in enumerate(per_class_acc):
        k = round(acc * n_per_class / 100)
        labels += [c] * n_per_class
        preds += [c] * k + [(c + 1) % C] * (n_per_class - k)
    return torch.tensor(preds), torch.tensor(labels)


def test_compute_metrics_on_hand_built_predictions():
    counts = [500, 150, 101, 100, 20, 19]       # strict: many {0,1,2}, medium {3,4}, few {5}
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 2 + [3] * 2 + [4] * 4 + [5] * 4)
    preds = labels.clone()
    preds[0:1] = 1          # class 0: 3/4
    preds[4:8] = 0          # class 1: 0/4
    preds[10] = 0           # class 3: 1/2
    preds[16:18] = 0        # class 5: 2/4
    m = ev.compute_metrics(preds, labels, 6, counts)
    per = [75.0, 0.0, 100.0, 50.0, 100.0, 50.0]
    assert m["per_class_acc"] == pytest.approx(per)
    assert m["top1_overall"] == pytest.approx(100 * 12 / 20)
    assert m["acc_class_mean"] == pytest.approx(sum(per) / 6)
    mean = sum(per) / 6
    assert m["std_classes"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in per) / 6))
    s = m["groups_strict"]
    assert (s["many"], s["medium"], s["few"]) == pytest.approx((175 / 3, 75.0, 50.0))
    gm = (175 / 3 + 75 + 50) / 3
    assert s["group_mean"] == pytest.approx(gm)
    assert s["std"] == pytest.approx(math.sqrt(((175 / 3 - gm) ** 2 + (75 - gm) ** 2 + (50 - gm) ** 2) / 3))
    t = m["groups_thirds"]      # ascending counts: few {5, 4}, medium {3, 2}, many {1, 0}
    assert (t["few"], t["medium"], t["many"]) == pytest.approx((75.0, 75.0, 37.5))
    o = m["groups_oltr"]        # many >= 100 {0,1,2,3}, few <= 20 {4,5}, medium none
    assert o["medium"] is None and o["n_classes"] == [4, 0, 2]
    assert o["group_mean"] == pytest.approx((56.25 + 75.0) / 2)   # empty group left out
    assert o["std"] == pytest.approx(abs(56.25 - 75.0) / 2)
    assert ev.paper_row(m, "ssl") == f"| {t['group_mean']:.2f} | 75.00 | 75.00 | 37.50 | {t['std']:.2f} |"
    assert ev.paper_row(m, "dscl") == "| 58.33 | 75.00 | 50.00 | 60.00 |"
    assert ev.paper_row(m, "top1") == "| 60.00 |"


# ---------------------------------------------------------------------------------------------------------
# SDCLR linear probe (docs/evaluation.md, SDCLR linear probe)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aug", ["crop", "none"])
def test_probe_reaches_95_percent_on_separable_toy(aug):
    ds = _toy_ds()
    res = ev.linear_probe(TinyNet(), ds, CPU, aug=aug, epochs=6, milestones=[3, 5], log=lambda s: None,
                          recipe="crop_flip_cifar")
    assert res["at_selected"]["top1_overall"] >= 95.0
    assert res["at_last"]["top1_overall"] >= 95.0
    assert res["protocol"] == "sdclr-probe-full"
    assert res["variant"] == ("crop" if aug == "crop" else "sdclr-probe-cached (approx)")
    assert res["selection"]["rule"] == "best-val-top1" and 1 <= res["selection"]["selected_epoch"] <= 6
    if aug == "none":                                            # standardised, lr 0.1: no blow-up
        assert max(h["loss"] for h in res["history"]) < 3
    base = 30 if aug == "crop" else ev.CACHED_LR              # the cached variant's own learning rate
    assert [h["lr"] for h in res["history"]] == pytest.approx([base, base, base / 10, base / 10,
                                                               base / 100, base / 100])
    # group counts come from ds.class_counts (the pre-training set), not from the balanced probe set
    assert res["at_selected"]["groups_strict"]["n_classes"] == [2, 1, 1]


def test_probe_reads_test_set_exactly_once(monkeypatch):
    ds = _toy_ds(n_probe=50, n_val=10, n_test=15)      # probe 200 (batches 128 + 72), val 40, test 60
    net = CountingNet(TinyNet())
    seen = []
    real = ev.extract_features

    def spy(backbone, split, *a, **kw):
        seen.append("test" if split is ds.test else "val" if split is ds.val else "other")
        return real(backbone, split, *a, **kw)

    monkeypatch.setattr(ev, "extract_features", spy)
    res = ev.linear_probe(net, ds, CPU, aug="crop", epochs=4, milestones=[2], log=lambda s: None)
    assert seen.count("test") == 1 and seen[-1] == "test"        # once, after selection
    assert net.batch_sizes.count(len(ds.test)) == 1               # one backbone pass over the 60 test images
    assert net.batch_sizes.count(128) == 4 and net.batch_sizes.count(72) == 4
    assert res["at_selected"] is not res["at_last"] or res["selection"]["selected_epoch"] == 4
    # few-shot: validation every 5 epochs (and at the last), test once
    seen.clear()
    net.batch_sizes.clear()
    res = ev.linear_probe(net, ds, CPU, mode="few-shot", aug="none", epochs=7, milestones=[4],
                          log=lambda s: None)
    assert res["protocol"] == "sdclr-probe-fewshot"
    assert [h["epoch"] for h in res["history"] if h["val_top1"] is not None] == [5, 7]
    assert seen.count("test") == 1 and net.batch_sizes.count(len(ds.test)) == 1


def test_probe_without_val_selects_last_epoch():
    ds = _toy_ds(n_val=0)
    net = TinyNet()
    rng = torch.get_rng_state()
    res = ev.linear_probe(net, ds, CPU, aug="none", epochs=3, milestones=[2], log=lambda s: None)
    assert torch.equal(rng, torch.get_rng_state())     # a probe inside a training run leaves the RNG alone
    assert res["selection"]["selected_epoch"] == 3 and "last" in res["selection"]["rule"]
    assert res["at_selected"] == res["at_last"]


def test_label_fraction_split_and_imagenet100_top5_selection():
    ds = _toy_ds()
    y = torch.tensor([0] * 10 + [1] * 7 + [2] * 3 + [3] * 1)
    ds.train = data.Split(y=y, x=torch.zeros(len(y), 3, 8, 8, dtype=torch.uint8))
    sub = ev.label_fraction_split(ds, 0.3, seed=1)           # FASSL Table 10 probe set
    assert torch.bincount(sub.y, minlength=4).tolist() == [3, 2, 1, 1]
    with pytest.raises(common.UserError):
        ev.label_fraction_split(ds, 0.0)
    ds.name = "imagenet100-lt"                                # SDCLR selects ImageNet-100 probes on val top-5
    res = ev.linear_probe(TinyNet(), ds, CPU, aug="none", epochs=2, milestones=[1], log=lambda s: None)
    assert res["selection"]["rule"] == "best-val-top5" and "val_top5" in res["history"][0]


def _places_like(image_size=224, size=8, seed=0):
    """A Places-LT-style dataset: no probe pool, no few-shot split; tensors are `size` px, the declared
    image_size is what the settings table reads."""
    gen = torch.Generator().manual_seed(seed)
    return data.LTDataset(
        name="places-lt", num_classes=4, class_names=["a", "b", "c", "d"], image_size=image_size,
        train=_images(30, size, gen), test=_images(10, size, gen), val=_images(5, size, gen), probe=None,
        fewshot=None, class_counts=[300, 120, 40, 10], class_rank=[0, 1, 2, 3], lt_convention="list",
        image_source="synthetic", imb_ratio=None, split=None, tensor_resident=True)


def test_probe_settings_table_covers_every_dataset():
    assert set(ev.PROBE_SETTINGS) == set(data.DATASETS)
    sizes = {"cifar10-lt": 32, "cifar100-lt": 32, "synthetic-lt": 32, "folder": 32, "tiny-imagenet-lt": 64,
             "imagenet-lt": 224, "places-lt": 224, "inat2018": 224, "imagenet100-lt": 224}
    for name in data.DATASETS:
        ds = _places_like(image_size=sizes[name])
        ds.name = name
        s = ev.probe_settings(ds)
        assert s["lr"] == 30.0 and s["epochs"] == {"full": 30, "few-shot": 100}
        assert s["milestones"] == {"full": (10, 20), "few-shot": (40, 60)}
        assert s["batch_size"] == (512 if sizes[name] == 224 else 128), name   # SDCLR: 512 at 224 px
        assert s["row"] == ("ssl" if s["groups"] == "thirds" else "strict")
    ds = _places_like(image_size=224)
    for name, batch in (("folder", 512), ("an-unknown-name", 512), ("cifar10-lt", 128)):
        ds.name = name                          # folder and unknown names: by image size
        assert ev.probe_settings(ds)["batch_size"] == batch
    s = ev.probe_settings(_places_like())
    assert s["split"] == {"full": "train", "few-shot": "fewshot"} and s["groups"] == "thirds"
    ds = _places_like()
    ds.name, ds.probe = "imagenet100-lt", ds.train                  # ImageNet-100-LT has a probe list
    s = ev.probe_settings(ds)
    assert s["split"]["full"] == "probe" and s["groups"] == "strict" and s["select_topk"] == 5
    ev.probe_settings(ds)["split"]["full"] = "changed"      # callers get a copy, the table is unchanged
    assert ev.PROBE_SETTINGS["imagenet100-lt"]["split"]["full"] == "probe"


def test_run_probes_places_lt_trains_on_train_split_and_skips_few_shot(monkeypatch, capsys):
    ds = _places_like()
    seen = []
    real = ev.extract_features

    def spy(backbone, split, *a, **kw):
        seen.append("train" if split is ds.train else "test" if split is ds.test else "val")
        return real(backbone, split, *a, **kw)

    monkeypatch.setattr(ev, "extract_features", spy)
    res = ev.run_probes(TinyNet(), ds, ["full", "few-shot"], CPU, aug="none", epochs=2, log=lambda s: None)
    assert list(res) == ["full"]                                      # few-shot skipped with a note
    assert "no few-shot split" in capsys.readouterr().out
    p = res["full"]["probe"]
    assert p["train_split"] == "train" and p["n_train"] == len(ds.train) and "train" in seen
    assert p["batch_size"] == 512 and p["epochs"] == 2 and p["row"] == "ssl" and p["groups"] == "thirds"
    assert res["full"]["protocol"] == "sdclr-probe-full" and seen[-1] == "test"
    # linear_probe on its own reads the same table (the Places-LT probe needs no train_split argument)
    alone = ev.linear_probe(TinyNet(), ds, CPU, aug="none", epochs=1, log=lambda s: None)
    assert alone["probe"]["n_train"] == len(ds.train) == 120


def test_run_probes_epochs_override_and_label_fraction():
    ds = _toy_ds()
    res = ev.run_probes(TinyNet(), ds, ["full", "few-shot"], CPU, aug="none", log=lambda s: None)
    assert [len(res[m]["history"]) for m in ("full", "few-shot")] == [30, 100]   # the table's epochs
    full, few = res["full"]["probe"], res["few-shot"]["probe"]
    assert full["milestones"] == [10, 20] and few["milestones"] == [40, 60]
    assert full["train_split"] == "probe" and few["train_split"] == "fewshot" and full["batch_size"] == 128
    res = ev.run_probes(TinyNet(), ds, ["full", "few-shot"], CPU, aug="none", epochs=3, log=lambda s: None)
    assert [len(res[m]["history"]) for m in ("full", "few-shot")] == [3, 3]       # explicit epochs win
    assert res["full"]["probe"]["epochs"] == 3
    res = ev.run_probes(TinyNet(), ds, ["full"], CPU, aug="none", epochs=1, label_fraction=0.5,
                        batch_size=16, log=lambda s: None)
    assert res["full"]["variant"].endswith("label fraction 0.5") and res["full"]["probe"]["batch_size"] == 16
    assert res["full"]["probe"]["n_train"] == len(ev.label_fraction_split(ds, 0.5))
    m = res["full"]["at_selected"]
    assert ev.paper_row(m, "strict") == ev.paper_row(m, "dscl")
    assert ev.PAPER_HEADER["strict"].startswith("| Many")


def test_frozen_backbone_params_and_bn_buffers_bit_identical():
    torch.manual_seed(0)
    net = common.build_backbone("resnet8")
    net.train()
    with torch.no_grad():   # move the BN running statistics away from their initial values
        for _ in range(2):
            net(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    before = _state(net)
    assert any("running_mean" in k for k in before)
    ds = _toy_ds(size=32, n_probe=6, n_val=3, n_test=3)
    ev.linear_probe(net, ds, CPU, aug="crop", epochs=2, milestones=[1], batch_size=12, log=lambda s: None)
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert net.training                                   # the caller's mode is restored
    assert all(p.grad is None for p in net.parameters())


def test_cb_linear_balanced_stage_and_bn_train_copy():
    ds = _toy_ds(n_probe=10)
    ds.train = ds.probe         # a "LT train set" for the supervised stage
    net = TinyNet()
    res = ev.cb_linear(net, ds, CPU, lr=2.5, epochs=3, milestones=(2,), batch_size=16, log=lambda s: None)
    assert res["protocol"] == "dscl-linear-cb" and res["probe"]["bn"] == "eval"
    assert res["selection"]["selected_epoch"] == 3 and res["at_selected"] == res["at_last"]
    assert res["best_test"]["selected_on_test"] is True
    assert res["at_last"]["top1_overall"] >= 90.0
    assert "at_val_selected" in res
    net.train()
    before = _state(net)
    res = ev.cb_linear(net, ds, CPU, lr=2.5, epochs=2, milestones=(2,), batch_size=16, bn="train",
                       log=lambda s: None)
    assert res["probe"]["bn"] == "train"
    for k, v in net.state_dict().items():    # released-code BN mode runs on a copy
        assert torch.equal(before[k], v), k


def test_classifier_eval_matches_manual_predictions():
    ds = _toy_ds()
    net, fc = TinyNet(), nn.Linear(16, 4)
    m = ev.classifier_eval(net, fc, ds, CPU)
    feats, y = ev.extract_features(net, ds.test, CPU)
    expected = ev.compute_metrics(fc(feats).argmax(1), y, 4, ds.class_counts, ds.class_rank)
    assert m == expected


# ---------------------------------------------------------------------------------------------------------
# kNN monitor, t-SNE
# ---------------------------------------------------------------------------------------------------------
def test_knn_monitor_on_easy_blobs():
    ds = _toy_ds(n_probe=50)
    m = ev.knn_monitor(TinyNet(), ds.probe, ds.val, CPU, 4, class_counts=ds.class_counts,
                       class_rank=ds.class_rank)
    assert m["acc_class_mean"] > 90.0 and m["groups_thirds"]["n_classes"] == [2, 1, 1]
    # feature-level vote: four Gaussian blobs, cosine kNN
    gen = torch.Generator().manual_seed(1)
    centres = torch.eye(4, 8) * 5
    yb, yq = torch.arange(4).repeat_interleave(100), torch.arange(4).repeat_interleave(25)
    bank = centres[yb] + torch.randn(400, 8, generator=gen)
    query = centres[yq] + torch.randn(100, 8, generator=gen)
    pred = ev.knn_predict(bank, yb, query, 4, k=200, t=0.1, chunk=32)
    assert (pred == yq).float().mean() > 0.9


def _majority_reference(bank, yb, query, num_classes, k):
    """Brute force: the k most cosine-similar bank vectors vote once each; a tie goes to the tied class that
    holds the nearest of them."""
    bank, query = nn.functional.normalize(bank, dim=1), nn.functional.normalize(query, dim=1)
    out = []
    for q in query:
        near = [int(yb[j]) for j in torch.argsort(bank @ q, descending=True)[:k]]
        votes = [near.count(c) for c in range(num_classes)]
        out.append(next(c for c in near if votes[c] == max(votes)))
    return torch.tensor(out)


def test_knn_majority_vote_and_its_tie_rule():
    ang = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]).deg2rad()
    bank, q = torch.stack([ang.cos(), ang.sin()], 1), torch.tensor([[1.0, 0.0]])   # ranks 0..4 by angle

    def pred(labels, k):
        return ev.knn_predict(bank, torch.tensor(labels), q, 3, k=k, vote="majority").item()
    assert pred([0, 1, 1, 0, 2], 1) == 0 and pred([0, 1, 1, 0, 2], 3) == 1      # nearest; 2 votes to 1
    assert pred([0, 1, 1, 0, 2], 4) == 0                                        # 2 : 2, class 0 holds rank 0
    assert pred([2, 1, 0, 1, 0], 5) == 1                                        # 2 : 2 : 1; 1 holds rank 1
    weighted = ev.knn_predict(bank, torch.tensor([0, 1, 1, 0, 2]), q, 3, k=3, t=0.1).item()
    assert weighted == 0                       # the monitor: e^(cos 10/.1) > e^(cos 20/.1) + e^(cos 30/.1)
    gen = torch.Generator().manual_seed(0)
    yb, centres = torch.randint(0, 4, (300,), generator=gen), torch.randn(4, 6, generator=gen)
    bank = centres[yb] + 1.5 * torch.randn(300, 6, generator=gen)
    query = 2 * torch.randn(80, 6, generator=gen)
    for k in (1, 10, 25):
        assert torch.equal(ev.knn_predict(bank, yb, query, 4, k=k, vote="majority", chunk=32),
                           _majority_reference(bank, yb, query, 4, k))


def test_knn_ts_protocol_banks_the_lt_set_and_queries_the_test_set():
    """TS protocol (Kukleva et al., ICLR 2023): bank = the labelled LT set, queries = test, k = 1 and 10,
    class-mean accuracy. The probe pool and the validation split are never read."""
    ds = _toy_ds(n_test=15)
    full = _images(20, 8, torch.Generator().manual_seed(3))
    keep = torch.cat([torch.arange(c * 20, c * 20 + n) for c, n in enumerate((20, 8, 4, 2))])   # LT counts
    ds.train = ev._subset(full, keep)
    ds.class_counts, ds.probe, ds.val = [20, 8, 4, 2], Poison(200), Poison(40)
    out = ev.knn_ts(TinyNet(), ds, CPU)
    assert set(out) == {1, 10} and out[1]["acc_class_mean"] == 100.0               # easy colour blobs
    (bf, by), (qf, qy) = (ev.extract_features(TinyNet(), s, CPU, recipe="test_imagenet")
                          for s in (ds.train, ds.test))
    for k in (1, 10):
        expected = ev.compute_metrics(_majority_reference(bf, by, qf, 4, k), qy, 4, ds.class_counts)
        assert out[k]["acc_class_mean"] == pytest.approx(expected["acc_class_mean"])
        assert out[k]["per_class_acc"] == pytest.approx(expected["per_class_acc"])
    ds.test = data.Split(y=ds.test.y.flip(0), x=ds.test.x)          # other test labels: other scores
    assert ev.knn_ts(TinyNet(), ds, CPU, ks=(1,))[1]["acc_class_mean"] < 50.0


def test_tsne_separates_two_gaussian_blobs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 20, generator=gen)
    y = torch.arange(2).repeat_interleave(80)
    x[y == 1] += 8.0
    emb = ev.tsne(x, perplexity=20, iters=300, seed=0)
    assert emb.shape == (160, 2) and torch.isfinite(emb).all()
    c0, c1 = emb[y == 0].mean(0), emb[y == 1].mean(0)
    pred = ((emb - c1).norm(dim=1) < (emb - c0).norm(dim=1)).long()
    assert (pred == y).float().mean() > 0.95


# ---------------------------------------------------------------------------------------------------------
# results.json, plots, --table
# ---------------------------------------------------------------------------------------------------------
def test_write_results_and_plots(tmp_path):
    ds = _toy_ds()
    res = ev.results_skeleton("sdclr", "", True, ds, "sdclr-probe-full", "backbone", "resnet8", {"probe": 2},
                              0, "off", 1.5)
    res.update(ev.linear_probe(TinyNet(), ds, CPU, aug="none", epochs=2, milestones=[1], log=lambda s: None))
    ev.write_results(tmp_path, res)
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("method", "variant", "paper_setting", "dataset", "protocol", "network_evaluated", "backbone",
                "epochs", "seed", "amp", "git_commit", "wall_time_s", "selection", "at_selected", "at_last"):
        assert key in saved
    assert saved["dataset"]["class_counts"] == ds.class_counts
    assert set(saved["at_selected"]["groups_thirds"]) == {"many", "medium", "few", "group_mean", "std",
                                                          "n_classes"}
    assert (tmp_path / "per_class_acc.png").stat().st_size > 1000
    assert (tmp_path / "group_acc.png").stat().st_size > 1000
    feats, labels = ev.extract_features(TinyNet(), ds.test, CPU)
    ev.plot_tsne(feats, labels, tmp_path / "tsne.png", class_names=ds.class_names)
    assert (tmp_path / "tsne.png").stat().st_size > 1000


def _fake_results(path, method, split, group_mean, top1, few):
    m = {"top1_overall": top1, "acc_class_mean": top1, "per_class_acc": [], "std_classes": 0.0,
         "groups_thirds": {"many": 90.0, "medium": 80.0, "few": few, "group_mean": group_mean, "std": 1.0,
                           "n_classes": [4, 3, 3]},
         "groups_strict": {"many": 85.0, "medium": 70.0, "few": None, "group_mean": 77.5, "std": 7.5,
                           "n_classes": [8, 2, 0]},
         "groups_oltr": {"many": 85.0, "medium": 70.0, "few": None, "group_mean": 77.5, "std": 7.5,
                         "n_classes": [8, 2, 0]}}
    res = {"method": method, "variant": "", "protocol": "sdclr-probe-full",
           "dataset": {"name": "cifar10-lt", "lt_convention": "sdclr", "imb_ratio": 100, "split": split},
           "at_selected": m, "at_last": m}
    path.write_text(json.dumps(res))
    return str(path)


def test_table_aggregates_mean_and_population_std(tmp_path, capsys):
    files = [_fake_results(tmp_path / f"r{i}.json", "sdclr", i + 1, gm, t1, few)
             for i, (gm, t1, few) in enumerate([(80.0, 81.0, 70.0), (82.0, 83.0, 74.0), (84.0, 88.0, 72.0)])]
    files.append(_fake_results(tmp_path / "other.json", "fassl", 1, 90.0, 91.0, 88.0))
    rows = ev.aggregate_results(files)
    assert len(rows) == 2
    sdclr = next(r for r in rows if r["key"]["method"] == "sdclr")
    assert sdclr["n"] == 3
    assert sdclr["All"] == pytest.approx((82.0, math.sqrt(8 / 3)))
    assert sdclr["Top-1"] == pytest.approx((84.0, math.sqrt(((81 - 84) ** 2 + (83 - 84) ** 2 + 16) / 3)))
    assert sdclr["Rare"] == pytest.approx((72.0, math.sqrt(8 / 3)))
    assert sdclr["Few (strict)"] is None
    out = subprocess.run([sys.executable, "eval.py", "--table", *files], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(r for r in out.stdout.splitlines() if r.startswith("| sdclr"))
    assert "| 3 |" in line and "82.00 ± 1.63" in line and "84.00 ± 2.94" in line and "72.00 ± 1.63" in line
    single = next(r for r in out.stdout.splitlines() if r.startswith("| fassl"))
    assert "| 1 | 91.00 | 90.00 |" in single and "±" not in single          # one run: no spread
    assert out.stdout.index("| sdclr") < out.stdout.index("| fassl")        # the command line's order
    # bad input: one line on stderr, exit code 2 (in-process, through the same wrapper as the CLI)
    with pytest.raises(SystemExit) as exc, common.user_errors():
        ev.main(["--table", str(tmp_path / "missing.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("error:") and "missing.json" in err


# ---------------------------------------------------------------------------------------------------------
# --ckpt: evaluate a method checkpoint on synthetic-lt
# ---------------------------------------------------------------------------------------------------------
class _Net(nn.Module):
    """The layout of a method's main network: the backbone and (Hybrid) the end-to-end classifier."""

    def __init__(self, classifier=True):
        super().__init__()
        self.backbone = common.build_backbone("resnet8", 32)
        self.head = nn.Linear(self.backbone.out_dim, 8)
        self.classifier = nn.Linear(self.backbone.out_dim, 3) if classifier else None


def _synthetic_ckpt(tmp_path, method="sdclr", classifier=True):
    """A checkpoint in the harness layout: the main network under "model" (harness.Run.checkpoint)."""
    torch.manual_seed(0)
    net = _Net(classifier)
    args = {"dataset": "synthetic-lt", "data_dir": str(tmp_path / "data"), "imb_ratio": 4.0,
            "protocol": "sdclr", "split": 1, "split_file": None, "seed": 0, "data_seed": 0, "num_classes": 3,
            "n_max": 12, "synthetic_n_test": 6}
    run = tmp_path / "runs" / "sdclr-synthetic-lt-1"
    run.mkdir(parents=True, exist_ok=True)
    path = run / "checkpoint.pt"
    harness.save_checkpoint(path, {"model": net.state_dict(), "method": method, "arch": "resnet8",
                                   "image_size": 32, "args": args, "epoch": 1, "stage": "", "state": None})
    return path


def test_submodule_state_strips_the_prefix():
    net = _Net()
    state = ev.submodule_state(net.state_dict(), "backbone")
    assert state.keys() == net.backbone.state_dict().keys()
    assert all(torch.equal(v, net.backbone.state_dict()[k]) for k, v in state.items())
    assert ev.submodule_state(net.state_dict(), "classifier").keys() == {"weight", "bias"}
    assert ev.submodule_state(net.state_dict(), "back") == {}              # a whole name, not a prefix of one
    assert ev.submodule_state(_Net(classifier=False).state_dict(), "classifier") == {}


def test_metric_value_reads_a_dotted_path():
    m = {"top1_overall": 81.5, "groups_thirds": {"group_mean": 80.7, "few": None}}
    assert ev.metric_value(m, "top1_overall") == 81.5
    assert ev.metric_value(m, "groups_thirds.group_mean") == 80.7
    assert ev.metric_value(m, "groups_thirds.few") is None
    assert ev.metric_value(m, "groups_strict.many") is None and ev.metric_value(None, "top1_overall") is None
    assert ev.metric_value(m, "top1_overall.x") is None


def test_git_commit_is_the_short_sha_of_this_repository():
    sha = ev.git_commit()
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert sha == (out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown")
    assert not hasattr(common, "git_commit")


@pytest.mark.parametrize("probe", ["linear", "knn", "classifier"])
def test_cli_ckpt_writes_results_and_plots(tmp_path, capsys, probe):
    path = _synthetic_ckpt(tmp_path)
    extra = ["--no-tsne"]
    if probe == "linear":
        extra = ["--probe-aug", "none", "--epochs", "2", "--milestones", "1"]
    res = ev.main(["--ckpt", str(path), "--probe", probe, "--device", "cpu", "--amp", "off",
                   "--tsne-points", "30", *extra])
    (path.parent / "results.json").write_text('{"from": "training"}')   # the training run's own results
    run = path.parent / f"eval-{probe}"                                    # default output: a sub-directory
    saved = json.loads((run / "results.json").read_text())
    assert json.loads((path.parent / "results.json").read_text()) == {"from": "training"}
    assert saved["method"] == "sdclr" and saved["dataset"]["name"] == "synthetic-lt"
    assert saved["dataset"]["class_counts"] == data.lt_counts(12, 3, 4.0)
    assert saved["at_selected"]["per_class_acc"] == res["at_selected"]["per_class_acc"]
    assert (run / "per_class_acc.png").exists() and (run / "group_acc.png").exists()
    out = capsys.readouterr().out
    style = "top1" if probe == "classifier" else "ssl"
    assert ev.PAPER_HEADER[style] in out and ev.paper_row(res["at_selected"], style) in out
    if probe == "classifier":
        assert saved["protocol"] == "hybrid-e2e" and saved["selection"]["selected_epoch"] == 1
    elif probe == "linear":
        assert saved["protocol"] == "sdclr-probe-full" and saved["variant"] == "sdclr-probe-cached (approx)"
        assert saved["probe"]["train_split"] == "probe" and saved["probe"]["row"] == "ssl"   # via run_probes
        assert len(saved["history"]) == 2 and (run / "tsne.png").exists()
    else:
        assert saved["protocol"] == "knn-monitor" and not (run / "tsne.png").exists()


def test_cli_ckpt_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exc, common.user_errors():
        ev.main(["--ckpt", str(bad), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.strip().count("\n") == 0
    assert "--ckpt" in err and "unreadable" in err and "--resume" not in err       # names the flag given
    # the layout before the harness (a "backbone" entry, no "model"): one line, not a KeyError
    old = {"method": "sdclr", "arch": "resnet8", "backbone": common.build_backbone("resnet8").state_dict()}
    torch.save(old, bad)
    with pytest.raises(common.UserError, match="lacks its arch or model"):
        ev.main(["--ckpt", str(bad), "--device", "cpu"])
    # another architecture's weights, and a classifier probe of a network without one
    path = _synthetic_ckpt(tmp_path)
    ckpt = data.load_checkpoint(path)
    ckpt["arch"] = "resnet20"
    harness.save_checkpoint(path, ckpt)
    with pytest.raises(common.UserError, match="do not fit arch resnet20"):
        ev.main(["--ckpt", str(path), "--device", "cpu", "--probe", "knn", "--no-tsne"])
    path = _synthetic_ckpt(tmp_path, classifier=False)
    with pytest.raises(common.UserError, match="no end-to-end classifier"):
        ev.main(["--ckpt", str(path), "--device", "cpu", "--probe", "classifier", "--no-tsne"])


def test_cli_ckpt_uses_the_checkpoints_method_label(tmp_path):
    """A checkpoint's "method" is the run's label (tase.py: "TASE-R (reconstruction)"): it names the method in
    results.json."""
    path = _synthetic_ckpt(tmp_path, method="TASE-R (reconstruction)")
    ev.main(["--ckpt", str(path), "--probe", "knn", "--device", "cpu", "--amp", "off", "--no-tsne",
             "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["method"] == "TASE-R (reconstruction)"


def test_cli_knn_protocol_ts_and_the_monitor_never_reads_test(tmp_path, monkeypatch, capsys):
    path = _synthetic_ckpt(tmp_path)
    cli = ["--ckpt", str(path), "--device", "cpu", "--amp", "off", "--no-tsne"]
    res = ev.main([*cli, "--knn-protocol", "ts"])                                 # implies --probe knn
    saved = json.loads((path.parent / "eval-knn-ts" / "results.json").read_text())
    assert saved["protocol"] == res["protocol"] == "knn-ts"
    assert set(saved["extra"]["knn_ts"]) == {"k1", "k10"}
    assert saved["at_selected"] == saved["extra"]["knn_ts"]["k1"] and saved["amp"] == "off"
    assert "TS kNN protocol, class-mean accuracy: kNN@1" in capsys.readouterr().out
    real = ev._dataset_from_ckpt

    def poisoned(*a):
        ds = real(*a)
        ds.test = Poison(len(ds.test))
        return ds
    monkeypatch.setattr(ev, "_dataset_from_ckpt", poisoned)
    for monitor in (["--probe", "knn"], ["--knn-protocol", "monitor"]):           # validation queries only
        assert ev.main([*cli, *monitor])["protocol"] == "knn-monitor"
    with pytest.raises(AssertionError, match="must not be read"):           # only the TS protocol reads it
        ev.main([*cli, "--knn-protocol", "ts"])
    with pytest.raises(common.UserError, match="--probe knn"):
        ev.main([*cli, "--probe", "linear", "--knn-protocol", "ts"])
