"""scripts/bench.py on CPU: the benchmark runs the real train step and sampler and reports what it measured."""

import json
import os

import pytest
import torch

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def test_cpu_benchmark_reports_measurements(bench, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--mode", "train,sample,data", "--resolution", "8", "--batch", "4",
            "--steps", "2", "--warmup", "1", "--sample-steps", "3", "--workers", "0", "--out", str(out)]
    result = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result, default=str))
    train, sample = result["train"], result["sample"]
    assert train["images_per_s"] > 0 and train["step_ms"] > 0
    assert torch.isfinite(torch.tensor(train["final_loss"]))
    assert sample["network_evaluations"] == 2 * 3 - 1  # Heun: two evaluations a step, one on the last
    assert sample["finite"]
    # Forward-only FLOPs: about a third of forward + backward (backward ≈ 2 × forward).
    assert 0.25 < sample["flops_per_image_forward"] / train["flops_per_image"] < 0.45
    assert sample["achieved_tflops"] > 0
    assert result["data"]["images_per_s"] > 0
    assert result["settings"]["network"] == "tiny"


def test_the_data_loader_is_timed_at_the_size_and_for_the_batches_asked(bench):
    """--mode data: --resolution resizes the data set (its own size without it), --steps counts the timed batches."""
    common = ["--device", "cpu", "--mode", "data", "--batch", "2", "--workers", "0"]
    resized = bench.main([*common, "--resolution", "4", "--steps", "3"])["data"]
    native = bench.main(common)["data"]
    assert resized["shape"] == [1, 4, 4] and resized["batches"] == 3
    assert native["shape"] == [1, 8, 8] and native["batches"] == 50


def test_augmented_training_steps(bench, monkeypatch):
    """--augment P: each timed and warm-up step augments its batch and feeds the labels to a
    network with augment_dim 9."""
    calls = []
    real = bench.augment

    def counting(images, cfg, generator):
        calls.append(cfg.p)
        return real(images, cfg, generator)

    monkeypatch.setattr(bench, "augment", counting)
    args = ["--device", "cpu", "--mode", "train", "--resolution", "8", "--batch", "4", "--steps", "2", "--warmup", "1",
            "--augment", "0.5"]
    result = bench.main(args)
    assert calls == [0.5] * 3 and result["settings"]["augment"] == 0.5
    plain = bench.main(args[:-2])
    assert result["train"]["parameters"] - plain["train"]["parameters"] == 9 * 32  # map_augment: 9 -> model_channels
    assert len(calls) == 3


def test_flop_count_scales_with_the_network(bench):
    """FLOPs of fwd + bwd per image grow with the width (≈ quadratically for convolutions)."""
    import edm

    def flops(width: int) -> float:
        args = bench.parse_args(["--device", "cpu", "--resolution", "8", "--batch", "2"])
        net = edm.networks.build("tiny", img_resolution=8, in_channels=1, model_channels=width)
        den = edm.Precond(net, kind="edm")
        y = torch.zeros(args.batch, 1, 8, 8)
        return bench.train_flops(den, edm.Loss(edm.schedules.get("edm")), y, None)

    ratio = flops(32) / flops(16)
    assert 3.0 < ratio < 4.5, ratio


def test_flops_per_image_do_not_depend_on_the_batch(bench):
    """FLOPs are counted on two images and scaled to the batch; a batch of one is counted on one."""
    one, two = (bench.main(["--device", "cpu", "--mode", "sample", "--resolution", "8", "--batch", str(b), "--steps", "1",
                            "--warmup", "0", "--sample-steps", "2"])["sample"]["flops_per_image_forward"] for b in (1, 2))
    assert one == pytest.approx(two)


def test_bad_arguments_fail_clearly(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--mode", "train,fly"])
    assert "unknown --mode ['fly']" in capsys.readouterr().err
    for bad, message in ((["--steps", "0"], "--steps 0: give 1 or more"), (["--batch", "-2"], "--batch -2: give 1")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cpu", *bad])
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def _short_run(mixed_precision: str, steps: int = 40) -> list[float]:
    """Losses of `steps` train steps of the tiny net on a fixed set of digits, same seed and weights."""
    from accelerate import Accelerator

    import edm
    from edm.data import load_digits, to_model_space
    from edm.training.step import make_optimizer, train_step

    torch.manual_seed(0)
    data = load_digits()
    y = to_model_space(torch.stack([data[i][0] for i in range(64)]))
    den = edm.Precond(edm.networks.build("tiny", img_resolution=8, in_channels=1, model_channels=16), kind="edm")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process
    acc = Accelerator(mixed_precision=mixed_precision, cpu=True)
    opt = make_optimizer(den.parameters(), 2e-3, (0.9, 0.999), 1e-8, torch.device("cpu"))
    model, opt = acc.prepare(den, opt)
    g = torch.Generator().manual_seed(1)
    loss_fn = edm.Loss(edm.schedules.get("edm"))
    return [float(train_step(model, loss_fn, opt, [(y, None)], acc, g, lr=2e-3)) for _ in range(steps)]


@pytest.mark.slow
def test_bf16_fast_path_follows_the_fp32_loss_curve():
    """Same seed, data and weights: bf16 autocast and fp32 give the same loss curve within noise."""
    fp32, bf16 = torch.tensor(_short_run("no")), torch.tensor(_short_run("bf16"))
    assert fp32[-10:].mean() < 0.8 * fp32[:5].mean()  # the run learns
    # Per-step losses are noisy (random σ); compare smoothed curves against that noise.
    noise = (fp32[1:] - fp32[:-1]).abs().mean()
    assert (fp32.cumsum(0) / torch.arange(1, 41) - bf16.cumsum(0) / torch.arange(1, 41)).abs().max() < noise


def test_bf16_samples_match_fp32_within_bf16_tolerance():
    """The sampling fast path of edm-sample and bench.py (edm.denoisers.fast_denoiser)."""
    import edm
    from edm.core.denoisers import fast_denoiser

    torch.manual_seed(0)
    den = edm.Precond(edm.networks.build("tiny", img_resolution=8, in_channels=1), kind="edm").eval()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = edm.sample(den, noise, "edm", num_steps=8)
        fast = edm.sample(fast_denoiser(den, "bf16"), noise, "edm", num_steps=8)
    assert fast.dtype == torch.float32
    rel = (fast - ref).norm() / ref.norm()
    assert 0 < rel < 3e-2, rel  # nonzero: bf16 really ran; small: within bf16 (8-bit mantissa) tolerance


def test_profile_times_each_part_of_the_step_and_writes_the_table(bench, tmp_path):
    table = tmp_path / "profile.txt"
    args = ["--device", "cpu", "--mode", "train", "--resolution", "8", "--batch", "4", "--steps", "2", "--warmup", "1",
            "--augment", "0.5", "--profile", str(table)]
    parts = bench.main(args)["train"]["breakdown_ms"]
    assert set(parts) == {"batch (augmentation)", "forward+backward", "optimizer", "ema"}
    assert all(ms > 0 for ms in parts.values())
    text = table.read_text()
    assert "forward+backward:" in text and "aten::convolution" in text
    edm2 = ["--device", "cpu", "--mode", "train", "--resolution", "8", "--batch", "4", "--steps", "2", "--warmup", "1",
            "--network", "edm2-tiny", "--profile", str(tmp_path / "edm2.txt")]
    parts = bench.main(edm2)["train"]["breakdown_ms"]  # EDM2: its forced weight normalization is a part too
    assert set(parts) == {"batch (augmentation)", "weight normalization", "forward+backward", "optimizer", "ema"}


def test_gpu_turns_wait_for_every_process_then_time_one_at_a_time(bench, tmp_path):
    """Two sharers: the first turn starts only once both are warm, and the turns never overlap."""
    import threading
    import time

    intervals, warm_at = [], []

    def sharer(delay: float) -> None:
        time.sleep(delay)  # compiling
        turns = bench.GpuTurns([str(tmp_path), "2"], torch.device("cpu"))
        warm_at.append(time.monotonic())
        with turns.turn():
            start = time.monotonic()
            time.sleep(0.2)  # timing
            intervals.append((start, time.monotonic()))

    threads = [threading.Thread(target=sharer, args=(d,)) for d in (0.0, 0.3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = sorted(intervals)
    assert a0 >= max(warm_at)  # nobody timed while the other still warmed up
    assert b0 >= a1  # one at a time


def test_gpu_turns_forget_the_marks_of_ended_processes(bench, tmp_path):
    """A mark left by an earlier session (its process gone) does not count as a warm sharer of this one."""
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"warm-{int(ended.stdout)}-0000").touch()
    (tmp_path / f"warm-{os.getpid()}-1111").touch()  # a live sharer's
    (tmp_path / "warm-tests").touch()  # scripts/gpu_report.sh's test run
    bench.GpuTurns([str(tmp_path), "3"], torch.device("cpu"))
    assert sorted(p.name for p in tmp_path.glob("warm-*")) == [f"warm-{os.getpid()}-1111", "warm-tests"]


def test_share_gpu_needs_one_mode_per_process(bench, capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--share-gpu", str(tmp_path), "2"])
    assert "one --mode per process" in capsys.readouterr().err


def test_compiled_sampling_compiles_once_before_the_timed_runs(bench, monkeypatch):
    """The compile warm-up calls the denoiser as the sampler does, so the warm-up and timed runs
    reuse its graph (a σ of another stride would compile a second graph inside the timed region)."""
    from torch._dynamo.utils import counters

    from edm.core.denoisers import fast_denoiser

    graphs = []

    def eager_compiled(den, mixed_precision, compile, channels_last):
        fast = fast_denoiser(den, mixed_precision, False, channels_last)
        return torch.compile(fast, backend="eager") if compile else fast

    def counting_sample(*args, **kwargs):
        graphs.append(counters["stats"]["unique_graphs"])
        return real_sample(*args, **kwargs)

    real_sample = bench.edm.sample
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(bench, "fast_denoiser", eager_compiled)
    monkeypatch.setattr(bench.edm, "sample", counting_sample)
    bench.main(["--device", "cpu", "--mode", "sample", "--resolution", "8", "--batch", "2", "--sample-steps", "3",
                "--compile"])
    assert graphs[0] == 0 and len(graphs) == 3  # compile warm-up, warm-up run, timed run
    assert counters["stats"]["unique_graphs"] == graphs[1] == 1


def test_gpu_report_refuses_a_folder_that_holds_an_earlier_report(tmp_path):
    """scripts/gpu_report.sh appends to OUT's results.jsonl: a second run there would mix two runs' figures."""
    import subprocess

    from conftest import REPO

    (tmp_path / "results.jsonl").write_text("{}\n")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_report.sh"), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "holds an earlier report; give a new or empty OUT" in proc.stderr
    assert (tmp_path / "results.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("bad, message", [
    (["--device", "mps"], "argument --device: invalid choice: 'mps'"),
    (["--resolution", "0"], "--resolution 0: give 1 or more"),
    (["--channels", "0"], "--channels 0: give 1 or more"),
    (["--label-dim", "-1"], "--label-dim -1: give 0 or more"),
    (["--sample-batch", "0"], "--sample-batch 0: give 1 or more"),  # not taken as "unset", the batch
    (["--workers", "-1"], "--workers -1: give 0 or more"),
    (["--augment", "1.5"], "--augment 1.5: a probability"),
    (["--augment", "-0.1"], "--augment -0.1: a probability"),
    (["--mode", ","], "unknown --mode ','"),
    (["--mode", "sample", "--profile", "p.txt"], "--profile times the parts of a training step: add train to --mode"),
    (["--mode", "train", "--share-gpu", "turns", "two"], "N is the number of sharing processes (1 or more), got 'two'"),
    (["--out", "."], "--out . is a folder"),
])
def test_settings_that_cannot_be_timed_are_refused_before_any_work(bench, capsys, bad, message):
    """Each is refused by the parser, naming the flag: none runs silently as something else, none ends in a traceback
    (or after the timed run, as an --out that cannot be written would)."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", *bad])
    assert message in capsys.readouterr().err


def test_a_network_that_cannot_be_built_ends_in_one_line(bench, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--device", "cpu", "--mode", "sample", "--network", "tiny", "--resolution", "5", "--batch", "1"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("bench.py: error: img_resolution 5 is not divisible")


def test_the_result_records_the_commit_and_versions_that_made_it(bench, tmp_path):
    """The JSON names the checkout that ran (HEAD of the git repository holding the edm package, and whether its
    tracked files had changes), and the versions of Python, torch and accelerate beside the settings; outside a git
    checkout the commit is null, not another repository's."""
    import subprocess

    import accelerate

    result = bench.main(["--device", "cpu", "--mode", "sample", "--resolution", "8", "--batch", "1", "--steps", "1",
                         "--warmup", "0", "--sample-steps", "2"])
    repo = __import__("pathlib").Path(bench.edm.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert result["commit"] == head and isinstance(result["uncommitted_changes"], bool)
    assert result["accelerate"] == accelerate.__version__ and result["python"].count(".") == 2
    assert result["torch"] == torch.__version__ and result["settings"]["sample_steps"] == 2

    changed = tmp_path / "checkout"
    subprocess.run(["git", "init", "-q", str(changed)], check=True)
    (changed / "edm").mkdir()
    (changed / "edm" / "__init__.py").write_text("")
    git = ["git", "-C", str(changed), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    clean = bench.source_commit(changed)
    site = changed / "venv" / "site-packages"  # a wheel's edm in a venv inside that checkout: not the code committed
    (site / "edm").mkdir(parents=True)
    assert bench.source_commit(site) == {"commit": None, "uncommitted_changes": None}
    (changed / "edm" / "__init__.py").write_text("x = 1\n")
    assert clean["uncommitted_changes"] is False and len(clean["commit"]) == 40
    assert bench.source_commit(changed) == {"commit": clean["commit"], "uncommitted_changes": True}
