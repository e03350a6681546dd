"""Evaluation shared by every method: linear probes, kNN monitor, long-tail metrics, results.json, plots.

Spec: shared/specs/data-and-eval.md (cited as D§) -- §4 class groups and the Std column, §5 protocols,
§6 results.json. One module so that every table in the project is computed the same way.

Protocols
  * SDCLR linear probe (D§5.1; FASSL Tables 1-2, 9, TASE-R): frozen backbone in eval mode (BN eval), a new
    nn.Linear (weight N(0, 0.01^2), bias 0), SGD momentum 0.9, wd 0, lr 30, batch 128, 30 epochs x0.1 at 10 and
    20 (few-shot: 1 % subset, 100 epochs, x0.1 at 40 and 60); train augmentation RandomCrop + flip; the epoch is
    selected on the validation split and the test set is evaluated once, at the end.
  * DSCL class-balanced linear stage (D§5.2; DSCL Tables): class-balanced sampler, batch 2048, 40 epochs,
    x0.1 at 20 and 30; BN eval by default (bn="train" = released code).
  * kNN monitor (D§5.4): cosine, k = 200, votes weighted exp(sim / 0.1), queries never the test set.
  * End-to-end classifier (D§5.3, Hybrid).

Groups (D§4): "thirds" (Few / Medium / Many = Rare / Medium / Frequent, FASSL & SDCLR CIFAR tables),
"strict" (Many > 100, Medium 20..100, Few < 20; DSCL and ImageNet-100-LT), "oltr" (inclusive variant,
stored only). Counts always come from the (pre-)training set, never from the probe set.

CLI
  python eval.py --ckpt runs/X/checkpoint.pt --probe linear|few-shot|cb-linear|knn|classifier [--probe-aug crop|none]
  python eval.py --table runs/*/results.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

GROUP_RULES = ("thirds", "strict", "oltr")
CACHED_VARIANT = "sdclr-probe-cached (approx)"  # D§5.1: results of the feature-cache probe are tagged so


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(backbone, split, device, amp_dtype=None, batch_size=512, recipe="test_cifar"):
    """GAP features of every image of `split` in order, no augmentation (D§5.4): (feats fp32 (N, D), labels (N,)).

    The backbone runs in eval mode (BN uses its running statistics); its previous mode is restored."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    loader = data.make_loader(split, batch_size, device, shuffle=False, drop_last=False, sampler="sequential")
    try:
        for x, y, _ in loader:
            x = data.augment(x, recipe)
            with common.autocast(device, amp_dtype):
                f = backbone(x)
            feats.append(f.float())
            labels.append(y)
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def _subset(split, idx):
    """Split restricted to the indices `idx` (1-D int64 CPU tensor)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    files = [split.files[i] for i in idx.tolist()] if split.files is not None else None
    x = split.x[idx] if split.x is not None else None
    return data.Split(y=split.y[idx], x=x, files=files)


# ----------------------------------------------------------------------------------------------------------
# Metrics (D§4, D§6)
# ----------------------------------------------------------------------------------------------------------
def group_masks(class_counts, class_rank=None):
    """Class ids of the Many / Medium / Few groups under the three rules of D§4.

    thirds (D§4.1): sort classes ascending by train count, ties broken tail first (higher generator rank first;
      descending class index when no rank is known); Few = first floor(C/3), Medium = next floor(C/3), Many = rest.
    strict (D§4.2): Many n > 100, Medium 20 <= n <= 100, Few n < 20.
    oltr (D§4.3): Many n >= 100, Few n <= 20, Medium otherwise."""
    counts = [int(n) for n in class_counts]
    C = len(counts)
    rank = list(class_rank) if class_rank is not None else list(range(C))
    order = sorted(range(C), key=lambda c: (counts[c], -rank[c]))   # ascending count, tail first on ties
    third = C // 3
    thirds = {"many": sorted(order[2 * third:]), "medium": sorted(order[third:2 * third]),
              "few": sorted(order[:third])}
    strict = {"many": [c for c in range(C) if counts[c] > 100],
              "medium": [c for c in range(C) if 20 <= counts[c] <= 100],
              "few": [c for c in range(C) if counts[c] < 20]}
    oltr = {"many": [c for c in range(C) if counts[c] >= 100],
            "medium": [c for c in range(C) if 20 < counts[c] < 100],
            "few": [c for c in range(C) if counts[c] <= 20]}
    return {"thirds": thirds, "strict": strict, "oltr": oltr}


def _mean(values):
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _pstd(values):
    """Population standard deviation (ddof = 0), as np.std in SDCLR's exp_analyse.py (D§4.5)."""
    v = [x for x in values if x is not None]
    return float(np.std(np.asarray(v, dtype=np.float64))) if v else None


def group_stats(per_class_acc, groups):
    """Group accuracies (mean of per-class accuracies), their mean ("All" of paper 000) and the Std column.

    An empty group is None and is left out of group_mean and std (D§6)."""
    out = {}
    for g in ("many", "medium", "few"):
        out[g] = _mean([per_class_acc[c] for c in groups[g]])
    accs = [out["many"], out["medium"], out["few"]]
    out["group_mean"] = _mean(accs)   # D§4.5: (Many + Medium + Few) / 3
    out["std"] = _pstd(accs)          # D§4.5: Std column, population std of the three group accuracies
    out["n_classes"] = [len(groups["many"]), len(groups["medium"]), len(groups["few"])]
    return out


def compute_metrics(preds, labels, num_classes, class_counts, class_rank=None):
    """METRICS of D§6 from test predictions; accuracies in percent, unrounded.

    class_counts are the (pre-)training counts (D§4), never the probe set's. A class absent from the
    evaluated set gets per-class accuracy None and is left out of every mean."""
    preds = torch.as_tensor(preds).long().cpu().view(-1)
    labels = torch.as_tensor(labels).long().cpu().view(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    correct = (preds == labels).double()
    total_c = torch.bincount(labels, minlength=num_classes).double()
    correct_c = torch.bincount(labels, weights=correct, minlength=num_classes)
    per_class = [100.0 * float(correct_c[c] / total_c[c]) if total_c[c] > 0 else None for c in range(num_classes)]
    masks = group_masks(class_counts, class_rank)
    out = {
        "top1_overall": 100.0 * float(correct.mean()) if len(labels) else None,  # D§4.5, sample-weighted
        "acc_class_mean": _mean(per_class),                                     # D§4.5, mean of a_c
        "per_class_acc": per_class,
        "std_classes": _pstd(per_class),                                        # D§4.5, SDCLR "variance"
    }
    for rule in GROUP_RULES:
        out[f"groups_{rule}"] = group_stats(per_class, masks[rule])
    return out


def _fmt(v):
    return "-" if v is None else f"{v:.2f}"


def paper_row(metrics, style="ssl"):
    """Markdown row in a paper's column order.

    ssl : | All | Rare | Medium | Frequent | Std |   thirds, All = group mean (paper 000 Tables 1-2, 9)
    dscl: | Many | Medium | Few | Overall |          strict groups, Overall = top-1 (paper 002)
    top1: | Top-1 |                                  (paper 003)"""
    if style == "ssl":
        g = metrics["groups_thirds"]
        cells = [g["group_mean"], g["few"], g["medium"], g["many"], g["std"]]
    elif style == "dscl":
        g = metrics["groups_strict"]
        cells = [g["many"], g["medium"], g["few"], metrics["top1_overall"]]
    elif style == "top1":
        cells = [metrics["top1_overall"]]
    else:
        raise ValueError(f"unknown paper_row style {style!r}; use ssl, dscl or top1")
    return "| " + " | ".join(_fmt(c) for c in cells) + " |"


PAPER_HEADER = {"ssl": "| All | Rare | Medium | Frequent | Std |", "dscl": "| Many | Medium | Few | Overall |",
                "top1": "| Top-1 |"}


# ----------------------------------------------------------------------------------------------------------
# SDCLR linear probe (D§5.1)
# ----------------------------------------------------------------------------------------------------------
def _new_fc(in_dim, num_classes, device, seed=0):
    """fc on GAP features, weight ~ N(0, 0.01^2), bias 0 (D§5.1); seeded by its own generator."""
    with torch.random.fork_rng(devices=[]):           # nn.Linear's default init would draw from the global RNG
        fc = nn.Linear(in_dim, num_classes)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
        fc.bias.zero_()
    return fc.to(device)


@torch.no_grad()
def _predict(fc, feats, chunk=8192):
    return torch.cat([fc(feats[i:i + chunk]).argmax(1) for i in range(0, len(feats), chunk)])


@torch.no_grad()
def _val_accuracy(fc, feats, y, topk=1, chunk=8192):
    """Top-k accuracy in percent (top-5 is the ImageNet-100 selection metric of the SDCLR code, D§5.1)."""
    hits = torch.cat([(fc(feats[i:i + chunk]).topk(min(topk, fc.out_features), 1).indices == y[i:i + chunk, None])
                      .any(1) for i in range(0, len(feats), chunk)])
    return 100.0 * float(hits.double().mean())


def label_fraction_split(ds, fraction, seed=0):
    """Per-class stratified `fraction` of the LT pre-training set (FASSL Table 10 probe, D§5.1 variant):
    per class the first max(1, round(fraction * n_c)) images of a seeded permutation (INFERRED rounding)."""
    if not 0 < fraction <= 1:
        raise common.UserError(f"--probe-label-fraction must be in (0, 1] (got {fraction})")
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(ds.num_classes):
        idx = (ds.train.y == c).nonzero().view(-1)
        if len(idx):
            idx = idx[torch.randperm(len(idx), generator=gen)]
            keep.append(idx[:max(1, round(fraction * len(idx)))])
    return _subset(ds.train, torch.cat(keep).sort().values)


def _test_recipe(recipe):
    """Normalisation-only recipe matching a training recipe's statistics."""
    return "test_imagenet" if "imagenet" in recipe else "test_cifar"


def linear_probe(backbone, ds, device, amp_dtype=None, mode="full", aug="crop", epochs=None, milestones=None,
                 lr=30.0, batch_size=128, train_split=None, seed=0, log=print, recipe="crop_flip_imagenet"):
    """SDCLR linear probe (D§5.1) of a frozen backbone; returns {protocol, variant, selection, at_selected,
    at_last, history}.

    mode "full": ds.probe (or `train_split`), 30 epochs, x0.1 at 10 and 20, validation every epoch.
    mode "few-shot": ds.fewshot (or `train_split`), 100 epochs, x0.1 at 40 and 60, validation every 5 epochs.
    aug "crop": `recipe` (RandomCrop(pad size/8) + flip; "crop_flip_imagenet" because the SSL models were trained
    on ImageNet-normalised inputs) on every batch. aug "none": every train image is embedded once without
    augmentation and the fc is trained on the cached features (fast, tagged "sdclr-probe-cached (approx)").
    The backbone stays frozen and in eval mode: its parameters and BN buffers are unchanged. Selection = best
    validation top-1 (top-5 on ImageNet-100-LT, as the SDCLR code; last epoch when ds.val is None); the test set
    is embedded once, at the end, and scored with the selected and the last classifier. The global RNG is not
    touched (the fc init and the batch order use their own generators)."""
    if mode not in ("full", "few-shot"):
        raise ValueError(f"unknown probe mode {mode!r}; use full or few-shot")
    if aug not in ("crop", "none"):
        raise ValueError(f"unknown probe aug {aug!r}; use crop or none")
    few = mode == "few-shot"
    epochs = epochs if epochs is not None else (100 if few else 30)             # D§5.1
    milestones = list(milestones) if milestones is not None else ([40, 60] if few else [10, 20])
    val_every = 5 if few else 1                                                 # D§5.1
    split = train_split if train_split is not None else (ds.fewshot if few else ds.probe)
    if split is None:
        raise common.UserError(f"dataset {ds.name} has no {'few-shot' if few else 'probe'} split for the "
                               f"{mode} probe; use a protocol that defines it (e.g. --protocol sdclr)")
    test_recipe = _test_recipe(recipe)
    select_k = 5 if ds.name == "imagenet100-lt" else 1                          # D§5.1 selection metric
    t0 = time.time()
    was_training = backbone.training
    backbone.eval()                                                             # BN eval (D§5.1)
    try:
        val_feats = val_y = None
        if ds.val is not None:   # frozen backbone: validation features are the same every epoch
            val_feats, val_y = extract_features(backbone, ds.val, device, amp_dtype, recipe=test_recipe)
        if aug == "none":
            train_feats, train_y = extract_features(backbone, split, device, amp_dtype, recipe=test_recipe)
            in_dim = train_feats.shape[1]
        else:
            in_dim = _feature_dim(backbone, split, device, amp_dtype, test_recipe, val_feats)
            loader = data.make_loader(split, batch_size, device, shuffle=True, drop_last=False, sampler="random",
                                      seed=seed, image_size=ds.image_size)
            gen = torch.Generator(device=device).manual_seed(seed)
        fc = _new_fc(in_dim, ds.num_classes, device, seed)
        opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        best = {"top1": -1.0, "epoch": None, "state": None}
        history = []
        cpu_gen = torch.Generator().manual_seed(seed)
        for epoch in range(1, epochs + 1):
            cur_lr = common.multistep_lr(epoch, lr, milestones)                 # lr(e) = 30 * 0.1^{#m <= e}
            common.set_lr(opt, cur_lr)
            loss_sum = torch.zeros((), device=device)
            n_steps = 0
            if aug == "none":
                perm = torch.randperm(len(train_y), generator=cpu_gen).to(train_feats.device)
                batches = ((train_feats[perm[i:i + batch_size]], train_y[perm[i:i + batch_size]])
                           for i in range(0, len(perm), batch_size))
            else:
                loader.set_epoch(epoch)
                batches = _augmented_features(backbone, loader, recipe, gen, ds.image_size, device, amp_dtype)
            for f, y in batches:
                loss = F.cross_entropy(fc(f), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                n_steps += 1
            rec = {"epoch": epoch, "lr": cur_lr, "loss": float(loss_sum) / max(n_steps, 1), "val_top1": None}
            if val_feats is not None and (epoch % val_every == 0 or epoch == epochs):
                rec["val_top1"] = _val_accuracy(fc, val_feats, val_y, 1)
                score = rec["val_top1"] if select_k == 1 else _val_accuracy(fc, val_feats, val_y, select_k)
                if select_k != 1:
                    rec[f"val_top{select_k}"] = score
                if score > best["top1"]:                                        # ties keep the earlier epoch
                    best = {"top1": score, "epoch": epoch,
                            "state": {k: v.detach().clone() for k, v in fc.state_dict().items()}}
            history.append(rec)
            log(f"[probe {mode}] ep {epoch}/{epochs} | lr {cur_lr:g} | loss {rec['loss']:.4f}"
                + (f" | val top1 {rec['val_top1']:.2f}" if rec["val_top1"] is not None else ""))
        # The test set is read once, here, after selection (D§5.5: nothing is tuned on test).
        test_feats, test_y = extract_features(backbone, ds.test, device, amp_dtype, recipe=test_recipe)
    finally:
        backbone.train(was_training)
    at_last = compute_metrics(_predict(fc, test_feats), test_y, ds.num_classes, ds.class_counts, ds.class_rank)
    if best["state"] is not None:
        selection = {"rule": f"best-val-top{select_k}", "selected_epoch": best["epoch"], "last_epoch": epochs,
                     f"val_top{select_k}": best["top1"]}
        fc.load_state_dict(best["state"])
        at_selected = compute_metrics(_predict(fc, test_feats), test_y, ds.num_classes, ds.class_counts,
                                      ds.class_rank)
    else:
        selection = {"rule": "last-epoch (no validation split)", "selected_epoch": epochs, "last_epoch": epochs}
        at_selected = at_last
    return {"protocol": "sdclr-probe-fewshot" if few else "sdclr-probe-full",
            "variant": CACHED_VARIANT if aug == "none" else "crop",
            "selection": selection, "at_selected": at_selected, "at_last": at_last, "history": history,
            "probe": {"epochs": epochs, "milestones": milestones, "lr": lr, "batch_size": batch_size,
                      "recipe": recipe if aug == "crop" else test_recipe, "n_train": len(split),
                      "wall_time_s": time.time() - t0}}


@torch.no_grad()
def _feature_dim(backbone, split, device, amp_dtype, recipe, val_feats):
    if val_feats is not None:
        return val_feats.shape[1]
    if hasattr(backbone, "out_dim"):
        return int(backbone.out_dim)
    f, _ = extract_features(backbone, _subset(split, torch.arange(1)), device, amp_dtype, recipe=recipe)
    return f.shape[1]


def _augmented_features(backbone, loader, recipe, gen, image_size, device, amp_dtype):
    """Yields (frozen features fp32, labels) of augmented training batches; no gradient reaches the backbone."""
    for x, y, _ in loader:
        x = data.augment(x, recipe, generator=gen, image_size=image_size)
        with torch.no_grad(), common.autocast(device, amp_dtype):
            f = backbone(x)
        yield f.float(), y


# ----------------------------------------------------------------------------------------------------------
# DSCL class-balanced linear stage (D§5.2)
# ----------------------------------------------------------------------------------------------------------
def cb_linear(backbone, ds, device, amp_dtype=None, lr=10.0, epochs=40, milestones=(20, 30), batch_size=2048,
              bn="eval", recipe="crop_flip_cifar", seed=0, log=print) -> dict:
    """Class-balanced linear classifier on a frozen backbone (D§5.2; DSCL equal_lincls.py).

    Sampler: class uniform then image uniform (D§7.3) over the LT train set; CE; SGD momentum 0.9, wd 0;
    x0.1 at `milestones`. bn "eval" (default, INFERRED): BN uses running statistics. bn "train": the released
    code's model.train() -- BN normalises with batch statistics and updates its running statistics; this is
    done on a copy, the caller's backbone is left unchanged. Headline = last epoch (D§5.5); the val-selected
    epoch is stored where ds.val exists; `best_test` (selected on test, comparison only) is stored flagged."""
    if bn not in ("eval", "train"):
        raise ValueError(f"unknown bn mode {bn!r}; use eval or train")
    t0 = time.time()
    net = copy.deepcopy(backbone) if bn == "train" else backbone   # frozen: its forward runs under no_grad
    was_training = backbone.training
    test_recipe = _test_recipe(recipe)
    loader = data.make_loader(ds.train, batch_size, device, shuffle=True, drop_last=False, sampler="balanced",
                              seed=seed, image_size=ds.image_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    net.eval()
    try:
        feats_cache = {}

        def features(split_name):   # eval-mode features; constant (cached) unless BN statistics move
            if bn == "train" or split_name not in feats_cache:
                feats_cache[split_name] = extract_features(net, getattr(ds, split_name), device, amp_dtype,
                                                           recipe=test_recipe)
            return feats_cache[split_name]

        in_dim = int(net.out_dim) if hasattr(net, "out_dim") else features("test")[0].shape[1]
        fc = _new_fc(in_dim, ds.num_classes, device, seed)
        opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
        history, best_test, best_val = [], {"epoch": None, "top1": -1.0}, {"epoch": None, "top1": -1.0}
        val_metrics = None      # test METRICS at the val-selected epoch (stored, not the headline)
        for epoch in range(1, epochs + 1):
            cur_lr = common.multistep_lr(epoch, lr, list(milestones))
            common.set_lr(opt, cur_lr)
            loader.set_epoch(epoch)
            net.train(bn == "train")
            loss_sum, n_steps = torch.zeros((), device=device), 0
            for x, y, _ in loader:
                x = data.augment(x, recipe, generator=gen, image_size=ds.image_size)
                with torch.no_grad(), common.autocast(device, amp_dtype):
                    f = net(x)
                loss = F.cross_entropy(fc(f.float()), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                n_steps += 1
            net.eval()
            tf, ty = features("test")   # D§5.2: the released code scores test every epoch
            test_top1 = 100.0 * float((_predict(fc, tf) == ty).double().mean())
            rec = {"epoch": epoch, "lr": cur_lr, "loss": float(loss_sum) / max(n_steps, 1), "test_top1": test_top1,
                   "val_top1": None}
            if test_top1 > best_test["top1"]:
                best_test = {"epoch": epoch, "top1": test_top1}
            if ds.val is not None:
                vf, vy = features("val")
                rec["val_top1"] = 100.0 * float((_predict(fc, vf) == vy).double().mean())
                if rec["val_top1"] > best_val["top1"]:
                    best_val = {"epoch": epoch, "top1": rec["val_top1"]}
                    val_metrics = compute_metrics(_predict(fc, tf), ty, ds.num_classes, ds.class_counts,
                                                  ds.class_rank)
            history.append(rec)
            log(f"[cb-linear] ep {epoch}/{epochs} | lr {cur_lr:g} | loss {rec['loss']:.4f} | test top1 "
                f"{test_top1:.2f}")
        tf, ty = features("test")
        at_last = compute_metrics(_predict(fc, tf), ty, ds.num_classes, ds.class_counts, ds.class_rank)
    finally:
        backbone.train(was_training)
    out = {"protocol": "dscl-linear-cb",
           "selection": {"rule": "last-epoch", "selected_epoch": epochs, "last_epoch": epochs},
           "at_selected": at_last, "at_last": at_last,
           "best_test": {"epoch": best_test["epoch"], "top1": best_test["top1"], "selected_on_test": True},
           "history": history,
           "probe": {"epochs": epochs, "milestones": list(milestones), "lr": lr, "batch_size": batch_size,
                     "recipe": recipe, "bn": bn, "wall_time_s": time.time() - t0}}
    if val_metrics is not None:
        out["selection"]["val_selected_epoch"] = best_val["epoch"]
        out["at_val_selected"] = val_metrics
    return out


# ----------------------------------------------------------------------------------------------------------
# kNN monitor (D§5.4) and end-to-end classifier (D§5.3)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def knn_predict(bank_feats, bank_y, query_feats, num_classes, k=200, t=0.1, chunk=1024):
    """Weighted kNN vote (D§5.4, InstDisc style): cosine similarity, k nearest, weight exp(sim / t), argmax of
    the per-class sum of weights. Runs on the features' device in chunks of queries."""
    bank = F.normalize(bank_feats.float(), dim=1)
    query = F.normalize(query_feats.float(), dim=1)
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(query), chunk):
        sim = query[i:i + chunk] @ bank.T                         # (q, N_bank) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = torch.exp(top_sim / t)                          # sim <= 1, so exp(sim / t) <= e^(1/t): no overflow
        scores = torch.zeros(len(top_idx), num_classes, device=bank.device)
        scores.scatter_add_(1, bank_y[top_idx], weights)
        preds.append(scores.argmax(1))
    return torch.cat(preds)


@torch.no_grad()
def knn_monitor(backbone, bank, query, device, num_classes, k=200, t=0.1, recipe="test_cifar",
                class_counts=None, class_rank=None) -> dict:
    """kNN health check (D§5.4): L2-normalised eval-mode GAP features without augmentation; bank = labelled probe
    pool (SSL) or LT train set; queries = validation split, never test. Returns METRICS (with class_counts) or
    top1_overall / acc_class_mean / per_class_acc / std_classes."""
    bf, by = extract_features(backbone, bank, device, recipe=recipe)
    qf, qy = extract_features(backbone, query, device, recipe=recipe)
    preds = knn_predict(bf, by, qf, num_classes, k, t)
    counts = class_counts if class_counts is not None else [1] * num_classes
    m = compute_metrics(preds, qy, num_classes, counts, class_rank)
    if class_counts is None:
        m = {key: m[key] for key in ("top1_overall", "acc_class_mean", "per_class_acc", "std_classes")}
    return m


def knn_query_split(ds, seed=0):
    """Queries for the kNN monitor (D§5.4): ds.val, else 10 % of the train set capped at 10,000 images."""
    if ds.val is not None:
        return ds.val
    n = min(max(1, len(ds.train) // 10), 10000)
    idx = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(seed))[:n]
    return _subset(ds.train, idx.sort().values)


@torch.no_grad()
def classifier_eval(backbone, classifier, ds, device, amp_dtype=None, recipe="test_cifar") -> dict:
    """End-to-end classifier (Hybrid, D§5.3) on the balanced test set, eval mode: METRICS."""
    was = classifier.training
    classifier.eval()
    feats, y = extract_features(backbone, ds.test, device, amp_dtype, recipe=recipe)
    with common.autocast(device, amp_dtype):
        preds = _predict(classifier, feats)
    classifier.train(was)
    return compute_metrics(preds, y, ds.num_classes, ds.class_counts, ds.class_rank)


# ----------------------------------------------------------------------------------------------------------
# t-SNE (exact, torch) -- for the FASSL Figure 3 style plot
# ----------------------------------------------------------------------------------------------------------
def _binary_search_p(d2, perplexity, tol=1e-5, steps=64):
    """Row-conditional P_{j|i} with entropy log(perplexity), one bisection on beta = 1/(2 sigma^2) per row."""
    n = d2.shape[0]
    target = math.log(perplexity)
    beta = torch.ones(n, dtype=d2.dtype, device=d2.device)
    lo = torch.full_like(beta, 0.0)
    hi = torch.full_like(beta, float("inf"))
    eye = torch.eye(n, dtype=torch.bool, device=d2.device)
    for _ in range(steps):
        logits = (-d2 * beta[:, None]).masked_fill(eye, float("-inf"))
        logp = torch.log_softmax(logits, dim=1)
        p = logp.exp()
        h = -(p * logp.masked_fill(eye, 0.0)).sum(1)              # entropy in nats
        too_flat = h > target                                      # entropy too high -> increase beta
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2, (lo + hi) / 2)
        if (h - target).abs().max() < tol:
            break
    return p


def _sq_dist(a):
    """Pairwise squared Euclidean distances (faster than cdist for low-dimensional points)."""
    if a.shape[1] <= 3:      # the embedding: a broadcast difference beats a matmul with a tiny inner dimension
        return (a[:, None, :] - a[None, :, :]).pow(2).sum(-1)
    sq = (a * a).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)).clamp_min(0.0)


def tsne(x, dim=2, perplexity=30.0, iters=500, seed=0):
    """Exact t-SNE (van der Maaten & Hinton 2008) in torch for <= ~2000 points; returns (N, dim) fp32 on CPU.

    Runs on x's device (O(N^2) memory and work per iteration: seconds on a GPU, ~a minute for 2000 points on CPU).
    Gaussian affinities at the given perplexity (bisection, fp64), symmetrised; Student-t low-dim kernel;
    gradient descent with momentum 0.5 -> 0.8, early exaggeration 12 for the first 250 iterations and adaptive
    gains; PCA initialisation scaled to std 1e-4 (deterministic given `seed`)."""
    x = torch.as_tensor(x).detach().double()
    dev = x.device
    n = x.shape[0]
    perplexity = min(perplexity, max(1.0, (n - 1) / 3.0))
    p_cond = _binary_search_p(_sq_dist(x), perplexity)
    p = ((p_cond + p_cond.T) / (2 * n)).clamp_min(1e-12).float()
    xc = x - x.mean(0)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    y = (u[:, :dim] * s[:dim]).float()
    gen = torch.Generator().manual_seed(seed)
    if y.shape[1] < dim:
        y = torch.cat([y, torch.randn(n, dim - y.shape[1], generator=gen).to(dev)], 1)
    y = y / y[:, 0].std().clamp_min(1e-12) * 1e-4
    y = y + 1e-6 * torch.randn(y.shape, generator=gen).to(dev)       # breaks exact ties
    lr = max(n / 12.0 / 4.0, 50.0)
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    exag_iters = min(250, iters // 2)
    for it in range(iters):
        exag = 12.0 if it < exag_iters else 1.0
        momentum = 0.5 if it < exag_iters else 0.8
        num = (1.0 / (1.0 + _sq_dist(y))).masked_fill_(eye, 0.0)       # Student-t kernel
        q = (num / num.sum()).clamp_min(1e-12)
        pq = (exag * p - q) * num
        grad = 4.0 * (pq.sum(1, keepdim=True) * y - pq @ y)            # dC/dy_i = 4 sum_j (p_ij - q_ij) w_ij (y_i - y_j)
        inc = (update * grad) < 0
        gains = torch.where(inc, gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
    return y.cpu()


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg backend)
# ----------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_per_class(metrics, class_counts, path):
    """Per-class test accuracy against the class's train count (log x-axis)."""
    plt = _plt()
    acc = metrics["per_class_acc"]
    pts = [(n, a) for n, a in zip(class_counts, acc) if a is not None and n > 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14)
    ax.set_xscale("log")
    ax.set_xlabel("train images of the class (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"per-class accuracy (top-1 {_fmt(metrics['top1_overall'])})")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_groups(metrics, path):
    """Bars of Many / Medium / Few accuracy for the thirds and strict rules."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.38
    names = ["many", "medium", "few"]
    for i, rule in enumerate(("thirds", "strict")):
        g = metrics[f"groups_{rule}"]
        vals = [g[k] if g[k] is not None else 0.0 for k in names]
        xs = [j + (i - 0.5) * width for j in range(3)]
        ax.bar(xs, vals, width, label=f"{rule} (n = {'/'.join(str(c) for c in g['n_classes'])})")
    ax.set_xticks(range(3))
    ax.set_xticklabels(["Many / Frequent", "Medium", "Few / Rare"])
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_tsne(feats, labels, path, max_points=2000, seed=0, class_names=None):
    """t-SNE of backbone features coloured by class (FASSL Figure 3), on a random subset of <= max_points."""
    plt = _plt()
    feats = torch.as_tensor(feats).float()          # t-SNE runs on the features' device
    labels = torch.as_tensor(labels).long().cpu()
    if len(feats) > max_points:
        idx = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:max_points]
        feats, labels = feats[idx.to(feats.device)], labels[idx]
    emb = tsne(feats, seed=seed, iters=500).numpy()
    fig, ax = plt.subplots(figsize=(6, 6))
    sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels.numpy(), cmap="tab20" if labels.max() < 20 else "viridis", s=5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of backbone features")
    if class_names is not None and len(class_names) <= 20:
        handles = [plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(c))) for c in range(len(class_names))]
        ax.legend(handles, class_names, fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# results.json (D§6)
# ----------------------------------------------------------------------------------------------------------
def results_skeleton(method, variant, paper_setting, ds, protocol, network_evaluated, arch, epochs, seed, amp,
                     wall_time) -> dict:
    """The D§6 fields; callers fill selection / at_selected / at_last (e.g. `res.update(linear_probe(...))`)."""
    info = ds if isinstance(ds, dict) else ds.info()
    return {"method": method, "variant": variant, "paper_setting": bool(paper_setting), "dataset": dict(info),
            "protocol": protocol, "network_evaluated": network_evaluated, "backbone": arch,
            "epochs": dict(epochs), "seed": seed, "amp": amp if amp is None or isinstance(amp, str) else str(amp),
            "git_commit": common.git_commit(), "wall_time_s": float(wall_time),
            "selection": None, "at_selected": None, "at_last": None, "knn": [], "extra": {}}


def write_results(run_dir, results: dict) -> None:
    """run_dir/results.json (atomic) plus per_class_acc.png and group_acc.png from the headline metrics."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    common.save_json(run_dir / "results.json", results)
    metrics = results.get("at_selected") or results.get("at_last")
    counts = (results.get("dataset") or {}).get("class_counts")
    if metrics is not None and counts is not None:
        plot_per_class(metrics, counts, run_dir / "per_class_acc.png")
        plot_groups(metrics, run_dir / "group_acc.png")


# ----------------------------------------------------------------------------------------------------------
# --table: mean +- std over runs
# ----------------------------------------------------------------------------------------------------------
TABLE_COLUMNS = [  # (header, path into METRICS)
    ("Top-1", ("top1_overall",)), ("All", ("groups_thirds", "group_mean")), ("Rare", ("groups_thirds", "few")),
    ("Medium", ("groups_thirds", "medium")), ("Frequent", ("groups_thirds", "many")),
    ("Std", ("groups_thirds", "std")), ("Many (strict)", ("groups_strict", "many")),
    ("Medium (strict)", ("groups_strict", "medium")), ("Few (strict)", ("groups_strict", "few"))]


def _get(d, path):
    for k in path:
        if d is None:
            return None
        d = d.get(k)
    return d


def aggregate_results(paths):
    """Groups results.json files by (method, variant, dataset, lt_convention, imb_ratio, protocol) and returns
    one row per group: {"key": {...}, "n": runs, "files": [...], "<column>": (mean, population std) or None}."""
    groups = {}
    for path in paths:
        try:
            with open(path) as fh:
                res = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise common.UserError(f"cannot read results file {path} ({e}); pass results.json files written by "
                                   f"eval.py or a method script")
        ds = res.get("dataset") or {}
        key = (res.get("method"), res.get("variant"), ds.get("name"), ds.get("lt_convention"),
               ds.get("imb_ratio"), res.get("protocol"))
        groups.setdefault(key, []).append((str(path), res.get("at_selected") or res.get("at_last") or {}))
    rows = []
    for key, items in groups.items():
        row = {"key": dict(zip(("method", "variant", "dataset", "lt_convention", "imb_ratio", "protocol"), key)),
               "n": len(items), "files": [p for p, _ in items]}
        for name, path in TABLE_COLUMNS:
            vals = [v for v in (_get(m, path) for _, m in items) if v is not None]
            row[name] = (float(np.mean(vals)), float(np.std(vals))) if vals else None   # population std
        rows.append(row)
    return rows


def format_table(rows) -> str:
    head = ["Method", "Variant", "Dataset", "Convention", "rho", "Protocol", "Runs"] + [c for c, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k = r["key"]
        cells = [str(k["method"]), str(k["variant"] or ""), str(k["dataset"]), str(k["lt_convention"]),
                 str(k["imb_ratio"]), str(k["protocol"]), str(r["n"])]
        for name, _ in TABLE_COLUMNS:
            cells.append("-" if r[name] is None else f"{r[name][0]:.2f} ± {r[name][1]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
SUPERVISED = ("dscl", "hybrid", "hybrid-sc", "hybrid-psc")


def _dataset_from_ckpt(ckpt_args, cli):
    """Rebuilds the dataset from the checkpoint's saved args, with command-line overrides."""
    a = dict(ckpt_args or {})
    for k in ("dataset", "data_dir", "imb_ratio", "protocol", "split", "split_file"):
        v = getattr(cli, k)
        if v is not None:
            a[k] = v
    if not a.get("dataset"):
        raise common.UserError("the checkpoint does not record its dataset; pass --dataset NAME (and --data-dir)")
    kw = {k: a[k] for k in ("data_dir", "imb_ratio", "protocol", "split", "split_file", "num_classes",
                            "sdclr_split_dir") if a.get(k) is not None}
    seed = a.get("data_seed", a.get("seed"))          # method scripts name the data seed --data-seed
    if seed is not None:
        kw["seed"] = seed
    if a["dataset"] == "synthetic-lt":
        kw.update({k: v for k, v in a.items() if k.startswith("synthetic_") and v is not None})
    return data.load_dataset(a["dataset"], **kw)


def evaluate_checkpoint(cli) -> dict:
    ckpt = common.load_checkpoint(cli.ckpt)
    missing = [k for k in ("arch", "backbone") if k not in ckpt]
    if missing:
        raise common.UserError(f"checkpoint {cli.ckpt} lacks {', '.join(missing)}; evaluate a checkpoint written by "
                               f"a method script of this project (fassl.py, tase.py, dscl.py, hybrid.py)")
    device, amp_dtype = common.setup_device(cli.device, cli.amp)
    backbone = common.build_backbone(ckpt["arch"], int(ckpt.get("image_size", 32)))
    try:
        backbone.load_state_dict(ckpt["backbone"])
    except RuntimeError as e:
        raise common.UserError(f"checkpoint {cli.ckpt}: backbone weights do not fit arch {ckpt['arch']} "
                               f"({str(e).splitlines()[0]}); the checkpoint is from another architecture") from e
    backbone = backbone.to(device)
    ds = _dataset_from_ckpt(ckpt.get("args"), cli)
    # a script may store the label results.json should carry (tase.py: "TASE-R (reconstruction)" / "simclr" / ...)
    method = ckpt.get("results_method", ckpt.get("method", "unknown"))
    supervised = ckpt.get("method") in SUPERVISED
    recipe = cli.recipe or ("crop_flip_cifar" if supervised else "crop_flip_imagenet")
    test_recipe = _test_recipe(recipe)
    t0 = time.time()
    if cli.probe in ("linear", "few-shot"):
        train_split = None
        if cli.probe_label_fraction is not None:          # FASSL Table 10: stratified fraction of the LT set
            train_split = label_fraction_split(ds, cli.probe_label_fraction, cli.seed)
        elif ds.name == "places-lt" and cli.probe == "linear":
            train_split = ds.train                        # ssl.md §3.5: the Places-LT probe trains on its train list
        out = linear_probe(backbone, ds, device, amp_dtype, mode="full" if cli.probe == "linear" else "few-shot",
                           aug=cli.probe_aug, epochs=cli.epochs, milestones=cli.milestones,
                           lr=cli.lr if cli.lr is not None else 30.0,
                           batch_size=cli.batch_size or (128 if ds.image_size <= 64 else 512),   # D§5.1
                           train_split=train_split, seed=cli.seed, recipe=recipe)
        if cli.probe_label_fraction is not None:
            out["variant"] += f", label fraction {cli.probe_label_fraction:g}"
    elif cli.probe == "cb-linear":
        out = cb_linear(backbone, ds, device, amp_dtype, lr=cli.lr if cli.lr is not None else 10.0,
                        epochs=cli.epochs or 40, milestones=cli.milestones or (20, 30),
                        batch_size=cli.batch_size or 2048, bn=cli.linear_bn, recipe=recipe, seed=cli.seed)
    elif cli.probe == "classifier":
        if "classifier" not in ckpt:
            raise common.UserError(f"checkpoint {cli.ckpt} has no end-to-end classifier; use --probe linear, few-shot, "
                                   f"cb-linear or knn")
        w = ckpt["classifier"]["weight"]
        fc = nn.Linear(w.shape[1], w.shape[0]).to(device)
        fc.load_state_dict(ckpt["classifier"])
        m = classifier_eval(backbone, fc, ds, device, amp_dtype, recipe=test_recipe)
        out = {"protocol": "hybrid-e2e", "variant": "checkpoint classifier",
               "selection": {"rule": "checkpoint (last saved epoch)", "selected_epoch": ckpt.get("epoch"),
                             "last_epoch": ckpt.get("epoch")}, "at_selected": m, "at_last": m}
    else:
        bank = ds.probe if ds.probe is not None else ds.train
        m = knn_monitor(backbone, bank, knn_query_split(ds, cli.seed), device, ds.num_classes, recipe=test_recipe,
                        class_counts=ds.class_counts, class_rank=ds.class_rank)
        out = {"protocol": "knn-monitor", "variant": "k200-t0.1",
               "selection": {"rule": "none (kNN on the validation split, never test)", "selected_epoch": None,
                             "last_epoch": None}, "at_selected": m, "at_last": m}
    variant = out.pop("variant") if "variant" in out else f"bn-{cli.linear_bn}"
    a = ckpt.get("args") or {}
    res = results_skeleton(method=method, variant=variant, paper_setting=False, ds=ds, protocol=out["protocol"],
                           network_evaluated="backbone", arch=ckpt["arch"],
                           epochs={"pretrain": ckpt.get("epoch"), "probe": (out.get("probe") or {}).get("epochs")},
                           seed=a.get("seed", cli.seed),
                           amp=str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "off",
                           wall_time=time.time() - t0)
    res.update(out)
    res["extra"]["checkpoint"] = str(cli.ckpt)
    res["extra"]["stage"] = ckpt.get("stage", "")
    # default: a sub-directory per probe, so the results.json the training run wrote beside it survives
    run_dir = pathlib.Path(cli.out) if cli.out else pathlib.Path(cli.ckpt).parent / f"eval-{cli.probe}"
    write_results(run_dir, res)
    if cli.tsne:
        feats, labels = extract_features(backbone, ds.test, device, amp_dtype, recipe=test_recipe)
        points = cli.tsne_points or (2000 if device.type == "cuda" else 1000)
        plot_tsne(feats, labels, run_dir / "tsne.png", max_points=points, seed=cli.seed,
                  class_names=ds.class_names)
    style = {"cb-linear": "dscl", "classifier": "top1"}.get(cli.probe, "ssl")
    print(f"{method} {ds.name} {res['protocol']} ({variant}), {res['selection']['rule']}:")
    print(PAPER_HEADER[style])
    print(paper_row(res["at_selected"], style))
    print(f"wrote {run_dir / 'results.json'}")
    return res


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint written by a method script (runs/X/checkpoint.pt)")
    src.add_argument("--table", nargs="+", metavar="RESULTS_JSON",
                     help="results.json files; prints mean ± std (population) over runs sharing method, variant, "
                          "dataset, convention, rho and protocol")
    p.add_argument("--probe", default="linear", choices=["linear", "few-shot", "cb-linear", "knn", "classifier"],
                   help="protocol: linear / few-shot = SDCLR probe (D§5.1), cb-linear = DSCL stage 2 (D§5.2), "
                        "knn = kNN monitor (D§5.4), classifier = the checkpoint's end-to-end classifier (Hybrid, "
                        "D§5.3) (default: linear)")
    p.add_argument("--probe-aug", default="crop", choices=["crop", "none"],
                   help="crop = protocol (RandomCrop + flip per batch); none = cached un-augmented features, "
                        "tagged 'sdclr-probe-cached (approx)' (D§5.1) (default: crop)")
    p.add_argument("--probe-label-fraction", type=float, default=None,
                   help="train the probe on this per-class stratified fraction of the LT pre-training set "
                        "(FASSL Table 10: 0.3; D§5.1 variant) (default: off)")
    p.add_argument("--epochs", type=int, default=None, help="probe epochs (default: 30 / 100 / 40 per protocol)")
    p.add_argument("--milestones", type=int, nargs="+", default=None,
                   help="x0.1 LR epochs (default: 10 20 / 40 60 / 20 30 per protocol)")
    p.add_argument("--lr", type=float, default=None, help="probe LR (default: 30 SDCLR probe, 10 cb-linear)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: SDCLR probe 128 (<= 64 px) / 512 (224 px) (D§5.1), cb-linear 2048 (D§5.2)")
    p.add_argument("--linear-bn", default="eval", choices=["eval", "train"],
                   help="cb-linear BN mode; train = released DSCL code (D§5.2) (default: eval)")
    p.add_argument("--recipe", default=None,
                   help="train augmentation recipe of data.augment (default: crop_flip_imagenet for SSL "
                        "checkpoints, crop_flip_cifar for dscl/hybrid)")
    p.add_argument("--out", default=None, help="output directory (default: <the checkpoint's run directory>/eval-<probe>)")
    p.add_argument("--tsne", action=argparse.BooleanOptionalAction, default=True,
                   help="also write tsne.png of test features (default: on)")
    p.add_argument("--tsne-points", type=int, default=None,
                   help="t-SNE subset size (default: 2000 on CUDA, 1000 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="probe seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | off (default: auto)")
    g = p.add_argument_group("dataset overrides (default: the checkpoint's saved args)")
    g.add_argument("--dataset", default=None)
    g.add_argument("--data-dir", default=None)
    g.add_argument("--imb-ratio", type=float, default=None)
    g.add_argument("--protocol", default=None)
    g.add_argument("--split", type=int, default=None)
    g.add_argument("--split-file", default=None)
    return p


def main(argv=None):
    cli = build_parser().parse_args(argv)
    if cli.table:
        missing = [p for p in cli.table if not os.path.isfile(p)]
        if missing:
            raise common.UserError(f"results file {missing[0]} does not exist; pass existing results.json files "
                                   f"(e.g. runs/*/results.json)")
        print(format_table(aggregate_results(cli.table)))
        return None
    return evaluate_checkpoint(cli)


if __name__ == "__main__":
    with common.user_errors():
        main(sys.argv[1:])
