"""edm/generation/sampling.py: seeds, plans, batches and labels; an image depends on its seed alone."""

from pathlib import Path

import pytest
import torch

import edm
from edm import sampling
from edm.core.samplers import SamplerConfig
from edm.generation.sampling import format_seeds, generate_batch, parse_seeds, plan_images, shard


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
        SamplerConfig("heun", 6),
        SamplerConfig("stochastic", 6, options={"churn": 30.0}),
        SamplerConfig("euler_maruyama", 8),
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


def test_samples_with_nan_or_inf_are_refused_naming_their_seeds(ideal):
    """A damaged model's NaN would become black pixels (uint8 clamps it to 0): the batch is refused, naming its seeds."""
    def damaged(x, sigma, class_labels=None):
        out = ideal(x, sigma, class_labels)
        out[1::2] = float("nan")  # the images of every second seed
        return out

    plan = plan_images([3, 7, 9, 12], None, 0)
    with pytest.raises(ValueError, match=r"samples hold NaN or Inf for 2 of 4 seeds \(7, 12\), which would be written "
                                         r"as black pixels"):
        generate_batch(damaged, plan, "edm", SamplerConfig(num_steps=3), SHAPE, dtype=F64)


def test_stochastic_noise_comes_from_the_image_generator(ideal):
    """The SDE's per-step noise belongs to the image: with a shared generator, batching would change images."""
    settings = SamplerConfig("euler_maruyama", 8)
    a, _ = run(ideal, [1, 2], 2, settings)
    b, _ = run(ideal, [2, 1], 2, settings)
    torch.testing.assert_close(a, b.flip(0))
    c, _ = run(ideal, [1], 1, SamplerConfig("heun", 8))
    assert (a[0] - c[0]).abs().max() > 1e-6  # the SDE did add noise


def test_random_labels_are_drawn_per_image_and_respected(ideal):
    settings = SamplerConfig("heun", 12)
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


# ----------------------------------------------------------------------------- outputs


# ----------------------------------------------------------------------------- edm-sample end to end


# ----------------------------------------------------------------------------- provenance of an out folder


def test_a_results_folder_names_its_command_and_another_command_is_refused_even_with_overwrite(tmp_path):
    """edm-posthoc's and edm-sample's folders both hold provenance.json: the record names its command, and the other
    command is refused before anything is deleted; a record that names no command is compared without that key."""
    import json

    from edm.provenance import ProvenanceError, claim

    out = tmp_path / "out"
    out.mkdir()
    claim(out, {"run_dir": "r"}, [out / "ema-0.100"], command="edm-posthoc")
    (out / "ema-0.100").mkdir()
    assert json.loads((out / "provenance.json").read_text()) == {"command": "edm-posthoc", "run_dir": "r"}
    for overwrite in (False, True):
        with pytest.raises(ProvenanceError, match=rf"out={out} is edm-posthoc's results folder, not edm-sample's; "
                                                  "give edm-sample another out=DIR"):
            claim(out, {"seeds": "0-3"}, [out / "ema-0.100"], command="edm-sample", overwrite=overwrite)
    assert (out / "ema-0.100").is_dir()
    (out / "provenance.json").write_text(json.dumps({"run_dir": "r"}))  # a record without its command
    claim(out, {"run_dir": "r"}, [out / "ema-0.100"], command="edm-posthoc")
    with pytest.raises(ProvenanceError, match="run_dir: folder 'r', now 's'"):
        claim(out, {"run_dir": "s"}, [out / "ema-0.100"], command="edm-posthoc")


@pytest.mark.parametrize("text", ["null", "[1, 2]", '"edm-sample"'])
def test_a_provenance_record_that_is_not_a_json_object_is_refused_as_unreadable(tmp_path, text):
    """A provenance.json damaged into valid JSON that is no record (null, a list, a string) is refused like an
    unreadable one, naming the file and the ways out, not a TypeError or a comparison against nothing."""
    from edm.provenance import ProvenanceError, claim

    out = tmp_path / "out"
    out.mkdir()
    (out / "provenance.json").write_text(text)
    with pytest.raises(ProvenanceError, match=r"provenance\.json is unreadable \(it holds a JSON \w+, not a record.*"
                                              "write to another out=DIR, or pass overwrite=true"):
        claim(out, {"seeds": "0-3"}, [], command="edm-sample")
    claim(out, {"seeds": "0-3"}, [], command="edm-sample", overwrite=True)


# ----------------------------------------------------------------------------- guidance in edm-sample
