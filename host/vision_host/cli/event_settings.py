"""What a run does with the model's answers: its alert rules, MQTT broker, webhooks, outbox and
history, checked once at start from the flags and the run file's event tables.

The flags (``--alert``, ``--mqtt``, ``--webhook``, ``--outbox``, ``--history``, …: the
``events`` group of :data:`.settings.RUN_KEYS`) and the run file's tables (``[[alert]]``,
``[mqtt]``, ``[[webhook]]``, ``[events]``, ``[history]``) come together here into one
:class:`EventSettings`; :class:`.sinks.event_sinks.EventSinks` builds the subscribers from it.
Every error is a :class:`.settings.UsageError` naming the flag or table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import UsageError

__all__ = ["EventSettings", "event_settings"]


@dataclass(frozen=True)
class EventSettings:
    """The event side of one run.

    Attributes:
        alerts: the alert rules (:class:`.captions.alerts.AlertRule`), names unique.
        mqtt: the broker to publish to (:class:`.sinks.mqtt.MqttSettings`), or None.
        webhooks: the receivers (:class:`.sinks.webhook.WebhookSettings`).
        outbox_path: the SQLite file where undelivered events wait.
        outbox_max_events: events kept waiting per sink.
        history_path: the caption history's SQLite file, or None when history is off.
        history_retention_days: history older than this is deleted (days; 0: kept).
        history_max_mb: the history's size limit (MiB; 0: none).
        embed_model: the model asked for caption text embeddings (``--embed-model``), or None.
        summaries: the ``[[summary]]`` tables (periodic summaries), as the run file gives them,
            checked by :func:`.history.summaries.parse_summary_table` when there are any.
        server: the vision server the run's ``ollama`` processor talks to, for the text-only
            requests of embeddings and summaries: ``{"url", "api", "model", "api_key_env"}``
            (the ``ollama-*`` config values; absent keys are missing).
    """

    alerts: tuple = ()
    mqtt: Any = None
    webhooks: tuple = ()
    outbox_path: Path | None = None
    outbox_max_events: int = 10_000
    history_path: Path | None = None
    history_retention_days: float = 30.0
    history_max_mb: float = 1024.0
    embed_model: str | None = None
    summaries: tuple = ()
    server: dict = field(default_factory=dict)

    @property
    def sinks(self) -> bool:
        """True when events leave the process (an MQTT broker or a webhook): the outbox is needed."""
        return self.mqtt is not None or bool(self.webhooks)


def event_settings(values: dict, stream_names: list[str]) -> EventSettings:
    """The :class:`EventSettings` of a run from its settings ``values`` (by
    :attr:`.settings.RunKey.name`, defaults applied; the run file's event tables under the names
    of :data:`.run_file.EVENT_TABLES`). ``stream_names``: the run's streams, which an alert's
    ``streams`` must name.

    Raises:
        UsageError: a malformed rule, table or URL, two alerts of one name, an alert watching
            no stream of the run; the sentence names the flag or table and what to do.
    """
    alerts = []
    if values.get("alert_tables") or values.get("alert"):
        from ..captions.alerts import AlertRuleError, parse_alert_flag, parse_alert_table
        try:
            alerts = [parse_alert_table(t, f"[[alert]] number {n + 1}")
                      for n, t in enumerate(values.get("alert_tables") or [])]
            alerts += [parse_alert_flag(flag) for flag in values.get("alert") or []]
        except AlertRuleError as exc:
            raise UsageError(str(exc)) from None
    seen: set[str] = set()
    for rule in alerts:
        if rule.name in seen:
            raise UsageError(f"two alert rules are named {rule.name!r}: give each its own name")
        seen.add(rule.name)
        unknown = [s for s in rule.streams if s not in stream_names and not _is_index(s, len(stream_names))]
        if unknown:
            raise UsageError(f"alert {rule.name!r} watches stream {unknown[0]!r}, which this run does not have: "
                             f"use one of {', '.join(stream_names)}")

    mqtt = None
    if values.get("mqtt") is not None or values.get("mqtt_table") is not None:
        from ..sinks.mqtt import parse_mqtt_table, parse_mqtt_url
        try:
            table = dict(values.get("mqtt_table") or {})
            if values.get("mqtt") is not None:      # the flag's URL over the table's
                table["url"] = values["mqtt"]
            mqtt = parse_mqtt_table(table, "[mqtt]") if values.get("mqtt_table") is not None \
                else parse_mqtt_url(values["mqtt"])
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    webhooks = []
    if values.get("webhook") or values.get("webhook_tables"):
        from ..sinks.webhook import parse_webhook_flag, parse_webhook_table
        try:
            webhooks = [parse_webhook_table(t, f"[[webhook]] number {n + 1}")
                        for n, t in enumerate(values.get("webhook_tables") or [])]
            webhooks += [parse_webhook_flag(url) for url in values.get("webhook") or []]
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    outbox_path = values.get("outbox")
    if outbox_path is None and (mqtt is not None or webhooks):
        from ..sinks.outbox import default_outbox_path
        outbox_path = default_outbox_path()
    history_path = None
    if values.get("history", True):
        history_path = values.get("history_path")
        if history_path is None:
            from ..history import default_history_path
            history_path = default_history_path()
    summaries = tuple(values.get("summary_tables") or ())
    if summaries:
        from ..history.summaries import parse_summary_table
        try:
            for n, table in enumerate(summaries):
                parse_summary_table(table, f"[[summary]] number {n + 1}")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    config = values.get("config") or {}
    server = {key: config[f"ollama-{key.replace('_', '-')}"] for key in ("url", "api", "model", "api_key_env")
              if f"ollama-{key.replace('_', '-')}" in config}
    return EventSettings(alerts=tuple(alerts), mqtt=mqtt, webhooks=tuple(webhooks),
                         outbox_path=None if outbox_path is None else Path(outbox_path),
                         outbox_max_events=int(values.get("outbox_max_events") or 10_000),
                         history_path=None if history_path is None else Path(history_path),
                         history_retention_days=float(values.get("history_retention_days", 30.0)),
                         history_max_mb=float(values.get("history_max_mb", 1024.0)),
                         embed_model=values.get("embed_model"), summaries=summaries, server=server)


def _is_index(name: str, count: int) -> bool:
    return name.isdigit() and int(name) < count
