"""edm/models/export.py: model folders (model.safetensors + model.json) written from any model and read with no pickle."""

from __future__ import annotations

import json
import pickle
import subprocess

import pytest
import torch

from edm.models.checkpoint import CheckpointError
from edm.models.export import export_state, read_export
from edm.models.loading import load_model, read_model_file

from conftest import command


@pytest.fixture
def trained(tmp_path, tiny_checkpoint):
    """A tiny checkpoint whose EMA and raw weights differ, recording its data set and VP schedule."""
    path = tiny_checkpoint(tmp_path / "checkpoint-00000010.pt", perturb=0.05, raw_offset=0.01, kind="vp",
                           schedule={"name": "vp", "beta_d": 18.0, "beta_min": 0.2, "t_end": 1.0})
    state = torch.load(path, weights_only=True)
    state["config"] = {"dataset": {"name": "digits", "resolution": 8}}
    torch.save(state, path)
    return path


def _outputs(denoiser):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    return denoiser(x, torch.tensor([0.05, 1.0, 40.0]))


@pytest.mark.parametrize("ema", [True, False])
def test_export_then_load_gives_the_same_denoiser_schedule_and_data_set(trained, tmp_path, ema, monkeypatch):
    _, state = read_model_file(trained)
    out = export_state(state, tmp_path / "model", ema=ema)

    def refuse(*args, **kwargs):
        raise AssertionError("a model folder must load without pickle or torch.load")

    original, original_info = load_model(trained, ema=ema)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for path in (out, out / "model.safetensors"):
        loaded, info = load_model(path, ema=ema)
        with torch.no_grad():
            assert torch.equal(_outputs(loaded), _outputs(original))
        assert info.schedule == original_info.schedule and info.dataset == {"name": "digits", "resolution": 8}
    assert json.loads((out / "model.json").read_text())["weights"] == ("ema" if ema else "raw")


def test_a_model_folder_says_which_weights_it_holds_and_names_bad_files(trained, tmp_path):
    _, state = read_model_file(trained)
    out = export_state(state, tmp_path / "model")
    with pytest.raises(CheckpointError, match="holds the ema weights only.*ema=true"):
        read_export(out, ema=False)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable"):
        load_model(out)
    (out / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not an edm model folder"):
        load_model(out)


@pytest.mark.parametrize("text", ["null", "[]", "3"])
def test_a_model_json_that_is_not_a_json_object_is_named_unreadable_by_a_load_and_refused_by_an_export(trained, tmp_path,
                                                                                                       text):
    """model.json damaged into valid JSON that is no record: a load names it (CheckpointError, not AttributeError),
    and an export there is refused as a folder of another model, unless overwrite, which the load's advice names."""
    _, state = read_model_file(trained)
    out = export_state(state, tmp_path / "model")
    (out / "model.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"model.json is unreadable \(it holds a JSON \w+, not a record.*export the "
                                              "model again with overwrite=true"):
        load_model(out)
    with pytest.raises(ValueError, match="holds a model exported from another file or weights"):
        export_state(state, out, source_sha256="ab" * 32)
    load_model(export_state(state, out, source_sha256="ab" * 32, overwrite=True))


def test_a_model_folder_whose_weights_bytes_changed_is_refused_as_corrupt(trained, tmp_path):
    """model.json records model.safetensors' SHA-256: one flipped byte in a weight (the file still parses) is refused
    naming the file, not loaded as other weights; a folder whose model.json lacks the hash (older) still loads."""
    _, state = read_model_file(trained)
    out = export_state(state, tmp_path / "model")
    good = (out / "model.safetensors").read_bytes()
    damaged = bytearray(good)
    damaged[-3] ^= 0x40  # inside the last tensor's data
    (out / "model.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt: its SHA-256 is not the one model.json "
                                              "records .*export the model again"):
        load_model(out)
    meta = json.loads((out / "model.json").read_text())
    del meta["weights_sha256"]
    (out / "model.json").write_text(json.dumps(meta))
    (out / "model.safetensors").write_bytes(good)
    load_model(out)


def test_a_model_folders_identity_covers_its_model_json(trained, tmp_path):
    """Records (edm-sample's, edm-study's) name a model by model_record: a checkpoint by its file's hash; a model
    folder also by its model.json's, so an edit to the spec there (σ_d, the schedule) is another model, and a
    folder whose record lacks that key (its writer did not record it) is compared without it."""
    from edm.files import file_sha256
    from edm.provenance import ProvenanceError, claim
    from edm.models.loading import model_record

    assert model_record(trained, "checkpoint") == {"checkpoint_sha256": file_sha256(trained)}
    assert model_record(None, "guide") == {"guide_sha256": None}
    _, state = read_model_file(trained)
    out = export_state(state, tmp_path / "model")
    before = model_record(load_model(out)[1].source, "checkpoint")
    assert before == {"checkpoint_sha256": file_sha256(out / "model.safetensors"),
                      "checkpoint_model_json_sha256": file_sha256(out / "model.json")}
    meta = json.loads((out / "model.json").read_text())
    meta["denoiser"]["precond"]["sigma_data"] = 0.3
    (out / "model.json").write_text(json.dumps(meta))
    after = model_record(load_model(out)[1].source, "checkpoint")
    legacy, samples = tmp_path / "legacy", tmp_path / "samples"
    claim(legacy, {"checkpoint_sha256": before["checkpoint_sha256"]}, [], command="edm-sample")  # lacks the key
    claim(legacy, after, [], command="edm-sample")  # accepted, and the record now holds the key ...
    with pytest.raises(ProvenanceError, match="checkpoint_model_json_sha256: folder '.*', now '.*'"):
        claim(legacy, before, [], command="edm-sample")  # ... so a later edit is seen there too
    claim(samples, before, [], command="edm-sample")
    with pytest.raises(ProvenanceError, match="checkpoint_model_json_sha256: folder '.*', now '.*'"):
        claim(samples, after, [], command="edm-sample")


def test_a_refusal_names_the_first_differing_settings_and_counts_the_rest(tmp_path):
    """A folder of other settings (edm-posthoc's at another at_kimg differs in every snapshot's facts) is refused
    naming the first LISTED_DIFFERENCES keys in order, then how many more differ."""
    from edm.provenance import LISTED_DIFFERENCES, ProvenanceError, claim

    claim(tmp_path, {"at_nimg": 8, "snapshots": {f"s{i}": {"bytes": i, "stds": [0.1]} for i in range(5)}}, [],
          command="edm-posthoc")
    with pytest.raises(ProvenanceError) as err:
        claim(tmp_path, {"at_nimg": 4, "snapshots": {}}, [], command="edm-posthoc")
    message = str(err.value)
    assert message.count(": folder ") == LISTED_DIFFERENCES and "at_nimg: folder 8, now 4; snapshots.s0.bytes" in message
    assert f"; and {1 + 2 * 5 - LISTED_DIFFERENCES} more)" in message


def test_the_export_command_and_sampling_from_its_folder(trained, tmp_path):
    out = tmp_path / "exported"
    proc = subprocess.run([command("edm-export"), f"checkpoint={trained.parent}", f"out={out}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "EMA weights" in proc.stdout and (out / "model.safetensors").stat().st_size < trained.stat().st_size
    meta = json.loads((out / "model.json").read_text())
    assert meta["source_sha256"] and meta["step"] == 10 and meta["denoiser"]["precond"]["kind"] == "vp"
    samples = tmp_path / "samples"
    proc = subprocess.run([command("edm-sample"), f"checkpoint={out}", "num_images=2",
                           "sampler.num_steps=2", "format=npz", f"out={samples}", "progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((samples / "report.json").read_text())["schedule"]["name"] == "vp"


def test_an_export_refuses_a_folder_of_another_model_and_a_run_folder(trained, tmp_path, tiny_checkpoint):
    """Exporting again from the same file and weights remakes the folder; another source or the other weights is
    refused (overwrite=True replaces it), and so is a training run's folder, where the model folder would shadow
    the run's checkpoints."""
    from edm.models.loading import export_model

    other = tiny_checkpoint(tmp_path / "other" / "checkpoint-00000020.pt", perturb=0.1)
    out = tmp_path / "exported"
    export_model(trained, out)
    export_model(trained, out)
    for source, ema in ((other, True), (trained, False)):
        with pytest.raises(ValueError, match=rf"{out} holds a model exported from another file or weights .*"
                                             "pass overwrite=true to replace it"):
            export_model(source, out, ema=ema)
    from edm.files import file_sha256

    assert json.loads((out / "model.json").read_text())["source_sha256"] == file_sha256(trained)
    export_model(other, out, overwrite=True)
    assert json.loads((out / "model.json").read_text())["source_sha256"] == file_sha256(other)
    with pytest.raises(ValueError, match="is a training run's folder"):
        export_model(trained, trained.parent, overwrite=True)
    assert not (trained.parent / "model.json").exists()


def test_a_sampler_and_an_export_refuse_each_others_folders(trained, tmp_path):
    """A model folder is not a folder of samples, nor a folder of results (provenance.json: edm-sample, edm-study,
    edm-posthoc) one of a model: each is refused naming what the folder holds."""
    from edm.generation.job import SampleConfig, generate_folder
    from edm.models.loading import export_model

    model = tmp_path / "model"
    export_model(trained, model)
    with pytest.raises(ValueError, match=rf"out={model} is a model folder of another command \(it holds model.json\)"):
        generate_folder(SampleConfig(checkpoint=str(trained), num_images=1, out=str(model), progress=False))
    samples = tmp_path / "samples"
    generate_folder(SampleConfig(checkpoint=str(model), num_images=1, out=str(samples), progress=False))
    with pytest.raises(ValueError, match=rf"out={samples} is a results folder of another command \(it holds "
                                         r"provenance.json\)"):
        export_model(trained, samples, overwrite=True)
    assert sorted(p.name for p in model.iterdir() if not p.name.startswith(".")) == ["model.json", "model.safetensors"]
    assert not (samples / "model.json").exists()


def test_an_export_cut_short_leaves_no_model_json_over_other_weights(trained, tmp_path, monkeypatch):
    """Re-exporting over a folder removes model.json first and writes it last: a crash while the new weights are
    written leaves a folder that is no model folder, never new weights described by the old model.json."""
    import edm.models.export as export

    _, state = read_model_file(trained)
    out = export_state(state, tmp_path / "model")

    def crash(path, write):
        raise OSError("disk full")

    monkeypatch.setattr(export, "atomic_write", crash)
    with pytest.raises(OSError, match="disk full"):
        export_state(state, out, ema=False, overwrite=True)
    assert not (out / "model.json").exists()
    with pytest.raises((CheckpointError, FileNotFoundError)):
        load_model(out)
