"""Nothing lost, every failure one line: what a user can run into (docs/usage.md, "When something
goes wrong") and what each gives: the message, the exit status, what is kept.

A read-only mount and a full disk are made for real where the machine allows it (a tmpfs and a
read-only bind mount in a private mount namespace, `unshare -m`, as root); elsewhere those tests are
skipped and the same failures are injected at the write."""
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import threading
import types

import numpy as np
import pytest
import torch

import data
import dscl
import fassl
import harness
import hybrid
import tase

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--batch-size", "16", "--device", "cpu",
        "--print-every", "1000", "--num-classes", "4", "--n-max", "24",
        "--synthetic-n-test", "8", "--imb-ratio", "4"]
HYBRID = [*TINY, "--epochs", "2", "--eval-every", "100"]
TASE = [*TINY, "--epochs", "1", "--probe", "--knn-every", "0"]
DSCL = [*TINY, "--epochs", "1", "--linear-epochs", "1", "--queue-size", "32", "--num-patches", "1"]
FASSL = [*TINY, "--sdclr-epochs", "1", "--stage1-epochs", "1", "--stage2-epochs", "1", "--probe",
         "--no-analyze", "--num-prototypes", "8"]
MAIN = {"fassl": fassl.main, "tase": tase.main, "dscl": dscl.main, "hybrid": hybrid.main}


def run_script(name, argv, capsys):
    """main_guard(<script>.main, argv): (exit status, stdout, stderr)."""
    code = 0
    try:
        harness.main_guard(MAIN[name], argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def fingerprint(run_dir) -> dict:
    """Every file of a run directory and the hash of its bytes."""
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(run_dir).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """One finished tiny run of hybrid.py and of tase.py."""
    out = tmp_path_factory.mktemp("runs")
    for name, argv in (("hybrid", HYBRID), ("tase", TASE)):
        harness.main_guard(MAIN[name], [*argv, "--out-dir", str(out / name)])
    return {name: next((out / name).iterdir()) for name in ("hybrid", "tase")}


# --- 1. Resuming another method's run: refused, nothing touched ------------------------------------

@pytest.mark.parametrize("script, victim", [("fassl", "hybrid"), ("tase", "hybrid"),
                                            ("dscl", "tase"), ("hybrid", "tase")])
def test_resuming_another_methods_run_is_refused_and_touches_nothing(finished_runs, script, victim,
                                                                     capsys):
    run_dir = finished_runs[victim]
    before = fingerprint(run_dir)
    code, out, err = run_script(script, [*TINY, "--resume", str(run_dir)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"a run of {victim}.py" in err and f"not of {script}.py" in err
    assert "resuming" not in out
    assert fingerprint(run_dir) == before


def test_a_checkpoint_of_an_older_layout_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "hybrid-synthetic-lt-20260101-000000"
    run_dir.mkdir()
    torch.save({"epoch": 1, "backbone": {}, "args": {}}, run_dir / "checkpoint.pt")
    code, _, err = run_script("hybrid", [*HYBRID, "--resume", str(run_dir)], capsys)
    assert code == 2 and "not a checkpoint of this version" in err and err.count("\n") == 1


# --- 2. A finished training is never thrown away by its results step --------------------------------

def write_tree(root, counts, per_test=4, size=32):
    """An ImageFolder tree root/{train,test}/class<c>/<i>.png with `counts` training images."""
    from PIL import Image
    rs = np.random.RandomState(0)
    for part, per_class in (("train", counts), ("test", [per_test] * len(counts))):
        for c, n in enumerate(per_class):
            (root / part / f"class{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rs.randint(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / part / f"class{c}" / f"{i}.png")


def test_hybrid_on_a_folder_tree_as_it_is_writes_its_results(tmp_path, capsys):
    """The documented default: --dataset folder without --imb-ratio (rho None) used to crash after
    the whole training, in the paper lookup."""
    write_tree(tmp_path / "tree", [20, 10, 5])
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "--arch", "resnet8",
            "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--workers", "0",
            "--out-dir", str(tmp_path / "runs"), "--print-every", "1000"]
    code, out, err = run_script("hybrid", argv, capsys)
    assert code == 0, err
    (res,) = (tmp_path / "runs").rglob("results.json")
    results = json.loads(res.read_text())
    assert results["dataset"]["imb_ratio"] is None and results["paper_value"] is None


def test_a_failing_results_step_keeps_the_training_and_says_how_to_evaluate_it(tmp_path, capsys,
                                                                               monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug in the report")
    monkeypatch.setattr(hybrid, "report", broken)
    code, _, err = run_script("hybrid", [*HYBRID, "--out-dir", str(tmp_path)], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    (run_dir,) = tmp_path.iterdir()
    ckpt = run_dir / "checkpoint.pt"
    assert f"eval.py --ckpt {ckpt} --probe classifier" in err and "ValueError" in err
    assert data.load_checkpoint(ckpt)["epoch"] == 2  # the whole training is kept
    assert "a bug in the report" in (run_dir / "error.txt").read_text()
    assert not (run_dir / "results.json").exists()


# --- 3. Folders that cannot be a long tail ----------------------------------------------------------

@pytest.mark.parametrize("script", ["tase", "hybrid"])
def test_a_one_class_folder_is_refused_in_one_line(tmp_path, script, capsys):
    write_tree(tmp_path / "tree", [12])
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "--device", "cpu",
            "--out-dir", str(tmp_path / "runs"), "--imb-ratio", "100"]
    code, _, err = run_script(script, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "at least two classes" in err
    assert not (tmp_path / "runs").exists()


def test_a_ratio_the_tree_cannot_give_is_refused_in_one_line(tmp_path, capsys):
    write_tree(tmp_path / "tree", [30, 30, 30])
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "--device", "cpu",
            "--out-dir", str(tmp_path / "runs"), "--imb-ratio", "100"]
    code, _, err = run_script("hybrid", argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--imb-ratio 100 cannot be built" in err and "at most 30 images" in err


# --- 4. Writes that fail ----------------------------------------------------------------------------

def test_an_out_dir_that_is_a_file_or_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for out_dir in (blocker, blocker / "below"):
        code, _, err = run_script("hybrid", [*HYBRID, "--out-dir", str(out_dir)], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert str(blocker) in err and "--out-dir" in err


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_resume_has_no_duplicate_metrics(
        tmp_path, capsys, monkeypatch):
    """torch.save wraps ENOSPC in a RuntimeError ("unexpected pos ..."): injected at epoch 2."""
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", failing_save)
    argv = [*HYBRID, "--epochs", "3", "--out-dir", str(tmp_path)]
    code, _, err = run_script("hybrid", argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "could not write checkpoint" in err
    (run_dir,) = tmp_path.iterdir()
    assert data.load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1
    assert not (run_dir / "checkpoint.pt.tmp").exists()
    monkeypatch.setattr(torch, "save", real_save)
    code, out, err = run_script("hybrid", [*argv, "--resume", str(run_dir)], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]


def test_metrics_written_past_the_checkpoint_are_dropped_on_resume(tmp_path, capsys):
    argv = [*HYBRID, "--out-dir", str(tmp_path), "--stop-after-epochs", "1"]
    assert run_script("hybrid", argv, capsys)[0] == 0
    (run_dir,) = tmp_path.iterdir()
    with open(run_dir / "metrics.jsonl", "a") as f:  # an epoch whose checkpoint never came
        f.write(json.dumps({"stage": "train", "epoch": 2, "loss": 1.0}) + "\n")
    argv = [*HYBRID, "--out-dir", str(tmp_path), "--resume", str(run_dir)]
    assert run_script("hybrid", argv, capsys)[0] == 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines[1]["loss"] != 1.0


def test_an_unwritable_data_cache_is_skipped_with_a_note(tmp_path, capsys, monkeypatch):
    write_tree(tmp_path / "tree", [12, 6])
    real_save = torch.save

    def refused(obj, f, *args, **kwargs):
        if str(f).endswith(".tmp") and ".cache-" in str(f):
            raise RuntimeError(f"File {f} cannot be opened.")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", refused)
    ds = data.load_dataset("folder", str(tmp_path / "tree"), imb_ratio=None)
    assert ds.class_counts == [12, 6]
    assert "no uint8 cache written" in capsys.readouterr().out
    assert not list((tmp_path / "tree").glob(".cache-*"))


def unshare_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return done.returncode == 0


def in_namespace(tmp_path, shell: str, python: str, timeout=300):
    """Run `shell` (mounts) then `python` (a script) in a private mount namespace."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(python))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "MPLBACKEND": "Agg"}
    cmd = ["unshare", "-m", "sh", "-c", f"{shell} && {sys.executable} {script}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


SETUP = """
import sys
import harness, hybrid
argv = {argv!r}
harness.main_guard(hybrid.main, argv)
"""


@pytest.mark.skipif(not unshare_available(), reason="needs root and unshare -m for real mounts")
def test_real_read_only_and_full_mounts(tmp_path):
    """A read-only --out-dir, a finished run resumed read-only, a full disk, a read-only data tree:
    each one line, a non-zero exit (or, for the data cache, a note), the checkpoint kept."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # a finished run, then the same directory mounted read-only and resumed
    runs = tmp_path / "runs"
    harness.main_guard(hybrid.main, [*HYBRID, "--out-dir", str(runs)])
    (run_dir,) = runs.iterdir()
    before = fingerprint(run_dir)
    (run_dir / "results.json").unlink()
    ro = f"mount --bind {runs} {runs} && mount -o remount,bind,ro {runs}"
    argv = [*HYBRID, "--out-dir", str(runs), "--resume", str(run_dir)]
    done = in_namespace(tmp_path, ro, SETUP.format(argv=argv))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Read-only file system" in done.stderr
    assert "is intact" in done.stderr
    assert fingerprint(run_dir) == {k: v for k, v in before.items() if k != "results.json"}
    # a new run into a read-only --out-dir
    done = in_namespace(tmp_path, ro, SETUP.format(argv=[*HYBRID, "--out-dir", str(runs / "x")]))
    assert done.returncode == 2 and "Read-only file system" in done.stderr
    assert done.stderr.count("\n") == 1
    # a full disk: room for one checkpoint and a half, so the second write (a new file beside the
    # old one) fills it up
    room = (run_dir / "checkpoint.pt").stat().st_size * 3 // 2 // 1024 + 64
    full = f"mount -t tmpfs -o size={room}k tmpfs {mnt}"
    argv = [*HYBRID, "--epochs", "5", "--out-dir", str(mnt)]
    job = SETUP.format(argv=argv) + textwrap.dedent(f"""
        import pathlib, data
        (run_dir,) = pathlib.Path({str(mnt)!r}).iterdir()
        print("epoch kept:", data.load_checkpoint(run_dir / "checkpoint.pt")["epoch"])
    """)
    done = in_namespace(tmp_path, full, job.replace("harness.main_guard(hybrid.main, argv)",
                                                    "try:\n    harness.main_guard(hybrid.main, "
                                                    "argv)\nexcept SystemExit as e:\n    "
                                                    "print('exit', e.code)"))
    assert "exit 2" in done.stdout and "epoch kept: " in done.stdout, done.stdout + done.stderr
    assert "could not write checkpoint" in done.stderr and "Traceback" not in done.stderr
    # a read-only data tree read for the first time: no cache, a note, the run goes on
    tree = tmp_path / "tree"
    write_tree(tree, [12, 6])
    ro_tree = f"mount --bind {tree} {tree} && mount -o remount,bind,ro {tree}"
    job = f"""
        import data
        ds = data.load_dataset("folder", {str(tree)!r}, imb_ratio=None)
        print("counts", ds.class_counts)
    """
    done = in_namespace(tmp_path, ro_tree, job)
    assert done.returncode == 0, done.stderr
    assert "counts [12, 6]" in done.stdout and "no uint8 cache written" in done.stdout


# --- 7. Two runs started in the same second into the same --out-dir -----------------------------

def test_make_run_dir_is_atomic_under_a_race(tmp_path, monkeypatch):
    class Frozen:
        @staticmethod
        def now():
            import datetime
            return datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(harness, "datetime", types.SimpleNamespace(datetime=Frozen))
    made = []
    errors = []
    start = threading.Barrier(8)

    def worker():
        start.wait()
        try:
            made.append(harness.make_run_dir("m", "d", str(tmp_path)))
        except Exception as e:  # noqa: BLE001 - the test fails on any error
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(made)) == 8
    names = sorted(p.name for p in made)
    assert names[0] == "m-d-20260102-030405" and names[-1].endswith("-7")


# --- 8. Messages that point the right way -------------------------------------------------------

def test_random_bytes_are_not_a_checkpoint_and_eval_names_its_flag(tmp_path, capsys):
    junk = tmp_path / "checkpoint.pt"
    junk.write_bytes(os.urandom(4096))
    code, _, err = run_script("hybrid", [*HYBRID, "--resume", str(junk)], capsys)
    assert code == 2 and "not a checkpoint (unreadable)" in err and "Weights only" not in err
    import eval as ev
    with pytest.raises(SystemExit) as e:
        with __import__("common").user_errors():
            ev.main(["--ckpt", str(junk)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--ckpt" in err and "--resume" not in err


# --- 9. Under torchrun the "resuming" line comes once -----------------------------------------

def test_the_resuming_line_is_printed_by_process_0_only(tmp_path, capsys, monkeypatch):
    """Run reads the checkpoint before the process group exists (and before the other processes'
    output is silenced), so it prints the line on process 0 only."""
    assert run_script("hybrid", [*HYBRID, "--out-dir", str(tmp_path), "--stop-after-epochs", "1"],
                      capsys)[0] == 0
    (run_dir,) = tmp_path.iterdir()
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        args, filled = harness.parse_args(hybrid.Args, [*HYBRID, "--resume", str(run_dir)],
                                          hybrid.DEFAULTS, hybrid.derived_defaults)
        harness.Run(hybrid.method_name, args, filled, hybrid.DEFAULTS, hybrid.derived_defaults)
        assert capsys.readouterr().out.count("resuming ") == lines
