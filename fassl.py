"""FASSL: Frequency-Aware Self-Supervised Long-Tailed Learning (Lin, Chen, Wang, ICCV-W 2023, arXiv 2309.04723).

Spec: shared/specs/ssl.md §1 (SDCLR / SimCLR, "Stage 0") and §3 (FASSL). Three stages, each checkpointed:

  sdclr       Stage 0, teacher initialisation. SimCLR in which view 2 goes through a magnitude-pruned twin of the
              network with its own BatchNorm set (SDCLR, Jiang et al. 2021). --prune-ratio 0 = plain SimCLR.
  prototypes  Stage 1, frequency-aware prototype learning (paper Sec. 3.2.1, Eq. 1-2): K prototypes P and the
              teacher F^T trained with a contrastive loss on the prototype-similarity vectors h = P z.
  rebalance   Stage 2, prototypical re-balanced SSL (Sec. 3.2.2, Eq. 3-4): a student F^S + predictor regresses
              the EMA teacher's embedding; each sample is weighted by phi = 1/exp(sum_k <z^T, p_k>), so images
              far from the (mostly head-class) prototypes count more. The student backbone is the output.

Evaluation: SDCLR linear probe, full and 1 % few-shot (paper Tables 1-2), and the Sec. 4.5 prototype analysis
(Tables 4-5, Fig. 4). Usage: `python fassl.py --dataset cifar10-lt`; `python fassl.py --help` lists the ablations.
Demo: `python fassl.py --dataset synthetic-lt` (offline data, CPU-sized SYNTHETIC_DEMO schedule, not a paper setting).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common
import data
import eval as evaluation
from common import nt_xent  # Eq. S1 (ssl.md §0.4): NT-Xent used by SDCLR/SimCLR and, on h vectors, by Eq. (2)

STAGES = ("sdclr", "prototypes", "rebalance")


@dataclass
class Args:
    """FASSL (paper 000) with SDCLR / SimCLR as Stage 0 and BYOL-style uniform weighting as an ablation."""
    # data
    dataset: str = common.arg("cifar10-lt", "dataset (paper Sec. 4.1; D§1-3)", choices=list(data.DATASETS))
    data_dir: str = common.arg("./data", "dataset root (for --dataset folder: the ImageFolder tree)")
    protocol: str = common.arg("sdclr", "LT split convention; the SDCLR protocol of paper Sec. 4.1 (D§1.4)",
                               choices=["sdclr", "ldam"])
    split: int = common.arg(1, "SDCLR split k (spec §3.4: split 1, INFERRED)")
    split_file: Optional[str] = common.arg(None, "official SDCLR D_i .npy index file (D§1.4)")
    sdclr_split_dir: Optional[str] = common.arg(None, "folder with the official SDCLR split files (D§1.4)")
    imb_ratio: float = common.arg(100.0, "imbalance ratio rho (paper Sec. 4.1)")
    data_seed: int = common.arg(0, "seed of the split generator when no .npy is given (D§1.4)")
    num_classes: int = common.arg(10, "synthetic-lt only: number of classes (D, data.py)")
    synthetic_n_max: int = common.arg(500, "synthetic-lt only: images of the head class (data.py)")
    synthetic_n_test: int = common.arg(100, "synthetic-lt only: test images per class (data.py)")
    # pipeline
    stage: str = common.arg("all", "stages to run: all = sdclr -> prototypes -> rebalance (paper Alg. 1)",
                            choices=["all", *STAGES])
    init: Optional[str] = common.arg(None, "checkpoint that starts the first stage run here: stage_sdclr.pt for "
                                     "prototypes (and for all: Stage 0 skipped), stage_prototypes.pt for "
                                     "rebalance (Alg. 1 lines 4, 12); 'scratch' = random teacher (= --no-init)")
    resume: Optional[str] = common.arg(None, "checkpoint.pt / run dir / 'auto' to continue an interrupted run")
    stop_after_epochs: Optional[int] = common.arg(None, "debug: stop after this many epochs of this invocation "
                                                  "(checkpoint kept; continue with --resume)")
    out_dir: str = common.arg("runs", "parent of the run directory")
    # model
    arch: Optional[str] = common.arg(None, "backbone; None = resnet18 (CIFAR stem) for <= 64 px, resnet50 for "
                                     "224 px (paper Sec. 4.2; spec §1.4); Table 8: resnet34; synthetic-lt demo: "
                                     "resnet8")
    proj_dim: int = common.arg(128, "embedding / prototype dim D (SDCLR --output_ch 128; spec §3.4)")
    proj_layers: Optional[int] = common.arg(None, "projection-head Linear layers; None = 3 for SDCLR, 2 for "
                                            "SimCLR (official SDCLR code, spec §1.4)")
    prune_ratio: Optional[float] = common.arg(None, "SDCLR global prune ratio p; 0 = SimCLR (Table 1); None = "
                                              "0.9 (<= 64 px) or 0.3 (224 px) (SDCLR README, spec §1.4)")
    dual_bn: bool = common.arg(True, "separate BN set for the pruned branch (SDCLR code; spec §1.7)")
    tau: Optional[float] = common.arg(None, "NT-Xent temperature of Stage 0; None = 0.2, 0.3 for SDCLR at "
                                      "224 px (SDCLR scripts, spec §1.4)")
    num_prototypes: int = common.arg(128, "K prototypes (paper Sec. 4.2; Table 3 left)")
    beta: float = common.arg(0.2, "temperature beta of Eq. (2) (paper Sec. 4.2)")
    predictor_hidden: int = common.arg(512, "predictor MLP 128-512-128 (paper: 'a MLP'; sizes INFERRED)")
    ema_tau: float = common.arg(0.99, "EMA decay tau of Eq. (4), every step (paper Sec. 4.4; Table 3 right)")
    reweight: bool = common.arg(True, "phi weights of Eq. (3); --no-reweight = BYOL-style uniform weights "
                                "(Table 1 BYOL dagger)")
    clip_sigma: float = common.arg(2.0, "clip scores at mean +- c * std before normalising (paper Sec. 4.2 "
                                   "'clip outliers'; c INFERRED; 0 = no clipping)")
    # optimisation
    batch_size: Optional[int] = common.arg(None, "batch B; None = 512 (<= 64 px), 256 (224 px) (SDCLR scripts); "
                                           "synthetic-lt demo: 128")
    lr: float = common.arg(0.5, "SGD base LR, every stage (SDCLR train_simCLR.py; stages 1-2 INFERRED)")
    final_lr: float = common.arg(1e-6, "cosine end LR (SDCLR code)")
    momentum: float = common.arg(0.9, "SGD momentum (SDCLR code)")
    weight_decay: float = common.arg(1e-4, "weight decay; none on prototypes (SDCLR code; spec §3.9)")
    warmup_epochs: int = common.arg(10, "linear LR warm-up epochs, capped at 10 % of a stage (SDCLR code; cap "
                                    "INFERRED)")
    sdclr_epochs: Optional[int] = common.arg(None, "Stage 0 epochs; None = 2000 (<= 64 px), 500 (224 px) "
                                             "(SDCLR scripts); synthetic-lt demo: 30")
    stage1_epochs: Optional[int] = common.arg(None, "Stage 1 epochs; None = 100 (INFERRED, spec §3.4); "
                                              "synthetic-lt demo: 10")
    stage2_epochs: Optional[int] = common.arg(None, "Stage 2 epochs; None = 200 (INFERRED, spec §3.4); "
                                              "synthetic-lt demo: 15")
    epochs_scale: float = common.arg(1.0, "multiply every stage's epochs (quick runs; 1 = paper setting)")
    knn_every: Optional[int] = common.arg(None, "kNN monitor every N epochs; None = max(1, E/20); 0 = off (D§5.4); "
                                          "synthetic-lt demo: 0")
    # evaluation
    probes: list[str] = common.arg(["full", "few-shot"], "linear probes at the end (Tables 1-2; D§5.1)",
                                   choices=["full", "few-shot"])
    probe_aug: str = common.arg("auto", "probe augmentation; auto = crop (D§5.1); none = cached features, fast, "
                                "approx.; synthetic-lt demo: none", choices=["auto", "crop", "none"])
    probe_epochs: Optional[int] = common.arg(None, "override the probe epochs (30 full / 100 few-shot, D§5.1)")
    probe_teacher: bool = common.arg(True, "also probe the teacher, stored under extra (spec §3.9)")
    analyze: bool = common.arg(True, "prototype retrieval analysis: Tables 4-5, Fig. 4 (spec §3.7)")
    # runtime
    seed: int = common.arg(0, "training seed (spec §3.4: one seed, 0, INFERRED)")
    device: str = common.arg("auto", "auto | cpu | cuda")
    amp: str = common.arg("auto", "autocast dtype: auto = bf16 on CUDA (fp16 + scaler if unsupported), off on CPU",
                          choices=["auto", "bf16", "fp16", "off"])
    channels_last: bool = common.arg(True, "channels_last memory format on CUDA")
    compile: bool = common.arg(False, "torch.compile the networks")
    workers: int = common.arg(8, "DataLoader workers for 224-px list datasets")
    benchmark: bool = common.arg(False, "print images/s of each stage's training step on synthetic tensors, exit")
    bench_steps: int = common.arg(10, "timed steps per stage for --benchmark (after 3 warm-up steps)")


RUNTIME_FIELDS = ("resume", "stop_after_epochs", "device", "amp", "compile", "workers")
ABLATION_FIELDS = ("stage", "init", "arch", "prune_ratio", "dual_bn", "tau", "num_prototypes", "ema_tau",
                   "reweight", "clip_sigma")


# Not a paper setting: a CPU-sized demo for synthetic-lt (data.py's generated offline data set), so that
# `python fassl.py --dataset synthetic-lt` runs all three stages and both probes in a few minutes on a 2-core CPU.
# Applied only to the fields left unset (None / "auto") on the command line; every explicit flag wins.
SYNTHETIC_DEMO = {"arch": "resnet8", "batch_size": 128, "sdclr_epochs": 30, "stage1_epochs": 10, "stage2_epochs": 15,
                  "knn_every": 0, "probe_aug": "none"}


def demo_defaults(args: Args) -> dict:
    """The SYNTHETIC_DEMO entries resolve_defaults applies to `args`: synthetic-lt only, unset fields only."""
    if args.dataset != "synthetic-lt":
        return {}
    return {k: v for k, v in SYNTHETIC_DEMO.items() if getattr(args, k) in (None, "auto")}


def resolve_defaults(args: Args, image_size: int) -> Args:
    """Dataset-dependent defaults (spec §1.4 / §3.4): 224-px datasets use the ResNet-50 recipe; synthetic-lt
    gets the SYNTHETIC_DEMO values for the fields the user did not set."""
    for k, v in demo_defaults(args).items():
        setattr(args, k, v)
    big = image_size >= 128            # ImageNet-100-LT, Places-LT (and the other list datasets)
    if args.arch is None:
        args.arch = "resnet50" if big else "resnet18"
    if args.prune_ratio is None:
        args.prune_ratio = 0.3 if big else 0.9
    if args.tau is None:
        args.tau = 0.3 if big and args.prune_ratio > 0 else 0.2
    if args.batch_size is None:
        args.batch_size = 256 if big else 512
    if args.sdclr_epochs is None:
        args.sdclr_epochs = 500 if big else 2000
    if args.proj_layers is None:
        args.proj_layers = 3 if args.prune_ratio > 0 else 2
    if args.stage1_epochs is None:
        args.stage1_epochs = 100
    if args.stage2_epochs is None:
        args.stage2_epochs = 200
    if args.probe_aug == "auto":
        args.probe_aug = "crop"
    return args


def stage_epochs(args: Args, stage: str) -> int:
    base = {"sdclr": args.sdclr_epochs, "prototypes": args.stage1_epochs, "rebalance": args.stage2_epochs}[stage]
    return max(1, round(base * args.epochs_scale))


# ----------------------------------------------------------------------------------------------------------------
# Model pieces
# ----------------------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """F(x) = head(backbone(x)) in R^128, optionally with SDCLR's pruned twin (spec §1.2, S2-S3).

    The dense network is a plain common.build_backbone + projection head, so its state_dicts load anywhere.
    The pruned branch shares every weight; it differs only in (a) conv weights multiplied by a binary mask
    (stem, 3x3 and 1x1 shortcut convs; never BN or head) and (b) its own BN set (weight, bias, running stats) in
    backbone AND head. `forward(x, pruned=True)` swaps these in with torch.func.functional_call: gradients flow
    through w * m into the shared w and into the pruned BN affine params; BN running stats update in place in
    the pruned set, so the dense statistics are never touched.
    """

    def __init__(self, arch: str, image_size: int, proj_dim: int = 128, proj_layers: int = 2,
                 prune: bool = False, dual_bn: bool = True):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size)
        d = self.backbone.out_dim
        self.head = common.projection_mlp(d, d, proj_dim, num_layers=proj_layers, bn=True, last_bn=True,
                                          bias_last=False)                     # spec §1.4 head
        self.prunable = [f"backbone.{n}" for n, m in self.backbone.named_modules() if isinstance(m, nn.Conv2d)]
        self.bns = [n for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.prune, self.dual_bn = prune, dual_bn
        if prune:
            for n in self.prunable:                                            # mask m of S2 (1 = kept)
                self.register_buffer(key("mask", n), torch.ones_like(self.get_parameter(n + ".weight"),
                                                                     dtype=torch.bool))
            if dual_bn:                                                        # the pruned branch's BN set
                self.pruned_bn = nn.ModuleDict({key("", n): copy.deepcopy(self.get_submodule(n))
                                                for n in self.bns})

    def mask(self, conv: str) -> torch.Tensor:
        return self.get_buffer(key("mask", conv))

    def forward(self, x, pruned: bool = False):
        if not pruned:
            return self.head(self.backbone(x))
        swap = {n + ".weight": self.get_parameter(n + ".weight") * self.mask(n) for n in self.prunable}   # S3
        if self.dual_bn:
            for n in self.bns:
                twin = self.pruned_bn[key("", n)]
                swap.update({f"{n}.{t}": v for t, v in [*twin.named_parameters(), *twin.named_buffers()]})
        return functional_call(self, swap, (x,))


def key(prefix: str, name: str) -> str:
    """Module/buffer names may not contain dots."""
    return (prefix + "__" if prefix else "") + name.replace(".", "__")


@torch.no_grad()
def update_mask(net: Encoder, ratio: float) -> float:
    """SDCLR mask, spec S2: global magnitude threshold over the concatenation of every backbone conv kernel.

    N = |W|, P = ceil(p N), t = sort_ascending(|W|)[min(P, N-1)], m = 1[|w| >= t]; fp32, detached (N6).
    Returns the kept fraction (about 1 - p)."""
    weights = [net.get_parameter(n + ".weight").detach().float().abs() for n in net.prunable]
    flat = torch.cat([w.flatten() for w in weights])
    n = flat.numel()
    t = torch.kthvalue(flat, min(math.ceil(ratio * n), n - 1) + 1).values     # kthvalue is 1-based
    kept = 0
    for name, w in zip(net.prunable, weights):
        m = w >= t
        net.mask(name).copy_(m)
        kept += int(m.sum())
    return kept / n


def build_predictor(args: Args) -> nn.Module:
    """q of Stage 2: Linear(128,512)-BN-ReLU-Linear(512,128) (paper 'a MLP'; sizes INFERRED, spec §3.4)."""
    return common.projection_mlp(args.proj_dim, args.predictor_hidden, args.proj_dim, num_layers=2)


# ----------------------------------------------------------------------------------------------------------------
# Losses (pure functions; fp32 inside, safe under bf16/fp16 autocast)
# ----------------------------------------------------------------------------------------------------------------
def prototype_similarities(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. (1): h_i = P^ z^_i, cosine similarity of the embedding to each of the K prototypes (rows of P
    re-normalised on use, INFERRED, spec §3.2). (B, D), (K, D) -> (B, K) in fp32, also under autocast (N1)."""
    with torch.autocast(z.device.type, enabled=False):
        return F.normalize(z.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T


def prototype_contrastive_loss(z1, z2, prototypes, beta: float = 0.2) -> torch.Tensor:
    """Eq. (2): L_contra = NT-Xent (Eq. S1) on the similarity-score vectors h of the two views, with cosine
    similarity sim(h_i, h_j) and temperature beta. Gradients reach the teacher (via z) and P."""
    return nt_xent(prototype_similarities(z1, prototypes), prototype_similarities(z2, prototypes), beta)


@torch.no_grad()
def frequency_weights(z_teacher, prototypes, clip_sigma: float = 2.0) -> torch.Tensor:
    """Eq. (3) weight phi = 1 / exp(sum_k <z^T, p_k>) with the batch post-processing of Eq. (3a):

        s_i = z^_i . sum_k p^_k  (in [-K, K]),  s~ = clamp(s, mu - c sigma, mu + c sigma),  w = B softmax(-s~)

    computed in log space (phi itself would overflow: exp(128)), so the weights are phi~_i / mean(phi~) and
    average exactly 1 over the batch. No gradient: the weights come from the teacher (spec §3.9)."""
    with torch.autocast(z_teacher.device.type, enabled=False):
        s = F.normalize(z_teacher.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).sum(0)
    if clip_sigma > 0:                                           # population std (spec §3.9); sigma = 0 -> no-op
        mu, sigma = s.mean(), s.std(unbiased=False)
        s = torch.clamp(s, min=mu - clip_sigma * sigma, max=mu + clip_sigma * sigma)
    return s.numel() * torch.softmax(-s, dim=0)


def rebalanced_loss(p_student, z_teacher, weights) -> torch.Tensor:
    """Eq. (3): L_reb = mean_i w_i * L_consis(p_i, z_i^T), L_consis(a, b) = ||a/||a|| - b/||b|| ||^2 = 2 - 2 cos.
    The teacher embedding is a fixed regression target (stop-gradient)."""
    p = F.normalize(p_student.float(), dim=-1)
    z = F.normalize(z_teacher.detach().float(), dim=-1)
    return (weights.detach().float() * (2 - 2 * (p * z).sum(-1))).mean()


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """Eq. (4): theta_T <- tau theta_T + (1 - tau) theta_S after every optimiser step, in fp32; BN running
    statistics are averaged the same way (INFERRED, spec §3.3), integer buffers copied."""
    common.ema_update(teacher, student, tau, buffers="ema")


# ----------------------------------------------------------------------------------------------------------------
# The three stages: each `build_*` returns the modules to checkpoint, the optimiser and a `step(x, y, gen)` that
# augments one uint8 batch, runs forward + backward + SGD step and returns device scalars (no host sync).
# ----------------------------------------------------------------------------------------------------------------
def sgd(args: Args, params, no_wd=()):
    groups = [{"params": [p for p in params if p.requires_grad]}]
    if no_wd:
        groups.append({"params": list(no_wd), "weight_decay": 0.0})            # prototypes: no wd (spec §3.9)
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def two_views(x, gen, args, image_size, device):
    recipe = "simclr_cifar" if image_size <= 64 else "mocov2_imagenet"          # spec §1.4 augmentation
    size = image_size if image_size <= 64 else 224
    views = [data.augment(x, recipe, generator=gen, image_size=size) for _ in range(2)]
    if device.type == "cuda" and args.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def counts(idx, n, weights=None):
    """bincount without a host sync (CUDA bincount reads the max index back to size its output)."""
    w = weights.float() if weights is not None else torch.ones(idx.shape, device=idx.device)
    return torch.zeros(n, device=idx.device).index_add_(0, idx, w)


def backward_step(loss, opt, scaler):
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def build_sdclr(args, image_size, device, amp_dtype):
    """Stage 0, spec §1.3: SDCLR (p > 0) or SimCLR (p = 0)."""
    prune = args.prune_ratio > 0
    net = Encoder(args.arch, image_size, args.proj_dim, args.proj_layers, prune=prune, dual_bn=args.dual_bn)
    run = common.prepare_model(net, device, args.channels_last, args.compile)
    opt, scaler = sgd(args, net.parameters()), common.make_scaler(amp_dtype)

    def step(x, y, gen):
        x1, x2 = two_views(x, gen, args, image_size, device)
        with common.autocast(device, amp_dtype):
            if prune:
                # View 1 -> dense branch, view 2 -> pruned branch, both in ONE graph and ONE backward. The official
                # code instead runs two backward passes, one with the pruned features detached and one with the
                # dense features detached, and sums the gradients. L depends on theta only through z1 (dense) and
                # z2 (pruned), so dL/dtheta = dL/dz1 dz1/dtheta + dL/dz2 dz2/dtheta: exactly that sum.
                z1, z2 = run(x1), run(x2, pruned=True)
            else:
                z1, z2 = run(torch.cat([x1, x2])).chunk(2)                     # SimCLR: one concatenated forward
            loss = nt_xent(z1, z2, args.tau)                                   # Eq. S1
        backward_step(loss, opt, scaler)
        return {"loss": loss.detach()}

    def epoch_start(epoch):
        return {"mask_kept": update_mask(net, args.prune_ratio)} if prune else {}   # S2, every epoch

    return {"model": net}, opt, scaler, step, epoch_start, net


def teacher_from(args, image_size, init: dict | None) -> tuple[Encoder, nn.Linear]:
    """F^T (dense backbone + head, dense BN set) and P from a previous stage's output, or random (Table 9)."""
    layers = init["proj_layers"] if init is not None else args.proj_layers
    teacher = Encoder(args.arch, image_size, args.proj_dim, layers)
    protos = nn.Linear(args.proj_dim, args.num_prototypes, bias=False)         # rows = p_k; h = P z is a Linear
    nn.init.normal_(protos.weight)                                             # P ~ N(0, 1) (Alg. 1 l. 3; INFERRED)
    if init is not None:
        teacher.backbone.load_state_dict(init["backbone"])
        teacher.head.load_state_dict(init["head"])
        if "prototypes" in init:
            protos.load_state_dict(init["prototypes"])
    return teacher, protos


def build_prototypes(args, image_size, device, amp_dtype, init=None):
    """Stage 1, spec §3.3: train F^T and P with Eq. (2)."""
    teacher, protos = teacher_from(args, image_size, init)
    run = common.prepare_model(teacher, device, args.channels_last, args.compile)
    protos.to(device)
    opt, scaler = sgd(args, teacher.parameters(), no_wd=protos.parameters()), common.make_scaler(amp_dtype)
    K = args.num_prototypes

    def step(x, y, gen):
        x1, x2 = two_views(x, gen, args, image_size, device)
        with common.autocast(device, amp_dtype):
            z1, z2 = run(torch.cat([x1, x2])).chunk(2)                         # z^T = F^T(x), Eq. (1)
            loss = prototype_contrastive_loss(z1, z2, protos.weight, args.beta)  # Eq. (2)
        backward_step(loss, opt, scaler)
        usage = counts(prototype_similarities(z1.detach(), protos.weight).argmax(1), K)   # argmax_k h
        return {"loss": loss.detach(), "usage": usage}

    return {"teacher": teacher, "prototypes": protos}, opt, scaler, step, None, teacher


def build_rebalance(args, image_size, device, amp_dtype, init=None, group_of_class=None):
    """Stage 2, spec §3.3: student + predictor trained with Eq. (3b); teacher by EMA, Eq. (4); P frozen."""
    teacher, protos = teacher_from(args, image_size, init)
    student, predictor = copy.deepcopy(teacher), build_predictor(args)        # F^S <- F^T (Alg. 1 line 12)
    for p in [*teacher.parameters(), *protos.parameters()]:
        p.requires_grad_(False)
    run_s = common.prepare_model(student, device, args.channels_last, args.compile)
    run_t = common.prepare_model(teacher, device, args.channels_last, args.compile)
    run_q = common.prepare_model(predictor, device, False, args.compile)
    protos.to(device)
    opt, scaler = sgd(args, [*student.parameters(), *predictor.parameters()]), common.make_scaler(amp_dtype)
    groups = (group_of_class if group_of_class is not None else torch.zeros(1, dtype=torch.long)).to(device)

    def step(x, y, gen):
        x1, x2 = two_views(x, gen, args, image_size, device)
        xx = torch.cat([x1, x2])
        with common.autocast(device, amp_dtype):
            p1, p2 = run_q(run_s(xx)).chunk(2)                                  # z~^S = q(F^S(x))
            with torch.no_grad():
                t1, t2 = run_t(xx).chunk(2)                                     # z^T, train-mode BN (INFERRED)
        if args.reweight:
            w1, w2 = frequency_weights(t1, protos.weight, args.clip_sigma), frequency_weights(t2, protos.weight,
                                                                                              args.clip_sigma)
        else:                                                                   # BYOL-style uniform weights
            w1 = w2 = torch.ones(len(x), device=x.device)
        loss = rebalanced_loss(p1, t2, w2) + rebalanced_loss(p2, t1, w1)        # Eq. (3b), symmetrised
        backward_step(loss, opt, scaler)
        update_teacher(teacher, student, args.ema_tau)                          # Eq. (4), every step
        # diagnostics only (labels never enter the loss): mean weight per Frequent/Medium/Rare group
        g = groups[y] if len(groups) > 1 else torch.zeros_like(y)
        return {"loss": loss.detach(), "w_max": w2.max(), "w_min": w2.min(),
                "w_group_sum": counts(g, 3, w2), "w_group_n": counts(g, 3)}

    return ({"student": student, "predictor": predictor, "teacher": teacher, "prototypes": protos}, opt, scaler,
            step, None, student)


BUILD = {"sdclr": build_sdclr, "prototypes": build_prototypes, "rebalance": build_rebalance}


def summarize(stats: dict, iters: int, protos: nn.Linear | None) -> dict:
    """Per-epoch metrics from the device accumulators (one host sync per epoch)."""
    out = {}
    for k, v in stats.items():
        if k == "usage":                                              # Stage 1 health (spec §3.9): h-collapse
            share = (v.float() / v.sum()).cpu()
            out["protos_used"] = int((share > 0).sum())
            out["proto_usage_max"] = float(share.max())
        elif k == "w_group_sum":
            n = stats["w_group_n"].float().clamp(min=1).cpu()
            out["w_mean_frequent"], out["w_mean_medium"], out["w_mean_rare"] = (v.cpu() / n).tolist()
        elif k in ("w_max", "w_min"):
            out[k] = float(v)                                         # accumulated as running max / min
        elif k != "w_group_n":
            out[k] = float(v) / iters
    if protos is not None:
        p = F.normalize(protos.weight.detach().float(), dim=-1)
        K = len(p)
        out["proto_mean_cos"] = float(((p @ p.T).sum() - K) / max(K * (K - 1), 1))
    return out


def accumulate(acc: dict, out: dict) -> None:
    for k, v in out.items():
        if k not in acc:
            acc[k] = v.detach().clone()
        elif k == "w_max":
            acc[k] = torch.maximum(acc[k], v)
        elif k == "w_min":
            acc[k] = torch.minimum(acc[k], v)
        else:
            acc[k] += v


# ----------------------------------------------------------------------------------------------------------------
# Training loop shared by the stages
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_state(args, image_size, stage, epoch, mods, opt, scaler, evaluated, method) -> dict:
    """Checkpoint convention of the contract: "backbone" = the network to evaluate (keys of build_backbone)."""
    return {"method": method, "arch": args.arch, "image_size": image_size, "args": dataclasses.asdict(args),
            "epoch": epoch, "stage": stage, "proj_layers": len([m for m in evaluated.head if isinstance(m, nn.Linear)]),
            "backbone": evaluated.backbone.state_dict(), "head": evaluated.head.state_dict(),
            **{k: m.state_dict() for k, m in mods.items()},
            "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": common.rng_state()}


def train_stage(stage, args, ds, device, amp_dtype, run_dir, method, init=None, ck=None, group_of_class=None,
                budget=None, demo=None):
    """Run one stage from epoch 0 (or from `ck`, a mid-stage checkpoint). Returns the final state dict (also
    written to stage_<name>.pt), or None when the --stop-after-epochs budget {"epochs": n} ran out."""
    kw = {"init": init} if stage != "sdclr" else {}
    if stage == "rebalance":
        kw["group_of_class"] = group_of_class
    mods, opt, scaler, step, epoch_start, evaluated = BUILD[stage](args, ds.image_size, device, amp_dtype, **kw)
    epochs, start, state = stage_epochs(args, stage), 0, ck
    if ck is not None:                                                     # exact mid-stage resume
        for k, m in mods.items():
            m.load_state_dict(ck[k])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        common.set_rng_state(ck["rng"])
        start = ck["epoch"]
    batch = min(args.batch_size, len(ds.train))
    if batch < args.batch_size:
        print(f"note: batch {args.batch_size} > {len(ds.train)} training images; using batch {batch}")
    loader = data.make_loader(ds.train, batch, device, shuffle=True, drop_last=True, seed=args.seed,
                              workers=args.workers, image_size=ds.image_size)
    iters = len(loader)
    total = epochs * iters
    warmup = min(args.warmup_epochs * iters, total // 10)
    knn_every = args.knn_every if args.knn_every is not None else max(1, epochs // 20)
    progress = common.Progress(total, batch, every=min(20, max(1, iters // 2)), prefix=stage)
    print(f"[{stage}] epochs {start + 1}..{epochs} x {iters} it, batch {batch}, lr {args.lr}", flush=True)
    budget = budget if budget is not None else {"epochs": None}
    for epoch in range(start, epochs):
        if budget["epochs"] is not None and budget["epochs"] <= 0:
            print(f"[{stage}] stopped at epoch {epoch}/{epochs} (--stop-after-epochs); continue with "
                  f"--resume {run_dir / 'checkpoint.pt'}", flush=True)
            return None
        record = {"stage": stage, "epoch": epoch + 1, **(epoch_start(epoch) if epoch_start else {})}
        loader.set_epoch(epoch)
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + STAGES.index(stage) * 100_003
                                                          + epoch)              # per-epoch views: exact resume
        progress.set_epoch(epoch + 1, epochs)
        acc, t0 = {}, time.time()
        for it, (x, y, _) in enumerate(loader):
            gstep = epoch * iters + it
            lr = common.cosine_lr(gstep, total, warmup, args.lr, args.final_lr)  # per-iteration, set before step
            common.set_lr(opt, lr)
            out = step(x, y, gen)
            accumulate(acc, out)
            progress.step(gstep, loss=out["loss"], lr=lr)
        record.update(lr=lr, epoch_time_s=time.time() - t0,
                      **summarize(acc, iters, mods.get("prototypes") if stage == "prototypes" else None))
        if knn_every and ((epoch + 1) % knn_every == 0 or epoch + 1 == epochs) and ds.probe is not None \
                and ds.val is not None:
            m = evaluation.knn_monitor(evaluated.backbone, ds.probe, ds.val, device, ds.num_classes,
                                       recipe="test_imagenet", class_counts=ds.class_counts, class_rank=ds.class_rank)
            record["knn"] = {"acc_class_mean": m["acc_class_mean"], "groups_thirds": m["groups_thirds"]}
            print(f"[{stage}] ep {epoch + 1} kNN class-mean acc {m['acc_class_mean']:.2f}", flush=True)
        common.append_metrics(run_dir, record)
        state = checkpoint_state(args, ds.image_size, stage, epoch + 1, mods, opt, scaler, common.unwrap(evaluated),
                                 method)
        state["demo_profile"] = demo or {}                  # SYNTHETIC_DEMO values this run took (resume: record)
        common.save_checkpoint(run_dir / "checkpoint.pt", state)
        if budget["epochs"] is not None:
            budget["epochs"] -= 1
    common.save_checkpoint(run_dir / f"stage_{stage}.pt", state)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: linear probes (Tables 1-2) and the prototype analysis (Sec. 4.5, Tables 4-5, Fig. 4)
# ----------------------------------------------------------------------------------------------------------------
def group_of_classes(ds) -> torch.Tensor:
    """class id -> 0 Frequent / 1 Medium / 2 Rare (thirds rule, D§4.1)."""
    thirds = evaluation.group_masks(ds.class_counts, ds.class_rank)["thirds"]
    g = torch.zeros(ds.num_classes, dtype=torch.long)
    for i, name in enumerate(("many", "medium", "few")):
        g[thirds[name]] = i
    return g


@torch.no_grad()
def prototype_analysis(stage1: dict, args, ds, device, amp_dtype, run_dir) -> dict:
    """Sec. 4.5: each prototype's nearest training image (Stage-1 teacher and P, eval-mode BN, no augmentation;
    spec §3.7), the share of prototypes per Frequent / Medium / Rare group, and prototype_grid.png (Fig. 4)."""
    teacher, protos = teacher_from(args, ds.image_size, stage1)
    teacher.to(device)
    z, labels = evaluation.extract_features(teacher, ds.train, device, amp_dtype, recipe="test_imagenet")
    nearest = prototype_similarities(z, protos.weight.to(device)).argmax(0)   # (K,) argmax_i p^_k . z^_i
    cls = labels[nearest].cpu()
    grp = group_of_classes(ds)[cls]
    K = len(cls)
    share = {name: 100.0 * float((grp == i).sum()) / K for i, name in enumerate(("frequent", "medium", "rare"))}
    order = sorted(range(K), key=lambda k: (int(grp[k]), int(cls[k])))
    plot_prototype_grid(ds, nearest.cpu()[order], cls[order], grp[order], share, run_dir / "prototype_grid.png")
    return {"K": K, "share_percent": share, "counts": {k: round(v * K / 100) for k, v in share.items()},
            "nearest_index": nearest.tolist(), "nearest_class": cls.tolist(),
            "per_class": torch.bincount(cls, minlength=ds.num_classes).tolist()}


def plot_prototype_grid(ds, idx, cls, grp, share, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if ds.train.x is not None:
        imgs = ds.train.x[idx]
    else:                                                   # list datasets: decode the K images
        import torchvision.io as tvio
        imgs = torch.stack([F.interpolate(tvio.decode_image(ds.train.files[i], mode=tvio.ImageReadMode.RGB)[None]
                                          .float(), size=(96, 96), mode="bilinear")[0].byte() for i in idx.tolist()])
    cols = 16
    rows = math.ceil(len(idx) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 1.0), squeeze=False)
    colours = ("tab:blue", "tab:orange", "tab:red")
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(idx):
            ax.imshow(imgs[k].permute(1, 2, 0).numpy())
            ax.set_title(ds.class_names[int(cls[k])][:10], fontsize=5, color=colours[int(grp[k])])
    fig.suptitle("Prototype -> nearest training image (Fig. 4). Frequent {frequent:.1f}% / Medium {medium:.1f}% / "
                 "Rare {rare:.1f}%".format(**share), fontsize=8)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def probe_all(backbone_state, args, ds, device, amp_dtype) -> dict:
    bb = common.build_backbone(args.arch, ds.image_size)
    bb.load_state_dict(backbone_state)
    bb = common.prepare_model(bb, device, args.channels_last, False)
    return {mode: evaluation.linear_probe(bb, ds, device, amp_dtype, mode=mode, aug=args.probe_aug,
                                          epochs=args.probe_epochs, seed=args.seed) for mode in args.probes}


def knn_history(run_dir) -> list[dict]:
    import json
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [{"stage": r["stage"], "epoch": r["epoch"], **r["knn"]} for r in rows if "knn" in r]


# ----------------------------------------------------------------------------------------------------------------
# Benchmark and main
# ----------------------------------------------------------------------------------------------------------------
def benchmark(args: Args) -> None:
    """images/s of each stage's full training step (augmentation + forward + backward + update)."""
    device, amp_dtype = common.setup_device(args.device, args.amp)
    size = {"synthetic-lt": 32, "cifar10-lt": 32, "cifar100-lt": 32, "folder": 32, "tiny-imagenet-lt": 64}.get(
        args.dataset, 224)
    resolve_defaults(args, size)
    stored = size if size <= 64 else 256                    # list datasets arrive at 256 px (data.py loaders)
    B = args.batch_size
    x = torch.randint(0, 256, (B, 3, stored, stored), dtype=torch.uint8, device=device)
    y = torch.randint(0, 3, (B,), device=device)
    print(f"benchmark: {args.arch}, batch {B}, {size} px, device {device}, amp {amp_dtype}")
    for stage in STAGES:
        stage_name = "simclr" if stage == "sdclr" and args.prune_ratio == 0 else stage
        mods, opt, scaler, step, epoch_start, _ = BUILD[stage](args, size, device, amp_dtype)
        if epoch_start:
            epoch_start(0)
        gen = torch.Generator(device=device).manual_seed(0)
        for i in range(3 + args.bench_steps):
            if i == 3:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            out = step(x, y, gen)
        float(out["loss"])                                  # sync
        dt = time.perf_counter() - t0
        print(f"{stage_name:>10}: {B * args.bench_steps / dt:8.0f} img/s ({dt / args.bench_steps * 1000:.1f} ms/step)",
              flush=True)


def method_name(args: Args) -> str:
    if args.stage == "sdclr":
        return "simclr" if args.prune_ratio == 0 else "sdclr"
    return "fassl"


def parse(argv=None) -> Args:
    """common.make_parser(Args) plus the --no-init alias the paper's Table 9 row is named after."""
    parser = common.make_parser(Args)
    parser.add_argument("--no-init", dest="init", action="store_const", const="scratch",
                        help="same as --init scratch: teacher from random weights, Stage 0 skipped (Table 9)")
    return Args(**vars(parser.parse_args(argv)))


def main(argv=None):
    args = parse(argv)
    if args.benchmark:
        return benchmark(args)
    t_start = time.time()
    ck = run_dir = None
    if args.resume:                                          # restore the run's own args; keep runtime flags
        run_dir = common.make_run_dir(method_name(args), args.dataset, args.out_dir, resume=args.resume)
        path = pathlib.Path(args.resume) if pathlib.Path(args.resume).is_file() else run_dir / "checkpoint.pt"
        if path.is_file():                                   # ("auto" with no earlier run: a fresh run)
            ck = common.load_checkpoint(path)
            saved = {k: v for k, v in ck["args"].items() if k in {f.name for f in dataclasses.fields(Args)}}
            args = Args(**{**saved, **{k: getattr(args, k) for k in RUNTIME_FIELDS}})
            print(f"resuming {path}: stage {ck['stage']}, {ck['epoch']} epochs done")
    common.seed_everything(args.seed)
    device, amp_dtype = common.setup_device(args.device, args.amp)
    kw = ({"synthetic_n_max": args.synthetic_n_max, "synthetic_n_test": args.synthetic_n_test}
          if args.dataset == "synthetic-lt" else {})
    ds = data.load_dataset(args.dataset, args.data_dir, imb_ratio=args.imb_ratio, protocol=args.protocol,
                           split=args.split, split_file=args.split_file, seed=args.data_seed,
                           num_classes=args.num_classes, sdclr_split_dir=args.sdclr_split_dir, **kw)
    demo = ck.get("demo_profile", {}) if ck is not None else demo_defaults(args)
    resolve_defaults(args, ds.image_size)
    method = method_name(args)
    run_dir = run_dir or common.make_run_dir(method, args.dataset, args.out_dir)
    print(data.describe(ds))
    if demo:
        print("synthetic-lt demo profile (not a paper setting; pass a flag to override): "
              + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in demo.items()), flush=True)
    print(f"run dir: {run_dir}  device {device}  amp {amp_dtype}  arch {args.arch}")
    common.write_config(run_dir, args, ds.info())

    stages = list(STAGES) if args.stage == "all" else [args.stage]
    if args.init and args.stage == "all":
        stages = stages[1:]        # Stage 0 skipped: teacher from --init (e.g. a stage_sdclr.pt) or random (Table 9)
    init_ck = prev = common.load_checkpoint(args.init) if args.init not in (None, "scratch") else None
    if stages[0] != "sdclr" and args.init is None:
        raise common.UserError(f"--stage {stages[0]} needs a teacher: pass --init <stage_"
                               f"{STAGES[STAGES.index(stages[0]) - 1]}.pt> or --no-init (random teacher)")
    if stages[0] == "rebalance" and (prev is None or "prototypes" not in prev) and args.reweight:
        if prev is not None:
            raise common.UserError(f"--init {args.init} has no prototypes; pass a stage_prototypes.pt or add "
                                   "--no-reweight")
        print("warning: --stage rebalance --no-init re-weights with random prototypes; add --no-reweight for the "
              "BYOL-style row")
    groups, outputs, budget = group_of_classes(ds), {}, {"epochs": args.stop_after_epochs}
    for stage in stages:
        final = run_dir / f"stage_{stage}.pt"
        if ck is not None and final.is_file():              # finished before the interruption
            prev = common.load_checkpoint(final)
        else:
            resume_ck = ck if ck is not None and ck["stage"] == stage else None
            prev = train_stage(stage, args, ds, device, amp_dtype, run_dir, method, init=prev, ck=resume_ck,
                               group_of_class=groups, budget=budget, demo=demo)
            if prev is None:
                return run_dir
        outputs[stage] = prev

    # ---- evaluation ----
    network = {"sdclr": "backbone (SDCLR dense branch)" if args.prune_ratio > 0 else "backbone",
               "prototypes": "teacher", "rebalance": "student"}[stages[-1]]
    probes = probe_all(prev["backbone"], args, ds, device, amp_dtype)
    head_mode = args.probes[0]
    amp_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off")
    defaults = resolve_defaults(Args(dataset=args.dataset), ds.image_size)
    variant = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ABLATION_FIELDS
                       if getattr(args, k) != getattr(defaults, k)) or "default"
    if demo:
        variant = "synthetic-lt demo" + ("" if variant == "default" else " " + variant)
    paper = (args.dataset in ("cifar10-lt", "cifar100-lt", "tiny-imagenet-lt", "imagenet100-lt", "places-lt")
             and args.epochs_scale == 1 and args.probe_epochs is None and args.probe_aug == "crop")
    epochs = {"stage0": stage_epochs(args, "sdclr") if "sdclr" in stages else 0,
              "stage1": stage_epochs(args, "prototypes") if "prototypes" in stages else 0,
              "stage2": stage_epochs(args, "rebalance") if "rebalance" in stages else 0,
              "probe": probes[head_mode]["probe"]["epochs"]}
    results = evaluation.results_skeleton(method, variant, paper, ds, probes[head_mode]["protocol"], network,
                                          args.arch, epochs, args.seed, amp_name, time.time() - t_start)
    results.update({k: probes[head_mode][k] for k in ("selection", "at_selected", "at_last")})
    results["knn"] = knn_history(run_dir)
    results["extra"]["probe_variant"] = probes[head_mode]["variant"]
    if demo:
        results["extra"]["demo_profile"] = {"note": "not a paper setting: SYNTHETIC_DEMO, a CPU-sized demo for "
                                            "synthetic-lt", "set": demo}
    for mode, r in probes.items():
        results["extra"][f"probe_{mode}"] = {k: r[k] for k in ("protocol", "variant", "selection", "at_selected",
                                                               "at_last", "probe")}
    if args.probe_teacher and stages[-1] == "rebalance":
        teacher_backbone = {k[len("backbone."):]: v for k, v in prev["teacher"].items() if k.startswith("backbone.")}
        results["extra"]["teacher_probe"] = {m: {k: r[k] for k in ("selection", "at_selected")} for m, r in
                                             probe_all(teacher_backbone, args, ds, device, amp_dtype).items()}
    stage1 = outputs.get("prototypes") or (init_ck if stages == ["rebalance"] else None)   # Stage-1 teacher + P
    if args.analyze and stage1 is not None and "prototypes" in stage1:
        results["extra"]["prototypes"] = prototype_analysis(stage1, args, ds, device, amp_dtype, run_dir)
        s = results["extra"]["prototypes"]["share_percent"]
        print(f"prototypes (K={args.num_prototypes}): Frequent {s['frequent']:.2f}% / Medium {s['medium']:.2f}% / "
              f"Rare {s['rare']:.2f}%  -> {run_dir / 'prototype_grid.png'}")
    results["wall_time_s"] = time.time() - t_start
    evaluation.write_results(run_dir, results)
    print("| Method | All | Rare | Medium | Frequent | Std |")
    for mode, r in probes.items():
        print(f"| {method} ({mode}) " + evaluation.paper_row(r["at_selected"], style="ssl"))
    print(f"results: {run_dir / 'results.json'}")
    return run_dir


if __name__ == "__main__":
    with common.user_errors():
        main()
