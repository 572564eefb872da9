"""Home Assistant MQTT discovery: the config payloads the MQTT sink publishes for one run.

Pure functions, no I/O: :func:`discovery_configs` turns the run's streams and alert names into
``(config topic, config dict)`` pairs; the MQTT sink (:mod:`.mqtt`) publishes each dict as JSON,
retained, when it connects, and an empty retained payload to each topic when it closes (which is
how Home Assistant removes a discovered entity).

What a run becomes in Home Assistant: one device (``vision-host NODE``) holding, per stream,

* a ``sensor`` — the stream's last caption. Its state is the caption text cut to 255 characters
  (Home Assistant's limit for a state); the whole caption event (text, model, latency, fields, …)
  are its attributes, read from the same topic (``json_attributes_topic``);
* an ``image`` — the latest snapshot JPEG (``image_topic``, ``content_type: image/jpeg``), when the
  sink publishes snapshots;
* a ``binary_sensor`` per alert rule — ``ON`` / ``OFF`` on the alert's retained state topic.

Every entity names the sink's availability topic (``PREFIX/status``: ``online`` / ``offline``,
the MQTT last will), so all of them show *unavailable* when vision-host is gone.

Facts from Home Assistant's documentation (field names and rules, checked December 2026):

* discovery topic ``<discovery_prefix>/<component>/[<node_id>/]<object_id>/config``, node_id and
  object_id of ``[a-zA-Z0-9_-]``; a retained config creates the entity, an empty retained payload
  deletes it — https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery
* ``unique_id`` (needed for a device and for UI changes), ``device`` (``identifiers``, ``name``,
  ``model``, ``manufacturer``, ``sw_version``), ``availability_topic`` with ``payload_available`` /
  ``payload_not_available``, ``qos``; ``default_entity_id`` (``DOMAIN.object``) sets the entity id,
  replacing ``object_id``, deprecated in 2025.10 and removed in 2026.4 —
  https://www.home-assistant.io/integrations/mqtt/ and
  https://www.home-assistant.io/integrations/sensor.mqtt/
* sensor: ``state_topic`` (required), ``value_template``, ``json_attributes_topic``; a state longer
  than 255 characters is refused — https://www.home-assistant.io/integrations/sensor.mqtt/
* binary_sensor: ``state_topic``, ``payload_on`` / ``payload_off``; retained states show at once
  after a Home Assistant restart — https://www.home-assistant.io/integrations/binary_sensor.mqtt/
* image: ``image_topic`` carries the raw image file, ``content_type`` (default ``image/jpeg``);
  not together with ``url_topic`` — https://www.home-assistant.io/integrations/image.mqtt/
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["HA_STATE_MAX_CHARS", "DiscoveryContext", "StreamTopics", "alert_config", "caption_config", "device_block",
           "discovery_configs", "entity_slug", "image_config", "is_valid_discovery_id"]

#: Home Assistant refuses a state longer than this (characters): the caption sensor's state is
#: the caption cut to it; the whole text stays in the attributes.
HA_STATE_MAX_CHARS = 255

_DISCOVERY_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def is_valid_discovery_id(text: str) -> bool:
    """Whether ``text`` may be a discovery topic's node_id or object_id (``[a-zA-Z0-9_-]+``)."""
    return bool(_DISCOVERY_ID.match(text))


def entity_slug(text: str) -> str:
    """``text`` as an entity id's object part (lowercase ``a-z0-9_``, no leading, trailing or
    doubled ``_``), ``"x"`` if nothing is left. Also a valid discovery object_id."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug or "x"


@dataclass(frozen=True)
class DiscoveryContext:
    """What every config of one run shares.

    Attributes:
        discovery_prefix: Home Assistant's discovery prefix (``homeassistant``).
        node_id: this run's node (``[a-zA-Z0-9_-]+``, e.g. the host name): the device, and the
            discovery topics' node level.
        availability_topic: the sink's ``PREFIX/status`` topic (``online`` / ``offline``).
        sw_version: vision-host's version, shown on the device.
        qos: QoS Home Assistant subscribes with (0 or 1).
    """

    discovery_prefix: str
    node_id: str
    availability_topic: str
    sw_version: str
    qos: int = 1

    def __post_init__(self) -> None:
        if not is_valid_discovery_id(self.node_id):
            raise ValueError(f"Home Assistant node id {self.node_id!r} may hold only letters, digits, '_' and '-'")

    def topic(self, component: str, object_id: str) -> str:
        """The config topic of ``component``'s entity ``object_id``."""
        return f"{self.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"

    def unique_id(self, object_id: str) -> str:
        """Unique among every Home Assistant entity: ``vision-host_NODE_OBJECT``."""
        return f"vision-host_{self.node_id}_{object_id}"

    def default_entity_id(self, component: str, object_id: str) -> str:
        """``component.vision_host_NODE_OBJECT`` (lowercase, ``_``) for ``default_entity_id``."""
        return f"{component}.{entity_slug(f'vision_host_{self.node_id}_{object_id}')}"


def device_block(ctx: DiscoveryContext) -> dict:
    """The ``device`` every entity of the run shares (Home Assistant groups them under it)."""
    return {
        "identifiers": [f"vision-host_{ctx.node_id}"],
        "name": f"vision-host {ctx.node_id}",
        "manufacturer": "vision-host",
        "model": "vision-host",
        "sw_version": ctx.sw_version,
    }


def _common(ctx: DiscoveryContext, component: str, object_id: str, name: str) -> dict:
    return {
        "name": name,
        "unique_id": ctx.unique_id(object_id),
        "default_entity_id": ctx.default_entity_id(component, object_id),
        "availability_topic": ctx.availability_topic,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device_block(ctx),
    }


def caption_config(ctx: DiscoveryContext, stream_slug: str, stream_label: str, caption_topic: str) -> tuple[str, dict]:
    """``(topic, config)`` of the ``sensor`` showing stream ``stream_label``'s last caption.

    Args:
        stream_slug: the stream's topic level (:func:`.mqtt.topic_level`), used in ids.
        stream_label: the stream's name for people (entity name ``"LABEL caption"``).
        caption_topic: where the sink publishes the caption event JSON.
    """
    object_id = entity_slug(f"{stream_slug}_caption")
    config = _common(ctx, "sensor", object_id, f"{stream_label} caption")
    config.update({
        "state_topic": caption_topic,
        "value_template": f"{{{{ value_json.text[:{HA_STATE_MAX_CHARS}] }}}}",
        "json_attributes_topic": caption_topic,
        "icon": "mdi:text-box-outline",
        "qos": ctx.qos,
    })
    return ctx.topic("sensor", object_id), config


def image_config(ctx: DiscoveryContext, stream_slug: str, stream_label: str, snapshot_topic: str) -> tuple[str, dict]:
    """``(topic, config)`` of the ``image`` entity showing stream ``stream_label``'s latest snapshot
    (a JPEG published to ``snapshot_topic`` on each caption)."""
    object_id = entity_slug(f"{stream_slug}_snapshot")
    config = _common(ctx, "image", object_id, f"{stream_label} snapshot")
    config.update({
        "image_topic": snapshot_topic,
        "content_type": "image/jpeg",
        "qos": ctx.qos,
    })
    return ctx.topic("image", object_id), config


def alert_config(ctx: DiscoveryContext, stream_slug: str, stream_label: str, alert_name: str,
                 state_topic: str) -> tuple[str, dict]:
    """``(topic, config)`` of the ``binary_sensor`` of alert ``alert_name`` on a stream
    (``ON`` / ``OFF``, retained, on ``state_topic``)."""
    object_id = entity_slug(f"{stream_slug}_alert_{alert_name}")
    config = _common(ctx, "binary_sensor", object_id, f"{stream_label} {alert_name}")
    config.update({
        "state_topic": state_topic,
        "payload_on": "ON",
        "payload_off": "OFF",
        "qos": ctx.qos,
    })
    return ctx.topic("binary_sensor", object_id), config


@dataclass(frozen=True)
class StreamTopics:
    """One stream as the discovery configs need it (built by the MQTT sink).

    Attributes:
        slug: the stream's topic level; label: its name for people;
        caption_topic, snapshot_topic: its topics; alert_topics: alert name → state topic.
    """

    slug: str
    label: str
    caption_topic: str
    snapshot_topic: str | None
    alert_topics: dict[str, str]


def discovery_configs(ctx: DiscoveryContext, streams: Iterable[StreamTopics]) -> list[tuple[str, dict]]:
    """Every ``(config topic, config)`` of a run: per stream a caption sensor, an image entity
    (when it has a snapshot topic) and a binary_sensor per alert, in that order.

    Raises:
        ValueError: two entities would share a config topic (names that differ only in
            characters the ids cannot hold); the sentence names them.
    """
    configs: list[tuple[str, dict]] = []
    for s in streams:
        configs.append(caption_config(ctx, s.slug, s.label, s.caption_topic))
        if s.snapshot_topic:
            configs.append(image_config(ctx, s.slug, s.label, s.snapshot_topic))
        for name, topic in s.alert_topics.items():
            configs.append(alert_config(ctx, s.slug, s.label, name, topic))
    seen: dict[str, str] = {}
    for topic, config in configs:
        if topic in seen:
            raise ValueError(f"Home Assistant entities {seen[topic]!r} and {config['name']!r} would share the "
                             f"discovery topic {topic}: rename a stream or alert so their letters and digits differ")
        seen[topic] = config["name"]
    return configs
