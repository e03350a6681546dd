"""FASSL: Frequency-Aware Self-Supervised Long-Tailed Learning (Lin, Chen, Wang, ICCV-W 2023).

Three stages (Alg. 1): SDCLR (Jiang et al. 2021) initialises the teacher F^T (Stage 0). Stage 1 (Sec. 3.2.1)
learns K prototypes P by contrasting the images' similarities h = P z to them: most land on frequent classes.
Stage 2 (Sec. 3.2.2): a student F^S + predictor regresses the EMA teacher, rare-looking images weighted up.

  Paper              What                                       Here
  SDCLR [15]         NT-Xent; global magnitude mask, own BN     nt_xent, update_mask, Encoder
  Eq. (1)            h_i = P z_i^T                              prototype_similarities
  Eq. (2)            L_contra on the h vectors, temperature     prototype_contrastive_loss
  Eq. (3), Sec. 4.2  phi(z^T, P), clipped, normalised; its ESS  frequency_weights, weight_stats
  Eq. (3)            L_reb = E[phi ||n(z~^S) - n(z^T)||^2]      rebalanced_loss
  Eq. (4)            theta_T <- tau theta_T + (1-tau) theta_S   update_teacher
  Alg. 1             a training step per stage                  sdclr_step, prototype_step, rebalance_step
  Alg. 1, Table 7    a loop per stage; Stages 1, 2 alternating  train_sdclr, train_fassl (--alternate-every)
  Tables 1-2, Fig. 3 linear probes; t-SNE of five classes       probe, tsne_figures
  Sec. 4.5, Fig. 4   each prototype's nearest training image    prototype_analysis
docs/fassl.md: commands of every table, the demo (--dataset synthetic-lt), INFERRED choices, renamed flags.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import eval as evaluation
from common import UserError, arg, nt_xent

STAGES, GROUPS = ("sdclr", "prototypes", "rebalance"), ("frequent", "medium", "rare")


@dataclasses.dataclass
class Args(common.RunArgs):
    """FASSL (Lin et al. 2023). An unset flag takes its dataset's value from DEFAULTS; docs/fassl.md."""
    split: int = arg(1, "SDCLR CIFAR split k (Sec. 4.1: 'one of the five'; 1 INFERRED)", check=">=1")
    split_file: str | None = arg(None, "official SDCLR index file D_k, .npy (docs/data.md)")
    sdclr_split_dir: str | None = arg(None, "folder of the official SDCLR split files (docs/data.md)")
    data_seed: int = arg(0, "split generator seed, without an index file (docs/data.md)", check=">=0")
    num_classes: int = arg(10, "synthetic-lt only: number of classes", check=">=1")
    synthetic_n_max: int = arg(500, "synthetic-lt only: images of the head class", check=">=1")
    synthetic_n_test: int = arg(100, "synthetic-lt only: test images per class", check=">=1")
    stage: str = arg("all", "all = sdclr -> prototypes -> rebalance (Alg. 1)", choices=["all", *STAGES])
    init: str | None = arg(None, "first stage's start: a stage_<previous>.pt or scratch (Table 9, --no-init)")
    arch: str | None = arg(None, "backbone (Sec. 4.2; Table 8: resnet34)", choices=list(common.ARCHS))
    proj_dim: int = arg(128, "embedding and prototype dimension D (SDCLR's head)", check=">=1")
    proj_layers: int | None = arg(None, "head Linear layers: 3 SDCLR, 2 SimCLR (SDCLR code)", check=">=1")
    prune_ratio: float | None = arg(None, "SDCLR global prune ratio; 0 = SimCLR (Table 1)", check="[0,1)")
    dual_bn: bool = arg(True, "own BatchNorm set for the pruned branch (SDCLR code)")
    tau: float | None = arg(None, "Stage-0 NT-Xent temperature (SDCLR; 224-px SDCLR: 0.3)", check=">0")
    num_prototypes: int = arg(128, "K prototypes (Sec. 4.4; Table 3 left)", check=">=1")
    beta: float = arg(0.2, "temperature beta of Eq. (2) (Sec. 4.2)", check=">0")
    predictor_hidden: int = arg(512, "hidden width of the predictor (paper: 'a MLP'; INFERRED)", check=">=1")
    ema_decay: float = arg(0.99, "EMA decay tau of Eq. (4), every step (Table 3; 1 = frozen)", check="[0,1]")
    reweight: bool = arg(True, "phi weights of Eq. (3); --no-reweight = uniform (the BYOL-dagger rows)")
    weight_norm: str = arg("zscore", "Eq. (3), Sec. 4.2 'clip outliers and normalize' (INFERRED): zscore = "
                           "scores in std units clipped at +-c: w_max/w_min <= e^2c; literal = phi, scores "
                           "clipped at mu +- c sigma: collapses (docs)", choices=["zscore", "literal"])
    clip_sigma: float = arg(2.0, "c of --weight-norm (Sec. 4.2 'clip outliers'; INFERRED)", check=">=0")
    weight_view: str = arg("target", "Eq. (3) weight of each term from its target view (phi(z_i^T) as "
                           "written) or the mean score of both views (INFERRED)", choices=["target", "mean"])
    alternate_every: int = arg(0, "Table 7: alternate Stage 1 and 2 in blocks of N epochs (period INFERRED); "
                               "0 = sequential, as the paper (Sec. 3.2.2)", check=">=0")
    batch_size: int | None = arg(None, "batch (SDCLR scripts; stages 1-2 INFERRED)", check="batch")
    lr: float = arg(0.5, "SGD base LR of every stage (SDCLR code; stages 1-2 INFERRED)", check=">0")
    final_lr: float = arg(1e-6, "end of the per-iteration cosine (SDCLR code)", check=">=0")
    momentum: float = arg(0.9, "SGD momentum (SDCLR code)", check="[0,1)")
    weight_decay: float = arg(1e-4, "weight decay, none on the prototypes (INFERRED)", check=">=0")
    lr_warmup_epochs: int = arg(10, "LR warm-up, at most 10 % of a stage (SDCLR; cap INFERRED)", check=">=0")
    sdclr_epochs: int | None = arg(None, "Stage 0 epochs (SDCLR scripts)", check=">=0")
    stage1_epochs: int | None = arg(None, "Stage 1 epochs (not in the paper: INFERRED)", check=">=0")
    stage2_epochs: int | None = arg(None, "Stage 2 epochs (not in the paper: INFERRED)", check=">=0")
    epochs_scale: float = arg(1.0, "multiply every stage's epochs (1 = paper setting)", check=">0")
    knn_every: int | None = arg(None, "kNN monitor every N epochs (None: E/20)", check=">=0", runtime=True)
    probe: list[str] = arg(["full", "few-shot"], "final linear probes (Tables 1-2), the first is the "
                           "headline; none = no probe", choices=["full", "few-shot"])
    probe_aug: str = arg("crop", "probe augmentation (none: cached features)", choices=["crop", "none"])
    probe_epochs: int | None = arg(None, "override the probe epochs (30 / 100, Sec. 4.2)", check=">=1")
    probe_teacher: bool = arg(True, "also probe the Stage-2 teacher (results.json extra)", runtime=True)
    analyze: bool = arg(True, "prototype analysis (Sec. 4.5, Fig. 4), t-SNE (Fig. 3)", runtime=True)
    sync_bn: bool = arg(True, "SyncBatchNorm across the processes of a torchrun run (CUDA only); on: as "
                        "SDCLR's code; Stage 2's F^T too (docs/fassl.md, Several GPUs)", runtime=True)


# Defaults: SDCLR's CIFAR (<= 64 px) and ImageNet-100-LT (224 px) recipes and seeds; synthetic-lt: a CPU demo.
SMALL = {"arch": "resnet18", "prune_ratio": 0.9, "tau": 0.2, "batch_size": 512, "sdclr_epochs": 2000}
LARGE = {"arch": "resnet50", "prune_ratio": 0.3, "tau": lambda a: 0.3 if a.prune_ratio > 0 else 0.2,
         "batch_size": 256, "sdclr_epochs": 500}
SYNTHETIC_DEMO = {"arch": "resnet8", "batch_size": 128, "sdclr_epochs": 30, "stage1_epochs": 10,
                  "stage2_epochs": 15, "knn_every": 0, "probe_aug": "none"}
LIST_224PX = ("imagenet100-lt", "places-lt", "imagenet-lt", "inat2018")
DEFAULTS = {"*": {"protocol": "sdclr", "seed": 0, **SMALL, "stage1_epochs": 100, "stage2_epochs": 200,
                  "probe_aug": "crop", "proj_layers": lambda a: 3 if a.prune_ratio > 0 else 2},
            LIST_224PX: LARGE, ("cifar10-lt", "cifar100-lt"): {"seed": 10}, "imagenet100-lt": {"seed": 1},
            "synthetic-lt": SYNTHETIC_DEMO}


# What the paper and SDCLR fix; row flags (--stage, --init, --no-reweight) are free; one_of: a reported value.
one_of = lambda name, values: lambda a: getattr(a, name) if getattr(a, name) in values else values[0]  # noqa
RECIPE = {"proj_dim": 128, "proj_layers": lambda a: 3 if a.prune_ratio > 0 else 2, "dual_bn": True, "lr": 0.5,
          "num_prototypes": 128, "beta": 0.2, "predictor_hidden": 512, "ema_decay": 0.99, "clip_sigma": 2.0,
          "weight_norm": "zscore", "weight_view": "target", "alternate_every": 0, "final_lr": 1e-6,
          "momentum": 0.9, "weight_decay": 1e-4, "lr_warmup_epochs": 10, "stage1_epochs": 100,
          "epochs_scale": 1.0, "probe_aug": "crop", "probe_epochs": None,
          "stage2_epochs": lambda a: a.sdclr_epochs if a.init == "scratch" and not a.reweight else 200}
TABLE3 = {**RECIPE, **SMALL, "prune_ratio": one_of("prune_ratio", (0.9, 0.0)),
          "num_prototypes": one_of("num_prototypes", (128, 64, 96, 256, 512)),
          "ema_decay": one_of("ema_decay", (0.99, 0.0, 0.9, 0.999, 1.0))}
CIFAR = {**TABLE3, "protocol": "sdclr", "split": 1, "data_seed": 0, "imb_ratio": 100.0}
PAPER = {"cifar10-lt": CIFAR, "cifar100-lt": {**CIFAR, "arch": one_of("arch", ("resnet18", "resnet34")),
                                              "alternate_every": lambda a: a.alternate_every},    # Table 7
         "tiny-imagenet-lt": {**TABLE3, "imb_ratio": one_of("imb_ratio", (100.0, 1.0, 20.0, 200.0, 500.0))},
         ("imagenet100-lt", "places-lt"): {**RECIPE, **LARGE, "prune_ratio": one_of("prune_ratio", (.3, 0))}}


class Encoder(nn.Module):
    """F(x) = head(backbone(x)); SDCLR's pruned twin: masked convs (w * m gets the gradient), own BN set."""

    def __init__(self, arch, image_size, proj_dim=128, proj_layers=2, prune=False, dual_bn=True):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size)
        d, self.dual_bn = self.backbone.out_dim, dual_bn
        self.head = common.projection_mlp(d, d, proj_dim, proj_layers, last_bn=True, bias_last=False)
        self.prunable = [f"backbone.{n}" for n, m in self.backbone.named_modules() if type(m) is nn.Conv2d]
        self.bns = [n for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for i, n in enumerate(self.prunable if prune else []):              # mask m of conv i, 1 = kept
            self.register_buffer(f"mask{i}", torch.ones_like(self.get_parameter(n + ".weight")).bool())
        if prune and dual_bn:                                               # the twin's BN set
            self.pruned_bn = nn.ModuleList([copy.deepcopy(self.get_submodule(n)) for n in self.bns])

    def forward(self, x, pruned: bool = False):
        if not pruned:
            return self.head(self.backbone(x))
        swap = {n + ".weight": self.get_parameter(n + ".weight") * self.get_buffer(f"mask{i}")
                for i, n in enumerate(self.prunable)}
        for n, twin in zip(self.bns, self.pruned_bn if self.dual_bn else []):
            swap.update({f"{n}.{t}": v for t, v in [*twin.named_parameters(), *twin.named_buffers()]})
        return torch.func.functional_call(self, swap, (x,))


@torch.no_grad()
def update_mask(net: Encoder, ratio: float) -> float:
    """SDCLR mask, every epoch: m = 1[|w| >= t], t = sort(|W|)[min(ceil(p N), N - 1)] over all convs."""
    weights = [net.get_parameter(n + ".weight").detach().float().abs() for n in net.prunable]
    flat = torch.cat([w.flatten() for w in weights])
    t = torch.kthvalue(flat, min(math.ceil(ratio * flat.numel()), flat.numel() - 1) + 1).values   # 1-based
    for i, w in enumerate(weights):
        net.get_buffer(f"mask{i}").copy_(w >= t)
    return int((flat >= t).sum()) / flat.numel()


def networks(args: Args, image_size: int, init: dict | None) -> tuple[Encoder, nn.Linear, nn.Module]:
    """F^T and P (rows p_k; N(0, 1) at first, Alg. 1 line 3, INFERRED) from a stage's output or random, and
    Stage 2's predictor q: Linear(D, 512)-BN-ReLU-Linear(512, D) (paper: 'a MLP'; sizes INFERRED)."""
    teacher = Encoder(args.arch, image_size, args.proj_dim, init["proj_layers"] if init else args.proj_layers)
    protos = nn.Linear(args.proj_dim, args.num_prototypes, bias=False)
    nn.init.normal_(protos.weight)
    for name, part in [("backbone", teacher.backbone), ("head", teacher.head), ("prototypes", protos)]:
        if name in (init or {}):
            part.load_state_dict(init[name])
    return teacher, protos, common.projection_mlp(args.proj_dim, args.predictor_hidden, args.proj_dim, 2)


# ---- Losses (pure functions; fp32 inside, safe under bf16 / fp16 autocast) ---------------------------------
def prototype_similarities(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. (1): h_i = P^ z^_i, cosines to the K prototypes (normalised on use, INFERRED): (B, K), fp32."""
    with torch.autocast(z.device.type, enabled=False):
        return F.normalize(z.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


def prototype_contrastive_loss(z1, z2, prototypes, beta: float = 0.2) -> torch.Tensor:
    """Eq. (2): L_contra = NT-Xent on the h vectors of the two views (SimCLR's denominator, INFERRED)."""
    return nt_xent(prototype_similarities(z1, prototypes), prototype_similarities(z2, prototypes), beta)


@torch.no_grad()
def frequency_weights(z_teacher, prototypes, clip_sigma: float = 2.0, norm: str = "zscore") -> torch.Tensor:
    """Eq. (3) weight phi = 1/exp(s), s_i = z^_i . sum_k p^_k in [-K, K] (z (V, B, D): s averaged over views),
    per batch, no gradient; INFERRED (Sec. 4.2, docs/fassl.md): zscore: u = clamp((s - mu) / sigma, -c, c),
    w = B softmax(-u), w_max / w_min <= e^2c; literal: s clamped at mu -+ c sigma, w = phi / mean(phi)."""
    with torch.autocast(z_teacher.device.type, enabled=False):
        s = F.normalize(z_teacher.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).sum(0)
    s = s.reshape(-1, s.shape[-1]).mean(0)
    mu, sigma = s.mean(), s.std(unbiased=False)                             # population std
    if norm == "zscore":
        s, mu, sigma = (s - mu) / sigma.clamp_min(1e-6), 0.0, 1.0
    if clip_sigma > 0:                                                      # c = 0: no clipping
        s = torch.clamp(s, min=mu - clip_sigma * sigma, max=mu + clip_sigma * sigma)
    return s.numel() * torch.softmax(-s, dim=0)


def rebalanced_loss(p_student, z_teacher, weights) -> torch.Tensor:
    """Eq. (3): L_reb = mean_i w_i ||p_i/||p_i|| - z_i/||z_i|| ||^2 (= 2 - 2 cos); z^T is a fixed target."""
    p, z = F.normalize(p_student.float(), dim=-1), F.normalize(z_teacher.detach().float(), dim=-1)
    return (weights.detach().float() * (2 - 2 * (p * z).sum(-1))).mean()


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Eq. (4): theta_T <- tau theta_T + (1 - tau) theta_S every step, BN running statistics too (INFERRED).
    In Stage 2 nothing else moves F^T (train_fassl): tau = 1 leaves every tensor of it as it was (Table 3)."""
    common.ema_update(teacher, student, decay, buffers="none")                   # parameters
    floats = lambda m: [b for b in common.unwrap(m).buffers() if b.is_floating_point()]  # noqa: E731
    torch._foreach_lerp_(floats(teacher), floats(student), 1.0 - decay)       # num_batches_tracked: kept


# ---- Training steps: two views in, one SGD step, the detached loss out (no host sync) ----------------------
def sgd(args: Args, params, no_decay=()) -> torch.optim.SGD:
    groups = [{"params": [p for p in params if p.requires_grad]}, {"params": [*no_decay], "weight_decay": 0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)          # none on the prototypes (INFERRED)


def two_views(x, gen, image_size: int, channels_last: bool):
    """Two augmentations of a uint8 batch: SDCLR's CIFAR recipe at <= 64 px, MoCo v2's at 224 px."""
    recipe = "simclr_cifar" if image_size <= 64 else "mocov2_imagenet"
    fmt = torch.channels_last if x.device.type == "cuda" and channels_last else torch.contiguous_format
    return [data.augment(x, recipe, gen, image_size).contiguous(memory_format=fmt) for _ in range(2)]


def sgd_step(loss, opt, scaler) -> None:
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def sdclr_step(model, opt, scaler, x1, x2, args: Args, amp_dtype):
    """Stage 0: view 1 -> dense branch, view 2 -> pruned twin (SimCLR: one forward), NT-Xent, one backward."""
    with common.autocast(x1.device, amp_dtype):
        twin = args.prune_ratio > 0                                           # SimCLR: one forward of both
        z1, z2 = (model(x1), model(x2, pruned=True)) if twin else model(torch.cat([x1, x2])).chunk(2)
        loss = nt_xent(common.gather(z1), common.gather(z2), args.tau)          # the global batch
    sgd_step(loss, opt, scaler)
    return loss.detach()


def prototype_step(model, protos: nn.Linear, opt, scaler, x1, x2, args: Args, amp_dtype):
    """Stage 1 (Alg. 1 lines 6-9): z^T = F^T(x) of both views, Eq. (1)-(2) (global batch), update F^T, P."""
    with common.autocast(x1.device, amp_dtype):
        z1, z2 = map(common.gather, model(torch.cat([x1, x2])).chunk(2))
        loss = prototype_contrastive_loss(z1, z2, protos.weight, args.beta)
    sgd_step(loss, opt, scaler)
    return loss.detach(), z1.detach()


def rebalance_step(student, q, teacher, protos: nn.Linear, opt, scaler, x1, x2, args: Args, amp_dtype):
    """Stage 2 (Alg. 1 lines 14-17): Eq. (3) between q(F^S(x)) and F^T(x') (batch-statistics BN), symmetrised
    over the views, each term weighted from its target view or both views' mean score (INFERRED); Eq. (4).
    The weights are normalised over the global batch; the loss is this process's mean (DDP averages)."""
    with common.autocast(x1.device, amp_dtype):
        p1, p2 = q(student(torch.cat([x1, x2]))).chunk(2)
        with torch.no_grad():
            t1, t2 = teacher(torch.cat([x1, x2])).chunk(2)
    g1, g2 = common.gather(t1), common.gather(t2)
    phi = (lambda t: frequency_weights(t, protos.weight, args.clip_sigma, args.weight_norm)) if args.reweight\
        else (lambda t: torch.ones(t.shape[-2], device=t.device))                    # --no-reweight: BYOL
    w1, w2 = [phi(torch.stack([g1, g2]))] * 2 if args.weight_view == "mean" else (phi(g1), phi(g2))
    loss = rebalanced_loss(p1, t2, common.local_part(w2)) + rebalanced_loss(p2, t1, common.local_part(w1))
    sgd_step(loss, opt, scaler)
    update_teacher(teacher, student, args.ema_decay)
    return loss.detach(), w2                                 # w2: the global batch's


# ---- One loop per stage; StageLoop holds the epoch / checkpoint plumbing they share ------------------------
class StageLoop:
    """A stage's epochs: exact resume, loader, LR schedule, augmentation streams, progress, kNN, loss guard,
    checkpoints, stage_<stage>.pt. opts = {stage: optimiser}: two take turns, --alternate-every (Table 7)."""

    def __init__(self, run, ds, stage: str, parts: dict, net: Encoder, opts: dict):
        self.run, self.ds, self.stage, self.net, self.opts, a = run, ds, stage, net, opts, run.args
        self.scaler = common.make_scaler(run.amp_dtype)
        self.parts = {**parts, **{f"optimizer_{s}": o for s, o in opts.items()}, "scaler": self.scaler}
        n = {"sdclr": a.sdclr_epochs, "prototypes": a.stage1_epochs, "rebalance": a.stage2_epochs}
        self.n = {s: max(1, round(n[s] * a.epochs_scale)) if n[s] else 0 for s in opts}
        every = a.alternate_every or max(1, *self.n.values())
        self.plan = [(s, k) for b in range(0, max(self.n.values()), every) for s in self.n
                     for k in range(b, min(b + every, self.n[s]))]
        self.epochs, self.done, self.output = len(self.plan), 0, None
        self.loader = data.make_loader(ds.train, a.batch_size, run.device, seed=a.seed, workers=a.workers,
                                       image_size=ds.image_size, shard=True)
        self.iters, self.gen = len(self.loader), torch.Generator(run.device)
        self.progress = run.progress(self.epochs * self.iters, a.batch_size, stage)
        if run.ckpt is not None and run.ckpt["stage"] == stage:              # exact mid-stage resume
            self.done = run.restore()["epoch"]
            for name, module in self.parts.items():
                module.load_state_dict(run.ckpt[name])

    def __iter__(self):
        yield from range(self.done, self.epochs)
        self.output = self.state(self.epochs)           # the stage's output: stage_<stage>.pt
        self.run.save(self.output, f"stage_{self.stage}.pt")

    def batches(self, epoch: int):          # (view 1, view 2, labels); each iteration's LR before its step
        a, (stage, e) = self.run.args, self.plan[epoch]
        s, total = STAGES.index(stage), self.n[stage] * self.iters
        self.loader.set_epoch(e, stream=3 + s)                               # streams 0-2: the views'
        self.gen.manual_seed(common.epoch_seed(a.seed, e, stream=s))
        self.progress.set_epoch(epoch + 1, self.epochs)
        self.loss_sum, self.t0 = torch.zeros((), device=self.run.device), time.time()
        warmup = min(a.lr_warmup_epochs * self.iters, total // 10)
        for it, (x, y, _) in enumerate(self.loader):
            self.it = epoch * self.iters + it
            self.lr = common.cosine_lr(e * self.iters + it, total, warmup, a.lr, a.final_lr)
            common.set_lr(self.opts[stage], self.lr)
            yield (*two_views(x, self.gen, self.ds.image_size, a.channels_last), y)

    def log(self, loss) -> None:
        self.loss_sum += loss
        self.progress.step(self.it, loss=loss, lr=self.lr)

    def end_epoch(self, epoch: int, record: dict) -> None:
        a, ds, n, dev = self.run.args, self.ds, epoch + 1, self.run.device
        record = {"stage": self.stage, **record, "lr": self.lr, "epoch_time_s": time.time() - self.t0}
        every = a.knn_every if a.knn_every is not None else max(1, self.epochs // 20)
        if every and (n % every == 0 or n == self.epochs) and ds.probe is not None and ds.val is not None:
            m = evaluation.knn_monitor(self.net.backbone, ds.probe, ds.val, dev, ds.num_classes, class_rank=
                                       ds.class_rank, class_counts=ds.class_counts, recipe="test_imagenet")
            record["knn"] = {"acc_class_mean": m["acc_class_mean"], "groups_thirds": m["groups_thirds"]}
            print(f"[{self.stage}] ep {n} kNN class-mean acc {m['acc_class_mean']:.2f}", flush=True)
        self.run.end_epoch(n, self.loss_sum / self.iters, record, self.state(n), f"{self.stage} epoch {n}")

    def state(self, epoch: int) -> dict:    # "backbone" / "head": the network this stage hands on
        return {"stage": self.stage, "epoch": epoch, "image_size": self.ds.image_size,
                "arch": self.run.args.arch, "proj_layers": sum(type(m) is nn.Linear for m in self.net.head),
                "backbone": self.net.backbone.state_dict(), "head": self.net.head.state_dict(),
                "epochs": {s: sum(p[0] == s for p in self.plan[:epoch]) for s in self.n},     # per stage
                **{name: module.state_dict() for name, module in self.parts.items()}}


def train_sdclr(run, ds) -> dict:
    """Stage 0: SDCLR (SimCLR with --prune-ratio 0), the teacher's initialisation (Alg. 1 line 4)."""
    a = run.args
    net = Encoder(a.arch, ds.image_size, a.proj_dim, a.proj_layers, a.prune_ratio > 0, a.dual_bn)
    model = common.prepare_model(net, run.device, a.channels_last, a.compile, ddp=True, sync_bn=a.sync_bn)
    loop = StageLoop(run, ds, "sdclr", {"model": net}, net, {"sdclr": sgd(a, net.parameters())})
    for epoch in loop:
        record = {"mask_kept": update_mask(net, a.prune_ratio)} if a.prune_ratio > 0 else {}
        for x1, x2, _ in loop.batches(epoch):
            loop.log(sdclr_step(model, loop.opts["sdclr"], loop.scaler, x1, x2, a, run.amp_dtype))
        loop.end_epoch(epoch, record)
    return loop.output


def train_fassl(run, ds, stage: str, init: dict | None) -> dict:
    """Stage 1 (Alg. 1 lines 2-10): F^T (from Stage 0) and P learn by Eq. (2). Stage 2 (lines 11-19): F^S <-
    F^T learns by Eq. (3), F^T follows by Eq. (4), P frozen (INFERRED); --alternate-every: both in turns."""
    a, dev, amp, K = run.args, run.device, run.amp_dtype, run.args.num_prototypes
    phases = STAGES[1:] if a.alternate_every and stage == "rebalance" else (stage,)      # Table 7: both
    teacher, protos, q = networks(a, ds.image_size, init)
    if a.sync_bn and dev.type == "cuda" and common.get_rank_world()[1] > 1:      # F^T's BN as F^S's
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, protos, group = copy.deepcopy(teacher), protos.to(dev), group_of_classes(ds).to(dev)  # P: no DDP
    ms, mt, mq = (common.prepare_model(m, dev, a.channels_last and m is not q, a.compile, m is not teacher or
                                       "prototypes" in phases, a.sync_bn) for m in (student, teacher, q))
    opts = {p: sgd(a, teacher.parameters(), no_decay=protos.parameters()) if p == "prototypes"
            else sgd(a, [*student.parameters(), *q.parameters()]) for p in phases}
    net, two = (student, {"student": student, "predictor": q}) if stage == "rebalance" else (teacher, {})
    loop = StageLoop(run, ds, stage, {"teacher": teacher, "prototypes": protos, **two}, net, opts)
    for epoch in loop:
        phase, stats = loop.plan[epoch][0], torch.zeros(max(K, 9), device=dev)     # diagnostics, on device
        for bn in teacher.bns:      # F^T's BN statistics: its own forward in Stage 1, the EMA in Stage 2
            teacher.get_submodule(bn).track_running_stats = phase == "prototypes"
        if loop.plan[epoch] == ("rebalance", 0):           # Alg. 1 line 12 (after a first Stage-1 block)
            student.load_state_dict(teacher.state_dict())
        for x1, x2, y in loop.batches(epoch):
            if phase == "prototypes":
                loss, z1 = prototype_step(mt, protos, opts[phase], loop.scaler, x1, x2, a, amp)
                stats[:K] += F.one_hot(prototype_similarities(z1, protos.weight).argmax(1), K).sum(0)
            else:
                loss, w = rebalance_step(ms, mq, mt, protos, opts[phase], loop.scaler, x1, x2, a, amp)
                stats[:9] += weight_stats(w, group[common.gather(y)])
            loop.log(loss)
        if phase == "prototypes":                          # usage of the prototypes (argmax_k h): collapse?
            p, share = F.normalize(protos.weight.detach().float(), dim=-1), stats[:K] / stats[:K].sum()
            record = {"protos_used": int((share > 0).sum()), "proto_usage_max": float(share.max()),
                      "proto_mean_cos": float(((p @ p.T).sum() - K) / max(K * K - K, 1))}
        else:                                              # per-batch means of weight_stats, w per group
            v = stats[:9].tolist()
            record = {"w_ess": v[6] / loop.iters, "w_max": v[7] / loop.iters, "w_min": v[8] / loop.iters,
                      **{f"w_mean_{g}": v[i] / max(v[3 + i], 1) for i, g in enumerate(GROUPS)}}
        loop.end_epoch(epoch, {"block": phase, **record} if len(phases) > 1 else record)
    return loop.output


def group_of_classes(ds) -> torch.Tensor:
    """Class id -> 0 Frequent / 1 Medium / 2 Rare: thirds of the classes by count (Sec. 4.1)."""
    g = evaluation.group_masks(ds.class_counts, ds.class_rank)["thirds"]
    return torch.tensor([0 if c in g["many"] else 2 - (c in g["medium"]) for c in range(ds.num_classes)])


def weight_stats(w, group) -> torch.Tensor:
    """One batch, on device: w summed and counted per group (3 + 3), ESS (sum w)^2 / sum w^2, max w, min w."""
    one = F.one_hot(group, 3).to(w.dtype)
    return torch.cat([w @ one, one.sum(0), torch.stack([w.sum() ** 2 / w.pow(2).sum(), w.max(), w.min()])])


def probe(backbone_state: dict, args: Args, ds, device, amp_dtype) -> dict:
    """SDCLR linear probes (Tables 1-2) with eval.py's probe settings (docs/evaluation.md): {mode: result}."""
    bb = common.build_backbone(args.arch, ds.image_size)
    bb.load_state_dict(backbone_state)
    return evaluation.run_probes(common.prepare_model(bb, device, args.channels_last), ds, args.probe, device,
                                 amp_dtype, aug=args.probe_aug, epochs=args.probe_epochs, seed=args.seed)


def tsne_figures(run, ds, **backbones) -> dict:
    """Fig. 3: t-SNE of the L2-normalised features of the test images of five classes, head to tail (the two
    most frequent, the middle one, the two rarest; INFERRED): tsne_<network>.png for each backbone state."""
    n, order = ds.num_classes, sorted(range(ds.num_classes), key=lambda c: -ds.class_counts[c])
    pick = [order[i] for i in sorted({0, 1, n // 2, n - 2, n - 1}) if 0 <= i < n]
    for name, state in backbones.items():
        bb = common.build_backbone(run.args.arch, ds.image_size)
        bb.load_state_dict(state)
        f, y = evaluation.extract_features(bb.to(run.device), ds.test, run.device, run.amp_dtype, recipe=
                                           "test_imagenet")
        keep = [(i, pick.index(c)) for i, c in enumerate(y.tolist()) if c in pick]
        evaluation.plot_tsne(F.normalize(f[[i for i, _ in keep]], dim=-1), [c for _, c in keep], run.run_dir
                             / f"tsne_{name}.png", class_names=[ds.class_names[c] for c in pick])
    return {"classes": [ds.class_names[c] for c in pick], "files": [f"tsne_{n}.png" for n in backbones]}


@torch.no_grad()
def prototype_analysis(stage1: dict, run, ds) -> dict:
    """Sec. 4.5: each prototype's nearest training image (Stage-1 F^T and P, no augmentation; INFERRED), the
    group shares (Tables 4-5), prototype_grid.png: a tile per prototype, by group, then class (Fig. 4)."""
    import matplotlib.pyplot as plt
    (teacher, protos, _), dev, amp = networks(run.args, ds.image_size, stage1), run.device, run.amp_dtype
    z, labels = evaluation.extract_features(teacher.to(dev), ds.train, dev, amp, recipe="test_imagenet")
    nearest = prototype_similarities(z, protos.weight.to(dev)).argmax(0).cpu()     # argmax_i p^_k . z^_i
    cls = labels.cpu()[nearest]
    grp, k = group_of_classes(ds)[cls], len(cls)
    share = {g: 100.0 * float((grp == i).sum()) / k for i, g in enumerate(GROUPS)}
    order = sorted(range(k), key=lambda j: (int(grp[j]), int(cls[j])))
    imgs = ds.train.x[nearest] if ds.train.x is not None else data._decode_all(   # list datasets: 96 px
        [ds.train.files[i] for i in nearest.tolist()], 96)
    fig, axes = plt.subplots(-(-k // 16), 16, figsize=(14.4, -(-k // 16)), squeeze=False)
    for ax, j in zip(axes.flat, order + [None] * (axes.size - k)):
        ax.axis("off")
        if j is not None:
            ax.imshow(imgs[j].permute(1, 2, 0).numpy())
            ax.set_title(ds.class_names[cls[j]][:10], fontsize=5, color=("C0", "C1", "C3")[grp[j]])
    fig.suptitle("Prototype -> nearest training image (Fig. 4). Frequent {frequent:.1f}% / Medium "
                 "{medium:.1f}% / Rare {rare:.1f}%".format(**share), fontsize=8)
    fig.savefig(run.run_dir / "prototype_grid.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    return {"K": k, "share_percent": share, "counts": {g: round(v * k / 100) for g, v in share.items()},
            "nearest_index": nearest.tolist(), "nearest_class": cls.tolist(),
            "per_class": torch.bincount(cls, minlength=ds.num_classes).tolist()}


def report(run, ds, stages: list, outputs: dict, init: dict | None):
    """Probes (the first is the headline), teacher probe, t-SNE, prototype analysis -> results.json; rows."""
    args, last, analyze = run.args, outputs[stages[-1]], run.args.analyze and common.is_main()   # its files
    probes = probe(last["backbone"], args, ds, run.device, run.amp_dtype)
    head = next(iter(probes.values()), None)
    network = {"sdclr": "backbone (SDCLR dense branch)" if args.prune_ratio > 0 else "backbone",
               "prototypes": "teacher", "rebalance": "student"}[stages[-1]]
    epochs = {f"stage{i}": sum(o["epochs"].get(s, 0) for o in outputs.values()) for i, s in enumerate(STAGES)}
    results = run.results(ds, head["protocol"] if head else "none", network,
                          {**epochs, "probe": head["probe"]["epochs"] if head else 0})
    results.update({k: head[k] for k in ("selection", "at_selected", "at_last")} if head else {})
    results["extra"].update({"probe_variant": head["variant"]} if head else {})
    rows = [json.loads(r) for r in (run.run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()] \
        if common.is_main() else []                          # process 0 writes, others need not read it
    results["knn"] = [{"stage": r["stage"], "epoch": r["epoch"], **r["knn"]} for r in rows if "knn" in r]
    keys = ("protocol", "variant", "selection", "at_selected", "at_last", "probe")         # per probe mode
    results["extra"].update({f"probe_{m}": {k: r[k] for k in keys} for m, r in probes.items()})
    if args.probe_teacher and stages[-1] == "rebalance" and args.probe:
        teacher = {k[len("backbone."):]: v for k, v in last["teacher"].items() if k.startswith("backbone.")}
        results["extra"]["teacher_probe"] = {m: {k: r[k] for k in ("selection", "at_selected")} for m, r in
                                             probe(teacher, args, ds, run.device, run.amp_dtype).items()}
    sdclr = outputs.get("sdclr") or (init if init and init.get("stage") == "sdclr" else None)
    if analyze and stages[-1] == "rebalance" and sdclr:                     # Fig. 3: FASSL vs SDCLR
        results["extra"]["tsne"] = tsne_figures(run, ds, student=last["backbone"], sdclr=sdclr["backbone"])
    stage1 = outputs.get("prototypes", init if stages == ["rebalance"] and not args.alternate_every else None)
    if analyze and stage1 is not None and "prototypes" in stage1:                # Stage-1 F^T and P
        res = results["extra"]["prototypes"] = prototype_analysis(stage1, run, ds)
        print("prototypes: " + " / ".join(f"{g} {v:.2f}%" for g, v in res["share_percent"].items()))
    run.finish(results)
    print(f"| Method {evaluation.PAPER_HEADER[head['probe']['row']]}" if head else "no probe")
    for mode, r in probes.items():
        print(f"| {run.label} ({mode}) " + evaluation.paper_row(r["at_selected"], style=r["probe"]["row"]))
    return run.run_dir


def benchmark(args: Args) -> None:
    """Images/s of each stage's training step (augmentation, forward, backward, update) on random data."""
    dev, amp = common.setup_device(args.device, args.amp)
    size = 224 if args.dataset in LIST_224PX else 64 if args.dataset == "tiny-imagenet-lt" else 32
    x = torch.randint(0, 256, (args.batch_size, 3, *[size if size <= 64 else 256] * 2), dtype=torch.uint8,
                      device=dev)                                        # list datasets arrive at 256 px
    g, sc, cl = torch.Generator(dev).manual_seed(0), common.make_scaler(amp), args.channels_last
    net = Encoder(args.arch, size, args.proj_dim, args.proj_layers, args.prune_ratio > 0, args.dual_bn)
    teacher, protos, q = networks(args, size, None)
    m0, mt, ms, mq = (common.prepare_model(m, dev, c, args.compile) for m, c in
                      ((net, cl), (teacher, cl), (copy.deepcopy(teacher), cl), (q, False)))
    o0, o1 = sgd(args, net.parameters()), sgd(args, teacher.parameters(), protos.to(dev).parameters())
    o2, s0 = sgd(args, [*ms.parameters(), *q.parameters()]), "sdclr" if args.prune_ratio else "simclr"
    for n, step in ((s0, lambda v: sdclr_step(m0, o0, sc, *v, args, amp)),
                    ("prototypes", lambda v: prototype_step(mt, protos, o1, sc, *v, args, amp)[0]),
                    ("rebalance", lambda v: rebalance_step(ms, mq, mt, protos, o2, sc, *v, args, amp)[0])):
        common.benchmark(n, lambda: step(two_views(x, g, size, cl)), len(x), args.benchmark_steps, dev, amp)


def main(argv=None):
    argv = [w for a in (sys.argv[1:] if argv is None else argv) for w in   # --no-init: Table 9's name
            (["--init", "scratch"] if a == "--no-init" else [a])]
    args, filled = common.parse_args(Args, argv, DEFAULTS)
    if args.benchmark:
        return benchmark(args)
    name = lambda a: ("simclr" if a.prune_ratio == 0 else "sdclr") if a.stage == "sdclr" else "fassl"  # noqa
    run = common.Run(name, args, filled, DEFAULTS, PAPER)      # method: sdclr / simclr for Stage 0 alone
    args = run.args
    ds = data.load_dataset(args.dataset, args.data_dir, imb_ratio=args.imb_ratio, protocol=args.protocol,
                           seed=args.data_seed, **{k: getattr(args, k) for k in ("split", "split_file",
                           "sdclr_split_dir", "num_classes", "synthetic_n_max", "synthetic_n_test")})
    stages = [s for s in STAGES if args.stage in ("all", s) and not (s == "prototypes" and args.stage == "all"
              and args.alternate_every)][1 if args.init and args.stage == "all" else 0:]   # Table 7: 1 in 2
    if args.init is None and stages[0] != "sdclr":
        raise UserError(f"--stage {stages[0]} needs a teacher: --init <previous stage's .pt> or --no-init")
    init = common.load_checkpoint(args.init) if args.init not in (None, "scratch") else None
    if stages[0] == "rebalance" and args.reweight and not args.alternate_every and init is not None \
            and "prototypes" not in init:
        raise UserError(f"--init {args.init} has no prototypes: give a stage_prototypes.pt or --no-reweight")
    run.start(ds, f"{args.arch} | stages {' -> '.join(stages)} | batch {args.batch_size} | lr {args.lr}")
    outputs, prev = {}, init
    for stage in stages:
        if run.ckpt is not None and (done := run.run_dir / f"stage_{stage}.pt").is_file():   # finished before
            prev = common.load_checkpoint(done)
            if run.ckpt["stage"] == stage:
                run.restore()                                 # the RNG state the next stage is built with
        else:
            prev = train_sdclr(run, ds) if stage == "sdclr" else train_fassl(run, ds, stage, prev)
        outputs[stage] = prev
    return report(run, ds, stages, outputs, init)


if __name__ == "__main__":
    common.main_guard(main)
