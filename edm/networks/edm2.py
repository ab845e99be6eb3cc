"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", config G; Figure 21).

Every layer keeps the expected magnitude of its activations at one:

    normalize(x)   = x / (ε + ‖x‖/√N)                         (per output channel / pixel)
    MPConv         y = conv(x, g · normalize(w) / √fan_in)     (eq. 47, 66); forced weight normalization
                   w ← normalize(w) before each training micro-batch (force_weight_normalization_)
    mp_silu(x)     = silu(x) / 0.596                           (eq. 81)
    mp_sum(a, b)   = ((1 − t) a + t b) / √((1 − t)² + t²)       (eq. 88)
    mp_cat(a, b)   = [w_a a, w_b b], w = √((N_a + N_b)/((1 − t)² + t²)) · (1 − t, t)/√(N_a, N_b)   (eq. 103)
    MPFourier(c)   = √2 cos(2π (f c + φ)), f ~ N(0, 1), φ ~ U(0, 1)   (eq. 75)

No biases and no normalization layers; attention is cosine attention (q, k, v pixel-normalized);
the output conv has a learned gain that starts at zero, so F starts as 0. The module tree and
state_dict names are NVlabs/edm2's `UNet` (emb_fourier, emb_noise, emb_label, enc.{R}x{R}_conv,
enc.{R}x{R}_down, enc.{R}x{R}_block{i}, dec.{R}x{R}_in0/_in1/_up/_block{i}, out_conv, out_gain;
in blocks emb_gain, conv_res0, emb_linear, conv_res1, conv_skip, attn_qkv, attn_proj).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import broadcast_noise, check_second_noise, full_precision, prepare_labels, second_noise_input
from .song_unet import check_resolution

__all__ = ["EDM2UNet", "MPConv", "MPFourier", "normalize", "mp_silu", "mp_sum", "mp_cat", "force_weight_normalization_"]


def normalize(x: Tensor, dim: Sequence[int] | None = None, eps: float = 1e-4) -> Tensor:
    """x / (ε + ‖x‖ √(n/N)) over `dim` (default: all but the first): unit RMS along `dim`."""
    dim = list(range(1, x.ndim)) if dim is None else list(dim)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=_at_least_float32(x.dtype))
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (the reference's), the dtype itself for float32 and float64."""
    return torch.promote_types(dtype, torch.float32)


def mp_silu(x: Tensor) -> Tensor:
    """silu(x) / 0.596: unit magnitude for x ~ N(0, 1)  (eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """((1 − t) a + t b) / √((1 − t)² + t²)  (eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenation along `dim` whose parts weigh (1 − t) and t, magnitude kept  (eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([(c / math.sqrt(n_a) * (1 - t)) * a, (c / math.sqrt(n_b) * t) * b], dim=dim)


def resample(x: Tensor, mode: str = "keep", f: Sequence[float] = (1, 1)) -> Tensor:
    """Box-filter 2x down- or upsampling (depthwise), or x itself."""
    if mode == "keep":
        return x
    taps = torch.as_tensor(f, dtype=x.dtype, device=x.device)
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps)[None, None].tile(x.shape[1], 1, 1, 1)
    pad = (len(f) - 1) // 2
    if mode == "down":
        return F.conv2d(x, kernel, groups=x.shape[1], stride=2, padding=(pad,))
    return F.conv_transpose2d(x, kernel * 4, groups=x.shape[1], stride=2, padding=(pad,))


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features √2 cos(f c + φ) of a scalar per example  (eq. 75)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        dtype = _at_least_float32(x.dtype)
        y = torch.outer(x.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or linear layer (kernel []), no bias  (eq. 47, 66)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: Tensor | float = 1.0) -> Tensor:
        w = self.weight.to(_at_least_float32(self.weight.dtype))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


@torch.no_grad()
def force_weight_normalization_(net: nn.Module) -> None:
    """w ← normalize(w) for every MPConv in `net` (EDM2's forced weight normalization, sec. 2.3): the training step
    does it before each micro-batch's forward passes, which stay free of in-place writes (a second pass or a JVP over
    the same weights, as consistency and MeanFlow training take, could not have them). A no-op for other networks."""
    for module in net.modules():
        if isinstance(module, MPConv):
            module.weight.copy_(normalize(module.weight.to(_at_least_float32(module.weight.dtype))))


class Block(nn.Module):
    """Encoder ('enc') or decoder ('dec') residual block with optional cosine self-attention (Figure 21)."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc", resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1), attention: bool = False, channels_per_head: int = 64,
        dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.flavor, self.resample_mode, self.resample_filter = flavor, resample_mode, tuple(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=[1])  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=[2]).unbind(3)  # cosine attention: pixel-normalized q, k, v
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            x = mp_sum(x, self.attn_proj(y.reshape(*x.shape)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """EDM2 U-Net F(x; c_noise, class): magnitude-preserving, learned output gain (zero at start)."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        dropout: float = 0.0,
        label_dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        channels_per_head: int = 64,
        resample_filter: Sequence[float] = (1, 1),
        second_noise: bool = False,
    ) -> None:
        check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        self.img_resolution, self.label_dim, self.label_dropout = img_resolution, label_dim, label_dropout
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        block = dict(emb_channels=cemb, dropout=dropout, res_balance=res_balance, attn_balance=attn_balance,
                     clip_act=clip_act, channels_per_head=channels_per_head, resample_filter=resample_filter)

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        if second_noise:  # a second noise level (MeanFlow's t − r) with a gain that starts at 0
            self.emb_noise2 = MPConv(cnoise, cemb, kernel=[])
            self.emb_noise2_gain = nn.Parameter(torch.zeros([]))
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels + 1  # the input gets a constant channel of ones
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, flavor="enc", resample_mode="down", **block)
            for i in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{i}"] = Block(cin, cout, flavor="enc", attention=res in attn_resolutions, **block)

        self.dec = nn.ModuleDict()
        skips = [layer.out_channels for layer in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, flavor="dec", resample_mode="up", **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{i}"] = Block(cin, cout, flavor="dec", attention=res in attn_resolutions, **block)
        self.out_conv = MPConv(cout, out_channels, kernel=[3, 3])

    def embed(self, c_noise: Tensor, batch: int, class_labels: Tensor | None, c_noise2: Tensor | None = None) -> Tensor:
        """emb = mp_silu(mp_sum(W_noise · fourier(c_noise) + g·W_2 · fourier(c_noise2), W_label · √L label,
        t = label_balance)); the g term (g learned, 0 at start) only with second_noise (c_noise2 None = 0)."""
        emb = self.emb_noise(self.emb_fourier(broadcast_noise(c_noise, batch)))
        if hasattr(self, "emb_noise2"):
            second = self.emb_fourier(broadcast_noise(second_noise_input(c_noise2, c_noise), batch))
            emb = emb + self.emb_noise2_gain * self.emb_noise2(second)
        if self.emb_label is not None:
            dropout = self.label_dropout if self.training else 0.0
            labels = prepare_labels(class_labels, batch, self.label_dim, emb.dtype, emb.device, dropout)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(self.label_dim)), t=self.label_balance)
        return mp_silu(emb)

    def forward(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None, c_noise2: Tensor | None = None
    ) -> Tensor:
        """F(x; c_noise) of x's shape (out_channels); c_noise is [batch] (or a scalar); c_noise2 the second noise
        level of a network built with second_noise."""
        check_second_noise(hasattr(self, "emb_noise2"), c_noise2)
        with full_precision(x.device):
            emb = self.embed(c_noise, x.shape[0], class_labels, c_noise2)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips: list[Tensor] = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)
