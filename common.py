"""Shared machinery for the four method scripts (fassl.py, tase.py, dscl.py, hybrid.py) and eval.py, as the
README's module table lists it: the run harness (`RunArgs`, `arg`, `parse_args` with the per-dataset DEFAULTS
and demo profile, argument checks, `Run`, `benchmark`, `Progress`, one-line user errors), seeding, torchrun,
device / AMP / TF32 / channels_last / torch.compile setup, backbones (torchvision ResNet-18/34/50/152, the He
et al. CIFAR ResNet-8/20/32 in the LDAM-DRW layout), projection MLPs, EMA, LR schedules, the shared NT-Xent,
run directories, atomic JSON / checkpoint writes and RNG states."""
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
from typing import NoReturn, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.models import resnet as tv_resnet

# --- Command line: one dataclass per script -> argparse, dataset defaults, checks ---------------------------

def arg(default, help: str, **kw) -> dataclasses.Field:
    """A dataclass field with a one-line doc. Keywords go into the field metadata:
    choices=[...]; check=">0" | ">=0" | ">=1" | "[0,1]" | "[0,1)" | "(0,1]" | "(0,1)" | "batch" (validated by
    `check_args`); runtime=True (a flag that does not change the method: left out of the variant label).
    A list default becomes a default_factory that returns a fresh copy."""
    metadata = {"help": help, **kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class RunArgs:
    """The runtime flags every script shares: same names, defaults and meaning in all four (README)."""
    dataset: str = arg("cifar10-lt", "data set (docs/data.md lists them; synthetic-lt needs no files)")
    data_dir: str = arg("./data", "data root; for --dataset folder the ImageFolder tree itself", runtime=True)
    imb_ratio: Optional[float] = arg(None, "imbalance ratio rho = n_max / n_min of a generated long tail; "
                                     "unset: 100, but a folder tree is used as it is", check=">=1")
    protocol: Optional[str] = arg(None, "CIFAR-LT convention: the one of the method's paper by default "
                                  "(docs/data.md, 'CIFAR-LT conventions')", choices=["ldam", "sdclr"])
    seed: int = arg(0, "training seed (augmentation, initialisation, sampling); a method may default to the "
                    "seed of its reference scripts")
    device: str = arg("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N", runtime=True)
    amp: str = arg("auto", "autocast dtype: auto = bf16 on CUDA (fp16 with a GradScaler where bf16 is "
                   "unsupported), off on CPU", choices=["auto", "bf16", "fp16", "off"], runtime=True)
    channels_last: bool = arg(True, "channels_last memory format on CUDA", runtime=True)
    compile: bool = arg(False, "torch.compile the networks (CUDA only)", runtime=True)
    workers: int = arg(8, "DataLoader workers for datasets read from image files", check=">=0", runtime=True)
    out_dir: str = arg("runs", "parent of the run directory <method>-<dataset>-<time>/", runtime=True)
    resume: Optional[str] = arg(None, "continue a run: its checkpoint.pt, its run directory, or auto (the "
                                "newest run of this method and dataset); the run's own settings are kept",
                                runtime=True)
    print_every: int = arg(20, "progress line every N iterations (and at the end of each epoch)", check=">=1",
                           runtime=True)
    benchmark: bool = arg(False, "time the training step on random data, print images/s, exit", runtime=True)
    benchmark_steps: int = arg(10, "timed steps of --benchmark, after 3 warm-up steps", check=">=1",
                               runtime=True)
    stop_after_epochs: Optional[int] = arg(None, "stop after N epochs of this command, checkpoint written; "
                                           "continue with --resume", check=">=1", runtime=True)
    sync_bn: bool = arg(False, "SyncBatchNorm across the processes of a torchrun run (CUDA only); default: "
                        "the method's official code's", runtime=True)


class UserError(Exception):
    """Bad input from the user. The message is ONE line that names the problem and the fix."""


def fatal(msg: str, code: int = 2) -> NoReturn:
    """Print `error: <msg>` on one line to stderr and exit with `code` (no traceback)."""
    print("error: " + " ".join(str(msg).split()), file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors():
    """`with user_errors(): ...` turns UserError into one line + exit 2, Ctrl-C into a line + exit 130."""
    try:
        yield
    except UserError as e:
        fatal(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted; checkpoints already written are intact (continue with --resume auto)",
              file=sys.stderr, flush=True)
        sys.exit(130)


def _or_none(base):
    """argparse type for Optional[...] fields: "none" / "null" -> None, anything else -> base(value)."""
    def convert(text: str):
        return None if text.lower() in ("none", "null") else base(text)
    convert.__name__ = getattr(base, "__name__", "value")  # named in argparse's "invalid <name> value"
    return convert


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        fatal(f"{message} (see {self.prog} --help)")


def _table_for(defaults: dict, dataset: str) -> dict:
    """The entries of a DEFAULTS table that apply to `dataset`: key "*" first, then keys naming it (a dataset
    name or a tuple of names), later entries winning."""
    out = dict(defaults.get("*", {}))
    for key, values in defaults.items():
        if key != "*" and dataset in ((key,) if isinstance(key, str) else key):
            out.update(values)
    return out


def _default_help(defaults: dict, name: str) -> str:
    """ "inat2018: resnet50; synthetic-lt: resnet8; others: resnet32" for the --help of a DEFAULTS field."""
    parts, other = [], None
    for key, values in defaults.items():
        if name in values:
            shown = "set from other flags" if callable(values[name]) else _flag_value(values[name])
            if key == "*":
                other = f"others: {shown}"
            else:
                parts.append(f"{key if isinstance(key, str) else '/'.join(key)}: {shown}")
    return "; ".join(parts + ([other] if other else []))


def make_parser(cls, defaults: dict | None = None) -> argparse.ArgumentParser:
    """argparse parser for dataclass `cls` (a RunArgs subclass): the script's own flags first, then the shared
    runtime flags. A field that appears in `defaults` shows its per-dataset values."""
    parser = _Parser(description=inspect.getdoc(cls), formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    for title, shared in (("method flags", False), ("runtime (shared by the four scripts)", True)):
        group = parser.add_argument_group(title)
        for f in [f for f in dataclasses.fields(cls) if (f.name in RunArgs.__dataclass_fields__) == shared]:
            tp = hints[f.name]
            optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
            if optional:
                tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kw = {"dest": f.name, "default": default, "help": f.metadata.get("help", "").replace("%", "%%")}
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) is list:
                kw["nargs"], kw["type"] = "*", typing.get_args(tp)[0]
            else:             # "none" means None, unless it is one of the flag's choices
                kw["type"] = _or_none(tp) if optional and "none" not in f.metadata.get("choices", ()) else tp
            if "choices" in f.metadata:
                kw["choices"] = list(f.metadata["choices"])
            if f.name == "dataset":
                import data                           # noqa: PLC0415 (data imports this module)
                kw["choices"] = list(data.DATASETS)
            by_dataset = _default_help(defaults or {}, f.name)
            shown = f"default: {by_dataset}" if by_dataset else "default: %(default)s"
            if f.metadata.get("check"):
                shown += f"; {_CHECKS[f.metadata['check']][1]}"
            kw["help"] += f" ({shown})"
            group.add_argument("--" + f.name.replace("_", "-"), **kw)
    return parser


def parse_args(cls, argv=None, defaults: dict | None = None):
    """Parse `argv` into `cls`; then fill the dataset-dependent defaults of `defaults` (a script's DEFAULTS
    table: {"*" or dataset or (datasets...): {field: value or f(args)}}) into every field NOT given on the
    command line. Callables are evaluated after the plain values, in table order.

    Returns (args, filled): filled = {field: value} applied, printed by `Run` and stored in config.json and
    results.json. Impossible values exit with one line and status 2 (see `check_args`)."""
    parser = make_parser(cls, defaults)
    args = cls(**vars(parser.parse_args(argv)))
    given = {name for name in given_flags(cls, argv) if getattr(args, name) is not None}   # "none" = unset
    filled = fill_defaults(args, defaults, given=given)
    filled.update(lab_scale(args))
    with user_errors():
        check_args(args)
    return args, filled


def lab_scale(args) -> dict:
    """LAB_SCALE=f (0 < f < 1) in the environment shrinks every *epochs argument to max(1, round(f * value))
    and the synthetic-lt class sizes, so that the labs' commands run in seconds in the tests (labs/README.md).
    Returns what it changed (recorded with the filled defaults)."""
    f = float(os.environ.get("LAB_SCALE", 1))
    if not 0 < f < 1:
        return {}
    changed = {k: max(1 if k.endswith("epochs") else 8, round(f * v)) for k, v in vars(args).items()
               if (k.endswith("epochs") or k.startswith("synthetic_n")) and type(v) is int and v > 0}
    vars(args).update(changed)
    return changed


def given_flags(cls, argv) -> set[str]:
    """Field names set explicitly on the command line `argv`."""
    parser = make_parser(cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)).keys())


_CHECKS = {">0": (lambda v: v > 0, "> 0"), ">=0": (lambda v: v >= 0, ">= 0"),
           ">=1": (lambda v: v >= 1, ">= 1"),
           "batch": (None, "> 0, at most the training set; under torchrun the global batch, LR unchanged"),
           "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"), "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"), "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)")}


def check_args(args, train_size: int | None = None) -> None:
    """Raise a one-line UserError for the first field outside the range its arg(check=...) declares.
    check="batch": > 0, and at most `train_size` once the training set is known."""
    for f in dataclasses.fields(args):
        rule, value = f.metadata.get("check"), getattr(args, f.name)
        if rule is None or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if rule == "batch":
                if v <= 0 or (train_size is not None and v > train_size):
                    limit = f" and at most the {train_size} training images" if train_size else ""
                    raise UserError(f"{flag} {v} is impossible: a batch size must be > 0{limit}")
            elif not (isinstance(v, (int, float)) and math.isfinite(v) and _CHECKS[rule][0](v)):
                raise UserError(f"{flag} {v} is out of range: it must be {_CHECKS[rule][1]}")


# --- Seeding, ranks, device and precision -------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device); cuDNN autotuning on."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = True


def epoch_seed(seed: int, epoch: int, stream: int = 0, per_process: bool = True) -> int:
    """Seed of one epoch's random stream (augmentation, sampling): a function of (seed, epoch), so a resumed
    run draws exactly what an uninterrupted one draws. `stream` separates independent streams. Under torchrun
    each process gets its own stream (process 0 the single-process one); per_process=False gives every
    process the same stream (the data order, which the processes then split)."""
    rank = get_rank_world()[0] if per_process else 0
    return int(np.random.SeedSequence([seed, epoch, stream] + [rank] * (rank > 0)).generate_state(
        1, np.uint64)[0] >> 1)


# --- Several processes: torchrun, one process per GPU (README, 'Many GPUs and machines') --------------------

def get_rank_world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) for a plain `python script.py` launch."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """True on the process that prints and saves (rank 0)."""
    return get_rank_world()[0] == 0


def init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL with one GPU per process
    (cuda:LOCAL_RANK), gloo on CPUs. Processes other than 0 print nothing. Returns this process's device."""
    rank, world = get_rank_world()
    if world == 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if rank > 0:
        sys.stdout = open(os.devnull, "w")                      # one progress line, one table
    return device


def gather(x: torch.Tensor) -> torch.Tensor:
    """The global batch: every process's `x` concatenated in rank order (`x` itself in one process). With
    gradient when x needs one: each process computes the loss of the whole batch, its own part receives the
    gradient of every copy (the sum), and DDP's average then gives exactly the single-process gradient."""
    return _Gather.apply(x) if dist.is_initialized() and dist.get_world_size() > 1 else x


class _Gather(torch.autograd.Function):
    """all_gather forward; backward: the sum over processes of the gradient, this process's rows of it."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        dist.all_reduce(grad := grad.contiguous())
        return local_part(grad)


def local_part(x: torch.Tensor) -> torch.Tensor:
    """This process's rows of a gathered tensor (the inverse of `gather`)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return x.chunk(world)[rank] if world > 1 else x


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the processes (the tensor itself in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def setup_device(device: str = "auto", amp: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """Pick the device ("auto": cuda if available, else cpu) and the autocast dtype (README, 'Speed'): amp
    "auto" is bf16 on a GPU that supports it, else fp16 (with a GradScaler, `make_scaler`), and off (None) on
    the CPU; "bf16" | "fp16" | "off" force a choice. TF32 is turned on for CUDA devices."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r} is not a device ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    if amp != "auto" and amp not in _AMP:
        raise UserError(f"--amp {amp!r} is unknown; use one of auto, bf16, fp16, off")
    amp_dtype = _AMP.get(amp)                                                     # "auto": None on the CPU
    if amp == "auto" and dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cuda":  # TF32 matmuls / convolutions; CPU numerics are left exact
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    return dev, amp_dtype


def amp_name(amp_dtype) -> str:
    """"bf16" | "fp16" | "off": the name results.json and the progress line use for an autocast dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off")


def autocast(device, amp_dtype):
    """torch.autocast on `device` with `amp_dtype`, or a no-op context when amp_dtype is None."""
    return torch.autocast(torch.device(device).type, amp_dtype) if amp_dtype else contextlib.nullcontext()


def make_scaler(amp_dtype) -> torch.amp.GradScaler:
    """GradScaler that is enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)


def prepare_model(model: nn.Module, device, channels_last: bool = True, compile: bool = False,
                  ddp: bool = False, sync_bn: bool = False) -> nn.Module:
    """Move to `device`; channels_last memory format and (if asked) torch.compile on CUDA only. ddp=True (a
    trained network): DistributedDataParallel under torchrun, with SyncBatchNorm if sync_bn and on CUDA.
    Returns the (maybe wrapped, compiled) module; `unwrap` gives the original."""
    device = torch.device(device)
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if ddp and dist.is_initialized() and dist.get_world_size() > 1:
        if sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] * (device.type == "cuda")
                                                    or None)
    if compile and device.type == "cuda":
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile's `_orig_mod` and DDP / DataParallel `.module` wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while hasattr(model, "_orig_mod") or isinstance(model, wrappers):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


# --- Backbones ----------------------------------------------------------------------------------------------

class TorchvisionResNet(tv_resnet.ResNet):
    """torchvision ResNet without its fc. State-dict keys are torchvision's (conv1, bn1, layer1..4).
    cifar_stem: conv1 = 3x3 stride 1 (no bias) and no max-pool, for inputs <= 64 px (SDCLR's CIFAR code).
    forward(x) -> pooled (N, out_dim); forward(x, return_map=True) -> (pooled, last feature map)."""

    def __init__(self, block, layers, cifar_stem: bool, zero_init_residual: bool = False):
        super().__init__(block, layers, zero_init_residual=zero_init_residual)
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
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
    The last map is 8x8 at 32 px, so feature_stride = 4 (RoIAlign spatial_scale = 1/4 in dscl.py)."""

    def __init__(self, depth: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, self.layer2, self.layer3 = (       # each stage takes planes // stride channels in
            nn.Sequential(_CifarBlock(planes // stride, planes, stride),
                          *[_CifarBlock(planes, planes, 1) for _ in range(n - 1)])
            for planes, stride in ((16, 1), (32, 2), (64, 2)))
        self.out_dim, self.feature_stride = 64, 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x, return_map: bool = False):
        fmap = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        pooled = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        return (pooled, fmap) if return_map else pooled


_TORCHVISION = {"resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
                "resnet34": (tv_resnet.BasicBlock, [3, 4, 6, 3]),
                "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
                "resnet152": (tv_resnet.Bottleneck, [3, 8, 36, 3])}
_CIFAR_DEPTH = {"resnet8": 8, "resnet20": 20, "resnet32": 32}
ARCHS = tuple(_TORCHVISION) + tuple(_CIFAR_DEPTH)


def build_backbone(arch: str, image_size: int = 32, zero_init_residual: bool = False) -> nn.Module:
    """Backbone without classifier. resnet18/34/50/152: torchvision layout, CIFAR stem when image_size <= 64.
    resnet8/20/32: He et al. / LDAM CIFAR ResNet (64-d). Attributes `.out_dim`, `.feature_stride`.
    zero_init_residual (torchvision's option; resnet18-152 only): each residual block's last BN gamma = 0."""
    if arch in _TORCHVISION:
        return TorchvisionResNet(*_TORCHVISION[arch], image_size <= 64, zero_init_residual)
    if arch in _CIFAR_DEPTH:
        return CifarResNet(_CIFAR_DEPTH[arch])
    raise UserError(f"--arch {arch!r} is unknown; use one of {', '.join(ARCHS)}")


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = True,
                   last_bn: bool = False, bias_last: bool = True) -> nn.Sequential:
    """(Linear [+BN] + ReLU) x (num_layers - 1), then Linear [+BN if last_bn]: num_layers counts the Linears.
    The last BN is a standard affine BatchNorm1d, as in the SDCLR / SimCLR heads (SDCLR `models/utils.py`).
    Hidden Linears have no bias when followed by BN (the BN mean would cancel it)."""
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


# --- EMA and learning-rate schedules ------------------------------------------------------------------------

@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, tau: float, buffers: str) -> None:
    """theta_t <- tau * theta_t + (1 - tau) * theta_s over all parameters (foreach ops, in place).
    buffers="ema": floating buffers (BN running mean / var) averaged the same way, integer ones copied;
    buffers="none": the target keeps its own buffers (MoCo's key encoder)."""
    target, source = unwrap(target), unwrap(source)
    t_params, s_params = list(target.parameters()), list(source.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"ema_update: target has {len(t_params)} parameters, source {len(s_params)}")
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - tau)
    if buffers not in ("ema", "none"):
        raise ValueError(f"ema_update: buffers={buffers!r}; use 'ema' or 'none'")
    if buffers == "ema":
        for tb, sb in zip(target.buffers(), source.buffers()):
            if tb.is_floating_point():
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
    """base_lr * gamma ** #(milestones <= epoch). The LDAM / DSCL loops pass the 0-based epoch (milestones
    120, 160: x0.1 from the 121st epoch); SDCLR's probe passes e = 1..E (milestones 10, 20: 30 for e < 10)."""
    return base_lr * gamma ** sum(1 for m in milestones if m <= epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- Shared contrastive loss --------------------------------------------------------------------------------

def _per_anchor(value: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """(B,) per image -> (2B,) per anchor (both views of image i get value[i]); 1 or 2B values as given."""
    value = value.float().reshape(-1)
    if value.numel() == batch:
        return torch.cat([value, value])
    if value.numel() in (1, 2 * batch):
        return value
    raise ValueError(f"nt_xent: {what} has {value.numel()} entries; expected 1, B={batch} or 2B={2 * batch}")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature, weight=None, reduction: str = "mean"):
    """NT-Xent with per-anchor temperature (SimCLR, Chen et al. 2020; docs/tase.md for the per-anchor form):

        l_j = - a_j . a_p(j) / tau_j + LSE_{k != j}( a_j . a_k / tau_j ),  a = n([z1; z2]),
        p(j) = (j + B) mod 2B

    z1, z2: (B, D) views; normalised in fp32 and the logits built in fp32 outside autocast.
    temperature: float, 0-d tensor, (B,) per image or (2B,) per anchor; weight: None, (B,) or (2B,).
    Returns mean_j weight_j * l_j ("mean") or the (2B,) vector ("none")."""
    batch = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        a = F.normalize(torch.cat([z1, z2]).float(), dim=-1)                     # fp32 unit vectors
        sim = a @ a.T
        tau = (_per_anchor(temperature, batch, "temperature")[:, None] if torch.is_tensor(temperature)
               else float(temperature))
        logits = (sim / tau).masked_fill(torch.eye(len(a), dtype=torch.bool, device=a.device), float("-inf"))
        positives = (torch.arange(2 * batch, device=a.device) + batch) % (2 * batch)
        loss = F.cross_entropy(logits, positives, reduction="none")               # l_j above
        if weight is not None:
            loss = loss * (_per_anchor(weight, batch, "weight") if torch.is_tensor(weight) else float(weight))
    if reduction not in ("mean", "none"):
        raise ValueError(f"nt_xent: reduction={reduction!r}; use 'mean' or 'none'")
    return loss.mean() if reduction == "mean" else loss


# --- Run directory, JSON, metrics, checkpoints, RNG states --------------------------------------------------

def make_run_dir(method: str, dataset: str, out_dir: str = "runs", resume: str | None = None) -> pathlib.Path:
    """Directory of this run: a new runs/<method>-<dataset>-<YYYYmmdd-HHMMSS>/; with resume=<checkpoint file>
    its parent, with resume=<run dir> that dir; with resume="auto" the matching run dir whose checkpoint.pt
    was written last (a new dir if there is none). A resume path that does not exist raises UserError."""
    out = pathlib.Path(out_dir)
    if resume == "auto":
        pattern = re.compile(re.escape(f"{method}-{dataset}-") + r"\d{8}-\d{6}(-\d+)?")
        found = [p for p in out.glob(f"{method}-{dataset}-*/checkpoint.pt")
                 if pattern.fullmatch(p.parent.name)]
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
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return obj.tolist()                                  # a 0-d tensor or array gives a Python number
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (pathlib.Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _atomic_write(path, write) -> None:
    """write(file) into <path>.tmp beside `path`, flush + fsync, then os.replace onto `path` and fsync the
    directory. A crash or exception before the replace leaves the previous `path` untouched."""
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
    with contextlib.suppress(OSError):      # make the rename durable (best effort: not every OS opens dirs)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_json(path, obj) -> None:
    """Atomic JSON write (indent=2); numpy / torch scalars and arrays are converted."""
    text = json.dumps(obj, indent=2, default=_to_json)
    _atomic_write(path, lambda f: f.write(text.encode() + b"\n"))


def append_metrics(run_dir, record: dict) -> None:
    """Append one JSON line to run_dir/metrics.jsonl (main rank only)."""
    if is_main():
        with open(pathlib.Path(run_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=_to_json) + "\n")


def save_checkpoint(path, state: dict) -> None:
    """Atomic torch.save (`_atomic_write`; a failed write leaves the previous checkpoint as it was), main rank
    only. `state` holds only tensors, numbers, strings, lists, tuples and dicts, which `load_checkpoint`
    (weights_only=True) reads."""
    if not is_main():
        return
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); the previous checkpoint "
                        "there is intact; free disk space or choose another --out-dir") from None


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True). A missing, truncated or corrupt file raises a one-line UserError."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass an existing checkpoint file or run "
                        "directory (--resume / --ckpt), or start without --resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, non-weights object: torch raises several kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"checkpoint {path} is unreadable ({reason}); it was truncated or damaged outside "
                        "this program (checkpoint writes are atomic, older files are untouched); pass "
                        "another --resume path or start without --resume") from None


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
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


# --- Progress line ------------------------------------------------------------------------------------------

def _fmt_duration(seconds: float) -> str:
    h, rem = divmod(max(0, int(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _fmt_scalar(v) -> str:
    v = float(v.item() if torch.is_tensor(v) else v)
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


class Progress:
    """One progress line: `[simclr] ep 3/200 it 40/48 | loss 4.1234 | lr 0.4812 | 1234 img/s | ETA 1h02m`.
    `step(global_step, **scalars)` is called after every optimiser step with the 0-based index of that step
    (the same index the LR schedule gets); it prints every `every` steps, at the end of each epoch and at the
    last step, on the main rank only. Scalars may be device tensors: they are converted only when printing,
    and CUDA is synchronised only then, so the training loop has no per-step host sync."""

    def __init__(self, total_steps: int, batch_size: int, every: int = 20, prefix: str = ""):
        self.total_steps, self.batch_size, self.every = total_steps, batch_size, max(1, every)
        self.prefix, self.epoch, self.epochs = prefix, None, None
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
        line = " | ".join([(f"[{self.prefix}] " if self.prefix else "") + where,
                           *[f"{k} {_fmt_scalar(v)}" for k, v in scalars.items()],
                           f"{img_s:.0f} img/s", f"ETA {eta}"])
        print(line, flush=True)
        return line


# --- Benchmark timer ----------------------------------------------------------------------------------------

def benchmark(name: str, step, images_per_step: int, steps: int, device, amp_dtype, warmup: int = 3) -> float:
    """Time `step()` (one full training step on random data; returns a device tensor): `warmup` untimed calls,
    then `steps` timed ones with one host sync at the end. Prints and returns images/s."""
    for _ in range(warmup):
        out = step()
    float(out)
    t = time.perf_counter()
    for _ in range(steps):
        out = step()
    float(out)
    dt = (time.perf_counter() - t) / steps
    print(f"[{name} benchmark] {dt * 1000:.1f} ms/step, {images_per_step / dt:.0f} images/s "
          f"({images_per_step} images/step, {torch.device(device)}, amp {amp_name(amp_dtype)})", flush=True)
    return images_per_step / dt


# --- One run: resume, run directory, config, loss guard, checkpoints, paper setting, results ----------------

def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def fill_defaults(args, defaults: dict, given=()) -> dict:
    """Set the DEFAULTS entries for args.dataset on every field not in `given`; returns what was set."""
    filled, rho = {}, None if args.dataset == "folder" else 100.0      # a folder tree is used as it is
    table = {"imb_ratio": rho, **_table_for(defaults or {}, args.dataset)}
    for lazy in (False, True):
        for name, value in table.items():
            if name in given or callable(value) != lazy:
                continue
            value = value(args) if lazy else value
            setattr(args, name, list(value) if isinstance(value, (list, tuple)) else value)   # a copy
            filled[name] = getattr(args, name)
    return filled


def paper_dataset(ds) -> str:
    """The name a paper gives `ds`: its own name, or cifar10-lt / cifar100-lt for a JPEG copy of CIFAR read as
    --dataset folder (docs/data.md)."""
    if ds.name == "folder" and ds.image_source == "jpeg-copy" and ds.num_classes in (10, 100):
        return f"cifar{ds.num_classes}-lt"
    return ds.name


def paper_setting(args, paper: dict, dataset: str) -> bool:
    """True only on a dataset `paper` names, with every argument the paper fixes at the paper's value."""
    named = [k for k in paper if k != "*" and dataset in ((k,) if isinstance(k, str) else k)]
    fixed = _table_for(paper, dataset)
    return bool(named) and all(_same(getattr(args, k), v(args) if callable(v) else v)
                               for k, v in fixed.items())


def variant_label(args, defaults: dict) -> str:
    """One rule for every script: the flags (dataset, rho, seed and runtime flags aside) whose value differs
    from the default run on this dataset; "default" when there is none."""
    ref = type(args)(dataset=args.dataset)
    fill_defaults(ref, defaults)
    diff = [f for f in dataclasses.fields(args) if f.name not in ("dataset", "imb_ratio", "seed")
            and not f.metadata.get("runtime") and not _same(getattr(args, f.name), getattr(ref, f.name))]
    return " ".join(_as_flag(f.name, getattr(args, f.name)) for f in diff) or "default"


def _as_flag(name: str, value) -> str:
    """The command-line form of one setting: --flag / --no-flag for booleans, --flag VALUE otherwise."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {_flag_value(value)}"


def _flag_value(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


class NonFiniteLoss(Exception):
    """A training loss that is NaN or infinite (see Run.end_epoch)."""


class StopRun(Exception):
    """--stop-after-epochs reached (see Run.end_epoch): the run ends early, its checkpoint written."""


class Run:
    """What every script does around its training loops, in one place:

      run = common.Run("hybrid-sc", args, filled, DEFAULTS, PAPER)   # --resume, device, AMP, seed
      run.start(ds)                      # checks vs the data, run directory, config.json, what was filled
      ck = run.restore()                 # after building the models: the checkpoint (or None), RNG restored
      for epoch ...: run.end_epoch(epoch, loss, record, state)   # loss guard, metrics.jsonl, checkpoint.pt
      results = run.results(ds, protocol, network, epochs); ...; run.finish(results)

    On --resume the run's own settings come from its checkpoint; only the runtime flags of this command line
    (device, AMP, workers, ...) are taken from the command line."""

    def __init__(self, method, args, filled: dict, defaults: dict | None = None, paper: dict | None = None,
                 label=None):
        """method / label: a name, or a function of the args (a resumed run's own args may name another)."""
        def name(a):
            return method(a) if callable(method) else method
        self.args, self.filled, self.defaults, self.paper = args, dict(filled), defaults or {}, paper or {}
        self.run_dir, self.ckpt, self.t0, self.wall0, self.epochs_run = None, None, time.time(), 0.0, 0
        self.method = name(args)
        if args.resume:
            run_dir = make_run_dir(self.method, args.dataset, args.out_dir, args.resume)
            path = pathlib.Path(args.resume)
            path = path if path.is_file() else run_dir / "checkpoint.pt"
            if path.is_file():                       # "auto" with no earlier run starts a fresh one
                self.ckpt, self.run_dir = load_checkpoint(path), run_dir
                self._restore_args(path)
        self.method = name(self.args)
        self.label = (label(self.args) if callable(label) else label) or self.method
        self.device, self.amp_dtype = setup_device(init_distributed(self.args.device), self.args.amp)
        self.amp = amp_name(self.amp_dtype)
        seed_everything(self.args.seed)

    def _restore_args(self, path) -> None:
        """The run's own settings from its checkpoint. The shared runtime flags come from this command line,
        and so does a script's own runtime flag (runtime=True) set here to a non-default value."""
        saved, now = self.ckpt.get("args", {}), self.args
        fields = {f.name: f for f in dataclasses.fields(now)}
        default = type(now)(dataset=saved.get("dataset", now.dataset))
        fill_defaults(default, self.defaults)
        keep = {k: v for k, v in saved.items() if k in fields and not (
            fields[k].metadata.get("runtime") and (k in RunArgs.__dataclass_fields__
                                                   or not _same(getattr(now, k), getattr(default, k))))}
        changed = [f"--{k.replace('_', '-')}" for k, v in keep.items() if not _same(getattr(now, k), v)]
        self.args = dataclasses.replace(now, **keep)
        self.filled = self.ckpt.get("filled", self.filled)
        print(f"[{self.method}] resuming {path} after epoch {self.ckpt.get('epoch')}"
              + (f"; the run's own {' '.join(changed)} kept" if changed else ""), flush=True)

    def start(self, ds, header: str = "") -> pathlib.Path:
        """Check the arguments against the training set, make the run directory, write config.json, print."""
        import data                                   # noqa: PLC0415 (data imports this module)
        check_args(self.args, train_size=len(ds.train))
        self.paper_ds = paper_dataset(ds)
        fresh = self.run_dir is None
        if fresh:
            made = [make_run_dir(self.method, self.args.dataset, self.args.out_dir) if is_main() else None]
            if dist.is_initialized():
                dist.broadcast_object_list(made)                     # process 0 names it
            self.run_dir = made[0]
        if is_main():
            print(data.describe(ds))
            print(f"[{self.method}] run dir {self.run_dir} | {self.device} | amp {self.amp}"
                  + (f" | {header}" if header else ""), flush=True)
            if self.filled:
                demo = (" (a CPU demo profile, not a paper setting)" if self.args.dataset == "synthetic-lt"
                        else "")
                print(f"[{self.method}] defaults for {self.args.dataset}{demo}: "
                      + " ".join(_as_flag(k, v) for k, v in self.filled.items())
                      + "; a flag on the command line overrides any of them", flush=True)
            if fresh:
                save_json(self.run_dir / "config.json",
                          {"args": dataclasses.asdict(self.args), "filled_defaults": self.filled,
                           "dataset": ds.info(), "git_commit": git_commit(), "command": sys.argv,
                           "torch": torch.__version__})
        return self.run_dir

    def restore(self) -> dict | None:
        """The checkpoint this run resumes from (None for a fresh run), with the RNG states put back."""
        if self.ckpt is not None:
            set_rng_state(self.ckpt["rng"])
            self.wall0 = self.ckpt.get("wall_time_s", 0.0)
        return self.ckpt

    def wall_time(self) -> float:
        return self.wall0 + time.time() - self.t0

    def progress(self, total_steps: int, batch_size: int, prefix: str | None = None) -> "Progress":
        return Progress(total_steps, batch_size, self.args.print_every, prefix or self.method)

    def check_loss(self, loss, where: str) -> float:
        """The loss guard: one host sync per call (once per epoch). A NaN or infinite loss ends the run."""
        value, last = float(all_mean(loss)), self.run_dir / "checkpoint.pt"
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the training loss is {value} in {where}; usual causes: a learning rate too "
                                "high (--lr) or fp16 overflow (try --amp bf16 or --amp off); nothing of this "
                                "epoch was saved" + (f", {last} holds the last finite epoch" if last.is_file()
                                                     else ""))
        return value

    def save(self, state: dict, name: str = "checkpoint.pt") -> None:
        """Atomic checkpoint with the run's args, filled defaults, RNG states and wall time added."""
        save_checkpoint(self.run_dir / name, {**state, "method": self.label, "filled": self.filled,
                                              "args": dataclasses.asdict(self.args), "rng": rng_state(),
                                              "wall_time_s": self.wall_time()})

    def end_epoch(self, epoch: int, loss, record: dict, state: dict, where: str | None = None) -> None:
        """Loss guard, then one metrics.jsonl line and checkpoint.pt (epoch = epochs done, 1-based); StopRun
        after --stop-after-epochs epochs of this command."""
        value = self.check_loss(loss, where or f"epoch {epoch}")
        append_metrics(self.run_dir, {"epoch": epoch, "loss": value, **record, "time_s": self.wall_time()})
        self.save({**state, "epoch": epoch})
        self.epochs_run += 1
        if self.epochs_run == self.args.stop_after_epochs:
            raise StopRun(f"[{self.method}] stopped after {self.epochs_run} epochs (--stop-after-epochs); "
                          f"continue with --resume {self.run_dir}")

    def results(self, ds, protocol: str, network: str, epochs: dict) -> dict:
        """results.json skeleton with the run's method label, variant, paper_setting, AMP, seed, wall time."""
        import eval as evaluation                    # noqa: PLC0415 (eval imports this module)
        res = evaluation.results_skeleton(self.label, variant_label(self.args, self.defaults),
                                          paper_setting(self.args, self.paper, self.paper_ds), ds, protocol,
                                          network, getattr(self.args, "arch", None), epochs, self.args.seed,
                                          self.amp, self.wall_time())
        res["defaults_filled"] = self.filled
        return res

    def finish(self, results: dict) -> None:
        """Write results.json (and its plots); print where."""
        import eval as evaluation                    # noqa: PLC0415
        results["wall_time_s"] = self.wall_time()
        if is_main():
            evaluation.write_results(self.run_dir, results)
            print(f"[{self.method}] results: {self.run_dir / 'results.json'}", flush=True)


def main_guard(main, argv=None):
    """Run `main(argv)`: a user error ends in one line + exit 2, a non-finite loss in one line + exit 1."""
    try:
        with user_errors():
            return main(argv)
    except NonFiniteLoss as e:
        fatal(str(e), code=1)
    except StopRun as e:
        print(e, flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
