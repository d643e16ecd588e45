"""The roll-out policy: which version is current, the canary split, promotion and rollback.

At start the newest complete version of every model becomes *current*. A watcher polls the
repository; a version newer than the current one is loaded (``loading.py``: warmed and
validated before it takes any traffic) and becomes the *canary*: ``canary_percent`` of the
requests that name no version go to it. Once it has answered ``min_requests``, its error rate
and p95 latency are compared with the current version's over the same period
(:func:`judge_canary`); it is promoted (the old version drains its queue, then unloads) or
rolled back (it drains and unloads; that version is not tried again until its files change).
Requests are routed when they arrive and never moved, so a swap fails none of them.

A version an A/B experiment pins (``[ab]``, ``ab_routing.py``) is loaded at start beside the
current one, and stays loaded when a newer version replaces it; only requests naming it
(the experiment routes them) reach it.

A model directory with a ``registry.json`` (``pollinate serve --registry``, ``registry sync``)
also follows the registry's ``production`` alias: when it moves to a version other than the
current one (``pollinate registry rollback``, or a promotion), that version is loaded, warmed
and validated, then swapped in as current with no canary; the versions newer than it that were
serving retire and are not tried again until their files change. One that fails validation
leaves the current version serving. The starting version is ``production`` when it is there.

With ``--workers N`` a :class:`RolloutLedger` carries the decisions: worker 0 judges and
records them; the other workers apply worker 0's decision to the same files instead of judging.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from pollinate.errors import PollinateError, RepositoryError
from pollinate.log import logger
from pollinate.serving.config import RolloutSettings, ServeSettings
from pollinate.serving.ledger import RolloutLedger
from pollinate.serving.loading import VersionLoader
from pollinate.serving.recorder import MetricsRecorder
from pollinate.serving.repository import (
    ModelSpec,
    VersionFiles,
    model_dirs,
    read_production,
    scan_model,
)
from pollinate.serving.versions import (
    LoadedVersion,
    ModelVersions,
    Role,
    TrafficWindow,
    VersionSet,
)

__all__ = ["RolloutPolicy", "judge_canary"]


def judge_canary(
    canary: TrafficWindow, current: TrafficWindow, rules: RolloutSettings
) -> tuple[bool, str]:
    """Whether the canary is no worse than the current version over the same period, and why.

    Worse means an error rate above the current one by more than ``max_error_increase``, or
    a p95 latency above ``max_latency_ratio`` times the current one (plus 1 ms of slack).
    """
    err_c, err_b = canary.error_rate(), current.error_rate()
    p95_c, p95_b = canary.p95(), current.p95()
    worse_errors = err_c > err_b + rules.max_error_increase
    # 1 ms of slack keeps sub-millisecond noise from failing a healthy version.
    worse_latency = bool(current.latencies) and p95_c > p95_b * rules.max_latency_ratio + 0.001
    why = (
        f"errors {100 * err_c:.2f}% vs {100 * err_b:.2f}%, "
        f"p95 {1e3 * p95_c:.2f} ms vs {1e3 * p95_b:.2f} ms"
    )
    return not (worse_errors or worse_latency), why


class RolloutPolicy:
    """Moves versions of :class:`VersionSet` between roles: current, canary, draining."""

    def __init__(
        self,
        settings: ServeSettings,
        versions: VersionSet,
        loader: VersionLoader,
        recorder: MetricsRecorder,
        ledger: RolloutLedger | None = None,
    ) -> None:
        """``ledger``: the roll-out decisions shared with the other workers (``--workers``);
        a worker that does not lead applies worker 0's decisions instead of judging."""
        self.settings = settings
        self._versions = versions
        self._loader = loader
        self._recorder = recorder
        self._ledger = ledger
        self._rng = random.Random()
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._pins: dict[str, set[int]] = {}  # model -> versions A/B experiments pin
        for experiment in settings.ab.experiments:
            for variant in experiment.variants:
                if variant.version is not None:
                    self._pins.setdefault(variant.model, set()).add(variant.version)

    # ------------------------------------------------------------------ routing
    def split(self, current: LoadedVersion, canary: LoadedVersion | None) -> LoadedVersion:
        """Where a request that names no version goes: the canary for its share, else current."""
        if canary is not None and self._rng.random() * 100.0 < self.settings.rollout.canary_percent:
            return canary
        return current

    # ------------------------------------------------------------------ start and stop
    async def install(self, name: str, spec: ModelSpec, versions: dict[int, VersionFiles]) -> None:
        """Load the version ``name`` starts with (the newest; with a ledger, the newest one
        worker 0 promoted and never one it rolled back) as current."""
        entry = self._versions.entry(name)
        if not versions:
            logger.warning("model %s has no complete version yet", name)
            return
        ledger = self._ledger
        newest = ledger.starting_version(name, versions) if ledger else versions[max(versions)]
        production = await self._production(newest.path.parent)
        if production in versions:
            newest = versions[production]
            entry.production = production
        loaded = await self._loader.load(spec, newest)
        self._set_role(loaded, "current")
        entry.current = loaded
        if ledger is not None and ledger.leader and ledger.outcome(name, newest) is None:
            ledger.record(name, newest, "promoted")
        for number in sorted(self._pins.get(name, set()) & set(versions) - {newest.version}):
            pinned = await self._loader.load(spec, versions[number])
            self._set_role(pinned, "pinned")
            entry.pinned[number] = pinned

    def watch(self) -> None:
        """Start watching the repository for new versions (on the running event loop)."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="watcher")

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def drained(self) -> None:
        """Wait until every retired version has finished its queue and unloaded."""
        for task in list(self._background):
            await task

    # ------------------------------------------------------------------ roll-out
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rollout.poll_interval_s)
            try:
                await self.poll()
            except Exception:  # the watcher must outlive any one bad model directory
                logger.exception("watching the model repository failed; retrying")

    async def poll(self) -> None:
        """One pass of the watcher: judge canaries, then look for new versions."""
        for name, entry in self._versions.items():
            if entry.canary is not None:
                self._judge(name, entry)
        try:
            found = await asyncio.to_thread(model_dirs, self.settings.repository)
        except RepositoryError as err:
            logger.warning("cannot scan the model repository: %s", err)
            return
        for model_dir in found:  # each model read once; a bad one is skipped, not fatal
            known = self._versions.lookup(model_dir.name)
            if known is not None and known.current is not None:
                await self._follow_production(model_dir, known)
            if known is not None and known.canary is not None:
                continue
            try:
                spec, versions = await asyncio.to_thread(scan_model, model_dir)
            except RepositoryError as err:
                logger.warning("skipping model %s: %s", model_dir.name, err)
                continue
            name = spec.name
            entry = self._versions.entry(name)
            newest = max(versions, default=None)
            current = entry.current.version if entry.current is not None else 0
            if newest is None or newest <= current:
                continue
            files = versions[newest]
            if entry.rejected.get(newest) == files.fingerprint:
                continue
            await self._introduce(name, entry, spec, files)

    async def _production(self, model_dir: Path) -> int | None:
        """The version ``registry.json`` names as production (None: none, or unreadable)."""
        try:
            return await asyncio.to_thread(read_production, model_dir)
        except RepositoryError as err:
            logger.warning("ignoring the registry's aliases of %s: %s", model_dir.name, err)
            return None

    async def _follow_production(self, model_dir: Path, entry: ModelVersions) -> None:
        """Swap to the registry's production version when that alias has moved to a version
        that is not current: load, warm, validate, then swap (no canary)."""
        production = await self._production(model_dir)
        current = entry.current
        if production is None or production == entry.production or current is None:
            return
        try:
            spec, versions = await asyncio.to_thread(scan_model, model_dir)
        except RepositoryError as err:
            logger.warning("skipping model %s: %s", model_dir.name, err)
            return
        files = versions.get(production)
        if files is None:  # the sync writes the version before the alias; not there yet
            return
        entry.production = production
        entry.rejected.pop(production, None)
        if production == current.version:
            return
        name, canary = spec.name, entry.canary
        if canary is not None and canary.version == production:
            self._decide(name, entry, True, "the registry's production alias moved to it")
            return
        try:  # a version an A/B experiment pins is loaded already
            loaded = entry.pinned.pop(production, None) or await self._loader.load(spec, files)
        except (PollinateError, OSError) as err:
            entry.rejected[production] = files.fingerprint
            self._recorder.rollout(name, "failed_validation")
            logger.error("%s version %d (registry production) refused, version %d still "
                         "serving: %s", name, production, current.version, err)  # fmt: skip
            return
        entry.current, entry.canary = loaded, None
        self._set_role(loaded, "current")
        self._recorder.rollout(name, "registry")
        for old in (current, canary):
            if old is None:
                continue
            if old.version > production:  # rolled back: not canaried again
                entry.rejected[old.version] = old.files.fingerprint
            self._set_role(old, None)
            self._retire(old)
        logger.info("%s version %d is now current, following the registry's production alias "
                    "(was %d)", name, production, current.version)  # fmt: skip

    async def _introduce(
        self, name: str, entry: ModelVersions, spec: ModelSpec, files: VersionFiles
    ) -> None:
        decided = self._ledger.outcome(name, files) if self._ledger is not None else None
        if decided == "rolled_back":
            entry.rejected[files.version] = files.fingerprint
            logger.info("%s version %d was rolled back by worker 0; not loading it",
                        name, files.version)  # fmt: skip
            return
        try:
            loaded = await self._loader.load(spec, files)
        except (PollinateError, OSError) as err:
            entry.rejected[files.version] = files.fingerprint
            self._recorder.rollout(name, "failed_validation")
            logger.error(
                "version %d of %s refused before taking traffic: %s", files.version, name, err
            )
            return
        if entry.current is None or decided == "promoted":
            old = entry.current
            self._set_role(loaded, "current")
            entry.current = loaded
            self._recorder.rollout(name, "promoted")
            if old is not None:
                self._set_role(old, None)
                self._retire(old)
            elif self._ledger is not None and self._ledger.leader:
                self._ledger.record(name, files, "promoted")
            logger.info("%s version %d is now current (%s)", name, files.version,
                        "promoted by worker 0" if old else "first version")  # fmt: skip
            return
        entry.current.window = TrafficWindow()
        self._set_role(loaded, "canary")
        entry.canary = loaded
        logger.info(
            "%s version %d is the canary for %.1f%% of traffic (current: %d)",
            name, files.version, self.settings.rollout.canary_percent, entry.current.version,
        )  # fmt: skip

    def _judge(self, name: str, entry: ModelVersions) -> None:
        canary, current = entry.canary, entry.current
        assert canary is not None and current is not None
        if self._ledger is not None and not self._ledger.leader:
            decided = self._ledger.outcome(name, canary.files)
            if decided is not None:
                self._decide(name, entry, decided == "promoted", "as worker 0 decided")
            return
        if canary.window.requests < self.settings.rollout.min_requests:
            return
        promoted, why = judge_canary(canary.window, current.window, self.settings.rollout)
        if self._ledger is not None:
            self._ledger.record(name, canary.files, "promoted" if promoted else "rolled_back")
        self._decide(name, entry, promoted, why)

    def _decide(self, name: str, entry: ModelVersions, promoted: bool, why: str) -> None:
        """Promote the canary (the current version drains and unloads) or roll it back."""
        canary, current = entry.canary, entry.current
        assert canary is not None and current is not None
        entry.canary = None
        if not promoted:
            entry.rejected[canary.version] = canary.files.fingerprint
            self._recorder.rollout(name, "rolled_back")
            self._set_role(canary, None)
            logger.warning("%s version %d rolled back: %s", name, canary.version, why)
            self._retire(canary)
            return
        entry.current = canary
        self._set_role(canary, "current")
        self._set_role(current, None)
        self._recorder.rollout(name, "promoted")
        logger.info("%s version %d promoted: %s", name, canary.version, why)
        self._retire(current)

    def _set_role(self, loaded: LoadedVersion, role: Role | None) -> None:
        self._recorder.role(loaded.spec.name, loaded.version, role)
        if role is not None:
            loaded.role = role

    def _retire(self, loaded: LoadedVersion) -> None:
        """Drain and unload ``loaded`` in the background (an A/B experiment's pinned version
        stays loaded, for the requests the experiment sends it)."""
        if loaded.version in self._pins.get(loaded.spec.name, set()):
            loaded.role = "pinned"
            self._versions.entry(loaded.spec.name).pinned[loaded.version] = loaded
            return
        loaded.role = "draining"
        task = asyncio.get_running_loop().create_task(loaded.batcher.close(drain=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
