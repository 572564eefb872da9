"""The MQTT sink: caption events, alert states and snapshots to an MQTT broker (paho-mqtt, MQTT 3.1.1 or 5).

``--mqtt mqtt://[user:pass@]host[:1883]`` or a ``[mqtt]`` table (:func:`parse_mqtt_url`,
:func:`parse_mqtt_table` → :class:`MqttSettings`). Topics, with ``PREFIX`` the topic prefix
(``vision-host``) and ``STREAM`` the stream's name made fit for a topic level
(:func:`topic_level`: ``+``, ``#``, ``/`` and control characters become ``_``; ``stream-N`` when
the stream has no name):

* ``PREFIX/status`` — ``online`` / ``offline``, retained; ``offline`` is also the last will, which
  the broker publishes when the connection dies without a DISCONNECT.
* ``PREFIX/STREAM/caption`` — the caption event JSON (:mod:`.payloads`), not retained.
* ``PREFIX/STREAM/snapshot`` — a JPEG of the caption's frame (with ``snapshots``), retained.
* ``PREFIX/STREAM/alert/NAME`` — the alert's state, ``ON`` / ``OFF``, retained (``OFF`` for each
  known alert when the sink starts: a new run's rules start off).
* ``PREFIX/STREAM/alert/NAME/event`` — the alert event JSON, not retained.
* ``PREFIX/summary/NAME`` — a periodic summary's event JSON (a ``[[summary]]`` table whose
  ``sinks`` name ``mqtt``; :mod:`..history.summaries`), not retained.
* ``DISCOVERY_PREFIX/COMPONENT/NODE/OBJECT/config`` — Home Assistant discovery (:mod:`.homeassistant`), retained.

Events are published with QoS ``qos`` (1), status and discovery with QoS 1.

Delivery (the outbox guarantee): :meth:`MqttSink.add` and :meth:`MqttSink.alert` run on the frame
loop and only put the event in a bounded in-memory queue (overflow counted in ``dropped``). The
sink's worker thread turns each event into messages in the on-disk :class:`.outbox.Outbox`
(the snapshot JPEG is encoded there, downscaled to ``snapshot_max_px``, and only the latest
snapshot of a stream waits: ``replace``), then publishes the outbox oldest first and removes a
message only at its PUBACK (paho's ``on_publish`` for that message id). At most
:data:`PUBLISH_WINDOW` messages are unacknowledged at once. While the broker is unreachable the
messages wait in the outbox (bounded: past it the oldest are dropped, counted and logged); paho
reconnects by itself (``reconnect_delay_set``), re-sends the messages it had sent but not had
acknowledged (a possible duplicate, which receivers recognise by the JSON ``id``: QoS 1 is *at
least once*), and only once those are acknowledged does the sink publish newer ones, so the
order holds across the outage. Messages still pending at exit are published by the next run on
the same outbox. With ``qos = 0`` a message leaves the outbox when it is written to the socket.

Connection errors (refused, wrong password: the CONNACK reason) are logged once each and shown in
:meth:`MqttSink.health`; the sink keeps retrying, the video never waits. The password is never
logged: :attr:`MqttSettings.url` is the URL with it hidden.

Home Assistant: with ``discovery`` (default on) the sink publishes, retained, at each connect,
a discovery config per entity (a caption sensor and a snapshot image per stream, a
binary_sensor per alert, one device per run); :meth:`MqttSink.close` publishes an empty retained
config to each (Home Assistant deletes the entities), then ``offline``.

Protocol sources: MQTT 3.1.1 (OASIS, 2014) and MQTT 5.0 (OASIS, 2019) — topic names (no
wildcards ``+`` ``#`` in a published topic, levels split by ``/``, no NUL), QoS 1 PUBACK, the
retain flag, the Will message sent on a connection closed without DISCONNECT; paho-mqtt 2.x's
client API (``CallbackAPIVersion.VERSION2`` callbacks).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..captions.bus import CaptionSubscriber
from ..captions.event import AlertEvent, CaptionEvent, SummaryEvent
from .homeassistant import DiscoveryContext, StreamTopics, discovery_configs
from .outbox import Outbox
from .payloads import dumps, event_bytes

__all__ = ["DEFAULT_PORTS", "MQTT_TABLE_KEYS", "PUBLISH_WINDOW", "MqttConfigError", "MqttSettings", "MqttSink",
           "default_node_id", "parse_mqtt_table", "parse_mqtt_url", "topic_level"]

log = logging.getLogger(__name__)

#: Port by URL scheme when the URL names none.
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
#: Keys of a ``[mqtt]`` table (what each means: :class:`MqttSettings`).
MQTT_TABLE_KEYS = frozenset({
    "url", "password-env", "topic-prefix", "client-id", "protocol", "qos", "keepalive-s", "snapshots",
    "snapshot-max-px", "snapshot-quality", "discovery", "discovery-prefix", "node-id", "ca-file", "queue-size"})
#: Messages published and not yet acknowledged (PUBACK) at most.
PUBLISH_WINDOW = 32
#: Longest topic level made from a stream or alert name (characters).
MAX_LEVEL_CHARS = 64
#: Seconds :meth:`MqttSink.close` waits by default for pending messages and the removals.
DEFAULT_CLOSE_TIMEOUT_S = 5.0

_PROTOCOLS = ("3.1.1", "5")
_LEVEL_BAD = re.compile(r"[+#/\x00-\x1f\x7f]")
_NODE_BAD = re.compile(r"[^A-Za-z0-9_-]+")


class MqttConfigError(ValueError):
    """A ``--mqtt`` URL or ``[mqtt]`` table value is wrong; the message says what to write."""


def default_node_id() -> str:
    """This machine's host name made fit for Home Assistant ids (``[a-z0-9_-]``), ``vision-host``
    if nothing is left."""
    node = _NODE_BAD.sub("_", socket.gethostname().split(".")[0].lower()).strip("_-")
    return node or "vision-host"


def topic_level(name: str | None, index: int) -> str:
    """Stream (or alert) ``name`` as one MQTT topic level: ``+``, ``#``, ``/`` and control
    characters become ``_``, outer spaces go, at most :data:`MAX_LEVEL_CHARS` characters;
    ``stream-INDEX`` when nothing is left (or ``name`` is None)."""
    level = _LEVEL_BAD.sub("_", name or "").strip()[:MAX_LEVEL_CHARS].strip()
    return level or f"stream-{index}"


def _check_topic_prefix(prefix: str, what: str) -> str:
    """``prefix`` if it can start a published topic (no wildcards, no empty level, no NUL)."""
    if not isinstance(prefix, str) or not prefix:
        raise MqttConfigError(f"{what} must be a non-empty string such as \"vision-host\"")
    if any(c in prefix for c in "+#\x00"):
        raise MqttConfigError(f"{what} {prefix!r} holds '+', '#' or NUL, which MQTT forbids in a published topic")
    if any(level == "" for level in prefix.split("/")):
        raise MqttConfigError(f"{what} {prefix!r} has an empty level (a leading, trailing or doubled '/'): "
                              "write it like home/vision-host")
    if len(prefix.encode("utf-8")) > 1024:
        raise MqttConfigError(f"{what} is longer than 1024 bytes")
    return prefix


@dataclass(frozen=True)
class MqttSettings:
    """How to reach the broker and what to publish.

    Attributes:
        host, port: the broker (``--mqtt`` URL; port 1883, or 8883 for ``mqtts://``).
        tls: ``mqtts://``: TLS with the system's CAs (or ``ca_file``'s).
        username, password: from the URL's ``user:pass@`` (percent-decoded); the password may come
            from the environment variable named by ``password-env`` instead. Never logged.
        topic_prefix: the topics' first levels (``vision-host``).
        client_id: the MQTT client id; a new ``vision-host-XXXXXXXX`` per run when None.
        protocol: ``"5"`` (default) or ``"3.1.1"``.
        qos: 1 (default: at least once, removed from the outbox at PUBACK) or 0.
        keepalive_s: MQTT keepalive, seconds (5–3600; default 30).
        snapshots: publish a JPEG of each caption's frame (default True).
        snapshot_max_px: the snapshot's longer side at most, pixels (64–4096; default 640).
        snapshot_quality: its JPEG quality (10–100; default 80).
        discovery: publish Home Assistant discovery configs (default True).
        discovery_prefix: Home Assistant's discovery prefix (``homeassistant``).
        node_id: this run's id in Home Assistant (``[A-Za-z0-9_-]``, default: the host name).
        ca_file: CA certificates (PEM) for ``mqtts://`` instead of the system's.
        queue_size: events waiting for the worker at most (1–100,000; default 1,000); more are
            dropped and counted.
    """

    host: str
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    topic_prefix: str = "vision-host"
    client_id: str | None = None
    protocol: str = "5"
    qos: int = 1
    keepalive_s: int = 30
    snapshots: bool = True
    snapshot_max_px: int = 640
    snapshot_quality: int = 80
    discovery: bool = True
    discovery_prefix: str = "homeassistant"
    node_id: str = field(default_factory=default_node_id)
    ca_file: str | None = None
    queue_size: int = 1_000

    def __post_init__(self) -> None:
        if not self.host:
            raise MqttConfigError("the MQTT URL has no host: write it like mqtt://broker.local:1883")
        _int_in(self.port, 1, 65535, "the MQTT port")
        if self.protocol not in _PROTOCOLS:
            raise MqttConfigError(f"MQTT protocol {self.protocol!r} is not supported: write \"5\" or \"3.1.1\"")
        if self.qos not in (0, 1) or isinstance(self.qos, bool):
            raise MqttConfigError(f"MQTT qos {self.qos!r} is not supported: write 1 (at least once) or 0")
        _int_in(self.keepalive_s, 5, 3600, "MQTT keepalive-s")
        _int_in(self.snapshot_max_px, 64, 4096, "MQTT snapshot-max-px")
        _int_in(self.snapshot_quality, 10, 100, "MQTT snapshot-quality")
        _int_in(self.queue_size, 1, 100_000, "MQTT queue-size")
        _check_topic_prefix(self.topic_prefix, "the MQTT topic-prefix")
        _check_topic_prefix(self.discovery_prefix, "the MQTT discovery-prefix")
        if not isinstance(self.node_id, str) or not _NODE_OK.match(self.node_id):
            raise MqttConfigError(f"MQTT node-id {self.node_id!r} may hold only letters, digits, '_' and '-'")
        if self.client_id is not None and (not self.client_id or len(self.client_id.encode("utf-8")) > 65535):
            raise MqttConfigError("MQTT client-id must be a non-empty string")
        if self.password is not None and self.username is None:
            raise MqttConfigError("an MQTT password needs a user name: write mqtt://USER@host with password-env, "
                                  "or mqtt://USER:PASSWORD@host")

    @property
    def url(self) -> str:
        """The broker as a URL with the password hidden (``mqtt://user:***@host:1883``): for logs."""
        user = ""
        if self.username is not None:
            user = urllib.parse.quote(self.username, safe="") + (":***" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


_NODE_OK = re.compile(r"^[A-Za-z0-9_-]+$")


def _int_in(value, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MqttConfigError(f"{what} must be a whole number from {low} to {high}, not {value!r}")
    return value


def _split_url(url: str) -> dict:
    """``mqtt[s]://[user[:pass]@]host[:port]`` → settings keys (host, port, tls, username, password)."""
    if not isinstance(url, str) or "://" not in url:
        raise MqttConfigError(f"the MQTT broker must be a URL like mqtt://host:1883 or mqtts://user:pass@host, "
                              f"not {url!r}")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        shown = _redact(url)
        raise MqttConfigError(f"the MQTT URL {shown} is not valid ({exc}): write it like mqtt://host:1883") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise MqttConfigError(f"the MQTT URL {_redact(url)} has scheme {parts.scheme!r}: use mqtt:// (plain TCP) or "
                              "mqtts:// (TLS)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise MqttConfigError(f"the MQTT URL {_redact(url)} has a path, query or fragment: give only "
                              "mqtt://[user:pass@]host[:port] (the topic prefix is topic-prefix)")
    if not parts.hostname:
        raise MqttConfigError(f"the MQTT URL {_redact(url)} has no host: write it like mqtt://broker.local:1883")
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return {"host": parts.hostname, "port": port if port is not None else DEFAULT_PORTS[scheme],
            "tls": scheme == "mqtts", "username": username or None, "password": password}


def _redact(url: str) -> str:
    from ..sources import redact_url
    return redact_url(str(url))


def parse_mqtt_url(url: str) -> MqttSettings:
    """``--mqtt URL`` → settings with every other value at its default.

    Raises:
        MqttConfigError: not ``mqtt://`` / ``mqtts://``, bad port, no host, a path or query.
    """
    return MqttSettings(**_split_url(url))


def parse_mqtt_table(table: Mapping, where: str = "[mqtt]") -> MqttSettings:
    """A run file's ``[mqtt]`` table (keys: :data:`MQTT_TABLE_KEYS`) → settings; ``where`` names
    the table in error messages (e.g. ``"[mqtt] in run.toml"``).

    Raises:
        MqttConfigError: unknown key, missing ``url``, a value of the wrong type or range, a
            ``password-env`` variable that is not set, or a password given twice.
    """
    if not isinstance(table, Mapping):
        raise MqttConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - MQTT_TABLE_KEYS)
    if unknown:
        raise MqttConfigError(f"unknown key {unknown[0]!r} in {where}: known keys are {', '.join(sorted(MQTT_TABLE_KEYS))}")
    if "url" not in table:
        raise MqttConfigError(f"{where} has no url: write url = \"mqtt://host:1883\"")
    try:
        values = _split_url(table["url"])
    except MqttConfigError as exc:
        raise MqttConfigError(f"{where}: {exc}") from None
    if "password-env" in table:
        name = table["password-env"]
        if not isinstance(name, str) or not name:
            raise MqttConfigError(f"password-env in {where} must name an environment variable")
        if values["password"] is not None:
            raise MqttConfigError(f"{where} gives a password in the url and password-env: keep one (password-env "
                                  "keeps it out of the file)")
        if name not in os.environ:
            raise MqttConfigError(f"the environment variable {name} named by password-env in {where} is not set: "
                                  f"export {name}=… before starting vision-host")
        values["password"] = os.environ[name]
    kinds = {"topic-prefix": str, "client-id": str, "protocol": str, "qos": int, "keepalive-s": int,
             "snapshots": bool, "snapshot-max-px": int, "snapshot-quality": int, "discovery": bool,
             "discovery-prefix": str, "node-id": str, "ca-file": str, "queue-size": int}
    for key, kind in kinds.items():
        if key not in table:
            continue
        value = table[key]
        if key == "protocol" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = "5" if value == 5 else str(value)   # protocol = 5 written as a number
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise MqttConfigError(f"{key} in {where} must be a whole number, not {value!r}")
        if not isinstance(value, kind):
            raise MqttConfigError(f"{key} in {where} must be {'true or false' if kind is bool else 'a string'}, "
                                  f"not {value!r}")
        values[key.replace("-", "_")] = value
    try:
        return MqttSettings(**values)
    except MqttConfigError as exc:
        raise MqttConfigError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class _Published:
    """A message handed to paho, waiting for its PUBACK."""

    row_id: int | None    # outbox row; None for a direct message (status, discovery)
    topic: str


class MqttSink(CaptionSubscriber):
    """Publishes caption and alert events to an MQTT broker through an outbox (module docstring).

    Subscribe it to every stream of the bus (``bus.subscribe(sink)``). Threads: ``add`` and
    ``alert`` from any frame loop (they only enqueue); one worker thread (outbox and publishing);
    paho's network thread (``loop_start``), whose callbacks only record and wake the worker.

    Args:
        settings: the broker and what to publish.
        outbox: this sink's outbox (e.g. ``Outbox(default_outbox_path(), "mqtt", max_messages)``);
            the sink closes it in :meth:`close`.
        streams: the run's streams as ``(index, name or None)``: their topics and Home Assistant
            entities. A stream seen later gets topics but no entities.
        alerts: the alert rules' names: a retained ``OFF`` state and a binary_sensor each, per stream.
        reconnect_delay_s: paho's reconnect backoff, ``(first, longest)`` seconds.
    """

    def __init__(self, settings: MqttSettings, outbox: Outbox, streams: Iterable[tuple[int, str | None]] = (),
                 alerts: Iterable[str] = (), *, reconnect_delay_s: tuple[int, int] = (1, 30)):
        import paho.mqtt.client as mqtt  # the sink's own dependency, loaded with it

        self.settings = settings
        self.wants_frames = settings.snapshots
        self._outbox = outbox
        self._prefix = settings.topic_prefix
        self.status_topic = f"{self._prefix}/status"
        self._levels: dict[int, str] = {}
        self._labels: dict[int, str] = {}
        for index, name in streams:
            self._level(index, name)
            self._labels[index] = name or f"stream {index}"
        self._alerts = list(dict.fromkeys(str(a) for a in alerts))
        self._configs: list[tuple[str, dict]] = []
        if settings.discovery:
            from .. import __version__
            ctx = DiscoveryContext(settings.discovery_prefix, settings.node_id, self.status_topic, __version__,
                                   qos=settings.qos)
            self._configs = discovery_configs(ctx, [self.stream_topics(i) for i in self._levels])

        self._queue: queue.Queue = queue.Queue(maxsize=settings.queue_size)
        self._wake = threading.Event()
        self._acks: collections.deque = collections.deque()   # (mid, reason_code) from paho's thread
        self._in_flight: dict[int, _Published] = {}          # paho mid → message (worker only)
        self._rows_in_flight: set[int] = set()
        self._connected = False
        self._generation = 0          # successful connects so far (network thread writes)
        self._closing = False
        self._stop = threading.Event()
        self._close_deadline = 0.0
        self._lock = threading.Lock()  # counters and last_error
        self._errors_logged: set[str] = set()
        self._overflow_burst = 0
        self.published = 0
        self.dropped = 0              # events the in-memory queue could not take, messages the broker refused
        self.failures = 0
        self.last_error: str | None = None
        self.removed_on_close = False

        version = mqtt.MQTTv5 if settings.protocol == "5" else mqtt.MQTTv311
        client_id = settings.client_id or f"vision-host-{uuid.uuid4().hex[:8]}"
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version,
                                   clean_session=None if version == mqtt.MQTTv5 else True)
        if settings.username is not None:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self._client.tls_set(ca_certs=settings.ca_file)
        self._client.will_set(self.status_topic, b"offline", qos=1, retain=True)
        self._client.max_inflight_messages_set(0)       # the sink's own window bounds what paho holds
        self._client.reconnect_delay_set(*reconnect_delay_s)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

        for index in self._levels:                       # a new run's alert rules start off
            for name in self._alerts:
                self._outbox.put(self._alert_topic(index, name), b"OFF", retain=True)
        self._worker = threading.Thread(target=self._work, name="mqtt-sink", daemon=True)
        self._worker.start()
        if version == mqtt.MQTTv5:
            self._client.connect_async(settings.host, settings.port, settings.keepalive_s, clean_start=True)
        else:
            self._client.connect_async(settings.host, settings.port, settings.keepalive_s)
        self._client.loop_start()
        log.info("MQTT: publishing to %s under %s/ (MQTT %s, QoS %d)", settings.url, self._prefix,
                 settings.protocol, settings.qos)

    # -- topics ---------------------------------------------------------------------------------

    def _level(self, index: int, name: str | None) -> str:
        """Stream ``index``'s topic level (made once; a name another stream has gets ``-INDEX``)."""
        level = self._levels.get(index)
        if level is None:
            level = topic_level(name, index)
            if level in self._levels.values():
                level = f"{level}-{index}"
            self._levels[index] = level
        return level

    def caption_topic(self, index: int, name: str | None = None) -> str:
        """``PREFIX/STREAM/caption`` of stream ``index``."""
        return f"{self._prefix}/{self._level(index, name)}/caption"

    def snapshot_topic(self, index: int, name: str | None = None) -> str:
        """``PREFIX/STREAM/snapshot`` of stream ``index``."""
        return f"{self._prefix}/{self._level(index, name)}/snapshot"

    def _alert_topic(self, index: int, alert: str, name: str | None = None) -> str:
        return f"{self._prefix}/{self._level(index, name)}/alert/{topic_level(alert, 0)}"

    def alert_topic(self, index: int, alert: str, name: str | None = None) -> str:
        """``PREFIX/STREAM/alert/NAME`` (retained ``ON`` / ``OFF``); its event JSON is on ``…/event``."""
        return self._alert_topic(index, alert, name)

    def stream_topics(self, index: int) -> StreamTopics:
        """Stream ``index``'s topics as the discovery configs take them."""
        return StreamTopics(slug=self._levels[index], label=self._labels.get(index, f"stream {index}"),
                            caption_topic=self.caption_topic(index),
                            snapshot_topic=self.snapshot_topic(index) if self.settings.snapshots else None,
                            alert_topics={a: self.alert_topic(index, a) for a in self._alerts})

    @property
    def discovery(self) -> list[tuple[str, dict]]:
        """The Home Assistant discovery ``(config topic, config)`` pairs this sink publishes."""
        return list(self._configs)

    # -- the frame loop's side ------------------------------------------------------------------

    def add(self, event: CaptionEvent) -> None:
        """Queue caption ``event`` for the worker and return (never blocks)."""
        self._enqueue(event)

    def alert(self, event: AlertEvent) -> None:
        """Queue alert edge ``event`` for the worker and return (never blocks)."""
        self._enqueue(event)

    def summary(self, event: SummaryEvent) -> None:
        """Queue periodic summary ``event`` for the worker (when its ``sinks`` name ``mqtt``) and
        return (never blocks)."""
        if "mqtt" in event.sinks:
            self._enqueue(event)

    def summary_topic(self, name: str) -> str:
        """``PREFIX/summary/NAME`` of the summary schedule ``name``."""
        return f"{self._prefix}/summary/{topic_level(name, 0)}"

    def _enqueue(self, event) -> None:
        if self._closing:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                self._overflow_burst += 1
                first = self._overflow_burst == 1
            if first:
                log.warning("MQTT: %d events are already waiting for %s; dropping new ones until it catches up",
                            self.settings.queue_size, self.settings.url)
            return
        self._wake.set()

    # -- paho's network thread ------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._note_error(f"the broker {self.settings.url} refused the connection: {reason_code}")
            return
        self._generation += 1          # before _connected: a worker that sees the connection sees it as new
        self._connected = True
        log.info("MQTT: connected to %s", self.settings.url)
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected
        self._connected = False
        if was and not self._closing:
            self._note_error(f"lost the connection to {self.settings.url} ({reason_code}); reconnecting, "
                             "messages wait in the outbox")
        self._wake.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.append((mid, reason_code))
        self._wake.set()

    def _note_error(self, text: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = text
            new = text not in self._errors_logged
            self._errors_logged.add(text)
        if new:
            log.warning("MQTT: %s", text)

    # -- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        seen_generation = 0
        draining = False         # after a reconnect: paho re-sends what it had; newer ones wait for those
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._take_events()
                self._take_acks()
                stopping = self._stop.is_set()
                if self._connected and self._generation != seen_generation:
                    seen_generation = self._generation
                    draining = bool(self._rows_in_flight)
                    self._publish_direct(self.status_topic, b"online", retain=True)
                    for topic, config in self._configs:
                        self._publish_direct(topic, dumps(config), retain=True)
                if draining and not self._rows_in_flight:
                    draining = False
                if self._connected and not draining:
                    self._publish_pending()
                if stopping and (not self._connected or (not self._in_flight and not len(self._outbox))
                                 or time.monotonic() >= self._close_deadline):
                    return
            except Exception as exc:   # noqa: BLE001 - the worker must outlive one bad event or write
                self._note_error(f"{type(exc).__name__}: {exc}")
                if self._stop.is_set():
                    return
                time.sleep(0.5)

    def _take_events(self) -> None:
        """Move queued events into the outbox as messages (on the worker: JPEG encoding here)."""
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                if self._overflow_burst:
                    log.warning("MQTT: %d events were dropped while the queue was full", self._overflow_burst)
                    self._overflow_burst = 0
            if isinstance(event, CaptionEvent):
                message_id = event.id
                self._outbox.put(self.caption_topic(event.stream, event.stream_name), event_bytes(event, message_id),
                                 message_id=message_id)
                if self.settings.snapshots and event.frame is not None:
                    jpeg = self._jpeg(event.frame)
                    if jpeg is not None:
                        self._outbox.put(self.snapshot_topic(event.stream, event.stream_name), jpeg, retain=True,
                                         replace=True)
            elif isinstance(event, AlertEvent):
                message_id = event.id
                state_topic = self.alert_topic(event.stream, event.name, event.stream_name)
                state = b"ON" if str(event.state).upper() == "ON" else b"OFF"
                self._outbox.put(state_topic, state, retain=True)
                self._outbox.put(state_topic + "/event", event_bytes(event, message_id), message_id=message_id)
            elif isinstance(event, SummaryEvent):
                self._outbox.put(self.summary_topic(event.name), event_bytes(event, event.id), message_id=event.id)

    def _jpeg(self, frame) -> bytes | None:
        """``frame`` (H×W×3 uint8 BGR) as a JPEG whose longer side is at most ``snapshot_max_px``."""
        import cv2
        import numpy as np

        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            self._note_error(f"a caption's frame is not an H×W×3 uint8 image (shape {getattr(frame, 'shape', None)}); "
                             "no snapshot")
            return None
        h, w = frame.shape[:2]
        scale = self.settings.snapshot_max_px / max(h, w)
        if scale < 1:
            frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.settings.snapshot_quality])
        return buf.tobytes() if ok else None

    def _take_acks(self) -> None:
        """PUBACKs (or, at QoS 0, writes) seen by paho: delivered messages leave the outbox."""
        while self._acks:
            mid, reason_code = self._acks.popleft()
            sent = self._in_flight.pop(mid, None)
            if sent is None:
                continue
            if sent.row_id is not None:
                self._rows_in_flight.discard(sent.row_id)
                self._outbox.remove(sent.row_id)
                if getattr(reason_code, "is_failure", False):
                    with self._lock:
                        self.dropped += 1
                    self._note_error(f"the broker refused a message to {sent.topic}: {reason_code} (dropped)")
                else:
                    with self._lock:
                        self.published += 1

    def _publish_direct(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish a message that is not in the outbox (status, discovery: re-sent at each connect)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        self._in_flight[info.mid] = _Published(None, topic)

    def _publish_pending(self) -> None:
        """Hand the outbox's oldest messages to paho until :data:`PUBLISH_WINDOW` are unacknowledged."""
        room = PUBLISH_WINDOW - len(self._rows_in_flight)
        if room <= 0:
            return
        for message in self._outbox.peek(PUBLISH_WINDOW + len(self._rows_in_flight)):
            if message.row_id in self._rows_in_flight:
                continue
            if room <= 0 or not self._connected:
                break
            try:
                info = self._client.publish(message.topic, message.payload, qos=self.settings.qos,
                                            retain=message.retain)
            except ValueError as exc:   # paho refuses it (a payload over MQTT's 256 MB, a bad topic)
                self._outbox.remove(message.row_id)
                with self._lock:
                    self.dropped += 1
                self._note_error(f"cannot publish to {message.topic}: {exc} (dropped)")
                continue
            self._outbox.attempted(message.row_id)
            self._in_flight[info.mid] = _Published(message.row_id, message.topic)
            self._rows_in_flight.add(message.row_id)
            room -= 1

    # -- the run's side -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker has accepted the connection and it is up."""
        return self._connected

    def health(self) -> dict:
        """For the viewer and the status line: ``connected``, ``queued`` (messages and events
        waiting), ``published`` (acknowledged), ``dropped`` (queue overflow, outbox bound, refused by
        the broker), ``failures`` (errors seen), ``last_error``, ``broker`` (URL, password hidden)."""
        try:
            pending = len(self._outbox)
            outbox_dropped = self._outbox.dropped
        except Exception:   # noqa: BLE001 - a closed outbox
            pending, outbox_dropped = 0, getattr(self._outbox, "dropped", 0)
        with self._lock:
            return {"connected": self._connected, "queued": pending + self._queue.qsize(),
                    "published": self.published, "dropped": self.dropped + outbox_dropped,
                    "failures": self.failures, "last_error": self.last_error, "broker": self.settings.url}

    def close(self, end_time_s: float | None = None, *, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Stop: publish what is pending while the broker is reachable (up to ``timeout_s``),
        remove the Home Assistant entities (empty retained configs), publish ``offline``,
        disconnect, close the outbox. What was not delivered stays in the outbox for the next
        run. Idempotent; ``add`` and ``alert`` do nothing afterwards."""
        if self._closing:
            return
        self._closing = True
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        self._close_deadline = deadline
        self._stop.set()
        self._wake.set()
        self._worker.join(max(0.1, deadline - time.monotonic()) + 1.0)
        if self._worker.is_alive():
            log.warning("MQTT: the worker did not stop within %.1f s", timeout_s)
        elif self._connected:
            finals = [(topic, b"") for topic, _ in self._configs] + [(self.status_topic, b"offline")]
            infos = [self._client.publish(topic, payload, qos=1, retain=True) for topic, payload in finals]
            for info in infos:
                try:
                    info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    break
            self.removed_on_close = all(info.is_published() for info in infos)
            if not self.removed_on_close:
                log.warning("MQTT: could not remove the Home Assistant entities from %s before the deadline",
                            self.settings.url)
        else:
            log.warning("MQTT: %s is unreachable at exit: %d messages wait in the outbox for the next run; the "
                        "broker's last will marks vision-host offline", self.settings.url, len(self._outbox))
        self._client.disconnect()
        self._client.loop_stop()
        try:
            self._take_acks()        # PUBACKs that came after the worker stopped
        finally:
            self._outbox.close()
