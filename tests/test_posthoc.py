"""edm/training/posthoc.py and edm-posthoc: any σ_rel's EMA of a run as model folders that sample."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch


from conftest import command, power_run


def test_the_posthoc_command_writes_model_folders_that_sample(tmp_path, tiny_train, one_thread):
    from edm.models.loading import load_model

    result = power_run(tiny_train, tmp_path / "run")
    out = tmp_path / "posthoc"
    proc = subprocess.run([command("edm-posthoc"), f"run_dir={tmp_path / 'run'}", "sigma_rel=[0.1,0.07]", f"out={out}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sigma_rel 0.070 at 0.064 kimg from 8 EMA profiles of 4 snapshot(s) (residual" in proc.stdout
    summary = json.loads((out / "posthoc.json").read_text())
    assert [p["sigma_rel"] for p in summary["profiles"]] == [0.07, 0.1] and summary["at_kimg"] == 0.064
    tracked, _ = load_model(out / "ema-0.100")  # a tracked profile at the last snapshot is that snapshot
    from edm.models.checkpoint import load_checkpoint

    live = load_checkpoint(result.checkpoint)["phema"]["emas"][1]
    assert all(torch.allclose(tracked.state_dict()[k], live[k], rtol=0, atol=1e-6) for k in live)
    meta = json.loads((out / "ema-0.070" / "model.json").read_text())["posthoc_ema"]
    assert len(meta["inputs"]) == 8 and sum(i["weight"] for i in meta["inputs"]) == pytest.approx(1)
    sample = subprocess.run([command("edm-sample"), f"checkpoint={out / 'ema-0.070'}", "num_images=2", "sampler.num_steps=2",
                             f"out={tmp_path / 'samples'}", "progress=false"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert sample.returncode == 0, sample.stderr
    bad = subprocess.run([command("edm-posthoc"), f"run_dir={tmp_path / 'run'}", "sigma_rel=[0.1]", "at_kimg=0.05",
                          f"out={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 1 and "at_kimg=0.05 is no snapshot's time; snapshots at kimg 0.016, 0.032, 0.048, 0.064" in bad.stderr


def test_recipe_small_edm_is_the_edm_recipe_with_power_emas_and_recipe_small_is_edm2s_with_the_same():
    """recipe=small-edm changes only what is tracked (σ_rel 0.05 and 0.10 snapshots), so its training is the EDM
    recipe's; recipe=small tracks the same over EDM2's training (edm2-tiny, the learned weighting on EDM's
    preconditioning, lr 0.03 decayed after 12 kimg), and recipe=small-guide is that training with half the channels and a quarter of the images."""
    from omegaconf import OmegaConf

    from edm.cli import compose

    def config(*overrides: str) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(compose("train", list(overrides))))

    def changed(a: dict, b: dict) -> dict:
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    plain, small_edm, small, guide = (config(*r) for r in ([], ["recipe=small-edm"], ["recipe=small"], ["recipe=small-guide"]))
    tracked = {"ema_sigma_rel": ([], [0.05, 0.10]), "ema_snapshot_kimg": (0.0, 8)}
    assert changed(plain, small_edm) == tracked
    assert changed(config("network=edm2-tiny", "precond.kind=edm", "loss.kind=edm2", "loss.P_mean=-0.8", "loss.P_std=1.6", "lr=0.03",
                          "lr_decay_kimg=12"), small) == tracked
    assert changed(small, guide) == {"network": (small["network"], {**small["network"], "model_channels": 16}),
                                     "total_kimg": (96.0, 24.0), "ema_sigma_rel": ([0.05, 0.10], []),
                                     "ema_snapshot_kimg": (8, 0), "run_dir": (None, "runs/digits-edm-edm2-tiny-guide")}


def test_recipe_smalls_four_commands_make_guided_samples(tmp_path, tiny_train, one_thread):
    """recipe=small's commands (train, its guide, post-hoc σ_rel 0.10, sample with w = 1.5 on (0.28, 2.9]) make a
    guided grid whose provenance names the guide and the interval."""
    run, guide, posthoc, samples = (tmp_path / name for name in ("run", "guide", "posthoc", "samples"))
    steps = [[command("edm-train"), *tiny_train, "recipe=small", "ema_snapshot_kimg=0.016", f"run_dir={run}"],
             [command("edm-train"), *tiny_train, "recipe=small-guide", "network.model_channels=4", "total_kimg=0.016",
              f"run_dir={guide}"],
             [command("edm-posthoc"), f"run_dir={run}", "sigma_rel=[0.10]", f"out={posthoc}"],
             [command("edm-sample"), f"checkpoint={posthoc / 'ema-0.100'}", f"guide={guide}", "guidance=1.5",
              "guidance_interval=[0.28,2.9]", "format=grid", "num_images=4", "sampler.num_steps=4", f"out={samples}",
              "progress=false"]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, f"{step}\n{proc.stderr}"
    record = json.loads((samples / "provenance.json").read_text())
    assert record["guidance"] == 1.5 and record["guidance_interval"] == [0.28, 2.9] and len(record["guide_sha256"]) == 64
    assert len(list(samples.glob("*.png"))) == 1  # the grid


def test_a_snapshot_whose_weights_changed_or_are_not_finite_is_named_not_averaged_into_the_model(tmp_path, tiny_train,
                                                                                                  one_thread):
    """Bytes of a snapshot's tensor changed to other finite numbers fail its CRC-32; a snapshot written with NaN
    weights (a run that diverged between log records) is refused as well: even at a weight of ~0 in the fit,
    0·NaN is NaN. Either is named before any model is written."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from edm.models.checkpoint import CheckpointError
    from edm.training.phema import _crc32
    from edm.training.posthoc import PosthocConfig, reconstruct

    power_run(tiny_train, tmp_path / "run")
    path = sorted((tmp_path / "run" / "phema").glob("snapshot-*.safetensors"))[0]
    original = path.read_bytes()
    weight = next(v for v in load_file(path).values() if v.numel() >= 4 and v.abs().min() > 0)
    offset = original.index(weight.flatten()[:4].numpy().tobytes())
    changed = bytearray(original)
    changed[offset : offset + 4] = (weight.flatten()[:1] * 1.5).numpy().tobytes()  # finite, other
    path.write_bytes(bytes(changed))
    run = lambda: reconstruct(PosthocConfig(run_dir=str(tmp_path / "run"), sigma_rel=[0.1], out=str(tmp_path / "out"),
                                            overwrite=True))  # noqa: E731
    with pytest.raises(CheckpointError, match=f"{path.name} is corrupt: .* fails its CRC-32 check"):
        run()
    path.write_bytes(original)
    with safe_open(path, "pt") as f:
        header = f.metadata()
    tensors = load_file(path)
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = torch.full_like(tensors[key], float("nan"))  # as a diverged run writes it, its CRC-32 to match
    path.write_bytes(save(tensors, metadata=header | {"crc32": json.dumps({k: _crc32(v) for k, v in tensors.items()})}))
    with pytest.raises(CheckpointError, match=f"{path.name} holds non-finite weights .*the run diverged"):
        run()
    assert not list((tmp_path / "out").glob("ema-*"))


def test_a_run_folder_that_does_not_exist_or_has_no_snapshots_is_named(tmp_path):
    from edm.training.posthoc import PosthocConfig, reconstruct

    with pytest.raises(FileNotFoundError, match=f"run_dir={tmp_path / 'nope'} does not exist"):
        reconstruct(PosthocConfig(run_dir=str(tmp_path / "nope"), sigma_rel=[0.1], out=str(tmp_path / "out")))
    (tmp_path / "c.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"run_dir={tmp_path / 'c.pt'} is a file, not a folder"):
        reconstruct(PosthocConfig(run_dir=str(tmp_path / "c.pt"), sigma_rel=[0.1], out=str(tmp_path / "out")))
    with pytest.raises(FileNotFoundError, match="no power-EMA snapshots in"):
        reconstruct(PosthocConfig(run_dir=str(tmp_path), sigma_rel=[0.1], out=str(tmp_path / "out")))


def test_an_out_of_another_trainings_snapshots_and_snapshots_of_two_trainings_are_refused(tmp_path, tiny_train,
                                                                                          one_thread):
    """OUT's record names each snapshot by its header (config with the seed, step, σ_rel's), not only its file name
    and size: a run folder retrained with another seed under the same snapshot names is another OUT. Snapshots of two
    trainings in one phema/ are refused naming the setting; profiles of earlier calls stay listed in posthoc.json."""
    import shutil

    from edm.provenance import ProvenanceError
    from edm.models.checkpoint import CheckpointError
    from edm.training.posthoc import PosthocConfig, reconstruct

    run, other, out = tmp_path / "run", tmp_path / "other", tmp_path / "posthoc"
    power_run(tiny_train, run)
    power_run(tiny_train, other, "seed=7")
    reconstruct(PosthocConfig(run_dir=str(run), sigma_rel=[0.05], out=str(out)))
    reconstruct(PosthocConfig(run_dir=str(run), sigma_rel=[0.15], out=str(out)))
    listed = json.loads((out / "posthoc.json").read_text())["profiles"]
    assert [p["sigma_rel"] for p in listed] == [0.05, 0.15] and sorted(p.name for p in out.glob("ema-*")) == [
        "ema-0.050", "ema-0.150"]
    with pytest.raises(ValueError, match=r"sigma_rel 0.1504 would replace ema-0.150, which holds sigma_rel 0.15 of an "
                                         "earlier call"):
        reconstruct(PosthocConfig(run_dir=str(run), sigma_rel=[0.1504], out=str(out)))
    mixed = sorted((run / "phema").glob("snapshot-*"))[-1]
    shutil.copyfile(sorted((other / "phema").glob("snapshot-*"))[-1], mixed)  # same name and size, seed 7's
    with pytest.raises(CheckpointError, match=rf"{mixed} is of another training than .* \(seed: 0 vs 7\)"):
        reconstruct(PosthocConfig(run_dir=str(run), sigma_rel=[0.1], out=str(tmp_path / "fresh")))
    shutil.rmtree(run / "phema")
    shutil.copytree(other / "phema", run / "phema")  # the run retrained with seed 7: same names, same sizes
    with pytest.raises(ProvenanceError, match=r"snapshots\.snapshot-000000000016\.safetensors\.meta_sha256: ") as err:
        reconstruct(PosthocConfig(run_dir=str(run), sigma_rel=[0.1], out=str(out)))
    assert len(str(err.value)) < 1500  # each differing snapshot's hash, not the whole lists


@pytest.mark.parametrize("text", ["[]", "null", '{"profiles": {"a": 1}}', '{"profiles": [3, {"sigma_rel": 0.05}]}'])
def test_a_posthoc_listing_damaged_into_other_json_lists_what_it_can_not_a_traceback(tmp_path, text):
    """OUT/posthoc.json holding JSON of another shape (a list, null, profiles that are no list, entries that are no
    profile) lists the readable profiles only, as a listing cut short lists none; a new call's profile is merged in."""
    from edm.training.posthoc import _merged, _refuse_renamed

    listing = tmp_path / "posthoc.json"
    listing.write_text(text)
    _refuse_renamed(listing, [0.1])
    merged = _merged(listing, [{"sigma_rel": 0.1}])
    assert [p["sigma_rel"] for p in merged] == ([0.05, 0.1] if "0.05" in text else [0.1])


def test_sigma_rels_that_share_a_folder_and_an_out_that_is_the_run_are_refused(tmp_path, tiny_train, one_thread):
    from edm.training.posthoc import PosthocConfig, reconstruct

    run = tmp_path / "run"
    power_run(tiny_train, run)
    with pytest.raises(ValueError, match=r"sigma_rel=\[0.1, 0.1004\]: 0.1, 0.1004 would share the folder ema-0.100"):
        reconstruct(PosthocConfig(run_dir=str(run), sigma_rel=[0.1, 0.1004], out=str(tmp_path / "out")))
    for out in (run, run / "phema"):
        with pytest.raises(ValueError, match=rf"out={out} is a training run's folder \(it holds "):
            reconstruct(PosthocConfig(run_dir=str(run), sigma_rel=[0.1], out=str(out)))
    assert not (tmp_path / "out").exists() and not list(run.glob("ema-*")) and not (run / "posthoc.json").exists()


def test_an_export_of_a_posthoc_model_keeps_how_its_weights_were_made(tmp_path, tiny_train, one_thread):
    from edm.models.loading import export_model
    from edm.training.posthoc import PosthocConfig, reconstruct

    power_run(tiny_train, tmp_path / "run")
    reconstruct(PosthocConfig(run_dir=str(tmp_path / "run"), sigma_rel=[0.1], out=str(tmp_path / "posthoc")))
    made = json.loads((tmp_path / "posthoc" / "ema-0.100" / "model.json").read_text())["posthoc_ema"]
    export_model(tmp_path / "posthoc" / "ema-0.100", tmp_path / "export")
    assert json.loads((tmp_path / "export" / "model.json").read_text())["posthoc_ema"] == made


def test_snapshots_of_a_run_resumed_with_its_loss_spelled_out_are_of_one_run(tmp_path, tiny_train, one_thread):
    """loss.kind unset resolves to the schedule's (edm): a resume that spells it out is the same run (edm-train
    compares resolved losses), and so are its snapshots for edm-posthoc."""
    from edm.training.posthoc import PosthocConfig, reconstruct

    power_run(tiny_train, tmp_path / "run", "total_kimg=0.032")
    power_run(tiny_train, tmp_path / "run", "resume=true", "loss.kind=edm")
    summary = reconstruct(PosthocConfig(run_dir=str(tmp_path / "run"), sigma_rel=[0.1], out=str(tmp_path / "out")))
    assert [len(p["inputs"]) for p in summary] == [8]


def test_a_sigma_rel_the_snapshots_fit_poorly_is_reported_with_its_residual(tmp_path, tiny_train, one_thread, caplog):
    """Four snapshots of σ_rel 0.05 and 0.1: a tracked σ_rel is fit exactly (no warning); 0.25, far from both, has a
    residual above POOR_FIT, and the warning gives it and names the tracked values."""
    from edm.training.phema import POOR_FIT
    from edm.training.posthoc import PosthocConfig, reconstruct

    power_run(tiny_train, tmp_path / "run")
    with caplog.at_level("WARNING", logger="edm.training.posthoc"):
        summary = reconstruct(PosthocConfig(run_dir=str(tmp_path / "run"), sigma_rel=[0.1, 0.25], out=str(tmp_path / "out")))
    fit = {p["sigma_rel"]: p["residual"] for p in summary}
    assert fit[0.1] < 1e-6 and fit[0.25] > POOR_FIT
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and warned[0].startswith(f"sigma_rel 0.25: the 4 snapshot(s) fit its EMA profile only to "
                                                     f"a relative residual of {fit[0.25]:.2g}")
    assert "tracked [0.05, 0.1]" in warned[0]
