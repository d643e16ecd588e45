"""The scattering front end of ``scatnet`` against a slow reference written from its
definition (numpy filters, scipy's 2-D correlation, explicit loops), its filters' defining
properties, and the model's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

from pollinate.errors import ConfigError
from pollinate.models import build_model
from pollinate.models.scattering import (
    KERNEL,
    Scattering2d,
    lowpass_filter,
    morlet_filters,
)

PAD = KERNEL // 2


def _filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``image`` correlated with ``kernel`` (complex allowed), borders reflected, same size."""
    padded = np.pad(image, PAD, mode="reflect")
    if np.iscomplexobj(kernel):
        return correlate2d(padded, kernel.real, "valid") + 1j * correlate2d(
            padded, kernel.imag, "valid"
        )
    return correlate2d(padded, kernel, "valid")


def _reference(image: np.ndarray) -> np.ndarray:
    """Order-2 scattering of one grey image, coefficient by coefficient (81, H/4, W/4)."""
    phi = lowpass_filter()
    psi = {j: morlet_filters(j) for j in (0, 1)}

    def low(u: np.ndarray) -> np.ndarray:
        return _filter(u, phi)[::4, ::4]

    out = [low(image)]
    first = {(j, t): np.abs(_filter(image, psi[j][t])) for j in (0, 1) for t in range(8)}
    out += [low(first[j, t]) for j in (0, 1) for t in range(8)]
    for t1 in range(8):
        for t2 in range(8):
            out.append(low(np.abs(_filter(first[0, t1], psi[1][t2]))))
    return np.stack(out)


def test_the_transform_equals_the_definition_computed_coefficient_by_coefficient() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 20, 17))  # two images, three channels, odd width
    got = Scattering2d()(torch.tensor(images, dtype=torch.float32)).double().numpy()
    assert got.shape == (2, 3 * 81, 5, 5)
    for b in range(2):
        for c in range(3):
            expected = _reference(images[b, c])
            np.testing.assert_allclose(got[b, 81 * c : 81 * (c + 1)], expected, atol=2e-5)


def test_wavelets_are_band_pass_and_the_low_pass_keeps_the_mean() -> None:
    for j in (0, 1):
        psi = morlet_filters(j)
        assert psi.shape == (8, KERNEL, KERNEL)
        assert np.abs(psi.sum(axis=(1, 2))).max() < 1e-12  # no response to a constant
        # eight distinct orientations: each responds most to a different direction
        spectra = np.abs(np.fft.fft2(psi, s=(64, 64)))
        peaks = {int(np.argmax(s)) for s in spectra}
        assert len(peaks) == 8
    phi = lowpass_filter()
    assert phi.sum() == pytest.approx(1.0) and phi.min() > 0
    # a constant image: order 0 is the constant, every modulus of a band-pass is ~0
    flat = Scattering2d()(torch.full((1, 1, 16, 16), 0.7))
    np.testing.assert_allclose(flat[0, 0].numpy(), 0.7, rtol=1e-5)
    assert flat[0, 1:].abs().max() < 1e-4


def test_only_the_norm_and_the_head_are_trained() -> None:
    model = build_model("scatnet", input_shape=(1, 28, 28), num_classes=10)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    x = torch.rand(4, 1, 28, 28)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 81 * 7 * 7 * 10 + 10 + 2 * 81


@pytest.mark.parametrize(
    ("shape", "why"),
    [((64,), "images"), ((1, 7, 28), "at least 8 x 8"), ((28, 28), "images")],
)
def test_scatnet_refuses_what_it_cannot_filter(shape: tuple[int, ...], why: str) -> None:
    with pytest.raises(ConfigError, match=why) as err:
        build_model("scatnet", input_shape=shape, num_classes=10)
    assert "mlp" in str(err.value)
