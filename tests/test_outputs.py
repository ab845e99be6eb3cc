"""edm/generation/outputs.py: PNG files and .npz parts, their merge, resume after a torn write, the grid writer."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import edm
from edm.generation.outputs import PartWriter, PngWriter, finalize, grid_image, make_grid, read_parts, save_grid, to_uint8
from edm.core.samplers import SamplerConfig
from edm.generation.sampling import generate, generate_batch, plan_images, shard

F64 = torch.float64
SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def ideal():
    """The exact denoiser of 6 1×4×4 images."""
    g = torch.Generator().manual_seed(0)
    return edm.IdealDenoiser(torch.rand(6, *SHAPE, generator=g, dtype=F64) * 2 - 1)


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
    settings = SamplerConfig("euler", 4)
    assert generate(ideal, plan[:3], "edm", settings, writer, SHAPE, batch_size=2) == 3
    first = np.asarray(Image.open(writer.path(1)))
    assert generate(ideal, plan, "edm", settings, writer, SHAPE, batch_size=4) == 2  # only the two missing ones
    assert writer.path(4) == tmp_path / "000000" / "000004.png" and writer.path(4).is_file()
    np.testing.assert_array_equal(np.asarray(Image.open(writer.path(1))), first)
    expected = to_uint8(generate_batch(ideal, plan[1:2], "edm", settings, SHAPE)[0])[0, :, :, 0]
    np.testing.assert_array_equal(first, expected)


@pytest.mark.parametrize("damage", ["empty", "cut short"])
def test_an_empty_or_cut_short_png_in_the_folder_is_made_again_on_resume(ideal, tmp_path, damage):
    """Our PNG writes are atomic, so a zero-byte file or one that stops before a PNG's end chunk is none of our images
    (a user's touch, a copy cut short): a resume makes that seed's image instead of counting it as made."""
    plan = plan_images(list(range(3)), None, 0)
    writer = PngWriter(tmp_path)
    settings = SamplerConfig("euler", 2)
    assert generate(ideal, plan, "edm", settings, writer, SHAPE, batch_size=3) == 3
    made = writer.path(1).read_bytes()
    writer.path(1).write_bytes(b"" if damage == "empty" else made[:-1])
    assert [spec.seed for spec in writer.pending(plan)] == [1]
    assert generate(ideal, plan, "edm", settings, writer, SHAPE, batch_size=3) == 1
    assert writer.path(1).read_bytes() == made


@pytest.mark.parametrize("fmt", ["npz", "grid"])
def test_parts_merge_into_npz_or_grid(ideal, tmp_path, fmt):
    seeds = [5, 2, 9, 1]
    plan = plan_images(seeds, None, 0)
    settings = SamplerConfig("heun", 3)
    for rank in range(2):  # two "processes", each with its own part files
        generate(ideal, shard(plan, rank, 2), "edm", settings, PartWriter(tmp_path, rank), SHAPE, batch_size=1)
    assert PartWriter(tmp_path).pending(plan) == []
    path = finalize(fmt, tmp_path, seeds, grid_cols=2)
    expected = to_uint8(generate_batch(ideal, plan, "edm", settings, SHAPE)[0])
    if fmt == "npz":
        with np.load(path) as data:
            np.testing.assert_array_equal(data["images"], expected)
            assert data["seeds"].tolist() == seeds and "labels" not in data.files  # unconditional: no labels
    else:
        from PIL import Image

        np.testing.assert_array_equal(np.asarray(Image.open(path)), grid_image(expected, 2)[:, :, 0])


def test_a_killed_part_write_does_not_break_resume(tmp_path):
    """A process killed while writing a part leaves only a temp file that the part globs ignore:
    resume still reads the finished parts and redoes the torn one."""
    done = PartWriter(tmp_path)
    done.write(plan_images([0], None, 0), torch.full((1, 1, 4, 4), -1.0), None)
    script = (
        "import os, numpy as np, torch\n"
        "from edm.generation.outputs import PartWriter\n"
        "from edm.generation.sampling import plan_images\n"
        "def killed(f, **arrays):\n"
        "    f.write(b'PK partial'); f.flush(); os._exit(9)\n"
        "np.savez = killed\n"
        f"PartWriter({str(tmp_path)!r}).write(plan_images([1], None, 0), torch.full((1, 1, 4, 4), -1.0), None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()
    parts = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert len(parts) == 2 and parts[0].startswith(".") and parts[0].endswith(".tmp")  # the torn write
    assert [spec.seed for spec in PartWriter(tmp_path).pending(plan_images([0, 1], None, 0))] == [1]
    images, _ = read_parts(tmp_path, [0])
    assert images.shape == (1, 4, 4, 1)


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_a_damaged_part_is_named_by_its_path_with_the_way_out(tmp_path, damage):
    """A part cut short or with a changed byte (our writes are atomic: something else did it) is a ValueError naming
    the file and saying to delete it, not a BadZipFile traceback: where the parts are merged, and a part cut short
    already where a resume lists the seeds done (which reads each part's seeds only: a changed pixel shows when the
    images are read); deleted, its images are pending again."""
    writer = PartWriter(tmp_path)
    plan = plan_images([0, 1], None, 0)
    writer.write(plan[:1], torch.full((1, 1, 4, 4), -1.0), None)
    writer.write(plan[1:], torch.full((1, 1, 4, 4), 1.0), None)
    part = sorted((tmp_path / "parts").glob("*.npz"))[1]
    data = bytearray(part.read_bytes())
    if damage == "cut":
        data = data[: len(data) // 2]
    else:
        data[data.index(b"\x93NUMPY") + 130] ^= 0xFF  # a pixel of the first array's data
    part.write_bytes(bytes(data))
    message = rf"{part.name} is not a readable part \(.*\): delete it and rerun the same command"
    if damage == "cut":
        with pytest.raises(ValueError, match=message):
            writer.pending(plan)
    else:
        assert writer.pending(plan) == []
    with pytest.raises(ValueError, match=message):
        finalize("npz", tmp_path, [0, 1])
    part.unlink()
    assert [spec.seed for spec in writer.pending(plan)] == [1]


def test_finalize_names_missing_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the sampler again"):
        finalize("npz", tmp_path, [0, 1])


def test_grid_layout(tmp_path):
    from PIL import Image

    images = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 2, 2)
    path = save_grid(tmp_path / "g.png", images, 3, scale=4)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2)  # 2 rows x 3 columns of 8x8 tiles, 2 px borders
    assert (grid[:2] == 128).all() and (grid[:, 10:12] == 128).all()  # gray borders
    expected = to_uint8(images)[:, 0, 0, 0].tolist()
    for k in range(6):
        r, c = divmod(k, 3)
        tile = grid[2 + 10 * r: 10 + 10 * r, 2 + 10 * c: 10 + 10 * c]
        assert (tile == expected[k]).all()


def test_grids_are_upscaled_to_readable_tiles_by_default():
    """Unless a scale is given, each tile becomes at least GRID_TILE_PX pixels wide: 8x8 -> 64x64."""
    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    assert grid_image(images).shape == (2 * 66 + 2, 2 * 66 + 2, 1)
    assert grid_image(np.zeros((1, 100, 100, 3), dtype=np.uint8)).shape == (104, 104, 3)


def test_parts_of_a_conditional_and_an_unconditional_model_are_not_merged(tmp_path):
    """Unconditional parts carry no labels key; a folder mixing both kinds is refused by name."""
    specs = plan_images([0, 1], None, 0)
    images = torch.zeros(2, 1, 2, 2)
    PartWriter(tmp_path).write(specs[:1], images[:1], None)
    with np.load(next((tmp_path / "parts").glob("*.npz"))) as data:
        assert "labels" not in data.files
    assert read_parts(tmp_path, [0])[1] is None
    PartWriter(tmp_path).write(specs[1:], images[1:], torch.tensor([3]))
    assert read_parts(tmp_path, [1])[1].tolist() == [3]
    with pytest.raises(ValueError, match="mixes parts with and without class labels"):
        read_parts(tmp_path, [0, 1])
