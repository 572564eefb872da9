"""The event side of one run, built from its :class:`.cli.event_settings.EventSettings`: the
alert rules, the MQTT sink, the webhooks and the caption history, each subscribed to the run's
caption bus; their states for the viewer and the stats; one orderly close.

Order on the bus: the sinks subscribe before the alert rules, so a sink receives a caption
before the alert edge that caption causes.
"""

from __future__ import annotations

import logging
import threading
import time

from ..captions.bus import CaptionBus
from ..captions.event import iso_utc

__all__ = ["EventSinks", "EventSinksError"]

log = logging.getLogger(__name__)

#: At the end of a run, how long the webhooks may go on delivering what is queued (s); what is
#: still undelivered then waits in the outbox for the next run.
DRAIN_S = 5.0


class EventSinksError(Exception):
    """A sink could not start (its outbox cannot be opened, its secret is missing): the message
    says what to do. ``usage`` is True when the user's settings are at fault (exit status 2)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


class EventSinks:
    """Starts and holds the run's alert rules and sinks.

    Args:
        events: the run's :class:`.cli.event_settings.EventSettings`.
        bus: the run's caption bus; every sink and the rules subscribe to every stream.
        streams: the run's streams as ``(index, name)``.

    Raises:
        EventSinksError: a sink could not start; those already started are closed first.
    """

    def __init__(self, events, bus: CaptionBus, streams: list[tuple[int, str]]):
        self.events = events
        self._names = dict(streams)
        self.alerts = None
        self.mqtt = None
        self.webhooks: list = []
        self.history = None
        self.summaries = None
        try:
            self._start(events, bus, streams)
        except BaseException:
            self.close()
            raise

    def _start(self, events, bus: CaptionBus, streams: list[tuple[int, str]]) -> None:
        if events.mqtt is not None:
            from .mqtt import MqttSink
            from .outbox import Outbox, OutboxError
            try:
                outbox = Outbox(events.outbox_path, "mqtt", events.outbox_max_events)
            except OutboxError as exc:
                raise EventSinksError(str(exc)) from None
            self.mqtt = bus.subscribe(MqttSink(events.mqtt, outbox, streams, [r.name for r in events.alerts]))
        if events.webhooks:
            from .outbox import OutboxError
            from .webhook import WebhookError, WebhookSink
            for settings in events.webhooks:
                try:
                    sink = WebhookSink(settings, events.outbox_path, max_messages=events.outbox_max_events)
                except WebhookError as exc:
                    raise EventSinksError(str(exc), usage=True) from None
                except OutboxError as exc:
                    raise EventSinksError(str(exc)) from None
                self.webhooks.append(bus.subscribe(sink))
        if events.embed_model and events.history_path is None:
            raise EventSinksError("--embed-model stores embeddings in the caption history, which is off "
                                  "(--no-history): drop one of the two", usage=True)
        if events.history_path is not None:
            from ..history import HistoryError, start_history
            embedder = None
            if events.embed_model:
                from ..history.embeddings import CaptionEmbedder
                try:
                    embedder = CaptionEmbedder(events.server, events.embed_model)
                except ValueError as exc:
                    raise EventSinksError(str(exc), usage=True) from None
            try:
                self.history = start_history(events.history_path, retention_days=events.history_retention_days,
                                             max_mb=events.history_max_mb,
                                             **({"embedder": embedder} if embedder is not None else {}))
            except HistoryError as exc:
                raise EventSinksError(str(exc), usage=True) from None
            if self.history is not None:
                bus.subscribe(self.history)
        if events.summaries:
            from ..history.summaries import PeriodicSummaries
            try:
                self.summaries = PeriodicSummaries(events.summaries, bus, events.server, events.history_path)
            except ValueError as exc:
                raise EventSinksError(str(exc), usage=True) from None
        if events.alerts:
            from ..captions.alerts import AlertRules
            self.alerts = AlertRules(list(events.alerts), bus)   # subscribes itself, after the sinks

    # -- state ------------------------------------------------------------------------------------
    def alert_states(self, stream: int) -> list[dict]:
        """Each alert rule's state on stream ``stream``: ``[{"name", "state" (ON/OFF; a rule
        waiting out for-s or cooldown-s is still OFF), "since", "last_match" (ISO 8601 UTC or
        None), "fires", "errors"}]``, every rule listed (OFF before its first caption)."""
        if self.alerts is None:
            return []
        snapshot = self.alerts.states()["rules"]
        name = self._names.get(stream, str(stream))
        out = []
        for rule, state in snapshot.items():
            track = state["streams"].get(name) or state["streams"].get(str(stream)) or {}
            out.append({"name": rule, "state": "ON" if track.get("state") == "ON" else "OFF",
                        "since": _iso(track.get("since")), "last_match": _iso(track.get("last_match")),
                        "fires": track.get("fires", 0), "errors": track.get("errors", 0)})
        return out

    def sink_health(self) -> list[dict]:
        """Each sink's health, one shape: ``[{"kind" (mqtt, webhook, history), "target" (no
        password, no query), "connected" (None: not tried yet), "queued", "delivered", "dropped",
        "failures", "last_error"}]``."""
        out = []
        if self.mqtt is not None:
            h = self.mqtt.health()
            out.append({"kind": "mqtt", "target": h["broker"], "connected": h["connected"], "queued": h["queued"],
                        "delivered": h["published"], "dropped": h["dropped"], "failures": h["failures"],
                        "last_error": h["last_error"]})
        for sink in self.webhooks:
            h = sink.health()
            out.append({"kind": "webhook", "target": h["url"], "connected": h["connected"], "queued": h["queued"],
                        "delivered": h["delivered"], "dropped": h["dropped"], "failures": h["failures"],
                        "last_error": h["last_error"]})
        if self.history is not None:
            r = self.history
            out.append({"kind": "history", "target": str(self.events.history_path), "connected": True,
                        "queued": r.queued, "delivered": r.committed,
                        "dropped": r.dropped + r.lost, "failures": r.lost + r.embed_failures, "last_error": None,
                        "embedded": r.embedded})
        return out

    def summary(self) -> dict:
        """For the run's ``--stats``: ``{"alerts": AlertRules.states() or None, "sinks": sink_health()}``."""
        return {"alerts": None if self.alerts is None else self.alerts.states(), "sinks": self.sink_health()}

    # -- the end ----------------------------------------------------------------------------------
    def close(self, drain_s: float = DRAIN_S) -> None:
        """The run ended: the alert rules stop; the webhooks get up to ``drain_s`` seconds to
        deliver what is queued; every sink closes at once, in parallel (the MQTT sink publishes
        what is pending, removes its Home Assistant entities and says ``offline``; the history
        writes its queue). Undelivered events wait in the outbox for the next run. Idempotent."""
        if self.alerts is not None:
            self.alerts.close()
        if self.summaries is not None:
            self.summaries.close()
        deadline = time.monotonic() + drain_s
        def delivering(sink) -> bool:      # events waiting, and the receiver answering
            health = sink.health()
            return bool(health["queued"]) and not health["last_error"]

        while self.webhooks and time.monotonic() < deadline and any(delivering(s) for s in self.webhooks):
            time.sleep(0.05)
        sinks = [s for s in (self.mqtt, *self.webhooks, self.history) if s is not None]
        threads = [threading.Thread(target=s.close, name=f"close {type(s).__name__}", daemon=True) for s in sinks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _iso(unix_s: float | None) -> str | None:
    return None if unix_s is None else iso_utc(unix_s)
