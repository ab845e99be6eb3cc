"""Generation (edm.sampling: seeds, plans, batches, labels) and the edm-sample command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edm
from edm import sampling
from edm.data import DatasetConfig
from edm.models.loading import load_model
from edm.generation.outputs import to_uint8
from edm.core.samplers import SamplerConfig
from edm.generation.sampling import format_seeds, generate_batch, parse_seeds, plan_images, shard

from conftest import command

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def ideal():
    """The exact denoiser of 6 labelled 1×4×4 images (two classes)."""
    g = torch.Generator().manual_seed(0)
    data = torch.rand(6, *SHAPE, generator=g, dtype=F64) * 2 - 1
    return edm.IdealDenoiser(data, labels=torch.tensor([0, 0, 0, 1, 1, 1]))


# ----------------------------------------------------------------------------- seeds and plans


def test_parse_and_format_seeds_round_trip():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_seeds(5) == [5] and parse_seeds([3, 1]) == [3, 1]
    assert format_seeds([0, 1, 2, 3, 7, 10, 11]) == "0-3,7,10-11"
    assert parse_seeds(format_seeds(list(range(50000)))) == list(range(50000))
    for bad, match in (("5-2", "empty"), ("a-b", "cannot read"), ("1,1", "duplicates"), ([-1], "non-negative")):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)


def test_plan_assigns_labels_by_position_and_checks_them():
    plan = plan_images([10, 11, 12], [1, 0], label_dim=3)
    assert [(p.index, p.seed, p.label) for p in plan] == [(0, 10, 1), (1, 11, 0), (2, 12, 1)]
    assert [p.label for p in plan_images([0, 1], 2, 3)] == [2, 2]
    assert [p.label for p in plan_images([0, 1], None, 3)] == [None, None]
    with pytest.raises(ValueError, match="unconditional"):
        plan_images([0], 1, label_dim=0)
    with pytest.raises(ValueError, match="outside"):
        plan_images([0], [3], label_dim=3)


def test_shards_partition_the_images():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts[1] == [1, 4, 7, 10]
    assert sorted(sum(parts, [])) == items


# ----------------------------------------------------------------------------- determinism


def run(ideal, seeds, batch, settings, labels=None, label_dim=0):
    """Images of `seeds` generated in batches of `batch` (float64), in seed order."""
    plan = plan_images(seeds, labels, label_dim)
    out = [generate_batch(ideal, part, "edm", settings, SHAPE, label_dim=label_dim, dtype=F64) for part in sampling.chunks(plan, batch)]
    images = torch.cat([o[0] for o in out])
    return images, None if label_dim == 0 else torch.cat([o[1] for o in out])


@pytest.mark.parametrize(
    "settings",
    [
        SamplerConfig("heun", 6),
        SamplerConfig("stochastic", 6, options={"churn": 30.0}),
        SamplerConfig("euler_maruyama", 8),
    ],
    ids=["heun", "stochastic", "euler_maruyama"],
)
def test_same_seed_same_image_whatever_the_batch_size(ideal, settings):
    seeds = [3, 17, 4, 100, 5]
    one_by_one, _ = run(ideal, seeds, 1, settings)
    together, _ = run(ideal, seeds, 5, settings)
    uneven, _ = run(ideal, seeds, 2, settings)
    torch.testing.assert_close(together, one_by_one)
    torch.testing.assert_close(uneven, one_by_one)
    # Across "processes": the shards of two ranks give the same images.
    ranks = {s: img for r in range(2) for s, img in zip(shard(seeds, r, 2), run(ideal, shard(seeds, r, 2), 2, settings)[0])}
    torch.testing.assert_close(torch.stack([ranks[s] for s in seeds]), one_by_one)
    # ... and another seed is another image.
    other, _ = run(ideal, [6], 1, settings)
    assert (other[0] - one_by_one[0]).abs().max() > 1e-3


def test_stochastic_noise_comes_from_the_image_generator(ideal):
    """The SDE's per-step noise belongs to the image: with a shared generator, batching would change images."""
    settings = SamplerConfig("euler_maruyama", 8)
    a, _ = run(ideal, [1, 2], 2, settings)
    b, _ = run(ideal, [2, 1], 2, settings)
    torch.testing.assert_close(a, b.flip(0))
    c, _ = run(ideal, [1], 1, SamplerConfig("heun", 8))
    assert (a[0] - c[0]).abs().max() > 1e-6  # the SDE did add noise


def test_random_labels_are_drawn_per_image_and_respected(ideal):
    settings = SamplerConfig("heun", 12)
    seeds = list(range(8))
    images, labels = run(ideal, seeds, 3, settings, label_dim=2)
    images1, labels1 = run(ideal, seeds, 1, settings, label_dim=2)
    torch.testing.assert_close(labels, labels1)
    torch.testing.assert_close(images, images1)
    assert set(labels.tolist()) == {0, 1}
    # The ideal denoiser restricted to a class lands on that class's points.
    data = ideal.data.reshape(6, -1)
    nearest = torch.cdist(images.reshape(8, -1), data).argmin(1)
    torch.testing.assert_close(ideal.labels[nearest], labels)
    fixed, fixed_labels = run(ideal, seeds, 4, settings, labels=[1], label_dim=2)
    assert fixed_labels.tolist() == [1] * 8


# ----------------------------------------------------------------------------- outputs


# ----------------------------------------------------------------------------- edm-sample end to end


def sample_script(*overrides, check=True):
    """Run the installed edm-sample command; returns the CompletedProcess."""
    flags = [str(o) for o in overrides if str(o).startswith("-")]  # Hydra's flags (-m, --help) come first
    cmd = [command("edm-sample"), *flags, "progress=false",
           *(str(o) for o in overrides if not str(o).startswith("-"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"edm-sample failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_checkpoint):
    folder = tmp_path_factory.mktemp("run")
    tiny_checkpoint(folder / "checkpoint-00000010.pt")
    return folder


def test_sample_script_help():
    proc = sample_script("--help")
    assert "sampler=NAME" in proc.stdout and "checkpoint: ???" in proc.stdout


def test_sample_script_writes_pngs_and_a_report_then_resumes(run_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    ckpt = run_dir / "checkpoint-00000010.pt"
    sample_script(f"checkpoint={ckpt}", "num_images=3", "sampler=heun", "sampler.num_steps=3", f"out={out}", "batch=2")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["000000.png", "000001.png", "000002.png"]
    assert np.asarray(Image.open(out / "000001.png")).shape == (8, 8)
    report = json.loads((out / "report.json").read_text())
    assert report["solver"] == "heun" and report["num_steps"] == 3 and report["discretization"] == "karras"
    assert report["schedule"] == {"name": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    assert report["seeds"] == "0-2" and report["checkpoint"] == str(ckpt.resolve()) and report["guidance"] == 1.0
    assert len(report["t_steps"]) == 4 and report["t_steps"][-1] == 0.0 and report["edm_version"] == edm.__version__
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    proc = sample_script(f"checkpoint={run_dir}", "num_images=5", "sampler=heun", "sampler.num_steps=3", f"out={out}")  # the run folder
    assert "process 0 generated 2 image(s)" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # existing images were not rewritten
    assert len(list(out.glob("*.png"))) == 5


def test_sample_script_npz_matches_the_library_and_any_batch_size(run_dir, tmp_path):
    ckpt = run_dir / "checkpoint-00000010.pt"
    out = tmp_path / "npz"
    sample_script(f"checkpoint={ckpt}", "seeds=4-7", "sampler=stochastic", "sampler.options.churn=20", "sampler.num_steps=3", f"out={out}",
                  "format=npz", "batch=3")
    with np.load(out / "samples.npz") as data:
        images, seeds = data["images"], data["seeds"]
    assert images.shape == (4, 8, 8, 1) and seeds.tolist() == [4, 5, 6, 7]
    assert (out / "parts").is_dir()
    denoiser, info = load_model(ckpt)
    settings = SamplerConfig("stochastic", 3, options={"churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003})
    with torch.no_grad():
        expected = to_uint8(generate_batch(denoiser, plan_images([4, 5, 6, 7], None, 0), info.schedule, settings, info.img_shape)[0])
    # Same noise per seed: equal up to a rare one-level float32 rounding of batched kernels.
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    report = json.loads((out / "report.json").read_text())
    assert report["options"] == {"churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}


def test_sample_script_grid_with_labels_and_guidance(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "cond.pt", label_dim=3)
    out = tmp_path / "grid"
    sample_script(f"checkpoint={ckpt}", "num_images=5", "sampler=euler", "sampler.num_steps=2", f"out={out}", "format=grid",
                  "labels=[2,0]", "guidance=1.5", "grid_cols=3", "schedule=vp")
    from PIL import Image

    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * 66 + 2, 3 * 66 + 2)  # 8x8 tiles shown at 64 px
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == [2, 0] and report["guidance"] == 1.5 and report["label_dim"] == 3
    assert report["schedule"]["name"] == "vp" and report["discretization"] == "uniform"
    parts = [np.load(p) for p in sorted((out / "parts").glob("*.npz"))]
    labels = dict(zip(np.concatenate([p["seeds"] for p in parts]).tolist(), np.concatenate([p["labels"] for p in parts]).tolist()))
    assert labels == {0: 2, 1: 0, 2: 2, 3: 0, 4: 2}


def test_sample_script_bf16_fast_path(tmp_path, tiny_checkpoint):
    """mixed_precision=bf16 gives the fp32 images within bf16 tolerance and is recorded in the report."""
    ckpt = tiny_checkpoint(tmp_path / "perturbed.pt", perturb=0.05)
    common = [f"checkpoint={ckpt}", "seeds=0-3", "sampler=heun", "sampler.num_steps=4", "format=npz"]
    sample_script(*common, f"out={tmp_path / 'fp32'}")
    sample_script(*common, f"out={tmp_path / 'bf16'}", "mixed_precision=bf16")
    with np.load(tmp_path / "fp32" / "samples.npz") as a, np.load(tmp_path / "bf16" / "samples.npz") as b:
        diff = np.abs(a["images"].astype(int) - b["images"].astype(int))
    assert 0 < diff.max() and diff.mean() < 3, (diff.max(), diff.mean())  # bf16 ran; pixels agree to a few levels
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert report["mixed_precision"] == "bf16" and report["compile"] is False
    proc = sample_script(*common, f"out={tmp_path / 'x'}", "mixed_precision=fp8", check=False)
    assert proc.returncode != 0 and "mixed_precision 'fp8' is not valid" in proc.stderr


def test_sample_script_errors_are_clear(tmp_path):
    proc = sample_script(f"checkpoint={tmp_path / 'missing.pt'}", f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0 and "missing.pt" in proc.stderr and "does not exist" in proc.stderr
    proc = sample_script(f"checkpoint={tmp_path / 'missing.pt'}", "sampler=rk45", f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0 and "sampler/rk45" in proc.stderr and "heun" in proc.stderr  # Hydra lists the group
    proc = sample_script(f"checkpoint={tmp_path / 'missing.pt'}", "+sampler.options.churn=1", f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0 and "solver 'heun' does not take option(s) ['churn']" in proc.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    proc = sample_script(f"checkpoint={tmp_path / 'bad.pt'}", f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0 and "bad.pt is not a checkpoint" in proc.stderr


@pytest.mark.slow
def test_sample_script_across_two_processes(run_dir, tmp_path):
    """accelerate launch with 2 CPU processes: each writes its own parts; the merge equals a 1-process run."""
    ckpt = run_dir / "checkpoint-00000010.pt"
    args = [f"checkpoint={ckpt}", "seeds=0-4", "sampler=euler_maruyama", "sampler.num_steps=3", "format=npz", "batch=2", "progress=false"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.cli.sample"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([*launch, *args, f"out={tmp_path / 'two'}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    sample_script(*args, f"out={tmp_path / 'one'}")
    assert {p.name.split("-r")[-1] for p in (tmp_path / "two" / "parts").glob("*.npz")} == {"0.npz", "1.npz"}
    assert json.loads((tmp_path / "two" / "report.json").read_text())["world_size"] == 2
    with np.load(tmp_path / "two" / "samples.npz") as a, np.load(tmp_path / "one" / "samples.npz") as b:
        assert a["seeds"].tolist() == b["seeds"].tolist() == [0, 1, 2, 3, 4]
        assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1


def test_sample_script_scores_its_images_with_the_metric_table(run_dir, tmp_path):
    """eval.metrics=[fd_cls]: once all images exist the main process scores the saved pixels against the
    data set, as the library does, and the report holds the numbers; bits/dim (a metric of data under a
    model) is refused before any image is made."""
    from edm.evaluation.quality import ClassifierConfig, QualityScore

    out, cache = tmp_path / "scored", tmp_path / "cache"
    common = [f"checkpoint={run_dir / 'checkpoint-00000010.pt'}", "num_images=6", "sampler=euler", "sampler.num_steps=2",
              "format=npz", "dataset=digits"]
    sample_script(*common, f"out={out}", "eval.metrics=[fd_cls]", "eval.fd_cls.classifier.steps=50",
                  f"eval.fd_cls.cache_dir={cache}")
    scored = json.loads((out / "report.json").read_text())["metrics"]["fd_cls"]
    with np.load(out / "samples.npz") as data:
        pixels = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)
    score = QualityScore.for_dataset(DatasetConfig(name="digits"), ClassifierConfig(steps=50), cache_dir=cache,
                                     progress=False)
    assert scored == pytest.approx(score(pixels)) and scored["num_images"] == 6
    proc = sample_script(*common, f"out={tmp_path / 'bpd'}", "eval.metrics=[bpd]", check=False)
    assert proc.returncode == 1 and "use edm-eval metric=bpd" in proc.stderr
    assert not (tmp_path / "bpd" / "samples.npz").exists()


# ----------------------------------------------------------------------------- provenance of an out folder


SLOW = pytest.mark.slow  # the same check with another key: in `pytest -m slow`


@pytest.mark.parametrize("change,named", [
    (["sampler.num_steps=2"], "num_steps: folder 3, now 2"),
    pytest.param(["sampler=euler"], "solver: folder 'heun', now 'euler'", marks=SLOW),
    pytest.param(["schedule=vp"], "schedule.name: folder 'edm', now 'vp'", marks=SLOW),
    pytest.param(["dtype=float64"], "dtype: folder 'float32', now 'float64'", marks=SLOW),
    pytest.param(["ema=false"], "ema: folder True, now False", marks=SLOW),
    (["other-checkpoint"], "checkpoint_sha256: folder"),
])
def test_sample_script_refuses_an_out_folder_made_with_other_settings(run_dir, tmp_path, tiny_checkpoint, change, named):
    """A second run into the same out with any setting changed generates nothing, leaves the folder's
    .hydra/ config and sample.log as they were, and names the key and the two ways out; overwrite=true
    deletes the old images and starts over."""
    ckpt = run_dir / "checkpoint-00000010.pt"
    out = tmp_path / "out"
    common = ["num_images=2", "sampler=heun", "sampler.num_steps=3", "format=npz", f"out={out}"]
    sample_script(f"checkpoint={ckpt}", *common)
    before = sorted(p.name for p in (out / "parts").iterdir())
    record = {name: (out / name).read_bytes() for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "sample.log")}
    if change == ["other-checkpoint"]:
        change = [f"checkpoint={tiny_checkpoint(tmp_path / 'other.pt', perturb=0.01)}"]
    else:
        change = [f"checkpoint={ckpt}", *change]
    proc = sample_script(*common, *change, "num_images=4", check=False)
    assert proc.returncode == 1 and named in proc.stderr, proc.stderr
    assert "out=DIR" in proc.stderr and "overwrite=true" in proc.stderr
    assert sorted(p.name for p in (out / "parts").iterdir()) == before  # nothing generated or removed
    assert {name: (out / name).read_bytes() for name in record} == record  # the folder's config and log untouched
    sample_script(*common, *change, "num_images=4", "overwrite=true")
    report = json.loads((out / "report.json").read_text())
    assert report["num_images"] == 4 and not set(before) & {p.name for p in (out / "parts").iterdir()}


def test_an_unchanged_resume_gives_the_images_of_a_clean_run_byte_for_byte(run_dir, tmp_path):
    ckpt = run_dir / "checkpoint-00000010.pt"
    common = [f"checkpoint={ckpt}", "sampler=heun", "sampler.num_steps=3", "format=npz", "batch=2"]
    sample_script(*common, "num_images=2", f"out={tmp_path / 'resumed'}")
    sample_script(*common, "num_images=5", f"out={tmp_path / 'resumed'}")
    sample_script(*common, "num_images=5", f"out={tmp_path / 'clean'}")
    a, b = ((tmp_path / name / "samples.npz").read_bytes() for name in ("resumed", "clean"))
    assert a == b


def test_images_without_a_provenance_record_are_not_resumed(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000.png").write_bytes(b"made elsewhere")
    proc = sample_script(f"checkpoint={run_dir / 'checkpoint-00000010.pt'}", "num_images=1", f"out={out}", check=False)
    assert proc.returncode == 1 and "000000.png" in proc.stderr and "no provenance.json" in proc.stderr


def test_a_sample_sweep_writes_one_folder_per_job(run_dir, tmp_path):
    """-m sampler=euler,heun sampler.num_steps=2,3: 4 jobs, 4 folders under out, each with its own settings."""
    out = tmp_path / "sweep"
    sample_script("-m", f"checkpoint={run_dir / 'checkpoint-00000010.pt'}", "num_images=2", "format=npz",
                  "sampler=euler,heun", "sampler.num_steps=2,3", f"out={out}")
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*/report.json"))]
    assert sorted((r["solver"], r["num_steps"]) for r in reports) == [("euler", 2), ("euler", 3), ("heun", 2), ("heun", 3)]
    assert all(Path(r["output"]).parent != out and Path(r["output"]).parent.parent == out for r in reports)
    assert (out / "multirun.yaml").is_file()


# ----------------------------------------------------------------------------- guidance in edm-sample


def test_sample_script_autoguidance_with_a_guide_model_and_an_interval(run_dir, tmp_path, tiny_checkpoint):
    """guide=G makes autoguidance (also for an unconditional model); an interval no step reaches gives
    the unguided images exactly; the guide's hash is part of the folder's provenance."""
    ckpt = tiny_checkpoint(tmp_path / "main.pt", perturb=0.05)
    guide = tiny_checkpoint(tmp_path / "guide.pt", perturb=0.02)
    common = [f"checkpoint={ckpt}", "num_images=3", "sampler=euler", "sampler.num_steps=3", "format=npz"]
    sample_script(*common, f"out={tmp_path / 'plain'}")
    sample_script(*common, "guidance=2", f"guide={guide}", f"out={tmp_path / 'auto'}")
    sample_script(*common, "guidance=2", f"guide={guide}", "guidance_interval=[1e6,1e7]", f"out={tmp_path / 'none'}")
    load = lambda name: np.load(tmp_path / name / "samples.npz")["images"]  # noqa: E731
    assert not np.array_equal(load("auto"), load("plain")) and np.array_equal(load("none"), load("plain"))
    record = json.loads((tmp_path / "auto" / "provenance.json").read_text())
    assert record["guidance"] == 2.0 and len(record["guide_sha256"]) == 64
    cond = tiny_checkpoint(tmp_path / "cond.pt", label_dim=3)
    proc = sample_script(*common, "guidance=2", f"guide={cond}", f"out={tmp_path / 'bad'}", check=False)
    assert proc.returncode == 1 and "takes 3 class labels, the model 0" in proc.stderr
    proc = sample_script(*common, "guidance=2", f"out={tmp_path / 'cfg'}", check=False)
    assert proc.returncode == 1 and "classifier-free guidance needs a class-conditional model" in proc.stderr
    proc = sample_script(*common, f"guide={guide}", f"out={tmp_path / 'w1'}", check=False)
    assert proc.returncode == 1 and "set guidance=W" in proc.stderr
