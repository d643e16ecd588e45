"""Retrain events: the files (and webhook POSTs) a drifted reading triggers, and reading them.

* :class:`TriggerSink`: writes one JSON event file per trigger
  (``retrain-<model>-v<version>-<YYYYmmddTHHMMSSZ>-<8 hex>.json``, atomically through
  :mod:`pollinate._atomic`) and optionally POSTs it to a webhook on a daemon thread.
* :func:`read_triggers` / :func:`pending_triggers`: the events waiting in such a folder, oldest
  first (``pollinate.ops.triggers`` claims them for retraining).
* :func:`check_webhook`: the validation of a webhook URL and its bearer token.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.serving.drift_stats import DriftReading

__all__ = [
    "EVENT",
    "WEBHOOK_TIMEOUT_S",
    "TriggerSink",
    "check_webhook",
    "pending_triggers",
    "read_triggers",
]

EVENT = "pollinate.retrain"
WEBHOOK_TIMEOUT_S = 5.0
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def check_webhook(webhook: str | None, token: str | None, where: str) -> None:
    """Raise ConfigError unless ``webhook`` is an http(s) URL and ``token`` a one-line value."""
    if webhook is not None and not re.match(r"^https?://[^\s/]+", webhook):
        raise ConfigError(
            f"{where} 'webhook' must be an http:// or https:// URL, got {webhook!r}; "
            "e.g. https://ci.example.com/hooks/retrain"
        )
    if token is not None:
        if webhook is None:
            raise ConfigError(f"{where} 'webhook_token' is set but 'webhook' is not; set both")
        if not token or any(c in token for c in "\r\n"):
            raise ConfigError(
                f"{where} 'webhook_token' must be a non-empty single-line bearer token"
            )


class TriggerSink:
    """Where retrain events go: one JSON file per trigger, and optionally a webhook POST.

    Args:
        trigger_dir: Folder for event files, created on first use (None: no files).
        webhook: http(s) URL to POST each event to (None: no POST).
        webhook_token: Bearer token for the POST's Authorization header (None: none).

    Raises:
        ConfigError: If ``webhook`` is not an http(s) URL or the token is unusable.
    """

    def __init__(
        self, trigger_dir: Path | None, webhook: str | None, webhook_token: str | None = None
    ) -> None:
        check_webhook(webhook, webhook_token, "trigger sink")
        self.trigger_dir = Path(trigger_dir) if trigger_dir is not None else None
        self.webhook = webhook
        self._token = webhook_token
        self._posts: list[threading.Thread] = []
        self._lock = threading.Lock()

    def emit(self, reading: DriftReading) -> Path | None:
        """Record a retrain event for ``reading``.

        The file ``retrain-<model>-v<version>-<YYYYmmddTHHMMSSZ>-<8 hex>.json`` is written
        atomically (temporary file in the same folder, fsync, rename). The webhook POST runs in
        a daemon thread (timeout 5 s); its failures are logged as warnings, never raised.

        Returns:
            The event file's path, or None without a ``trigger_dir``.

        Raises:
            OSError: If the event file cannot be written.
        """
        now = dt.datetime.now(dt.UTC)
        event = {
            "event": EVENT,
            "reason": "drift",
            "model": reading.model,
            "version": reading.version,
            "psi": {"input": reading.input_psi, "output": reading.output_psi},
            "threshold": reading.threshold,
            "samples": reading.samples,
            "time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        body = json.dumps(event, indent=2) + "\n"
        path = None
        if self.trigger_dir is not None:
            model = _SAFE_NAME.sub("_", reading.model) or "_"
            stamp = now.strftime("%Y%m%dT%H%M%SZ")
            name = f"retrain-{model}-v{reading.version}-{stamp}-{uuid.uuid4().hex[:8]}.json"
            path = self.trigger_dir / name
            atomic_write_text(path, body)
        if self.webhook is not None:
            post = threading.Thread(
                target=self._post, args=(body.encode("utf-8"),), name="pollinate-drift-webhook"
            )
            post.daemon = True
            with self._lock:
                self._posts = [t for t in self._posts if t.is_alive()]
                self._posts.append(post)
            post.start()
        return path

    def join(self, timeout: float | None = None) -> None:
        """Wait for pending webhook POSTs, at most ``timeout`` seconds each (None: no limit)."""
        with self._lock:
            posts = list(self._posts)
        for post in posts:
            post.join(timeout)

    def _post(self, body: bytes) -> None:
        assert self.webhook is not None
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.webhook, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S):
                pass
        except urllib.error.HTTPError as err:
            err.close()
            logger.warning("drift webhook %s answered HTTP %d %s", self.webhook, err.code, err.msg)
        except Exception as err:  # a webhook must never take the serving tier down
            logger.warning("drift webhook %s failed: %s", self.webhook, err)


def read_triggers(trigger_dir: Path) -> list[dict[str, Any]]:
    """The retrain events in ``trigger_dir``, oldest first.

    Temporary files of writes in progress and files that are not valid event JSON are
    skipped (the latter with a warning). A missing folder holds no events.

    Args:
        trigger_dir: The folder a :class:`TriggerSink` writes to.

    Returns:
        The event dicts, sorted by their ``time`` field (then file name).
    """
    return [event for _path, event in pending_triggers(trigger_dir)]


def pending_triggers(trigger_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Like :func:`read_triggers`, with each event's file: ``(path, event)``, oldest first."""
    folder = Path(trigger_dir)
    if not folder.is_dir():
        return []
    found: list[tuple[str, str, Path, dict[str, Any]]] = []
    for path in folder.glob("retrain-*.json"):
        try:
            event = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:  # taken by a consumer since the listing
            continue
        except (OSError, ValueError) as err:
            logger.warning("skipping unreadable retrain event %s: %s", path, err)
            continue
        if not isinstance(event, dict) or event.get("event") != EVENT:
            logger.warning("skipping %s: not a %s event", path, EVENT)
            continue
        found.append((str(event.get("time", "")), path.name, path, event))
    found.sort(key=lambda f: (f[0], f[1]))
    return [(path, event) for _time, _name, path, event in found]
