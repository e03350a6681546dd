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


def run_function(tmp_path, target: str, nproc=2):
    """Run tests/dist_worker.py `target` ("test_module:function") under torchrun; assert it succeeded."""
    done = torchrun([os.path.join(ROOT, "tests", "dist_worker.py"), target, str(tmp_path)], nproc=nproc)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


class Poison:
    """A split with a length (for the summary) that fails the test when its images or labels are read."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        raise AssertionError(f"this split must not be read ({name})")
