"""The server's client-level noise, round by round, for each strategy matrix.

:class:`NoiseStream` yields, for round ``t``, the noise to add to that round's sum of clipped
updates so that the running sum of the noised rounds equals the prefix-sum estimate of the
matrix mechanism of :mod:`pollinate.privacy.client_level`:

* ``independent``: a fresh draw ``z_t``;
* ``tree``: ``N_t - N_{t-1}``, where ``N_t`` is the sum of the noise of the tree nodes in the
  binary decomposition of ``1..t``; a node's noise is drawn once, when the node completes, and
  kept while a later prefix still uses it (at most ``log2 T + 1`` nodes);
* ``banded``: ``zeta_t = z_t - sum_{j=1}^{b-1} c_j zeta_{t-j}``, i.e. ``C^-1 Z`` by forward
  substitution (``c_0 = 1``), keeping the last ``b - 1`` values.

Each draw has standard deviation ``std`` per entry and comes from a
:class:`~pollinate.privacy.noise.NoiseSource` (the OS CSPRNG unless the run's noise is marked
reproducible). The kept draws are the stream's state: :meth:`NoiseStream.state` and
:meth:`NoiseStream.load_state` carry it through a checkpoint, which is as secret as the server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from pollinate.errors import ConfigError
from pollinate.privacy.client_level import Correlation, prefix_nodes, sqrt_coefficients
from pollinate.privacy.noise import NoiseSource, gaussian

__all__ = ["NoiseStream"]

Draw = Callable[[int], list[np.ndarray]]


class NoiseStream:
    """Correlated Gaussian noise for a stream of rounds (see the module docstring).

    Args:
        correlation: ``independent``, ``tree`` or ``banded``.
        bands: Bands of the banded factorization (1 for the others).
    """

    def __init__(self, correlation: Correlation, *, bands: int = 1) -> None:
        if correlation not in ("independent", "tree", "banded"):
            raise ConfigError(f"unknown noise correlation {correlation!r}")
        self.correlation: Correlation = correlation
        self.bands = bands if correlation == "banded" else 1
        self._coef = sqrt_coefficients(self.bands)
        self._nodes: dict[tuple[int, int], list[np.ndarray]] = {}
        self._past: list[list[np.ndarray]] = []  # banded: zeta_{t-1}, zeta_{t-2}, ...
        self.last_round = 0

    def next(
        self,
        rnd: int,
        shapes: Sequence[tuple[int, ...]],
        std: float,
        source: NoiseSource,
    ) -> list[np.ndarray]:
        """The noise of round ``rnd``, one array per shape.

        Rounds come in order; a round that released nothing (skipped here) still advances
        the stream, its noise drawn and dropped, so every later release keeps its place in
        the strategy matrix.
        """
        if rnd <= self.last_round:
            raise ConfigError(
                f"correlated noise is a stream: round {rnd} after round {self.last_round}"
            )
        while self.last_round + 1 < rnd:
            self._step(self.last_round + 1, shapes, std, source)
        return self._step(rnd, shapes, std, source)

    def _step(
        self, rnd: int, shapes: Sequence[tuple[int, ...]], std: float, source: NoiseSource
    ) -> list[np.ndarray]:
        counter = iter(range(rnd << 24, (rnd + 1) << 24))  # distinct steps in every round

        def draw(_: int) -> list[np.ndarray]:
            return [
                gaussian(shape, std, source.generator(step=next(counter)), dtype=torch.float64)
                .numpy()
                for shape in shapes
            ]  # fmt: skip

        if self.correlation == "independent":
            out = draw(0)
        elif self.correlation == "tree":
            out = self._tree(rnd, shapes, draw)
        else:
            out = self._banded(draw)
        self.last_round = rnd
        return out

    def _tree(self, t: int, shapes: Sequence[tuple[int, ...]], draw: Draw) -> list[np.ndarray]:
        before, now = prefix_nodes(t - 1), prefix_nodes(t)
        for node in now:
            if node not in self._nodes:
                self._nodes[node] = draw(0)
        out = [np.zeros(shape) for shape in shapes]
        for node in now:
            for acc, value in zip(out, self._nodes[node], strict=True):
                acc += value
        for node in before:
            for acc, value in zip(out, self._nodes[node], strict=True):
                acc -= value
        self._nodes = {node: self._nodes[node] for node in now}
        return out

    def _banded(self, draw: Draw) -> list[np.ndarray]:
        zeta = draw(0)
        for c, past in zip(self._coef[1:], self._past, strict=False):
            for acc, value in zip(zeta, past, strict=True):
                acc -= c * value
        self._past = [zeta, *self._past][: self.bands - 1]
        return zeta

    # ------------------------------------------------------------------ checkpoint

    def state(self) -> dict[str, np.ndarray]:
        """The kept draws and the last round, as named arrays."""
        out: dict[str, np.ndarray] = {"last_round": np.asarray(self.last_round)}
        for (level, j), arrays in self._nodes.items():
            for i, value in enumerate(arrays):
                out[f"node.{level}.{j}.{i}"] = value
        for age, arrays in enumerate(self._past):
            for i, value in enumerate(arrays):
                out[f"past.{age}.{i}"] = value
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""
        self.last_round = int(np.asarray(state.get("last_round", 0)).reshape(-1)[0])
        nodes: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        past: dict[int, dict[int, np.ndarray]] = {}
        for name, value in state.items():
            parts = name.split(".")
            if parts[0] == "node":
                nodes.setdefault((int(parts[1]), int(parts[2])), {})[int(parts[3])] = value
            elif parts[0] == "past":
                past.setdefault(int(parts[1]), {})[int(parts[2])] = value
        self._nodes = {k: [v[i] for i in sorted(v)] for k, v in nodes.items()}
        self._past = [[past[a][i] for i in sorted(past[a])] for a in sorted(past)]
