"""Long-tailed datasets, batched GPU augmentation and loaders shared by every method.

Spec: shared/specs/data-and-eval.md (cited as D§x) sections 0-3, 7, 8; recipes from ssl.md §1.4 and
supervised.md §1.3, §1.4, §2.3.

* Datasets (`load_dataset`): CIFAR-10/100-LT (`ldam` D§1.3 and `sdclr` D§1.4 conventions, or exact SDCLR
  index files), ImageFolder trees (`folder`, e.g. the CIFAR-10 JPEG copy D§1.6), Tiny-ImageNet-LT (D§2),
  list datasets (ImageNet-LT, Places-LT, iNaturalist 2018, ImageNet-100-LT; D§3) and a generated
  `synthetic-lt` set for tests and offline demos.
* Augmentation (D§7.2): every op works on a whole uint8/float batch on the batch's device and draws its
  random parameters per image; the named recipes of the specs are in `augment`.
* Loaders (D§7.1, D§7.3): small datasets stay on the device as one uint8 tensor (randperm / class-balanced /
  sequential order); list datasets go through a DataLoader with worker processes.

CLI: `python data.py --dataset cifar10-lt --stats` prints the class counts and saves a histogram;
`python data.py --bench-augment` compares the batched augmentation with torchvision's per-image pipeline.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from common import UserError

DATASETS = ("cifar10-lt", "cifar100-lt", "folder", "synthetic-lt", "tiny-imagenet-lt",
            "imagenet-lt", "places-lt", "inat2018", "imagenet100-lt")

MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # LDAM-DRW cifar_train.py values (D§1.3 step 5)
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# D§1.4: official SDCLR CIFAR-10 head -> tail class orders of splits 1..5
SDCLR_C10_ORDERS = {
    1: (6, 8, 4, 1, 7, 0, 3, 2, 5, 9),
    2: (3, 9, 7, 4, 0, 1, 2, 6, 8, 5),
    3: (0, 4, 2, 8, 5, 6, 7, 1, 9, 3),
    4: (4, 7, 0, 6, 1, 9, 8, 3, 2, 5),
    5: (2, 4, 8, 1, 0, 3, 9, 7, 6, 5),
}


# ------------------------------------------------------------------------------------------------
# Dataset containers
# ------------------------------------------------------------------------------------------------

@dataclass
class Split:
    """One set of images: uint8 tensor (tensor-resident datasets) or absolute file paths (list datasets)."""
    y: torch.Tensor                         # int64 (N,)
    x: torch.Tensor | None = None           # uint8 (N, 3, H, W) on CPU
    files: list[str] | None = None          # absolute image paths
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)  # device -> (x, y) copies

    def __len__(self):
        return int(self.y.shape[0])


@dataclass
class LTDataset:
    """A long-tailed dataset with its evaluation sets; see the contract in README / D§1.5."""
    name: str
    num_classes: int
    class_names: list[str]
    image_size: int
    train: Split
    test: Split
    val: Split | None
    probe: Split | None
    fewshot: Split | None
    class_counts: list[int]
    class_rank: list[int]
    lt_convention: str
    image_source: str
    imb_ratio: float | None
    split: int | None
    tensor_resident: bool

    def info(self) -> dict:
        """JSON-able description stored in every run's config.json / results.json (D§6)."""
        return {
            "name": self.name, "lt_convention": self.lt_convention,
            "imb_ratio": self.imb_ratio, "split": self.split, "n_train": len(self.train),
            "class_counts": list(self.class_counts), "class_rank": list(self.class_rank),
            "n_test": len(self.test),
            "n_val": len(self.val) if self.val is not None else 0,
            "n_probe": len(self.probe) if self.probe is not None else 0,
            "n_fewshot": len(self.fewshot) if self.fewshot is not None else 0,
            "class_names": list(self.class_names), "image_source": self.image_source,
            "image_size": self.image_size, "num_classes": self.num_classes,
        }


def describe(ds: LTDataset) -> str:
    """Multi-line summary: protocol, per-class train counts (label order) and the sizes of every split."""
    label = ds.name + (" (JPEG copy)" if ds.image_source == "jpeg-copy" else "")
    lines = [f"dataset {label}: convention {ds.lt_convention}, imb_ratio {ds.imb_ratio}, split {ds.split}, "
             f"{ds.num_classes} classes, {ds.image_size}px, source {ds.image_source}"]
    width = max(len(n) for n in ds.class_names) if ds.class_names else 5
    if ds.num_classes <= 20:
        for c, (name, n) in enumerate(zip(ds.class_names, ds.class_counts)):
            lines.append(f"  class {c:3d} {name:<{width}} {n:6d}  (rank {ds.class_rank[c]})")
    else:
        order = sorted(range(ds.num_classes), key=lambda c: ds.class_rank[c])
        lines.append("  counts by rank (head -> tail): " + ", ".join(str(ds.class_counts[c]) for c in order))
    cc = ds.class_counts
    lines.append(f"  train total {sum(cc):,} (max {max(cc)}, min {min(cc)}, ratio {max(cc) / max(min(cc), 1):.1f})")
    for nm in ("test", "val", "probe", "fewshot"):
        s = getattr(ds, nm)
        lines.append(f"  {nm:8s} {len(s) if s is not None else 0:,}")
    return "\n".join(lines)


def lt_counts(n_max: int, num_classes: int, imb_ratio: float) -> list[int]:
    """D§1.1: n_r = int(n_max * (1/rho) ** (r / (C - 1))), float64 product, int() truncation (never round)."""
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imb_ratio) ** (r / (num_classes - 1.0))) for r in range(num_classes)]


def _rank_from_counts(counts) -> list[int]:
    """Rank 0 = head: sort by descending count, ties by ascending class index (D§4.1 list datasets)."""
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    rank = [0] * len(counts)
    for r, c in enumerate(order):
        rank[c] = r
    return rank


def _split_of(x, y, idx) -> Split:
    idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return Split(y=y[idx].clone(), x=x[idx] if x is not None else None)


# ------------------------------------------------------------------------------------------------
# Long-tailed index generators (pure numpy, on a label array in canonical order)
# ------------------------------------------------------------------------------------------------

def ldam_indices(targets: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """D§1.3 step 2: for c in label order, shuffle np.where(targets == c) with one RandomState(seed)
    (== np.random.seed(0) + np.random.shuffle in LDAM-DRW) and keep the first counts[c]; class-stacked."""
    rs = np.random.RandomState(seed)
    out = []
    for c, n in enumerate(counts):
        idx = np.where(targets == c)[0]
        rs.shuffle(idx)
        out.append(idx[:n])
    return np.concatenate(out).astype(np.int64)


def holdout_indices(targets: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """D§1.5 ldam-SSL / D§2 validation: per class the first `per_class` images met in a
    RandomState(seed).permutation of the full train set (INFERRED)."""
    perm = np.random.RandomState(seed).permutation(len(targets))
    lab = targets[perm]
    out = []
    for c in range(int(targets.max()) + 1):
        out.append(perm[lab == c][:per_class])
    return np.sort(np.concatenate(out)).astype(np.int64)


def fewshot_from_lt(lt_idx: np.ndarray, targets: np.ndarray, m: int) -> np.ndarray:
    """First m members of each class in the LT set's (shuffled) order (D§1.5 ldam few-shot, D§2)."""
    lab = targets[lt_idx]
    return np.concatenate([lt_idx[lab == c][:m] for c in range(int(targets.max()) + 1)]).astype(np.int64)


def sdclr_class_order(num_classes: int, split: int, seed: int = 0) -> list[int]:
    """D§1.4 step 3: official CIFAR-10 orders; RandomState(seed + k).permutation(C) otherwise (INFERRED)."""
    if num_classes == 10 and split in SDCLR_C10_ORDERS:
        return list(SDCLR_C10_ORDERS[split])
    return [int(c) for c in np.random.RandomState(seed + split).permutation(num_classes)]


def sdclr_indices(targets: np.ndarray, num_classes: int, imb_ratio: float, split: int, seed: int = 0,
                  val_per_class: int | None = None, probe_per_class: int | None = None) -> dict:
    """D§1.4 generator: returns dict of int64 index arrays val, probe, train (D_i), fewshot (S_b), balanced
    (D_b), plus `order` (class at each rank) and `counts` (label order). Counts exact; membership INFERRED."""
    if split not in (1, 2, 3, 4, 5):
        raise UserError(f"--split must be 1..5 for the sdclr protocol (got {split})")
    per = int(np.bincount(targets, minlength=num_classes).min())
    v = val_per_class if val_per_class is not None else per // 10          # 500 / 50 (D§1.4 step 1)
    rs = np.random.RandomState(seed)
    val, pools = [], []
    for c in range(num_classes):
        p = rs.permutation(np.where(targets == c)[0])
        val.append(p[:v])
        pools.append(p[v:])
    n_max = per - v                                                        # 4,500 / 450
    k_probe = probe_per_class if probe_per_class is not None else n_max    # CIFAR-100: 400 (step 2)
    probe = np.concatenate([p[:k_probe] for p in pools])
    order = sdclr_class_order(num_classes, split, seed)
    prof = lt_counts(n_max, num_classes, imb_ratio)
    counts = [0] * num_classes
    for r, c in enumerate(order):
        counts[c] = prof[r]
    m = prof[-1]                                                           # 45 / 4 = n_min (step 5)
    n_bal = sum(prof) // num_classes                                       # 1,116 / 97 (step 6)
    rs2 = np.random.RandomState(seed + 10 * split)
    train, few, bal = [], [], []
    for c in range(num_classes):
        sh = rs2.permutation(pools[c])
        train.append(sh[:counts[c]])
        few.append(sh[:m])
        bal.append(sh[:n_bal])
    cat = lambda a: np.concatenate(a).astype(np.int64)  # noqa: E731
    return {"val": cat(val), "probe": cat([probe]), "train": cat(train), "fewshot": cat(few),
            "balanced": cat(bal), "order": order, "counts": counts}


def check_split_indices(idx: np.ndarray, n: int, what: str, path: str) -> np.ndarray:
    """Validate a loaded index file: 1-D integers in [0, n) without duplicates (D§1.4 validation)."""
    idx = np.asarray(idx)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise UserError(f"{path}: {what} must be a 1-D integer index array (got shape {idx.shape}, "
                        f"dtype {idx.dtype}); pass an SDCLR split file such as split1_D_i.npy")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise UserError(f"{path}: {what} index {int(idx.min() if idx.min() < 0 else idx.max())} is out of "
                        f"range [0, {n}); the file must index the canonical {n}-image train array")
    if np.unique(idx).size != idx.size:
        raise UserError(f"{path}: {what} contains {idx.size - np.unique(idx).size} duplicate indices; "
                        f"use an unmodified SDCLR split file")
    return idx.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# synthetic-lt: class = texture (oriented grating / checker / rings), colour and phase random
# ------------------------------------------------------------------------------------------------

def _synthetic_class_table(num_classes: int):
    """(kind, angle, frequency) per class; the first classes differ in kind and angle."""
    table = []
    angles = [i * math.pi / 8 for i in range(8)]
    freqs = [2.0, 3.5, 5.0, 7.0]
    for f in freqs:
        for a_i in range(8):
            for kind in range(3):
                table.append((kind, angles[(a_i * 3 + kind * 5) % 8], f))
    if num_classes > len(table):
        raise UserError(f"synthetic-lt supports at most {len(table)} classes (got {num_classes})")
    return table[:num_classes]


def synthetic_images(labels: torch.Tensor, num_classes: int, generator: torch.Generator,
                     size: int = 32) -> torch.Tensor:
    """uint8 (N,3,size,size) images of the given labels. Each class is a texture (kind, orientation,
    frequency); foreground/background colours, phase (position) jitter and pixel noise are random per image,
    so colour statistics carry no class information."""
    table = torch.tensor(_synthetic_class_table(num_classes), dtype=torch.float32)
    out = torch.empty(len(labels), 3, size, size, dtype=torch.uint8)
    coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    yy, xx = torch.meshgrid(coord, coord, indexing="ij")
    for s in range(0, len(labels), 4096):
        lab = labels[s:s + 4096]
        n = len(lab)
        kind, ang, freq = table[lab].unbind(1)
        phase = (torch.rand(n, generator=generator) - 0.5) * (math.pi / 2)      # small position jitter
        shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.15
        ca, sa = ang.cos()[:, None, None], ang.sin()[:, None, None]
        X = xx[None] - shift[:, 0, None, None]
        Y = yy[None] - shift[:, 1, None, None]
        u = (X * ca + Y * sa) * (2 * math.pi * freq[:, None, None]) + phase[:, None, None]
        v = (-X * sa + Y * ca) * (2 * math.pi * freq[:, None, None])
        grating = 0.5 + 0.5 * torch.sin(u)
        checker = 0.5 + 0.5 * torch.sin(u) * torch.sin(v + phase[:, None, None])
        rings = 0.5 + 0.5 * torch.sin(2 * math.pi * freq[:, None, None] * 1.5 * (X * X + Y * Y).sqrt()
                                      + phase[:, None, None])
        k = kind[:, None, None]
        pat = torch.where(k == 0, grating, torch.where(k == 1, checker, rings))
        bg = torch.rand(n, 3, 1, 1, generator=generator) * 0.5
        fg = 0.5 + torch.rand(n, 3, 1, 1, generator=generator) * 0.5
        img = bg + (fg - bg) * pat[:, None] + 0.06 * torch.randn(n, 3, size, size, generator=generator)
        out[s:s + n] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def _load_synthetic(num_classes, imb_ratio, seed, n_max, n_test) -> LTDataset:
    g = torch.Generator().manual_seed(seed)
    rho = 1.0 if imb_ratio is None else imb_ratio
    counts = lt_counts(n_max, num_classes, rho)

    def balanced(n):
        return torch.arange(num_classes).repeat_interleave(n)

    pool_y = balanced(n_max)                       # balanced probe pool; the LT set is a subset of it
    pool = Split(y=pool_y, x=synthetic_images(pool_y, num_classes, g))
    lt = np.concatenate([np.arange(c * n_max, c * n_max + n) for c, n in enumerate(counts)])
    train = _split_of(pool.x, pool.y, lt)
    few = np.concatenate([np.arange(c * n_max, c * n_max + counts[-1]) for c in range(num_classes)])
    test_y, val_y = balanced(n_test), balanced(n_test)
    test = Split(y=test_y, x=synthetic_images(test_y, num_classes, g))
    val = Split(y=val_y, x=synthetic_images(val_y, num_classes, g))
    return LTDataset(
        name="synthetic-lt", num_classes=num_classes, class_names=[f"texture{c}" for c in range(num_classes)],
        image_size=32, train=train, test=test, val=val, probe=pool, fewshot=_split_of(pool.x, pool.y, few),
        class_counts=counts, class_rank=list(range(num_classes)), lt_convention="synthetic",
        image_source="synthetic", imb_ratio=rho, split=None, tensor_resident=True)


# ------------------------------------------------------------------------------------------------
# load_dataset
# ------------------------------------------------------------------------------------------------

def load_dataset(name, data_dir="./data", imb_ratio=100.0, protocol="ldam", split=1, split_file=None,
                 seed=0, num_classes=10, download=True, *, synthetic_n_max=500, synthetic_n_test=100,
                 sdclr_split_dir=None) -> LTDataset:
    """Build dataset `name` (one of DATASETS). Raises common.UserError (one line) on bad input.

    imb_ratio: rho of D§1.1 (None: the tree / lists as they are). protocol: "ldam" (D§1.3) or "sdclr" (D§1.4)
    for CIFAR, folder and Tiny. split: SDCLR split k. split_file: exact D_i index file (`sdclr-npy`);
    sdclr_split_dir: a folder with the SDCLR split files (D§1.4 table). seed: data seed (0 reproduces LDAM).
    num_classes, synthetic_n_max, synthetic_n_test: synthetic-lt only."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; valid names: {', '.join(DATASETS)}")
    if protocol not in ("ldam", "sdclr"):
        raise UserError(f"unknown protocol '{protocol}'; use ldam or sdclr")
    if imb_ratio is not None and imb_ratio < 1:
        raise UserError(f"--imb-ratio must be >= 1 (got {imb_ratio})")
    if name == "synthetic-lt":
        return _load_synthetic(num_classes, imb_ratio, seed, synthetic_n_max, synthetic_n_test)
    if name in ("cifar10-lt", "cifar100-lt"):
        return _load_cifar(name, data_dir, imb_ratio, protocol, split, split_file, sdclr_split_dir, seed,
                           download)
    if name == "folder":
        return _load_folder(data_dir, imb_ratio, protocol, split, split_file, seed)
    if name == "tiny-imagenet-lt":
        return _load_tiny(data_dir, imb_ratio, seed)
    return _load_list_dataset(name, data_dir)


# ------------------------------------------------------------------------------------------------
# Augmentation (D§7.2). Inputs uint8 (N,3,H,W) or float in [0,1]; outputs float32. Random parameters are
# drawn per image with `generator` (a torch.Generator on the batch's device) when given.
# ------------------------------------------------------------------------------------------------

def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _rand(n, x, generator, *shape):
    return torch.rand(n, *shape, device=x.device, generator=generator)


def rrc_params(n, height, width, scale, ratio, generator=None, device=None):
    """torchvision RandomResizedCrop.get_params, vectorised: 10 (area, log-ratio) draws per image, first
    valid one, else the centre-crop fallback. Returns float (n,4) boxes (top, left, h, w), integer valued."""
    area = height * width
    s = torch.rand(n, 10, device=device, generator=generator) * (scale[1] - scale[0]) + scale[0]
    lr = torch.rand(n, 10, device=device, generator=generator) * (math.log(ratio[1]) - math.log(ratio[0])) \
        + math.log(ratio[0])
    ar = torch.exp(lr)
    target = area * s
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)                 # first valid try
    any_ok = ok.any(1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, device=device, generator=generator)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    # centre-crop fallback (torchvision semantics)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    fb = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float32, device=device)
    box = torch.stack([top, left, h, w], 1)
    return torch.where(any_ok[:, None], box, fb.expand(n, 4))


def resized_crop(x, boxes, size):
    """Crop boxes (top, left, h, w) (float, per image) and resize to size x size, bilinear, as
    interpolate(align_corners=False) on each crop (== torchvision resized_crop, antialias=False): sample
    coordinates are clamped to the crop, then read with grid_sample (bilinear, align_corners=False)."""
    x = _float(x)
    n, _, H, W = x.shape
    size = (size, size) if isinstance(size, int) else tuple(size)
    top, left, h, w = [b[:, None] for b in boxes.float().unbind(1)]
    j = torch.arange(size[1], device=x.device, dtype=torch.float32)[None] + 0.5
    i = torch.arange(size[0], device=x.device, dtype=torch.float32)[None] + 0.5
    sx = torch.maximum(j * (w / size[1]) - 0.5, torch.zeros_like(j))       # source pixel inside the crop
    sx = torch.minimum(sx, w - 1) + left
    sy = torch.maximum(i * (h / size[0]) - 0.5, torch.zeros_like(i))
    sy = torch.minimum(sy, h - 1) + top
    gx = (2 * sx + 1) / W - 1                                               # align_corners=False coordinates
    gy = (2 * sy + 1) / H - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """RandomResizedCrop with per-image parameters; bilinear instead of bicubic (D§7.2, INFERRED)."""
    n, _, H, W = x.shape
    return resized_crop(x, rrc_params(n, H, W, scale, ratio, generator, x.device), size)


def crop(x, top, left, size):
    """Per-image integer crop: top/left int64 (N,) tensors, output (N,3,size,size), input dtype kept."""
    n = x.shape[0]
    ar = torch.arange(size, device=x.device)
    rows = (top[:, None] + ar)[:, :, None]                                  # (N,S,1)
    cols = (left[:, None] + ar)[:, None, :]                                 # (N,1,S)
    nidx = torch.arange(n, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[nidx, rows, cols].permute(0, 3, 1, 2)


def random_crop(x, size, padding=0, generator=None):
    """RandomCrop(size, padding): zero padding, per-image integer offsets, gather (D§7.2)."""
    if padding:
        x = F.pad(x, (padding,) * 4)
    n, _, H, W = x.shape
    u = _rand(n, x, generator, 2)
    top = torch.floor(u[:, 0] * (H - size + 1)).long()
    left = torch.floor(u[:, 1] * (W - size + 1)).long()
    return _float(crop(x, top, left, size))


def hflip(x, mask):
    """Flip the images where mask (N,) bool is True."""
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def random_hflip(x, p=0.5, generator=None):
    return hflip(_float(x), _rand(x.shape[0], x, generator) < p)


def rgb_to_gray(x):
    """Luminance 0.2989 R + 0.587 G + 0.114 B (torchvision's weights), (N,1,H,W)."""
    return (x[:, 0:1] * 0.2989 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114)


def adjust_brightness(x, f):
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x, f):
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)               # per-image grayscale mean
    f = f.view(-1, 1, 1, 1)
    return (x * f + mean * (1 - f)).clamp_(0, 1)


def adjust_saturation(x, f):
    f = f.view(-1, 1, 1, 1)
    return (x * f + rgb_to_gray(x) * (1 - f)).clamp_(0, 1)


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    h6 = h * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long().remainder(6)
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    vpqt = torch.stack((v, p, q, t), 1)                                     # (N,4,H,W)
    sel = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=h.device)
    idx = sel[:, i].permute(1, 0, 2, 3)                                     # (N,3,H,W)
    return vpqt.gather(1, idx)


def adjust_hue(x, f):
    """Shift hue by f (per image, in [-0.5, 0.5]) through RGB -> HSV -> RGB in fp32."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


def _factor(n, x, generator, amount, centre=1.0):
    lo, hi = (max(0.0, centre - amount), centre + amount) if centre == 1.0 else (-amount, amount)
    return _rand(n, x, generator) * (hi - lo) + lo


def color_jitter(x, brightness, contrast, saturation, hue, p=1.0, generator=None):
    """ColorJitter(b, c, s, h) applied with probability p per image; per-image factors; fixed order
    brightness -> contrast -> saturation -> hue (D§7.2; torchvision randomises the order)."""
    x = _float(x)
    n = x.shape[0]
    apply = _rand(n, x, generator) < p
    fb = _factor(n, x, generator, brightness)
    fc = _factor(n, x, generator, contrast)
    fs = _factor(n, x, generator, saturation)
    fh = _factor(n, x, generator, hue, centre=0.0)
    y = x
    if brightness:
        y = adjust_brightness(y, fb)
    if contrast:
        y = adjust_contrast(y, fc)
    if saturation:
        y = adjust_saturation(y, fs)
    if hue:
        y = adjust_hue(y, fh)
    return torch.where(apply[:, None, None, None], y, x)


def random_grayscale(x, p=0.2, generator=None):
    """RandomGrayscale(p): luminance replicated to 3 channels, per-image coin."""
    x = _float(x)
    mask = _rand(x.shape[0], x, generator) < p
    return torch.where(mask[:, None, None, None], rgb_to_gray(x).expand_as(x), x)


def blur(x, sigma, kernel_size):
    """Separable Gaussian blur with per-image sigma (N,), reflect padding (torchvision gaussian_blur)."""
    x = _float(x)
    n, c, H, W = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma.float().view(-1, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)                                          # (N,K)
    k = k.repeat_interleave(c, 0)                                           # (N*C,K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, H, W)


def gaussian_blur(x, sigma=(0.1, 2.0), p=0.5, kernel_size=None, generator=None):
    """GaussianBlur with probability p and sigma ~ U(sigma) per image. Kernel size defaults to the odd number
    near 10 % of the image side (23 at 224 px, D§7.2 INFERRED; 3 at 32 px)."""
    x = _float(x)
    n, _, H, W = x.shape
    if kernel_size is None:
        kernel_size = max(3, int(0.1 * min(H, W)) // 2 * 2 + 1)
    kernel_size = min(kernel_size, (min(H, W) - 1) // 2 * 2 + 1)            # reflect padding needs pad < side
    apply = _rand(n, x, generator) < p
    s = _rand(n, x, generator) * (sigma[1] - sigma[0]) + sigma[0]
    return torch.where(apply[:, None, None, None], blur(x, s, kernel_size), x)


def normalize(x, mean, std):
    x = _float(x)
    m = torch.tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def center_crop(x, size):
    H, W = x.shape[-2:]
    t, l = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    return x[..., t:t + size, l:l + size]


def sample_boxes(n, num_boxes, height, width, scale=(0.05, 0.6), ratio=(3 / 4, 4 / 3), generator=None,
                 device=None):
    """DSCL patch boxes (supervised.md §1.3 step 3): area fraction ~ U(scale), log-ratio uniform,
    w/h rounded, top-left uniform, 10 tries then centre fallback. Returns (n, num_boxes, 4) float
    (x1, y1, x2, y2) in pixel coordinates (x2 = x1 + w), inside the image."""
    b = rrc_params(n * num_boxes, height, width, scale, ratio, generator, device)
    top, left, h, w = b.unbind(1)
    return torch.stack([left, top, left + w, top + h], 1).view(n, num_boxes, 4)


def crop_boxes(x, boxes, size):
    """Crop every (x1, y1, x2, y2) box of every image and resize to size x size (bilinear grid_sample);
    output (n * num_boxes, 3, size, size), image-major (image 0's boxes first)."""
    n, k = boxes.shape[:2]
    b = boxes.reshape(n * k, 4).float()
    xi = _float(x).repeat_interleave(k, 0)
    tlhw = torch.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], 1)
    return resized_crop(xi, tlhw, size)


# Recipes ---------------------------------------------------------------------------------------

RECIPES = ("simclr_cifar", "mocov2_imagenet", "crop_flip_cifar", "crop_flip_imagenet",
           "dscl_query_cifar", "dscl_key_cifar", "dscl_patch_cifar", "dscl_query_color_cifar",
           "dscl_query", "dscl_key", "dscl_patch", "dscl_query_color",
           "hybrid_base", "hybrid_jitter", "test_cifar", "test_imagenet")


def augment(x, recipe: str, generator=None, image_size=None):
    """Apply a named recipe to a uint8/float batch on its device; returns normalised float32 (N,3,S,S).

    S = image_size (default: the input side). Recipes:
      simclr_cifar      RRC(S, (0.1,1)), flip, jitter(.4,.4,.4,.1) p.8, gray .2, ImageNet stats (ssl.md §1.4)
      mocov2_imagenet   RRC(S=224, (0.08,1)), flip, jitter p.8, gray .2, blur p.5, ImageNet stats (ssl.md §1.4)
      crop_flip_cifar   RandomCrop(S, pad S//8) + flip, LDAM CIFAR stats (D§1.3, D§5.1)
      crop_flip_imagenet  same with ImageNet stats; when the input is larger than S (list datasets):
                        RRC(S) + flip (D§5.1 ImageNet probe)
      dscl_query[_cifar]  RRC (0.08,1) at 224 / (0.2,1) at 32, flip, jitter p.8, gray .2, blur p.5 (ImageNet
                        only) -- supervised.md §1.3 / §1.4
      dscl_query_color[_cifar]  only the query's photometric part + normalise, for a batch that dscl.py
                        already cropped and flipped (patch boxes must live in the flipped view)
      dscl_key[_cifar]  RRC, jitter(.4,.4,.4,0) p1, flip, normalise
      dscl_patch[_cifar]  for patches already cut by crop_boxes: flip, jitter p.8, gray .2, blur p.5
                        (ImageNet only), normalise
      hybrid_base       RandomCrop(32, pad 4), flip, gray .2, LDAM CIFAR stats (supervised.md §2.3)
      hybrid_jitter     hybrid_base + jitter(.4,.4,.4,.1) p.8 before the grayscale
      test_cifar / test_imagenet  normalisation only (LDAM CIFAR / ImageNet stats), centre crop to S if larger
    DSCL CIFAR recipes use the LDAM CIFAR stats (D§7.2)."""
    g = generator
    S = image_size or x.shape[-1]
    jit = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    inet, cif = MEAN_STD["imagenet"], MEAN_STD["cifar"]
    if recipe == "simclr_cifar":
        y = random_hflip(random_resized_crop(x, S, (0.1, 1.0), generator=g), generator=g)
        y = random_grayscale(color_jitter(y, **jit, p=0.8, generator=g), 0.2, g)
        return normalize(y, *inet)
    if recipe == "mocov2_imagenet":
        y = random_hflip(random_resized_crop(x, image_size or 224, (0.08, 1.0), generator=g), generator=g)
        y = random_grayscale(color_jitter(y, **jit, p=0.8, generator=g), 0.2, g)
        return normalize(gaussian_blur(y, (0.1, 2.0), 0.5, generator=g), *inet)
    if recipe in ("crop_flip_cifar", "crop_flip_imagenet"):
        stats = cif if recipe == "crop_flip_cifar" else inet
        if x.shape[-1] > S:
            y = random_resized_crop(x, S, (0.08, 1.0), generator=g)
        else:
            y = random_crop(x, S, S // 8, g)
        return normalize(random_hflip(y, generator=g), *stats)
    if recipe in ("dscl_query", "dscl_query_cifar", "dscl_key", "dscl_key_cifar"):
        is_c = recipe.endswith("_cifar")
        y = random_resized_crop(x, S if is_c else (image_size or 224), (0.2, 1.0) if is_c else (0.08, 1.0),
                                generator=g)
        if recipe.startswith("dscl_key"):
            y = color_jitter(y, 0.4, 0.4, 0.4, 0.0, p=1.0, generator=g)
            return normalize(random_hflip(y, generator=g), *(cif if is_c else inet))
        return augment(random_hflip(y, generator=g), "dscl_query_color" + ("_cifar" if is_c else ""), g)
    if recipe in ("dscl_query_color", "dscl_query_color_cifar", "dscl_patch", "dscl_patch_cifar"):
        is_c = recipe.endswith("_cifar")
        y = random_hflip(x, generator=g) if recipe.startswith("dscl_patch") else _float(x)
        y = random_grayscale(color_jitter(y, **jit, p=0.8, generator=g), 0.2, g)
        if not is_c:
            y = gaussian_blur(y, (0.1, 2.0), 0.5, generator=g)
        return normalize(y, *(cif if is_c else inet))
    if recipe in ("hybrid_base", "hybrid_jitter"):
        y = random_hflip(random_crop(x, S, 4 if S == 32 else S // 8, g), generator=g)
        if recipe == "hybrid_jitter":
            y = color_jitter(y, **jit, p=0.8, generator=g)
        return normalize(random_grayscale(y, 0.2, g), *cif)
    if recipe in ("test_cifar", "test_imagenet"):
        y = center_crop(x, S) if x.shape[-1] > S else x
        return normalize(y, *(cif if recipe == "test_cifar" else inet))
    raise UserError(f"unknown augmentation recipe '{recipe}'; valid recipes: {', '.join(RECIPES)}")


# ------------------------------------------------------------------------------------------------
# Loaders (D§7.1, D§7.3)
# ------------------------------------------------------------------------------------------------

def _epoch_generator(device, seed, epoch):
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + 12_345) % (2 ** 63))
    return g


def balanced_indices(y: torch.Tensor, n: int, generator=None) -> torch.Tensor:
    """Class-balanced sampling with replacement (D§7.3): a class uniformly among the classes present, then
    an image of that class uniformly; returns n indices into y (on y's device)."""
    counts = torch.bincount(y)
    classes = torch.nonzero(counts).squeeze(1)
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    c = classes[torch.randint(len(classes), (n,), device=y.device, generator=generator)]
    u = torch.rand(n, device=y.device, generator=generator)
    pos = starts[c] + torch.minimum((u * counts[c]).long(), counts[c] - 1)
    return order[pos]


class Loader:
    """Batches of (x uint8 (B,3,H,W), y int64 (B,), idx int64 (B,)), all on `device`; idx indexes the split.

    Tensor-resident splits are copied to the device once and batches are cut with index_select (no host
    work per step). List datasets use a torch DataLoader whose workers decode with PIL + torchvision v2:
    train (shuffle=True): Resize(256) + CenterCrop(256) uint8 -- the GPU recipe then applies its
    RandomResizedCrop(224) to that (documented deviation from a per-image RRC on the full image);
    eval (shuffle=False): Resize(256) + CenterCrop(224) uint8. Pinned memory, non_blocking copies.
    The order is a function of (seed, epoch): set_epoch(e) picks it; without it each pass advances the epoch."""

    def __init__(self, split: Split, batch_size, device, shuffle=True, drop_last=True, sampler="random",
                 seed=0, workers=8, image_size=224):
        if sampler not in ("random", "balanced", "sequential"):
            raise UserError(f"unknown sampler '{sampler}'; use random, balanced or sequential")
        if split.x is None and split.files is None:
            raise UserError("the split has neither images nor files")
        self.split, self.batch_size, self.device = split, int(batch_size), torch.device(device)
        self.sampler = sampler if (shuffle or sampler == "balanced") else "sequential"
        self.drop_last, self.seed, self.epoch = drop_last, seed, 0
        self.workers, self.image_size, self.shuffle = workers, image_size, shuffle
        if split.x is not None:
            key = str(self.device)
            if key not in split._on_device:
                split._on_device[key] = (split.x.to(self.device, non_blocking=True),
                                         split.y.to(self.device, non_blocking=True))
            self.x, self.y = split._on_device[key]

    def __len__(self):
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def _order(self, epoch):
        n = len(self.split)
        if self.sampler == "sequential":
            return torch.arange(n, device=self.device)
        g = _epoch_generator(self.device, self.seed, epoch)
        if self.sampler == "random":
            return torch.randperm(n, device=self.device, generator=g)
        y = self.y if self.split.x is not None else self.split.y.to(self.device)
        return balanced_indices(y, n, g)

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        order = self._order(epoch)
        if self.split.x is None:
            yield from self._iter_files(order)
            return
        B = self.batch_size
        for b in range(len(self)):
            idx = order[b * B:(b + 1) * B]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx), idx

    def _iter_files(self, order):
        ds = _FileDataset(self.split.files, self.split.y, self.image_size, train=self.shuffle)
        dl = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, sampler=order.cpu().tolist(), num_workers=self.workers,
            drop_last=self.drop_last, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if self.workers > 0 else None)
        for x, y, idx in dl:
            yield (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))


class _FileDataset(torch.utils.data.Dataset):
    """Decodes one image per item with PIL and torchvision v2 (worker side) -> uint8 (3,S,S)."""

    def __init__(self, files, y, image_size=224, train=True):
        from torchvision.transforms import v2
        self.files, self.y = files, y
        short = int(round(image_size * 256 / 224))
        self.tf = v2.Compose([v2.PILToTensor(), v2.Resize(short, antialias=True),
                              v2.CenterCrop(short if train else image_size)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            img = self.tf(im.convert("RGB"))
        return img, self.y[i], i


def make_loader(split: Split, batch_size: int, device, *, shuffle=True, drop_last=True, sampler: str = "random",
                seed: int = 0, workers: int = 8, image_size: int = 224) -> Loader:
    """See Loader. sampler: "random" (device randperm), "balanced" (D§7.3, len(split) draws with
    replacement) or "sequential"; shuffle=False with "random" means sequential (evaluation)."""
    return Loader(split, batch_size, device, shuffle, drop_last, sampler, seed, workers, image_size)


def _load_cifar(*a, **k):
    raise UserError("CIFAR loading lands in the next commit of data.py; use --dataset synthetic-lt for now")


_load_folder = _load_tiny = _load_list_dataset = _load_cifar
