"""NVlabs/edm snapshots: safe unpickling, reference parameter names, equal outputs.

The default run needs no reference code: it writes synthetic snapshots with the exact
structure of NVlabs ones (persistence records + plain-pickled tensors) from our own
networks. With `--nvlabs-repo PATH` (an NVlabs/edm checkout), real reference networks are
built, pickled as the training loop does, loaded with `load_nvlabs` and compared.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import re
import runpy
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import edm
from edm import networks
from edm.models.checkpoint import CheckpointError, checkpoint_path, list_checkpoints, load_denoiser
from edm.models.loading import load_model
from edm.models.nvlabs import NVlabsError, convert, convert_state_dict, load_nvlabs, read_nvlabs, to_checkpoint, unpickle
from edm.models.unpickler import array_values

from conftest import command, load_script, reference_repo

REPO = Path(__file__).resolve().parents[1]


nvlabs_loop = load_script("nvlabs_loop")  # scripts/nvlabs_loop.py: the reference's training iteration and loop

# --------------------------------------------------------------------------------------
# Architectures under test: reference constructor kwargs (small sizes, real structure).

SONG = dict(
    img_resolution=16, in_channels=3, out_channels=3, augment_dim=9, model_channels=16, channel_mult=[1, 2, 2],
    channel_mult_emb=4, num_blocks=2, attn_resolutions=[8], dropout=0.13, label_dropout=0.0,
)
ARCHS = {
    "ddpmpp": SONG | dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                          decoder_type="standard", resample_filter=[1, 1]),
    "ncsnpp": SONG | dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                          decoder_type="standard", resample_filter=[1, 3, 3, 1]),
    "ncsnpp_skip": SONG | dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="skip",
                               decoder_type="skip", resample_filter=[1, 3, 3, 1]),
    # ADM attention has out_channels // 64 heads, so 64 channels keep it on at every level.
    "adm": dict(img_resolution=8, in_channels=3, out_channels=3, augment_dim=0, model_channels=64,
                channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[8, 4],
                dropout=0.1, label_dropout=0.0),
}
ARCHS["adm_iddpm"] = ARCHS["adm"] | dict(out_channels=6)  # iDDPMPrecond's DhariwalUNet: n, then the learned variance
MODEL_CLASS = {"ddpmpp": "SongUNet", "ncsnpp": "SongUNet", "ncsnpp_skip": "SongUNet", "adm": "DhariwalUNet",
               "adm_iddpm": "DhariwalUNet"}
PRECOND_CLASS = {"edm": "EDMPrecond", "vp": "VPPrecond", "ve": "VEPrecond", "iddpm": "iDDPMPrecond"}
PRESET = {"ddpmpp": "ddpmpp", "ncsnpp": "ncsnpp", "ncsnpp_skip": "ncsnpp", "adm": "adm", "adm_iddpm": "adm"}
SIGMAS = {"edm": [0.002, 0.3, 2.0, 80.0], "vp": [0.01, 0.4, 5.0, 150.0], "ve": [0.02, 0.7, 9.0, 100.0],
          "iddpm": [0.0065, 0.3, 2.0, 80.0]}
# Non-default precond constants, so reading the wrong (default) value changes the output.
PRECOND_KW = {"edm": dict(sigma_data=0.6), "vp": dict(beta_d=18.5, beta_min=0.2, M=1000), "ve": dict(),
              "iddpm": dict(C_1=0.002, C_2=0.01, M=1000)}
VE_RANGE = dict(sigma_min=0.01, sigma_max=50.0)  # a VE snapshot's own σ range (VEPrecond's defaults: 0.02, 100)


def iddpm_buffer(M: int, C_1: float, C_2: float) -> torch.Tensor:
    """iDDPMPrecond's `u` buffer as its constructor fills it: the recurrence in float32."""
    alpha_bar = lambda j: (0.5 * np.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2  # noqa: E731
    u = torch.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def our_denoiser(arch: str, label_dim: int, kind: str, seed: int = 0) -> edm.Precond:
    """Our Precond for an architecture with every parameter random (no zero-initialized layers)."""
    torch.manual_seed(seed)
    net = networks.build(PRESET[arch], label_dim=label_dim, **ARCHS[arch])
    den = edm.Precond(net, kind=kind, **PRECOND_KW[kind])
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in den.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return den.eval()


def inputs(arch: str, label_dim: int, kind: str, batch: int = 4) -> dict:
    gen = torch.Generator().manual_seed(7)
    res, ch = ARCHS[arch]["img_resolution"], ARCHS[arch]["in_channels"]
    sigma = torch.tensor(SIGMAS[kind])
    out = dict(x=torch.randn(batch, ch, res, res, generator=gen) * sigma.view(-1, 1, 1, 1).clamp(min=1), sigma=sigma)
    out["labels"] = torch.eye(label_dim)[torch.randint(label_dim, (batch,), generator=gen)] if label_dim else None
    aug = ARCHS[arch]["augment_dim"]
    out["augment"] = torch.randn(batch, aug, generator=gen) if aug else None
    return out


def run(den, x, sigma, labels, augment):
    with torch.no_grad():
        return den(x, sigma, labels, augment_labels=augment) if augment is not None else den(x, sigma, labels)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------
# Synthetic snapshot writer: the byte structure of an NVlabs pickle, made without its code.


class GlobalRef:
    """A global `module.name` that the writer emits as STACK_GLOBAL without importing it."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("a GlobalRef is only written, never called")


RECONSTRUCT = GlobalRef("torch_utils.persistence", "_reconstruct_persistent_obj")


class Persistent:
    """Pickles as torch_utils.persistence._reconstruct_persistent_obj(meta), as persistent_class.__reduce__ does."""

    def __init__(self, class_name: str, state: dict, module_src: str) -> None:
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return RECONSTRUCT, (self.meta,)


class TorchContainer:
    """Pickles as a stock torch.nn.ModuleDict: NEWOBJ + BUILD(__dict__)."""

    def __init__(self, state: dict) -> None:
        self.state = state


class SnapshotPickler(pickle._Pickler):
    """Pure-Python pickler writing GlobalRef as a `module.name` global and TorchContainer as ModuleDict."""

    def save_global_ref(self, obj: GlobalRef) -> None:
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)

    def save_container(self, obj: TorchContainer) -> None:
        self.save(torch.nn.ModuleDict)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[GlobalRef] = save_global_ref
    dispatch[TorchContainer] = save_container


HARMLESS_SRC = "raise RuntimeError('the embedded module source was executed')\n"


def module_record(module: torch.nn.Module, class_name: str, init_kwargs: dict, src: str, **attrs):
    """A module's pickled __dict__ (as torch writes it) with children replaced by records."""
    state = module.__getstate__()
    state["training"] = False
    state["_parameters"] = OrderedDict(
        (k, None if v is None else torch.nn.Parameter(v.detach().clone(), requires_grad=False))
        for k, v in state["_parameters"].items()
    )
    state["_buffers"] = OrderedDict(state["_buffers"])
    children = OrderedDict()
    for name, child in state["_modules"].items():
        if isinstance(child, torch.nn.ModuleDict):
            sub = child.__getstate__()
            sub["_modules"] = OrderedDict(
                (k, module_record(v, type(v).__name__, {}, src)) for k, v in sub["_modules"].items()
            )
            children[name] = TorchContainer(sub)
        elif child is not None:
            children[name] = module_record(child, type(child).__name__, {}, src)
        else:
            children[name] = None
    state["_modules"] = children
    if class_name == "UNetBlock":  # the reference stores np.sqrt(...) scalars here
        state["skip_scale"] = np.float64(state["skip_scale"])
        init_kwargs = dict(init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)))
    state |= attrs | {"_init_args": (), "_init_kwargs": init_kwargs}
    return Persistent(class_name, state, src)


def snapshot_bytes(den: edm.Precond, arch: str, label_dim: int, *, src: str = HARMLESS_SRC,
                   precond_class: str | None = None, model_class: str | None = None,
                   levels: torch.Tensor | None = None) -> bytes:
    """An NVlabs-format snapshot of `den`: dict(ema, loss_fn, augment_pipe, dataset_kwargs)."""
    kind = den.kind
    kw = ARCHS[arch]
    model_kwargs = {k: v for k, v in kw.items() if k not in ("img_resolution", "in_channels", "out_channels")}
    model_init = dict(img_resolution=kw["img_resolution"], in_channels=kw["in_channels"],
                      out_channels=kw["out_channels"], label_dim=label_dim, **model_kwargs)
    model = module_record(den.net, model_class or MODEL_CLASS[arch], model_init, src)
    precond_kw = PRECOND_KW[kind]
    attrs = dict(img_resolution=kw["img_resolution"], img_channels=kw["in_channels"], label_dim=label_dim, use_fp16=False)
    if kind == "edm":
        attrs |= dict(sigma_min=0, sigma_max=float("inf"), sigma_data=precond_kw["sigma_data"])
    elif kind == "vp":
        attrs |= dict(precond_kw, epsilon_t=1e-5, sigma_min=0.0019, sigma_max=152.0)
    elif kind == "iddpm":
        levels = iddpm_buffer(**precond_kw) if levels is None else levels
        attrs |= dict(precond_kw, sigma_min=float(levels[-2]), sigma_max=float(levels[0]))
    else:
        attrs |= VE_RANGE
    precond_init = dict(attrs, model_type=MODEL_CLASS[arch], **model_kwargs)
    shell = torch.nn.Module()
    shell.model = den.net
    if kind == "iddpm":
        shell.register_buffer("u", levels)
    ema = module_record(shell, precond_class or PRECOND_CLASS[kind], precond_init, src, **attrs)
    ema.meta["state"]["_modules"]["model"] = model
    loss = Persistent("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5, _init_args=(), _init_kwargs={}), src)
    dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip", use_labels=bool(label_dim))
    data = dict(ema=ema, loss_fn=loss, augment_pipe=None, dataset_kwargs=dataset_kwargs)
    buf = io.BytesIO()
    SnapshotPickler(buf, protocol=4).dump(data)
    return buf.getvalue()


def write_snapshot(tmp_path: Path, den, arch, label_dim, name="network-snapshot-000000.pkl", **kw) -> Path:
    path = tmp_path / name
    path.write_bytes(snapshot_bytes(den, arch, label_dim, **kw))
    return path


# --------------------------------------------------------------------------------------
# Loading a snapshot gives the same denoiser.

CASES = [("ddpmpp", 10, "edm"), ("ddpmpp", 0, "vp"), ("ncsnpp", 0, "ve"), ("ncsnpp_skip", 10, "edm"),
         ("adm", 10, "edm"), ("adm", 0, "vp"), ("adm_iddpm", 10, "iddpm")]


@pytest.mark.parametrize("arch,label_dim,kind", CASES)
def test_synthetic_snapshot_loads_equal_denoiser(tmp_path, arch, label_dim, kind):
    den = our_denoiser(arch, label_dim, kind)
    path = write_snapshot(tmp_path, den, arch, label_dim)
    loaded = load_nvlabs(path)
    assert isinstance(loaded, edm.Precond) and not loaded.training
    assert loaded.kind == kind
    inp = inputs(arch, label_dim, kind)
    expected = run(den, inp["x"], inp["sigma"], inp["labels"], inp["augment"])
    got = run(loaded, inp["x"], inp["sigma"], inp["labels"], inp["augment"])
    assert rel_err(got, expected) < 1e-5


def test_snapshot_spec_and_schedule(tmp_path):
    den = our_denoiser("ncsnpp", 10, "vp")
    snap = read_nvlabs(write_snapshot(tmp_path, den, "ncsnpp", 10))
    net = snap.denoiser["network"]
    assert net["name"] == "ncsnpp" and net["label_dim"] == 10
    assert {k: net[k] for k in ARCHS["ncsnpp"]} == ARCHS["ncsnpp"]
    assert snap.denoiser["precond"] == dict(kind="vp", sigma_data=0.5, beta_d=18.5, beta_min=0.2, M=1000)
    assert snap.schedule == dict(name="vp", beta_d=18.5, beta_min=0.2)
    assert snap.reference["precond_class"] == "VPPrecond" and snap.reference["model_class"] == "SongUNet"
    assert snap.reference["epsilon_t"] == 1e-5
    assert set(snap.state_dict) == set(den.state_dict())


@pytest.mark.parametrize("arch,label_dim,kind", [("ddpmpp", 10, "edm"), ("ddpmpp", 0, "vp"), ("ncsnpp", 0, "ve")])
def test_load_model_takes_a_snapshot_through_the_checkpoint_loader_with_its_schedule(tmp_path, arch, label_dim, kind):
    """A .pkl goes pickle -> checkpoint dict -> the loader of edm checkpoints: the same denoiser as
    load_nvlabs, its shape and labels, and the schedule of its precond with the snapshot's own
    constants (a VE snapshot's σ range, a VP snapshot's β's), which the sampler's grid then spans."""
    den = our_denoiser(arch, label_dim, kind)
    path = write_snapshot(tmp_path, den, arch, label_dim)
    loaded, info = load_model(path)
    expected = {"edm": edm.schedules.EDM(), "vp": edm.schedules.VP(beta_d=18.5, beta_min=0.2),
                "ve": edm.schedules.VE(**VE_RANGE)}[kind]
    assert info.schedule == expected and info.source == str(path) and not loaded.training
    assert info.img_shape == (ARCHS[arch]["in_channels"],) + (ARCHS[arch]["img_resolution"],) * 2
    assert info.label_dim == label_dim
    inp = inputs(arch, label_dim, kind)
    torch.testing.assert_close(run(loaded, inp["x"], inp["sigma"], inp["labels"], inp["augment"]),
                               run(load_nvlabs(path), inp["x"], inp["sigma"], inp["labels"], inp["augment"]), rtol=0, atol=0)
    if kind == "ve":
        assert info.schedule.sigma(info.schedule.time_steps(18)[0]).item() == pytest.approx(VE_RANGE["sigma_max"])


def test_an_nvlabs_snapshot_has_no_raw_weights_to_load(tmp_path):
    """Its training loop pickles the EMA network only: ema=false is refused for the .pkl and for its converted .pt,
    not answered with the EMA weights under another name."""
    den = our_denoiser("ddpmpp", 0, "edm")
    pkl = write_snapshot(tmp_path, den, "ddpmpp", 0)
    convert(pkl, tmp_path / "converted.pt")
    for path in (pkl, tmp_path / "converted.pt"):
        load_model(path)
        with pytest.raises(CheckpointError, match="holds an NVlabs snapshot's EMA weights only .* load it with ema=true"):
            load_model(path, ema=False)


def test_convert_writes_equal_checkpoint(tmp_path):
    den = our_denoiser("ncsnpp", 10, "ve")
    pkl = write_snapshot(tmp_path, den, "ncsnpp", 10)
    out = tmp_path / "converted.pt"
    assert convert(pkl, out).reference["precond_class"] == "VEPrecond"
    state = torch.load(out, map_location="cpu", weights_only=True)  # no pickle code needed any more
    assert state["schedule"] == {"name": "ve", **VE_RANGE}
    assert state["denoiser"]["precond"]["kind"] == "ve" and state["denoiser"]["network"]["name"] == "ncsnpp"
    assert state["ema"].keys() == den.state_dict().keys() == state["model"].keys()
    loaded, _ = load_denoiser(out)
    inp = inputs("ncsnpp", 10, "ve")
    assert rel_err(run(loaded, inp["x"], inp["sigma"], inp["labels"], inp["augment"]),
                   run(den, inp["x"], inp["sigma"], inp["labels"], inp["augment"])) < 1e-5


def test_convert_refuses_to_write_a_checkpoint_into_a_run(tmp_path, tiny_checkpoint):
    """A .pt in a run's folder, or named checkpoint-*.pt, would become the run's latest checkpoint (edm-sample
    would sample it as the run's model, a resume would fail on it): refused, and nothing is written."""
    den = our_denoiser("ncsnpp", 10, "ve")
    pkl = write_snapshot(tmp_path, den, "ncsnpp", 10)
    run = tmp_path / "run"
    tiny_checkpoint(run / "checkpoint-00000004.pt")
    for out in (run / "converted.pt", tmp_path / "checkpoint-00000009.pt"):
        with pytest.raises(ValueError, match="would be a checkpoint of a training run"):
            convert(pkl, out)
        assert not out.exists()


def test_the_convert_command_writes_a_model_folder_that_loads_without_pickle(tmp_path, monkeypatch):
    """The default output is edm.models.export's folder (safetensors + JSON), the same format edm-export writes."""
    den = our_denoiser("ddpmpp", 10, "edm")
    pkl = write_snapshot(tmp_path, den, "ddpmpp", 10)
    out = tmp_path / "converted"
    proc = subprocess.run([command("edm-convert-nvlabs"), f"pkl={pkl}", f"out={out}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "EDMPrecond(SongUNet)" in proc.stdout, proc.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["model.json", "model.safetensors"]
    inp = inputs("ddpmpp", 10, "edm")
    expected = run(load_nvlabs(pkl), inp["x"], inp["sigma"], inp["labels"], inp["augment"])

    def refuse(*args, **kwargs):
        raise AssertionError("a model folder must load without pickle or torch.load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded, info = load_model(out)
    assert torch.equal(run(loaded, inp["x"], inp["sigma"], inp["labels"], inp["augment"]), expected)
    assert info.label_dim == 10 and info.schedule.name == "edm"


def test_the_convert_command_help_and_bad_input(tmp_path):
    proc = subprocess.run([command("edm-convert-nvlabs"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "restricted unpickler" in proc.stdout and "pkl:" in proc.stdout
    bad = tmp_path / "bad.pkl"
    bad.write_text("not a pickle at all")
    proc = subprocess.run([command("edm-convert-nvlabs"), f"pkl={bad}", f"out={tmp_path / 'out.pt'}"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "edm-convert-nvlabs: error:" in proc.stderr and "bad.pkl" in proc.stderr
    assert not (tmp_path / "out.pt").exists()


def test_to_checkpoint_is_plain(tmp_path):
    den = our_denoiser("ddpmpp", 0, "edm")
    snap = read_nvlabs(write_snapshot(tmp_path, den, "ddpmpp", 0))
    state = to_checkpoint(snap, "x/network-snapshot-000000.pkl")
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=True)
    assert again["config"]["reference"]["sigma_max"] is None  # inf stored as None
    assert again["config"]["pickle"] == "network-snapshot-000000.pkl"
    assert all(torch.equal(again["ema"][k], v) for k, v in den.state_dict().items())


# --------------------------------------------------------------------------------------
# Safety: nothing in the file runs.


class Payload:
    """Pickles as `func(*args)`: what a malicious pickle does on plain pickle.load."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict:
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.eval": Payload(eval, code),
        "builtins.exec": Payload(exec, code),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
        "subprocess.check_call": Payload(subprocess.check_call, ["touch", str(marker)]),
        "pathlib.Path.touch": Payload(Path.touch, marker),
        "runpy.run_path": Payload(runpy.run_path, str(marker)),
        "torch.load": Payload(torch.load, str(marker)),
    }


@pytest.mark.parametrize("name", list(payloads(Path("x"))))
def test_code_running_pickle_is_refused(tmp_path, name):
    marker = tmp_path / "marker"
    for where, obj in {"root": payloads(marker)[name], "in_state": {"ema": payloads(marker)[name]}}.items():
        path = tmp_path / f"{where}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(NVlabsError, match="refusing global") as exc:
            load_nvlabs(path)
        assert str(path) in str(exc.value)
        assert not marker.exists()


def test_payload_control_runs_under_plain_pickle(tmp_path):
    """The payloads are live: plain pickle.load runs them (so the refusal above is meaningful)."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(payloads(marker)["pathlib.Path.touch"]))
    assert marker.exists()


def test_payload_inside_storage_blob_is_refused(tmp_path):
    """torch.storage._load_from_bytes blobs are read with weights_only=True, not plain torch.load."""
    marker = tmp_path / "marker"
    blob = pickle.dumps(payloads(marker)["pathlib.Path.touch"], protocol=2)
    path = tmp_path / "blob.pkl"
    path.write_bytes(pickle.dumps({"ema": Payload(torch.storage._load_from_bytes, blob)}, protocol=4))
    with pytest.raises(NVlabsError, match="weights_only"):
        unpickle(path)
    assert not marker.exists()


def marker_source(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('executed')\nraise RuntimeError('embedded source executed')\n"


def test_embedded_source_is_live_but_never_executed(tmp_path):
    marker = tmp_path / "marker"
    src = marker_source(marker)
    # Control: the source does create the marker when run.
    (tmp_path / "src.py").write_text(src)
    with pytest.raises(RuntimeError):
        runpy.run_path(str(tmp_path / "src.py"))
    assert marker.exists()
    marker.unlink()
    den = our_denoiser("ddpmpp", 0, "edm")
    # Loading succeeds without running it ...
    load_nvlabs(write_snapshot(tmp_path, den, "ddpmpp", 0, src=src))
    assert not marker.exists()
    # ... and a refused snapshot (unknown class) does not run it either.
    with pytest.raises(NVlabsError, match="EvilPrecond"):
        load_nvlabs(write_snapshot(tmp_path, den, "ddpmpp", 0, src=src, name="evil.pkl", precond_class="EvilPrecond"))
    assert not marker.exists()


def test_an_iddpm_snapshot_reads_its_constants_and_checks_its_noise_levels(tmp_path):
    """iDDPMPrecond: our iddpm kind and schedule with its M, C_1, C_2; its stored levels u must be theirs."""
    den = our_denoiser("adm_iddpm", 0, "iddpm")
    snap = read_nvlabs(write_snapshot(tmp_path, den, "adm_iddpm", 0))
    assert snap.denoiser["precond"] == dict(kind="iddpm", sigma_data=0.5, M=1000, C_1=0.002, C_2=0.01)
    assert snap.schedule == dict(name="iddpm", M=1000, C_1=0.002, C_2=0.01)
    assert snap.denoiser["network"]["out_channels"] == 6 and "u" not in snap.state_dict
    other = iddpm_buffer(M=1000, C_1=0.002, C_2=0.02)
    with pytest.raises(NVlabsError, match="ema.u differs from iDDPM's noise levels for M=1000, C_1=0.002, C_2=0.01"):
        read_nvlabs(write_snapshot(tmp_path, den, "adm_iddpm", 0, name="other.pkl", levels=other))
    with pytest.raises(NVlabsError, match=r"ema.u \(iDDPM's noise levels\) is \[11\], expected \[1001\]"):
        read_nvlabs(write_snapshot(tmp_path, den, "adm_iddpm", 0, name="short.pkl", levels=other[:11]))


def test_refuses_unsupported_snapshots(tmp_path):
    den = our_denoiser("ddpmpp", 0, "vp")
    with pytest.raises(NVlabsError, match="'ema' is a FooPrecond; supported: EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond"):
        load_nvlabs(write_snapshot(tmp_path, den, "ddpmpp", 0, precond_class="FooPrecond"))
    with pytest.raises(NVlabsError, match="UNet2DModel"):
        load_nvlabs(write_snapshot(tmp_path, den, "ddpmpp", 0, name="m.pkl", model_class="UNet2DModel"))


def test_clear_errors_for_foreign_files(tmp_path):
    den = our_denoiser("ddpmpp", 0, "edm")
    data = snapshot_bytes(den, "ddpmpp", 0)
    cases = {
        "truncated.pkl": (data[: len(data) // 2], "ends early|not a loadable"),
        "text.pkl": (b"hello, this is not a pickle", "not a loadable"),
        "empty.pkl": (b"", "empty"),
        "list.pkl": (pickle.dumps([1, 2, 3]), "expected a dict with an 'ema'.*list"),
        "noema.pkl": (pickle.dumps({"G_ema": 1, "D": 2}), "found \\['D', 'G_ema'\\]"),
        "plainema.pkl": (pickle.dumps({"ema": {"weight": 1}}), "'ema' is a dict"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(NVlabsError, match=message):
            load_nvlabs(path)
    zipped = tmp_path / "ours.pt"
    torch.save({"ema": {}}, zipped)
    with pytest.raises(NVlabsError, match="zip archive"):
        load_nvlabs(zipped)
    with pytest.raises(CheckpointError, match="no such file"):  # NVlabsError is a CheckpointError
        load_nvlabs(tmp_path / "missing.pkl")


def test_numpy_scalars_decode_to_python_numbers(tmp_path):
    values = [np.float64(math.sqrt(0.5)), np.float32(0.25), np.int64(-7), np.bool_(True), np.array([1.5], ">f8")[0]]
    path = tmp_path / "np.pkl"
    path.write_bytes(pickle.dumps(values, protocol=4))
    got = unpickle(path)
    assert got == [float(v) if not isinstance(v, np.bool_) else bool(v) for v in values]
    assert all(type(g) in (float, int, bool) for g in got)
    path.write_bytes(pickle.dumps([np.array([1.0, 2.0]), np.float32([[3], [4]])], protocol=4))  # inert byte records
    assert [array_values(a) for a in unpickle(path)] == [[1.0, 2.0], [3.0, 4.0]]
    path.write_bytes(pickle.dumps([np.array([None, 1], dtype=object)], protocol=4))  # objects: not numbers
    with pytest.raises(NVlabsError, match="not a numeric scalar type"):
        unpickle(path)


# --------------------------------------------------------------------------------------
# Parameter names: the reference's state_dict, generated from its module naming rules.


class RefKeys:
    """Reference state_dict {name: shape} from the naming rules of NVlabs/edm training/networks.py.

    Linear: weight [out, in], bias [out] (optional); Conv2d: weight [out, in, k, k] and bias
    (kernel > 0), resample_filter [1, 1, n, n] (up or down); GroupNorm: weight, bias;
    UNetBlock: norm0 conv0 affine norm1 conv1 [skip] [norm2 qkv proj].
    """

    def __init__(self) -> None:
        self.keys: dict[str, tuple[int, ...]] = {}

    def linear(self, name, cin, cout, bias=True):
        self.keys[f"{name}.weight"] = (cout, cin)
        if bias:
            self.keys[f"{name}.bias"] = (cout,)

    def conv(self, name, cin, cout, kernel, resample=0):
        if kernel:
            self.keys[f"{name}.weight"] = (cout, cin, kernel, kernel)
            self.keys[f"{name}.bias"] = (cout,)
        if resample:
            self.keys[f"{name}.resample_filter"] = (1, 1, resample, resample)

    def norm(self, name, c):
        self.keys[f"{name}.weight"] = (c,)
        self.keys[f"{name}.bias"] = (c,)

    def block(self, name, cin, cout, emb, *, taps, up=False, down=False, heads=0, adaptive, resample_proj):
        rs = taps if up or down else 0
        self.norm(f"{name}.norm0", cin)
        self.conv(f"{name}.conv0", cin, cout, 3, rs)
        self.linear(f"{name}.affine", emb, cout * (2 if adaptive else 1))
        self.norm(f"{name}.norm1", cout)
        self.conv(f"{name}.conv1", cout, cout, 3)
        if cout != cin or up or down:
            self.conv(f"{name}.skip", cin, cout, 1 if resample_proj or cout != cin else 0, rs)
        if heads:
            self.norm(f"{name}.norm2", cout)
            self.conv(f"{name}.qkv", cout, 3 * cout, 1)
            self.conv(f"{name}.proj", cout, cout, 1)


def song_unet_keys(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels, channel_mult,
                   channel_mult_emb, num_blocks, attn_resolutions, embedding_type, channel_mult_noise,
                   encoder_type, decoder_type, resample_filter, **_):
    r, taps = RefKeys(), len(resample_filter)
    emb, noise = model_channels * channel_mult_emb, model_channels * channel_mult_noise
    block = dict(emb=emb, taps=taps, adaptive=False, resample_proj=True)
    if embedding_type == "fourier":
        r.keys["map_noise.freqs"] = (noise // 2,)
    if label_dim:
        r.linear("map_label", label_dim, noise)
    if augment_dim:
        r.linear("map_augment", augment_dim, noise, bias=False)
    r.linear("map_layer0", noise, emb)
    r.linear("map_layer1", emb, emb)
    cout = caux = in_channels
    skips = []
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            r.conv(f"enc.{res}x{res}_conv", cout, model_channels, 3)
            cout = model_channels
        else:
            r.block(f"enc.{res}x{res}_down", cout, cout, down=True, **block)
            if encoder_type == "skip":
                r.conv(f"enc.{res}x{res}_aux_down", caux, caux, 0, taps)
                r.conv(f"enc.{res}x{res}_aux_skip", caux, cout, 1)
            if encoder_type == "residual":
                r.conv(f"enc.{res}x{res}_aux_residual", caux, cout, 3, taps)
                caux = cout
        skips.append(cout)
        for i in range(num_blocks):
            cin, cout = cout, model_channels * mult
            r.block(f"enc.{res}x{res}_block{i}", cin, cout, heads=int(res in attn_resolutions), **block)
            skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            r.block(f"dec.{res}x{res}_in0", cout, cout, heads=1, **block)
            r.block(f"dec.{res}x{res}_in1", cout, cout, **block)
        else:
            r.block(f"dec.{res}x{res}_up", cout, cout, up=True, **block)
        for i in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            heads = int(i == num_blocks and res in attn_resolutions)
            r.block(f"dec.{res}x{res}_block{i}", cin, cout, heads=heads, **block)
        if decoder_type == "skip" or level == 0:
            if decoder_type == "skip" and level < len(channel_mult) - 1:
                r.conv(f"dec.{res}x{res}_aux_up", out_channels, out_channels, 0, taps)
            r.norm(f"dec.{res}x{res}_aux_norm", cout)
            r.conv(f"dec.{res}x{res}_aux_conv", cout, out_channels, 3)
    return r.keys


def dhariwal_unet_keys(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels, channel_mult,
                       channel_mult_emb, num_blocks, attn_resolutions, **_):
    r, emb = RefKeys(), model_channels * channel_mult_emb
    block = dict(emb=emb, taps=2, adaptive=True, resample_proj=False)
    if augment_dim:
        r.linear("map_augment", augment_dim, model_channels, bias=False)
    r.linear("map_layer0", model_channels, emb)
    r.linear("map_layer1", emb, emb)
    if label_dim:
        r.linear("map_label", label_dim, emb, bias=False)
    cout = in_channels
    skips = []
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level == 0:
            r.conv(f"enc.{res}x{res}_conv", cout, model_channels * mult, 3)
            cout = model_channels * mult
        else:
            r.block(f"enc.{res}x{res}_down", cout, cout, down=True, **block)
        skips.append(cout)
        for i in range(num_blocks):
            cin, cout = cout, model_channels * mult
            r.block(f"enc.{res}x{res}_block{i}", cin, cout, heads=(cout // 64) * (res in attn_resolutions), **block)
            skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
        res = img_resolution >> level
        if level == len(channel_mult) - 1:
            r.block(f"dec.{res}x{res}_in0", cout, cout, heads=cout // 64, **block)
            r.block(f"dec.{res}x{res}_in1", cout, cout, **block)
        else:
            r.block(f"dec.{res}x{res}_up", cout, cout, up=True, **block)
        for i in range(num_blocks + 1):
            cin, cout = cout + skips.pop(), model_channels * mult
            r.block(f"dec.{res}x{res}_block{i}", cin, cout, heads=(cout // 64) * (res in attn_resolutions), **block)
    r.norm("out_norm", cout)
    r.conv("out_conv", cout, out_channels, 3)
    return r.keys


@pytest.mark.parametrize("label_dim", [0, 10])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_reference_parameter_names_map_to_ours(arch, label_dim):
    kw = ARCHS[arch] | dict(label_dim=label_dim)
    rules = song_unet_keys if MODEL_CLASS[arch] == "SongUNet" else dhariwal_unet_keys
    reference = {f"model.{k}": torch.empty(shape) for k, shape in rules(**kw).items()}
    ours = {k: tuple(v.shape) for k, v in our_denoiser(arch, label_dim, "edm").state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in convert_state_dict(reference).items()}
    assert converted == ours
    if MODEL_CLASS[arch] == "DhariwalUNet":  # the rules exercise attention and label paths
        assert any(k.endswith(".qkv.weight") for k in reference)
    assert any("map_label" in k for k in reference) == bool(label_dim)


def test_convert_state_dict_rejects_foreign_entries():
    with pytest.raises(NVlabsError, match="'u'"):
        convert_state_dict({"u": torch.zeros(3), "model.x": torch.zeros(1)})


# --------------------------------------------------------------------------------------
# Against the real reference code (run with --nvlabs-repo PATH; skipped otherwise).


@pytest.fixture
def nvlabs_reference(request, monkeypatch):
    reference_repo(request, monkeypatch, "--nvlabs-repo", "NVlabs/edm")
    networks_mod = pytest.importorskip("training.networks")
    loss_mod = pytest.importorskip("training.loss")
    augment_mod = pytest.importorskip("training.augment")
    return networks_mod, loss_mod, augment_mod


def reference_snapshot(reference, arch: str, label_dim: int, kind: str, tmp_path: Path):
    """A real reference network with random weights, pickled as training_loop.py does."""
    ref_networks, ref_loss, ref_augment = reference
    kw = ARCHS[arch]
    model_kwargs = {k: v for k, v in kw.items() if k not in ("img_resolution", "in_channels", "out_channels")}
    torch.manual_seed(0)
    net = getattr(ref_networks, PRECOND_CLASS[kind])(
        img_resolution=kw["img_resolution"], img_channels=kw["in_channels"], label_dim=label_dim, use_fp16=False,
        model_type=MODEL_CLASS[arch], **PRECOND_KW[kind], **model_kwargs,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    loss_fn = {"edm": ref_loss.EDMLoss, "vp": ref_loss.VPLoss, "ve": ref_loss.VELoss, "iddpm": ref_loss.EDMLoss}[kind]()
    augment_pipe = ref_augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1) if kw["augment_dim"] else None
    data = dict(ema=copy.deepcopy(net).eval().requires_grad_(False), loss_fn=loss_fn, augment_pipe=augment_pipe,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip"))
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
    path = tmp_path / "network-snapshot-000000.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return data["ema"], path


REFERENCE_CASES = [(a, l, k) for a in ARCHS if a != "adm_iddpm" for l in (0, 10) for k in ("edm", "vp", "ve")]
REFERENCE_CASES += [("adm_iddpm", l, "iddpm") for l in (0, 10)]


@pytest.mark.parametrize("arch,label_dim,kind", REFERENCE_CASES)
def test_matches_real_reference(nvlabs_reference, tmp_path, arch, label_dim, kind):
    ref, path = reference_snapshot(nvlabs_reference, arch, label_dim, kind, tmp_path)
    ours = load_nvlabs(path)
    inp = inputs(arch, label_dim, kind)
    for labels in (inp["labels"], None):
        expected = run(ref, inp["x"], inp["sigma"], labels, inp["augment"])
        assert rel_err(run(ours, inp["x"], inp["sigma"], labels, inp["augment"]), expected) < 1e-5


@pytest.mark.parametrize("num_steps", [6, 18])
def test_iddpm_snapshot_samples_as_the_reference_edm_sampler(nvlabs_reference, tmp_path, num_steps):
    """NVlabs' generate.edm_sampler at its defaults (σ_max 80, σ_min 0.002 clamped to u_{M−1}, karras ρ = 7, rounded
    to the levels) on its iDDPMPrecond, and our heun on the loaded model with its iddpm schedule (the same defaults),
    discretization karras: the same images (measured 1.2e-6 and 1.0e-6 relative, the reference's float32 level table
    against our float64 one)."""
    generate = pytest.importorskip("generate")
    ref, path = reference_snapshot(nvlabs_reference, "adm_iddpm", 10, "iddpm", tmp_path)
    ours, info = load_model(path)
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(4, 3, 8, 8, generator=gen)
    labels = torch.eye(10)[torch.randint(10, (4,), generator=gen)]
    sched = info.schedule
    with torch.no_grad():
        expected = generate.edm_sampler(ref, latents.double(), labels, num_steps=num_steps)
        got = edm.sample(ours, latents.double(), sched, num_steps=num_steps, solver="heun", class_labels=labels,
                         discretization="karras")
    assert rel_err(got.float(), expected.float()) < 1e-5


# --------------------------------------------------------------------------------------
# Augmentation: the reference's AugmentPipe.


def test_augmentation_draws_and_pixel_moves_equal_the_reference_augment_pipe(nvlabs_reference, monkeypatch):
    """EDM's recipe (xflip=1e8, yflip, scale, rotate_frac, aniso, translate_frac) with the reference's global RNG and
    our generator seeded alike: the same 9 labels, bit for bit. An integer translation (the reference's draws fixed
    at whole pixels) moves the same pixels, borders included: its reflect padding is ours (measured 1.2e-6)."""
    from edm.data.augment import AugmentConfig, draw_params, warp

    AugmentPipe = nvlabs_reference[2].AugmentPipe
    images = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        torch.manual_seed(seed)
        _, labels = AugmentPipe(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)(images)
        assert torch.equal(draw_params(AugmentConfig(p=0.5), 64, torch.Generator().manual_seed(seed)).labels(), labels)
    for tx, ty in [(2, -1), (-4, 5)]:
        with monkeypatch.context() as patch:  # the reference's w = randn([2, N]) and its firing draw rand([1, N])
            patch.setattr(torch, "randn", lambda shape, **kw: torch.tensor([[float(tx)] * 64, [float(ty)] * 64]))
            patch.setattr(torch, "rand", lambda shape, **kw: torch.zeros(shape))
            expected, _ = AugmentPipe(p=1, translate_frac=1, translate_frac_std=1 / 16)(images)
        got = warp(images, torch.eye(2).expand(64, 2, 2), torch.tensor([[float(tx), float(ty)]]).expand(64, 2))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# The data: a resized data set holds the pixels of the reference's dataset_tool.py.


def _dataset_tool(repo: str, source: Path, dest: Path, *args: str) -> list[np.ndarray]:
    """Run the reference's dataset_tool.py; the images of the zip it writes, in its order."""
    import zipfile

    from PIL import Image

    subprocess.run([sys.executable, str(Path(repo) / "dataset_tool.py"), f"--source={source}", f"--dest={dest}", *args],
                   check=True, capture_output=True)
    with zipfile.ZipFile(dest) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".png"))
        return [np.asarray(Image.open(io.BytesIO(z.read(n)))) for n in names]


def test_resized_data_sets_equal_the_reference_dataset_tool(request, tmp_path):
    """dataset_tool.py --resolution=16x16 of 28x28 grayscale images (its scale), and --transform=center-crop of
    21x28 RGB images (an odd offset): our folder and tensor data sets hold the same pixels, bit for bit."""
    from PIL import Image

    from edm.data import ImageFolderDataset, load_mnist

    repo = request.config.getoption("--nvlabs-repo")
    if not repo:
        pytest.skip("needs --nvlabs-repo PATH (an NVlabs/edm checkout)")
    rng = np.random.default_rng(0)
    blobs = np.kron(rng.normal(size=(8, 8, 8)), np.ones((4, 4)))[:, :28, :28]
    gray = np.clip(blobs * 160 + 60, 0, 255).astype(np.uint8)
    (tmp_path / "gray").mkdir()
    for k, image in enumerate(gray):
        Image.fromarray(image).save(tmp_path / f"gray/{k}.png")
    reference = np.stack(_dataset_tool(repo, tmp_path / "gray", tmp_path / "gray.zip", "--resolution=16x16"))
    ours = ImageFolderDataset(tmp_path / "gray", resolution=16)
    np.testing.assert_array_equal(np.stack([ours[k][0][0].numpy() for k in range(len(ours))]), reference)
    idx = tmp_path / "idx"
    idx.mkdir()
    for name, array in (("train-images-idx3-ubyte", gray), ("train-labels-idx1-ubyte", np.zeros(8, np.uint8))):
        (idx / name).write_bytes(bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
                                 + array.tobytes())
    np.testing.assert_array_equal(load_mnist(idx, resolution=16).images[:, 0].numpy(), reference)
    (tmp_path / "rgb").mkdir()
    for k in range(4):
        Image.fromarray(np.clip(rng.normal(size=(21, 28, 3)) * 60 + 128, 0, 255).astype(np.uint8)).save(
            tmp_path / f"rgb/{k}.png")
    reference = np.stack(_dataset_tool(repo, tmp_path / "rgb", tmp_path / "rgb.zip", "--resolution=16x16",
                                       "--transform=center-crop"))
    ours = ImageFolderDataset(tmp_path / "rgb", resolution=16)
    np.testing.assert_array_equal(np.stack([ours[k][0].permute(1, 2, 0).numpy() for k in range(4)]), reference)


# --------------------------------------------------------------------------------------
# The training loop against the reference's: same weights, batches, σ and n -> same weights and EMA.

LOOP = dict(batch=8, steps=20, lr=2e-3, betas=(0.9, 0.99), eps=1e-8, rampup_kimg=0.05, halflife_kimg=500.0,
            rampup_ratio=0.05)
LOOP_NET = dict(model_channels=16, channel_mult=[1, 2], channel_mult_emb=4, num_blocks=1, attn_resolutions=[8],
                dropout=0.0, label_dropout=0.0, augment_dim=0, embedding_type="positional", channel_mult_noise=1,
                encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])


def reference_draws(kind: str, images: torch.Tensor, seed: int, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """The σ [B] and n that the reference loss draws from the global RNG after manual_seed(seed)."""
    torch.manual_seed(seed)
    if kind == "edm":  # EDMLoss: ln σ = P_std·z + P_mean, then n
        sigma = (torch.randn([images.shape[0], 1, 1, 1]) * 1.2 - 1.2).exp()
    else:  # VPLoss: t = 1 + u·(ε_t − 1), σ = σ_VP(t), then n
        sigma = schedule.sigma(1 + torch.rand([images.shape[0], 1, 1, 1]) * (1e-5 - 1))
    return sigma.flatten(), torch.randn_like(images)


@pytest.mark.parametrize("kind", ["edm", "vp"])
def test_training_loop_equals_reference_loop(nvlabs_reference, kind):
    """N steps of edm.training.step.train_step + edm.training.ema.update_ema (with learning_rate, ema_beta and
    make_optimizer, as edm-train runs them) from the reference's weights, on the same batches,
    σ and n, end at the reference loop's weights and EMA to float32 round-off: the distance
    between the two trajectories stays below 1e-3 of the distance travelled (measured ~2e-5;
    a per-pixel objective under the same eps gives 0.14). Weights start random rather than
    zero-initialised: with exact zeros, Adam's first steps follow the sign of round-off."""
    from accelerate import Accelerator

    from edm.training.ema import ema_beta, update_ema
    from edm.training.step import learning_rate, make_optimizer, train_step

    ref_networks, ref_loss, _ = nvlabs_reference
    B, R = LOOP["batch"], 16
    torch.manual_seed(0)
    ref_class = {"edm": ref_networks.EDMPrecond, "vp": ref_networks.VPPrecond}[kind]
    ref = ref_class(img_resolution=R, img_channels=1, label_dim=0, use_fp16=False, model_type="SongUNet", **LOOP_NET)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ref.train()
    ours = edm.Precond(networks.SongUNet(img_resolution=R, in_channels=1, out_channels=1, label_dim=0, **LOOP_NET),
                       kind=kind)
    ours.load_state_dict(convert_state_dict(ref.state_dict()))
    ours.train()
    theta0 = [p.detach().clone() for p in ref.parameters()]
    ref_ema, our_ema = (copy.deepcopy(m).eval().requires_grad_(False) for m in (ref, ours))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LOOP["lr"], betas=LOOP["betas"], eps=LOOP["eps"])
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(ours, make_optimizer(ours.parameters(), LOOP["lr"], LOOP["betas"], LOOP["eps"],
                                                          torch.device("cpu")))
    schedule = edm.schedules.VP() if kind == "vp" else edm.schedules.EDM()
    loss = edm.Loss(schedule)
    reference_loss = {"edm": ref_loss.EDMLoss, "vp": ref_loss.VPLoss}[kind]()
    data = torch.Generator().manual_seed(2)
    cur_nimg = 0
    for step in range(LOOP["steps"]):
        images = torch.rand([B, 1, R, R], generator=data) * 2 - 1
        sigma, noise = reference_draws(kind, images, 100 + step, schedule)
        torch.manual_seed(100 + step)
        nvlabs_loop.reference_iteration(ref, ref_ema, ref_opt, reference_loss, images, cur_nimg, lr=LOOP["lr"],
                                        rampup_kimg=LOOP["rampup_kimg"], halflife_kimg=LOOP["halflife_kimg"],
                                        rampup_ratio=LOOP["rampup_ratio"])

        def injected(den, y, labels, generator=None):
            return loss(den, y, labels, sigma=sigma, noise=noise)

        lr = learning_rate(cur_nimg, LOOP["lr"], LOOP["rampup_kimg"])
        train_step(model, injected, opt, [(images, None)], accelerator, None, lr)
        update_ema(our_ema, ours, ema_beta(cur_nimg, B, LOOP["halflife_kimg"], LOOP["rampup_ratio"]))
        cur_nimg += B

    def distance(a, b):
        return math.sqrt(sum(float((p - q).double().pow(2).sum()) for p, q in zip(a, b)))

    travelled = distance(ref.parameters(), theta0)
    assert travelled > 0
    assert distance(ours.parameters(), ref.parameters()) < 1e-3 * travelled
    assert distance(our_ema.parameters(), ref_ema.parameters()) < 1e-3 * distance(ref_ema.parameters(), theta0)


@pytest.mark.parametrize("cond", [[], ["dataset.cond=true"]], ids=["unconditional", "class-conditional"])
def test_reference_loop_script_starts_from_edm_trains_weights_and_writes_an_edm_checkpoint(
        nvlabs_reference, request, tmp_path, tiny_train, cond):
    """scripts/nvlabs_loop.py with edm-train's overrides: after its first iteration (lr 0 at n = 0)
    the raw weights equal edm-train's after its first step bit for bit, so both start from the same
    network (with labels: its label map too); after four the EMA has moved, and edm's loader reads the
    checkpoint it wrote."""
    from edm.training.loop import train

    repo = request.config.getoption("--nvlabs-repo")
    tiny_train = [*tiny_train, *cond]
    one_step = [*tiny_train, "total_kimg=0.008", "dataset.num_workers=0"]
    ref_path = nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "ref1"), *one_step])
    ours = train(nvlabs_loop.compose(one_step, tmp_path / "ours1"))
    ref_state, our_state = (torch.load(p, weights_only=True) for p in (ref_path, ours.checkpoint))
    assert ref_state["model"].keys() == our_state["model"].keys()
    assert all(torch.equal(ref_state["model"][k], our_state["model"][k]) for k in our_state["model"])
    four = nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "ref4"), *tiny_train,
                             "dataset.num_workers=0"])
    denoiser, state = load_denoiser(four)
    assert state["step"] == 4 and "NVlabs/edm" in state["trained_by"]
    assert denoiser.net.label_dim == (10 if cond else 0)
    assert not all(torch.equal(state["ema"][k], ref_state["ema"][k]) for k in state["ema"])
    with pytest.raises(SystemExit, match="already holds"):
        nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "ref4"), *tiny_train])


@pytest.mark.parametrize("draws", [[], ["--edm-draws", "order,noise"]], ids=["own-draws", "edm-train-draws"])
def test_reference_loop_cut_and_resumed_ends_where_the_uncut_run_ends(nvlabs_reference, request, tmp_path, tiny_train,
                                                                      draws):
    """The loop writes a checkpoint every checkpoint_every steps; a run cut after step 2 and continued with --resume
    ends at the uncut run's weights, EMA and Adam state bit for bit (its global RNG, so σ, n and dropout, and its
    data order pick up where they stopped); a resume with other settings or other --edm-draws is refused, naming
    them."""
    repo = request.config.getoption("--nvlabs-repo")
    run = [*tiny_train, "total_kimg=0.048", "network.dropout=0.1", "keep_checkpoints=0", "dataset.num_workers=0"]
    uncut = torch.load(nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "run"), *draws, *run]),
                       weights_only=True)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2, 4, 6]
    for step in (4, 6):
        checkpoint_path(tmp_path / "run", step).unlink()
    with pytest.raises(SystemExit, match="pass --resume"):
        nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "run"), *draws, *run])
    with pytest.raises(SystemExit, match="lr: run 0.002, now 0.01"):
        nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "run"), "--resume", *draws, *run, "lr=0.01"])
    run_draws, other_draws = ("'noise,order'", "''") if draws else ("''", "'noise,order'")
    with pytest.raises(SystemExit, match=f"--edm-draws: run {run_draws}, now {other_draws}"):
        nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "run"), "--resume",
                          *([] if draws else ["--edm-draws", "order,noise"]), *run])
    resumed = torch.load(nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "run"), "--resume", *draws,
                                           *run]), weights_only=True)
    assert resumed["step"] == 6 and not all(torch.equal(uncut["model"][k], resumed_k)
                                            for k, resumed_k in torch.load(checkpoint_path(tmp_path / "run", 2),
                                                                           weights_only=True)["model"].items())
    for key in ("model", "ema"):
        assert all(torch.equal(uncut[key][k], resumed[key][k]) for k in uncut[key])
    optimizer = uncut["reference_loop"]["optimizer"]["state"], resumed["reference_loop"]["optimizer"]["state"]
    assert all(torch.equal(a[name], b[name]) for a, b in zip(*(s.values() for s in optimizer)) for name in a)


@pytest.mark.parametrize("cond", [[], ["dataset.cond=true"]], ids=["unconditional", "class-conditional"])
def test_reference_loop_on_edm_trains_draws_ends_where_edm_train_ends(nvlabs_reference, request, tmp_path, tiny_train,
                                                                     cond):
    """--edm-draws order,noise: the reference loop on edm-train's data order, σ and n (and labels) ends 12 steps
    later at edm-train's weights to float32 round-off (relative distance < 1e-3, about 1e-4 measured, against > 0.1
    on its own draws), which is how docs/nvlabs.md tells the loops' arithmetic from their random streams."""
    from edm.training.loop import train

    repo = request.config.getoption("--nvlabs-repo")
    run = [*tiny_train, *cond, "total_kimg=0.096", "lr_rampup_kimg=0.02", "dataset.num_workers=0"]
    ours = train(nvlabs_loop.compose(run, tmp_path / "ours")).checkpoint
    same = nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "same"), "--edm-draws", "order,noise", *run])
    own = nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "own"), *run])
    assert max(nvlabs_loop.compare(same, ours).values()) < 1e-3
    assert min(nvlabs_loop.compare(own, ours).values()) > 0.1
    with pytest.raises(SystemExit, match="--edm-draws takes order, noise"):
        nvlabs_loop.main(["--nvlabs-repo", repo, "--out", str(tmp_path / "x"), "--edm-draws", "labels", *run])


def test_reference_loop_resume_refuses_a_resized_run_that_does_not_name_its_filter(tmp_path, tiny_train):
    """--resume continues a checkpoint of the loop whose config trains what this one does; a resized run whose record
    names no dataset.resample was trained on other pixels than any filter's and is refused, naming the setting, as is
    one of another filter or without the loop's state (edm-train wrote it)."""
    from edm.files import to_container

    cfg = nvlabs_loop.compose([*tiny_train, "dataset.resolution=16"], tmp_path)
    config = to_container(cfg)
    path = tmp_path / "checkpoint.pt"

    def resume_from(dataset: dict, loop: bool = True) -> dict:
        state = {"config": config | {"dataset": dataset}} | ({nvlabs_loop.LOOP_STATE: {"edm_draws": []}} if loop else {})
        torch.save(state, path)
        return nvlabs_loop.continued_state(path, cfg, set())

    assert resume_from(config["dataset"])["config"] == config
    with pytest.raises(SystemExit, match=r"dataset.resample: run 'bicubic', now 'lanczos'"):
        resume_from(config["dataset"] | {"resample": "bicubic"})
    with pytest.raises(SystemExit, match=r"dataset.resample: run 'unrecorded \(bilinear, or bicubic for folders\)', "
                                         r"now 'lanczos'"):
        resume_from({k: v for k, v in config["dataset"].items() if k != "resample"})
    with pytest.raises(SystemExit, match="holds no state of this loop"):
        resume_from(config["dataset"], loop=False)


@pytest.mark.parametrize("override, named", [
    ("schedule=ve", "schedule"), ("network=adm", "network"), ("batch_per_device=4", "batch_per_device"),
    ("augment.p=0.1", "augment.p"), ("grad_clip=1", "grad_clip"), ("loss.kind=vp", "loss.kind"),
    ("ema_sigma_rel=[0.1]", "ema_sigma_rel"), ("init=runs/teacher", "init"), ("objective=ect", "objective"),
])
def test_reference_loop_script_refuses_what_it_does_not_implement(tmp_path, tiny_train, override, named):
    from edm.data import build_dataset
    from edm.training.build import resolve

    cfg = nvlabs_loop.compose([*tiny_train, override], tmp_path)
    resolved = resolve(cfg)
    with pytest.raises(SystemExit, match=f"does not implement {re.escape(named)}"):
        nvlabs_loop.check_supported(cfg, resolved.schedule, resolved.denoiser_spec(cfg, build_dataset(cfg.dataset)),
                                    resolved.loss)


def test_reference_loop_script_checks_its_settings_and_its_folder_before_the_reference_is_imported(
        tmp_path, tiny_train, capsys):
    """As edm-train: a bad value or an unknown key ends in one line naming it, and a folder that a training owns is
    refused (no reference repo is needed to get there)."""
    from edm.files import FolderLock

    argv = ["--nvlabs-repo", str(tmp_path / "no-repo"), "--out", str(tmp_path / "out"), *tiny_train]
    for extra, message in ((["batch_size=0"], "batch_size"), (["lr_x=1"], "unknown key lr_x: not an option")):
        with pytest.raises(SystemExit):
            nvlabs_loop.main([*argv, *extra])
        assert re.match(rf"nvlabs_loop.py: error: .*{re.escape(message)}", capsys.readouterr().err)
    with FolderLock(tmp_path / "out"):  # an edm-train run of that folder
        with pytest.raises(SystemExit):
            nvlabs_loop.main(argv)
        assert "nvlabs_loop.py: error: --out" in (err := capsys.readouterr().err) and "in use by a training" in err


def test_reference_loop_script_names_a_folder_that_is_no_checkout_and_a_missing_checkpoint_before_training(
        tmp_path, tiny_train, capsys, monkeypatch):
    """--nvlabs-repo without NVlabs/edm's training/ and torch_utils/ is named as such before the data set is read (not
    as "No module named 'torch_utils'"); --against a file that does not exist is refused before the run, not after."""
    def no_data(_):
        raise AssertionError("the data set was read")

    monkeypatch.setattr(nvlabs_loop, "build_dataset", no_data)
    argv = ["--out", str(tmp_path / "out"), *tiny_train]
    with pytest.raises(SystemExit):
        nvlabs_loop.main(["--nvlabs-repo", str(tmp_path), *argv])
    assert f"error: --nvlabs-repo {tmp_path} is not an NVlabs/edm checkout (it lacks training/networks.py" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        nvlabs_loop.main(["--nvlabs-repo", str(tmp_path), "--against", str(tmp_path / "ours.pt"),
                          "--out", str(tmp_path / "other"), *tiny_train])
    assert "--against" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_reference_loop_script_stopped_by_ctrl_c_names_the_rerun_that_continues(tmp_path, tiny_train, capsys,
                                                                               monkeypatch):
    """A rerun of the same command into a folder with checkpoints is refused ("pass --resume"): Ctrl-C's advice is
    the --resume that continues the run."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nvlabs_loop, "train_reference", interrupted)
    with pytest.raises(SystemExit) as stop:
        nvlabs_loop.main(["--nvlabs-repo", str(tmp_path), "--out", str(tmp_path / "out"), *tiny_train])
    assert stop.value.code == 130
    assert "nvlabs_loop.py: stopped; rerun with --resume" in capsys.readouterr().err


def test_reference_iteration_without_an_ema_ramp_up_uses_the_half_life_alone():
    """ema_rampup_ratio None (edm-train takes it): β = 0.5^(batch / half-life), as the reference's training_loop.py."""
    net = torch.nn.Linear(1, 1, bias=False)
    ema = copy.deepcopy(net).requires_grad_(False)
    before = ema.weight.detach().clone()
    nvlabs_loop.reference_iteration(net, ema, torch.optim.Adam(net.parameters()), lambda net, images, labels:
                                    net(images).pow(2), torch.ones(4, 1), 100, lr=0.1, rampup_kimg=0,
                                    halflife_kimg=0.5, rampup_ratio=None)
    assert not torch.equal(net.weight, before)
    torch.testing.assert_close(ema.weight, net.weight.detach().lerp(before, 0.5 ** (4 / 500)))


# --------------------------------------------------------------------------------------
# NVlabs/edm2 snapshots: Precond(UNet) with the uncertainty head, float16 weights, an encoder.

EDM2_UNET = dict(img_resolution=16, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                 dropout=0.1)
EDM2_SIGMAS = [0.002, 0.3, 2.0, 80.0]


def our_edm2(channels: int, label_dim: int, seed: int = 0) -> edm.Precond:
    """Our EDM2 denoiser with every parameter random, in float16 and back (as an edm2 snapshot stores it)."""
    torch.manual_seed(seed)
    net = networks.build("edm2-tiny", in_channels=channels, label_dim=label_dim, **EDM2_UNET)
    den = edm.Precond(net, kind="edm", sigma_data=0.5, logvar_channels=16)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in den.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * (0.5 if p.ndim == 0 else 1)).half().float())
        for b in den.buffers():  # the Fourier frequencies and phases are stored in float16 too
            b.copy_(b.half().float())
    return den.eval()


def edm2_snapshot_bytes(den: edm.Precond, label_dim: int, latent: bool) -> bytes:
    """dict(encoder, dataset_kwargs, loss_fn, ema) as NVlabs/edm2's training_loop.py pickles it."""
    channels = den.net.enc["16x16_conv"].weight.shape[1] - 1
    unet_init = dict(img_resolution=16, img_channels=channels, label_dim=label_dim,
                     **{k: v for k, v in EDM2_UNET.items() if k != "img_resolution"})
    half = copy.deepcopy(den).half()
    unet = module_record(half.net, "UNet", unet_init, HARMLESS_SRC)
    shell = torch.nn.Module()
    shell.unet = half.net
    shell.logvar_fourier, shell.logvar_linear = half.logvar_fourier, half.logvar_linear
    attrs = dict(img_resolution=16, img_channels=channels, label_dim=label_dim, use_fp16=True, sigma_data=0.5)
    ema = module_record(shell, "Precond", dict(attrs, logvar_channels=16, **EDM2_UNET), HARMLESS_SRC, **attrs)
    ema.meta["state"]["_modules"]["unet"] = unet
    if latent:
        scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
        encoder = Persistent("StabilityVAEEncoder", dict(vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
                                                         bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale,
                                                         batch_size=8, _vae=None, _init_args=(), _init_kwargs={}), HARMLESS_SRC)
    else:
        encoder = Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}), HARMLESS_SRC)
    loss = Persistent("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5, _init_args=(), _init_kwargs={}), HARMLESS_SRC)
    data = dict(encoder=encoder, dataset_kwargs=dict(path="img64.zip"), loss_fn=loss, ema=ema)
    buf = io.BytesIO()
    SnapshotPickler(buf, protocol=4).dump(data)
    return buf.getvalue()


def edm2_inputs(channels: int, label_dim: int) -> tuple:
    gen = torch.Generator().manual_seed(7)
    sigma = torch.tensor(EDM2_SIGMAS)
    x = torch.randn(4, channels, 16, 16, generator=gen) * sigma.view(-1, 1, 1, 1).clamp(min=1)
    labels = torch.eye(label_dim)[torch.randint(label_dim, (4,), generator=gen)] if label_dim else None
    return x, sigma, labels


@pytest.mark.parametrize("label_dim", [0, 10])
def test_edm2_snapshot_loads_equal_denoiser_with_its_uncertainty_head(tmp_path, label_dim):
    den = our_edm2(3, label_dim)
    path = tmp_path / "network-snapshot-0000000-0.100.pkl"
    path.write_bytes(edm2_snapshot_bytes(den, label_dim, latent=False))
    snap = read_nvlabs(path)
    assert snap.denoiser["precond"] == {"kind": "edm", "sigma_data": 0.5, "logvar_channels": 16}
    assert snap.denoiser["network"]["name"] == "edm2-s" or snap.denoiser["network"]["model_channels"] == 32
    assert snap.reference["stored_dtype"] == "float16" and snap.reference["encoder"] == "StandardRGBEncoder"
    loaded, info = load_model(path)
    assert info.latent is None and info.label_dim == label_dim and info.img_shape == (3, 16, 16)
    x, sigma, labels = edm2_inputs(3, label_dim)
    with torch.no_grad():
        (d_ours, u_ours), (d_ref, u_ref) = loaded(x, sigma, labels, return_logvar=True), den(x, sigma, labels, return_logvar=True)
    assert torch.equal(d_ours, d_ref) and torch.equal(u_ours, u_ref)


def test_edm2_latent_snapshot_records_its_vae_and_needs_it_to_make_images(tmp_path):
    den = our_edm2(4, 10)
    path = tmp_path / "edm2-img512-xs-0.135.pkl"
    path.write_bytes(edm2_snapshot_bytes(den, 10, latent=True))
    loaded, info = load_model(path)
    assert info.latent["vae"] == "stabilityai/sd-vae-ft-mse" and info.latent["vae_fingerprint"] is None
    np.testing.assert_allclose(info.latent["scale"], 0.5 / np.float32([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
    with pytest.raises(ValueError, match="generates VAE latents .*stabilityai/sd-vae-ft-mse.*metric=bpd needs a pixel model"):
        info.require_pixels("metric=bpd")
    proc = subprocess.run([command("edm-sample"), f"checkpoint={path}", "num_images=1", f"vae={tmp_path / 'no-vae'}",
                           f"out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "VAE folder" in proc.stderr and "does not exist" in proc.stderr
    assert not list((tmp_path / "out").glob("*.png")) and not (tmp_path / "out" / "provenance.json").exists()
    exported = tmp_path / "folder"
    proc = subprocess.run([command("edm-convert-nvlabs"), f"pkl={path}", f"out={exported}"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load_model(exported)[1].latent == info.latent  # the model folder keeps what its samples are


@pytest.fixture
def edm2_reference(request, monkeypatch):
    reference_repo(request, monkeypatch, "--nvlabs-edm2-repo", "NVlabs/edm2")
    return pytest.importorskip("training.networks_edm2"), pytest.importorskip("training.encoders")


@pytest.mark.parametrize("label_dim", [0, 10])
def test_edm2_matches_real_reference(edm2_reference, tmp_path, label_dim):
    """A real NVlabs/edm2 Precond with random weights, pickled in float16 as its training loop does."""
    ref_networks, ref_encoders = edm2_reference
    import dnnlib

    torch.manual_seed(0)
    net = ref_networks.Precond(img_resolution=16, img_channels=3, label_dim=label_dim,
                               **{k: v for k, v in EDM2_UNET.items() if k != "img_resolution"})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim == 0 else 1))
    data = dnnlib.EasyDict(encoder=ref_encoders.StandardRGBEncoder(), dataset_kwargs={}, loss_fn=None)
    data.ema = copy.deepcopy(net).eval().requires_grad_(False).to(torch.float16)
    path = tmp_path / "network-snapshot-0000000-0.100.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    ours = load_nvlabs(path)
    ref = data.ema.float()
    x, sigma, labels = edm2_inputs(3, label_dim)
    with torch.no_grad():
        (d_ours, u_ours), (d_ref, u_ref) = ours(x, sigma, labels, return_logvar=True), ref(x, sigma, labels, return_logvar=True)
    assert rel_err(d_ours, d_ref) < 1e-5 and rel_err(u_ours, u_ref.reshape(-1)) < 1e-5


def test_ect_tunes_an_nvlabs_snapshot(tmp_path, compose_train):
    """recipe=ect init=SNAPSHOT.pkl: the snapshot (read without running its code) starts the run with its network,
    preconditioning and EMA weights."""
    from PIL import Image

    from edm.models import checkpoint as ckpt
    from edm.training.loop import train

    den = our_denoiser("adm", 0, "edm")
    pkl = write_snapshot(tmp_path, den, "adm", 0)
    folder = tmp_path / "images"
    folder.mkdir()
    gen = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(gen.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    result = train(compose_train("recipe=ect", f"init={pkl}", "dataset=folder", f"dataset.root={folder}", "dataset.num_workers=0",
                                 "sampler.num_steps=1", "total_kimg=0.016",
                                 "network.model_channels=null", "precond.sigma_data=0.6"))  # the snapshot's σ_d
    state = ckpt.load_checkpoint(result.checkpoint)
    assert state["denoiser"]["network"]["name"] == "adm" and state["denoiser"]["precond"]["kind"] == "edm"
    assert state["config"]["objective"] == "ect" and set(state["model"]) == set(den.state_dict())
