"""U-Nets (edm/networks): shapes, parameter counts, conditioning, training, precision, layout, compile.

Freshly built networks have (near-)zero last layers, so tests that compare outputs first
give every parameter a random value (`randomized`); otherwise a broken path could hide
behind a zero output.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edm import networks
from edm.networks.layers import Conv2d, PositionalEmbedding, attend

REPO = Path(__file__).resolve().parents[1]

# Small versions of each architecture: real structure (2 levels, attention), few channels.
SMALL = {
    "tiny": dict(),
    "ddpmpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, dropout=0.0),
    "ncsnpp": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, dropout=0.0),
    "ncsnpp_skip": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, dropout=0.0,
                        encoder_type="skip", decoder_type="skip"),
    # ADM has out_channels // 64 attention heads: 64 channels keep attention on.
    "adm": dict(model_channels=64, channel_mult=[1, 2], num_blocks=1, dropout=0.0, label_dim=0),
}
PRESET = {"ncsnpp_skip": "ncsnpp"}


pytestmark = pytest.mark.usefixtures("one_thread")


def small(arch: str, res: int, ch: int, **kw) -> torch.nn.Module:
    """A small network of the given architecture with attention at its lower resolution."""
    kw = dict(SMALL[arch], img_resolution=res, in_channels=ch) | kw
    if arch != "tiny":
        kw.setdefault("attn_resolutions", [res // 2])
    return networks.build(PRESET.get(arch, arch), **kw)


def randomized(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: weights N(0, 1/fan_in), vectors N(1, 0.3²) (norm gains, biases)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return net


def batch(res: int, ch: int, n: int = 2, label_dim: int = 0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ch, res, res, generator=gen)
    c_noise = torch.randn(n, generator=gen)
    labels = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
    return x, c_noise, labels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# --------------------------------------------------------------------------------------
# Shapes and parameter counts.

@pytest.mark.parametrize("arch", list(SMALL))
@pytest.mark.parametrize("res,ch,label_dim", [(8, 1, 0), (16, 1, 10), (32, 3, 0), (32, 3, 10)])
def test_output_shape(arch, res, ch, label_dim):
    torch.manual_seed(0)
    net = small(arch, res, ch, label_dim=label_dim).eval()
    x, c_noise, labels = batch(res, ch, label_dim=label_dim)
    with torch.no_grad():
        out = net(x, c_noise, labels)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_out_channels_override():
    """out_channels defaults to in_channels; an explicit value (e.g. ADM's 2C for iDDPM) wins."""
    assert small("adm", 8, 3, out_channels=6)(*batch(8, 3)[:2]).shape == (2, 6, 8, 8)
    assert small("tiny", 8, 1)(*batch(8, 1)[:2]).shape == (2, 1, 8, 8)


def num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# Counts of NVlabs/edm SongUNet / DhariwalUNet with the same hyper-parameters (EDM paper:
# DDPM++ 55.73 M, NCSN++ 56.4 M at CIFAR-10 32x32x3, ADM 295.9 M at ImageNet 64x64x3).
@pytest.mark.parametrize("name,overrides,count", [
    ("ddpmpp", {}, 55_732_739),
    ("ddpmpp", dict(label_dim=10, augment_dim=9), 55_735_299),
    ("ncsnpp", {}, 56_395_523),
    ("ncsnpp", dict(label_dim=10, augment_dim=9), 56_400_643),
    ("adm", {}, 295_899_267),
    ("adm", dict(label_dim=0), 295_131_267),
    ("tiny", {}, 749_891),
])
def test_parameter_count(name, overrides, count):
    with torch.device("meta"):
        net = networks.build(name, **overrides)
    assert num_params(net) == count


def test_tiny_is_small_and_attends_at_lowest_resolution():
    for res in (8, 16, 32):
        net = networks.build("tiny", img_resolution=res, in_channels=1)
        assert num_params(net) < 1_000_000
        heads = {f"{part}.{name}": block.num_heads for part in ("enc", "dec")
                 for name, block in getattr(net, part).items() if hasattr(block, "num_heads")}
        low = f"{res // 2}x{res // 2}"
        with_attention = {name for name, h in heads.items() if h}
        assert with_attention == {f"enc.{low}_block0", f"dec.{low}_in0", f"dec.{low}_block1"}
        assert all(h in (0, 1) for h in heads.values())


def test_a_new_preset_derived_from_tiny_attends_at_its_lowest_resolution_too(monkeypatch):
    """The rule "attention at the lowest resolution R/2^(L − 1)" is the preset's data (its attn_resolutions at its
    own lowest resolution), not a list of names: a preset added to the registry from tiny's values keeps it."""
    from types import MappingProxyType

    from edm.networks import presets

    micro = (presets.SongUNet, lambda: presets._tiny() | dict(model_channels=16))
    monkeypatch.setattr(presets, "_PRESETS", MappingProxyType({**presets._PRESETS, "micro": micro}))
    for res, mult in ((8, [1, 2]), (32, [1, 2, 2])):
        assert presets.resolve("micro", img_resolution=res, channel_mult=mult)[1]["attn_resolutions"] == \
            presets.resolve("tiny", img_resolution=res, channel_mult=mult)[1]["attn_resolutions"] == (res >> (len(mult) - 1),)
    assert presets.resolve("ddpmpp", img_resolution=64)[1]["attn_resolutions"] == (16,)  # not at its lowest: kept


def test_reference_state_dict_names():
    """Parameter/buffer names follow NVlabs/edm, so its state_dicts load with strict=True."""
    sd = small("ncsnpp", 16, 3, label_dim=10, augment_dim=9).state_dict()
    for key in ["map_noise.freqs", "map_label.weight", "map_label.bias", "map_augment.weight",
                "map_layer0.weight", "map_layer1.bias", "enc.16x16_conv.weight", "enc.8x8_down.conv0.resample_filter",
                "enc.8x8_down.skip.weight", "enc.8x8_aux_residual.weight", "enc.8x8_aux_residual.resample_filter",
                "enc.8x8_block0.qkv.weight", "enc.8x8_block0.norm2.weight", "dec.8x8_in0.proj.weight",
                "dec.16x16_up.conv0.resample_filter", "dec.16x16_block1.skip.weight", "dec.16x16_aux_norm.weight",
                "dec.16x16_aux_conv.weight"]:
        assert key in sd, key
    assert "map_augment.bias" not in sd and "dec.8x8_in1.qkv.weight" not in sd
    assert sd["enc.8x8_aux_residual.resample_filter"].shape == (1, 1, 4, 4)
    adm = small("adm", 16, 3, label_dim=10).state_dict()
    for key in ["map_label.weight", "enc.16x16_conv.bias", "enc.8x8_down.skip.resample_filter", "out_norm.weight",
                "out_conv.weight", "dec.8x8_in0.qkv.weight", "dec.16x16_block0.affine.weight"]:
        assert key in adm, key
    assert "map_label.bias" not in adm and "enc.8x8_down.skip.weight" not in adm
    assert len(sd) == len(small("ncsnpp", 16, 3, label_dim=10, augment_dim=9).state_dict())


# Outputs of NVlabs/edm's own SongUNet / DhariwalUNet (computed once outside this repo) for
# small(arch, 16, 2, label_dim=4, augment_dim=3) built after torch.manual_seed(0), with
# randomized(net) weights loaded into the reference by load_state_dict(strict=True):
# out.flatten()[0:1020:170] and out.abs().mean() for batch(16, 2, label_dim=4) and
# augment_labels = randn(2, 3) from a generator seeded 9.
REFERENCE_OUTPUTS = {
    "ddpmpp": ([0.752336, 1.92444, 1.85983, 0.0344127, 1.05458, 1.36213], 1.2726),
    "ncsnpp": ([0.247616, 1.64529, 2.14361, 2.14387, 1.42381, 1.32793], 1.39106),
    "ncsnpp_skip": ([2.12136, 3.33298, 6.5871, 3.64654, 4.00888, 6.86658], 4.40045),
    "adm": ([1.61485, 0.873014, 2.07387, -0.453208, 0.71671, 0.972228], 0.984132),
}


@pytest.mark.parametrize("arch", list(REFERENCE_OUTPUTS))
def test_matches_reference_outputs(arch):
    """Same weights, same function as NVlabs/edm (fp32; measured there to < 1e-6 relative)."""
    torch.manual_seed(0)
    net = randomized(small(arch, 16, 2, label_dim=4, augment_dim=3)).eval()
    x, c_noise, labels = batch(16, 2, label_dim=4)
    augment = torch.randn(2, 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = net(x, c_noise, labels, augment)
    values, abs_mean = REFERENCE_OUTPUTS[arch]
    torch.testing.assert_close(out.flatten()[0:1020:170], torch.tensor(values), rtol=1e-4, atol=1e-4)
    assert out.abs().mean().item() == pytest.approx(abs_mean, rel=1e-4)


# --------------------------------------------------------------------------------------
# Layers: the math of resampling, attention and embeddings.

def test_box_resampling_is_average_pool_and_nearest():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True)
    up = Conv2d(3, 3, kernel=0, up=True)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_fir_resampling_preserves_constants_and_shape():
    x = torch.full((1, 2, 8, 8), 3.0)
    for layer, size in [(Conv2d(2, 2, kernel=0, down=True, resample_filter=[1, 3, 3, 1]), 4),
                        (Conv2d(2, 2, kernel=0, up=True, resample_filter=[1, 3, 3, 1]), 16)]:
        y = layer(x)
        assert y.shape == (1, 2, size, size)
        torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.full_like(y[..., 2:-2, 2:-2], 3.0))


def test_fused_down_is_conv_then_fir():
    torch.manual_seed(0)
    conv = Conv2d(3, 5, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True, init_bias=1)
    x = torch.randn(2, 3, 8, 8)
    full = F.conv2d(x, conv.weight, padding=2)
    f = conv.resample_filter.expand(5, 1, 4, 4)
    expected = F.conv2d(full, f, stride=2, groups=5) + conv.bias[:, None, None]
    torch.testing.assert_close(conv(x), expected)


def test_attention_matches_reference_layout():
    """qkv channels are laid out (head, channel, q|k|v), as in NVlabs/edm's reshape."""
    torch.manual_seed(0)
    b, heads, c, h, w = 2, 3, 4, 5, 3
    qkv = torch.randn(b, heads * c * 3, h, w, dtype=torch.float64)
    q, k, v = qkv.reshape(b * heads, c, 3, h * w).unbind(2)
    weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c)).softmax(dim=2)
    expected = torch.einsum("nqk,nck->ncq", weights, v).reshape(b, heads * c, h, w)
    torch.testing.assert_close(attend(qkv, heads), expected)


def test_positional_embedding_formula():
    emb = PositionalEmbedding(8, max_positions=100, endpoint=True)
    c = torch.tensor([0.0, 1.5], dtype=torch.float64)
    freqs = torch.tensor([100 ** (-i / 3) for i in range(4)], dtype=torch.float64)
    expected = torch.cat([torch.outer(c, freqs).cos(), torch.outer(c, freqs).sin()], dim=1)
    torch.testing.assert_close(emb(c), expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Conditioning.

@pytest.mark.parametrize("arch", ["tiny", "ncsnpp", "adm"])
def test_output_depends_on_c_noise(arch):
    net = randomized(small(arch, 8, 1)).eval()
    x, c_noise, _ = batch(8, 1)
    with torch.no_grad():
        assert rel_err(net(x, c_noise), net(x, c_noise + 0.5)) > 1e-3


def test_scalar_c_noise_broadcasts():
    net = randomized(small("tiny", 8, 1)).eval()
    x, _, _ = batch(8, 1)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor(0.3)), net(x, torch.full((2,), 0.3)))


@pytest.mark.parametrize("arch", ["tiny", "ncsnpp", "adm"])
def test_output_depends_on_label(arch):
    net = randomized(small(arch, 8, 1, label_dim=4)).eval()
    x, c_noise, _ = batch(8, 1)
    eye = torch.eye(4)
    with torch.no_grad():
        out0, out1 = net(x, c_noise, eye[[0, 0]]), net(x, c_noise, eye[[1, 1]])
        assert rel_err(out0, out1) > 1e-3
        # None is the null label: all zeros (what label dropout trains).
        torch.testing.assert_close(net(x, c_noise, None), net(x, c_noise, torch.zeros(2, 4)))


@pytest.mark.parametrize("arch", ["tiny", "adm"])
def test_label_dropout_removes_label(arch):
    x, c_noise, _ = batch(8, 1)
    eye = torch.eye(4)
    for p, independent in [(1.0, True), (0.0, False)]:
        net = randomized(small(arch, 8, 1, label_dim=4, label_dropout=p)).train()
        out0, out1 = net(x, c_noise, eye[[0, 0]]), net(x, c_noise, eye[[1, 1]])
        assert (rel_err(out0, out1) < 1e-6) == independent
        if independent:
            torch.testing.assert_close(out0, net(x, c_noise, None))


def test_augment_labels_change_output():
    net = randomized(small("tiny", 8, 1, augment_dim=9)).eval()
    x, c_noise, _ = batch(8, 1)
    with torch.no_grad():
        assert rel_err(net(x, c_noise, augment_labels=torch.randn(2, 9)), net(x, c_noise)) > 1e-3


def test_batch_split_does_not_change_an_image():
    net = randomized(small("adm", 8, 1, label_dim=4)).eval()
    x, c_noise, labels = batch(8, 1, n=3, label_dim=4)
    with torch.no_grad():
        whole = net(x, c_noise, labels)
        torch.testing.assert_close(whole[1:], net(x[1:], c_noise[1:], labels[1:]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# Training, precision, memory layout, compile.

def test_adam_reduces_mse_on_fixed_batch():
    torch.manual_seed(0)
    net = networks.build("tiny", img_resolution=8, in_channels=1).train()
    x, c_noise, _ = batch(8, 1, n=4)
    target = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.mse_loss(net(x, c_noise), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("arch", ["tiny", "ncsnpp", "adm"])
def test_half_precision_autocast_close_to_fp32(arch, dtype, tol):
    """bf16 (8-bit mantissa) and fp16 (11-bit) autocast stay within their rounding of fp32."""
    net = randomized(small(arch, 16, 3, label_dim=4)).eval()
    x, c_noise, labels = batch(16, 3, label_dim=4)
    with torch.no_grad():
        ref = net(x, c_noise, labels)
        with torch.autocast("cpu", dtype=dtype):
            out = net(x, c_noise, labels)
    assert out.shape == ref.shape
    assert out.dtype == dtype  # autocast reaches the last layer
    assert 0 < rel_err(out, ref) < tol


@pytest.mark.parametrize("arch", ["tiny", "ncsnpp", "adm"])
def test_channels_last_same_output(arch):
    net = randomized(small(arch, 16, 3, label_dim=4)).eval()
    x, c_noise, labels = batch(16, 3, label_dim=4)
    with torch.no_grad():
        ref = net(x, c_noise, labels)
        out = net(x.to(memory_format=torch.channels_last), c_noise, labels)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        net = net.to(memory_format=torch.channels_last)
        torch.testing.assert_close(net(x.to(memory_format=torch.channels_last), c_noise, labels), ref,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(SMALL))
def test_compile_fullgraph_no_recompile(arch):
    """Every architecture variant: dynamo captures the whole forward (training mode: dropout,
    label dropout, augmentation labels) in one graph, and a second call reuses it.
    backend='eager' checks the capture without inductor's cost (tests/test_cuda.py compiles
    the full presets with inductor on a GPU)."""
    torch._dynamo.reset()
    net = randomized(small(arch, 8, 3, label_dim=4, augment_dim=9, dropout=0.1, label_dropout=0.2)).train()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    x, c_noise, labels = batch(8, 3, label_dim=4)
    augment_labels = torch.randn(2, 9, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(3)
    out = compiled(x, c_noise, labels, augment_labels=augment_labels)
    torch.manual_seed(3)
    torch.testing.assert_close(out, net(x, c_noise, labels, augment_labels=augment_labels))
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled(x, c_noise + 1, labels, augment_labels=augment_labels)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    net = randomized(networks.build("tiny", img_resolution=8, in_channels=1, label_dim=4)).eval()
    x, c_noise, labels = batch(8, 1, label_dim=4)
    with torch.no_grad():
        out = torch.compile(net, fullgraph=True)(x, c_noise, labels)
        torch.testing.assert_close(out, net(x, c_noise, labels), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# Builder, structured config and the Hydra group.

def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="tiny, ddpmpp, ncsnpp, adm"):
        networks.build("unet9000")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="encoder_type"):
        networks.build("adm", encoder_type="residual")
    with pytest.raises(ValueError, match="divisible"):
        networks.build("tiny", img_resolution=9)
    with pytest.raises(ValueError, match="embedding_type"):
        networks.build("ddpmpp", embedding_type="learned")
    for bad, named in ((dict(model_channels=0), "model_channels=0"), (dict(channel_mult=[]), r"channel_mult=\[\]"),
                       (dict(channel_mult=[1, 0]), r"channel_mult=\[1, 0\]"), (dict(dropout=1.5), "dropout=1.5")):
        for name in ("tiny", "edm2-tiny"):  # (0 channels divided by zero, an empty channel_mult shifted by −1)
            with pytest.raises(ValueError, match=rf"network '{name}': {named} cannot be built"):
                networks.build(name, **bad)


def test_the_small_presets_of_the_tests_cover_every_network_class_of_the_registry():
    """tests/conftest.py's SMALL_PRESETS (what the step, consistency and MeanFlow tests build) hold one preset of each
    class in the registry: a preset of a new class is tested there too once it has a small configuration."""
    from conftest import SMALL_PRESETS

    classes = {networks.preset(name)[0] for name in networks.PRESETS}
    untested = sorted(cls.__name__ for cls in classes - {networks.preset(name)[0] for name in SMALL_PRESETS})
    assert not untested, f"no preset of {', '.join(untested)} in tests/conftest.py's SMALL_PRESETS: add a small one"


@pytest.mark.parametrize("name", networks.PRESETS)
def test_hydra_config_matches_preset(name):
    omegaconf = pytest.importorskip("omegaconf")
    yaml_cfg = omegaconf.OmegaConf.load(REPO / "configs" / "network" / f"{name}.yaml")
    cfg = omegaconf.OmegaConf.merge(omegaconf.OmegaConf.structured(networks.NetworkConfig), yaml_cfg)
    assert cfg.name == name
    kwargs = omegaconf.OmegaConf.to_container(cfg)
    with torch.device("meta"):
        from_yaml, preset = networks.build(**kwargs), networks.build(name)
    shapes = [{k: v.shape for k, v in net.state_dict().items()} for net in (from_yaml, preset)]
    assert shapes[0] == shapes[1]
    assert hyper_parameters(from_yaml) == hyper_parameters(preset)


def hyper_parameters(net: torch.nn.Module) -> tuple:
    """What the state_dict does not show: dropout rates, attention heads, skip scales, norm eps."""
    blocks = [m for m in net.modules() if isinstance(m, networks.UNetBlock)]
    return net.label_dropout, [(b.dropout, b.num_heads, b.skip_scale, b.norm0.eps) for b in blocks]
