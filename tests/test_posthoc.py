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
