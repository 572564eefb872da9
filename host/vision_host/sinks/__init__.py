"""Where events leave the machine: sinks that deliver caption and alert events to other systems.

Every sink is a :class:`~vision_host.captions.CaptionSubscriber` of every stream: its ``add``
(captions) and ``alert`` (alert edges) hand the event to a queue and return at once, and the
sink's own thread does the network work, never the frame loop.

* :mod:`.outbox` — :class:`~.outbox.Outbox`: the bounded on-disk queue (SQLite) an event waits
  in until its sink has delivered it, in order; what is still waiting at exit is delivered by
  the next run. Past its bound the oldest messages are dropped, counted and logged.
* :mod:`.payloads` — :func:`~.payloads.event_json`: the one JSON shape of a caption event and
  of an alert event, shared by every sink.
* :mod:`.webhook` — :class:`~.webhook.WebhookSink`: HTTP POSTs of the event JSON, signed as the
  Standard Webhooks specification says, retried with exponential backoff and jitter.
* :mod:`.mqtt` — the MQTT sink (QoS 1, retained alert states, snapshots, availability).
* :mod:`.homeassistant` — Home Assistant MQTT discovery configs for the MQTT sink.

Importing this package imports none of the sinks (``requests``, ``paho-mqtt`` load with theirs).
"""
