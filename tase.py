"""TASE-R (reconstruction): a RECONSTRUCTION of TASE from its abstract, NOT the authors' method.

Paper 001: Xiao et al., "Dataset Awareness is not Enough: Implementing Sample-level Tail
Encouragement in Long-tailed Self-supervised Learning" (TASE, arXiv 2410.22883). Only the abstract
and figure captions exist here: pseudo-labels drive (i) a temperature per sample and (ii) a
re-weighting that adds the "quantity awareness" a temperature lacks. Every formula below is this
project's reading of that (INFERRED, reasons in docs/tase.md); T1-T6 is our numbering. Results say
"TASE-R (reconstruction)": never compare them with the paper.

TASE-R = SimCLR (the SDCLR recipe, as fassl.py with --prune-ratio 0) + a temperature and a weight
per image:
  Eq.  What (all INFERRED)                                                 Here
  T1   k-means pseudo-label c(i), cluster size n_c; after W epochs, then   pseudo_labels, kmeans
       every R epochs
  T2   s_i = log n_c(i) normalised to [0, 1]                               sample_temperatures
  T3   tau_i = tau_min + (tau_max - tau_min) m(e) s_i: large cluster,      sample_temperatures
       large tau
  T4   w_i = n_c(i)^(-a), mean 1 over the batch                            sample_weights
  T5   SimCLR's NT-Xent with row j divided by the tau of its image         common.nt_xent
  T6   mean over the 2B anchors of w_j l_j (both views share tau_i, w_i)   train_step
  TS1  tau(e) = tau_min + (tau_max - tau_min)(1 + cos(pi e / T)) / 2       ts_temperature
       (Kukleva et al., ICLR 2023); with 0 and 1 it is the m(e) of T3
       under --tau-schedule cosine

    python tase.py --dataset cifar10-lt       # TASE-R, then full-shot and 1% few-shot SDCLR probes
    python tase.py --dataset synthetic-lt     # CPU demo (DEFAULTS below), not a paper setting
"""
from __future__ import annotations

import functools
import math
import pathlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import eval as evaluation
import harness
from harness import arg

VIEWS = ("simclr_cifar", "mocov2_imagenet")  # docs/data.md: the first up to 64 px, the second above
PLOT = "tase_temperature_weight.png"
RUN_NAMES = {"TASE-R (reconstruction)": "tase-r", "simclr": "tase-simclr",
             "simclr+ts": "tase-simclr-ts"}


@dataclass
class Args(harness.RunArgs):
    """TASE-R (reconstruction): a RECONSTRUCTION of TASE (paper 001) from its abstract, NOT the
    authors' method: SimCLR whose k-means pseudo-labels set a temperature (Eqs. T2-T3) and a weight
    (Eq. T4) per image. Baselines: --no-sample-temperature --no-reweight = SimCLR; add
    --tau-schedule cosine for SimCLR+TS. A flag left unset takes its dataset's value (below);
    INFERRED choices, with reasons: docs/tase.md."""
    split: int = arg(1, "SDCLR split k of CIFAR-LT (docs/data.md)", choices=[1, 2, 3, 4, 5])
    split_file: str | None = arg(None, "an SDCLR D_i .npy index file (docs/data.md, SDCLR index "
                                 "files)")
    sdclr_split_dir: str | None = arg(None, "folder with SDCLR's split files (docs/data.md)")
    data_seed: int = arg(0, "seed of a generated long-tailed subset (docs/data.md)")
    num_classes: int = arg(10, "synthetic-lt only: classes", check=">=1")
    synthetic_n_test: int = arg(100, "synthetic-lt only: test images per class", check=">=1")
    # SimCLR (the recipe of SDCLR's released scripts), SimCLR+TS (Eq. TS1), and TASE-R's global tau
    arch: str | None = arg(None, "backbone; CIFAR stem up to 64 px", choices=list(common.ARCHS))
    proj_dim: int = arg(128, "output of the 2-layer projection head", check=">=1")
    epochs: int | None = arg(None, "pre-training epochs", check=">=0")
    batch_size: int | None = arg(None, "images per batch B (2B views); NT-Xent needs B >= 2",
                                 check="batch")
    lr: float = arg(0.5, "base learning rate of the per-iteration cosine", check=">0")
    final_lr: float = arg(1e-6, "learning rate at the end of the cosine", check=">=0")
    lr_warmup_epochs: int | None = arg(None, "linear learning-rate warm-up epochs", check=">=0")
    momentum: float = arg(0.9, "SGD momentum", check="[0,1)")
    weight_decay: float = arg(1e-4, "weight decay on every parameter", check=">=0")
    augment: str = arg("auto", "views (docs/data.md); auto: simclr_cifar up to 64 px",
                       choices=["auto", *VIEWS])
    tau: float = arg(0.2, "constant temperature (SimCLR; TASE-R until its first clustering)",
                     check=">0")
    tau_schedule: str = arg("constant", "cosine = Eq. TS1 (SimCLR+TS)",
                            choices=["constant", "cosine"])
    ts_tau_min: float = arg(0.1, "tau_min of Eq. TS1 (TS authors' commands)", check=">0")
    ts_tau_max: float = arg(1.0, "tau_max of Eq. TS1 (TS authors' commands)", check=">0")
    ts_period: int = arg(200, "half-period T of Eq. TS1, in epochs", check=">=1")
    sample_temperature: bool = arg(True, "a tau per image from its cluster size, Eqs. T2-T3 "
                                   "(INFERRED)")
    reweight: bool = arg(True, "a weight n_c^(-a) per image, Eq. T4 (INFERRED)")
    tau_min: float = arg(0.1, "temperature of the smallest cluster, Eq. T3 (INFERRED)", check=">0")
    tau_max: float = arg(0.5, "temperature of the largest cluster, Eq. T3 (INFERRED)", check=">0")
    reweight_power: float = arg(0.5, "exponent a of Eq. T4 (INFERRED)", check=">=0")
    clusters: int | None = arg(None, "k-means clusters K >= 2; None = the classes (INFERRED)",
                               check=">=1")
    cluster_warmup_epochs: int | None = arg(None, "epochs W before clustering, Eq. T1 (INFERRED)",
                                            check=">=0")
    recluster_every: int | None = arg(None, "cluster again every R epochs, Eq. T1 (INFERRED)",
                                      check=">=1")
    kmeans_iters: int = arg(100, "at most this many Lloyd iterations (INFERRED)", check=">=1")
    kmeans_restarts: int = arg(3, "k-means runs; the lowest inertia is kept (INFERRED)",
                               check=">=1")
    kmeans_tol: float = arg(0.001, "stop below this share of changed assignments (INFERRED)",
                            check="[0,1]")
    oracle_labels: bool = arg(False, "diagnostic upper bound: true labels replace k-means (never "
                              "TASE-R)")
    knn_every: int | None = arg(None, "kNN monitor every N epochs (None: E/20; 0: off)",
                                check=">=0", runtime=True)
    probe: list[str] = arg(["full", "few-shot"], "final linear probes; the flag alone = no probe",
                           choices=["full", "few-shot"], runtime=True)
    probe_epochs: int | None = arg(None, "probe epochs; None = docs/evaluation.md's table",
                                   check=">=1")
    # "none" is a value of --probe-aug, not "unset"
    probe_aug: str = arg(None, "crop + flip (SDCLR probe) or none (cached features, fast)",
                         choices=["crop", "none"])
    sync_bn: bool = arg(True, "SyncBatchNorm across the processes of a torchrun run (CUDA only); "
                        "the default is the method's official code's: SimCLR's global BN "
                        "(INFERRED)", runtime=True)


# ---- Model: SimCLR's network ---------------------------------------------------------------------

class SimCLRNet(nn.Module):
    """Backbone (GAP features) -> Linear(d,d)+BN+ReLU -> Linear(d,128,no bias)+BN: SimCLR's head
    in SDCLR's code."""

    def __init__(self, arch: str, image_size: int, proj_dim: int = 128):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size)
        d = self.backbone.out_dim
        self.head = common.projection_mlp(d, d, proj_dim, 2, bn=True, last_bn=True, bias_last=False)

    def forward(self, x):
        return self.head(self.backbone(x))


# ---- The equations as pure functions: temperatures, weights, pseudo-labels ----------------------

def ts_temperature(epoch: int, tau_min: float = 0.1, tau_max: float = 1.0,
                   period: int = 200) -> float:
    """Eq. TS1: tau(e) = tau_min + (tau_max - tau_min)(1 + cos(pi e / T)) / 2 for the e-th epoch,
    e = 1, 2, ... as the TS authors count (the loops pass their 0-based epoch + 1), fixed within an
    epoch. With tau_min = 0, tau_max = 1 it is the factor m(e) of Eq. T3."""
    return tau_min + 0.5 * (tau_max - tau_min) * (1.0 + math.cos(math.pi * epoch / period))


def global_temperature(epoch: int, args: Args) -> float:
    """tau_g of every anchor without a sample temperature in the 0-based `epoch`: the constant
    --tau, or Eq. TS1."""
    if args.tau_schedule == "cosine":
        return ts_temperature(epoch + 1, args.ts_tau_min, args.ts_tau_max, args.ts_period)
    return args.tau


def sample_temperatures(cluster_sizes, tau_min: float, tau_max: float, modulation: float = 1.0):
    """Temperature per cluster, Eqs. T2-T3 (INFERRED), in [tau_min, tau_max]; image i gets
    out[c(i)]. s_c is log n_c scaled to [0, 1] (0.5 if all are equal): larger clusters, likely head
    classes, get a larger tau. No host sync."""
    logn = cluster_sizes.float().clamp_min(1.0).log()
    lo = logn.min()
    span = logn.max() - lo
    s = torch.where(span > 0, (logn - lo) / span.clamp_min(1e-12), 0.5)  # Eq. (T2)
    return tau_min + (tau_max - tau_min) * modulation * s  # Eq. (T3)


def sample_weights(image_cluster_sizes, power: float):
    """Weight per image, Eq. T4 (INFERRED): w_i = n_c(i)^(-a) / mean_j n_c(j)^(-a) over the B images
    given (one batch: the loss scale stays fixed). In log space from integer sizes, fp32:
    B softmax(-a log n). No host sync."""
    logn = image_cluster_sizes.float().clamp_min(1.0).log()
    return logn.shape[0] * torch.softmax(-power * logn, dim=0)  # Eq. (T4)


def kmeans_plus_plus(x, k, generator):
    """k-means++ seeding (D^2 sampling), every draw from `generator`."""
    first = torch.randint(x.shape[0], (1,), device=x.device, generator=generator)[0]
    centroids = [x[first]]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        odds = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
        j = torch.multinomial(odds, 1, generator=generator)[0]
        centroids.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    return torch.stack(centroids)


def reseed_empty(x, assign, dmin, centroids, k):
    """Re-seed every empty cluster with the point farthest from its centroid (taken from a cluster
    of size > 1)."""
    for _ in range(k):
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel() == 0:
            break
        movable = torch.where(counts[assign] > 1, dmin, -1.0)
        far = movable.topk(min(empty.numel(), x.shape[0])).indices
        assign[far] = empty[:len(far)]
        centroids[empty[:len(far)]] = x[far]
        dmin[far] = 0.0
    return assign


@torch.no_grad()
def kmeans(x, k: int, iters: int = 100, generator=None, restarts: int = 3, tol: float = 0.001):
    """Eq. T1 (INFERRED): Lloyd's k-means, fp32, k-means++ seeding, at most `iters` iterations or
    until less than `tol` of the assignments change, empty clusters re-seeded (n_c >= 1), the best
    of `restarts` runs (lowest inertia); reproducible from `generator`. Returns (assignments (N,),
    centroids (k, D))."""
    x = x.detach().float()
    if x.shape[0] < k:
        raise common.UserError(f"k-means: {x.shape[0]} images for {k} clusters; pass a smaller "
                               "--clusters")

    def nearest(c):
        """The nearest centroid of every point and the squared distance to it, fp32."""
        d2 = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]
        dmin, a = d2.min(1)
        return a, dmin.clamp_min(0)

    best = None
    for _ in range(max(1, restarts)):
        c = kmeans_plus_plus(x, k, generator)
        assign, dmin = nearest(c)
        for _ in range(iters):
            assign = reseed_empty(x, assign, dmin, c, k)
            sizes = torch.bincount(assign, minlength=k)[:, None]
            c = torch.zeros_like(c).index_add_(0, assign, x) / sizes
            new, dmin = nearest(c)
            changed = (new != assign).float().mean().item()
            assign = new
            if changed < tol:
                break
        assign = reseed_empty(x, assign, dmin, c, k)
        inertia = dmin.sum().item()
        if best is None or inertia < best[0]:
            best = (inertia, assign.clone(), c.clone())
    return best[1], best[2]


def is_recluster_epoch(epoch: int, warmup: int, every: int) -> bool:
    """Eq. T1 schedule: cluster before the 0-based `epoch` once W epochs are done, then every R."""
    return epoch >= warmup and (epoch - warmup) % max(1, every) == 0


@torch.no_grad()
def pseudo_labels(backbone, ds, device, args: Args, epoch: int):
    """Eq. T1: k-means on L2-normalised features of the whole training set (no augmentation, eval
    BN, fp32, ImageNet statistics like SimCLR's views) before the 0-based `epoch`. Returns
    (assignments (N,), sizes (K,)); --oracle-labels: the true labels."""
    if args.oracle_labels:  # the diagnostic upper bound
        sizes = torch.bincount(ds.train.y, minlength=ds.num_classes)
        return ds.train.y.to(device), sizes.to(device)
    k = args.clusters or ds.num_classes
    feats = evaluation.extract_features(backbone, ds.train, device, recipe="test_imagenet")[0]
    seed = common.epoch_seed(args.seed, epoch, stream=1, per_process=False)
    gen = torch.Generator(device=feats.device).manual_seed(seed)
    assign, _ = kmeans(F.normalize(feats, dim=1), k, args.kmeans_iters, gen, args.kmeans_restarts,
                       args.kmeans_tol)
    if dist.is_initialized():  # process 0's clusters everywhere, to the last GPU bit
        dist.broadcast(assign, 0)
    return assign, torch.bincount(assign, minlength=k)


# ---- The training step: Eqs. T4-T6 on the global batch ------------------------------------------

def batch_temperature_weight(idx, assign, sizes, tau_c, epoch: int, args: Args):
    """tau (Eq. T5) and w (Eq. T4, mean 1 over them) of the global batch, every process's images in
    order; before the first clustering: the global temperature and no weight."""
    if assign is None:
        return global_temperature(epoch, args), None
    c = assign[common.gather(idx)]  # c(i) of the global batch
    tau = tau_c[c] if args.sample_temperature else global_temperature(epoch, args)
    w = sample_weights(sizes[c], args.reweight_power) if args.reweight else None
    return tau, w


def two_views(x, recipe: str, gen, image_size: int, channels_last: bool) -> list:
    """SimCLR's two views of a uint8 batch (a recipe of docs/data.md)."""
    return [data.augment(x, recipe, gen, image_size, channels_last) for _ in range(2)]


def train_step(net, optimizer, scaler, views, tau, w, amp_dtype):
    """One SimCLR step on two_views' views: one forward, loss T5-T6 over the global batch
    (common.gather), SGD. tau, w: a float / None or one per image of the global batch. Returns the
    detached loss and the global batch's embeddings (no host sync)."""
    with common.autocast(views[0].device, amp_dtype):
        z = net(torch.cat(views)).float()
    z1, z2 = (common.gather(part) for part in z.chunk(2))  # the global batch, with gradient
    loss = common.nt_xent(z1, z2, tau, weight=w)  # Eqs. (T5), (T6)
    common.optimizer_step(loss, optimizer, scaler)
    return loss.detach(), z1.detach(), z2.detach()


def setup(args: Args, image_size: int, device, amp_dtype):
    """SimCLRNet (and its compiled / DDP twin), SGD, the gradient scaler and the views' recipe."""
    model = SimCLRNet(args.arch, image_size, args.proj_dim)
    net = common.prepare_model(model, device, args.channels_last, args.compile, ddp=True,
                               sync_bn=args.sync_bn)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, args.momentum,
                                weight_decay=args.weight_decay)
    recipe = args.augment
    if recipe == "auto":
        recipe = VIEWS[1] if image_size > 64 else VIEWS[0]
    return model, net, optimizer, common.make_scaler(amp_dtype), recipe


def method_name(args: Args) -> str:
    """results.json `method`: TASE-R, or the baseline its switches select (docs/tase.md)."""
    if args.sample_temperature or args.reweight:
        return "TASE-R (reconstruction)"
    return "simclr+ts" if args.tau_schedule == "cosine" else "simclr"


def check_settings(args: Args) -> None:
    """What the per-flag checks cannot see, in one line (common.UserError)."""
    needs = {"--tau-min <= --tau-max": args.tau_min <= args.tau_max,
             "--ts-tau-min <= --ts-tau-max": args.ts_tau_min <= args.ts_tau_max,
             "--clusters >= 2": args.clusters is None or args.clusters >= 2,
             "--batch-size >= 2 (NT-Xent needs negatives)": args.batch_size >= 2}
    for need, ok in needs.items():
        if not ok:
            raise common.UserError(f"these settings cannot work: need {need}")


# ---- The loop: SimCLR epochs, pseudo-labels from epoch W on, then the probes --------------------

def train(args: Args, filled: dict | None = None, ds: data.LTDataset | None = None) -> pathlib.Path:
    """Full run: SimCLR epochs, pseudo-labels after W epochs (TASE-R), then the final SDCLR probes
    (results.json; the few-shot one in few-shot/results.json). Returns the run directory."""
    run = harness.Run(lambda a: RUN_NAMES[method_name(a)], args, filled or {}, DEFAULTS, None,
                      PAPER_ALL, "groups_thirds.group_mean", label=method_name)
    args = run.args
    device = run.device
    amp_dtype = run.amp_dtype
    check_settings(args)
    if ds is None:
        ds = data.load_dataset(args.dataset, args.data_dir, args.imb_ratio, args.protocol,
                               args.split, args.split_file, args.data_seed, args.num_classes,
                               n_max=args.n_max,
                               synthetic_n_test=args.synthetic_n_test,
                               sdclr_split_dir=args.sdclr_split_dir)
    tase_on = args.sample_temperature or args.reweight
    k = args.clusters or ds.num_classes
    if tase_on and len(ds.train) < k:
        raise common.UserError(f"--clusters {k} exceeds the {len(ds.train)} training images; pass "
                               "fewer")
    run_dir = run.start(ds, f"{run.label} | {args.arch} | batch {args.batch_size} | "
                            f"{args.epochs} epochs")
    model, net, optimizer, scaler, recipe = setup(args, ds.image_size, device, amp_dtype)
    loader = data.make_loader(ds.train, args.batch_size, device, sampler="random", seed=args.seed,
                              workers=args.workers, image_size=ds.image_size, shard=True)
    start, saved = run.restore("simclr", {"model": model, "optimizer": optimizer, "scaler": scaler})
    assign = None  # c(i) of Eq. T1, one per training image
    sizes = None  # n_c
    n_recluster = 0
    diag = None
    knn = []
    if saved is not None:
        n_recluster = saved["num_reclusters"]
        diag = saved["pseudo_labels"]
        knn = saved["knn"]
        if saved["clusters"] is not None:
            assign, sizes = (t.to(device) for t in saved["clusters"])
    iters = len(loader)
    total = args.epochs * iters
    warmup = args.lr_warmup_epochs * iters
    progress = run.progress(total, args.batch_size)
    gen = torch.Generator(device=device)
    for epoch in range(start, args.epochs):
        t0 = time.time()
        reclustered = tase_on and is_recluster_epoch(epoch, args.cluster_warmup_epochs,
                                                     args.recluster_every)
        if reclustered:
            assign, sizes = pseudo_labels(model.backbone, ds, device, args, epoch)  # Eq. (T1)
            n_recluster += 1
            print(f"[{run.method}] epoch {epoch + 1}: n_c {sorted(sizes.tolist(), reverse=True)}",
                  flush=True)
        m = 1.0
        if args.tau_schedule == "cosine":
            m = ts_temperature(epoch + 1, 0.0, 1.0, args.ts_period)
        tau_c = None
        if assign is not None:
            tau_c = sample_temperatures(sizes, args.tau_min, args.tau_max, m)  # Eqs. (T2)-(T3)
        net.train()
        loader.set_epoch(epoch)
        gen.manual_seed(common.epoch_seed(args.seed, epoch))  # views: a function of the epoch
        progress.set_epoch(epoch, args.epochs)
        loss_sum = torch.zeros((), device=device)
        for it, (x, _, idx) in enumerate(loader):
            step = epoch * iters + it
            lr = common.cosine_lr(step, total, warmup, args.lr, args.final_lr)
            common.set_lr(optimizer, lr)
            tau, w = batch_temperature_weight(idx, assign, sizes, tau_c, epoch, args)  # T4, T5
            views = two_views(x, recipe, gen, ds.image_size, run.channels_last)
            loss, z1, z2 = train_step(net, optimizer, scaler, views, tau, w, amp_dtype)
            loss_sum += loss
            progress.step(step, loss=loss, lr=lr)
        common.broadcast_buffers(model)  # process 0's BN statistics: the same clusters and kNN
        rec = epoch_diagnostics(epoch, args, ds, assign, sizes, tau_c, z1, z2, tau, run_dir,
                                reclustered)
        diag = rec.get("pseudo_labels", diag)
        seconds = time.time() - t0
        rec.update(lr=lr, num_reclusters=n_recluster, epoch_time_s=seconds,
                   images_per_s=iters * args.batch_size / max(seconds, 1e-9))
        every = args.knn_every if args.knn_every is not None else max(1, args.epochs // 20)
        if every and ((epoch + 1) % every == 0 or epoch + 1 == args.epochs) and ds.val:
            # queries: the validation split, never test
            km = evaluation.knn_monitor(model.backbone, ds.probe or ds.train, ds.val, device,
                                        ds.num_classes, recipe="test_imagenet",
                                        class_counts=ds.class_counts, class_rank=ds.class_rank)
            rec["knn"] = {key: km[key] for key in ("acc_class_mean", "groups_thirds")}
            knn.append({"epoch": epoch + 1, **rec["knn"]})
            print(f"[{run.method}] epoch {epoch + 1}: kNN class-mean acc. "
                  f"{km['acc_class_mean']:.2f}", flush=True)
        clusters = None if assign is None else (assign.cpu(), sizes.cpu())  # c(i), n_c of Eq. T1
        state = {"num_reclusters": n_recluster, "pseudo_labels": diag, "knn": knn,
                 "clusters": clusters}
        run.end_epoch(epoch, loss_sum / iters, rec, state)
    with run.reporting("linear"):
        return report(run, model, ds, recipe, n_recluster, diag, knn, k)


# ---- Evaluation: the SDCLR probes, and the diagnostics of each epoch ---------------------------

def report(run, model, ds, recipe, n_recluster, diag, knn, k) -> pathlib.Path:
    """The final SDCLR probes of the backbone: results.json (the first probe), few-shot/results.json
    (the second) and the final table."""
    args = run.args
    tase_on = args.sample_temperature or args.reweight
    extra = {"num_reclusters": n_recluster, "augment": recipe, "clusters": k if tase_on else None,
             "reconstruction_note": None, "final_cluster_sizes": diag and diag["cluster_sizes"]}
    if tase_on:
        extra["reconstruction_note"] = "TASE-R is reconstructed from paper 001's abstract"
    for key in ("purity", "nmi", "spearman_size_vs_class_count", "tau_by_group",
                "weight_by_group"):
        if diag:
            extra[key] = diag[key]
    probes = evaluation.run_probes(model.backbone, ds, args.probe, run.device, run.amp_dtype,
                                   aug=args.probe_aug, epochs=args.probe_epochs, seed=args.seed)
    results = []
    for mode, probe in probes.items():
        epochs = {"pretrain": args.epochs, "probe": probe["selection"]["last_epoch"]}
        res = run.results(probe["protocol"], "backbone", epochs)
        if mode != "full":  # the paper's numbers are those of the full-shot probe
            res["paper_setting"] = False
            res["paper_value"] = None
        res.update({key: probe[key] for key in ("selection", "at_selected", "at_last")}, knn=knn)
        res["extra"] = {**extra, "probe_variant": probe["variant"], "probe": probe["probe"],
                        "history": probe["history"]}
        results.append((mode, res))
    if not results:
        return run.run_dir
    for mode, res in results[1:]:  # the second probe: <run>/few-shot/results.json
        if common.is_main():
            evaluation.write_results(run.run_dir / mode, {**res, "wall_time_s": run.wall_time()})
            print(f"[{run.method}] results: {run.run_dir / mode / 'results.json'}", flush=True)
    headline = results[0][1]
    headline["extra"]["grouping"] = GROUPING
    rows = [(f"{run.label} ({mode})", res["at_selected"]) for mode, res in results]
    run.finish(headline, headline["extra"]["probe"]["row"], rows)
    if headline["extra"]["probe"]["row"] == "ssl" and common.is_main():
        print(f"[{run.method}] {GROUPING}")
    return run.run_dir


# how the columns group the classes, said wherever TASE-R prints them
GROUPING = ("Rare / Medium / Frequent are thirds of the classes by training count (INFERRED for "
            "TASE-R: the TASE abstract's figure groups Head / Mid / Tail by the OLTR split, "
            "groups_oltr in results.json)")


def contrastive_log_probs(z1, z2, tau):
    """log_softmax_k(a_j . a_k / tau_j), k != j, of Eq. T5 as a (2B, 2B) fp32 matrix (rows divided,
    not columns); -log p[j, pos(j)] is common.nt_xent's l_j. Its mean row entropy says how sharp
    the rows are."""
    a = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    n = a.shape[0]
    tau = torch.as_tensor(tau, dtype=torch.float32, device=a.device)
    if tau.ndim == 0:
        tau = tau.expand(n)
    elif tau.shape[0] == n // 2:
        tau = tau.repeat(2)
    return F.log_softmax(((a @ a.T) / tau[:, None]).fill_diagonal_(-math.inf), dim=1)


def spearman(a, b) -> float:
    """Pearson correlation of the ranks (ties get their average rank); 0 for a constant input."""
    def ranks(v):
        _, inverse, counts = torch.unique(v, sorted=True, return_inverse=True, return_counts=True)
        below = (torch.cumsum(counts, 0) - counts).double()
        return (below + (counts.double() + 1) / 2)[inverse]
    r = torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1]
    return torch.nan_to_num(r).item()


def cluster_diagnostics(assign, sizes, ds, tau_img, w_img) -> dict:
    """Cluster sizes, tau and weight spread, purity, NMI, Spearman(cluster size, class count),
    and the mean tau and weight per true-class third (Frequent / Medium / Rare). Reads labels:
    a diagnostic only."""
    y = ds.train.y.to(assign.device)
    k = sizes.numel()
    c = ds.num_classes
    p = torch.bincount(assign * c + y, minlength=k * c).view(k, c).double()  # contingency table
    purity = (p.max(1).values.sum() / p.sum()).item()
    p = p / p.sum()
    pk = p.sum(1)
    pc = p.sum(0)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pk[:, None] * pc[None, :])[nz]).log()).sum()
    hk = -(pk[pk > 0] * pk[pk > 0].log()).sum()
    hc = -(pc[pc > 0] * pc[pc > 0].log()).sum()
    thirds = evaluation.group_masks(ds.class_counts, ds.class_rank)["thirds"]
    masks = {g: torch.isin(y, torch.as_tensor(ids, device=y.device).long())
             for g, ids in thirds.items()}
    out = {"cluster_sizes": sorted(sizes.tolist(), reverse=True), "purity": purity,
           "nmi": (2 * mi / (hk + hc)).item() if float(hk + hc) > 0 else 1.0,
           "spearman_size_vs_class_count": spearman(sizes[assign],
                                                    y.new_tensor(ds.class_counts)[y])}
    for key, v in (("tau", tau_img), ("weight", w_img)):
        out[key] = {"min": v.min().item(), "mean": v.mean().item(), "max": v.max().item()}
    for key, v in (("tau_by_group", tau_img), ("weight_by_group", w_img)):
        out[key] = {g: v[m].mean().item() if bool(m.any()) else None for g, m in masks.items()}
    return out


def plot_temperature_weight(sizes, tau_c, assign, power, path, title=""):
    """One PNG: per cluster, temperature (Eq. T3, left axis) and weight n_c^(-a) (Eq. T4, right
    axis, mean 1 over the dataset) against cluster size."""
    w_c = sizes.float().clamp_min(1) ** (-power)
    order = torch.argsort(sizes.cpu())
    s = sizes.cpu()[order].numpy()
    t = tau_c.cpu()[order].numpy()
    w = (w_c / w_c[assign].mean()).cpu()[order].numpy()
    plt, fig, ax = evaluation.figure((6, 4))
    ax.plot(s, t, "o-", color="tab:blue", label="temperature tau_c (T3)")
    ax.set(xscale="log", xlabel="cluster size n_c (images)", ylabel="temperature", title=title)
    ax.twinx().plot(s, w, "s--", color="tab:red",
                    label="weight w_c (T4, dataset mean 1; right axis)")
    fig.legend(loc="lower center", bbox_to_anchor=(0.5, 0.15), fontsize=8)
    evaluation.save_figure(plt, fig, path)


def epoch_diagnostics(epoch, args, ds, assign, sizes, tau_c, z1, z2, tau, run_dir,
                      reclustered) -> dict:
    """metrics.jsonl entries beyond the loss; with pseudo-labels also `pseudo_labels` and, on an
    epoch that clustered, the temperature/weight plot tase_temperature_weight.png."""
    logp = contrastive_log_probs(z1, z2, tau)  # the last batch's rows (Eq. T5)
    entropy = -(logp.exp() * logp.masked_fill(logp.isinf(), 0)).sum(1).mean().item()
    rec = {"tau_global": global_temperature(epoch, args), "reclustered": reclustered,
           "row_entropy_last_batch": entropy}
    if assign is None:
        return rec
    if args.sample_temperature:
        tau_img = tau_c[assign]
    else:
        tau_img = torch.full_like(tau_c[assign], rec["tau_global"])
    if args.reweight:
        w_img = sample_weights(sizes[assign], args.reweight_power)
    else:
        w_img = torch.ones_like(tau_img)
    d = rec["pseudo_labels"] = cluster_diagnostics(assign, sizes, ds, tau_img, w_img)
    if reclustered and common.is_main():
        title = (f"TASE-R (reconstruction), epoch {epoch + 1}: K={len(sizes)}, purity "
                 f"{d['purity']:.2f}")
        plot_temperature_weight(sizes, tau_c, assign, args.reweight_power, run_dir / PLOT, title)
    return rec


# ---- Defaults per dataset, and the paper's numbers ----------------------------------------------

# SimCLR as SDCLR's scripts train it, the INFERRED schedule W = 50, R = 20, and a CPU demo (clusters
# before epochs 5, 9, 13 and 17 of 20).
DEFAULTS = {
    "*": {"protocol": "sdclr", "arch": "resnet18", "epochs": 2000, "batch_size": 512,
          "lr_warmup_epochs": 10, "cluster_warmup_epochs": 50, "recluster_every": 20,
          "probe_aug": "crop"},
    ("imagenet100-lt", "imagenet-lt", "places-lt", "inat2018"): {
        "arch": "resnet50", "batch_size": 256, "epochs": 500},
    "synthetic-lt": {"arch": "resnet8", "n_max": 500, "epochs": 20, "batch_size": 128,
                     "lr_warmup_epochs": 2, "cluster_warmup_epochs": 4, "recluster_every": 4,
                     "probe_aug": "none", "knn_every": 0},
}

# TASE-R has no reported number (the paper is an abstract). Its SimCLR baseline is SimCLR as SDCLR
# trains it, whose full-shot probe FASSL reports (Table 1, All): {(dataset, variant): {rho: All}}.
PAPER_ALL = {
    ("cifar10-lt", "--no-sample-temperature --no-reweight"): {100.0: 75.37},
    ("cifar100-lt", "--no-sample-temperature --no-reweight"): {100.0: 49.76},
}


# ---- Benchmark and main --------------------------------------------------------------------------

def benchmark_steps(args: Args, image_size: int, num_classes: int, device, amp_dtype) -> dict:
    """--benchmark: one full TASE-R step (forward, a tau and a weight per image, backward, SGD) on
    two_views' views, with random cluster sizes."""
    _, net, optimizer, scaler, recipe = setup(args, image_size, device, amp_dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = torch.randint(1, 1000, (args.batch_size,), device=device, generator=gen)
    tau = sample_temperatures(sizes, args.tau_min, args.tau_max)
    w = sample_weights(sizes, args.reweight_power)
    channels_last = args.channels_last and device.type == "cuda"

    def views(x, y):
        return two_views(x, recipe, gen, image_size, channels_last)

    def step(inputs):
        return train_step(net.train(), optimizer, scaler, inputs, tau, w, amp_dtype)[0]
    reference = functools.partial(data.reference_two_views, recipe=recipe, image_size=image_size)
    return {RUN_NAMES[method_name(args)]: harness.BenchStep(views, step, reference)}


def main(argv=None):
    args, filled = harness.parse_args(Args, argv, DEFAULTS)
    if args.benchmark:
        return harness.benchmark(args, benchmark_steps)
    return train(args, filled)


if __name__ == "__main__":
    harness.main_guard(main)
