"""ResNet-9: a small residual network laid out for fast training on 32x32 images.

The layout is Myrtle.ai's ResNet-9 (David Page, "How to train your ResNet", 2018):
a stem, then three stages that each convolve and halve the resolution with a
max-pool, the first and last followed by a residual block of two convolutions, then
a global max-pool and a linear classifier. On top of it, ideas from Keller Jordan's
airbench (2024), the fastest known CIFAR-10 trainers:

* the stem is a 2x2 convolution initialised by *patch whitening*: its filters are the
  eigenvectors of the covariance of 2x2 patches of the training images, scaled by
  one over the square root of their eigenvalues, each with its negation (so that the
  GELU after it loses nothing). It is fixed (not trained): the first layer then hands
  decorrelated inputs to the rest from the first step on, which is what makes very
  short trainings work. :func:`init_whitening` computes it from the training split.
* the convolution comes before the max-pool and the BatchNorm after it (4x fewer
  normalised values), GELU activations;
* BatchNorm without a learned scale (weights fixed at 1, biases trained): the scale
  is redundant before a convolution that has one, and one less thing to tune;
* the logits are scaled down (1/9) so that the initial loss is near log(classes).

Our own code; the ideas and their sources are credited in docs/models.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RESNET9_WIDTHS", "ResNet9", "init_whitening"]

#: Myrtle's stage widths; ``width_multiplier`` scales them (0.25 gives 32-64-128).
RESNET9_WIDTHS = (128, 256, 512)

#: Added to the eigenvalues before inverting them: the smallest ones are noise (JPEG
#: blocks, quantisation), and without it the whitening would amplify that noise most.
_WHITEN_EPS = 5e-4

#: Images used to estimate the patch covariance (ample: 5,000 images are ~5M patches).
_WHITEN_IMAGES = 5000


def _norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with its scale fixed at 1 (only the bias trains), as in airbench."""
    bn = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-5)
    bn.weight.requires_grad_(False)
    return bn


class ConvNorm(nn.Module):
    """3x3 convolution, optional 2x2 max-pool, BatchNorm, GELU."""

    def __init__(self, in_planes: int, planes: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.bn = _norm(planes)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.bn(self.pool(self.conv(x))))


class Residual(nn.Module):
    """Two ConvNorm layers added to their input (identity shortcut: the shape does not change)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(planes, planes)
        self.conv2 = ConvNorm(planes, planes)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


class ResNet9(nn.Module):
    """Stem, three pooled stages (residual blocks after the first and the last), max-pool, linear.

    Args:
        widths: the three stages' widths.
        num_classes: size of the classifier.
        in_channels: 3 for RGB, 1 for grayscale.
        stem: "whiten" (2x2 patch-whitening convolution, fixed; set by :func:`init_whitening`)
            or "cifar" (a trained 3x3 convolution to widths[0] // 2 channels, Myrtle's choice).
    """

    def __init__(
        self, widths: tuple[int, int, int], num_classes: int = 10, in_channels: int = 3, stem: str = "whiten"
    ) -> None:
        super().__init__()
        c1, c2, c3 = widths
        if stem == "whiten":
            # Every eigenvector of the (in_channels x 2 x 2)-dimensional patch space, and its negation.
            stem_planes = 2 * in_channels * 4
            self.conv1 = nn.Conv2d(in_channels, stem_planes, kernel_size=2, bias=True)
            self.conv1.weight.requires_grad_(False)
            self.bn1: nn.Module = nn.Identity()
        else:
            stem_planes = max(1, c1 // 2)
            self.conv1 = nn.Conv2d(in_channels, stem_planes, kernel_size=3, padding=1, bias=False)
            self.bn1 = _norm(stem_planes)
        self.stem = stem
        self.layer1 = nn.Sequential(ConvNorm(stem_planes, c1, pool=True), Residual(c1))
        self.layer2 = nn.Sequential(ConvNorm(c1, c2, pool=True))
        self.layer3 = nn.Sequential(ConvNorm(c2, c3, pool=True), Residual(c3))
        self.num_features = c3
        self.fc = nn.Linear(c3, num_classes, bias=False)
        # PyTorch's default initialisation (as airbench), not He's: every convolution is followed by a
        # BatchNorm, so a weight's scale only sets its effective learning rate (lr / |w|^2), and He's
        # 2.4x larger weights train about 6x slower at the same lr (a first epoch of 35% instead of 61%).
        self.logit_scale = 1 / 9

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features before the classifier, shape (N, num_features)."""
        x = F.gelu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        # Max, not mean: a class is present if some position says so (Myrtle's and airbench's choice).
        return torch.amax(x, dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x)) * self.logit_scale


@torch.no_grad()
def init_whitening(model: nn.Module, images: Tensor, mean: list[float], std: list[float]) -> bool:
    """Set a whitening stem's filters from the training images; False (nothing done) for other models.

    ``images`` is uint8 (N, C, H, W) in the order of the training split (the first
    5,000 are used, so the result is the same on every device and process); ``mean``
    and ``std`` are the split's per-channel statistics in [0, 1] units, as the loader
    normalises with them.
    """
    if not isinstance(model, ResNet9) or model.stem != "whiten":
        return False
    conv = model.conv1
    x = images[:_WHITEN_IMAGES].to(conv.weight.device, torch.float64) / 255.0
    x = (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)
    c = x.shape[1]
    # Every 2x2 patch as a (C*4)-vector, in the layout of the conv weight (C, 2, 2).
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
    filters = eigenvectors.T / torch.sqrt(eigenvalues + _WHITEN_EPS)[:, None]
    filters = filters.reshape(c * 4, c, 2, 2)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.bias.zero_()
    return True
