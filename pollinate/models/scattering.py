"""Scattering features and a linear head: the model that learns best under DP-SGD here.

Tramer and Boneh ("Differentially Private Learning Needs Better Features (or Much More
Data)", ICLR 2021) showed that a fixed, data-independent front end (a wavelet scattering
transform, Mallat 2012) followed by a normalised linear model beats end-to-end CNNs under
DP-SGD at small and moderate epsilons: the noise then falls on about 40 k parameters of a
linear head, not on features that must be learned. The front end costs no privacy (it never
sees the data when it is made) and is never trained.

:class:`Scattering2d` is the order-2 transform with ``J = 2`` scales and ``L = 8`` angles, as
in that paper: per input channel, the image low-passed, its 16 first-order moduli
``|x * psi_(j, theta)|`` and the 64 second-order ones ``||x * psi_(0, t1)| * psi_(1, t2)|``,
each low-passed by a Gaussian of width ``0.8 * 2**J`` and sampled every ``2**J`` pixels:
81 channels at a quarter of the resolution. The Morlet wavelets follow Kymatio's parameters
(``sigma = 0.8 * 2**j``, ``xi = 3 pi / (4 * 2**j)``, slant ``4 / L``) and are applied as
plain convolutions with 15 x 15 kernels and reflected borders (Kymatio uses the Fourier
domain), so the model exports to ONNX, OpenVINO and LiteRT like any other.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["KERNEL", "ScatterNet", "Scattering2d", "lowpass_filter", "morlet_filters"]

ANGLES = 8  #: L
SCALES = 2  #: J
KERNEL = 15  #: the filters' support, in pixels (odd)
_PAD = KERNEL // 2
#: output channels per input channel: 1 + L * J + L * L * J * (J - 1) / 2
CHANNELS = 1 + ANGLES * SCALES + ANGLES * ANGLES * SCALES * (SCALES - 1) // 2


def _grid() -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(KERNEL, dtype=np.float64) - _PAD
    x, y = np.meshgrid(r, r, indexing="ij")
    return x, y


def morlet_filters(j: int) -> np.ndarray:
    """The ``L`` Morlet wavelets of scale ``j`` (complex128, ``L x KERNEL x KERNEL``): a
    rotated, slanted Gabor filter minus the multiple of its envelope that makes it sum to 0."""
    sigma, xi, slant = 0.8 * 2**j, 3 * math.pi / 4 / 2**j, 4 / ANGLES
    x, y = _grid()
    out = np.empty((ANGLES, KERNEL, KERNEL), dtype=np.complex128)
    for t in range(ANGLES):
        theta = (ANGLES // 2 - 1 - t) * math.pi / ANGLES
        c, s = math.cos(theta), math.sin(theta)
        along, across = c * x + s * y, -s * x + c * y
        envelope = np.exp(-(along**2 + slant**2 * across**2) / (2 * sigma**2))
        gabor = envelope * np.exp(1j * xi * along)
        zero_mean = gabor - gabor.sum() / envelope.sum() * envelope
        out[t] = zero_mean * slant / (2 * math.pi * sigma**2)
    return out


def lowpass_filter() -> np.ndarray:
    """The Gaussian low-pass of width ``0.8 * 2**J`` (``KERNEL x KERNEL``, sums to 1)."""
    x, y = _grid()
    g = np.exp(-(x**2 + y**2) / (2 * (0.8 * 2**SCALES) ** 2))
    return np.asarray(g / g.sum())


def _bank(j: int) -> torch.Tensor:
    """Real parts then imaginary parts of scale ``j``'s wavelets, as conv2d weights."""
    w = morlet_filters(j)
    return torch.tensor(np.concatenate([w.real, w.imag])[:, None], dtype=torch.float32)


class Scattering2d(nn.Module):
    """The fixed order-2 scattering transform (no parameters; its filters are buffers).

    Input ``(B, C, H, W)`` with ``H, W > 7``; output ``(B, 81 * C, ceil(H / 4), ceil(W / 4))``,
    channel ``81 * c + k`` being coefficient ``k`` of input channel ``c`` (order 0, then the
    16 first-order ones by scale and angle, then the 64 second-order ones by ``(t1, t2)``).
    """

    psi0: torch.Tensor
    psi1: torch.Tensor
    phi: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("psi0", _bank(0))
        self.register_buffer("psi1", _bank(1))
        phi = torch.tensor(lowpass_filter(), dtype=torch.float32)
        self.register_buffer("phi", phi.expand(CHANNELS, 1, KERNEL, KERNEL).contiguous())

    @staticmethod
    def _conv(
        x: torch.Tensor, weight: torch.Tensor, *, stride: int = 1, groups: int = 1
    ) -> torch.Tensor:
        padded = nn.functional.pad(x, (_PAD, _PAD, _PAD, _PAD), mode="reflect")
        return nn.functional.conv2d(padded, weight, stride=stride, groups=groups)

    @staticmethod
    def _modulus(z: torch.Tensor) -> torch.Tensor:
        """|re + i im| of a stack of real parts then imaginary parts along channels."""
        return torch.sqrt(z[:, :ANGLES] ** 2 + z[:, ANGLES:] ** 2 + 1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        flat = x.reshape(batch * channels, 1, height, width)
        u0 = self._modulus(self._conv(flat, self.psi0))  # scale 0: (N, L, H, W)
        u1 = self._modulus(self._conv(flat, self.psi1))  # scale 1
        second = self._conv(u0.reshape(-1, 1, height, width), self.psi1)  # (N * L, 2L, H, W)
        u2 = self._modulus(second).reshape(-1, ANGLES * ANGLES, height, width)
        stack = torch.cat([flat, u0, u1, u2], dim=1)  # (N, 81, H, W)
        out = self._conv(stack, self.phi, stride=2**SCALES, groups=CHANNELS)
        return out.reshape(batch, channels * CHANNELS, *out.shape[2:])


class ScatterNet(nn.Module):
    """:class:`Scattering2d` (fixed), GroupNorm over groups of 3 of its channels, one linear
    layer: Tramer and Boneh's ScatterNet + linear model. About 40 k trained parameters for
    28 x 28 grey images and 10 classes; only the norm and the head see gradients."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.scatter = Scattering2d()
        # eps 1e-3, not 1e-5: groups of near-constant coefficients (blank borders) would
        # otherwise amplify float32 rounding past an exported model's 1e-4 logit tolerance
        self.norm = nn.GroupNorm(CHANNELS * channels // 3, CHANNELS * channels, eps=1e-3)
        features = CHANNELS * channels * math.ceil(height / 4) * math.ceil(width / 4)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # fixed features: nothing before the norm is trained
            features = self.scatter(x)
        return self.head(torch.flatten(self.norm(features), 1))  # type: ignore[no-any-return]
