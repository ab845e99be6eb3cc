"""scripts/side_by_side.py: arms trained on paired seeds, scored on the same samples, a table of paired
differences; reruns continue, other settings are refused. (With --nvlabs-repo, tests/test_nvlabs.py runs
the reference loop that its nvlabs arms use.)"""

from __future__ import annotations

import json
import math
import re
import shlex

import pytest
import torch

from edm.evaluation.stats import paired_difference
from edm.models.checkpoint import find_latest
from edm.training.build import LOGVAR_CHANNELS

from conftest import TINY_TRAIN, load_script

side_by_side = load_script("side_by_side")


def test_arms_and_seeds_parse_and_bad_ones_are_named():
    arm = side_by_side.Arm.parse("ref=nvlabs:order,noise lr=1e-3")
    assert (arm.label, arm.kind, arm.draws, arm.overrides) == ("ref", "nvlabs", ("order", "noise"), ("lr=1e-3",))
    assert side_by_side.parse_seeds("0-2,7") == [0, 1, 2, 7]
    for bad in ("ours", "ours=sgm", "ours=edm-train:order", "../x=edm-train", "", "c=edm-train 'x"):
        with pytest.raises(SystemExit, match="side_by_side.py: error"):
            side_by_side.Arm.parse(bad)
    for bad in ("3-1", "-1", "a", "", "0-", "1,,2"):  # an empty range would train nothing and still write a table
        with pytest.raises(SystemExit, match=rf"--seeds '{re.escape(bad)}': expected seeds 0 or more"):
            side_by_side.parse_seeds(bad)


def test_two_arms_on_two_paired_seeds_give_a_table_of_paired_differences(tmp_path, monkeypatch, capsys):
    """Arms `a` (lr 2e-3) and `b` (lr 1e-9: its weights stay near the initialization) on seeds 0 and 1:
    the table holds each run's FD_cls, and b − a paired by seed; a rerun trains and scores nothing
    again, and one of other seeds keeps these in its table; other shared settings, or an arm label redefined, are
    refused, naming them; a new arm may join."""
    monkeypatch.setenv("EDM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sbs"
    shared = [o for o in TINY_TRAIN if not o.startswith(("progress", "grid_size"))] + ["grid_size=0"]
    argv = ["--out", str(out), "--seeds", "0-1", "--num-images", "24", "--batch", "24", "--classifier-steps", "100",
            "--arm", "a=edm-train", "--arm", "b=edm-train lr=1e-9", *shared]
    side_by_side.main(argv)
    table = json.loads((out / "table.json").read_text())
    a, b = table["rows"]
    assert (a["arm"], b["arm"], b["overrides"]) == ("a", "b", ["lr=1e-9"])
    assert set(a["scores"]) == set(b["scores"]) == {"0", "1"} and all(v > 0 for v in a["scores"].values())
    expected = paired_difference([a["scores"][k] for k in "01"], [b["scores"][k] for k in "01"])
    assert b["paired_difference"]["mean"] == pytest.approx(expected.mean)
    assert b["paired_difference"]["low"] == pytest.approx(expected.low) and math.isfinite(expected.low)
    assert "paired difference from a" in (out / "table.md").read_text()
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    for seed in "01":
        assert (out / "a" / f"seed-{seed}" / "checkpoint-00000004.pt").is_file()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} | {p: p.stat().st_mtime_ns for p in out.rglob("points/*.json")}
    capsys.readouterr()
    side_by_side.main(argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]
    side_by_side.main([*argv[:3], "1", *argv[4:], "--report-only"])  # seeds of earlier commands stay in the table
    assert json.loads((out / "table.json").read_text())["rows"] == table["rows"]
    score = out / "a" / "seed-0" / "score"  # a score folder of another study is refused in this script's terms
    study = json.loads((score / "provenance.json").read_text())
    (score / "provenance.json").write_text(json.dumps(study | {"num_images": 32}))
    with pytest.raises(SystemExit, match=rf"^side_by_side.py: error: {re.escape(str(score))} holds results made with "
                                         rf"other settings \(num_images: folder 32, now 24\); move .* away to score "
                                         r"the run again, or pass --overwrite"):
        side_by_side.main(argv)
    (score / "provenance.json").write_text(json.dumps(study))

    with pytest.raises(SystemExit, match="num_images: folder 24, now 16"):
        side_by_side.main([*argv[:5], "16", *argv[6:]])
    with pytest.raises(SystemExit, match=r"arm b: .*overrides: folder \['lr=1e-9'\], now \['lr=1e-8'\]\); give the arm "
                                         r"another label, or pass --overwrite"):
        side_by_side.main([a.replace("lr=1e-9", "lr=1e-8") for a in argv])
    record = json.loads((out / "provenance.json").read_text())  # OUT names its images, not only the keys given:
    (out / "provenance.json").write_text(json.dumps(record | {"dataset": {**record["dataset"], "resolution": 6}}))
    with pytest.raises(SystemExit, match=r"other settings \(dataset.resolution: folder 6, now None\)"):
        side_by_side.main([*argv, "--report-only"])  # another default of the same keys trains other images
    (out / "provenance.json").write_text(json.dumps(record))
    side_by_side.main([*argv, "--arm", "c=edm-train lr=1e-3", "--report-only"])  # a new arm joins, untrained yet
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [row["arm"] for row in rows] == ["a", "b", "c"]
    assert (rows[2]["mean"], rows[2]["sd"]) == (None, None) and "nan" not in (out / "table.md").read_text()
    written = (out / "table.md").read_text()  # --out alone: the arms (last table's order) and settings OUT records
    assert side_by_side.main(["--out", str(out), "--report-only"]) == written
    with pytest.raises(SystemExit, match="without --arm takes OUT's recorded settings: drop lr=1 --num-images, or"):
        side_by_side.main(["--out", str(out), "--report-only", "--num-images", "24", "lr=1"])
    with pytest.raises(SystemExit, match=r"holds no readable record of them \(FileNotFoundError"):
        side_by_side.main(["--out", str(tmp_path / "none"), "--report-only"])
    (out / "table.json").rename(out / "table.json.kept")  # the baseline is not guessed
    with pytest.raises(SystemExit, match=r"\(provenance.json, table.json\), .* \(FileNotFoundError"):
        side_by_side.main(["--out", str(out), "--report-only"])
    (out / "table.json.kept").rename(out / "table.json")
    run = out / "a" / "seed-0"  # a run whose recorded settings are not the arm's (its recipe changed, say) is not reused
    assert side_by_side.finished_checkpoint(run, [*shared, "seed=0", f"run_dir={run}"]) is not None
    with pytest.raises(SystemExit, match=r"was trained with other settings than this arm's \(lr: run 0.002, arm 0.001\)"):
        side_by_side.finished_checkpoint(run, [*shared, "seed=0", "lr=1e-3", f"run_dir={run}"])
    # compared as trained (the resolved precond and loss specs): precond.kind and loss.kind None train the schedule's,
    # so naming that kind changes nothing and naming another does
    assert side_by_side.finished_checkpoint(run, [*shared, "seed=0", "precond.kind=edm", "loss.kind=edm",
                                                  f"run_dir={run}"]) is not None
    with pytest.raises(SystemExit, match=r"\(precond.kind: run 'edm', arm 'fm'\)"):
        side_by_side.finished_checkpoint(run, [*shared, "seed=0", "precond.kind=fm", f"run_dir={run}"])
    state = torch.load(find_latest(run), weights_only=True)
    older = tmp_path / "older"  # written before runs recorded their loss spec: the loss its config builds
    older.mkdir()
    torch.save({k: v for k, v in state.items() if k != "loss"}, older / "checkpoint-00000004.pt")
    assert side_by_side.finished_checkpoint(older, [*shared, "seed=0", f"run_dir={older}"]) is not None
    with pytest.raises(SystemExit, match=r"\(loss.P_mean: run -1.2, arm -0.4\)"):
        side_by_side.finished_checkpoint(older, [*shared, "seed=0", "loss.P_mean=-0.4", f"run_dir={older}"])
    initial = tmp_path / "initial"  # a run from `init` trains the init model's preconditioning: not the config's
    initial.mkdir()
    torch.save({**state, "config": {**state["config"], "init": "m.pt"},
                "denoiser": {**state["denoiser"], "precond": {**state["denoiser"]["precond"], "kind": "fm"}}},
               initial / "checkpoint-00000004.pt")
    assert side_by_side.finished_checkpoint(initial, [*shared, "seed=0", "init=m.pt", f"run_dir={initial}"]) is not None
    with pytest.raises(SystemExit, match=r"init: run 'm.pt', arm None"):
        side_by_side.finished_checkpoint(initial, [*shared, "seed=0", f"run_dir={initial}"])
    resized = tmp_path / "resized"  # a run with dataset.resolution set whose record names no filter predates the setting
    resized.mkdir()
    dataset = {k: v for k, v in state["config"]["dataset"].items() if k != "resample"} | {"resolution": 8}
    torch.save({**state, "config": {**state["config"], "dataset": dataset}}, resized / "checkpoint-00000004.pt")
    with pytest.raises(SystemExit, match=r"dataset.resample: run 'unrecorded \(bilinear, or bicubic for folders\)', "
                                         r"arm 'lanczos'"):
        side_by_side.finished_checkpoint(resized, [*shared, "seed=0", "dataset.resolution=8", f"run_dir={resized}"])
    assert side_by_side.differing_keys(["schedule=vp", "precond.kind=vp"], ["schedule=vp"]) == []
    assert side_by_side.differing_keys(["schedule=vp", "precond.kind=edm"], ["schedule=vp"]) == ["precond.kind"]
    # VP's β's and the uncertainty head of a learned weighting resolve the same way, named or not
    assert side_by_side.differing_keys(["schedule=vp", "precond.beta_d=19.9"], ["schedule=vp"]) == []
    assert side_by_side.differing_keys(["schedule=vp", "precond.beta_d=18"], ["schedule=vp"]) == ["precond.beta_d"]
    assert side_by_side.differing_keys(["loss.kind=edm2", f"precond.logvar_channels={LOGVAR_CHANNELS}"],
                                       ["loss.kind=edm2"]) == []


def test_a_recipe_small_arm_scores_its_autoguided_post_hoc_ema(tmp_path, monkeypatch):
    """KIND recipe-small runs recipe=small's commands for each seed: the main run with power-EMA snapshots, a guide
    of the same training with half its channels and a quarter of its images (recipe=small-guide), post-hoc σ_rel
    0.10, and the score of that model guided with w = 1.5 on (0.28, 2.9], the values that
    configs/recipe/small.yaml's edm-sample command gives."""
    from conftest import REPO
    from edm.files import file_sha256
    from edm.models.loading import load_model

    monkeypatch.setenv("EDM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sbs"
    shared = [o for o in TINY_TRAIN if not o.startswith(("progress", "grid_size"))] + ["grid_size=0"]
    side_by_side.main(["--out", str(out), "--seeds", "0", "--num-images", "24", "--batch", "24", "--classifier-steps",
                       "100", "--arm", "a=edm-train", "--arm", "s=recipe-small ema_snapshot_kimg=0.016", *shared])
    unit = out / "s" / "seed-0"
    main, guide = (torch.load(next(d.glob("checkpoint-*.pt")), weights_only=True) for d in (unit, unit / "guide"))
    assert main["config"]["ema_sigma_rel"] == [0.05, 0.10] and main["cur_nimg"] == 4 * guide["cur_nimg"]
    assert main["denoiser"]["network"]["model_channels"] == 2 * guide["denoiser"]["network"]["model_channels"]
    for key in ("loss", "lr", "lr_decay_kimg"):  # recipe=small's EDM2 training, for the guide as well
        assert main["config"][key] == guide["config"][key]
    assert main["denoiser"]["network"]["name"] == guide["denoiser"]["network"]["name"] == "edm2-tiny"
    assert side_by_side.differing_keys(side_by_side.guide_overrides(side_by_side.small_main([])),
                                       ["recipe=small-guide"]) == ["run_dir"]
    record = json.loads(next((unit / "score").rglob("provenance.json")).read_text())
    assert (record["guidance"], record["guidance_interval"]) == (1.5, [0.28, 2.9])
    scored = load_model(unit / "posthoc" / "ema-0.100")[1].source  # the post-hoc EMA, guided by the guide's checkpoint
    assert record["checkpoint_sha256"] == file_sha256(scored) and len(record["guide_sha256"]) == 64
    table = json.loads((out / "table.json").read_text())
    assert set(table["rows"][1]["scores"]) == {"0"} and "recipe-small: post-hoc" in (out / "table.md").read_text()
    recipe = (REPO / "configs" / "recipe" / "small.yaml").read_text()
    sigma_rel = re.search(r"sigma_rel=\[([0-9.]+)\]", recipe).group(1)
    weight, lo, hi = re.search(r"guidance=([0-9.]+) guidance_interval=\[([0-9.]+),([0-9.]+)\]", recipe).groups()
    assert (float(sigma_rel), float(weight), [float(lo), float(hi)]) == (
        side_by_side.SMALL_SIGMA_REL, side_by_side.SMALL_GUIDANCE, side_by_side.SMALL_INTERVAL)


def test_an_nvlabs_arm_without_the_reference_checkout_is_refused_before_any_work(tmp_path):
    """Without --nvlabs-repo an nvlabs arm cannot train: said before the other arms train and score (OUT is not made)."""
    out = tmp_path / "sbs"
    argv = ["--out", str(out), "--num-images", "8", "--classifier-steps", "10", "--arm", "a=edm-train", "--arm",
            "ref=nvlabs", "total_kimg=0.016"]
    with pytest.raises(SystemExit, match="arm ref runs NVlabs/edm's loop: pass --nvlabs-repo PATH"):
        side_by_side.main(argv)
    assert not out.exists()


def test_a_recipe_small_arm_whose_shared_settings_replace_its_recipes_is_refused_before_any_work(tmp_path):
    """A shared group or key beats the recipe's (network=tiny would train recipe=small on `tiny`): the arm is refused
    before OUT is made, naming the keys, both values and the arm that keeps the recipe's; that arm, a recipe that
    does not set the key (recipe=small-edm), and shared keys the recipe leaves alone (data, budget, schedule) pass."""
    out = tmp_path / "sbs"
    shared = ["network=tiny", "lr=0.01", "dataset.resolution=16", "total_kimg=0.016", "schedule=fm"]
    with pytest.raises(SystemExit) as refused:  # (small settings: without the check, this trains and scores)
        side_by_side.main(["--out", str(out), "--num-images", "8", "--classifier-steps", "10", "--arm", "a=edm-train",
                           "--arm", "s=recipe-small", *shared])
    message = str(refused.value)
    assert "network.name: recipe 'edm2-tiny', shared 'tiny'" in message and "lr: recipe 0.03, shared 0.01" in message
    assert not out.exists()
    keeps = side_by_side.Arm.parse(shlex.split(re.search(r"--arm ('[^']*'|\S+)", message).group(1))[0])
    assert set(keeps.overrides) == {"network=edm2-tiny", "lr=0.03"}
    for arm in (keeps, side_by_side.Arm.parse("small=recipe-small recipe=small-edm")):
        side_by_side.check_recipe_arms([arm], shared)
    assert side_by_side.replaced_by_shared(side_by_side.Arm.parse("s=recipe-small"), shared[2:]) == []
    # the data and how a run is carried out are the comparison's: edm2-img64's data set, workers and run_dir
    assert side_by_side.replaced_by_shared(side_by_side.Arm.parse("s=recipe-small recipe=edm2-img64"),
                                           ["dataset=fashion_mnist", "dataset.num_workers=0"]) == []


def test_an_edm_train_arm_that_trains_what_a_recipe_small_arm_trains_scores_that_run(tmp_path, monkeypatch):
    """A recipe's power-EMA snapshots change nothing trained (recipe=small-edm: EDM's training), so edm-train on the
    same settings ends at the same weights and EMA bit for bit; an edm-train arm that differs from a recipe-small arm
    in nothing else scores that arm's checkpoint (same-run.json names it), and one that differs in anything else (lr)
    trains its own."""

    from edm.files import file_sha256

    monkeypatch.setenv("EDM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sbs"
    shared = [o for o in TINY_TRAIN if not o.startswith(("progress", "grid_size"))] + ["grid_size=0"]
    arms = ["--arm", "a=edm-train", "--arm", "s=recipe-small recipe=small-edm ema_snapshot_kimg=0.016"]
    side_by_side.main(["--out", str(out), "--seeds", "0", "--num-images", "24", "--batch", "24", "--classifier-steps",
                       "100", *arms, *shared])
    unit = out / "a" / "seed-0"
    twin = next((out / "s" / "seed-0").glob("checkpoint-*.pt"))
    assert not list(unit.glob("checkpoint-*.pt"))
    record = json.loads((unit / "same-run.json").read_text())
    assert (record["arm"], record["checkpoint"], record["differs_in"]) == ("s", str(twin), ["ema_sigma_rel",
                                                                                            "ema_snapshot_kimg"])
    scored = json.loads(next((unit / "score").rglob("provenance.json")).read_text())
    assert scored["checkpoint_sha256"] == file_sha256(twin) and scored["guide_sha256"] is None

    alone = torch.load(side_by_side.train_edm([*shared, "seed=0"], tmp_path / "alone"), weights_only=True)
    small = torch.load(twin, weights_only=True)
    for key in ("model", "ema"):
        assert alone[key].keys() == small[key].keys()
        assert all(torch.equal(alone[key][k], small[key][k]) for k in alone[key]), key
    parsed = [side_by_side.Arm.parse(a) for a in arms[1::2]]
    assert side_by_side.same_run(side_by_side.Arm.parse("b=edm-train lr=1e-3"), parsed, 0, shared, out) is None
    assert side_by_side.same_run(parsed[0], parsed, 1, shared, out) is None  # seed 1: no run of s yet


def test_a_run_stopped_on_request_ends_the_script_and_a_rerun_resumes_it(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM stops edm-train after saving; that run is not finished, so nothing downstream (a guide, the
    post-hoc EMA, a score) may use it: the script ends naming it, and the same call again resumes it to total_kimg."""
    import signal

    from edm.training import loop

    shared = [o for o in TINY_TRAIN if not o.startswith(("progress", "grid_size"))] + ["grid_size=0", "seed=0"]
    real = loop.train

    def stopped_at_step_2(cfg, callback=None, on_own_run_dir=None):
        def interrupt(run):
            if run.state.step == 2:
                signal.raise_signal(signal.SIGINT)

        return real(cfg, callback=interrupt)

    monkeypatch.setattr(loop, "train", stopped_at_step_2)
    with pytest.raises(SystemExit, match=r"the run in .*run stopped at step 2, before its total_kimg"):
        side_by_side.train_edm(shared, tmp_path / "run")
    monkeypatch.setattr(loop, "train", real)
    assert side_by_side.train_edm(shared, tmp_path / "run").name == "checkpoint-00000004.pt"

    cut = tmp_path / "cut"  # a run killed before its first checkpoint: its records are there, no checkpoint
    side_by_side.train_edm(shared, cut)
    for file in cut.glob("checkpoint-*.pt"):
        file.unlink()
    assert (cut / "metrics.jsonl").stat().st_size > 0
    assert side_by_side.train_edm(shared, cut).name == "checkpoint-00000004.pt"  # the same call starts it over


def test_the_table_of_one_seed_gives_scores_without_a_spread_or_an_interval(tmp_path):
    """One seed has no sd and no paired interval: the table shows the score alone and table.json holds null (JSON has
    no NaN)."""
    arms = [side_by_side.Arm.parse("a=edm-train"), side_by_side.Arm.parse("b=edm-train lr=1e-3")]
    text = side_by_side.report(tmp_path, arms, {"a": {0: 4.25}, "b": {0: 1.5}}, ["network=tiny"], 100)
    assert "| a | 4.250 | 4.250 |  |" in text and "| b (lr=1e-3) | 1.500 | 1.500 |  |" in text and "nan" not in text
    table = json.loads((tmp_path / "table.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert [(row["mean"], row["sd"]) for row in table["rows"]] == [(4.25, None), (1.5, None)]
    assert "paired_difference" not in table["rows"][1]


def stub_arms(monkeypatch, trained: list, during=None):
    """train_arm and score_arm without training: a run folder with a checkpoint (kept if there), a score of
    1 + seed (what collect reads); `trained` records the (label, seed) trained; during(label, seed) runs while that
    seed's lock is held."""

    def train(arm, arms, seed, shared, out, nvlabs_repo):
        run = out / arm.label / f"seed-{seed}"
        if not (run / "checkpoint-00000004.pt").is_file():
            run.mkdir(parents=True, exist_ok=True)
            (run / "checkpoint-00000004.pt").write_bytes(b"")
            trained.append((arm.label, seed))
        if during is not None:
            during(arm.label, seed)
        return side_by_side.Scored(run / "checkpoint-00000004.pt")

    def score(model, out, num_images, batch, classifier):
        out.mkdir(parents=True, exist_ok=True)
        value = 1.0 + int(model.model.parent.name.removeprefix("seed-"))
        (out / "table.json").write_text(json.dumps({"rows": [{side_by_side.SCORE: value}]}))
        return value

    monkeypatch.setattr(side_by_side, "train_arm", train)
    monkeypatch.setattr(side_by_side, "score_arm", score)


def test_overwrite_deletes_every_arms_runs_and_waits_for_none_in_progress(tmp_path, monkeypatch):
    """--overwrite deletes the runs of OUT's arms that the command does not name as well (else a later command naming
    them again would find them under the new settings); it is refused while an arm's seed is being trained or scored,
    naming it, and so is a second process on a seed in progress; --report-only --overwrite is refused."""
    from edm.files import FolderLock

    trained: list = []
    stub_arms(monkeypatch, trained)
    out = tmp_path / "sbs"
    common = ["--out", str(out), "--seeds", "0", "network.model_channels=8"]
    side_by_side.main([*common, "--arm", "a=edm-train", "--arm", "b=edm-train lr=1e-3", "--arm", "x=edm-train lr=1e-4"])
    assert trained == [("a", 0), ("b", 0), ("x", 0)]
    side_by_side.main([*common, "--num-images", "500", "--overwrite", "--arm", "a=edm-train", "--arm", "b=edm-train lr=1e-3"])
    assert not (out / "x").exists() and json.loads((out / "provenance.json").read_text())["num_images"] == 500
    trained.clear()
    side_by_side.main([*common, "--num-images", "500", "--arm", "a=edm-train", "--arm", "x=edm-train lr=1e-4"])
    assert trained == [("x", 0)]  # retrained under the new settings; a's run of them is kept

    with FolderLock(out / side_by_side.UNITS / "x" / "seed-0", key="--out", owner="side-by-side"):
        with pytest.raises(SystemExit, match=rf"--overwrite would delete arm x seed-0 of {re.escape(str(out))}, which a "
                                             r"side-by-side \(pid \d+.*\) is training or scoring; wait for it"):
            side_by_side.main([*common, "--overwrite", "--arm", "a=edm-train", "--arm", "b=edm-train lr=1e-3"])
        with pytest.raises(SystemExit, match=r"arm x seed 0 of .* is being trained or scored by a side-by-side "
                                             r"\(pid .*give each process its own arms \(--only LABEL\)"):
            side_by_side.main([*common, "--num-images", "500", "--arm", "a=edm-train", "--arm", "x=edm-train lr=1e-4",
                               "--only", "x"])
    assert (out / "x" / "seed-0" / "checkpoint-00000004.pt").is_file()  # the refused overwrite deleted nothing
    with pytest.raises(SystemExit, match="--report-only writes the table of the scores present, which --overwrite"):
        side_by_side.main([*common, "--report-only", "--overwrite", "--arm", "a=edm-train", "--arm", "x=edm-train"])


def test_an_unknown_key_in_the_overrides_ends_in_one_line(tmp_path, capsys):
    for extra in (["lr_x=1"], ["--arm", "c=edm-train lr_x=1"]):
        with pytest.raises(SystemExit):
            side_by_side.main(["--out", str(tmp_path / "sbs"), "--arm", "a=edm-train", "--arm", "b=edm-train", *extra])
        assert capsys.readouterr().err.startswith("side_by_side.py: error: unknown key lr_x: not an option of this command")


def test_each_seed_checks_outs_settings_again_so_an_overwrite_in_between_is_not_trained_into(tmp_path, monkeypatch):
    """A process claims OUT at its start and trains seed after seed; another process's --overwrite with other
    settings between two seeds replaces OUT's record: the first process's next seed is refused, naming the
    settings, instead of training old settings into a folder that says new ones."""
    out = tmp_path / "sbs"
    argv = ["--out", str(out), "--seeds", "0-1", "--num-images", "100", "--arm", "a=edm-train", "--arm", "b=edm-train"]

    def overwritten_after_seed_0(label, seed):
        if seed == 0:
            record = json.loads((out / "provenance.json").read_text())
            (out / "provenance.json").write_text(json.dumps(record | {"num_images": 200}))

    trained: list = []
    stub_arms(monkeypatch, trained, during=overwritten_after_seed_0)
    with pytest.raises(SystemExit, match=r"holds results made with other settings \(num_images: folder 200, now 100\)"):
        side_by_side.main([*argv, "--only", "a"])
    assert trained == [("a", 0)]


@pytest.mark.parametrize("bad, message", [(["--num-images", "1"], "--num-images 1: give 2 or more"),
                                          (["--batch", "0"], "--batch 0: give 1 or more"),
                                          (["--classifier-steps", "0"], "--classifier-steps 0: give 1 or more")])
def test_a_count_that_cannot_score_is_refused_before_out_records_it(tmp_path, bad, message):
    """Refused before OUT is made: a record of the bad value would refuse the corrected command (or, for an untrained
    classifier, every arm would be scored on random features without a word)."""
    out = tmp_path / "sbs"
    with pytest.raises(SystemExit, match=message):
        side_by_side.main(["--out", str(out), "--arm", "a=edm-train", "--arm", "b=edm-train lr=1e-3", *bad,
                           "total_kimg=0.016"])
    assert not out.exists()


def test_an_nvlabs_repo_that_is_no_checkout_is_refused_before_any_arm_trains(tmp_path, capsys):
    """A wrong --nvlabs-repo is named before the edm-train arms train and score (not as 'No module named
    torch_utils' once the reference arm's turn comes)."""
    out = tmp_path / "sbs"
    with pytest.raises(SystemExit) as stop:
        side_by_side.main(["--out", str(out), "--nvlabs-repo", str(tmp_path), "--num-images", "8", "--arm", "a=edm-train",
                           "--arm", "ref=nvlabs", "total_kimg=0.016"])
    assert stop.value.code == 1 and not out.exists()
    assert f"--nvlabs-repo {tmp_path} is not an NVlabs/edm checkout" in capsys.readouterr().err
