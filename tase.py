"""TASE-R: a RECONSTRUCTION of TASE from its abstract -- NOT the authors' method.

Paper 001: Xiao et al., "Dataset Awareness is not Enough: Implementing Sample-level Tail Encouragement in
Long-tailed Self-supervised Learning" (TASE, arXiv 2410.22883). Only the abstract and the figure captions are
available. The abstract says: pseudo-labels drive (i) a per-sample temperature and (ii) a re-weighting that adds
the "quantity awareness" a temperature lacks. Every formula below is the project's reconstruction of that idea
(spec `shared/specs/ssl.md` §4, all equations INFERRED). Results are labelled "TASE-R (reconstruction)" and are
never comparable with numbers from the paper.

The reconstruction is SimCLR (spec §1.4, SDCLR recipe with prune ratio 0) plus:
  (T1) every R epochs after a warm-up of W epochs, k-means on L2-normalised backbone features of the whole
       training set (no augmentation, eval BN) gives pseudo-labels c(i) and cluster sizes n_c;
  (T2) s_i = normalised log cluster size in [0, 1];
  (T3) tau_i = tau_min + (tau_max - tau_min) * m(e) * s_i  (large cluster -> large tau: group-wise
       discrimination; small cluster -> small tau: instance discrimination, as in the TS analysis);
  (T4) w_i = n_c(i)^(-a), normalised to mean 1 over the batch (the "quantity awareness");
  (T5) NT-Xent (eq. S1) whose row j uses the temperature of its image; (T6) weighted mean over the 2B anchors.

The same file runs the baselines by switches (spec §4.8):
  --no-sample-temperature --no-reweight                        SimCLR (tau 0.2)
  --no-sample-temperature --no-reweight --tau-schedule cosine  SimCLR+TS (Kukleva et al., eq. TS1)
  --no-sample-temperature / --no-reweight                      one TASE-R component alone

Run: python tase.py --dataset cifar10-lt         (python tase.py --help lists every switch and its source)
Demo: python tase.py --dataset synthetic-lt       (CPU-sized SYNTHETIC_DEMO schedule, not a paper setting)
"""
import argparse
import dataclasses
import math
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import eval as evaluation
from common import arg


# ----------------------------------------------------------------------------------------------------------------
# 1. Arguments (every default: its source; INFERRED = the project's decision, spec ssl.md §4.5)
# ----------------------------------------------------------------------------------------------------------------
# Not a paper setting: a CPU-sized demo for synthetic-lt (sized for about 3 minutes on an idle 2-core CPU; it
# re-clusters at epochs 5, 9, 13, 17). resolve_args() fills these values in only with --dataset synthetic-lt and
# only for options not given on the command line.
SYNTHETIC_DEMO = {"arch": "resnet8", "epochs": 20, "batch_size": 128, "lr_warmup_epochs": 2,
                  "warmup_epochs": 4, "recluster_every": 4, "probe_aug": "none"}


@dataclass
class Args:
    """TASE-R: a RECONSTRUCTION of TASE (paper 001) from its abstract, NOT the authors' method. SimCLR with
    pseudo-label (k-means) driven per-sample temperature and re-weighting; also runs the SimCLR and SimCLR+TS
    baselines (--no-sample-temperature --no-reweight [--tau-schedule cosine]). Spec: shared/specs/ssl.md §4."""
    # data
    dataset: str = arg("cifar10-lt", "pre-training dataset (spec ssl.md §4.6; D§1-3)", choices=list(data.DATASETS))
    data_dir: str = arg("./data", "where datasets live (data.py)")
    imb_ratio: float = arg(100.0, "imbalance ratio rho of the LT profile (spec D§1.1; ssl.md §4.6)")
    protocol: str = arg("sdclr", "LT convention: sdclr (SDCLR splits, ssl.md §1.4) or ldam (D§1.3)",
                        choices=["sdclr", "ldam"])
    split: int = arg(1, "SDCLR split k = 1..5 (ssl.md §4.5: development runs use split 1)")
    split_file: Optional[str] = arg(None, "official SDCLR D_i .npy file -> convention sdclr-npy (D§1.4)")
    sdclr_split_dir: Optional[str] = arg(None, "folder with the official SDCLR split files -> sdclr-npy (D§1.4)")
    data_seed: int = arg(0, "seed of the LT subset generator (spec D§1.4 step 1)")
    num_classes: int = arg(10, "classes of synthetic-lt only (data.py)")
    synthetic_n_max: int = arg(500, "synthetic-lt head-class count (data.py; tests pass small values)")
    synthetic_n_test: int = arg(100, "synthetic-lt test images per class (data.py)")
    # model
    arch: str = arg("resnet18", "backbone; ResNet-18 CIFAR stem (ssl.md §1.4, SDCLR code); synthetic-lt demo: resnet8",
                    choices=["resnet18", "resnet34", "resnet50", "resnet152", "resnet8", "resnet20", "resnet32"])
    proj_dim: int = arg(128, "projection output dim (SDCLR scripts --output_ch 128; ssl.md §1.4)")
    # optimisation: the SimCLR baseline recipe (ssl.md §1.4 / §4.4 step 1)
    epochs: int = arg(2000, "pre-training epochs (SDCLR scripts, CIFAR; ssl.md §1.4, §4.5); "
                              "synthetic-lt demo: 20")
    batch_size: int = arg(512, "images per batch B (SDCLR scripts; ssl.md §1.4); synthetic-lt demo: 128")
    lr: float = arg(0.5, "base LR (SDCLR code train_simCLR.py; ssl.md §1.4)")
    final_lr: float = arg(1e-6, "LR at the end of the per-iteration cosine (SDCLR code; ssl.md §1.4)")
    lr_warmup_epochs: int = arg(10, "linear LR warm-up epochs (SDCLR code; ssl.md §1.4); "
                                        "synthetic-lt demo: 2")
    momentum: float = arg(0.9, "SGD momentum (SDCLR code; ssl.md §1.4)")
    weight_decay: float = arg(1e-4, "weight decay on all parameters (SDCLR code; ssl.md §1.4)")
    augment: str = arg("auto", "augmentation recipe; auto = simclr_cifar (<= 64 px) or mocov2_imagenet "
                               "(ssl.md §1.4)", choices=["auto", "simclr_cifar", "mocov2_imagenet"])
    # temperatures
    tau: float = arg(0.2, "global tau before the first clustering and without sample temperature "
                          "(SimCLR value, SDCLR scripts; ssl.md §4.3, §4.5)")
    tau_schedule: str = arg("constant", "constant tau, or cosine = TS eq. TS1 (Kukleva et al.; ssl.md §2, §4.3)",
                            choices=["constant", "cosine"])
    ts_tau_min: float = arg(0.1, "TS tau_min of eq. TS1 (TS README commands; ssl.md §2.3)")
    ts_tau_max: float = arg(1.0, "TS tau_max of eq. TS1 (TS README commands; ssl.md §2.3)")
    ts_period: int = arg(200, "TS half-period T of eq. TS1 in epochs (TS code; ssl.md §2.3)")
    # TASE-R components (all INFERRED, spec ssl.md §4.5)
    sample_temperature: bool = arg(True, "per-sample temperature from cluster size, eqs. T2-T3 "
                                         "(INFERRED, spec ssl.md §4.3)")
    reweight: bool = arg(True, "per-sample weight n_c^(-a), eq. T4 (INFERRED, spec ssl.md §4.3)")
    tau_min: float = arg(0.1, "temperature of the smallest cluster, eq. T3 (INFERRED, spec ssl.md §4.5)")
    tau_max: float = arg(0.5, "temperature of the largest cluster, eq. T3 (INFERRED, spec ssl.md §4.5)")
    reweight_power: float = arg(0.5, "re-weight exponent a of eq. T4 (INFERRED, spec ssl.md §4.5)")
    clusters: Optional[int] = arg(None, "k-means clusters K_c; default = number of classes "
                                        "(INFERRED, spec ssl.md §4.5)")
    warmup_epochs: int = arg(50, "plain SimCLR epochs W before the first clustering (INFERRED, spec ssl.md "
                                     "§4.5); synthetic-lt demo: 4")
    recluster_every: int = arg(20, "re-cluster every R epochs after the warm-up (INFERRED, spec ssl.md §4.5); "
                                       "synthetic-lt demo: 4")
    kmeans_iters: int = arg(100, "max Lloyd iterations (INFERRED, spec ssl.md §4.4 step 5)")
    kmeans_restarts: int = arg(3, "k-means restarts, lowest inertia kept (INFERRED, spec ssl.md §4.4 step 5)")
    kmeans_tol: float = arg(0.001, "stop when this fraction of assignments changes (INFERRED, spec ssl.md §4.4)")
    oracle_labels: bool = arg(False, "diagnostic upper bound: true labels replace k-means; never a reported "
                                     "TASE-R number (spec ssl.md §4.8)")
    # evaluation (SDCLR probe, D§5.1)
    probe: str = arg("both", "SDCLR linear probe(s) after training (D§5.1; ssl.md §4.6)",
                     choices=["both", "full", "few-shot", "none"])
    probe_epochs: Optional[int] = arg(None, "override probe epochs (default D§5.1: 30 full / 100 few-shot); "
                                            "for quick runs")
    probe_aug: str = arg("crop", "probe train augmentation: crop = RandomCrop+flip (D§5.1) or none (quick runs); "
                                   "synthetic-lt demo: none",
                         choices=["crop", "none"])
    # machinery
    seed: int = arg(10, "training seed (SDCLR CIFAR scripts; ssl.md §1.4)")
    device: str = arg("auto", "auto | cpu | cuda (common.setup_device)")
    amp: str = arg("auto", "autocast dtype: auto = bf16 if supported on CUDA, off on CPU (ssl.md §0.5)",
                   choices=["auto", "bf16", "fp16", "off"])
    compile: bool = arg(False, "torch.compile the model (ssl.md §0.5; off on CPU)")
    workers: int = arg(8, "DataLoader workers for list datasets (data.py)")
    out_dir: str = arg("runs", "parent of the run directory")
    resume: Optional[str] = arg(None, "checkpoint path, or 'auto' = newest run of this method and dataset")
    log_every: int = arg(20, "progress line every N iterations")
    benchmark: bool = arg(False, "time training steps (images/s) on random data and exit")
    benchmark_steps: int = arg(30, "timed steps of --benchmark")


def resolve_args(argv=None) -> tuple[Args, dict]:
    """Parse the command line; with --dataset synthetic-lt, fill SYNTHETIC_DEMO into every option NOT given there.

    Returns (args, demo) where demo holds the values the demo profile actually set ({} for every other dataset).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = common.parse_args(Args, argv)
    if args.dataset != "synthetic-lt":
        return args, {}
    unset = object()                         # parsing into a namespace of sentinels leaves only given options set
    ns = argparse.Namespace(**{f.name: unset for f in dataclasses.fields(Args)})
    given = {k for k, v in vars(common.make_parser(Args).parse_args(argv, ns)).items() if v is not unset}
    demo = {k: v for k, v in SYNTHETIC_DEMO.items() if k not in given}
    return dataclasses.replace(args, **demo), demo


# ----------------------------------------------------------------------------------------------------------------
# 2. Model: SimCLR backbone + 2-layer projection head (SDCLR code models/utils.py; ssl.md §1.4 "SimCLR")
# ----------------------------------------------------------------------------------------------------------------
class SimCLRNet(nn.Module):
    """Backbone (GAP features) -> Linear(d,d)+BN+ReLU -> Linear(d,128,no bias)+BN (ssl.md §1.4)."""

    def __init__(self, arch: str, image_size: int, proj_dim: int = 128):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size)
        d = self.backbone.out_dim
        self.head = common.projection_mlp(d, d, proj_dim, num_layers=2, bn=True, last_bn=True, bias_last=False)

    def forward(self, x):
        return self.head(self.backbone(x))


# ----------------------------------------------------------------------------------------------------------------
# 3. Losses and pieces as pure functions
# ----------------------------------------------------------------------------------------------------------------
def nt_xent(z1, z2, temperature, weight=None, reduction: str = "mean"):
    """NT-Xent with a row-wise temperature and a per-anchor weight: eqs. S1, T5, T6 (ssl.md §0.4, §4.3).

    z1, z2: (B, D) embeddings of the two views (normalised inside, in fp32). temperature: a float, or (B,) one value
    per image (both views of image i use it, T5), or (2B,) per anchor. Row j of the similarity matrix is divided by
    tau_j, for its positive and all its negatives. weight: None or (B,) / (2B,) per-anchor weights (T6).
    Returns mean_j w_j * l_j (reduction="mean") or the (2B,) per-anchor losses ("none").
    This is common.nt_xent (shared with fassl.py), re-exported so the TASE-R loss can be imported from here.
    """
    return common.nt_xent(z1, z2, temperature, weight=weight, reduction=reduction)


def contrastive_log_probs(z1, z2, temperature):
    """Row-wise log-probabilities of eq. S1 / T5: log_softmax_k(a_j . a_k / tau_j), k != j, as a (2B, 2B) fp32 matrix.

    Used for the per-epoch sharpness diagnostic (mean row entropy); -log p[j, p(j)] is exactly nt_xent's l_j.
    """
    a = F.normalize(torch.cat([z1, z2]).float(), dim=-1)                      # N1: normalise in fp32
    n = a.shape[0]
    tau = torch.as_tensor(temperature, dtype=torch.float32, device=a.device)
    if tau.ndim == 0:
        tau = tau.expand(n)
    elif tau.shape[0] == n // 2:
        tau = tau.repeat(2)                                                     # both views share tau_i (T5)
    logits = (a @ a.T) / tau[:, None]                                           # divide rows, not columns (§4.9)
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=a.device), float("-inf"))   # N3
    return F.log_softmax(logits, dim=1)


def ts_temperature(epoch: int, tau_min: float = 0.1, tau_max: float = 1.0, period: int = 200) -> float:
    """Eq. TS1 (Kukleva et al., TS code): tau(e) = tau_min + 0.5 (tau_max - tau_min)(1 + cos(pi e / T)), e >= 1.

    Constant within an epoch. With tau_min = 0, tau_max = 1 it is the TS factor m(e) of eq. T3.
    """
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(math.pi * epoch / period))


def sample_temperatures(cluster_sizes, tau_min: float, tau_max: float, modulation: float = 1.0):
    """Per-cluster temperature, eqs. T2-T3 (INFERRED, ssl.md §4.3). Image i gets out[c(i)].

    s_c = (log n_c - min log n) / (max log n - min log n) in [0, 1]  (0.5 if all sizes are equal)      (T2)
    tau_c = tau_min + (tau_max - tau_min) * m(e) * s_c                                                  (T3)
    Larger clusters (likely head classes) get a larger tau; the result lies in [tau_min, tau_max].
    """
    logn = torch.as_tensor(cluster_sizes).float().clamp_min(1.0).log()
    lo, hi = logn.min(), logn.max()
    if float(hi - lo) > 0:
        s = (logn - lo) / (hi - lo)                                             # Eq. (T2)
    else:
        s = torch.full_like(logn, 0.5)
    return tau_min + (tau_max - tau_min) * modulation * s                      # Eq. (T3)


def sample_weights(image_cluster_sizes, power: float):
    """Per-image weights, eq. T4 (INFERRED, ssl.md §4.3): w_i = n_c(i)^(-a) / mean_j n_c(j)^(-a).

    image_cluster_sizes: (B,) size of each image's cluster (the batch's images, so the mean is 1 over the batch,
    §4.9). Computed in fp32 from integer sizes, in log space: w = B * softmax(-a log n).
    """
    logn = torch.as_tensor(image_cluster_sizes).float().clamp_min(1.0).log()
    return logn.shape[0] * torch.softmax(-power * logn, dim=0)                # Eq. (T4)


def _kmeanspp(x, k, generator):
    """k-means++ seeding (D^2 sampling), all draws from `generator`."""
    n = x.shape[0]
    first = torch.randint(n, (1,), device=x.device, generator=generator)
    centroids = [x[first[0]]]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2.clamp_min(0)
        p = p if float(p.sum()) > 0 else torch.ones_like(p)                   # all points identical: uniform
        j = torch.multinomial(p, 1, generator=generator)[0]
        centroids.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    return torch.stack(centroids)


def _assign(x, c):
    d = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]     # squared distances, fp32
    dmin, a = d.min(1)
    return a, dmin.clamp_min(0)


def _reseed_empty(x, assign, dmin, centroids, k):
    """Re-seed every empty cluster with the point farthest from its centroid (taken from a cluster of size > 1)."""
    for _ in range(k):
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel() == 0:
            break
        score = torch.where(counts[assign] > 1, dmin, torch.full_like(dmin, -1.0))
        far = score.topk(min(empty.numel(), x.shape[0])).indices
        e = empty[:far.numel()]
        assign[far] = e
        centroids[e] = x[far]
        dmin[far] = 0.0
    return assign


@torch.no_grad()
def kmeans(x, k: int, iters: int = 100, generator=None, restarts: int = 3, tol: float = 0.001):
    """Eq. T1 (INFERRED, ssl.md §4.4 step 5): Lloyd's k-means in fp32 on x's device.

    k-means++ initialisation, at most `iters` iterations or fewer than `tol` of the assignments changing, empty
    clusters re-seeded with the farthest point (so every n_c >= 1 when N >= k), `restarts` runs with the lowest
    inertia kept. All randomness comes from `generator` (reproducible). Returns (assignments (N,) int64,
    centroids (k, D) fp32).
    """
    x = x.detach().float()
    n = x.shape[0]
    if n < k:
        raise common.UserError(f"k-means needs at least as many images ({n}) as clusters ({k}); pass a smaller "
                               f"--clusters")
    best = None
    for _ in range(max(1, restarts)):
        c = _kmeanspp(x, k, generator)
        assign, dmin = _assign(x, c)
        for _ in range(iters):
            assign = _reseed_empty(x, assign, dmin, c, k)
            counts = torch.bincount(assign, minlength=k).float()
            c = torch.zeros_like(c).index_add_(0, assign, x) / counts[:, None]   # Lloyd update
            new, dmin = _assign(x, c)
            changed = (new != assign).float().mean().item()
            assign = new
            if changed < tol:
                break
        assign = _reseed_empty(x, assign, dmin, c, k)
        inertia = dmin.sum().item()
        if best is None or inertia < best[0]:
            best = (inertia, assign.clone(), c.clone())
    return best[1], best[2]


# ----------------------------------------------------------------------------------------------------------------
# 4. Pseudo-labels and their diagnostics
# ----------------------------------------------------------------------------------------------------------------
def is_recluster_epoch(epoch: int, warmup: int, every: int) -> bool:
    """ssl.md §4.4 step 3: cluster at the start of epoch e when e > W and (e - W - 1) mod R == 0."""
    return epoch > warmup and (epoch - warmup - 1) % max(1, every) == 0


@torch.no_grad()
def pseudo_labels(backbone, ds, device, args, epoch):
    """T1: features of the whole training set (no augmentation, eval BN, no_grad, fp32), L2-normalised, k-means.

    Returns (assignments (N,) on device, sizes (K,) on device). Seed = --seed + e (ssl.md §4.4 step 5).
    """
    k = args.clusters or ds.num_classes
    if args.oracle_labels:
        assign = ds.train.y.to(device)
        return assign, torch.bincount(assign, minlength=ds.num_classes)
    recipe = "test_imagenet"                      # the SimCLR recipes normalise with ImageNet mean/std (§1.4)
    feats, _ = evaluation.extract_features(backbone, ds.train, device, amp_dtype=None, recipe=recipe)
    feats = F.normalize(feats.float(), dim=1)
    gen = torch.Generator(device=feats.device).manual_seed(args.seed + epoch)
    assign, _ = kmeans(feats, k, args.kmeans_iters, gen, restarts=args.kmeans_restarts, tol=args.kmeans_tol)
    return assign, torch.bincount(assign, minlength=k)


def _avg_ranks(v):
    _, inv, cnt = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
    start = torch.cumsum(cnt, 0) - cnt
    return (start.double() + (cnt.double() + 1) / 2)[inv]


def _spearman(a, b):
    ra, rb = _avg_ranks(a), _avg_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum().item() / den) if den > 0 else 0.0


def cluster_diagnostics(assign, sizes, labels, class_counts, tau_img, w_img, groups) -> dict:
    """Per-epoch diagnostics (issue 4, ssl.md §4.4 step 3): sizes, tau / weight spread, purity, NMI, Spearman(cluster
    size, class count) and the mean tau and weight per true-class third (Frequent / Medium / Rare)."""
    y = labels.to(assign.device)
    k, c = sizes.numel(), len(class_counts)
    cont = torch.bincount(assign * c + y, minlength=k * c).view(k, c).double()    # contingency table
    n = cont.sum()
    purity = (cont.max(1).values.sum() / n).item()
    p = cont / n
    pk, pc = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pk[:, None] * pc[None, :])[nz]).log()).sum()
    hk = -(pk[pk > 0] * pk[pk > 0].log()).sum()
    hc = -(pc[pc > 0] * pc[pc > 0].log()).sum()
    nmi = (2 * mi / (hk + hc)).item() if float(hk + hc) > 0 else 1.0
    counts = torch.as_tensor(class_counts, device=assign.device)
    out = {
        "cluster_sizes": sorted(sizes.tolist(), reverse=True),
        "purity": purity, "nmi": nmi,
        "spearman_size_vs_class_count": _spearman(sizes[assign], counts[y]),
        "tau": {"min": tau_img.min().item(), "mean": tau_img.mean().item(), "max": tau_img.max().item()},
        "weight": {"min": w_img.min().item(), "mean": w_img.mean().item(), "max": w_img.max().item()},
        "tau_by_group": {}, "weight_by_group": {},
    }
    for g, ids in groups.items():
        m = torch.isin(y, torch.as_tensor(ids, device=y.device, dtype=torch.long))
        out["tau_by_group"][g] = tau_img[m].mean().item() if bool(m.any()) else None
        out["weight_by_group"][g] = w_img[m].mean().item() if bool(m.any()) else None
    return out


def plot_temperature_weight(sizes, tau_c, w_c, path, title=""):
    """One PNG: per cluster, temperature (T3, left axis) and weight (T4, right axis) against cluster size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = torch.argsort(sizes.cpu())
    s, t, w = sizes.cpu()[order].numpy(), tau_c.cpu()[order].numpy(), w_c.cpu()[order].numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s, t, "o-", color="tab:blue", label="temperature tau_c (T3)")
    ax.set_xscale("log")
    ax.set_xlabel("cluster size n_c (images)")
    ax.set_ylabel("temperature", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(s, w, "s--", color="tab:red", label="weight w_c (T4, dataset mean 1)")
    ax2.set_ylabel("weight", color="tab:red")
    ax.set_title(title or "TASE-R (reconstruction): temperature and weight vs cluster size", fontsize=9)
    fig.legend(loc="lower center", bbox_to_anchor=(0.5, 0.15), fontsize=8)
    fig.tight_layout()
    tmp = pathlib.Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------------
# 5. Training
# ----------------------------------------------------------------------------------------------------------------
def method_name(args) -> str:
    """results.json `method` (D§6) chosen by the switches (ssl.md §4.8)."""
    if args.sample_temperature or args.reweight:
        return "TASE-R (reconstruction)"
    return "simclr+ts" if args.tau_schedule == "cosine" else "simclr"


def variant_name(args) -> str:
    parts = [f"--{f.name.replace('_', '-')}" if getattr(args, f.name) is True else
             f"--no-{f.name.replace('_', '-')}" if getattr(args, f.name) is False else
             f"--{f.name.replace('_', '-')} {getattr(args, f.name)}"
             for f in dataclasses.fields(args)
             if f.name in ("sample_temperature", "reweight", "tau_schedule", "oracle_labels", "clusters",
                           "warmup_epochs", "recluster_every", "tau_min", "tau_max", "reweight_power", "tau")
             and getattr(args, f.name) != f.default]
    return " ".join(parts) or "default"


def global_temperature(epoch: int, args) -> float:
    """tau_g(e): constant --tau, or eq. TS1 with --tau-schedule cosine (ssl.md §4.3, last paragraph)."""
    if args.tau_schedule == "cosine":
        return ts_temperature(epoch, args.ts_tau_min, args.ts_tau_max, args.ts_period)
    return args.tau


def train_step(model, optimizer, scaler, x, tau, w, recipe, gen, device, amp_dtype, image_size):
    """One SimCLR step: two independent augmentations, one concatenated forward, loss T5-T6, SGD step."""
    x1 = data.augment(x, recipe, generator=gen, image_size=image_size)
    x2 = data.augment(x, recipe, generator=gen, image_size=image_size)
    xx = torch.cat([x1, x2])
    if device.type == "cuda":
        xx = xx.contiguous(memory_format=torch.channels_last)
    with common.autocast(device, amp_dtype):
        z = model(xx)
    z1, z2 = z.float().chunk(2)
    loss = nt_xent(z1, z2, tau, weight=w)                                      # Eqs. (T5), (T6)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), z1.detach(), z2.detach()


def run_benchmark(args, model, optimizer, scaler, device, amp_dtype, recipe, ds):
    """Images/s of a full TASE-R training step (augmentation, forward, per-sample tau and weight, backward, step)."""
    b, s = args.batch_size, ds.image_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, device=device, generator=g)
    sizes = torch.randint(1, 1000, (b,), device=device, generator=g)
    tau = sample_temperatures(sizes, args.tau_min, args.tau_max).to(device)
    w = sample_weights(sizes, args.reweight_power).to(device)
    model.train()
    for i in range(args.benchmark_steps + 5):
        if i == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss, _, _ = train_step(model, optimizer, scaler, x, tau, w, recipe, g, device, amp_dtype, s)
    loss.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    print(f"benchmark: {args.arch} batch {b} ({2 * b} views) at {s}px on {device}, amp {amp}, compile {args.compile}: "
          f"{args.benchmark_steps * b / dt:.0f} images/s ({dt / args.benchmark_steps * 1000:.1f} ms/step)")


def check_args(args) -> None:
    """One clear line for settings that cannot work (common.UserError)."""
    if not 0 < args.tau_min <= args.tau_max:
        raise common.UserError(f"need 0 < --tau-min <= --tau-max (got {args.tau_min}, {args.tau_max})")
    if args.tau <= 0 or args.ts_tau_min <= 0 or args.ts_tau_max < args.ts_tau_min or args.ts_period < 1:
        raise common.UserError("need --tau > 0, 0 < --ts-tau-min <= --ts-tau-max and --ts-period >= 1")
    if args.clusters is not None and args.clusters < 2:
        raise common.UserError(f"--clusters {args.clusters}: k-means needs at least 2 clusters")
    if args.recluster_every < 1 or args.warmup_epochs < 0 or args.kmeans_iters < 1 or args.kmeans_restarts < 1:
        raise common.UserError("need --recluster-every >= 1, --warmup-epochs >= 0, --kmeans-iters >= 1 and "
                               "--kmeans-restarts >= 1")
    if args.batch_size < 2 or args.epochs < 1:
        raise common.UserError("need --batch-size >= 2 (NT-Xent needs negatives) and --epochs >= 1")


def main(args, demo=None):
    """Train and evaluate. `demo`: the SYNTHETIC_DEMO values resolve_args() set (recorded in results.json)."""
    check_args(args)
    t_start = time.time()
    if demo:
        print("synthetic-lt demo profile in use (not a paper setting; flags given on the command line win): "
              + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in demo.items()))
    device, amp_dtype = common.setup_device(args.device, args.amp)
    amp_name = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    common.seed_everything(args.seed)
    kw = dict(synthetic_n_max=args.synthetic_n_max, synthetic_n_test=args.synthetic_n_test) \
        if args.dataset == "synthetic-lt" else {}
    ds = data.load_dataset(args.dataset, data_dir=args.data_dir, imb_ratio=args.imb_ratio, protocol=args.protocol,
                           split=args.split, split_file=args.split_file, seed=args.data_seed,
                           num_classes=args.num_classes, sdclr_split_dir=args.sdclr_split_dir, **kw)
    recipe = args.augment if args.augment != "auto" else ("simclr_cifar" if ds.image_size <= 64 else "mocov2_imagenet")
    method = method_name(args)
    tase_active = args.sample_temperature or args.reweight
    k = args.clusters or ds.num_classes

    model = SimCLRNet(args.arch, ds.image_size, args.proj_dim)
    model = common.prepare_model(model, device, compile=args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = common.make_scaler(amp_dtype)
    if args.benchmark:
        return run_benchmark(args, model, optimizer, scaler, device, amp_dtype, recipe, ds)

    loader = data.make_loader(ds.train, args.batch_size, device, shuffle=True, drop_last=True, sampler="random",
                              seed=args.seed, workers=args.workers, image_size=ds.image_size)
    iters = len(loader)
    if iters == 0:
        raise common.UserError(f"--batch-size {args.batch_size} exceeds the {len(ds.train)} training images; "
                               f"pass a smaller --batch-size")
    if tase_active and len(ds.train) < k:
        raise common.UserError(f"--clusters {k} exceeds the {len(ds.train)} training images; pass fewer --clusters")

    label = {"simclr": "tase-simclr", "simclr+ts": "tase-simclr-ts"}.get(method, "tase-r")
    run_dir = common.make_run_dir(label, ds.name, args.out_dir, args.resume)
    ckpt_path = run_dir / "checkpoint.pt"
    start_epoch, assign, sizes, n_recluster, wall_before = 0, None, None, 0, 0.0
    if args.resume is not None and (args.resume != "auto" or ckpt_path.exists()):
        src = pathlib.Path(args.resume) if args.resume != "auto" and pathlib.Path(args.resume).is_file() else ckpt_path
        state = common.load_checkpoint(src, map_location="cpu")
        common.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        common.set_rng_state(state["rng"])
        start_epoch, n_recluster, wall_before = state["epoch"], state["num_reclusters"], state["wall_time_s"]
        if state["assignments"].numel():
            assign, sizes = state["assignments"].to(device), state["cluster_sizes"].to(device)
        print(f"resumed from {src} at epoch {start_epoch}")
    common.write_config(run_dir, args, ds.info())
    print(data.describe(ds))
    print(f"{method} ({variant_name(args)}): run dir {run_dir}, device {device}, amp {amp_name}")

    groups = evaluation.group_masks(ds.class_counts, ds.class_rank)["thirds"]
    labels = ds.train.y.to(device)
    gen = torch.Generator(device=device)
    progress = common.Progress(args.epochs * iters, args.batch_size, every=args.log_every, prefix=label)
    total_steps, warmup_steps = args.epochs * iters, args.lr_warmup_epochs * iters
    png = run_dir / "tase_temperature_weight.png"
    rec = {}

    for epoch in range(start_epoch + 1, args.epochs + 1):
        t_epoch = time.time()
        reclustered = False
        if tase_active and is_recluster_epoch(epoch, args.warmup_epochs, args.recluster_every):
            t_k = time.time()
            assign, sizes = pseudo_labels(common.unwrap(model).backbone, ds, device, args, epoch)   # Eq. (T1)
            n_recluster, reclustered = n_recluster + 1, True
            print(f"epoch {epoch}: re-clustered into {sizes.numel()} clusters in {time.time() - t_k:.1f}s; "
                  f"sizes {sorted(sizes.tolist(), reverse=True)}")
        tau_g = global_temperature(epoch, args)
        # per-image temperature (T2-T3) and cluster size (for T4), looked up by dataset index in the loop
        tau_img = tau_c = size_img = None
        if assign is not None:
            m = ts_temperature(epoch, 0.0, 1.0, args.ts_period) if args.tau_schedule == "cosine" else 1.0
            tau_c = sample_temperatures(sizes, args.tau_min, args.tau_max, m).to(device)
            tau_img = tau_c[assign] if args.sample_temperature else None
            size_img = sizes[assign]
        model.train()
        loader.set_epoch(epoch)
        gen.manual_seed(args.seed * 100003 + epoch)                # augmentation draws: a function of (seed, epoch)
        progress.set_epoch(epoch, args.epochs)
        loss_sum = torch.zeros((), device=device)
        for it, (x, _, idx) in enumerate(loader):
            step = (epoch - 1) * iters + it
            lr = common.cosine_lr(step, total_steps, warmup_steps, args.lr, args.final_lr)
            common.set_lr(optimizer, lr)
            tau = tau_img[idx] if tau_img is not None else tau_g                                    # Eq. (T5)
            w = sample_weights(size_img[idx], args.reweight_power) if (assign is not None and args.reweight) \
                else None                                                                           # Eq. (T4)
            loss, z1, z2 = train_step(model, optimizer, scaler, x, tau, w, recipe, gen, device, amp_dtype,
                                      ds.image_size)
            loss_sum += loss
            progress.step(step, loss=loss, lr=lr)
        # ---- once per epoch: host sync, diagnostics, checkpoint
        logp = contrastive_log_probs(z1, z2, tau)                 # sharpness of the last batch's rows (T5)
        row_entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(1).mean().item()
        rec = {"epoch": epoch, "loss": (loss_sum / iters).item(), "lr": lr, "tau_global": tau_g,
               "row_entropy_last_batch": row_entropy, "reclustered": reclustered, "num_reclusters": n_recluster,
               "epoch_time_s": time.time() - t_epoch,
               "images_per_s": iters * args.batch_size / max(time.time() - t_epoch, 1e-9)}
        if assign is not None:
            t_used = tau_img if tau_img is not None else torch.full_like(tau_c[assign], tau_g)
            w_img = sample_weights(size_img, args.reweight_power) if args.reweight else torch.ones_like(t_used)
            rec["pseudo_labels"] = cluster_diagnostics(assign, sizes, labels, ds.class_counts, t_used, w_img, groups)
            if reclustered:
                w_c = sizes.float().clamp_min(1) ** (-args.reweight_power)
                w_c = w_c / w_c[assign].mean()                                  # dataset mean 1, for display
                plot_temperature_weight(sizes, tau_c, w_c, png,
                                        f"TASE-R (reconstruction), epoch {epoch}: K={sizes.numel()}, "
                                        f"purity {rec['pseudo_labels']['purity']:.2f}")
        common.append_metrics(run_dir, rec)
        common.save_checkpoint(ckpt_path, {
            "method": "tase", "results_method": method, "arch": args.arch, "image_size": ds.image_size,
            "args": dataclasses.asdict(args), "epoch": epoch, "stage": "",
            "backbone": common.unwrap(model).backbone.state_dict(),
            "model": common.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": common.rng_state(), "num_reclusters": n_recluster,
            "wall_time_s": wall_before + time.time() - t_start,
            "assignments": assign.cpu() if assign is not None else torch.zeros(0, dtype=torch.long),
            "cluster_sizes": sizes.cpu() if sizes is not None else torch.zeros(0, dtype=torch.long)})

    # ----------------------------------------------------------------------------------------------------------
    # 6. Evaluation: SDCLR linear probe, full-shot and 1% few-shot (D§5.1; ssl.md §4.6)
    # ----------------------------------------------------------------------------------------------------------
    extra = {"num_reclusters": n_recluster, "augment": recipe, "clusters": k if tase_active else None,
             "reconstruction_note": "TASE-R is reconstructed from the abstract of paper 001; not the authors' method",
             "demo_profile": dict(demo) if demo else None}
    variant = ("synthetic-lt demo profile; " if demo else "") + variant_name(args)
    if assign is not None:
        extra["final_cluster_sizes"] = sorted(sizes.tolist(), reverse=True)
        last = rec.get("pseudo_labels", {})
        extra.update({key: last.get(key) for key in ("purity", "nmi", "spearman_size_vs_class_count",
                                                      "tau_by_group", "weight_by_group")})
    modes = {"both": ["full", "few-shot"], "full": ["full"], "few-shot": ["few-shot"], "none": []}[args.probe]
    backbone = common.unwrap(model).backbone
    written = []
    for mode in modes:
        if mode == "few-shot" and ds.fewshot is None:
            print("no few-shot split for this dataset; skipping the few-shot probe")
            continue
        probe = evaluation.linear_probe(backbone, ds, device, amp_dtype, mode=mode, aug=args.probe_aug,
                                        epochs=args.probe_epochs, batch_size=128 if ds.image_size <= 64 else 512,
                                        seed=args.seed)
        res = evaluation.results_skeleton(
            method, variant, method != "TASE-R (reconstruction)" and not demo, ds, probe["protocol"], "backbone",
            args.arch, {"pretrain": args.epochs, "probe": probe.get("selection", {}).get("last_epoch")},
            args.seed, amp_name, wall_before + time.time() - t_start)
        res.update({key: probe[key] for key in ("selection", "at_selected", "at_last") if key in probe})
        res.setdefault("extra", {}).update(extra, probe_variant=probe.get("variant"), history=probe.get("history"))
        out = run_dir if not written else run_dir / mode
        out.mkdir(parents=True, exist_ok=True)
        evaluation.write_results(out, res)
        written.append(out / "results.json")
        print(f"{method} [{mode}] | All | Rare | Medium | Frequent | Std |")
        print(evaluation.paper_row(res["at_selected"], style="ssl"))
    if written:
        print("results: " + ", ".join(str(p) for p in written))
    return run_dir


if __name__ == "__main__":
    _args, _demo = resolve_args()
    with common.user_errors():
        main(_args, _demo)
