"""DSCL + PBSD: decoupled supervised contrastive loss and patch-based self-distillation, two stages.

S. Xuan and S. Zhang, "Decoupled Contrastive Learning for Long-Tailed Recognition", AAAI 2024 (arXiv
2403.06151); its lost equation bodies are restored from the authors' supplementary and code
(github.com/SY-Xuan/DSCL); what no source states is marked INFERRED, with its reason in
docs/dscl.md. Stage 1, MoCo-v2 with a queue of labelled keys: each anchor gives its own key the
target share alpha and its same-class keys 1 - alpha (DSCL); patches cut from the query view learn
the similarity distribution of ROI-pooled features of the same boxes (PBSD). Stage 2: a
class-balanced linear classifier on the frozen backbone.

  Paper              What                                                 Here
  Eq. (2)            p(z_t | z_i): softmax over {own key} + queue         dscl_loss (log_softmax)
                     (+ batch)
  Eq. (1), (3)       SCL: 1/(|P_i|+1) of the target on every positive     dscl_loss, --scl
  Eq. (8)-(9)        DSCL: alpha on the own key, 1 - alpha shared by P_i  dscl_loss
  Eq. (11)           teacher c = g(mean_2x2 ROIAlign(F, box)), detached   roi_teacher
  Eq. (13)           student s = g(f(patch cut from the query view))      make_views, stage1_step
  Eq. (12), (14)     CE of the student's distribution vs sg(teacher's)    pbsd_loss
  Eq. (15)           L = L_dscl + lambda L_pbsd                           stage1_step, --pbsd-weight
  Training Pipeline  EMA key encoder (parameters only), labelled queue    encode_keys, enqueue
  Impl. Details      SGD, lr 0.1 x B/256, cosine to 0 per iteration       pretrain
  Training Pipeline  class-balanced linear classifier, frozen backbone    linear_stage
  Tables 1-3         the paper's top-1 of each row                        PAPER_TOP1

    python dscl.py --dataset imagenet-lt --data-dir data/imagenet-lt   # Tables 1 and 3 (57.7)
    python dscl.py --dataset synthetic-lt                              # CPU demo, no files needed
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import eval as evaluation
import harness
from harness import arg

# the CIFAR adaptation: small images
SMALL = ("cifar10-lt", "cifar100-lt", "synthetic-lt", "folder", "tiny-imagenet-lt")


@dataclass
class Args(harness.RunArgs):
    """DSCL + PBSD (Xuan & Zhang, AAAI 2024): stage 1 contrastive pre-training, stage 2 a
    class-balanced linear classifier. A flag left unset takes its dataset's value (shown per flag):
    the paper's settings ("Impl. Details": its Implementation Details) on ImageNet-LT, iNaturalist
    2018 and Places-LT; a CIFAR adaptation, NOT in the paper, all INFERRED, on small images; a CPU
    demo on synthetic-lt (docs/dscl.md)."""
    stage: str = arg("all", "pretrain = stage 1, linear = stage 2 on --ckpt, all = both",
                     runtime=True, choices=["pretrain", "linear", "all"])
    ckpt: str = arg("", "stage-1 checkpoint.pt whose backbone --stage linear uses", runtime=True)
    data_seed: int = arg(0, "seed of the generated long tail, not --seed (docs/data.md)",
                         check=">=0")
    num_classes: int = arg(10, "synthetic-lt only: classes (docs/data.md)", check=">=1")
    synthetic_n_test: int = arg(100, "synthetic-lt only: test images per class", check=">=1")
    # --- stage 1: model and losses ---
    arch: str | None = arg(None, "backbone (Impl. Details)", choices=list(common.ARCHS))
    pretrained: str = arg("", "torchvision weights to start from (Places-LT: ImageNet-1K, Impl. "
                          "Details)")
    finetune: str | None = arg(None, "what stage 1 trains: all | layer4 (Places-LT, Impl. "
                               "Details)", choices=["all", "layer4"])
    proj_dim: int = arg(128, "output dimension of the projection head g (Impl. Details)",
                        check=">=1")
    queue_size: int | None = arg(None, "memory queue K, >= --batch-size (Impl. Details)",
                                 check=">=1")
    ema_decay: float | None = arg(None, "key-encoder momentum m (Impl. Details)", check="[0,1]")
    tau: float = arg(0.07, "temperature tau of Eq. (2) and (12) (Impl. Details)", check=">0")
    alpha: float = arg(0.1, "own-key share alpha, Eq. (9) (Impl. Details); released code: 1/9",
                       check="[0,1]")
    scl: bool = arg(False, "alpha_i = 1/(|P_i|+1) per anchor: SCL, Eq. (1), the baseline of "
                    "Table 1")
    contrast_batch: bool = arg(True, "softmax also over the batch's other queries and keys "
                               "(released code, INFERRED); --no-contrast-batch: Eq. (2), own key "
                               "+ queue")
    queue_label_init: str = arg("random", "initial queue labels: random in [0, C) (released code) "
                                "| none (-1, never a positive)", choices=["random", "none"])
    pbsd_weight: float = arg(1.5, "lambda of Eq. (15) (Impl. Details); 0 = no PBSD (Table 1)",
                             check=">=0")
    num_patches: int | None = arg(None, "patches L per anchor (Impl. Details, Fig. 5b)",
                                  check=">=1")
    patch_scale: list[float] = arg([0.05, 0.6], "box area range (Impl. Details); 1.0 1.0 = "
                                   "global-view features, Table 1 row 4", check="(0,1]")
    patch_size: int | None = arg(None, "side S of the resized patches (Impl. Details)",
                                 check=">=1")
    fuse_patch_passes: bool = arg(False, "one pass over the L patch batches, not L (other BN "
                                  "statistics)")
    multicrop: bool = arg(False, "patches as extra DSCL anchors, not PBSD students: Table 1 row 5 "
                          "(INFERRED reading); use with --pbsd-weight 0")
    crop_scale: list[float] = arg([], "RandomResizedCrop scale of both views (released code)",
                                  check="(0,1]")
    shuffle_bn_chunks: int = arg(2, "key BN on this many random chunks, one process: shuffle-BN "
                                 "(INFERRED); torchrun: one chunk per process (released code)",
                                 check=">=1")
    sync_bn: bool = arg(False, "SyncBatchNorm across the processes of a torchrun run (CUDA only); "
                        "off: the released code's DDP keeps BN per GPU, shuffled key BN "
                        "(docs/dscl.md)", runtime=True)
    # --- stage 1: optimisation ---
    epochs: int | None = arg(None, "stage-1 epochs (Impl. Details)", check=">=0")
    batch_size: int | None = arg(None, "stage-1 batch B (Impl. Details)", check="batch")
    lr: float = arg(0.1, "stage-1 LR at batch 256, times B/256, cosine to 0 (Impl. Details)",
                    check=">0")
    lr_warmup_epochs: int | None = arg(None, "linear LR warm-up epochs (released code)",
                                       check=">=0")
    momentum: float = arg(0.9, "SGD momentum (released code)", check="[0,1)")
    weight_decay: float = arg(5e-4, "SGD weight decay, every parameter (released code)",
                              check=">=0")
    # --- stage 2: class-balanced linear classifier ---
    linear_epochs: int = arg(40, "stage-2 epochs (Impl. Details)", check=">=0")
    linear_lr: float | None = arg(None, "stage-2 LR (Impl. Details; 2.5 = Our*, Table 3)",
                                  check=">0")
    linear_milestones: list[int] = arg([20, 30], "stage-2 LR x0.1 after each of these many "
                                       "epochs (Impl. Details; counted as the released code: 20 / "
                                       "10 / 10)", check=">=1")
    linear_batch_size: int | None = arg(None, "stage-2 batch (Impl. Details)", check="batch")
    linear_bn: str = arg("train", "stage-2 BN of the frozen backbone: train (released code: "
                         "running stats re-estimated on stage-2 views, no gradient) | eval",
                         choices=["train", "eval"])
    dry_run: bool = arg(False, "print the data and resolved settings, build the model, exit",
                        runtime=True)


# ---- Model pieces: f (backbone) + g (head, shared by z, c and s), the keys and the queue --------

class DSCLNet(nn.Module):
    """Encoder f + head g = Linear(d,d)-ReLU-Linear(d,128), no BN (released code); the query
    and the key encoder. torchvision ResNets start with gamma = 0 in every residual block's
    last BN, as the released main.py builds them; the CIFAR ResNets keep LDAM's
    initialisation (INFERRED, docs/dscl.md)."""

    def __init__(self, arch: str, image_size: int, proj_dim: int = 128):
        super().__init__()
        self.backbone = common.build_backbone(arch, image_size, zero_init_residual=True)
        d = self.backbone.out_dim
        self.head = common.projection_mlp(d, d, proj_dim, num_layers=2, bn=False)

    def forward(self, x, return_map: bool = False):
        pooled, fmap = self.backbone(x, return_map=True)
        if return_map:
            return self.head(pooled), fmap
        return self.head(pooled)


def roi_teacher(head: nn.Module, fmap: torch.Tensor, boxes: torch.Tensor,
                stride: int) -> torch.Tensor:
    """Eq. (11): c = g(mean_2x2(ROIAlign(F, box))) on fp32 features; boxes (B, L, 4) in pixels ->
    (B, L, D)."""
    from torchvision.ops import roi_align  # imported here: torchvision takes seconds to import
    B, L, _ = boxes.shape
    # cells: (B*L, C, 2, 2)
    cells = roi_align(fmap.float(), list(boxes.float().unbind(0)), output_size=2,
                      spatial_scale=1.0 / stride, sampling_ratio=-1, aligned=False)
    return head(cells.mean(dim=(2, 3))).view(B, L, -1)


@torch.no_grad()
def encode_keys(key_net: nn.Module, xk: torch.Tensor, chunks: int) -> torch.Tensor:
    """z^+ = n(g'(f'(x^k))) of the global batch, BN on random chunks, un-permuted: under torchrun as
    the released _batch_shuffle_ddp (process 0's permutation, one chunk per process); in one
    process `chunks` chunks (INFERRED)."""
    world = common.get_rank_world()[1]
    xs = common.gather(xk)  # the global batch's key views
    perm = common.gather(torch.randperm(len(xs), device=xs.device)[None])[0]  # process 0's
    mine = common.local_part(xs[perm]).chunk(chunks if world == 1 else 1)
    out = common.gather(torch.cat([key_net(c) for c in mine]))  # in the permuted order
    return F.normalize(out[torch.argsort(perm)].float(), dim=1)


def init_queue(size: int, dim: int, num_classes: int, label_init: str, device, generator=None):
    """Random normalised Gaussian keys; labels random in [0, C) (released code) or -1
    (never a positive)."""
    queue = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
    if label_init == "random":
        labels = torch.randint(0, num_classes, (size,), generator=generator)
    else:
        labels = torch.full((size,), -1, dtype=torch.long)
    return queue.to(device), labels.to(device)


@torch.no_grad()
def enqueue(queue, queue_labels, ptr: int, keys: torch.Tensor, labels: torch.Tensor) -> int:
    """Write keys and their labels at ptr (wrapping around); returns the new pointer."""
    idx = (ptr + torch.arange(keys.shape[0], device=queue.device)) % queue.shape[0]
    queue[idx] = keys.detach().to(queue.dtype)
    queue_labels[idx] = labels.to(queue_labels.dtype)
    return int((ptr + keys.shape[0]) % queue.shape[0])


# ---- Losses (pure functions): fp32 logits even inside autocast, log_softmax forms -------------

def dscl_loss(q, k, labels, queue, queue_labels, alpha, tau, contrast_batch=False, extra=None,
              mine=None):
    """DSCL loss, Eq. (8)-(9), as a cross-entropy against a fixed target (the w_t of Eq. (9) sum to
    |P_i| + 1):

        L_i = - alpha_i log p(z_i^+ | z_i) - (1 - alpha_i)/|P_i| sum_{t in P_i} log p(z_t | z_i)
        p(z_t | z_i) = softmax over the contrast set of z_t . z_i / tau                 # Eq. (2)

    q: (B, D) queries (with gradient); k: (B, D) own keys; labels (B,); queue (K, D) and
    queue_labels (K,), before this step's enqueue. mine: the rows of the batch that are anchors
    (torchrun: this process's rows of the gathered batch); default all. alpha: a float, a (b,)
    tensor, or "scl" for 1/(|P_i|+1) (Eq. 1). The contrast set: {own key} + queue (Eq. 2), or with
    contrast_batch also the other B-1 queries (with gradient) and the other B keys (released
    code). extra (A, b, D): more anchors of image i (--multicrop), scored as q_i: its contrast set,
    own key and positives. Mean over all anchors."""
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1).detach()
        queue = queue.float().detach()
        B = q.shape[0]
        rows = torch.arange(B, device=q.device) if mine is None else mine
        n = torch.arange(len(rows), device=q.device)  # anchor i = rows[i]
        anchors = q[rows][None]  # (1, b, D)
        if extra is not None:
            anchors = torch.cat([anchors, F.normalize(extra.float(), dim=-1)])  # (A, b, D)
        if contrast_batch:
            # columns: [the batch's queries | the batch's keys | the queue]
            logits = anchors @ torch.cat([q, k, queue]).T / tau  # (A, b, 2B + K)
            col_labels = torch.cat([labels, labels, queue_labels])
            logits[:, n, rows] = float("-inf")  # a query is not in its own contrast set
            own = B + rows  # the column of anchor i's own key
        else:
            # columns: [own key | the queue]
            own_logit = (anchors * k[rows]).sum(-1)[..., None]
            logits = torch.cat([own_logit, anchors @ queue.T], -1) / tau
            col_labels = torch.cat([labels.new_full((1,), -1), queue_labels])
            own = torch.zeros_like(rows)
        # P_i: the columns of anchor i's class in its contrast set, its own key excepted
        in_set = logits[0] > float("-inf")
        positives = (labels[rows, None] == col_labels[None, :]) & in_set
        positives[n, own] = False
        log_p = F.log_softmax(logits, dim=-1)  # Eq. (2), in log space
        n_pos = positives.sum(1)  # |P_i|
        mean_log_p_pos = log_p.masked_fill(~positives, 0.0).sum(-1) / n_pos.clamp(min=1)
        if isinstance(alpha, str):  # "scl": SCL, Eq. (1)
            alpha = 1.0 / (n_pos.float() + 1.0)
        if torch.is_tensor(alpha):
            a = alpha.to(q)
        else:
            a = q.new_full((len(rows),), alpha)  # no tensor built from host data
        # an anchor without a positive puts its whole target on its own key
        a = torch.where(n_pos > 0, a, 1.0)
        return -(a * log_p[:, n, own] + (1.0 - a) * mean_log_p_pos).mean()  # Eq. (8)-(9)


def pbsd_loss(student, teacher, k, queue, tau):
    """PBSD loss, Eq. (12)-(14): cross-entropy of the student's similarity distribution over
    D_i = {z_i^+} + queue against the teacher's (stop-gradient):

        L_i = -(1/L) sum_j sum_{t in D_i} sg[p(z_t | c_i[j])] log p(z_t | s_i[j])        # Eq. (14)

    student s (B, L, D) from encoded image patches (Eq. 13); teacher c (B, L, D) from ROI-pooled
    query features (Eq. 11); k (B, D) own keys; queue (K, D). The mean over anchors and patches."""
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.float(), dim=-1)
        c = F.normalize(teacher.float().detach(), dim=-1)
        k = F.normalize(k.float(), dim=-1).detach()
        queue = queue.float().detach()

        def logits(e):  # Eq. (12): (B, L, 1 + K)
            own = (e * k[:, None]).sum(-1, keepdim=True)
            return torch.cat([own, e @ queue.T], -1) / tau

        target = F.softmax(logits(c), dim=-1)
        return -(target * F.log_softmax(logits(s), dim=-1)).sum(-1).mean()


# ---- Stage 1: the views, the training step (Eq. 15) and the loop ------------------------------

def make_views(x, args: Args, size: int, small: bool, generator=None, channels_last=False):
    """(query, key, patches (B*L, 3, S, S) image-major, boxes (B, L, 4)). Query: RRC + flip, then
    its colour recipe; the boxes are cut from the flipped query before its colour augmentation and
    get the patch recipe. Key: an independent RRC, jitter(.4,.4,.4,0) p 1, flip (released code)."""
    g = generator
    suffix = "_cifar" if small else ""
    stats = data.MEAN_STD["cifar" if small else "imagenet"]
    scale = tuple(args.crop_scale)
    q_geo = data.random_hflip(data.random_resized_crop(x, size, scale=scale, generator=g),
                              generator=g)
    xq = data.augment(q_geo, "dscl_query_color" + suffix, g, channels_last=channels_last)
    k_geo = data.color_jitter(data.random_resized_crop(x, size, scale=scale, generator=g), 0.4, 0.4,
                              0.4, 0.0, p=1.0, generator=g)
    xk = data.normalize(data.random_hflip(k_geo, generator=g), *stats)
    xk = data.memory_format(xk, channels_last)
    if args.pbsd_weight <= 0 and not args.multicrop:
        return xq, xk, None, None  # patches are neither built nor encoded
    boxes = data.sample_boxes(x.shape[0], args.num_patches, size, size,
                              scale=tuple(args.patch_scale), generator=g, device=x.device)
    cut = data.crop_boxes(q_geo, boxes, args.patch_size)
    patches = data.augment(cut, "dscl_patch" + suffix, g, channels_last=channels_last)
    return xq, xk, patches, boxes


@dataclass
class MoCo:
    """What stage 1 keeps between iterations: both encoders, the optimiser, the loss scaler and
    the labelled queue."""
    net: nn.Module
    key: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    queue: torch.Tensor
    queue_labels: torch.Tensor
    ptr: int = 0


def build_stage1(args: Args, num_classes: int, image_size: int, device, amp_dtype) -> MoCo:
    """Query encoder (maybe pre-trained, maybe only layer4 trained), its EMA copy,
    SGD, scaler, queue."""
    net = DSCLNet(args.arch, image_size, args.proj_dim)
    if args.pretrained:  # ImageNet-1K weights; their fc layer is dropped
        sd = data.load_checkpoint(args.pretrained, flag="--pretrained")
        sd = sd.get("backbone", sd.get("state_dict", sd))
        weights = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        missing, unexpected = net.backbone.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise common.UserError(f"--pretrained {args.pretrained} does not fit --arch "
                                   f"{args.arch} (missing {missing[:3]}, unexpected "
                                   f"{unexpected[:3]}); pass torchvision weights of it")
    key = copy.deepcopy(net).requires_grad_(False)  # theta' <- theta at the start (MoCo)
    if args.finetune == "layer4":  # Places-LT: only the last block (Impl. Details)
        for name, p in net.backbone.named_parameters():
            p.requires_grad_("layer4" in name)
    trained = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trained, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay)
    net = common.prepare_model(net, device, args.channels_last, args.compile, ddp=True,
                               sync_bn=args.sync_bn)
    key = common.prepare_model(key, device, args.channels_last, args.compile).train()  # no DDP
    queue, labels = init_queue(args.queue_size, args.proj_dim, num_classes, args.queue_label_init,
                               device, torch.Generator().manual_seed(args.seed))
    return MoCo(net, key, opt, common.make_scaler(amp_dtype), queue, labels)


def stage1_step(m: MoCo, xq, xk, patches, boxes, y, lr: float, args: Args, amp_dtype):
    """One iteration on the views of make_views and the labels y; returns (L, L_dscl, L_pbsd), 0-d
    device tensors (no host sync)."""
    net = common.unwrap(m.net)
    device = xq.device
    B = xq.shape[0]
    L = args.num_patches
    common.set_lr(m.opt, lr)
    for enc in (m.net, m.key):  # BN in train mode; Places-LT's frozen layers stay in eval mode
        for name, part in common.unwrap(enc.train()).backbone.named_children():
            part.train(args.finetune != "layer4" or name == "layer4")
    with torch.no_grad(), common.autocast(device, amp_dtype):
        common.ema_update(m.key, net, args.ema_decay)  # the key encoder: EMA of the parameters
        k = encode_keys(m.key, xk, args.shuffle_bn_chunks)  # the global batch's keys (B, D)
    with common.autocast(device, amp_dtype):
        z, fmap = m.net(xq, return_map=True)
        s = None
        if patches is not None and args.fuse_patch_passes:
            # one pass: BN statistics over all B*L patches
            s = m.net(patches).view(B, L, -1)
        elif patches is not None:
            # L passes, as the released code
            by_patch = patches.view(B, L, *patches.shape[1:])
            s = torch.stack([m.net(by_patch[:, j]) for j in range(L)], dim=1)  # Eq. (13)
        extra = None
        if args.multicrop:  # Table 1 row 5: the patches as anchors (INFERRED)
            extra = s.transpose(0, 1)
        zg = common.gather(z)  # torchrun: the global batch, queries with gradient
        yg = common.gather(y)
        mine = common.local_part(torch.arange(len(zg), device=device))  # this process's anchors
        alpha = "scl" if args.scl else args.alpha
        l_dscl = dscl_loss(zg, k, yg, m.queue, m.queue_labels, alpha, args.tau,
                           args.contrast_batch, extra, mine)  # Eq. (8)-(9)
        l_pbsd = torch.zeros((), device=device)
        if args.pbsd_weight > 0:  # per image: local
            stride = net.backbone.feature_stride
            c = roi_teacher(net.head, fmap, boxes, stride).detach()  # Eq. (11)
            l_pbsd = pbsd_loss(s, c, k[mine], m.queue, args.tau)  # Eq. (14)
        loss = l_dscl + args.pbsd_weight * l_pbsd  # Eq. (15)
    common.optimizer_step(loss, m.opt, m.scaler)
    m.ptr = enqueue(m.queue, m.queue_labels, m.ptr, k, yg)  # the global batch
    return loss.detach(), l_dscl.detach(), l_pbsd.detach()


def pretrain(run: harness.Run, args: Args, ds) -> MoCo:
    """Stage 1: SGD, lr 0.1 x B/256, warm-up, then cosine to 0 per iteration; a
    checkpoint every epoch."""
    m = build_stage1(args, ds.num_classes, ds.image_size, run.device, run.amp_dtype)
    loader = data.make_loader(ds.train, args.batch_size, run.device, drop_last=True,
                              sampler="random", seed=args.seed, workers=args.workers,
                              image_size=ds.image_size, shard=True)
    parts = {"model": common.unwrap(m.net), "key_model": common.unwrap(m.key), "optimizer": m.opt,
             "scaler": m.scaler}
    start, saved = run.restore("pretrain", parts)
    if saved is not None:
        m.queue[:] = saved["queue"]
        m.queue_labels[:] = saved["queue_labels"]
        m.ptr = int(saved["queue_ptr"])
    iters = len(loader)
    total = args.epochs * iters
    warmup = args.lr_warmup_epochs * iters
    progress = run.progress(total, args.batch_size)
    gen = torch.Generator(device=run.device)
    for epoch in range(start, args.epochs):
        loader.set_epoch(epoch)
        gen.manual_seed(common.epoch_seed(args.seed, epoch))  # a function of (seed, epoch)
        progress.set_epoch(epoch, args.epochs)
        sums = torch.zeros(3, device=run.device)
        for it, (x, y, _) in enumerate(loader):
            step = epoch * iters + it
            lr = common.cosine_lr(step, total, warmup, args.lr * args.batch_size / 256)
            views = make_views(x, args, ds.image_size, args.dataset in SMALL, gen,
                               run.channels_last)
            out = stage1_step(m, *views, y, lr, args, run.amp_dtype)
            sums += torch.stack(out)
            progress.step(step, loss=out[0], lr=lr)
        loss, l_dscl, l_pbsd = common.all_mean(sums) / iters
        record = {"loss_dscl": l_dscl, "loss_pbsd": l_pbsd, "lr": lr}
        state = {"queue": m.queue, "queue_labels": m.queue_labels, "queue_ptr": m.ptr}
        run.end_epoch(epoch, loss, record, state)
    return m


# ---- Stage 2: class-balanced linear classifier on the frozen backbone (eval.cb_linear) --------

def linear_stage(run: harness.Run, args: Args, ds, backbone: nn.Module, stage1: dict) -> dict:
    """stage1: {"arch", "epochs", "checkpoint"} of the pre-trained backbone that is evaluated."""
    small = args.dataset in SMALL
    recipe = "crop_flip_cifar" if small else "mocov2_imagenet"  # CIFAR: INFERRED
    out = evaluation.cb_linear(backbone, ds, run.device, run.amp_dtype, lr=args.linear_lr,
                               bn=args.linear_bn, epochs=args.linear_epochs,
                               milestones=tuple(args.linear_milestones),
                               batch_size=args.linear_batch_size, seed=args.seed, recipe=recipe)
    epochs = {"stage1": stage1["epochs"], "stage2": args.linear_epochs}
    res = run.results("dscl-linear-cb", "backbone", epochs)
    res.update(out, backbone=stage1["arch"])
    beta = None  # the released code's beta = (1 - alpha) / alpha
    if not args.scl and args.alpha != 0:
        beta = (1 - args.alpha) / args.alpha
    res["extra"].update(alpha="scl" if args.scl else args.alpha, beta=beta,
                        stage1_checkpoint=stage1["checkpoint"])
    harness.append_metrics(run.run_dir, {"stage": "linear", "epoch": args.linear_epochs,
                                         "top1": res["at_last"]["top1_overall"]})
    run.finish(res, "dscl")
    return res


# ---- Defaults per dataset, and the paper's numbers ----------------------------------------------

# "*": the paper's ImageNet-LT settings (Impl. Details; warm-up and crop scale from the released
# code). SMALL: the CIFAR adaptation, NOT in the paper, every value INFERRED (reasons:
# docs/dscl.md). synthetic-lt: a CPU demo on top of it, not a paper setting (about 9 iterations
# per epoch, a queue of 8 batches).
DEFAULTS = {
    "*": {"protocol": "ldam", "arch": "resnet50", "finetune": "all", "queue_size": 65536,
          "ema_decay": 0.999, "num_patches": 5, "patch_size": 64, "crop_scale": [0.08, 1.0],
          "epochs": 200, "batch_size": 256, "lr_warmup_epochs": 10, "linear_lr": 10.0,
          "linear_batch_size": 2048},
    "inat2018": {"linear_lr": 30.0},
    "places-lt": {"arch": "resnet152", "finetune": "layer4", "epochs": 30, "linear_lr": 2.5},
    SMALL: {"arch": "resnet32", "queue_size": 8192, "ema_decay": 0.99, "patch_size": 16,
            "crop_scale": [0.2, 1.0], "linear_batch_size": 512, "linear_lr": 2.5},
    "synthetic-lt": {"arch": "resnet8", "n_max": 500, "batch_size": 128, "queue_size": 1024,
                     "epochs": 40, "lr_warmup_epochs": 2, "num_patches": 2},
}

# Overall top-1 of the paper's rows (Tables 1 and 3, Fig. 5): {(dataset, variant): {rho: top-1}};
# the list datasets have no rho (None). Places-LT (42.4, Table 3) starts from ImageNet-1K weights,
# a --pretrained file that makes its own variant, so no cell matches it: compare by hand.
PAPER_TOP1 = {
    ("imagenet-lt", "default"): {None: 57.7},  # DSCL + PBSD
    ("imagenet-lt", "--scl --pbsd-weight 0.0"): {None: 51.2},  # Table 1 baseline (SCL)
    ("imagenet-lt", "--pbsd-weight 0.0"): {None: 52.6},  # Table 1, DSCL
    ("imagenet-lt", "--scl"): {None: 56.3},  # Table 1, SCL + PBSD
    ("imagenet-lt", "--patch-scale 1.0 1.0"): {None: 56.2},  # Table 1 row 4
    ("imagenet-lt", "--pbsd-weight 0.0 --multicrop"): {None: 56.1},  # Table 1 row 5
    ("imagenet-lt", "--alpha 0.0"): {None: 56.8},  # Fig. 5a
    ("imagenet-lt", "--alpha 1.0"): {None: 39.8},  # Fig. 5a
    ("imagenet-lt", "--num-patches 1"): {None: 55.0},  # Fig. 5b
    ("imagenet-lt", "--linear-lr 2.5"): {None: 57.4},  # Table 3, Ours*
    ("inat2018", "default"): {None: 72.0},  # Table 3
}


# ---- Benchmark, dry run and main ----------------------------------------------------------------

def benchmark_steps(args: Args, image_size: int, num_classes: int, device, amp_dtype) -> dict:
    """--benchmark: one stage-1 step (both encoders, both losses, SGD, enqueue) on the views of
    make_views."""
    m = build_stage1(args, num_classes, image_size, device, amp_dtype)
    channels_last = args.channels_last and device.type == "cuda"
    small = args.dataset in SMALL

    def views(x, y):
        return (*make_views(x, args, image_size, small, channels_last=channels_last), y)

    def step(inputs):
        return stage1_step(m, *inputs, args.lr, args, amp_dtype)[0]
    num_patches = args.num_patches if args.pbsd_weight > 0 or args.multicrop else 0
    reference = functools.partial(reference_views, size=image_size, scale=args.crop_scale,
                                  small=small, num_patches=num_patches,
                                  patch_scale=args.patch_scale, patch_size=args.patch_size)
    return {"dscl": harness.BenchStep(views, step, reference)}


def reference_views(batch, size: int, scale, small: bool, num_patches: int, patch_scale,
                    patch_size: int):
    """--benchmark --reference: the inputs of stage1_step built per image as the released loader
    builds them (data.reference_dscl_views), in the DataLoader's workers."""
    images, y = data.reference_batch(batch)
    per_image = [data.reference_dscl_views(im, size, scale, small, num_patches, patch_scale,
                                           patch_size) for im in images]
    xq, xk, patches, boxes = (list(part) for part in zip(*per_image))
    if num_patches == 0:
        return torch.stack(xq), torch.stack(xk), None, None, y
    return torch.stack(xq), torch.stack(xk), torch.cat(patches), torch.stack(boxes), y


def run_label(args: Args) -> str:
    """What the run trains, in the paper's words (Table 1): scl or dscl, + pbsd or + multi-crop,
    alpha when it is not the paper's, and "(CIFAR adaptation)" on small images (not in the
    paper)."""
    label = "scl" if args.scl else "dscl"
    if not args.scl and args.alpha != 0.1:
        label += f" (alpha {args.alpha:g})"
    if args.pbsd_weight > 0:
        label += " + pbsd"
    if args.multicrop:
        label += " + multi-crop"
    if args.dataset in SMALL:
        label += " (CIFAR adaptation)"
    return label


def load_data(args: Args):
    """The dataset; a generated long tail is drawn with --data-seed, not --seed (docs/data.md)."""
    return data.load_dataset(args.dataset, args.data_dir, imb_ratio=args.imb_ratio,
                             protocol=args.protocol, seed=args.data_seed,
                             num_classes=args.num_classes, n_max=args.n_max,
                             synthetic_n_test=args.synthetic_n_test)


def dry_run(args: Args, filled: dict) -> None:
    """--dry-run: the data, whether this is a paper setting, the settings; no run directory."""
    ds = load_data(args)
    variant = harness.variant_label(args, DEFAULTS)
    value = harness.paper_value(PAPER_TOP1, harness.paper_dataset(ds), variant, ds.imb_ratio)
    print(data.describe(ds))
    print(f"[dscl] paper setting: {value is not None} (variant {variant}; paper top-1 {value}); "
          f"defaults filled: {json.dumps(filled)}")
    print(f"[dscl] resolved settings:\n{json.dumps(dataclasses.asdict(args))}")
    DSCLNet(args.arch, ds.image_size, args.proj_dim)


def main(argv=None):
    args, filled = harness.parse_args(Args, argv, DEFAULTS)
    if args.benchmark:
        return harness.benchmark(args, benchmark_steps)
    if args.queue_size < args.batch_size:
        raise common.UserError(f"--queue-size {args.queue_size} is smaller than --batch-size "
                               f"{args.batch_size}; the queue must hold at least one batch of keys")
    if args.stage == "linear" and not args.ckpt:
        raise common.UserError("--stage linear needs --ckpt PATH (a stage-1 checkpoint.pt of "
                               "dscl.py)")
    if args.dry_run:
        return dry_run(args, filled)
    run = harness.Run("dscl", args, filled, DEFAULTS, None, PAPER_TOP1, "top1_overall",
                      label=run_label)
    args = run.args  # a resumed run's own settings
    ds = load_data(args)
    alpha = "scl" if args.scl else args.alpha
    run.start(ds, f"stage {args.stage} | {args.arch} | B {args.batch_size} | K {args.queue_size} "
                  f"| alpha {alpha} | lambda {args.pbsd_weight} | L {args.num_patches}")
    if args.stage != "linear":
        backbone = common.unwrap(pretrain(run, args, ds).net).backbone
        if args.stage == "pretrain":
            return None
        checkpoint = str(run.run_dir / "checkpoint.pt")
        stage1 = {"arch": args.arch, "epochs": args.epochs, "checkpoint": checkpoint}
    else:
        ck = data.load_checkpoint(args.ckpt, flag="--ckpt")
        backbone = common.build_backbone(ck["arch"], ck["image_size"])
        backbone.load_state_dict(evaluation.submodule_state(ck["model"], "backbone"))
        backbone = common.prepare_model(backbone, run.device, args.channels_last)
        stage1 = {"arch": ck["arch"], "epochs": ck["epoch"], "checkpoint": str(args.ckpt)}
    with run.reporting("cb-linear"):
        return linear_stage(run, args, ds, backbone, stage1)


if __name__ == "__main__":
    harness.main_guard(main)
