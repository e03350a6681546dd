"""Run one function of a test module in every process of a torchrun launch on the CPU (gloo); tests only:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py test_x:function OUT

The function gets OUT (a directory) and runs after common.init_distributed joined the process group."""
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import torch  # noqa: E402

import common  # noqa: E402

torch.set_num_threads(1)
common.init_distributed("cpu")
module, function = sys.argv[1].split(":")
getattr(importlib.import_module(module), function)(sys.argv[2])
torch.distributed.destroy_process_group()
