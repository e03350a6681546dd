"""FASSL: Frequency-Aware Self-Supervised Long-Tailed Learning (Lin, Chen, Wang, ICCV-W 2023).

Three stages on unlabelled long-tailed images (Alg. 1). Stage 0, SDCLR (Jiang et al. 2021), initialises the
teacher F^T. Stage 1 (Sec. 3.2.1) learns K prototypes P with F^T by contrasting the images' similarities
h = P z to them: most end up on frequent classes. Stage 2 (Sec. 3.2.2): a student F^S + predictor regresses
the EMA teacher's embedding, each image weighted by phi = 1/exp(sum_k <z^T, p_k>): rare-looking ones more.

  Paper              What                                       Here
  SDCLR [15]         NT-Xent; global magnitude mask, own BN     nt_xent, update_mask, Encoder
  Eq. (1)            h_i = P z_i^T                              prototype_similarities
  Eq. (2)            L_contra on the h vectors, temperature     prototype_contrastive_loss
  Eq. (3), Sec. 4.2  phi(z^T, P), clipped, normalised           frequency_weights
  Eq. (3)            L_reb = E[phi ||n(z~^S) - n(z^T)||^2]      rebalanced_loss
  Eq. (4)            theta_T <- tau theta_T + (1-tau) theta_S   update_teacher
  Alg. 1             a training step per stage                  sdclr_step, prototype_step, rebalance_step
  Alg. 1             a loop per stage                           train_sdclr, train_prototypes, train_rebalance
  Tables 1-2         full and 1 % few-shot linear probes        probe
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

STAGES = ("sdclr", "prototypes", "rebalance")


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
    init: str | None = arg(None, "start of the first stage (Alg. 1 lines 4, 12; --stage all skips Stage 0): "
                           "a stage_<previous>.pt; scratch = random (Table 9); --no-init = --init scratch")
    stop_after_epochs: int | None = arg(None, "debug: stop after N epochs", check=">=0", runtime=True)
    arch: str | None = arg(None, "backbone (Sec. 4.2; Table 8: resnet34)", choices=list(common.ARCHS))
    proj_dim: int = arg(128, "embedding and prototype dimension D (SDCLR's head)", check=">=1")
    proj_layers: int | None = arg(None, "head Linear layers: 3 SDCLR, 2 SimCLR (SDCLR code)", check=">=1")
    prune_ratio: float | None = arg(None, "SDCLR global prune ratio; 0 = SimCLR (Table 1)", check="[0,1)")
    dual_bn: bool = arg(True, "own BatchNorm set for the pruned branch (SDCLR code)")
    tau: float | None = arg(None, "Stage-0 NT-Xent temperature (SDCLR; 224-px SDCLR: 0.3)", check=">0")
    num_prototypes: int = arg(128, "K prototypes (Sec. 4.4; Table 3 left)", check=">=1")
    beta: float = arg(0.2, "temperature beta of Eq. (2) (Sec. 4.2)", check=">0")
    predictor_hidden: int = arg(512, "hidden width of the predictor (paper: 'a MLP'; INFERRED)", check=">=1")
    ema_decay: float = arg(0.99, "EMA decay tau of Eq. (4), every step (Table 3 right)", check="[0,1]")
    reweight: bool = arg(True, "phi weights of Eq. (3); --no-reweight = uniform (the BYOL-dagger rows)")
    clip_sigma: float = arg(2.0, "clip Eq. (3) scores at mean +- c std (Sec. 4.2; INFERRED)", check=">=0")
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
    analyze: bool = arg(True, "prototype analysis: Sec. 4.5, Tables 4-5, Fig. 4", runtime=True)


# Defaults: SDCLR's CIFAR recipe at <= 64 px, its ImageNet-100-LT recipe at 224 px; synthetic-lt: a CPU demo.
SMALL = {"arch": "resnet18", "prune_ratio": 0.9, "tau": 0.2, "batch_size": 512, "sdclr_epochs": 2000}
LARGE = {"arch": "resnet50", "prune_ratio": 0.3, "tau": lambda a: 0.3 if a.prune_ratio > 0 else 0.2,
         "batch_size": 256, "sdclr_epochs": 500}
SYNTHETIC_DEMO = {"arch": "resnet8", "batch_size": 128, "sdclr_epochs": 30, "stage1_epochs": 10,
                  "stage2_epochs": 15, "knn_every": 0, "probe_aug": "none"}
LIST_224PX = ("imagenet100-lt", "places-lt", "imagenet-lt", "inat2018")
DEFAULTS = {"*": {"protocol": "sdclr", **SMALL, "stage1_epochs": 100, "stage2_epochs": 200,
                  "probe_aug": "crop", "proj_layers": lambda a: 3 if a.prune_ratio > 0 else 2},
            LIST_224PX: LARGE, "synthetic-lt": SYNTHETIC_DEMO}


# What the paper and SDCLR fix. Flags that pick a row (--stage, --init, --no-reweight) are free; one_of: any
# value the paper reports (SimCLR; Tables 3, 5, 8). BYOL-dagger: Stage 2 as long as Stage 0 (INFERRED).
one_of = lambda name, values: lambda a: getattr(a, name) if getattr(a, name) in values else values[0]  # noqa
RECIPE = {"proj_dim": 128, "proj_layers": lambda a: 3 if a.prune_ratio > 0 else 2, "dual_bn": True,
          "num_prototypes": 128, "beta": 0.2, "predictor_hidden": 512, "ema_decay": 0.99, "clip_sigma": 2.0,
          "lr": 0.5, "final_lr": 1e-6, "momentum": 0.9, "weight_decay": 1e-4, "lr_warmup_epochs": 10,
          "stage1_epochs": 100, "epochs_scale": 1.0, "probe_aug": "crop", "probe_epochs": None,
          "stage2_epochs": lambda a: a.sdclr_epochs if a.init == "scratch" and not a.reweight else 200}
TABLE3 = {**RECIPE, **SMALL, "prune_ratio": one_of("prune_ratio", (0.9, 0.0)),
          "num_prototypes": one_of("num_prototypes", (128, 64, 96, 256, 512)),
          "ema_decay": one_of("ema_decay", (0.99, 0.0, 0.9, 0.999, 1.0))}
CIFAR = {**TABLE3, "protocol": "sdclr", "split": 1, "data_seed": 0, "imb_ratio": 100.0}
PAPER = {"cifar10-lt": CIFAR, "cifar100-lt": {**CIFAR, "arch": one_of("arch", ("resnet18", "resnet34"))},
         "tiny-imagenet-lt": {**TABLE3, "imb_ratio": one_of("imb_ratio", (100.0, 1.0, 20.0, 200.0, 500.0))},
         ("imagenet100-lt", "places-lt"): {**RECIPE, **LARGE, "prune_ratio": one_of("prune_ratio", (.3, 0))}}


# ---- Model pieces ------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """F(x) = head(backbone(x)), optionally with SDCLR's pruned twin: the backbone convs masked (w * m gets
    the gradient) and its own BN set in backbone and head, swapped in by functional_call."""

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


def teacher_from(args: Args, image_size: int, init: dict | None) -> tuple[Encoder, nn.Linear]:
    """F^T and P (rows p_k; N(0, 1) at first, Alg. 1 line 3, INFERRED) from a stage's output or random."""
    teacher = Encoder(args.arch, image_size, args.proj_dim, init["proj_layers"] if init else args.proj_layers)
    protos = nn.Linear(args.proj_dim, args.num_prototypes, bias=False)
    nn.init.normal_(protos.weight)
    for name, part in [("backbone", teacher.backbone), ("head", teacher.head), ("prototypes", protos)]:
        if name in (init or {}):
            part.load_state_dict(init[name])
    return teacher, protos


def predictor(args: Args) -> nn.Module:
    """q of Stage 2: Linear(D, 512)-BN-ReLU-Linear(512, D) (paper: 'a MLP'; sizes INFERRED)."""
    return common.projection_mlp(args.proj_dim, args.predictor_hidden, args.proj_dim, num_layers=2)


# ---- Losses (pure functions; fp32 inside, safe under bf16 / fp16 autocast) ---------------------------------
def prototype_similarities(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. (1): h_i = P^ z^_i, cosines to the K prototypes (normalised on use, INFERRED): (B, K), fp32."""
    with torch.autocast(z.device.type, enabled=False):
        return F.normalize(z.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


def prototype_contrastive_loss(z1, z2, prototypes, beta: float = 0.2) -> torch.Tensor:
    """Eq. (2): L_contra = NT-Xent on the h vectors of the two views (SimCLR's denominator, INFERRED)."""
    return nt_xent(prototype_similarities(z1, prototypes), prototype_similarities(z2, prototypes), beta)


@torch.no_grad()
def frequency_weights(z_teacher, prototypes, clip_sigma: float = 2.0) -> torch.Tensor:
    """Eq. (3) weight phi = 1 / exp(sum_k <z^T, p_k>), clipped and normalised per batch (Sec. 4.2; rule
    INFERRED): s_i = z^_i . sum_k p^_k in [-K, K], s~ = clamp(s, mu -+ c sigma) (population std), w = B
    softmax(-s~) = phi~ / mean(phi~), in log space (phi itself overflows: exp(128)). No gradient (teacher)."""
    with torch.autocast(z_teacher.device.type, enabled=False):
        s = F.normalize(z_teacher.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).sum(0)
    if clip_sigma > 0:                                                      # sigma = 0: a no-op
        mu, sigma = s.mean(), s.std(unbiased=False)
        s = torch.clamp(s, min=mu - clip_sigma * sigma, max=mu + clip_sigma * sigma)
    return s.numel() * torch.softmax(-s, dim=0)


def rebalanced_loss(p_student, z_teacher, weights) -> torch.Tensor:
    """Eq. (3): L_reb = mean_i w_i ||p_i/||p_i|| - z_i/||z_i|| ||^2 (= 2 - 2 cos); z^T is a fixed target."""
    p, z = F.normalize(p_student.float(), dim=-1), F.normalize(z_teacher.detach().float(), dim=-1)
    return (weights.detach().float() * (2 - 2 * (p * z).sum(-1))).mean()


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Eq. (4): theta_T <- tau theta_T + (1 - tau) theta_S every step; BN statistics too (INFERRED)."""
    common.ema_update(teacher, student, decay, buffers="ema")


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
        loss = nt_xent(z1, z2, args.tau)
    sgd_step(loss, opt, scaler)
    return loss.detach()


def prototype_step(model, protos: nn.Linear, opt, scaler, x1, x2, args: Args, amp_dtype):
    """Stage 1 (Alg. 1 lines 6-9): z^T = F^T(x) of both views, Eq. (1)-(2), update F^T and P."""
    with common.autocast(x1.device, amp_dtype):
        z1, z2 = model(torch.cat([x1, x2])).chunk(2)
        loss = prototype_contrastive_loss(z1, z2, protos.weight, args.beta)
    sgd_step(loss, opt, scaler)
    return loss.detach(), z1.detach()


def rebalance_step(student, q, teacher, protos: nn.Linear, opt, scaler, x1, x2, args: Args, amp_dtype):
    """Stage 2 (Alg. 1 lines 14-17): Eq. (3) between q(F^S(x)) and F^T(x') (train-mode BN), symmetrised over
    the views, each term weighted from its own target (INFERRED); then Eq. (4)."""
    with common.autocast(x1.device, amp_dtype):
        p1, p2 = q(student(torch.cat([x1, x2]))).chunk(2)
        with torch.no_grad():
            t1, t2 = teacher(torch.cat([x1, x2])).chunk(2)
    w1, w2 = (frequency_weights(t, protos.weight, args.clip_sigma) if args.reweight    # --no-reweight:
              else torch.ones(len(t), device=t.device) for t in (t1, t2))             # BYOL-style
    loss = rebalanced_loss(p1, t2, w2) + rebalanced_loss(p2, t1, w1)
    sgd_step(loss, opt, scaler)
    update_teacher(teacher, student, args.ema_decay)
    return loss.detach(), w2


# ---- One loop per stage; StageLoop holds the epoch / checkpoint plumbing they share ------------------------
class StageLoop:
    """A stage's epochs, exact resume, loader, per-iteration LR, augmentation stream, progress, kNN monitor,
    run.end_epoch (loss guard, checkpoint), --stop-after-epochs (run.args counts down), stage_<stage>.pt."""

    def __init__(self, run, ds, stage: str, parts: dict, net: Encoder, opt):
        self.run, self.ds, self.stage, self.parts, self.net, self.opt = run, ds, stage, parts, net, opt
        a, self.done, self.stream = run.args, 0, STAGES.index(stage)
        n = {"sdclr": a.sdclr_epochs, "prototypes": a.stage1_epochs, "rebalance": a.stage2_epochs}[stage]
        self.epochs = max(1, round(n * a.epochs_scale)) if n else 0
        self.scaler = common.make_scaler(run.amp_dtype)
        self.loader = data.make_loader(ds.train, a.batch_size, run.device, seed=a.seed, workers=a.workers,
                                       image_size=ds.image_size)
        self.iters, self.gen = len(self.loader), torch.Generator(run.device)
        self.total = self.epochs * self.iters
        self.warmup = min(a.lr_warmup_epochs * self.iters, self.total // 10)
        self.progress = run.progress(self.total, a.batch_size, stage)
        if run.ckpt is not None and run.ckpt["stage"] == stage:              # exact mid-stage resume
            ck = run.restore()
            for name, module in [*parts.items(), ("optimizer", opt), ("scaler", self.scaler)]:
                module.load_state_dict(ck[name])
            self.done = ck["epoch"]

    def __iter__(self):
        for epoch in range(self.done, self.epochs):
            if self.run.args.stop_after_epochs == 0:
                return print(f"[{self.stage}] stopped before epoch {epoch + 1} (--stop-after-epochs); "
                             f"continue with --resume {self.run.run_dir}", flush=True)
            yield epoch

    def batches(self, epoch: int):          # (view 1, view 2, labels); each iteration's LR before its step
        a = self.run.args
        self.loader.set_epoch(epoch, stream=3 + self.stream)                 # streams 0-2: the views'
        self.gen.manual_seed(common.epoch_seed(a.seed, epoch, stream=self.stream))
        self.progress.set_epoch(epoch + 1, self.epochs)
        self.loss_sum, self.t0 = torch.zeros((), device=self.run.device), time.time()
        for it, (x, y, _) in enumerate(self.loader):
            self.it = epoch * self.iters + it
            self.lr = common.cosine_lr(self.it, self.total, self.warmup, a.lr, a.final_lr)
            common.set_lr(self.opt, self.lr)
            yield (*two_views(x, self.gen, self.ds.image_size, a.channels_last), y)

    def log(self, loss) -> None:
        self.loss_sum += loss
        self.progress.step(self.it, loss=loss, lr=self.lr)

    def end_epoch(self, epoch: int, record: dict) -> None:
        a, ds, n = self.run.args, self.ds, epoch + 1
        record = {"stage": self.stage, **record, "lr": self.lr, "epoch_time_s": time.time() - self.t0}
        every = a.knn_every if a.knn_every is not None else max(1, self.epochs // 20)
        if every and (n % every == 0 or n == self.epochs) and ds.probe is not None and ds.val is not None:
            m = evaluation.knn_monitor(self.net.backbone, ds.probe, ds.val, self.run.device, ds.num_classes,
                                       recipe="test_imagenet", class_counts=ds.class_counts,
                                       class_rank=ds.class_rank)
            record["knn"] = {"acc_class_mean": m["acc_class_mean"], "groups_thirds": m["groups_thirds"]}
            print(f"[{self.stage}] ep {n} kNN class-mean acc {m['acc_class_mean']:.2f}", flush=True)
        self.run.end_epoch(n, self.loss_sum / self.iters, record, self.state(n), f"{self.stage} epoch {n}")
        self.done, a.stop_after_epochs = n, None if a.stop_after_epochs is None else a.stop_after_epochs - 1

    def state(self, epoch: int) -> dict:    # "backbone" / "head": the network this stage hands on
        return {"stage": self.stage, "epoch": epoch, "image_size": self.ds.image_size,
                "arch": self.run.args.arch, "proj_layers": sum(type(m) is nn.Linear for m in self.net.head),
                "backbone": self.net.backbone.state_dict(), "head": self.net.head.state_dict(),
                **{name: module.state_dict() for name, module in self.parts.items()},
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict()}

    def finish(self) -> dict | None:        # stage_<stage>.pt, or None when --stop-after-epochs ended the run
        if self.done == self.epochs:
            self.run.save(state := self.state(self.epochs), f"stage_{self.stage}.pt")
            return state


def train_sdclr(run, ds) -> dict | None:
    """Stage 0: SDCLR (SimCLR with --prune-ratio 0), the teacher's initialisation (Alg. 1 line 4)."""
    a = run.args
    net = Encoder(a.arch, ds.image_size, a.proj_dim, a.proj_layers, a.prune_ratio > 0, a.dual_bn)
    model, opt = common.prepare_model(net, run.device, a.channels_last, a.compile), sgd(a, net.parameters())
    loop = StageLoop(run, ds, "sdclr", {"model": net}, net, opt)
    for epoch in loop:
        record = {"mask_kept": update_mask(net, a.prune_ratio)} if a.prune_ratio > 0 else {}
        for x1, x2, _ in loop.batches(epoch):
            loop.log(sdclr_step(model, opt, loop.scaler, x1, x2, a, run.amp_dtype))
        loop.end_epoch(epoch, record)
    return loop.finish()


def train_prototypes(run, ds, init: dict | None) -> dict | None:
    """Stage 1: frequency-aware prototype learning (Alg. 1 lines 2-10), from the Stage-0 teacher."""
    a, K = run.args, run.args.num_prototypes
    teacher, protos = teacher_from(a, ds.image_size, init)
    model = common.prepare_model(teacher, run.device, a.channels_last, a.compile)
    opt = sgd(a, teacher.parameters(), no_decay=protos.to(run.device).parameters())
    loop = StageLoop(run, ds, "prototypes", {"teacher": teacher, "prototypes": protos}, teacher, opt)
    for epoch in loop:
        wins = torch.zeros(K, device=run.device)           # collapse check: how often p_k is argmax_k h
        for x1, x2, _ in loop.batches(epoch):
            loss, z1 = prototype_step(model, protos, opt, loop.scaler, x1, x2, a, run.amp_dtype)
            loop.log(loss)
            wins += F.one_hot(prototype_similarities(z1, protos.weight).argmax(1), K).sum(0)
        p, share = F.normalize(protos.weight.detach().float(), dim=-1), wins / wins.sum()
        loop.end_epoch(epoch, {"protos_used": int((share > 0).sum()), "proto_usage_max": float(share.max()),
                               "proto_mean_cos": float(((p @ p.T).sum() - K) / max(K * K - K, 1))})
    return loop.finish()


def train_rebalance(run, ds, init: dict | None) -> dict | None:
    """Stage 2: prototypical re-balanced SSL (Alg. 1 lines 11-19); F^S <- F^T, P frozen (INFERRED)."""
    a, dev = run.args, run.device
    teacher, protos = teacher_from(a, ds.image_size, init)
    student, q = copy.deepcopy(teacher), predictor(a)
    teacher.requires_grad_(False), protos.to(dev).requires_grad_(False)         # F^T by EMA only; P frozen
    model_s, model_t = (common.prepare_model(m, dev, a.channels_last, a.compile) for m in (student, teacher))
    model_q = common.prepare_model(q, dev, False, a.compile)
    opt = sgd(a, [*student.parameters(), *q.parameters()])
    parts = {"student": student, "predictor": q, "teacher": teacher, "prototypes": protos}
    loop, group = StageLoop(run, ds, "rebalance", parts, student, opt), group_of_classes(ds).to(dev)
    for epoch in loop:
        ws, gs = [], []                                    # weights and class groups: diagnostics only
        for x1, x2, y in loop.batches(epoch):
            loss, w = rebalance_step(model_s, model_q, model_t, protos, opt, loop.scaler, x1, x2, a,
                                     run.amp_dtype)
            loop.log(loss)
            ws, gs = ws + [w], gs + [group[y]]
        w, g = torch.cat(ws), torch.cat(gs)
        means = {f"w_mean_{name}": float(w[g == i].mean()) if (g == i).any() else 0.0
                 for i, name in enumerate(("frequent", "medium", "rare"))}
        loop.end_epoch(epoch, {"w_max": float(w.max()), "w_min": float(w.min()), **means})
    return loop.finish()


# ---- Evaluation: linear probes (Tables 1-2), prototype analysis (Sec. 4.5, Tables 4-5, Fig. 4) -------------
def group_of_classes(ds) -> torch.Tensor:
    """Class id -> 0 Frequent / 1 Medium / 2 Rare: thirds of the classes by count (Sec. 4.1)."""
    thirds = evaluation.group_masks(ds.class_counts, ds.class_rank)["thirds"]
    return torch.tensor([[c in thirds[g] for g in ("many", "medium", "few")].index(True)
                         for c in range(ds.num_classes)])


def probe(backbone_state: dict, args: Args, ds, device, amp_dtype) -> dict:
    """SDCLR linear probes (Tables 1-2) with eval.py's probe settings (docs/evaluation.md): {mode: result}."""
    bb = common.build_backbone(args.arch, ds.image_size)
    bb.load_state_dict(backbone_state)
    return evaluation.run_probes(common.prepare_model(bb, device, args.channels_last), ds, args.probe, device,
                                 amp_dtype, aug=args.probe_aug, epochs=args.probe_epochs, seed=args.seed)


@torch.no_grad()
def prototype_analysis(stage1: dict, args: Args, ds, device, amp_dtype, run_dir) -> dict:
    """Sec. 4.5: each prototype's nearest training image (Stage-1 F^T and P, no augmentation; INFERRED), the
    group shares (Tables 4-5), prototype_grid.png: a tile per prototype, by group, then class (Fig. 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision.io as tvio
    teacher, protos = teacher_from(args, ds.image_size, stage1)
    z, labels = evaluation.extract_features(teacher.to(device), ds.train, device, amp_dtype,
                                            recipe="test_imagenet")
    nearest = prototype_similarities(z, protos.weight.to(device)).argmax(0).cpu()   # argmax_i p^_k . z^_i
    cls = labels.cpu()[nearest]
    grp, k = group_of_classes(ds)[cls], len(cls)
    share = {g: 100.0 * float((grp == i).sum()) / k for i, g in enumerate(("frequent", "medium", "rare"))}
    order = sorted(range(k), key=lambda j: (int(grp[j]), int(cls[j])))
    imgs = ds.train.x[nearest] if ds.train.x is not None else torch.stack([F.interpolate(   # list datasets
        tvio.decode_image(ds.train.files[i], mode=tvio.ImageReadMode.RGB)[None].float(), size=(96, 96),
        mode="bilinear")[0].byte() for i in nearest.tolist()])
    fig, axes = plt.subplots(-(-k // 16), 16, figsize=(14.4, -(-k // 16)), squeeze=False)
    for ax, j in zip(axes.flat, order + [None] * (axes.size - k)):
        ax.axis("off")
        if j is not None:
            ax.imshow(imgs[j].permute(1, 2, 0).numpy())
            ax.set_title(ds.class_names[cls[j]][:10], fontsize=5, color=("C0", "C1", "C3")[grp[j]])
    fig.suptitle("Prototype -> nearest training image (Fig. 4). Frequent {frequent:.1f}% / Medium "
                 "{medium:.1f}% / Rare {rare:.1f}%".format(**share), fontsize=8)
    fig.savefig(run_dir / "prototype_grid.png", dpi=150, bbox_inches="tight")
    plt.close(fig)
    return {"K": k, "share_percent": share, "counts": {g: round(v * k / 100) for g, v in share.items()},
            "nearest_index": nearest.tolist(), "nearest_class": cls.tolist(),
            "per_class": torch.bincount(cls, minlength=ds.num_classes).tolist()}


def report(run, ds, stages: list, outputs: dict, init: dict | None):
    """Probes (the first is the headline), teacher probe, prototype analysis -> results.json; paper rows."""
    args, last = run.args, outputs[stages[-1]]
    probes = probe(last["backbone"], args, ds, run.device, run.amp_dtype)
    head = next(iter(probes.values()), None)
    network = {"sdclr": "backbone (SDCLR dense branch)" if args.prune_ratio > 0 else "backbone",
               "prototypes": "teacher", "rebalance": "student"}[stages[-1]]
    epochs = {f"stage{i}": outputs[s]["epoch"] if s in stages else 0 for i, s in enumerate(STAGES)}
    results = run.results(ds, head["protocol"] if head else "none", network,
                          {**epochs, "probe": head["probe"]["epochs"] if head else 0})
    results.update({k: head[k] for k in ("selection", "at_selected", "at_last")} if head else {})
    results["extra"].update({"probe_variant": head["variant"]} if head else {})
    rows = [json.loads(r) for r in (run.run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    results["knn"] = [{"stage": r["stage"], "epoch": r["epoch"], **r["knn"]} for r in rows if "knn" in r]
    for mode, r in probes.items():
        results["extra"][f"probe_{mode}"] = {k: r[k] for k in ("protocol", "variant", "selection",
                                                               "at_selected", "at_last", "probe")}
    if args.probe_teacher and stages[-1] == "rebalance" and args.probe:
        teacher = {k[len("backbone."):]: v for k, v in last["teacher"].items() if k.startswith("backbone.")}
        results["extra"]["teacher_probe"] = {m: {k: r[k] for k in ("selection", "at_selected")} for m, r in
                                             probe(teacher, args, ds, run.device, run.amp_dtype).items()}
    stage1 = outputs.get("prototypes") or (init if stages == ["rebalance"] else None)    # Stage-1 teacher + P
    if args.analyze and stage1 is not None and "prototypes" in stage1:
        res = results["extra"]["prototypes"] = prototype_analysis(stage1, args, ds, run.device, run.amp_dtype,
                                                                  run.run_dir)
        print("prototypes: " + " / ".join(f"{g} {v:.2f}%" for g, v in res["share_percent"].items()))
    run.finish(results)
    print(f"| Method {evaluation.PAPER_HEADER[head['probe']['row']]}" if head else "no probe")
    for mode, r in probes.items():
        print(f"| {run.label} ({mode}) " + evaluation.paper_row(r["at_selected"], style=r["probe"]["row"]))
    return run.run_dir


# ---- Benchmark and main ------------------------------------------------------------------------------------
def benchmark(args: Args) -> None:
    """Images/s of each stage's training step (augmentation, forward, backward, update) on random data."""
    dev, amp = common.setup_device(args.device, args.amp)
    size = 224 if args.dataset in LIST_224PX else 64 if args.dataset == "tiny-imagenet-lt" else 32
    x = torch.randint(0, 256, (args.batch_size, 3, *[size if size <= 64 else 256] * 2), dtype=torch.uint8,
                      device=dev)                                        # list datasets arrive at 256 px
    gen, sc, cl = torch.Generator(dev).manual_seed(0), common.make_scaler(amp), args.channels_last
    net = Encoder(args.arch, size, args.proj_dim, args.proj_layers, args.prune_ratio > 0, args.dual_bn)
    teacher, protos = teacher_from(args, size, None)
    student, q = copy.deepcopy(teacher), predictor(args)
    m0, mt, ms, mq = (common.prepare_model(m, dev, c, args.compile) for m, c in
                      ((net, cl), (teacher, cl), (student, cl), (q, False)))
    o0, o1 = sgd(args, net.parameters()), sgd(args, teacher.parameters(), protos.to(dev).parameters())
    o2, s0 = sgd(args, [*student.parameters(), *q.parameters()]), "sdclr" if args.prune_ratio else "simclr"
    for name, step in ((s0, lambda v: sdclr_step(m0, o0, sc, *v, args, amp)),
                       ("prototypes", lambda v: prototype_step(mt, protos, o1, sc, *v, args, amp)[0]),
                       ("rebalance", lambda v: rebalance_step(ms, mq, mt, protos, o2, sc, *v, args, amp)[0])):
        common.benchmark(name, lambda: step(two_views(x, gen, size, cl)), len(x), args.benchmark_steps, dev,
                         amp)


def method_name(args: Args) -> str:
    """results.json "method": simclr / sdclr for a run of Stage 0 alone, else fassl."""
    return ("simclr" if args.prune_ratio == 0 else "sdclr") if args.stage == "sdclr" else "fassl"


def parse(argv=None):
    """common.parse_args, plus --no-init: the alias of --init scratch (the name of the Table 9 row)."""
    argv = [w for a in (sys.argv[1:] if argv is None else argv) for w in
            (["--init", "scratch"] if a == "--no-init" else [a])]
    return common.parse_args(Args, argv, DEFAULTS)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, filled = parse(argv)
    if args.benchmark:
        return benchmark(args)
    run = common.Run(method_name, args, filled, DEFAULTS, PAPER)
    run.args.stop_after_epochs = args.stop_after_epochs        # a budget for this call only
    args = run.args                                            # a resumed run's own settings
    ds = data.load_dataset(args.dataset, args.data_dir, imb_ratio=args.imb_ratio, protocol=args.protocol,
                           seed=args.data_seed, **{k: getattr(args, k) for k in ("split", "split_file",
                           "sdclr_split_dir", "num_classes", "synthetic_n_max", "synthetic_n_test")})
    stages = [s for s in STAGES if args.stage in ("all", s)][1 if args.init and args.stage == "all" else 0:]
    if args.init is None and stages[0] != "sdclr":
        raise UserError(f"--stage {stages[0]} needs a teacher: --init <previous stage's .pt> or --no-init")
    init = common.load_checkpoint(args.init) if args.init not in (None, "scratch") else None
    if stages[0] == "rebalance" and args.reweight and init is not None and "prototypes" not in init:
        raise UserError(f"--init {args.init} has no prototypes: give a stage_prototypes.pt or --no-reweight")
    run.start(ds, f"{args.arch} | stages {' -> '.join(stages)} | batch {args.batch_size} | lr {args.lr}")
    outputs, prev = {}, init
    for stage in stages:
        done = run.run_dir / f"stage_{stage}.pt"
        if run.ckpt is not None and done.is_file():          # finished before the interruption
            prev = common.load_checkpoint(done)
            if run.ckpt["stage"] == stage:
                run.restore()                                 # the RNG state the next stage is built with
        elif stage == "sdclr":
            prev = train_sdclr(run, ds)
        elif stage == "prototypes":
            prev = train_prototypes(run, ds, prev)
        else:
            prev = train_rebalance(run, ds, prev)
        if prev is None:                                      # --stop-after-epochs
            return run.run_dir
        outputs[stage] = prev
    return report(run, ds, stages, outputs, init)


if __name__ == "__main__":
    common.main_guard(main)
