"""edm/models/loading.py: every model file becomes a checkpoint dict and goes through one loader.

(NVlabs snapshots through the same loader: tests/test_nvlabs.py.)"""

import pytest
import torch

import edm
from edm.models import checkpoint
from edm.models.loading import load_model


def test_an_edm_checkpoint_gives_its_denoiser_shape_labels_and_schedule(tmp_path, tiny_checkpoint):
    path = tiny_checkpoint(tmp_path / "checkpoint-00000007.pt", label_dim=3, kind="ve", raw_offset=1.0,
                           schedule={"name": "ve", "sigma_min": 0.05, "sigma_max": 20.0})
    state = checkpoint.load_checkpoint(path)
    weights, raw = state["ema"], state["model"]
    for source in (path, tmp_path):  # the file, or its run folder (latest checkpoint)
        denoiser, info = load_model(source)
        assert not denoiser.training and denoiser.kind == "ve"
        assert info.img_shape == (1, 8, 8) and info.label_dim == 3 and info.label_dropout == 0.1
        assert info.schedule == edm.schedules.VE(sigma_min=0.05, sigma_max=20.0) and info.source == str(path)
        assert all(torch.equal(denoiser.state_dict()[k], v) for k, v in weights.items())
    denoiser, _ = load_model(path, ema=False)
    assert all(torch.equal(denoiser.state_dict()[k], v) for k, v in raw.items())
    _, info = load_model(path, image_shape=[1, 16, 16])
    assert info.img_shape == (1, 16, 16)
    with pytest.raises(ValueError, match="image_shape must be"):
        load_model(path, image_shape=[1, 16])


def test_a_checkpoint_without_a_schedule_has_none_and_sampling_asks_for_one(tmp_path, tiny_checkpoint):
    """No schedule is guessed from the preconditioning (a schedule with another parameterization would do as well)."""
    from edm.generation.job import SampleConfig, generate_folder

    path = tiny_checkpoint(tmp_path / "c.pt", kind="ve", schedule={})
    assert load_model(path)[1].schedule is None
    with pytest.raises(ValueError, match="the model stores no schedule: pass schedule=NAME, NAME one of vp, ve, edm, fm, trigflow"):
        generate_folder(SampleConfig(checkpoint=str(path), out=str(tmp_path / "out"), progress=False))
    assert not (tmp_path / "out").exists()


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="is a folder without checkpoint-"):
        load_model(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt is not a checkpoint"):
        load_model(tmp_path / "bad.pt")


def test_a_missing_guide_is_named_as_the_guide(tmp_path, tiny_checkpoint):
    """Errors name the option that gave the file: a guide that does not exist is not blamed on checkpoint=."""
    from edm.models.loading import guided

    denoiser, info = load_model(tiny_checkpoint(tmp_path / "c.pt"))
    with pytest.raises(FileNotFoundError, match=rf"guide '{tmp_path / 'nope'}' does not exist: pass guide=RUN_DIR"):
        guided(denoiser, info, 2.0, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="guide '.*empty' is a folder without checkpoint-"):
        guided(denoiser, info, 2.0, tmp_path / "empty")


def test_a_guide_that_is_the_model_itself_is_refused(tmp_path, tiny_checkpoint):
    """D_g = D gives D_w = D_g + w (D − D_g) = D: guidance that does nothing at twice the cost, also when the run folder
    and its checkpoint name one file."""
    from edm.models.loading import guided

    path = tiny_checkpoint(tmp_path / "run" / "checkpoint-00000010.pt")
    denoiser, info = load_model(path)
    for guide in (path, tmp_path / "run"):
        with pytest.raises(ValueError, match="is the model's own file .*: D_g = D makes guidance do nothing"):
            guided(denoiser, info, 2.0, guide)


def test_a_guide_that_holds_the_models_own_weights_under_another_path_is_refused(tmp_path, tiny_checkpoint):
    """An export of the model's checkpoint, or a copy of it, is D_g = D as well; a guide of other weights is taken."""
    import shutil

    from edm.models.loading import export_model, guided

    path = tiny_checkpoint(tmp_path / "run" / "checkpoint-00000010.pt", perturb=0.05)
    export_model(path, tmp_path / "export")
    shutil.copy(path, tmp_path / "copy.pt")
    denoiser, info = load_model(path)
    for guide in (tmp_path / "export", tmp_path / "copy.pt"):
        with pytest.raises(ValueError, match=rf"guide {guide} holds the model's own weights \({path}, exported or copied\)"):
            guided(denoiser, info, 2.0, guide)
    weaker = tiny_checkpoint(tmp_path / "weaker.pt", perturb=0.02)
    assert guided(denoiser, info, 2.0, weaker)[1].source == str(weaker)


def test_a_guide_trained_on_other_images_than_the_model_is_refused_naming_them(tmp_path, tiny_checkpoint):
    """Another data set, size or resampling filter of the same image shape (as the checkpoints record them) is no
    guide of the model's data; a record without the field, or the filter of an unresized set, says nothing."""
    from edm.models.loading import guided

    def trained_on(name, dataset, perturb):
        path = tiny_checkpoint(tmp_path / name, perturb=perturb)
        state = checkpoint.load_checkpoint(path)
        state["config"] = {"dataset": dataset}
        checkpoint.save_checkpoint(path, state)
        return path

    model = trained_on("model.pt", {"name": "fashion_mnist", "resolution": 8, "resample": "lanczos"}, 0.05)
    denoiser, info = load_model(model)
    for dataset, message in [
        ({"name": "digits", "resolution": None, "resample": "lanczos"}, "name 'digits', the model 'fashion_mnist'"),
        ({"name": "fashion_mnist", "resolution": 8, "resample": "bilinear"}, "resample 'bilinear', the model 'lanczos'"),
    ]:
        guide = trained_on("guide.pt", dataset, 0.02)
        with pytest.raises(ValueError, match=rf"guide {guide} was trained on other images than the model \({message}\): "
                                             "a guide must be a model of the same data"):
            guided(denoiser, info, 2.0, guide)
    for dataset in ({"name": "fashion_mnist", "resolution": 8, "resample": "lanczos"}, {"name": "fashion_mnist"}):
        guide = trained_on("guide.pt", dataset, 0.02)
        assert guided(denoiser, info, 2.0, guide)[1].source == str(guide)


def test_a_latent_guide_of_latents_of_other_images_is_refused_naming_the_pixel_data(tmp_path, tiny_checkpoint):
    """Latent models both record dataset=latent (the latent set): the images are the pixel data set their latents
    record, which a guide must share; a guide whose latents record none (edm2's dataset_tool.py) says nothing."""
    from edm.models.loading import guided

    def trained_on(name, pixels, perturb):
        path = tiny_checkpoint(tmp_path / name, perturb=perturb)
        state = checkpoint.load_checkpoint(path)
        state["config"] = {"dataset": {"name": "latent", "root": str(tmp_path / name), "resolution": None}}
        state["latent"] = {"vae": "vae", "vae_fingerprint": None, "scale": [1.0], "bias": [0.0], "pixel_shape": [1, 64, 64],
                           "dataset": pixels}
        checkpoint.save_checkpoint(path, state)
        return path

    denoiser, info = load_model(trained_on("model.pt", {"name": "fashion_mnist", "resolution": 64, "resample": "lanczos"}, 0.05))
    guide = trained_on("guide.pt", {"name": "mnist", "resolution": 64, "resample": "lanczos"}, 0.02)
    with pytest.raises(ValueError, match=rf"guide {guide} was trained on other images than the model \(name 'mnist', the "
                                         r"model 'fashion_mnist'\)"):
        guided(denoiser, info, 2.0, guide)
    guide = trained_on("guide.pt", None, 0.02)
    assert guided(denoiser, info, 2.0, guide)[1].source == str(guide)


def test_a_guidance_weight_that_is_not_a_finite_number_is_refused_as_such_before_the_guide_is_read(tmp_path,
                                                                                                   tiny_checkpoint):
    """guidance=nan is named as the weight it is, not blamed on the model (no labels) or, after sampling, on NaN
    samples; the guide file is not read first."""
    from edm.models.loading import guided

    denoiser, info = load_model(tiny_checkpoint(tmp_path / "c.pt"))
    for guide in (None, tmp_path / "missing.pt"):
        with pytest.raises(ValueError, match="guidance=nan: the guidance weight must be a finite number"):
            guided(denoiser, info, float("nan"), guide)


def test_the_training_set_of_a_record_with_nothing_resized_is_the_data_sets_default_config():
    """edm-encode records a native-size data set as dataset_record writes it (no filter: resample None, and no
    num_workers); scoring a latent model trained on it rebuilds that data set with the fields' defaults."""
    from edm.data import DatasetConfig, dataset_record
    from edm.models.loading import ModelInfo

    record = dataset_record(DatasetConfig(name="digits", cond=True))
    assert record["resample"] is None and record["num_workers"] is None
    latent = {"vae": "VAE", "dataset": record}
    assert ModelInfo((4, 4, 4), latent=latent).training_dataset() == DatasetConfig(name="digits", cond=True)


@pytest.mark.parametrize("objective, solver, message", [
    ("ect", "heun", r"is a consistency model \(objective=ect\); solver heun is not for consistency models: use sampler=consistency"),
    ("sct", "meanflow", r"is a consistency model \(objective=sct\); solver meanflow is not for consistency models"),
    ("meanflow", "consistency", r"is not a consistency model \(objective=meanflow\); .* sample this one with sampler=meanflow or an ODE solver"),
    ("denoising", "consistency", r"is not a consistency model \(objective=denoising\); .* sample this one with an ODE solver"),
    ("denoising", "meanflow", r"objective=denoising; sampler meanflow needs a MeanFlow model .* sample this one with an ODE solver"),
    ("ect", "consistancy", r"^solver 'consistancy' is not valid; choose one of: "),  # a misspelt solver is no solver
    ("meanflow", "heun", None), ("meanflow", "meanflow", None), ("ect", "consistency", None), ("denoising", "dpmpp_2m", None),
])
def test_each_kind_of_model_is_sampled_by_its_solvers_and_a_refusal_names_them(objective, solver, message):
    from edm.models.loading import ModelInfo

    info = ModelInfo((1, 8, 8), source="M", objective=objective)
    if message is None:
        info.check_solver(solver)
    else:
        with pytest.raises(ValueError, match=message):
            info.check_solver(solver)
