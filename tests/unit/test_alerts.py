"""Alert rules (vision_host.captions.alerts): CEL conditions compiled at start, evaluated on real
caption events, and their off → on → off state machines driven by a fake clock and by the real
timer thread."""

from __future__ import annotations

import json
import logging
import math
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vision_host.captions import CaptionBus, CaptionEvent, CaptionSubscriber
from vision_host.captions.alerts import (MAX_SECONDS, AlertRule, AlertRuleError, AlertRules, caption_variables,
                                         parse_alert_flag, parse_alert_table)

T0 = 1_700_000_000.0


def caption(text: str = "an empty room", fields=None, stream: int = 0, stream_name: str | None = None,
            latency_ms: float | None = 850.0, model: str | None = "llava") -> CaptionEvent:
    return CaptionEvent(text, 1.0, T0, 30, "camera", model=model, latency_ms=latency_ms, stream=stream,
                        stream_name=stream_name, prompt="What do you see?", fields=fields)


def structured(reply: str, **kw) -> CaptionEvent:
    """A caption whose structured answer is the JSON ``reply`` (parsed as the pipeline does)."""
    return caption(reply, fields=json.loads(reply), **kw)


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Edges(CaptionSubscriber):
    """Records alert edges; sets ``seen`` on each."""

    def __init__(self):
        self.edges = []
        self.seen = threading.Event()

    def add(self, event):
        pass

    def alert(self, event):
        self.edges.append(event)
        self.seen.set()

    def states(self):
        return [(e.name, e.state, e.stream, round(e.wall_time - T0, 3)) for e in self.edges]


def rig(*rules: AlertRule):
    bus, clock, edges = CaptionBus(), Clock(), Edges()
    bus.subscribe(edges)
    alerts = AlertRules(rules, bus, clock=clock, timer=False)
    return bus, clock, edges, alerts


def at(bus: CaptionBus, clock: Clock, t: float, event: CaptionEvent) -> None:
    """Publish ``event`` ``t`` s after T0."""
    clock.now = T0 + t
    bus.publish(event)


# -- conditions ------------------------------------------------------------------------------
@pytest.mark.parametrize("when, position, caret_col", [
    ("fields.count >= ", "1:17", 16),
    ('text.contains("smoke"', "1:22", 21),
    ("fields.person == true &&\n  (fields.count ||", "2:19", 18),
    ("fields.x ==== 2", "1:12", 11),
])
def test_a_syntax_error_names_the_rule_and_points_at_the_position(when, position, caret_col):
    with pytest.raises(AlertRuleError) as err:
        AlertRule("door", when)
    message = str(err.value)
    assert message.startswith("alert rule 'door': its condition is not valid CEL at " + position)
    expression_line, caret_line = message.splitlines()[-2:]
    assert caret_line.index("^") - 4 == caret_col and expression_line[4:] == when.splitlines()[-1]


def test_unknown_variables_and_functions_fail_at_start_with_their_position():
    with pytest.raises(AlertRuleError, match=r"reads 'feilds' at 1:21, which is not a variable"):
        AlertRule("a", 'text != "feilds" && feilds.person')
    with pytest.raises(AlertRuleError, match=r"calls lowerAscii\(\) at 2:6"):
        AlertRule("a", 'true &&\ntext.lowerAscii() == "smoke"')
    rule = AlertRule("a", "has_fields && fields.items.exists(item, item.kind == 'person')")   # a macro's variable
    assert rule.matches(caption_variables(structured('{"items": [{"kind": "cat"}, {"kind": "person"}]}')))


def test_the_issue_examples_on_real_caption_events():
    both = AlertRule("crowd", "fields.person == true && fields.count >= 2")
    smoke = AlertRule("smoke", 'text.contains("smoke")')
    smoke_any_case = AlertRule("smoke2", 'text.matches("(?i)smoke")')

    def match(rule, event):
        return rule.matches(caption_variables(event))

    assert match(both, structured('{"person": true, "count": 2}'))
    assert match(both, structured('{"person": true, "count": 2.0}'))      # a JSON 2.0 compares with 2
    assert match(both, structured('{"person": true, "count": 3.5}'))
    assert not match(both, structured('{"person": true, "count": 1}'))
    assert not match(both, structured('{"person": false, "count": 5}'))
    assert match(AlertRule("n", "fields.count == 2.0 && fields.score > 1"), structured('{"count": 2, "score": 1.5}'))
    assert match(smoke, caption("thin smoke above the kettle"))
    assert not match(smoke, caption("Thick SMOKE"))
    assert match(smoke_any_case, caption("Thick SMOKE"))
    assert match(AlertRule("slow", "latency_ms > 500 && model == 'llava' && stream == 'door' && stream_index == 1 "
                                   "&& prompt.startsWith('What') && !has_fields"),
                 caption(stream=1, stream_name="door"))
    unknown = caption_variables(caption(latency_ms=None, model=None))
    assert (unknown["latency_ms"], unknown["model"], unknown["stream"], unknown["fields"]) == (-1.0, "", "0", {})


@pytest.mark.parametrize("event", [caption("no fields at all"), structured('{"count": 3}')])
def test_a_missing_field_is_an_evaluation_error_not_a_crash(event):
    rule = AlertRule("crowd", "fields.person == true && fields.count >= 2")
    with pytest.raises(ValueError, match="^no key "):
        rule.matches(caption_variables(event))
    assert not AlertRule("safe", "has(fields.person) && fields.person").matches(caption_variables(event))


def test_a_result_that_is_not_a_bool_is_an_evaluation_error():
    with pytest.raises(ValueError, match="not true or false"):
        AlertRule("count", "fields.count").matches(caption_variables(structured('{"count": 2}')))


# -- rule tables and flags -------------------------------------------------------------------
def test_a_run_file_table_becomes_a_rule():
    rule = parse_alert_table({"name": "front-door_1", "when": "fields.person", "streams": ["door", 2],
                              "for-s": 2, "cooldown-s": 60.5, "clear-after-s": 30}, "run.toml [[alert]] 1")
    assert rule == AlertRule("front-door_1", "fields.person", ("door", "2"), 2.0, 60.5, 30.0)
    assert rule.watches(2, None) and rule.watches(0, "door") and not rule.watches(1, "yard")


@pytest.mark.parametrize("table, message", [
    ({"name": "a", "when": "true", "for": 2}, "unknown key 'for'"),
    ({"when": "true"}, "needs 'name'"),
    ({"name": "a"}, "needs 'when'"),
    ({"name": "a b", "when": "true"}, "not usable"),
    ({"name": "x" * 65, "when": "true"}, "not usable"),
    ({"name": "", "when": "true"}, "not usable"),
    ({"name": "a", "when": "  "}, "non-empty"),
    ({"name": "a", "when": 3}, "non-empty"),
    ({"name": "a", "when": "true " * 1000}, "characters long"),
    ({"name": "a", "when": "true", "for-s": -1}, "out of range"),
    ({"name": "a", "when": "true", "cooldown-s": math.inf}, "out of range"),
    ({"name": "a", "when": "true", "for-s": MAX_SECONDS + 1}, "out of range"),
    ({"name": "a", "when": "true", "for-s": "2"}, "number of seconds"),
    ({"name": "a", "when": "true", "for-s": True}, "number of seconds"),
    ({"name": "a", "when": "true", "clear-after-s": 0}, "above 0"),
    ({"name": "a", "when": "true", "streams": "door"}, "list of stream names"),
    ({"name": "a", "when": "true", "streams": [-1]}, "list of stream names"),
    ({"name": "a", "when": "true ||"}, "not valid CEL at 1:8"),
])
def test_a_bad_table_is_an_error_saying_where_and_what(table, message):
    with pytest.raises(AlertRuleError, match="^run.toml, alert 3: .*" + message.replace("(", r"\(")):
        parse_alert_table(table, "run.toml, alert 3")


def test_a_command_line_flag_becomes_a_rule():
    rule = parse_alert_flag('smoke=text.contains("smoke") || fields.count == 2')
    assert (rule.name, rule.when, rule.streams, rule.for_s) == ("smoke", 'text.contains("smoke") || fields.count == 2', (), 0)
    for bad in ('text.contains("smoke")', "=true", "a b=true"):
        with pytest.raises(AlertRuleError, match="write NAME=EXPR"):
            parse_alert_flag(bad)
    with pytest.raises(AlertRuleError, match="'smoke'.* at 1:4"):
        parse_alert_flag("smoke=1 +* 2")


def test_rule_names_must_be_unique():
    with pytest.raises(AlertRuleError, match="two alert rules are named 'a'"):
        AlertRules([AlertRule("a", "true"), AlertRule("a", "false")], CaptionBus(), timer=False)


# -- the state machine, fake clock ------------------------------------------------------------
def test_for_s_debounces_flicker_never_fires_and_a_held_match_fires_on_the_timer():
    bus, clock, edges, alerts = rig(AlertRule("smoke", 'text.contains("smoke")', for_s=2))
    for t in range(20):   # smoke every other caption, one a second: never held for 2 s
        at(bus, clock, t, caption("smoke" if t % 2 == 0 else "clear"))
        alerts.poll(T0 + t + 0.5)
    assert edges.edges == [] and alerts.states()["rules"]["smoke"]["streams"]["0"]["state"] == "OFF"
    at(bus, clock, 30, caption("smoke"))
    at(bus, clock, 31, caption("more smoke"))
    alerts.poll(T0 + 31.999)
    assert edges.edges == []
    alerts.poll(T0 + 40)             # no caption at 32: the timer makes the edge, at 32 exactly
    assert edges.states() == [("smoke", "ON", 0, 32.0)]
    assert edges.edges[0].caption is None and edges.edges[0].reason == "held for 2 s"
    assert edges.edges[0].expression == 'text.contains("smoke")'
    at(bus, clock, 41, caption("clear air"))
    assert edges.states()[-1] == ("smoke", "OFF", 0, 41.0) and edges.edges[-1].caption.text == "clear air"
    assert alerts.fired == 1


def test_cooldown_delays_the_next_on_edge_while_the_condition_holds():
    bus, clock, edges, alerts = rig(AlertRule("p", "fields.person", cooldown_s=10))
    at(bus, clock, 0, structured('{"person": true}'))
    at(bus, clock, 1, structured('{"person": false}'))
    at(bus, clock, 2, structured('{"person": true}'))      # pending until 0 + 10
    at(bus, clock, 3, structured('{"person": false}'))     # flicker during the cooldown: back to OFF
    at(bus, clock, 4, structured('{"person": true}'))
    at(bus, clock, 6, structured('{"person": true}'))
    alerts.poll(T0 + 9.9)
    assert edges.states() == [("p", "ON", 0, 0.0), ("p", "OFF", 0, 1.0)]
    alerts.poll(T0 + 10.0)
    assert edges.states()[-1] == ("p", "ON", 0, 10.0) and "cooldown" in edges.edges[-1].reason
    at(bus, clock, 11, structured('{"person": false}'))
    at(bus, clock, 25, structured('{"person": true}'))     # cooldown over: at once
    assert edges.states()[-2:] == [("p", "OFF", 0, 11.0), ("p", "ON", 0, 25.0)]
    assert alerts.states()["rules"]["p"]["streams"]["0"]["fires"] == 3


def test_clear_after_s_turns_off_on_the_timer_whatever_captions_say():
    bus, clock, edges, alerts = rig(AlertRule("smoke", 'text.contains("smoke")', clear_after_s=5))
    at(bus, clock, 0, caption("smoke"))
    at(bus, clock, 1, caption("nothing"))                # ignored with clear-after-s
    at(bus, clock, 3, caption("smoke again"))            # the last match: OFF at 8
    at(bus, clock, 4, caption("nothing"))
    alerts.poll(T0 + 7.99)
    assert edges.states() == [("smoke", "ON", 0, 0.0)]
    alerts.poll(T0 + 100)                                # no caption since 4
    assert edges.states() == [("smoke", "ON", 0, 0.0), ("smoke", "OFF", 0, 8.0)]
    assert edges.edges[-1].reason == "cleared after 5 s without a match" and edges.edges[-1].caption is None
    alerts.poll(T0 + 200)
    assert len(edges.edges) == 2


def test_streams_are_independent_and_the_streams_filter_holds():
    bus, clock, edges, alerts = rig(AlertRule("all", 'text.contains("cat")', for_s=1),
                                    AlertRule("door", 'text.contains("cat")', streams=("door",)))
    at(bus, clock, 0, caption("a cat", stream=0, stream_name="door"))
    at(bus, clock, 0.5, caption("a cat", stream=1, stream_name="yard"))
    at(bus, clock, 0.7, caption("a dog", stream=0, stream_name="door"))   # stream 0 back to OFF, not 1
    alerts.poll(T0 + 5)
    assert sorted(edges.states()) == [("all", "ON", 1, 1.5), ("door", "OFF", 0, 0.7), ("door", "ON", 0, 0.0)]
    assert edges.edges[-1].stream_name == "yard"
    streams = alerts.states()["rules"]
    assert set(streams["door"]["streams"]) == {"door"} and streams["all"]["streams"]["door"]["state"] == "OFF"
    assert streams["all"]["streams"]["yard"]["state"] == "ON"


def test_an_evaluation_error_counts_as_no_match_and_is_logged_once_per_rule(caplog):
    bus, clock, edges, alerts = rig(AlertRule("crowd", "fields.count >= 2"))
    with caplog.at_level(logging.WARNING, logger="vision_host.captions.alerts"):
        at(bus, clock, 0, structured('{"count": 3}'))
        for t in range(1, 4):
            at(bus, clock, t, caption("not structured"))
    assert edges.states() == [("crowd", "ON", 0, 0.0), ("crowd", "OFF", 0, 1.0)]
    state = alerts.states()
    assert state["evaluation_errors"] == 3 and state["rules"]["crowd"]["errors"] == 3
    assert state["rules"]["crowd"]["streams"]["0"]["errors"] == 3
    logged = [r.getMessage() for r in caplog.records if "crowd" in r.getMessage()]
    assert len(logged) == 1 and "no key 'count'" in logged[0]
    json.dumps(state)


def test_closing_stops_evaluating():
    bus, clock, edges, alerts = rig(AlertRule("a", "true", for_s=1))
    at(bus, clock, 0, caption())
    bus.close()
    alerts.poll(T0 + 5)
    assert edges.edges == [] and alerts.states()["rules"]["a"]["streams"]["0"]["state"] == "PENDING"


# -- the real timer thread --------------------------------------------------------------------
def test_the_timer_thread_fires_the_on_edge_without_a_caption():
    bus, edges = CaptionBus(), Edges()
    bus.subscribe(edges)
    alerts = AlertRules([AlertRule("smoke", 'text.contains("smoke")', for_s=0.2)], bus)
    try:
        bus.publish(caption("smoke", stream=2))
        assert edges.seen.wait(timeout=10), "no ON edge from the timer thread"
        edge = edges.edges[0]
        assert (edge.name, edge.state, edge.stream, edge.caption) == ("smoke", "ON", 2, None)
    finally:
        alerts.close()
    assert not alerts._thread.is_alive()


# -- random captions --------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)
captions = st.builds(caption, text=st.text(max_size=40),
                     fields=st.none() | st.dictionaries(st.sampled_from(["person", "count", "x"]), json_values, max_size=3),
                     stream=st.integers(0, 3), stream_name=st.none() | st.sampled_from(["door", "yard"]),
                     latency_ms=st.none() | st.floats(0, 1e5), model=st.none() | st.text(max_size=5))


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0, 3), captions, st.booleans()), min_size=5, max_size=20))
def test_random_captions_never_raise_and_states_stay_valid(steps):
    bus, clock, edges, alerts = rig(
        AlertRule("crowd", "fields.person == true && fields.count >= 2", for_s=1, cooldown_s=2),
        AlertRule("smoke", 'text.matches("(?i)smo?ke") || fields.x == "smoke"', clear_after_s=2),
        AlertRule("door", "has_fields && size(fields) > 1", streams=("door", "3")))
    for dt, event, poll in steps:
        clock.now += dt
        bus.publish(event)
        if poll:
            alerts.poll()
    alerts.poll(clock.now + 10)
    state = json.loads(json.dumps(state_ := alerts.states()))
    assert state == state_ and bus.failures == 0
    last = {}
    for edge in edges.edges:
        key = (edge.name, edge.stream)
        assert last.get(key, "OFF") != edge.state and edge.wall_time <= clock.now
        last[key] = edge.state
    for rule in state["rules"].values():
        for stream in rule["streams"].values():
            assert stream["state"] in ("OFF", "PENDING", "ON") and stream["fires"] >= 0
    assert state["fired"] == sum(e.state == "ON" for e in edges.edges)


# -- speed ------------------------------------------------------------------------------------
def test_bench_one_evaluation(benchmark):
    """One evaluation of the issue's structured example on a structured caption (µs)."""
    rule = AlertRule("crowd", "fields.person == true && fields.count >= 2")
    variables = caption_variables(structured('{"person": true, "count": 2, "what": "two people at the door"}'))
    assert benchmark(rule.matches, variables) is True


def test_clear_after_shorter_than_for_is_refused_at_start_with_what_to_do():
    from vision_host.captions.alerts import AlertRuleError, parse_alert_table
    with pytest.raises(AlertRuleError, match=r"clear-after-s 0.5 is shorter than for-s 2.*at least 2"):
        parse_alert_table({"name": "door", "when": "true", "for-s": 2, "clear-after-s": 0.5}, "run.toml")
    rule = parse_alert_table({"name": "door", "when": "true", "for-s": 2, "clear-after-s": 2}, "run.toml")
    assert rule.clear_after_s == rule.for_s == 2
