"""DDPM++ and NCSN++ (Song et al. 2021, "Score-based generative modeling through SDEs").

Same function and state_dict layout as NVlabs/edm `SongUNet`:

    map_noise (PositionalEmbedding | FourierEmbedding: `map_noise.freqs`), map_label,
    map_augment, map_layer0, map_layer1
    enc.{R}x{R}_conv                     3x3 input conv (level 0)
    enc.{R}x{R}_down                     downsampling UNetBlock (levels > 0)
    enc.{R}x{R}_aux_down, _aux_skip      encoder_type='skip': resampled image, 1x1 conv
    enc.{R}x{R}_aux_residual             encoder_type='residual': fused 3x3 conv + FIR down
    enc.{R}x{R}_block{i}                 i < num_blocks
    dec.{R}x{R}_in0, _in1                lowest level (in0 always has attention)
    dec.{R}x{R}_up                       upsampling UNetBlock (other levels)
    dec.{R}x{R}_block{i}                 i ≤ num_blocks, consume one encoder skip each
    dec.{R}x{R}_aux_up, _aux_norm, _aux_conv   output head(s): level 0, or every level
                                         with decoder_type='skip'

where R = img_resolution >> level. Everything under the names above is a layer from
`edm.networks.layers` with the reference's own sub-names (`norm0`, `conv0`, `affine`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..choices import check_choice
from .layers import (
    Conv2d,
    FourierEmbedding,
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

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def check_resolution(img_resolution: int, num_levels: int) -> None:
    """The image must halve cleanly num_levels − 1 times."""
    factor = 2 ** (num_levels - 1)
    if img_resolution % factor:
        raise ValueError(f"img_resolution {img_resolution} is not divisible by the downsampling factor {factor}")


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, box resampling) / NCSN++ (Fourier embedding, FIR
    [1,3,3,1] resampling, residual input pyramid) U-Net: F(x; c_noise, class, augment).

    Blocks: no adaptive scale, skip_scale √½, one attention head, GroupNorm eps 1e-6,
    xavier_uniform init (1e-5 gain on the last conv of each residual branch, √0.2 on qkv).
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[int] = (1, 1),
        second_noise: bool = False,
    ) -> None:
        check_choice(EMBEDDING_TYPES, embedding_type, "embedding_type")
        check_choice(ENCODER_TYPES, encoder_type, "encoder_type")
        check_choice(DECODER_TYPES, decoder_type, "decoder_type")
        check_resolution(img_resolution, len(channel_mult))
        super().__init__()
        register_einops_backend()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping: c_noise, class and augmentation labels -> embedding vector.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        # A second noise level (MeanFlow's t − r), zero-initialized: the network starts as the one without it.
        self.map_noise2 = Linear(noise_channels, noise_channels, init_weight=0.0) if second_noise else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout, cin = model_channels, cout
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for i in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block
                )
        skips = [layer.out_channels for name, layer in self.enc.items() if "_aux_" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            lowest = level == len(channel_mult) - 1
            if lowest:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=attention, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and not lowest:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def features(self, c_noise: Tensor, batch: int) -> Tensor:
        """e(c_noise) = [sin, cos] of the noise embedding, [batch, noise_channels]."""
        emb = self.map_noise(broadcast_noise(c_noise, batch))
        emb = rearrange(emb, "b (two c) -> b two c", two=2).flip(1)
        return rearrange(emb, "b two c -> b (two c)")

    def embed(
        self, c_noise: Tensor, batch: int, class_labels: Tensor | None, augment_labels: Tensor | None,
        c_noise2: Tensor | None = None,
    ) -> Tensor:
        """emb = silu(W1 silu(W0 (e(c_noise) + W_label √label_dim · label + W_aug · aug + W_2 e(c_noise2)))), e = [sin,
        cos]; the last term only with second_noise (c_noise2 None = 0)."""
        emb = self.features(c_noise, batch)
        if self.map_noise2 is not None:
            emb = emb + self.map_noise2(self.features(second_noise_input(c_noise2, c_noise), batch))
        if self.map_label is not None:
            dropout = self.label_dropout if self.training else 0.0
            labels = prepare_labels(class_labels, batch, self.label_dim, emb.dtype, emb.device, dropout)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def encode(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the encoder; returns the lowest-resolution features and the skip stack."""
        skips: list[Tensor] = []
        aux = x
        for name, layer in self.enc.items():
            role = name.split("_", 1)[1]
            if role == "aux_down":
                aux = layer(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + layer(aux)
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x) if role == "conv" else layer(x, emb)
                skips.append(x)
        return x, skips

    def decode(self, x: Tensor, skips: list[Tensor], emb: Tensor) -> Tensor:
        """Run the decoder; the output is the sum of the (upsampled) aux_conv heads."""
        out: Tensor | None = None
        normed = x
        for name, layer in self.dec.items():
            role = name.split("_", 1)[1]
            if role == "aux_up":
                out = layer(out)
            elif role == "aux_norm":
                normed = layer(x)
            elif role == "aux_conv":
                head = layer(F.silu(normed))
                out = head if out is None else head + out
            else:
                if role.startswith("block"):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        c_noise2: Tensor | None = None,
    ) -> Tensor:
        """F(x; c_noise) of x's shape; c_noise is [batch] (or a scalar), class_labels [batch, label_dim]; c_noise2
        the second noise level of a network built with second_noise."""
        check_second_noise(self.map_noise2 is not None, c_noise2)
        with full_precision(x.device):
            emb = self.embed(c_noise, x.shape[0], class_labels, augment_labels, c_noise2)
        x, skips = self.encode(x, emb)
        return self.decode(x, skips, emb)
