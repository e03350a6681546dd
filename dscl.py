"""DSCL + PBSD: Decoupled Supervised Contrastive Loss with Patch-Based Self Distillation.

Paper: S. Xuan and S. Zhang, "Decoupled Contrastive Learning for Long-Tailed Recognition", AAAI 2024
(arXiv 2403.06151; shared/papers/002_*.txt). The equation bodies lost in the paper text are restored in
shared/specs/supervised.md §1 from the official supplementary and code (github.com/SY-Xuan/DSCL).

Stage 1 (`--stage pretrain`): MoCo-v2 style query encoder + EMA key encoder with a labelled key queue.
    loss = L_dscl (eq. 8-9, target form 8') + lambda * L_pbsd (eq. 11-14)                         # Eq. (15)
Stage 2 (`--stage linear`): class-balanced linear classifier on the frozen backbone (eval.cb_linear, D§5.2).
`--stage all` runs both. ImageNet-LT / iNaturalist 2018 / Places-LT start with the paper's settings; the
CIFAR-LT path (also used for synthetic-lt and image folders) is an adaptation that is NOT in the paper
(supervised.md §1.4, all INFERRED); its results are labelled "dscl-cifar (non-paper)".
"""
from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

import common
import data
import eval as lt_eval
from common import arg


# ----------------------------------------------------------------------------------------------------------
# Arguments. Defaults = the paper's ImageNet-LT settings (paper 002 "Implementation Details"; spec §1.4).
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    """DSCL + PBSD (AAAI 2024) on long-tailed data: stage 1 contrastive pre-training, stage 2 class-balanced
    linear classifier. Defaults are the paper's ImageNet-LT settings; CIFAR-LT gets the (non-paper) adaptation
    of spec supervised.md §1.4 for every option not given on the command line, and synthetic-lt a CPU-sized demo
    profile on top of it (SYNTHETIC_DEMO; not a paper setting)."""
    dataset: str = arg("imagenet-lt", "dataset (paper: imagenet-lt, inat2018, places-lt; CIFAR/synthetic/folder = "
                       "non-paper adaptation, spec §1.4)", choices=list(data.DATASETS))
    data_dir: str = arg("./data", "dataset root (list files / images; D§3)")
    imb_ratio: float = arg(100.0, "CIFAR-LT / synthetic imbalance ratio rho (D§1.3)")
    data_seed: int = arg(0, "seed of the LT subset generator (D§1.3; 0 reproduces LDAM-DRW)")
    num_classes: int = arg(10, "synthetic-lt only: number of classes (data.py)")
    synthetic_n_max: int = arg(500, "synthetic-lt only: images of the head class (data.py)")
    synthetic_n_test: int = arg(100, "synthetic-lt only: test images per class (data.py)")
    stage: str = arg("all", "pretrain = stage 1, linear = stage 2 from --ckpt, all = both (spec §0)",
                     choices=["pretrain", "linear", "all"])
    # --- stage 1: model (paper 002; DSCL code) ---
    arch: str = arg("resnet50", "backbone (paper 002: ResNet-50; Places-LT ResNet-152; CIFAR: resnet32, INFERRED; "
                      "synthetic-lt demo: resnet8)")
    pretrained: str = arg("", "backbone weights file to start from (Places-LT: ImageNet-1K ResNet-152, paper 002)")
    finetune: str = arg("all", "backbone parameters trained in stage 1: all | layer4 (Places-LT last block, paper 002)",
                        choices=["all", "layer4"])
    feat_dim: int = arg(128, "projection-head output dim (paper 002)")
    queue_size: int = arg(65536, "memory queue K (paper 002; CIFAR 8192, INFERRED spec §1.4; synthetic-lt demo: 1024)")
    ema: float = arg(0.999, "key-encoder EMA momentum m, parameters only (paper 002; CIFAR 0.99, INFERRED)")
    temperature: float = arg(0.07, "softmax temperature tau (paper 002)")
    alpha: float = arg(0.1, "own-key target weight alpha, eq. 9 (paper 002; 0.1111111 = released code beta 8)")
    scl: bool = arg(False, "per-anchor alpha = 1/(|P|+1): the SCL baseline of Table 1 (paper 002 eq. 1)")
    contrast_batch: bool = arg(True, "softmax also over the batch's queries and keys as the released code does "
                               "(spec §1.2 'code'); --no-contrast-batch = paper eqs. 1-2 ({own key} + queue)")
    queue_label_init: str = arg("random", "initial queue labels: random in [0,C) (DSCL code) | none (-1, never "
                                "positive) (spec §1.3)", choices=["random", "none"])
    pbsd_weight: float = arg(1.5, "lambda of eq. 15 (paper 002); 0 switches PBSD off (Table 1)")
    num_patches: int = arg(5, "boxes / patches L per query view (paper 002; Fig. 5b; synthetic-lt demo: 2)")
    patch_scale: list[float] = arg([0.05, 0.6], "box area scale range (paper 002; supp Table 4; 1.0 1.0 = "
                                   "global features, Table 1 row 4)")
    patch_size: int = arg(64, "patch crop resize S (paper 002; CIFAR 16, INFERRED spec §1.4)")
    fuse_patch_passes: bool = arg(False, "encode the L patch batches in one pass instead of L passes (faster; "
                                  "changes BN batch statistics; spec §1.3)")
    multicrop: bool = arg(False, "patches become extra DSCL anchors instead of PBSD students: Table 1 row 5 "
                          "(INFERRED reading, spec §1.7); use with --pbsd-weight 0")
    crop_scale: list[float] = arg([0.08, 1.0], "RandomResizedCrop scale of the global views (DSCL code; CIFAR "
                                  "(0.2, 1), INFERRED)")
    shuffle_bn_chunks: int = arg(2, "key-encoder BN run on this many random chunks: 1-GPU shuffle-BN emulation "
                                 "(INFERRED, spec §1.3)")
    # --- stage 1: optimisation (paper 002; DSCL code main.py) ---
    epochs: int = arg(200, "stage-1 epochs (paper 002; Places-LT 30; synthetic-lt demo: 40)")
    batch_size: int = arg(256, "stage-1 batch size B (paper 002; synthetic-lt demo: 128)")
    lr: float = arg(0.1, "stage-1 base LR at batch 256, scaled by B/256 (paper 002; code)")
    warmup_epochs: int = arg(10, "linear LR warm-up epochs before the cosine (DSCL code; synthetic-lt demo: 2)")
    momentum: float = arg(0.9, "SGD momentum (DSCL code)")
    weight_decay: float = arg(5e-4, "SGD weight decay, all parameters (DSCL code)")
    # --- stage 2: class-balanced linear classifier (paper 002; D§5.2) ---
    ckpt: str = arg("", "stage-1 checkpoint for --stage linear (its 'backbone' entry is evaluated)")
    linear_epochs: int = arg(40, "stage-2 epochs (paper 002)")
    linear_lr: float = arg(10.0, "stage-2 LR: 10 ImageNet-LT, 30 iNat, 2.5 Places-LT (paper 002); CIFAR 2.5 "
                           "(INFERRED); 2.5 on ImageNet-LT = 'Our*' row of Table 3")
    linear_milestones: list[int] = arg([20, 30], "stage-2 LR x0.1 at these epochs (paper 002)")
    linear_batch_size: int = arg(2048, "stage-2 batch (paper 002; CIFAR 512, INFERRED)")
    linear_bn: str = arg("eval", "backbone BN mode in stage 2: eval (INFERRED default) | train (released code)",
                         choices=["eval", "train"])
    # --- run ---
    seed: int = arg(0, "random seed (INFERRED)")
    device: str = arg("auto", "auto | cpu | cuda (common.setup_device)")
    amp: str = arg("auto", "autocast dtype: auto | bf16 | fp16 | off (ssl.md §0.5)")
    compile: bool = arg(False, "torch.compile the encoders (ssl.md §0.5)")
    workers: int = arg(8, "data-loader workers for list datasets (data.py)")
    out_dir: str = arg("runs", "parent folder of the run directory")
    resume: str = arg("", "checkpoint path or 'auto' (newest runs/dscl-<dataset>-*/checkpoint.pt)")
    print_every: int = arg(20, "progress line every N iterations")
    benchmark: bool = arg(False, "time training steps on random data and print images/s, then exit")
    dry_run: bool = arg(False, "print the resolved settings and the dataset summary, build the model, then exit")
    demo: dict = dataclasses.field(default_factory=dict, init=False, metadata={
        "help": "set by resolve_args, not a flag: the SYNTHETIC_DEMO values it applied (not a paper setting)"})


# Per-dataset settings applied to every option NOT given on the command line (kept short and visible).
PAPER_SETTINGS = {                        # paper 002 Implementation Details; spec §1.4
    "imagenet-lt": {},                    # = the Args defaults
    "inat2018": {"linear_lr": 30.0},
    "places-lt": {"arch": "resnet152", "finetune": "layer4", "epochs": 30, "linear_lr": 2.5},
}
SMALL_IMAGE_DATASETS = ("cifar10-lt", "cifar100-lt", "synthetic-lt", "folder", "tiny-imagenet-lt")
CIFAR_ADAPTATION = {                      # NOT in the paper: spec §1.4, every value INFERRED
    "arch": "resnet32", "queue_size": 8192, "ema": 0.99, "patch_size": 16, "crop_scale": [0.2, 1.0],
    "linear_batch_size": 512, "linear_lr": 2.5,
}
SYNTHETIC_DEMO = {  # not a paper setting: a CPU-sized demo for synthetic-lt (layered on CIFAR_ADAPTATION);
    # ~9 iterations per epoch on the default 1,236 images; queue = 8 batches, below N_train
    "arch": "resnet8", "batch_size": 128, "queue_size": 1024, "epochs": 40, "warmup_epochs": 2, "num_patches": 2,
}


def is_paper_setting(args: Args) -> bool:
    return args.dataset in PAPER_SETTINGS


def resolve_args(argv=None) -> Args:
    """Parse the command line, then fill the per-dataset settings into every option the user did not set."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = common.parse_args(Args, argv)
    names = [f.name for f in dataclasses.fields(Args)]
    given = set()
    for a in (a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")):
        a = a[3:] if a.startswith("no_") and a[3:] in names else a      # --no-flag sets `flag`
        given |= {a} if a in names else {n for n in names if n.startswith(a)}   # argparse accepts prefixes
    table = CIFAR_ADAPTATION if args.dataset in SMALL_IMAGE_DATASETS else PAPER_SETTINGS.get(args.dataset, {})
    if args.dataset == "synthetic-lt":
        table = {**table, **SYNTHETIC_DEMO}
        args.demo = {name: value for name, value in SYNTHETIC_DEMO.items() if name not in given}
    for name, value in table.items():
        if name not in given:
            setattr(args, name, copy.deepcopy(value))
    return args


# ----------------------------------------------------------------------------------------------------------
# Model pieces: f (backbone) + g (projection head, shared by z, c and s).
# ----------------------------------------------------------------------------------------------------------
class DSCLNet(nn.Module):
    """Encoder f + head g = Linear(d,d)-ReLU-Linear(d,128), no BN (DSCL code); used as query and key encoder."""

    def __init__(self, arch: str, image_size: int, feat_dim: int = 128):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size)
        d = self.backbone.out_dim
        self.head = common.projection_mlp(d, d, feat_dim, num_layers=2, bn=False)

    def forward(self, x, return_map: bool = False):
        pooled, fmap = self.backbone(x, return_map=True)
        z = self.head(pooled)
        return (z, fmap) if return_map else z


def roi_teacher(head: nn.Module, fmap: torch.Tensor, boxes: torch.Tensor, stride: int) -> torch.Tensor:
    """Eq. (11): c = g(mean_2x2(ROIAlign(F, box))) on fp32 features; boxes (B, L, 4) in view pixels -> (B, L, D)."""
    B, L, _ = boxes.shape
    cells = roi_align(fmap.float(), list(boxes.float().unbind(0)), output_size=2,
                      spatial_scale=1.0 / stride, sampling_ratio=-1, aligned=False)    # (B*L, C, 2, 2)
    return head(cells.mean(dim=(2, 3))).view(B, L, -1)


@torch.no_grad()
def encode_keys(key_net: nn.Module, xk: torch.Tensor, chunks: int) -> torch.Tensor:
    """z^+ = n(g'(f'(x^k))) with 1-GPU shuffle-BN: permute, BN per chunk, un-permute (spec §1.3, INFERRED)."""
    perm = torch.randperm(xk.shape[0], device=xk.device)
    out = torch.cat([key_net(c) for c in xk[perm].chunk(chunks)])
    keys = torch.empty_like(out)
    keys[perm] = out
    return F.normalize(keys.float(), dim=1)


@torch.no_grad()
def enqueue(queue: torch.Tensor, queue_labels: torch.Tensor, ptr: int, keys: torch.Tensor, labels: torch.Tensor) -> int:
    """Write keys and their labels at ptr (wrapping around), return the new pointer (spec §1.3 step 8)."""
    idx = (ptr + torch.arange(keys.shape[0], device=queue.device)) % queue.shape[0]
    queue[idx] = keys.detach().to(queue.dtype)
    queue_labels[idx] = labels.to(queue_labels.dtype)
    return int((ptr + keys.shape[0]) % queue.shape[0])


def init_queue(size: int, dim: int, num_classes: int, label_init: str, device, generator=None):
    """Random normalised Gaussian keys; labels random in [0, C) (DSCL code) or -1 (spec §1.3 step 8)."""
    queue = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
    if label_init == "random":
        labels = torch.randint(0, num_classes, (size,), generator=generator).to(device)
    else:
        labels = torch.full((size,), -1, dtype=torch.long, device=device)
    return queue, labels


# ----------------------------------------------------------------------------------------------------------
# Losses (pure functions). All logits in fp32 on fp32-normalised vectors (N1), log_softmax forms (N2).
# ----------------------------------------------------------------------------------------------------------
def dscl_loss(q, k, labels, queue, queue_labels, alpha, temperature, contrast_batch: bool = False):
    """DSCL loss, eq. (8)-(9) in the cross-entropy-target form (8') of spec §1.2:

        L_i = - alpha_i log p(z_i^+ | z_i) - (1 - alpha_i)/|P_i| sum_{t in P_i} log p(z_t | z_i)      # Eq. (8')
        p(z_t | z_i) = softmax over the contrast set of z_t . z_i / tau                               # Eq. (2)

    q: (B, D) queries (with grad); k: (B, D) own keys; labels (B,); queue (K, D) and queue_labels (K,), taken
    before this step's enqueue. alpha: float, a (B,) tensor, or "scl" for alpha_i = 1/(|P_i|+1) (SCL, eq. 1).
    Contrast set: {own key} + queue (paper), or with contrast_batch also the other B-1 queries (with grad) and
    the other B keys of the batch (released code). An anchor with |P_i| = 0 gets -log p(z_i^+ | z_i).
    Returns the mean over the B anchors.
    """
    with torch.autocast(q.device.type, enabled=False):   # fp32 logits even inside autocast (N1)
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1).detach()
        queue = queue.float().detach()
        B = q.shape[0]
        rows = torch.arange(B, device=q.device)
        if contrast_batch:  # columns: [batch queries | batch keys | queue]; own key of anchor i = column B + i
            cols = torch.cat([q, k, queue])
            col_labels = torch.cat([labels, labels, queue_labels])
            logits = q @ cols.T / temperature
            logits[rows, rows] = float("-inf")                               # the anchor itself is no column (N3)
            own = B + rows
        else:               # columns: [own key | queue]
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
            col_labels = torch.cat([labels.new_full((1,), -1), queue_labels])
            own = torch.zeros_like(rows)
        pos = labels[:, None] == col_labels[None, :]                          # same-class positives P_i
        pos[rows, own] = False
        if contrast_batch:
            pos[rows, rows] = False
        log_p = F.log_softmax(logits, dim=1)                                  # Eq. (2) in log space
        n_pos = pos.sum(1)
        log_p_own = log_p[rows, own]
        log_p_pos = log_p.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp(min=1)
        if isinstance(alpha, str) and alpha == "scl":
            alpha = 1.0 / (n_pos.float() + 1.0)                               # SCL, eq. (1)
        a = torch.as_tensor(alpha, dtype=torch.float32, device=q.device).expand(B)
        a = torch.where(n_pos > 0, a, torch.ones_like(a))                     # no positive -> own key only
        return -(a * log_p_own + (1.0 - a) * log_p_pos).mean()                # Eq. (8'), (9)


def pbsd_loss(student, teacher, k, queue, temperature):
    """PBSD loss, eq. (12)-(14): cross-entropy of the student's similarity distribution over D_i = {z_i^+} + queue
    against the teacher's (stop-gradient):

        L_i = -(1/L) sum_j sum_{t in D_i} sg[p(z_t | c_i[j])] log p(z_t | s_i[j])                   # Eq. (14)

    student s (B, L, D) from encoded image patches (eq. 13); teacher c (B, L, D) from ROI-pooled query features
    (eq. 11); k (B, D) own keys; queue (K, D). Returns the mean over anchors and patches.
    """
    with torch.autocast(student.device.type, enabled=False):   # fp32 logits even inside autocast (N1)
        s = F.normalize(student.float(), dim=-1)
        c = F.normalize(teacher.float().detach(), dim=-1)
        k = F.normalize(k.float(), dim=-1).detach()
        queue = queue.float().detach()

        def logits(e):                                                        # Eq. (12): (B, L, 1 + K)
            return torch.cat([(e * k[:, None, :]).sum(-1, keepdim=True), e @ queue.T], dim=-1) / temperature

        target = F.softmax(logits(c), dim=-1)
        return -(target * F.log_softmax(logits(s), dim=-1)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------------
# Views (spec §1.3 ImageNet, §1.4 CIFAR): query and key geometry, boxes in the flipped query view, patches.
# ----------------------------------------------------------------------------------------------------------
def make_views(x, args: Args, size: int, small: bool, generator=None):
    """Returns (query, key, patches (B*L, 3, S, S) image-major or None, boxes (B, L, 4) or None).

    Query: RRC(crop_scale) + flip, then the query's photometric recipe; boxes are drawn in this flipped view and
    cut from it before its photometric augmentation (spec §1.3 steps 1, 3). Key: an independent RRC, then
    jitter(.4,.4,.4,0) p 1 and flip (step 4). Patches: the patch recipe (flip, jitter, gray, blur on ImageNet)."""
    g, sfx = generator, "_cifar" if small else ""
    scale = tuple(args.crop_scale)
    q_geo = data.random_hflip(data.random_resized_crop(x, size, scale=scale, generator=g), generator=g)
    xq = data.augment(q_geo, "dscl_query_color" + sfx, generator=g)
    k_geo = data.color_jitter(data.random_resized_crop(x, size, scale=scale, generator=g), 0.4, 0.4, 0.4, 0.0,
                              p=1.0, generator=g)
    xk = data.normalize(data.random_hflip(k_geo, generator=g), *data.MEAN_STD["cifar" if small else "imagenet"])
    if args.pbsd_weight <= 0 and not args.multicrop:
        return xq, xk, None, None                 # patches are neither built nor encoded (spec §1.7)
    boxes = data.sample_boxes(x.shape[0], args.num_patches, size, size, scale=tuple(args.patch_scale),
                              generator=g, device=x.device)
    patches = data.augment(data.crop_boxes(q_geo, boxes, args.patch_size), "dscl_patch" + sfx, generator=g)
    return xq, xk, patches, boxes



# ----------------------------------------------------------------------------------------------------------
# Stage 1: one training iteration (spec §1.3 "Per iteration") and the epoch loop.
# ----------------------------------------------------------------------------------------------------------
class Stage1:
    """Everything stage 1 keeps between iterations: both encoders, optimiser, scaler, queue and its pointer."""

    def __init__(self, args: Args, num_classes: int, image_size: int, device, amp_dtype):
        self.args, self.device, self.amp_dtype, self.size = args, device, amp_dtype, image_size
        self.small = args.dataset in SMALL_IMAGE_DATASETS
        net = DSCLNet(args.arch, image_size, args.feat_dim)
        if args.pretrained:
            load_pretrained(net.backbone, args.pretrained)
        self.stride = net.backbone.feature_stride        # spatial_scale = 1/stride (spec §1.4)
        key = copy.deepcopy(net)                          # theta' <- theta at start (MoCo)
        for p in key.parameters():
            p.requires_grad_(False)
        if args.finetune == "layer4":                    # Places-LT: only the last block (paper 002)
            for name, p in net.backbone.named_parameters():
                p.requires_grad_("layer4" in name)
        self.net_raw, self.key_raw = net.to(device), key.to(device)
        self.net = common.prepare_model(net, device, compile=args.compile)
        self.key = common.prepare_model(key, device, compile=args.compile)
        self.key.train()                                  # key BN uses batch statistics (shuffle-BN emulation)
        params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        self.scaler = common.make_scaler(amp_dtype)
        g = torch.Generator().manual_seed(args.seed)
        self.queue, self.queue_labels = init_queue(args.queue_size, args.feat_dim, num_classes,
                                                   args.queue_label_init, device, g)
        self.ptr = 0
        self.base_lr = args.lr * args.batch_size / 256   # lr 0.1 x B/256 (paper 002; code)
        self.alpha = "scl" if args.scl else args.alpha

    def step(self, x, y, lr: float, generator=None):
        """One iteration; returns (loss, l_dscl, l_pbsd) as 0-d device tensors (no host sync)."""
        a = self.args
        common.set_lr(self.opt, lr)
        xq, xk, patches, boxes = make_views(x, a, self.size, self.small, generator)
        if self.device.type == "cuda":                   # channels_last inputs for the channels_last encoders
            cl = torch.channels_last
            xq, xk = xq.contiguous(memory_format=cl), xk.contiguous(memory_format=cl)
            patches = None if patches is None else patches.contiguous(memory_format=cl)
        with torch.no_grad():                             # spec §1.3 step 5: EMA, then keys
            common.ema_update(self.key_raw, self.net_raw, a.ema, buffers="none")   # parameters only (MoCo)
            with common.autocast(self.device, self.amp_dtype):
                k = encode_keys(self.key, xk, a.shuffle_bn_chunks)
        zero = torch.zeros((), device=self.device)
        with common.autocast(self.device, self.amp_dtype):
            z, fmap = self.net(xq, return_map=True)
            l_dscl = dscl_loss(z, k, y, self.queue, self.queue_labels, self.alpha, a.temperature,
                               contrast_batch=a.contrast_batch)                                  # Eq. (8')
            l_pbsd = zero
            if patches is not None:
                L = a.num_patches
                pv = patches.view(x.shape[0], L, *patches.shape[1:])
                if a.fuse_patch_passes:
                    s = self.net(patches).view(x.shape[0], L, -1)
                else:                                     # L separate passes, as the released code (spec §1.3)
                    s = torch.stack([self.net(pv[:, j]) for j in range(L)], dim=1)             # Eq. (13)
                if a.multicrop:                           # Table 1 row 5: patches as extra DSCL anchors (INFERRED)
                    extra = [dscl_loss(s[:, j], k, y, self.queue, self.queue_labels, self.alpha, a.temperature)
                             for j in range(L)]
                    l_dscl = (l_dscl + sum(extra)) / (L + 1)
                if a.pbsd_weight > 0:
                    c = roi_teacher(self.net_raw.head, fmap, boxes, self.stride).detach()       # Eq. (11)
                    l_pbsd = pbsd_loss(s, c, k, self.queue, a.temperature)                      # Eq. (14)
            loss = l_dscl + a.pbsd_weight * l_pbsd                                              # Eq. (15)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ptr = enqueue(self.queue, self.queue_labels, self.ptr, k, y)                      # step 8
        return loss.detach(), l_dscl.detach(), l_pbsd.detach()

    def state(self) -> dict:
        return {"model": common.unwrap(self.net).state_dict(), "key_model": common.unwrap(self.key).state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "queue": self.queue, "queue_labels": self.queue_labels, "queue_ptr": self.ptr}

    def load(self, ck: dict) -> None:
        self.net_raw.load_state_dict(ck["model"])
        self.key_raw.load_state_dict(ck["key_model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.queue.copy_(ck["queue"])
        self.queue_labels.copy_(ck["queue_labels"])
        self.ptr = int(ck["queue_ptr"])


def load_pretrained(backbone: nn.Module, path: str) -> None:
    """Load ImageNet-1K weights (a torchvision state dict file) into the backbone; the fc layer is dropped."""
    sd = common.load_checkpoint(path)
    sd = sd.get("backbone", sd.get("state_dict", sd))
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise common.UserError(f"--pretrained {path} does not fit the backbone (missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]}); pass a torchvision state dict of the same --arch")


def checkpoint_dict(st: Stage1, args: Args, epoch: int, image_size: int) -> dict:
    return {"method": "dscl", "arch": args.arch, "image_size": image_size, "args": dataclasses.asdict(args),
            "epoch": epoch, "stage": "pretrain", "backbone": common.unwrap(st.net).backbone.state_dict(),
            "rng": common.rng_state(), **st.state()}


def pretrain(args: Args, ds, device, amp_dtype, run_dir, resume_ck: dict | None) -> Stage1:
    """Stage 1 (spec §1.3): SGD, lr 0.1 x B/256, warm-up then per-iteration cosine, checkpoint every epoch."""
    st = Stage1(args, ds.num_classes, ds.image_size, device, amp_dtype)
    loader = data.make_loader(ds.train, args.batch_size, device, shuffle=True, drop_last=True, sampler="random",
                              seed=args.seed, workers=args.workers, image_size=ds.image_size)
    iters = len(loader)
    if iters == 0:
        raise common.UserError(f"--batch-size {args.batch_size} exceeds the {len(ds.train)} training images; "
                               "pass a smaller --batch-size")
    total, warmup = args.epochs * iters, args.warmup_epochs * iters
    start = 0
    if resume_ck is not None:
        st.load(resume_ck)
        common.set_rng_state(resume_ck["rng"])
        start = int(resume_ck["epoch"])
        print(f"resumed from epoch {start}")
    gen = torch.Generator(device=device)
    prog = common.Progress(total, args.batch_size, every=args.print_every, prefix="dscl")
    for epoch in range(start, args.epochs):
        t0 = time.time()
        loader.set_epoch(epoch)
        gen.manual_seed(args.seed * 100003 + epoch)      # augmentation stream = f(seed, epoch): exact resume
        prog.set_epoch(epoch + 1, args.epochs)
        st.net.train()
        sums = torch.zeros(3, device=device)
        for it, (x, y, _) in enumerate(loader):
            step = epoch * iters + it
            lr = common.cosine_lr(step, total, warmup, st.base_lr)
            out = st.step(x, y, lr, gen)
            sums += torch.stack(out)
            prog.step(step, loss=out[0], lr=lr)
        loss, l_dscl, l_pbsd = (sums / iters).tolist()    # one host sync per epoch
        rec = {"stage": "pretrain", "epoch": epoch + 1, "loss": loss, "loss_dscl": l_dscl, "loss_pbsd": l_pbsd,
               "lr": lr, "epoch_time_s": time.time() - t0}
        if loss != loss:
            raise common.UserError(f"stage-1 loss became NaN in epoch {epoch + 1}; lower --lr or pass --amp off "
                                   "(the last good checkpoint is kept)")
        common.append_metrics(run_dir, rec)
        common.save_checkpoint(run_dir / "checkpoint.pt", checkpoint_dict(st, args, epoch + 1, ds.image_size))
    return st


# ----------------------------------------------------------------------------------------------------------
# Stage 2: class-balanced linear classifier on the frozen backbone (paper 002; D§5.2; eval.cb_linear).
# ----------------------------------------------------------------------------------------------------------
def linear_stage(args: Args, ds, backbone: nn.Module, device, amp_dtype, run_dir, t_start: float,
                 stage1: dict) -> dict:
    """stage1: {"arch", "epochs", "checkpoint"} of the pre-trained backbone that is evaluated."""
    small = args.dataset in SMALL_IMAGE_DATASETS
    recipe = "crop_flip_cifar" if small else "mocov2_imagenet"   # RRC+jitter+gray+blur+flip (D§5.2); CIFAR §1.4
    out = lt_eval.cb_linear(backbone, ds, device, amp_dtype, lr=args.linear_lr, epochs=args.linear_epochs,
                            milestones=tuple(args.linear_milestones), batch_size=args.linear_batch_size,
                            bn=args.linear_bn, recipe=recipe, seed=args.seed)
    method = ("dscl" if is_paper_setting(args) else "dscl-cifar (non-paper)" if small
              else "dscl (non-paper dataset)")
    res = lt_eval.results_skeleton(method, variant_string(args), is_paper_setting(args), ds, "dscl-linear-cb",
                                   "backbone", stage1["arch"],
                                   {"stage1": stage1["epochs"], "stage2": args.linear_epochs},
                                   args.seed, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off"),
                                   time.time() - t_start)
    res.update(out)
    alpha_beta = {"alpha": "scl" if args.scl else args.alpha,
                  "beta": None if args.scl or args.alpha == 0 else (1 - args.alpha) / args.alpha}  # pitfall §1.8
    res.setdefault("extra", {}).update(alpha_beta, stage1_checkpoint=stage1["checkpoint"],
                                       demo_profile=dict(args.demo))   # SYNTHETIC_DEMO values applied, if any
    lt_eval.write_results(run_dir, res)
    common.append_metrics(run_dir, {"stage": "linear", "epoch": args.linear_epochs,
                                    "top1": res["at_last"]["top1_overall"]})
    print("| Many | Medium | Few | Overall |  (strict groups, last epoch)")
    print(lt_eval.paper_row(res["at_last"], style="dscl"))
    return res


def variant_string(args: Args) -> str:
    """The ablation switches that differ from the resolved per-dataset defaults (results.json 'variant')."""
    ref = resolve_args(["--dataset", args.dataset])
    keys = ("scl", "alpha", "pbsd_weight", "num_patches", "patch_scale", "multicrop", "contrast_batch",
            "queue_label_init", "fuse_patch_passes", "linear_lr", "linear_bn")
    diff = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in keys if getattr(args, k) != getattr(ref, k)]
    demo = ["synthetic-lt demo profile (" + ", ".join(f"{k}={v}" for k, v in args.demo.items()) + ")"] \
        if args.demo else []
    return " ".join(demo + diff) or "default"


# ----------------------------------------------------------------------------------------------------------
# Benchmark and main.
# ----------------------------------------------------------------------------------------------------------
def benchmark(args: Args, steps: int = 20) -> float:
    """Images/s of a stage-1 training step on random uint8 data of the dataset's image size (no data needed)."""
    device, amp_dtype = common.setup_device(args.device, args.amp)
    size = 32 if args.dataset in SMALL_IMAGE_DATASETS else 224
    classes = {"cifar100-lt": 100, "imagenet-lt": 1000, "places-lt": 365, "inat2018": 8142}.get(args.dataset, 10)
    st = Stage1(args, classes, size, device, amp_dtype)
    x = torch.randint(0, 256, (args.batch_size, 3, size if size == 32 else 256, size if size == 32 else 256),
                      dtype=torch.uint8, device=device)
    y = torch.randint(0, classes, (args.batch_size,), device=device)
    warm = max(2, steps // 4)
    for i in range(warm + steps):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
        loss = st.step(x, y, st.base_lr)[0]
    loss.item()
    ips = steps * args.batch_size / (time.time() - t0)
    print(f"dscl stage-1 step: {ips:.0f} images/s ({args.arch}, batch {args.batch_size}, {size}px, "
          f"patches {0 if args.pbsd_weight <= 0 else args.num_patches}x{args.patch_size}px, device {device}, "
          f"amp {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}, compile {args.compile})")
    return ips


def load_data(args: Args):
    kw = dict(imb_ratio=args.imb_ratio, protocol="ldam", seed=args.data_seed)   # D§1.3: fixed, not --seed
    if args.dataset == "synthetic-lt":
        kw.update(num_classes=args.num_classes, synthetic_n_max=args.synthetic_n_max,
                  synthetic_n_test=args.synthetic_n_test)
    return data.load_dataset(args.dataset, args.data_dir, **kw)


def main(args: Args) -> dict | None:
    if args.benchmark:
        benchmark(args)
        return None
    t_start = time.time()
    if args.batch_size > args.queue_size:
        raise common.UserError(f"--queue-size {args.queue_size} is smaller than --batch-size {args.batch_size}; "
                               "the queue must hold at least one batch of keys")
    if args.stage == "linear" and not args.ckpt:
        raise common.UserError("--stage linear needs --ckpt PATH (a stage-1 checkpoint.pt from dscl.py)")
    common.seed_everything(args.seed)
    ds = load_data(args)
    print(data.describe(ds))
    label = "paper setting" if is_paper_setting(args) else "dscl-cifar (non-paper adaptation, spec §1.4)"
    print(f"dscl: {label}; resolved settings:")
    print(json.dumps(dataclasses.asdict(args), indent=None))
    if args.demo:
        print("dscl: synthetic-lt DEMO profile in use (not a paper setting; a CPU-sized demo), it set "
              + ", ".join(f"{k}={v}" for k, v in args.demo.items()) + "; explicit flags override these")
    if args.dry_run:
        DSCLNet(args.arch, ds.image_size, args.feat_dim)
        return None
    device, amp_dtype = common.setup_device(args.device, args.amp)
    run_dir = common.make_run_dir("dscl", args.dataset, args.out_dir, args.resume or None)
    common.write_config(run_dir, args, ds.info())
    print(f"run dir: {run_dir}")

    if args.stage in ("pretrain", "all"):
        ck_path = pathlib.Path(args.resume) if args.resume and pathlib.Path(args.resume).is_file() \
            else run_dir / "checkpoint.pt"
        resume_ck = common.load_checkpoint(ck_path, map_location=device) if args.resume and ck_path.exists() \
            else None
        st = pretrain(args, ds, device, amp_dtype, run_dir, resume_ck)
        backbone = common.unwrap(st.net).backbone
        stage1 = {"arch": args.arch, "epochs": args.epochs, "checkpoint": str(run_dir / "checkpoint.pt")}
        if args.stage == "pretrain":
            return None
    else:
        ck = common.load_checkpoint(args.ckpt, map_location=device)
        backbone = common.build_backbone(ck["arch"], ck["image_size"])
        backbone.load_state_dict(ck["backbone"])
        backbone = common.prepare_model(backbone, device)
        stage1 = {"arch": ck["arch"], "epochs": ck["epoch"], "checkpoint": str(args.ckpt)}
    return linear_stage(args, ds, backbone, device, amp_dtype, run_dir, t_start, stage1)


if __name__ == "__main__":
    _args = resolve_args()
    with common.user_errors():
        main(_args)
