"""The FID feature network: TensorFlow's Inception-v3 (inception-2015-12-05) as ported by pytorch-fid.

torchvision's Inception3 with pytorch-fid's patches of three block types, so that pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` loads with strict=True and gives its 2048 pool3 features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FIDInceptionV3"]


def _fid_blocks():
    """pytorch-fid's patches of torchvision's Inception blocks to match the TensorFlow graph."""
    from torchvision.models import inception as tv

    def pool_avg(x: Tensor) -> Tensor:
        """TensorFlow's average pool ignores the zero padding."""
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(tv.InceptionA):
        def forward(self, x: Tensor) -> Tensor:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(pool_avg(x))], 1)

    class FIDInceptionC(tv.InceptionC):
        def forward(self, x: Tensor) -> Tensor:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                bd = layer(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(pool_avg(x))], 1)

    class FIDInceptionE(tv.InceptionE):
        """Mixed_7b pools by average without padding, Mixed_7c by max (as the TensorFlow graph does)."""

        def __init__(self, in_channels: int, max_pool: bool) -> None:
            super().__init__(in_channels)
            self.max_pool = max_pool

        def forward(self, x: Tensor) -> Tensor:
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else pool_avg(x)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)

    return tv.Inception3, FIDInceptionA, FIDInceptionC, FIDInceptionE


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3: images in [−1, 1] [N, C, H, W] -> 2048 pool3 features [N, 2048].

    Grayscale inputs are repeated to 3 channels, then resized to 299×299 bilinearly
    (align_corners=False), as pytorch-fid does. `self.net` is torchvision's Inception3
    (1008 classes, no aux head) with the FID blocks, so its state_dict keys are those of
    pytorch-fid's pt_inception-2015-12-05-6726825d.pth.
    """

    def __init__(self) -> None:
        super().__init__()
        Inception3, FIDInceptionA, FIDInceptionC, FIDInceptionE = _fid_blocks()
        net = Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.net = net.eval().requires_grad_(False)

    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load pytorch-fid's state dict (strict: every key must match; tensors are assigned, so a
        model built on the meta device skips its random initialisation)."""
        self.net.load_state_dict(state_dict, strict=True, assign=True)

    def forward(self, images: Tensor) -> Tensor:
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3,
                      n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                      n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)
