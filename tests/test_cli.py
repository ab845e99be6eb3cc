"""The installed commands (pyproject.toml [project.scripts]): present, one Hydra style, tab completion, no checkout needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edm.evaluation.scorers import METRICS
from edm.models.checkpoint import find_latest, load_checkpoint

from conftest import REPO, command, metrics_records

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCRIPTS = PROJECT["scripts"]


def run(args, cwd, env=None):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_distribution_is_not_named_edm_and_installs_every_command():
    """`edm` on PyPI is another project: the distribution has its own name, and pip installed each script."""
    from importlib.metadata import distribution

    assert PROJECT["name"] != "edm"
    installed = {ep.name: ep.value for ep in distribution(PROJECT["name"]).entry_points if ep.group == "console_scripts"}
    assert installed == SCRIPTS
    assert {"edm-train", "edm-sample", "edm-eval", "edm-export"} <= set(SCRIPTS)


def _in_process(name: str, *args: str) -> str:
    """What command `name` (its [project.scripts] entry point, called here) prints to stdout for `args`."""
    import importlib
    import io
    from contextlib import redirect_stdout

    module, function = SCRIPTS[name].split(":")
    argv, sys.argv = sys.argv, [name, *args]
    try:
        with redirect_stdout(io.StringIO()) as printed:
            getattr(importlib.import_module(module), function)()
    except SystemExit as stop:
        assert stop.code in (0, None), (name, args, stop.code)
    finally:
        sys.argv = argv
    return printed.getvalue()


def test_every_command_gives_this_packages_version_not_only_hydras(monkeypatch, tmp_path):
    import hydra
    import torch

    import edm

    monkeypatch.chdir(tmp_path)
    for name in sorted(SCRIPTS):
        assert _in_process(name, "--version") == f"{name} {edm.__version__} (Hydra {hydra.__version__}, torch {torch.__version__})\n"
    assert edm.__version__ == PROJECT["version"] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_is_a_hydra_app_with_help(name, monkeypatch, tmp_path):
    """Hydra's app help with the options (the installed scripts themselves run in the tests of each command)."""
    monkeypatch.chdir(tmp_path)
    printed = _in_process(name, "--help")
    assert "== Options (key=value" in printed or "== Config ==" in printed  # Hydra's help, not argparse's
    assert not list(tmp_path.iterdir())  # --help writes nothing


def test_a_misspelled_solver_option_is_named_with_the_close_ones_not_sent_to_plus():
    """sampler.options is free-form (Hydra: add keys with +); a name no solver takes gets the close ones and the list,
    one any solver takes keeps Hydra's + hint (its sampler file may not list it)."""
    from edm.cli import _no_solver_option

    assert _no_solver_option("sampler.options.churnn").startswith(
        "sampler.options.churnn: no solver takes an option 'churnn' (did you mean churn?); the solvers' options: ")
    assert _no_solver_option("sampler.options.eta") is None and _no_solver_option("lr") is None


@pytest.mark.parametrize("name, override, expected", [
    ("edm-train", "lrr=0.1", "edm-train: error: unknown key lrr: not an option of this command (did you mean lr? --help "
                             "lists them)"),
    ("edm-sample", "sampler.num_step=3", "edm-sample: error: unknown key sampler.num_step: not an option of this command "
                                         "(did you mean sampler.num_steps? --help lists them)"),
    ("edm-train", "xyzzy=1", "edm-train: error: unknown key xyzzy: not an option of this command (--help lists them)"),
    ("edm-sample", "dataset.resolution=16", "edm-sample: error: dataset.resolution sets a key of dataset, which this "
                                            "command leaves unset: name it first (dataset=NAME dataset.resolution=...; "
                                            "--help lists the options)"),  # OmegaConf's AssertionError before
    ("edm-sample", "smapler.num_steps=3", "edm-sample: error: unknown key smapler.num_steps: not an option of this "
                                          "command (did you mean sampler.num_steps? --help lists them)"),  # not the last part
    ("edm-train", "dataset.foo.resolution=3", "edm-train: error: unknown key dataset.foo.resolution: not an option of "
                                              "this command (--help lists them)"),  # not itself
    ("edm-eval", "metirc.ref=x", "edm-eval: error: unknown key metirc.ref: not an option of this command (--help lists "
                                 "them)"),  # metric, the option close to it, has no value yet (???)
    ("edm-sample", "batch=many", "edm-sample: error: batch=many: Value 'many' of type 'str' could not be converted to Integer"),
    ("edm-train", "trackers=tensorboard", "edm-train: error: trackers=tensorboard: Invalid value assigned: str is not a "
                                          "ListConfig, list or tuple; give a list: 'trackers=[tensorboard]'\n"),
    ("edm-posthoc", "sigma_rel=[0.1", "edm-posthoc: error: an override does not parse: "),
    ("edm-sample", "sampler.options.eta=0.5", "edm-sample: error: sampler.options.eta is not in the config file: pass "
                                              "+sampler.options.eta=0.5 to add it"),
    ("edm-eval", "metric=fidd", "edm-eval: error: In 'evaluate': Could not find 'metric/fidd'; Available options in "
                                f"'metric': {', '.join(sorted([*METRICS, 'ref']))}\n"),  # every row of METRICS, and ref
    ("edm-sample", "network=tiny", "edm-sample: error: network is not a config group of this command (--help lists its "
                                   "options)"),
])
def test_hydras_command_line_errors_are_one_line_that_names_the_key(name, override, expected, tmp_path):
    """A misspelt key (with the options close to it, whichever part of the key is misspelt), a value of the wrong type, an override that does not parse, a group
    option that does not exist: one line `name: error: ...` and exit 1, not Hydra's report (whose hint +KEY=V the
    commands refuse)."""
    proc = run([command(name), override], cwd=tmp_path)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(expected) and "To append to your config use" not in proc.stderr


def test_an_omegaconf_error_from_a_bug_in_a_command_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """hydra_errors makes Hydra's errors of the command line one line, not the same kinds of error raised by the
    command's own code (a bug)."""
    import hydra
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError

    from edm.cli import hydra_errors

    (tmp_path / "c.yaml").write_text("a: 1\n")

    @hydra_errors("prog")
    @hydra.main(version_base="1.3", config_path=str(tmp_path), config_name="c")
    def main(cfg):
        return OmegaConf.create({"a": 1}).b

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prog", "hydra.run.dir=."])
    with pytest.raises(ConfigAttributeError, match="Missing key b"):
        main()
    monkeypatch.setattr(sys, "argv", ["prog", "hydra.run.dir=.", "lrr=1"])
    with pytest.raises(SystemExit):  # a key the config lacks: Hydra's error, one line
        main()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("prog: error: lrr is not in the config file: pass +lrr=1")


def test_hydra_tab_completion_installs_for_the_command_and_completes_groups(tmp_path):
    install = run([command("edm-train"), "-sc", "install=bash"], cwd=tmp_path)
    assert install.returncode == 0 and install.stdout.rstrip().endswith("-F hydra_bash_completion edm-train")
    env = {**os.environ, "PATH": f"{Path(command('edm-train')).parent}{os.pathsep}{os.environ['PATH']}"}
    if shutil.which("bash"):
        script = install.stdout + "\ncomplete -p edm-train\n"
        registered = run(["bash", "-c", script], cwd=tmp_path, env=env)
        assert "hydra_bash_completion edm-train" in registered.stdout, registered.stderr
    for line, expected in [("edm-train schedule=", "schedule=fm"), ("edm-sample sampler=", "sampler=dpmpp_2m")]:
        program = line.split()[0]
        query = run([command(program), "-sc", "query=bash"], cwd=tmp_path, env={**env, "COMP_LINE": line, "COMP_POINT": str(len(line))})
        assert expected in query.stdout.split(), (line, query.stdout, query.stderr)


def test_python_m_edm_train_is_the_same_command(tmp_path):
    module = run([sys.executable, "-m", "edm.train", "--help"], cwd=tmp_path)
    script = run([command("edm-train"), "--help"], cwd=tmp_path)
    assert module.returncode == script.returncode == 0 and module.stdout == script.stdout


def test_an_install_without_a_checkout_has_every_command(tmp_path):
    """A wheel built from the project's files (no editable link to this checkout) brings the commands and
    their configs: each composes its config from the installed package, in a folder far from the repo."""
    source = tmp_path / "src"
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "edm", "configs"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, source / part, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    target = tmp_path / "site"
    pip = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
               str(source)], cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert (target / "edm" / "configs" / "train.yaml").is_file()
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    assert sorted(p.name for p in (target / "bin").iterdir()) == sorted(SCRIPTS)
    for name in ("edm-train", "edm-sample"):  # each composes its config from the installed package
        proc = run([str(target / "bin" / name), "--help"], cwd=work, env=env)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    where = run([sys.executable, "-c", "import edm.cli; print(edm.cli.CONFIG_DIR)"], cwd=work, env=env)
    assert Path(where.stdout.strip()) == target / "edm" / "configs"


@pytest.mark.slow  # the same CLI path runs (in two processes) in test_two_cpu_processes_see_different_data
def test_cli_main_job_writes_checkpoint_grid_and_metrics(tmp_path, tiny_train, one_thread_env):
    run_dir = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "schedule=fm", "sampler=euler"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples:" in proc.stdout
    assert find_latest(run_dir).name == "checkpoint-00000004.pt"
    assert (run_dir / "samples-final.png").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert len(metrics_records(run_dir)) == 4
    again = subprocess.run(  # known errors end with a one-line message and status 1
        [sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "schedule=fm"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env,
    )
    assert again.returncode == 1 and "edm-train: error: run_dir" in again.stderr and "resume=true" in again.stderr
    other = subprocess.run(  # refused once it owns the folder: the run's log ends with the reason, as stderr
        [sys.executable, "-m", "edm.train", *tiny_train, f"run_dir={run_dir}", "schedule=fm", "resume=true",
         "network.dropout=0.2"], cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env,
    )
    reason = "edm-train: error: checkpoint"
    assert other.returncode == 1 and reason in other.stderr and "network.dropout" in other.stderr
    last = (run_dir / "train.log").read_text().splitlines()[-1]
    assert reason in last and "network.dropout" in last and other.stderr.count(reason) == 1


def test_every_config_ships_in_the_wheel():
    """pyproject.toml packages configs/ as edm/configs (for non-editable installs): its globs
    must reach every yaml file, and the folder must be the one the commands read in a checkout."""
    tomllib = pytest.importorskip("tomllib")
    from fnmatch import fnmatch

    from edm.cli import CONFIG_DIR

    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder = root / setup["package-dir"]["edm.configs"]
    assert "edm.configs" in setup["packages"] and Path(CONFIG_DIR) == folder
    yamls = [p.relative_to(folder).as_posix() for p in folder.rglob("*.yaml")]
    assert "train.yaml" in yamls and "dataset/digits.yaml" in yamls
    missed = [y for y in yamls if not any(fnmatch(y, g) and y.count("/") == g.count("/") for g in setup["package-data"]["edm.configs"])]
    assert not missed, f"not packaged: {missed}"


def test_a_sweep_jobs_folder_name_is_read_back_whole_as_a_path_value():
    """Paths, lists and dicts in a job's overrides become one folder name that Hydra's parser reads back unchanged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from edm.cli import sweep_folder_name

    parser = OverridesParser.create()
    for overrides, expected in [("init-runs/digits-edm-tiny__lr-0.0001", "init-runs+digits-edm-tiny__lr-0.0001"),
                                ("ema_sigma_rel-[0.05,0.1]__seed-1", "ema_sigma_rel-0.05_0.1__seed-1"),
                                ("+options.stochastic-{churn: 5}__out-~/x", "+options.stochastic-churn_5__out-_+x"),
                                ("init-runs/café", "init-runs+caf_")]:
        name = sweep_folder_name(overrides)
        assert name == expected and parser.parse_override(f"checkpoint=sweep/0-{name}").value() == f"sweep/0-{name}"


def test_a_two_by_two_sweep_trains_four_jobs_into_four_folders(tmp_path, tiny_train, one_thread_env):
    """python -m edm.train -m schedule=vp,fm adam_betas=[0.9,0.99],[0.9,0.999]: 4 jobs, each in its own folder under
    hydra.sweep.dir with its own checkpoint and settings, whose name (lists too) a command line takes back as a path;
    multirun.yaml beside them. A run_dir on the command line of a sweep is refused (it would be one folder for every
    job)."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "edm.train", "-m", *tiny_train, "schedule=vp,fm", "adam_betas=[0.9,0.99],[0.9,0.999]",
            "progress=false"]
    proc = subprocess.run([*args, f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=one_thread_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4 and (sweep / "multirun.yaml").is_file()
    settings = set()
    for job in jobs:
        state = load_checkpoint(find_latest(job))
        settings.add((state["config"]["schedule"]["name"], state["config"]["adam_betas"][1]))
        assert state["config"]["run_dir"] == str(job) and (job / "train.log").is_file()
    assert settings == {("vp", 0.99), ("vp", 0.999), ("fm", 0.99), ("fm", 0.999)}
    assert all(not set("=,[]") & set(job.name) for job in jobs)  # a job folder is a valid override value
    sample = subprocess.run([command("edm-sample"), f"checkpoint={jobs[0]}", "num_images=1",
                             "sampler.num_steps=2", f"out={tmp_path / 'from-job'}", "progress=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env)
    assert sample.returncode == 0, sample.stderr[-2000:]
    proc = subprocess.run([*args, f"run_dir={tmp_path / 'one'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=one_thread_env)
    assert proc.returncode == 1 and "pass hydra.sweep.dir=DIR instead of run_dir" in proc.stderr
    assert not (tmp_path / "one").exists()


def test_a_rerun_of_some_sweep_jobs_finds_each_jobs_folder_whatever_its_number(tmp_path, tiny_train, one_thread_env):
    """-m schedule=vp,fm, then -m schedule=fm resume=true total_kimg=MORE on the same hydra.sweep.dir: the rerun numbers
    the fm job 0, not 1, yet continues 1-...fm from its checkpoint (no second, fresh run of the same settings in a new
    0-...fm folder), and without resume=true it is refused there, as a run_dir holding checkpoints is, its way out
    naming hydra.sweep.dir where a single run's names run_dir."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "edm.train", "-m", *tiny_train, "progress=false",
            f"hydra.sweep.dir={sweep}"]

    def run(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env=one_thread_env)

    assert (proc := run("schedule=vp,fm")).returncode == 0, proc.stderr[-3000:]
    fm = next(job for job in sweep.iterdir() if job.name.startswith("1-") and job.name.endswith("schedule-fm"))
    assert find_latest(fm).name == "checkpoint-00000004.pt"
    assert (proc := run("schedule=fm", "resume=true", "total_kimg=0.064")).returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {fm / 'checkpoint-00000004.pt'}" in proc.stderr
    assert find_latest(fm).name == "checkpoint-00000008.pt"
    assert sorted(job.name[:2] for job in sweep.iterdir() if job.is_dir()) == ["0-", "1-"]  # no new job folder
    proc = run("schedule=fm")
    assert proc.returncode == 1 and f"run_dir {fm} already holds checkpoint-00000008.pt; pass resume=true" in proc.stderr
    assert "for another, pass another hydra.sweep.dir=DIR" in proc.stderr  # run_dir= is refused in a sweep


def test_a_sweep_job_whose_settings_have_runs_in_two_job_folders_is_refused_naming_both(tmp_path):
    """Which of two earlier runs of a job's overrides to continue is the user's choice: neither is taken, and the
    empty folder Hydra made for the job is removed."""
    from edm.cli.train import continued_job_folder

    for name in ("0-lr-0.1", "3-lr-0.2", "5-lr-0.2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "2-lr-0.2").mkdir()  # Hydra's, for this job
    with pytest.raises(ValueError, match=r"has several runs of its settings in .*: 3-lr-0.2, 5-lr-0.2; delete or move "
                                         r"all but the one to continue"):
        continued_job_folder(str(tmp_path / "2-lr-0.2"), ())
    assert not (tmp_path / "2-lr-0.2").exists()  # the refused job leaves no empty folder behind
    assert continued_job_folder(str(tmp_path / "0-lr-0.1"), ()) == str(tmp_path / "0-lr-0.1")


def test_a_sweep_job_continues_a_folder_whose_name_differs_only_by_keys_a_resume_may_change(tmp_path):
    """A rerun that changes (or an older name that holds) a key kept out of folder names, batch_per_device for an
    elastic resume, finds the job's run; one that differs in another key does not."""
    from edm.cli.train import continued_job_folder

    old = tmp_path / "0-batch_per_device-8__grid_size-4__lr-0.1"
    old.mkdir()
    (old / "metrics.jsonl").write_text('{"step": 1}\n')
    for name, expected in (("1-lr-0.1", old), ("1-batch_per_device-4__lr-0.1", old), ("1-lr-0.2", None)):
        (tmp_path / name).mkdir()
        found = continued_job_folder(str(tmp_path / name), ("batch_per_device", "grid_size"))
        assert found == str(expected or tmp_path / name)


def test_sweep_folder_names_leave_out_exactly_the_keys_a_resume_may_change():
    """configs/train.yaml's exclude_keys are RESUME_FREE's whole keys (run_dir aside: a sweep refuses it; Hydra
    excludes whole keys only, so sampler.* and latent.* stay in names): a key a resume may change, left in a folder
    name, would make a sweep's elastic rerun (batch_per_device=..., compile=true, ...) train every job again."""
    from omegaconf import OmegaConf

    from edm.cli import CONFIG_DIR
    from edm.training.run import RESUME_FREE

    hydra_cfg = OmegaConf.load(Path(CONFIG_DIR) / "train.yaml").hydra
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    assert excluded == {key for key in RESUME_FREE if not key.endswith(".")} - {"run_dir"}
