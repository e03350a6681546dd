"""Hybrid-SC / Hybrid-PSC: contrastive-learning-based hybrid networks for long-tailed classification.

Paper: Wang, Han, Wei, Zhang, Wang, "Contrastive Learning based Hybrid Networks for Long-Tailed Image
Classification", CVPR 2021 (arXiv 2103.14267; shared/papers/003_*). Spec: shared/specs/supervised.md §2,
data-and-eval.md §5.3. The paper has no public code; every unstated detail is marked INFERRED.

One backbone, two branches, trained jointly (Sec. 3.1, Fig. 2):
  * feature branch: projection MLP -> L2-normalised z, trained with a supervised contrastive loss on a
    randomly sampled batch seen in two views: SC (Eq. 2-3, Hybrid-SC) or prototypical SC (Eq. 4, Hybrid-PSC);
  * classifier branch: one linear layer on the backbone representation, trained with cross-entropy on an
    independent class-balanced batch; it alone predicts at test time.
  * curriculum (Eq. 1): L = alpha(T) L_con + (1 - alpha(T)) L_CE, alpha = 1 - (T/T_max)^2 (CIFAR),
    1 - T/T_max (iNaturalist).

    python hybrid.py --dataset cifar10-lt --imb-ratio 100 --loss sc      # Table 1, Hybrid-SC, 81.40
    python hybrid.py --benchmark                                         # images/s of one training step
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import eval as evaluation
from common import arg

CIFAR = ("cifar10-lt", "cifar100-lt")


# ----------------------------------------------------------------------------------------------------------
# 1. Arguments. None = "the dataset's paper default", resolved by resolve_args().
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """Hybrid-SC / Hybrid-PSC (paper 003): joint supervised-contrastive feature learning and class-balanced
    classifier learning with a curriculum. Defaults are the paper's CIFAR-LT settings."""
    dataset: str = arg("cifar10-lt", "dataset: cifar10-lt / cifar100-lt (paper 003 Sec. 4.1), inat2018 (Sec. 4.2; partly non-paper settings), others non-paper", choices=list(data.DATASETS))
    data_dir: str = arg("./data", "dataset root (spec data-and-eval.md §1, §3)")
    imb_ratio: float = arg(100.0, "imbalance ratio rho = n_max / n_min: 100 | 50 | 10 (paper 003 Sec. 4.1, Table 1)")
    protocol: str = arg("ldam", "CIFAR-LT convention; paper 003 follows Cui et al. / LDAM (spec supervised.md §2.8, D§1.3)", choices=["ldam", "sdclr"])
    loss: str = arg("sc", "feature-branch loss: sc = Hybrid-SC (Eq. 2-3), psc = Hybrid-PSC (Eq. 4), ce = CE-CE row of Table 4 (INFERRED reading, spec §2.7)", choices=["sc", "psc", "ce"])
    arch: Optional[str] = arg(None, "backbone; default resnet32 on CIFAR (paper 003 Sec. 4.2), resnet50 on inat2018 (Sec. 4.2), resnet8 on synthetic-lt (demo, not a paper setting)")
    proj_hidden: Optional[int] = arg(None, "projection MLP hidden width (one hidden layer, Sec. 3.1); default = backbone width, 64 for resnet32 (INFERRED, spec §2.4)")
    proj_dim: int = arg(128, "dimension of the normalised embedding z (INFERRED, spec §2.4)")
    epochs: Optional[int] = arg(None, "training epochs T_max; default 200 on CIFAR, 100 on inat2018 (paper 003 Sec. 4.2), 16 on synthetic-lt (demo, not a paper setting)")
    batch_size: Optional[int] = arg(None, "random (contrastive) batch N, each image in two views; default 512 on CIFAR (Hybrid repro), 100 on inat2018 (Sec. 4.2), 128 on synthetic-lt (demo, not a paper setting)")
    cb_batch_size: Optional[int] = arg(None, "class-balanced CE batch; default = --batch-size (INFERRED, spec §2.4)")
    lr: Optional[float] = arg(None, "base LR; default 0.5 on CIFAR (Hybrid repro), 0.1 on inat2018 (lost; INFERRED), 0.1 on synthetic-lt (demo, not a paper setting)")
    momentum: float = arg(0.9, "SGD momentum (paper 003 Sec. 4.2)")
    weight_decay: float = arg(1e-4, "weight decay, not on PSC prototypes (Hybrid repro; iNat value lost, INFERRED; prototypes INFERRED)")
    milestones: list[int] = arg([], "LR decay epochs, 1-based; empty = dataset default: 120 160 on CIFAR (Hybrid repro), 60 80 on inat2018 (Sec. 4.2), 60% and 80% of --epochs on synthetic-lt (demo, not a paper setting)")
    lr_gamma: float = arg(0.1, "LR decay factor (Hybrid repro; iNat factor lost, INFERRED)")
    tau: Optional[float] = arg(None, "temperature; default SC 0.1, PSC 1.0 on CIFAR-10 and 0.1 on CIFAR-100 (Hybrid repro, Sec. 4.2), 0.1 on inat2018 (lost; INFERRED)")
    alpha_schedule: Optional[str] = arg(None, "curriculum of Eq. 1: parabolic 1-(T/T_max)^2 (default on CIFAR) or linear 1-T/T_max (default on inat2018) (Sec. 4.2)", choices=["parabolic", "linear"])
    no_curriculum: Optional[float] = arg(None, "fix alpha of Eq. 1 to this value (Table 5 'w/o curriculum'; the paper's value is lost, 0.5 INFERRED)")
    two_stage: bool = arg(False, "Table 5 'two-stage SC': feature branch alone (alpha = 1) for --epochs, then a linear classifier on the frozen backbone (stage-2 recipe INFERRED, spec §2.7)")
    stage2_epochs: int = arg(40, "two-stage: classifier epochs (INFERRED, spec §2.7)")
    stage2_lr: float = arg(0.5, "two-stage: classifier LR (INFERRED, spec §2.7)")
    stage2_milestones: list[int] = arg([20, 30], "two-stage: classifier LR decay epochs (INFERRED, spec §2.7)")
    stage2_weight_decay: float = arg(0.0, "two-stage: classifier weight decay (INFERRED, spec §2.7)")
    con_sampler: str = arg("random", "sampler of the contrastive batch: random (paper) or balanced (CB-PSC, Table 3)", choices=["random", "balanced"])
    prototypes_per_class: int = arg(1, "PSC prototypes per class; > 1 = MPSC (Eq. 5), EXPERIMENTAL: never evaluated in the paper, formula lost, weights INFERRED")
    psc_include_pos: bool = arg(False, "keep the positive prototype in the Eq. 4 denominator (softmax-style diagnostic, spec §2.7; paper excludes it)")
    fused_forward: bool = arg(False, "one backbone pass for both batches, shared BN statistics (diagnostic; default two passes, INFERRED, spec §2.3)")
    eval_every: int = arg(10, "evaluate the classifier branch on the test set every N epochs and at the end (spec D§5.3)")
    seed: int = arg(0, "random seed; one run per setting (INFERRED, spec §2.4)")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N (project convention)")
    amp: str = arg("auto", "mixed precision: auto = bf16 on CUDA, off on CPU (spec ssl.md §0.5)", choices=["auto", "bf16", "fp16", "off"])
    channels_last: bool = arg(True, "channels_last memory format on CUDA (project speed convention)")
    compile: bool = arg(False, "torch.compile the network (project speed convention)")
    workers: int = arg(8, "data-loader workers for list datasets (project convention)")
    out_dir: str = arg("runs", "parent of the run directory (project convention)")
    resume: Optional[str] = arg(None, "checkpoint path to resume exactly, or 'auto' for the newest run of this setting (project convention)")
    print_every: int = arg(20, "progress-line interval in iterations (project convention)")
    benchmark: bool = arg(False, "time training steps on random data, print images/s and exit (project convention)")
    benchmark_steps: int = arg(10, "timed steps of --benchmark (project convention)")


# Not a paper setting: a CPU-sized demo for synthetic-lt (a few minutes on a 2-core CPU). It fills only the
# fields left unset on the command line. The LR decays at 60% and 80% of the epochs, the ratio of the CIFAR
# milestones 120/160 of 200, and the Eq. (1) curriculum runs its full course over these epochs.
SYNTHETIC_DEMO = {"arch": "resnet8", "epochs": 16, "batch_size": 128, "lr": 0.1, "milestones": (0.6, 0.8)}


def demo_defaults(args: Args) -> dict:
    """The SYNTHETIC_DEMO values this run takes: synthetic-lt only, and only fields not set on the command line."""
    if args.dataset != "synthetic-lt":
        return {}
    demo = {k: v for k, v in SYNTHETIC_DEMO.items() if k != "milestones" and getattr(args, k) is None}
    if not args.milestones:   # fractions of the epochs this run will train (the demo's or --epochs)
        epochs = demo.get("epochs", args.epochs)
        demo["milestones"] = [round(f * epochs) for f in SYNTHETIC_DEMO["milestones"]]
    return demo


def resolve_args(args: Args, num_classes: int) -> Args:
    """Fill the dataset-dependent defaults (paper 003 Sec. 4.2; spec supervised.md §2.4; synthetic-lt demo)."""
    inat = args.dataset == "inat2018"
    r = dataclasses.replace(args, **demo_defaults(args))
    r.arch = r.arch or ("resnet50" if inat else "resnet32")
    r.epochs = r.epochs or (100 if inat else 200)
    r.batch_size = r.batch_size or (100 if inat else 512)
    r.cb_batch_size = r.cb_batch_size or r.batch_size
    r.lr = r.lr if r.lr is not None else (0.1 if inat else 0.5)
    r.milestones = list(r.milestones) or ([60, 80] if inat else [120, 160])
    r.alpha_schedule = r.alpha_schedule or ("linear" if inat else "parabolic")
    if r.tau is None:  # PSC: 1.0 on CIFAR-10, 0.1 on CIFAR-100 (and on iNat, INFERRED)
        r.tau = 1.0 if (r.loss == "psc" and num_classes <= 10 and not inat) else 0.1
    return r


# ----------------------------------------------------------------------------------------------------------
# 2. Model: shared backbone, projection-MLP feature branch, linear classifier branch (Sec. 3.1, Fig. 2).
# ----------------------------------------------------------------------------------------------------------
class HybridNet(nn.Module):
    def __init__(self, arch: str, num_classes: int, image_size: int, loss: str, proj_hidden: int | None,
                 proj_dim: int, prototypes_per_class: int):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size)
        d = self.backbone.out_dim
        self.classifier = nn.Linear(d, num_classes)                       # W r + b, the test-time predictor
        if loss == "ce":   # CE-CE (Table 4): the feature branch becomes a second linear head (INFERRED reading)
            self.head = nn.Linear(d, num_classes)
        else:              # one-hidden-layer MLP projection, no BN (widths INFERRED, spec §2.4; SupContrast head)
            self.head = common.projection_mlp(d, proj_hidden or d, proj_dim, num_layers=2, bn=False)
        if loss == "psc":  # one (or M, MPSC) learnable prototype per class, N(0,1) init, normalised on use (INFERRED)
            self.prototypes = nn.Parameter(torch.randn(num_classes, prototypes_per_class, proj_dim))
        else:
            self.prototypes = None

    def forward(self, x_con: torch.Tensor | None, x_ce: torch.Tensor | None, fused: bool = False):
        """x_con: the 2N contrastive views -> head output (un-normalised z, or CE-CE logits);
        x_ce: the class-balanced batch -> classifier logits. Either may be None (branch weight 0)."""
        if fused and x_con is not None and x_ce is not None:   # --fused-forward: one pass, shared BN stats
            r = self.backbone(torch.cat([x_con, x_ce]))
            r_con, r_ce = r[: len(x_con)], r[len(x_con):]
        else:                                                   # default: two passes, own BN stats each
            r_con = self.backbone(x_con) if x_con is not None else None
            r_ce = self.backbone(x_ce) if x_ce is not None else None
        out_con = self.head(r_con) if r_con is not None else None
        logits = self.classifier(r_ce) if r_ce is not None else None
        return out_con, logits


# ----------------------------------------------------------------------------------------------------------
# 3. Losses (pure functions; fp32, log-softmax / logsumexp forms).
# ----------------------------------------------------------------------------------------------------------
def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SC loss of Khosla et al., paper 003 Eq. (2)-(3), averaged over all anchors.

    z: (2N, D) embeddings of every view (both views of an image carry that image's label); normalised here
    in fp32. For anchor i, P(i) = every other row with label y_i (always including i's other view), and the
    denominator runs over all rows k != i:
        L_i = -1/|P(i)| sum_{j in P(i)} [ z_i.z_j/tau - LSE_{k != i} z_i.z_k/tau ]          # Eq. (2)
        L   = mean_i L_i   (the paper sums; mean INFERRED, spec §2.2)                        # Eq. (3)
    Anchors without any positive (impossible with two views) are left out of the mean.
    """
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=1)   # LSE over k != i
    pos = (labels[:, None] == labels[None, :]) & ~self_mask                              # P(i)
    n_pos = pos.sum(1)
    per_anchor = -torch.where(pos, log_prob, 0.0).sum(1) / n_pos.clamp(min=1)            # Eq. (2)
    valid = (n_pos > 0).float()
    return (per_anchor * valid).sum() / valid.sum().clamp(min=1)                         # Eq. (3), mean


def psc_from_affinity(a: torch.Tensor, labels: torch.Tensor, temperature: float, include_pos: bool = False,
                      reduction: str = "mean") -> torch.Tensor:
    """PSC loss, paper 003 Eq. (4), from the affinities a_j = z . p^_j: (B, C) or (B, C, M) for M prototypes.

        L = - a_y/tau + LSE_{j != y} a_j/tau                                                 # Eq. (4)
    The positive prototype is excluded from the denominator (Sec. 3.3: "a negative size of C - 1"), hence
    dL/da_y = -1/tau exactly (Sec. 4.4) and L can be negative. include_pos=True gives the softmax-style
    variant. MPSC (Eq. 5, EXPERIMENTAL, formula lost): the positive term is sum_m w_m a_{y,m}/tau with
    w = stop-grad softmax_m(a_{y,m}/tau) (INFERRED), and the LSE runs over all prototypes of the other
    classes; M = 1 gives Eq. (4) exactly.
    """
    if a.dim() == 2:
        a = a.unsqueeze(-1)
    b, c, m = a.shape
    logits = a.float() / temperature
    own = logits[torch.arange(b, device=a.device), labels]                   # (B, M): a_{y,m} / tau
    w = torch.softmax(own, dim=1).detach()                                   # Eq. (5) weights; 1 when M = 1
    pos_term = (w * own).sum(1)
    if include_pos:
        neg = logits
    else:
        is_pos = F.one_hot(labels, c).bool()[:, :, None].expand(b, c, m)
        neg = logits.masked_fill(is_pos, float("-inf"))
    loss = torch.logsumexp(neg.reshape(b, c * m), dim=1) - pos_term          # Eq. (4)
    return loss.mean() if reduction == "mean" else loss


def psc_loss(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, temperature: float,
             include_pos: bool = False) -> torch.Tensor:
    """Prototypical supervised contrastive loss, paper 003 Eq. (4) (Eq. (5) when prototypes is (C, M, D)).

    z: (B, D) embeddings (every view of the random batch is an anchor); prototypes: (C, D) or (C, M, D)
    learnable, normalised here (p^_c = n(p_c)). Mean over the B anchors (INFERRED, spec §2.2). Needs C >= 2.
    """
    z = F.normalize(z.float(), dim=1)
    p = F.normalize(prototypes.float(), dim=-1)
    a = torch.einsum("bd,cmd->bcm", z, p if p.dim() == 3 else p.unsqueeze(1))
    return psc_from_affinity(a, labels, temperature, include_pos)


def curriculum_alpha(epoch: int, epochs: int, schedule: str = "parabolic", fixed: float | None = None) -> float:
    """Eq. (1) weight alpha(T) of the feature branch, T = epoch = 0 .. T_max-1, updated once per epoch (INFERRED).
    parabolic: 1 - (T/T_max)^2 (CIFAR, Sec. 4.2); linear: 1 - T/T_max (iNaturalist, Sec. 4.2); fixed: Table 5."""
    if fixed is not None:
        return float(fixed)
    t = epoch / epochs
    return 1.0 - t * t if schedule == "parabolic" else 1.0 - t


# ----------------------------------------------------------------------------------------------------------
# 4. Training.
# ----------------------------------------------------------------------------------------------------------
def feature_loss(model: HybridNet, out_con: torch.Tensor, y2: torch.Tensor, args: Args) -> torch.Tensor:
    """L_con of Eq. (1) on the 2N views (labels y2 = [y; y])."""
    if args.loss == "sc":
        return supcon_loss(out_con, y2, args.tau)                                    # Eq. (2)-(3)
    if args.loss == "psc":
        return psc_loss(out_con, y2, model.prototypes, args.tau, args.psc_include_pos)  # Eq. (4) / (5)
    return F.cross_entropy(out_con.float(), y2)                                      # CE-CE (Table 4)


def train_step(model, unwrapped: HybridNet, optimizer, scaler, batch_con, batch_ce, alpha: float, args: Args,
               gen, image_size: int, device, amp_dtype):
    """One SGD step of Eq. (1). batch_con: uint8 random batch (two views: with / without colour jitter,
    Sec. 4.2); batch_ce: uint8 class-balanced batch (one base view). A branch with weight 0 is skipped.
    Returns the two detached losses (no host sync)."""
    zero = torch.zeros((), device=device)
    x_con = x_ce = None
    if alpha > 0:
        x, y = batch_con
        x_con = torch.cat([data.augment(x, "hybrid_base", gen, image_size),        # view A: base aug
                           data.augment(x, "hybrid_jitter", gen, image_size)])     # view B: base + jitter
        y2 = torch.cat([y, y])
    if alpha < 1:
        xc, yc = batch_ce
        x_ce = data.augment(xc, "hybrid_base", gen, image_size)
    if device.type == "cuda" and args.channels_last:
        x_con = x_con.contiguous(memory_format=torch.channels_last) if x_con is not None else None
        x_ce = x_ce.contiguous(memory_format=torch.channels_last) if x_ce is not None else None
    with common.autocast(device, amp_dtype):
        out_con, logits = model(x_con, x_ce, args.fused_forward)
    l_con = feature_loss(unwrapped, out_con, y2, args) if out_con is not None else zero
    l_ce = F.cross_entropy(logits.float(), yc) if logits is not None else zero
    loss = alpha * l_con + (1.0 - alpha) * l_ce                                      # Eq. (1)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return l_con.detach(), l_ce.detach()


def stage2_step(unwrapped: HybridNet, optimizer, batch_ce, gen, image_size: int, device, amp_dtype):
    """Two-stage SC, stage 2 (Table 5): CE on a class-balanced batch, frozen backbone in eval mode."""
    xc, yc = batch_ce
    x = data.augment(xc, "hybrid_base", gen, image_size)
    with torch.no_grad(), common.autocast(device, amp_dtype):
        r = unwrapped.backbone(x)
    loss = F.cross_entropy(unwrapped.classifier(r.float()), yc)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_optimizer(unwrapped: HybridNet, args: Args) -> torch.optim.SGD:
    """SGD momentum 0.9, wd 1e-4 (Sec. 4.2); prototypes without weight decay (INFERRED, spec §2.8)."""
    decay = [p for n, p in unwrapped.named_parameters() if n != "prototypes"]
    groups = [{"params": decay, "weight_decay": args.weight_decay}]
    if unwrapped.prototypes is not None:
        groups.append({"params": [unwrapped.prototypes], "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def endless(loader, epoch: int):
    """Class-balanced batches for one epoch of the random loader; restarts (reseeded) if it runs out first."""
    for k in itertools.count():
        loader.set_epoch(epoch + 100_003 * k)
        for x, y, _ in loader:
            yield x, y


def method_name(args: Args) -> str:
    return {"sc": "hybrid-sc", "psc": "hybrid-psc", "ce": "hybrid-ce-ce"}[args.loss]


def variant_of(args: Args) -> str:
    parts = [f"--loss {args.loss}"]
    if args.two_stage:
        parts.append("--two-stage")
    if args.no_curriculum is not None:
        parts.append(f"--no-curriculum {args.no_curriculum}")
    for name in ("con_sampler", "prototypes_per_class", "psc_include_pos", "fused_forward"):
        if getattr(args, name) != Args.__dataclass_fields__[name].default:
            parts.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    if args.dataset == "inat2018":
        parts.append("hybrid-inat (partly non-paper settings)")
    return " ".join(parts)


def paper_dataset(ds: data.LTDataset) -> str | None:
    """'cifar10-lt' / 'cifar100-lt' for the canonical CIFAR-LT sets and their JPEG copies (--dataset folder), else None."""
    if ds.name in CIFAR:
        return ds.name
    if ds.name == "folder" and ds.image_source == "jpeg-copy" and ds.num_classes in (10, 100):
        return f"cifar{ds.num_classes}-lt"
    return None


def is_paper_setting(args: Args, paper_ds: str | None) -> bool:
    """Paper data (CIFAR-LT, ldam; a JPEG copy is labelled by dataset.image_source) and no non-paper switch."""
    return (paper_ds is not None and args.protocol == "ldam" and args.prototypes_per_class == 1
            and not args.psc_include_pos and not args.fused_forward)


# Paper 003 top-1 targets: Table 1 (SC, PSC), Table 3 (CB-PSC), Table 4 (CE-CE), Table 5 (two-stage, fixed alpha).
PAPER_TOP1 = {
    ("cifar10-lt", "sc"): (81.40, 85.36, 91.12), ("cifar10-lt", "psc"): (78.82, 83.86, 90.06),
    ("cifar100-lt", "sc"): (46.72, 51.87, 63.05), ("cifar100-lt", "psc"): (44.97, 48.93, 62.37),
    ("cifar10-lt", "cb-psc"): (78.84, 82.85, 89.85), ("cifar100-lt", "cb-psc"): (44.21, 49.66, 61.93),
    ("cifar100-lt", "ce"): (41.40, 46.68, 59.14), ("cifar100-lt", "two-stage"): (42.73, 46.76, 60.62),
    ("cifar100-lt", "no-curriculum"): (42.58, 47.45, 60.48),
}


def paper_target(args: Args, paper_ds: str | None) -> float | None:
    """The paper's top-1 for this run's setting (column = imbalance ratio 100 | 50 | 10), or None."""
    key = ("two-stage" if args.two_stage else "no-curriculum" if args.no_curriculum is not None
           else "cb-psc" if args.loss == "psc" and args.con_sampler == "balanced" else args.loss)
    row = PAPER_TOP1.get((paper_ds, key))
    col = {100.0: 0, 50.0: 1, 10.0: 2}.get(float(args.imb_ratio))
    return row[col] if row is not None and col is not None and is_paper_setting(args, paper_ds) else None


def train(args: Args, ds: data.LTDataset | None = None) -> dict:
    """Full run: data, model, Eq. (1) training (or two-stage), periodic evaluation, results.json."""
    if ds is None:
        # data seed stays 0 (the LDAM subset, D§1.3); --seed only seeds training
        ds = data.load_dataset(args.dataset, args.data_dir, imb_ratio=args.imb_ratio, protocol=args.protocol)
    demo = demo_defaults(args)
    args = resolve_args(args, ds.num_classes)
    if args.loss == "psc" and ds.num_classes < 2:
        raise common.UserError("PSC needs at least 2 classes (Eq. 4 contrasts against the other classes' prototypes)")
    if args.prototypes_per_class < 1:
        raise common.UserError(f"--prototypes-per-class must be >= 1, got {args.prototypes_per_class}")
    if len(ds.train) < args.batch_size:
        raise common.UserError(f"--batch-size {args.batch_size} exceeds the {len(ds.train)} training images; "
                               "pass a smaller --batch-size")
    device, amp_dtype = common.setup_device(args.device, args.amp)
    common.seed_everything(args.seed)
    run_dir = common.make_run_dir(method_name(args), args.dataset, args.out_dir, args.resume)
    if common.is_main():
        print(data.describe(ds))
        print(f"[{method_name(args)}] run dir {run_dir} | {args.arch} | batch {args.batch_size}+{args.cb_batch_size} "
              f"| lr {args.lr} x{args.lr_gamma} at {args.milestones} | {args.epochs} epochs | tau {args.tau} "
              f"| alpha {args.alpha_schedule if args.no_curriculum is None else args.no_curriculum} | {device} {amp_dtype}")
        if demo:
            flags = " ".join(f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
                             for k, v in demo.items())
            print(f"[{method_name(args)}] synthetic-lt demo profile in use (SYNTHETIC_DEMO, not a paper setting): "
                  f"{flags}; pass any of these flags to override it")
    common.write_config(run_dir, args, ds.info())

    unwrapped = HybridNet(args.arch, ds.num_classes, ds.image_size, args.loss, args.proj_hidden, args.proj_dim,
                          args.prototypes_per_class)
    model = common.prepare_model(unwrapped, device, args.channels_last, args.compile)
    unwrapped = common.unwrap(model)
    optimizer = make_optimizer(unwrapped, args)
    scaler = common.make_scaler(amp_dtype)
    stage2_opt = torch.optim.SGD(unwrapped.classifier.parameters(), lr=args.stage2_lr, momentum=args.momentum,
                                 weight_decay=args.stage2_weight_decay)
    total_epochs = args.epochs + (args.stage2_epochs if args.two_stage else 0)

    con_loader = data.make_loader(ds.train, args.batch_size, device, sampler=args.con_sampler, seed=args.seed,
                                  workers=args.workers, image_size=ds.image_size)
    ce_loader = data.make_loader(ds.train, args.cb_batch_size, device, sampler="balanced", seed=args.seed + 1,
                                 workers=args.workers, image_size=ds.image_size)
    recipe = "test_cifar"   # normalisation only, with the statistics of hybrid_base (LDAM CIFAR mean/std, D§7.2)

    start, history, best, wall0 = 0, [], {"epoch": 0, "top1": -1.0, "selected_on_test": True}, 0.0
    ckpt_path = run_dir / "checkpoint.pt"
    resume_from = args.resume if args.resume and args.resume != "auto" and Path(args.resume).is_file() else ckpt_path
    if args.resume and (args.resume != "auto" or ckpt_path.exists()):   # a named checkpoint must exist
        ck = common.load_checkpoint(resume_from)
        state = {**{"backbone." + k: v for k, v in ck["backbone"].items()},
                 **{"classifier." + k: v for k, v in ck["classifier"].items()}, **ck["heads"]}
        unwrapped.load_state_dict(state)
        (stage2_opt if ck["stage"] == "classifier" else optimizer).load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        common.set_rng_state(ck["rng"])
        start, history, best, wall0 = ck["epoch"], ck["history"], ck["best_test"], ck["wall_time_s"]
        print(f"[{method_name(args)}] resumed from {resume_from} at epoch {start}/{total_epochs}")

    steps = len(con_loader)
    progress = common.Progress(steps * total_epochs, args.batch_size, every=args.print_every, prefix=method_name(args))
    gen = torch.Generator(device=device)
    t0, last_metrics = time.time(), None
    for epoch in range(start, total_epochs):
        stage = "classifier" if epoch >= args.epochs else ("feature" if args.two_stage else "joint")
        gen.manual_seed(args.seed * 1_000_003 + epoch)          # augmentation stream = f(seed, epoch): exact resume
        progress.set_epoch(epoch + 1, total_epochs)
        con_loader.set_epoch(epoch)
        ce_batches = endless(ce_loader, epoch)
        sum_con = torch.zeros((), device=device)
        sum_ce = torch.zeros((), device=device)
        if stage == "classifier":                               # Table 5 two-stage, stage 2 (spec §2.7)
            e2 = epoch - args.epochs
            lr = common.multistep_lr(e2 + 1, args.stage2_lr, args.stage2_milestones, args.lr_gamma)
            common.set_lr(stage2_opt, lr)
            alpha = 0.0
            unwrapped.eval()
            for it in range(steps):                    # N_train // batch class-balanced batches (D§7.3)
                sum_ce += stage2_step(unwrapped, stage2_opt, next(ce_batches), gen, ds.image_size, device, amp_dtype)
                progress.step(epoch * steps + it, loss=sum_ce / (it + 1), lr=lr)
        else:
            lr = common.multistep_lr(epoch + 1, args.lr, args.milestones, args.lr_gamma)   # x0.1 at 120, 160
            common.set_lr(optimizer, lr)
            alpha = 1.0 if args.two_stage else curriculum_alpha(epoch, args.epochs, args.alpha_schedule,
                                                                   args.no_curriculum)    # Eq. (1)
            model.train()
            for it, (x, y, _) in enumerate(con_loader):
                l_con, l_ce = train_step(model, unwrapped, optimizer, scaler, (x, y),
                                         next(ce_batches) if alpha < 1 else None, alpha, args, gen,
                                         ds.image_size, device, amp_dtype)
                sum_con += l_con
                sum_ce += l_ce
                progress.step(epoch * steps + it, loss=(alpha * sum_con + (1 - alpha) * sum_ce) / (it + 1),
                              lr=lr, alpha=alpha)
        record = {"epoch": epoch + 1, "stage": stage, "alpha": alpha, "lr": lr,
                  "loss_con": (sum_con / steps).item(), "loss_ce": (sum_ce / steps).item(),
                  "time_s": wall0 + time.time() - t0}
        done = epoch + 1 == total_epochs
        if (done or (epoch + 1) % args.eval_every == 0) and stage != "feature":   # classifier untrained in stage 1
            last_metrics = evaluation.classifier_eval(unwrapped.backbone, unwrapped.classifier, ds, device,
                                                      amp_dtype, recipe)          # balanced test set, D§5.3
            top1 = last_metrics["top1_overall"]
            record["test_top1"] = top1
            history.append({"epoch": epoch + 1, "top1": top1})
            if top1 > best["top1"]:
                best = {"epoch": epoch + 1, "top1": top1, "selected_on_test": True}
            print(f"[{method_name(args)}] epoch {epoch + 1}: test top-1 {top1:.2f} (classifier branch)")
        common.append_metrics(run_dir, record)
        full = unwrapped.state_dict()
        common.save_checkpoint(ckpt_path, {
            "method": "hybrid", "arch": args.arch, "image_size": ds.image_size, "args": dataclasses.asdict(args),
            "epoch": epoch + 1, "stage": stage,
            "backbone": unwrapped.backbone.state_dict(), "classifier": unwrapped.classifier.state_dict(),
            "heads": {k: v for k, v in full.items() if not k.startswith(("backbone.", "classifier."))},
            "optimizer": (stage2_opt if stage == "classifier" else optimizer).state_dict(),
            "scaler": scaler.state_dict(), "rng": common.rng_state(), "history": history, "best_test": best,
            "wall_time_s": wall0 + time.time() - t0})

    # ------------------------------------------------------------------------------------------------------
    # 5. Evaluation summary: headline = last epoch (D§5.5); best test epoch stored, flagged selected_on_test.
    # ------------------------------------------------------------------------------------------------------
    if last_metrics is None:   # resumed a finished run: evaluate the final weights once
        last_metrics = evaluation.classifier_eval(unwrapped.backbone, unwrapped.classifier, ds, device,
                                                  amp_dtype, recipe)
    epochs = {"train": args.epochs, **({"stage2": args.stage2_epochs} if args.two_stage else {})}
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off")
    paper_ds = paper_dataset(ds)
    variant = variant_of(args) + (" synthetic-lt demo profile (not a paper setting)" if demo else "")
    results = evaluation.results_skeleton(method_name(args), variant, is_paper_setting(args, paper_ds), ds,
                                          "hybrid-e2e", "backbone", args.arch, epochs, args.seed, amp,
                                          wall0 + time.time() - t0)
    results["selection"] = {"rule": "last-epoch", "selected_epoch": total_epochs, "last_epoch": total_epochs}
    results["at_selected"] = last_metrics
    results["at_last"] = last_metrics
    results["best_test"] = best
    target = paper_target(args, paper_ds)
    results["extra"] = {"tau": args.tau, "alpha_schedule": args.alpha_schedule, "no_curriculum": args.no_curriculum,
                        "test_history": history, "paper_top1": target, "synthetic_demo": demo}
    evaluation.write_results(run_dir, results)
    if common.is_main():
        print(f"[{method_name(args)}] | Top-1 |  (last epoch; paper: {target if target is not None else 'n/a'})")
        print(evaluation.paper_row(last_metrics, style="top1"))
        print(f"[{method_name(args)}] results: {run_dir / 'results.json'}")
    return results


# ----------------------------------------------------------------------------------------------------------
# 6. Benchmark and main.
# ----------------------------------------------------------------------------------------------------------
def benchmark(args: Args) -> float:
    """Images/s of one training step (augmentation + both branches + SGD) on random CIFAR-sized data."""
    num_classes = 100 if args.dataset == "cifar100-lt" else 10
    args = resolve_args(args, num_classes)
    image_size = 224 if args.dataset == "inat2018" else 32
    device, amp_dtype = common.setup_device(args.device, args.amp)
    common.seed_everything(args.seed)
    unwrapped = HybridNet(args.arch, num_classes, image_size, args.loss, args.proj_hidden, args.proj_dim,
                          args.prototypes_per_class)
    model = common.prepare_model(unwrapped, device, args.channels_last, args.compile)
    unwrapped = common.unwrap(model)
    optimizer, scaler = make_optimizer(unwrapped, args), common.make_scaler(amp_dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n, nc = args.batch_size, args.cb_batch_size
    x = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, device=device)
    xc = torch.randint(0, 256, (nc, 3, image_size, image_size), dtype=torch.uint8, device=device)
    y = torch.randint(0, num_classes, (n,), device=device)
    yc = torch.randint(0, num_classes, (nc,), device=device)
    model.train()
    alpha = 0.5   # both branches active, as in every epoch but the first

    def run(k):
        for _ in range(k):
            out = train_step(model, unwrapped, optimizer, scaler, (x, y), (xc, yc), alpha, args, gen,
                             image_size, device, amp_dtype)
        out[0].item()   # one host sync at the end

    run(3)   # warm-up (and compilation)
    t = time.time()
    run(args.benchmark_steps)
    dt = (time.time() - t) / args.benchmark_steps
    ips = n / dt
    print(f"[{method_name(args)} benchmark] {args.arch} {image_size}px on {device} amp={amp_dtype} "
          f"compile={args.compile}: {dt * 1000:.1f} ms/step, {ips:.0f} images/s "
          f"(random batch {n} x 2 views + class-balanced batch {nc} per step)")
    return ips


def main(argv=None) -> None:
    args = common.parse_args(Args, argv)
    with common.user_errors():
        if args.benchmark:
            benchmark(args)
        else:
            train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
