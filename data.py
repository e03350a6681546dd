"""Long-tailed datasets, batched on-device augmentation and loaders shared by the four methods.

`load_dataset` builds every `--dataset`, `augment` applies a named recipe with per-image random
parameters, `make_loader` serves device batches; CLI `python data.py --stats | --bench-augment`.
User documentation: docs/data.md (cited by section name); INFERRED marks a choice no paper or
official code fixes.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import UserError, epoch_seed, get_rank_world

DATASETS = ("cifar10-lt", "cifar100-lt", "folder", "synthetic-lt", "tiny-imagenet-lt",
            "imagenet-lt", "places-lt", "inat2018", "imagenet100-lt")

# (image side the networks see, classes) of each dataset, for work done without its files
# (--benchmark); a folder tree is taken to be CIFAR-like
NOMINAL = {"cifar10-lt": (32, 10), "cifar100-lt": (32, 100), "folder": (32, 10),
           "synthetic-lt": (32, 10), "tiny-imagenet-lt": (64, 200), "imagenet-lt": (224, 1000),
           "places-lt": (224, 365), "inat2018": (224, 8142), "imagenet100-lt": (224, 100)}


def nominal_shape(name: str) -> tuple[int, int, int]:
    """(image side the networks see, side of a stored training image, classes) of dataset `name`.
    Images of the list datasets reach the training step as 256-px squares (see Loader)."""
    size, classes = NOMINAL[name]
    return size, 256 if size == 224 else size, classes


MEAN_STD = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            # LDAM-DRW (Cao et al. 2019)
            "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))}

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")

# SDCLR (Jiang et al. 2021) official CIFAR-10 splits 1..5: class at each rank, head -> tail
SDCLR_C10_ORDERS = {1: (6, 8, 4, 1, 7, 0, 3, 2, 5, 9), 2: (3, 9, 7, 4, 0, 1, 2, 6, 8, 5),
                    3: (0, 4, 2, 8, 5, 6, 7, 1, 9, 3), 4: (4, 7, 0, 6, 1, 9, 8, 3, 2, 5),
                    5: (2, 4, 8, 1, 0, 3, 9, 7, 6, 5)}


# --- Dataset containers ---------------------------------------------------------------------------
@dataclass
class Split:
    """One set of images: uint8 tensor (tensor-resident datasets) or absolute file
    paths (list datasets)."""
    y: torch.Tensor                         # int64 (N,)
    x: torch.Tensor | None = None           # uint8 (N, 3, H, W) on CPU
    files: list[str] | None = None          # absolute image paths
    # device -> (x, y) copies
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self):
        return int(self.y.shape[0])


@dataclass
class LTDataset:
    """A long-tailed train set with its evaluation sets (docs/data.md, Splits)."""
    name: str
    num_classes: int
    class_names: list[str]
    image_size: int
    train: Split
    test: Split
    val: Split | None
    probe: Split | None
    fewshot: Split | None
    class_counts: list[int]                 # train images per class, label order
    class_rank: list[int]                   # 0 = head
    lt_convention: str                      # ldam | sdclr | sdclr-npy | list | synthetic
    image_source: str                       # canonical | folder | jpeg-copy | synthetic
    imb_ratio: float | None
    split: int | None
    tensor_resident: bool
    # e.g. a list file's hash differs from the published one
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict:
        """JSON-able description stored in every run's config.json and results.json."""
        def n(s):
            return len(s) if s is not None else 0

        return {"name": self.name, "lt_convention": self.lt_convention, "imb_ratio": self.imb_ratio,
                "split": self.split, "n_train": len(self.train),
                "class_counts": list(self.class_counts), "class_rank": list(self.class_rank),
                "n_test": len(self.test), "n_val": n(self.val), "n_probe": n(self.probe),
                "n_fewshot": n(self.fewshot), "class_names": list(self.class_names),
                "image_source": self.image_source, "image_size": self.image_size,
                "num_classes": self.num_classes, "notes": list(self.notes)}


def describe(ds: LTDataset) -> str:
    """Multi-line summary: protocol, per-class train counts (label order) and the sizes
    of every split."""
    label = ds.name + (" (JPEG copy)" if ds.image_source == "jpeg-copy" else "")
    lines = [f"dataset {label}: convention {ds.lt_convention}, imb_ratio {ds.imb_ratio}, "
             f"split {ds.split}, {ds.num_classes} classes, {ds.image_size}px, "
             f"source {ds.image_source}"]
    width = max(len(n) for n in ds.class_names) if ds.class_names else 5
    if ds.num_classes <= 20:
        lines += [f"  class {c:3d} {name:<{width}} {n:6d}  (rank {ds.class_rank[c]})"
                  for c, (name, n) in enumerate(zip(ds.class_names, ds.class_counts))]
    else:
        order = sorted(range(ds.num_classes), key=lambda c: ds.class_rank[c])
        lines.append("  counts by rank (head -> tail): "
                     + ", ".join(str(ds.class_counts[c]) for c in order))
    cc = ds.class_counts
    info = ds.info()
    lines.append(f"  train total {sum(cc):,} (max {max(cc)}, min {min(cc)}, "
                 f"ratio {max(cc) / max(min(cc), 1):.1f})")
    lines += [f"  {nm:8s} {info['n_' + nm]:,}" for nm in ("test", "val", "probe", "fewshot")]
    lines += [f"  note: {n}" for n in ds.notes]
    return "\n".join(lines)


def lt_counts(n_max: int, num_classes: int, imb_ratio: float) -> list[int]:
    """Exponential profile of LDAM-DRW (Cao et al. 2019): n_r = int(n_max * (1/rho) ** (r / (C -
    1))) for rank r, a float64 product truncated by int() (never rounded: 5000 * 0.01 gives 50)."""
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imb_ratio) ** (r / (num_classes - 1.0))) for r in range(num_classes)]


def _rank_of_order(order) -> list[int]:
    """order[r] = class at rank r -> rank[c] (the inverse permutation)."""
    return [int(r) for r in np.argsort(order)]


def _rank_from_counts(counts) -> list[int]:
    """Rank 0 = head: descending count, ties by ascending class index."""
    return _rank_of_order(sorted(range(len(counts)), key=lambda c: (-counts[c], c)))


def _split_of(x, y, idx) -> Split:
    idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return Split(y=y[idx].clone(), x=x[idx])


# --- Long-tailed index generators (numpy, labels in canonical order; docs/data.md, Splits) --------
def ldam_indices(targets: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """LDAM-DRW (Cao et al. 2019) `gen_imbalanced_data`: for c in label order, shuffle
    np.where(targets == c) with one RandomState(seed) (as np.random.seed(0) there) and keep the
    first counts[c], class by class."""
    # permutation(a) is shuffle() on a copy of a
    rs = np.random.RandomState(seed)
    return np.concatenate([rs.permutation(np.where(targets == c)[0])[:n]
                           for c, n in enumerate(counts)]).astype(np.int64)


def sdclr_indices(targets: np.ndarray, num_classes: int, imb_ratio: float, split: int,
                  seed: int = 0, head: int | None = None) -> dict:
    """The SDCLR (Jiang et al. 2021) split construction, regenerated. Returns int64 index arrays
    `val`, `probe`, `train` (D_i), `fewshot` (S_b), `balanced` (D_b), plus `order` (class at
    each rank) and `counts` (label order). Set sizes and counts equal SDCLR's files; image
    membership is INFERRED."""
    if split not in (1, 2, 3, 4, 5):
        raise UserError(f"--split must be 1..5 for the sdclr protocol (got {split})")
    per = int(np.bincount(targets, minlength=num_classes).min())
    v = per // 10                                                          # val: 500 / 50 per class
    rs = np.random.RandomState(seed)
    perms = [rs.permutation(np.where(targets == c)[0]) for c in range(num_classes)]
    val = [p[:v] for p in perms]
    pools = [p[v:] for p in perms]
    n_max = per - v                                                        # 4,500 / 450
    # SDCLR's CIFAR-100 probe keeps 400
    k_probe = 400 if num_classes == 100 and n_max == 450 else n_max
    if head is not None:  # --n-max: a smaller head class (the probe pool stays whole)
        n_max = min(n_max, head)
    # class at each rank (else INFERRED)
    order = (list(SDCLR_C10_ORDERS[split]) if num_classes == 10
             else [int(c) for c in np.random.RandomState(seed + split).permutation(num_classes)])
    prof = lt_counts(n_max, num_classes, imb_ratio)
    counts = [prof[r] for r in _rank_of_order(order)]                     # label order
    m = prof[-1]                                                           # 45 / 4
    n_bal = sum(prof) // num_classes                                       # 1,116 / 97
    rs2 = np.random.RandomState(seed + 10 * split)
    # per-split shuffle of each pool
    sh = [rs2.permutation(p) for p in pools]

    def cat(a):
        return np.concatenate(a).astype(np.int64)

    return {"val": cat(val), "probe": cat([p[:k_probe] for p in pools]), "order": order,
            "counts": counts, "train": cat([s[:n] for s, n in zip(sh, counts)]),
            "fewshot": cat([s[:m] for s in sh]), "balanced": cat([s[:n_bal] for s in sh])}


# --- synthetic-lt: class = texture (oriented grating / checker / rings); colour and phase random --
# The textures of synthetic-lt: per kind, the angle that leaves its pattern unchanged (a grating
# and an elongated ring repeat after half a turn, a checkerboard after a quarter turn)
SYNTHETIC_KINDS = {"grating": math.pi, "checker": math.pi / 2, "rings": math.pi}
SYNTHETIC_FREQUENCIES = (2.0, 3.5, 5.0, 7.0)


def synthetic_classes(num_classes: int) -> list[tuple[str, float, float]]:
    """(kind, orientation, frequency) of each synthetic-lt class: the kinds take turns; within a
    kind, 8 orientations spread over its period (by steps of 3/8 of it, so that neighbouring classes
    differ most), then the next frequency. No two classes have the same texture: 96 at most."""
    table = []
    for c in range(num_classes):
        kind = list(SYNTHETIC_KINDS)[c % 3]
        j = c // 3
        orientation = (j * 3) % 8 * SYNTHETIC_KINDS[kind] / 8
        table.append((kind, orientation, SYNTHETIC_FREQUENCIES[j // 8]))
    return table


def synthetic_images(labels: torch.Tensor, num_classes: int, generator: torch.Generator,
                     size: int = 32) -> torch.Tensor:
    """uint8 (N,3,size,size) images of the given labels: the texture of the class
    (synthetic_classes: a grating, a checkerboard or rings elongated 2:1, at the class's
    orientation and frequency); colours, phase, position jitter and pixel noise are random per
    image, so colour carries no class information."""
    if num_classes > 3 * 8 * len(SYNTHETIC_FREQUENCIES):
        most = 3 * 8 * len(SYNTHETIC_FREQUENCIES)
        raise UserError(f"synthetic-lt supports at most {most} classes (got {num_classes})")
    kinds = list(SYNTHETIC_KINDS)
    table = torch.tensor([(kinds.index(k), a, f) for k, a, f in synthetic_classes(num_classes)],
                         dtype=torch.float32)
    out = torch.empty(len(labels), 3, size, size, dtype=torch.uint8)
    coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    yy, xx = torch.meshgrid(coord, coord, indexing="ij")
    for s in range(0, len(labels), 4096):
        # each (n, 1, 1)
        kind, angle, freq = table[labels[s:s + 4096]][:, :, None, None].unbind(1)
        n = len(kind)
        phase = (torch.rand(n, 1, 1, generator=generator) - 0.5) * (math.pi / 2)
        # small position jitter
        shift = (torch.rand(n, 2, 1, 1, generator=generator) - 0.5) * 0.15
        X = xx - shift[:, 0]
        Y = yy - shift[:, 1]
        # coordinates along and across the class's orientation
        along = X * angle.cos() + Y * angle.sin()
        across = -X * angle.sin() + Y * angle.cos()
        w = 2 * math.pi * freq
        grating = 0.5 + 0.5 * torch.sin(along * w + phase)
        checker = 0.5 + 0.5 * torch.sin(along * w + phase) * torch.sin(across * w + phase)
        rings = 0.5 + 0.5 * torch.sin(w * 1.5 * (along**2 + (2 * across) ** 2).sqrt() + phase)
        pattern = torch.where(kind == 0, grating, torch.where(kind == 1, checker, rings))
        bg = torch.rand(n, 3, 1, 1, generator=generator) * 0.5
        fg = 0.5 + torch.rand(n, 3, 1, 1, generator=generator) * 0.5
        noise = 0.06 * torch.randn(n, 3, size, size, generator=generator)
        img = bg + (fg - bg) * pattern[:, None] + noise
        out[s:s + n] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def _load_synthetic(num_classes, imb_ratio, seed, n_max, n_test) -> LTDataset:
    g = torch.Generator().manual_seed(seed)
    rho = 1.0 if imb_ratio is None else imb_ratio
    counts = lt_counts(n_max, num_classes, rho)
    if num_classes > 1:
        check_buildable("synthetic-lt", counts, rho, n_max)

    def balanced(n):
        return torch.arange(num_classes).repeat_interleave(n)

    def images(y):
        return Split(y=y, x=synthetic_images(y, num_classes, g))

    # balanced probe pool; the LT set is a subset of it
    pool = images(balanced(n_max))
    lt = np.concatenate([np.arange(c * n_max, c * n_max + n) for c, n in enumerate(counts)])
    few = np.concatenate([np.arange(c * n_max, c * n_max + counts[-1]) for c in range(num_classes)])
    test = images(balanced(n_test))
    val = images(balanced(n_test))
    return LTDataset(
        name="synthetic-lt", num_classes=num_classes,
        class_names=[f"texture{c}" for c in range(num_classes)], image_size=32,
        train=_split_of(pool.x, pool.y, lt), test=test, val=val, probe=pool,
        fewshot=_split_of(pool.x, pool.y, few), class_counts=counts,
        class_rank=list(range(num_classes)), lt_convention="synthetic", image_source="synthetic",
        imb_ratio=rho, split=None, tensor_resident=True)


def load_dataset(name, data_dir="./data", imb_ratio=100.0, protocol="ldam", split=1,
                 split_file=None, seed=0, num_classes=10, download=True, *, n_max=None,
                 synthetic_n_test=100, sdclr_split_dir=None) -> LTDataset:
    """Build dataset `name` (one of DATASETS); bad input raises common.UserError with a one-line
    message. imb_ratio: rho = n_max / n_min (None: the tree or lists as they are). n_max: images of
    the head class of a generated long tail (None: all the class has; synthetic-lt: 500). protocol:
    "ldam" or "sdclr" for CIFAR and folder trees (docs/data.md, CIFAR-LT conventions). split: SDCLR
    split 1..5. split_file, sdclr_split_dir: docs/data.md, SDCLR index files. seed: data seed (0
    reproduces LDAM-DRW). num_classes, synthetic_n_test: synthetic-lt only."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; valid names: {', '.join(DATASETS)}")
    if protocol not in ("ldam", "sdclr"):
        raise UserError(f"unknown protocol '{protocol}'; use ldam or sdclr")
    if imb_ratio is not None and imb_ratio < 1:
        raise UserError(f"--imb-ratio must be >= 1 (got {imb_ratio})")
    generated = name in ("synthetic-lt", "cifar10-lt", "cifar100-lt", "tiny-imagenet-lt") or (
        name == "folder" and imb_ratio is not None)
    if n_max is not None and not generated:
        raise UserError(f"--n-max {n_max} sizes a generated long tail, and {name} is used as it "
                        "is; give --imb-ratio too (a folder tree), or leave --n-max unset")
    if name == "synthetic-lt":
        ds = _load_synthetic(num_classes, imb_ratio, seed, n_max or 500, synthetic_n_test)
    elif name in ("cifar10-lt", "cifar100-lt"):
        ds = _build_lt(name, *read_cifar(name, data_dir, download), imb_ratio, protocol, split,
                       seed, "canonical", split_file, sdclr_split_dir, n_max)
    elif name == "folder":
        ds = _load_folder(data_dir, imb_ratio, protocol, split, split_file, seed, n_max)
    elif name == "tiny-imagenet-lt":
        ds = _load_tiny(data_dir, imb_ratio, seed, n_max)
    else:
        ds = _load_list_dataset(name, data_dir)
    require_two_classes(name, ds.num_classes)
    return ds


def require_two_classes(name: str, num_classes: int) -> None:
    """A long tail needs a head and a tail: one class is refused in one line."""
    if num_classes < 2:
        raise UserError(f"{name}: the data has {num_classes} class; a long-tailed dataset needs at "
                        "least two classes")


def check_buildable(name: str, counts: list[int], imb_ratio: float, n_max: int) -> None:
    """The long tail asked for must exist in the data: every class keeps at least one image, and
    the ratio of the counts is within 10 % of --imb-ratio (a small class of the source truncates
    the tail's count)."""
    if buildable(counts, imb_ratio):
        return
    built = counts[0] / counts[-1] if counts[-1] > 0 else math.inf
    fits = [r for r in range(int(imb_ratio), 0, -1)
            if buildable(lt_counts(n_max, len(counts), r), r)]
    raise UserError(f"{name}: --imb-ratio {imb_ratio:g} cannot be built from these images: the "
                    f"head class can have at most {n_max} images, so the tail would have "
                    f"{counts[-1]} (ratio {built:.1f}); use a ratio these images give, such as "
                    f"--imb-ratio {fits[0] if fits else 1}, or a source with more images per class")


def buildable(counts: list[int], imb_ratio: float) -> bool:
    built = counts[0] / counts[-1] if counts[-1] > 0 else math.inf
    return abs(built - imb_ratio) <= 0.1 * imb_ratio


# --- Augmentation (docs/data.md, Augmentation) ----------------------------------------------------
# Inputs uint8 (N,3,H,W) or float in [0,1]; outputs float32. Random parameters are drawn per image
# with `generator` (a torch.Generator on the batch's device) when given.
def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _rand(n, x, generator, *shape):
    return torch.rand(n, *shape, device=x.device, generator=generator)


@functools.lru_cache(maxsize=None)
def _const(values: tuple, device) -> torch.Tensor:
    """A small constant (mean / std, HSV offsets, a crop box) built once per device: no
    copy per call."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def rrc_params(n, height, width, scale, ratio, generator=None, device=None):
    """torchvision RandomResizedCrop.get_params, vectorised: 10 (area, log-ratio) draws per
    image, first valid one, else the centre-crop fallback. Returns float (n,4) boxes (top, left,
    h, w), integer valued."""
    s = torch.rand(n, 10, device=device, generator=generator) * (scale[1] - scale[0]) + scale[0]
    lr = (torch.rand(n, 10, device=device, generator=generator)
          * (math.log(ratio[1]) - math.log(ratio[0])) + math.log(ratio[0]))
    ar = torch.exp(lr)
    target = height * width * s
    w, h = torch.round(torch.sqrt(target * ar)), torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.int(), dim=1, keepdim=True)                 # first valid try
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u = torch.rand(n, 2, device=device, generator=generator)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    # centre-crop fallback
    in_ratio = width / height
    lo = min(ratio)
    hi = max(ratio)
    fw = width if in_ratio <= hi else int(round(height * hi))
    fh = height if in_ratio >= lo else int(round(width / lo))
    fb = _const(((height - fh) // 2, (width - fw) // 2, fh, fw), device)
    box = torch.stack([top, left, h, w], 1)
    return torch.where(ok.any(1)[:, None], box, fb.expand(n, 4))


def resized_crop(x, boxes, size):
    """Crop boxes (top, left, h, w) (float, per image), resize to size x size: torchvision's
    resized_crop (antialias=False) per crop, as grid_sample (bilinear, align_corners=False) at
    points inside the crop."""
    x = _float(x)
    H, W = x.shape[-2:]
    top, left, h, w = [b[:, None] for b in boxes.float().unbind(1)]
    # output pixel centres
    j = torch.arange(size, device=x.device, dtype=torch.float32)[None] + 0.5
    # source pixel inside the crop
    sx = torch.minimum((j * (w / size) - 0.5).clamp(min=0), w - 1) + left
    sy = torch.minimum((j * (h / size) - 0.5).clamp(min=0), h - 1) + top
    # align_corners=False coordinates
    gx, gy = (2 * sx + 1) / W - 1, (2 * sy + 1) / H - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """RandomResizedCrop with per-image parameters; bilinear instead of bicubic (INFERRED)."""
    n, _, H, W = x.shape
    return resized_crop(x, rrc_params(n, H, W, scale, ratio, generator, x.device), size)


def crop(x, top, left, size):
    """Per-image integer crop: top/left int64 (N,) tensors, output (N,3,size,size),
    input dtype kept."""
    ar = torch.arange(size, device=x.device)
    rows = (top[:, None] + ar)[:, :, None]                                  # (N,S,1)
    cols = (left[:, None] + ar)[:, None, :]                                 # (N,1,S)
    nidx = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[nidx, rows, cols].permute(0, 3, 1, 2)


def random_crop(x, size, padding=0, generator=None):
    """RandomCrop(size, padding): zero padding, per-image integer offsets, gather."""
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
    """RGB -> (h, s, v) in fp32, torchvision's conventions (ties: R before G before B; grey: h =
    s = 0)."""
    # first maximal channel on ties, like torchvision
    maxc, arg = x.max(1)
    minc = x.amin(1)
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    num = x.roll(-1, 1) - x.roll(1, 1)                     # g-b, b-r, r-g
    denom = torch.where(cr == 0, torch.ones_like(cr), cr)
    h = num.gather(1, arg.unsqueeze(1)).squeeze(1).div_(denom)
    h = h.add_(2.0 * arg).div_(6.0).add_(1.0).fmod_(1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    """Closed form of the sector table: channel_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n +
    6h) mod 6 for n = 5, 3, 1 (R, G, B); equals torchvision's gather-based version without
    (3,N,H,W) index tensors."""
    n = _const((5.0, 3.0, 1.0), h.device).view(1, 3, 1, 1)
    k = torch.remainder(n + (h * 6).unsqueeze(1), 6.0)
    a = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (v.unsqueeze(1) - (v * s).unsqueeze(1) * a).clamp_(0.0, 1.0)


def adjust_hue(x, f):
    """Shift hue by f (per image, in [-0.5, 0.5]) through RGB -> HSV -> RGB in fp32."""
    h, s, v = _rgb_to_hsv(x)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(h, s, v)


def color_jitter(x, brightness, contrast, saturation, hue, p=1.0, generator=None):
    """ColorJitter(b, c, s, h) with probability p per image and per-image factors, in the fixed
    order brightness -> contrast -> saturation -> hue (INFERRED; torchvision's is random)."""
    x = _float(x)
    n = x.shape[0]
    apply = _rand(n, x, generator) < p
    ranges = ([(max(0.0, 1.0 - a), 1.0 + a) for a in (brightness, contrast, saturation)]
              + [(-hue, hue)])
    f = [_rand(n, x, generator) * (hi - lo) + lo for lo, hi in ranges]
    y = x
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for amount, op, fac in zip((brightness, contrast, saturation, hue), ops, f):
        if amount:
            y = op(y, fac)
    return torch.where(apply[:, None, None, None], y, x)


def random_grayscale(x, p=0.2, generator=None):
    """RandomGrayscale(p): luminance replicated to 3 channels, per-image coin."""
    x = _float(x)
    mask = _rand(x.shape[0], x, generator) < p
    return torch.where(mask[:, None, None, None], rgb_to_gray(x).expand_as(x), x)


def blur(x, sigma, kernel_size):
    """Separable Gaussian blur with per-image sigma (N,), reflect
    padding (torchvision gaussian_blur)."""
    x = _float(x)
    n, c, H, W = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma.float().view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)               # (N*C,K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, H, W)


def blur_kernel_size(side: int) -> int:
    """gaussian_blur's default kernel: the odd number near 10 % of the image side (INFERRED; 23 at
    224 px, 3 at 32 px)."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def gaussian_blur(x, sigma=(0.1, 2.0), p=0.5, kernel_size=None, generator=None):
    """GaussianBlur with probability p and sigma ~ U(sigma) per image; kernel size by default
    blur_kernel_size."""
    x = _float(x)
    n, _, H, W = x.shape
    if kernel_size is None:
        kernel_size = blur_kernel_size(min(H, W))
    # reflect padding needs pad < side
    kernel_size = min(kernel_size, (min(H, W) - 1) // 2 * 2 + 1)
    apply = _rand(n, x, generator) < p
    s = _rand(n, x, generator) * (sigma[1] - sigma[0]) + sigma[0]
    return torch.where(apply[:, None, None, None], blur(x, s, kernel_size), x)


def normalize(x, mean, std):
    m, s = (_const(tuple(v), x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (_float(x) - m) / s


def sample_boxes(n, num_boxes, height, width, scale=(0.05, 0.6), ratio=(3 / 4, 4 / 3),
                 generator=None, device=None):
    """DSCL (Xuan & Zhang 2024) patch boxes drawn as rrc_params (area ~ U(scale), log-ratio uniform,
    10 tries, centre fallback): (n, num_boxes, 4) float (x1, y1, x2, y2) pixel coordinates in the
    image, x2 = x1 + w."""
    boxes = rrc_params(n * num_boxes, height, width, scale, ratio, generator, device)
    top, left, h, w = boxes.unbind(1)
    return torch.stack([left, top, left + w, top + h], 1).view(n, num_boxes, 4)


def crop_boxes(x, boxes, size):
    """Crop every (x1, y1, x2, y2) box of every image and resize to size x size (bilinear
    grid_sample); output (n * num_boxes, 3, size, size), image-major (image 0's boxes first)."""
    n, k = boxes.shape[:2]
    b = boxes.reshape(n * k, 4).float()
    xi = _float(x).repeat_interleave(k, 0)
    tlhw = torch.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], 1)
    return resized_crop(xi, tlhw, size)


RECIPES = ("simclr_cifar", "mocov2_imagenet", "crop_flip_cifar", "crop_flip_imagenet",
           "dscl_query_color", "dscl_query_color_cifar", "dscl_patch", "dscl_patch_cifar",
           "hybrid_base", "hybrid_jitter", "test_cifar", "test_imagenet")


def augment(x, recipe: str, generator=None, image_size=None, channels_last: bool = False):
    """Apply a named recipe (one of RECIPES) to a uint8/float batch on its device; returns
    normalised float32 (N,3,S,S), S = image_size (default: the input side; 224 for mocov2_imagenet),
    in the channels_last memory format if asked. Steps and sources of each recipe: docs/data.md,
    Augmentation recipes; "CIFAR stats" are LDAM-DRW's CIFAR mean/std."""
    return memory_format(apply_recipe(x, recipe, generator, image_size), channels_last)


def memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x in the channels_last memory format (the layout convolutions on a GPU prefer) if asked."""
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def apply_recipe(x, recipe: str, generator=None, image_size=None):
    """The recipes of `augment`, in the default memory format."""
    g = generator
    S = image_size or x.shape[-1]
    jit = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    inet = MEAN_STD["imagenet"]
    cif = MEAN_STD["cifar"]
    if recipe in ("simclr_cifar", "mocov2_imagenet"):
        moco = recipe == "mocov2_imagenet"
        size, scale = (image_size or 224, (0.08, 1.0)) if moco else (S, (0.1, 1.0))
        y = random_resized_crop(x, size, scale, generator=g)
        y = color_jitter(random_hflip(y, generator=g), **jit, p=0.8, generator=g)
        y = random_grayscale(y, 0.2, g)
        return normalize(gaussian_blur(y, (0.1, 2.0), 0.5, generator=g) if moco else y, *inet)
    if recipe in ("crop_flip_cifar", "crop_flip_imagenet"):
        # larger input: RandomResizedCrop(S) instead of the crop
        big = x.shape[-1] > S
        if big:
            y = random_resized_crop(x, S, (0.08, 1.0), generator=g)
        else:
            y = random_crop(x, S, S // 8, g)
        stats = cif if recipe == "crop_flip_cifar" else inet
        return normalize(random_hflip(y, generator=g), *stats)
    if recipe in ("dscl_query_color", "dscl_query_color_cifar", "dscl_patch", "dscl_patch_cifar"):
        is_c = recipe.endswith("_cifar")
        y = random_hflip(x, generator=g) if recipe.startswith("dscl_patch") else _float(x)
        y = random_grayscale(color_jitter(y, **jit, p=0.8, generator=g), 0.2, g)
        y = y if is_c else gaussian_blur(y, (0.1, 2.0), 0.5, generator=g)
        return normalize(y, *(cif if is_c else inet))
    if recipe in ("hybrid_base", "hybrid_jitter"):
        y = random_hflip(random_crop(x, S, 4 if S == 32 else S // 8, g), generator=g)
        if recipe == "hybrid_jitter":
            y = color_jitter(y, **jit, p=0.8, generator=g)
        return normalize(random_grayscale(y, 0.2, g), *cif)
    if recipe in ("test_cifar", "test_imagenet"):
        # centre crop
        top, left = int(round((x.shape[-2] - S) / 2.0)), int(round((x.shape[-1] - S) / 2.0))
        y = x[..., top:top + S, left:left + S] if x.shape[-1] > S else x
        return normalize(y, *(cif if recipe == "test_cifar" else inet))
    raise UserError(f"unknown augmentation recipe '{recipe}'; valid recipes: {', '.join(RECIPES)}")


# --- Loaders and the class-balanced sampler (docs/data.md, Loaders and samplers) ------------------
def _epoch_generator(device, seed, epoch, stream=0):
    s = epoch_seed(seed, epoch, stream + 1, False) % (2 ** 63)
    return torch.Generator(device=device).manual_seed(s)


def balanced_indices(y: torch.Tensor, n: int, generator=None) -> torch.Tensor:
    """Class-balanced sampling with replacement (Kang et al. 2020): a class uniformly among
    the classes present, then an image of that class uniformly; returns n indices into y
    (on y's device)."""
    counts = torch.bincount(y)
    classes = torch.nonzero(counts).squeeze(1)
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    c = classes[torch.randint(len(classes), (n,), device=y.device, generator=generator)]
    u = torch.rand(n, device=y.device, generator=generator)
    pos = starts[c] + torch.minimum((u * counts[c]).long(), counts[c] - 1)
    return order[pos]


class Loader:
    """Batches of (x uint8 (B,3,H,W), y int64 (B,), idx int64 (B,)), all on `device`; idx indexes
    the split.

    Tensor-resident splits are copied to the device once; batches are cut with index_select. List
    datasets use DataLoader workers that decode to uint8 Resize(256) + CenterCrop(256) for training
    (the recipe then takes its RandomResizedCrop(224) from that square; INFERRED) or
    CenterCrop(224) for evaluation."""

    def __init__(self, split: Split, batch_size, device, shuffle=True, drop_last=True,
                 sampler="random", seed=0, workers=8, image_size=224, shard=False):
        if sampler not in ("random", "balanced", "sequential"):
            raise UserError(f"unknown sampler '{sampler}'; use random, balanced or sequential")
        if split.x is None and split.files is None:
            raise UserError("the split has neither images nor files")
        self.split = split
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.sampler = sampler if (shuffle or sampler == "balanced") else "sequential"
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.stream = 0
        self.workers = min(workers, os.cpu_count() or 1)
        self.image_size = image_size
        self.shuffle = shuffle
        self.rank, self.world = get_rank_world() if shard else (0, 1)
        if self.world > 1 and (self.batch_size % self.world or not drop_last):
            raise UserError(f"--batch-size {self.batch_size} is the global batch: under torchrun "
                            f"it must be a multiple of the {self.world} processes")
        if split.x is not None:
            key = str(self.device)
            if key not in split._on_device:
                split._on_device[key] = (split.x.to(self.device, non_blocking=True),
                                         split.y.to(self.device, non_blocking=True))
            self.x, self.y = split._on_device[key]

    def __len__(self):
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, stream: int = 0):
        """The order of the next pass: a function of (seed, epoch, stream); stream > 0 gives more
        batches within one epoch when a second loader runs out first."""
        self.epoch = int(epoch)
        self.stream = int(stream)

    def _order(self, epoch):
        n = len(self.split)
        if self.sampler == "sequential":
            return torch.arange(n, device=self.device)
        g = _epoch_generator(self.device, self.seed, epoch, self.stream)
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
        for idx in self._mine(order).split(self.batch_size // self.world):
            yield self.x.index_select(0, idx), self.y.index_select(0, idx), idx

    def _mine(self, order):
        """This process's part of every global batch: the r-th of `world` equal slices, so that
        gathering the processes' batches in rank order gives back the single-process batch
        (disjoint; together the epoch)."""
        if self.world == 1:
            return order[:len(self) * self.batch_size]
        part = self.batch_size // self.world
        batches = order[:len(self) * self.batch_size].view(len(self), self.world, part)
        return batches[:, self.rank].reshape(-1)

    def _iter_files(self, order):
        ds = _FileDataset(self.split.files, self.split.y, self.image_size, train=self.shuffle)
        dl = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size // self.world, sampler=self._mine(order).tolist(),
            num_workers=self.workers,
            drop_last=self.drop_last, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=4 if self.workers > 0 else None)
        for batch in dl:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)


class _FileDataset(torch.utils.data.Dataset):
    """Decodes one image per item with PIL and torchvision v2 (worker side) -> uint8 (3,S,S)."""

    def __init__(self, files, y, image_size=224, train=True):
        from torchvision.transforms import v2
        self.files = files
        self.y = y
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


def make_loader(split: Split, batch_size: int, device, *, shuffle=True, drop_last=True,
                sampler="random", seed: int = 0, workers: int = 8, image_size: int = 224,
                shard: bool = False) -> Loader:
    """See Loader. sampler: "random" (device randperm), "balanced" (len(split) draws with
    replacement, see balanced_indices) or "sequential"; shuffle=False with "random" means sequential
    (evaluation). shard=True (training loops): under torchrun each process takes its part of every
    global batch of `batch_size`; evaluation loaders are not sharded (every process evaluates the
    same, process 0 writes)."""
    return Loader(split, batch_size, device, shuffle, drop_last, sampler, seed, workers, image_size,
                  shard)


# --- LTDataset from canonical uint8 arrays (CIFAR pickles, small folder trees, Tiny-ImageNet) -----
def _sdclr_file_sets(t_tr, C, imb_ratio, split, split_file, split_dir):
    """SDCLR's index files by their standard names, under split_dir or split_file's grandparent
    (split_file is D_i; docs/data.md, SDCLR index files); D_i must follow the rho profile, miss val
    and contain S_b."""
    pre = "cifar100_" if C == 100 else ""
    if split_dir is not None and not os.path.isdir(split_dir):
        raise UserError(f"--sdclr-split-dir {split_dir} does not exist; point it at SDCLR's split/ "
                        f"folder (github.com/VITA-Group/SDCLR)")
    root = split_dir or os.path.dirname(os.path.dirname(os.path.abspath(split_file)))
    walk = sorted(os.walk(root))

    def find(nm):
        return next((os.path.join(d, nm) for d, _, fs in walk if nm in fs), None)

    files = {"train": split_file or find(f"{pre}split{split}_D_i.npy"),
             "fewshot": find(f"{pre}split{split}_S_b.npy"), "val": find(f"{pre}valIdxList.npy"),
             "probe": find(f"{pre}trainIdxList.npy")}
    if files["train"] is None:
        raise UserError(f"no {pre}split{split}_D_i.npy under {root}; pass --split-file PATH or an "
                        f"SDCLR split/ folder with --sdclr-split-dir")
    sets = dict.fromkeys(files)
    n = len(t_tr)
    for k, path in [(k, p) for k, p in files.items() if p is not None]:
        if not os.path.isfile(path):
            raise UserError(f"split file {path} not found; give an SDCLR index file such as "
                            f"split1_D_i.npy")
        try:
            idx = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise UserError(f"split file {path} is not a readable .npy index array "
                            f"({type(e).__name__}: {e})")
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise UserError(f"{path}: {k} must be a 1-D integer index array (got shape "
                            f"{idx.shape}, dtype {idx.dtype}); pass an SDCLR split file such as "
                            f"split1_D_i.npy")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise UserError(f"{path}: {k} index {bad} is out of range [0, {n}); the file must "
                            f"index the canonical {n}-image train array")
        if np.unique(idx).size != idx.size:
            raise UserError(f"{path}: {k} contains {idx.size - np.unique(idx).size} duplicate "
                            f"indices; use an unmodified SDCLR split file")
        sets[k] = idx.astype(np.int64)
    tr = sets["train"]
    counts = np.bincount(t_tr[tr], minlength=C).tolist()
    per = int(np.bincount(t_tr, minlength=C).min())
    prof = lt_counts(per - per // 10, C, imb_ratio)
    if sorted(counts, reverse=True) != prof:
        raise UserError(f"{files['train']}: per-class counts {sorted(counts, reverse=True)} differ "
                        f"from the rho={imb_ratio:g} profile {prof}; check --imb-ratio or the file")
    if sets["val"] is not None and np.intersect1d(tr, sets["val"]).size:
        raise UserError(f"{files['train']} overlaps the validation list {files['val']}; use "
                        f"matching SDCLR files")
    if sets["fewshot"] is not None and np.setdiff1d(sets["fewshot"], tr).size:
        raise UserError(f"{files['fewshot']} is not a subset of {files['train']}; use the S_b file "
                        f"of the same split")
    return {**sets, "counts": counts}


def _build_lt(name, x_tr, t_tr, x_te, y_te, classes, imb_ratio, protocol, split, seed, image_source,
              split_file=None, split_dir=None, n_max=None) -> LTDataset:
    """Apply the ldam / sdclr generators or SDCLR's index files to canonical arrays and attach the
    validation, probe and few-shot sets (docs/data.md, CIFAR-LT conventions and Splits)."""
    C = len(classes)
    require_two_classes(name, C)
    t_tr = np.asarray(t_tr, dtype=np.int64)
    y_tr = torch.from_numpy(t_tr)

    def sub(idx):
        return _split_of(x_tr, y_tr, idx) if idx is not None else None

    base = dict(name=name, num_classes=C, class_names=list(classes), image_size=int(x_tr.shape[-1]),
                test=Split(y=torch.as_tensor(np.asarray(y_te, dtype=np.int64)), x=x_te),
                image_source=image_source, tensor_resident=True, imb_ratio=imb_ratio)
    if imb_ratio is None:                                   # the tree exactly as it is
        counts = np.bincount(t_tr, minlength=C).tolist()
        return LTDataset(train=Split(y=y_tr, x=x_tr), val=None, probe=None, fewshot=None,
                         class_counts=counts, class_rank=_rank_from_counts(counts),
                         lt_convention="list", split=None, **base)
    if split_file is not None or split_dir is not None:     # SDCLR's exact membership
        s = _sdclr_file_sets(t_tr, C, imb_ratio, split, split_file, split_dir)
        rank = _rank_from_counts(s["counts"])
        conv = "sdclr-npy"
    elif protocol == "sdclr":
        s = sdclr_indices(t_tr, C, imb_ratio, split, seed, head=n_max)
        rank = _rank_of_order(s["order"])
        conv = "sdclr"
    else:
        per = int(np.bincount(t_tr, minlength=C).min())
        head = per if n_max is None else min(per, n_max)
        counts = lt_counts(head, C, imb_ratio)              # n_max = 5,000 / 500
        tr = ldam_indices(t_tr, counts, seed)
        # INFERRED val / probe / few-shot
        perm = np.random.RandomState(seed + 1).permutation(len(t_tr))
        val = np.sort(np.concatenate([perm[t_tr[perm] == c][:per // 10] for c in range(C)]))
        s = dict(train=tr, val=val, probe=np.setdiff1d(np.arange(len(t_tr)), val), counts=counts,
                 fewshot=np.concatenate([tr[t_tr[tr] == c][:counts[-1]] for c in range(C)]))
        rank = list(range(C))
        conv = "ldam"
        split = None
    if split_file is None and split_dir is None:  # the generators: the tail must exist
        check_buildable(name, sorted(s["counts"], reverse=True), imb_ratio, max(s["counts"]))
    return LTDataset(**{k: sub(s[k]) for k in ("train", "val", "probe", "fewshot")},
                     class_counts=s["counts"], class_rank=rank, lt_convention=conv, split=split,
                     **base)


# --- Files: atomic writes, JSON, weights-only checkpoint loads ------------------------------------

def atomic_write(path, write) -> None:
    """write(file) into <path>.tmp beside `path`, flush + fsync, then os.replace onto
    `path` and fsync the directory. A crash or exception before the replace leaves the
    previous `path` untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # make the rename durable (best effort: not every OS opens dirs)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def to_json(obj):
    """json.dump `default`: numpy / torch scalars and arrays, paths, dtypes, devices,
    sets and tuples."""
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return obj.tolist()  # a 0-d tensor or array gives a Python number
    if isinstance(obj, (pathlib.Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_json(path, obj) -> None:
    """Atomic JSON write (indent=2); numpy / torch scalars and arrays are converted."""
    text = json.dumps(obj, indent=2, default=to_json)
    atomic_write(path, lambda f: f.write(text.encode() + b"\n"))


def load_checkpoint(path, flag: str = "--resume", map_location="cpu") -> dict:
    """torch.load(weights_only=True). A missing or unreadable file raises a one-line UserError
    naming `flag`, the option the path came from."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such checkpoint file; pass an existing checkpoint.pt "
                        "(or run directory)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # truncated zip, random bytes, a pickle of code: torch raises several kinds
        raise UserError(f"{flag} {path} is not a checkpoint (unreadable): truncated or damaged "
                        "outside this program (checkpoint writes are atomic, so the others are "
                        f"intact); pass another {flag} path") from None


# --- CIFAR (the official python pickles, read in the order torchvision uses) ----------------------
CIFAR_LAYOUT = {
    "cifar10-lt": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                       test=["test_batch"], meta="batches.meta",
                       names="label_names", labels="labels",
                       url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", tv="CIFAR10"),
    "cifar100-lt": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                        names="fine_label_names", labels="fine_labels",
                        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        tv="CIFAR100")}


def _unpickle(path, *keys):
    """The fields `keys` of a CIFAR python pickle; an unreadable file or a missing field
    is a UserError."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        return [d[k] for k in keys]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a CIFAR python pickle with the fields {', '.join(keys)} "
                        f"({type(e).__name__}); re-download the python version of CIFAR")


def read_cifar(name, data_dir, download=True):
    """Canonical CIFAR arrays: (x_train uint8 (N,3,32,32), t_train int64 np, x_test, t_test,
    class names). Missing files: one torchvision download attempt (if the data dir exists or is
    ./data), else UserError."""
    lay = CIFAR_LAYOUT[name]
    why = None
    base = os.path.join(data_dir, lay["folder"])
    names = lay["train"] + lay["test"] + [lay["meta"]]

    def missing():
        return [f for f in names if not os.path.isfile(os.path.join(base, f))]

    if missing() and download and (os.path.isdir(data_dir) or os.path.normpath(data_dir) == "data"):
        import torchvision
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            quiet_out = contextlib.redirect_stdout(io.StringIO())
            quiet_err = contextlib.redirect_stderr(io.StringIO())
            with quiet_out, quiet_err:
                getattr(torchvision.datasets, lay["tv"])(data_dir, train=True, download=True)
        except Exception as e:  # noqa: BLE001 - no network, disk full, ...: one line
            why = f"files missing and the download failed ({type(e).__name__})"
        finally:
            socket.setdefaulttimeout(old)
    if why or missing():
        why = why or (f"missing {', '.join(missing())}" if os.path.isdir(data_dir)
                      else "data dir does not exist")
        alt = ""
        if name == "cifar10-lt":
            alt = ("; or use a copy of CIFAR-10 as JPEGs in ImageFolder layout (ROOT/train/<class>/"
                   "*.jpg, ROOT/test/<class>/*.jpg) with --dataset folder --data-dir ROOT")
        raise UserError(f"{name}: {why}; expected {base}/{{{','.join(names)}}} (the python version "
                        f"of CIFAR); download {lay['url']} and unpack it into {data_dir}{alt}")

    def part(files):
        xs, ys = zip(*(_unpickle(os.path.join(base, f), "data", lay["labels"]) for f in files))
        try:
            x = np.concatenate([np.asarray(a, dtype=np.uint8).reshape(-1, 3, 32, 32) for a in xs])
            return torch.from_numpy(x), np.concatenate([np.asarray(t, dtype=np.int64) for t in ys])
        except ValueError as e:
            raise UserError(f"{base}: malformed CIFAR arrays in {', '.join(files)} ({e}); "
                            f"re-download them")
    x_tr, t_tr = part(lay["train"])
    x_te, t_te = part(lay["test"])
    return x_tr, t_tr, x_te, t_te, list(_unpickle(os.path.join(base, lay["meta"]), lay["names"])[0])


# --- ImageFolder trees and Tiny-ImageNet: small images decoded once into a uint8 cache ------------
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _list_images(d):
    return sorted(f for f in os.listdir(d) if f.lower().endswith(IMG_EXTS))


def _decode_all(files, size=None):
    """Decode files with PIL (threads) into one uint8 (N,3,S,S) RGB tensor; images of another size
    are resized to S x S (antialias). S = size or the first image's side."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    def one(path):
        try:
            with Image.open(path) as im:
                return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: cannot decode image ({type(e).__name__}); remove or replace "
                            f"the file")

    S = size or one(files[0]).shape[-1]
    out = torch.empty(len(files), 3, S, S, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        for i, img in enumerate(ex.map(one, files)):
            out[i] = TF.resize(img, [S, S], antialias=True) if img.shape[-2:] != (S, S) else img
    return out


def _cached_arrays(root, parts: dict, tag: str):
    """parts = {name: (files, labels)} -> {name: (x uint8, y int64)}, cached in
    <root>/.cache-<hash>.pt (docs/data.md, uint8 cache: atomic write, rebuilt when unreadable, no
    cache in a read-only dir)."""
    h = hashlib.sha1(tag.encode())
    for k in sorted(parts):
        for f in parts[k][0]:
            st = os.stat(f)
            h.update(f"{k}|{os.path.relpath(f, root)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    path = os.path.join(root, f".cache-{h.hexdigest()[:16]}.pt")
    if os.path.isfile(path):
        # a truncated or foreign cache is rebuilt below
        with contextlib.suppress(Exception):
            d = torch.load(path, weights_only=True)
            return {k: (d[k + "_x"], d[k + "_y"]) for k in parts}
    out = {}
    size = None
    for k, (files, labels) in parts.items():
        x = _decode_all(files, size)
        size = x.shape[-1]
        out[k] = (x, torch.as_tensor(labels, dtype=torch.int64))
    tmp = path + f".{os.getpid()}.tmp"
    try:
        torch.save({f"{k}_{v}": t for k in out for v, t in zip("xy", out[k])}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # a read-only or full data directory: no cache (torch.save wraps OS errors in RuntimeError)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:80]
        print(f"note: no uint8 cache written in {root} ({reason}); the images are decoded again "
              "on the next run", flush=True)
    return out


def _scan_split(d, classes, sub=""):
    """Images of d/<class>/<sub>/ for every class folder that exists; labels = index in
    `classes`."""
    files, labels = [], []
    for c, name in enumerate(classes):
        cd = os.path.join(d, name, sub)
        if os.path.isdir(cd):
            fs = _list_images(cd)
            files += [os.path.join(cd, f) for f in fs]
            labels += [c] * len(fs)
    return files, labels


def _load_folder(data_dir, imb_ratio, protocol, split, split_file, seed, n_max=None):
    root = os.path.abspath(data_dir)
    tr_dir = os.path.join(root, "train")
    te_dir = next((p for p in (f"{root}/test", f"{root}/val") if os.path.isdir(p)), None)
    if not os.path.isdir(tr_dir) or te_dir is None:
        raise UserError(f"folder dataset: expected {root}/train/<class>/*.jpg and "
                        f"{root}/test/<class>/* (or val/), e.g. a copy of CIFAR-10 as JPEGs (see "
                        f"docs/data.md, CIFAR-10 JPEG copy)")
    if split_file is not None:
        raise UserError("--split-file indexes the canonical CIFAR arrays and the file order of a "
                        "folder tree is unknown; use --protocol sdclr without it, or --dataset "
                        "cifar10-lt")
    classes = sorted(d for d in os.listdir(tr_dir) if os.path.isdir(os.path.join(tr_dir, d)))
    if not classes:
        raise UserError(f"folder dataset: no class folders in {tr_dir}; expected "
                        f"train/<class>/*.jpg")
    tr_files, tr_y = _scan_split(tr_dir, classes)
    te_files, te_y = _scan_split(te_dir, classes)
    empty = [c for c, n in zip(classes, np.bincount(tr_y, minlength=len(classes))) if n == 0]
    if empty or not te_files:
        if empty:
            what = f"class folders without images: {', '.join(empty[:5])}"
        else:
            what = f"no images in {te_dir}"
        raise UserError(f"folder dataset: {what}; every class needs images in {tr_dir}/<class>/ "
                        f"and the test split in {te_dir}/<class>/")
    from PIL import Image
    with Image.open(tr_files[0]) as im:
        side = max(im.size)
    # CIFAR-10 copy
    jpeg_copy = tuple(classes) == CIFAR10_CLASSES and side == 32 and len(tr_files) == 50000
    source = "jpeg-copy" if jpeg_copy else "folder"
    parts = {"train": (tr_files, tr_y), "test": (te_files, te_y)}
    # large images: decoded per step, as list datasets
    if side > 64:
        return _files_dataset("folder", parts, classes, source)
    (x_tr, y_tr), (x_te, y_te) = _cached_arrays(root, parts, "folder").values()
    return _build_lt("folder", x_tr, y_tr.numpy(), x_te, y_te, classes, imb_ratio, protocol, split,
                     seed, source, n_max=n_max)


def _load_tiny(data_dir, imb_ratio, seed, n_max=None):
    """Tiny-ImageNet-LT (FASSL paper Sec. 4.1): ldam construction with n_max 500; test =
    the official val."""
    root = next((r for r in (data_dir, os.path.join(data_dir, "tiny-imagenet-200"))
                 if os.path.isfile(os.path.join(r, "wnids.txt"))), None)
    if root is None:
        raise UserError(f"tiny-imagenet-lt: {data_dir}/tiny-imagenet-200/wnids.txt not found; "
                        f"expected wnids.txt, train/<wnid>/images/*.JPEG and "
                        f"val/val_annotations.txt; download "
                        f"http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into "
                        f"{data_dir}")
    root = os.path.abspath(root)
    with open(os.path.join(root, "wnids.txt")) as f:
        # label = sorted wnid index (INFERRED)
        wnids = sorted(w.strip() for w in f if w.strip())
    lab = {w: i for i, w in enumerate(wnids)}
    ann = os.path.join(root, "val", "val_annotations.txt")
    for p in [os.path.join(root, "train", w, "images") for w in wnids] + [ann]:
        if not (os.path.isfile(p) if p == ann else os.path.isdir(p)):
            raise UserError(f"tiny-imagenet-lt: {p} missing; re-extract tiny-imagenet-200.zip")
    tr_files, tr_y = _scan_split(os.path.join(root, "train"), wnids, "images")
    test = []
    with open(ann) as f:
        for ln, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or parts[1] not in lab:
                raise UserError(f"{ann}:{ln}: expected '<file>\\t<wnid>\\t...' with a wnid from "
                                f"wnids.txt")
            test.append((os.path.join(root, "val", "images", parts[0]), lab[parts[1]]))
    # sorted by file name
    te_files, te_y = (list(t) for t in zip(*sorted(test, key=lambda p: p[0])))
    parts = {"train": (tr_files, tr_y), "test": (te_files, te_y)}
    (x_tr, y_tr), (x_te, y_te) = _cached_arrays(root, parts, "tiny").values()
    return _build_lt("tiny-imagenet-lt", x_tr, y_tr.numpy(), x_te, y_te, wnids,
                     100.0 if imb_ratio is None else imb_ratio, "ldam", None, seed, "canonical",
                     n_max=n_max)


# --- List datasets: `relative/path label` per line, decoded per step by DataLoader workers --------
LIST_FILES = {   # role -> file name (docs/data.md, List datasets); only train and test are required
    "imagenet-lt": dict(train="ImageNet_LT_train.txt", val="ImageNet_LT_val.txt",
                        test="ImageNet_LT_test.txt",
                        src="github.com/facebookresearch/classifier-balancing data/ImageNet_LT/"),
    "places-lt": dict(train="Places_LT_train.txt", val="Places_LT_val.txt",
                      test="Places_LT_test.txt",
                      src="github.com/facebookresearch/classifier-balancing data/Places_LT/"),
    "inat2018": dict(train="iNaturalist18_train.txt", test="iNaturalist18_val.txt",
                     src="github.com/facebookresearch/classifier-balancing data/iNaturalist18/"),
    "imagenet100-lt": dict(train="imageNet_100_LT_train.txt", val="ImageNet_100_val.txt",
                           test="ImageNet_100_test.txt",
                           fewshot="imageNet_100_sub_balance_train_0.01.txt",
                           probe="ImageNet_100_train.txt",
                           src="github.com/VITA-Group/SDCLR split/imagenet-100/")}

LIST_HASHES = {   # of the published lists: md5, or the git blob id where only that is known
    "imageNet_100_LT_train.txt": ("md5", "b1bcc230d12318f4fe99c498cb24b672"),
    "ImageNet_LT_train.txt": ("git", "a063f095fcd475db4cf8b0658c4b73955535bbf9"),
    "ImageNet_LT_val.txt": ("md5", "ef44f8e43fbc904809a77216042e7498"),
    "ImageNet_LT_test.txt": ("md5", "5f5f97c738923e877c5c78accce6744f"),
    "Places_LT_train.txt": ("md5", "e7795ab1bf428a89f900854127b1e556"),
    "Places_LT_val.txt": ("md5", "2f6e727cd6c99c7b7fdecc9876875b1b"),
    "Places_LT_test.txt": ("md5", "1347af35b053bd31cf782256306affe7"),
    "iNaturalist18_val.txt": ("md5", "b7ed52f3854c157c487cc3be9deb8abf")}


def list_hash_ok(path: str) -> bool | None:
    """True / False when a published hash is known for this file name, None otherwise."""
    kind, want = LIST_HASHES.get(os.path.basename(path), (None, None))
    if kind is None:
        return None
    with open(path, "rb") as f:
        raw = f.read()
    # git blob id
    got = hashlib.md5(raw) if kind == "md5" else hashlib.sha1(b"blob %d\0" % len(raw) + raw)
    return got.hexdigest() == want


def parse_list(path: str, root: str):
    """Parse a `<relative/path> <int label>` list (rsplit on the last space). Returns (abs paths,
    labels). A malformed line raises UserError('<file>:<line>: ...')."""
    files, labels = [], []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.rsplit(" ", 1)
            if (len(parts) != 2 or not parts[0] or not parts[1].lstrip("-").isdigit()
                    or int(parts[1]) < 0):
                raise UserError(f"{path}:{ln}: expected '<relative/path> <int label>', got "
                                f"{line[:80]!r}")
            files.append(os.path.join(root, parts[0]))
            labels.append(int(parts[1]))
    if not files:
        raise UserError(f"{path}: the list is empty; expected '<relative/path> <int label>' lines")
    return files, labels


def _files_dataset(name, sets, classes, source, notes=()) -> LTDataset:
    """sets: role -> (absolute paths, labels), train and test required; decoded per step
    by the loader."""

    def mk(fs, ys):
        return Split(y=torch.as_tensor(ys, dtype=torch.int64), files=fs)

    splits = {r: mk(*sets[r]) if r in sets else None
              for r in ("train", "test", "val", "probe", "fewshot")}
    counts = torch.bincount(splits["train"].y, minlength=len(classes)).tolist()
    return LTDataset(name=name, num_classes=len(classes), class_names=list(classes), image_size=224,
                     **splits, class_counts=counts, class_rank=_rank_from_counts(counts),
                     lt_convention="list", image_source=source, imb_ratio=None, split=None,
                     tensor_resident=False, notes=[*notes])


def _load_list_dataset(name, data_dir):
    lists = LIST_FILES[name]
    root = os.path.abspath(data_dir)

    def have(role):
        return role in lists and os.path.isfile(os.path.join(root, lists[role]))

    missing = [os.path.join(root, lists[r]) for r in ("train", "test") if not have(r)]
    if missing:
        raise UserError(f"{name}: list files missing: {', '.join(missing)}; get them from "
                        f"{lists['src']} and put them in {root} next to the image folders they "
                        f"index")
    sets = {r: parse_list(os.path.join(root, lists[r]), root)
            for r in ("train", "test", "val", "fewshot", "probe") if have(r)}
    tr_files, tr_y = sets["train"]
    if not os.path.isfile(tr_files[0]):
        raise UserError(f"{name}: image {tr_files[0]} (line 1 of {lists['train']}) not found; the "
                        f"list paths are relative to --data-dir ({root})")
    C = max(tr_y) + 1
    # first file of each class
    first = {c: f for f, c in reversed(list(zip(tr_files, tr_y)))}
    names = [os.path.basename(os.path.dirname(first[c])) if c in first else "" for c in range(C)]
    notes = [f"{lists[r]}: hash differs from the published list; results may not be comparable"
             for r in ("train", "val", "test", "fewshot")
             if have(r) and list_hash_ok(os.path.join(root, lists[r])) is False]
    if (name == "imagenet100-lt" and "probe" not in sets
            and os.path.isdir(os.path.join(root, "train"))):
        # INFERRED full-shot probe pool (SDCLR's ImageNet_100_train.txt is unpublished):
        # train/<wnid>/ - val
        skip = set(sets.get("val", ([], []))[0])
        scanned = zip(*_scan_split(os.path.join(root, "train"), names))
        pool = [(f, c) for f, c in scanned if f not in skip]
        sets["probe"] = [f for f, _ in pool], [c for _, c in pool]
        notes.append("full-shot probe pool built from train/<wnid>/ minus the val list (INFERRED)")
    bad = [c for c in sets["test"][1] if c >= C]
    if bad:
        raise UserError(f"{name}: {lists['test']} has label {bad[0]} but {lists['train']} has "
                        f"only {C} classes")
    return _files_dataset(name, sets, names, "canonical", notes)


# --- CLI: --stats and --bench-augment (docs/data.md, Command line) --------------------------------
def save_histogram(ds: LTDataset, path: str) -> None:
    """Bar chart of the per-class train counts, head -> tail (generator rank)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    order = sorted(range(ds.num_classes), key=lambda c: ds.class_rank[c])
    counts = [ds.class_counts[c] for c in order]
    fig, ax = plt.subplots(figsize=(max(5.0, min(14.0, 0.4 * ds.num_classes + 2)), 3.5))
    ax.bar(range(len(counts)), counts, color="tab:blue")
    if ds.num_classes <= 20:
        ax.set_xticks(range(len(counts)), [ds.class_names[c] for c in order], rotation=45,
                      ha="right")
    else:
        ax.set_xlabel("class rank (head -> tail)")
    ax.set_ylabel("train images")
    src = " (JPEG copy)" if ds.image_source == "jpeg-copy" else ""
    ax.set_title(f"{ds.name}{src}: {ds.lt_convention}, rho {ds.imb_ratio}, {sum(counts):,} images")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# The reference pipeline: what the official code runs instead of `augment`, torchvision
# transforms on one PIL image at a time in DataLoader workers (docs/data.md, Reference pipeline)
REFERENCE_RECIPES = ("simclr_cifar", "mocov2_imagenet", "hybrid_base", "hybrid_jitter", "dscl_key",
                     "dscl_key_cifar", "dscl_query_color", "dscl_query_color_cifar", "dscl_patch",
                     "dscl_patch_cifar")


def reference_transform(recipe: str, size: int, scale=(0.08, 1.0)):
    """The per-image transform of a recipe (one of REFERENCE_RECIPES): a PIL image in, a normalised
    float (3, size, size) out. simclr_cifar is SDCLR's CIFAR pipeline (bicubic crop); the others
    take the steps of their batched recipe (apply_recipe) from torchvision, whose colour jitter
    runs its four parts in a random order. dscl_key[_cifar] is the key view of dscl.make_views:
    RandomResizedCrop(size, scale), jitter (0.4, 0.4, 0.4, 0) always, flip."""
    import torchvision.transforms as T
    if recipe not in REFERENCE_RECIPES:
        raise UserError(f"no reference transform for recipe '{recipe}'; valid: "
                        f"{', '.join(REFERENCE_RECIPES)}")
    # a DSCL recipe's CIFAR variant: the same steps without the blur, CIFAR statistics
    base = recipe if recipe == "simclr_cifar" else recipe.removesuffix("_cifar")
    cifar = base != recipe
    jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    gray = T.RandomGrayscale(p=0.2)
    blur = T.RandomApply([T.GaussianBlur(blur_kernel_size(size), (0.1, 2.0))], p=0.5)
    flip = T.RandomHorizontalFlip()
    bicubic = T.InterpolationMode.BICUBIC
    pad = 4 if size == 32 else size // 8
    steps = {
        "simclr_cifar": [T.RandomResizedCrop(size, (0.1, 1.0), interpolation=bicubic), flip,
                         jitter, gray],
        "mocov2_imagenet": [T.RandomResizedCrop(size, (0.08, 1.0)), flip, jitter, gray, blur],
        "hybrid_base": [T.RandomCrop(size, pad), flip, gray],
        "hybrid_jitter": [T.RandomCrop(size, pad), flip, jitter, gray],
        "dscl_key": [T.RandomResizedCrop(size, tuple(scale)), T.ColorJitter(0.4, 0.4, 0.4, 0.0),
                     flip],
        "dscl_query_color": [jitter, gray, blur],
        "dscl_patch": [flip, jitter, gray, blur],
    }
    chosen = [step for step in steps[base] if not (cifar and step is blur)]
    stats = MEAN_STD["cifar" if cifar or base.startswith("hybrid") else "imagenet"]
    return T.Compose([*chosen, T.ToTensor(), T.Normalize(*stats)])


def reference_dscl_views(image, size: int, scale, small: bool, num_patches: int, patch_scale,
                         patch_size: int):
    """One image through DSCL's views as a per-image loader builds them (dscl.make_views batched):
    the query's RandomResizedCrop and flip, then its colour recipe; the key; num_patches boxes drawn
    on the flipped query (RandomResizedCrop's box sampling), each cut and resized alone, then the
    patch recipe. Returns (query, key, patches (L, 3, P, P), boxes (L, 4) x1 y1 x2 y2 float);
    patches and boxes are None when num_patches is 0."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    suffix = "_cifar" if small else ""
    geometry = T.Compose([T.RandomResizedCrop(size, tuple(scale)), T.RandomHorizontalFlip()])
    flipped = geometry(image)
    query = reference_transform("dscl_query_color" + suffix, size)(flipped)
    key = reference_transform("dscl_key" + suffix, size, scale)(image)
    if num_patches == 0:
        return query, key, None, None
    patch_recipe = reference_transform("dscl_patch" + suffix, patch_size)
    boxes = [T.RandomResizedCrop.get_params(flipped, tuple(patch_scale), (3 / 4, 4 / 3))
             for _ in range(num_patches)]
    patches = [patch_recipe(TF.resized_crop(flipped, top, left, h, w, [patch_size, patch_size]))
               for top, left, h, w in boxes]
    xyxy = [[left, top, left + w, top + h] for top, left, h, w in boxes]
    return query, key, torch.stack(patches), torch.tensor(xyxy, dtype=torch.float32)


def reference_batch(batch):
    """A DataLoader batch of (image (H, W, 3) uint8 array, label) pairs -> (PIL images, labels (B,)
    int64): what a reference collate_fn starts from."""
    from PIL import Image
    images = [Image.fromarray(image) for image, _ in batch]
    labels = torch.tensor([int(label) for _, label in batch])
    return images, labels


def reference_two_views(batch, recipe: str, image_size: int) -> list:
    """--benchmark --reference of the SimCLR-style scripts (fassl, tase): their two views built per
    image by torchvision on PIL images (reference_transform), in the DataLoader's workers."""
    images, _ = reference_batch(batch)
    transform = reference_transform(recipe, image_size)
    return [torch.stack([transform(im) for im in images]) for _ in range(2)]


def _pil_two_views(images):
    """DataLoader collate_fn, run in the workers: two views of each (H,W,3) uint8 image through the
    official per-image SDCLR/SimCLR CIFAR pipeline (reference_transform("simclr_cifar"))."""
    from PIL import Image
    tf = reference_transform("simclr_cifar", 32)
    ims = [Image.fromarray(a) for a in images]
    return torch.stack([tf(im) for im in ims]), torch.stack([tf(im) for im in ims])


def bench_augment(n=2048, batch_size=512, workers=2, device="auto") -> dict:
    """Images/s (two simclr_cifar views per image) of the batched augmentation on `device` and
    of torchvision's per-image PIL pipeline in a DataLoader with `workers` processes, measured
    in one run."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    x = synthetic_images(torch.arange(n) % 10, 10, torch.Generator().manual_seed(0))
    xd = x.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # warm-up
    augment(xd[:batch_size], "simclr_cifar", gen)
    augment(xd[:batch_size], "simclr_cifar", gen)
    sync()
    t = time.perf_counter()
    for xb in xd.split(batch_size):
        augment(xb, "simclr_cifar", gen)
        augment(xb, "simclr_cifar", gen)
    sync()
    batched = n / (time.perf_counter() - t)
    images = x.permute(0, 2, 3, 1).numpy()
    it = iter(torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=True,
                                          num_workers=workers, drop_last=False,
                                          collate_fn=_pil_two_views))
    next(it)                                                # worker start-up excluded
    t = time.perf_counter()
    pil = sum(v1.shape[0] for v1, _ in it) / max(time.perf_counter() - t, 1e-9)
    return {"device": str(dev), "n": n, "batch_size": batch_size, "workers": workers,
            "batched_img_s": batched, "pil_img_s": pil, "ratio": batched / pil}


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Long-tailed datasets: print class counts (--stats) or benchmark the batched "
                    "augmentation (--bench-augment). See docs/data.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10-lt", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default="./data", help="dataset root")
    p.add_argument("--imb-ratio", type=float, default=None,
                   help="rho; None: 100, or a folder tree as it is")
    p.add_argument("--n-max", type=int, default=None,
                   help="images of the head class; None: all the class has (synthetic-lt: 500)")
    p.add_argument("--protocol", default="ldam", choices=["ldam", "sdclr"],
                   help="CIFAR-LT convention")
    p.add_argument("--split", type=int, default=1, help="SDCLR split 1..5")
    p.add_argument("--split-file", default=None,
                   help="exact D_i index file, e.g. SDCLR's split1_D_i.npy")
    p.add_argument("--sdclr-split-dir", default=None,
                   help="SDCLR split/ folder; its files are found by name")
    p.add_argument("--seed", type=int, default=0, help="data seed (0 reproduces LDAM-DRW)")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic-lt classes")
    p.add_argument("--no-download", action="store_true", help="never try to download CIFAR")
    p.add_argument("--stats", action="store_true",
                   help="print per-class counts and totals, save a histogram")
    p.add_argument("--plot", default=None,
                   help="histogram; None: runs/data-stats/<dataset>-<convention>.png")
    p.add_argument("--bench-augment", action="store_true",
                   help="batched augmentation vs per-image PIL")
    p.add_argument("--bench-n", type=int, default=2048, help="images in the benchmark")
    p.add_argument("--bench-workers", type=int, default=2,
                   help="DataLoader workers of the PIL side")
    p.add_argument("--device", default="auto", help="benchmark device: auto | cpu | cuda")
    a = p.parse_args(argv)
    a.stats = a.stats or not a.bench_augment                # --stats is the default action
    if a.stats:
        rho = a.imb_ratio if a.imb_ratio is not None or a.dataset == "folder" else 100.0
        t = time.perf_counter()
        ds = load_dataset(a.dataset, a.data_dir, rho, a.protocol, a.split, a.split_file,
                          seed=a.seed, num_classes=a.num_classes, download=not a.no_download,
                          sdclr_split_dir=a.sdclr_split_dir, n_max=a.n_max)
        print(f"{describe(ds)}\nloaded in {time.perf_counter() - t:.1f}s")
        tag = ds.lt_convention + (f"-split{ds.split}" if ds.split else "")
        path = a.plot or os.path.join("runs", "data-stats", f"{ds.name}-{tag}.png")
        save_histogram(ds, path)
        print(f"histogram saved to {path}")
    if a.bench_augment:
        r = bench_augment(a.bench_n, workers=a.bench_workers, device=a.device)
        print(f"batched augment('simclr_cifar'), 2 views, on {r['device']}: "
              f"{r['batched_img_s']:,.0f} images/s\n"
              f"torchvision per-image PIL pipeline, DataLoader with {r['workers']} workers: "
              f"{r['pil_img_s']:,.0f} images/s\n"
              f"ratio batched / PIL: {r['ratio']:.1f}x  ({r['n']} images of 32x32, "
              f"{os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    with common.user_errors():
        main()
