"""Hybrid-SC / Hybrid-PSC: contrastive-learning-based hybrid networks for long-tailed classification.

Wang, Han, Wei, Zhang, Wang, "Contrastive Learning based Hybrid Networks for Long-Tailed Image
Classification", CVPR 2021. The authors released no code: every detail the paper leaves open is marked
INFERRED here, in --help and in docs/hybrid.md, with its reason.

One backbone, two branches, trained together (Sec. 3.1, Fig. 2):
  * feature branch: projection MLP -> L2-normalised z, supervised contrastive loss on a random batch seen
    in two views: SC (Eq. 2-3, Hybrid-SC) or prototypical SC (Eq. 4, Hybrid-PSC);
  * classifier branch: one linear layer, cross-entropy on its own class-balanced batch; it alone predicts;
  * curriculum (Eq. 1): L = alpha(T) L_con + (1 - alpha(T)) L_CE, alpha = 1 - (T/T_max)^2 (CIFAR).

  Paper                 What                                                 Here
  Sec. 3.1, Fig. 2      backbone, projection MLP, linear classifier          HybridNet
  Eq. (2)-(3)           SC loss (positives: same-class views)                supcon_loss
  Eq. (4)               PSC loss, positive prototype not in the denominator  psc_loss -> psc_from_affinity
  Eq. (5)               MPSC, M prototypes per class (EXPERIMENTAL)          psc_from_affinity, (B, C, M)
  Eq. (1), Sec. 4.2     alpha(T) L_con + (1 - alpha(T)) L_CE; alpha schedule train_step, curriculum_alpha
  Table 4               CE-CE: a second linear head replaces L_con           feature_loss (--loss ce)
  Table 5               two-stage SC                                         classifier_step (--two-stage)
  Table 5               fixed alpha, no curriculum                           curriculum_alpha (fixed=)
  Table 3               CB-PSC: class-balanced contrastive batch             train (--con-sampler balanced)

    python hybrid.py --dataset cifar10-lt              # Hybrid-SC, Table 1 (81.40)
    python hybrid.py --dataset cifar10-lt --loss psc   # Hybrid-PSC, Table 1 (78.82)
    python hybrid.py --dataset synthetic-lt            # CPU demo in about a minute, no files needed
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import eval as evaluation
from common import arg

CIFAR = ("cifar10-lt", "cifar100-lt")


@dataclass
class Args(common.RunArgs):
    """Hybrid-SC / Hybrid-PSC (Wang et al., CVPR 2021): supervised contrastive feature learning and a
    class-balanced classifier trained together under a curriculum. A flag left unset takes the value of
    the dataset's row in DEFAULTS (shown below per flag); docs/hybrid.md has the INFERRED choices."""
    loss: str = arg("sc", "feature-branch loss: sc = Hybrid-SC (Eq. 2-3), psc = Hybrid-PSC (Eq. 4), "
                    "ce = the CE-CE row of Table 4 (INFERRED reading)", choices=["sc", "psc", "ce"])
    arch: Optional[str] = arg(None, "backbone (Sec. 4.2)", choices=list(common.ARCHS))
    proj_hidden: Optional[int] = arg(None, "hidden width of the one-hidden-layer projection MLP (Sec. 3.1); "
                                     "None = the backbone width (INFERRED)", check=">=1")
    proj_dim: int = arg(128, "dimension of z (INFERRED)", check=">=1")
    epochs: Optional[int] = arg(None, "training epochs T_max (Sec. 4.2)", check=">=0")
    batch_size: Optional[int] = arg(None, "random (contrastive) batch N, each image in two views",
                                    check="batch")
    cb_batch_size: Optional[int] = arg(None, "class-balanced CE batch; None = --batch-size (INFERRED)",
                                       check="batch")
    lr: Optional[float] = arg(None, "base learning rate", check=">0")
    momentum: float = arg(0.9, "SGD momentum (Sec. 4.2)", check="[0,1)")
    weight_decay: float = arg(1e-4, "weight decay; none on the PSC prototypes (INFERRED)", check=">=0")
    milestones: list[int] = arg([], "LR x --lr-gamma from these 0-based epochs on (as LDAM-DRW's loop)",
                                check=">=1")
    lr_gamma: float = arg(0.1, "LR decay factor", check="(0,1]")
    tau: Optional[float] = arg(None, "temperature of Eq. (2) / (4)", check=">0")
    alpha_schedule: Optional[str] = arg(None, "curriculum of Eq. (1): parabolic 1-(T/T_max)^2 or linear "
                                        "1-T/T_max (Sec. 4.2)", choices=["parabolic", "linear"])
    no_curriculum: Optional[float] = arg(None, "fix alpha of Eq. (1) to this value (Table 5 'w/o "
                                         "curriculum'; the paper's value is lost, 0.5 INFERRED)",
                                         check="[0,1]")
    two_stage: bool = arg(False, "Table 5 'two-stage SC': the feature branch alone for --epochs, then a "
                          "linear classifier on the frozen backbone (stage-2 recipe INFERRED)")
    stage2_epochs: int = arg(40, "two-stage: classifier epochs (INFERRED)", check=">=0")
    stage2_lr: float = arg(0.5, "two-stage: classifier learning rate (INFERRED)", check=">0")
    stage2_milestones: list[int] = arg([20, 30], "two-stage: classifier LR decay epochs (INFERRED)",
                                       check=">=1")
    stage2_weight_decay: float = arg(0.0, "two-stage: classifier weight decay (INFERRED)", check=">=0")
    con_sampler: str = arg("random", "sampler of the contrastive batch: random (paper) or balanced "
                           "(CB-PSC, Table 3)", choices=["random", "balanced"])
    ce_sampler: str = arg("balanced", "sampler of the CE batch: balanced (Sec. 3.1) or random (not in the "
                          "paper; with --no-curriculum 0: plain CE)", choices=["balanced", "random"])
    prototypes_per_class: int = arg(1, "PSC prototypes per class; > 1 = MPSC (Eq. 5), EXPERIMENTAL: the "
                                    "paper never evaluates it and its formula is lost", check=">=1")
    psc_include_pos: bool = arg(False, "keep the positive prototype in the Eq. (4) denominator (a "
                                "softmax-style diagnostic; the paper excludes it)")
    fused_forward: bool = arg(False, "one backbone pass for both batches, shared BN statistics (a "
                              "diagnostic; two passes by default, INFERRED)")
    eval_every: int = arg(10, "evaluate the classifier branch on the test set every N epochs and at the end",
                          check=">=1", runtime=True)
    num_classes: int = arg(10, "synthetic-lt only: classes (docs/data.md)", check=">=1")
    synthetic_n_max: int = arg(500, "synthetic-lt only: images of the head class", check=">=1")
    synthetic_n_test: int = arg(100, "synthetic-lt only: test images per class", check=">=1")
    sync_bn: bool = arg(False, "SyncBatchNorm across the processes of a torchrun run (CUDA only); default: "
                        "the method's official code's (none released; SupContrast, which the paper builds "
                        "on, keeps per-GPU BN: INFERRED)", runtime=True)


# Defaults per dataset. CIFAR-LT (Sec. 4.2, with the batch and LR of the authors' CIFAR recipe); PSC's tau is
# 1.0 on CIFAR-10 and 0.1 on CIFAR-100. iNaturalist 2018 (Sec. 4.2): ResNet-50, batch 100, 100 epochs, decays
# at 60 and 80, linear alpha; its LR, decay factor and tau are lost (INFERRED 0.1): not a paper setting.
# synthetic-lt: a CPU demo, not a paper setting; LR decays at 60% and 80% of the epochs (as 120/160 of 200).
CIFAR_RECIPE = {"protocol": "ldam", "arch": "resnet32", "epochs": 200, "batch_size": 512, "lr": 0.5,
                "milestones": [120, 160], "alpha_schedule": "parabolic"}
DEFAULTS = {
    "*": {**CIFAR_RECIPE, "tau": 0.1, "cb_batch_size": lambda a: a.batch_size},
    "cifar10-lt": {"tau": lambda a: 1.0 if a.loss == "psc" else 0.1},
    "inat2018": {"arch": "resnet50", "epochs": 100, "batch_size": 100, "lr": 0.1, "milestones": [60, 80],
                 "alpha_schedule": "linear"},
    "synthetic-lt": {"arch": "resnet8", "epochs": 16, "batch_size": 128, "lr": 0.1,
                     "milestones": lambda a: [round(0.6 * a.epochs), round(0.8 * a.epochs)]},
}
# What the paper fixes (paper_setting needs every one): the CIFAR recipe, SGD, the paper's form of the losses.
PAPER_FIXED = {**CIFAR_RECIPE, "momentum": 0.9, "weight_decay": 1e-4, "lr_gamma": 0.1, "cb_batch_size": 512,
               "prototypes_per_class": 1, "psc_include_pos": False, "fused_forward": False,
               "ce_sampler": "balanced"}
PAPER = {"cifar10-lt": {**PAPER_FIXED, "tau": lambda a: 1.0 if a.loss == "psc" else 0.1},
         "cifar100-lt": {**PAPER_FIXED, "tau": 0.1}}
# Top-1 of Tables 1, 3, 4, 5 per imbalance ratio 100 / 50 / 10.
PAPER_TOP1 = {
    ("cifar10-lt", "sc"): (81.40, 85.36, 91.12), ("cifar10-lt", "psc"): (78.82, 83.86, 90.06),
    ("cifar100-lt", "sc"): (46.72, 51.87, 63.05), ("cifar100-lt", "psc"): (44.97, 48.93, 62.37),
    ("cifar10-lt", "cb-psc"): (78.84, 82.85, 89.85), ("cifar100-lt", "cb-psc"): (44.21, 49.66, 61.93),
    ("cifar100-lt", "ce"): (41.40, 46.68, 59.14), ("cifar100-lt", "two-stage"): (42.73, 46.76, 60.62),
    ("cifar100-lt", "no-curriculum"): (42.58, 47.45, 60.48),
}


class HybridNet(nn.Module):
    def __init__(self, arch: str, num_classes: int, image_size: int, loss: str, proj_hidden: int | None,
                 proj_dim: int, prototypes_per_class: int):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size)
        d = self.backbone.out_dim
        self.classifier = nn.Linear(d, num_classes)                       # W r + b, the test-time predictor
        if loss == "ce":   # CE-CE (Table 4): the feature branch is a second linear head (INFERRED reading)
            self.head = nn.Linear(d, num_classes)
        else:              # one-hidden-layer MLP projection, no BN (widths INFERRED, SupContrast's head)
            self.head = common.projection_mlp(d, proj_hidden or d, proj_dim, num_layers=2, bn=False)
        # PSC: one (M: MPSC) learnable prototype per class, N(0,1), normalised on use (INFERRED)
        self.prototypes = (nn.Parameter(torch.randn(num_classes, prototypes_per_class, proj_dim))
                           if loss == "psc" else None)

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
        L   = mean_i L_i   (the paper sums; mean INFERRED)                           # Eq. (3)
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
    is_pos = F.one_hot(labels, c).bool()[:, :, None].expand(b, c, m) & (not include_pos)
    neg = logits.masked_fill(is_pos, float("-inf"))
    loss = torch.logsumexp(neg.reshape(b, c * m), dim=1) - pos_term          # Eq. (4)
    return loss.mean() if reduction == "mean" else loss


def psc_loss(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, temperature: float,
             include_pos: bool = False) -> torch.Tensor:
    """Prototypical supervised contrastive loss, paper 003 Eq. (4) (Eq. (5) when prototypes is (C, M, D)).

    z: (B, D) embeddings (every view of the random batch is an anchor); prototypes: (C, D) or (C, M, D)
    learnable, normalised here (p^_c = n(p_c)). Mean over the B anchors (INFERRED). Needs C >= 2.
    """
    z = F.normalize(z.float(), dim=1)
    p = F.normalize(prototypes.float(), dim=-1)
    a = torch.einsum("bd,cmd->bcm", z, p if p.dim() == 3 else p.unsqueeze(1))
    return psc_from_affinity(a, labels, temperature, include_pos)


def curriculum_alpha(epoch: int, epochs: int, schedule: str = "parabolic", fixed: float | None = None):
    """Eq. (1) weight alpha(T) of the feature branch, T = epoch = 0 .. T_max-1, once per epoch (INFERRED).
    parabolic: 1 - (T/T_max)^2 (CIFAR), linear: 1 - T/T_max (iNaturalist), Sec. 4.2; fixed: Table 5."""
    if fixed is not None:
        return float(fixed)
    t = epoch / epochs
    return 1.0 - t * t if schedule == "parabolic" else 1.0 - t


# ----------------------------------------------------------------------------------------------------------
# Training step: Eq. (1) on a random two-view batch and an independent class-balanced batch.
# ----------------------------------------------------------------------------------------------------------
def feature_loss(model: HybridNet, out_con: torch.Tensor, y2: torch.Tensor, args: Args) -> torch.Tensor:
    """L_con of Eq. (1) on the 2N views, labels y2 = [y; y]; torchrun: SC gathers, PSC / CE-CE are local."""
    if args.loss == "sc":       # every process's views (with gradient) and labels: the global batch
        return supcon_loss(common.gather(out_con), common.gather(y2), args.tau)         # Eq. (2)-(3)
    if args.loss == "psc":
        return psc_loss(out_con, y2, model.prototypes, args.tau, args.psc_include_pos)  # Eq. (4) / (5)
    return F.cross_entropy(out_con.float(), y2)                                         # CE-CE (Table 4)


def train_step(model, unwrapped: HybridNet, optimizer, scaler, batch_con, batch_ce, alpha: float, args: Args,
               gen, image_size: int, device, amp_dtype):
    """One SGD step of Eq. (1). batch_con: uint8 random batch, seen in two views (with and without colour
    jitter, Sec. 4.2); batch_ce: uint8 class-balanced batch, one view. A branch of weight 0 is skipped.
    Returns the two detached losses (no host sync)."""
    zero, x_con, x_ce = torch.zeros((), device=device), None, None
    if alpha > 0:
        x, y = batch_con
        x_con = torch.cat([data.augment(x, "hybrid_base", gen, image_size),      # view A: base augmentation
                           data.augment(x, "hybrid_jitter", gen, image_size)])   # view B: + colour jitter
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
    # a branch of weight 0: zero gradient (DDP wants all parameters), then None: not updated, as one process
    off = ("head.", "prototypes") if alpha == 0 else ("classifier.",) if alpha == 1 else ()
    idle = [p for n, p in unwrapped.named_parameters() if n.startswith(off)]
    loss = alpha * l_con + (1.0 - alpha) * l_ce + 0.0 * sum(p.sum() for p in idle)     # Eq. (1)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for p in idle:
        p.grad = None
    scaler.step(optimizer)
    scaler.update()
    return l_con.detach(), l_ce.detach()


def classifier_step(unwrapped: HybridNet, optimizer, batch_ce, gen, image_size: int, device, amp_dtype):
    """Two-stage SC, stage 2 (Table 5): CE over the frozen backbone (BN eval), global class-balanced batch."""
    xc, yc = batch_ce
    x = data.augment(xc, "hybrid_base", gen, image_size)
    with torch.no_grad(), common.autocast(device, amp_dtype):
        r = unwrapped.backbone(x)
    loss = F.cross_entropy(unwrapped.classifier(common.gather(r).float()), common.gather(yc))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_optimizer(unwrapped: HybridNet, args: Args) -> torch.optim.SGD:
    """SGD with momentum and weight decay (Sec. 4.2); the prototypes without weight decay (INFERRED)."""
    decay = [p for n, p in unwrapped.named_parameters() if n != "prototypes"]
    groups = [{"params": decay, "weight_decay": args.weight_decay}]
    if unwrapped.prototypes is not None:
        groups.append({"params": [unwrapped.prototypes], "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def endless(loader, epoch: int):
    """Class-balanced batches for one epoch; if they run out first the loader restarts on a new stream."""
    for k in itertools.count():
        loader.set_epoch(epoch, stream=k)
        for x, y, _ in loader:
            yield x, y


# ----------------------------------------------------------------------------------------------------------
# The run: joint training with the curriculum (or two stages), evaluation of the classifier branch.
# ----------------------------------------------------------------------------------------------------------
def method_name(args: Args) -> str:
    return {"sc": "hybrid-sc", "psc": "hybrid-psc", "ce": "hybrid-ce-ce"}[args.loss]


def paper_target(args: Args, paper_ds: str, paper_setting: bool) -> float | None:
    """The paper's top-1 for this run's cell (column = imbalance ratio 100 | 50 | 10), or None."""
    key = ("two-stage" if args.two_stage else "no-curriculum" if args.no_curriculum is not None
           else "cb-psc" if args.loss == "psc" and args.con_sampler == "balanced" else args.loss)
    row = PAPER_TOP1.get((paper_ds, key))
    col = {100.0: 0, 50.0: 1, 10.0: 2}.get(float(args.imb_ratio))
    return row[col] if paper_setting and row is not None and col is not None else None


def train(args: Args, filled: dict | None = None, ds: data.LTDataset | None = None) -> dict:
    """Full run: data, model, Eq. (1) training (or two-stage), test evaluation every --eval-every epochs,
    results.json. The headline is the last epoch; the best test epoch is stored, flagged selected_on_test."""
    run = common.Run(method_name(args), args, filled or {}, DEFAULTS, PAPER)
    args, device, amp_dtype = run.args, run.device, run.amp_dtype
    if ds is None:     # the LDAM subset is drawn with seed 0 whatever --seed is (docs/data.md)
        ds = data.load_dataset(args.dataset, args.data_dir, imb_ratio=args.imb_ratio, protocol=args.protocol,
                               num_classes=args.num_classes, synthetic_n_max=args.synthetic_n_max,
                               synthetic_n_test=args.synthetic_n_test)
    if args.loss == "psc" and ds.num_classes < 2:
        raise common.UserError("--loss psc needs at least 2 classes (Eq. 4 contrasts with the other classes)")
    run.start(ds, f"{args.arch} | batch {args.batch_size}+{args.cb_batch_size} | lr {args.lr} "
                  f"x{args.lr_gamma} at {args.milestones} | {args.epochs} epochs | tau {args.tau} "
                  f"| alpha {args.alpha_schedule if args.no_curriculum is None else args.no_curriculum}")

    unwrapped = HybridNet(args.arch, ds.num_classes, ds.image_size, args.loss, args.proj_hidden,
                          args.proj_dim, args.prototypes_per_class)
    model = common.prepare_model(unwrapped, device, args.channels_last, args.compile, ddp=True,
                                 sync_bn=args.sync_bn)
    optimizer, scaler = make_optimizer(unwrapped, args), common.make_scaler(amp_dtype)
    stage2_opt = torch.optim.SGD(unwrapped.classifier.parameters(), lr=args.stage2_lr, momentum=args.momentum,
                                 weight_decay=args.stage2_weight_decay)
    total = args.epochs + (args.stage2_epochs if args.two_stage else 0)
    con_loader = data.make_loader(ds.train, args.batch_size, device, sampler=args.con_sampler, seed=args.seed,
                                  workers=args.workers, image_size=ds.image_size, shard=True)
    ce_loader = data.make_loader(ds.train, args.cb_batch_size, device, sampler=args.ce_sampler, shard=True,
                                 seed=args.seed + 1, workers=args.workers, image_size=ds.image_size)
    start, history, best = 0, [], {"epoch": 0, "top1": -1.0, "selected_on_test": True}
    ck = run.restore()
    if ck is not None:
        unwrapped.load_state_dict({**{f"{part}.{k}": v for part in ("backbone", "classifier")
                                      for k, v in ck[part].items()}, **ck["heads"]})
        (stage2_opt if ck["stage"] == "classifier" else optimizer).load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        start, history, best = ck["epoch"], ck["history"], ck["best_test"]

    steps = len(con_loader)
    progress = run.progress(steps * total, args.batch_size)
    gen, metrics = torch.Generator(device=device), None
    for epoch in range(start, total):
        stage = "classifier" if epoch >= args.epochs else ("feature" if args.two_stage else "joint")
        gen.manual_seed(common.epoch_seed(args.seed, epoch))      # a function of (seed, epoch): exact resume
        progress.set_epoch(epoch + 1, total)
        con_loader.set_epoch(epoch)
        ce_batches = endless(ce_loader, epoch)
        sum_con, sum_ce = torch.zeros((), device=device), torch.zeros((), device=device)
        if stage == "classifier":                                 # Table 5 two-stage, stage 2
            lr = common.multistep_lr(epoch - args.epochs, args.stage2_lr, args.stage2_milestones,
                                     args.lr_gamma)
            common.set_lr(stage2_opt, lr)
            alpha = 0.0
            unwrapped.eval()
            for it in range(steps):
                sum_ce += classifier_step(unwrapped, stage2_opt, next(ce_batches), gen, ds.image_size, device,
                                          amp_dtype)
                progress.step(epoch * steps + it, loss=sum_ce / (it + 1), lr=lr)
        else:
            lr = common.multistep_lr(epoch, args.lr, args.milestones, args.lr_gamma)    # 0-based, as LDAM
            common.set_lr(optimizer, lr)
            alpha = 1.0 if args.two_stage else curriculum_alpha(epoch, args.epochs, args.alpha_schedule,
                                                                   args.no_curriculum)        # Eq. (1)
            model.train()
            for it, (x, y, _) in enumerate(con_loader):
                l_con, l_ce = train_step(model, unwrapped, optimizer, scaler, (x, y),
                                         next(ce_batches) if alpha < 1 else None, alpha, args, gen,
                                         ds.image_size, device, amp_dtype)
                sum_con, sum_ce = sum_con + l_con, sum_ce + l_ce
                progress.step(epoch * steps + it, loss=(alpha * sum_con + (1 - alpha) * sum_ce) / (it + 1),
                              lr=lr, alpha=alpha)
        record = {"stage": stage, "alpha": alpha, "lr": lr, "loss_con": sum_con / steps,
                  "loss_ce": sum_ce / steps}
        for b in unwrapped.buffers() if torch.distributed.is_initialized() else ():
            torch.distributed.broadcast(b, 0)      # process 0's BN statistics (what a resume loads)
        if (epoch + 1 == total or (epoch + 1) % args.eval_every == 0) and stage != "feature":
            metrics = evaluation.classifier_eval(unwrapped.backbone, unwrapped.classifier, ds, device,
                                                 amp_dtype)
            record["test_top1"] = top1 = metrics["top1_overall"]
            history.append({"epoch": epoch + 1, "top1": top1})
            if top1 > best["top1"]:
                best = {"epoch": epoch + 1, "top1": top1, "selected_on_test": True}
            print(f"[{run.method}] epoch {epoch + 1}: test top-1 {top1:.2f} (classifier branch)")
        full = unwrapped.state_dict()
        run.end_epoch(epoch + 1, (alpha * sum_con + (1 - alpha) * sum_ce) / steps, record, {
            "arch": args.arch, "image_size": ds.image_size, "stage": stage,
            "backbone": unwrapped.backbone.state_dict(), "classifier": unwrapped.classifier.state_dict(),
            "heads": {k: v for k, v in full.items() if not k.startswith(("backbone.", "classifier."))},
            "optimizer": (stage2_opt if stage == "classifier" else optimizer).state_dict(),
            "scaler": scaler.state_dict(), "history": history, "best_test": best})

    if metrics is None:          # a finished run resumed: evaluate its final weights once
        metrics = evaluation.classifier_eval(unwrapped.backbone, unwrapped.classifier, ds, device, amp_dtype)
    epochs = {"train": args.epochs, **({"stage2": args.stage2_epochs} if args.two_stage else {})}
    results = run.results(ds, "hybrid-e2e", "backbone", epochs)
    target = paper_target(args, run.paper_ds, results["paper_setting"])
    results.update(selection={"rule": "last-epoch", "selected_epoch": total, "last_epoch": total},
                   at_selected=metrics, at_last=metrics, best_test=best)
    results["extra"] = {"tau": args.tau, "alpha_schedule": args.alpha_schedule,
                        "no_curriculum": args.no_curriculum, "test_history": history, "paper_top1": target}
    run.finish(results)
    print(f"[{run.method}] | Top-1 |  (last epoch; paper: {target if target is not None else 'n/a'})")
    print(evaluation.paper_row(metrics, style="top1"))
    return results


def benchmark(args: Args) -> float:
    """Images/s of one training step (augmentation, both branches, SGD) on random CIFAR-sized data."""
    device, amp_dtype = common.setup_device(args.device, args.amp)
    num_classes = 100 if args.dataset == "cifar100-lt" else 10
    size = 224 if args.dataset == "inat2018" else 32
    unwrapped = HybridNet(args.arch, num_classes, size, args.loss, args.proj_hidden, args.proj_dim,
                          args.prototypes_per_class)
    model = common.prepare_model(unwrapped, device, args.channels_last, args.compile).train()
    optimizer, scaler = make_optimizer(unwrapped, args), common.make_scaler(amp_dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n, nc = args.batch_size, args.cb_batch_size
    x = torch.randint(0, 256, (n + nc, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, num_classes, (n + nc,), device=device)
    return common.benchmark(method_name(args), lambda: train_step(
        model, unwrapped, optimizer, scaler, (x[:n], y[:n]), (x[n:], y[n:]), 0.5, args, gen, size, device,
        amp_dtype)[0], n, args.benchmark_steps, device, amp_dtype)


def main(argv=None):
    args, filled = common.parse_args(Args, argv, DEFAULTS)
    return benchmark(args) if args.benchmark else train(args, filled)


if __name__ == "__main__":
    common.main_guard(main)
