"""The device's side of a pull rollout: from a desired message to a serving (or rolled-back)
model, with a report at each step.

:class:`UpdateAgent` takes the newest :class:`~device.update.messages.Desired` (from the
broker's retained ``desired`` topic), and in its own thread, so detection never waits on it:

1. refuses what it must not run: a URL outside ``update.allowed_url_prefixes``, a bundle larger
   than ``update.max_bundle_mb``, an older version than the one serving unless the message
   says ``allow_downgrade`` (a rollback rollout; the bundle must still be signed);
2. downloads the tar into the store (``models/<id>.tar.part``, resumed with HTTP Range after a
   stall or a drop, size and sha256 checked);
3. installs it with the store's own code (the manifest's id and **signature** checked against
   ``signing.public_keys``: a broker publisher can only point at bundles your key signed) and
   activates it (``current`` -> it, ``previous`` -> the old one, atomically);
4. has the model applied (the daemon reloads it in-process and runs its self-test) and waits
   up to the message's health deadline for it to serve; if it does not, rolls the store back
   and applies the old model again.

Reports (``downloading`` with bytes, ``installing``, ``serving``, ``rolled_back``, ``failed``
with the reason) go to the retained ``update`` topic. A failed download is retried with a
doubling backoff while the message stays the same; a refusal waits for a new message.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from device.errors import DoorstepError
from device.update.download import DownloadError, download
from device.update.messages import Desired, UpdateReport, UpdateState

if TYPE_CHECKING:
    from device.config import UpdateConfig
    from device.install import Store

# apply(deadline_s) -> (ok, reason): make the daemon serve what `current` points at
Apply = Callable[[float], tuple[bool, str | None]]


class RefusedError(DoorstepError):
    """The desired bundle must not be run (no retry until the message changes)."""


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """``1.10.0`` > ``1.9.2``; numeric parts compare as numbers, others as text."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version))


@dataclass
class _Outcome:
    state: UpdateState
    reason: str | None = None
    retry: bool = False


class UpdateAgent:
    def __init__(
        self,
        cfg: UpdateConfig,
        store: Store,
        keys: list[Any],
        device_id: str,
        apply: Apply,
        report: Callable[[UpdateReport], None],
    ) -> None:
        self.cfg, self.store, self.keys, self.device_id = cfg, store, keys, device_id
        self.apply, self.report = apply, report
        self._cond = threading.Condition()
        self._desired: Desired | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: UpdateReport | None = None
        self._last_progress = (0, 0.0)
        self._done = self._read_done()  # a restart does not retry a bundle it rolled back
        self.refused_messages = 0

    # -- input (paho's network thread)
    def offer(self, payload: bytes) -> Desired | None:
        """A message on the desired topic: kept if valid (the newest wins) and returned, else
        reported as failed."""
        if not payload:  # a cleared retained message: nothing is desired
            return None
        try:
            desired = Desired.model_validate_json(payload)
        except ValidationError as exc:
            self.refused_messages += 1
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "message"
            self._publish(
                None, "failed", reason=f"invalid desired message: {where}: {first['msg']}"
            )
            return None
        with self._cond:
            self._desired = desired
            self._cond.notify_all()
        return desired

    # -- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="doorstep-update", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = self.cfg.retry_min_s
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._stop.is_set()
                        or (
                            self._desired is not None
                            and self._desired.model_dump_json() != self._done
                        )
                    ),
                    timeout=5.0,
                )
                desired = self._desired
            if self._stop.is_set() or desired is None or desired.model_dump_json() == self._done:
                continue
            outcome = self.handle(desired)
            if outcome.retry:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.cfg.retry_max_s)
            else:
                backoff = self.cfg.retry_min_s
                self._done = desired.model_dump_json()
                self._write_done(self._done, outcome.state)

    @property
    def _done_file(self) -> Path:
        return self.store.state_dir / "update-done.json"

    def _read_done(self) -> str | None:
        """The desired message last handled for good (kept in the state directory)."""
        from device.safefile import UnsafeFileError, read_small_file

        try:
            raw = read_small_file(self._done_file, 1 << 16)
            return str(json.loads(raw)["desired"]) if raw else None
        except (UnsafeFileError, ValueError, KeyError, TypeError):
            return None

    def _write_done(self, desired_json: str, state: str) -> None:
        from device.safefile import write_atomic

        data = json.dumps({"desired": desired_json, "state": state, "time": time.time()})
        with contextlib.suppress(OSError):  # a full disk: it is retried after a restart
            write_atomic(self._done_file, data.encode())

    def run_once(self, desired: Desired) -> _Outcome:
        """Handle one message in this thread (``doorstep-device update --once``)."""
        return self.handle(desired)

    # -- the work
    def handle(self, d: Desired) -> _Outcome:
        try:
            outcome = self._handle(d)
        except RefusedError as exc:
            outcome = _Outcome("failed", str(exc))
        except DownloadError as exc:
            outcome = _Outcome("failed", str(exc), retry=True)
        except DoorstepError as exc:  # install, signature, activate, rollback
            outcome = _Outcome("failed", str(exc), retry=False)
        self._publish(d, outcome.state, reason=outcome.reason)
        return outcome

    def _handle(self, d: Desired) -> _Outcome:
        from device.install import activate, install, rollback

        store = self.store
        active = store.linked(store.current)
        if active == d.bundle_id:
            return _Outcome("serving")
        self._check(d, active)
        final = store.model_dir(d.bundle_id)
        if not final.is_dir():
            store.models.mkdir(parents=True, exist_ok=True)
            part = store.models / f"{d.bundle_id}.tar.part"
            tar = store.models / f"{d.bundle_id}.tar"
            self._publish(d, "downloading", got=_size(part))
            download(
                d.url,
                part,
                d.size,
                d.sha256,
                ca_file=self.cfg.ca_file,
                timeout_s=self.cfg.timeout_s,
                rate_kbps=self.cfg.rate_limit_kbps,
                progress=lambda n: self._progress(d, n),
                stop=self._stop,
                allowed_prefixes=self.cfg.allowed_url_prefixes,
            )
            part.rename(tar)
            self._publish(d, "installing", got=d.size)
            try:
                install(store, tar, d.bundle_id, d.sha256, self.keys)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tar.unlink()  # a refused tar is not kept (install removes a good one)
        else:  # installed before (an earlier rollout): activate() verifies it again
            self._publish(d, "installing", got=d.size)
        activate(store, final, self.keys)
        ok, reason = self.apply(d.health_deadline_s)
        if ok:
            return _Outcome("serving")
        rollback(store, self.keys)
        back, back_reason = self.apply(d.health_deadline_s)
        why = f"the new model did not serve: {reason}"
        if not back:
            why += f"; and the previous one did not come back either: {back_reason}"
        return _Outcome("rolled_back", why)

    def _check(self, d: Desired, active: str | None) -> None:
        if not any(d.url.startswith(p) for p in self.cfg.allowed_url_prefixes):
            raise RefusedError(
                f"{d.url}: not under update.allowed_url_prefixes "
                f"({', '.join(self.cfg.allowed_url_prefixes)}): refused"
            )
        limit = int(self.cfg.max_bundle_mb * 1e6)
        if d.size > limit:
            raise RefusedError(
                f"the bundle is {d.size} bytes, over update.max_bundle_mb ({limit} bytes): refused"
            )
        serving = self._active_version(active)
        older = serving is not None and version_key(d.version) < version_key(serving)
        if older and not d.allow_downgrade:
            raise RefusedError(
                f"version {d.version} is older than the serving {serving}: refused (a "
                "rollback rollout sets allow_downgrade)"
            )

    def _active_version(self, active: str | None) -> str | None:
        if active is None:
            return None
        try:
            manifest = json.loads((self.store.model_dir(active) / "manifest.json").read_text())
            return str(manifest.get("version"))
        except (OSError, ValueError, AttributeError):
            return None

    # -- reports
    def _progress(self, d: Desired, got: int) -> None:
        """``downloading`` at every tenth of the bundle or every 10 s, not every second: a
        fleet of 100,000 on slow links would otherwise send millions of reports."""
        now = time.monotonic()
        last_got, last_t = self._last_progress
        if got >= d.size or got - last_got >= d.size / 10 or now - last_t >= 10:
            self._last_progress = (got, now)
            self._publish(d, "downloading", got=got)

    def _publish(
        self, d: Desired | None, state: UpdateState, got: int = 0, reason: str | None = None
    ) -> None:
        active = self.store.linked(self.store.current)
        report = UpdateReport(
            device_id=self.device_id,
            rollout_id=d.rollout_id if d else None,
            bundle_id=d.bundle_id if d else None,
            state=state,
            bytes=got,
            size=d.size if d else 0,
            reason=reason[:2000] if reason else None,
            active_id=active,
            active_version=self._active_version(active),
            time=round(time.time(), 3),
        )
        self.last = report
        self.report(report)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
