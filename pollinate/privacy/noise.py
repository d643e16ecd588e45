"""Where DP randomness comes from: a secret source on every path, never the run seed.

Everything a differential-privacy guarantee rests on (DP-SGD's Poisson sampling and Gaussian
noise, on devices and in the fast engine, and the server's client-level noise) is drawn here.

* **Secure** (the default): every draw uses a fresh ``torch.Generator`` seeded with 64 bits
  from ``os.urandom`` (the operating system's CSPRNG), reseeded before every DP-SGD step.
  Nothing that is written down (the run seed, ``run.json``, the CLI flags) can regenerate it.
  Opacus' own ``secure_mode`` needs ``torchcsprng``, which has no build for torch 2.13, so
  pollinate reseeds the generator Opacus already accepts instead.
* Gaussian noise is the sum of four normal draws divided by two (Opacus' secure-mode sampler,
  after Holohan and Braghin, "Secure Random Sampling in Differential Privacy", 2021): the same
  N(0, std^2) distribution, but the floating-point attacks that recover the seed or the
  unnoised value from the low-order bits of one draw no longer apply.
* **Reproducible** (tests only, ``reproducible-noise = true``): generators seeded from the run
  seed, the round, the client and the step. Anyone with the seed can subtract the noise, so
  such a run is NOT PRIVATE, and says so in its ledger, report and summary line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pollinate.privacy.ledger_summary import NOT_PRIVATE  # the words; here for its users

__all__ = [
    "NOT_PRIVATE",
    "NoiseSource",
    "derive_seed",
    "gaussian",
    "gaussian_into",
    "secure_seed",
]

#: What every artefact of a run with reproducible noise says about its epsilons.

_SAMPLING, _NOISE = 1, 2


def secure_seed() -> int:
    """64 bits from the operating system's CSPRNG, as a torch generator seed."""
    return int.from_bytes(os.urandom(8), "little")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, round, client, ...), stable across runs.

    For what the seed may fix (splits, partitions, client selection, init, non-DP shuffling)
    and for the test-only reproducible noise; never for DP noise in a private run.
    """
    seq = np.random.SeedSequence([abs(int(p)) for p in parts])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def gaussian(
    shape: Sequence[int] | torch.Size,
    std: float,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N(0, std^2) noise of ``shape``: four normal draws summed and halved (see module doc)."""
    return gaussian_into(torch.empty(tuple(shape), dtype=dtype), std, generator)


def gaussian_into(out: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """:func:`gaussian` written into ``out`` (contiguous): the same values, no new tensor of
    ``out``'s size but one scratch buffer."""
    if std == 0:
        return out.zero_()
    out.normal_(generator=generator)
    scratch = torch.empty_like(out)
    for _ in range(3):
        out.add_(scratch.normal_(generator=generator))
    return out.mul_(std / 2.0)


@dataclass(frozen=True)
class NoiseSource:
    """The DP randomness of one client's local training in one round.

    ``reproducible`` is for tests only: the streams then follow ``seed_parts`` (run seed,
    round, client) and anyone with the seed can regenerate them.
    """

    reproducible: bool = False
    seed_parts: tuple[int, ...] = ()

    @classmethod
    def secure(cls) -> NoiseSource:
        """The default: a fresh CSPRNG seed for every draw."""
        return cls()

    @classmethod
    def for_tests(cls, *seed_parts: int) -> NoiseSource:
        """NOT PRIVATE: noise that anyone knowing ``seed_parts`` can regenerate."""
        return cls(reproducible=True, seed_parts=tuple(int(p) for p in seed_parts))

    def _seed(self, stream: int, step: int) -> int:
        if not self.reproducible:
            return secure_seed()
        return derive_seed(*self.seed_parts, stream, step)

    def reseed(self, generator: torch.Generator, *, step: int, stream: int = _NOISE) -> None:
        """Put ``generator`` in the state for ``step`` (secure: a fresh CSPRNG seed)."""
        generator.manual_seed(self._seed(stream, step))

    def generator(self, *, step: int, stream: int = _NOISE) -> torch.Generator:
        """A new generator for ``step`` of ``stream``."""
        gen = torch.Generator()
        self.reseed(gen, step=step, stream=stream)
        return gen

    def sampling_generator(self, step: int) -> torch.Generator:
        """The generator of the Poisson sampling of ``step``."""
        return self.generator(step=step, stream=_SAMPLING)

    def noise(self, shape: Sequence[int] | torch.Size, std: float, step: int) -> torch.Tensor:
        """The Gaussian noise of ``step`` (flat or shaped like ``shape``)."""
        return gaussian(shape, std, self.generator(step=step, stream=_NOISE))


SAMPLING_STREAM = _SAMPLING
NOISE_STREAM = _NOISE
