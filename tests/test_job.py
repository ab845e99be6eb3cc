"""edm/generation/job.py and edm-sample: images of a model into a folder, resumable, refused for other settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edm
from edm.data import DatasetConfig
from edm.models.loading import load_model
from edm.generation.outputs import to_uint8
from edm.core.samplers import SamplerConfig
from edm.generation.sampling import generate_batch, plan_images

from conftest import command, REPO, one_node_run, two_nodes


def sample_script(*overrides, check=True):
    """Run the installed edm-sample command; returns the CompletedProcess."""
    flags = [str(o) for o in overrides if str(o).startswith("-")]  # Hydra's flags (-m, --help) come first
    cmd = [command("edm-sample"), *flags, "progress=false",
           *(str(o) for o in overrides if not str(o).startswith("-"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
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
    assert "process 0 generated 2 image(s)" in proc.stderr  # the log; stdout holds the result alone
    assert proc.stdout.splitlines() == [f"wrote 5 images to {out}; report {out / 'report.json'}"]
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


def test_classifier_free_guidance_of_a_model_without_label_dropout_is_warned_of_in_the_folders_log(tmp_path,
                                                                                                    tiny_checkpoint):
    """Its unconditional output never trained: said on the console and in OUT/sample.log, the folder's record."""
    ckpt = tiny_checkpoint(tmp_path / "cond.pt", label_dim=3, label_dropout=0.0)
    out = tmp_path / "guided"
    proc = sample_script(f"checkpoint={ckpt}", "num_images=1", "sampler=euler", "sampler.num_steps=1", "guidance=2",
                         f"out={out}")
    warning = "guidance=2.0, but the network was trained without label dropout"
    assert warning in proc.stderr and warning in (out / "sample.log").read_text()


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
    assert not (tmp_path / "o").exists()  # a refused run makes no output folder


def test_num_images_and_seeds_that_disagree_are_refused_and_either_alone_picks_the_seeds(tmp_path, tiny_checkpoint):
    from edm.generation.job import DEFAULT_NUM_IMAGES, SampleConfig, _seeds, generate_folder

    assert _seeds(SampleConfig(seeds="3-5")) == [3, 4, 5] == _seeds(SampleConfig(seeds="3-5", num_images=3))
    assert _seeds(SampleConfig(num_images=2)) == [0, 1] and _seeds(SampleConfig()) == list(range(DEFAULT_NUM_IMAGES))
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"num_images=1000 but seeds=0-9 are 10 seeds: give one of the two"):
        generate_folder(SampleConfig(checkpoint=str(ckpt), num_images=1000, seeds="0-9", out=str(tmp_path / "o"),
                                     progress=False))
    assert not (tmp_path / "o").exists()


def test_ctrl_c_stops_edm_sample_in_one_line_that_says_how_to_continue(run_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    cmd = [command("edm-sample"), f"checkpoint={run_dir}", "num_images=5000", "batch=1", "progress=false", f"out={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 120
    while not list(out.glob("*.png")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "edm-sample: stopped; rerun the same command to continue where it stopped"
    assert list(out.glob("*.png")) and len(list(out.glob("*.png"))) < 5000


def test_an_out_that_is_a_file_is_refused_in_one_line(run_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = sample_script(f"checkpoint={run_dir}", "num_images=1", f"out={tmp_path / 'notes.txt'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"out={tmp_path / 'notes.txt'} is a file, not a folder: pass out=DIR" in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_sample_script_across_two_processes(run_dir, tmp_path):
    """accelerate launch with 2 CPU processes: each writes its own parts; the merge equals a 1-process run."""
    ckpt = run_dir / "checkpoint-00000010.pt"
    args = [f"checkpoint={ckpt}", "seeds=0-4", "sampler=euler_maruyama", "sampler.num_steps=3", "format=npz", "batch=2", "progress=false"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.cli.sample"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([*launch, *args, f"out={tmp_path / 'two'}"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    sample_script(*args, f"out={tmp_path / 'one'}")
    assert {p.name.split("-r")[-1] for p in (tmp_path / "two" / "parts").glob("*.npz")} == {"0.npz", "1.npz"}
    assert json.loads((tmp_path / "two" / "report.json").read_text())["world_size"] == 2
    with np.load(tmp_path / "two" / "samples.npz") as a, np.load(tmp_path / "one" / "samples.npz") as b:
        assert a["seeds"].tolist() == b["seeds"].tolist() == [0, 1, 2, 3, 4]
        assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1


def test_sample_processes_given_different_settings_are_refused(run_dir, tmp_path):
    """Each process reads its own command line: one given other steps would write images of other settings into the
    folder whose provenance record is process 0's. Every process refuses it in one line, before any image. What each
    process may hold its own of (its batch, "per process", and vae_batch: neither changes the images) is not compared."""
    args = [f"checkpoint={run_dir / 'checkpoint-00000010.pt'}", "seeds=0-3", "sampler=euler",
            "sampler.num_steps=${oc.env:LOCAL_WORLD_SIZE}${oc.env:RANK}", "batch=${oc.env:LOCAL_WORLD_SIZE}${oc.env:RANK}",
            "vae_batch=${oc.env:LOCAL_WORLD_SIZE}${oc.env:RANK}", "format=png", "progress=false",
            f"out={tmp_path / 'out'}"]
    proc = one_node_run("edm.cli.sample", args)
    assert proc.returncode != 0
    assert proc.stderr.count("edm-sample: error: the 2 processes of this launch were given different settings "
                             "(sampler.num_steps: 20 in process 0, 21 in process 1)") == 2, proc.stderr[-3000:]
    assert not list((tmp_path / "out").glob("*.png"))


def _two_node_sample(tmp_path: Path, *args: str) -> list[tuple[int, str]]:
    """edm-sample as two `accelerate launch` nodes of one CPU process each on this box, node N in tmp_path/nodeN
    (a node's own disk, for relative paths); (exit code, output) per node."""
    return two_nodes(tmp_path, "edm.cli.sample",
                     lambda node: ["seeds=0-3", "sampler=euler", "sampler.num_steps=2", "progress=false", *args],
                     dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))


def test_sample_processes_that_read_different_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    """checkpoint=model.pt from two working directories (as a copy of the model on each node's own disk, one of another
    step): each process generated its share with its own weights into the one folder. Every process refuses such a
    launch, naming the checkpoint hashes."""
    for node in (0, 1):
        tiny_checkpoint(tmp_path / f"node{node}" / "model.pt", perturb=0.01 * node)
    ends = _two_node_sample(tmp_path, "checkpoint=model.pt", f"out={tmp_path / 'out'}")
    said = "edm-sample: error: the 2 processes of this launch read different files (checkpoint_sha256: "
    assert [code != 0 and said in log for code, log in ends] == [True, True], ends[0][1][-3000:]
    assert not list((tmp_path / "out").glob("*.png"))


def test_sample_processes_that_do_not_share_out_are_refused(run_dir, tmp_path):
    """out=out from two working directories (as each node's own disk): process 1 wrote its PNGs into a folder process
    0 never saw, and process 0 reported "wrote 4 images" of a folder holding 2 (exit 0). Every process refuses such a
    launch before any image."""
    ends = _two_node_sample(tmp_path, f"checkpoint={run_dir / 'checkpoint-00000010.pt'}", "out=out")
    said = ("edm-sample: error: out out is not one folder for every process: process 1 does not see what process 0 "
            "writes there")
    assert [code != 0 and said in log for code, log in ends] == [True, True], ends[0][1][-3000:]
    assert not list(tmp_path.glob("node*/out/*.png"))


def test_sample_script_scores_its_images_with_the_metric_table(run_dir, tmp_path):
    """eval.metrics=[fd_cls]: once all images exist the main process scores the saved pixels against the
    data set, as the library does, and the report holds the numbers; bits/dim (a metric of data under a
    model) is refused before any image is made."""
    from edm.cli.sample import SampleCommand, scorer_of
    from edm.evaluation.quality import ClassifierConfig, QualityScore

    out, cache = tmp_path / "scored", tmp_path / "cache"
    sample_script(f"checkpoint={run_dir / 'checkpoint-00000010.pt'}", "num_images=6", "sampler=euler",
                  "sampler.num_steps=2", "format=npz", "dataset=digits", f"out={out}", "eval.metrics=[fd_cls]",
                  "eval.fd_cls.classifier.steps=50", f"eval.fd_cls.cache_dir={cache}")
    scored = json.loads((out / "report.json").read_text())["metrics"]["fd_cls"]
    with np.load(out / "samples.npz") as data:
        pixels = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)
    score = QualityScore.for_dataset(DatasetConfig(name="digits"), ClassifierConfig(steps=50), cache_dir=cache,
                                     progress=False)
    assert scored == pytest.approx(score(pixels)) and scored["num_images"] == 6
    cfg = SampleCommand()
    cfg.eval.metrics = ["bpd"]
    with pytest.raises(ValueError, match="use edm-eval metric=bpd"):
        scorer_of(cfg)  # made before generate_folder starts


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
    assert proc.returncode == 1 and "holds what this command writes (1: 000000.png)" in proc.stderr
    assert "no provenance.json" in proc.stderr and "pass overwrite=true to delete it first" in proc.stderr


def test_a_sample_sweep_writes_one_folder_per_job(run_dir, tmp_path):
    """-m sampler=euler,heun sampler.num_steps=2,3: 4 jobs, 4 folders under out, each with its own settings."""
    out = tmp_path / "sweep"
    sample_script("-m", f"checkpoint={run_dir / 'checkpoint-00000010.pt'}", "num_images=2", "format=npz",
                  "sampler=euler,heun", "sampler.num_steps=2,3", f"out={out}")
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*/report.json"))]
    assert sorted((r["solver"], r["num_steps"]) for r in reports) == [("euler", 2), ("euler", 3), ("heun", 2), ("heun", 3)]
    assert all(Path(r["output"]).parent != out and Path(r["output"]).parent.parent == out for r in reports)
    assert (out / "multirun.yaml").is_file()


def test_sample_script_autoguidance_with_a_guide_model_and_an_interval(run_dir, tmp_path, tiny_checkpoint):
    """guide=G makes autoguidance (also for an unconditional model); an interval no step reaches gives
    the unguided images exactly, with a warning; the log and the report count the guide's evaluations; the guide's hash
    is part of the folder's provenance."""
    ckpt = tiny_checkpoint(tmp_path / "main.pt", perturb=0.05)
    guide = tiny_checkpoint(tmp_path / "guide.pt", perturb=0.02)
    common = [f"checkpoint={ckpt}", "num_images=3", "sampler=euler", "sampler.num_steps=3", "format=npz"]
    plain = sample_script(*common, f"out={tmp_path / 'plain'}")
    assert f"3 image(s) of {ckpt}, euler with 3 steps (3 solver evaluations per image)" in plain.stderr
    auto = sample_script(*common, "guidance=2", f"guide={guide}", f"out={tmp_path / 'auto'}")
    none = sample_script(*common, "guidance=2", f"guide={guide}", "guidance_interval=[1e6,1e7]", f"out={tmp_path / 'none'}")
    assert "euler with 3 steps (3 solver evaluations per image, 6 network evaluations with guidance)" in auto.stderr
    said = "guidance=2.0 acts on no image: guidance_interval=[1000000.0, 10000000.0] holds none of the noise levels"
    assert said not in auto.stderr and said in none.stderr and said in (tmp_path / "none" / "sample.log").read_text()
    load = lambda name: np.load(tmp_path / name / "samples.npz")["images"]  # noqa: E731
    assert not np.array_equal(load("auto"), load("plain")) and np.array_equal(load("none"), load("plain"))
    nfe = {name: json.loads((tmp_path / name / "report.json").read_text())["nfe_per_image"] for name in ("plain", "auto", "none")}
    assert nfe == {"plain": 3, "auto": 6, "none": 3}  # Euler's 3 evaluations, each with the guide's inside the interval
    record = json.loads((tmp_path / "auto" / "provenance.json").read_text())
    assert record["guidance"] == 2.0 and len(record["guide_sha256"]) == 64
    report = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert report["guide"] == str(guide.resolve()) and "guide" not in json.loads((tmp_path / "plain" / "report.json").read_text())
    from edm.generation.job import SampleConfig, generate_folder

    cond = tiny_checkpoint(tmp_path / "cond.pt", label_dim=3)
    for fields, message in [({"guidance": 2.0, "guide": str(cond)}, "takes 3 class labels, the model 0"),
                            ({"guidance": 2.0}, "classifier-free guidance needs a class-conditional model"),
                            ({"guide": str(guide)}, "set guidance=W")]:
        cfg = SampleConfig(checkpoint=str(ckpt), num_images=3, format="npz", out=str(tmp_path / "bad"), progress=False,
                           **fields)
        with pytest.raises(ValueError, match=message):
            generate_folder(cfg)
        assert not (tmp_path / "bad").exists()


def test_a_stochastic_folder_whose_record_lacks_the_churn_steps_is_not_resumed(run_dir, tmp_path):
    """With final_denoise, stochastic's γ = S_churn/N counts the final step among the N; a folder whose record does not
    say so (made when γ was S_churn/(N − 1)) is refused by that key, not filled up with images of another γ."""
    from edm.cli.sample import SampleCommand
    from edm.generation.job import generate_folder
    from edm.provenance import ProvenanceError

    out = tmp_path / "out"
    cfg = SampleCommand(checkpoint=str(run_dir), num_images=2, format="png", out=str(out), progress=False)
    cfg.sampler.solver, cfg.sampler.num_steps, cfg.sampler.final_denoise = "stochastic", 3, True
    cfg.sampler.options = {"churn": 1.0}
    generate_folder(cfg)
    record = json.loads((out / "provenance.json").read_text())
    assert record["churn_steps"] == 3
    del record["churn_steps"]
    (out / "provenance.json").write_text(json.dumps(record))
    cfg.num_images = 3
    with pytest.raises(ProvenanceError, match=r"churn_steps: folder None, now 3"):
        generate_folder(cfg)


def test_a_png_folder_scores_the_requested_seeds_not_every_image_it_holds(run_dir, tmp_path):
    """Seeds 0-5 as PNGs, then seeds 0-3 into the same folder (a resume that makes nothing new): the report's metrics
    are those of the four requested images, as scoring those four files gives, not of all six in the folder, and the
    report says that the folder holds seeds 0-5."""
    from edm.cli.sample import SampleCommand, scorer_of
    from edm.evaluation.metrics import read_images
    from edm.evaluation.quality import ClassifierConfig, QualityScore
    from edm.generation.job import generate_folder

    out, cache = tmp_path / "out", tmp_path / "cache"
    cfg = SampleCommand(checkpoint=str(run_dir), num_images=6, format="png", out=str(out), progress=False)
    cfg.sampler.num_steps, cfg.dataset = 2, DatasetConfig(name="digits")
    cfg.eval.metrics, cfg.eval.fd_cls.classifier.steps, cfg.eval.fd_cls.cache_dir = ["fd_cls"], 50, str(cache)
    generate_folder(cfg, scorer=scorer_of(cfg))
    cfg.num_images = 4
    report = generate_folder(cfg, scorer=scorer_of(cfg))
    four = tmp_path / "four"
    four.mkdir()
    for seed in range(4):
        (four / f"{seed:06d}.png").write_bytes((out / f"{seed:06d}.png").read_bytes())
    score = QualityScore.for_dataset(DatasetConfig(name="digits"), ClassifierConfig(steps=50), cache_dir=cache,
                                     progress=False)
    assert report["num_images"] == report["metrics"]["fd_cls"]["num_images"] == 4
    assert report["metrics"]["fd_cls"] == pytest.approx(score(read_images(four)[0]))
    assert report["seeds"] == "0-3" and report["folder_seeds"] == "0-5"  # what a score of the whole folder covers


@pytest.mark.parametrize("solver, options, message", [
    ("unipc", {"variant": "foo"}, "variant must be 'bh1' or 'bh2', got 'foo'"),
    ("lms", {"order": 0}, "lms: order must be a positive integer, got 0"),
    ("dpm_adaptive", {"atol": -1.0}, "dpm_adaptive: rtol, atol and h_init must be positive"),
])
def test_a_bad_solver_option_value_fails_before_the_folder_is_claimed(run_dir, tmp_path, solver, options, message):
    """Option values that a solver checks when it starts are checked by a run on a stand-in denoiser before OUT is
    claimed: the refused run leaves no folder (whose record would then refuse the corrected command)."""
    from edm.core.samplers import SamplerConfig
    from edm.evaluation.nfe_study import StudyConfig, run_study
    from edm.generation.job import SampleConfig, generate_folder

    cfg = SampleConfig(checkpoint=str(run_dir), num_images=2, format="npz", out=str(tmp_path / "out"), progress=False)
    cfg.sampler = SamplerConfig(solver, 3, options=options)
    with pytest.raises(ValueError, match=message):
        generate_folder(cfg, scorer=lambda *args: pytest.fail("the metrics were set up before the options' check"))
    study = StudyConfig(checkpoint=str(run_dir), solvers=[solver], steps=[3], options={solver: options},
                        out=str(tmp_path / "study"), dataset=DatasetConfig(name="digits"), progress=False)
    with pytest.raises(ValueError, match=message):
        run_study(study)
    assert not (tmp_path / "out").exists() and not (tmp_path / "study").exists()


def test_a_bad_metric_setting_fails_before_the_folder_is_claimed_or_an_image_made(run_dir, tmp_path):
    """FID without its weights file: refused once the model is loaded, before provenance.json or any image."""
    from edm.cli.sample import SampleCommand, scorer_of
    from edm.generation.job import generate_folder

    cfg = SampleCommand(checkpoint=str(run_dir), num_images=2, format="npz", out=str(tmp_path / "out"), progress=False)
    cfg.eval.metrics = ["fid"]
    cfg.eval.fid.inception, cfg.eval.fid.ref = str(tmp_path / "missing.pth"), str(tmp_path / "ref.npz")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        generate_folder(cfg, scorer=scorer_of(cfg))
    assert not (tmp_path / "out").exists()


def test_a_training_run_folder_is_not_an_output_folder_even_with_overwrite(tmp_path, tiny_checkpoint):
    """overwrite=true deletes an output folder's PNGs and report: pointed at a run folder it would delete the run's
    data.png and sample grids, and replace its .hydra record. A folder holding checkpoints is refused by edm-sample
    and edm-study, naming it and another out."""
    from edm.evaluation.nfe_study import StudyConfig, run_study
    from edm.generation.job import SampleConfig, generate_folder

    run = tmp_path / "run"
    tiny_checkpoint(run / "checkpoint-00000010.pt")
    (run / "data.png").write_bytes(b"the run's")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=rf"out={run} is a training run's folder \(it holds checkpoint-00000010.pt\)"
                                             rf".*give another out=DIR \(e.g. {run / 'samples'}\)"):
            generate_folder(SampleConfig(checkpoint=str(run), out=str(run), num_images=1, overwrite=overwrite,
                                         progress=False))
        with pytest.raises(ValueError, match="is a training run's folder"):
            run_study(StudyConfig(checkpoint=str(run), out=str(run), num_images=2, overwrite=overwrite, progress=False))
    assert (run / "data.png").read_bytes() == b"the run's" and sorted(p.name for p in run.iterdir()) == [
        "checkpoint-00000010.pt", "data.png"]


def test_a_batch_of_no_image_is_refused_before_the_folder_is_made(tmp_path, tiny_checkpoint):
    from edm.generation.job import SampleConfig, generate_folder

    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    for key in ("batch", "vae_batch"):
        with pytest.raises(ValueError, match=f"{key}=0 must be at least 1"):
            generate_folder(SampleConfig(checkpoint=str(ckpt), out=str(tmp_path / "out"), progress=False, **{key: 0}))
    assert not (tmp_path / "out").exists()


def test_labels_given_as_a_number_or_a_one_element_list_are_one_setting_of_a_folder(tmp_path, tiny_checkpoint):
    """labels=3 and labels=[3] give every image class 3: a folder of one continues with the other; another class is
    refused."""
    from edm.cli.sample import SampleCommand
    from edm.generation.job import generate_folder
    from edm.provenance import ProvenanceError

    ckpt = tiny_checkpoint(tmp_path / "cond" / "checkpoint-00000010.pt", label_dim=10)
    out = tmp_path / "out"
    cfg = SampleCommand(checkpoint=str(ckpt), num_images=2, format="png", out=str(out), progress=False, labels=3)
    cfg.sampler.num_steps = 2
    generate_folder(cfg)
    cfg.labels, cfg.num_images = [3], 3
    generate_folder(cfg)
    assert len(list(out.glob("*.png"))) == 3
    cfg.labels = [4]
    with pytest.raises(ProvenanceError, match=r"labels: folder 3, now 4"):
        generate_folder(cfg)


def test_a_guide_the_solver_cannot_sample_is_refused_naming_the_guide_before_the_folder_is_claimed(tmp_path,
                                                                                                  tiny_checkpoint):
    """The solver evaluates the guide as it does the model: a consistency model does not guide Heun, and the meanflow
    sampler passes σ_r to the guide too, so only a MeanFlow model guides it. Such a guide is refused by name before
    OUT is claimed (whose record would then block the corrected command); under an ODE solver a flow-matching guide
    guides a MeanFlow model."""
    from edm.evaluation.nfe_study import StudyConfig, run_study
    from edm.generation.job import SampleConfig, generate_folder

    fm = dict(kind="fm", schedule={"name": "fm"})
    denoiser, ect = tiny_checkpoint(tmp_path / "d.pt"), tiny_checkpoint(tmp_path / "ect.pt", objective="ect")
    meanflow = tiny_checkpoint(tmp_path / "mf.pt", objective="meanflow", second_noise=True, perturb=0.05, **fm)
    flow = tiny_checkpoint(tmp_path / "flow.pt", perturb=0.02, **fm)
    weak_meanflow = tiny_checkpoint(tmp_path / "mf-weak.pt", objective="meanflow", second_noise=True, perturb=0.02, **fm)
    out = tmp_path / "g9"
    for model, guide, solver, message in [
        (denoiser, ect, "heun", rf"^guide {ect} was trained with objective=ect, which solver heun does not sample"),
        (meanflow, flow, "meanflow", rf"^guide {flow} was trained with objective=denoising, which solver meanflow does "
                                     r"not sample .*σ_r.*: give a guide of the model's kind \(objective=meanflow\)$"),
    ]:
        cfg = SampleConfig(checkpoint=str(model), num_images=1, format="npz", out=str(out), progress=False, guidance=2.0,
                           guide=str(guide))
        cfg.sampler = SamplerConfig(solver, 1)
        with pytest.raises(ValueError, match=message):
            generate_folder(cfg)
        with pytest.raises(ValueError, match=message):
            run_study(StudyConfig(checkpoint=str(model), solvers=[solver], steps=[1], guidance=2.0, guide=str(guide),
                                  out=str(out), dataset=DatasetConfig(name="digits"), progress=False))
        assert not out.exists()
    cfg.guide = str(weak_meanflow)
    assert generate_folder(cfg)["guide"] == str(weak_meanflow.resolve())
    cfg.guide, cfg.out, cfg.sampler = str(flow), str(tmp_path / "ode"), SamplerConfig("euler", 1)
    assert generate_folder(cfg)["nfe_per_image"] == 2


def test_edm_sample_under_a_sharding_launchers_config_still_samples(tmp_path, tiny_checkpoint, monkeypatch):
    """The refusal of FSDP/DeepSpeed/parallelism-config launches is edm-train's (it averages whole parameters into
    its EMA); sampling wraps no model, so an `accelerate config` file that says FSDP does not stop edm-sample."""
    from edm.generation.job import SampleConfig, generate_folder

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    generate_folder(SampleConfig(checkpoint=str(ckpt), out=str(tmp_path / "out"), num_images=2, progress=False,
                                 format="npz"))
    assert (tmp_path / "out" / "samples.npz").is_file()
