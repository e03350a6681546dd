"""Run functions of the test modules in every process of one torchrun launch on the CPU (gloo);
tests only (conftest.dist_outputs):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT \
        test_x:function [test_y:function ...]

Each function gets its own directory OUT/<module>-<function> and runs after
common.init_distributed joined the process group. A function that raises leaves error.txt there (the
other functions still run), one that returns leaves `ok`."""
import importlib
import os
import pathlib
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402

import common  # noqa: E402

torch.set_num_threads(1)
common.init_distributed("cpu")
base = pathlib.Path(sys.argv[1])
rank = torch.distributed.get_rank()
for target in sys.argv[2:]:
    out = base / target.replace(":", "-")
    out.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    module, function = target.split(":")
    try:
        getattr(importlib.import_module(module), function)(str(out))
        torch.distributed.barrier()
        if rank == 0:
            (out / "ok").write_text("")
    except Exception:  # noqa: BLE001 - reported to the test, which fails
        (out / "error.txt").write_text(f"process {rank}:\n{traceback.format_exc()}")
        raise
torch.distributed.destroy_process_group()
