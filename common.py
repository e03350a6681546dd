"""The building blocks the four method scripts share.

Backbones (torchvision ResNet-18/34/50/152, the He et al. CIFAR ResNet-8/20/32 of LDAM-DRW),
projection MLPs, the EMA update, learning-rate schedules, the shared NT-Xent loss, one optimiser
step, device and autocast set-up, the torchrun primitives (gather, local_part, all_mean), and the
one error type a user sees. Nothing here knows about runs or command lines: that is harness.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --- The error a user sees ------------------------------------------------------------------------


class UserError(Exception):
    """Bad input from the user. The message is ONE line that names the problem and the fix."""


def fatal(msg: str, code: int = 2) -> NoReturn:
    """Print `error: <msg>` on one line to stderr and exit with `code` (no traceback)."""
    print("error: " + " ".join(str(msg).split()), file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors():
    """`with user_errors():` turns a UserError into one line and exit 2, Ctrl-C into exit 130."""
    try:
        yield
    except UserError as e:
        fatal(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted; checkpoints already written are intact (continue with --resume auto)",
              file=sys.stderr, flush=True)
        sys.exit(130)


# --- Several processes: torchrun, one process per GPU (docs/distributed.md) -----------------------

def get_rank_world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) for a plain `python X.py`."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """True on the process that prints and saves (rank 0)."""
    return get_rank_world()[0] == 0


def several_processes() -> bool:
    """True inside a torchrun job of two or more processes whose process group is up."""
    return dist.is_initialized() and dist.get_world_size() > 1


def epoch_seed(seed: int, epoch: int, stream: int = 0, per_process: bool = True) -> int:
    """Seed of one epoch's random stream (augmentation, sampling), a function of (seed, epoch,
    stream): a resumed run draws exactly what an uninterrupted one draws. Under torchrun each
    process gets its own stream (process 0 the single-process one); per_process=False gives every
    process the same stream (the data order, which the processes then split)."""
    rank = get_rank_world()[0] if per_process else 0
    words = [seed, epoch, stream]
    if rank > 0:
        words.append(rank)
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return int(state >> 1)


def init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL with one GPU per
    process (cuda:LOCAL_RANK), gloo on CPUs. Processes other than 0 print nothing. Returns
    this process's device."""
    rank, world = get_rank_world()
    if world == 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # one progress line, one table
    return device


def gather(x: torch.Tensor) -> torch.Tensor:
    """The global batch: every process's `x` concatenated in rank order (`x` itself in one
    process). With gradient when x needs one: each process computes the loss of the whole batch,
    its own part receives the gradient of every copy (the sum), and DDP's average then gives
    exactly the single-process gradient."""
    if several_processes():
        return _Gather.apply(x)
    return x


class _Gather(torch.autograd.Function):
    """all_gather forward; backward: the sum over processes of the gradient, this process's
    rows of it."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return local_part(grad)


def local_part(x: torch.Tensor) -> torch.Tensor:
    """This process's rows of a gathered tensor (the inverse of `gather`)."""
    if not several_processes():
        return x
    return x.chunk(dist.get_world_size())[dist.get_rank()]


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the processes (the tensor itself in one process)."""
    if several_processes():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def broadcast_buffers(module: nn.Module) -> None:
    """Process 0's buffers (BN running statistics) on every process: what a checkpoint holds is then
    what every process evaluates with. Nothing happens in one process."""
    if several_processes():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


# --- Device, autocast, memory format, compilation -------------------------------------------------

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def setup_device(device: str = "auto", amp: str = "auto"):
    """Pick the device ("auto": cuda if available, else cpu) and the autocast dtype: amp "auto" is
    bf16 on a GPU that supports it, else fp16 (with a GradScaler, `make_scaler`), and off (None) on
    the CPU; "bf16" | "fp16" | "off" force a choice. TF32 is turned on for CUDA devices."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r} is not a device ({e}); use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
    if amp != "auto" and amp not in AMP_DTYPES:
        raise UserError(f"--amp {amp!r} is unknown; use one of auto, bf16, fp16, off")
    amp_dtype = AMP_DTYPES.get(amp)  # "auto": None on the CPU
    if amp == "auto" and dev.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cuda":  # TF32 matmuls and convolutions; CPU numerics are left exact
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    return dev, amp_dtype


def amp_name(amp_dtype) -> str:
    """"bf16" | "fp16" | "off": the name results.json and the progress line use for
    an autocast dtype."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off")


def autocast(device, amp_dtype):
    """torch.autocast on `device` with `amp_dtype`, or a no-op context when amp_dtype is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, amp_dtype)


def make_scaler(amp_dtype) -> torch.amp.GradScaler:
    """GradScaler that is enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)


def optimizer_step(loss, optimizer, scaler=None, keep=()) -> None:
    """One update: clear the gradients, backward the loss (scaled for fp16), step, update the
    scaler. Parameters in `keep` stay as they are: their gradients are dropped before the step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    for p in keep:
        p.grad = None
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def prepare_model(model: nn.Module, device, channels_last: bool = False, compile: bool = False,
                  ddp: bool = False, sync_bn: bool = False) -> nn.Module:
    """Move to `device`; channels_last memory format on CUDA only; torch.compile if asked (inductor,
    any device; the environment variable COMPILE_BACKEND picks another backend, docs/usage.md).
    ddp=True (a trained network): DistributedDataParallel under torchrun, with SyncBatchNorm if
    sync_bn and on CUDA. Returns the (maybe wrapped, compiled) module; `unwrap` undoes it."""
    device = torch.device(device)
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if ddp and several_processes():
        if sync_bn and device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile:
        model = torch.compile(model, backend=os.environ.get("COMPILE_BACKEND", "inductor"))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Strip torch.compile's `_orig_mod` and DDP / DataParallel `.module` wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while hasattr(model, "_orig_mod") or isinstance(model, wrappers):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


# --- Backbones ------------------------------------------------------------------------------------

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet152")
CIFAR_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32}
ARCHS = TORCHVISION_ARCHS + tuple(CIFAR_DEPTHS)


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet without its fc; state-dict keys are torchvision's (conv1, bn1,
    layer1..4). cifar_stem: conv1 = 3x3 stride 1 (no bias) and no max-pool, for inputs <= 64 px
    (SDCLR's CIFAR code). forward(x) -> pooled (N, out_dim); forward(x, return_map=True) -> (pooled,
    last feature map)."""

    def __init__(self, arch: str, cifar_stem: bool, zero_init_residual: bool = False):
        super().__init__()
        from torchvision.models import resnet  # imported only where one of these backbones is built
        net = getattr(resnet, arch)(weights=None, zero_init_residual=zero_init_residual)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.avgpool = net.avgpool
        self.out_dim = net.fc.in_features
        self.feature_stride = 32
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
            self.feature_stride = 8

    def forward(self, x, return_map: bool = False):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        fmap = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        pooled = torch.flatten(self.avgpool(fmap), 1)
        return (pooled, fmap) if return_map else pooled


class ShortcutA(nn.Module):
    """Option-A shortcut of He et al. (LDAM code's LambdaLayer): subsample by 2, zero-pad
    the new channels."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBlock(nn.Module):
    """BasicBlock of LDAM-DRW `models/resnet_cifar.py` (option A)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet-(6n+2), LDAM-DRW layout: 3x3 conv 16, stages of n blocks at 16/32/64
    channels (strides 1/2/2), global average pooling -> 64-d. Kaiming-normal init of convs (LDAM
    `_weights_init`). The last map is 8x8 at 32 px, so feature_stride = 4 (RoIAlign spatial_scale =
    1/4 in dscl.py)."""

    def __init__(self, depth: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self.stage(16, 16, 1, n)
        self.layer2 = self.stage(16, 32, 2, n)
        self.layer3 = self.stage(32, 64, 2, n)
        self.out_dim = 64
        self.feature_stride = 4
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def stage(in_planes: int, planes: int, stride: int, blocks: int) -> nn.Sequential:
        rest = [CifarBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(CifarBlock(in_planes, planes, stride), *rest)

    def forward(self, x, return_map: bool = False):
        x = F.relu(self.bn1(self.conv1(x)))
        fmap = self.layer3(self.layer2(self.layer1(x)))
        pooled = torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)
        return (pooled, fmap) if return_map else pooled


def build_backbone(arch: str, image_size: int = 32, zero_init_residual: bool = False) -> nn.Module:
    """Backbone without classifier. resnet18/34/50/152: torchvision layout, CIFAR stem when
    image_size <= 64. resnet8/20/32: He et al. / LDAM CIFAR ResNet (64-d). Attributes `.out_dim`,
    `.feature_stride`. zero_init_residual (torchvision's option; resnet18-152 only): each residual
    block's last BN gamma = 0."""
    if arch in TORCHVISION_ARCHS:
        return TorchvisionResNet(arch, image_size <= 64, zero_init_residual)
    if arch in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[arch])
    raise UserError(f"--arch {arch!r} is unknown; use one of {', '.join(ARCHS)}")


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = True,
                   last_bn: bool = False, bias_last: bool = True) -> nn.Sequential:
    """(Linear [+BN] + ReLU) x (num_layers - 1), then Linear [+BN if last_bn]: num_layers counts
    the Linears. The last BN is a standard affine BatchNorm1d, as in the SDCLR / SimCLR heads
    (SDCLR `models/utils.py`). Hidden Linears have no bias when followed by BN (the BN mean
    would cancel it)."""
    layers = []
    dim = in_dim
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


# --- EMA and learning-rate schedules --------------------------------------------------------------

@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, ema_decay: float) -> None:
    """theta_t <- d theta_t + (1 - d) theta_s over all parameters, d = ema_decay (foreach ops,
    in place). Buffers are left to the caller: MoCo's key encoder keeps its own, FASSL's
    teacher averages them."""
    t_params = list(unwrap(target).parameters())
    s_params = list(unwrap(source).parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"ema_update: {len(t_params)} target parameters, {len(s_params)} source")
    torch._foreach_mul_(t_params, ema_decay)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - ema_decay)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float,
              final_lr: float = 0.0) -> float:
    """Per-iteration schedule (0-based step): linear warm-up lr = base_lr * (step + 1) /
    warmup_steps for step < warmup_steps, then a half cosine from base_lr to final_lr, reached at
    step = total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * t))


def multistep_lr(epoch: int, base_lr: float, milestones: list[int], gamma: float = 0.1) -> float:
    """base_lr * gamma ** #(milestones <= epoch). The LDAM / DSCL loops pass the 0-based epoch
    (milestones 120, 160: x0.1 from the 121st epoch); SDCLR's probe passes e = 1..E (milestones 10,
    20: 30 for e < 10)."""
    passed = sum(1 for m in milestones if m <= epoch)
    return base_lr * gamma**passed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- The shared contrastive loss ------------------------------------------------------------------

def per_anchor(value: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """(B,) per image -> (2B,) per anchor (both views of image i get value[i]); 1 or 2B
    values as given."""
    value = value.float().reshape(-1)
    if value.numel() == batch:
        return torch.cat([value, value])
    if value.numel() in (1, 2 * batch):
        return value
    raise ValueError(f"nt_xent: {what} has {value.numel()} entries; expected 1, B={batch} or "
                     f"2B={2 * batch}")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau, weight=None) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) with a temperature per anchor allowed (docs/tase.md):

        l_j = - a_j . a_p(j) / tau_j + LSE_{k != j}( a_j . a_k / tau_j ),  a = n([z1; z2]),
        p(j) = (j + B) mod 2B,      loss = mean_j weight_j * l_j

    z1, z2: (B, D) views, normalised in fp32 and the logits built in fp32 outside autocast.
    tau: float, 0-d tensor, (B,) per image or (2B,) per anchor; weight: None, (B,) or (2B,)."""
    batch = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        a = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
        if torch.is_tensor(tau):
            tau = per_anchor(tau, batch, "temperature")[:, None]
        else:
            tau = float(tau)
        logits = a @ a.T / tau
        self_pairs = torch.eye(len(a), dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(self_pairs, float("-inf"))  # k != j
        positives = (torch.arange(2 * batch, device=a.device) + batch) % (2 * batch)
        loss = F.cross_entropy(logits, positives, reduction="none")  # l_j
        if torch.is_tensor(weight):
            loss = loss * per_anchor(weight, batch, "weight")
        elif weight is not None:
            loss = loss * float(weight)
    return loss.mean()
