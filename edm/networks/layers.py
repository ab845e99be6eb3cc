"""Building blocks shared by SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM).

Each layer computes the same function as its namesake in NVlabs/edm
`training/networks.py` and keeps the same parameter and buffer names, so a reference
state_dict loads with `load_state_dict(strict=True)`:

| module | state_dict entries |
| --- | --- |
| `Linear` | `weight` [out, in], `bias` [out] (optional) |
| `Conv2d` | `weight` [out, in, k, k], `bias` [out] (both absent when kernel = 0), `resample_filter` [1, 1, n, n] (persistent buffer, only when up or down) |
| `GroupNorm` | `weight`, `bias` |
| `FourierEmbedding` | `freqs` (persistent buffer) |
| `PositionalEmbedding` | nothing |
| `UNetBlock` | `norm0`, `conv0`, `affine`, `norm1`, `conv1`, `skip` (optional), `norm2`, `qkv`, `proj` (attention only) |

All layers cast their weights to the input's dtype, so an fp32 model runs on fp16/bf16
activations without autocast (as the reference's `use_fp16` does), and autocast works too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from ..choices import check_choice

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """Random tensor of unit-scaled variance for the given init mode.

    xavier_uniform: U(±sqrt(6/(fan_in+fan_out))), xavier_normal: N(0, 2/(fan_in+fan_out)),
    kaiming_uniform: U(±sqrt(3/fan_in)), kaiming_normal: N(0, 1/fan_in).
    """
    check_choice(INIT_MODES, mode, "init mode")
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    return math.sqrt(1 / fan_in) * torch.randn(*shape)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


class Linear(nn.Module):
    """y = x Wᵀ + b, with W = init_weight · weight_init(mode) and b = init_bias · weight_init(mode)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), _cast(self.bias, x.dtype))


def fir_filter(taps: Sequence[float]) -> Tensor:
    """Separable 2-D FIR kernel f fᵀ / (Σf)², shape [1, 1, n, n] (unit DC gain)."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return torch.outer(f, f)[None, None] / f.sum().square()


def fir_upsample(x: Tensor, f: Tensor, padding: int) -> Tensor:
    """Depthwise 2x upsampling: transposed convolution of each channel with 4f, stride 2."""
    kernel = repeat(f * 4, "1 1 h w -> c 1 h w", c=x.shape[1])
    return F.conv_transpose2d(x, kernel, stride=2, padding=padding, groups=x.shape[1])


def fir_downsample(x: Tensor, f: Tensor, padding: int) -> Tensor:
    """Depthwise 2x downsampling: convolution of each channel with f, stride 2."""
    kernel = repeat(f, "1 1 h w -> c 1 h w", c=x.shape[1])
    return F.conv2d(x, kernel, stride=2, padding=padding, groups=x.shape[1])


class Conv2d(nn.Module):
    """k×k convolution with optional 2x up- or downsampling by an FIR filter.

    kernel = 0 gives a parameter-free resampler. Unfused order: resample, then convolve
    (both 'same'-padded). Fused (NCSN++ residual input path): up: transposed FIR with
    padding max(f_pad − w_pad, 0), then conv with padding max(w_pad − f_pad, 0); down: conv
    with padding w_pad + f_pad, then unpadded strided FIR. [1, 1] is box resampling (nearest
    up, 2x2 average down); [1, 3, 3, 1] is the NCSN++ FIR filter.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel**2, fan_out=out_channels * kernel**2)
        self.weight = (
            nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if kernel else None
        )
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_buffer("resample_filter", fir_filter(resample_filter) if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w, b, f = _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), _cast(self.resample_filter, x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and w is not None and self.up:
            x = fir_upsample(x, f, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = fir_downsample(x, f, padding=0)
        else:
            if self.up:
                x = fir_upsample(x, f, padding=f_pad)
            if self.down:
                x = fir_downsample(x, f, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.to(x.dtype)[:, None, None]  # x's dtype: under autocast the conv output's
        return x


class GroupNorm(nn.Module):
    """Group normalization with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(
        self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(c ω_i), sin(c ω_i)], ω_i = max_positions^(−i/(C/2 − endpoint)).

    DDPM++ uses endpoint=True (then swaps to [sin, cos]); ADM uses endpoint=False.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, c: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=c.device) / (half - int(self.endpoint))
        freqs = (1 / self.max_positions) ** exponents
        angles = torch.outer(c, freqs.to(c.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π c ω), sin(2π c ω)], ω ~ N(0, scale²) (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: Tensor) -> Tensor:
        angles = torch.outer(c, (2 * math.pi * self.freqs).to(c.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def register_einops_backend() -> None:
    """Make einops create (and cache) its torch backend now rather than inside the first compiled call.

    Dynamo traces einops and guards on that cache, so a first call that fills it would force
    one full recompilation on the second call. The layers apply einops to plain tensors only
    (never to Parameters, a separate cache entry), so this one entry suffices. Idempotent;
    called by the U-Net constructors.
    """
    rearrange(torch.zeros(1, device="cpu"), "a -> a")


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last if x is stored that way (and not also plain contiguous), else contiguous_format."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def attend(qkv: Tensor, num_heads: int) -> Tensor:
    """softmax(q kᵀ / √d) v per head via SDPA; qkv is [B, 3C, H, W] laid out as (head, channel, q|k|v).

    The result is stored in qkv's memory format, so the layout (and hence which elements a
    dropout mask drawn in memory order hits) does not depend on the head count.
    """
    height = qkv.shape[2]
    q, k, v = rearrange(qkv, "b (h c three) x y -> three b h (x y) c", h=num_heads, three=3).unbind(0)
    a = F.scaled_dot_product_attention(q, k, v)
    a = rearrange(a, "b h (x y) c -> b (h c) x y", x=height)
    return a.contiguous(memory_format=memory_format_of(qkv))


class UNetBlock(nn.Module):
    """Pre-activation residual block with embedding conditioning and optional self-attention.

    h = conv0(silu(norm0(x)));  adaptive_scale: h = silu(shift + norm1(h)(1 + scale)),
    else h = silu(norm1(h + affine(emb)));  x = (conv1(dropout(h)) + skip(x)) · skip_scale;
    attention: x = (proj(attend(qkv(norm2(x)))) + x) · skip_scale.
    The union of the DDPM++, NCSN++ and ADM blocks. With attention=True the head count is
    num_heads, or out_channels // channels_per_head (which may be 0: attention is then off,
    exactly as in the reference).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ) -> None:
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        init_attn = init_attn if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = rearrange(self.affine(emb), "b c -> b c 1 1").to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            a = attend(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


def prepare_labels(
    labels: Tensor | None, batch: int, label_dim: int, dtype: torch.dtype, device: torch.device, dropout: float
) -> Tensor:
    """Float conditioning vectors [batch, label_dim]; None is the null label (zeros).

    With dropout > 0 each row is zeroed with that probability (classifier-free guidance
    training), drawn from the global RNG as torch.rand([batch, 1]) >= dropout.
    """
    if labels is None:
        return torch.zeros(batch, label_dim, dtype=dtype, device=device)
    labels = labels.to(dtype).reshape(-1, label_dim).expand(batch, label_dim)
    if dropout:
        keep = torch.rand([batch, 1], device=device) >= dropout
        labels = labels * keep.to(dtype)
    return labels


def broadcast_noise(c_noise: Tensor, batch: int) -> Tensor:
    """c_noise as a [batch] vector (a scalar or [1] is repeated for every example)."""
    return torch.broadcast_to(c_noise.reshape(-1), (batch,))


def full_precision(device: torch.device):
    """A region without autocast on `device`: the noise-level embedding is computed in the parameters' dtype
    (float32) under bf16/fp16 mixed precision, where few-step losses differentiate through it in time."""
    return torch.autocast(device.type, enabled=False)


def second_noise_input(c_noise2: Tensor | None, c_noise: Tensor) -> Tensor:
    """The second noise input of a network built with second_noise: c_noise2, or 0 (MeanFlow's r = t) when None."""
    return torch.zeros_like(c_noise) if c_noise2 is None else c_noise2.to(c_noise.dtype)


def check_second_noise(has_it: bool, c_noise2: Tensor | None) -> None:
    """A second noise level needs a network built with second_noise (network.second_noise=true)."""
    if c_noise2 is not None and not has_it:
        raise ValueError("this network has no second noise input (MeanFlow's t − r): build it with second_noise=True "
                         "(network.second_noise=true)")
