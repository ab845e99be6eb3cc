"""Generation library (edm.sampling) and the scripts/sample.py entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edm
from edm import sampling
from edm.sampling import (
    GuidedDenoiser,
    ImageSpec,
    PartWriter,
    PngWriter,
    SamplerSettings,
    finalize,
    format_seeds,
    generate,
    generate_batch,
    make_grid,
    parse_seeds,
    plan_images,
    shard,
    to_uint8,
)

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def ideal():
    """The exact denoiser of 6 labelled 1×4×4 images (two classes)."""
    g = torch.Generator().manual_seed(0)
    data = torch.rand(6, *SHAPE, generator=g, dtype=F64) * 2 - 1
    return edm.IdealDenoiser(data, labels=torch.tensor([0, 0, 0, 1, 1, 1]))


# ----------------------------------------------------------------------------- seeds and plans


def test_parse_and_format_seeds_round_trip():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_seeds(5) == [5] and parse_seeds([3, 1]) == [3, 1]
    assert format_seeds([0, 1, 2, 3, 7, 10, 11]) == "0-3,7,10-11"
    assert parse_seeds(format_seeds(list(range(50000)))) == list(range(50000))
    for bad, match in (("5-2", "empty"), ("a-b", "cannot read"), ("1,1", "duplicates"), ([-1], "non-negative")):
        with pytest.raises(ValueError, match=match):
            parse_seeds(bad)


def test_plan_assigns_labels_by_position_and_checks_them():
    plan = plan_images([10, 11, 12], [1, 0], label_dim=3)
    assert [(p.index, p.seed, p.label) for p in plan] == [(0, 10, 1), (1, 11, 0), (2, 12, 1)]
    assert [p.label for p in plan_images([0, 1], 2, 3)] == [2, 2]
    assert [p.label for p in plan_images([0, 1], None, 3)] == [None, None]
    with pytest.raises(ValueError, match="unconditional"):
        plan_images([0], 1, label_dim=0)
    with pytest.raises(ValueError, match="outside"):
        plan_images([0], [3], label_dim=3)


def test_shards_partition_the_images():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts[1] == [1, 4, 7, 10]
    assert sorted(sum(parts, [])) == items


# ----------------------------------------------------------------------------- determinism


def run(ideal, seeds, batch, settings, labels=None, label_dim=0):
    """Images of `seeds` generated in batches of `batch` (float64), in seed order."""
    plan = plan_images(seeds, labels, label_dim)
    out = [generate_batch(ideal, part, "edm", settings, SHAPE, label_dim=label_dim, dtype=F64) for part in sampling.chunks(plan, batch)]
    images = torch.cat([o[0] for o in out])
    return images, None if label_dim == 0 else torch.cat([o[1] for o in out])


@pytest.mark.parametrize(
    "settings",
    [
        SamplerSettings("heun", 6),
        SamplerSettings("stochastic", 6, options={"churn": 30.0}),
        SamplerSettings("euler_maruyama", 8),
    ],
    ids=["heun", "stochastic", "euler_maruyama"],
)
def test_same_seed_same_image_whatever_the_batch_size(ideal, settings):
    seeds = [3, 17, 4, 100, 5]
    one_by_one, _ = run(ideal, seeds, 1, settings)
    together, _ = run(ideal, seeds, 5, settings)
    uneven, _ = run(ideal, seeds, 2, settings)
    torch.testing.assert_close(together, one_by_one)
    torch.testing.assert_close(uneven, one_by_one)
    # Across "processes": the shards of two ranks give the same images.
    ranks = {s: img for r in range(2) for s, img in zip(shard(seeds, r, 2), run(ideal, shard(seeds, r, 2), 2, settings)[0])}
    torch.testing.assert_close(torch.stack([ranks[s] for s in seeds]), one_by_one)
    # ... and another seed is another image.
    other, _ = run(ideal, [6], 1, settings)
    assert (other[0] - one_by_one[0]).abs().max() > 1e-3


def test_stochastic_noise_comes_from_the_image_generator(ideal):
    """The SDE's per-step noise belongs to the image: with a shared generator, batching would change images."""
    settings = SamplerSettings("euler_maruyama", 8)
    a, _ = run(ideal, [1, 2], 2, settings)
    b, _ = run(ideal, [2, 1], 2, settings)
    torch.testing.assert_close(a, b.flip(0))
    c, _ = run(ideal, [1], 1, SamplerSettings("heun", 8))
    assert (a[0] - c[0]).abs().max() > 1e-6  # the SDE did add noise


def test_random_labels_are_drawn_per_image_and_respected(ideal):
    settings = SamplerSettings("heun", 12)
    seeds = list(range(8))
    images, labels = run(ideal, seeds, 3, settings, label_dim=2)
    images1, labels1 = run(ideal, seeds, 1, settings, label_dim=2)
    torch.testing.assert_close(labels, labels1)
    torch.testing.assert_close(images, images1)
    assert set(labels.tolist()) == {0, 1}
    # The ideal denoiser restricted to a class lands on that class's points.
    data = ideal.data.reshape(6, -1)
    nearest = torch.cdist(images.reshape(8, -1), data).argmin(1)
    torch.testing.assert_close(ideal.labels[nearest], labels)
    fixed, fixed_labels = run(ideal, seeds, 4, settings, labels=[1], label_dim=2)
    assert fixed_labels.tolist() == [1] * 8


def test_guidance_combines_the_conditional_and_unconditional_calls():
    calls = []

    def den(x, sigma, class_labels):
        calls.append(len(x))
        return x + class_labels.sum(1, keepdim=True).reshape(-1, 1, 1, 1) * 1.0 + 0.5

    x = torch.zeros(3, 1, 2, 2)
    sigma = torch.ones(3)
    labels = torch.eye(3)
    cond = den(x, sigma, labels)
    uncond = den(x, sigma, torch.zeros_like(labels))
    calls.clear()
    torch.testing.assert_close(GuidedDenoiser(den, 1.0)(x, sigma, labels), cond)
    torch.testing.assert_close(GuidedDenoiser(den, 0.0)(x, sigma, labels), uncond)
    torch.testing.assert_close(GuidedDenoiser(den, 2.5)(x, sigma, labels), uncond + 2.5 * (cond - uncond))
    assert calls == [3, 6, 6]  # w = 1 is one plain call; otherwise one call on a doubled batch


# ----------------------------------------------------------------------------- outputs


def test_to_uint8_matches_the_nvlabs_rounding():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7]).reshape(1, 1, 1, 6)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_make_grid_tiles_row_by_row():
    images = np.arange(5).reshape(5, 1, 1, 1).repeat(2, 1).repeat(2, 2).astype(np.uint8)
    grid = make_grid(images, cols=3)
    assert grid.shape == (4, 6, 1)
    assert grid[::2, ::2, 0].tolist() == [[0, 1, 2], [3, 4, 0]]


def test_generate_writes_pngs_and_resumes(ideal, tmp_path):
    from PIL import Image

    plan = plan_images(list(range(5)), None, 0)
    writer = PngWriter(tmp_path, subdirs=True)
    settings = SamplerSettings("euler", 4)
    assert generate(ideal, plan[:3], "edm", settings, writer, SHAPE, batch_size=2) == 3
    first = np.asarray(Image.open(writer.path(1)))
    assert generate(ideal, plan, "edm", settings, writer, SHAPE, batch_size=4) == 2  # only the two missing ones
    assert writer.path(4) == tmp_path / "000000" / "000004.png" and writer.path(4).is_file()
    np.testing.assert_array_equal(np.asarray(Image.open(writer.path(1))), first)
    expected = to_uint8(generate_batch(ideal, plan[1:2], "edm", settings, SHAPE)[0])[0, :, :, 0]
    np.testing.assert_array_equal(first, expected)


@pytest.mark.parametrize("fmt", ["npz", "grid"])
def test_parts_merge_into_npz_or_grid(ideal, tmp_path, fmt):
    seeds = [5, 2, 9, 1]
    plan = plan_images(seeds, None, 0)
    settings = SamplerSettings("heun", 3)
    for rank in range(2):  # two "processes", each with its own part files
        generate(ideal, shard(plan, rank, 2), "edm", settings, PartWriter(tmp_path, rank), SHAPE, batch_size=1)
    assert PartWriter(tmp_path).pending(plan) == []
    path = finalize(fmt, tmp_path, seeds, grid_cols=2)
    expected = to_uint8(generate_batch(ideal, plan, "edm", settings, SHAPE)[0])
    if fmt == "npz":
        with np.load(path) as data:
            np.testing.assert_array_equal(data["images"], expected)
            assert data["seeds"].tolist() == seeds and data["labels"].tolist() == [-1] * 4
    else:
        from PIL import Image

        np.testing.assert_array_equal(np.asarray(Image.open(path)), make_grid(expected, 2)[:, :, 0])


def test_finalize_names_missing_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the sampler again"):
        finalize("npz", tmp_path, [0, 1])


def test_sampler_settings_reject_unknown_solvers():
    with pytest.raises(ValueError, match="unknown solver 'rk45'"):
        SamplerSettings("rk45")
    with pytest.raises(ValueError, match="num_steps"):
        SamplerSettings("heun", 0)
