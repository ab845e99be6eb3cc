"""edm/data (registry, sets, stream): data sets, the (seed, epoch) data stream and its shards, image grids."""

from __future__ import annotations

import gzip
import re
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from edm.data import DatasetConfig, registry
from edm.data import FASHION_MNIST_DEBIAN_ROOT, BadImagesError, DatasetNotFoundError, ImageFolderDataset, StreamBatchSampler, XFlip, build_dataset, epoch_permutation, load_cifar10, load_digits, load_mnist, make_loader, read_idx, to_model_space, to_uint8

from conftest import folder_with_bad_files, png

# ----------------------------------------------------------------------------- embedded digits


def test_digits_are_sklearn_digits_in_unit_range():
    from sklearn.datasets import load_digits as sk

    ds = load_digits()
    bunch = sk()
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes, ds.label_dim) == (1797, 1, 8, 10, 0)
    image, label, index = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8) and label.shape == (0,) and index == 5
    # 0..16 maps linearly onto 0..255, then onto [-1, 1]
    y = to_model_space(image)[0].double()
    np.testing.assert_allclose(y.numpy(), bunch.images[5] / 8.0 - 1.0, atol=1 / 127.5)
    assert float(to_model_space(ds.images).min()) == -1.0 and float(to_model_space(ds.images).max()) == 1.0
    # every image and label is scikit-learn's (read from its digits.csv.gz without importing it)
    assert np.array_equal(ds.images[:, 0].numpy(), np.rint(bunch.images * (255 / 16)).astype(np.uint8))
    assert np.array_equal(load_digits(cond=True).labels.numpy(), bunch.target)


def test_digits_without_scikit_learn_say_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(DatasetNotFoundError, match="pip install scikit-learn"):
        load_digits()


def test_a_dataset_root_given_to_the_bundled_digits_is_refused_naming_the_sets_that_read_one():
    with pytest.raises(ValueError, match=r"dataset=digits is bundled and reads no dataset.root \(got /data/fmnist\).*fashion_mnist"):
        build_dataset(DatasetConfig("digits", root="/data/fmnist"))


def test_the_refusal_of_a_root_for_a_bundled_set_names_every_registered_set_that_reads_one(monkeypatch):
    """The data sets it offers are DATASETS' entries outside BUNDLED: a new one is named without another list."""
    from types import MappingProxyType

    from edm.data import registry

    monkeypatch.setattr(registry, "DATASETS", MappingProxyType({**registry.DATASETS, "lsun": registry._folder}))
    with pytest.raises(ValueError, match=r"dataset=mnist, fashion_mnist, cifar10, folder, latent or lsun$"):
        registry.check_dataset(DatasetConfig("digits", root="/data/lsun"))


@pytest.mark.parametrize("name", sorted(registry.DATASETS))
def test_a_data_set_outside_bundled_reads_its_root_and_a_bundled_one_none(name, tmp_path):
    """BUNDLED is exactly the sets that read no dataset.root: a set outside it finds nothing in an empty root (were it
    bundled, a root given to it would be ignored, not refused), and a bundled one builds without a root."""
    if name in registry.BUNDLED:
        assert len(registry.DATASETS[name](DatasetConfig(name))) > 0
        return
    try:
        registry.DATASETS[name](DatasetConfig(name, root=str(tmp_path)))
    except (FileNotFoundError, ValueError):
        return
    pytest.fail(f"dataset {name!r} builds from an empty dataset.root, so it reads none: name it in "
                "edm.data.registry.BUNDLED (docs/design.md, Conventions: a new data set)")


def test_digits_cond_labels_are_one_hot_of_the_class():
    from sklearn.datasets import load_digits as sk

    ds = load_digits(cond=True)
    target = sk().target
    assert ds.label_dim == 10
    for i in (0, 17, 1796):
        _, label, _ = ds[i]
        assert label.shape == (10,) and label.sum() == 1 and int(label.argmax()) == target[i]


def test_digits_resolution_resizes():
    ds = load_digits(resolution=16)
    assert ds.resolution == 16 and ds[0][0].shape == (1, 16, 16)
    # downsampling the upsampled image approximately recovers the original
    back = torch.nn.functional.avg_pool2d(ds.images[:50].float(), 2)
    assert (back - load_digits().images[:50].float()).abs().mean() < 20


def test_xflip_doubles_with_mirrored_copies():
    base = load_digits()
    ds = XFlip(base)
    assert len(ds) == 2 * len(base) and ds.resolution == 8 and ds.label_dim == 0
    assert torch.equal(ds[3][0], base[3][0])
    assert torch.equal(ds[len(base) + 3][0], base[3][0].flip(-1))
    assert not torch.equal(ds[len(base) + 3][0], base[3][0])


def test_build_dataset_max_size_and_xflip():
    ds = build_dataset(DatasetConfig(name="digits", max_size=10, xflip=True, cond=True))
    assert len(ds) == 20 and ds.label_dim == 10


def test_a_max_size_whose_first_images_miss_classes_is_warned_of_naming_them(tmp_path, caplog):
    """The first N images of a set stored in class order (class folders) are no sample of it: classes 1 and 2 are
    named; a subset that holds every class, or a set without classes, says nothing."""
    import logging

    for cls in ("a", "b", "c"):
        for k in range(3):
            _png(tmp_path / cls / f"{k}.png", np.full((8, 8, 3), 40 * k, dtype=np.uint8))
    with caplog.at_level(logging.WARNING, logger="edm.data.registry"):
        assert len(build_dataset(DatasetConfig(name="folder", root=str(tmp_path), max_size=3))) == 3
    assert "dataset.max_size=3 keeps the first 3 of 9 items, which hold no image of class(es) 1, 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edm.data.registry"):
        build_dataset(DatasetConfig(name="folder", root=str(tmp_path), max_size=7))
        build_dataset(DatasetConfig(name="digits", max_size=30))  # digits mixes its classes
    assert "max_size" not in caplog.text


# ----------------------------------------------------------------------------- MNIST-style IDX files


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def _fake_mnist(folder: Path, n: int = 6, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    _write_idx(folder / f"train-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


def test_read_idx_round_trip_and_bad_file(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array, compress=True)
    _write_idx(tmp_path / "b", array, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), array)
    (tmp_path / "c").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "c")
    (tmp_path / "d").write_bytes(b"\x00\x00\x08\x03\x00")  # a header cut short
    with pytest.raises(ValueError, match="d is not an unsigned-byte IDX file \\(or its header is cut short\\)"):
        read_idx(tmp_path / "d")
    (tmp_path / "e.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:20])  # a download cut short
    with pytest.raises(ValueError, match=r"e.gz cannot be read \(EOFError"):
        read_idx(tmp_path / "e.gz")


def test_mnist_files_of_the_wrong_shape_or_classes_are_named(tmp_path):
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 12]), compress=True)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz holds class 12; MNIST's classes are 0 to 9"):
        load_mnist(tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((6, 28, 27)), compress=True)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz holds an array of shape \[6, 28, 27\]"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("fashion", [False, True])
def test_mnist_from_raw_gz_files_debian_layout(tmp_path, fashion):
    """The Debian package dataset-fashion-mnist installs the raw .gz IDX files in one folder."""
    images, labels = _fake_mnist(tmp_path)
    ds = load_mnist(tmp_path, fashion=fashion, cond=True)
    assert (len(ds), ds.channels, ds.resolution, ds.label_dim) == (6, 1, 28, 10)
    image, label, _ = ds[4]
    np.testing.assert_array_equal(image[0].numpy(), images[4])
    assert int(label.argmax()) == labels[4]


def test_fashion_mnist_root_defaults_to_the_debian_folder(tmp_path, monkeypatch):
    """dataset.root unset: Fashion-MNIST is read where the Debian package installs it (MNIST has no such default)."""
    import edm.data.registry

    images, _ = _fake_mnist(tmp_path)
    monkeypatch.setattr(edm.data.registry, "FASHION_MNIST_DEBIAN_ROOT", str(tmp_path))
    ds = build_dataset(DatasetConfig(name="fashion_mnist"))
    np.testing.assert_array_equal(ds[2][0][0].numpy(), images[2])
    with pytest.raises(DatasetNotFoundError, match="dataset.root is not set"):
        build_dataset(DatasetConfig(name="mnist"))


def test_mnist_torchvision_layout(tmp_path):
    images, labels = _fake_mnist(tmp_path / "MNIST" / "raw", compress=False)
    ds = load_mnist(tmp_path, resolution=32)
    assert len(ds) == 6 and ds.resolution == 32 and ds.label_dim == 0
    np.testing.assert_array_equal(ds.labels.numpy(), labels)


@pytest.mark.skipif(not Path(FASHION_MNIST_DEBIAN_ROOT).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package():
    ds = build_dataset(DatasetConfig(name="fashion_mnist", root=FASHION_MNIST_DEBIAN_ROOT))
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (60000, 1, 28, 10)


@pytest.mark.parametrize(
    "name, needle",
    [
        ("mnist", "train-images-idx3-ubyte"),
        ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
        ("cifar10", "cifar-10-batches-py"),
        ("folder", "folder of images"),
    ],
)
def test_missing_root_says_where_files_go(tmp_path, name, needle):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError, match=needle) as info:
        build_dataset(DatasetConfig(name=name, root=str(missing)))
    if name != "folder":
        assert str(missing) in str(info.value)
    # an existing but empty folder is just as clear
    with pytest.raises(DatasetNotFoundError, match=needle if name != "folder" else "no image files"):
        build_dataset(DatasetConfig(name=name, root=str(tmp_path)))


# ----------------------------------------------------------------------------- CIFAR-10 and image folders


def test_cifar10_layout_and_channel_order(tmp_path, monkeypatch):
    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(2, 3 * 32 * 32), dtype=np.uint8)  # rows are R plane, G plane, B plane
        batches.append(data)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [i, i + 1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(k) for k in range(10)]}, f)
    # our files cannot match CIFAR-10's md5 sums; everything else is torchvision's real reader
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    for root in (tmp_path, folder):
        ds = load_cifar10(root)
        assert (len(ds), ds.channels, ds.resolution) == (10, 3, 32)
        np.testing.assert_array_equal(ds[2][0].numpy(), batches[1][0].reshape(3, 32, 32))
        assert int(ds.labels[2]) == 2


def test_cifar10_batches_that_are_not_the_official_files_are_refused_before_they_are_unpickled(tmp_path):
    """CIFAR-10's batches are pickles, which run code: only the official files (their MD5 sums) are unpickled. A
    batch that runs code when unpickled is refused, naming the folder, the files the archive holds and where it is."""
    from conftest import CodePayload

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps(CodePayload(marker)))
    with pytest.raises(DatasetNotFoundError, match=r"torchvision could not read .*cifar-10-batches-py.*data_batch_1\.\.5, "
                                                   r"test_batch and batches\.meta.*cifar-10-python\.tar\.gz"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_a_class_folder_that_is_a_link_is_read_and_a_link_to_a_folder_above_is_no_loop(tmp_path):
    """root/dog -> elsewhere/dogs (a class kept on other storage) was left out without a word, a class gone; a link
    back to the root is read once (as NVlabs' dataset_tool.py's glob reads links)."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere" / "dogs"
    for k in range(2):
        _png(root / "cat" / f"{k}.png", np.full((8, 8, 3), 10 * k, dtype=np.uint8))
        _png(elsewhere / f"{k}.png", np.full((8, 8, 3), 100 + 10 * k, dtype=np.uint8))
    (root / "dog").symlink_to(elsewhere, target_is_directory=True)
    (root / "cat" / "again").symlink_to(root, target_is_directory=True)
    ds = ImageFolderDataset(root, cond=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    assert sorted(int(ds[i][0][0, 0, 0]) for i in range(4)) == [0, 10, 100, 110]


def test_image_folder_classes_from_subfolders(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {}
    for cls in ("cat", "dog"):
        for k in range(2):
            arrays[(cls, k)] = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            _png(tmp_path / cls / f"{k}.png", arrays[(cls, k)])
    ds = ImageFolderDataset(tmp_path, cond=True)
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes, ds.label_dim) == (4, 3, 8, 2, 2)
    image, label, _ = ds[2]  # sorted: cat/0, cat/1, dog/0, dog/1
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), arrays[("dog", 0)])
    assert label.tolist() == [0.0, 1.0]
    resized = ImageFolderDataset(tmp_path, resolution=4)
    assert resized[0][0].shape == (3, 4, 4) and resized.label_dim == 0


def test_image_folder_flat_grayscale_and_errors(tmp_path):
    for k in range(3):
        _png(tmp_path / "flat" / f"{k}.png", np.full((6, 6), 40 * k, dtype=np.uint8))
    ds = ImageFolderDataset(tmp_path / "flat")
    assert (ds.channels, ds.resolution, ds.num_classes) == (1, 6, 0)
    assert int(ds[2][0].max()) == 80
    with pytest.raises(ValueError, match="class subfolders"):
        ImageFolderDataset(tmp_path / "flat", cond=True)
    _png(tmp_path / "flat" / "z.png", np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="dataset.resolution"):
        ImageFolderDataset(tmp_path / "flat")[3]


def test_a_folder_with_any_colour_image_is_colour_whatever_its_first_file(tmp_path):
    """Sorted first, a gray image does not turn a colour set gray (dropping every image's colour): gray images are
    repeated over three channels instead, losing nothing."""
    gray, red = np.full((6, 6), 90, dtype=np.uint8), np.zeros((6, 6, 3), dtype=np.uint8)
    red[..., 0] = 200
    _png(tmp_path / "a.png", gray)
    _png(tmp_path / "b.png", red)
    ds = ImageFolderDataset(tmp_path)
    assert ds.channels == 3
    np.testing.assert_array_equal(ds[1][0].permute(1, 2, 0).numpy(), red)
    assert ds[0][0].tolist() == [gray.tolist()] * 3


# ----------------------------------------------------------------------------- resizing (dataset.resample)


def _lanczos3_matrix(n_in: int, n_out: int) -> np.ndarray:
    """W [n_out, n_in] of Lanczos-3 resampling, written from its definition: output pixel i is centred at
    c = (i + ½)·s in input coordinates (s = n_in/n_out); input pixel j weighs L((j + ½ − c)/f), L(x) = sinc(x)·sinc(x/3)
    on |x| < 3, with f = max(s, 1) (the kernel stretched when shrinking: the antialiasing); rows normalized to 1."""
    s = n_in / n_out
    f = max(s, 1.0)
    x = (np.arange(n_in)[None, :] + 0.5 - (np.arange(n_out)[:, None] + 0.5) * s) / f
    w = np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)
    return w / w.sum(axis=1, keepdims=True)


def _lanczos3(image: np.ndarray, n: int) -> np.ndarray:
    """uint8 [H, W] -> [n, n]: rows first, then columns, each pass rounded and clipped to 0..255 (8-bit passes)."""
    rows = np.clip(np.floor(image.astype(np.float64) @ _lanczos3_matrix(image.shape[1], n).T + 0.5), 0, 255)
    return np.clip(np.floor(_lanczos3_matrix(image.shape[0], n) @ rows + 0.5), 0, 255)


def _smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Test images of flat 4x4 blocks of random levels, many saturated at 0 and 255 (edges that overshoot)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, size // 4 + 1, size // 4 + 1))
    up = np.kron(base, np.ones((4, 4)))[:, :size, :size]
    return np.clip(up * 160 + 60, 0, 255).astype(np.uint8)


def test_resizing_is_lanczos3_as_nvlabs_dataset_tool(tmp_path):
    """Shrinking 28x28 -> 16x16 and growing 8x8 -> 16x16: every pixel within one level of a Lanczos-3 resampler
    written from the formula; a bilinear filter misses by far more."""
    images = _smooth_images(6, 28, seed=1)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8), compress=True)
    expected = np.stack([_lanczos3(im, 16) for im in images])
    ours = load_mnist(tmp_path, resolution=16).images[:, 0].numpy().astype(np.float64)
    assert np.abs(ours - expected).max() <= 1 and (ours != expected).mean() < 0.01
    grown = load_digits(resolution=16).images[:20, 0].numpy().astype(np.float64)
    assert np.abs(grown - np.stack([_lanczos3(im, 16) for im in load_digits().images[:20, 0].numpy()])).max() <= 1
    bilinear = load_mnist(tmp_path, resolution=16, resample="bilinear").images[:, 0].numpy().astype(np.float64)
    assert np.abs(bilinear - expected).max() > 10


def test_folder_images_are_center_cropped_then_resized_like_the_tensor_sets(tmp_path):
    """A 21x28 image: the centred 21x21 square (dataset_tool.py's crop: columns (W − s)//2 .. (W + s)//2), then the
    same Lanczos-3 as the tensor data sets."""
    from PIL import Image

    wide = _smooth_images(1, 28, seed=3)[0][:21]  # [21, 28]: W > H by an odd 7, so the offset rounds down to 3
    Image.fromarray(wide).save(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path, resolution=16)
    expected = _lanczos3(wide[:, 3:24], 16)
    assert np.abs(ds[0][0][0].numpy().astype(np.float64) - expected).max() <= 1


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_the_config_names_the_filter_of_an_idx_data_set(tmp_path, name):
    images, _ = _fake_mnist(tmp_path, n=4)
    for resample in ("lanczos", "bilinear"):
        ds = build_dataset(DatasetConfig(name=name, root=str(tmp_path), resolution=16, resample=resample))
        expected = load_mnist(tmp_path, resolution=16, resample=resample).images
        assert torch.equal(ds.images, expected)
    assert not torch.equal(load_mnist(tmp_path, resolution=16).images,
                           load_mnist(tmp_path, resolution=16, resample="bilinear").images)


def test_a_record_of_unresized_data_names_no_filter():
    """Records of what a data set made (encoded latents, studies, side-by-sides) hold resample only where it acts, so
    a record of native-size data written before the setting existed (no resample key) still compares equal."""
    from edm.data import dataset_record
    from edm.files import differences

    native = dataset_record(DatasetConfig(name="digits"))
    assert native["resample"] is None
    assert differences({k: v for k, v in native.items() if k != "resample"}, native) == []
    assert dataset_record(DatasetConfig(name="digits", resolution=16))["resample"] == "lanczos"


@pytest.mark.parametrize("name", ["digits", "folder"])
def test_an_unknown_resample_filter_is_refused_with_the_choices(tmp_path, name):
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"dataset.resample 'lanczos3' is not valid; choose one of: lanczos, bicubic"):
        build_dataset(DatasetConfig(name=name, root=None if name == "digits" else str(tmp_path), resolution=4, resample="lanczos3"))


# ----------------------------------------------------------------------------- data order


def test_epoch_permutation_is_a_function_of_seed_and_epoch():
    p = epoch_permutation(50, seed=3, epoch=7)
    assert sorted(p.tolist()) == list(range(50))
    assert torch.equal(p, epoch_permutation(50, seed=3, epoch=7))
    assert not torch.equal(p, epoch_permutation(50, seed=3, epoch=8))
    assert not torch.equal(p, epoch_permutation(50, seed=4, epoch=7))


def _take(sampler: StreamBatchSampler, count: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def test_stream_crosses_epochs_in_order():
    n, seed = 10, 5
    stream = torch.cat([epoch_permutation(n, seed, e) for e in range(4)]).tolist()
    batches = _take(StreamBatchSampler(n, seed, batch_size=4, micro_batch=4), 8)
    assert sum(batches, []) == stream[:32]
    # every epoch visits each item exactly once
    assert sorted(stream[10:20]) == list(range(10))


def test_shards_are_disjoint_and_cover_the_global_batch():
    n, seed, batch = 37, 1, 12
    single = _take(StreamBatchSampler(n, seed, batch, micro_batch=12), 5)
    for world, micro in ((2, 6), (2, 3), (3, 2)):
        per_rank = [_take(StreamBatchSampler(n, seed, batch, micro, rank, world), 5 * batch // (micro * world))
                    for rank in range(world)]
        accum = batch // (micro * world)
        for step in range(5):
            chunks = [per_rank[r][step * accum + a] for a in range(accum) for r in range(world)]
            assert sum(chunks, []) == single[step]  # same items whatever the process count
            if len(set(single[step])) == batch:  # (a batch across an epoch boundary may repeat an item)
                rank_sets = [set(sum(per_rank[r][step * accum:(step + 1) * accum], [])) for r in range(world)]
                assert all(not (rank_sets[i] & rank_sets[j]) for i in range(world) for j in range(i + 1, world))


def test_sampler_resumes_at_image_count():
    full = _take(StreamBatchSampler(23, 0, 8, 4, rank=1, world_size=2), 10)
    resumed = _take(StreamBatchSampler(23, 0, 8, 4, rank=1, world_size=2, start_nimg=3 * 8), 7)
    assert resumed == full[3:]


def test_sampler_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="multiple of batch_per_device"):
        StreamBatchSampler(10, 0, batch_size=10, micro_batch=4)


def test_loader_workers_give_the_same_batches():
    ds = load_digits()
    make = lambda workers: make_loader(ds, StreamBatchSampler(len(ds), 0, 16, 8), num_workers=workers)
    a, b = iter(make(0)), iter(make(1))
    for _ in range(3):
        (xa, la, ia), (xb, lb, ib) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ia, ib) and xa.shape == (8, 1, 8, 8) and la.shape == lb.shape == (8, 0)


# ----------------------------------------------------------------------------- pixels and grids


def test_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_space(x)), x)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]


# ----------------------------------------------------------------------------- NVlabs dataset_tool.py layout


def _nvlabs_layout(tmp_path, as_zip: bool, corrupt: int | None = None, n: int = 6):
    """dataset_tool.py's output: shard folders 00000/ of img%08d.png and dataset.json with the labels."""
    import io
    import json
    import zipfile

    from PIL import Image

    labels = [[f"{i // 4:05d}/img{i:08d}.png", (3 * i) % 5] for i in range(n)]
    files = {}
    for i, (name, _) in enumerate(labels):
        buffer = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 20 * i, dtype=np.uint8)).save(buffer, format="PNG")
        files[name] = buffer.getvalue()[:30] if i == corrupt else buffer.getvalue()
    files["dataset.json"] = json.dumps({"labels": labels}).encode()
    if as_zip:
        root = tmp_path / "data.zip"
        with zipfile.ZipFile(root, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        root = tmp_path / "data"
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    return root, labels


@pytest.mark.parametrize("as_zip", [False, True])
def test_nvlabs_zip_and_folder_take_their_labels_from_dataset_json(tmp_path, as_zip):
    root, labels = _nvlabs_layout(tmp_path, as_zip)
    ds = build_dataset(DatasetConfig(name="folder", root=str(root), cond=True))
    assert len(ds) == 6 and ds.num_classes == 5 and ds.channels == 3 and ds.resolution == 8
    for i in range(6):  # the shard folders 00000/, 00001/ are not classes: dataset.json's labels are
        image, one_hot, index = ds[i]
        assert int(one_hot.argmax()) == labels[i][1] and index == i and int(image[0, 0, 0]) == 20 * i


def test_a_dataset_json_that_labels_an_image_twice_with_other_classes_is_refused(tmp_path):
    """{"labels": [["a.png", 0], ["a.png", 1]]}: the last must not win unnoticed; a repeated equal entry is fine."""
    import json

    for name in ("a.png", "b.png"):
        png(tmp_path / name, 8, 100)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1], ["a.png", 0]]}))
    assert ImageFolderDataset(tmp_path).labels == [0, 1]
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", 1], ["a.png", 1]]}))
    with pytest.raises(ValueError, match=f"labels {tmp_path / 'a.png'} twice, as class 0 and class 1"):
        ImageFolderDataset(tmp_path)


def test_a_dataset_json_wins_over_class_subfolders(tmp_path, caplog):
    """Its labels decide (classes 0..max: unused ones are warned of, as are labels of names that are no file); a
    file without a "labels" list, an entry that is not [name, class] and an image without a label are refused."""
    import json

    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / cls / "a.png")
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["cat/a.png", 7], ["dog/a.png", 2], ["cow/a.png", 1]]}))
    with caplog.at_level("WARNING", logger="edm.data.sets"):
        ds = build_dataset(DatasetConfig(name="folder", root=str(tmp_path), cond=True))
    assert ds.num_classes == 8 and [int(ds[i][1].argmax()) for i in range(2)] == [7, 2]
    warned = " | ".join(r.getMessage() for r in caplog.records)
    assert "classes 0..7 make 8 label inputs, of which 6 no image has" in warned
    assert "labels 1 name(s) that are no file there, e.g. cow/a.png" in warned
    for content, message in (({"classes": []}, "not a readable .*KeyError.*\"labels\": null says there are none"),
                             ({"labels": {"cat/a.png": 7}}, "\"labels\" must be a list of \\[name, class\\] pairs, not a dict")):
        (tmp_path / "dataset.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            build_dataset(DatasetConfig(name="folder", root=str(tmp_path), cond=True))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["cat/a.png", 7]]}))
    with pytest.raises(ValueError, match="no label for 1 image.*dog/a.png"):
        build_dataset(DatasetConfig(name="folder", root=str(tmp_path), cond=True))
    for bad in ("cat", None, 1.7, True):  # a class that is not a whole number is named with the file, not rounded
        (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["cat/a.png", bad], ["dog/a.png", 2]]}))
        with pytest.raises(ValueError, match=rf"dataset.json: the entry \['cat/a.png', {re.escape(repr(bad))}\] is not "
                                             r"\[name, class\]"):
            build_dataset(DatasetConfig(name="folder", root=str(tmp_path), cond=True))


def test_a_corrupt_image_in_a_zip_is_named_by_archive_and_member(tmp_path):
    root, _ = _nvlabs_layout(tmp_path, True, corrupt=3)
    with pytest.raises(BadImagesError, match=r"data\.zip:00000/img00000003\.png: unreadable"):
        build_dataset(DatasetConfig(name="folder", root=str(root)))
    ds = build_dataset(DatasetConfig(name="folder", root=str(root), skip_bad=True))
    assert len(ds) == 5


def test_a_zip_streams_through_loader_workers(tmp_path):
    """Workers open the archive themselves (the data set pickles without it) and yield what one process does."""
    import pickle

    root, _ = _nvlabs_layout(tmp_path, True, n=12)
    ds = build_dataset(DatasetConfig(name="folder", root=str(root), cond=True))
    assert len(pickle.dumps(ds)) < 4096  # names and labels, no pixels
    ds[0]  # opens the archive in this process
    make = lambda workers: make_loader(ds, StreamBatchSampler(len(ds), 0, 4, 4), num_workers=workers)  # noqa: E731
    a, b = iter(make(0)), iter(make(2))
    for _ in range(3):
        (xa, la, ia), (xb, lb, ib) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(la, lb) and torch.equal(ia, ib)


def test_sixteen_bit_images_keep_their_scale_and_32_bit_ones_are_refused_by_path(tmp_path):
    """A 16-bit gray PNG (PIL mode I;16) holds k·257 for the 8-bit k: it reads as k (the high byte, as PIL decodes
    16-bit RGB), not clipped to 255, also when resized. 32-bit pixels (modes I, F) have no 8-bit scale: named."""
    from PIL import Image

    levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4
    Image.fromarray(levels * 257).save(tmp_path / "a.png")
    Image.fromarray(levels * 256 + 255).save(tmp_path / "b.png")  # the low byte does not round up
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    ds = ImageFolderDataset(tmp_path)
    assert ds.channels == 1 and all(np.array_equal(ds[k][0][0].numpy(), levels) for k in range(2))
    from edm.data import read_image

    assert np.array_equal(read_image(tmp_path / "a.png")[:, :, 0], levels)  # as scored image folders read it
    resized = ImageFolderDataset(tmp_path, resolution=4)[0][0][0].numpy()
    expected = np.asarray(Image.fromarray(levels.astype(np.uint8)).resize((4, 4), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(resized, expected)
    Image.fromarray(levels.astype(np.int32) * 257).save(tmp_path / "c.tif")
    Image.fromarray(levels.astype(np.float32) / 255).save(tmp_path / "d.tif")
    with pytest.raises(BadImagesError) as err:
        ImageFolderDataset(tmp_path)
    assert f"{tmp_path / 'c.tif'}: 32-bit integer pixels" in str(err.value)
    assert f"{tmp_path / 'd.tif'}: 32-bit float pixels" in str(err.value)


def test_the_pillow_floor_opens_sixteen_bit_gray_pngs_at_sixteen_bits():
    """Pillow opens a 16-bit gray PNG as I;16 (read at its scale) from 10.3 on; before, as 32-bit I, which the scan
    refuses as pixels of no known scale: pyproject.toml's floor must not admit those versions."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"pillow>=([0-9.]+)"', text)
    assert floor and tuple(int(part) for part in floor[1].split(".")) >= (10, 3)


def test_transparent_images_are_refused_by_path_and_opaque_alpha_is_dropped(tmp_path):
    """An image with transparent pixels (an alpha band below 255, or a palette's transparent colour) has colours
    under its alpha that are no part of the picture: named by path before training (NVlabs' dataset_tool refuses
    any alpha). A fully opaque alpha band holds nothing: dropped, the pixels those of the RGB image."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = np.full((8, 8, 1), 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.channels == 3 and np.array_equal(ds[0][0].permute(1, 2, 0).numpy(), rgb)
    alpha[0, 0] = 0
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(tmp_path / "b.png")
    Image.fromarray(np.stack([rgb[..., 0], alpha[..., 0]], -1), "LA").save(tmp_path / "c.png")
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "P")
    palette.putpalette(list(range(192)))
    palette.save(tmp_path / "d.png", transparency=0)  # index 0, the top left pixel, is transparent
    with pytest.raises(BadImagesError) as err:
        ImageFolderDataset(tmp_path)
    for name in ("b.png", "c.png", "d.png"):
        assert f"{tmp_path / name}: transparent pixels (alpha down to 0 of 255)" in str(err.value)
    assert ImageFolderDataset(tmp_path, skip_bad=True).files == ["a.png"]


def test_a_sixteen_bit_gray_png_is_transparent_only_where_a_pixel_holds_its_transparent_value(tmp_path):
    """A 16-bit gray PNG's tRNS names one 16-bit value. PIL's convert("RGBA") clips pixels and value to 8 bits first:
    a value of 65535 that no pixel holds made every pixel of 255 or more transparent (a valid image refused), and
    one of 27756 that a pixel holds left it opaque (a transparent image read)."""
    from PIL import Image

    levels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4 * 257  # up to 64764: none is 65535
    Image.fromarray(levels).save(tmp_path / "a.png", transparency=65535)
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    assert ImageFolderDataset(tmp_path).files == ["a.png"]
    Image.fromarray(levels).save(tmp_path / "b.png", transparency=int(levels[3, 3]))
    with pytest.raises(BadImagesError, match=re.escape(f"{tmp_path / 'b.png'}: transparent pixels (alpha down to 0")):
        ImageFolderDataset(tmp_path)


def test_hidden_files_are_left_out_with_a_warning_and_dangling_links_are_named(tmp_path, caplog):
    """Jupyter's .ipynb_checkpoints/ copies and macOS's ._x.png forks and __MACOSX/ are no images of the data set:
    left out (a warning counts them), so no hidden folder becomes a class and no copy trains twice. A dangling
    symbolic link is an image that cannot be read: named by path, not skipped."""
    import os

    from edm.data import image_files, root_contents_key

    for name in ("cat/0.png", "cat/1.png", "dog/0.png", ".ipynb_checkpoints/0-checkpoint.png",
                 "cat/.ipynb_checkpoints/1-checkpoint.png", "__MACOSX/cat/0.png"):
        png(tmp_path / "set" / name, 8, 100)
    (tmp_path / "set" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    with caplog.at_level("WARNING"):
        ds = ImageFolderDataset(tmp_path / "set")
    assert ds.classes == ["cat", "dog"] and ds.files == ["cat/0.png", "cat/1.png", "dog/0.png"]
    assert "leaving out 4 hidden image file(s)" in caplog.text
    assert [p.relative_to(tmp_path / "set").as_posix() for p in image_files(tmp_path / "set")] == ds.files
    os.symlink(tmp_path / "gone.png", tmp_path / "set" / "dog" / "1.png")
    root_contents_key(tmp_path / "set")  # a record of the folder can still be made
    with pytest.raises(BadImagesError, match=f"{tmp_path / 'set' / 'dog' / '1.png'}: unreadable"):
        ImageFolderDataset(tmp_path / "set")


def test_a_folder_whose_images_are_all_hidden_is_named_as_such_not_as_one_without_images(tmp_path):
    """Images a user named .0.png, .1.png are there: the refusal says they are hidden and left out, and how to use
    them, not "no image files"."""
    for name in (".0.png", ".1.png"):
        png(tmp_path / name, 8, 100)
    with pytest.raises(DatasetNotFoundError, match=re.escape(f"{tmp_path}: its 2 image file(s) are all hidden")) as err:
        ImageFolderDataset(tmp_path)
    assert f"e.g. {tmp_path / '.0.png'}" in str(err.value) and "rename" in str(err.value)


def test_bad_images_are_found_before_training_and_named_by_path(tmp_path):
    empty, small, truncated = folder_with_bad_files(tmp_path / "images")
    cfg = DatasetConfig(name="folder", root=str(tmp_path / "images"))
    with pytest.raises(BadImagesError) as err:
        build_dataset(cfg)
    message = str(err.value)
    assert "2 of 33 image files" in message and str(empty) in message and str(small) in message
    assert "6x6, but 31 of the 32 readable images are 8x8" in message and "dataset.skip_bad=true" in message
    data = build_dataset(DatasetConfig(name="folder", root=str(tmp_path / "images"), skip_bad=True))
    assert len(data) == 31 and empty not in data.files and small not in data.files
    odd_first = tmp_path / "images" / "000-big.png"  # first in order: the size most images have still decides
    png(odd_first, 10, 0)
    data = build_dataset(DatasetConfig(name="folder", root=str(tmp_path / "images"), skip_bad=True))
    assert len(data) == 31 and data.resolution == 8 and odd_first.name not in data.files
    odd_first.unlink()
    with pytest.raises(BadImagesError, match=f"{truncated}: cannot read its pixels.*dataset.skip_bad\\) could not see "
                                             "it: fix or remove the file.*resume=true where the run has a checkpoint"):
        for i in range(len(data)):
            data[i]
