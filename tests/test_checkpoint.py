"""edm/models/checkpoint.py: atomic writes, weights-only reads with clear errors, denoiser rebuild."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import edm
from edm.models import checkpoint
from edm.models.checkpoint import (
    CheckpointError, build_denoiser, checkpoint_path, find_latest, list_checkpoints, load_checkpoint, load_denoiser,
    prune_checkpoints, save_checkpoint,
)

from conftest import CodePayload

SPEC = {
    "network": {"name": "tiny", "img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": 0,
                "model_channels": 8},
    "precond": {"kind": "edm", "sigma_data": 0.5, "beta_d": 19.9, "beta_min": 0.1, "M": 1000},
}


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_denoiser(SPEC)
    ema = build_denoiser(SPEC)
    return {
        "denoiser": SPEC, "schedule": {"name": "edm"}, "model": model.state_dict(), "ema": ema.state_dict(),
        "config": {"seed": seed, "adam_betas": [0.9, 0.99], "grad_clip": None}, "step": seed,
    }


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_is_weights_only(tmp_path):
    state = _state(1)
    path = checkpoint_path(tmp_path, 7)
    save_checkpoint(path, state)
    assert path.name == "checkpoint-00000007.pt" and oct(path.stat().st_mode & 0o777) == "0o644"
    back = load_checkpoint(path)
    assert back["config"] == state["config"] and back["denoiser"] == SPEC
    assert _same_tensors(back["model"], state["model"]) and _same_tensors(back["ema"], state["ema"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, _state(1))
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_killed_writer_leaves_no_checkpoint_that_is_picked_up(tmp_path):
    """A process killed in the middle of a write (os._exit) leaves its temp file, never a
    checkpoint-*.pt: the previous checkpoint stays the latest and loads."""
    old = checkpoint_path(tmp_path, 1)
    save_checkpoint(old, _state(1))
    script = textwrap.dedent(f"""
        import os, torch
        from edm.models.checkpoint import checkpoint_path, save_checkpoint
        def killed(obj, f, *a, **k):
            f.write(b"partial bytes"); f.flush(); os._exit(9)
        torch.save = killed
        save_checkpoint(checkpoint_path({str(tmp_path)!r}, 2), {{"x": torch.zeros(3)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9
    leftovers = [p.name for p in tmp_path.iterdir() if p != old]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the torn write
    assert find_latest(tmp_path) == old
    assert load_checkpoint(find_latest(tmp_path))["step"] == 1


def test_latest_is_by_step_number(tmp_path):
    for step in (9, 10, 100):
        save_checkpoint(checkpoint_path(tmp_path, step), {"x": torch.zeros(1)})
    (tmp_path / "checkpoint-99999999.pt.tmp").write_bytes(b"")
    (tmp_path / "notes.pt").write_bytes(b"")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 10, 100]
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 100)
    assert find_latest(tmp_path / "absent") is None


def test_pruning_keeps_the_newest_by_step_and_zero_keeps_all(tmp_path):
    for step in (9, 10, 100):
        save_checkpoint(checkpoint_path(tmp_path, step), {"x": torch.zeros(1)})
    (tmp_path / "notes.pt").write_bytes(b"")
    assert prune_checkpoints(tmp_path, 0) == [] and len(list_checkpoints(tmp_path)) == 3
    assert prune_checkpoints(tmp_path, 2) == [checkpoint_path(tmp_path, 9)]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 100] and (tmp_path / "notes.pt").exists()
    assert prune_checkpoints(tmp_path, 5) == []


def test_missing_corrupt_and_foreign_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" + os.urandom(255))
    with pytest.raises(CheckpointError, match="garbage.pt is not a checkpoint: it is a file that starts with"):
        load_checkpoint(garbage)
    good = tmp_path / "good.pt"
    save_checkpoint(good, _state())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt.*corrupt"):
        load_checkpoint(truncated)
    damaged = tmp_path / "damaged.pt"  # bytes changed inside a tensor: torch.load alone would read other weights
    name, weight = next((k, v) for k, v in _state()["model"].items() if v.numel() >= 4 and v.abs().min() > 0)
    data = bytearray(good.read_bytes())
    offset = data.index(weight.flatten()[:4].numpy().tobytes())
    data[offset : offset + 16] = b"\xff" * 16
    damaged.write_bytes(bytes(data))
    assert torch.load(damaged, weights_only=True)["model"][name].isnan().any()
    with pytest.raises(CheckpointError, match=r"damaged.pt is corrupt: .*/data/\d+ fails its CRC-32 check, so its bytes changed.*; restore it from a copy$"):
        load_checkpoint(damaged)
    renamed = tmp_path / "renamed.pt"  # a byte of a member's name in the archive's index changed
    data = bytearray(good.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central-directory record; its file name starts 46 bytes in
    data[entry + 46] = 0xFF
    renamed.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"renamed.pt is corrupt: a file name in its zip index is not UTF-8.*; restore it from a copy$"):
        load_checkpoint(renamed)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tensor)
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}}, partial)
    with pytest.raises(CheckpointError, match="not an edm checkpoint.*denoiser"):
        load_checkpoint(partial)
    assert issubclass(CheckpointError, ValueError)


class Payload:  # a pickled object that is not a tensor or plain container
    pass


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({**_state(), "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="code.pt"):
        load_checkpoint(path)


def test_load_denoiser_uses_ema_weights_in_eval_mode(tmp_path):
    state = _state(3)
    assert not _same_tensors(state["model"], state["ema"])
    path = tmp_path / "c.pt"
    save_checkpoint(path, state)
    den, back = load_denoiser(path)
    assert isinstance(den, edm.Precond) and not den.training and den.kind == "edm"
    assert _same_tensors(den.state_dict(), state["ema"])
    raw, _ = load_denoiser(path, ema=False)
    assert _same_tensors(raw.state_dict(), state["model"])
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    assert den(x, sigma).shape == x.shape


def test_weights_that_do_not_fit_the_spec(tmp_path):
    state = _state()
    state["denoiser"] = {**SPEC, "network": {**SPEC["network"], "model_channels": 16}}
    path = tmp_path / "c.pt"
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match=r"do not fit its denoiser spec \(\d+ problem\(s\): size mismatch for ") as err:
        load_denoiser(path)
    assert "\n" not in str(err.value) and str(err.value).count("size mismatch") == 3  # the first three, then a count
    with pytest.raises(CheckpointError, match="bad denoiser spec"):
        build_denoiser({"network": {"img_resolution": 8}, "precond": {}})


def test_a_run_checkpoint_left_empty_or_zeroed_says_to_fall_back_to_the_earlier_one(tmp_path):
    """checkpoint-*.pt of a run that holds no archive at all (empty, or zeros where a crash lost its data) is a
    damaged run file, not a wrong argument: the way out is deleting it, as for one cut short, not "pass a checkpoint"."""
    (tmp_path / "checkpoint-00000002.pt").write_bytes(b"")  # the earlier one, named (damaged or not: not read here)
    for data in (b"", bytes(4096)):
        path = tmp_path / "checkpoint-00000004.pt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=r"checkpoint-00000004.pt is not a checkpoint: it is .*; if it is a "
                                                  r"run's latest, delete it to fall back to the run's earlier checkpoint "
                                                  r"checkpoint-00000002.pt$"):
            load_checkpoint(path)


def test_a_damaged_run_checkpoint_with_none_before_it_offers_no_earlier_one(tmp_path):
    """A run's only (or first) checkpoint, cut short: deleting it falls back to nothing (resume=true would start the
    run over), so the message says so instead of offering an earlier checkpoint; a later one beside it does not count."""
    good = tmp_path / "checkpoint-00000002.pt"
    checkpoint.save_checkpoint(good, {"denoiser": {}, "schedule": {}, "model": {}, "ema": {}, "config": {}})
    good.write_bytes(good.read_bytes()[:200])
    (tmp_path / "checkpoint-00000004.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"corrupt or not a torch file .*; no earlier checkpoint is beside it: "
                                              r"restore it from a copy, or start the run over") as err:
        load_checkpoint(good)
    assert "fall back" not in str(err.value)


def test_a_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"denoiser": CodePayload(marker), "schedule": {}, "model": {}, "ema": {}, "config": {}}, path)
    with pytest.raises(CheckpointError, match=f"{path.name}.*corrupt or not a torch file.*Unpickl"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_not_called_a_corrupt_one(tmp_path):
    (tmp_path / "notes.pt").write_text("a text file")
    with pytest.raises(CheckpointError, match="notes.pt is not a checkpoint: it is a file that starts with b'a te'"):
        load_checkpoint(tmp_path / "notes.pt")
    (tmp_path / "snapshot-000000000064.safetensors").write_bytes(b"\x10\x00\x00\x00")
    with pytest.raises(CheckpointError, match="it is a file that .*\\(a power-EMA snapshot: make a model of it with edm-posthoc\\)"):
        load_checkpoint(tmp_path / "snapshot-000000000064.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt is not a checkpoint: it is an empty file"):
        load_checkpoint(tmp_path / "empty.pt")
    good = tmp_path / "checkpoint-00000002.pt"
    checkpoint.save_checkpoint(good, {"denoiser": {}, "schedule": {}, "model": {}, "ema": {}, "config": {}})
    good.write_bytes(good.read_bytes()[:200])  # a torn torch archive is what "corrupt" means
    checkpoint.save_checkpoint(tmp_path / "checkpoint-00000001.pt", {})
    with pytest.raises(CheckpointError, match="corrupt or not a torch file.*delete it to fall back to the run's earlier "
                                              "checkpoint checkpoint-00000001.pt$"):
        load_checkpoint(good)
