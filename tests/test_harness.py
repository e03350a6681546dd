"""The run harness (harness.py) and what the four scripts share through it: the dataclass -> argparse command
line, dataset and derived defaults, argument checks, variant labels and the paper's numbers, run directories,
checkpoints and resume, the loss guard, the progress line; plus the repository's own reading budget (line
length, one-way imports, citations a reader can follow)."""
import ast
import dataclasses
import importlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import eval as ev
import harness
from common import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("fassl", "tase", "dscl", "hybrid")
SHARED = ("--dataset", "--data-dir", "--imb-ratio", "--n-max", "--protocol", "--seed", "--device",
          "--amp", "--channels-last", "--compile", "--workers", "--out-dir", "--resume", "--print-every",
          "--benchmark", "--benchmark-steps", "--reference", "--benchmark-json", "--stop-after-epochs",
          "--sync-bn")


def derived_of(module):
    """A script's derived_defaults (fassl, hybrid), or None (tase, dscl)."""
    return getattr(module, "derived_defaults", None)


# ---------------------------------------------------------------------------------------------------------
# The command line: a demo script's dataclass, DEFAULTS table and derived defaults
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DemoArgs(harness.RunArgs):
    """Demo method: the description shown by --help."""
    lr: Optional[float] = harness.arg(None, "base LR (SDCLR code)", check=">0")
    amp_on: bool = harness.arg(True, "use autocast")
    milestones: list[int] = harness.arg([], "LR milestones", check=">=1")
    limit: Optional[int] = harness.arg(None, "INFERRED: optional step limit", check=">=0")
    arch: str = harness.arg("resnet18", "backbone", choices=["resnet18", "resnet32", "resnet8"])
    tau: float = harness.arg(0.2, "temperature", check=">0")
    ratio: float = harness.arg(0.5, "a ratio", check="[0,1)")
    batch_size: int = harness.arg(64, "batch", check="batch")
    every: int = harness.arg(5, "a diagnostic interval", runtime=True)


DEMO_DEFAULTS = {"*": {"lr": 0.5, "milestones": [10, 20]},
                 ("cifar10-lt", "cifar100-lt"): {"arch": "resnet32"},
                 "synthetic-lt": {"lr": 0.1}}


def demo_derived(a):
    """Defaults that depend on other flags: synthetic-lt's milestone is the step limit (3 unset); the
    temperature is 1.0 for resnet8."""
    out = {"milestones": [a.limit or 3]} if a.dataset == "synthetic-lt" else {}
    if a.arch == "resnet8":
        out["tau"] = 1.0
    return out


def parse(*argv, derived=demo_derived):
    return harness.parse_args(DemoArgs, list(argv), DEMO_DEFAULTS, derived)


def test_parse_args_defaults_and_overrides():
    a, filled = parse()
    assert (a.lr, a.milestones, a.arch, a.tau) == (0.5, [10, 20], "resnet32", 0.2)
    assert filled == {"imb_ratio": 100.0, "lr": 0.5, "milestones": [10, 20], "arch": "resnet32"}
    a.milestones.append(99)
    assert DEMO_DEFAULTS["*"]["milestones"] == [10, 20]                       # the table is never changed
    b, filled = parse("--lr", "0.1", "--no-amp-on", "--milestones", "3", "4", "5", "--resume", "auto",
                      "--limit", "7", "--arch", "resnet18", "--imb-ratio", "10")
    assert (b.lr, b.amp_on, b.milestones, b.resume, b.limit, b.arch) == (0.1, False, [3, 4, 5], "auto", 7,
                                                                         "resnet18")
    assert filled == {}                                        # every flag given: the command line wins
    c, filled = parse("--dataset", "synthetic-lt", "--limit", "9")
    assert (c.lr, c.milestones, c.arch) == (0.1, [9], "resnet18")        # derived from --limit
    assert filled == {"imb_ratio": 100.0, "lr": 0.1, "milestones": [9]}
    c, filled = parse("--dataset", "synthetic-lt", "--milestones", "4")
    assert c.milestones == [4] and "milestones" not in filled            # given: not derived
    d, filled = parse("--dataset", "synthetic-lt", "--arch", "resnet8")
    assert d.tau == 1.0 and filled["tau"] == 1.0 and d.milestones == [3]
    assert parse("--arch", "resnet8", "--tau", "0.3")[0].tau == 0.3
    folder, filled = parse("--dataset", "folder")
    assert folder.imb_ratio is None and filled["imb_ratio"] is None            # the tree as it is
    e, filled = harness.parse_args(DemoArgs, ["--amp-on", "--limit", "none"])
    assert e.limit is None and e.lr is None and filled == {"imb_ratio": 100.0}   # no table: the fields' own
    assert parse("--lr", "none")[0].lr == 0.5                          # "--x none" = unset: the default


def test_fill_defaults_on_the_fields_not_given():
    a = DemoArgs(dataset="synthetic-lt", lr=7.0)
    filled = harness.fill_defaults(a, DEMO_DEFAULTS, demo_derived, given={"lr"})
    assert a.lr == 7.0 and "lr" not in filled and filled["milestones"] == [3] and a.imb_ratio == 100.0
    assert harness.defaults_for(DEMO_DEFAULTS, "cifar100-lt") == {"lr": 0.5, "milestones": [10, 20],
                                                                  "arch": "resnet32"}
    assert harness.defaults_for(DEMO_DEFAULTS, "synthetic-lt") == {"lr": 0.1, "milestones": [10, 20]}


def test_variant_label_compares_with_this_runs_defaults():
    a = parse("--dataset", "cifar100-lt")[0]
    assert harness.variant_label(a, DEMO_DEFAULTS, demo_derived) == "default"
    for flags in (["--lr", "0.4"], ["--arch", "resnet18"], ["--tau", "0.3"], ["--ratio", "0.0"]):
        b = parse("--dataset", "cifar100-lt", *flags)[0]
        assert harness.variant_label(b, DEMO_DEFAULTS, demo_derived) == " ".join(flags)
    b = parse("--dataset", "cifar100-lt", "--no-amp-on", "--milestones", "5", "7")[0]
    assert harness.variant_label(b, DEMO_DEFAULTS, demo_derived) == "--no-amp-on --milestones 5 7"
    c = parse("--dataset", "cifar100-lt", "--every", "2", "--seed", "3", "--device", "cpu", "--imb-ratio",
              "10", "--lr", "0.5", "--out-dir", "elsewhere")[0]
    assert harness.variant_label(c, DEMO_DEFAULTS, demo_derived) == "default"   # runtime, seed, rho aside
    # a flag set by derived_defaults is compared with what the run's other flags give it
    d = parse("--dataset", "cifar100-lt", "--arch", "resnet8")[0]
    assert d.tau == 1.0 and harness.variant_label(d, DEMO_DEFAULTS, demo_derived) == "--arch resnet8"
    d = parse("--dataset", "cifar100-lt", "--arch", "resnet8", "--tau", "0.2")[0]
    assert harness.variant_label(d, DEMO_DEFAULTS, demo_derived) == "--arch resnet8 --tau 0.2"
    e = parse("--dataset", "synthetic-lt", "--limit", "9")[0]
    assert harness.variant_label(e, DEMO_DEFAULTS, demo_derived) == "--limit 9"      # milestones [9] derived
    e = parse("--dataset", "synthetic-lt", "--limit", "9", "--milestones", "3")[0]
    assert harness.variant_label(e, DEMO_DEFAULTS, demo_derived) == "--milestones 3 --limit 9"


def test_variant_label_names_the_protocol_a_run_changes():
    """--protocol is a shared flag but a method setting (it picks the CIFAR-LT class counts): a run that sets
    it away from its default is another variant, also where the DEFAULTS table does not name it."""
    with_table = {**DEMO_DEFAULTS, "*": {**DEMO_DEFAULTS["*"], "protocol": "sdclr"}}
    a = harness.parse_args(DemoArgs, ["--protocol", "ldam"], with_table)[0]
    assert harness.variant_label(a, with_table) == "--protocol ldam"
    a = harness.parse_args(DemoArgs, ["--protocol", "sdclr"], with_table)[0]
    assert harness.variant_label(a, with_table) == "default"
    b = parse("--dataset", "cifar100-lt", "--protocol", "ldam")[0]            # the field default: None
    assert harness.variant_label(b, DEMO_DEFAULTS, demo_derived) == "--protocol ldam"


def test_same_settings():
    assert harness.same(0.1 + 0.2, 0.3) and harness.same([1, 2.0], (1, 2)) and harness.same(None, None)
    assert not harness.same(0.1, None) and not harness.same([1], 1) and not harness.same([1, 2], [1])
    assert harness.as_flag("amp_on", False) == "--no-amp-on" and harness.as_flag("x_y", [1, 2]) == "--x-y 1 2"


PAPER = {("synthetic-lt", "default"): {4.0: 50.0, 10.0: 40.0},
         ("synthetic-lt", "--lr 0.4"): {4.0: 45.0},
         ("cifar100-lt", "default"): {100.0: 55.0}}


def test_paper_value_is_the_cell_for_dataset_variant_and_rho():
    assert harness.paper_value(PAPER, "synthetic-lt", "default", 4) == 50.0
    assert harness.paper_value(PAPER, "synthetic-lt", "default", 10.0) == 40.0
    assert harness.paper_value(PAPER, "synthetic-lt", "--lr 0.4", 4.0) == 45.0
    assert harness.paper_value(PAPER, "synthetic-lt", "--lr 0.4", 10.0) is None      # no such rho
    assert harness.paper_value(PAPER, "synthetic-lt", "--lr 0.3", 4.0) is None       # no such variant
    assert harness.paper_value(PAPER, "cifar10-lt", "default", 100.0) is None        # no such dataset
    assert harness.paper_value({("places-lt", "default"): {None: 22.9}}, "places-lt", "default", None) == 22.9
    assert harness.paper_value({}, "synthetic-lt", "default", 4.0) is None


def small_ds(rho=4.0, n_max=24):
    return data.load_dataset("synthetic-lt", imb_ratio=rho, num_classes=4, n_max=n_max,
                             synthetic_n_test=8)


@pytest.mark.parametrize("flags, setting", [([], True), (["--lr", "0.4"], True), (["--lr", "0.3"], False),
                                            (["--seed", "5", "--every", "1"], True),
                                            (["--tau", "0.5"], False), (["--imb-ratio", "10"], True),
                                            (["--imb-ratio", "20"], False)])
def test_a_run_is_a_paper_setting_exactly_when_the_paper_has_its_number(tmp_path, flags, setting, capsys):
    argv = ["--dataset", "synthetic-lt", "--device", "cpu", "--out-dir", str(tmp_path), "--imb-ratio", "4",
            *flags]
    args, filled = parse(*argv)
    run = harness.Run("demo", args, filled, DEMO_DEFAULTS, demo_derived, PAPER, "top1_overall")
    ds = small_ds(args.imb_ratio, n_max=80)            # rho 4, 10, 20 exactly; more than a batch of 64
    run.start(ds, "a header")
    res = run.results("demo-protocol", "backbone", {"train": 1})
    value = harness.paper_value(PAPER, "synthetic-lt", run.variant(), ds.imb_ratio)
    assert res["paper_setting"] is setting is (value is not None)
    assert res["variant"] == harness.variant_label(args, DEMO_DEFAULTS, demo_derived)
    assert res["paper_value"] == ({"metric": "top1_overall", "value": value} if setting else None)
    assert res["defaults_filled"] == filled and res["method"] == "demo"
    # the final table: the paper's columns, our row, and the paper's number beside ours
    labels = torch.arange(4).repeat_interleave(8)
    res["at_selected"] = ev.compute_metrics(labels, labels, 4, ds.class_counts, ds.class_rank)
    capsys.readouterr()
    run.finish(res, "top1")
    out = capsys.readouterr().out.splitlines()
    assert f"| Method {ev.PAPER_HEADER['top1']}" in out and "| demo | 100.00 |" in out
    paper_lines = [line for line in out if line.startswith("paper (")]
    if setting:
        assert paper_lines == [f"paper (top1_overall): {value:.2f} | ours 100.00 | difference "
                               f"{100 - value:+.2f}"]
    else:
        assert not paper_lines
    saved = json.loads((run.run_dir / "results.json").read_text())
    assert saved["paper_setting"] is setting and saved["paper_value"] == res["paper_value"]


@pytest.mark.parametrize("bad", [["--arch", "vgg"], ["--lr", "fast"], ["--bogus"], ["--lr", "0"],
                                 ["--lr", "nan"], ["--lr", "inf"], ["--tau", "1e300"], ["--tau", "-inf"],
                                 ["--tau", "-1"], ["--ratio", "1"], ["--limit", "-1"], ["--batch-size", "0"],
                                 ["--milestones", "0"], ["--imb-ratio", "0.5"], ["--imb-ratio", "1e39"],
                                 ["--dataset", "mnist"]])
def test_parse_args_errors_are_one_line(capsys, bad):
    flag = bad[0]
    with pytest.raises(SystemExit) as e:
        parse(*bad)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and flag in err


def test_check_args_float32_range_and_batch_size_against_the_training_set():
    harness.check_args(DemoArgs(tau=3e38, lr=1e-30))                     # float32 holds these
    for bad in (DemoArgs(tau=3.5e38), DemoArgs(lr=math.inf), DemoArgs(ratio=math.nan)):
        with pytest.raises(UserError, match="finite number no larger than 3.40e\\+38"):
            harness.check_args(bad)
    a = parse("--batch-size", "64")[0]
    harness.check_args(a, train_size=64)
    with pytest.raises(UserError, match="--batch-size 64 is impossible.*at most the 63 training images"):
        harness.check_args(a, train_size=63)


def test_parse_args_help_shows_docs_and_defaults(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "Demo method: the description shown by --help." in text
    assert "base LR (SDCLR code) (default: synthetic-lt: 0.1; others: 0.5; > 0)" in text
    assert "--amp-on, --no-amp-on use autocast (default: True)" in text
    assert "{resnet18,resnet32,resnet8}" in text
    assert "(default: cifar10-lt/cifar100-lt: resnet32; others: resnet18)" in text
    assert "INFERRED: optional step limit (default: None; >= 0)" in text
    assert "LR milestones (default: others: 10 20; where unset, set from other flags" in text
    assert text.index("method flags:") < text.index("runtime (shared by the four scripts):")


def test_lab_scale_shrinks_epochs_and_synthetic_sizes(monkeypatch):
    @dataclasses.dataclass
    class Sized(harness.RunArgs):
        epochs: int = harness.arg(200, "epochs")
        probe_epochs: int = harness.arg(3, "probe epochs")
        synthetic_n_test: int = harness.arg(100, "test images per class")
        lr: float = harness.arg(0.5, "lr")
    sizes = {"synthetic-lt": {"n_max": 500}}
    monkeypatch.setenv("LAB_SCALE", "0.1")
    a, filled = harness.parse_args(Sized, ["--dataset", "synthetic-lt"], sizes)
    assert (a.epochs, a.probe_epochs, a.n_max, a.synthetic_n_test, a.lr) == (20, 1, 50, 10, 0.5)
    assert filled["epochs"] == 20 and "lr" not in filled
    real = harness.parse_args(Sized, ["--dataset", "cifar10-lt", "--n-max", "1000"], sizes)[0]
    assert (real.epochs, real.n_max) == (20, 1000)             # the class sizes of real data stay
    monkeypatch.setenv("LAB_SCALE", "1")
    assert harness.parse_args(Sized, [])[0].epochs == 200


# ---------------------------------------------------------------------------------------------------------
# Run directories, metrics, checkpoints and resume
# ---------------------------------------------------------------------------------------------------------
def test_make_run_dir_new_auto_and_paths(tmp_path):
    out = tmp_path / "runs"
    first = harness.make_run_dir("simclr", "cifar10-lt", out_dir=out)
    assert first.is_dir() and first.parent == out and first.name.startswith("simclr-cifar10-lt-")
    second = harness.make_run_dir("simclr", "cifar10-lt", out_dir=out)
    assert second != first
    # auto without any checkpoint -> a new dir
    third = harness.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume="auto")
    assert third not in (first, second) and third.is_dir()
    harness.save_checkpoint(first / "checkpoint.pt", {"epoch": 1})
    other = harness.make_run_dir("simclr", "cifar100-lt", out_dir=out)
    harness.save_checkpoint(other / "checkpoint.pt", {"epoch": 1})
    assert harness.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume="auto") == first
    harness.save_checkpoint(second / "checkpoint.pt", {"epoch": 1})
    os.utime(second / "checkpoint.pt", (1e10, 1e10))  # written last
    assert harness.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume="auto") == second
    assert harness.make_run_dir("simclr", "cifar10-lt", out_dir=out,
                                resume=str(first / "checkpoint.pt")) == first
    assert harness.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume=str(first)) == first
    with pytest.raises(UserError, match="does not exist") as err:
        harness.make_run_dir("simclr", "cifar10-lt", out_dir=out,
                             resume=str(out / "missing" / "checkpoint.pt"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="without checkpoint.pt"):
        harness.make_run_dir("simclr", "cifar10-lt", out_dir=out, resume=str(third))


def test_append_metrics_one_json_line_each(tmp_path):
    harness.append_metrics(tmp_path, {"epoch": 1, "loss": torch.tensor(0.5)})
    harness.append_metrics(tmp_path, {"epoch": 2, "loss": 0.25, "a": np.float32(1.5)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s) for s in lines] == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "a": 1.5}]


def test_save_checkpoint_is_atomic_and_a_failed_write_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    harness.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def failing_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises((RuntimeError, UserError)):
        harness.save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    got = data.load_checkpoint(path)
    assert got["epoch"] == 1 and torch.equal(got["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]         # no tmp file left
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="could not write checkpoint .*--out-dir") as err:
        harness.save_checkpoint(tmp_path / "a-file" / "checkpoint.pt", {"epoch": 1})   # OSError
    assert "\n" not in str(err.value)


def _train(model, opt, steps, start):
    """Deterministic toy training: fixed data plus noise from the global torch RNG (what rng_state keeps)."""
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    head_w = torch.randn(4, 64, generator=g)
    for step in range(start, start + steps):
        common.set_lr(opt, common.cosine_lr(step, 6, 2, 0.1))
        noise = torch.randn_like(x) * 0.1
        loss = F.cross_entropy(model(x + noise) @ head_w.T, y)
        common.optimizer_step(loss, opt)


def _fresh():
    model = common.build_backbone("resnet8")
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def test_resume_reproduces_straight_run(tmp_path):
    harness.seed_everything(0)
    model, opt = _fresh()
    _train(model, opt, 5, 0)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    harness.seed_everything(0)
    model, opt = _fresh()
    _train(model, opt, 3, 0)
    path = tmp_path / "checkpoint.pt"
    harness.save_checkpoint(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                                   "rng": harness.rng_state(), "args": {"lr": 0.1, "milestones": [1, 2]}})
    _train(model, opt, 4, 3)  # the interrupted run goes on and draws random numbers: resume must not care

    harness.seed_everything(99)
    model, opt = _fresh()
    state = data.load_checkpoint(path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    harness.set_rng_state(state["rng"])
    assert state["epoch"] == 3 and state["args"] == {"lr": 0.1, "milestones": [1, 2]}
    _train(model, opt, 2, state["epoch"])
    resumed = model.state_dict()
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_rng_state_round_trip(tmp_path):
    harness.seed_everything(3)
    state = harness.rng_state()
    assert set(state) == ({"torch", "cuda"} if torch.cuda.is_available() else {"torch"})
    want = torch.rand(3)
    harness.save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    harness.seed_everything(4)
    harness.set_rng_state(data.load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3), want)


def test_non_weights_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": harness.Progress(1, 1)}, path)  # a pickled class: the weights-only load refuses it
    with pytest.raises(UserError, match="unreadable"):
        data.load_checkpoint(path)


class Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Linear(3, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(self.backbone(x))


def demo_run(tmp_path, *flags):
    args, filled = parse("--dataset", "synthetic-lt", "--device", "cpu", "--out-dir", str(tmp_path / "runs"),
                         "--batch-size", "8", "--arch", "resnet8", *flags)
    run = harness.Run("demo", args, filled, DEMO_DEFAULTS, demo_derived, PAPER, label=lambda a: "Demo-L")
    run.start(small_ds())
    net = Net(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return run, net, opt


def test_run_checkpoint_layout_metrics_and_resume(tmp_path, capsys):
    run, net, opt = demo_run(tmp_path, "--limit", "4")
    assert run.restore("train", {"model": net, "optimizer": opt}) == (0, None)   # a fresh run
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["args"]["limit"] == 4 and config["filled_defaults"] == run.filled
    for epoch in range(2):                                                       # 0-based epochs
        net(torch.randn(2, 3)).sum().backward()
        opt.step()
        run.end_epoch(epoch, torch.tensor(1.5 - epoch), {"lr": 0.1}, state={"queue_ptr": epoch + 7})
    ckpt = data.load_checkpoint(run.run_dir / "checkpoint.pt")
    assert set(ckpt) >= {"model", "optimizer", "method", "stage", "epoch", "state", "arch", "image_size",
                         "filled", "args", "rng", "wall_time_s"}
    assert not set(ckpt) & {"backbone", "head", "heads", "classifier", "key_model"}      # all inside "model"
    assert (ckpt["method"], ckpt["stage"], ckpt["epoch"], ckpt["state"]) == ("Demo-L", "train", 2,
                                                                            {"queue_ptr": 8})
    assert (ckpt["arch"], ckpt["image_size"], ckpt["args"]["limit"]) == ("resnet8", 32, 4)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in net.state_dict().items())
    assert ev.submodule_state(ckpt["model"], "classifier").keys() == {"weight", "bias"}
    lines = [json.loads(s) for s in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r["loss"], r["lr"]) for r in lines] == [("train", 1, 1.5, 0.1),
                                                                              ("train", 2, 0.5, 0.1)]
    assert "time_s" in lines[0]
    want = {k: v.clone() for k, v in net.state_dict().items()}
    rng_after = torch.get_rng_state()

    # --resume: the run's own settings (--limit 4) are kept, the parts and the RNG are loaded
    capsys.readouterr()
    again, net2, opt2 = demo_run(tmp_path, "--resume", str(run.run_dir), "--limit", "6", "--every", "2")
    assert "resuming" in capsys.readouterr().out and again.run_dir == run.run_dir
    assert again.args.limit == 4 and again.args.every == 2                  # a runtime flag: from here
    torch.rand(5)
    assert again.restore("train", {"model": net2, "optimizer": opt2}) == (2, {"queue_ptr": 8})
    assert all(torch.equal(net2.state_dict()[k], v) for k, v in want.items())
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    # a checkpoint of another stage: this stage starts from 0
    other, net3, opt3 = demo_run(tmp_path, "--resume", str(run.run_dir / "checkpoint.pt"))
    assert other.restore("probe", {"model": net3}) == (0, None)
    assert not torch.equal(net3.backbone.weight, want["backbone.weight"])          # not loaded


def test_resume_refuses_another_scripts_run_and_drops_later_metrics(tmp_path):
    run, net, opt = demo_run(tmp_path)
    run.restore("train", {"model": net})
    for epoch in range(2):
        run.end_epoch(epoch, torch.tensor(1.0), {})
    harness.append_metrics(run.run_dir, {"stage": "train", "epoch": 3, "loss": 1.0})  # an interrupted epoch
    demo_run(tmp_path, "--resume", str(run.run_dir))
    lines = [json.loads(s) for s in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]                       # no epoch appears twice
    ckpt = data.load_checkpoint(run.run_dir / "checkpoint.pt")
    assert ckpt["script"] == "test_harness"                            # the file that defines the Args
    for made_by, says in (("fassl", "a run of fassl.py"), (None, "no 'script' entry")):
        ckpt["script"] = made_by
        harness.save_checkpoint(run.run_dir / "checkpoint.pt", ckpt)
        with pytest.raises(UserError, match=re.escape(says)):
            demo_run(tmp_path, "--resume", str(run.run_dir))


def test_run_stops_after_epochs_and_guards_the_loss(tmp_path):
    run, net, opt = demo_run(tmp_path, "--stop-after-epochs", "2")
    run.restore("", {"model": net})
    run.end_epoch(0, torch.tensor(1.0), {})
    with pytest.raises(harness.StopRun, match="stopped after 2 epochs.*--resume"):
        run.end_epoch(1, torch.tensor(1.0), {})
    lines = [json.loads(s) for s in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and not lines[0].get("stage")
    assert data.load_checkpoint(run.run_dir / "checkpoint.pt")["epoch"] == 2
    with pytest.raises(harness.NonFiniteLoss, match="loss is nan in epoch 3.*checkpoint.pt holds"):
        run.end_epoch(2, torch.tensor(float("nan")), {})
    assert data.load_checkpoint(run.run_dir / "checkpoint.pt")["epoch"] == 2   # nothing of it saved
    run.stage = "rebalance"
    with pytest.raises(harness.NonFiniteLoss, match="loss is inf in rebalance epoch 4"):
        run.end_epoch(3, torch.tensor(float("inf")), {})


def test_main_guard_exit_codes(capsys):
    def raising(exc):
        def main(argv):
            raise exc
        return main
    for exc, code in ((UserError("bad --x"), 2), (harness.NonFiniteLoss("loss is nan"), 1)):
        with pytest.raises(SystemExit) as e:
            harness.main_guard(raising(exc))
        assert e.value.code == code
        assert capsys.readouterr().err == f"error: {exc}\n"
    assert harness.main_guard(raising(harness.StopRun("stopped after 1 epochs"))) is None
    assert capsys.readouterr().out == "stopped after 1 epochs\n"
    assert harness.main_guard(lambda argv: argv, ["x"]) == ["x"]


# ---------------------------------------------------------------------------------------------------------
# The progress line
# ---------------------------------------------------------------------------------------------------------
def test_progress_line(capsys):
    prog = harness.Progress(total_steps=10, batch_size=4, every=3, prefix="simclr")
    lines = []
    for epoch in range(2):                                        # 0-based, printed as ep 1/2, ep 2/2
        prog.set_epoch(epoch, 2)
        for it in range(5):
            step = epoch * 5 + it
            lines.append(prog.step(step, loss=torch.tensor(1.23456), lr=0.4812))
    printed = [s for s in lines if s]
    # after the first step (0), every 3 steps (2, 5, 8), at the end of each epoch (4, 9), the last
    assert [i for i, s in enumerate(lines) if s] == [0, 2, 4, 5, 8, 9]
    assert capsys.readouterr().out.splitlines() == printed
    assert printed[0].startswith("[simclr] ep 1/2 it 1/5 | loss 1.2346 | lr 0.4812 | ")
    assert printed[1].startswith("[simclr] ep 1/2 it 3/5 |")
    assert printed[-1].startswith("[simclr] ep 2/2 it 5/5 |") and printed[-1].endswith("ETA 0s")
    assert all(" img/s | ETA " in s for s in printed)
    plain = harness.Progress(total_steps=4, batch_size=2, every=2)
    assert plain.step(1, loss=1e-5).startswith("it 2/4 | loss 1.000e-05 |")      # no epochs, no prefix
    slow = harness.Progress(total_steps=100, batch_size=2, every=50, wait=30.0)
    assert slow.step(0) and slow.step(1) is None                  # the first line comes at once
    slow.last_time -= 31                                          # 31 s later: a line, whatever N says
    assert slow.step(2).startswith("it 3/100 |") and slow.step(3) is None
    assert harness.fmt_duration(3725) == "1h02m" and harness.fmt_duration(65) == "1m05s"
    assert harness.fmt_duration(7) == "7s"


# ---------------------------------------------------------------------------------------------------------
# The four scripts: one command-line vocabulary, their paper tables, impossible arguments, the loss guard
# ---------------------------------------------------------------------------------------------------------
def test_shared_runtime_flags_are_the_ones_the_readme_names():
    assert tuple("--" + f.name.replace("_", "-") for f in dataclasses.fields(harness.RunArgs)) == SHARED
    assert harness.SHARED_FLAGS == tuple(f.name for f in dataclasses.fields(harness.RunArgs))


def entries(help_section: str) -> dict:
    """{flag: its help text, whitespace normalised} of an argparse help section."""
    out, flag = {}, None
    for line in help_section.splitlines():
        m = re.match(r"^  (--[\w-]+)", line)
        if m:
            flag = m.group(1)
            out[flag] = ""
        if flag:
            out[flag] = " ".join((out[flag] + " " + line).split())
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_the_shared_flags_with_the_same_text(name):
    out = subprocess.run([sys.executable, f"{name}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    method, runtime = text.split("runtime (shared by the four scripts):")
    for flag in SHARED:
        assert re.search(rf"^  {re.escape(flag)}\b", runtime, re.M), flag
        assert not re.search(rf"^  {re.escape(flag)}\b", method, re.M), flag   # never declared twice
    reference = entries(harness.make_parser(harness.RunArgs).format_help().split("four scripts):")[1])
    got = entries(runtime)
    assert set(got) == set(SHARED)
    for flag in SHARED:   # same text and default (--protocol, --seed, --n-max, --sync-bn: per script)
        per_script = ("--protocol", "--seed", "--n-max")
        want = reference[flag].split("(default:")[0] if flag in per_script else reference[flag]
        want = want.split(";")[0] if flag == "--sync-bn" else want
        assert got[flag].startswith(want), (flag, got[flag])
    for old in ("--bench-steps", "--log-every", "--ema-tau", "--probes ", "--ema ", "--temperature",
                "--feat-dim"):
        assert old not in text, (name, old)


PAPER_TABLES = {"fassl": "PAPER_ALL", "tase": "PAPER_ALL", "dscl": "PAPER_TOP1", "hybrid": "PAPER_TOP1"}


@pytest.mark.parametrize("name", ["fassl", "hybrid"])
def test_help_marks_every_default_that_derived_defaults_sets(name):
    """A flag that derived_defaults sets in a paper setting says so in --help ("where unset, set from other
    flags"), e.g. hybrid's --tau (1.0 for --loss psc on cifar10-lt)."""
    module = importlib.import_module(name)
    help_text = entries(harness.make_parser(module.Args, module.DEFAULTS, module.derived_defaults)
                        .format_help())
    for dataset, variant in getattr(module, PAPER_TABLES[name]):
        argv = ["--dataset", dataset, *([] if variant == "default" else variant.split())]
        args = harness.parse_args(module.Args, argv, module.DEFAULTS, module.derived_defaults)[0]
        for field in module.derived_defaults(args):
            flag = "--" + field.replace("_", "-")
            assert "set from other flags" in help_text[flag], (dataset, variant, flag, help_text[flag])


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_paper_table_key_round_trips_through_the_command_line(name):
    """`--dataset <ds>` plus the variant's flags gives exactly that variant label, so the paper's number of
    every row can be reached from the command line (a run is a paper setting exactly then)."""
    module = importlib.import_module(name)
    table = getattr(module, PAPER_TABLES[name])
    assert len(table) >= 2
    for (dataset, variant), cells in table.items():
        assert dataset in data.DATASETS and cells and all(isinstance(v, float) for v in cells.values())
        argv = ["--dataset", dataset, *([] if variant == "default" else variant.split())]
        args = harness.parse_args(module.Args, argv, module.DEFAULTS, derived_of(module))[0]
        got = harness.variant_label(args, module.DEFAULTS, derived_of(module))
        assert got == variant, (dataset, variant, got)
        for rho, value in cells.items():
            assert harness.paper_value(table, dataset, got, rho) == value


# One row per impossible argument: (script, flags, the flag the one-line error must name).
IMPOSSIBLE = [
    *[(s, ["--batch-size", "0"], "--batch-size") for s in SCRIPTS],
    *[(s, ["--lr", "0"], "--lr") for s in SCRIPTS],
    *[(s, ["--lr", "-0.1"], "--lr") for s in SCRIPTS],
    *[(s, ["--arch", "resnet99"], "--arch") for s in SCRIPTS],
    *[(s, ["--imb-ratio", "0.5"], "--imb-ratio") for s in SCRIPTS],
    *[(s, ["--dataset", "synthetic-lt", "--batch-size", "100000"], "--batch-size") for s in SCRIPTS],
    ("fassl", ["--sdclr-epochs", "-1"], "--sdclr-epochs"), ("fassl", ["--tau", "0"], "--tau"),
    ("fassl", ["--prune-ratio", "1.5"], "--prune-ratio"), ("fassl", ["--ema-decay", "1.5"], "--ema-decay"),
    ("fassl", ["--beta", "0"], "--beta"), ("fassl", ["--lr", "inf"], "--lr"),
    ("tase", ["--epochs", "-1"], "--epochs"), ("tase", ["--tau-min", "0"], "--tau-min"),
    ("dscl", ["--epochs", "-1"], "--epochs"), ("dscl", ["--tau", "0"], "--tau"),
    ("dscl", ["--alpha", "1.5"], "--alpha"), ("dscl", ["--ema-decay", "2"], "--ema-decay"),
    ("hybrid", ["--epochs", "-1"], "--epochs"), ("hybrid", ["--tau", "0"], "--tau"),
    ("hybrid", ["--no-curriculum", "2"], "--no-curriculum"),
    ("hybrid", ["--lr", "1e300"], "--lr"), ("hybrid", ["--stage2-lr", "1e300"], "--stage2-lr"),
]


@pytest.mark.parametrize("name, flags, flag", IMPOSSIBLE, ids=[f"{n}{' '.join(f)}" for n, f, _ in IMPOSSIBLE])
def test_impossible_arguments_end_in_one_line_and_exit_2(name, flags, flag, tmp_path, capsys):
    module = importlib.import_module(name)
    argv = ["--device", "cpu", "--out-dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as e:
        harness.main_guard(module.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("checkpoint.pt"))


def test_loss_guard_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    """hybrid.py trains one finite epoch; from epoch 2 (0-based epoch 1) the learning rate is absurd (1e9)."""
    import hybrid
    real = common.multistep_lr
    monkeypatch.setattr(common, "multistep_lr", lambda e, *a, **k: 1e9 if e >= 1 else real(e, *a, **k))
    argv = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--batch-size", "16", "--epochs", "3",
            "--eval-every", "100", "--device", "cpu", "--out-dir", str(tmp_path), "--print-every", "1000"]
    ds = small_ds()
    args, filled = harness.parse_args(hybrid.Args, argv, hybrid.DEFAULTS, hybrid.derived_defaults)
    with pytest.raises(SystemExit) as e:
        harness.main_guard(lambda _: hybrid.train(args, filled, ds))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("loss is nan" in err or "weights are not finite" in err)
    bad = int(re.search(r"train epoch (\d+)", err).group(1))      # the first non-finite epoch
    assert bad in (2, 3) and "--lr" in err and "--amp" in err
    (run_dir,) = list(tmp_path.iterdir())
    assert not (run_dir / "results.json").exists()
    ck = data.load_checkpoint(run_dir / "checkpoint.pt")
    assert ck["epoch"] == bad - 1 and ck["method"] == "hybrid-sc"    # the last finite epoch
    for part in ("model", "optimizer", "classifier_optimizer", "scaler"):
        assert part in ck, part
    assert ev.submodule_state(ck["model"], "backbone") and ev.submodule_state(ck["model"], "classifier")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, bad))
    assert all(math.isfinite(r["loss"]) for r in lines)


# ---------------------------------------------------------------------------------------------------------
# The reader's budget
# ---------------------------------------------------------------------------------------------------------
def python_files():
    return sorted(p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "runs" not in p.parts)


def test_no_python_line_is_too_long():
    """The modules at the repository root: 100 characters; tests (and other helpers): 110."""
    long = [f"{p.relative_to(ROOT)}:{i} ({len(line)})" for p in python_files()
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if len(line) > (100 if p.parent == ROOT else 110)]
    assert not long, long


def test_common_stays_small():
    lines = len((ROOT / "common.py").read_text().splitlines())
    assert lines <= 450, f"common.py has {lines} lines"


# common < data < eval < harness < the four methods, which import none of each other
LAYER = {"common": 0, "data": 1, "eval": 2, "harness": 3, "fassl": 4, "tase": 4, "dscl": 4, "hybrid": 4}


def project_imports(source: str) -> set[str]:
    """The project modules a source imports, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names & set(LAYER)


def test_the_import_finder_sees_every_form():
    source = ("import os\nimport common, numpy as np\nfrom data import augment\nimport eval as ev\n"
              "def f():\n    import hybrid\n    class A:\n        from harness import Run\n"
              "from torch import nn\n")
    assert project_imports(source) == {"common", "data", "eval", "hybrid", "harness"}


@pytest.mark.parametrize("name", sorted(LAYER))
def test_imports_run_one_way(name):
    found = project_imports((ROOT / f"{name}.py").read_text())
    wrong = sorted(m for m in found if LAYER[m] >= LAYER[name])
    assert not wrong, f"{name}.py imports {wrong}: only modules of a lower layer ({LAYER})"


def test_every_top_level_module_has_a_layer():
    assert {p.stem for p in ROOT.glob("*.py")} == set(LAYER)


def first_module_class_and_tables(source: str):
    """(line of the first class deriving from nn.Module, {table name: line}) of DEFAULTS and PAPER_* at the
    top level of a module."""
    tree = ast.parse(source)
    first = None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) in ("nn.Module", "torch.nn.Module", "Module")
                                                  for b in node.bases):
            first = node.lineno
            break
    tables = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for t in targets:
            if isinstance(t, ast.Name) and (t.id == "DEFAULTS" or t.id.startswith("PAPER_")):
                tables[t.id] = node.lineno
    return first, tables


def test_the_model_finder_sees_the_order():
    model_first = "import torch.nn as nn\nclass A(nn.Module):\n    pass\nDEFAULTS = {}\nPAPER_X: dict = {}\n"
    assert first_module_class_and_tables(model_first) == (2, {"DEFAULTS": 4, "PAPER_X": 5})
    tables_first = "DEFAULTS = {}\nclass Args:\n    pass\nclass A(nn.Module):\n    pass\n"
    assert first_module_class_and_tables(tables_first) == (4, {"DEFAULTS": 1})


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_model_comes_before_the_defaults_and_paper_tables(name):
    first, tables = first_module_class_and_tables((ROOT / f"{name}.py").read_text())
    assert first is not None, f"{name}.py defines no nn.Module class"
    assert "DEFAULTS" in tables and any(t.startswith("PAPER_") for t in tables), tables
    early = {t: line for t, line in tables.items() if line < first}
    assert not early, f"{name}.py defines {early} before its first nn.Module class (line {first})"


# Private material a user of the repository does not have: spec files, their section codes, outside paths.
UNFOLLOWABLE = re.compile(r"D§|spec §|specs? section|\bssl\.md|\bsupervised\.md|data-and-eval|\.\./shared"
                          r"|shared/(specs|papers|data|hooks)|\bspec (N|S)[0-9]\b")


def test_code_and_docs_cite_only_what_a_reader_has():
    files = [p for p in python_files() if p.name != "test_harness.py"] + sorted(ROOT.glob("*.md")) \
        + sorted(ROOT.glob("docs/*.md")) + sorted(ROOT.glob("labs/*.md"))
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}" for p in files
           for i, line in enumerate(p.read_text().splitlines(), 1) if UNFOLLOWABLE.search(line)]
    assert not bad, bad


def test_the_pattern_catches_what_it_should():
    for text in ("see D§5.1", "(spec §2.4)", "ssl.md eq. S1", "../shared/data/cifar10-jpeg.tar.gz",
                 "shared/specs/ssl.md"):
        assert UNFOLLOWABLE.search(text), text
    for text in ("Eq. (3)", "Sec. 4.2", "docs/data.md, 'CIFAR-LT conventions'", "Table 5", "docs/fassl.md"):
        assert not UNFOLLOWABLE.search(text), text


@pytest.mark.parametrize("name", SCRIPTS)
def test_equation_tables_name_functions_that_exist(name):
    """The docstring's table: its last column ('Here') names functions, classes and flags of the script."""
    module = importlib.import_module(name)
    lines = module.__doc__.splitlines()
    head = next(i for i, line in enumerate(lines) if line.rstrip().endswith("Here"))
    col = lines[head].rindex("Here")
    names = []
    for line in lines[head + 1:]:
        if not line.strip() or not line.startswith("  ") or line.lstrip().startswith("python "):
            break
        cell = line[col:] if len(line) > col and line[col - 1] == " " else ""
        cell = re.sub(r"--[\w-]+|\([^)]*\)", "", cell)                 # flags and (notes) are not names
        names += re.findall(r"(?<![-\w.])[A-Za-z_][\w.]*[A-Za-z_0-9]", cell)
    assert len(names) >= 5, names
    for ident in names:
        owner, _, attr = ident.rpartition(".")
        target = {"common": common, "eval": ev, "harness": harness, "data": data, "": module}[owner]
        assert hasattr(target, attr), f"{name}.py docstring names {ident}, which does not exist"


# ---------------------------------------------------------------------------------------------------------
# Folder trees
# ---------------------------------------------------------------------------------------------------------
def write_lt_tree(root, counts, per_test=4, size=32):
    """An ImageFolder tree root/{train,test}/class<c>/<i>.png with `counts` training images per class."""
    from PIL import Image
    rs = np.random.RandomState(0)
    for part, per_class in (("train", counts), ("test", [per_test] * len(counts))):
        for c, n in enumerate(per_class):
            (root / part / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rs.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / part / f"class{c}" / f"{i}.png")


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_folder_tree_is_used_as_it_is_unless_imb_ratio_is_given(name):
    module = importlib.import_module(name)

    def parse_script(*argv):
        return harness.parse_args(module.Args, list(argv), module.DEFAULTS, derived_of(module))[0]
    assert parse_script("--dataset", "folder").imb_ratio is None
    assert parse_script("--dataset", "folder", "--imb-ratio", "10").imb_ratio == 10
    assert parse_script("--dataset", "cifar10-lt").imb_ratio == 100


def test_a_long_tailed_folder_trains_whole_and_reports_its_groups(tmp_path, capsys):
    import tase
    counts = [40, 20, 10, 6, 3]
    write_lt_tree(tmp_path / "tree", counts)
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "--arch", "resnet8", "--epochs", "1",
            "--batch-size", "16", "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--probe-epochs",
            "1", "--probe-aug", "none", "--print-every", "1000", "--workers", "0", "--knn-every", "0"]
    harness.main_guard(tase.main, argv)
    (res_path,) = (tmp_path / "runs").rglob("results.json")
    res = json.loads(res_path.read_text())
    assert res["dataset"]["class_counts"] == counts                       # all 79 images, none cut away
    assert res["paper_setting"] is False and res["paper_value"] is None   # the paper has no such cell
    groups = res["at_selected"]["groups_thirds"]
    assert all(groups[k] is not None for k in ("many", "medium", "few", "group_mean"))
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][-1]
    assert row.count("|") >= 6 and "n/a" not in row               # All | Rare | Medium | Frequent | Std


# ---------------------------------------------------------------------------------------------------------
# The benchmark: FLOPs, the MFU peaks, the reference pipeline, the table (nothing timed is checked)
# ---------------------------------------------------------------------------------------------------------
def test_flop_count_of_a_plain_resnet_step_is_the_hand_count():
    """count_flops of one SGD step of the CIFAR ResNet-8 and a linear classifier (forward, cross-entropy,
    backward, update) on a fixed batch equals the count by hand. A k x k convolution from c_in to c_out
    channels with an h x w output: 2 B h w c_in c_out k^2 FLOPs forward (a multiply and an add per weight and
    output position), as much again for its weight gradient and, unless its input is the image (no
    gradient), for its input gradient. Linear(d, C): 2 B d C forward, as much for each gradient. BN, ReLU,
    pooling, the padding shortcut, the loss and SGD have no matrix product: not counted."""
    B, C = 4, 10
    torch.manual_seed(0)
    backbone, fc = common.build_backbone("resnet8"), nn.Linear(64, C)
    opt = torch.optim.SGD([*backbone.parameters(), *fc.parameters()], lr=0.1)
    x, y = torch.randn(B, 3, 32, 32), torch.arange(B) % C

    def step():
        common.optimizer_step(F.cross_entropy(fc(backbone(x)), y), opt)
    # (c_in, c_out, output side) of ResNet-8's 3x3 convolutions: stem, then one block of two per stage
    convs = [(3, 16, 32), (16, 16, 32), (16, 16, 32), (16, 32, 16), (32, 32, 16), (32, 64, 8), (64, 64, 8)]
    forward = [2 * B * side * side * c_in * c_out * 3 * 3 for c_in, c_out, side in convs]
    by_hand = 3 * sum(forward) - forward[0] + 3 * (2 * B * 64 * C)       # the stem has no input gradient
    assert harness.count_flops(step) == by_hand


def test_mfu_peaks_are_matched_by_device_name():
    """The dense peaks of the A100 SXM, H100 SXM and H200 (SXM); any other device gets no MFU."""
    assert harness.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert harness.peak_tflops("NVIDIA A100-SXM4-40GB", "off") == 156.0              # fp32 runs in TF32
    assert harness.peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.5
    assert harness.peak_tflops("NVIDIA H100 80GB HBM3", "off") == 494.5
    assert harness.peak_tflops("NVIDIA H200", "bf16") == 989.5
    for other in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
                  "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-16GB", "cpu (2 cores)"):
        assert harness.peak_tflops(other, "bf16") is None, other


def structure(inputs):
    """Types, shapes and dtypes of a step's (nested) inputs."""
    if isinstance(inputs, (list, tuple)):
        return type(inputs).__name__, [structure(v) for v in inputs]
    return None if inputs is None else (tuple(inputs.shape), inputs.dtype)


@pytest.mark.parametrize("name, dataset", [*((n, "synthetic-lt") for n in SCRIPTS), ("tase", "imagenet-lt"),
                                           ("dscl", "imagenet-lt"), ("dscl", "cifar10-lt")])
def test_the_reference_pipeline_builds_the_inputs_of_the_step(name, dataset):
    """--benchmark --reference: each script's per-image collate_fn builds, on the CPU, inputs of the same
    structure, shapes and dtypes as its batched views, and (at 32 px) the step trains on them."""
    module = importlib.import_module(name)
    argv = ["--dataset", dataset, "--arch", "resnet8", "--batch-size", "2", "--device", "cpu"]
    args = harness.parse_args(module.Args, argv, module.DEFAULTS, derived_of(module))[0]
    size, stored, classes = data.nominal_shape(dataset)
    torch.manual_seed(0)
    steps = module.benchmark_steps(args, size, classes, torch.device("cpu"), None)
    x, y = torch.randint(0, 256, (2, 3, stored, stored), dtype=torch.uint8), torch.arange(2)
    batch = [(image, int(label)) for image, label in zip(x.permute(0, 2, 3, 1).numpy(), y)]
    for bench in steps.values():
        ref = bench.reference(batch)
        assert structure(ref) == structure(bench.views(x, y))
        if size == 32:
            assert torch.isfinite(bench.step(ref))


def test_the_benchmark_table_has_every_method_and_configuration():
    """python harness.py --benchmark-table at the tiny scale on the CPU: a row per method, step and
    configuration (eager with the reference pipeline; compiled, with dynamo's cheap 'eager' backend), each
    with images/s, GFLOP (the same in both), the augmentation's share, graph breaks and recompilations (0 in
    every compiled step) and the speed-up over the reference; the augmentation benchmark's row; the device,
    torch version, commit and command above the table."""
    env = {**os.environ, "COMPILE_BACKEND": "eager", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "harness.py", "--benchmark-table", "--scale", "tiny", "--configs",
                          "amp", "compile", "--jobs", "2", "--device", "cpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Device: cpu") and f"torch {torch.__version__} | commit " in lines[0]
    assert lines[1].startswith("Command: `python harness.py --benchmark-table --scale tiny")
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    rows = [dict(zip(table[0], row)) for row in table[1:]]
    steps = {("fassl", "sdclr"), ("fassl", "prototypes"), ("fassl", "rebalance"), ("tase", "tase-r"),
             ("dscl", "dscl"), ("hybrid", "hybrid-sc")}
    by_config = {c: {(r["Method"], r["Step"]): r for r in rows if r["Config"] == c}
                 for c in ("amp", "compile")}
    assert set(by_config["amp"]) == set(by_config["compile"]) == steps
    for key in steps:
        eager, compiled = by_config["amp"][key], by_config["compile"][key]
        for r in (eager, compiled):
            assert float(r["images/s"]) > 0 and float(r["GFLOP/step"]) > 0 and r["Aug. share"].endswith("%")
        assert eager["GFLOP/step"] == compiled["GFLOP/step"]
        assert (eager["Graph breaks"], eager["Recompiles"]) == ("–", "–")
        assert (compiled["Graph breaks"], compiled["Recompiles"]) == ("0", "0"), compiled
        assert float(eager["Ref. images/s"]) > 0 and eager["Speed-up"].endswith("x")
        assert compiled["Speed-up"] == "–"
    (augment,) = [r for r in rows if r["Method"] == "data.py --bench-augment"]
    assert float(augment["images/s"]) > 0 and augment["Speed-up"].endswith("x")


# ---------------------------------------------------------------------------------------------------------
# GPU: no host synchronisation in a training step
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_and_a_training_step_pass_cuda_sync_debug_mode_error():
    import hybrid
    dev = torch.device("cuda")
    args = harness.parse_args(hybrid.Args, ["--loss", "psc", "--arch", "resnet8"], hybrid.DEFAULTS,
                              hybrid.derived_defaults)[0]
    model = common.prepare_model(hybrid.HybridNet("resnet8", 4, 32, "psc", None, 128, 1), dev)
    opt, scaler = hybrid.make_optimizer(model, args), common.make_scaler(torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device=dev)
    y = torch.arange(8, device=dev) % 4
    def step():
        views = hybrid.make_views((x, y), (x, y), 0.5, g, 32, True)
        return hybrid.train_step(model, model, opt, scaler, views, 0.5, args, torch.bfloat16)
    step()
    for recipe in data.RECIPES:
        data.augment(x, recipe, g, 32, channels_last=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        for recipe in data.RECIPES:
            data.augment(x, recipe, g, 32, channels_last=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_default_help_names_each_data_set_once_with_the_value_it_gets():
    table = {"*": {"arch": "resnet50"}, ("cifar10-lt", "synthetic-lt"): {"arch": "resnet32"},
             "synthetic-lt": {"arch": "resnet8"}}
    text = harness.default_help(table, "arch", "resnet18")
    assert text == "cifar10-lt: resnet32; synthetic-lt: resnet8; others: resnet50"
    for dataset, arch in (("cifar10-lt", "resnet32"), ("synthetic-lt", "resnet8"), ("x", "resnet50")):
        assert harness.defaults_for(table, dataset)["arch"] == arch
    assert harness.default_help({"a": {"lr": 1}}, "lr", 2) == "a: 1; others: 2"
