"""The run harness: what every method script does around its method, written once.

A method script declares its flags as a dataclass (`Args(harness.RunArgs)`, one `arg(...)` per
field), its per-dataset defaults as plain dicts, and its paper's reported numbers. Then, in `main`:

    args, filled = harness.parse_args(Args, argv, DEFAULTS, derived_defaults)
    run = harness.Run("hybrid-sc", args, filled, DEFAULTS, derived_defaults, PAPER_TOP1)
    run.start(ds, header)                        # checks against the data, run dir, config.json
    start, saved = run.restore("train", parts)   # --resume: the parts' weights, the method state
    for epoch in range(start, epochs):           # epochs count from 0
        ...
        run.end_epoch(epoch, loss, record, state)    # loss guard, metrics.jsonl, checkpoint.pt
    run.finish(results, style)                   # results.json, plots, the final table

Here: the dataclass-to-argparse command line, dataset defaults, argument checks, the run directory,
config / metrics / checkpoints, resume, the loss guard, the progress line, the benchmark and the
results. docs/usage.md is the user's side of it. Run as a script, `python harness.py
--benchmark-table` times every method in several configurations (docs/usage.md, Benchmark).
"""
from __future__ import annotations

import argparse
import concurrent.futures
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
import shutil
import sys
import time
import traceback
import types
import typing
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import common
import data
import eval as evaluation

# --- The command line: one dataclass per script -> argparse ---------------------------------------


def arg(default, help: str, **kw) -> dataclasses.Field:
    """A dataclass field with a one-line doc. Keywords go into the field metadata:
    choices=[...]; check=">0" | ">=0" | ">=1" | "[0,1]" | "[0,1)" | "(0,1]" | "(0,1)" | "batch"
    (see CHECKS); runtime=True (a flag that does not change the method: left out of the variant).
    A list default becomes a default_factory that returns a fresh copy."""
    metadata = {"help": help, **kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class RunArgs:
    """The runtime flags every script shares: same names, defaults and meaning in all four."""
    dataset: str = arg("cifar10-lt", "data set (docs/data.md lists them; synthetic-lt needs no "
                       "files)")
    data_dir: str = arg("./data", "data root; for --dataset folder the ImageFolder tree itself",
                        runtime=True)
    imb_ratio: Optional[float] = arg(None, "imbalance ratio rho = n_max / n_min of a generated "
                                     "long tail; unset: 100, but a folder tree is used as it is",
                                     check=">=1")
    n_max: Optional[int] = arg(None, "images of the head class of a generated long tail; unset: "
                               "all the class has (CIFAR-10: 5,000, or 4,500 with --protocol "
                               "sdclr; synthetic-lt: 500)", check=">=1")
    protocol: Optional[str] = arg(None, "CIFAR-LT convention: the one of the method's paper by "
                                  "default (docs/data.md, 'CIFAR-LT conventions')",
                                  choices=["ldam", "sdclr"])
    seed: int = arg(0, "training seed (augmentation, initialisation, sampling); a method may "
                    "default to the seed of its reference scripts")
    device: str = arg("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N",
                      runtime=True)
    amp: str = arg("auto", "autocast dtype: auto = bf16 on CUDA (fp16 with a GradScaler where bf16 "
                   "is unsupported), off on CPU", choices=["auto", "bf16", "fp16", "off"],
                   runtime=True)
    channels_last: bool = arg(True, "channels_last memory format on CUDA", runtime=True)
    compile: bool = arg(False, "torch.compile the networks (inductor, on any device)",
                        runtime=True)
    workers: int = arg(8, "DataLoader workers for datasets read from image files", check=">=0",
                       runtime=True)
    out_dir: str = arg("runs", "parent of the run directory <method>-<dataset>-<time>/",
                       runtime=True)
    resume: Optional[str] = arg(None, "continue a run: its checkpoint.pt, its run directory, or "
                                "auto (the newest run of this method and dataset); the run's own "
                                "settings are kept", runtime=True)
    print_every: int = arg(20, "progress line after the first iteration, then every N iterations "
                           "or 30 seconds, and at the end of each epoch", check=">=1", runtime=True)
    benchmark: bool = arg(False, "time the training step on random data, print images/s, GFLOP, "
                          "the augmentation's share, ... (docs/usage.md, Benchmark), exit",
                          runtime=True)
    benchmark_steps: int = arg(10, "timed steps of --benchmark, after 3 warm-up steps",
                               check=">=1", runtime=True)
    reference: bool = arg(False, "with --benchmark: also time the reference pipeline (per-image "
                          "PIL transforms in DataLoader workers, fp32) and print the speed-up",
                          runtime=True)
    benchmark_json: Optional[str] = arg(None, "with --benchmark: also write the measurements to "
                                        "this JSON file", runtime=True)
    stop_after_epochs: Optional[int] = arg(None, "stop after N epochs of this command, checkpoint "
                                           "written; continue with --resume", check=">=1",
                                           runtime=True)
    sync_bn: bool = arg(False, "SyncBatchNorm across the processes of a torchrun run (CUDA only); "
                        "default: the method's official code's", runtime=True)


SHARED_FLAGS = tuple(f.name for f in dataclasses.fields(RunArgs))

# name of a check -> (the test, what the help and the error say)
CHECKS = {
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, ">= 0"),
    ">=1": (lambda v: v >= 1, ">= 1"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)"),
    "batch": (lambda v: v > 0, "> 0, at most the training set; under torchrun the global batch, "
              "LR unchanged"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line instead of usage + message."""
        common.fatal(f"{message} (see {self.prog} --help)")


def none_or(base):
    """argparse type of an Optional field: "none" / "null" -> None, anything else -> base(value)."""
    def convert(text: str):
        if text.lower() in ("none", "null"):
            return None
        return base(text)
    convert.__name__ = getattr(base, "__name__", "value")  # argparse says "invalid <name> value"
    return convert


def flag_value(v) -> str:
    """A value as it is written on the command line."""
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return str(v)


def as_flag(name: str, value) -> str:
    """A setting as it is written on the command line: --flag / --no-flag, or --flag VALUE."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {flag_value(value)}"


def field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def defaults_for(defaults: dict, dataset: str) -> dict:
    """The entries of a DEFAULTS table that apply to `dataset`: key "*" first, then the keys naming
    it (a dataset name or a tuple of names), later entries winning."""
    out = dict(defaults.get("*", {}))
    for key, values in defaults.items():
        names = (key,) if isinstance(key, str) else key
        if key != "*" and dataset in names:
            out.update(values)
    return out


def derived_fields(cls, defaults: dict, derived) -> set[str]:
    """The fields a script's derived_defaults function may set: tried on every dataset, with every
    choice of a flag that has choices and every boolean flipped."""
    names = set()
    for dataset in data.DATASETS if derived else ():
        ref = cls(dataset=dataset)
        fill_defaults(ref, defaults)
        names |= set(derived(ref))
        for f in dataclasses.fields(cls):
            value = getattr(ref, f.name)
            others = f.metadata.get("choices", [not value] if isinstance(value, bool) else [])
            for other in others:
                names |= set(derived(dataclasses.replace(ref, **{f.name: other})))
    return names


def default_help(defaults: dict, name: str, fallback) -> str:
    """ "inat2018: resnet50; synthetic-lt: resnet8; others: resnet32" for the help of a field;
    "others" is the dataclass default `fallback` where the table has no "*" entry for it."""
    parts = []
    other = None
    keys = [key for key, values in defaults.items() if name in values]
    for i, key in enumerate(keys):
        shown = flag_value(defaults[key][name])
        if key == "*":
            other = f"others: {shown}"
            continue
        later = {n for k in keys[i + 1:] for n in ((k,) if isinstance(k, str) else k)}
        names = [n for n in ((key,) if isinstance(key, str) else key) if n not in later]
        if names:                                           # a later entry wins for the others
            parts.append(f"{'/'.join(names)}: {shown}")
    if parts and other is None:
        other = f"others: {flag_value(fallback)}"
    if other:
        parts.append(other)
    return "; ".join(parts)


def argparse_keywords(f: dataclasses.Field, tp) -> dict:
    """argparse keywords of one field: a --flag / --no-flag pair for booleans, nargs="*" for lists,
    "none" accepted for Optional fields (unless "none" is one of the choices)."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
    if optional:
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    kw = {"dest": f.name}
    if "choices" in f.metadata:
        kw["choices"] = list(f.metadata["choices"])
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(tp) is list:
        kw["nargs"] = "*"
        kw["type"] = typing.get_args(tp)[0]
    elif optional and "none" not in f.metadata.get("choices", ()):
        kw["type"] = none_or(tp)
    else:
        kw["type"] = tp
    return kw


def make_parser(cls, defaults: dict | None = None, derived=None) -> argparse.ArgumentParser:
    """argparse parser for dataclass `cls` (a RunArgs subclass): the script's own flags first,
    then the shared runtime flags. Every default is SUPPRESSed, so a parsed namespace holds
    exactly the flags given on the command line; the help shows the real defaults (per dataset
    where they differ)."""
    parser = Parser(description=inspect.getdoc(cls), argument_default=argparse.SUPPRESS,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    from_others = derived_fields(cls, defaults or {}, derived)
    groups = {False: parser.add_argument_group("method flags"),
              True: parser.add_argument_group("runtime (shared by the four scripts)")}
    for shared in (False, True):
        for f in dataclasses.fields(cls):
            if (f.name in SHARED_FLAGS) != shared:
                continue
            kw = argparse_keywords(f, hints[f.name])
            if f.name == "dataset":
                kw["choices"] = list(data.DATASETS)
            shown = default_help(defaults or {}, f.name, field_default(f))
            shown = shown or flag_value(field_default(f))
            if f.name in from_others:
                shown += "; where unset, set from other flags (derived_defaults)"
            if f.metadata.get("check"):
                shown += f"; {CHECKS[f.metadata['check']][1]}"
            kw["help"] = f.metadata.get("help", "").replace("%", "%%") + f" (default: {shown})"
            groups[shared].add_argument("--" + f.name.replace("_", "-"), **kw)
    return parser


def parse_args(cls, argv=None, defaults: dict | None = None, derived=None):
    """Parse `argv` into `cls`; then fill the dataset defaults into every field NOT given on the
    command line: first the script's DEFAULTS table ({"*" or dataset or (datasets...): {field:
    value}}), then `derived(args)` -> {field: value}, the defaults that depend on other flags.

    Returns (args, filled): filled = {field: value} applied, printed by `Run` and stored in
    config.json and results.json. Impossible values exit with one line and status 2 (check_args)."""
    given = vars(make_parser(cls, defaults, derived).parse_args(argv))
    args = cls(**given)
    set_here = {name for name, value in given.items() if value is not None}  # "--x none" = unset
    filled = fill_defaults(args, defaults, derived, given=set_here)
    filled.update(lab_scale(args))
    with common.user_errors():
        check_args(args)
    return args, filled


def fill_defaults(args, defaults: dict | None, derived=None, given=()) -> dict:
    """Set the DEFAULTS entries for args.dataset, then derived(args), on every field not in `given`;
    returns what was set. --imb-ratio unset is 100, but a folder tree is used as it is (None)."""
    table = {"imb_ratio": None if args.dataset == "folder" else 100.0}
    table.update(defaults_for(defaults or {}, args.dataset))
    filled = {}
    for name, value in table.items():
        if name not in given:
            if isinstance(value, (list, tuple)):
                value = list(value)  # a copy: the table stays as it is
            setattr(args, name, value)
            filled[name] = value
    for name, value in (derived(args) if derived else {}).items():
        if name not in given:
            setattr(args, name, value)
            filled[name] = value
    return filled


def lab_scale(args) -> dict:
    """LAB_SCALE=f (0 < f < 1) in the environment shrinks every *epochs argument to
    max(1, round(f * value)) and the synthetic-lt class sizes (--n-max, --synthetic-n-test; at
    least 8), so that the labs' commands run in seconds in the tests (labs/README.md). Returns what
    it changed."""
    f = float(os.environ.get("LAB_SCALE", 1))
    if not 0 < f < 1:
        return {}
    changed = {}
    for name, value in vars(args).items():
        synthetic = args.dataset == "synthetic-lt" and name in ("n_max", "synthetic_n_test")
        scaled = name.endswith("epochs") or synthetic
        if scaled and type(value) is int and value > 0:
            floor = 1 if name.endswith("epochs") else 8
            changed[name] = max(floor, round(f * value))
    vars(args).update(changed)
    return changed


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_args(args, train_size: int | None = None) -> None:
    """Raise a one-line UserError for the first field outside the range its arg(check=...)
    declares, or a float that is not finite or too large for float32 (the networks' precision).
    check="batch": > 0, and at most `train_size` once the training set is known."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
                raise common.UserError(f"{flag} {v} is out of range: it must be a finite number "
                                       f"no larger than {FLOAT32_MAX:.2e}")
        rule = f.metadata.get("check")
        if rule is None or value is None:
            continue
        for v in values:
            if rule == "batch" and v > 0 and train_size is not None and v > train_size:
                raise common.UserError(f"{flag} {v} is impossible: a batch size must be > 0 and "
                                       f"at most the {train_size} training images")
            if rule == "batch" and not v > 0:
                raise common.UserError(f"{flag} {v} is impossible: a batch size must be > 0")
            if not (isinstance(v, (int, float)) and CHECKS[rule][0](v)):
                raise common.UserError(f"{flag} {v} is out of range: it must be {CHECKS[rule][1]}")


# --- What a run is: its variant, and the paper's number for it ------------------------------------

def same(a, b) -> bool:
    """Equal settings: lists element by element, floats to 1e-9."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))):
            return False
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return False
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def variant_label(args, defaults: dict | None, derived=None) -> str:
    """The method flags (dataset, rho and seed aside) whose value differs from the default this run
    would get, as they are written on the command line; "default" when there is none. A flag that
    derived_defaults sets is compared with what the run's other flags give it."""
    ref = type(args)(dataset=args.dataset)
    fill_defaults(ref, defaults)
    from_others = derived(args) if derived else {}
    diff = []
    for f in dataclasses.fields(args):
        if f.name in ("dataset", "imb_ratio", "seed") or f.metadata.get("runtime"):
            continue
        expected = from_others.get(f.name, getattr(ref, f.name))
        if not same(getattr(args, f.name), expected):
            diff.append(as_flag(f.name, getattr(args, f.name)))
    return " ".join(diff) or "default"


def paper_dataset(ds) -> str:
    """The name a paper gives `ds`: its own name, or cifar10-lt / cifar100-lt for a JPEG copy of
    CIFAR read as --dataset folder (docs/data.md)."""
    if ds.name == "folder" and ds.image_source == "jpeg-copy" and ds.num_classes in (10, 100):
        return f"cifar{ds.num_classes}-lt"
    return ds.name


def paper_value(paper: dict, dataset: str, variant: str, imb_ratio) -> float | None:
    """The paper's number for a run: paper[(dataset, variant)] is {rho: value}; None when the paper
    reports no such cell."""
    for rho, value in paper.get((dataset, variant), {}).items():
        if same(rho, imb_ratio):
            return value
    return None


# --- Run directory, metrics, checkpoints ----------------------------------------------------------

def make_run_dir(method: str, dataset: str, out_dir: str = "runs",
                 resume: str | None = None) -> pathlib.Path:
    """Directory of this run: a new runs/<method>-<dataset>-<YYYYmmdd-HHMMSS>/; with
    resume=<checkpoint file> its parent, with resume=<run dir> that dir; with resume="auto" the
    matching run dir whose checkpoint.pt was written last (a new dir if there is none). A resume
    path that does not exist raises UserError."""
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
        if path.is_dir() and (path / "checkpoint.pt").is_file():
            return path
        if path.is_dir():
            raise common.UserError(f"--resume {path} is a directory without checkpoint.pt; pass a "
                                   "run directory that has one, a checkpoint file, or 'auto'")
        raise common.UserError(f"--resume {path} does not exist; pass a checkpoint.pt, a run "
                               f"directory, or 'auto' (the newest {out}/{method}-{dataset}-*)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        # mkdir is atomic: two runs started in the same second take the next suffix
        run_dir = out / (f"{method}-{dataset}-{stamp}" + (f"-{i}" if i else ""))
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            if not out.is_dir():
                raise common.UserError(f"--out-dir {out} is not a directory; choose a writable "
                                       "directory for the runs") from None
        except OSError as e:
            raise common.UserError(f"--out-dir {out}: cannot create the run directory {run_dir} "
                                   f"({e.strerror or e}); choose a writable --out-dir") from None
    raise common.UserError(f"--out-dir {out}: 1000 runs named {run_dir.name} already exist")


def append_metrics(run_dir, record: dict) -> None:
    """Append one JSON line to run_dir/metrics.jsonl (main rank only)."""
    if not common.is_main():
        return
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, default=data.to_json) + "\n")
    except OSError as e:
        raise common.UserError(f"could not write {path} ({e.strerror or e}); the checkpoint of "
                               "this epoch is written: free disk space or make the run directory "
                               "writable, then --resume") from None


def drop_metrics_after(run_dir, stage: str, epoch: int) -> None:
    """On resume: keep metrics.jsonl up to the line of the checkpoint's (stage, epoch) and drop the
    lines after it (written by the epoch a failure interrupted), so no epoch appears twice."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not common.is_main() or not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    for i in range(len(lines) - 1, -1, -1):
        try:
            record = json.loads(lines[i])
        except json.JSONDecodeError:
            continue
        if record.get("epoch") == epoch and record.get("stage", "") in (stage, ""):
            if i + 1 < len(lines):
                data.atomic_write(path, lambda f: f.write("".join(lines[:i + 1]).encode()))
            return


def save_checkpoint(path, state: dict) -> None:
    """Atomic torch.save (a failed write leaves the previous checkpoint as it was), main rank only.
    `state` holds only tensors, numbers, strings, lists, tuples and dicts, which
    data.load_checkpoint (weights_only=True) reads."""
    if not common.is_main():
        return
    try:
        data.atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:
        # torch.save wraps a full disk (ENOSPC) in a RuntimeError ("unexpected pos ...")
        raise common.UserError(f"could not write checkpoint {path} ({write_failure(e, path)}); the "
                               "previous checkpoint there is intact; free disk space or choose "
                               "another --out-dir, then --resume") from None


def write_failure(e: Exception, path) -> str:
    """Why a write failed, in a few words: the OS's reason, or "disk full" when there is no room."""
    if getattr(e, "strerror", None):
        return e.strerror
    try:
        if shutil.disk_usage(pathlib.Path(path).parent).free < 1 << 20:
            return "disk full"
    except OSError:
        pass
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:80]


def rng_state() -> dict:
    """The global torch generators (CPU and CUDA): what a run draws outside its per-epoch streams
    (common.epoch_seed), such as a later stage's initialisation or DSCL's key shuffle."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (the CUDA states only where the same GPUs are there)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# --- The progress line ----------------------------------------------------------------------------

def fmt_duration(seconds: float) -> str:
    h, rem = divmod(max(0, int(seconds)), 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def fmt_scalar(v) -> str:
    v = float(v.item() if torch.is_tensor(v) else v)
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"


class Progress:
    """One progress line:
    `[simclr] ep 3/200 it 40/48 | loss 4.1234 | lr 0.4812 | 1234 img/s | ETA 1h02m`.

    `step(global_step, **scalars)` is called after every optimiser step with the 0-based index of
    that step (the same index the LR schedule gets); it prints after the first step, then every
    `every` steps or at least every `wait` seconds, at the end of each epoch and at the last step,
    on the main rank only. Scalars may be device tensors: they are
    converted only when printing, and CUDA is synchronised only then, so the training loop has no
    per-step host sync."""

    def __init__(self, total_steps: int, batch_size: int, every: int = 20, prefix: str = "",
                 wait: float = 30.0):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.every = max(1, every)
        self.wait = wait
        self.prefix = prefix
        self.epoch = None
        self.epochs = None
        self.start_time = time.perf_counter()
        self.last_time = self.start_time
        self.start_step = None
        self.last_step = None

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The 0-based epoch about to run, out of `epochs`; the line shows "ep 1/E" for epoch 0."""
        self.epoch = epoch
        self.epochs = epochs

    def step(self, global_step: int, **scalars) -> str | None:
        """Maybe print: after the first step (also after a resume), then every `every` steps or
        when `wait` seconds have passed since the last line, at the end of each epoch and at the
        last step. Returns the printed line (or None)."""
        first = self.last_step is None
        if first:
            self.start_step = global_step - 1
            self.last_step = global_step - 1
        done = global_step + 1
        per_epoch = self.total_steps // self.epochs if self.epochs else 0
        epoch_end = per_epoch > 0 and done % per_epoch == 0
        waited = time.perf_counter() - self.last_time >= self.wait
        due = first or waited or done % self.every == 0 or epoch_end or done >= self.total_steps
        if not due or not common.is_main():
            return None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        images = (global_step - self.last_step) * self.batch_size
        img_s = images / max(now - self.last_time, 1e-9)
        sec_per_step = (now - self.start_time) / max(global_step - self.start_step, 1)
        eta = fmt_duration(sec_per_step * max(self.total_steps - done, 0))
        self.last_time = now
        self.last_step = global_step
        if per_epoch:
            where = f"ep {self.epoch + 1}/{self.epochs} it {(done - 1) % per_epoch + 1}/{per_epoch}"
        else:
            where = f"it {done}/{self.total_steps}"
        if self.prefix:
            where = f"[{self.prefix}] " + where
        cells = [where, *[f"{k} {fmt_scalar(v)}" for k, v in scalars.items()],
                 f"{img_s:.0f} img/s", f"ETA {eta}"]
        line = " | ".join(cells)
        print(line, flush=True)
        return line


# --- The benchmark (docs/usage.md, Benchmark) -----------------------------------------------------

@dataclasses.dataclass
class BenchStep:
    """One training step as --benchmark times it; a script's benchmark_steps returns {name:
    BenchStep}. views(x, y): the augmentation alone, a uint8 device batch and its labels in, the
    step's inputs out. step(inputs): forward, backward and update on them, a 0-d device tensor out.
    reference: the DataLoader collate_fn of the reference pipeline, [(image (H, W, 3) uint8 array,
    label)] in, the same inputs out on the CPU, built per image by torchvision on PIL images."""
    views: typing.Callable
    step: typing.Callable
    reference: typing.Callable


# Dense tensor-core peaks in TFLOP/s, by a pattern of torch.cuda.get_device_name. NVIDIA's
# datasheets print the H100 and H200 figures "with sparsity", twice the dense ones, halved here.
PEAK_TFLOPS = {
    # "NVIDIA A100 Tensor Core GPU" datasheet, A100 SXM: BF16 / FP16 312, TF32 156
    r"A100-SXM": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0},
    # "NVIDIA H100 Tensor Core GPU" datasheet, H100 SXM: BF16 / FP16 1,979, TF32 989 with sparsity
    r"H100 80GB HBM3|H100 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5},
    # "NVIDIA H200 Tensor Core GPU" datasheet, H200 SXM (not NVL): the H100 SXM's figures
    r"\bH200\b(?! NVL)": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5},
}


def peak_tflops(device_name: str, amp: str) -> float | None:
    """The dense peak of PEAK_TFLOPS for this GPU and autocast dtype (amp off: TF32, which
    common.setup_device turns on); None for any other device, so that no MFU is printed."""
    for pattern, peaks in PEAK_TFLOPS.items():
        if re.search(pattern, device_name):
            return peaks.get(amp, peaks["tf32"])
    return None


class Timer:
    """Seconds between start() and stop(): CUDA events on a GPU (the host does not wait in
    between), time.perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()  # earlier work is not timed
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.t0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.begin.elapsed_time(end) / 1000


def count_flops(fn) -> int:
    """The FLOPs of fn(): every matrix product and convolution, forward and backward, counted by
    torch.utils.flop_counter.FlopCounterMode, with torch.compile's directives ignored (torch >= 2.6)
    so that every operation is seen."""
    from torch.utils.flop_counter import FlopCounterMode
    stance = getattr(torch.compiler, "set_stance", None)
    eager = stance("force_eager") if stance else contextlib.nullcontext()
    with eager, FlopCounterMode(display=False) as counter, warnings.catch_warnings():
        # the counter's module hooks make a compiled module warn, which does not matter here
        warnings.filterwarnings("ignore", "Using `torch.compile\\(module\\)` when there are global")
        fn()
    return counter.get_total_flops()


def dynamo_state() -> tuple[dict, int]:
    """({graph break reason: count}, frames compiled) so far in this process, from dynamo's
    counters (both stay empty without --compile)."""
    from torch._dynamo.utils import counters
    return dict(counters["graph_break"]), counters["frames"]["total"]


def to_device(inputs, device):
    """The tensors of a (nested) tuple or list moved to `device`; None stays None."""
    if torch.is_tensor(inputs):
        return inputs.to(device, non_blocking=True)
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


def time_step(bench: BenchStep, x, y, steps: int, device) -> dict:
    """The full step (augmentation, then the step on its views) after 3 untimed warm-up steps;
    graph breaks (counted where dynamo compiles, in the warm-up) and frames compiled again in the
    timed steps; peak memory on CUDA; the augmentation alone on the same batch; FLOPs of one step
    on views."""
    timer = Timer(device)
    cuda = timer.cuda
    breaks0, _ = dynamo_state()
    for _ in range(3):  # compilation, cuDNN autotuning, the allocator's first blocks
        bench.step(bench.views(x, y))
    breaks, frames = dynamo_state()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timer.start()
    for _ in range(steps):
        bench.step(bench.views(x, y))
    seconds = timer.stop() / steps
    recompiles = dynamo_state()[1] - frames
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    timer.start()
    for _ in range(steps):
        inputs = bench.views(x, y)
    augment = timer.stop() / steps
    flops = count_flops(lambda: bench.step(inputs))
    reasons = {k.splitlines()[0]: v - breaks0.get(k, 0) for k, v in breaks.items()
               if v > breaks0.get(k, 0)}
    return {"ms_per_step": 1000 * seconds, "images_per_s": len(x) / seconds,
            "augment_ms": 1000 * augment, "augment_share": augment / seconds,
            "gflop_per_step": flops / 1e9, "tflop_per_s": flops / seconds / 1e12,
            "peak_memory_gib": peak, "graph_breaks": sum(reasons.values()),
            "graph_break_reasons": reasons, "recompiles": recompiles}


def time_reference(bench: BenchStep, x, y, steps: int, device, workers: int) -> dict:
    """The reference pipeline: the same images through bench.reference in a DataLoader with
    `workers` processes, the batches moved to the device, then the step (built in fp32, no
    channels_last, no compile); 3 untimed warm-up batches (worker start-up) and `steps` timed."""
    images = x.permute(0, 2, 3, 1).cpu().numpy()
    labels = y.cpu().tolist()
    n = len(images)
    dataset = [(images[i % n], labels[i % n]) for i in range(n * (3 + steps))]
    workers = min(workers, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=n, collate_fn=bench.reference,
                                         num_workers=workers, pin_memory=Timer(device).cuda)
    batches = iter(loader)
    for _ in range(3):
        bench.step(to_device(next(batches), device))
    timer = Timer(device)
    timer.start()
    for _ in range(steps):
        bench.step(to_device(next(batches), device))
    seconds = timer.stop() / steps
    return {"ms_per_step": 1000 * seconds, "images_per_s": n / seconds, "workers": workers}


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def benchmark(args, make_steps) -> dict:
    """--benchmark: time each training step of a method on random data of the dataset's size, one
    image-size rule for every method (data.nominal_shape). make_steps(args, image_size,
    num_classes, device, amp_dtype) -> {name: BenchStep}. Per step (time_step): ms and images/s
    of the full step, its GFLOP and, on a GPU of PEAK_TFLOPS, MFU; the augmentation's share; peak
    memory on CUDA; graph breaks and recompilations under --compile; with --reference the
    reference pipeline (time_reference) and our speed-up over it. Prints a line per step, writes
    --benchmark-json, returns {name: record}."""
    device, amp_dtype = common.setup_device(args.device, args.amp)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the timing events' device
    amp = common.amp_name(amp_dtype)
    image_size, stored_size, num_classes = data.nominal_shape(args.dataset)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch_size, 3, stored_size, stored_size)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)
    y = torch.randint(0, num_classes, (args.batch_size,), device=device, generator=gen)
    name_of_device = device_name(device)
    peak = peak_tflops(name_of_device, amp) if device.type == "cuda" else None  # TFLOP/s
    records = {}
    steps = make_steps(args, image_size, num_classes, device, amp_dtype)
    for name, bench in steps.items():
        r = records[name] = time_step(bench, x, y, args.benchmark_steps, device)
        r["mfu"] = r["tflop_per_s"] / peak if peak else None
        if not args.compile:  # nothing was compiled: no count to report
            r["graph_breaks"] = None
            r["recompiles"] = None
    del steps, bench  # the networks, before the reference pipeline builds its own
    if args.reference:  # the official code's way: fp32, no channels_last, no compile
        plain = dataclasses.replace(args, amp="off", channels_last=False, compile=False)
        for name, bench in make_steps(plain, image_size, num_classes, device, None).items():
            ref = time_reference(bench, x, y, args.benchmark_steps, device, args.workers)
            records[name]["reference"] = ref
            records[name]["reference_ratio"] = records[name]["images_per_s"] / ref["images_per_s"]
    for name, r in records.items():
        print(f"[{name} benchmark] {bench_line(r)} ({args.batch_size} images/step, {device}, "
              f"amp {amp})", flush=True)
    if args.benchmark_json:
        report = {"script": pathlib.Path(inspect.getfile(type(args))).stem,
                  "dataset": args.dataset, "arch": getattr(args, "arch", None),
                  "batch_size": args.batch_size, "image_size": image_size,
                  "steps": args.benchmark_steps, "device": str(device),
                  "device_name": name_of_device, "amp": amp,
                  "channels_last": args.channels_last and device.type == "cuda",
                  "compile": args.compile, "compile_backend": compile_backend(args),
                  "peak_tflops": peak, "torch": torch.__version__,
                  "commit": evaluation.git_commit(), "command": sys.argv, "results": records}
        data.save_json(args.benchmark_json, report)
    return records


def compile_backend(args) -> str | None:
    """torch.compile's backend of this run (common.prepare_model), None without --compile."""
    return os.environ.get("COMPILE_BACKEND", "inductor") if args.compile else None


def bench_line(r: dict) -> str:
    """One step's measurements on one line, as --benchmark prints them."""
    cells = [f"{r['ms_per_step']:.1f} ms/step, {r['images_per_s']:.0f} images/s",
             f"{r['gflop_per_step']:.1f} GFLOP/step, {r['tflop_per_s']:.2f} TFLOP/s"]
    if r["mfu"] is not None:
        cells[-1] += f", MFU {100 * r['mfu']:.1f}%"
    cells.append(f"augmentation {r['augment_ms']:.1f} ms ({100 * r['augment_share']:.0f}%)")
    if r["peak_memory_gib"] is not None:
        cells.append(f"peak {r['peak_memory_gib']:.2f} GiB")
    if r["graph_breaks"] is not None:
        cells.append(f"{r['graph_breaks']} graph breaks, {r['recompiles']} recompilations")
    if "reference" in r:
        cells.append(f"reference {r['reference']['images_per_s']:.0f} images/s, x"
                     f"{r['reference_ratio']:.1f}")
    return " | ".join(cells)


# --- One run: resume, run directory, config, loss guard, checkpoints, results ---------------------

class NonFiniteLoss(Exception):
    """A training loss that is NaN or infinite (see Run.end_epoch)."""


class StopRun(Exception):
    """--stop-after-epochs reached (see Run.end_epoch): the run ends, its checkpoint written."""


class ResultsFailed(Exception):
    """The evaluation after a finished training failed (see Run.reporting)."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device); cuDNN autotuning on."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = True


class Run:
    """What every script does around its training loops (see the module's docstring).

    On --resume the run's own settings come from its checkpoint; only the runtime flags of this
    command line (device, AMP, workers, ...) are taken from the command line."""

    def __init__(self, method, args, filled: dict, defaults: dict | None = None, derived=None,
                 paper: dict | None = None, paper_metric: str = "top1_overall", label=None):
        """method, label: a name, or a function of the args (a resumed run's own args may name
        another). paper: {(dataset, variant): {rho: value}}, the paper's values of paper_metric
        (a path into the metrics block, eval.metric_value)."""
        self.args = args
        self.filled = dict(filled)
        self.defaults = defaults or {}
        self.derived = derived
        self.paper = paper or {}
        self.paper_metric = paper_metric
        self.run_dir = None
        self.ckpt = None
        self.parts = {}
        self.stage = ""
        self.t0 = time.time()
        self.wall0 = 0.0
        self.epochs_run = 0
        self.name_of = method if callable(method) else (lambda a: method)
        self.method = self.name_of(args)
        self.script = pathlib.Path(inspect.getfile(type(args))).stem  # fassl, tase, dscl, hybrid
        if args.resume:
            run_dir = make_run_dir(self.method, args.dataset, args.out_dir, args.resume)
            path = pathlib.Path(args.resume)
            if not path.is_file():
                path = run_dir / "checkpoint.pt"
            if path.is_file():  # "auto" with no earlier run starts a fresh one
                self.ckpt = data.load_checkpoint(path)
                self.check_script(path)
                self.run_dir = run_dir
                self.wall0 = self.ckpt.get("wall_time_s", 0.0)
                self.restore_args(path)
                drop_metrics_after(run_dir, self.ckpt.get("stage", ""), self.ckpt.get("epoch"))
        self.method = self.name_of(self.args)
        self.label = (label(self.args) if callable(label) else label) or self.method
        device = common.init_distributed(self.args.device)
        self.device, self.amp_dtype = common.setup_device(device, self.args.amp)
        self.amp = common.amp_name(self.amp_dtype)
        self.channels_last = self.args.channels_last and self.device.type == "cuda"
        seed_everything(self.args.seed)

    def check_script(self, path) -> None:
        """A run resumes only with the script that made it: anything else is refused before a
        file is touched."""
        made_by = self.ckpt.get("script")
        if made_by == self.script:
            return
        if made_by is None:
            what = "not a checkpoint of this version of the scripts (no 'script' entry)"
            fix = "start a new run without --resume"
        else:
            what = f"a run of {made_by}.py"
            fix = f"resume it with {made_by}.py, or start without --resume"
        raise common.UserError(f"--resume {path} is {what}, not of {self.script}.py; {fix}")

    def restore_args(self, path) -> None:
        """The run's own settings from its checkpoint. The shared runtime flags come from this
        command line, and so does a script's own runtime flag set here to a non-default value."""
        saved = self.ckpt.get("args", {})
        now = self.args
        fields = {f.name: f for f in dataclasses.fields(now)}
        default = type(now)(dataset=saved.get("dataset", now.dataset))
        fill_defaults(default, self.defaults, self.derived)
        keep = {}
        for name, value in saved.items():
            if name not in fields:
                continue
            runtime = fields[name].metadata.get("runtime")
            given_here = name in SHARED_FLAGS or not same(getattr(now, name),
                                                          getattr(default, name))
            if not (runtime and given_here):
                keep[name] = value
        changed = [as_flag(k, v).split()[0] for k, v in keep.items()
                   if not same(getattr(now, k), v)]
        self.args = dataclasses.replace(now, **keep)
        self.filled = self.ckpt.get("filled", self.filled)
        kept = f"; the run's own {' '.join(changed)} kept" if changed else ""
        if common.is_main():  # one line, also under torchrun
            print(f"[{self.method}] resuming {path} after epoch {self.ckpt.get('epoch')}{kept}",
                  flush=True)

    def start(self, ds, header: str = "") -> pathlib.Path:
        """Check the arguments against the training set, make the run directory, write config.json,
        print the data summary and the defaults that were filled."""
        check_args(self.args, train_size=len(ds.train))
        self.ds = ds
        self.paper_ds = paper_dataset(ds)
        fresh = self.run_dir is None
        if fresh:
            made = [None]
            if common.is_main():
                made = [make_run_dir(self.method, self.args.dataset, self.args.out_dir)]
            if dist.is_initialized():
                dist.broadcast_object_list(made)  # process 0 names it
            self.run_dir = made[0]
        if not common.is_main():
            return self.run_dir
        print(data.describe(ds))
        line = f"[{self.method}] run dir {self.run_dir} | {self.device} | amp {self.amp}"
        print(line + (f" | {header}" if header else ""), flush=True)
        if self.filled:
            demo = ""
            if self.args.dataset == "synthetic-lt":
                demo = " (a CPU demo profile, not a paper setting)"
            flags = " ".join(as_flag(k, v) for k, v in self.filled.items())
            print(f"[{self.method}] defaults for {self.args.dataset}{demo}: {flags}; a flag on the "
                  "command line overrides any of them", flush=True)
        if fresh:
            config = {"args": dataclasses.asdict(self.args), "filled_defaults": self.filled,
                      "dataset": ds.info(), "git_commit": evaluation.git_commit(),
                      "command": sys.argv, "torch": torch.__version__}
            path = self.run_dir / "config.json"
            try:
                data.save_json(path, config)
            except OSError as e:
                raise common.UserError(f"could not write {path} ({e.strerror or e}); choose a "
                                       "writable --out-dir") from None
        return self.run_dir

    def restore(self, stage: str, parts: dict) -> tuple[int, dict | None]:
        """Hand the harness what a checkpoint of this training stage holds: `parts`, {name: object
        with state_dict()} (networks, optimisers, the scaler). On --resume, when the checkpoint was
        written in this stage, load every part and the global RNG state and return (epochs done,
        the method state saved with it); otherwise (0, None)."""
        self.stage = stage
        self.parts = parts
        if self.ckpt is None or self.ckpt.get("stage") != stage:
            return 0, None
        for name, part in parts.items():
            part.load_state_dict(self.ckpt[name])
        set_rng_state(self.ckpt["rng"])
        return int(self.ckpt["epoch"]), self.ckpt.get("state")

    def wall_time(self) -> float:
        return self.wall0 + time.time() - self.t0

    def progress(self, total_steps: int, batch_size: int, prefix: str | None = None) -> Progress:
        return Progress(total_steps, batch_size, self.args.print_every, prefix or self.method)

    def check_loss(self, loss, where: str) -> float:
        """The loss guard, once per epoch (two host syncs): a NaN or infinite epoch loss, or
        non-finite weights or BN statistics in a network part (the last step of an epoch can
        diverge after its loss was computed), end the run before anything of the epoch is
        saved."""
        value = float(common.all_mean(loss))
        networks = [part for part in self.parts.values() if isinstance(part, torch.nn.Module)]
        weights = [t for net in networks for t in net.state_dict().values()
                   if t.is_floating_point()]
        weights_finite = True
        if weights:
            weights_finite = bool(torch.stack([p.isfinite().all() for p in weights]).all())
        if math.isfinite(value) and weights_finite:
            return value
        last = self.run_dir / "checkpoint.pt"
        kept = f", {last} holds the last finite epoch" if last.is_file() else ""
        what = f"the training loss is {value}"
        if math.isfinite(value):
            what = f"the weights are not finite (the loss was {value:.4g})"
        raise NonFiniteLoss(f"{what} in {where}; usual causes: a learning rate too high (--lr) or "
                            "fp16 overflow (try --amp bf16 or --amp off); nothing of this epoch "
                            f"was saved{kept}")

    def checkpoint(self, epochs_done: int, state: dict | None) -> dict:
        """The checkpoint of this moment: every part's state_dict, the method `state`, and
        what a resume or eval.py --ckpt needs (args, filled defaults, RNG state, wall time,
        arch, image size)."""
        ckpt = {name: part.state_dict() for name, part in self.parts.items()}
        ckpt.update(script=self.script, method=self.label, stage=self.stage, epoch=epochs_done,
                    state=state,
                    arch=getattr(self.args, "arch", None), image_size=self.ds.image_size,
                    filled=self.filled, args=dataclasses.asdict(self.args), rng=rng_state(),
                    wall_time_s=self.wall_time())
        return ckpt

    def save(self, ckpt: dict, name: str = "checkpoint.pt") -> None:
        """Write a checkpoint dict (see `checkpoint`) atomically into the run directory."""
        save_checkpoint(self.run_dir / name, ckpt)

    def end_epoch(self, epoch: int, loss, record: dict, state: dict | None = None) -> None:
        """After the 0-based `epoch`: the loss guard on the epoch's mean loss, one metrics.jsonl
        line and checkpoint.pt (its "epoch" counts the epochs done); StopRun after
        --stop-after-epochs epochs of this command."""
        where = f"epoch {epoch + 1}"
        if self.stage:
            where = f"{self.stage} {where}"
        value = self.check_loss(loss, where)
        # the checkpoint first: a metrics line never gets ahead of the checkpoint it describes
        self.save(self.checkpoint(epoch + 1, state))
        line = {"stage": self.stage, "epoch": epoch + 1, "loss": value, **record,
                "time_s": self.wall_time()}
        append_metrics(self.run_dir, line)
        self.epochs_run += 1
        if self.epochs_run == self.args.stop_after_epochs:
            raise StopRun(f"[{self.method}] stopped after {self.epochs_run} epochs "
                          f"(--stop-after-epochs); continue with --resume {self.run_dir}")

    def variant(self) -> str:
        """The variant label, against the defaults of the dataset the paper names (a JPEG copy of
        CIFAR-10 read as a folder is compared with cifar10-lt's defaults)."""
        args = dataclasses.replace(self.args, dataset=self.paper_ds)
        return variant_label(args, self.defaults, self.derived)

    def results(self, protocol: str, network: str, epochs: dict) -> dict:
        """results.json skeleton: the run's method label, variant, paper setting and the paper's
        number for it (None where the paper reports none), AMP, seed, wall time."""
        variant = self.variant()
        value = paper_value(self.paper, self.paper_ds, variant, self.ds.imb_ratio)
        arch = getattr(self.args, "arch", None)
        res = evaluation.results_skeleton(self.label, variant, value is not None, self.ds, protocol,
                                          network, arch, epochs, self.args.seed, self.amp,
                                          self.wall_time())
        if value is not None:
            res["paper_value"] = {"metric": self.paper_metric, "value": value}
        res["defaults_filled"] = self.filled
        return res

    def finish(self, results: dict, style: str, rows: list | None = None) -> None:
        """Write results.json (and its plots) and print the final table: the paper's columns for
        `style` (eval.PAPER_HEADER), one row per (label, metrics) of `rows` (default: this run's
        headline), then the paper's number for this run beside ours."""
        results["wall_time_s"] = self.wall_time()
        if not common.is_main():
            return
        try:
            evaluation.write_results(self.run_dir, results)
        except OSError as e:
            ckpt = self.run_dir / "checkpoint.pt"
            raise common.UserError(f"could not write the results to {self.run_dir} "
                                   f"({e.strerror or e}); the trained checkpoint {ckpt} is intact: "
                                   "make the directory writable and --resume, or evaluate it with "
                                   f"python eval.py --ckpt {ckpt} --out DIR") from None
        print(f"[{self.method}] results: {self.run_dir / 'results.json'}", flush=True)
        if rows is None:
            rows = [(self.label, results["at_selected"])]
        if not rows:
            print("no evaluation (--probe without a mode)")
            return
        print(f"| Method {evaluation.PAPER_HEADER[style]}")
        for label, metrics in rows:
            print(f"| {label} {evaluation.paper_row(metrics, style)}")
        paper = results.get("paper_value")
        if paper:
            ours = evaluation.metric_value(results["at_selected"], paper["metric"])
            print(f"paper ({paper['metric']}): {paper['value']:.2f} | ours {ours:.2f} | "
                  f"difference {ours - paper['value']:+.2f}", flush=True)

    @contextlib.contextmanager
    def reporting(self, probe: str):
        """`with run.reporting(probe): ...` around the evaluation after training: an unexpected
        failure there cannot throw the training away. It ends in one line saying that the trained
        checkpoint is intact and how to evaluate it (`eval.py --ckpt ... --probe <probe>`), exit
        status 1; the traceback goes to <run dir>/error.txt."""
        try:
            yield
        except (common.UserError, NonFiniteLoss, StopRun):
            raise
        except Exception as e:
            ckpt = self.run_dir / "checkpoint.pt"
            log = self.run_dir / "error.txt"
            with contextlib.suppress(OSError):
                log.write_text(traceback.format_exc())
            reason = (str(e).strip().splitlines() or [""])[0][:100]
            raise ResultsFailed(f"building the results failed after training ({type(e).__name__}: "
                                f"{reason}); the trained checkpoint {ckpt} is intact: evaluate it "
                                f"with python eval.py --ckpt {ckpt} --probe {probe} (traceback in "
                                f"{log})") from None


def main_guard(main, argv=None):
    """Run `main(argv)`: a user error ends in one line + exit 2, a non-finite loss in one line +
    exit 1, --stop-after-epochs in a line + exit 0."""
    try:
        with common.user_errors():
            return main(argv)
    except (NonFiniteLoss, ResultsFailed) as e:
        common.fatal(str(e), code=1)
    except StopRun as e:
        print(e, flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- The benchmark table: python harness.py --benchmark-table (docs/usage.md, Benchmark) ----------

SCRIPTS = ("fassl", "tase", "dscl", "hybrid")
# each method at its paper's batch and image size, from the dataset defaults: FASSL and TASE-R
# ResNet-18, 512 images of 32 px; DSCL ResNet-50, 256 of 224 px (5 patches of 64 px, a queue of
# 65536); Hybrid ResNet-32, 512 of 32 px
PAPER_SETTINGS = {"fassl": ["--dataset", "cifar10-lt"], "tase": ["--dataset", "cifar10-lt"],
                  "dscl": ["--dataset", "imagenet-lt"], "hybrid": ["--dataset", "cifar10-lt"]}
# the tests' scale: seconds on a CPU, never a measurement
TINY_SETTING = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--batch-size", "8",
                "--workers", "0"]
CONFIGS = {"amp": [],  # --amp auto: bf16 on a GPU (fp32 on the CPU), channels_last on a GPU
           "compile": ["--compile"],
           "no-channels-last": ["--no-channels-last"],
           "fp32": ["--amp", "off"],
           "compile-fp32": ["--compile", "--amp", "off"]}
TABLE_COLUMNS = ("Method", "Step", "Config", "Arch", "Batch", "px", "AMP", "ms/step", "images/s",
                 "GFLOP/step", "TFLOP/s", "MFU", "Aug. ms", "Aug. share", "Peak GiB",
                 "Graph breaks", "Recompiles", "Ref. images/s", "Speed-up", "Wall s")


def table_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness.py", description="Every method's training step in several configurations, "
        "each run as `<script>.py --benchmark` in a subprocess, as one Markdown table "
        "(docs/usage.md, Benchmark).")
    p.add_argument("--benchmark-table", action="store_true", required=True,
                   help="print the table")
    p.add_argument("--scale", choices=["paper", "tiny"], default="paper",
                   help="paper: each method at its paper's batch and image size; tiny: synthetic "
                   "data, ResNet-8, batch 8 (the tests)")
    p.add_argument("--methods", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                   default=["amp", "compile", "no-channels-last", "fp32"],
                   help="run in this order; the first also times the reference pipeline")
    p.add_argument("--steps", type=int, default=None,
                   help="--benchmark-steps of each run (default: 10; tiny: 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="every method's batch instead of its paper's (a look at the paper's "
                   "networks on a CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="configurations not started within this many seconds are left out")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time; more than 1 disturbs the timings (a quick check only)")
    p.add_argument("--no-augment-bench", dest="augment_bench", action="store_false",
                   help="leave out data.py's --bench-augment row")
    return p


def run_benchmark(script: str, flags: list, timeout: float) -> tuple[dict | None, float, str]:
    """`python <script>.py --benchmark FLAGS --benchmark-json FILE` in a subprocess: (its JSON
    report or None, wall seconds, why it failed)."""
    import subprocess
    import tempfile
    root = pathlib.Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "benchmark.json"
        cmd = [sys.executable, f"{script}.py", "--benchmark", *flags, "--benchmark-json", str(out)]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - t0, "not finished within --budget-s"
        wall = time.perf_counter() - t0
        if done.returncode != 0 or not out.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
            return None, wall, f"failed (exit {done.returncode}): {last}"
        return json.loads(out.read_text()), wall, ""


def table_row(method: str, config: str, report: dict | None, wall: float, note: str) -> list:
    """The table's rows of one run: one per step, or one saying why there is none."""
    if report is None:
        return [[method, "", config, *[""] * (len(TABLE_COLUMNS) - 5), note, f"{wall:.0f}"]]
    rows = []
    for step, r in report["results"].items():
        ref = r.get("reference")
        rows.append([method, step, config, report["arch"] or "", report["batch_size"],
                     report["image_size"], report["amp"], cell(r["ms_per_step"], ".1f"),
                     cell(r["images_per_s"], ".0f"), cell(r["gflop_per_step"], ".1f"),
                     cell(r["tflop_per_s"], ".2f"), cell(r["mfu"], ".1%"),
                     cell(r["augment_ms"], ".1f"), cell(r["augment_share"], ".0%"),
                     cell(r["peak_memory_gib"], ".2f"), cell(r["graph_breaks"], "d"),
                     cell(r["recompiles"], "d"), cell(ref and ref["images_per_s"], ".0f"),
                     cell(r.get("reference_ratio"), ".1f", "x"), f"{wall:.0f}"])
    return rows


def cell(value, spec: str, unit: str = "") -> str:
    """A number of the table as `spec` formats it, "–" where there is none."""
    return "–" if value is None else format(value, spec) + unit


def benchmark_table(argv=None) -> str:
    """--benchmark-table: every chosen configuration of every chosen method, configuration by
    configuration, each in a subprocess, then data.py's --bench-augment; prints and returns one
    Markdown table, with the device, torch version, commit and command above it."""
    a = table_parser().parse_args(argv)
    tiny = a.scale == "tiny"
    steps = a.steps or (1 if tiny else 10)
    t0 = time.perf_counter()
    plan = []
    for i, config in enumerate(a.configs):
        for method in a.methods:
            flags = [*(TINY_SETTING if tiny else PAPER_SETTINGS[method]), *CONFIGS[config],
                     "--benchmark-steps", str(steps), "--device", a.device]
            if a.batch_size:
                flags += ["--batch-size", str(a.batch_size)]
            plan.append((method, config, flags + ["--reference"] * (i == 0)))

    devices = []  # the device's name, as the runs report it

    def run(job):
        method, config, flags = job
        left = a.budget_s - (time.perf_counter() - t0)
        if left < 1:
            return table_row(method, config, None, 0.0, "not run: --budget-s spent")
        report, wall, note = run_benchmark(method, flags, left)
        print(f"[benchmark-table] {method} {config}: {wall:.0f} s {note}", file=sys.stderr,
              flush=True)
        if report:
            devices.append(report["device_name"])
        return table_row(method, config, report, wall, note)
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        rows = [row for rows_of_run in pool.map(run, plan) for row in rows_of_run]
    if a.augment_bench:
        t = time.perf_counter()
        n, batch = (64, 32) if tiny else (2048, 512)
        r = data.bench_augment(n, batch, workers=0 if tiny else min(8, os.cpu_count() or 1),
                               device=a.device)
        rows.append(["data.py --bench-augment", "simclr_cifar, 2 views", "batched vs PIL", "",
                     batch, 32, "", "", f"{r['batched_img_s']:.0f}", *[""] * 8,
                     f"{r['pil_img_s']:.0f}", f"{r['ratio']:.1f}x",
                     f"{time.perf_counter() - t:.0f}"])
    lines = [f"Device: {devices[0] if devices else a.device} | torch {torch.__version__} | commit "
             f"{evaluation.git_commit()} | {datetime.date.today()} | total "
             f"{time.perf_counter() - t0:.0f} s",
             f"Command: `python harness.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             "", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    with common.user_errors():
        benchmark_table()
