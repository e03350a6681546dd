"""The course labs (labs/README.md): every command of every lab sheet runs as written, at reduced scale
(LAB_SCALE) on the offline data (labs/run.sh --offline: synthetic-lt, no download), through labs/run.sh,
and writes the outputs the sheet names; the sheets have their sections and train on CIFAR-10-LT; run.sh
chooses the data and stops at the first failure; the switches the labs added: hybrid.py --ce-sampler,
eval.py --compare."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import common
import data
import eval as evaluation
import harness
import hybrid

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHEETS = sorted(ROOT.glob("labs/[0-9]-*.md"))
# The smallest scale at which synthetic-lt (n_max 500, rho 100) keeps an image in every class (n_max 100) and
# a training set larger than the labs' batch of 128 (labs/README.md, Reduced scale).
LAB_SCALE = "0.2"
TRAINERS = ("fassl.py", "tase.py", "dscl.py", "hybrid.py")


def bash_lines(sheet: pathlib.Path) -> list[str]:
    """The non-blank, non-comment lines of the sheet's ```bash blocks: what labs/run.sh runs."""
    lines, inside = [], False
    for line in sheet.read_text().splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash" and not inside
        elif inside and line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
    return lines


def named_outputs(cmd: str) -> list[str]:
    """Globs of what a command promises: a results.json per --out-dir, and the --out / --plot file."""
    words = cmd.split()
    out = [f"{w}/*/results.json" for k, w in zip(words, words[1:]) if k == "--out-dir"]
    return out + [w for k, w in zip(words, words[1:]) if k in ("--out", "--plot")]


def test_there_are_five_labs_and_every_index_links_them():
    assert [p.name.split("-")[0] for p in SHEETS] == ["1", "2", "3", "4", "5"]
    index, readme = (ROOT / "labs/README.md").read_text(), (ROOT / "README.md").read_text()
    for sheet in SHEETS:
        assert f"]({sheet.name})" in index and f"](labs/{sheet.name})" in readme, sheet.name
    assert "LAB_SCALE" in index and "labs/run.sh" in index


@pytest.mark.parametrize("sheet", SHEETS, ids=lambda p: p.stem)
def test_sheet_has_its_sections_and_runnable_commands(sheet):
    text, n = sheet.read_text(), sheet.name.split("-")[0]
    for heading in ("## What this lab teaches", "## Questions", "## Change this and predict",
                    "## Instructor's notes: what we observed"):
        assert heading in text, heading
    questions = text.split("## Questions")[1].split("\n## ")[0]
    assert len(re.findall(r"^\d+\. ", questions, re.M)) >= 3
    notes = text.split("## Instructor's notes")[1]
    assert re.search(r"\(measured with the scripts of commit `[0-9a-f]{7}`", notes)
    assert "cpu-2core-c" in notes and "seeds 1 and 2" in notes        # machine; the seed ranges
    lines = bash_lines(sheet)
    assert lines and all(line.startswith("python ") and not line.endswith("\\") for line in lines), lines
    assert not re.search(r"^[ \t]+```bash", text, re.M)          # an indented bash block would not be run
    assert not any(re.search(r"\brm\b", line) for line in lines)
    for line in lines:                                         # a training run lands in runs/labN/<name>
        if line.split()[1] in TRAINERS:
            assert re.search(rf"--out-dir runs/lab{n}/[\w.-]+( |$)", line), line
    if n == "4":
        assert "TASE-R is our reconstruction" in text and "abstract" in text
        assert "k-means is TASE-R's choice" in text
    # real images first: every training command reads CIFAR-10-LT; the sheet names the offline path
    for line in lines:
        if line.split()[1] in TRAINERS + ("data.py",):
            assert "--dataset cifar10-lt" in line, line
    assert "**Data.**" in text and f"bash labs/run.sh {n} --offline" in text


def test_run_sh_runs_bash_blocks_only_and_stops_at_the_first_failure(tmp_path):
    (tmp_path / "labs").mkdir()
    shutil.copy(ROOT / "labs/run.sh", tmp_path / "labs/run.sh")
    (tmp_path / "labs/8-fake.md").write_text(
        "```bash\npython -c \"open('one', 'w')\"\n\n# a comment\npython -c \"import sys; sys.exit(3)\"\n"
        "python -c \"open('three', 'w')\"\n```\n```text\npython -c \"open('text', 'w')\"\n```\n")
    out = subprocess.run(["bash", "labs/run.sh", "8"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 3, out.stderr
    assert (tmp_path / "one").exists() and not (tmp_path / "three").exists()
    assert not (tmp_path / "text").exists()
    assert re.search(r"=== [0-9.]+ s: python -c", out.stdout) and "FAILED (exit 3" in out.stderr
    (tmp_path / "labs/9-bad.md").write_text("```bash\nls\npython -c 1\n```\n")      # not a python line
    out = subprocess.run(["bash", "labs/run.sh", "9"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "not one python command" in out.stderr
    ok = subprocess.run(["bash", str(tmp_path / "labs/run.sh"), "8", str(tmp_path / "elsewhere")],
                        capture_output=True, text=True)
    assert ok.returncode == 2                                  # a missing DIR is refused


def test_run_sh_chooses_the_data_for_every_command(tmp_path):
    """DATA= or --offline rewrites each command's --dataset cifar10-lt; the default leaves it alone."""
    (tmp_path / "labs").mkdir()
    shutil.copy(ROOT / "labs/run.sh", tmp_path / "labs/run.sh")
    echo = "python -c \"import sys; print('ARGS', *sys.argv[1:])\""
    (tmp_path / "labs/8-fake.md").write_text(
        f"```bash\n{echo} --dataset cifar10-lt --n-max 1000 --out-dir x\n{echo} --dataset cifar10-lt\n```\n")
    tree = tmp_path / "cifar10-jpeg"
    (tree / "train").mkdir(parents=True)

    def run(*argv, data=None):
        env = {k: v for k, v in os.environ.items() if k != "DATA"}
        env.update({"DATA": data} if data else {})
        out = subprocess.run(["bash", "labs/run.sh", "8", *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        return out.returncode, [r[5:] for r in out.stdout.splitlines() if r.startswith("ARGS ")], out
    assert run()[:2] == (0, ["--dataset cifar10-lt --n-max 1000 --out-dir x", "--dataset cifar10-lt"])
    offline = (0, ["--dataset synthetic-lt --out-dir x", "--dataset synthetic-lt"])   # its own n_max
    assert run("--offline")[:2] == offline and run(data="synthetic-lt")[:2] == offline
    rc, args, out = run(data=str(tree))
    folder = f"--dataset folder --data-dir {tree} --imb-ratio 100"
    assert rc == 0 and args == [f"{folder} --n-max 1000 --out-dir x", folder]
    assert f"data {tree}" in out.stdout                         # the total line names the data
    for bad in (str(tmp_path / "nowhere"), str(tmp_path / "labs")):   # no folder; no train/ in it
        rc, args, out = run(data=bad)
        assert rc == 2 and not args and "run.sh: DATA" in out.stderr


def test_run_sh_seed_adds_the_seed_and_moves_the_outputs(tmp_path):
    """SEED=S: --seed S on each training command, runs/labN/ -> runs/labN-seedS/ in every command."""
    (tmp_path / "labs").mkdir()
    shutil.copy(ROOT / "labs/run.sh", tmp_path / "labs/run.sh")
    (tmp_path / "hybrid.py").write_text("import sys\nprint('ARGS', *sys.argv[1:])\n")
    (tmp_path / "eval.py").write_text("import sys\nprint('ARGS', *sys.argv[1:])\n")
    (tmp_path / "labs/8-fake.md").write_text(
        "```bash\npython hybrid.py --dataset cifar10-lt --out-dir runs/lab8/ce\n"
        "python eval.py --compare runs/lab8/ce/*/results.json\n```\n")

    def run(seed):
        env = {k: v for k, v in os.environ.items() if k not in ("DATA", "SEED")}
        env.update({"SEED": seed} if seed is not None else {})
        out = subprocess.run(["bash", "labs/run.sh", "8"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        return out.returncode, [r[5:] for r in out.stdout.splitlines() if r.startswith("ARGS ")]
    assert run(None) == (0, ["--dataset cifar10-lt --out-dir runs/lab8/ce",
                             "--compare runs/lab8/ce/*/results.json"])
    assert run("2") == (0, ["--dataset cifar10-lt --out-dir runs/lab8-seed2/ce --seed 2",
                            "--compare runs/lab8-seed2/ce/*/results.json"])
    assert run("x")[0] == 2


def test_every_lab_runs_as_written_at_reduced_scale(tmp_path):
    """All five labs at once on the offline data, one thread each (the two cores are used by two labs at a
    time), each in its own directory with the repository's scripts; then every output its sheet names
    exists."""
    env = {**os.environ, "LAB_SCALE": LAB_SCALE, "DATA": "synthetic-lt", "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
           "PATH": os.environ.get("PATH", "")}
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"   # `python` = this one
    procs = {}
    for sheet in SHEETS:
        work = tmp_path / sheet.stem
        work.mkdir()
        for script in ROOT.glob("*.py"):
            (work / script.name).symlink_to(script)
        log = open(work / "run.log", "w")
        procs[sheet] = (work, log, subprocess.Popen(["bash", str(ROOT / "labs/run.sh"), sheet.name[0],
                                                     str(work)], env=env, stdout=log, stderr=log))
    failed = []
    for sheet, (work, log, proc) in procs.items():
        rc = proc.wait(timeout=900)
        log.close()
        text = (work / "run.log").read_text()
        lines = bash_lines(sheet)
        missing = [g for cmd in lines for g in named_outputs(cmd) if not list(work.glob(g))]
        if rc != 0 or missing or f"lab {sheet.name[0]}: {len(lines)} commands, total" not in text:
            failed.append(f"{sheet.name}: exit {rc}, missing {missing}\n{text[-3000:]}")
    assert not failed, "\n\n".join(failed)


# ---- hybrid.py --ce-sampler: a plain cross-entropy baseline with instance sampling -------------------------
def test_ce_sampler_random_with_alpha_zero_is_plain_cross_entropy(tmp_path, monkeypatch):
    ds = data.load_dataset("synthetic-lt", imb_ratio=10, num_classes=4, seed=0, n_max=120,
                           synthetic_n_test=8)                  # counts 120, 55, 25, 12
    seen, real = [], hybrid.endless

    def spy(loader, epoch):                                     # the classifier branch's batches
        for x, y in real(loader, epoch):
            seen.append(y.clone())
            yield x, y
    monkeypatch.setattr(hybrid, "endless", spy)
    head_share = {}
    for sampler in ("random", "balanced"):
        seen.clear()
        argv = ["--dataset", "synthetic-lt", "--arch", "resnet8", "--epochs", "2", "--batch-size", "16",
                "--no-curriculum", "0", "--ce-sampler", sampler, "--device", "cpu", "--workers", "0",
                "--out-dir", str(tmp_path / sampler), "--print-every", "1000"]
        args, filled = harness.parse_args(hybrid.Args, argv, hybrid.DEFAULTS, hybrid.derived_defaults)
        res = hybrid.train(args, filled, ds)
        y = torch.cat(seen)
        head_share[sampler] = float((y == 0).float().mean())
        assert ("--ce-sampler random" in res["variant"]) == (sampler == "random")
        (run_dir,) = (tmp_path / sampler).iterdir()
        rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(r["alpha"] == 0.0 and r["loss_con"] == 0.0 and r["loss_ce"] > 0 for r in rows)
    assert head_share["random"] > 0.45 and head_share["balanced"] < 0.35   # 120 / 212 = 0.57 against 1 / 4
    for flags, value in (([], 46.72), (["--ce-sampler", "random"], None)):   # plain CE is not a paper row
        args = harness.parse_args(hybrid.Args, ["--dataset", "cifar100-lt", *flags], hybrid.DEFAULTS,
                                  hybrid.derived_defaults)[0]
        label = harness.variant_label(args, hybrid.DEFAULTS, hybrid.derived_defaults)
        assert label == (" ".join(flags) or "default")
        assert harness.paper_value(hybrid.PAPER_TOP1, "cifar100-lt", label, args.imb_ratio) == value
    assert args.ce_sampler == "random" and hybrid.Args().ce_sampler == "balanced"


# ---- eval.py --compare: per-class accuracy of several runs in one figure, and a table ----------------------
def fake_results(path, method, variant, preds, seed=0, counts=(40, 20, 10, 5, 3, 1), paper=None):
    labels = [c for c in range(len(counts)) for _ in range(4)]
    res = {"method": method, "variant": variant, "seed": seed, "dataset": {"class_counts": list(counts)},
           "at_selected": evaluation.compute_metrics(preds, labels, len(counts), counts), "at_last": None,
           "paper_value": paper}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res["at_selected"]


def test_compare_draws_every_run_and_prints_its_groups(tmp_path, monkeypatch, capsys):
    head_only = [0] * 24                                       # predicts the head class for everything
    perfect = [c for c in range(6) for _ in range(4)]
    m1 = fake_results(tmp_path / "a/run1/results.json", "ce-instance", "--ce-sampler random", head_only)
    m2 = fake_results(tmp_path / "b/run2/results.json", "hybrid-sc", "default", perfect,
                      paper={"metric": "top1_overall", "value": 81.4})
    fake_results(tmp_path / "c/run3/results.json", "hybrid-sc", "default", perfect, seed=1)
    fake_results(tmp_path / "d/run4/results.json", "hybrid-sc", "default", perfect, seed=1)
    drawn, real = [], evaluation.plot_per_class
    monkeypatch.setattr(evaluation, "plot_per_class",
                        lambda runs, p, **kw: (drawn.append(runs), real(runs, p, **kw)))
    out = tmp_path / "cmp.png"
    evaluation.main(["--compare", *(str(p) for p in sorted(tmp_path.glob("*/run*/results.json"))),
                     "--out", str(out)])
    assert out.stat().st_size > 0
    (runs,) = drawn
    labels = ["ce-instance", "hybrid-sc (seed 0)", "hybrid-sc (seed 1)",
              "hybrid-sc (seed 1, #2)"]            # the run's name; a repeated one gets its seed, then #
    assert [r[0] for r in runs] == labels
    assert runs[0][1]["per_class_acc"] == [100, 0, 0, 0, 0, 0]          # the head class only
    assert runs[1][2] == [40, 20, 10, 5, 3, 1]                         # the x-axis: train counts
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(("| hybrid-sc", "| ce-"))]
    top1, groups = f"{m1['top1_overall']:.2f}", evaluation.paper_row(m1)[:-1]   # then Paper, Ours, difference
    assert rows[0] == f"| ce-instance | {top1} {groups}| - | - | - |"
    assert rows[1].startswith("| hybrid-sc (seed 0) | 100.00 | 100.00 | 100.00") and len(rows) == 4
    assert rows[1].endswith("| 81.40 (top1_overall) | 100.00 | +18.60 |")
    assert rows[2].endswith("| - | - | - |")
    assert m1["groups_thirds"]["few"] == 0.0 and m2["groups_thirds"]["many"] == 100.0
    (tmp_path / "empty.json").write_text(json.dumps({"method": "x", "dataset": {}}))
    with pytest.raises(common.UserError, match="no metrics or class counts"):
        evaluation.compare_runs([tmp_path / "empty.json"], tmp_path / "x.png")
    with pytest.raises(common.UserError, match="cannot read results file"):
        evaluation.compare_runs([tmp_path / "missing.json"], tmp_path / "x.png")
