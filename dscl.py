"""DSCL + PBSD: decoupled supervised contrastive loss and patch-based self-distillation, in two stages.

S. Xuan and S. Zhang, "Decoupled Contrastive Learning for Long-Tailed Recognition", AAAI 2024 (arXiv
2403.06151); its lost equation bodies are restored from the authors' supplementary and code
(github.com/SY-Xuan/DSCL); what no source states is marked INFERRED, with its reason in docs/dscl.md.
Stage 1, MoCo-v2 with a queue of labelled keys: each anchor gives its own key the target share alpha and
its same-class keys 1 - alpha (DSCL); patches cut from the query view learn the similarity distribution of
ROI-pooled features of the same boxes (PBSD). Stage 2: a class-balanced linear classifier, frozen backbone.

  Paper               What                                                    Here
  Eq. (2)             p(z_t | z_i): softmax over {own key} + queue (+ batch)  dscl_loss (log_softmax row)
  Eq. (1), (3)        SCL: 1/(|P_i|+1) of the target on every positive        dscl_loss(alpha="scl"), --scl
  Eq. (8)-(9)         DSCL: alpha on the own key, 1 - alpha shared by P_i     dscl_loss
  Eq. (11)            teacher c = g(mean_2x2 ROIAlign(F, box)), detached      roi_teacher
  Eq. (13)            student s = g(f(patch cut from the query view))         make_views, stage1_step
  Eq. (12), (14)      CE of the student's distribution vs sg(teacher's)       pbsd_loss
  Eq. (15)            L = L_dscl + lambda L_pbsd                              stage1_step, --pbsd-weight
  Training Pipeline   EMA key encoder (parameters only), labelled queue       encode_keys, enqueue
  Impl. Details       SGD, lr 0.1 x B/256, cosine to 0 per iteration          pretrain
  Training Pipeline   class-balanced linear classifier, frozen backbone       linear_stage (eval.cb_linear)

    python dscl.py --dataset imagenet-lt --data-dir data/imagenet-lt   # Table 1 / 3 "Ours" (57.7)
    python dscl.py --dataset synthetic-lt                              # CPU demo, no files needed
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

import common
import data
import eval as evaluation
from common import arg

SMALL = ("cifar10-lt", "cifar100-lt", "synthetic-lt", "folder", "tiny-imagenet-lt")  # the CIFAR adaptation


@dataclass
class Args(common.RunArgs):
    """DSCL + PBSD (Xuan & Zhang, AAAI 2024): stage 1 contrastive pre-training, stage 2 a class-balanced
    linear classifier. A flag left unset takes its dataset's value (shown per flag): the paper's settings
    ("Impl. Details": its Implementation Details) on ImageNet-LT, iNaturalist 2018 and Places-LT; a CIFAR
    adaptation, NOT in the paper, all INFERRED, on small images; a CPU demo on synthetic-lt (docs/dscl.md)."""
    stage: str = arg("all", "pretrain = stage 1, linear = stage 2 on --ckpt, all = both", runtime=True,
                     choices=["pretrain", "linear", "all"])
    ckpt: str = arg("", "stage-1 checkpoint.pt whose backbone --stage linear uses", runtime=True)
    data_seed: int = arg(0, "seed of the generated long tail, not --seed (docs/data.md)", check=">=0")
    num_classes: int = arg(10, "synthetic-lt only: classes (docs/data.md)", check=">=1")
    synthetic_n_max: int = arg(500, "synthetic-lt only: images of the head class", check=">=1")
    synthetic_n_test: int = arg(100, "synthetic-lt only: test images per class", check=">=1")
    # --- stage 1: model and losses ---
    arch: str | None = arg(None, "backbone (Impl. Details)", choices=list(common.ARCHS))
    pretrained: str = arg("", "torchvision weights to start from (Places-LT: ImageNet-1K, Impl. Details)")
    finetune: str | None = arg(None, "what stage 1 trains: all | layer4 (Places-LT, Impl. Details)",
                                  choices=["all", "layer4"])
    feat_dim: int = arg(128, "output dimension of the projection head g (Impl. Details)", check=">=1")
    queue_size: int | None = arg(None, "memory queue K, >= --batch-size (Impl. Details)", check=">=1")
    ema_decay: float | None = arg(None, "key-encoder momentum m (Impl. Details)", check="[0,1]")
    temperature: float = arg(0.07, "temperature tau of Eq. (2) and (12) (Impl. Details)", check=">0")
    alpha: float = arg(0.1, "own-key share alpha, Eq. (9) (Impl. Details); released code: 1/9", check="[0,1]")
    scl: bool = arg(False, "alpha_i = 1/(|P_i|+1) per anchor: SCL, Eq. (1), the baseline of Table 1")
    contrast_batch: bool = arg(True, "softmax also over the batch's other queries and keys (released code, "
                               "INFERRED); --no-contrast-batch: Eq. (2), own key + queue")
    queue_label_init: str = arg("random", "initial queue labels: random in [0, C) (released code) | none "
                                "(-1, never a positive)", choices=["random", "none"])
    pbsd_weight: float = arg(1.5, "lambda of Eq. (15) (Impl. Details); 0 = no PBSD (Table 1)", check=">=0")
    num_patches: int | None = arg(None, "patches L per anchor (Impl. Details, Fig. 5b)", check=">=1")
    patch_scale: list[float] = arg([0.05, 0.6], "box area range (Impl. Details); 1.0 1.0 = global-view "
                                   "features, Table 1 row 4", check="(0,1]")
    patch_size: int | None = arg(None, "side S of the resized patches (Impl. Details)", check=">=1")
    fuse_patch_passes: bool = arg(False, "one pass over the L patch batches, not L (other BN statistics)")
    multicrop: bool = arg(False, "patches as extra DSCL anchors, not PBSD students: Table 1 row 5 (INFERRED "
                          "reading); use with --pbsd-weight 0")
    crop_scale: list[float] = arg([], "RandomResizedCrop scale of both views (released code)", check="(0,1]")
    shuffle_bn_chunks: int = arg(2, "key BN on this many random chunks, one process: shuffle-BN (INFERRED); "
                                 "torchrun: one chunk per process (released code)", check=">=1")
    sync_bn: bool = arg(False, "SyncBatchNorm across the processes of a torchrun run (CUDA only); off: the "
                        "released code's DDP keeps BN per GPU, shuffled key BN (docs/dscl.md)", runtime=True)
    # --- stage 1: optimisation ---
    epochs: int | None = arg(None, "stage-1 epochs (Impl. Details)", check=">=0")
    batch_size: int | None = arg(None, "stage-1 batch B (Impl. Details)", check="batch")
    lr: float = arg(0.1, "stage-1 LR at batch 256, times B/256, cosine to 0 (Impl. Details)", check=">0")
    lr_warmup_epochs: int | None = arg(None, "linear LR warm-up epochs (released code)", check=">=0")
    momentum: float = arg(0.9, "SGD momentum (released code)", check="[0,1)")
    weight_decay: float = arg(5e-4, "SGD weight decay, every parameter (released code)", check=">=0")
    # --- stage 2: class-balanced linear classifier ---
    linear_epochs: int = arg(40, "stage-2 epochs (Impl. Details)", check=">=0")
    linear_lr: float | None = arg(None, "stage-2 LR (Impl. Details; 2.5 = Our*, Table 3)", check=">0")
    linear_milestones: list[int] = arg([20, 30], "stage-2 x0.1 LR from these 0-based epochs on (Impl. "
                                       "Details; counted as the released code: 20 / 10 / 10)", check=">=1")
    linear_batch_size: int | None = arg(None, "stage-2 batch (Impl. Details)", check="batch")
    linear_bn: str = arg("train", "stage-2 BN of the frozen backbone: train (released code: running stats "
                         "re-estimated on stage-2 views, no gradient) | eval", choices=["train", "eval"])
    dry_run: bool = arg(False, "print the data and resolved settings, build the model, exit", runtime=True)


# Defaults per dataset. "*": the paper's ImageNet-LT settings (Impl. Details; warm-up and crop scale from the
# released code). SMALL: the CIFAR adaptation, NOT in the paper, every value INFERRED (reasons: docs/dscl.md).
# synthetic-lt: a CPU demo on top of it, not a paper setting (~9 iterations per epoch, a queue of 8 batches).
CIFAR_ADAPTATION = {"arch": "resnet32", "queue_size": 8192, "ema_decay": 0.99, "patch_size": 16,
                    "crop_scale": [0.2, 1.0], "linear_batch_size": 512, "linear_lr": 2.5}
DEFAULTS = {
    "*": {"protocol": "ldam", "arch": "resnet50", "finetune": "all", "queue_size": 65536, "ema_decay": 0.999,
          "num_patches": 5, "patch_size": 64, "crop_scale": [0.08, 1.0], "epochs": 200, "batch_size": 256,
          "lr_warmup_epochs": 10, "linear_lr": 10.0, "linear_batch_size": 2048},
    "inat2018": {"linear_lr": 30.0},
    "places-lt": {"arch": "resnet152", "finetune": "layer4", "epochs": 30, "linear_lr": 2.5},
    SMALL: CIFAR_ADAPTATION,
    "synthetic-lt": {"arch": "resnet8", "batch_size": 128, "queue_size": 1024, "epochs": 40,
                     "lr_warmup_epochs": 2, "num_patches": 2},
}
# What the paper fixes (Impl. Details) for its "Ours" row: paper_setting is true only with every value here.
# Places-LT starts from ImageNet-1K weights: any --pretrained file counts (unchecked), none does not.
PAPER_FIXED = {"arch": "resnet50", "finetune": "all", "pretrained": "", "feat_dim": 128, "queue_size": 65536,
               "ema_decay": 0.999, "temperature": 0.07, "alpha": 0.1, "scl": False, "multicrop": False,
               "pbsd_weight": 1.5, "num_patches": 5, "patch_scale": [0.05, 0.6], "patch_size": 64,
               "epochs": 200, "batch_size": 256, "lr": 0.1, "linear_epochs": 40, "linear_batch_size": 2048,
               "linear_milestones": [20, 30]}
PAPER = {"imagenet-lt": {**PAPER_FIXED, "linear_lr": 10.0}, "inat2018": {**PAPER_FIXED, "linear_lr": 30.0},
         "places-lt": {**PAPER_FIXED, "arch": "resnet152", "finetune": "layer4", "epochs": 30,
                       "linear_lr": 2.5, "pretrained": lambda a: a.pretrained or "ImageNet-1K weights"}}


# ---- Model pieces: f (backbone) + g (head, shared by z, c and s), the keys and the queue. ------------------
class DSCLNet(nn.Module):
    """Encoder f + head g = Linear(d,d)-ReLU-Linear(d,128), no BN (released code); query and key encoder.
    torchvision ResNets start with gamma = 0 in every residual block's last BN, as the released main.py
    builds them; the CIFAR ResNets keep LDAM's initialisation (INFERRED, docs/dscl.md)."""

    def __init__(self, arch: str, image_size: int, feat_dim: int = 128):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size, zero_init_residual=True)
        d = self.backbone.out_dim
        self.head = common.projection_mlp(d, d, feat_dim, num_layers=2, bn=False)

    def forward(self, x, return_map: bool = False):
        pooled, fmap = self.backbone(x, return_map=True)
        return (self.head(pooled), fmap) if return_map else self.head(pooled)


def roi_teacher(head: nn.Module, fmap: torch.Tensor, boxes: torch.Tensor, stride: int) -> torch.Tensor:
    """Eq. (11): c = g(mean_2x2(ROIAlign(F, box))) on fp32 features; boxes (B, L, 4), pixels -> (B, L, D)."""
    B, L, _ = boxes.shape
    cells = roi_align(fmap.float(), list(boxes.float().unbind(0)), output_size=2,
                      spatial_scale=1.0 / stride, sampling_ratio=-1, aligned=False)    # (B*L, C, 2, 2)
    return head(cells.mean(dim=(2, 3))).view(B, L, -1)


@torch.no_grad()
def encode_keys(key_net: nn.Module, xk: torch.Tensor, chunks: int) -> torch.Tensor:
    """z^+ = n(g'(f'(x^k))) of the global batch, BN on random chunks, un-permuted: torchrun as the released
    _batch_shuffle_ddp (process 0's permutation, one chunk per process); one process: `chunks` (INFERRED)."""
    world, xs = common.get_rank_world()[1], common.gather(xk)                  # the global batch's views
    perm = common.gather(torch.randperm(len(xs), device=xs.device)[None])[0]  # process 0's, on every one
    mine = common.local_part(xs[perm]).chunk(chunks if world == 1 else 1)
    out = common.gather(torch.cat([key_net(c) for c in mine]))                 # in the permuted order
    return F.normalize(out[torch.argsort(perm)].float(), dim=1)


def init_queue(size: int, dim: int, num_classes: int, label_init: str, device, generator=None):
    """Random normalised Gaussian keys; labels random in [0, C) (released code) or -1 (never a positive)."""
    queue = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
    labels = (torch.randint(0, num_classes, (size,), generator=generator) if label_init == "random"
              else torch.full((size,), -1, dtype=torch.long))
    return queue.to(device), labels.to(device)


@torch.no_grad()
def enqueue(queue, queue_labels, ptr: int, keys: torch.Tensor, labels: torch.Tensor) -> int:
    """Write keys and their labels at ptr (wrapping around); returns the new pointer (ptr + B) mod K."""
    idx = (ptr + torch.arange(keys.shape[0], device=queue.device)) % queue.shape[0]
    queue[idx], queue_labels[idx] = keys.detach().to(queue.dtype), labels.to(queue_labels.dtype)
    return int((ptr + keys.shape[0]) % queue.shape[0])


# ---- Losses (pure functions): fp32 logits even inside autocast, log_softmax forms. -------------------------
def dscl_loss(q, k, labels, queue, queue_labels, alpha, temperature, contrast_batch=False, extra=None,
              mine=None):
    """DSCL loss, Eq. (8)-(9), as a cross-entropy against a fixed target (the w_t of Eq. (9) sum to |P_i|+1):

        L_i = - alpha_i log p(z_i^+ | z_i) - (1 - alpha_i)/|P_i| sum_{t in P_i} log p(z_t | z_i)
        p(z_t | z_i) = softmax over the contrast set of z_t . z_i / tau                         # Eq. (2)

    q: (B, D) queries (with grad); k: (B, D) own keys; labels (B,); queue (K, D) and queue_labels (K,),
    before this step's enqueue. mine: the b rows of the batch that are anchors (torchrun: this process's
    rows of the gathered batch); default all. alpha: float, a (b,) tensor, or "scl" for 1/(|P_i|+1) (Eq. 1).
    Contrast set: {own key} + queue (Eq. 2), or with contrast_batch also the other B-1 queries (with grad)
    and the other B keys (released code). |P_i| = 0 gives -log p(z_i^+ | z_i). extra (A, b, D): more
    anchors of image i (--multicrop), scored as q_i: its contrast set, own key, positives. Mean over all."""
    with torch.autocast(q.device.type, enabled=False):   # fp32 logits even inside autocast
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1).detach()
        B, rows = q.shape[0], torch.arange(q.shape[0], device=q.device) if mine is None else mine
        a_q, n, queue = q[rows][None], torch.arange(len(rows), device=q.device), queue.float().detach()
        anchors = a_q if extra is None else torch.cat([a_q, F.normalize(extra.float(), dim=-1)])  # (A, b, D)
        if contrast_batch:  # columns: [batch queries | batch keys | queue]; own key of anchor i: column B + i
            logits = anchors @ torch.cat([q, k, queue]).T / temperature           # (A, b, 2B + K)
            col_labels = torch.cat([labels, labels, queue_labels])
            logits[:, n, rows] = float("-inf")                            # query i is not in row i's set
            own = B + rows
        else:               # columns: [own key | queue]
            logits = torch.cat([(anchors * k[rows]).sum(-1)[..., None], anchors @ queue.T], -1) / temperature
            col_labels = torch.cat([labels.new_full((1,), -1), queue_labels])
            own = torch.zeros_like(rows)
        pos = (labels[rows, None] == col_labels[None, :]) & (logits[0] > float("-inf"))   # P_i: same class,
        pos[n, own] = False                                                 # in the set, not the own key
        log_p, n_pos = F.log_softmax(logits, dim=-1), pos.sum(1)              # Eq. (2) in log space; |P_i|
        log_p_pos = log_p.masked_fill(~pos, 0.0).sum(-1) / n_pos.clamp(min=1)
        if isinstance(alpha, str):                                            # "scl": SCL, Eq. (1)
            alpha = 1.0 / (n_pos.float() + 1.0)
        a = alpha.to(q) if torch.is_tensor(alpha) else q.new_full((len(rows),), alpha)     # no host copy
        a = torch.where(n_pos > 0, a, 1.0)                                    # no positive -> own key only
        return -(a * log_p[:, n, own] + (1.0 - a) * log_p_pos).mean()         # Eq. (8)-(9)


def pbsd_loss(student, teacher, k, queue, temperature):
    """PBSD loss, Eq. (12)-(14): cross-entropy of the student's similarity distribution over D_i =
    {z_i^+} + queue against the teacher's (stop-gradient):

        L_i = -(1/L) sum_j sum_{t in D_i} sg[p(z_t | c_i[j])] log p(z_t | s_i[j])              # Eq. (14)

    student s (B, L, D) from encoded image patches (Eq. 13); teacher c (B, L, D) from ROI-pooled query
    features (Eq. 11); k (B, D) own keys; queue (K, D). Returns the mean over anchors and patches."""
    with torch.autocast(student.device.type, enabled=False):   # fp32 logits even inside autocast
        s, c = F.normalize(student.float(), dim=-1), F.normalize(teacher.float().detach(), dim=-1)
        k, queue = F.normalize(k.float(), dim=-1).detach(), queue.float().detach()

        def logits(e):                                                        # Eq. (12): (B, L, 1 + K)
            return torch.cat([(e * k[:, None]).sum(-1, keepdim=True), e @ queue.T], -1) / temperature

        target = F.softmax(logits(c), dim=-1)
        return -(target * F.log_softmax(logits(s), dim=-1)).sum(-1).mean()


# ---- Stage 1: the views, the training step (Eq. 15) and the loop. ------------------------------------------
def make_views(x, args: Args, size: int, small: bool, generator=None):
    """(query, key, patches (B*L, 3, S, S) image-major, boxes (B, L, 4)). Query: RRC + flip, then its
    colour recipe; the boxes are cut from the flipped query before its colour augmentation and get the
    patch recipe. Key: an independent RRC, jitter(.4,.4,.4,0) p 1, flip (released code)."""
    g, sfx, stats = generator, "_cifar" if small else "", data.MEAN_STD["cifar" if small else "imagenet"]
    scale = tuple(args.crop_scale)
    q_geo = data.random_hflip(data.random_resized_crop(x, size, scale=scale, generator=g), generator=g)
    xq = data.augment(q_geo, "dscl_query_color" + sfx, generator=g)
    k_geo = data.color_jitter(data.random_resized_crop(x, size, scale=scale, generator=g), 0.4, 0.4, 0.4,
                              0.0, p=1.0, generator=g)
    xk = data.normalize(data.random_hflip(k_geo, generator=g), *stats)
    if args.pbsd_weight <= 0 and not args.multicrop:
        return xq, xk, None, None                 # patches are neither built nor encoded
    boxes = data.sample_boxes(x.shape[0], args.num_patches, size, size, scale=tuple(args.patch_scale),
                              generator=g, device=x.device)
    patches = data.augment(data.crop_boxes(q_geo, boxes, args.patch_size), "dscl_patch" + sfx, generator=g)
    return xq, xk, patches, boxes


@dataclass
class MoCo:
    """What stage 1 keeps between iterations: both encoders, optimiser, loss scaler, labelled queue."""
    net: nn.Module
    key: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    queue: torch.Tensor
    queue_labels: torch.Tensor
    ptr: int = 0


def build_stage1(args: Args, num_classes: int, image_size: int, device, amp_dtype) -> MoCo:
    """Query encoder (maybe pre-trained, maybe only layer4 trained), its EMA copy, SGD, scaler, queue."""
    net = DSCLNet(args.arch, image_size, args.feat_dim)
    if args.pretrained:                                    # ImageNet-1K weights; their fc layer is dropped
        sd = common.load_checkpoint(args.pretrained)
        sd = sd.get("backbone", sd.get("state_dict", sd))
        miss, extra = net.backbone.load_state_dict({k: v for k, v in sd.items() if k[:3] != "fc."}, False)
        if miss or extra:
            raise common.UserError(f"--pretrained {args.pretrained} does not fit --arch {args.arch} (missing "
                                   f"{miss[:3]}, unexpected {extra[:3]}); pass torchvision weights of it")
    key = copy.deepcopy(net).requires_grad_(False)        # theta' <- theta at the start (MoCo)
    if args.finetune == "layer4":                          # Places-LT: only the last block (Impl. Details)
        for name, p in net.backbone.named_parameters():
            p.requires_grad_("layer4" in name)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=args.lr,
                          momentum=args.momentum, weight_decay=args.weight_decay)
    net = common.prepare_model(net, device, args.channels_last, args.compile, ddp=True, sync_bn=args.sync_bn)
    key = common.prepare_model(key, device, args.channels_last, args.compile).train()  # EMA: no DDP
    queue, labels = init_queue(args.queue_size, args.feat_dim, num_classes, args.queue_label_init, device,
                               torch.Generator().manual_seed(args.seed))
    return MoCo(net, key, opt, common.make_scaler(amp_dtype), queue, labels)


def stage1_step(m: MoCo, x, y, lr: float, args: Args, image_size: int, amp_dtype, generator=None):
    """One iteration on a uint8 batch x; returns (L, L_dscl, L_pbsd), 0-d device tensors (no host sync)."""
    net, device, B, L = common.unwrap(m.net), x.device, x.shape[0], args.num_patches
    common.set_lr(m.opt, lr)
    for enc in (m.net, m.key):                   # train-mode BN; Places-LT's frozen layers stay in eval mode
        for name, part in common.unwrap(enc.train()).backbone.named_children():
            part.train(args.finetune != "layer4" or name == "layer4")
    xq, xk, patches, boxes = make_views(x, args, image_size, args.dataset in SMALL, generator)
    if device.type == "cuda" and args.channels_last:
        xq, xk, patches = (t if t is None else t.contiguous(memory_format=torch.channels_last)
                           for t in (xq, xk, patches))
    with torch.no_grad(), common.autocast(device, amp_dtype):    # EMA of the parameters only, then the keys
        common.ema_update(common.unwrap(m.key), net, args.ema_decay, buffers="none")
        k = encode_keys(m.key, xk, args.shuffle_bn_chunks)                # the global batch's keys (B, D)
    with common.autocast(device, amp_dtype):
        z, fmap = m.net(xq, return_map=True)
        if patches is not None and args.fuse_patch_passes:  # one pass: BN statistics over all B*L patches
            s = m.net(patches).view(B, L, -1)
        elif patches is not None:                           # L passes, as the released code
            pv = patches.view(B, L, *patches.shape[1:])
            s = torch.stack([m.net(pv[:, j]) for j in range(L)], dim=1)                       # Eq. (13)
        extra = s.transpose(0, 1) if args.multicrop else None  # Table 1 row 5: patches as anchors (INFERRED)
        zg, yg = common.gather(z), common.gather(y)    # torchrun: the global batch, queries with gradient
        mine = common.local_part(torch.arange(len(zg), device=device))      # anchors: this process's rows
        l_dscl = dscl_loss(zg, k, yg, m.queue, m.queue_labels, "scl" if args.scl else args.alpha,
                           args.temperature, args.contrast_batch, extra, mine)                 # Eq. (8)-(9)
        l_pbsd = torch.zeros((), device=device)
        if args.pbsd_weight > 0:                                              # per image: local
            c = roi_teacher(net.head, fmap, boxes, net.backbone.feature_stride).detach()      # Eq. (11)
            l_pbsd = pbsd_loss(s, c, k[mine], m.queue, args.temperature)                      # Eq. (14)
        loss = l_dscl + args.pbsd_weight * l_pbsd                                             # Eq. (15)
    m.opt.zero_grad(set_to_none=True)
    m.scaler.scale(loss).backward()
    m.scaler.step(m.opt)
    m.scaler.update()
    m.ptr = enqueue(m.queue, m.queue_labels, m.ptr, k, yg)                   # the global batch
    return loss.detach(), l_dscl.detach(), l_pbsd.detach()


def pretrain(run: common.Run, args: Args, ds) -> MoCo:
    """Stage 1: SGD, lr 0.1 x B/256, warm-up, then cosine to 0 per iteration; a checkpoint every epoch."""
    m = build_stage1(args, ds.num_classes, ds.image_size, run.device, run.amp_dtype)
    net, key = common.unwrap(m.net), common.unwrap(m.key)
    loader = data.make_loader(ds.train, args.batch_size, run.device, drop_last=True, sampler="random",
                              seed=args.seed, workers=args.workers, image_size=ds.image_size, shard=True)
    iters = len(loader)
    total, warmup = args.epochs * iters, args.lr_warmup_epochs * iters
    start, ck = 0, run.restore()
    if ck is not None:
        for part, name in ((net, "model"), (key, "key_model"), (m.opt, "optimizer"), (m.scaler, "scaler")):
            part.load_state_dict(ck[name])
        m.queue[:], m.queue_labels[:] = ck["queue"], ck["queue_labels"]
        start, m.ptr = int(ck["epoch"]), int(ck["queue_ptr"])
    progress, gen = run.progress(total, args.batch_size), torch.Generator(device=run.device)
    for epoch in range(start, args.epochs):
        loader.set_epoch(epoch)
        gen.manual_seed(common.epoch_seed(args.seed, epoch))   # a function of (seed, epoch): exact resume
        progress.set_epoch(epoch + 1, args.epochs)
        sums = torch.zeros(3, device=run.device)
        for it, (x, y, _) in enumerate(loader):
            step = epoch * iters + it
            lr = common.cosine_lr(step, total, warmup, args.lr * args.batch_size / 256)
            out = stage1_step(m, x, y, lr, args, ds.image_size, run.amp_dtype, gen)
            sums += torch.stack(out)
            progress.step(step, loss=out[0], lr=lr)
        loss, l_dscl, l_pbsd = common.all_mean(sums) / iters
        record = {"stage": "pretrain", "loss_dscl": l_dscl, "loss_pbsd": l_pbsd, "lr": lr}
        run.end_epoch(epoch + 1, loss, record, {
            "arch": args.arch, "image_size": ds.image_size, "stage": "pretrain",
            "backbone": net.backbone.state_dict(), "model": net.state_dict(), "key_model": key.state_dict(),
            "optimizer": m.opt.state_dict(), "scaler": m.scaler.state_dict(), "queue": m.queue,
            "queue_labels": m.queue_labels, "queue_ptr": m.ptr})
    return m


# ---- Stage 2: class-balanced linear classifier, frozen backbone (eval.cb_linear). --------------------------
def linear_stage(run: common.Run, args: Args, ds, backbone: nn.Module, stage1: dict) -> dict:
    """stage1: {"arch", "epochs", "checkpoint"} of the pre-trained backbone that is evaluated."""
    small = args.dataset in SMALL
    out = evaluation.cb_linear(backbone, ds, run.device, run.amp_dtype, lr=args.linear_lr, bn=args.linear_bn,
                               epochs=args.linear_epochs, milestones=tuple(args.linear_milestones),
                               batch_size=args.linear_batch_size, seed=args.seed,
                               recipe="crop_flip_cifar" if small else "mocov2_imagenet")  # CIFAR INFERRED
    res = run.results(ds, "dscl-linear-cb", "backbone", {"stage1": stage1["epochs"],
                                                         "stage2": args.linear_epochs})
    res.update(out, backbone=stage1["arch"], **({"method": "dscl-cifar (non-paper)"} if small else {}))
    beta = None if args.scl or args.alpha == 0 else (1 - args.alpha) / args.alpha   # the released code's beta
    res["extra"].update(alpha="scl" if args.scl else args.alpha, beta=beta,
                        stage1_checkpoint=stage1["checkpoint"])
    if common.is_main():
        common.append_metrics(run.run_dir, {"stage": "linear", "epoch": args.linear_epochs,
                                            "top1": res["at_last"]["top1_overall"]})
    run.finish(res)
    print(f"[dscl] {evaluation.PAPER_HEADER['dscl']}  (strict groups, last epoch)")
    print(evaluation.paper_row(res["at_last"], style="dscl"))
    return res


# ---- Benchmark, dry run and main. --------------------------------------------------------------------------
def benchmark(args: Args) -> float:
    """Images/s of one stage-1 step (views, both encoders, both losses, SGD, enqueue) on random data."""
    (device, amp_dtype), small = common.setup_device(args.device, args.amp), args.dataset in SMALL
    size = 64 if args.dataset == "tiny-imagenet-lt" else 32 if small else 224
    classes = 100 if args.dataset == "cifar100-lt" else 10 if small else 1000       # the label range only
    m = build_stage1(args, classes, size, device, amp_dtype)
    raw = size if small else 256                                                    # list datasets: 256 px
    x = torch.randint(0, 256, (args.batch_size, 3, raw, raw), dtype=torch.uint8, device=device)
    y = torch.randint(0, classes, (args.batch_size,), device=device)
    return common.benchmark("dscl", lambda: stage1_step(m, x, y, args.lr, args, size, amp_dtype)[0],
                            args.batch_size, args.benchmark_steps, device, amp_dtype)


def load_data(args: Args):  # the generated long tail is drawn with --data-seed, not --seed (docs/data.md)
    return data.load_dataset(args.dataset, args.data_dir, imb_ratio=args.imb_ratio, protocol=args.protocol,
                             seed=args.data_seed, num_classes=args.num_classes,
                             synthetic_n_max=args.synthetic_n_max, synthetic_n_test=args.synthetic_n_test)


def main(argv=None):
    args, filled = common.parse_args(Args, argv, DEFAULTS)
    if args.benchmark:
        return benchmark(args)
    if args.queue_size < args.batch_size:
        raise common.UserError(f"--queue-size {args.queue_size} is smaller than --batch-size "
                               f"{args.batch_size}; the queue must hold at least one batch of keys")
    if args.stage == "linear" and not args.ckpt:
        raise common.UserError("--stage linear needs --ckpt PATH (a stage-1 checkpoint.pt of dscl.py)")
    if args.dry_run:                                 # no run directory, no training
        ds = load_data(args)
        print(data.describe(ds) + f"\n[dscl] paper setting: "
              f"{common.paper_setting(args, PAPER, common.paper_dataset(ds))}; defaults filled: "
              f"{json.dumps(filled)}\n[dscl] resolved settings:\n{json.dumps(dataclasses.asdict(args))}")
        DSCLNet(args.arch, ds.image_size, args.feat_dim)
        return None
    run = common.Run("dscl", args, filled, DEFAULTS, PAPER)
    args = run.args                                  # a resumed run's own settings
    ds = load_data(args)
    run.start(ds, f"stage {args.stage} | {args.arch} | B {args.batch_size} | K {args.queue_size} | alpha "
                  f"{'scl' if args.scl else args.alpha} | lambda {args.pbsd_weight} | L {args.num_patches}")
    if args.stage != "linear":
        backbone = common.unwrap(pretrain(run, args, ds).net).backbone
        if args.stage == "pretrain":
            return None
        stage1 = {"arch": args.arch, "epochs": args.epochs, "checkpoint": str(run.run_dir / "checkpoint.pt")}
    else:
        ck = common.load_checkpoint(args.ckpt)
        backbone = common.build_backbone(ck["arch"], ck["image_size"])
        backbone.load_state_dict(ck["backbone"])
        backbone = common.prepare_model(backbone, run.device, args.channels_last)
        stage1 = {"arch": ck["arch"], "epochs": ck["epoch"], "checkpoint": str(args.ckpt)}
    return linear_stage(run, args, ds, backbone, stage1)


if __name__ == "__main__":
    common.main_guard(main)
