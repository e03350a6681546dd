"""The run harness across the four scripts: one CLI vocabulary, argument checks, the loss guard, and the
repository's own reading budget (line length, citations a reader can follow)."""
import dataclasses
import importlib
import json
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("fassl", "tase", "dscl", "hybrid")
SHARED = ("--dataset", "--data-dir", "--imb-ratio", "--protocol", "--seed", "--device", "--amp",
          "--channels-last", "--compile", "--workers", "--out-dir", "--resume", "--print-every",
          "--benchmark", "--benchmark-steps", "--stop-after-epochs", "--sync-bn")


def test_shared_runtime_flags_are_the_ones_the_readme_names():
    assert tuple("--" + f.name.replace("_", "-") for f in dataclasses.fields(common.RunArgs)) == SHARED


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
    reference = entries(common.make_parser(common.RunArgs).format_help().split("four scripts):")[1])
    got = entries(runtime)
    assert set(got) == set(SHARED)
    for flag in SHARED:   # same text and default (--protocol, --seed, --sync-bn: the paper's)
        want = reference[flag].split("(default:")[0] if flag in ("--protocol", "--seed") else reference[flag]
        want = want.split(";")[0] if flag == "--sync-bn" else want
        assert got[flag].startswith(want), (flag, got[flag])
    for old in ("--bench-steps", "--log-every", "--ema-tau", "--probes ", "--ema "):
        assert old not in text, (name, old)


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
    ("fassl", ["--beta", "0"], "--beta"),
    ("tase", ["--epochs", "-1"], "--epochs"), ("tase", ["--tau-min", "0"], "--tau-min"),
    ("dscl", ["--epochs", "-1"], "--epochs"), ("dscl", ["--temperature", "0"], "--temperature"),
    ("dscl", ["--alpha", "1.5"], "--alpha"), ("dscl", ["--ema-decay", "2"], "--ema-decay"),
    ("hybrid", ["--epochs", "-1"], "--epochs"), ("hybrid", ["--tau", "0"], "--tau"),
    ("hybrid", ["--no-curriculum", "2"], "--no-curriculum"),
]


@pytest.mark.parametrize("name, flags, flag", IMPOSSIBLE, ids=[f"{n}{' '.join(f)}" for n, f, _ in IMPOSSIBLE])
def test_impossible_arguments_end_in_one_line_and_exit_2(name, flags, flag, tmp_path, capsys):
    module = importlib.import_module(name)
    argv = ["--device", "cpu", "--out-dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as e:
        common.main_guard(module.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and flag in err, err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob("checkpoint.pt"))


def test_loss_guard_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    """hybrid.py trains one finite epoch; from epoch 2 the learning rate is absurd (1e9)."""
    import hybrid
    real = common.multistep_lr
    monkeypatch.setattr(common, "multistep_lr", lambda e, *a, **k: 1e9 if e >= 1 else real(e, *a, **k))
    argv = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--batch-size", "16", "--epochs", "3",
            "--eval-every", "100", "--device", "cpu", "--out-dir", str(tmp_path), "--print-every", "1000"]
    ds = data.load_dataset("synthetic-lt", imb_ratio=4, num_classes=4, synthetic_n_max=24, synthetic_n_test=8)
    args, filled = common.parse_args(hybrid.Args, argv, hybrid.DEFAULTS)
    with pytest.raises(SystemExit) as e:
        common.main_guard(lambda _: hybrid.train(args, filled, ds))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loss is nan" in err and "epoch 2" in err
    assert "--lr" in err and "--amp" in err
    (run_dir,) = list(tmp_path.iterdir())
    assert not (run_dir / "results.json").exists()
    ck = common.load_checkpoint(run_dir / "checkpoint.pt")
    assert ck["epoch"] == 1
    for part in ("backbone", "classifier", "heads"):
        assert all(torch.isfinite(v).all() for v in ck[part].values() if v.is_floating_point()), part
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1] and math.isfinite(lines[0]["loss"])


# ---------------------------------------------------------------------------------------------------------
# The reader's budget
# ---------------------------------------------------------------------------------------------------------
def python_files():
    return sorted(p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "runs" not in p.parts)


def test_no_python_line_is_longer_than_110_characters():
    long = [f"{p.relative_to(ROOT)}:{i}" for p in python_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 110]
    assert not long, long


def test_method_files_fit_their_budget():
    lines = {p.name: len(p.read_text().splitlines()) for p in ROOT.glob("*.py")}
    assert lines["fassl.py"] <= 550
    assert max(lines["tase.py"], lines["dscl.py"], lines["hybrid.py"]) <= 450
    assert sum(lines.values()) <= 4800, lines


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
        target = {"common": common, "eval": importlib.import_module("eval"), "": module}[owner]
        assert hasattr(target, attr), f"{name}.py docstring names {ident}, which does not exist"


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
    parse = lambda *argv: common.parse_args(module.Args, list(argv), module.DEFAULTS)[0]  # noqa: E731
    assert parse("--dataset", "folder").imb_ratio is None
    assert parse("--dataset", "folder", "--imb-ratio", "10").imb_ratio == 10
    assert parse("--dataset", "cifar10-lt").imb_ratio == 100


def test_a_long_tailed_folder_trains_whole_and_reports_its_groups(tmp_path, capsys):
    import tase
    counts = [40, 20, 10, 6, 3]
    write_lt_tree(tmp_path / "tree", counts)
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "--arch", "resnet8", "--epochs", "1",
            "--batch-size", "16", "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--probe-epochs",
            "1", "--probe-aug", "none", "--print-every", "1000", "--workers", "0", "--knn-every", "0"]
    common.main_guard(tase.main, argv)
    (res_path,) = (tmp_path / "runs").rglob("results.json")
    res = json.loads(res_path.read_text())
    assert res["dataset"]["class_counts"] == counts                       # all 79 images, none cut away
    groups = res["at_selected"]["groups_thirds"]
    assert all(groups[k] is not None for k in ("many", "medium", "few", "group_mean"))
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][-1]
    assert row.count("|") >= 6 and "n/a" not in row               # All | Rare | Medium | Frequent | Std


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_and_a_training_step_pass_cuda_sync_debug_mode_error():
    import hybrid
    dev = torch.device("cuda")
    args = common.parse_args(hybrid.Args, ["--loss", "psc", "--arch", "resnet8"], hybrid.DEFAULTS)[0]
    model = common.prepare_model(hybrid.HybridNet("resnet8", 4, 32, "psc", None, 128, 1), dev)
    opt, scaler = hybrid.make_optimizer(model, args), common.make_scaler(torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device=dev)
    y = torch.arange(8, device=dev) % 4
    step = lambda: hybrid.train_step(model, model, opt, scaler, (x, y), (x, y), 0.5, args, g, 32,  # noqa
                                     dev, torch.bfloat16)
    step()
    for recipe in data.RECIPES:
        data.augment(x, recipe, g, 32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        for recipe in data.RECIPES:
            data.augment(x, recipe, g, 32)
    finally:
        torch.cuda.set_sync_debug_mode(0)
