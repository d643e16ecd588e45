"""A Flower ``Array`` for messages that never leave the process (the fast engine's replies)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from flwr.app import Array
from flwr.common.constant import SType

__all__ = ["LocalArray"]


@functools.cache
def _dtype_name(dtype: np.dtype[Any]) -> str:
    """``str(dtype)`` (numpy's is Python code, and a round names 8 arrays per client)."""
    return str(dtype)


class LocalArray(Array):
    """A Flower ``Array`` that keeps its ndarray: nothing is serialized inside the process.

    Flower's ``Array`` stores ``np.save`` bytes and decodes them on every ``numpy()`` call;
    a reply that never leaves the process would be encoded once and decoded twice (update
    validation, aggregation). This one encodes only if something asks for ``data``, and
    hands out its one read-only copy.
    """

    def __init__(self, ndarray: np.ndarray) -> None:
        self._hold(np.array(ndarray, copy=True, order="C"))

    @classmethod
    def owning(cls, ndarray: np.ndarray) -> LocalArray:
        """An array that takes ``ndarray`` itself (a read-only view of it), not a copy: for
        arrays nothing else writes, such as a cohort's trained parameters (100 clients'
        replies a round were 10 MB of copies for the Opacus MNIST CNN)."""
        out = cls.__new__(cls)
        out._hold(np.ascontiguousarray(ndarray).view())
        return out

    def _hold(self, arr: np.ndarray) -> None:
        arr.flags.writeable = False
        self.__dict__.update(dtype=_dtype_name(arr.dtype), shape=arr.shape, stype=SType.NUMPY)
        self.__dict__["_ndarray"] = arr

    @property
    def data(self) -> bytes:
        """The ``np.save`` bytes, made on first use."""
        cached = self.__dict__.get("_data")
        if cached is None:
            cached = Array.from_numpy_ndarray(self.__dict__["_ndarray"]).data
            self.__dict__["_data"] = cached
        return cached

    @data.setter
    def data(self, value: bytes) -> None:
        self.__dict__["_data"] = value
        self.__dict__["_ndarray"] = Array("", (), SType.NUMPY, value).numpy()

    def numpy(self) -> np.ndarray:
        """The array itself, read-only: no copy per reader (validation, aggregation). A
        reader that tried to change it in place would get numpy's read-only error, never a
        silently changed reply; ``np.array(a.numpy())`` gives a writable copy."""
        return self.__dict__["_ndarray"]  # type: ignore[no-any-return]
