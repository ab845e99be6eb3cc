"""Latent diffusion (edm.latent, edm.data.latents, edm.data.encode): EDM2's latent map, the VAE between pixels and
latents, edm-encode's latent data sets, and training, sampling and scoring through them, with small random-weight
AutoencoderKLs (diffusers) standing in for Stability's VAE. The equality with NVlabs/edm2's own encoder and
dataset_tool.py runs with --nvlabs-edm2-repo PATH."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN, command, one_node_run, reference_repo, two_nodes

from edm.cli import compose
from edm.data import LatentDataset, build_dataset, latent_name
from edm.data.encode import EncodeConfig, encode_dataset
from edm.data.registry import DatasetConfig
from edm.latent import (
    EDM2_RAW_MEAN, EDM2_RAW_STD, LatentConfig, VAEError, decoded_pixels, final_latents, latent_affine,
    load_autoencoder, load_vae, raw_latents, weights_fingerprint,
)

pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parent.parent


def random_vae(folder: Path, seed: int, in_channels: int = 3) -> Path:
    """A small AutoencoderKL (4 latent channels, downsampling 2x) with random weights, saved for from_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    with torch.no_grad():  # a posterior std well away from 0 and 1, so that mean and std are both tested
        vae.quant_conv.bias[4:] = 0.5
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    return random_vae(root / "a", 0), random_vae(root / "b", 1)


def rgb_folder(root: Path, n: int = 6, size: int = 16) -> Path:
    """n random RGB PNGs with a dataset.json of 3 classes."""
    from PIL import Image

    gen = np.random.default_rng(0)
    root.mkdir(parents=True)
    labels = []
    for i in range(n):
        Image.fromarray(gen.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
        labels.append([f"img{i:02d}.png", i % 3])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def encode(out: Path, vae: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([command("edm-encode"), f"latent.vae={vae}", f"out={out}", "progress=false", *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


# ----------------------------------------------------------------------------- the latent map


def test_latent_map_takes_edm2s_raw_statistics_to_mean_0_std_half_in_float32():
    scale, bias = latent_affine(EDM2_RAW_MEAN, EDM2_RAW_STD, 0.0, 0.5)
    assert scale.dtype == bias.dtype == np.float32
    assert EDM2_RAW_MEAN == (5.81, 3.25, 0.12, -2.15) and EDM2_RAW_STD == (4.17, 4.62, 3.71, 3.28)
    np.testing.assert_array_equal(scale, np.float32(0.5) / np.float32(EDM2_RAW_STD))
    np.testing.assert_array_equal(bias, np.float32(0) - np.float32(EDM2_RAW_MEAN) * scale)
    np.testing.assert_allclose(np.float64(EDM2_RAW_MEAN) * scale + bias, 0, atol=1e-6)
    np.testing.assert_allclose(np.float64(EDM2_RAW_STD) * scale, 0.5, rtol=1e-6)
    assert LatentConfig().raw_mean == list(EDM2_RAW_MEAN) and LatentConfig().final_std == 0.5


def test_latents_drawn_from_raw_statistics_have_the_final_statistics():
    """z = mean + std·n with per-channel mean and std of EDM2's raw statistics maps to mean 0 and std 0.5."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.tensor(EDM2_RAW_MEAN).view(1, 4, 1, 1).expand(64, 4, 16, 16)
    std = torch.tensor(EDM2_RAW_STD).view(1, 4, 1, 1).expand(64, 4, 16, 16)
    scale, bias = latent_affine(EDM2_RAW_MEAN, EDM2_RAW_STD)
    x = final_latents(torch.cat([mean, std], 1), torch.randn(64, 4, 16, 16, generator=gen), scale, bias)
    n = 64 * 16 * 16
    assert (x.mean(dim=(0, 2, 3)).abs() < 5 * 0.5 / n**0.5).all()
    assert ((x.std(dim=(0, 2, 3)) - 0.5).abs() < 5 * 0.5 / (2 * n) ** 0.5).all()


def test_raw_latents_invert_final_latents():
    gen = torch.Generator().manual_seed(1)
    mean_std = torch.cat([torch.randn(2, 4, 8, 8, generator=gen) * 3, torch.rand(2, 4, 8, 8, generator=gen)], 1)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    scale, bias = latent_affine(EDM2_RAW_MEAN, EDM2_RAW_STD)
    z = raw_latents(final_latents(mean_std, noise, scale, bias), scale, bias)
    torch.testing.assert_close(z, mean_std[:, :4] + mean_std[:, 4:] * noise, rtol=1e-5, atol=1e-5)


def test_decoded_pixels_truncate_to_uint8_as_edm2_and_average_rgb_for_gray():
    p = torch.tensor([-0.1, 0.0, 0.5, 0.999, 1.2]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert decoded_pixels(p).flatten(1)[0].tolist()[:5] == [0, 0, 127, 254, 255]
    rgb = torch.stack([torch.full((2, 2), 0.2), torch.full((2, 2), 0.4), torch.full((2, 2), 0.9)])[None]
    assert decoded_pixels(rgb, channels=1).shape == (1, 1, 2, 2) and decoded_pixels(rgb, 1).flatten()[0] == int(0.5 * 255)


def test_latent_map_refuses_mismatched_or_nonpositive_statistics():
    with pytest.raises(ValueError, match="raw_mean has 3 channels, latent.raw_std 4"):
        latent_affine([1, 2, 3], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="must be positive"):
        latent_affine([0, 0], [1, 0])


# ----------------------------------------------------------------------------- the VAE


def test_vae_encodes_pixels_over_255_to_the_posteriors_mean_and_std_and_decodes_the_final_latents(vaes):
    vae = load_vae(LatentConfig(vae=str(vaes[0]), batch=2))
    auto = load_autoencoder(str(vaes[0]))
    images = torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    posterior = auto.encode(images.float() / 255).latent_dist
    torch.testing.assert_close(vae.encode_pixels(images), torch.cat([posterior.mean, posterior.std], 1), rtol=1e-5, atol=1e-6)
    gray = images[:, :1]
    torch.testing.assert_close(vae.encode_pixels(gray), vae.encode_pixels(gray.expand(-1, 3, -1, -1)))
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    p = auto.decode((x - torch.tensor(vae.bias).view(1, 4, 1, 1)) / torch.tensor(vae.scale).view(1, 4, 1, 1)).sample
    expected = (p.clamp(0, 1) * 255).to(torch.uint8)
    assert (vae.decode(x).int() - expected.int()).abs().max() <= 1  # one grey level where round-off crosses an integer
    assert vae.pixel_shape((4, 8, 8)) == (3, 16, 16)


def test_vae_fingerprint_names_the_weights_not_the_folder(vaes, tmp_path):
    a, b = load_autoencoder(str(vaes[0])), load_autoencoder(str(vaes[1]))
    a.save_pretrained(tmp_path / "copy")
    assert weights_fingerprint(load_autoencoder(str(tmp_path / "copy"))) == weights_fingerprint(a) != weights_fingerprint(b)


def test_vae_errors_say_what_to_do(vaes, tmp_path, monkeypatch):
    with pytest.raises(VAEError, match="VAE folder .*missing does not exist"):
        load_autoencoder(str(tmp_path / "missing"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(VAEError, match="VAE folder runs/vea does not exist"):  # a folder's typo, not a hub name:
        load_autoencoder("runs/vea")  # no attempt at the network
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="has no config.json"):
        load_autoencoder(str(tmp_path / "empty"))
    with pytest.raises(VAEError, match="no VAE named: set latent.vae"):
        load_vae(LatentConfig())
    with pytest.raises(VAEError, match="4-channel latents, but the latent map has 3 channels"):
        load_vae(LatentConfig(vae=str(vaes[0]), raw_mean=[0, 0, 0], raw_std=[1, 1, 1]))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(VAEError, match=r"pip install 'edm-diffusion\[latent\]'"):
        load_autoencoder(str(vaes[0]))


# ----------------------------------------------------------------------------- edm-encode


def test_encode_writes_edm2s_layout_with_labels_readable_from_folder_and_zip(vaes, tmp_path):
    images = rgb_folder(tmp_path / "images")
    proc = encode(tmp_path / "lat", vaes[0], "dataset=folder", f"dataset.root={images}", "dataset.num_workers=0")
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "lat"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.npy"))
    assert names == [latent_name(i) for i in range(6)] == [f"00000/img-mean-std-{i:08d}.npy" for i in range(6)]
    assert json.loads((folder / "dataset.json").read_text())["labels"] == [[latent_name(i), i % 3] for i in range(6)]
    record = json.loads((folder / "latents.json").read_text())
    vae = load_vae(LatentConfig(vae=str(vaes[0])))
    assert record["vae_fingerprint"] == vae.fingerprint and record["pixel_shape"] == [3, 16, 16]
    from PIL import Image

    pixels = torch.stack([torch.from_numpy(np.array(Image.open(images / f"img{i:02d}.png"))).permute(2, 0, 1)
                          for i in range(6)])
    expected = vae.encode_pixels(pixels).numpy()
    stored = np.stack([np.load(folder / latent_name(i)) for i in range(6)])
    assert stored.dtype == np.float32 and stored.shape == (6, 8, 8, 8)
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)

    encode_dataset(EncodeConfig(dataset=DatasetConfig("folder", root=str(images), num_workers=0),
                                latent=LatentConfig(vae=str(vaes[0])), out=str(tmp_path / "lat.zip"), progress=False))
    assert not (tmp_path / "lat.zip.parts").exists()
    with zipfile.ZipFile(tmp_path / "lat.zip") as z:
        assert sorted(z.namelist()) == sorted([*names, "dataset.json", "latents.json"])
    for root in (folder, tmp_path / "lat.zip"):
        ds = build_dataset(DatasetConfig("latent", root=str(root), cond=True))
        assert isinstance(ds, LatentDataset) and (ds.channels, ds.resolution, ds.label_dim) == (4, 8, 3)
        item, label, index = ds[4]
        np.testing.assert_allclose(item.numpy(), stored[4], rtol=1e-5, atol=1e-6)  # (the zip: encoded in this process)
        assert label.argmax() == 1 and index == 4 and ds.latent["vae_fingerprint"] == vae.fingerprint


def test_encode_refuses_a_latent_map_it_would_drop(vaes, tmp_path):
    """edm-encode stores raw latents: latent.raw_mean (and the map's other keys) set there is refused, naming edm-train,
    before anything is written; a command line is refused in one line."""
    latent = LatentConfig(vae=str(vaes[0]), raw_mean=[0.5, -0.4, -0.1, 0.1], final_std=1.0)
    with pytest.raises(ValueError, match=r"^latent.raw_mean, latent.final_std: edm-encode stores the VAE's raw latents.* "
                                         r"set the map on edm-train \(dataset=latent latent.raw_mean=... "
                                         r"latent.final_std=...\) and drop it here$"):
        encode_dataset(EncodeConfig(dataset=DatasetConfig("digits", max_size=4), latent=latent, out=str(tmp_path / "l"),
                                    progress=False))
    assert not (tmp_path / "l").exists()
    proc = encode(tmp_path / "m", vaes[0], "dataset=digits", "dataset.max_size=4", "latent.raw_std=[1,1,1,1]")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("edm-encode: error: latent.raw_std:")
    encode_dataset(EncodeConfig(dataset=DatasetConfig("digits", max_size=4), out=str(tmp_path / "n"), progress=False,
                                latent=LatentConfig(vae=str(vaes[0]), raw_mean=[5.81, 3.25, 0.12, -2.15])))  # defaults


def test_encode_resumes_the_missing_latents_and_refuses_another_vae(vaes, tmp_path):
    """A rerun encodes only the missing and cut-short latents, to the same arrays; another VAE is refused in one line
    (the command), and so is a model folder."""
    out = tmp_path / "lat"
    data = DatasetConfig("digits", resolution=16, max_size=12)

    def run(folder: Path, vae: Path) -> dict:
        return encode_dataset(EncodeConfig(dataset=data, latent=LatentConfig(vae=str(vae)), out=str(folder), progress=False))

    assert run(out, vaes[0])["encoded_now"] == 12
    first = {i: np.load(out / latent_name(i)) for i in range(12)}
    for i in (3, 7, 11):
        (out / latent_name(i)).unlink()
    (out / latent_name(5)).write_bytes((out / latent_name(5)).read_bytes()[:-8])  # a write cut short by a crash
    assert run(out, vaes[0])["encoded_now"] == 4
    for i in range(12):
        np.testing.assert_array_equal(np.load(out / latent_name(i)), first[i])
    proc = encode(out, vaes[1], "dataset=digits", "dataset.resolution=16", "dataset.max_size=12")
    error = proc.stderr.splitlines()[-1]  # one line, after the log's
    assert proc.returncode == 1 and error.startswith("edm-encode: error: ") and "Traceback" not in proc.stderr
    assert "vae_fingerprint" in error and "overwrite=true" in error
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")  # a model folder (edm-export's) is not one of latents
    with pytest.raises(ValueError, match=r"is a model folder of another command \(it holds model.json\)"):
        run(tmp_path / "model", vaes[0])


def test_encode_on_two_processes_equals_one(vaes, tmp_path):
    args = ["dataset=digits", "dataset.resolution=16", "dataset.max_size=10", f"latent.vae={vaes[0]}", "progress=false"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "edm.cli.encode"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([*launch, *args, f"out={tmp_path / 'two'}"], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "process 1 encoded 5 image(s)" in proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])  # the report counts every process's images, not the main's
    assert (report["images"], report["encoded_now"]) == (10, 10), report
    one = encode_dataset(EncodeConfig(dataset=DatasetConfig("digits", resolution=16, max_size=10),
                                latent=LatentConfig(vae=str(vaes[0])), out=str(tmp_path / "one"), progress=False))
    assert {k: v for k, v in one.items() if k != "out"} == {k: v for k, v in report.items() if k != "out"}
    for i in range(10):  # other batches (images 0, 2, 4, ... in process 0) round the convolutions otherwise
        np.testing.assert_allclose(np.load(tmp_path / "two" / latent_name(i)), np.load(tmp_path / "one" / latent_name(i)),
                                   rtol=1e-5, atol=1e-6)
    assert (tmp_path / "two" / "dataset.json").read_text() == (tmp_path / "one" / "dataset.json").read_text()


def test_encode_processes_given_different_settings_are_refused(vaes, tmp_path):
    """Each process reads its own command line: one given another max_size encoded its share of another image list
    into the folder process 0 claimed. Every process refuses it in one line, before any latent. What each process
    may hold its own of (its data loader's workers, its VAE calls' batch: neither is in the latents' record) is not
    compared."""
    args = ["dataset=digits", "dataset.resolution=16", "dataset.max_size=${oc.env:LOCAL_WORLD_SIZE}${oc.env:RANK}",
            "dataset.num_workers=${oc.env:RANK}", "latent.batch=${oc.env:LOCAL_WORLD_SIZE}${oc.env:RANK}",
            f"latent.vae={vaes[0]}", "progress=false", f"out={tmp_path / 'two'}"]
    proc = one_node_run("edm.cli.encode", args)
    assert proc.returncode != 0
    assert proc.stderr.count("edm-encode: error: the 2 processes of this launch were given different settings "
                             "(dataset.max_size: 20 in process 0, 21 in process 1)") == 2, proc.stderr[-3000:]
    assert not list((tmp_path / "two").glob("*.npy")) and not list((tmp_path / "two").glob("[0-9]" * 5))


def test_encode_processes_that_do_not_share_out_are_refused(vaes, tmp_path):
    """out=lat from two working directories (as each node's own disk), two `accelerate launch` nodes of one process:
    process 1's latents went to a folder process 0 never saw. Every process refuses such a launch before any latent."""
    ends = two_nodes(tmp_path, "edm.cli.encode", lambda node: [
        "dataset=digits", "dataset.resolution=16", "dataset.max_size=4", f"latent.vae={vaes[0]}", "progress=false",
        "out=lat"], dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    said = "edm-encode: error: out lat is not one folder for every process: process 1 does not see what process 0 writes"
    assert [code != 0 and said in log for code, log in ends] == [True, True], ends[0][1][-3000:]
    assert not list(tmp_path.glob("node*/lat/*/*.npy"))


def test_latent_data_set_names_a_bad_file_and_refuses_resizing(vaes, tmp_path):
    out = tmp_path / "lat"
    encode_dataset(EncodeConfig(dataset=DatasetConfig("digits", resolution=16, max_size=4),
                                latent=LatentConfig(vae=str(vaes[0])), out=str(out), progress=False))
    (out / latent_name(2)).write_bytes(b"not an array")
    ds = build_dataset(DatasetConfig("latent", root=str(out)))
    with pytest.raises(Exception, match=f"{latent_name(2)}: cannot read a latent array"):
        ds[2]
    with pytest.raises(ValueError, match="cannot resize a latent data set"):
        build_dataset(DatasetConfig("latent", root=str(out), resolution=8))


# ----------------------------------------------------------------------------- train, sample, score


@pytest.fixture(scope="module")
def latent_run(vaes, tmp_path_factory):
    """digits at 16x16 encoded by VAE a (8x8x4 latents), and 4 steps of the tiny network on them."""
    from edm.training.loop import train

    root = tmp_path_factory.mktemp("latent_run")
    encode_dataset(EncodeConfig(dataset=DatasetConfig("digits", resolution=16, max_size=64),
                                latent=LatentConfig(vae=str(vaes[0])), out=str(root / "latents"), progress=False))
    cfg = compose("train", [*TINY_TRAIN, "dataset=latent", f"dataset.root={root / 'latents'}", "dataset.num_workers=0",
                            f"run_dir={root / 'run'}", "ema_sigma_rel=[0.10]", "ema_snapshot_kimg=0.016"])
    result = train(cfg)
    return root, result


def test_training_on_latents_records_the_vae_and_decodes_its_grids(latent_run, vaes):
    from PIL import Image

    root, result = latent_run
    state = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    vae = load_vae(LatentConfig(vae=str(vaes[0])))
    latent = state["latent"]
    assert latent["vae_fingerprint"] == vae.fingerprint and latent["pixel_shape"] == [1, 16, 16]
    assert latent["dataset"]["name"] == "digits" and latent["dataset"]["resolution"] == 16
    np.testing.assert_array_equal(np.float32(latent["scale"]), vae.scale)
    assert state["denoiser"]["network"]["in_channels"] == 4 and state["denoiser"]["network"]["img_resolution"] == 8
    assert Image.open(root / "run" / "samples-final.png").mode == "L"  # decoded to the data's gray pixels
    from edm.models.loading import load_model

    info = load_model(root / "run")[1]
    assert info.img_shape == (4, 8, 8) and info.pixel_shape == (1, 16, 16)


def test_training_draws_each_latent_from_its_posterior(latent_run):
    """The loop's inputs are (mean + std·n)·scale + bias with fresh n: with the stored std they scatter around the
    posterior mean by std·scale per element."""
    from edm.training.loop import _inputs

    class FakeRun:
        pass

    root, _ = latent_run
    run = FakeRun()
    run.dataset = build_dataset(DatasetConfig("latent", root=str(root / "latents")))
    run.vae = load_vae(LatentConfig(vae=run.dataset.latent["vae"]))
    run.cfg = compose("train", ["dataset=latent", f"dataset.root={root / 'latents'}"])
    run.generator = torch.Generator()
    mean_std = torch.stack([run.dataset[i][0] for i in range(64)])
    (y, _, _), = _inputs(run, [(mean_std, None, None)], [0])
    scale = torch.tensor(run.vae.scale).view(1, 4, 1, 1)
    n = (y - final_latents(mean_std, torch.zeros_like(y), run.vae.scale, run.vae.bias)) / (mean_std[:, 4:] * scale)
    assert abs(n.mean()) < 5 / n.numel() ** 0.5 and abs(n.std() - 1) < 5 / (2 * n.numel()) ** 0.5
    (again, _, _), = _inputs(run, [(mean_std, None, None)], [0])
    (other, _, _), = _inputs(run, [(mean_std, None, None)], [64])
    assert torch.equal(again, y) and not torch.equal(other, y)  # seeded by the place in the data stream


def test_a_latent_run_refuses_another_vae_a_pixel_network_shape_and_a_vae_for_pixels(latent_run, vaes):
    from edm.training.loop import setup

    root, _ = latent_run
    base = [*TINY_TRAIN, "dataset=latent", f"dataset.root={root / 'latents'}", f"run_dir={root / 'other'}"]
    with pytest.raises(VAEError, match="has other weights .* than the VAE of the data set .*latents"):
        setup(compose("train", [*base, f"latent.vae={vaes[1]}"]))
    with pytest.raises(ValueError, match="network.in_channels=3, but the latent data set holds 4x8x8"):
        setup(compose("train", [*base, "network.in_channels=3"]))
    with pytest.raises(ValueError, match="latent.vae=.* decodes latent data sets; dataset digits holds pixels"):
        setup(compose("train", [*TINY_TRAIN, f"latent.vae={vaes[0]}"]))


def test_a_latent_run_starts_from_or_distils_only_a_model_of_its_latent_map(latent_run):
    """init= and teacher= (sCD) must make the run's latents: a model of another latent map (latent.raw_std) is
    refused before any work, naming the model and both maps, as a guide is when sampling."""
    from edm.training.loop import setup

    root, _ = latent_run
    base = [*TINY_TRAIN, "dataset=latent", f"dataset.root={root / 'latents'}", "latent.raw_std=[1,1,1,1]"]
    with pytest.raises(VAEError, match=r"init .*run.* works in other VAE latents .*: give one trained on the same latents"):
        setup(compose("train", [*base, f"init={root / 'run'}", f"run_dir={root / 'init-other-map'}"]))
    with pytest.raises(VAEError, match=r"teacher .*run.* works in other VAE latents"):
        setup(compose("train", [*base, "recipe=scd", f"teacher={root / 'run'}", f"run_dir={root / 'scd-other-map'}"]))


def test_resume_refuses_a_run_whose_vae_differs(latent_run, vaes):
    from edm.models.checkpoint import CheckpointError
    from edm.training.run import check_resume_vae

    _, result = latent_run
    saved = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["latent"]
    check_resume_vae(saved, dict(saved), result.checkpoint)
    other = load_vae(LatentConfig(vae=str(vaes[1])))
    with pytest.raises(CheckpointError, match="trained with VAE .* latent.vae=.*b has fingerprint"):
        check_resume_vae(saved, {**saved, "vae": other.name, "vae_fingerprint": other.fingerprint}, result.checkpoint)
    with pytest.raises(CheckpointError, match="trained on VAE latents, the config's data set holds pixels"):
        check_resume_vae(saved, None, result.checkpoint)
    with pytest.raises(CheckpointError, match="another latent space .*dataset.max_size: checkpoint 64, config 32"):
        check_resume_vae(saved, {**saved, "dataset": {**saved["dataset"], "max_size": 32}}, result.checkpoint)


def test_resume_refuses_another_latent_map(latent_run, caplog):
    """One error, not first a warning that the changed latent.* keys let the run go on (RESUME_FREE's "latent."
    stands for every key under it)."""
    from edm.models.checkpoint import CheckpointError
    from edm.training.loop import setup

    root, _ = latent_run
    cfg = compose("train", [*TINY_TRAIN, "dataset=latent", f"dataset.root={root / 'latents'}", f"run_dir={root / 'run'}",
                            "ema_sigma_rel=[0.10]", "ema_snapshot_kimg=0.016", "resume=true", "latent.raw_std=[1,1,1,1]"])
    with pytest.raises(CheckpointError, match=r"another latent space \(bias: .*; scale: checkpoint \[0.119"):
        setup(cfg)
    assert "changed training settings" not in caplog.text


def test_sample_decodes_latents_to_pixels_and_study_scores_them_against_the_pixel_data(latent_run, vaes, tmp_path,
                                                                                       tiny_checkpoint):
    from PIL import Image

    root, result = latent_run
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([command("edm-sample"), f"checkpoint={root / 'run'}", "num_images=3", "sampler.num_steps=2",
                           f"out={tmp_path / 's'}", "progress=false"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(tmp_path / "s" / "000001.png")
    assert image.size == (16, 16) and image.mode == "L"
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["image_shape"] == [4, 8, 8] and report["pixel_shape"] == [1, 16, 16]  # the latents', the files'
    provenance = json.loads((tmp_path / "s" / "provenance.json").read_text())
    assert provenance["vae_fingerprint"] == load_vae(LatentConfig(vae=str(vaes[0]))).fingerprint
    from edm.generation.job import SampleConfig, generate_folder

    with pytest.raises(VAEError, match="has other weights"):  # another VAE than the one the latents were made with
        generate_folder(SampleConfig(checkpoint=str(root / "run"), num_images=3, vae=str(vaes[1]), out=str(tmp_path / "t"),
                                     progress=False))
    from edm.evaluation.nfe_study import StudyConfig, run_study

    rows = run_study(StudyConfig(checkpoint=str(root / "run"), solvers=["euler"], steps=[2], num_images=8, batch=4,
                                 out=str(tmp_path / "study"), progress=False))
    assert rows[0]["nfe"] == 2 and np.isfinite(rows[0]["fd_cls"])  # against digits at 16x16, the latents' pixel source
    # a pixel teacher is refused as such, also where vae= names the model's VAE (not as "drop vae=", which the model needs)
    teacher = tiny_checkpoint(tmp_path / "pixel-teacher.pt")
    with pytest.raises(VAEError, match="teacher .*pixel-teacher.pt makes pixels, the model VAE latents"):
        run_study(StudyConfig(checkpoint=str(root / "run"), vae=str(vaes[0]), solvers=["euler"], steps=[2],
                              teacher=str(teacher), teacher_steps=[2], num_images=8, batch=4,
                              out=str(tmp_path / "study-teacher"), progress=False))


def test_posthoc_model_folders_keep_the_latent_facts(latent_run, tmp_path):
    from edm.models.loading import load_model
    from edm.training.posthoc import PosthocConfig, reconstruct

    root, result = latent_run
    summary = reconstruct(PosthocConfig(run_dir=str(root / "run"), sigma_rel=[0.10], out=str(tmp_path / "ph")))
    info = load_model(summary[0]["folder"])[1]
    saved = torch.load(result.checkpoint, map_location="cpu", weights_only=True)["latent"]
    assert info.latent == saved and info.training_dataset().name == "digits"


# ----------------------------------------------------------------------------- NVlabs/edm2's models


def test_edm2_latent_snapshot_samples_images_through_a_vae_folder_with_an_autoguide(vaes, tmp_path):
    """An edm2-img512-style snapshot (its StabilityVAEEncoder's scale and bias) decodes with a local VAE folder, as
    edm2's generate_images.py decodes: (x − bias)/scale through the VAE, floor(255·clamp(p, 0, 1))."""
    from test_nvlabs import edm2_snapshot_bytes, our_edm2

    from edm.generation.sampling import generate_batch, plan_images
    from edm.core.samplers import SamplerConfig
    from edm.models.loading import load_model

    main, guide = tmp_path / "edm2-img512-s.pkl", tmp_path / "edm2-img512-xs.pkl"
    main.write_bytes(edm2_snapshot_bytes(our_edm2(4, 10), 10, latent=True))
    guide.write_bytes(edm2_snapshot_bytes(our_edm2(4, 10, seed=1), 10, latent=True))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([command("edm-sample"), f"checkpoint={main}", f"vae={vaes[0]}", "seeds=0-1", "labels=[3]",
                           "sampler.num_steps=2", f"guide={guide}", "guidance=2.1", "format=npz", f"out={tmp_path / 'o'}",
                           "progress=false"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "o" / "samples.npz") as f:
        images = f["images"]
    assert images.shape == (2, 32, 32, 3)

    net, info = load_model(main)
    ref, _ = load_model(guide)
    from edm.core.denoisers import GuidedDenoiser

    denoiser = GuidedDenoiser(net, 2.1, guide=ref)
    x, _ = generate_batch(denoiser, plan_images([0, 1], 3, 10), info.schedule, SamplerConfig("heun", 2), info.img_shape,
                          label_dim=10)
    scale, bias = np.float32(0.5) / np.float32(EDM2_RAW_STD), np.float32(0) - np.float32(EDM2_RAW_MEAN) * (np.float32(0.5) / np.float32(EDM2_RAW_STD))
    auto = load_autoencoder(str(vaes[0]))
    z = (x - torch.from_numpy(bias).view(1, 4, 1, 1)) / torch.from_numpy(scale).view(1, 4, 1, 1)
    expected = (auto.decode(z).sample.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_a_pixel_model_refuses_a_vae(tiny_checkpoint, vaes, tmp_path):
    proc = subprocess.run([command("edm-sample"), f"checkpoint={tiny_checkpoint(tmp_path / 'm.pt')}", f"vae={vaes[0]}", "num_images=1",
                           f"out={tmp_path / 'o'}", "progress=false"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "is a pixel model: vae=" in proc.stderr


# ----------------------------------------------------------------------------- NVlabs/edm2's own code


@pytest.fixture
def edm2_code(request, monkeypatch):
    reference_repo(request, monkeypatch, "--nvlabs-edm2-repo", "NVlabs/edm2")
    monkeypatch.setenv("HF_HOME", os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")))
    return pytest.importorskip("training.encoders"), pytest.importorskip("dataset_tool")


def test_encoding_equals_edm2s_dataset_tool_and_stability_vae_encoder(edm2_code, vaes, tmp_path, monkeypatch):
    """edm2's dataset_tool.py encode (on the CPU: its .to('cuda') redirected) and StabilityVAEEncoder on the same
    images and VAE folder: the same files, labels and float32 arrays; encode_latents with the same noise and decode
    equal ours."""
    encoders, dataset_tool = edm2_code
    images = rgb_folder(tmp_path / "images")
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: to(self, *["cpu" if v == "cuda" else v for v in a], **k))
    dataset_tool.encode.callback(model_url=str(vaes[0]), source=str(images), dest=str(tmp_path / "theirs"), max_images=None)
    monkeypatch.setattr(torch.Tensor, "to", to)
    encode_dataset(EncodeConfig(dataset=DatasetConfig("folder", root=str(images), num_workers=0),
                                latent=LatentConfig(vae=str(vaes[0])), out=str(tmp_path / "ours"), progress=False))
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    assert sorted(p.relative_to(theirs).as_posix() for p in theirs.rglob("*.npy")) == \
        sorted(p.relative_to(ours).as_posix() for p in ours.rglob("*.npy"))
    assert json.loads((theirs / "dataset.json").read_text()) == json.loads((ours / "dataset.json").read_text())
    for path in theirs.rglob("*.npy"):
        np.testing.assert_allclose(np.load(ours / path.relative_to(theirs)), np.load(path), rtol=1e-6, atol=1e-6)

    reference = encoders.StabilityVAEEncoder(vae_name=str(vaes[0]))
    ours_vae = load_vae(LatentConfig(vae=str(vaes[0])))
    np.testing.assert_array_equal(reference.scale, ours_vae.scale)
    np.testing.assert_array_equal(reference.bias, ours_vae.bias)
    mean_std = torch.from_numpy(np.stack([np.load(p) for p in sorted(ours.rglob("*.npy"))]))
    torch.manual_seed(5)
    x_ref = reference.encode_latents(mean_std)
    torch.manual_seed(5)
    noise = torch.randn_like(mean_std[:, :4])
    torch.testing.assert_close(final_latents(mean_std, noise, ours_vae.scale, ours_vae.bias), x_ref, rtol=0, atol=1e-6)
    assert torch.equal(ours_vae.decode(x_ref), reference.decode(x_ref))


def test_bench_times_the_latent_loader_with_the_per_step_draw(latent_run, monkeypatch):
    import edm.latent
    from conftest import load_script

    root, _ = latent_run
    calls = []
    real = edm.latent.final_latents
    monkeypatch.setattr(edm.latent, "final_latents", lambda *a: calls.append(a[0].shape) or real(*a))
    result = load_script("bench").main(["--device", "cpu", "--mode", "data", "--dataset", "latent", "--dataset-root",
                                        str(root / "latents"), "--batch", "8", "--workers", "0"])
    assert result["data"]["shape"] == [4, 8, 8] and result["data"]["images_per_s"] > 0
    assert len(calls) == 50 and calls[0] == (8, 8, 8, 8)  # every timed batch drawn from its posteriors


def test_encode_records_the_raw_latents_statistics_per_channel(tmp_path):
    """E[z] and std of z = mean + std·n over a set, against a large sample of z."""
    from edm.data.encode import raw_statistics

    gen = np.random.default_rng(0)
    paths = []
    for i in range(5):
        mean = gen.normal([[[1.0]], [[-2.0]]], 0.5, (2, 4, 4))
        std = gen.uniform(0.2, 1.5, (2, 4, 4))
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], np.concatenate([mean, std]).astype(np.float32))
    stats = raw_statistics(paths)
    arrays = np.stack([np.load(p) for p in paths]).astype(np.float64)
    z = arrays[None, :, :2] + arrays[None, :, 2:] * gen.standard_normal((4000, 5, 2, 4, 4))
    np.testing.assert_allclose(stats["mean"], z.mean(axis=(0, 1, 3, 4)), atol=5 * z.std() / z[:, :, 0].size ** 0.5)
    np.testing.assert_allclose(stats["std"], z.std(axis=(0, 1, 3, 4)), rtol=0.01)


def test_training_warns_when_the_latent_map_is_another_vaes(vaes, caplog):
    from edm.training.build import check_latent_statistics

    cfg = LatentConfig()
    vae = load_vae(cfg, str(vaes[0]))
    with caplog.at_level("WARNING"):
        check_latent_statistics(cfg, {"mean": list(EDM2_RAW_MEAN), "std": list(EDM2_RAW_STD)}, vae)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        check_latent_statistics(cfg, {"mean": [0.1, 0, 0, 0], "std": [1.0, 1, 1, 1]}, vae)
    assert "are not this VAE's; set them to the data set's measured [0.1, 0, 0, 0], [1.0, 1, 1, 1]" in caplog.text


def test_vae_in_bfloat16_decodes_close_to_float32(vaes):
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    full = load_vae(LatentConfig(vae=str(vaes[0])))
    half = load_vae(LatentConfig(vae=str(vaes[0]), dtype="bfloat16"))
    assert next(half.autoencoder.parameters()).dtype == torch.bfloat16 and half.fingerprint == full.fingerprint
    difference = (half.decode(x).float() - full.decode(x).float()).abs()
    assert difference.mean() < 2 and difference.max() <= 12  # bf16's 8-bit mantissa: a few grey levels


def test_small_vae_script_writes_a_vae_folder_that_encodes_and_says_what_made_it(tmp_path, monkeypatch):
    """The folder loads as a VAE and records its settings and data set: a rerun of other settings (the resize filter)
    is refused, naming it; --overwrite replaces the VAE once the new one is trained (a failed training keeps the old);
    bad settings are refused before OUT is made."""
    from conftest import load_script

    small_vae = load_script("small_vae")
    argv = ["--dataset", "digits", "--resolution", "16", "--out", str(tmp_path / "vae"), "--steps", "3", "--batch", "8",
            "--held-out", "16"]
    for bad, match in ((["--held-out", "0"], "--held-out 0: give 1 or more"),
                       (["--held-out", "1797"], "--held-out 1797 leaves no image of digits's 1797"),
                       (["--channels", "32,x"], "--channels '32,x': expected positive whole numbers"),
                       (["--channels", "32,48"], "--channels .32,48.: .* each a multiple of min.32, the first.")):
        with pytest.raises(SystemExit, match=f"small_vae.py: error: {match}"):
            small_vae.main([*argv, *bad])
    assert not (tmp_path / "vae").exists()
    result = small_vae.main(argv)
    vae = load_vae(LatentConfig(vae=result["out"]))
    assert (vae.latent_channels, vae.factor, vae.in_channels) == (4, 2, 3) and np.isfinite(result["psnr_db"])
    assert vae.encode_pixels(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)).shape == (2, 8, 8, 8)
    assert json.loads((tmp_path / "vae" / "provenance.json").read_text())["dataset"]["resample"] == "lanczos"
    with pytest.raises(SystemExit, match=r"small_vae.py: error: .* other settings \(dataset.resample: folder "
                                         r"'lanczos', now 'bicubic'\)"):
        small_vae.main([*argv, "--resample", "bicubic"])
    weights = {path.name: path.read_bytes() for path in (tmp_path / "vae").iterdir() if path.name != ".lock"}

    def failed(*args):
        raise RuntimeError("training failed")

    with monkeypatch.context() as patch:
        patch.setattr(small_vae, "train_vae", failed)
        with pytest.raises(RuntimeError, match="training failed"):
            small_vae.main([*argv, "--resample", "bicubic", "--overwrite"])
    assert {name: (tmp_path / "vae" / name).read_bytes() for name in weights} == weights  # the old VAE, untouched
    small_vae.main([*argv, "--resample", "bicubic", "--overwrite"])
    assert json.loads((tmp_path / "vae" / "provenance.json").read_text())["dataset"]["resample"] == "bicubic"
    assert sorted(path.name for path in (tmp_path / "vae").iterdir()) == sorted([*weights, ".lock"])


@pytest.mark.parametrize("bad, match", [
    (["--latent-channels", "0"], "--latent-channels 0: give 1 or more"),
    (["--resolution", "0"], "--resolution 0: give 1 or more"),
    (["--lr", "-0.001"], "--lr -0.001 --kl-weight 0.0001: the learning rate is positive"),
    (["--kl-weight", "-1"], "--lr 0.001 --kl-weight -1.0: the learning rate is positive, the KL weight 0 or more"),
])
def test_small_vae_refuses_a_setting_it_cannot_train_before_out_records_it(tmp_path, bad, match):
    """Refused in one line before OUT is made: once OUT's provenance.json records a setting, the corrected command is
    refused as one of other settings (and a negative KL weight would train without a word)."""
    from conftest import load_script

    small_vae = load_script("small_vae")
    with pytest.raises(SystemExit, match=f"small_vae.py: error: {re.escape(match)}"):
        small_vae.main(["--dataset", "digits", "--out", str(tmp_path / "vae"), "--steps", "1", "--batch", "2",
                        "--held-out", "4", "--no-progress", *bad])
    assert not (tmp_path / "vae").exists()


def test_a_latent_folder_read_as_images_is_named_as_latents(latent_run):
    """dataset=folder on edm-encode's output: one error that says it holds latents and names dataset=latent."""
    from edm.data.sets import DatasetNotFoundError

    root, _ = latent_run
    with pytest.raises(DatasetNotFoundError, match=r"latents holds VAE latents .*: read it with dataset=latent dataset.root="):
        build_dataset(DatasetConfig("folder", root=str(root / "latents")))


def test_small_vae_without_diffusers_names_the_extra_and_makes_no_folder(tmp_path, monkeypatch):
    from conftest import load_script

    small_vae = load_script("small_vae")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    with pytest.raises(SystemExit, match=r"small_vae.py: error: .*pip install 'edm-diffusion\[latent\]'"):
        small_vae.main(["--dataset", "digits", "--out", str(tmp_path / "vae"), "--steps", "1"])
    assert not (tmp_path / "vae").exists()  # no provenance.json of a VAE that was never trained


def test_small_vae_shows_its_training_steps_on_a_progress_bar(tmp_path, capsys):
    """Its 3000 steps take minutes: a bar counts them (--no-progress turns it off, and is no setting of the VAE: the
    same OUT takes it)."""
    from conftest import load_script

    small_vae = load_script("small_vae")
    argv = ["--dataset", "digits", "--resolution", "8", "--steps", "3", "--batch", "4", "--held-out", "4",
            "--channels", "8,16"]
    small_vae.main([*argv, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert "training the VAE: 100%" in err and "3/3" in err
    small_vae.main([*argv, "--out", str(tmp_path / "a"), "--no-progress"])
    assert "training the VAE" not in capsys.readouterr().err


def test_small_vae_saves_each_file_whole(tmp_path):
    """A save that fails half way leaves OUT without the half-written file, and without its staging folder."""
    from conftest import load_script

    class Failing:
        def save_pretrained(self, folder):
            (folder / "config.json").write_text("{}")
            raise OSError("disk full")

    (tmp_path / "vae").mkdir()
    with pytest.raises(OSError, match="disk full"):
        load_script("small_vae").save_vae(Failing(), tmp_path / "vae")
    assert list((tmp_path / "vae").iterdir()) == []


def test_small_vae_refuses_a_training_run_or_another_commands_folder_even_with_overwrite(tmp_path, monkeypatch, capsys):
    """--overwrite deletes what OUT holds but the record: pointed at a training run's folder it deleted the run's
    checkpoints and metrics.jsonl, at edm-export's model folder its model.json. Such a folder, and another command's
    results folder, is refused whatever --overwrite says, naming it and what marks it, before the data set is read."""
    from conftest import load_script

    small_vae = load_script("small_vae")
    monkeypatch.setattr(small_vae, "dataset_images", lambda *a: pytest.fail("read the data set before refusing --out"))
    run, model, samples = tmp_path / "run", tmp_path / "model", tmp_path / "samples"
    for folder, files in ((run, {"checkpoint-00000010.pt": "the run's", "metrics.jsonl": "{}\n"}),
                          (model, {"model.json": "{}", "model.safetensors": "weights"}),
                          (samples, {"provenance.json": '{"command": "edm-sample"}', "000000.png": "an image"})):
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    held = {path: path.read_text() for path in tmp_path.rglob("*") if path.is_file()}
    for folder, finding in ((run, r"a training run's folder \(it holds checkpoint-00000010.pt\)"),
                            (model, r"a model folder of another command \(it holds model.json\)"),
                            (samples, "edm-sample's results folder, not small_vae.py's")):
        for overwrite in ([], ["--overwrite"]):
            with pytest.raises(SystemExit) as stopped:
                small_vae.main(["--dataset", "digits", "--out", str(folder), "--steps", "1", *overwrite])
            error = capsys.readouterr().err.strip()
            assert stopped.value.code == 1 and re.fullmatch(rf"small_vae.py: error: --out={folder} is {finding}.*"
                                                            r"give .*another --out=DIR.*", error), error
    assert {path: path.read_text() for path in tmp_path.rglob("*") if path.is_file()} == held  # not even a .lock


def test_small_vae_names_its_own_flag_for_a_missing_or_wrong_dataset_root(tmp_path):
    """The data set's message names edm's key dataset.root; the script's is --dataset-root: one line names it."""
    from conftest import load_script

    small_vae = load_script("small_vae")
    for root, given in (([], "None"), (["--dataset-root", str(tmp_path / "none")], repr(str(tmp_path / "none")))):
        with pytest.raises(SystemExit, match=rf"^small_vae.py: error: --dataset-root {re.escape(given)} is neither a "
                                             r"folder nor a .zip; point it at a folder of images[^\n]*$"):
            small_vae.main(["--dataset", "folder", *root, "--out", str(tmp_path / "vae")])


def test_small_vae_stopped_by_ctrl_c_says_so_in_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    from conftest import load_script

    small_vae = load_script("small_vae")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(small_vae, "train_vae", interrupted)
    with pytest.raises((SystemExit, KeyboardInterrupt)) as stopped:  # (a KeyboardInterrupt would stop pytest)
        small_vae.main(["--dataset", "digits", "--out", str(tmp_path / "vae"), "--held-out", "16"])
    assert stopped.type is SystemExit and stopped.value.code == 130 and capsys.readouterr().err == "small_vae.py: stopped; rerun the same command\n"


def test_encode_takes_a_vae_of_any_latent_channel_count(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=8, norm_num_groups=4).save_pretrained(tmp_path / "vae8")
    report = encode_dataset(EncodeConfig(dataset=DatasetConfig("digits", resolution=16, max_size=3),
                                         latent=LatentConfig(vae=str(tmp_path / "vae8")), out=str(tmp_path / "lat"),
                                         progress=False))
    assert report["latent_shape"] == [16, 8, 8] and np.load(tmp_path / "lat" / latent_name(2)).shape == (16, 8, 8)
    assert len(json.loads((tmp_path / "lat" / "latents.json").read_text())["raw_statistics"]["mean"]) == 8


def test_models_mixed_in_one_sampler_must_share_the_latent_space():
    from edm.latent import same_latent_space

    a = {"vae": "a", "vae_fingerprint": "f", "scale": [0.5, 0.25], "bias": [0.0, 1.0]}
    same_latent_space(None, None, "guide")
    same_latent_space(a, {**a, "vae": "elsewhere", "vae_fingerprint": None}, "guide")  # edm2's pickles record no fingerprint
    for other, match in (({**a, "scale": [0.5, 0.3]}, "other VAE latents"), ({**a, "vae_fingerprint": "g"}, "other VAE"),
                         (None, "makes pixels, the model VAE latents")):
        with pytest.raises(VAEError, match=match):
            same_latent_space(a, other, "guide G")


def test_encode_refuses_to_resume_when_the_images_changed(vaes, tmp_path):
    """Latent k is of image k: an image replaced in place, or a file added to the folder (which shifts every later
    index), makes a resume refused, naming what changed; an unreadable latent is named by its path."""
    import os

    from PIL import Image

    from edm.data.encode import raw_statistics
    from edm.provenance import ProvenanceError

    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(tmp_path / f"img{i}.png")
    cfg = EncodeConfig(dataset=DatasetConfig("folder", root=str(tmp_path)), latent=LatentConfig(vae=str(vaes[0])),
                       out=str(tmp_path / "lat"), progress=False)
    encode_dataset(cfg)
    encode_dataset(cfg)  # the out folder inside the data's root is not part of the data
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(tmp_path / "img1.png")  # replaced in place
    os.utime(tmp_path / "img1.png", ns=(1, 1))
    with pytest.raises(ProvenanceError, match=r"images.contents: folder '3:"):
        encode_dataset(cfg)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img0a.png")
    with pytest.raises(ProvenanceError, match=r"images.count: folder 3, now 4.*images.files_sha256"):
        encode_dataset(cfg)
    (tmp_path / "bad.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"latent .*bad.npy is unreadable .*delete it and run edm-encode again"):
        raw_statistics([tmp_path / "bad.npy"])
