"""Shared machinery for the four method scripts (fassl.py, tase.py, dscl.py, hybrid.py) and eval.py.

What lives here (spec ssl.md §0.1, §0.3-§0.5; supervised.md §0):
  * a tiny dataclass -> argparse helper (`arg`, `parse_args`) and one-line user errors (`UserError`, `fatal`);
  * seeding, device / AMP / TF32 setup, channels_last and optional torch.compile;
  * backbones: torchvision ResNet-18/34/50/152 (CIFAR stem for inputs <= 64 px) and the He et al. CIFAR
    ResNet-8/20/32 in the LDAM-DRW layout; a projection-MLP builder;
  * EMA of parameters with foreach ops; LR schedules that are pure functions of the step / epoch;
  * the shared NT-Xent loss with per-anchor temperature (ssl.md eq. S1);
  * run directories, atomic JSON / checkpoint writes, RNG state capture, the progress line.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import time
import types
import typing
from typing import NoReturn

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet

# ----------------------------------------------------------------------------------------------------------------
# Command line: dataclass -> argparse
# ----------------------------------------------------------------------------------------------------------------


def arg(default, help: str, **kw) -> dataclasses.Field:
    """A dataclass field with a one-line doc. `kw` (e.g. choices=[...]) goes into the field metadata.

    Mutable defaults (list / dict / set) become a default_factory that returns a fresh copy.
    """
    metadata = {"help": help, **kw}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _or_none(base):
    """argparse type for Optional[...] fields: "none" / "null" -> None, anything else -> base(value)."""
    def convert(text: str):
        return None if text.lower() in ("none", "null") else base(text)
    convert.__name__ = getattr(base, "__name__", "value")  # argparse names it in "invalid <name> value" errors
    return convert


def make_parser(cls) -> argparse.ArgumentParser:
    """Build the argparse parser for dataclass `cls` (see `parse_args`)."""
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses writes when there is no docstring
        doc = ""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = typing.get_args(tp)
            rest = [a for a in members if a is not type(None)]
            optional = len(rest) < len(members)
            tp = rest[0] if len(rest) == 1 else str
        kw = {"dest": f.name, "help": f.metadata.get("help", "").replace("%", "%%")}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default"] = f.default_factory()
        else:
            kw["required"] = True
        origin, targs = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple) or tp in (list, tuple):
            elem = targs[0] if targs else str
            kw["nargs"] = len(targs) if origin is tuple and targs and targs[-1] is not Ellipsis else "+"
            kw["type"] = _or_none(elem) if optional else elem
        elif origin is typing.Literal:
            kw["choices"], kw["type"] = list(targs), type(targs[0])
        else:
            kw["type"] = _or_none(tp) if optional else tp
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        action = parser.add_argument("--" + f.name.replace("_", "-"), **kw)
        if "%(default)" not in (action.help or ""):  # BooleanOptionalAction appends it itself on Python < 3.14
            action.help = (action.help + " " if action.help else "") + "(default: %(default)s)"
    return parser


def parse_args(cls, argv=None):
    """Parse `argv` (default sys.argv[1:]) into an instance of dataclass `cls`.

    --field-name per field (underscores -> dashes); bool -> --flag / --no-flag; Optional[...] accepts "none";
    list[...] -> nargs='+'; tuple[T, T] -> nargs=2; choices from arg(..., choices=[...]) or Literal[...].
    `--help` shows each field's doc and default; the class docstring is the description.
    """
    ns = vars(make_parser(cls).parse_args(argv))
    hints = typing.get_type_hints(cls)
    for name, value in ns.items():  # argparse gives lists; tuple-typed fields get tuples back
        tp = hints[name]
        if isinstance(value, list) and (typing.get_origin(tp) is tuple or tp is tuple
                                        or tuple in [typing.get_origin(a) for a in typing.get_args(tp)]):
            ns[name] = tuple(value)
    return cls(**ns)


class UserError(Exception):
    """Bad input from the user. The message is ONE line that names the problem and the fix."""


def fatal(msg: str, code: int = 2) -> NoReturn:
    """Print `error: <msg>` on one line to stderr and exit with `code` (no traceback)."""
    print("error: " + " ".join(str(msg).split()), file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors():
    """`with user_errors(): main(args)` turns UserError into one line + exit 2, Ctrl-C into a line + exit 130."""
    try:
        yield
    except UserError as e:
        fatal(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted; checkpoints already written are intact (continue with --resume auto)",
              file=sys.stderr, flush=True)
        sys.exit(130)


# ----------------------------------------------------------------------------------------------------------------
# Seeding, ranks, device and precision
# ----------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device). `deterministic` also asks torch for
    deterministic kernels (warn-only where none exists) and turns cuDNN autotuning off."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def get_rank_world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) for a plain `python script.py` launch."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """True on the process that prints and saves (rank 0)."""
    return get_rank_world()[0] == 0


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def setup_device(device: str = "auto", amp: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """Pick the device and the autocast dtype (ssl.md §0.5).

    device "auto" -> cuda if available else cpu. amp "auto" -> bf16 on a GPU that supports it, else fp16
    (with a GradScaler, see `make_scaler`); off (None) on CPU. "bf16" | "fp16" | "off" force a choice.
    TF32 is turned on for CUDA devices.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r} is not a device name ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but CUDA is not available; use --device cpu or auto")
    if amp == "auto":
        amp_dtype = None
        if dev.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp in _AMP:
        amp_dtype = _AMP[amp]
    else:
        raise UserError(f"--amp {amp!r} is unknown; use one of auto, bf16, fp16, off")
    if dev.type == "cuda":  # TF32 matmuls / convolutions (ssl.md §0.5); CPU numerics are left exact
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    return dev, amp_dtype


def autocast(device, amp_dtype):
    """torch.autocast on `device` with `amp_dtype`, or a no-op context when amp_dtype is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype)


def make_scaler(amp_dtype) -> torch.amp.GradScaler:
    """GradScaler that is enabled only for fp16 (bf16 and fp32 need no loss scaling, ssl.md N5)."""
    enabled = amp_dtype == torch.float16
    return torch.amp.GradScaler("cuda" if torch.cuda.is_available() else "cpu", enabled=enabled)


def prepare_model(model: nn.Module, device, channels_last: bool = True, compile: bool | str = False) -> nn.Module:
    """Move to `device`; channels_last memory format on CUDA; torch.compile when `compile` is True on CUDA
    (on CPU only when compile == "force"). Returns the (maybe compiled) module; `unwrap` gives the original."""
    device = torch.device(device)
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if compile == "force" or (compile and device.type != "cpu"):
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile's `_orig_mod` and DDP / DataParallel `.module` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


# ----------------------------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------------------------


class TorchvisionResNet(tv_resnet.ResNet):
    """torchvision ResNet without its fc. State-dict keys are torchvision's (conv1, bn1, layer1..4).

    cifar_stem: conv1 = 3x3 stride 1 (no bias) and no max-pool, used for inputs <= 64 px (ssl.md §0.1).
    forward(x) -> pooled (N, out_dim); forward(x, return_map=True) -> (pooled, last feature map).
    """

    def __init__(self, block, layers, cifar_stem: bool):
        super().__init__(block, layers)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
            self.maxpool = nn.Identity()
        self.out_dim = self.fc.in_features
        del self.fc
        self.feature_stride = 8 if cifar_stem else 32

    def forward(self, x, return_map: bool = False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        pooled = torch.flatten(self.avgpool(fmap), 1)
        return (pooled, fmap) if return_map else pooled


class _ShortcutA(nn.Module):
    """Option-A shortcut of He et al. (LDAM code's LambdaLayer): subsample by 2, zero-pad the new channels."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _CifarBlock(nn.Module):
    """BasicBlock of LDAM-DRW `models/resnet_cifar.py` (option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet-(6n+2), LDAM-DRW layout: 3x3 conv 16, stages of n blocks at 16/32/64 channels
    (strides 1/2/2), global average pooling -> 64-d. Kaiming-normal init of convs (LDAM `_weights_init`).
    The last map is 8x8 at 32 px, so feature_stride = 4 (supervised.md §1.4: spatial_scale = 1/4)."""

    def __init__(self, depth: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_CifarBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.out_dim, self.feature_stride = 64, 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x, return_map: bool = False):
        fmap = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        pooled = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        return (pooled, fmap) if return_map else pooled


_TORCHVISION = {"resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]), "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
                "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]), "resnet152": (tv_resnet.Bottleneck, [3, 8, 36, 3])}
_CIFAR_DEPTH = {"resnet8": 8, "resnet20": 20, "resnet32": 32}
ARCHS = tuple(_TORCHVISION) + tuple(_CIFAR_DEPTH)


def build_backbone(arch: str, image_size: int = 32) -> nn.Module:
    """Backbone without classifier. resnet18/34/50/152: torchvision layout, CIFAR stem when image_size <= 64.
    resnet8/20/32: He et al. / LDAM CIFAR ResNet (64-d). Attributes `.out_dim`, `.feature_stride`."""
    if arch in _TORCHVISION:
        return TorchvisionResNet(*_TORCHVISION[arch], cifar_stem=image_size <= 64)
    if arch in _CIFAR_DEPTH:
        return CifarResNet(_CIFAR_DEPTH[arch])
    raise UserError(f"--arch {arch!r} is unknown; use one of {', '.join(ARCHS)}")


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = True,
                   last_bn: bool = False, bias_last: bool = True) -> nn.Sequential:
    """(Linear [+BN] + ReLU) x (num_layers - 1), then Linear [+BN if last_bn]. The last BN is a standard
    affine BatchNorm1d, as in the SDCLR / SimCLR heads (ssl.md §1.4; SDCLR code `models/utils.py`).

    num_layers counts the Linear layers. Hidden Linears have no bias when followed by BN (it would be
    cancelled by the BN mean)."""
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=bias_last))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------------
# EMA and learning-rate schedules
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, tau: float, buffers: str = "copy") -> None:
    """theta_t <- tau * theta_t + (1 - tau) * theta_s over all parameters (foreach ops, in place).

    Buffers (BN running mean/var, num_batches_tracked):
      "copy": copied from the source (the teacher uses the student's current BN statistics; MoCo/BYOL code),
      "ema":  floating buffers averaged like parameters, integer buffers copied,
      "none": left alone (the teacher keeps its own statistics).
    """
    target, source = unwrap(target), unwrap(source)
    t_params, s_params = list(target.parameters()), list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"ema_update: target has {len(t_params)} parameters, source {len(s_params)}")
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - tau)
    if buffers == "none":
        return
    if buffers not in ("copy", "ema"):
        raise ValueError(f"ema_update: buffers={buffers!r}; use 'copy', 'ema' or 'none'")
    for tb, sb in zip(target.buffers(), source.buffers()):
        if buffers == "ema" and tb.is_floating_point():
            tb.lerp_(sb, 1.0 - tau)
        else:
            tb.copy_(sb)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0) -> float:
    """Per-iteration schedule (0-based step): linear warm-up lr = base_lr * (step + 1) / warmup_steps for
    step < warmup_steps, then a half cosine from base_lr to final_lr, reached at step = total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * t))


def multistep_lr(epoch: int, base_lr: float, milestones: list[int], gamma: float = 0.1) -> float:
    """base_lr * gamma ** #(milestones <= epoch), epoch 1-based (D§5.1: milestones 10, 20 give lr 30 for
    e = 1..9, 3 for 10..19, 0.3 for 20..30)."""
    return base_lr * gamma ** sum(1 for m in milestones if m <= epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to lr * group.get("lr_scale", 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Shared contrastive loss
# ----------------------------------------------------------------------------------------------------------------


def _per_anchor(value: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """(B,) per image -> (2B,) per anchor (both views of image i get value[i]); (2B,) passes through."""
    value = value.float().reshape(-1)
    if value.numel() == batch:
        return torch.cat([value, value])
    if value.numel() == 2 * batch:
        return value
    raise ValueError(f"nt_xent: {what} has {value.numel()} entries; expected 1, B={batch} or 2B={2 * batch}")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature, weight=None, reduction: str = "mean"):
    """NT-Xent with per-anchor temperature, ssl.md §0.4 eq. S1 (SimCLR, Chen et al. 2020):

        l_j = - a_j . a_p(j) / tau_j + LSE_{k != j}( a_j . a_k / tau_j ),   a = n([z1; z2]),  p(j) = (j + B) mod 2B

    z1, z2: (B, D) views; normalised in fp32 and the logits built in fp32 outside autocast (ssl.md N1-N3).
    temperature: float, 0-d tensor, (B,) per image or (2B,) per anchor. weight: None, (B,) or (2B,) per anchor.
    Returns mean_j weight_j * l_j ("mean"), their sum ("sum") or the (2B,) vector ("none").
    """
    batch = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        a = F.normalize(torch.cat([z1, z2]).float(), dim=-1)                     # N1
        sim = a @ a.T
        if torch.is_tensor(temperature) and temperature.numel() > 1:
            logits = sim / _per_anchor(temperature, batch, "temperature")[:, None]
        else:
            logits = sim / (temperature.float() if torch.is_tensor(temperature) else float(temperature))
        self_mask = torch.eye(2 * batch, dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(self_mask, float("-inf"))                    # N3: self excluded
        positives = (torch.arange(2 * batch, device=a.device) + batch) % (2 * batch)
        loss = F.cross_entropy(logits, positives, reduction="none")               # eq. S1, N2
        if weight is not None:
            loss = loss * (_per_anchor(weight, batch, "weight") if torch.is_tensor(weight) else float(weight))
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"nt_xent: reduction={reduction!r}; use 'mean', 'sum' or 'none'")


# ----------------------------------------------------------------------------------------------------------------
# Run directory, JSON, metrics, checkpoints, RNG states
# ----------------------------------------------------------------------------------------------------------------


def _run_name_re(method: str, dataset: str):
    return re.compile(re.escape(f"{method}-{dataset}-") + r"\d{8}-\d{6}(-\d+)?")


def make_run_dir(method: str, dataset: str, out_dir: str = "runs", resume: str | None = None) -> pathlib.Path:
    """Directory of this run: a new runs/<method>-<dataset>-<YYYYmmdd-HHMMSS>/; with resume=<checkpoint file>
    its parent, with resume=<run dir> that dir; with resume="auto" the matching run dir whose checkpoint.pt
    was written last (a new dir if there is none). A resume path that does not exist raises UserError."""
    out = pathlib.Path(out_dir)
    if resume == "auto":
        pattern = _run_name_re(method, dataset)
        found = [p for p in out.glob(f"{method}-{dataset}-*/checkpoint.pt") if pattern.fullmatch(p.parent.name)]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime).parent
    elif resume:
        path = pathlib.Path(resume)
        if path.is_file():
            return path.parent
        if path.is_dir():
            if not (path / "checkpoint.pt").is_file():
                raise UserError(f"--resume {path} is a directory without checkpoint.pt; pass a run directory "
                                "that has one, a checkpoint file, or 'auto'")
            return path
        raise UserError(f"--resume {path} does not exist; pass a checkpoint.pt, a run directory, or 'auto' "
                        f"(the newest {out}/{method}-{dataset}-*)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, i = out / f"{method}-{dataset}-{stamp}", 0
    while run_dir.exists():  # two runs started in the same second
        i += 1
        run_dir = out / f"{method}-{dataset}-{stamp}-{i}"
    run_dir.mkdir(parents=True)
    return run_dir


def _to_json(obj):
    """json.dump `default`: numpy / torch scalars and arrays, paths, dataclasses, dtypes, devices."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (pathlib.Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _fsync_dir(path: pathlib.Path) -> None:
    """Make a rename durable (best effort; directories cannot be opened on every OS)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write) -> None:
    """write(file) into <path>.tmp beside `path`, flush + fsync, then os.replace onto `path`.

    A crash or exception before the replace leaves the previous `path` untouched; only the tmp file is lost."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp") if path.suffix != ".tmp" else path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_json(path, obj) -> None:
    """Atomic JSON write (indent=2); numpy / torch scalars and arrays are converted."""
    text = json.dumps(obj, indent=2, default=_to_json)
    _atomic_write(path, lambda f: f.write(text.encode() + b"\n"))


def append_metrics(run_dir, record: dict) -> None:
    """Append one JSON line to run_dir/metrics.jsonl (main rank only)."""
    if not is_main():
        return
    with open(pathlib.Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, default=_to_json) + "\n")


def save_checkpoint(path, state: dict) -> None:
    """Atomic torch.save (tmp file beside `path`, fsync, os.replace); main rank only.

    `state` must hold only tensors, numbers, strings, lists, tuples and dicts so that `load_checkpoint`
    (weights_only=True) can read it. A failed write leaves the previous checkpoint at `path` as it was."""
    if not is_main():
        return
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint there is "
                        "intact; free disk space or choose another --out-dir") from None


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True). A missing, truncated or corrupt file raises a one-line UserError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass an existing checkpoint file or run directory "
                        "(--resume / --ckpt), or start without --resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, non-weights object: torch raises several kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"checkpoint {path} is unreadable ({reason}); it was truncated or damaged outside this "
                        "program (checkpoint writes are atomic, older files are untouched); pass another "
                        "--resume path or start without --resume") from None


def rng_state() -> dict:
    """Python, numpy, torch CPU (and CUDA) RNG states as tensors / lists / numbers (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(d: dict) -> None:
    """Restore the states captured by `rng_state` (CUDA states only when CUDA is there)."""
    version, mt, gauss = d["python"]
    random.setstate((version, tuple(mt), gauss))
    n = d["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(d["torch"].cpu())
    if "cuda" in d and torch.cuda.is_available() and len(d["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in d["cuda"]])


def git_commit() -> str:
    """Short sha of the repository holding this file, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def write_config(run_dir, args, dataset_info: dict) -> None:
    """run_dir/config.json = {"args", "dataset", "git_commit", "command", "torch"} (main rank only)."""
    if not is_main():
        return
    a = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    save_json(pathlib.Path(run_dir) / "config.json",
              {"args": a, "dataset": dataset_info, "git_commit": git_commit(), "command": sys.argv,
               "torch": torch.__version__})


# ----------------------------------------------------------------------------------------------------------------
# Progress line
# ----------------------------------------------------------------------------------------------------------------


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_scalar(v) -> str:
    v = float(v.item() if torch.is_tensor(v) else v)
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


class Progress:
    """One progress line, e.g. `[simclr] ep 3/200 it 40/48 | loss 4.1234 | lr 0.4812 | 1234 img/s | ETA 1h02m`.

    `step(global_step, **scalars)` is called after every optimiser step with the 0-based index of that step
    (the same index the LR schedule gets); it prints every `every` steps, at the end of each epoch and at the
    last step, on the main rank only. Scalars may be device tensors: they are converted only when printing,
    and CUDA is synchronised only then, so the training loop has no per-step host sync.
    """

    def __init__(self, total_steps: int, batch_size: int, every: int = 20, prefix: str = ""):
        self.total_steps, self.batch_size, self.every, self.prefix = total_steps, batch_size, max(1, every), prefix
        self.epoch = self.epochs = None
        self.start_time = self.last_time = time.perf_counter()
        self.start_step = self.last_step = None

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """epoch as it should be shown (1-based), out of `epochs`."""
        self.epoch, self.epochs = epoch, epochs

    def step(self, global_step: int, **scalars) -> str | None:
        """Maybe print; returns the printed line (or None)."""
        if self.last_step is None:  # first call (also after a resume): time is counted from construction
            self.start_step = self.last_step = global_step - 1
        done = global_step + 1
        per_epoch = self.total_steps // self.epochs if self.epochs else 0
        epoch_end = per_epoch > 0 and done % per_epoch == 0
        if not (done % self.every == 0 or epoch_end or done >= self.total_steps) or not is_main():
            return None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        img_s = (global_step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        sec_per_step = (now - self.start_time) / max(global_step - self.start_step, 1)
        eta = _fmt_duration(sec_per_step * max(self.total_steps - done, 0))
        self.last_time, self.last_step = now, global_step
        where = (f"ep {self.epoch}/{self.epochs} it {(done - 1) % per_epoch + 1}/{per_epoch}" if per_epoch
                 else f"it {done}/{self.total_steps}")
        parts = [(f"[{self.prefix}] " if self.prefix else "") + where]
        parts += [f"{k} {_fmt_scalar(v)}" for k, v in scalars.items()]
        parts += [f"{img_s:.0f} img/s", f"ETA {eta}"]
        line = " | ".join(parts)
        print(line, flush=True)
        return line
