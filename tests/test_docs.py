"""The documentation's Python examples run as written and print what they say they print, and its lists of choices
name every registered one."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc: str) -> list[str]:
    """The ```python blocks of ROOT/doc, in order."""
    return re.findall(r"^```python\n(.*?)^```", (ROOT / doc).read_text(), flags=re.S | re.M)


@pytest.fixture
def digits_run(tmp_path, monkeypatch, tiny_checkpoint) -> Path:
    """A working directory holding runs/digits-edm-tiny/checkpoint-00001500.pt, the main job's model as the docs name
    it (here a tiny untrained one of the same 1×8×8 shape)."""
    run = tmp_path / "runs" / "digits-edm-tiny"
    run.mkdir(parents=True)
    tiny_checkpoint(run / "checkpoint-00001500.pt", perturb=0.1)
    monkeypatch.chdir(tmp_path)
    return run


def test_the_readme_tour_of_the_api_runs(digits_run):
    """Its last line loads the main job's run folder: its latest checkpoint."""
    (tour,) = python_blocks("README.md")
    scope: dict = {}
    exec(compile(tour, "README.md", "exec"), scope)
    assert scope["per_example"].shape == (8,) and scope["x0"].shape == scope["noise"].shape
    assert scope["traj"].shape[1:] == scope["noise"].shape and Path(scope["info"].source).resolve() == digits_run / "checkpoint-00001500.pt"


def test_the_training_guides_loading_example_samples_the_run(digits_run):
    (example,) = python_blocks("docs/training.md")
    scope: dict = {}
    exec(compile(example, "docs/training.md", "exec"), scope)
    assert scope["x"].shape == (16, 1, 8, 8) and scope["x"].isfinite().all()


def test_the_design_pages_orders_of_convergence_are_what_the_example_prints(capsys):
    """docs/design.md's example ends with the lines it prints, as comments; running it prints them."""
    example = python_blocks("docs/design.md")[0]
    scope: dict = {}
    exec(compile(example, "docs/design.md", "exec"), scope)
    said = [line[2:] for line in example.splitlines() if re.match(r"# \w+ orders: ", line)]
    assert len(said) == 3 and capsys.readouterr().out.splitlines() == said


# Where the docs list every name of a registry: (page, the list's first characters, what ends it, the registry).
def _registries() -> dict:
    import edm
    from edm.data import DATASETS
    from edm.evaluation.scorers import METRICS

    return {"SCHEDULES": edm.schedules.SCHEDULES, "SOLVERS": edm.samplers.SOLVERS, "DISCRETIZATIONS":
            edm.schedules.DISCRETIZATIONS, "PRESETS": edm.networks.PRESETS, "DATASETS": DATASETS, "METRICS": METRICS}


DOC_LISTS = [
    ("docs/design.md", "Solvers: ", "All take the same arguments", "SOLVERS"),
    ("docs/training.md", "| `schedule` | ", "\n", "SCHEDULES"),
    ("docs/training.md", "| `network` | ", "\n", "PRESETS"),
    ("docs/training.md", "| `dataset` | ", "\n", "DATASETS"),
    ("docs/evaluation.md", "| metric | scores |", "\n\n", "METRICS"),
    ("docs/evaluation.md", "| `sampler.discretization=D` | ", "\n", "DISCRETIZATIONS"),
    ("docs/evaluation.md", "| solver | order / kind |", "\n\n", "SOLVERS"),
    ("docs/networks.md", "| name | class | configuration |", "\n\n", "PRESETS"),
]


def names_listed(text: str, names: list[str]) -> set[str]:
    """The names that `text` lists: each as a word of its own, or inside a range `a` … `b` (in the registry's order)."""
    listed = {n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)}
    for a, b in re.findall(r"`([\w-]+)` … `([\w-]+)`", text):
        if a in names and b in names:
            listed |= set(names[names.index(a): names.index(b) + 1])
    return listed


@pytest.mark.parametrize("doc, start, end, registry", DOC_LISTS)
def test_the_docs_lists_of_choices_name_every_registered_one(doc, start, end, registry):
    """A schedule, solver, discretization, network preset, data set or metric added to its registry is named where
    the docs list them all (docs/design.md, Conventions)."""
    text = (ROOT / doc).read_text()
    begin = text.index(start)
    excerpt = text[begin: text.index(end, begin + len(start))]
    names = list(_registries()[registry])
    missing = [n for n in names if n not in names_listed(excerpt, names)]
    assert not missing, f"{doc}'s list at {start.strip()!r} leaves out {', '.join(missing)} of {registry}: add them there"
