"""ADM (Dhariwal & Nichol 2021, "Diffusion models beat GANs on image synthesis").

Same function and state_dict layout as NVlabs/edm `DhariwalUNet`:

    map_noise (PositionalEmbedding, no parameters), map_augment, map_layer0, map_layer1,
    map_label (no bias)
    enc.{R}x{R}_conv                     3x3 input conv (level 0)
    enc.{R}x{R}_down                     downsampling UNetBlock (levels > 0)
    enc.{R}x{R}_block{i}                 i < num_blocks
    dec.{R}x{R}_in0, _in1                lowest level (in0 always has attention)
    dec.{R}x{R}_up                       upsampling UNetBlock (other levels)
    dec.{R}x{R}_block{i}                 i ≤ num_blocks, consume one encoder skip each
    out_norm, out_conv

where R = img_resolution >> level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    Conv2d,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    broadcast_noise,
    check_second_noise,
    full_precision,
    prepare_labels,
    second_noise_input,
    register_einops_backend,
)
from .song_unet import check_resolution


class DhariwalUNet(nn.Module):
    """ADM U-Net: F(x; c_noise, class, augment) with adaptive GroupNorm scale/shift blocks.

    Blocks: adaptive_scale, skip_scale 1, GroupNorm eps 1e-5, box resampling, attention
    heads of 64 channels (out_channels // 64 heads: none below 64 channels, as in the
    reference), kaiming_uniform init with gain √⅓ (zero for the last conv of each branch).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        second_noise: bool = False,
    ) -> None:
        check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        register_einops_backend()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping: c_noise, augmentation and class labels -> embedding vector.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        # A second noise level (MeanFlow's t − r), zero-initialized: the network starts as the one without it.
        self.map_noise2 = Linear(model_channels, model_channels, init_weight=0.0) if second_noise else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
            if label_dim else None
        )

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [layer.out_channels for layer in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embed(
        self, c_noise: Tensor, batch: int, class_labels: Tensor | None, augment_labels: Tensor | None,
        c_noise2: Tensor | None = None,
    ) -> Tensor:
        """emb = silu(W1 silu(W0 (e(c_noise) + W_aug · aug + W_2 e(c_noise2))) + W_label · label), e = [cos, sin];
        the W_2 term only with second_noise (c_noise2 None = 0)."""
        emb = self.map_noise(broadcast_noise(c_noise, batch))
        if self.map_noise2 is not None:
            emb = emb + self.map_noise2(self.map_noise(broadcast_noise(second_noise_input(c_noise2, c_noise), batch)))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            dropout = self.label_dropout if self.training else 0.0
            labels = prepare_labels(class_labels, batch, self.label_dim, emb.dtype, emb.device, dropout)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        c_noise2: Tensor | None = None,
    ) -> Tensor:
        """F(x; c_noise) of x's shape (out_channels); c_noise is [batch] (or a scalar); c_noise2 the second noise
        level of a network built with second_noise."""
        check_second_noise(self.map_noise2 is not None, c_noise2)
        with full_precision(x.device):
            emb = self.embed(c_noise, x.shape[0], class_labels, augment_labels, c_noise2)
        skips: list[Tensor] = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
