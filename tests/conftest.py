"""Test setup: make the repository root importable and keep torch on the two CI cores."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, os.cpu_count() or 1))

import pytest  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

# What makes a GPU wait for the host or the host for the GPU: reading a value back (item, tolist, bool,
# float, numpy, cpu), building a tensor from Python data on every call (torch.tensor / as_tensor with a list),
# and ops whose output shape depends on the data (nonzero, masked_select, unique, boolean indexing).
_SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
            torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
            torch.Tensor.nonzero, torch.nonzero, torch.masked_select, torch.Tensor.masked_select,
            torch.unique, torch.Tensor.unique, torch.argwhere, torch.tensor, torch.as_tensor}


class HostSync(AssertionError):
    pass


class NoHostSync(TorchFunctionMode):
    """Raise HostSync when code inside calls one of _SYNCING, or indexes a tensor with a boolean mask. The CPU
    stand-in for torch.cuda.set_sync_debug_mode("error"), which the GPU check uses."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            raise HostSync(f"host synchronisation: {getattr(func, '__qualname__', func)}")
        if func is torch.Tensor.__getitem__ and _bool_index(args[1]):
            raise HostSync("host synchronisation: boolean-mask indexing")
        return func(*args, **kwargs)


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


@pytest.fixture
def no_host_sync():
    """`with no_host_sync(): step(...)` fails the test on any host synchronisation inside."""
    return NoHostSync


def torchrun(args, cwd=ROOT, nproc=2, env=None, timeout=600):
    """`torchrun --standalone --nproc_per_node nproc ARGS` on the CPU (gloo, one thread per process); returns
    the CompletedProcess (stdout and stderr as text)."""
    import subprocess  # noqa: PLC0415
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
           **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# Every function that runs under two processes: one torchrun launch runs them all (process start-up
# is most of their cost), each in its own directory.
DIST_TARGETS = ("test_distributed:_dist_nt_xent", "test_distributed:_dist_shards",
                "test_dscl:_dist_losses", "test_fassl:_dist_steps", "test_hybrid:_dist_hybrid",
                "test_tase:_dist_tase")


@pytest.fixture(scope="session")
def dist_outputs(tmp_path_factory):
    """Run tests/dist_worker.py over DIST_TARGETS under torchrun (2 CPU processes, gloo), once."""
    base = tmp_path_factory.mktemp("two-processes")
    done = torchrun([os.path.join(ROOT, "tests", "dist_worker.py"), str(base), *DIST_TARGETS])
    return base, done


def run_function(dist_outputs, target: str):
    """The directory where `target` ("test_module:function") wrote its output under two processes;
    fails the test with the worker's traceback if it raised."""
    base, done = dist_outputs
    out = base / target.replace(":", "-")
    error = out / "error.txt"
    if not (out / "ok").is_file():
        detail = error.read_text() if error.is_file() else done.stdout[-3000:] + done.stderr[-3000:]
        raise AssertionError(f"{target} failed under two processes:\n{detail}")
    return out


class Poison:
    """A split with a length (for the summary) that fails the test when its images or labels are read."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        raise AssertionError(f"this split must not be read ({name})")


def tensors(tree, prefix=""):
    """Every tensor of a checkpoint by its path of keys (the RNG state included)."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        items = ()
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}
