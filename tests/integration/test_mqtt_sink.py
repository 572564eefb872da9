"""The MQTT sink against a real broker (Debian's mosquitto on a free loopback port) and a real
paho subscriber: caption events, retained alert states, snapshots, availability and the last
will, Home Assistant discovery configs (checked against Home Assistant's documented schema),
a broker killed and restarted mid-run, a restart of the sink, passwords."""

from __future__ import annotations

import json
import re
import threading
import time

import cv2
import numpy as np
import pytest

from mosquitto import MISSING_REASON, Mosquitto, Subscriber, mosquitto_binary, wait_for
from vision_host import __version__
from vision_host.captions import AlertEvent, CaptionBus, CaptionEvent
from vision_host.sinks.homeassistant import HA_STATE_MAX_CHARS
from vision_host.sinks.mqtt import (MqttConfigError, MqttSettings, MqttSink, parse_mqtt_table, parse_mqtt_url,
                                    topic_level)
from vision_host.sinks.outbox import Outbox

needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason=MISSING_REASON)
PROTOCOLS = pytest.mark.parametrize("protocol", ["3.1.1", "5"])


@pytest.fixture
def broker(tmp_path):
    """A running anonymous mosquitto, killed at teardown."""
    server = Mosquitto(tmp_path / "broker").start()
    yield server
    server.kill()


def caption(n: int, stream: int = 0, name: str | None = "front door", frame=None, text: str | None = None) -> CaptionEvent:
    return CaptionEvent(text=text if text is not None else f"caption {n}", stream_time_s=n / 10, wall_time=time.time(),
                        frame_index=n, source="test", model="llava", latency_ms=12.5, stream=stream,
                        stream_name=name, prompt="what happens?", frame=frame)


def make_sink(tmp_path, port: int, *, protocol: str = "5", streams=((0, "front door"),), alerts=("person",),
              outbox_name: str = "outbox.sqlite3", **settings) -> MqttSink:
    settings.setdefault("node_id", "testnode")
    s = MqttSettings(host="127.0.0.1", port=port, protocol=protocol, **settings)
    return MqttSink(s, Outbox(tmp_path / outbox_name, "mqtt"), list(streams), list(alerts), reconnect_delay_s=(1, 2))


def payload_json(message) -> dict:
    return json.loads(message.payload)


# -- settings (no broker) ---------------------------------------------------------------------

def test_url_parsing_and_redaction():
    s = parse_mqtt_url("mqtt://alice:p%40ss%3Aword@broker.local")
    assert (s.host, s.port, s.tls, s.username, s.password) == ("broker.local", 1883, False, "alice", "p@ss:word")
    assert s.url == "mqtt://alice:***@broker.local:1883"
    assert "p@ss" not in repr(s)
    assert parse_mqtt_url("mqtts://[::1]").url == "mqtts://[::1]:8883"
    for bad, words in [("http://h", "scheme"), ("mqtt://h:70000", "not valid"), ("mqtt://h/topic", "path"),
                       ("mqtt://", "no host"), ("broker:1883", "URL like"), ("mqtt://u:secret@h:x", "not valid")]:
        with pytest.raises(MqttConfigError, match=words) as info:
            parse_mqtt_url(bad)
        assert "secret" not in str(info.value)


def test_table_parsing(monkeypatch):
    monkeypatch.setenv("MQTT_TEST_PASSWORD", "from-env")
    s = parse_mqtt_table({"url": "mqtt://bob@h:1884", "password-env": "MQTT_TEST_PASSWORD", "protocol": "3.1.1",
                          "topic-prefix": "home/cams", "snapshots": False, "snapshot-max-px": 320, "node-id": "barn",
                          "keepalive-s": 60, "discovery-prefix": "ha"}, "[mqtt] in run.toml")
    assert (s.port, s.username, s.password, s.protocol, s.topic_prefix, s.snapshots, s.snapshot_max_px, s.node_id,
            s.keepalive_s, s.discovery_prefix) == (1884, "bob", "from-env", "3.1.1", "home/cams", False, 320, "barn",
                                                   60, "ha")
    assert parse_mqtt_table({"url": "mqtt://h", "protocol": 5}).protocol == "5"
    cases = [({"url": "mqtt://h", "colour": 1}, "unknown key 'colour' in \\[mqtt\\] in x"),
             ({"topic-prefix": "a"}, "has no url"),
             ({"url": "mqtt://h", "password-env": "MQTT_TEST_UNSET_VARIABLE"}, "MQTT_TEST_UNSET_VARIABLE .* not set"),
             ({"url": "mqtt://u:p@h", "password-env": "MQTT_TEST_PASSWORD"}, "keep one"),
             ({"url": "mqtt://h", "protocol": "4"}, "\"5\" or \"3.1.1\""),
             ({"url": "mqtt://h", "qos": 2}, "qos"),
             ({"url": "mqtt://h", "qos": "1"}, "whole number"),
             ({"url": "mqtt://h", "keepalive-s": 1}, "from 5 to 3600"),
             ({"url": "mqtt://h", "snapshot-max-px": 10_000}, "from 64 to 4096"),
             ({"url": "mqtt://h", "topic-prefix": "a/#"}, "'\\+', '#'"),
             ({"url": "mqtt://h", "topic-prefix": "a//b"}, "empty level"),
             ({"url": "mqtt://h", "node-id": "my node"}, "letters, digits"),
             ({"url": "mqtt://h", "snapshots": "yes"}, "true or false")]
    for table, words in cases:
        with pytest.raises(MqttConfigError, match=words):
            parse_mqtt_table(table, "[mqtt] in x")


def test_topic_levels():
    assert topic_level("front/door+#", 0) == "front_door__"
    assert topic_level("  \x00 ", 3) == "_"
    assert topic_level("", 2) == topic_level(None, 2) == "stream-2"
    assert len(topic_level("x" * 500, 0)) == 64


# -- against the broker -----------------------------------------------------------------------

#: Keys Home Assistant's MQTT discovery needs per component (its documentation's required fields
#: plus what this sink promises: unique_id, availability, the device).
REQUIRED = {"sensor": {"state_topic", "value_template", "json_attributes_topic"},
            "image": {"image_topic", "content_type"},
            "binary_sensor": {"state_topic", "payload_on", "payload_off"}}
COMMON = {"name", "unique_id", "default_entity_id", "availability_topic", "payload_available",
          "payload_not_available", "device", "qos"}
CONFIG_TOPIC = re.compile(r"^homeassistant/(sensor|image|binary_sensor)/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)/config$")


@needs_broker
@PROTOCOLS
def test_captions_alerts_snapshot_and_discovery(tmp_path, broker, protocol):
    live = Subscriber(broker.port, ["vision-host/#", "homeassistant/#"])
    sink = make_sink(tmp_path, broker.port, protocol=protocol, streams=[(0, "front door"), (1, None)])
    try:
        assert sink.wants_frames
        bus = CaptionBus()
        bus.subscribe(sink)
        assert bus.frames_wanted
        wait_for(lambda: sink.health()["connected"], 20, "the sink to connect")
        frame = np.zeros((720, 1280, 3), np.uint8)
        frame[100:300, 200:600] = (0, 0, 255)
        long_text = "a person at the door " * 20          # over Home Assistant's 255-character state limit
        first = caption(1, frame=frame, text=long_text)
        bus.publish(first)
        bus.publish(caption(2, stream=1, name=None))
        bus.publish_alert(AlertEvent("person", "ON", 0, "front door", time.time(), "held for 2 s", first, "'person' in text"))

        got = live.wait(lambda ms: [m for m in ms if m.topic == "vision-host/front door/caption"], 20, "a caption")
        doc = payload_json(got[0])
        assert doc["type"] == "caption" and doc["text"] == long_text and doc["stream_name"] == "front door"
        assert re.fullmatch(r"[0-9a-f]{32}", doc["id"]) and doc["model"] == "llava" and doc["frame_index"] == 1
        assert not got[0].retain
        other = live.wait(lambda ms: [m for m in ms if m.topic == "vision-host/stream-1/caption"], 20, "stream 1's caption")
        assert payload_json(other[0])["text"] == "caption 2"

        snap = live.wait(lambda ms: [m for m in ms if m.topic == "vision-host/front door/snapshot"], 20, "a snapshot")
        image = cv2.imdecode(np.frombuffer(snap[0].payload, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (360, 640, 3)    # downscaled to 640 px, aspect kept
        assert image[100, 200, 2] > 200 and image[100, 200, 0] < 60 and image[300, 500, 2] < 30   # the red box, scaled
        event = live.wait(lambda ms: [m for m in ms if m.topic == "vision-host/front door/alert/person/event"], 20,
                          "the alert event")
        alert_doc = payload_json(event[0])
        assert (alert_doc["type"], alert_doc["name"], alert_doc["state"]) == ("alert", "person", "ON")
        assert alert_doc["caption"]["text"] == long_text
        live.wait_payload("vision-host/front door/alert/person", b"ON")
        wait_for(lambda: sink.health()["published"] >= 5, 20, "PUBACKs counted")

        # A subscriber that comes after the edge gets the retained state, availability and configs.
        late = Subscriber(broker.port, ["homeassistant/#", "vision-host/#"])
        state = late.wait(lambda ms: [m for m in ms if m.topic == "vision-host/front door/alert/person"], 20,
                          "the retained alert state")
        assert (state[-1].payload, state[-1].retain) == (b"ON", True)
        status = late.wait_payload("vision-host/status", b"online")
        assert status.retain
        never = late.wait_payload("vision-host/stream-1/alert/person", b"OFF")   # a known alert that never fired
        assert never.retain and len(late.on("vision-host/stream-1/alert/person")) == 1
        snap_retained = late.wait(lambda ms: [m for m in ms if m.topic == "vision-host/front door/snapshot"], 20,
                                  "the retained snapshot")
        assert snap_retained[0].payload == snap[0].payload

        expected = {t for t, _ in sink.discovery}
        late.wait(lambda ms: expected <= {m.topic for m in ms}, 20, "every discovery config")
        configs = {m.topic: json.loads(m.payload) for m in late.messages if m.topic.startswith("homeassistant/")}
        assert set(configs) == expected
        assert all(m.retain for m in late.messages if m.topic in expected)
        assert len(configs) == 2 * 3                      # per stream: caption sensor, image, one alert
        devices = set()
        by_component: dict[str, list[dict]] = {}
        for topic, config in configs.items():
            match = CONFIG_TOPIC.match(topic)
            assert match, topic
            component, node, _ = match.groups()
            assert node == "testnode"
            assert COMMON | REQUIRED[component] <= set(config), (topic, sorted(config))
            assert config["availability_topic"] == "vision-host/status"
            assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
            assert re.fullmatch(rf"{component}\.[a-z0-9_]+", config["default_entity_id"])
            assert "object_id" not in config                # deprecated in 2025.10, removed in 2026.4
            device = config["device"]
            assert {"identifiers", "name", "model", "sw_version"} <= set(device)
            assert device["model"] == "vision-host" and device["sw_version"] == __version__
            devices.add(json.dumps(device, sort_keys=True))
            by_component.setdefault(component, []).append(config)
        assert len(devices) == 1                            # one device per run
        assert len({c["unique_id"] for c in configs.values()}) == len(configs)
        sensors = {c["state_topic"]: c for c in by_component["sensor"]}
        assert set(sensors) == {"vision-host/front door/caption", "vision-host/stream-1/caption"}   # where captions came
        assert all(c["json_attributes_topic"] == c["state_topic"] for c in sensors.values())
        assert {c["image_topic"] for c in by_component["image"]} == {"vision-host/front door/snapshot",
                                                                      "vision-host/stream-1/snapshot"}
        assert all(c["content_type"] == "image/jpeg" for c in by_component["image"])
        binaries = {c["state_topic"]: c for c in by_component["binary_sensor"]}
        assert set(binaries) == {"vision-host/front door/alert/person", "vision-host/stream-1/alert/person"}
        assert all((c["payload_on"], c["payload_off"]) == ("ON", "OFF") for c in binaries.values())
        jinja2 = pytest.importorskip("jinja2")
        rendered = jinja2.Environment().from_string(sensors["vision-host/front door/caption"]["value_template"]).render(
            value_json=doc)
        assert rendered == long_text[:HA_STATE_MAX_CHARS]
    finally:
        sink.close(timeout_s=10)
    # After close: every config cleared (an empty retained payload: Home Assistant deletes the entity), then offline.
    late.wait(lambda ms: all(any(m.topic == t and m.payload == b"" for m in ms) for t in configs), 20,
              "empty configs after close")
    late.wait_payload("vision-host/status", b"offline")
    assert sink.removed_on_close
    after = Subscriber(broker.port, ["homeassistant/#", "vision-host/status"])
    after.wait(lambda ms: any(m.topic == "vision-host/status" and m.retain and m.payload == b"offline" for m in ms), 20,
               "the retained offline status")
    assert not [m for m in after.messages if m.topic.startswith("homeassistant/")]   # nothing retained is left
    for sub in (live, late, after):
        sub.close()


@needs_broker
@pytest.mark.slow
@PROTOCOLS
def test_broker_killed_mid_run_every_event_arrives_in_order(tmp_path, broker, protocol):
    # The subscriber's persistent session survives the broker restart, so it misses nothing.
    sub = Subscriber(broker.port, ["vision-host/+/caption"], client_id=f"watcher-{protocol}", persistent=True)
    sink = make_sink(tmp_path, broker.port, protocol=protocol, alerts=(), snapshots=False, discovery=False)
    frames, per_frame = 150, 4                   # bursts of captions: messages are in flight when the broker dies
    total, produced = frames * per_frame, []
    add_times, gaps = [], []
    outage_started, restarted = threading.Event(), threading.Event()

    def frame_loop():
        """A stream's frame loop: a frame every 10 ms, ``per_frame`` captions on each."""
        last = time.monotonic()
        for frame in range(frames):
            if frame in (40, 110):               # some frames before the outage, some during it, the rest after
                (outage_started if frame == 40 else restarted).wait(30)
                last = time.monotonic()          # the test's own wait is no frame gap
            for k in range(per_frame):
                n = frame * per_frame + k
                t0 = time.monotonic()
                sink.add(caption(n))
                add_times.append(time.monotonic() - t0)
                produced.append(n)
            time.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    wait_for(lambda: sink.health()["connected"], 20, "the sink to connect")
    loop = threading.Thread(target=frame_loop)
    loop.start()
    try:
        sub.wait(lambda ms: len(ms) >= 100, 20, "the first captions")
        broker.kill()
        wait_for(lambda: not sink.health()["connected"], 20, "the sink to see the broker gone")
        outage_started.set()
        wait_for(lambda: len(produced) >= 110 * per_frame, 30, "captions produced during the outage")
        down = sink.health()
        assert down["queued"] > 0 and not down["connected"] and down["last_error"]
        broker.start()
        restarted.set()
        loop.join(30)
        got = sub.wait(lambda ms: (len({payload_json(m)["id"] for m in ms}) >= total) and ms, 60,
                       f"all {total} captions after the restart")
        sink_health = sink.health()
    finally:
        outage_started.set()
        restarted.set()
        loop.join(30)
        sink.close(timeout_s=5)
        sub.close()
    docs = [payload_json(m) for m in got]
    first_seen: dict[str, int] = {}
    order = []
    duplicates = 0
    for doc in docs:
        if doc["id"] in first_seen:
            duplicates += 1                       # QoS 1: a re-sent message, recognised by its id
            assert first_seen[doc["id"]] == doc["frame_index"]
            continue
        first_seen[doc["id"]] = doc["frame_index"]
        order.append(doc["frame_index"])
    assert order == list(range(total))            # every event, once, in order
    assert sink_health["dropped"] == 0
    worst_add = max(add_times)
    print(f"\nMQTT {protocol}: {total} captions, broker down from frame 40 to 110; duplicates {duplicates}; "
          f"slowest add() {worst_add * 1000:.2f} ms; longest frame gap {max(gaps) * 1000:.1f} ms (10 ms frames)")
    assert worst_add < 0.5


@needs_broker
@pytest.mark.slow
def test_restart_of_the_sink_delivers_what_was_pending(tmp_path):
    server = Mosquitto(tmp_path / "broker")          # not started: the broker is down
    sink = make_sink(tmp_path, server.port, alerts=(), snapshots=False, discovery=False)
    for n in range(5):
        sink.add(caption(n))
    wait_for(lambda: sink.health()["queued"] == 5, 20, "5 messages in the outbox")
    assert not sink.health()["connected"]
    t0 = time.monotonic()
    sink.close(timeout_s=2)
    assert time.monotonic() - t0 < 10
    server.start()
    try:
        sub = Subscriber(server.port, ["vision-host/+/caption"])
        again = make_sink(tmp_path, server.port, alerts=(), snapshots=False, discovery=False)
        got = sub.wait(lambda ms: ms if len(ms) >= 5 else None, 20, "the pending captions")
        assert [payload_json(m)["frame_index"] for m in got] == [0, 1, 2, 3, 4]
        wait_for(lambda: again.health()["queued"] == 0, 20, "an empty outbox")
        again.close(timeout_s=5)
        sub.close()
    finally:
        server.kill()


@needs_broker
@pytest.mark.slow
@PROTOCOLS
def test_password(tmp_path, protocol, caplog):
    server = Mosquitto(tmp_path / "broker", users={"cam": "s3cret-pass"}).start()
    try:
        sub = Subscriber(server.port, ["vision-host/status"], auth=("cam", "s3cret-pass"))
        good = MqttSink(parse_mqtt_url(f"mqtt://cam:s3cret-pass@127.0.0.1:{server.port}"), Outbox(tmp_path / "a.sqlite3", "mqtt"),
                        [(0, "yard")], [], reconnect_delay_s=(1, 2))
        assert good.settings.protocol == "5"
        wait_for(lambda: good.health()["connected"], 20, "the sink to connect with its password")
        sub.wait_payload("vision-host/status", b"online")
        good.close(timeout_s=5)

        settings = MqttSettings(host="127.0.0.1", port=server.port, username="cam", password="wrong-pass", protocol=protocol)
        with caplog.at_level("WARNING", logger="vision_host.sinks.mqtt"):
            bad = MqttSink(settings, Outbox(tmp_path / "b.sqlite3", "mqtt"), [(0, "yard")], [], reconnect_delay_s=(1, 2))
            health = wait_for(lambda: (h := bad.health())["last_error"] and h, 20, "the refusal in health()")
            assert not health["connected"]
            assert "refused the connection" in health["last_error"]
            assert re.search(r"Bad user name or password|Not authorized", health["last_error"]), health["last_error"]
            assert health["broker"] == f"mqtt://cam:***@127.0.0.1:{server.port}"
            bad.close(timeout_s=1)
        assert "refused the connection" in caplog.text
        assert "wrong-pass" not in caplog.text and "wrong-pass" not in json.dumps(health)
        sub.close()
    finally:
        server.kill()


@needs_broker
@pytest.mark.slow
def test_last_will_marks_offline_when_the_connection_dies(tmp_path, broker):
    sub = Subscriber(broker.port, ["vision-host/status"])
    sink = make_sink(tmp_path, broker.port, discovery=False)
    try:
        sub.wait_payload("vision-host/status", b"online")
        seen = len(sub.messages)
        import socket as socket_module
        sink._client.socket().shutdown(socket_module.SHUT_RDWR)   # gone without DISCONNECT: the broker sends the will
        sub.wait(lambda ms: any(m.payload == b"offline" for m in ms[seen:]), 20, "the last will's offline")
        after = len(sub.messages)
        sub.wait(lambda ms: any(m.payload == b"online" for m in ms[after:]), 20, "online again after the reconnect")
    finally:
        sink.close(timeout_s=5)
        sub.close()


@pytest.mark.slow
def test_outbox_bound_drops_the_oldest_and_counts_them(tmp_path):
    from mosquitto import free_port
    settings = MqttSettings(host="127.0.0.1", port=free_port(), node_id="testnode", snapshots=False, discovery=False)
    sink = MqttSink(settings, Outbox(tmp_path / "o.sqlite3", "mqtt", max_messages=3), [(0, "yard")], [],
                    reconnect_delay_s=(1, 2))       # nothing listens on the port: the broker is down
    try:
        for n in range(5):
            sink.add(caption(n, name="yard"))
        health = wait_for(lambda: (h := sink.health())["dropped"] == 2 and h, 20, "2 dropped messages")
        assert (health["queued"], health["connected"], health["published"]) == (3, False, 0)
    finally:
        sink.close(timeout_s=1)
    left = Outbox(tmp_path / "o.sqlite3", "mqtt")
    assert [json.loads(m.payload)["frame_index"] for m in left.peek()] == [2, 3, 4]   # the newest were kept
    left.close()


def test_discovery_refuses_two_entities_on_one_topic():
    from vision_host.sinks.homeassistant import DiscoveryContext, StreamTopics, discovery_configs
    ctx = DiscoveryContext("homeassistant", "node", "vision-host/status", "1.0")
    a = StreamTopics("Front Door", "Front Door", "p/Front Door/caption", None, {})
    b = StreamTopics("front-door", "front-door", "p/front-door/caption", None, {})
    with pytest.raises(ValueError, match="would share the discovery topic"):
        discovery_configs(ctx, [a, b])
    with pytest.raises(ValueError, match="letters, digits"):
        DiscoveryContext("homeassistant", "my node", "s", "1.0")
