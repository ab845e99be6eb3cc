"""U-Nets F(x; c_noise) for the EDM denoiser: DDPM++/NCSN++ (SongUNet), ADM (DhariwalUNet) and EDM2's
magnitude-preserving U-Net (EDM2UNet).

    net = edm.networks.build("ddpmpp", img_resolution=32, in_channels=3, label_dim=10)
    out = net(x, c_noise, class_labels=None, augment_labels=None)   # out.shape == x.shape

`c_noise` is [batch] (a scalar is broadcast); `class_labels` is float/one-hot
[batch, label_dim], None meaning the null label (zeros, what label dropout trains) and
ignored when label_dim = 0; `augment_labels` is [batch, augment_dim] or None (no term).

Presets (`build(name, **overrides)`, overrides = NetworkConfig fields; out_channels
defaults to in_channels; parameter counts at the paper's resolution and channels, equal
to those of NVlabs/edm's networks with the same hyper-parameters):

| name | class | config | parameters |
| --- | --- | --- | --- |
| tiny | SongUNet | 32x32x3, 32 ch x (1, 2), 1 block, attention at the lowest resolution | 749,891 (748,737 with 1 channel) |
| ddpmpp | SongUNet | CIFAR-10 DDPM++: 32x32x3, 128 ch x (2, 2, 2), 4 blocks, attention 16, dropout 0.13 | 55,732,739 (55,735,299 with label_dim 10, augment_dim 9) |
| ncsnpp | SongUNet | CIFAR-10 NCSN++: as ddpmpp + Fourier embedding, residual encoder, FIR [1,3,3,1] | 56,395,523 (56,400,643 with label_dim 10, augment_dim 9) |
| adm | DhariwalUNet | ImageNet-64 ADM: 64x64x3, 1000 classes, 192 ch x (1, 2, 3, 4), 3 blocks, attention 32/16/8, dropout 0.1 | 295,899,267 (295,131,267 unconditional) |
| edm2-xxs ... edm2-xxl | EDM2UNet | EDM2's config G at its sizes (edm.networks.presets.EDM2_SIZES), latent ImageNet-512 shape | see docs/networks.md |
| edm2-tiny | EDM2UNet | the EDM2 U-Net for CPU runs | |

Compatibility with NVlabs/edm: the module tree and state_dict names are the reference's
(`map_noise`, `map_label`, `map_augment`, `map_layer0`, `map_layer1`, `enc.{R}x{R}_conv`,
`enc.{R}x{R}_down`, `enc.{R}x{R}_block{i}`, `enc.{R}x{R}_aux_*`, `dec.{R}x{R}_in0/_in1/_up`,
`dec.{R}x{R}_block{i}`, `dec.{R}x{R}_aux_*`, `out_norm`, `out_conv`; inside blocks `norm0`,
`conv0`, `affine`, `norm1`, `conv1`, `skip`, `norm2`, `qkv`, `proj`; persistent buffers
`*.resample_filter` and `map_noise.freqs`), so the `model.*` entries of a reference
Precond's state_dict, without the `model.` prefix, load with strict=True and give the same
function (fp32 relative error ~1e-6; details in docs/networks.md). Differences: the second
argument is named c_noise (reference: noise_labels); attention runs through
scaled_dot_product_attention (the reference always does softmax(q k) in float32, also
for float64 inputs); no in-place operations.
"""

from .dhariwal_unet import DhariwalUNet
from .edm2 import EDM2UNet
from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from .presets import PRESETS, NetworkConfig, build, preset, resolve
from .song_unet import SongUNet

__all__ = [
    "PRESETS", "NetworkConfig", "build", "preset", "resolve", "SongUNet", "DhariwalUNet", "EDM2UNet",
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
]
