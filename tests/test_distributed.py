"""Several processes (torchrun, gloo on the CPU): the gathered losses are the single-process losses of the
global batch, with the same gradients; each process draws a disjoint part of every global batch; each script
runs under two processes, writes one run directory, and resumes where an uninterrupted run ends."""
import json
import os
import pathlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import common
import data
from conftest import ROOT, run_function, torchrun

B, D, IN = 6, 5, 7           # per-process batch, embedding and input dimensions


def global_batch(world):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(B * world, IN, generator=g), torch.randn(B * world, IN, generator=g)
    tau, w = 0.1 + torch.rand(B * world, generator=g), torch.rand(2 * B * world, generator=g)
    return x1, x2, tau, w


def nt_xent_of(encoder, x1, x2, tau, w, gather=lambda t: t):
    """The shared NT-Xent with per-image temperatures and per-anchor weights on (gathered) embeddings."""
    z1, z2 = encoder(x1), encoder(x2)
    z1.retain_grad(), z2.retain_grad()
    return common.nt_xent(gather(z1), gather(z2), gather(tau), weight=w), z1, z2


def _dist_nt_xent(out):              # every process: its part of the global batch, a DDP encoder
    rank, world = dist.get_rank(), dist.get_world_size()
    x1, x2, tau, w = global_batch(world)
    torch.manual_seed(1)
    encoder = common.prepare_model(nn.Linear(IN, D), "cpu", ddp=True)
    assert isinstance(encoder, nn.parallel.DistributedDataParallel)
    mine = slice(rank * B, (rank + 1) * B)
    # the per-anchor weights of the global batch: [view 1 of every process; view 2 of every process]
    loss, z1, z2 = nt_xent_of(encoder, x1[mine], x2[mine], tau[mine], w, gather=common.gather)
    loss.backward()
    torch.save({"loss": loss.detach(), "z1": z1.grad, "z2": z2.grad, "weight": encoder.module.weight.grad,
                "world": world}, pathlib.Path(out) / f"rank{rank}.pt")


def test_gathered_nt_xent_and_its_gradients_equal_the_single_process_ones(dist_outputs):
    tmp_path = run_function(dist_outputs, "test_distributed:_dist_nt_xent")
    x1, x2, tau, w = global_batch(2)
    torch.manual_seed(1)
    encoder = nn.Linear(IN, D)
    loss, z1, z2 = nt_xent_of(encoder, x1, x2, tau, w)
    loss.backward()
    for rank in range(2):
        got, mine = torch.load(tmp_path / f"rank{rank}.pt"), slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-6, rtol=0)
        # each process's part receives the gradient of all W copies of the loss; DDP divides by W
        torch.testing.assert_close(got["z1"] / got["world"], z1.grad[mine], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["z2"] / got["world"], z2.grad[mine], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["weight"], encoder.weight.grad, atol=1e-6, rtol=0)   # after DDP


def _files(root, n):
    from PIL import Image
    root.mkdir(exist_ok=True)
    for i in range(n):
        if not (root / f"{i}.png").exists():          # written once by the test, read by the processes
            Image.new("RGB", (8, 8), (i * 9 % 256, 0, 0)).save(root / f"{i}.png")
    return [str(root / f"{i}.png") for i in range(n)]


def splits(root):
    y = torch.arange(30) % 4
    y[:12] = 0                                                     # a head class, for the balanced sampler
    return {"tensor": data.Split(y=y, x=torch.zeros(30, 3, 2, 2, dtype=torch.uint8)),
            "files": data.Split(y=y, files=_files(root / "img", 30))}


def epochs_of(loader, epochs=(0, 1)):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append([idx.tolist() for _, _, idx in loader])
    return out


def _dist_shards(out):
    rank, got = dist.get_rank(), {}
    if rank == 0:
        splits(pathlib.Path(out))                              # the image files, before reading them
    dist.barrier()
    for name, split in splits(pathlib.Path(out)).items():
        for sampler in ("random", "balanced"):
            loader = data.make_loader(split, 8, "cpu", sampler=sampler, seed=3, workers=0, image_size=8,
                                      shard=True)
            got[name, sampler] = epochs_of(loader)
    torch.save(got, pathlib.Path(out) / f"shards{rank}.pt")


def test_each_process_draws_its_part_of_every_global_batch(dist_outputs):
    tmp_path = run_function(dist_outputs, "test_distributed:_dist_shards")
    parts = [torch.load(tmp_path / f"shards{r}.pt") for r in range(2)]
    for (name, sampler), epochs in parts[0].items():
        split = splits(tmp_path)[name]
        single = epochs_of(data.make_loader(split, 8, "cpu", sampler=sampler, seed=3, workers=0,
                                            image_size=8))
        for e, batches in enumerate(epochs):
            other = parts[1][name, sampler][e]
            assert len(batches) == len(other) == len(single[e]) == 30 // 8
            for b, (a, c) in enumerate(zip(batches, other)):
                assert len(a) == len(c) == 4
                assert a + c == single[e][b]                       # rank order gives the global batch
            mine, theirs = sum(batches, []), sum(other, [])
            if sampler == "random":                                # disjoint, together the epoch's batches
                assert not set(mine) & set(theirs)
                assert sorted(mine + theirs) == sorted(sum(single[e], []))
        assert epochs[0] != epochs[1]                              # a new order every epoch


def test_a_global_batch_that_does_not_split_is_refused():
    os.environ.update(RANK="1", WORLD_SIZE="3")
    try:
        with pytest.raises(common.UserError, match="--batch-size 8 is the global batch"):
            data.make_loader(data.Split(y=torch.zeros(9, dtype=torch.long), x=torch.zeros(9, 3, 2, 2)), 8,
                             "cpu", shard=True)
        assert common.epoch_seed(0, 1) != common.epoch_seed(0, 1, per_process=False)   # rank 1 of 3
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert common.epoch_seed(0, 1) == common.epoch_seed(0, 1, per_process=False)       # one process


# ---------------------------------------------------------------------------------------------------------
# The four scripts under two processes (the README's torchrun commands, scaled down)
# ---------------------------------------------------------------------------------------------------------
CPU = ["--dataset", "synthetic-lt", "--device", "cpu", "--amp", "off", "--workers", "0", "--print-every",
       "1000", "--arch", "resnet8"]
TINY = {
    "fassl": ["--n-max", "24", "--synthetic-n-test", "4", "--imb-ratio", "12", "--batch-size", "16",
              "--num-prototypes", "16", "--probe", "full", "--probe-epochs", "1", "--probe-aug", "none",
              "--no-probe-teacher", "--no-analyze", "--lr-warmup-epochs", "1", "--sdclr-epochs", "1",
              "--stage1-epochs", "1", "--stage2-epochs", "1"],
    "tase": ["--num-classes", "4", "--n-max", "24", "--synthetic-n-test", "6", "--imb-ratio", "4",
             "--epochs", "2", "--batch-size", "12", "--lr-warmup-epochs", "1", "--cluster-warmup-epochs", "1",
             "--recluster-every", "1", "--kmeans-restarts", "2", "--kmeans-iters", "20", "--probe", "full",
             "--probe-epochs", "1", "--knn-every", "1"],
    "dscl": ["--num-classes", "4", "--n-max", "12", "--synthetic-n-test", "6", "--imb-ratio", "12",
             "--queue-size", "32", "--batch-size", "8", "--epochs", "2", "--lr-warmup-epochs", "1",
             "--linear-epochs", "1", "--linear-milestones", "1", "--linear-batch-size", "16"],
    "hybrid": ["--num-classes", "4", "--n-max", "24", "--synthetic-n-test", "6", "--imb-ratio", "4",
               "--batch-size", "16", "--epochs", "2", "--milestones", "1000", "--eval-every", "1"],
}


PHASES = {"full": [], "cut": ["--stop-after-epochs", "1"], "resume": ["--resume", "auto"]}


def _phase(out, phase):
    """Under torchrun: one phase of the four scripts, one after the other in the same processes
    (process start-up is most of the cost). `full` runs uninterrupted, `cut` stops after one epoch
    and `resume` continues it; each process's output goes to <phase>-<script>-<rank>.log."""
    import contextlib
    import importlib

    import harness
    root = pathlib.Path(out).parent
    rank = dist.get_rank()
    for script in sorted(TINY):
        dest = root / ("full" if phase == "full" else "cut") / script
        argv = [*CPU, *TINY[script], "--out-dir", str(dest), *PHASES[phase]]
        with open(root / f"{phase}-{script}-{rank}.log", "w") as f, contextlib.redirect_stdout(f):
            try:
                importlib.import_module(script).main(argv)
            except harness.StopRun as e:
                print(e)


def _full(out):
    _phase(out, "full")


def _cut(out):
    _phase(out, "cut")


def _resume(out):
    _phase(out, "resume")


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
    """Three torchrun launches: every script uninterrupted, then stopped after an epoch, then
    resumed."""
    base = tmp_path_factory.mktemp("scripts")
    for phase in PHASES:
        done = torchrun([os.path.join(ROOT, "tests", "dist_worker.py"), str(base),
                         f"test_distributed:_{phase}"])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base


def tensors(tree, prefix=""):
    """Every tensor of a checkpoint, by its path of keys (RNG states aside)."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = (tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple))
             else ())
    return {k: v for key, sub in items if key != "rng" for k, v in tensors(sub, f"{prefix}/{key}").items()}


@pytest.mark.parametrize("script", sorted(TINY))
def test_two_processes_write_one_run_and_resume_to_the_uninterrupted_end(script, phases, tmp_path):
    log = {(phase, rank): (phases / f"{phase}-{script}-{rank}.log").read_text()
           for phase in PHASES for rank in (0, 1)}
    runs = list((phases / "full" / script).iterdir())
    assert len(runs) == 1 and len(list(runs[0].rglob("results.json"))) == 1, runs
    assert log["full", 0].count("results: ") == 1 and "results: " not in log["full", 1]
    json.loads((runs[0] / "results.json").read_text())
    (cut,) = (phases / "cut" / script).iterdir()
    assert "stopped after 1 epochs" in log["cut", 0]
    assert log["resume", 0].count("resuming ") == 1 and "resuming " not in log["resume", 1]
    assert (cut / "results.json").is_file()
    a, b = (tensors(torch.load(r / "checkpoint.pt", weights_only=True)) for r in (runs[0], cut))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (runs[0], cut))
    head = lambda r: (r["at_selected"] or r["at_last"])["per_class_acc"]          # noqa: E731
    np.testing.assert_allclose(head(rb), head(ra), atol=1e-6)
    if script == "hybrid":      # the two-process figures are a one-process evaluation of the same weights
        import eval as ev
        ev.main(["--ckpt", str(runs[0] / "checkpoint.pt"), "--probe", "classifier", "--device", "cpu",
                 "--out", str(tmp_path / "one")])
        one = json.loads((tmp_path / "one" / "results.json").read_text())
        np.testing.assert_allclose(head(one), head(ra))
