"""Evaluation shared by every method: linear probes, kNN monitor, long-tail metrics, results.json,
plots.

One module, so that every table is computed the same way. Reference: docs/evaluation.md (cited by
heading).
  python eval.py --ckpt runs/X/checkpoint.pt --probe linear|few-shot|cb-linear|knn|classifier
  python eval.py --table runs/*/results.json
  python eval.py --compare runs/A/results.json runs/B/results.json --out compare.png
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import subprocess
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

GROUP_RULES = ("thirds", "strict", "oltr")
CACHED_VARIANT = "sdclr-probe-cached (approx)"   # tag of the cached-feature probe; never a headline
# the cached probe's learning rate: on standardised features the protocol's 30 overshoots (the loss
# sits in the hundreds for the first epochs); 0.1 trains the same linear layer smoothly
CACHED_LR = 0.1
PROBE_MODES = ("full", "few-shot")

# ----- Probe settings, one row per data.DATASETS name (docs/evaluation.md, Probe settings) --------
# SDCLR probe protocol (Jiang et al. 2021). split: the LTDataset attribute that trains each mode's
# probe; groups: the console row's grouping; select_topk: the validation metric that selects the
# epoch.
_SDCLR = {"lr": 30.0, "epochs": {"full": 30, "few-shot": 100},
          "milestones": {"full": (10, 20), "few-shot": (40, 60)},
          "val_every": {"full": 1, "few-shot": 5}}
# a balanced labelled pool and the 1 % few-shot subset
_POOL = {"full": "probe", "few-shot": "fewshot"}
# no separate probe pool: the LT train list trains it
_TRAIN = {"full": "train", "few-shot": "fewshot"}


def _row(batch_size, split, groups="thirds", select_topk=1) -> dict:
    """One dataset's probe settings: the SDCLR protocol with its batch, probe split and grouping."""
    return {**_SDCLR, "batch_size": batch_size, "split": split, "groups": groups,
            "select_topk": select_topk}


PROBE_SETTINGS = {   # batch_size None: by image size (128 at <= 64 px, else 512)
    "cifar10-lt": _row(128, _POOL), "cifar100-lt": _row(128, _POOL), "folder": _row(None, _POOL),
    "synthetic-lt": _row(128, _POOL), "tiny-imagenet-lt": _row(128, _POOL),
    "places-lt": _row(512, _TRAIN), "imagenet-lt": _row(512, _TRAIN, "strict"),
    "inat2018": _row(512, _TRAIN, "strict"),
    "imagenet100-lt": _row(512, _POOL, "strict", select_topk=5)}


def probe_settings(ds) -> dict:
    """A copy of the PROBE_SETTINGS row of `ds` ("folder" row for unknown names),
    batch_size resolved from ds.image_size where left open, plus `row`: the paper_row style
    of `groups` (docs/evaluation.md)."""
    s = copy.deepcopy(PROBE_SETTINGS.get(ds.name, PROBE_SETTINGS["folder"]))
    s["batch_size"] = s["batch_size"] or (128 if ds.image_size <= 64 else 512)
    # a folder tree used as it is has no probe pool either
    if getattr(ds, s["split"]["full"]) is None:
        s["split"] = dict(_TRAIN)
    s["row"] = "ssl" if s["groups"] == "thirds" else "strict"
    return s


@torch.no_grad()
def extract_features(backbone, split, device, amp_dtype=None, batch_size=512, recipe="test_cifar"):
    """GAP features of every image of `split` in order, without augmentation: (fp32 (N, D), labels
    (N,)). The backbone runs in eval mode (BN running statistics); its previous mode is restored."""
    was_training = backbone.training
    feats, labels = [], []
    backbone.eval()
    loader = data.make_loader(split, batch_size, device, shuffle=False, drop_last=False,
                              sampler="sequential")
    try:
        for x, y, _ in loader:
            with common.autocast(device, amp_dtype):
                f = backbone(data.augment(x, recipe))
            feats.append(f.float())
            labels.append(y)
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def _subset(split, idx):
    """Split restricted to the indices `idx`."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    files = [split.files[i] for i in idx.tolist()] if split.files is not None else None
    return data.Split(y=split.y[idx], x=split.x[idx] if split.x is not None else None, files=files)


# ----- Metrics (docs/evaluation.md, Groupings and results.json) -----------------------------------
def group_masks(class_counts, class_rank=None):
    """Class ids of the Many / Medium / Few groups under the three rules (docs/evaluation.md,
    Groupings).
    thirds: classes sorted ascending by train count, ties tail first (higher generator rank first;
      descending class index without a rank); Few = first floor(C/3), Medium = next floor(C/3),
      Many = the rest.
    strict: Many n > 100, Medium 20 <= n <= 100, Few n < 20.   oltr: Many n >= 100, Few n <= 20."""
    counts = [int(n) for n in class_counts]
    C = len(class_counts)
    rank = list(class_rank) if class_rank is not None else list(range(C))
    # ascending count, tail first on ties
    order = sorted(range(C), key=lambda c: (counts[c], -rank[c]))
    third = C // 3

    def by_count(many, few):   # Medium = neither Many nor Few
        return {g: [c for c, n in enumerate(counts) if rule(n)] for g, rule in
                (("many", many), ("medium", lambda n: not (many(n) or few(n))), ("few", few))}
    return {"thirds": {"many": sorted(order[2 * third:]), "medium": sorted(order[third:2 * third]),
                       "few": sorted(order[:third])},
            "strict": by_count(lambda n: n > 100, lambda n: n < 20),
            "oltr": by_count(lambda n: n >= 100, lambda n: n <= 20)}


# f=np.std: the population std (ddof = 0), as np.std in SDCLR's exp_analyse.py
def _mean(values, f=np.mean):
    v = [x for x in values if x is not None]
    return float(f(np.asarray(v, dtype=np.float64))) if v else None


def group_stats(per_class_acc, groups):
    """Group accuracies (means of per-class accuracies), group_mean (FASSL's "All" column), std
    (the Std column: population std of the three) and n_classes. An empty group is None and left
    out of both."""
    out = {g: _mean([per_class_acc[c] for c in groups[g]]) for g in ("many", "medium", "few")}
    accs = [out["many"], out["medium"], out["few"]]
    out["group_mean"] = _mean(accs)
    out["std"] = _mean(accs, np.std)
    out["n_classes"] = [len(groups["many"]), len(groups["medium"]), len(groups["few"])]
    return out


def compute_metrics(preds, labels, num_classes, class_counts, class_rank=None):
    """The metrics block of results.json; accuracies in percent, unrounded. class_counts:
    (pre-)training counts, never the probe set's. A class absent from `labels` has accuracy None,
    left out of every mean."""
    preds, labels = (torch.as_tensor(t).long().cpu().view(-1) for t in (preds, labels))
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in "
                         f"shape")
    correct = (preds == labels).double()
    total_c = torch.bincount(labels, minlength=num_classes).double()
    correct_c = torch.bincount(labels, weights=correct, minlength=num_classes)
    per_class = [100.0 * float(correct_c[c] / total_c[c]) if total_c[c] > 0 else None
                 for c in range(num_classes)]
    masks = group_masks(class_counts, class_rank)
    # sample-weighted
    out = {"top1_overall": 100.0 * float(correct.mean()) if len(labels) else None,
           "acc_class_mean": _mean(per_class), "per_class_acc": per_class,
           # SDCLR's "variance"
           "std_classes": _mean(per_class, np.std)}
    groups = {f"groups_{rule}": group_stats(per_class, masks[rule]) for rule in GROUP_RULES}
    return {**out, **groups}


def _scored(fc, feats, y, ds):
    """Metrics of the linear classifier `fc` on features `feats` of a split of `ds` with labels
    `y`."""
    return compute_metrics(_predict(fc, feats), y, ds.num_classes, ds.class_counts, ds.class_rank)


def _fmt(v):
    return "-" if v is None else f"{v:.2f}"


PAPER_HEADER = {"ssl": "| All | Rare | Medium | Frequent | Std |", "top1": "| Top-1 |",
                "strict": "| Many | Medium | Few | Overall |",
                "dscl": "| Many | Medium | Few | Overall |"}


def paper_row(metrics, style="ssl"):
    """Markdown row in a paper's column order (header: PAPER_HEADER[style]).
    ssl          : All | Rare | Medium | Frequent | Std, thirds, All = group mean
                   (FASSL Tables 1-2, 9)
    strict / dscl: Many | Medium | Few | Overall, strict groups, Overall = top-1 (DSCL Tables 1-3)
    top1         : Top-1 (Hybrid)"""
    t = metrics["groups_thirds"]
    s = metrics["groups_strict"]
    top1 = metrics["top1_overall"]
    strict = [s["many"], s["medium"], s["few"], top1]
    cells = {"ssl": [t["group_mean"], t["few"], t["medium"], t["many"], t["std"]], "top1": [top1],
             "strict": strict, "dscl": strict}
    if style not in cells:
        raise ValueError(f"unknown paper_row style {style!r}; use ssl, strict, dscl or top1")
    return "| " + " | ".join(_fmt(c) for c in cells[style]) + " |"


# ----- SDCLR linear probe (Jiang et al. 2021; docs/evaluation.md, SDCLR linear probe) -------------
def _new_fc(in_dim, num_classes, device, seed=0):
    """fc on GAP features, weight ~ N(0, 0.01^2), bias 0; seeded by its own generator."""
    # nn.Linear's default init would draw from the global RNG
    with torch.random.fork_rng(devices=[]):
        fc = nn.Linear(in_dim, num_classes)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) * 0.01)
        fc.bias.zero_()
    return fc.to(device)


@torch.no_grad()
def _predict(fc, feats, chunk=8192):
    return torch.cat([fc(feats[i:i + chunk]).argmax(1) for i in range(0, len(feats), chunk)])


@torch.no_grad()
def _val_accuracy(fc, feats, y, topk=1, chunk=8192):   # top-k accuracy in percent
    k = min(topk, fc.out_features)
    hits = [(fc(feats[i:i + chunk]).topk(k, 1).indices == y[i:i + chunk, None]).any(1)
            for i in range(0, len(feats), chunk)]
    return 100.0 * float(torch.cat(hits).double().mean())


# out_dim, else from one embedded image
def _feature_dim(backbone, split, device, amp_dtype, recipe):
    return int(backbone.out_dim) if hasattr(backbone, "out_dim") else extract_features(
        backbone, _subset(split, [0]), device, amp_dtype, recipe=recipe)[0].shape[1]


def _train_epoch(fc, opt, batches, device):
    """One pass of CE steps of `fc` over (features, labels) batches; returns the mean loss."""
    loss_sum = torch.zeros((), device=device)
    n_steps = 0
    for f, y in batches:
        loss = F.cross_entropy(fc(f), y)
        common.optimizer_step(loss, opt)
        loss_sum += loss.detach()
        n_steps += 1
    return float(loss_sum) / max(n_steps, 1)


def _augmented_features(backbone, loader, recipe, gen, image_size, device, amp_dtype):
    """Yields (frozen fp32 features, labels) of augmented batches; the backbone gets no gradient."""
    for x, y, _ in loader:
        x = data.augment(x, recipe, generator=gen, image_size=image_size)
        with torch.no_grad(), common.autocast(device, amp_dtype):
            f = backbone(x)
        yield f.float(), y


class Standardise:
    """x -> (x - mean) / std per feature, with the mean and std of the features it was built on."""

    def __init__(self, feats: torch.Tensor):
        self.mean = feats.mean(0)
        self.std = feats.std(0).clamp_min(1e-6)

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std


def label_fraction_split(ds, fraction, seed=0):
    """Per-class stratified `fraction` of the LT pre-training set (FASSL Table 10 probe): per class
    the first max(1, round(fraction * n_c)) images of a seeded permutation (INFERRED rounding)."""
    if not 0 < fraction <= 1:
        raise common.UserError(f"--probe-label-fraction must be in (0, 1] (got {fraction})")
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(ds.num_classes):
        idx = (ds.train.y == c).nonzero().view(-1)
        if len(idx):
            n_keep = max(1, round(fraction * len(idx)))
            keep.append(idx[torch.randperm(len(idx), generator=gen)][:n_keep])
    return _subset(ds.train, torch.cat(keep).sort().values)


def _test_recipe(recipe):   # the normalisation-only recipe with a training recipe's statistics
    return "test_imagenet" if "imagenet" in recipe else "test_cifar"


def linear_probe(backbone, ds, device, amp_dtype=None, mode="full", aug="crop", epochs=None,
                 milestones=None, lr=None, batch_size=None, train_split=None, seed=0, log=print,
                 recipe="crop_flip_imagenet"):
    """SDCLR linear probe of a frozen, eval-mode backbone (docs/evaluation.md, SDCLR linear probe):
    {protocol, variant, selection, at_selected, at_last, history, probe}; None arguments come from
    probe_settings(ds). aug "none": cached features (CACHED_VARIANT). Selected on ds.val; test
    embedded once; global RNG kept."""
    if mode not in PROBE_MODES or aug not in ("crop", "none"):
        raise ValueError(f"unknown probe mode {mode!r} or aug {aug!r}; use full / few-shot and "
                         f"crop / none")
    s = probe_settings(ds)
    epochs = epochs if epochs is not None else s["epochs"][mode]
    milestones = list(milestones if milestones is not None else s["milestones"][mode])
    if lr is None:
        lr = CACHED_LR if aug == "none" else s["lr"]
    batch_size = batch_size or s["batch_size"]
    val_every = s["val_every"][mode]
    k_sel = s["select_topk"]
    split = train_split if train_split is not None else getattr(ds, s["split"][mode])
    if split is None:
        raise common.UserError(f"dataset {ds.name} has no {s['split'][mode]} split for the {mode} "
                               f"probe; use a protocol that defines it (e.g. --protocol sdclr)")
    test_recipe = _test_recipe(recipe)
    t0 = time.time()
    was_training = backbone.training
    # BN uses its running statistics
    backbone.eval()
    try:
        # frozen: fixed
        val = (extract_features(backbone, ds.val, device, amp_dtype, recipe=test_recipe)
               if ds.val is not None else None)
        if aug == "none":
            train_feats, train_y = extract_features(backbone, split, device, amp_dtype,
                                                    recipe=test_recipe)
            # cached features are standardised with the probe set's mean and std, and trained
            # at CACHED_LR: raw features at the protocol's lr of 30 made the loss explode
            standardise = Standardise(train_feats)
            train_feats = standardise(train_feats)
            if val is not None:
                val = (standardise(val[0]), val[1])
            cpu_gen = torch.Generator().manual_seed(seed)
        else:
            loader = data.make_loader(split, batch_size, device, shuffle=True, drop_last=False,
                                      sampler="random", seed=seed, image_size=ds.image_size)
            gen = torch.Generator(device=device).manual_seed(seed)
        in_dim = _feature_dim(backbone, split, device, amp_dtype, test_recipe)
        fc = _new_fc(in_dim, ds.num_classes, device, seed)
        opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        best = {"score": -1.0, "epoch": None, "state": None}
        history = []
        for epoch in range(1, epochs + 1):
            # lr * 0.1^{#milestones <= epoch}
            cur_lr = common.multistep_lr(epoch, lr, milestones)
            common.set_lr(opt, cur_lr)
            if aug == "none":
                perm = torch.randperm(len(train_y), generator=cpu_gen).to(train_feats.device)
                batches = ((train_feats[perm[i:i + batch_size]], train_y[perm[i:i + batch_size]])
                           for i in range(0, len(perm), batch_size))
            else:
                loader.set_epoch(epoch)
                batches = _augmented_features(backbone, loader, recipe, gen, ds.image_size, device,
                                              amp_dtype)
            rec = {"epoch": epoch, "lr": cur_lr, "loss": _train_epoch(fc, opt, batches, device),
                   "val_top1": None}
            if val is not None and (epoch % val_every == 0 or epoch == epochs):
                rec["val_top1"] = _val_accuracy(fc, *val)
                if k_sel != 1:
                    rec[f"val_top{k_sel}"] = _val_accuracy(fc, *val, k_sel)
                # ties keep the earlier epoch
                if rec[f"val_top{k_sel}"] > best["score"]:
                    best = {"score": rec[f"val_top{k_sel}"], "epoch": epoch,
                            "state": {k: v.detach().clone() for k, v in fc.state_dict().items()}}
            history.append(rec)
            log(f"[probe {mode}] ep {epoch}/{epochs} | lr {cur_lr:g} | loss {rec['loss']:.4f}"
                + (f" | val top1 {rec['val_top1']:.2f}" if rec["val_top1"] is not None else ""))
        # the test set is read once, here, after selection: nothing is tuned on test
        test_feats, test_y = extract_features(backbone, ds.test, device, amp_dtype,
                                              recipe=test_recipe)
        if aug == "none":
            test_feats = standardise(test_feats)
    finally:
        backbone.train(was_training)
    at_last = at_selected = _scored(fc, test_feats, test_y, ds)
    selection = {"rule": "last-epoch (no validation split)", "selected_epoch": epochs,
                 "last_epoch": epochs}
    if best["state"] is not None:
        selection = {"rule": f"best-val-top{k_sel}", "selected_epoch": best["epoch"],
                     "last_epoch": epochs, f"val_top{k_sel}": best["score"]}
        fc.load_state_dict(best["state"])
        at_selected = _scored(fc, test_feats, test_y, ds)
    return {"protocol": "sdclr-probe-fewshot" if mode == "few-shot" else "sdclr-probe-full",
            "variant": CACHED_VARIANT if aug == "none" else "crop",
            "selection": selection, "at_selected": at_selected, "at_last": at_last,
            "history": history,
            "probe": {"epochs": epochs, "milestones": milestones, "lr": lr,
                      "batch_size": batch_size, "recipe": recipe if aug == "crop" else test_recipe,
                      "n_train": len(split),
                      "train_split": s["split"][mode] if train_split is None else "given",
                      "wall_time_s": time.time() - t0}}


def run_probes(backbone, ds, modes, device, amp_dtype=None, aug="crop", epochs=None, seed=0,
               label_fraction=None, milestones=None, lr=None, batch_size=None,
               recipe="crop_flip_imagenet", log=print) -> dict:
    """{mode: linear_probe result} for `modes`, None arguments from probe_settings(ds)
    (docs/evaluation.md, Probe settings); no few-shot split: skipped with a note. label_fraction:
    FASSL Table 10's stratified part of the LT set (in the variant). "probe" also records
    train_split, groups and row (paper_row)."""
    s = probe_settings(ds)
    out = {}
    for mode in modes:
        train_split = None
        split_name = s["split"].get(mode)
        if label_fraction is not None:
            train_split = label_fraction_split(ds, label_fraction, seed)
            split_name = f"train, label fraction {label_fraction:g}"
        elif mode == "few-shot" and getattr(ds, split_name) is None:
            print(f"{ds.name} has no few-shot split; skipping the few-shot probe")
            continue
        r = linear_probe(backbone, ds, device, amp_dtype, mode=mode, aug=aug, epochs=epochs,
                         milestones=milestones, lr=lr, batch_size=batch_size,
                         train_split=train_split, seed=seed, log=log, recipe=recipe)
        if label_fraction is not None:
            r["variant"] += f", label fraction {label_fraction:g}"
        r["probe"].update(train_split=split_name, groups=s["groups"], row=s["row"])
        out[mode] = r
    return out


# ----- DSCL class-balanced linear stage (stage 2, Implementation Details; docs/evaluation.md) -----
def cb_linear(backbone, ds, device, amp_dtype=None, lr=10.0, epochs=40, milestones=(20, 30),
              batch_size=2048, bn="eval", recipe="crop_flip_cifar", seed=0, log=print) -> dict:
    """DSCL stage 2 (docs/evaluation.md, DSCL class-balanced linear stage): CE on class-balanced
    batches, SGD 0.9, x0.1 from the 0-based `milestones`. bn "train": the released code's batch
    statistics, on a copy of the backbone; "eval": running ones. Headline: last epoch,
    at_val_selected (ds.val), best_test."""
    if bn not in ("eval", "train"):
        raise ValueError(f"unknown bn mode {bn!r}; use eval or train")
    t0 = time.time()
    was_training = backbone.training
    test_recipe = _test_recipe(recipe)
    # frozen: its forward runs under no_grad
    net = copy.deepcopy(backbone) if bn == "train" else backbone
    loader = data.make_loader(ds.train, batch_size, device, shuffle=True, drop_last=False,
                              sampler="balanced", seed=seed, image_size=ds.image_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    net.eval()
    try:
        cache = {}

        def features(name):   # eval-mode features; constant (cached) unless BN statistics move
            if bn == "train" or name not in cache:
                cache[name] = extract_features(net, getattr(ds, name), device, amp_dtype,
                                               recipe=test_recipe)
            return cache[name]

        in_dim = _feature_dim(net, ds.test, device, amp_dtype, test_recipe)
        fc = _new_fc(in_dim, ds.num_classes, device, seed)
        opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        history = []
        best_test = {"epoch": None, "top1": -1.0}
        best_val = {"epoch": None, "top1": -1.0}
        val_metrics = None      # test metrics at the val-selected epoch (stored, not the headline)
        for epoch in range(1, epochs + 1):
            # 0-based, as DSCL's code
            cur_lr = common.multistep_lr(epoch - 1, lr, list(milestones))
            common.set_lr(opt, cur_lr)
            loader.set_epoch(epoch)
            net.train(bn == "train")
            batches = _augmented_features(net, loader, recipe, gen, ds.image_size, device,
                                          amp_dtype)
            rec = {"epoch": epoch, "lr": cur_lr, "loss": _train_epoch(fc, opt, batches, device)}
            net.eval()
            tf, ty = features("test")   # the released code scores test every epoch
            rec.update(test_top1=_val_accuracy(fc, tf, ty), val_top1=None)
            if rec["test_top1"] > best_test["top1"]:
                best_test = {"epoch": epoch, "top1": rec["test_top1"]}
            if ds.val is not None:
                rec["val_top1"] = _val_accuracy(fc, *features("val"))
                if rec["val_top1"] > best_val["top1"]:
                    best_val = {"epoch": epoch, "top1": rec["val_top1"]}
                    val_metrics = _scored(fc, tf, ty, ds)
            history.append(rec)
            log(f"[cb-linear] ep {epoch}/{epochs} | lr {cur_lr:g} | loss {rec['loss']:.4f} | "
                f"test top1 {rec['test_top1']:.2f}")
        at_last = _scored(fc, *features("test"), ds)
    finally:
        backbone.train(was_training)
    out = {"protocol": "dscl-linear-cb", "at_selected": at_last, "at_last": at_last,
           "history": history,
           "selection": {"rule": "last-epoch", "selected_epoch": epochs, "last_epoch": epochs},
           "best_test": {**best_test, "selected_on_test": True},
           "probe": {"epochs": epochs, "milestones": list(milestones), "lr": lr,
                     "batch_size": batch_size, "recipe": recipe, "bn": bn,
                     "wall_time_s": time.time() - t0}}
    if val_metrics is not None:
        out["selection"]["val_selected_epoch"] = best_val["epoch"]
        out["at_val_selected"] = val_metrics
    return out


# ----- kNN monitor and Hybrid's end-to-end classifier (docs/evaluation.md) ------------------------
@torch.no_grad()
def knn_predict(bank_feats, bank_y, query_feats, num_classes, k=200, t=0.1, chunk=1024,
                vote="weighted"):
    """kNN by cosine similarity, in chunks. vote "weighted" (Wu et al. 2018): each of the k
    nearest adds exp(sim / t) to its class. "majority" (the TS protocol): one vote each; a tie
    goes to the nearest."""
    bank = F.normalize(bank_feats.float(), dim=1)
    query = F.normalize(query_feats.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(query), chunk):
        sim, idx = (query[i:i + chunk] @ bank.T).topk(k, dim=1)             # nearest first
        lab = bank_y[idx]
        z = torch.zeros(len(idx), num_classes, device=bank.device)
        if vote == "weighted":                                              # sim <= 1: no overflow
            preds.append(z.scatter_add(1, lab, torch.exp(sim / t)).argmax(1))
        else:
            # votes x (k + 1) + (k - rank of the class's nearest): ties go to the nearest
            near = (k - torch.arange(k, device=bank.device)).float().expand_as(sim)
            votes = z.scatter_add(1, lab, torch.full_like(sim, k + 1.0))
            preds.append((votes + z.scatter_reduce(1, lab, near, "amax")).argmax(1))
    return torch.cat(preds)


@torch.no_grad()
def knn_monitor(backbone, bank, query, device, num_classes, k=200, t=0.1, recipe="test_cifar",
                class_counts=None, class_rank=None) -> dict:
    """kNN health check (docs/evaluation.md, kNN monitor) on eval-mode unaugmented features: the
    metrics block (its groups need class_counts)."""
    (bf, by), (qf, qy) = (extract_features(backbone, s, device, recipe=recipe)
                          for s in (bank, query))
    return compute_metrics(knn_predict(bf, by, qf, num_classes, k, t), qy, num_classes,
                           class_counts or [1] * num_classes, class_rank)


@torch.no_grad()
def knn_ts(backbone, ds, device, ks=(1, 10), recipe="test_imagenet") -> dict:
    """The TS kNN protocol (Kukleva et al., ICLR 2023; docs/evaluation.md, kNN monitor), only
    for SimCLR+TS's numbers: bank = the LT training set, queries = the TEST set, majority vote;
    {k: metrics block}."""
    (bf, by), (qf, qy) = (extract_features(backbone, s, device, recipe=recipe)
                          for s in (ds.train, ds.test))
    return {k: compute_metrics(knn_predict(bf, by, qf, ds.num_classes, k, vote="majority"), qy,
                               ds.num_classes, ds.class_counts, ds.class_rank) for k in ks}


@torch.no_grad()
def classifier_eval(backbone, classifier, ds, device, amp_dtype=None, recipe="test_cifar") -> dict:
    """Hybrid's end-to-end classifier in eval mode on the balanced test set: the metrics block."""
    was = classifier.training
    classifier.eval()
    feats, y = extract_features(backbone, ds.test, device, amp_dtype, recipe=recipe)
    # fp32 logits: bf16 ties would go to class 0
    preds = _predict(classifier, feats.float())
    classifier.train(was)
    return compute_metrics(preds, y, ds.num_classes, ds.class_counts, ds.class_rank)


# ----- t-SNE (exact, torch, for FASSL Figure 3) and plots (matplotlib, Agg backend) ---------------
def _binary_search_p(d2, perplexity, tol=1e-5, steps=64):
    """Row-conditional P_{j|i} with entropy log(perplexity), one bisection on beta = 1/(2
    sigma^2) per row."""
    n = d2.shape[0]
    target = math.log(perplexity)
    beta = torch.ones(n, dtype=d2.dtype, device=d2.device)
    lo, hi = torch.zeros_like(beta), torch.full_like(beta, float("inf"))
    eye = torch.eye(n, dtype=torch.bool, device=d2.device)
    for _ in range(steps):
        logp = torch.log_softmax((-d2 * beta[:, None]).masked_fill(eye, float("-inf")), dim=1)
        p = logp.exp()
        h = -(p * logp.masked_fill(eye, 0.0)).sum(1)              # entropy in nats
        # entropy too high -> increase beta
        too_flat = h > target
        lo, hi = torch.where(too_flat, beta, lo), torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
        if (h - target).abs().max() < tol:
            break
    return p


def _sq_dist(a):
    """Pairwise squared Euclidean distances (faster than cdist for low-dimensional points)."""
    # the embedding: a broadcast difference beats a matmul with a tiny inner dim
    if a.shape[1] <= 3:
        return (a[:, None, :] - a[None, :, :]).pow(2).sum(-1)
    sq = (a * a).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)).clamp_min(0.0)


def tsne(x, dim=2, perplexity=30.0, iters=500, seed=0):
    """Exact t-SNE (van der Maaten & Hinton 2008) on x's device, O(N^2) per iteration, for <= ~2000
    points: (N, dim) fp32 on CPU. Perplexity-calibrated Gaussian affinities, Student-t kernel,
    momentum 0.5 -> 0.8, early exaggeration 12 (first 250 iterations), adaptive gains, PCA init
    scaled to std 1e-4 (seeded)."""
    x = torch.as_tensor(x).detach().double()
    dev = x.device
    n = x.shape[0]
    p_cond = _binary_search_p(_sq_dist(x), min(perplexity, max(1.0, (n - 1) / 3.0)))
    p = ((p_cond + p_cond.T) / (2 * n)).clamp_min(1e-12).float()
    u, s, _ = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    y = (u[:, :dim] * s[:dim]).float()
    gen = torch.Generator().manual_seed(seed)
    if y.shape[1] < dim:
        y = torch.cat([y, torch.randn(n, dim - y.shape[1], generator=gen).to(dev)], 1)
    y = y / y[:, 0].std().clamp_min(1e-12) * 1e-4
    y = y + 1e-6 * torch.randn(y.shape, generator=gen).to(dev)       # breaks exact ties
    lr = max(n / 12.0 / 4.0, 50.0)
    exag_iters = min(250, iters // 2)
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    for it in range(iters):
        exag, momentum = (12.0, 0.5) if it < exag_iters else (1.0, 0.8)
        num = (1.0 / (1.0 + _sq_dist(y))).masked_fill_(eye, 0.0)       # Student-t kernel
        pq = (exag * p - (num / num.sum()).clamp_min(1e-12)) * num
        # 4 sum_j (p_ij - q_ij) w_ij (y_i - y_j)
        grad = 4.0 * (pq.sum(1, keepdim=True) * y - pq @ y)
        gains = torch.where(update * grad < 0, gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
    return y.cpu()


def figure(size):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return (plt, *plt.subplots(figsize=size))


def save_figure(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_class(runs, path, title=None):
    """Per-class test accuracy against the class's train count (log x-axis, 0-100 % y-axis), one
    series per run of `runs`: [(label, metrics block, class_counts)]; a legend when there are two
    or more."""
    plt, fig, ax = figure((6, 4) if len(runs) == 1 else (7, 4 + 0.25 * len(runs)))
    for label, metrics, counts in runs:
        pts = sorted((n, a) for n, a in zip(counts, metrics["per_class_acc"])
                     if a is not None and n > 0)
        xs, ys = zip(*pts) if pts else ((), ())
        ax.plot(xs, ys, "o" if len(runs) == 1 else "o-", ms=4, alpha=0.8, label=label)
    if title is None and len(runs) == 1:
        title = f"per-class accuracy (top-1 {_fmt(runs[0][1]['top1_overall'])})"
    elif title is None:
        title = "per-class accuracy against class size"
    ax.set(xscale="log", xlabel="train images of the class (log scale)", ylabel="test accuracy (%)",
           title=title, ylim=(0, 100))
    if len(runs) > 1:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    ax.grid(True, which="both", alpha=0.3)
    save_figure(plt, fig, path)


def plot_groups(metrics, path, title=""):
    """Bars of Many / Medium / Few accuracy for the thirds and strict rules (0-100 %), the legend
    beside the bars."""
    plt, fig, ax = figure((7.5, 4))
    for i, rule in enumerate(("thirds", "strict")):
        g = metrics[f"groups_{rule}"]
        xs = [j + (i - 0.5) * 0.38 for j in range(3)]
        heights = [g[k] or 0 for k in ("many", "medium", "few")]
        ax.bar(xs, heights, 0.38, label=f"{rule} (n = {'/'.join(str(c) for c in g['n_classes'])})")
    ax.set(xticks=range(3), xticklabels=["Many / Frequent", "Medium", "Few / Rare"],
           ylabel="test acc. (%)", ylim=(0, 100), title=title)
    ax.legend(title="grouping", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(plt, fig, path)


def plot_tsne(feats, labels, path, max_points=2000, seed=0, class_names=None,
              title="t-SNE of backbone features"):
    """t-SNE of backbone features coloured by class (FASSL Figure 3), on a random subset
    of <= max_points."""
    # on feats' device
    feats = torch.as_tensor(feats).float()
    labels = torch.as_tensor(labels).long().cpu()
    if len(feats) > max_points:
        idx = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:max_points]
        feats, labels = feats[idx.to(feats.device)], labels[idx]
    emb = tsne(feats, seed=seed, iters=500).numpy()
    plt, fig, ax = figure((6, 6))
    cmap = "tab20" if labels.max() < 20 else "viridis"
    sc = ax.scatter(*emb.T, c=labels.numpy(), s=14, cmap=cmap)
    ax.set(xticks=[], yticks=[], title=title)
    if class_names is not None and len(class_names) <= 20:
        dots = [plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(c)))
                for c in range(len(class_names))]
        ax.legend(dots, class_names, fontsize=6, loc="best")
    save_figure(plt, fig, path)


# ----- results.json (docs/evaluation.md, results.json) --------------------------------------------
def results_skeleton(method, variant, paper_setting, ds, protocol, network_evaluated, arch, epochs,
                     seed, amp, wall_time) -> dict:
    """The results.json fields; callers fill selection, at_selected and at_last
    (`res.update(...)`)."""
    info = ds if isinstance(ds, dict) else ds.info()
    return {"method": method, "variant": variant, "paper_setting": bool(paper_setting),
            "dataset": dict(info), "protocol": protocol, "network_evaluated": network_evaluated,
            "backbone": arch, "epochs": dict(epochs), "seed": seed,
            "amp": None if amp is None else str(amp), "git_commit": git_commit(),
            "wall_time_s": float(wall_time), "paper_value": None, "selection": None,
            "at_selected": None, "at_last": None, "knn": [], "extra": {}}


def git_commit() -> str:
    """Short sha of the repository holding this file, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip()
    return "unknown"


def metric_value(metrics: dict | None, path: str):
    """One number of a metrics block by its dotted path, e.g. "groups_thirds.group_mean"; None where
    the block or the key is missing."""
    value = metrics
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def write_results(run_dir, results: dict) -> None:
    """run_dir/results.json (atomic) plus per_class_acc.png and group_acc.png from
    the headline metrics."""
    run_dir = pathlib.Path(run_dir)
    data.save_json(run_dir / "results.json", results)
    metrics = results.get("at_selected") or results.get("at_last")
    counts = (results.get("dataset") or {}).get("class_counts")
    if metrics is not None and counts is not None:
        method = results.get("method", "")
        top1 = _fmt(metrics["top1_overall"])
        plot_per_class([("", metrics, counts)], run_dir / "per_class_acc.png",
                       title=f"{method}: per-class accuracy (top-1 {top1})")
        plot_groups(metrics, run_dir / "group_acc.png", title=f"{method}: accuracy per group")


# ----- --table: mean +- std over runs (docs/evaluation.md, Command line) --------------------------
TABLE_COLUMNS = [  # (header, path into the metrics block, see metric_value)
    ("Top-1", "top1_overall"), ("All", "groups_thirds.group_mean"), ("Rare", "groups_thirds.few"),
    ("Medium", "groups_thirds.medium"), ("Frequent", "groups_thirds.many"),
    ("Std", "groups_thirds.std"), ("Many (strict)", "groups_strict.many"),
    ("Medium (strict)", "groups_strict.medium"), ("Few (strict)", "groups_strict.few")]
_TABLE_KEY = ("method", "variant", "dataset", "lt_convention", "imb_ratio", "protocol")


def read_results(path) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise common.UserError(f"cannot read results file {path} ({e}); pass the results.json of "
                               f"a run")


def aggregate_results(paths):
    """Groups results.json files by method, variant, dataset, lt_convention, imb_ratio and
    protocol; one row per group: {"key": {...}, "n": runs, "files": [...], "<column>": (mean,
    population std) or None}."""
    groups = {}
    for path in paths:
        res = read_results(path)
        ds = res.get("dataset") or {}
        key = (res.get("method"), res.get("variant"), ds.get("name"), ds.get("lt_convention"),
               ds.get("imb_ratio"), res.get("protocol"))
        metrics = res.get("at_selected") or res.get("at_last") or {}
        groups.setdefault(key, []).append((str(path), metrics))
    rows = []
    for key, items in groups.items():
        row = {"key": dict(zip(_TABLE_KEY, key)), "n": len(items), "files": [p for p, _ in items]}
        for name, path in TABLE_COLUMNS:
            got = [metric_value(m, path) for _, m in items]
            # population std
            row[name] = None if _mean(got) is None else (_mean(got), _mean(got, np.std))
        rows.append(row)
    return rows


def format_table(rows) -> str:
    head = ["Method", "Variant", "Dataset", "Convention", "rho", "Protocol", "Runs",
            *dict(TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k = r["key"]
        cells = [str(k["method"]), str(k["variant"] or ""), *(str(k[f]) for f in _TABLE_KEY[2:]),
                 str(r["n"])]
        for c, _ in TABLE_COLUMNS:
            if r[c] is None:
                cells.append("-")
            elif r["n"] == 1:  # one run: no spread to show
                cells.append(f"{r[c][0]:.2f}")
            else:
                cells.append(f"{r[c][0]:.2f} ± {r[c][1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_labels(results: list[dict]) -> list[str]:
    """A legend label per run: its name (results.json `method`, what it trained); runs of one name
    add their seed, and runs of one name and seed their rank among them (#2, #3, ...)."""
    names = [str(r.get("method")) for r in results]
    labels = []
    for i, (name, res) in enumerate(zip(names, results)):
        label = name
        if names.count(name) > 1:
            label += f" (seed {res.get('seed')}"
            same = [j for j in range(i)
                    if names[j] == name and results[j].get("seed") == res.get("seed")]
            label += f", #{len(same) + 1})" if same else ")"
        labels.append(label)
    return labels


def compare_runs(paths, out) -> str:
    """`eval.py --compare` (docs/evaluation.md): all runs' per-class accuracy in one figure, a row
    per run, with the paper's number for the run (results.json `paper_value`) beside ours."""
    runs = []
    rows = [f"| Run | Top-1 |{PAPER_HEADER['ssl'][1:]} Paper | Ours | Ours - paper |",
            "|---" * 10 + "|"]
    results = [read_results(path) for path in paths]
    for label, res, path in zip(run_labels(results), results, paths):
        m = res.get("at_selected") or res.get("at_last")
        if not (m and (res.get("dataset") or {}).get("class_counts")):
            raise common.UserError(f"{path} has no metrics or class counts; pass a run's "
                                   f"results.json")
        runs.append((label, m, res["dataset"]["class_counts"]))
        paper = res.get("paper_value") or {}
        ours = metric_value(m, paper["metric"]) if paper else None
        versus = "| - | - | - |"
        if paper and ours is not None:
            versus = (f"| {paper['value']:.2f} ({paper['metric']}) | {ours:.2f} | "
                      f"{ours - paper['value']:+.2f} |")
        rows.append(f"| {label} | {_fmt(m['top1_overall'])} {paper_row(m)[:-1]}{versus}")
    plot_per_class(runs, out)
    return "\n".join(rows + [f"wrote {out}"])


# ----- Command line (docs/evaluation.md, Command line) --------------------------------------------
# the scripts whose checkpoints were trained with the CIFAR crop recipe
SUPERVISED = ("dscl", "hybrid")


def submodule_state(state: dict, prefix: str) -> dict:
    """The entries of a network's state_dict under `prefix.`, with the prefix removed: the backbone
    (or the classifier) of the network a checkpoint's "model" holds."""
    start = prefix + "."
    return {k[len(start):]: v for k, v in state.items() if k.startswith(start)}


def _dataset_from_ckpt(ckpt_args, cli):
    """Rebuilds the dataset from the checkpoint's saved args, with command-line overrides."""
    a = dict(ckpt_args or {})
    a.update({k: getattr(cli, k) for k in ("dataset", "data_dir", "imb_ratio", "protocol", "split",
                                           "split_file") if getattr(cli, k) is not None})
    if not a.get("dataset"):
        raise common.UserError("the checkpoint does not record its dataset; pass --dataset and "
                               "--data-dir")
    kw = {k: a[k] for k in ("data_dir", "imb_ratio", "protocol", "split", "split_file",
                            "num_classes", "sdclr_split_dir", "n_max") if a.get(k) is not None}
    # the data seed is --data-seed where a script has it; hybrid.py always draws its data with 0,
    # and the training --seed never chooses the data
    kw["seed"] = a.get("data_seed") or 0
    if a["dataset"] == "synthetic-lt":
        kw.update({k: v for k, v in a.items() if k.startswith("synthetic_") and v is not None})
    return data.load_dataset(a["dataset"], **kw)


def _fixed(protocol, variant, rule, m, epoch=None):
    """Result of a protocol without epochs of its own (kNN, checkpoint classifier)."""
    return {"protocol": protocol, "variant": variant, "at_selected": m, "at_last": m,
            "selection": {"rule": rule, "selected_epoch": epoch, "last_epoch": epoch}}


def evaluate_checkpoint(cli) -> dict:
    """`eval.py --ckpt`: one protocol on a method checkpoint; writes results.json and plots to
    <run>/eval-<probe> (or --out) and prints the paper row. The SDCLR probes go through
    run_probes."""
    ckpt = data.load_checkpoint(cli.ckpt, flag="--ckpt")
    if not {"arch", "model"} <= set(ckpt):
        raise common.UserError(f"checkpoint {cli.ckpt} lacks its arch or model; evaluate a "
                               f"checkpoint written by fassl.py, tase.py, dscl.py or hybrid.py")
    device, amp_dtype = common.setup_device(cli.device, cli.amp)
    backbone = common.build_backbone(ckpt["arch"], int(ckpt.get("image_size", 32))).to(device)
    try:
        backbone.load_state_dict(submodule_state(ckpt["model"], "backbone"))
    except RuntimeError as e:
        raise common.UserError(f"checkpoint {cli.ckpt}: backbone weights do not fit arch "
                               f"{ckpt['arch']} ({str(e).splitlines()[0]}); it is from another "
                               f"architecture") from e
    ds = _dataset_from_ckpt(ckpt.get("args"), cli)
    method = ckpt.get("method", "unknown")   # the label of the run's results.json
    recipe = cli.recipe
    if recipe is None:
        # dscl/hybrid at CIFAR size: their CIFAR statistics; 224-px data: ImageNet's
        supervised = ckpt.get("script") in SUPERVISED and ds.image_size <= 64
        recipe = "crop_flip_cifar" if supervised else "crop_flip_imagenet"
    test_recipe = _test_recipe(recipe)
    style = probe_settings(ds)["row"]
    t0 = time.time()
    if cli.probe in ("linear", "few-shot"):
        mode = "full" if cli.probe == "linear" else "few-shot"
        out = run_probes(backbone, ds, [mode], device, amp_dtype, aug=cli.probe_aug,
                         epochs=cli.epochs, seed=cli.seed, label_fraction=cli.probe_label_fraction,
                         milestones=cli.milestones, lr=cli.lr, batch_size=cli.batch_size,
                         recipe=recipe).get(mode)
        if out is None:
            raise common.UserError(f"dataset {ds.name} has no few-shot split; use --probe linear")
    elif cli.probe == "cb-linear":
        style = "dscl"
        out = cb_linear(backbone, ds, device, amp_dtype, lr=cli.lr if cli.lr is not None else 10.0,
                        epochs=cli.epochs or 40, milestones=cli.milestones or (20, 30),
                        batch_size=cli.batch_size or 2048, bn=cli.linear_bn, recipe=recipe,
                        seed=cli.seed)
    elif cli.probe == "classifier":
        classifier = submodule_state(ckpt["model"], "classifier")
        if not classifier:
            raise common.UserError(f"checkpoint {cli.ckpt} has no end-to-end classifier; use "
                                   f"--probe linear, few-shot, cb-linear or knn")
        style = "top1"
        w = classifier["weight"]
        fc = nn.Linear(w.shape[1], w.shape[0]).to(device)
        fc.load_state_dict(classifier)
        out = _fixed("hybrid-e2e", "checkpoint classifier", "checkpoint (last saved epoch)",
                     classifier_eval(backbone, fc, ds, device, amp_dtype, test_recipe),
                     ckpt.get("epoch"))
    elif cli.knn_protocol == "ts":
        # test queries: only to reproduce the TS paper's published numbers
        m = knn_ts(backbone, ds, device, recipe=test_recipe)
        print("TS kNN protocol, class-mean accuracy: "
              + ", ".join(f"kNN@{k} {_fmt(v['acc_class_mean'])}" for k, v in m.items()))
        rule = "none (TS protocol: test queries)"
        out = {**_fixed("knn-ts", "k1 majority (k10: extra)", rule, m[1]),
               "extra": {"knn_ts": {f"k{k}": v for k, v in m.items()}}}
    else:
        # queries: ds.val, else a seeded 10 % of train (at most 10,000); never test
        n = min(max(1, len(ds.train) // 10), 10000)
        gen = torch.Generator().manual_seed(cli.seed)
        query = ds.val or _subset(ds.train,
                                  torch.randperm(len(ds.train), generator=gen)[:n].sort().values)
        out = _fixed("knn-monitor", "k200-t0.1", "none (kNN on the validation split, never test)",
                     knn_monitor(backbone, ds.probe or ds.train, query, device, ds.num_classes,
                                 recipe=test_recipe, class_counts=ds.class_counts,
                                 class_rank=ds.class_rank))
    variant = out.pop("variant") if "variant" in out else f"bn-{cli.linear_bn}"
    epochs = {"pretrain": ckpt.get("epoch"), "probe": (out.get("probe") or {}).get("epochs")}
    train_seed = (ckpt.get("args") or {}).get("seed", cli.seed)
    res = results_skeleton(method, variant, False, ds, out["protocol"], "backbone", ckpt["arch"],
                           epochs, train_seed, common.amp_name(amp_dtype), time.time() - t0)
    res.update(out)
    res["extra"].update(checkpoint=str(cli.ckpt), stage=ckpt.get("stage", ""))
    # default: a sub-directory per probe, so the results.json the training run wrote beside
    # it survives
    name = cli.probe + ("-ts" if cli.knn_protocol == "ts" else "")
    run_dir = pathlib.Path(cli.out) if cli.out else pathlib.Path(cli.ckpt).parent / f"eval-{name}"
    write_results(run_dir, res)
    if cli.tsne:
        feats, labels = extract_features(backbone, ds.test, device, amp_dtype, recipe=test_recipe)
        plot_tsne(feats, labels, run_dir / "tsne.png", seed=cli.seed, class_names=ds.class_names,
                  max_points=cli.tsne_points or (2000 if device.type == "cuda" else 1000))
    print(f"{method} {ds.name} {res['protocol']} ({variant}), {res['selection']['rule']}:\n"
          f"{PAPER_HEADER[style]}\n{paper_row(res['at_selected'], style)}\n"
          f"wrote {run_dir / 'results.json'}")
    return res


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Reference: docs/evaluation.md",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint written by a method script (runs/X/checkpoint.pt)")
    src.add_argument("--table", nargs="+", metavar="RESULTS_JSON",
                     help="results.json files; prints mean ± population std over runs sharing "
                          "method, variant, dataset, convention, rho, protocol")
    src.add_argument("--compare", nargs="+", metavar="RESULTS_JSON",
                     help="results.json files: per-class accuracy against train count, one series "
                          "per run, in one PNG (--out), and a table")
    p.add_argument("--probe", choices=("linear", "few-shot", "cb-linear", "knn", "classifier"),
                   help="linear / few-shot = SDCLR probe, cb-linear = DSCL stage 2, knn = kNN "
                        "monitor, classifier = the checkpoint's end-to-end classifier (Hybrid) "
                        "(default: linear)")
    p.add_argument("--knn-protocol", choices=("monitor", "ts"),
                   help="implies --probe knn. monitor (default): validation queries, never test; "
                        "ts: the protocol of Kukleva et al. (ICLR 2023, TS): LT set as bank, TEST "
                        "queries, majority vote, k 1, 10; only to compare with TS")
    p.add_argument("--probe-aug", default="crop", choices=("crop", "none"),
                   help="crop = the protocol (augmented batches); none = cached features, tagged "
                        f"'{CACHED_VARIANT}' (default: crop)")
    p.add_argument("--probe-label-fraction", type=float, default=None,
                   help="train the probe on this per-class stratified fraction of the LT "
                        "pre-training set (FASSL Table 10: 0.3)")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 / 100 / 40 per protocol")
    p.add_argument("--milestones", type=int, nargs="+", default=None,
                   help="x0.1 LR epochs (default: 10 20 / 40 60 / 20 30 per protocol); the SDCLR "
                        "probes lower the rate from 'ep N' of their log on, cb-linear after N "
                        "epochs (docs/evaluation.md)")
    p.add_argument("--lr", type=float, default=None,
                   help="probe LR (default: 30 SDCLR probe, 0.1 with --probe-aug none on "
                        "standardised cached features, 10 cb-linear)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the probe settings table (128 at <= 64 px, 512 at 224 px), "
                        "cb-linear 2048")
    p.add_argument("--linear-bn", default="train", choices=("eval", "train"),
                   help="cb-linear BN mode: train = the released DSCL code and dscl.py "
                        "(default: train)")
    p.add_argument("--recipe", default=None,
                   help="train augmentation recipe of data.augment (default: crop_flip_imagenet "
                        "for SSL checkpoints and 224-px data, crop_flip_cifar for dscl/hybrid at "
                        "CIFAR size)")
    p.add_argument("--out", default=None,
                   help="output directory (default: <checkpoint dir>/eval-<probe>); with "
                        "--compare the PNG (default: compare_per_class.png)")
    p.add_argument("--tsne", action=argparse.BooleanOptionalAction, default=True,
                   help="also write tsne.png of test features (default: on)")
    p.add_argument("--tsne-points", type=int, default=None,
                   help="default: 2000 on CUDA, 1000 on CPU")
    p.add_argument("--seed", type=int, default=0, help="probe seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | off (default: auto)")
    g = p.add_argument_group("dataset overrides (default: the checkpoint's saved args)")
    overrides = (("--dataset", str), ("--data-dir", str), ("--imb-ratio", float),
                 ("--protocol", str), ("--split", int), ("--split-file", str))
    for flag, typ in overrides:
        g.add_argument(flag, type=typ, default=None)
    return p


def main(argv=None):
    cli = build_parser().parse_args(argv)
    if cli.table or cli.compare:        # an unreadable file: one line from read_results
        return print(format_table(aggregate_results(cli.table)) if cli.table else
                     compare_runs(cli.compare, cli.out or "compare_per_class.png"))
    cli.probe = cli.probe or ("knn" if cli.knn_protocol else "linear")
    if cli.knn_protocol and cli.probe != "knn":
        raise common.UserError(f"--knn-protocol applies to --probe knn, not --probe {cli.probe}")
    return evaluate_checkpoint(cli)


if __name__ == "__main__":
    with common.user_errors():
        main()
