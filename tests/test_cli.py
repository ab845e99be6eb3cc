"""The installed commands (pyproject.toml [project.scripts]): present, one Hydra style, tab completion, no checkout needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import command

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


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_is_a_hydra_app_with_help(name, tmp_path):
    proc = run([command(name), "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "== Options (key=value" in proc.stdout or "== Config ==" in proc.stdout  # Hydra's help, not argparse's
    assert not list(tmp_path.iterdir())  # --help writes nothing


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
