"""The shared test harness, which the benchmarks use as well (never the other way round).

Modules (import them by name; this package itself imports nothing heavy):

* :mod:`tests.support.processes`: free loopback ports, starting subprocesses in sessions of
  their own, waiting for conditions, port files and exits, stopping (or killing) process
  groups, finding and ending processes by their command lines.
* :mod:`tests.support.commands`: running a command to its end while sampling the memory of
  its process tree; the RSS and CPU time of a process tree.
* :mod:`tests.support.federation`: a real pollinate federation on loopback (SuperLink and
  edge daemons), as the real-federation tests and the federation benchmark start one.
* :mod:`tests.support.reference`: the reference Flower app (plain Flower + Opacus) and its
  measurement.
* :mod:`tests.support.simulation`: ``pollinate simulate`` run to its end as a user runs it.
* :mod:`tests.support.serving`: model repositories and real ``pollinate serve`` processes.
* :mod:`tests.support.bundles`: a tiny classifier (ONNX, OpenVINO IR) with known logits, and
  the source files and manifest of its bundle.
* :mod:`tests.support.messages`: real Flower messages (train replies, task identity).
* :mod:`tests.support.models`: the default CNN, trained the same way for every test.
* :mod:`tests.support.audit`: the privacy ledger recomputed with dp-accounting, and the
  one-run audit's epsilon lower bound.
* :mod:`tests.support.otlp`: an OTLP/HTTP trace collector on loopback (the spans it got,
  decoded) and a tiny model repository, for the tracing tests and benchmark.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root."""
