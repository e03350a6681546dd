"""FASSL: Frequency-Aware Self-Supervised Long-Tailed Learning (Lin, Chen, Wang, ICCV-W 2023).

Three stages (Alg. 1): SDCLR (Jiang et al. 2021) initialises the teacher F^T (Stage 0). Stage 1
(Sec. 3.2.1) learns K prototypes P by contrasting the images' similarities h = P z to them: most
land on frequent classes. Stage 2 (Sec. 3.2.2): a student F^S + predictor regresses the EMA
teacher, rare-looking images weighted up.

  Paper              What                                          Here
  SDCLR [15]         NT-Xent; global magnitude mask, own BN        nt_xent, update_mask, Encoder
  Eq. (1)            h_i = P z_i^T                                 prototype_similarities
  Eq. (2)            L_contra on the h vectors, temperature beta   prototype_contrastive_loss
  Eq. (3), Sec. 4.2  phi(z^T, P), clipped, normalised; its ESS     frequency_weights, weight_stats
  Eq. (3)            L_reb = E[phi ||n(z~^S) - n(z^T)||^2]         rebalanced_loss
  Eq. (4)            theta_T <- d theta_T + (1 - d) theta_S        update_teacher (--ema-decay d)
  Alg. 1             a training step per stage                     sdclr_step, prototype_step,
                                                                   rebalance_step
  Alg. 1             a loop per stage                              train_sdclr, train_prototypes,
                                                                   train_rebalance
  Table 7            Stages 1 and 2 alternating                    train_alternating
  Tables 1-2, Fig. 3 linear probes; t-SNE of five classes          probe, tsne_figures
  Sec. 4.5, Fig. 4   each prototype's nearest training image       prototype_analysis
  Tables 1-9         the paper's All column of each row            PAPER_ALL

docs/fassl.md: the commands of every table, the demo (--dataset synthetic-lt), the INFERRED choices.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
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
import harness
from common import UserError, nt_xent
from harness import arg

STAGES = ("sdclr", "prototypes", "rebalance")
GROUPS = ("frequent", "medium", "rare")


@dataclasses.dataclass
class Args(harness.RunArgs):
    """FASSL (Lin et al. 2023). An unset flag takes its dataset's value
    from DEFAULTS; docs/fassl.md."""
    split: int = arg(1, "SDCLR CIFAR split k (Sec. 4.1: 'one of the five'; 1 INFERRED)",
                     check=">=1")
    split_file: str | None = arg(None, "official SDCLR index file D_k, .npy (docs/data.md)")
    sdclr_split_dir: str | None = arg(None, "folder of the official SDCLR split files "
                                      "(docs/data.md)")
    data_seed: int = arg(0, "split generator seed, without an index file (docs/data.md)",
                         check=">=0")
    num_classes: int = arg(10, "synthetic-lt only: number of classes", check=">=1")
    synthetic_n_test: int = arg(100, "synthetic-lt only: test images per class", check=">=1")
    stage: str = arg("all", "all = sdclr -> prototypes -> rebalance (Alg. 1)",
                     choices=["all", *STAGES])
    init: str | None = arg(None, "first stage's start: a stage_<previous>.pt or scratch (Table 9, "
                           "--no-init)")
    arch: str | None = arg(None, "backbone (Sec. 4.2; Table 8: resnet34)",
                           choices=list(common.ARCHS))
    proj_dim: int = arg(128, "embedding and prototype dimension D (SDCLR's head)", check=">=1")
    proj_layers: int | None = arg(None, "head Linear layers: 3 SDCLR, 2 SimCLR (SDCLR code)",
                                  check=">=1")
    prune_ratio: float | None = arg(None, "SDCLR global prune ratio; 0 = SimCLR (Table 1)",
                                    check="[0,1)")
    dual_bn: bool = arg(True, "own BatchNorm set for the pruned branch (SDCLR code)")
    tau: float | None = arg(None, "Stage-0 NT-Xent temperature (SDCLR; 224-px SDCLR: 0.3)",
                            check=">0")
    num_prototypes: int = arg(128, "K prototypes (Sec. 4.4; Table 3 left)", check=">=1")
    beta: float = arg(0.2, "temperature beta of Eq. (2) (Sec. 4.2)", check=">0")
    predictor_hidden: int = arg(512, "hidden width of the predictor (paper: 'a MLP'; INFERRED)",
                                check=">=1")
    ema_decay: float = arg(0.99, "EMA decay of Eq. (4), the paper's tau, every step (Table 3; 1 = "
                           "frozen)", check="[0,1]")
    reweight: bool = arg(True, "phi weights of Eq. (3); --no-reweight = uniform (the BYOL-dagger "
                         "rows)")
    weight_norm: str = arg("zscore", "Eq. (3), Sec. 4.2 'clip outliers and normalize' (INFERRED): "
                           "zscore = phi^(1/sigma_B), scores in std units of the batch clipped at "
                           "+-c (w_max/w_min <= e^2c); fixed = the mean cosine s/K, clipped, a "
                           "fixed scale; literal = phi, scores clipped at mu +- c sigma: collapses "
                           "(docs/fassl.md)", choices=["zscore", "fixed", "literal"])
    clip_sigma: float = arg(2.0, "c of --weight-norm (Sec. 4.2 'clip outliers'; INFERRED)",
                            check=">=0")
    weight_view: str = arg("target", "Eq. (3) weight of each term from its target view "
                           "(phi(z_i^T) as written) or the mean score of both views (INFERRED)",
                           choices=["target", "mean"])
    alternate_every: int = arg(0, "Table 7: alternate Stage 1 and 2 in blocks of N epochs (period "
                               "INFERRED); 0 = sequential, as the paper (Sec. 3.2.2)", check=">=0")
    batch_size: int | None = arg(None, "batch (SDCLR scripts; stages 1-2 INFERRED)",
                                 check="batch")
    lr: float = arg(0.5, "SGD base LR of every stage (SDCLR code; stages 1-2 INFERRED)",
                    check=">0")
    final_lr: float = arg(1e-6, "end of the per-iteration cosine (SDCLR code)", check=">=0")
    momentum: float = arg(0.9, "SGD momentum (SDCLR code)", check="[0,1)")
    weight_decay: float = arg(1e-4, "weight decay, none on the prototypes (INFERRED)",
                              check=">=0")
    lr_warmup_epochs: int = arg(10, "LR warm-up, at most 10 % of a stage (SDCLR; cap INFERRED)",
                                check=">=0")
    sdclr_epochs: int | None = arg(None, "Stage 0 epochs (SDCLR scripts)", check=">=0")
    stage1_epochs: int | None = arg(None, "Stage 1 epochs (not in the paper: INFERRED)",
                                    check=">=0")
    stage2_epochs: int | None = arg(None, "Stage 2 epochs (not in the paper: INFERRED)",
                                    check=">=0")
    epochs_scale: float = arg(1.0, "multiply every stage's epochs (1 = paper setting)", check=">0")
    knn_every: int | None = arg(None, "kNN monitor every N epochs (None: E/20; 0: off)",
                                check=">=0", runtime=True)
    probe: list[str] = arg(["full", "few-shot"], "final linear probes (Tables 1-2), the first is "
                           "the headline; the flag alone = no probe", choices=["full", "few-shot"])
    probe_aug: str = arg("crop", "probe augmentation (none: cached features)",
                         choices=["crop", "none"])
    probe_epochs: int | None = arg(None, "override the probe epochs (30 / 100, Sec. 4.2)",
                                   check=">=1")
    probe_teacher: bool = arg(True, "also probe the Stage-2 teacher (results.json extra)",
                              runtime=True)
    analyze: bool = arg(True, "prototype analysis (Sec. 4.5, Fig. 4), t-SNE (Fig. 3)",
                        runtime=True)
    sync_bn: bool = arg(True, "SyncBatchNorm across the processes of a torchrun run (CUDA only); "
                        "on: as SDCLR's code; Stage 2's F^T too (docs/distributed.md)",
                        runtime=True)


# ---- Model pieces: the SDCLR encoder and its pruned twin, the prototypes, the predictor -------

class Encoder(nn.Module):
    """F(x) = head(backbone(x)); SDCLR's pruned twin: masked convs (w * m gets the gradient), its
    own BN set."""

    def __init__(self, arch, image_size, proj_dim=128, proj_layers=2, prune=False, dual_bn=True):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size)
        d = self.backbone.out_dim
        self.dual_bn = dual_bn
        self.head = common.projection_mlp(d, d, proj_dim, proj_layers, last_bn=True,
                                          bias_last=False)
        self.prunable = [f"backbone.{name}" for name, m in self.backbone.named_modules()
                         if type(m) is nn.Conv2d]
        self.bns = [name for name, m in self.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for i, name in enumerate(self.prunable if prune else []):
            weight = self.get_parameter(name + ".weight")
            self.register_buffer(f"mask{i}", torch.ones_like(weight).bool())  # 1 = kept
        if prune and dual_bn:  # the twin's BN set
            self.pruned_bn = nn.ModuleList([copy.deepcopy(self.get_submodule(name))
                                            for name in self.bns])

    def forward(self, x, pruned: bool = False):
        if not pruned:
            return self.head(self.backbone(x))
        swap = {}
        for i, name in enumerate(self.prunable):
            masked = self.get_parameter(name + ".weight") * self.get_buffer(f"mask{i}")
            swap[name + ".weight"] = masked
        for name, twin in zip(self.bns, self.pruned_bn if self.dual_bn else []):
            for t, v in [*twin.named_parameters(), *twin.named_buffers()]:
                swap[f"{name}.{t}"] = v
        return torch.func.functional_call(self, swap, (x,))


@torch.no_grad()
def update_mask(net: Encoder, ratio: float) -> float:
    """SDCLR's mask, every epoch: m = 1[|w| >= t], t = sort(|W|)[min(ceil(p N), N - 1)] over all
    convs. Returns the share of weights kept."""
    weights = [net.get_parameter(name + ".weight").detach().float().abs() for name in net.prunable]
    flat = torch.cat([w.flatten() for w in weights])
    position = min(math.ceil(ratio * flat.numel()), flat.numel() - 1)  # 0-based
    t = torch.kthvalue(flat, position + 1).values
    for i, w in enumerate(weights):
        net.get_buffer(f"mask{i}").copy_(w >= t)
    return int((flat >= t).sum()) / flat.numel()


def networks(args: Args, image_size: int, init: dict | None):
    """F^T and P (rows p_k; N(0, 1) at first, Alg. 1 line 3, INFERRED) from a stage's output or
    random, and Stage 2's predictor q: Linear(D, 512)-BN-ReLU-Linear(512, D) (paper: 'a MLP';
    sizes INFERRED). Both stages build all three, so that they start from the same draws."""
    proj_layers = init["state"]["proj_layers"] if init else args.proj_layers
    teacher = Encoder(args.arch, image_size, args.proj_dim, proj_layers)
    protos = nn.Linear(args.proj_dim, args.num_prototypes, bias=False)
    nn.init.normal_(protos.weight)
    if init:
        model = init["model"]
        teacher.backbone.load_state_dict(evaluation.submodule_state(model, "backbone"))
        teacher.head.load_state_dict(evaluation.submodule_state(model, "head"))
        if "prototypes" in init:
            protos.load_state_dict(init["prototypes"])
    q = common.projection_mlp(args.proj_dim, args.predictor_hidden, args.proj_dim, 2)
    return teacher, protos, q


def freeze_bn_statistics(net: Encoder, frozen: bool) -> None:
    """Whether forward passes of `net` in train mode move its BN running statistics. Either way
    BN normalises with the batch's statistics; Stage 2's teacher is frozen, only the EMA of
    Eq. (4) moves its running statistics."""
    for name in net.bns:
        net.get_submodule(name).track_running_stats = not frozen


# ---- Losses (pure functions; fp32 inside, safe under bf16 / fp16 autocast) --------------------

def prototype_similarities(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. (1): h_i = P^ z^_i, cosines to the K prototypes (normalised on use, INFERRED):
    (B, K), fp32."""
    with torch.autocast(z.device.type, enabled=False):
        z_hat = F.normalize(z.float(), dim=-1)
        return z_hat @ F.normalize(prototypes.float(), dim=-1).T


def prototype_contrastive_loss(z1, z2, prototypes, beta: float = 0.2) -> torch.Tensor:
    """Eq. (2): L_contra = NT-Xent on the h vectors of the two views
    (SimCLR's denominator, INFERRED)."""
    h1 = prototype_similarities(z1, prototypes)
    h2 = prototype_similarities(z2, prototypes)
    return nt_xent(h1, h2, beta)


@torch.no_grad()
def frequency_weights(z_teacher, prototypes, clip_sigma: float = 2.0,
                      norm: str = "zscore") -> torch.Tensor:
    """Eq. (3) weight phi = 1/exp(s), s_i = z^_i . sum_k p^_k in [-K, K] (z (V, B, D): s averaged
    over the views), per batch, no gradient, mean 1 over the batch; INFERRED (Sec. 4.2,
    docs/fassl.md), with mu and sigma the batch's mean and std of s:
      zscore:  u = clamp((s - mu) / sigma, -c, c), w = B softmax(-u): w is proportional to
               phi^(1/sigma), a temperature set by each batch; w_max / w_min <= e^2c;
      fixed:   m = s / K, the mean cosine to the prototypes in [-1, 1], clamped at its mu -+ c
               sigma, w = B softmax(-m): a fixed scale, w_max / w_min <= e^2;
      literal: s clamped at mu -+ c sigma, w = phi / mean(phi) = B softmax(-s).
    c = clip_sigma (0: no clipping); softmax in log space: exp(128) would overflow fp32."""
    with torch.autocast(z_teacher.device.type, enabled=False):
        prototype_sum = F.normalize(prototypes.float(), dim=-1).sum(0)
        s = F.normalize(z_teacher.float(), dim=-1) @ prototype_sum
    s = s.reshape(-1, s.shape[-1]).mean(0)
    mu = s.mean()
    sigma = s.std(unbiased=False)  # the population std
    if norm == "zscore":
        u = (s - mu) / sigma.clamp_min(1e-6)
        if clip_sigma > 0:
            u = torch.clamp(u, min=-clip_sigma, max=clip_sigma)
        return u.numel() * torch.softmax(-u, dim=0)
    if norm == "fixed":
        K = prototypes.shape[0]
        s = s / K
        mu = mu / K
        sigma = sigma / K
    if clip_sigma > 0:
        s = torch.clamp(s, min=mu - clip_sigma * sigma, max=mu + clip_sigma * sigma)
    return s.numel() * torch.softmax(-s, dim=0)


def rebalanced_loss(p_student, z_teacher, weights) -> torch.Tensor:
    """Eq. (3): L_reb = mean_i w_i ||p_i/||p_i|| - z_i/||z_i|| ||^2 (= 2 - 2 cos); z^T is
    a fixed target."""
    p = F.normalize(p_student.float(), dim=-1)
    z = F.normalize(z_teacher.detach().float(), dim=-1)
    return (weights.detach().float() * (2 - 2 * (p * z).sum(-1))).mean()


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, ema_decay: float) -> None:
    """Eq. (4): theta_T <- d theta_T + (1 - d) theta_S every step, d = --ema-decay (the paper's
    tau), BN running statistics too (INFERRED). In Stage 2 nothing else moves F^T: d = 1 leaves
    every tensor of it as it was (Table 3)."""
    common.ema_update(teacher, student, ema_decay)  # the parameters
    t_buffers = [b for b in common.unwrap(teacher).buffers() if b.is_floating_point()]
    s_buffers = [b for b in common.unwrap(student).buffers() if b.is_floating_point()]
    torch._foreach_lerp_(t_buffers, s_buffers, 1.0 - ema_decay)  # num_batches_tracked: kept


def weight_stats(w, group) -> dict:
    """Diagnostics of one batch's Eq. (3) weights, on the device: w summed and counted per
    frequency group, the effective sample size (sum w)^2 / sum w^2, max w and min w."""
    one_hot = F.one_hot(group, 3).to(w.dtype)
    return {"w_sum": w @ one_hot, "count": one_hot.sum(0), "ess": w.sum() ** 2 / w.pow(2).sum(),
            "max": w.max(), "min": w.min()}


# ---- Training steps: two views in, one SGD step, the detached loss out (no host sync) ---------

def sgd(args: Args, params, no_decay=()) -> torch.optim.SGD:
    """SGD of the SDCLR code; no weight decay on the prototypes (INFERRED)."""
    groups = [{"params": [p for p in params if p.requires_grad]},
              {"params": [*no_decay], "weight_decay": 0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def two_views(x, gen, image_size: int, channels_last: bool):
    """Two augmentations of a uint8 batch: SDCLR's CIFAR recipe up to 64 px, MoCo v2's at 224."""
    recipe = "simclr_cifar" if image_size <= 64 else "mocov2_imagenet"
    return [data.augment(x, recipe, gen, image_size, channels_last) for _ in range(2)]


def sdclr_step(model, opt, scaler, x1, x2, args: Args, amp_dtype):
    """Stage 0: view 1 -> dense branch, view 2 -> pruned twin (SimCLR: one forward of both),
    NT-Xent over the global batch, one backward."""
    with common.autocast(x1.device, amp_dtype):
        if args.prune_ratio > 0:
            z1 = model(x1)
            z2 = model(x2, pruned=True)
        else:
            z1, z2 = model(torch.cat([x1, x2])).chunk(2)
        loss = nt_xent(common.gather(z1), common.gather(z2), args.tau)
    common.optimizer_step(loss, opt, scaler)
    return loss.detach()


def prototype_step(model, protos: nn.Linear, opt, scaler, x1, x2, args: Args, amp_dtype):
    """Stage 1 (Alg. 1 lines 6-9): z^T = F^T(x) of both views, Eq. (1)-(2) over the global batch,
    update F^T and P. Returns the loss and view 1's embeddings (for the prototype usage)."""
    with common.autocast(x1.device, amp_dtype):
        z1, z2 = model(torch.cat([x1, x2])).chunk(2)
        z1 = common.gather(z1)
        z2 = common.gather(z2)
        loss = prototype_contrastive_loss(z1, z2, protos.weight, args.beta)
    common.optimizer_step(loss, opt, scaler)
    return loss.detach(), z1.detach()


def rebalance_step(student, q, teacher, protos: nn.Linear, opt, scaler, x1, x2, args: Args,
                   amp_dtype):
    """Stage 2 (Alg. 1 lines 14-17): Eq. (3) between q(F^S(x)) and F^T(x') (batch-statistics BN),
    symmetrised over the views, then Eq. (4). The weights are normalised over the global batch;
    the loss is this process's mean (DDP averages). Returns the loss and view 2's weights."""
    with common.autocast(x1.device, amp_dtype):
        p1, p2 = q(student(torch.cat([x1, x2]))).chunk(2)
        with torch.no_grad():
            t1, t2 = teacher(torch.cat([x1, x2])).chunk(2)
    g1 = common.gather(t1)  # the targets of the global batch
    g2 = common.gather(t2)
    if not args.reweight:
        # --no-reweight: uniform weights, a BYOL-style student
        w1 = w2 = torch.ones(g1.shape[0], device=g1.device)
    elif args.weight_view == "mean":
        # both terms of an image weighted by the mean score of its two views (INFERRED)
        w1 = w2 = frequency_weights(torch.stack([g1, g2]), protos.weight, args.clip_sigma,
                                    args.weight_norm)
    else:
        # each term weighted from its target view, phi(z_i^T) as Eq. (3) writes it
        w1 = frequency_weights(g1, protos.weight, args.clip_sigma, args.weight_norm)
        w2 = frequency_weights(g2, protos.weight, args.clip_sigma, args.weight_norm)
    loss = (rebalanced_loss(p1, t2, common.local_part(w2))
            + rebalanced_loss(p2, t1, common.local_part(w1)))  # Eq. (3)
    common.optimizer_step(loss, opt, scaler)
    update_teacher(teacher, student, args.ema_decay)  # Eq. (4)
    return loss.detach(), w2


# ---- One loop per stage; StageLoop keeps what the loops share ---------------------------------

class StageLoop:
    """What the stage loops share: the epochs of each phase (a stage, or Stages 1 and 2 in turns
    under --alternate-every, Table 7), the loader, the per-iteration LR, the augmentation streams,
    the progress line, the kNN monitor, checkpoints (through the harness) and the stage's output
    stage_<stage>.pt. opts = {phase: optimiser}."""

    def __init__(self, run, ds, stage: str, net: Encoder, opts: dict):
        a = run.args
        self.run = run
        self.ds = ds
        self.stage = stage
        self.net = net  # the network this stage hands on
        self.opts = opts
        self.scaler = common.make_scaler(run.amp_dtype)
        configured = {"sdclr": a.sdclr_epochs, "prototypes": a.stage1_epochs,
                      "rebalance": a.stage2_epochs}
        self.n = {}  # epochs of each phase
        for phase in opts:
            n = configured[phase]
            self.n[phase] = max(1, round(n * a.epochs_scale)) if n else 0
        every = a.alternate_every or max(1, *self.n.values())
        # the plan: (phase, epoch of that phase) for every epoch of this stage, in blocks
        self.plan = [(phase, k) for block in range(0, max(self.n.values()), every)
                     for phase in self.n for k in range(block, min(block + every, self.n[phase]))]
        self.epochs = len(self.plan)
        self.loader = data.make_loader(ds.train, a.batch_size, run.device, seed=a.seed,
                                       workers=a.workers, image_size=ds.image_size, shard=True)
        self.iters = len(self.loader)
        self.gen = torch.Generator(run.device)
        self.name = stage
        if stage == "sdclr" and a.prune_ratio == 0:
            self.name = "simclr"  # Stage 0 without pruning is SimCLR
        self.progress = run.progress(self.epochs * self.iters, a.batch_size, self.name)

    def restore(self, parts: dict) -> int:
        """Register the stage's parts with the harness (the optimisers and scaler added); on
        --resume in this stage they are loaded. Returns the epochs done."""
        parts = {**parts, **{f"optimizer_{p}": o for p, o in self.opts.items()},
                 "scaler": self.scaler}
        return self.run.restore(self.stage, parts)[0]

    def batches(self, epoch: int):
        """(view 1, view 2, labels) of the 0-based `epoch` of the plan; each iteration's LR is set
        before its step."""
        a = self.run.args
        phase, e = self.plan[epoch]
        s = STAGES.index(phase)
        total = self.n[phase] * self.iters
        self.loader.set_epoch(e, stream=3 + s)  # streams 0-2 are the views'
        self.gen.manual_seed(common.epoch_seed(a.seed, e, stream=s))
        self.progress.set_epoch(epoch, self.epochs)
        self.loss_sum = torch.zeros((), device=self.run.device)
        self.t0 = time.time()
        warmup = min(a.lr_warmup_epochs * self.iters, total // 10)
        for it, (x, y, _) in enumerate(self.loader):
            self.it = epoch * self.iters + it
            self.lr = common.cosine_lr(e * self.iters + it, total, warmup, a.lr, a.final_lr)
            common.set_lr(self.opts[phase], self.lr)
            x1, x2 = two_views(x, self.gen, self.ds.image_size, self.run.channels_last)
            yield x1, x2, y

    def log(self, loss) -> None:
        self.loss_sum += loss
        self.progress.step(self.it, loss=loss, lr=self.lr)

    def end_epoch(self, epoch: int, record: dict) -> None:
        """The kNN monitor (validation queries, never test) every --knn-every epochs, then the
        harness's end of epoch: loss guard, metrics.jsonl, checkpoint."""
        a = self.run.args
        ds = self.ds
        n = epoch + 1
        record = {**record, "lr": self.lr, "epoch_time_s": time.time() - self.t0}
        every = a.knn_every if a.knn_every is not None else max(1, self.epochs // 20)
        due = every and (n % every == 0 or n == self.epochs)
        if due and ds.probe is not None and ds.val is not None:
            m = evaluation.knn_monitor(self.net.backbone, ds.probe, ds.val, self.run.device,
                                       ds.num_classes, class_rank=ds.class_rank,
                                       class_counts=ds.class_counts, recipe="test_imagenet")
            record["knn"] = {"acc_class_mean": m["acc_class_mean"],
                             "groups_thirds": m["groups_thirds"]}
            print(f"[{self.name}] ep {n} kNN class-mean acc {m['acc_class_mean']:.2f}",
                  flush=True)
        self.run.end_epoch(epoch, self.loss_sum / self.iters, record, self.state(n))

    def state(self, epochs_done: int) -> dict:
        """The method state of a checkpoint: the head's depth and the epochs done per phase."""
        proj_layers = sum(type(m) is nn.Linear for m in self.net.head)
        done = {phase: sum(p == phase for p, _ in self.plan[:epochs_done]) for phase in self.n}
        return {"proj_layers": proj_layers, "epochs": done}

    def finish(self) -> dict:
        """The stage's output: its last checkpoint, also written as stage_<stage>.pt."""
        output = self.run.checkpoint(self.epochs, self.state(self.epochs))
        self.run.save(output, f"stage_{self.stage}.pt")
        return output


def train_sdclr(run, ds) -> dict:
    """Stage 0: SDCLR (SimCLR with --prune-ratio 0), the teacher's initialisation (Alg. 1,
    line 4)."""
    a = run.args
    net = Encoder(a.arch, ds.image_size, a.proj_dim, a.proj_layers, a.prune_ratio > 0, a.dual_bn)
    model = common.prepare_model(net, run.device, a.channels_last, a.compile, ddp=True,
                                 sync_bn=a.sync_bn)
    loop = StageLoop(run, ds, "sdclr", net, {"sdclr": sgd(a, net.parameters())})
    start = loop.restore({"model": net})
    for epoch in range(start, loop.epochs):
        record = {}
        if a.prune_ratio > 0:
            record["mask_kept"] = update_mask(net, a.prune_ratio)
        for x1, x2, _ in loop.batches(epoch):
            loss = sdclr_step(model, loop.opts["sdclr"], loop.scaler, x1, x2, a, run.amp_dtype)
            loop.log(loss)
        loop.end_epoch(epoch, record)
    return loop.finish()


def train_prototypes(run, ds, init: dict | None) -> dict:
    """Stage 1 (Alg. 1 lines 2-10): F^T (from Stage 0) and P learn by Eq. (2). Logs how often each
    prototype is the nearest one (collapse shows as few in use)."""
    a = run.args
    K = a.num_prototypes
    teacher, protos, _ = networks(a, ds.image_size, init)  # q: Stage 2's, unused here
    protos = protos.to(run.device)
    mt = common.prepare_model(teacher, run.device, a.channels_last, a.compile, ddp=True,
                              sync_bn=a.sync_bn)
    opt = sgd(a, teacher.parameters(), no_decay=protos.parameters())
    loop = StageLoop(run, ds, "prototypes", teacher, {"prototypes": opt})
    start = loop.restore({"model": teacher, "prototypes": protos})
    for epoch in range(start, loop.epochs):
        freeze_bn_statistics(teacher, False)
        usage = torch.zeros(K, device=run.device)  # how often each prototype is argmax_k h
        for x1, x2, _ in loop.batches(epoch):
            loss, z1 = prototype_step(mt, protos, opt, loop.scaler, x1, x2, a, run.amp_dtype)
            usage += F.one_hot(prototype_similarities(z1, protos.weight).argmax(1), K).sum(0)
            loop.log(loss)
        loop.end_epoch(epoch, prototype_usage(usage, protos))
    return loop.finish()


def train_rebalance(run, ds, init: dict | None) -> dict:
    """Stage 2 (Alg. 1 lines 11-19): F^S <- F^T learns by Eq. (3), F^T follows by Eq. (4), P is
    frozen (INFERRED). Logs the weights' effective sample size and mean per frequency group."""
    return train_fassl(run, ds, init, ("rebalance",))


def train_alternating(run, ds, init: dict | None) -> dict:
    """Table 7: Stages 1 and 2 in turns of --alternate-every epochs (the period is INFERRED),
    each with its own optimiser and schedule."""
    return train_fassl(run, ds, init, ("prototypes", "rebalance"))


def train_fassl(run, ds, init: dict | None, phases: tuple) -> dict:
    """The loop of Stage 2, alone or alternating with Stage 1 blocks (Table 7)."""
    a = run.args
    dev = run.device
    K = a.num_prototypes
    teacher, protos, q = networks(a, ds.image_size, init)
    if a.sync_bn and dev.type == "cuda" and common.get_rank_world()[1] > 1:
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)  # F^T's BN as F^S's
    student = copy.deepcopy(teacher)
    protos = protos.to(dev)  # P: no DDP
    group = group_of_classes(ds).to(dev)
    # DDP wraps what learns by gradient: F^S and q, and F^T only where Stage 1 trains it
    teacher_learns = "prototypes" in phases
    ms = common.prepare_model(student, dev, a.channels_last, a.compile, ddp=True,
                              sync_bn=a.sync_bn)
    mt = common.prepare_model(teacher, dev, a.channels_last, a.compile, ddp=teacher_learns,
                              sync_bn=a.sync_bn)
    mq = common.prepare_model(q, dev, False, a.compile, ddp=True, sync_bn=a.sync_bn)
    opts = {"rebalance": sgd(a, [*student.parameters(), *q.parameters()])}
    if teacher_learns:
        opts = {"prototypes": sgd(a, teacher.parameters(), no_decay=protos.parameters()), **opts}
    loop = StageLoop(run, ds, "rebalance", student, opts)
    start = loop.restore({"model": student, "teacher": teacher, "predictor": q,
                          "prototypes": protos})
    for epoch in range(start, loop.epochs):
        phase, e = loop.plan[epoch]
        freeze_bn_statistics(teacher, phase != "prototypes")  # Stage 2: only the EMA moves them
        if phase == "rebalance" and e == 0:
            student.load_state_dict(teacher.state_dict())  # Alg. 1 line 12: F^S <- F^T
        usage = torch.zeros(K, device=dev)
        stats = {}
        for x1, x2, y in loop.batches(epoch):
            if phase == "prototypes":
                loss, z1 = prototype_step(mt, protos, opts[phase], loop.scaler, x1, x2, a,
                                          run.amp_dtype)
                usage += F.one_hot(prototype_similarities(z1, protos.weight).argmax(1), K).sum(0)
            else:
                loss, w = rebalance_step(ms, mq, mt, protos, opts[phase], loop.scaler, x1, x2, a,
                                         run.amp_dtype)
                for key, value in weight_stats(w, group[common.gather(y)]).items():
                    stats[key] = stats.get(key, 0) + value
            loop.log(loss)
        if phase == "prototypes":
            record = prototype_usage(usage, protos)
        else:
            record = weight_record(stats, loop.iters)
        if len(phases) > 1:
            record = {"block": phase, **record}
        loop.end_epoch(epoch, record)
    return loop.finish()


def prototype_usage(usage, protos: nn.Linear) -> dict:
    """How the prototypes are used (argmax_k h counts of one epoch) and how alike they are."""
    K = usage.numel()
    p = F.normalize(protos.weight.detach().float(), dim=-1)
    share = usage / usage.sum()
    return {"protos_used": int((share > 0).sum()), "proto_usage_max": float(share.max()),
            "proto_mean_cos": float(((p @ p.T).sum() - K) / max(K * K - K, 1))}


def weight_record(stats: dict, iters: int) -> dict:
    """The epoch's means of weight_stats: ESS, max and min per batch, mean weight per group."""
    w_sum = stats["w_sum"].tolist()
    count = stats["count"].tolist()
    record = {"w_ess": float(stats["ess"]) / iters, "w_max": float(stats["max"]) / iters,
              "w_min": float(stats["min"]) / iters}
    for i, g in enumerate(GROUPS):
        record[f"w_mean_{g}"] = w_sum[i] / max(count[i], 1)
    return record


def group_of_classes(ds) -> torch.Tensor:
    """Class id -> 0 Frequent / 1 Medium / 2 Rare: thirds of the classes by count (Sec. 4.1)."""
    thirds = evaluation.group_masks(ds.class_counts, ds.class_rank)["thirds"]
    groups = []
    for c in range(ds.num_classes):
        if c in thirds["many"]:
            groups.append(0)
        elif c in thirds["medium"]:
            groups.append(1)
        else:
            groups.append(2)
    return torch.tensor(groups)


# ---- Evaluation: probes, t-SNE, the prototypes' nearest images, the report --------------------

def probe(backbone_state: dict, args: Args, ds, device, amp_dtype) -> dict:
    """SDCLR linear probes (Tables 1-2) with eval.py's probe settings
    (docs/evaluation.md): {mode: result}."""
    bb = common.build_backbone(args.arch, ds.image_size)
    bb.load_state_dict(backbone_state)
    bb = common.prepare_model(bb, device, args.channels_last)
    return evaluation.run_probes(bb, ds, args.probe, device, amp_dtype, aug=args.probe_aug,
                                 epochs=args.probe_epochs, seed=args.seed)


def backbone_of(output: dict, part: str = "model") -> dict:
    """The backbone state of a network in a stage's output."""
    return evaluation.submodule_state(output[part], "backbone")


def tsne_figures(run, ds, **backbones) -> dict:
    """Fig. 3: t-SNE of the L2-normalised features of the test images of five classes, head to
    tail (the two most frequent, the middle one, the two rarest; INFERRED): tsne_<network>.png for
    each backbone state."""
    n = ds.num_classes
    order = sorted(range(n), key=lambda c: -ds.class_counts[c])
    pick = [order[i] for i in sorted({0, 1, n // 2, n - 2, n - 1}) if 0 <= i < n]
    for name, state in backbones.items():
        bb = common.build_backbone(run.args.arch, ds.image_size)
        bb.load_state_dict(state)
        f, y = evaluation.extract_features(bb.to(run.device), ds.test, run.device, run.amp_dtype,
                                           recipe="test_imagenet")
        keep = [(i, pick.index(c)) for i, c in enumerate(y.tolist()) if c in pick]
        feats = F.normalize(f[[i for i, _ in keep]], dim=-1)
        names = [ds.class_names[c] for c in pick]
        evaluation.plot_tsne(feats, [c for _, c in keep], run.run_dir / f"tsne_{name}.png",
                             class_names=names, title=f"t-SNE of the {name} backbone's features")
    return {"classes": [ds.class_names[c] for c in pick],
            "files": [f"tsne_{name}.png" for name in backbones]}


@torch.no_grad()
def prototype_analysis(stage1: dict, run, ds) -> dict:
    """Sec. 4.5: each prototype's nearest training image (Stage-1 F^T and P, no augmentation;
    INFERRED), the group shares (Tables 4-5), prototype_grid.png: a tile per prototype, by group,
    then class (Fig. 4)."""
    import matplotlib.pyplot as plt
    teacher, protos, _ = networks(run.args, ds.image_size, stage1)
    dev = run.device
    z, labels = evaluation.extract_features(teacher.to(dev), ds.train, dev, run.amp_dtype,
                                            recipe="test_imagenet")
    nearest = prototype_similarities(z, protos.weight.to(dev)).argmax(0).cpu()  # argmax_i p_k.z_i
    cls = labels.cpu()[nearest]
    grp = group_of_classes(ds)[cls]
    k = len(cls)
    share = {g: 100.0 * float((grp == i).sum()) / k for i, g in enumerate(GROUPS)}
    order = sorted(range(k), key=lambda j: (int(grp[j]), int(cls[j])))
    if ds.train.x is not None:
        imgs = ds.train.x[nearest]
    else:  # list datasets: decoded here, at 96 px
        imgs = data._decode_all([ds.train.files[i] for i in nearest.tolist()], 96)
    rows = -(-k // 16)
    fig, axes = plt.subplots(rows, 16, figsize=(14.4, rows), squeeze=False)
    for ax, j in zip(axes.flat, order + [None] * (axes.size - k)):
        ax.axis("off")
        if j is not None:
            ax.imshow(imgs[j].permute(1, 2, 0).numpy())
            ax.set_title(ds.class_names[cls[j]][:10], fontsize=5, color=("C0", "C1", "C3")[grp[j]])
    fig.suptitle("Prototype -> nearest training image (Fig. 4). Frequent {frequent:.1f}% / Medium "
                 "{medium:.1f}% / Rare {rare:.1f}%".format(**share), fontsize=8)
    fig.savefig(run.run_dir / "prototype_grid.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    counts = {g: round(v * k / 100) for g, v in share.items()}
    rules = weight_rules(z, labels, protos.weight.to(dev), ds, run)
    return {"K": k, "share_percent": share, "counts": counts,
            "nearest_index": nearest.tolist(), "nearest_class": cls.tolist(),
            "per_class": torch.bincount(cls, minlength=ds.num_classes).tolist(),
            "weight_rules": rules}


WEIGHT_RULES = ("zscore", "fixed", "literal")


@torch.no_grad()
def weight_rules(z, labels, prototypes, ds, run) -> dict:
    """What each --weight-norm rule makes of Eq. (3) with the Stage-1 teacher and prototypes: the
    training set's embeddings in random batches of --batch-size (as Stage 2 sees them), the mean
    weight per frequency group, the effective sample size and w_max / w_min per batch, averaged;
    weight_rules.png draws the group means (Lab 3)."""
    a = run.args
    group = group_of_classes(ds).to(labels.device)[labels]
    order = torch.randperm(len(z), generator=torch.Generator().manual_seed(a.seed)).to(z.device)
    batches = [order[i:i + a.batch_size] for i in range(0, len(z) - a.batch_size + 1, a.batch_size)]
    if not batches:
        batches = [order]
    out = {}
    for rule in WEIGHT_RULES:
        stats = {}
        for idx in batches:
            w = frequency_weights(z[idx], prototypes, a.clip_sigma, rule)
            for key, value in weight_stats(w, group[idx]).items():
                stats[key] = stats.get(key, 0) + value
        out[rule] = weight_record(stats, len(batches))
        out[rule]["w_max_over_min"] = out[rule]["w_max"] / max(out[rule]["w_min"], 1e-30)
    if common.is_main():
        plot_weight_rules(out, run.run_dir / "weight_rules.png", run.label)
    return out


def plot_weight_rules(rules: dict, path, method: str) -> None:
    """Bars: the mean Eq. (3) weight of each frequency group under each --weight-norm rule."""
    plt, fig, ax = evaluation.figure((7.5, 4))
    width = 0.8 / len(rules)
    for i, (rule, r) in enumerate(rules.items()):
        xs = [g + (i - (len(rules) - 1) / 2) * width for g in range(len(GROUPS))]
        means = [r[f"w_mean_{g}"] for g in GROUPS]
        label = f"{rule} (ESS {r['w_ess']:.0f}, max/min {r['w_max_over_min']:.3g})"
        ax.bar(xs, means, width, label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xticks=range(len(GROUPS)), xticklabels=[g.capitalize() for g in GROUPS],
           ylabel="mean weight (batch mean 1)", yscale="log",
           title=f"{method}: Eq. (3) weights per frequency group, by rule")
    # plain numbers on the log axis (0.95, 1.3), not powers of ten
    ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(plt.FormatStrFormatter("%.3g"))
    ax.legend(title="--weight-norm", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    evaluation.save_figure(plt, fig, path)


def read_metrics(run_dir) -> list[dict]:
    """The lines of the run's metrics.jsonl (written by process 0 only; [] elsewhere)."""
    if not common.is_main():
        return []
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def report(run, ds, stages: list, outputs: dict, init: dict | None):
    """Probes (the first is the headline), teacher probe, t-SNE, prototype analysis ->
    results.json, and the final table."""
    args = run.args
    analyze = args.analyze and common.is_main()  # process 0 writes the files
    last = outputs[stages[-1]]
    probes = probe(backbone_of(last), args, ds, run.device, run.amp_dtype)
    head = next(iter(probes.values()), None)
    network = {"sdclr": "backbone (SDCLR dense branch)" if args.prune_ratio > 0 else "backbone",
               "prototypes": "teacher", "rebalance": "student"}[stages[-1]]
    epochs = {}
    for i, s in enumerate(STAGES):
        epochs[f"stage{i}"] = sum(o["state"]["epochs"].get(s, 0) for o in outputs.values())
    epochs["probe"] = head["probe"]["epochs"] if head else 0
    results = run.results(head["protocol"] if head else "none", network, epochs)
    if head:
        results.update({k: head[k] for k in ("selection", "at_selected", "at_last")})
        results["extra"]["probe_variant"] = head["variant"]
    rows = read_metrics(run.run_dir)
    results["knn"] = [{"stage": r["stage"], "epoch": r["epoch"], **r["knn"]}
                      for r in rows if "knn" in r]
    keys = ("protocol", "variant", "selection", "at_selected", "at_last", "probe")  # per probe
    for mode, r in probes.items():
        results["extra"][f"probe_{mode}"] = {k: r[k] for k in keys}
    if args.probe_teacher and stages[-1] == "rebalance" and args.probe:
        teacher_probes = probe(backbone_of(last, "teacher"), args, ds, run.device, run.amp_dtype)
        results["extra"]["teacher_probe"] = {
            mode: {k: r[k] for k in ("selection", "at_selected")}
            for mode, r in teacher_probes.items()}
    sdclr = outputs.get("sdclr")
    if sdclr is None and init is not None and init.get("stage") == "sdclr":
        sdclr = init
    if analyze and stages[-1] == "rebalance" and sdclr:  # Fig. 3: FASSL against SDCLR
        results["extra"]["tsne"] = tsne_figures(run, ds, student=backbone_of(last),
                                                sdclr=backbone_of(sdclr))
    stage1 = outputs.get("prototypes")
    if stage1 is None and stages == ["rebalance"] and not args.alternate_every:
        stage1 = init
    if analyze and stage1 is not None and "prototypes" in stage1:  # Stage-1 F^T and P
        res = results["extra"]["prototypes"] = prototype_analysis(stage1, run, ds)
        print("prototypes: " + " / ".join(f"{g} {v:.2f}%" for g, v in res["share_percent"].items()))
        print("Eq. (3) weights by rule (mean per group frequent / medium / rare; ESS of "
              f"{args.batch_size}):")
        for rule, r in res["weight_rules"].items():
            means = " / ".join(f"{r[f'w_mean_{g}']:.2f}" for g in GROUPS)
            print(f"  {rule:8s} {means} | ESS {r['w_ess']:.0f} | w_max/w_min "
                  f"{r['w_max_over_min']:.3g}")
    if not head:
        run.finish(results, "ssl", rows=[])
        return run.run_dir
    table = [(f"{run.label} ({mode})", r["at_selected"]) for mode, r in probes.items()]
    run.finish(results, head["probe"]["row"], table)
    return run.run_dir


# ---- Defaults per dataset, and the paper's numbers ---------------------------------------------

LIST_224PX = ("imagenet100-lt", "places-lt", "imagenet-lt", "inat2018")
# SDCLR's CIFAR (<= 64 px) and ImageNet-100-LT (224 px) recipes and seeds; synthetic-lt: a CPU demo.
DEFAULTS = {
    "*": {"protocol": "sdclr", "seed": 0, "arch": "resnet18", "prune_ratio": 0.9, "tau": 0.2,
          "batch_size": 512, "sdclr_epochs": 2000, "stage1_epochs": 100, "stage2_epochs": 200,
          "probe_aug": "crop"},
    LIST_224PX: {"arch": "resnet50", "prune_ratio": 0.3, "batch_size": 256, "sdclr_epochs": 500},
    ("cifar10-lt", "cifar100-lt"): {"seed": 10},
    "imagenet100-lt": {"seed": 1},
    "synthetic-lt": {"arch": "resnet8", "n_max": 500, "batch_size": 128, "sdclr_epochs": 30,
                     "stage1_epochs": 10, "stage2_epochs": 15, "knn_every": 0, "probe_aug": "none"},
}


def derived_defaults(args: Args) -> dict:
    """The defaults that depend on other flags; each is set only where its flag is not given."""
    out = {"proj_layers": 3 if args.prune_ratio > 0 else 2}  # SDCLR's head; SimCLR's has 2
    if args.dataset in LIST_224PX:
        out["tau"] = 0.3 if args.prune_ratio > 0 else 0.2  # SDCLR's 224-px scripts; SimCLR 0.2
    return out


# The All column (thirds' group mean) of the full-shot probe of the paper's rows: {(dataset,
# variant): {rho: All}}; the list datasets have no rho (None). Table 1 (FASSL, SDCLR, SimCLR,
# BYOL-dagger), Table 3 (K, EMA decay), Table 6 (Places-LT), Table 7 (alternating; All derived from
# its groups), Table 8 (ResNet-34), Table 9 (initialisation).
SDCLR_ROW = "--stage sdclr"
SIMCLR_ROW = "--stage sdclr --prune-ratio 0.0"
BYOL_ROW = "--stage rebalance --init scratch --no-reweight --stage2-epochs 2000"
PAPER_ALL = {
    ("cifar10-lt", "default"): {100.0: 80.69},
    ("cifar10-lt", SDCLR_ROW): {100.0: 80.49},
    ("cifar10-lt", SIMCLR_ROW): {100.0: 75.37},
    ("cifar10-lt", BYOL_ROW): {100.0: 75.66},
    ("cifar10-lt", "--num-prototypes 64"): {100.0: 80.69},
    ("cifar10-lt", "--num-prototypes 96"): {100.0: 80.81},
    ("cifar10-lt", "--num-prototypes 256"): {100.0: 80.79},
    ("cifar10-lt", "--num-prototypes 512"): {100.0: 80.69},
    ("cifar10-lt", "--ema-decay 0.0"): {100.0: 49.74},
    ("cifar10-lt", "--ema-decay 0.9"): {100.0: 79.74},
    ("cifar10-lt", "--ema-decay 0.999"): {100.0: 80.16},
    ("cifar10-lt", "--ema-decay 1.0"): {100.0: 79.63},
    ("cifar10-lt", "--init scratch"): {100.0: 76.11},
    ("cifar10-lt", "--prune-ratio 0.0"): {100.0: 76.42},
    ("cifar100-lt", "default"): {100.0: 55.27},
    ("cifar100-lt", SDCLR_ROW): {100.0: 54.94},
    ("cifar100-lt", SIMCLR_ROW): {100.0: 49.76},
    ("cifar100-lt", BYOL_ROW): {100.0: 48.86},
    ("cifar100-lt", "--num-prototypes 64"): {100.0: 54.94},
    ("cifar100-lt", "--num-prototypes 96"): {100.0: 54.99},
    ("cifar100-lt", "--num-prototypes 256"): {100.0: 54.99},
    ("cifar100-lt", "--num-prototypes 512"): {100.0: 55.22},
    ("cifar100-lt", "--ema-decay 0.0"): {100.0: 33.35},
    ("cifar100-lt", "--ema-decay 0.9"): {100.0: 53.63},
    ("cifar100-lt", "--ema-decay 0.999"): {100.0: 55.02},
    ("cifar100-lt", "--ema-decay 1.0"): {100.0: 53.00},
    ("cifar100-lt", "--alternate-every 10"): {100.0: 55.07},
    ("cifar100-lt", "--arch resnet34"): {100.0: 54.19},
    ("tiny-imagenet-lt", "default"): {100.0: 45.85},
    ("tiny-imagenet-lt", SDCLR_ROW): {100.0: 45.23},
    ("tiny-imagenet-lt", SIMCLR_ROW): {100.0: 32.11},
    ("tiny-imagenet-lt", BYOL_ROW): {100.0: 37.58},
    ("tiny-imagenet-lt", "--num-prototypes 64"): {100.0: 45.80},
    ("tiny-imagenet-lt", "--num-prototypes 96"): {100.0: 45.50},
    ("tiny-imagenet-lt", "--num-prototypes 256"): {100.0: 46.11},
    ("tiny-imagenet-lt", "--num-prototypes 512"): {100.0: 45.72},
    ("tiny-imagenet-lt", "--ema-decay 0.0"): {100.0: 30.70},
    ("tiny-imagenet-lt", "--ema-decay 0.9"): {100.0: 45.86},
    ("tiny-imagenet-lt", "--ema-decay 0.999"): {100.0: 45.75},
    ("tiny-imagenet-lt", "--ema-decay 1.0"): {100.0: 45.83},
    ("imagenet100-lt", "default"): {None: 68.92},
    ("imagenet100-lt", SDCLR_ROW): {None: 66.48},
    ("imagenet100-lt", SIMCLR_ROW): {None: 65.46},
    ("places-lt", "default"): {None: 22.89},
    ("places-lt", SDCLR_ROW): {None: 21.50},
}


# ---- Benchmark and main -------------------------------------------------------------------------

def benchmark_steps(args: Args, image_size: int, num_classes: int, device, amp_dtype) -> dict:
    """--benchmark: each stage's training step (forward, backward, update) on two_views' views."""
    amp = amp_dtype
    scaler = common.make_scaler(amp)
    cl = args.channels_last and device.type == "cuda"
    gen = torch.Generator(device).manual_seed(0)
    net = Encoder(args.arch, image_size, args.proj_dim, args.proj_layers, args.prune_ratio > 0,
                  args.dual_bn)
    teacher, protos, q = networks(args, image_size, None)
    m0 = common.prepare_model(net, device, args.channels_last, args.compile)
    mt = common.prepare_model(teacher, device, args.channels_last, args.compile)
    ms = common.prepare_model(copy.deepcopy(teacher), device, args.channels_last, args.compile)
    mq = common.prepare_model(q, device, False, args.compile)
    protos = protos.to(device)
    o0 = sgd(args, net.parameters())
    o1 = sgd(args, teacher.parameters(), protos.parameters())
    o2 = sgd(args, [*ms.parameters(), *q.parameters()])

    def views(x, y):
        return two_views(x, gen, image_size, cl)

    def sdclr(inputs):
        return sdclr_step(m0, o0, scaler, *inputs, args, amp)

    def prototypes(inputs):
        return prototype_step(mt, protos, o1, scaler, *inputs, args, amp)[0]

    def rebalance(inputs):
        return rebalance_step(ms, mq, mt, protos, o2, scaler, *inputs, args, amp)[0]
    recipe = "simclr_cifar" if image_size <= 64 else "mocov2_imagenet"
    reference = functools.partial(data.reference_two_views, recipe=recipe, image_size=image_size)
    stage0 = "sdclr" if args.prune_ratio > 0 else "simclr"
    steps = {stage0: sdclr, "prototypes": prototypes, "rebalance": rebalance}
    return {name: harness.BenchStep(views, step, reference) for name, step in steps.items()}


def stages_to_run(args: Args) -> list[str]:
    """The stages of this command in Alg. 1's order. --stage all: SDCLR, prototypes, re-balance;
    with --init (a previous stage's output, or scratch) SDCLR does not run and Stage 1 starts from
    it (Table 9); with --alternate-every Stages 1 and 2 run as one alternating stage (Table 7)."""
    if args.stage != "all":
        return [args.stage]
    stages = list(STAGES)
    if args.init is not None:
        stages.remove("sdclr")
    if args.alternate_every:
        stages.remove("prototypes")
    return stages


def method_name(args: Args) -> str:
    """What the run trains: sdclr / simclr (Stage 0 alone), fassl-prototypes (Stage 1 alone), fassl,
    fassl-uniform (Stage 2 without Eq. (3)'s weights) or byol (the same from a random start, the
    BYOL-dagger rows)."""
    if args.stage == "sdclr":
        return "simclr" if args.prune_ratio == 0 else "sdclr"
    if args.stage == "prototypes":
        return "fassl-prototypes"
    if args.reweight:
        return "fassl"
    if args.stage == "rebalance" and args.init == "scratch":
        return "byol"
    return "fassl-uniform"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    argv = [word for a in argv for word in (["--init", "scratch"] if a == "--no-init" else [a])]
    args, filled = harness.parse_args(Args, argv, DEFAULTS, derived_defaults)
    if args.benchmark:
        return harness.benchmark(args, benchmark_steps)
    run = harness.Run(method_name, args, filled, DEFAULTS, derived_defaults, PAPER_ALL,
                      "groups_thirds.group_mean")
    args = run.args
    ds = data.load_dataset(args.dataset, args.data_dir, imb_ratio=args.imb_ratio,
                           protocol=args.protocol, seed=args.data_seed, split=args.split,
                           split_file=args.split_file, sdclr_split_dir=args.sdclr_split_dir,
                           num_classes=args.num_classes, n_max=args.n_max,
                           synthetic_n_test=args.synthetic_n_test)
    stages = stages_to_run(args)
    if args.init is None and stages[0] != "sdclr":
        raise UserError(f"--stage {stages[0]} needs a teacher: --init <previous stage's .pt> or "
                        "--no-init")
    init = None
    if args.init not in (None, "scratch"):
        init = data.load_checkpoint(args.init, flag="--init")
    stage2_alone = stages[0] == "rebalance" and not args.alternate_every
    if stage2_alone and args.reweight and init is not None and "prototypes" not in init:
        raise UserError(f"--init {args.init} has no prototypes: give a stage_prototypes.pt or "
                        "--no-reweight")
    run.start(ds, f"{args.arch} | stages {' -> '.join(stages)} | batch {args.batch_size} | lr "
                  f"{args.lr}")
    outputs = {}
    prev = init
    for stage in stages:
        finished = run.run_dir / f"stage_{stage}.pt"
        if run.ckpt is not None and finished.is_file():  # done before this --resume
            prev = data.load_checkpoint(finished)
            run.restore(stage, {})  # the RNG state the next stage starts from
        elif stage == "sdclr":
            prev = train_sdclr(run, ds)
        elif stage == "prototypes":
            prev = train_prototypes(run, ds, prev)
        elif args.alternate_every:
            prev = train_alternating(run, ds, prev)
        else:
            prev = train_rebalance(run, ds, prev)
        outputs[stage] = prev
    with run.reporting("linear"):
        return report(run, ds, stages, outputs, init)


if __name__ == "__main__":
    harness.main_guard(main)
