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


def test_recipe_small_is_the_edm_recipe_with_power_emas_and_its_four_commands_make_guided_samples(tmp_path, tiny_train,
                                                                                                  one_thread):
    """recipe=small changes only what is tracked (σ_rel 0.05 and 0.10 snapshots), so its training is the EDM
    recipe's; its commands (train, guide, post-hoc σ_rel 0.10, sample with w = 1.5 on (0.28, 2.9]) make a guided
    grid whose provenance names the guide and the interval."""
    from omegaconf import OmegaConf

    from edm.cli import compose

    plain, small = (OmegaConf.to_container(OmegaConf.structured(compose("train", r))) for r in ([], ["recipe=small"]))
    changed = {k: (plain[k], small[k]) for k in plain if plain[k] != small[k]}
    assert changed == {"ema_sigma_rel": ([], [0.05, 0.10]), "ema_snapshot_kimg": (0.0, 8)}
    run, guide, posthoc, samples = (tmp_path / name for name in ("run", "guide", "posthoc", "samples"))
    steps = [[command("edm-train"), *tiny_train, "recipe=small", "ema_snapshot_kimg=0.016", f"run_dir={run}"],
             [command("edm-train"), *tiny_train, "recipe=guide", "network.model_channels=4", f"run_dir={guide}"],
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
