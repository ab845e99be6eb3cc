"""Generation library (edm.sampling) and the scripts/sample.py entry point."""

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
from edm.sampling import (
    GuidedDenoiser,
    ImageSpec,
    PartWriter,
    PngWriter,
    SamplerSettings,
    finalize,
    format_seeds,
    generate,
    generate_batch,
    make_grid,
    parse_seeds,
    plan_images,
    read_parts,
    shard,
    to_uint8,
)

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
        SamplerSettings("heun", 6),
        SamplerSettings("stochastic", 6, options={"churn": 30.0}),
        SamplerSettings("euler_maruyama", 8),
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
    settings = SamplerSettings("euler_maruyama", 8)
    a, _ = run(ideal, [1, 2], 2, settings)
    b, _ = run(ideal, [2, 1], 2, settings)
    torch.testing.assert_close(a, b.flip(0))
    c, _ = run(ideal, [1], 1, SamplerSettings("heun", 8))
    assert (a[0] - c[0]).abs().max() > 1e-6  # the SDE did add noise


def test_random_labels_are_drawn_per_image_and_respected(ideal):
    settings = SamplerSettings("heun", 12)
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


def test_guidance_combines_the_conditional_and_unconditional_calls():
    calls = []

    def den(x, sigma, class_labels):
        calls.append(len(x))
        return x + class_labels.sum(1, keepdim=True).reshape(-1, 1, 1, 1) * 1.0 + 0.5

    x = torch.zeros(3, 1, 2, 2)
    sigma = torch.ones(3)
    labels = torch.eye(3)
    cond = den(x, sigma, labels)
    uncond = den(x, sigma, torch.zeros_like(labels))
    calls.clear()
    torch.testing.assert_close(GuidedDenoiser(den, 1.0)(x, sigma, labels), cond)
    torch.testing.assert_close(GuidedDenoiser(den, 0.0)(x, sigma, labels), uncond)
    torch.testing.assert_close(GuidedDenoiser(den, 2.5)(x, sigma, labels), uncond + 2.5 * (cond - uncond))
    assert calls == [3, 6, 6]  # w = 1 is one plain call; otherwise one call on a doubled batch


# ----------------------------------------------------------------------------- outputs


def _tiny_denoiser(label_dim: int = 0) -> edm.Precond:
    torch.manual_seed(0)
    net = edm.networks.build("tiny", img_resolution=8, in_channels=1, model_channels=8, label_dim=label_dim)
    return edm.Precond(net, kind="edm").eval()


@pytest.mark.parametrize("mixed_precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_fast_denoiser_runs_the_network_in_half_precision(mixed_precision, dtype):
    """Convolutions see bf16/fp16; D comes back in x̂'s dtype, within half-precision tolerance of fp32."""
    den = _tiny_denoiser(label_dim=3)
    seen = []
    hook = den.net.enc["8x8_conv"].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fast = sampling.fast_denoiser(den, mixed_precision)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0])
    labels = torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        ref, out = den(x, sigma, labels), fast(x, sigma, labels)
    hook.remove()
    assert seen == [torch.float32, dtype] and out.dtype == torch.float32
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 2e-2, rel
    assert sampling.fast_denoiser(den, "no") is den


def test_fast_denoiser_channels_last_is_the_same_function():
    den = _tiny_denoiser(label_dim=3)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, labels = torch.tensor([0.01, 0.5, 3.0, 80.0]), torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        ref = den(x, sigma, labels)
        fast = sampling.fast_denoiser(den, "no", channels_last=True)
        out = fast(x, sigma, labels)
    big = max((p for p in den.parameters() if p.ndim == 4), key=torch.numel)
    assert big.is_contiguous(memory_format=torch.channels_last) and not big.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_fast_denoiser_rejects_unknown_precisions():
    with pytest.raises(ValueError, match="unknown mixed_precision 'int8'.*bf16"):
        sampling.fast_denoiser(_tiny_denoiser(), "int8")


@pytest.mark.slow
def test_compiled_denoiser_matches_eager():
    """compile=true (inductor on CPU) gives the eager denoiser's samples; a new σ does not recompile."""
    torch._dynamo.reset()
    den = _tiny_denoiser()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fast = sampling.fast_denoiser(den, "no", compile=True)
    with torch.no_grad():
        ref = edm.sample(den, noise, "edm", num_steps=4)
        out = edm.sample(fast, noise, "edm", num_steps=4)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_to_uint8_matches_the_nvlabs_rounding():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7]).reshape(1, 1, 1, 6)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_make_grid_tiles_row_by_row():
    images = np.arange(5).reshape(5, 1, 1, 1).repeat(2, 1).repeat(2, 2).astype(np.uint8)
    grid = make_grid(images, cols=3)
    assert grid.shape == (4, 6, 1)
    assert grid[::2, ::2, 0].tolist() == [[0, 1, 2], [3, 4, 0]]


def test_generate_writes_pngs_and_resumes(ideal, tmp_path):
    from PIL import Image

    plan = plan_images(list(range(5)), None, 0)
    writer = PngWriter(tmp_path, subdirs=True)
    settings = SamplerSettings("euler", 4)
    assert generate(ideal, plan[:3], "edm", settings, writer, SHAPE, batch_size=2) == 3
    first = np.asarray(Image.open(writer.path(1)))
    assert generate(ideal, plan, "edm", settings, writer, SHAPE, batch_size=4) == 2  # only the two missing ones
    assert writer.path(4) == tmp_path / "000000" / "000004.png" and writer.path(4).is_file()
    np.testing.assert_array_equal(np.asarray(Image.open(writer.path(1))), first)
    expected = to_uint8(generate_batch(ideal, plan[1:2], "edm", settings, SHAPE)[0])[0, :, :, 0]
    np.testing.assert_array_equal(first, expected)


@pytest.mark.parametrize("fmt", ["npz", "grid"])
def test_parts_merge_into_npz_or_grid(ideal, tmp_path, fmt):
    seeds = [5, 2, 9, 1]
    plan = plan_images(seeds, None, 0)
    settings = SamplerSettings("heun", 3)
    for rank in range(2):  # two "processes", each with its own part files
        generate(ideal, shard(plan, rank, 2), "edm", settings, PartWriter(tmp_path, rank), SHAPE, batch_size=1)
    assert PartWriter(tmp_path).pending(plan) == []
    path = finalize(fmt, tmp_path, seeds, grid_cols=2)
    expected = to_uint8(generate_batch(ideal, plan, "edm", settings, SHAPE)[0])
    if fmt == "npz":
        with np.load(path) as data:
            np.testing.assert_array_equal(data["images"], expected)
            assert data["seeds"].tolist() == seeds and data["labels"].tolist() == [-1] * 4
    else:
        from PIL import Image

        np.testing.assert_array_equal(np.asarray(Image.open(path)), make_grid(expected, 2)[:, :, 0])


def test_a_killed_part_write_does_not_break_resume(tmp_path):
    """A process killed while writing a part leaves only a temp file that the part globs ignore:
    resume still reads the finished parts and redoes the torn one."""
    done = PartWriter(tmp_path)
    done.write(plan_images([0], None, 0), np.zeros((1, 4, 4, 1), np.uint8), None)
    script = (
        "import os, numpy as np\n"
        "from edm.sampling import PartWriter, plan_images\n"
        "def killed(f, **arrays):\n"
        "    f.write(b'PK partial'); f.flush(); os._exit(9)\n"
        "np.savez = killed\n"
        f"PartWriter({str(tmp_path)!r}).write(plan_images([1], None, 0), np.zeros((1, 4, 4, 1), np.uint8), None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()
    parts = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert len(parts) == 2 and parts[0].startswith(".") and parts[0].endswith(".tmp")  # the torn write
    assert [spec.seed for spec in PartWriter(tmp_path).pending(plan_images([0, 1], None, 0))] == [1]
    images, _ = read_parts(tmp_path, [0])
    assert images.shape == (1, 4, 4, 1)


def test_finalize_names_missing_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the sampler again"):
        finalize("npz", tmp_path, [0, 1])


def test_sampler_settings_reject_unknown_solvers():
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        SamplerSettings("rk45")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerSettings("heun", 0)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['churn'\]"):
        SamplerSettings("heun", 18, options={"churn": 1.0})


def test_nvlabs_pickles_go_through_load_nvlabs_and_get_their_precond_schedule(tmp_path, monkeypatch):
    from edm import networks, nvlabs

    def fake_load_nvlabs(path):
        net = networks.build("tiny", img_resolution=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1, label_dim=3)
        return edm.Precond(net, kind=kind, beta_d=12.0, beta_min=0.3)

    (tmp_path / "network-snapshot.pkl").write_bytes(b"")
    expected = {"vp": edm.schedules.VP(beta_d=12.0, beta_min=0.3), "ve": edm.schedules.VE(), "edm": edm.schedules.EDM()}
    monkeypatch.setattr(nvlabs, "load_nvlabs", fake_load_nvlabs)
    for kind, schedule in expected.items():
        denoiser, info = sampling.load_model(tmp_path / "network-snapshot.pkl")
        assert info.schedule == schedule and info.img_shape == (1, 8, 8) and info.label_dim == 3
        assert not denoiser.training


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        sampling.load_model(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sampling.load_model(tmp_path)


# ----------------------------------------------------------------------------- scripts/sample.py end to end


def tiny_checkpoint(path, label_dim=0, perturb=0.0):
    """A tiny untrained 1×8×8 model saved through edm.checkpoint (the training checkpoint format).

    `perturb` adds N(0, perturb²) to every weight, so that the zero-initialized output layer no
    longer makes F ≈ 0.
    """
    from edm import checkpoint

    spec = {
        "network": {"name": "tiny", "img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": label_dim,
                    "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "label_dropout": 0.1},
        "precond": {"kind": "edm", "sigma_data": 0.5},
    }
    torch.manual_seed(0)
    weights = checkpoint.build_denoiser(spec).state_dict()
    weights = {k: v + perturb * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()}
    state = {"denoiser": spec, "schedule": {"name": "edm", "sigma_min": 0.002, "sigma_max": 80.0},
             "ema": weights, "model": weights, "config": {}, "step": 10}
    checkpoint.save_checkpoint(path, state)
    return path


def sample_script(*overrides, check=True):
    """Run scripts/sample.py in a fresh interpreter; returns the CompletedProcess."""
    cmd = [sys.executable, str(ROOT / "scripts" / "sample.py"), "progress=false", *map(str, overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"sample.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
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
    sample_script(f"checkpoint={ckpt}", "num_images=3", "sampler=heun", "steps=3", f"out={out}", "batch=2")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["000000.png", "000001.png", "000002.png"]
    assert np.asarray(Image.open(out / "000001.png")).shape == (8, 8)
    report = json.loads((out / "report.json").read_text())
    assert report["solver"] == "heun" and report["num_steps"] == 3 and report["discretization"] == "karras"
    assert report["schedule"] == {"name": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}
    assert report["seeds"] == "0-2" and report["checkpoint"] == str(ckpt.resolve()) and report["guidance"] == 1.0
    assert len(report["t_steps"]) == 4 and report["t_steps"][-1] == 0.0 and report["edm_version"] == edm.__version__
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    proc = sample_script(f"checkpoint={run_dir}", "num_images=5", "sampler=heun", "steps=3", f"out={out}")  # the run folder
    assert "process 0 generated 2 image(s)" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # existing images were not rewritten
    assert len(list(out.glob("*.png"))) == 5


def test_sample_script_npz_matches_the_library_and_any_batch_size(run_dir, tmp_path):
    ckpt = run_dir / "checkpoint-00000010.pt"
    out = tmp_path / "npz"
    sample_script(f"checkpoint={ckpt}", "seeds=4-7", "sampler=stochastic", "churn=20", "steps=3", f"out={out}",
                  "format=npz", "batch=3")
    with np.load(out / "samples.npz") as data:
        images, seeds = data["images"], data["seeds"]
    assert images.shape == (4, 8, 8, 1) and seeds.tolist() == [4, 5, 6, 7]
    assert (out / "parts").is_dir()
    denoiser, info = sampling.load_model(ckpt)
    settings = SamplerSettings("stochastic", 3, options={"churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003})
    with torch.no_grad():
        expected = to_uint8(generate_batch(denoiser, plan_images([4, 5, 6, 7], None, 0), info.schedule, settings, info.img_shape)[0])
    # Same noise per seed: equal up to a rare one-level float32 rounding of batched kernels.
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    report = json.loads((out / "report.json").read_text())
    assert report["options"] == {"churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}


def test_sample_script_grid_with_labels_and_guidance(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "cond.pt", label_dim=3)
    out = tmp_path / "grid"
    sample_script(f"checkpoint={ckpt}", "num_images=5", "sampler=euler", "steps=2", f"out={out}", "format=grid",
                  "labels=[2,0]", "guidance=1.5", "grid_cols=3", "schedule=vp")
    from PIL import Image

    assert np.asarray(Image.open(out / "grid.png")).shape == (16, 24)
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == [2, 0] and report["guidance"] == 1.5 and report["label_dim"] == 3
    assert report["schedule"]["name"] == "vp" and report["discretization"] == "uniform"
    parts = [np.load(p) for p in sorted((out / "parts").glob("*.npz"))]
    labels = dict(zip(np.concatenate([p["seeds"] for p in parts]).tolist(), np.concatenate([p["labels"] for p in parts]).tolist()))
    assert labels == {0: 2, 1: 0, 2: 2, 3: 0, 4: 2}


def test_sample_script_bf16_fast_path(tmp_path):
    """mixed_precision=bf16 gives the fp32 images within bf16 tolerance and is recorded in the report."""
    ckpt = tiny_checkpoint(tmp_path / "perturbed.pt", perturb=0.05)
    common = [f"checkpoint={ckpt}", "seeds=0-3", "sampler=heun", "steps=4", "format=npz"]
    sample_script(*common, f"out={tmp_path / 'fp32'}")
    sample_script(*common, f"out={tmp_path / 'bf16'}", "mixed_precision=bf16")
    with np.load(tmp_path / "fp32" / "samples.npz") as a, np.load(tmp_path / "bf16" / "samples.npz") as b:
        diff = np.abs(a["images"].astype(int) - b["images"].astype(int))
    assert 0 < diff.max() and diff.mean() < 3, (diff.max(), diff.mean())  # bf16 ran; pixels agree to a few levels
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert report["mixed_precision"] == "bf16" and report["compile"] is False
    proc = sample_script(*common, f"out={tmp_path / 'x'}", "mixed_precision=fp8", check=False)
    assert proc.returncode != 0 and "unknown mixed_precision 'fp8'" in proc.stderr


def test_sample_script_errors_are_clear(tmp_path):
    proc = sample_script(f"checkpoint={tmp_path / 'missing.pt'}", f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0 and "missing.pt" in proc.stderr and "does not exist" in proc.stderr
    proc = sample_script(f"checkpoint={tmp_path / 'missing.pt'}", "sampler=rk45", f"out={tmp_path / 'o'}", check=False)
    assert proc.returncode != 0 and "unknown solver 'rk45'" in proc.stderr and "heun" in proc.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt.*corrupt"):  # sample.py prints this error and exits
        sampling.load_model(tmp_path / "bad.pt")


@pytest.mark.slow
def test_sample_script_across_two_processes(run_dir, tmp_path):
    """accelerate launch with 2 CPU processes: each writes its own parts; the merge equals a 1-process run."""
    ckpt = run_dir / "checkpoint-00000010.pt"
    args = [f"checkpoint={ckpt}", "seeds=0-4", "sampler=euler_maruyama", "steps=3", "format=npz", "batch=2", "progress=false"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "scripts" / "sample.py")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([*launch, *args, f"out={tmp_path / 'two'}"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    sample_script(*args, f"out={tmp_path / 'one'}")
    assert {p.name.split("-r")[-1] for p in (tmp_path / "two" / "parts").glob("*.npz")} == {"0.npz", "1.npz"}
    assert json.loads((tmp_path / "two" / "report.json").read_text())["world_size"] == 2
    with np.load(tmp_path / "two" / "samples.npz") as a, np.load(tmp_path / "one" / "samples.npz") as b:
        assert a["seeds"].tolist() == b["seeds"].tolist() == [0, 1, 2, 3, 4]
        assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1
