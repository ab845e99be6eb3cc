"""edm/training/config.py and configs/: every key and default once, bad values and keys refused before any work,
recipes with the papers' values."""

from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from edm.training.config import TrainConfig, run_folder
from edm.training.loop import train


@pytest.mark.parametrize("overrides, error, needle", [
    (["not_a_key=1"], ConfigCompositionException, "Could not override 'not_a_key'"),
    (["dataset.bogus=1"], ConfigCompositionException, "Could not override 'dataset.bogus'"),
    (["batch_size=many"], ConfigCompositionException, "Error merging override batch_size=many"),
    (["schedule=nonexistent"], MissingConfigException, "Could not find 'schedule/nonexistent'"),
])
def test_bad_key_or_value_fails_at_composition(compose_train, overrides, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        compose_train(*overrides)


@pytest.mark.parametrize("command, base", [("sample", ["checkpoint=x"]), ("evaluate", ["metric=fd_cls", "images=x"]),
                                           ("nfe_study", ["checkpoint=x"])])
def test_a_misspelt_schedule_or_data_set_of_a_model_command_is_refused_not_ignored(command, base):
    """schedule and dataset default to the model's own (null); a name that is not a config file fails, listing the
    names, instead of leaving the model's own in place."""
    from edm.cli import compose

    with pytest.raises(MissingConfigException, match=r"Could not find 'dataset/digitz'(.|\n)*fashion_mnist"):
        compose(command, [*base, "dataset=digitz"])
    assert compose(command, [*base, "dataset=digits"]).dataset.name == "digits"
    if command != "nfe_study":  # (a study names its schedules as a list)
        with pytest.raises(MissingConfigException, match=r"Could not find 'schedule/vee'"):
            compose(command, [*base, "schedule=vee"])
        assert compose(command, [*base, "schedule=vp"]).schedule.name == "vp"


def test_a_key_added_past_the_schema_is_refused_and_a_required_one_is_named():
    """Hydra's hint for a misspelt key is +KEY=V, which adds it past the schema, where nothing would read it."""
    from edm.cli import compose

    with pytest.raises(ValueError, match=r"unknown keys lrr, network.chanel_mult: not options of this command"):
        compose("train", ["+lrr=0.1", "+network.chanel_mult=[1,2]"])
    with pytest.raises(ValueError, match=r"^unknown key lrr: not an option of this command \(--help lists them\); a "
                                         r"misspelt key given as \+KEY=V"):  # the command line's wording for lrr=0.1
        compose("train", ["+lrr=0.1"])
    assert compose("train", ["sampler=euler_maruyama", "+sampler.options.brownian=true"]).sampler.options == {
        "brownian": True}  # a free-form dict takes its keys with +
    with pytest.raises(ValueError, match=r"checkpoint is required: pass checkpoint=\.\.\."):
        compose("sample", [])


def test_the_cli_defaults_are_the_dataclass_defaults():
    """One default per key: `python -m edm.train` and `train(TrainConfig())` train the same run."""
    from edm.cli import compose

    cli = compose("train")
    assert cli == TrainConfig()
    assert run_folder(cli) == "runs/digits-edm-tiny"  # named after the data set, schedule and network
    assert run_folder(compose("train", ["schedule=vp", "network=ddpmpp"])) == "runs/digits-vp-ddpmpp"


@pytest.mark.parametrize("overrides, needle", [
    (["mixed_precision=fp8"], "mixed_precision 'fp8' is not valid; choose one of: no, fp16, bf16"),
    (["sampler.solver=rk45"], "sampler.solver 'rk45' is not valid; choose one of: euler, heun"),
    (["sampler.solver=hen"], "sampler.solver 'hen' is not valid; choose one of: euler, heun, stochastic"),
    (["sampler.solver=hen"], "unipc, deis (did you mean heun?)"),  # the close ones last
    (["sampler=heun", "+sampler.options.churn=1"], "solver 'heun' does not take option(s) ['churn']"),
    (["sampler=stochastic", "sampler.options.churn=-1"], "solver 'stochastic': churn=-1 must be a number ≥ 0"),
    (["precond.kind=edm2"], "precond.kind 'edm2' is not valid; choose one of: vp, ve, edm, fm, trigflow"),
    (["schedule.beta_d=3"], "bad option for schedule 'edm'"),
    (["batch_size=0"], "batch_size=0 must be > 0"),
    (["dataset.max_size=0"], "dataset.max_size=0 must be > 0"),
    (["ema_sigma_rel=[0.1]"], "ema_sigma_rel=[0.1] tracks power-function EMAs for post-hoc EMA, which edm-posthoc "
                              "makes from their snapshots: set ema_snapshot_kimg=K too"),
    (["schedule=trigflow", "precond.sigma_data=0.6"], "schedule.sigma_data=0.5 differs from precond.sigma_data=0.6"),
])
def test_bad_value_fails_before_training(compose_train, tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        train(compose_train(*overrides))
    assert not (tmp_path / "run").exists()


# Karras et al. 2022 (EDM), Table 7, CIFAR-10 (config F), as NVlabs/edm train.py runs it.
EDM_CIFAR10_TABLE7 = {
    "dataset.name": "cifar10", "dataset.xflip": False, "batch_size": 512, "total_kimg": 200_000, "lr": 1e-3,
    "lr_rampup_kimg": 10_000, "adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "ema_halflife_kimg": 500,
    "ema_rampup_ratio": 0.05, "network.dropout": 0.13, "augment.p": 0.12, "network.augment_dim": 9,
}


@pytest.mark.parametrize("schedule,network", [("vp", "ddpmpp"), ("ve", "ncsnpp"), ("edm", "ddpmpp")])
def test_recipe_edm_cifar10_sets_the_papers_hyperparameters(schedule, network):
    from edm.cli import compose

    cfg = compose("train", ["recipe=edm-cifar10", f"schedule={schedule}", f"network={network}", "dataset.root=DATA"])
    for key, value in EDM_CIFAR10_TABLE7.items():
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    aug = cfg.augment  # every transform of EDM's pipe on, at its default strength
    assert (aug.xflip, aug.yflip, aug.scale, aug.rotate_frac, aug.aniso, aug.translate_frac) == (1e8, 1, 1, 1, 1, 1)
    assert (cfg.schedule.name, cfg.network.name) == (schedule, network)
    assert cfg.precond.kind is None and cfg.loss.kind is None  # the schedule's own (Table 1 column)
    assert (cfg.loss.P_mean, cfg.loss.P_std, cfg.precond.sigma_data) == (-1.2, 1.2, 0.5)


# NVlabs/edm2 train_edm2.py, preset edm2-img64-s, and its training_loop.py defaults, in our units.
EDM2_IMG64_S = dict(duration=1024 << 20, batch=2048, channels=192, lr=0.0100, decay=35000, dropout=0.00, P_mean=-0.8,
                    P_std=1.6, rampup_Mimg=10, betas=(0.9, 0.99), stds=(0.050, 0.100), snapshot_nimg=8 << 20)


def test_recipe_edm2_img64_sets_the_reference_presets_values():
    from edm.cli import compose
    from edm.training.build import resolved_network

    cfg = compose("train", ["recipe=edm2-img64", "dataset.root=DATA"])
    ref = EDM2_IMG64_S
    assert cfg.total_kimg * 1000 == pytest.approx(ref["duration"]) and cfg.batch_size == ref["batch"]
    assert cfg.lr == ref["lr"] and cfg.lr_rampup_kimg * 1000 == ref["rampup_Mimg"] * 1e6
    assert cfg.lr_decay_kimg * 1000 == ref["decay"] * ref["batch"]  # t_ref = ref_batches batches
    assert tuple(cfg.adam_betas) == ref["betas"] and tuple(cfg.ema_sigma_rel) == ref["stds"]
    assert cfg.ema_snapshot_kimg * 1000 == pytest.approx(ref["snapshot_nimg"])
    assert (cfg.loss.kind, cfg.loss.P_mean, cfg.loss.P_std) == ("edm2", ref["P_mean"], ref["P_std"])
    network = resolved_network({"name": cfg.network.name})
    assert (network["model_channels"], network["dropout"]) == (ref["channels"], ref["dropout"])
    assert cfg.dataset.cond and cfg.augment.p == 0 and not cfg.dataset.xflip


def test_recipe_guide_trains_a_smaller_shorter_model_in_its_own_folder():
    from edm.cli import compose
    from edm.networks import presets

    main, guide = compose("train"), compose("train", ["recipe=guide"])
    main_channels = presets.resolve(main.network.name)[1]["model_channels"]
    assert guide.network.model_channels == main_channels // 2 and guide.total_kimg == main.total_kimg / 4
    assert guide.run_dir == run_folder(main) + "-guide" and guide.dataset == main.dataset and guide.schedule == main.schedule


def test_values_that_overflow_are_rejected_before_training(compose_train, tmp_path):
    with pytest.raises(ValueError, match="lr=1e\\+39 overflows float32"):
        train(compose_train("lr=1e39"))
    for value in ("inf", "nan"):  # not "must be > 0", which inf is
        with pytest.raises(ValueError, match=f"^lr={value} must be a finite number > 0$"):
            train(compose_train(f"lr={value}"))
    assert not (tmp_path / "run").exists()


def test_every_solver_has_a_sampler_file_that_composes_to_it():
    """configs/sampler/NAME.yaml exists for every registered solver and composes (edm-train sampler=NAME) to a
    checked SamplerConfig of that solver: a new solver cannot miss its file, nor a file name another solver."""
    from pathlib import Path

    from edm.cli import compose
    from edm.core.samplers import SOLVERS

    files = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "sampler").glob("*.yaml"))
    assert files == sorted(SOLVERS)
    for name in files:
        assert compose("train", [f"sampler={name}"]).sampler.solver == name


def test_every_schedule_data_set_and_network_preset_has_a_config_file_that_composes_to_it():
    """configs/{schedule,dataset,network}/NAME.yaml exists for every entry of SCHEDULES, DATASETS and the network
    presets (network/edm2.yaml is edm2-s) and composes to it, as the sampler group does for SOLVERS: the registry
    alone leaves edm-train GROUP=NAME failing with Hydra's "Could not find"."""
    from pathlib import Path

    from edm.cli import compose
    from edm.core.schedules import SCHEDULES
    from edm.data import DATASETS
    from edm.networks import PRESETS

    configs = Path(__file__).parents[1] / "configs"
    for group, names, aliases in (("schedule", SCHEDULES, {}), ("dataset", DATASETS, {}),
                                  ("network", PRESETS, {"edm2": "edm2-s"})):
        files = {p.stem: p.read_text() for p in (configs / group).glob("*.yaml")}
        assert sorted(set(files) - set(aliases)) == sorted(names), group
        for name, text in files.items():
            root = ["dataset.root=/data"] if "???" in text else []
            assert getattr(compose("train", [f"{group}={name}", *root]), group).name == aliases.get(name, name)


@pytest.mark.parametrize("overrides, needle", [
    (["schedule=vp", "loss.kind=edm2"], "loss.kind=edm2 with precond.kind=vp weights the network's own target by "
                                        "λ(σ)·c_out(σ)² from 1 "),
    (["schedule=fm", "loss.kind=edm"], "precond.kind=edm|trigflow or loss.kind=fm makes it 1"),
])
def test_a_loss_and_precond_from_different_rows_of_table_1_are_named_with_the_fix(overrides, needle, caplog):
    from edm.cli import compose
    from edm.training.build import check_target_weight, resolve

    resolved = resolve(compose("train", overrides))
    with caplog.at_level("WARNING"):
        check_target_weight(resolved.loss, resolved.precond["kind"], resolved.schedule)
    assert needle in caplog.text


@pytest.mark.parametrize("overrides", [["schedule=vp"], ["schedule=ve"], ["schedule=fm"], ["schedule=trigflow"],
                                       ["schedule=vp", "precond.kind=edm", "loss.kind=edm"], ["loss.kind=edm2"]])
def test_a_loss_and_precond_of_one_row_warn_of_nothing(overrides, caplog):
    from edm.cli import compose
    from edm.training.build import check_target_weight, resolve

    resolved = resolve(compose("train", overrides))
    with caplog.at_level("WARNING"):
        check_target_weight(resolved.loss, resolved.precond["kind"], resolved.schedule)
    assert not caplog.records


@pytest.mark.parametrize("schedule", ["edm", "vp", "ve", "fm"])
@pytest.mark.parametrize("recipe", ["small", "small-guide", "edm2-img64"])
def test_edm2_recipes_train_edm2s_preconditioning_under_every_schedule(recipe, schedule, caplog):
    """EDM2's loss on EDM's preconditioning whatever the schedule: λ(σ)·c_out(σ)² = 1, nothing to warn of."""
    from edm.cli import compose
    from edm.training.build import check_target_weight, resolve

    resolved = resolve(compose("train", [f"recipe={recipe}", f"schedule={schedule}"]))
    assert (resolved.loss.kind, resolved.precond["kind"], resolved.schedule.parameterization) == ("edm2", "edm", schedule)
    with caplog.at_level("WARNING"):
        check_target_weight(resolved.loss, resolved.precond["kind"], resolved.schedule)
    assert not caplog.records
