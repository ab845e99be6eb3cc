"""The documentation's Python examples run as written and print what they say they print."""

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
