"""Fréchet distance, feature statistics, precision/recall and the FID Inception-v3 architecture."""

import hashlib
import json
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from edm import metrics
from edm.networks.inception import FIDInceptionV3
from conftest import CodePayload, command
from edm.evaluation.metrics import FeatureStats, feature_statistics, frechet_distance, image_batches, load_inception, precision_recall, reference_statistics

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form():
    """Commuting covariances: tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) = Σᵢ (√aᵢ − √bᵢ)²."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    a, b = torch.rand(5, generator=g, dtype=F64) + 0.1, torch.rand(5, generator=g, dtype=F64) + 0.1
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_frechet_distance_of_rotated_gaussians_is_rotation_invariant():
    """FD(Σ₁, Σ₂) = FD(RΣ₁Rᵀ, RΣ₂Rᵀ): a non-commuting case with a known answer."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(4, generator=g, dtype=F64) + 0.1, torch.rand(4, generator=g, dtype=F64) + 0.1
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    r, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    s1, s2 = q @ torch.diag(a) @ q.T, q @ r @ torch.diag(b) @ r.T @ q.T  # s1, s2 do not commute
    expected = frechet_distance(torch.zeros(4), torch.diag(a), torch.zeros(4), r @ torch.diag(b) @ r.T)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    assert frechet_distance(np.zeros(4), s1.numpy(), np.zeros(4), s2.numpy()) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 6, generator=g, dtype=F64), torch.randn(50, 6, generator=g, dtype=F64) * 1.5 + 0.2
    mu1, s1, mu2, s2 = x.mean(0).numpy(), np.cov(x.numpy().T), y.mean(0).numpy(), np.cov(y.numpy().T)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("which", ["mu2", "sigma2"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_frechet_distance_names_statistics_that_are_not_finite(which, value):
    """NaN or Inf (features of NaN images, a damaged file) is named, not left to the eigensolver's 'ill-conditioned'."""
    mu2, sigma2 = np.zeros(3), np.eye(3)
    {"mu2": mu2, "sigma2": sigma2}[which][0] = value
    with pytest.raises(ValueError, match=f"the statistics {which} hold NaN or Inf"):
        frechet_distance(np.zeros(3), np.eye(3), mu2, sigma2)


def test_feature_stats_is_the_sample_mean_and_covariance_whatever_the_batching():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(37, 5, generator=g, dtype=F64) @ torch.randn(5, 5, generator=g, dtype=F64)
    stats = FeatureStats()
    for part in f.split(8):
        stats.update(part)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, f.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.numpy().T), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().mean_cov()


# ----------------------------------------------------------------------------- FID code path on a tiny extractor


class TinyExtractor(torch.nn.Module):
    """A fixed random conv + global pooling: images [N, 3, H, W] -> 8 features."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(8, 3, 3, 3, generator=g)

    def forward(self, x):
        return torch.tanh(torch.nn.functional.conv2d(x, self.weight)).mean(dim=(2, 3))


def random_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g) * 2 - 1) * 0.5


def fid_between(a, b, extractor):
    mu1, s1, _ = feature_statistics(extractor, a.split(16))
    mu2, s2, _ = feature_statistics(extractor, b.split(16))
    return frechet_distance(mu1, s1, mu2, s2)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    ext = TinyExtractor()
    images = random_images(100, 0)
    fids = [fid_between(images, images + shift, ext) for shift in (0.0, 0.1, 0.3, 0.6)]
    assert abs(fids[0]) < 1e-8
    assert all(b > a for a, b in zip(fids, fids[1:])), fids
    assert fid_between(images, random_images(100, 1), ext) < fids[-1]  # another sample of the same law is close


def test_feature_statistics_stops_at_max_images():
    ext = TinyExtractor()
    images = random_images(40, 0)
    mu, sigma, n = feature_statistics(ext, images.split(16), max_images=20)
    mu20, sigma20, _ = feature_statistics(ext, [images[:20]])
    assert n == 20
    np.testing.assert_allclose(mu, mu20, rtol=1e-6)


# ----------------------------------------------------------------------------- precision / recall


def brute_force_precision(real, fake, k):
    """Kynkäänniemi et al. 2019 written out with numpy loops."""
    real, fake = real.numpy(), fake.numpy()
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radii = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    return float(np.mean([(d_fr[i] <= radii).any() for i in range(len(fake))]))


def test_precision_recall_matches_a_brute_force_count():
    g = torch.Generator().manual_seed(5)
    real = torch.randn(60, 4, generator=g, dtype=F64)
    fake = torch.randn(50, 4, generator=g, dtype=F64) * 0.6 + 0.8
    p, r = precision_recall(real, fake, k=3, batch_size=7)
    assert p == pytest.approx(brute_force_precision(real, fake, 3))
    assert r == pytest.approx(brute_force_precision(fake, real, 3))
    assert 0 < p < 1 and 0 < r < 1


def test_precision_recall_of_identical_and_disjoint_sets():
    real = torch.randn(30, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # A fake set collapsed onto a few real points is precise but has poor recall.
    p, r = precision_recall(real, real[:4].repeat(5, 1))
    assert p == 1.0 and r < 0.5


# ----------------------------------------------------------------------------- Inception-v3


def test_fid_inception_loads_pytorch_fid_keys_strictly_and_gives_pool_features(inception_weights):
    path, state = inception_weights
    model = load_inception(path)  # strict load: a missing or extra key, or a wrong shape, fails
    assert isinstance(model, FIDInceptionV3)
    torch.testing.assert_close(model.net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        features = model(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert (features >= 0).all()  # pool3 averages ReLU outputs
    assert (features[0] - features[1]).abs().max() > 1e-3 * features.abs().max()  # features depend on the image


def test_fid_inception_matches_pytorch_fid(inception_weights):
    """With pytorch-fid installed: its InceptionV3 (inputs in [0, 1]) and ours (inputs in [−1, 1]) agree."""
    pf = pytest.importorskip("pytorch_fid.inception")
    path, state = inception_weights
    ours = load_inception(path)
    original = pf.load_state_dict_from_url
    pf.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        theirs = pf.InceptionV3([3]).eval()
    finally:
        pf.load_state_dict_from_url = original
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(2 * x - 1), theirs(x)[0].flatten(1))


def test_missing_inception_weights_say_which_file_and_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    message = str(err.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "inception-2015-12-05.pkl" in message
    assert "https://github.com/mseitzer/pytorch-fid/releases" in message


def test_wrong_state_dict_is_rejected_with_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not pytorch-fid's Inception"):
        load_inception(path)


def test_pickled_detectors_need_an_explicit_opt_in(tmp_path):
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="allow_pickle"):
        load_inception(path)


def test_torchscript_detector_gets_uint8_images(tmp_path):
    """NVlabs' detectors (TorchScript .pt / .pkl) take uint8 images and return_features=True."""

    class Detector(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8
            return x.to(torch.float32).flatten(1)[:, :4] if return_features else x.float()

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(Detector()), str(path))
    with pytest.raises(ValueError, match="TorchScript archive.*allow_pickle"):  # its forward is code
        load_inception(path)
    model = load_inception(path, allow_pickle=True)
    k = torch.tensor([0, 1, 127, 255], dtype=torch.float32).reshape(1, 1, 2, 2)
    out = model(k / 127.5 - 1)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 127.0, 255.0]]))


class NVlabsVGG16Stub(torch.nn.Module):
    """NVlabs' vgg16.pt interface (forward(img, resize_images, return_lpips, return_features)), cheap features."""

    def forward(self, img: torch.Tensor, resize_images: bool = True, return_lpips: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8 and img.shape[1] == 3 and return_features
        return img.to(torch.float32).mean(dim=(2, 3)) / 255


def test_vgg16_detector_loads_only_with_the_opt_in_and_gets_uint8_rgb(tmp_path):
    path = tmp_path / "vgg16.pt"
    torch.jit.save(torch.jit.script(NVlabsVGG16Stub()), str(path))
    with pytest.raises(ValueError, match="TorchScript archive.*allow_pickle"):
        metrics.load_vgg16(path)
    model = metrics.load_vgg16(path, allow_pickle=True)
    k = torch.tensor([0, 51, 102, 255], dtype=torch.float32).reshape(1, 1, 2, 2)  # grayscale becomes RGB
    torch.testing.assert_close(model(k / 127.5 - 1), torch.full((1, 3), 102 / 255))


def test_vgg16_file_that_is_missing_or_not_a_detector_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16.pt") as err:
        metrics.load_vgg16(tmp_path / "vgg16.pt")
    assert "stylegan2-ada-pytorch/pretrained/metrics/vgg16.pt" in str(err.value)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg16-397923af.pth")
    with pytest.raises(ValueError, match="neither NVlabs' TorchScript vgg16.pt nor its vgg16.pkl"):
        metrics.load_vgg16(tmp_path / "vgg16-397923af.pth", allow_pickle=True)


# ----------------------------------------------------------------------------- image sources and cached statistics


def test_image_batches_read_png_folders_and_npz_alike(tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    images = g.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i:06d}.png")
    np.savez(tmp_path / "images.npz", arr_0=images)
    from_png = torch.cat(list(image_batches(tmp_path, batch_size=2)))
    from_npz = torch.cat(list(image_batches(tmp_path / "images.npz", batch_size=3)))
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(from_png, expected)
    torch.testing.assert_close(from_npz, expected)
    assert metrics.count_images(tmp_path) == 5
    with pytest.raises(FileNotFoundError, match="no images"):
        list(image_batches(tmp_path / "missing"))


def test_reference_statistics_are_cached_per_dataset_and_extractor(tmp_path):
    ext = TinyExtractor()
    images = random_images(30, 0)
    calls = []

    def batches():
        calls.append(1)
        return images.split(8)

    kw = dict(cache_dir=tmp_path, dataset_key="toy/set", extractor_key="tiny")
    mu, sigma = reference_statistics(batches, ext, **kw)
    mu2, sigma2 = reference_statistics(batches, ext, **kw)
    assert len(calls) == 1  # the second call read the cache
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert metrics.statistics_cache_path(tmp_path, "toy/set", "tiny").is_file()
    reference_statistics(batches, ext, cache_dir=tmp_path, dataset_key="toy/set", extractor_key="other")
    assert len(calls) == 2  # another extractor is another entry


def test_the_reference_cache_key_of_a_resized_data_set_names_its_filter():
    from edm.data import DatasetConfig

    keys = {r: metrics.dataset_reference(DatasetConfig(name="digits", resolution=16, resample=r))[1]
            for r in ("lanczos", "bilinear")}
    assert keys["lanczos"].startswith("digits-16px-lanczos-1797-") and keys["bilinear"].startswith("digits-16px-bilinear-1797-")
    assert metrics.dataset_reference(DatasetConfig(name="digits"))[1].startswith("digits-8px-1797-")  # native: no filter


def test_two_folders_of_one_name_and_size_do_not_share_cached_statistics(tmp_path):
    """Folders a/train (black) and b/train (white) of as many images at one resolution: their keys differ (the
    resolved root is in the hash), and a cache entry found under a key not its own is refused, naming both."""
    from PIL import Image

    from edm.data import DatasetConfig

    for name, value in (("a", 0), ("b", 255)):
        (tmp_path / name / "train").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / name / "train" / f"{i}.png")
    configs = [DatasetConfig(name="folder", root=str(tmp_path / name / "train")) for name in "ab"]
    (batches_a, key_a), (batches_b, key_b) = (metrics.dataset_reference(c, 4) for c in configs)
    assert key_a != key_b and key_a.startswith("folder-train-8px-4-")
    assert metrics.statistics_cache_path(tmp_path, "data/a_b", "x") != metrics.statistics_cache_path(tmp_path, "data/a/b", "x")
    ext, cache = TinyExtractor(), tmp_path / "cache"
    mu_a, _ = reference_statistics(batches_a, ext, cache_dir=cache, dataset_key=key_a, extractor_key="tiny")
    mu_b, _ = reference_statistics(batches_b, ext, cache_dir=cache, dataset_key=key_b, extractor_key="tiny")
    assert not np.allclose(mu_a, mu_b)
    path_a = metrics.statistics_cache_path(cache, key_a, "tiny")
    path_a.replace(metrics.statistics_cache_path(cache, key_b, "tiny"))  # a's numbers where b's belong
    with pytest.raises(ValueError, match=rf"were made of '{key_a} -- tiny', not '{key_b} -- tiny': delete the file"):
        reference_statistics(batches_b, ext, cache_dir=cache, dataset_key=key_b, extractor_key="tiny")


# ----------------------------------------------------------------------------- evaluate_images and edm-eval


def save_npz_images(path, images):
    """[-1, 1] images [N, C, H, W] -> uint8 NHWC .npz (the layout edm-sample writes)."""
    k = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(path, images=k)
    return torch.from_numpy(k).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_a_reference_folder_with_an_image_replaced_in_place_is_not_read_from_the_cache(tmp_path):
    """The folder keeps its path and image count; the replaced file's size/mtime change its cache key."""
    import os

    from PIL import Image

    ext, ref = TinyExtractor(), tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    fake = tmp_path / "fake.npz"
    save_npz_images(fake, random_images(6, 0))
    kw = dict(extractor_key="tiny", cache_dir=tmp_path / "cache", batch_size=4)
    first = metrics.evaluate_images(fake, ext, ref=ref, **kw)["fid"]
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(ref / "0.png")  # same name, other pixels
    os.utime(ref / "0.png", ns=(1, 1))  # and an mtime of its own
    second = metrics.evaluate_images(fake, ext, ref=ref, **kw)["fid"]
    uncached = metrics.evaluate_images(fake, ext, ref=ref, **kw | {"cache_dir": tmp_path / "fresh"})["fid"]
    assert second == pytest.approx(uncached, rel=1e-9) and second != pytest.approx(first, rel=1e-6)


def test_evaluate_images_gives_one_fid_for_every_kind_of_reference(tmp_path):
    ext = TinyExtractor()
    fake = save_npz_images(tmp_path / "fake.npz", random_images(40, 0) + 0.2)
    real = save_npz_images(tmp_path / "real.npz", random_images(50, 1))
    mu, sigma, n = feature_statistics(ext, real.split(16))
    metrics.save_statistics(tmp_path / "stats.npz", mu, sigma, n)
    expected = fid_between(fake, real, ext)
    kw = dict(extractor_key="tiny", cache_dir=tmp_path / "cache", batch_size=16)
    from_stats = metrics.evaluate_images(tmp_path / "fake.npz", ext, ref=tmp_path / "stats.npz", **kw)
    from_images = metrics.evaluate_images(tmp_path / "fake.npz", ext, ref=tmp_path / "real.npz", **kw)
    from_batches = metrics.evaluate_images(tmp_path / "fake.npz", ext, ref_batches=lambda: real.split(7), ref_key="real", **kw)
    for result in (from_stats, from_images, from_batches):
        assert result["fid"] == pytest.approx(expected, rel=1e-6) and result["num_images"] == 40
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # images and batches were cached, stats need no cache
    with_pr = metrics.evaluate_images(tmp_path / "fake.npz", ext, ref=tmp_path / "real.npz", with_precision_recall=True, **kw)
    p, r = precision_recall(ext(real).double(), ext(fake).double())
    assert (with_pr["precision"], with_pr["recall"]) == pytest.approx((p, r))
    assert with_pr["precision_recall_features"] == "tiny"
    with pytest.raises(ValueError, match="needs reference images"):
        metrics.evaluate_images(tmp_path / "fake.npz", ext, ref=tmp_path / "stats.npz", with_precision_recall=True, **kw)


def test_reference_statistics_of_another_feature_dimension_are_refused_naming_the_file_and_the_way_out(tmp_path):
    """A statistics file of 64 features (FD_cls's, say) against an extractor of 8 names the file, both dimensions
    and how to make statistics of the extractor."""
    save_npz_images(tmp_path / "fake.npz", random_images(20, 0))
    np.savez(tmp_path / "other.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"other.npz are of 64 features, but tiny gives 8: .*metric=ref"):
        metrics.evaluate_images(tmp_path / "fake.npz", TinyExtractor(), ref=tmp_path / "other.npz", extractor_key="tiny")


def test_reference_statistics_that_record_another_extractor_are_refused_and_the_same_weights_renamed_are_not(tmp_path):
    """edm's statistics files record their extractor's key (file stem and SHA-256 prefix): another hash is refused
    naming both; the same hash under another file name, and a file that records none (NVlabs', pytorch-fid's), pass."""
    save_npz_images(tmp_path / "fake.npz", random_images(20, 0))
    real = random_images(30, 1)
    mu, sigma, n = feature_statistics(TinyExtractor(), real.split(16))
    metrics.save_statistics(tmp_path / "ref.npz", mu, sigma, n, feature_extractor="inception:0123456789ab")
    metrics.save_statistics(tmp_path / "plain.npz", mu, sigma, n)
    kw = dict(ref=tmp_path / "ref.npz", batch_size=16)
    with pytest.raises(ValueError, match=r"ref.npz were made by feature extractor inception:0123456789ab, the images' "
                                         r"features are inception:ba9876543210's"):
        metrics.evaluate_images(tmp_path / "fake.npz", TinyExtractor(), extractor_key="inception:ba9876543210", **kw)

    def no_features(images):
        raise AssertionError("the images' features were taken before the statistics were refused")
    with pytest.raises(ValueError, match="were made by feature extractor"):  # before any feature is taken
        metrics.evaluate_images(tmp_path / "fake.npz", no_features, extractor_key="inception:ba9876543210", **kw)
    same = metrics.evaluate_images(tmp_path / "fake.npz", TinyExtractor(), extractor_key="renamed:0123456789ab", **kw)
    plain = metrics.evaluate_images(tmp_path / "fake.npz", TinyExtractor(), extractor_key="inception:ba9876543210",
                                    ref=tmp_path / "plain.npz", batch_size=16)
    assert same["fid"] == plain["fid"] > 0


def test_the_images_are_counted_on_a_progress_bar_only_when_asked(tmp_path, capsys):
    """progress=True: the generated images' features on a bar (stderr) out of their number, the reference's beside;
    progress=False: stderr stays empty. The numbers are the same."""
    ext = TinyExtractor()
    save_npz_images(tmp_path / "fake.npz", random_images(40, 0))
    save_npz_images(tmp_path / "real.npz", random_images(30, 1))
    kw = dict(ref=tmp_path / "real.npz", extractor_key="tiny", batch_size=16)
    quiet = metrics.evaluate_images(tmp_path / "fake.npz", ext, **kw)
    assert capsys.readouterr().err == ""
    shown = metrics.evaluate_images(tmp_path / "fake.npz", ext, **kw, progress=True)
    err = capsys.readouterr().err
    assert "features:" in err and "/40 [" in err and "img" in err and shown == quiet


def test_precision_recall_in_other_features_keeps_the_fid_and_names_them(tmp_path):
    """pr_extractor (NVlabs' VGG-16) gives precision/recall its features; FID stays the extractor's."""
    ext, other = TinyExtractor(), TinyExtractor(seed=7)
    fake = save_npz_images(tmp_path / "fake.npz", random_images(40, 0) + 0.1)
    real = save_npz_images(tmp_path / "real.npz", random_images(50, 1))
    result = metrics.evaluate_images(tmp_path / "fake.npz", ext, ref=tmp_path / "real.npz", extractor_key="tiny",
                                     batch_size=16, with_precision_recall=True, pr_extractor=other, pr_extractor_key="vgg16")
    assert result["fid"] == pytest.approx(fid_between(fake, real, ext), rel=1e-6)
    assert (result["precision"], result["recall"]) == pytest.approx(precision_recall(other(real).double(), other(fake).double()))
    assert (result["precision"], result["recall"]) != pytest.approx(precision_recall(ext(real).double(), ext(fake).double()))
    assert result["precision_recall_features"] == "vgg16" and result["feature_extractor"] == "tiny"


def test_dataset_batches_map_uint8_items_to_the_model_range():
    images = torch.tensor([0, 255, 128], dtype=torch.uint8).reshape(3, 1, 1, 1)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(3))
    (batch,) = list(metrics.dataset_batches(dataset, batch_size=4))
    torch.testing.assert_close(batch.reshape(-1), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))


def evaluate_script(*args, cwd):
    return subprocess.run([command("edm-eval"), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_edm_eval_without_inception_weights_says_what_to_get(tmp_path):
    save_npz_images(tmp_path / "fake.npz", random_images(4, 0))
    proc = evaluate_script("metric=fid", f"images={tmp_path / 'fake.npz'}", f"metric.ref={tmp_path / 'fake.npz'}",
                           f"metric.inception={tmp_path / 'none.pth'}", cwd=tmp_path)
    assert proc.returncode == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr and "curl" in proc.stderr


def test_a_wrong_inception_file_is_named_in_a_short_message_that_never_advises_unsafe_loading(tmp_path):
    """No file given, a checkpoint of another network (a short account of the keys, not each one), a text file (not
    torch's advice to load it with weights_only=False, which would run a pickle's code)."""
    from edm.evaluation.metrics import load_inception

    with pytest.raises(FileNotFoundError, match="no Inception weights file given \\(the fid metric's `inception` option"):
        load_inception(None)
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(300)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is not pytorch-fid's Inception state dict \(\d+ of its \d+ keys "
                                         r"missing, e.g. .*; 300 unexpected, e.g. layer0.weight") as err:
        load_inception(tmp_path / "other.pt")
    assert len(str(err.value)) < 2000
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(ValueError, match=r"cannot read .*notes.pth as a weights file") as err:
        load_inception(tmp_path / "notes.pth")
    assert "weights_only" not in str(err.value)


def test_edm_eval_refuses_two_references_for_fid(tmp_path):
    """metric.ref and dataset both name FID's reference: one would be ignored, so neither is taken."""
    from edm.cli import compose
    from edm.cli.evaluate import run

    save_npz_images(tmp_path / "fake.npz", random_images(2, 0))
    cfg = compose("evaluate", ["metric=fid", f"images={tmp_path / 'fake.npz'}", f"metric.ref={tmp_path / 'fake.npz'}",
                               "dataset=digits"])
    with pytest.raises(ValueError, match=r"metric.ref=.*fake.npz and dataset=digits both name FID's reference: give one"):
        run(cfg, "fid")


def test_images_a_running_command_still_writes_are_refused_before_any_work(tmp_path):
    """edm-eval of a folder (or an .npz in it) whose FolderLock a running edm-sample holds names the holder; once
    it is released the same command goes on to its next check. The lock's record is left as it was."""
    from edm.cli import compose
    from edm.cli.evaluate import run
    from edm.evaluation.scorers import NoDatasetError
    from edm.files import FolderLock, folder_holder

    out = tmp_path / "out"
    out.mkdir()
    save_npz_images(out / "samples.npz", random_images(2, 0))
    cfg = compose("evaluate", ["metric=fd_cls", f"images={out / 'samples.npz'}"])
    with FolderLock(out, key="out", owner="sampler"):
        record = (out / ".lock").read_text()
        with pytest.raises(ValueError, match=rf"samples.npz is being written: {re.escape(str(out))} is in use by a "
                                             r"sampler \(pid \d+"):
            run(cfg, "fd_cls")
        assert (out / ".lock").read_text() == record and folder_holder(out).startswith("a sampler")
    assert folder_holder(out) is None and folder_holder(tmp_path / "never-locked") is None
    with pytest.raises(NoDatasetError):  # released: past that check, to the missing data set
        run(cfg, "fd_cls")


def test_images_without_a_data_set_are_pointed_to_the_model_their_report_names(tmp_path):
    """FD_cls of edm-sample's images with no dataset=: the refusal names the checkpoint of the folder's report.json,
    whose training set they would be scored against; images without a report get the plain refusal."""
    from edm.cli import compose
    from edm.cli.evaluate import run
    from edm.evaluation.scorers import NoDatasetError

    (tmp_path / "out").mkdir()
    save_npz_images(tmp_path / "out" / "samples.npz", random_images(2, 0))
    save_npz_images(tmp_path / "loose.npz", random_images(2, 0))
    (tmp_path / "out" / "report.json").write_text(json.dumps({"checkpoint": "/runs/a/checkpoint-00000010.pt"}))
    with pytest.raises(NoDatasetError, match=r"FD_cls needs the data set .*; the images' report names their model: "
                                             r"checkpoint=/runs/a/checkpoint-00000010.pt scores them"):
        run(compose("evaluate", ["metric=fd_cls", f"images={tmp_path / 'out' / 'samples.npz'}"]), "fd_cls")
    with pytest.raises(NoDatasetError, match=r"FD_cls needs the data set its classifier learns: dataset=NAME") as err:
        run(compose("evaluate", ["metric=fd_cls", f"images={tmp_path / 'loose.npz'}"]), "fd_cls")
    assert "report" not in str(err.value)


def test_reference_statistics_go_to_a_new_npz_file_unless_overwrite(tmp_path):
    """metric=ref's dest: a folder, a name np.savez would add .npz to (the report would name another file) and an
    existing file (statistics of other images, perhaps) are refused before any work; overwrite=true replaces."""
    from edm.evaluation.metrics import RefConfig, check_reference_dest

    (tmp_path / "refs").mkdir()
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "old.npz").write_bytes(b"statistics")
    for dest, message in ((None, "needs metric.dest=FILE.npz"), ("refs", r"is a folder: .*refs/ref.npz"),
                          ("stats.np", r"ending in .npz \(e.g. .*stats.npz\)"),
                          ("dir.npz", "is a folder: name the statistics file"),
                          ("old.npz", "exists: pass metric.overwrite=true")):
        with pytest.raises((ValueError, FileExistsError), match=message):
            check_reference_dest(RefConfig(dest=None if dest is None else str(tmp_path / dest)))
    check_reference_dest(RefConfig(dest=str(tmp_path / "old.npz"), overwrite=True))
    check_reference_dest(RefConfig(dest=str(tmp_path / "new.npz")))


def test_edm_eval_refuses_a_key_its_metric_does_not_read(tmp_path):
    """Each metric's options are its own typed group: a key of another metric fails at composition, and a
    command without a metric names the choices."""
    from hydra.errors import ConfigCompositionException

    from edm.cli import compose

    with pytest.raises(ConfigCompositionException, match="dest"):
        compose("evaluate", ["metric=fid", "metric.dest=y.npz"])
    with pytest.raises(ConfigCompositionException, match="classifier"):
        compose("evaluate", ["metric=bpd", "metric.classifier.steps=3"])
    assert compose("evaluate", ["metric=fd_cls", "metric.classifier.steps=3"]).metric.classifier.steps == 3
    proc = evaluate_script("images=x", cwd=tmp_path)
    assert proc.returncode == 1 and "say what to compute: metric=fid | fd_cls | bpd | ref" in proc.stderr


def test_edm_eval_pr_features_need_precision_recall(tmp_path, inception_weights):
    path, _ = inception_weights
    vgg = tmp_path / "vgg16.pt"
    torch.jit.save(torch.jit.script(NVlabsVGG16Stub()), str(vgg))
    save_npz_images(tmp_path / "fake.npz", random_images(4, 0))
    proc = evaluate_script("metric=fid", f"images={tmp_path / 'fake.npz'}", f"metric.ref={tmp_path / 'fake.npz'}",
                           f"metric.inception={path}", f"metric.pr_features={vgg}", "metric.allow_pickle=true", cwd=tmp_path)
    assert proc.returncode == 1 and "pr_features is the detector of precision/recall: set fid's precision_recall=true too" in proc.stderr


@pytest.mark.slow
def test_evaluate_script_fid_and_ref_with_a_random_inception(tmp_path, inception_weights):
    path, _ = inception_weights
    save_npz_images(tmp_path / "fake.npz", random_images(3, 0))
    save_npz_images(tmp_path / "real.npz", random_images(3, 1))
    proc = evaluate_script("metric=ref", f"data={tmp_path / 'real.npz'}", f"metric.inception={path}",
                           f"metric.dest={tmp_path / 'ref.npz'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "ref.npz") as ref:  # the statistics name the weights that made them
        assert str(ref["feature_extractor"]) == f"{path.stem}:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    proc = evaluate_script("metric=fid", f"images={tmp_path / 'fake.npz'}", f"metric.ref={tmp_path / 'ref.npz'}",
                           f"metric.inception={path}", f"report={tmp_path / 'report.json'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reported = json.loads((tmp_path / "report.json").read_text())["metrics"]
    printed = json.loads(proc.stdout)  # stdout holds the numbers alone; the log (3 images: warned) is on stderr
    assert "FID of 3 images" in proc.stderr
    assert reported["fid"]["fid"] > 0 and printed | {"images": str(tmp_path / "fake.npz")} == reported["fid"]
    assert set(reported["files"]) == {"fid.inception_sha256", "fid.ref_sha256"}  # the files its options named


def test_edm_eval_merges_one_metric_into_a_report_and_keeps_the_others(tmp_path):
    """metrics.NAME gets the numbers and the scored images, metrics.files this metric's hashes; another metric's
    entry and hashes stay, and flat keys of these numbers directly under metrics go. edm-sample's report takes the
    scores of its own folder's images only: others are refused before any work."""
    from edm.cli.evaluate import check_report, merge_report

    path = tmp_path / "report.json"
    path.write_text(json.dumps({"seeds": "0-9", "output": "relative/to/where/it/ran/samples.npz", "metrics": {
        "files": {"fid.inception_sha256": "old", "fd_cls.x_sha256": "kept"}, "fd_cls": {"fd_cls": 4.0, "num_images": 10},
        "fid": 9.0, "num_images": 10}}))
    for images in (tmp_path, tmp_path / "samples.npz"):
        check_report(str(path), str(images))
    merge_report(str(path), "fid", {"fid": 3.0, "num_images": 20}, {"fid.inception_sha256": "new"}, str(tmp_path))
    assert json.loads(path.read_text()) == {"seeds": "0-9", "output": "relative/to/where/it/ran/samples.npz", "metrics": {
        "files": {"fid.inception_sha256": "new", "fd_cls.x_sha256": "kept"}, "fd_cls": {"fd_cls": 4.0, "num_images": 10},
        "fid": {"fid": 3.0, "num_images": 20, "images": str(tmp_path.resolve())}}}
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=rf"report={path} is edm-sample's report of the images in {tmp_path}, not of "
                                         rf"{tmp_path / 'other'}: score images={tmp_path / 'samples.npz'} \(its images\)"):
        check_report(str(path), str(tmp_path / "other"))
    check_report(str(tmp_path / "other" / "scores.json"), str(tmp_path / "other"))  # a report of its own: any images
    path.write_text(json.dumps({"output": "out"}))  # a format=png folder's report
    with pytest.raises(ValueError, match=rf"score images={tmp_path} \(its images\)"):
        check_report(str(path), str(tmp_path / "other"))


def test_edm_eval_refuses_a_report_that_is_a_folder_or_not_a_json_object_before_any_scoring(tmp_path):
    """report= a folder, a file that is not JSON, a file holding JSON that is not an object: each is refused by name,
    with the fix, before the images (here absent, which would be refused otherwise) are even looked at."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.json").write_text("not json")
    (tmp_path / "list.json").write_text("[1]")
    missing = tmp_path / "missing.npz"
    for report, refusal in (("folder", rf"report=.*folder is a folder: give the JSON file .*report=.*folder/report.json"),
                            ("notes.json", r"report=.*notes.json cannot be read as JSON \(.*\): give another report=PATH, or delete it"),
                            ("list.json", r"report=.*list.json holds JSON that is not an object .*: give another report=PATH, or delete it")):
        proc = evaluate_script("metric=fid", f"images={missing}", f"metric.ref={missing}", f"report={tmp_path / report}",
                               cwd=tmp_path)
        assert proc.returncode == 1 and re.search(f"edm-eval: error: {refusal}", proc.stderr), proc.stderr
        assert "Traceback" not in proc.stderr and "missing.npz" not in proc.stderr
    assert (tmp_path / "notes.json").read_text() == "not json" and (tmp_path / "list.json").read_text() == "[1]"


@pytest.mark.parametrize("metrics_entry", [None, [1], {"files": "x"}])
def test_a_report_whose_metrics_entry_is_not_an_object_is_refused_before_scoring_not_after(tmp_path, metrics_entry):
    """A report= whose "metrics" (or its "files") is no object could not take the numbers: refused by check_report,
    before any work, naming the file, not an AttributeError once the scores are computed."""
    from edm.cli.evaluate import check_report, merge_report

    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"metrics": metrics_entry}))
    with pytest.raises(ValueError, match=r"report=.*scores.json holds a \"metrics\" entry that is not an object .*: "
                                         "give another report=PATH, or mend or delete it"):
        check_report(str(path), None)
    with pytest.raises(ValueError, match="holds a \"metrics\" entry that is not an object"):
        merge_report(str(path), "fd_cls", {"fd_cls": 1.0}, {}, None)


@pytest.mark.parametrize("folder", [".", "new"])
def test_two_merges_into_one_report_at_once_keep_both_metrics(tmp_path, monkeypatch, folder):
    """Two edm-eval runs that finish together merge into one report= in turn: each reads the other's numbers before it
    writes (a slow write stands for the race), so neither metric is lost, in a folder the first write makes too."""
    import threading
    import time

    import edm.cli.evaluate as evaluate

    slow_write = evaluate.write_json
    monkeypatch.setattr(evaluate, "write_json", lambda *a, **k: (time.sleep(0.3), slow_write(*a, **k)))
    path = tmp_path / folder / "scores.json"
    merges = [threading.Thread(target=evaluate.merge_report, args=(str(path), name, {name: 1.0}, {}, None))
              for name in ("fid", "fd_cls")]
    for merge in merges:
        merge.start()
    for merge in merges:
        merge.join()
    assert {"fid", "fd_cls"} <= json.loads(path.read_text())["metrics"].keys()


def test_a_torchscript_detector_runs_only_with_the_opt_in(tmp_path):
    marker = tmp_path / "ran"

    class Evil(torch.nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            torch.save(x, self.path)  # a side effect from the file's own code
            return x.float().flatten(1)

    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(Evil(str(marker))), str(path))
    with pytest.raises(ValueError, match="TorchScript archive.*allow_pickle"):
        metrics.load_inception(path)
    assert not marker.exists()
    metrics.load_inception(path, allow_pickle=True)(torch.zeros(1, 3, 2, 2))
    assert marker.exists()  # the control: with the opt-in, the file's code does run


def test_a_pickle_detector_is_not_unpickled_without_the_opt_in(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(pickle.dumps(CodePayload(marker)))
    with pytest.raises(ValueError, match="pickle: loading it runs code"):
        metrics.load_inception(path)
    assert not marker.exists()


def test_reference_statistics_carrying_code_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(2), sigma=np.array([CodePayload(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        metrics.load_statistics(path)
    assert not marker.exists()


def test_the_cut_short_check_takes_pngs_other_tools_wrote_that_image_readers_take(tmp_path):
    """Only a PNG cut short is refused before any work: a PNG with bytes after its IEND chunk (which decoders ignore)
    and a JPEG under a .PNG name are images the scorer reads, as is any whole PNG; an empty .png or one cut inside
    its data is refused."""
    import io

    from PIL import Image

    from edm.data import read_image
    from edm.evaluation.metrics import check_image_source
    from edm.files import png_is_whole

    folder = tmp_path / "theirs"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 60, dtype=np.uint8)).save(folder / "whole.png")
    whole = (folder / "whole.png").read_bytes()
    (folder / "padded.png").write_bytes(whole + b"\0" * 16)  # e.g. a download padded to a block size
    jpeg = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(jpeg, "JPEG")
    (folder / "named.PNG").write_bytes(jpeg.getvalue())
    for name in ("whole.png", "padded.png", "named.PNG"):
        assert read_image(folder / name).shape[:2] == (8, 8), name
    check_image_source(folder)  # not refused
    assert png_is_whole(folder / "padded.png")
    for name, data in (("empty.png", b""), ("cut.PNG", whole[:-20]), ("cut-padded.png", whole[:40])):
        (folder / name).write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{folder / name} is a PNG cut short")):
            check_image_source(folder)
        (folder / name).unlink()


def test_edm_eval_checks_its_images_before_any_work(tmp_path, monkeypatch):
    """A missing path, an empty folder, a file that is not an .npz, a PNG cut short and images of another shape than
    the data set's are named at once: no classifier is trained first (the cache stays empty); the command prints no
    traceback."""
    from PIL import Image

    from edm.cli import compose
    from edm.cli.evaluate import run

    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "big").mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 60 * i, dtype=np.uint8)).save(tmp_path / "big" / f"{i}.png")
    (tmp_path / "cut").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(tmp_path / "cut" / f"{i}.png")
    whole = (tmp_path / "cut" / "1.png").read_bytes()
    (tmp_path / "cut" / "1.png").write_bytes(whole[:-20])  # a copy cut short: PIL reads its pixels only when scored
    (tmp_path / "npz-out").mkdir()  # an edm-sample format=npz folder
    save_npz_images(tmp_path / "npz-out" / "samples.npz", random_images(2, 0))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDM_CACHE", str(tmp_path / "cache"))
    for images, message in (("nope", "no images at 'nope'"), ("empty", "no image files"),
                            ("npz-out", "it holds samples.npz, so give images=npz-out/samples.npz"),
                            ("bad.npz", "bad.npz is not a readable .npz (not a zip archive"),
                            ("cut", "cut/1.png is a PNG cut short")):
        with pytest.raises(Exception) as refused:
            run(compose("evaluate", ["metric=fd_cls", f"images={images}", "dataset=digits"]), "fd_cls")
        assert message in str(refused.value)
    proc = subprocess.run([command("edm-eval"), "metric=fd_cls", "images=big", "dataset=digits"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=os.environ | {"EDM_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "the images are [1, 16, 16], data set digits has [1, 8, 8] ones" in proc.stderr and "dataset.resolution=16" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_the_shape_of_an_image_source_is_read_without_its_pixels(tmp_path):
    """A folder's first image; an .npz's array header (NHWC or NCHW, compressed too); a bad shape is named."""
    from PIL import Image

    from edm.evaluation.metrics import source_image_shape

    (tmp_path / "folder").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(tmp_path / "folder" / "0.png")
    np.savez(tmp_path / "nhwc.npz", images=np.zeros((5, 16, 16, 1), dtype=np.uint8))
    np.savez_compressed(tmp_path / "nchw.npz", arr_0=np.zeros((5, 3, 8, 8), dtype=np.uint8))
    assert [source_image_shape(tmp_path / name) for name in ("folder", "nhwc.npz", "nchw.npz")] == [
        (3, 6, 6), (1, 16, 16), (3, 8, 8)]
    np.savez(tmp_path / "flat.npz", images=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"flat.npz:images must be \[N, H, W, C\]"):
        source_image_shape(tmp_path / "flat.npz")


def test_an_npz_of_other_than_uint8_pixels_is_refused_naming_its_dtype(tmp_path):
    """Floats in [0, 1] (or any dtype but uint8) would be scored as other pixels: refused, with the conversion."""
    from edm.evaluation.metrics import read_images

    np.savez(tmp_path / "float.npz", images=np.full((4, 8, 8, 3), 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match=r"float.npz:images holds float32 values; the images to score must be uint8 "
                                         r"pixels 0..255 .*astype\(np.uint8\)"):
        read_images(tmp_path / "float.npz")
    np.savez(tmp_path / "int.npz", images=np.full((4, 8, 8, 3), 128, dtype=np.int64))
    with pytest.raises(ValueError, match="int.npz:images holds int64 values"):
        list(image_batches(tmp_path / "int.npz"))


def test_a_folder_image_of_another_size_is_named_with_the_size_of_the_first(tmp_path):
    from PIL import Image

    for i, size in enumerate((8, 8, 8, 9)):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(ValueError, match=r"3.png is 9×9, 3 channels but .*0.png is 8×8, 3 channels: the images of "
                                         r".* to score must share one size"):
        list(image_batches(tmp_path, batch_size=2))


def test_a_folder_image_cut_short_or_damaged_is_named_by_its_path(tmp_path):
    """A PNG cut short after its header (PIL: "image file is truncated", no file named) or not an image at all is
    a ValueError naming the file and what to do, whichever batch it is in."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(buffer.getvalue())
    (tmp_path / "2.png").write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"2.png is not a readable image \(OSError: image file is truncated.*\): "
                                         "replace or delete it"):
        list(image_batches(tmp_path, batch_size=2))
    (tmp_path / "2.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"2.png is not a readable image \(UnidentifiedImageError"):
        list(image_batches(tmp_path, batch_size=2))


def test_the_reference_key_of_a_folder_data_set_changes_when_one_of_its_files_does(tmp_path):
    """Same root, names and count: an image rewritten in place (another size or mtime) is another cache key, so
    FID's reference statistics of `dataset=folder` are made again, not read from the cache."""
    import os

    from PIL import Image

    from edm.data import DatasetConfig

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    config = DatasetConfig(name="folder", root=str(tmp_path))
    before = metrics.dataset_reference(config)[1]
    assert metrics.dataset_reference(config)[1] == before
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "2.png")
    os.utime(tmp_path / "2.png", ns=(1, 1))
    assert metrics.dataset_reference(config)[1] != before


def test_an_npz_of_images_without_a_channel_axis_is_named(tmp_path):
    from edm.evaluation.metrics import count_images

    np.savez(tmp_path / "flat.npz", images=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"flat.npz:images must be \[N, H, W, C\] .*got shape \[4, 8, 8\]"):
        count_images(tmp_path / "flat.npz")


def test_a_frechet_distance_of_no_more_images_than_features_is_warned_of(caplog):
    """N ≤ d: the covariance of N images has rank ≤ N − 1 < d, and the distance is mostly the sample-size bias."""
    import logging

    from edm.evaluation.metrics import warn_few_images

    with caplog.at_level(logging.WARNING, logger="edm.evaluation.metrics"):
        warn_few_images("FD_cls", 65, 64)
        assert not caplog.records
        warn_few_images("FD_cls", 64, 64)
    assert "FD_cls of 64 images: their feature covariance has rank at most 63, below the 64 features" in caplog.text
