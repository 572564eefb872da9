"""Alert rules: conditions over caption events, each an off → on → off state machine per stream.

A rule (``[[alert]]`` in the run file, ``--alert NAME=EXPR`` on the command line) names a
condition written in CEL, the Common Expression Language (https://github.com/google/cel-spec),
e.g. ``fields.person == true && fields.count >= 2`` or ``text.contains("smoke")``. Conditions
are compiled once, at start: a syntax error, an unknown variable or an unknown function is an
:class:`AlertRuleError` naming the rule, with the line:column and a caret under the expression.

The evaluator is ``common-expression-language`` (module ``cel``, Python bindings of the Rust
``cel`` crate), chosen over ``cel-python`` (``celpy``) after trying both. Both report syntax
errors by line:column, ``cel`` at the offending token, ``celpy`` at an earlier one. Only ``cel``
compares JSON numbers as a user expects: the model may write ``2`` or ``2.0``, and ``celpy``
answers ``fields.count >= 2.0`` on ``2`` (or ``== 2.0``) with a "no such overload" error where
``cel`` follows the spec's heterogeneous numeric comparison and answers true. ``cel`` is about
25 times faster (~11 µs per evaluation of ``fields.person == true && fields.count >= 2``
against ~280 µs; ``matches`` compiles its pattern each time, ~0.2 ms, with the linear-time
Rust ``regex`` crate) and lists the variables and functions a program references, so unknown
names fail at start. Neither runs Python: an expression only reads the variables below.

Variables (:data:`VARIABLES`): ``text`` (string, the caption), ``fields`` (map, the structured
answer; ``{}`` when the caption is not structured), ``has_fields`` (bool, the caption is a
structured answer), ``stream`` (string, the stream's name, or its index as a string when
unnamed), ``stream_index`` (int), ``model`` (string, "" if unknown), ``latency_ms`` (double,
-1 if unknown), ``prompt`` (string, "" if unknown). A missing key (``fields.person`` when the
answer has none), a wrong type or a result that is not a bool is an evaluation error: it
counts as no match, is counted per rule and logged once per rule. ``has(fields.person)``
tests for a key.

Each (rule, stream) is OFF, PENDING (matched, waiting for ``for-s`` and ``cooldown-s``) or ON.
OFF → PENDING on a matching caption (at t0); PENDING → ON at ``max(t0 + for_s, last ON edge +
cooldown_s)`` if no caption failed to match meanwhile (else back to OFF, no edge); ON → OFF on
the first caption that does not match or, with ``clear-after-s``, once that long has passed
since the last match whatever captions say. Timed edges come from one timer thread for all
rules (a heap of deadlines; :meth:`AlertRules.poll`). Each edge is an :class:`.AlertEvent`
published with :meth:`.CaptionBus.publish_alert`.
"""

from __future__ import annotations

import heapq
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .bus import CaptionBus, CaptionSubscriber
from .event import AlertEvent, CaptionEvent

__all__ = ["VARIABLES", "AlertRule", "AlertRuleError", "AlertRules", "caption_variables", "compile_condition",
           "parse_alert_flag", "parse_alert_table"]

log = logging.getLogger(__name__)

#: The variables a condition may read, and their CEL types.
VARIABLES = {"text": "string", "fields": "map", "has_fields": "bool", "stream": "string",
             "stream_index": "int", "model": "string", "latency_ms": "double", "prompt": "string"}
#: Functions of the evaluator's CEL standard library (macros such as has/all/exists are not
#: functions). Operators are named ``_op_``, ``@in``, ``!_``.
FUNCTIONS = frozenset({"size", "contains", "startsWith", "endsWith", "matches", "int", "uint", "double",
                       "string", "bytes", "timestamp", "duration", "dyn", "type", "getFullYear", "getMonth",
                       "getDayOfYear", "getDayOfMonth", "getDate", "getDayOfWeek", "getHours", "getMinutes",
                       "getSeconds", "getMilliseconds"})
MAX_EXPRESSION_CHARS = 4096       # a condition's length
MAX_SECONDS = 7 * 24 * 3600.0     # for-s, cooldown-s, clear-after-s
MAX_RULES = 64                    # rules per run
MAX_STREAMS_PER_RULE = 64
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_POSITION = re.compile(r"<input>:(\d+):(\d+):\s*(?:Syntax error:\s*)?(.*)")
_STRING = re.compile(r"""(?s)[rRbB]{0,2}(\"\"\"|'''|"|')(?:\\.|(?!\1).)*?(?:\1|$)""")
_BINDER = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_TABLE_KEYS = ("name", "when", "streams", "for-s", "cooldown-s", "clear-after-s")


class AlertRuleError(ValueError):
    """An alert rule that cannot be used; the message names the rule and says what to fix."""


def _caret(expression: str, line: int, column: int) -> str:
    """The expression's ``line`` (1-based) and a caret under ``column`` (1-based, characters)."""
    lines = expression.split("\n") or [""]
    text = lines[min(max(line, 1), len(lines)) - 1]
    pad = "".join(c if c == "\t" else " " for c in text[:max(column - 1, 0)])
    return f"    {text}\n    {pad}^"


def _position(expression: str, offset: int) -> tuple[int, int]:
    before = expression[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def _find_name(expression: str, name: str, call: bool) -> int:
    """Offset of ``name`` as a variable (not after a dot) or a function (before "("), outside strings."""
    masked = _STRING.sub(lambda m: " " * len(m.group(0)), expression)
    pattern = rf"\b{re.escape(name)}\s*\(" if call else rf"(?<![.\w]){re.escape(name)}\b"
    found = re.search(pattern, masked)
    return found.start() if found else 0


def compile_condition(rule: str, when: str) -> Any:
    """Compile condition ``when`` of rule ``rule`` (a :class:`cel.Program`).

    Raises:
        AlertRuleError: not a string, empty, too long, not CEL (line:column and a caret), or
            reading a variable or function that does not exist (its first position).
    """
    if not isinstance(when, str) or not when.strip():
        raise AlertRuleError(f"alert rule {rule!r}: its condition (when) must be a non-empty CEL expression, "
                             f"e.g. text.contains(\"smoke\")")
    if len(when) > MAX_EXPRESSION_CHARS:
        raise AlertRuleError(f"alert rule {rule!r}: its condition is {len(when)} characters long; "
                             f"keep it under {MAX_EXPRESSION_CHARS}")
    try:
        import cel  # here, so that the package imports without it
    except ImportError:
        raise AlertRuleError("alert rules need the common-expression-language package: "
                             "pip install common-expression-language") from None
    try:
        program = cel.compile(when)
    except Exception as exc:  # noqa: BLE001 - the binding raises ValueError with "<input>:LINE:COL: message"
        found = _POSITION.search(str(exc))
        line, column, why = (int(found[1]), int(found[2]), found[3]) if found else (1, 1, str(exc))
        why = re.sub(r"\s*expecting \{.*", "", why.split("\n")[0]).strip()
        raise AlertRuleError(f"alert rule {rule!r}: its condition is not valid CEL at {line}:{column}: {why}\n"
                             f"{_caret(when, line, column)}") from None
    binders = set(_BINDER.findall(when))
    for name in program.variables():
        if name not in VARIABLES and name not in binders:
            line, column = _position(when, _find_name(when, name, call=False))
            raise AlertRuleError(f"alert rule {rule!r}: its condition reads {name!r} at {line}:{column}, which is "
                                 f"not a variable; use one of {', '.join(VARIABLES)}\n{_caret(when, line, column)}")
    for name in program.functions():
        if name not in FUNCTIONS and not (name[0] in "_@!-" or name.endswith("_")):
            line, column = _position(when, _find_name(when, name, call=True))
            raise AlertRuleError(f"alert rule {rule!r}: its condition calls {name}() at {line}:{column}, which this "
                                 f"CEL evaluator does not have (use matches(\"(?i)…\") for case-insensitive "
                                 f"text)\n{_caret(when, line, column)}")
    return program


def _seconds(rule: str, key: str, value: Any, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AlertRuleError(f"alert rule {rule!r}: {key} must be a number of seconds, not {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > MAX_SECONDS or (positive and value == 0):
        low = "above 0" if positive else "at least 0"
        raise AlertRuleError(f"alert rule {rule!r}: {key} = {value:g} is out of range; give seconds {low} and "
                             f"at most {MAX_SECONDS:g} (7 days)")
    return value


@dataclass(frozen=True)
class AlertRule:
    """One alert rule; checked and its condition compiled when created.

    Attributes:
        name: ``[A-Za-z0-9_-]{1,64}`` (it goes into MQTT topics and Home Assistant object ids).
        when: the condition, CEL over :data:`VARIABLES`.
        streams: the streams it watches, by name or index (as strings); empty: every stream.
        for_s: how long the condition must hold before ON (debounce), seconds.
        cooldown_s: least time between two ON edges of one stream, seconds.
        clear_after_s: None: OFF on the first caption that does not match; else OFF once this
            long has passed since the last matching caption, seconds.

    Raises:
        AlertRuleError: any of these invalid (see :func:`compile_condition`).
    """

    name: str
    when: str
    streams: tuple[str, ...] = ()
    for_s: float = 0.0
    cooldown_s: float = 0.0
    clear_after_s: float | None = None
    program: Any = field(default=None, init=False, repr=False, compare=False)
    uses: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise AlertRuleError(f"alert rule name {self.name!r} is not usable: give 1 to 64 letters, digits, "
                                 f"'_' or '-' (it becomes part of MQTT topics)")
        if (not isinstance(self.streams, tuple) or len(self.streams) > MAX_STREAMS_PER_RULE
                or not all(isinstance(s, str) and 0 < len(s) <= 128 for s in self.streams)):
            raise AlertRuleError(f"alert rule {self.name!r}: streams must be up to {MAX_STREAMS_PER_RULE} stream "
                                 f"names or indices, e.g. [\"door\", 1]")
        object.__setattr__(self, "for_s", _seconds(self.name, "for-s", self.for_s))
        object.__setattr__(self, "cooldown_s", _seconds(self.name, "cooldown-s", self.cooldown_s))
        if self.clear_after_s is not None:
            object.__setattr__(self, "clear_after_s",
                               _seconds(self.name, "clear-after-s", self.clear_after_s, positive=True))
            if self.clear_after_s < self.for_s:
                raise AlertRuleError(f"alert rule {self.name!r}: clear-after-s {self.clear_after_s:g} is shorter than "
                                     f"for-s {self.for_s:g}, so the alert would clear before it could turn on: "
                                     f"make clear-after-s at least {self.for_s:g}")
        program = compile_condition(self.name, self.when)
        object.__setattr__(self, "program", program)
        object.__setattr__(self, "uses", frozenset(program.variables()) & VARIABLES.keys())

    def watches(self, stream: int, stream_name: str | None) -> bool:
        """True if the rule applies to stream ``stream`` (index) named ``stream_name``."""
        return not self.streams or str(stream) in self.streams or (stream_name is not None and
                                                                   stream_name in self.streams)

    def matches(self, variables: Mapping[str, Any]) -> bool:
        """Evaluate the condition over ``variables`` (:func:`caption_variables`).

        Raises:
            ValueError: it could not be evaluated (a missing key, a wrong type, not a bool).
        """
        try:
            result = self.program.execute({k: variables[k] for k in self.uses})
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - also the binding's PanicException (a BaseException)
            what = f"no key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise ValueError(what) from None
        if not isinstance(result, bool):
            raise ValueError(f"it gave {type(result).__name__} {result!r}, not true or false")
        return result


def caption_variables(event: CaptionEvent) -> dict[str, Any]:
    """The variables a condition sees for ``event`` (see :data:`VARIABLES`)."""
    fields = event.fields
    return {"text": event.text, "fields": {} if fields is None else dict(fields), "has_fields": fields is not None,
            "stream": event.stream_name or str(event.stream), "stream_index": event.stream,
            "model": event.model or "", "latency_ms": -1.0 if event.latency_ms is None else float(event.latency_ms),
            "prompt": event.prompt or ""}


def parse_alert_table(table: dict, where: str) -> AlertRule:
    """An ``[[alert]]`` table of the run file (keys ``name``, ``when``, ``streams``, ``for-s``,
    ``cooldown-s``, ``clear-after-s``) as a rule; ``where`` (e.g. ``"run.toml, [[alert]] 2"``)
    prefixes every error.

    Raises:
        AlertRuleError: an unknown or missing key, a wrong type or range, a bad condition.
    """
    if not isinstance(table, dict):
        raise AlertRuleError(f"{where}: an [[alert]] must be a table, not {type(table).__name__}")
    unknown = [k for k in table if k not in _TABLE_KEYS]
    if unknown:
        raise AlertRuleError(f"{where}: unknown key {unknown[0]!r} in [[alert]]; the keys are {', '.join(_TABLE_KEYS)}")
    for key in ("name", "when"):
        if key not in table:
            raise AlertRuleError(f"{where}: [[alert]] needs {key!r} (name = \"smoke\", when = 'text.contains(\"smoke\")')")
    streams = table.get("streams", [])
    if not isinstance(streams, list) or not all(
            isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool) and s >= 0) for s in streams):
        raise AlertRuleError(f"{where}: [[alert]] streams must be a list of stream names or indices, "
                             f"e.g. streams = [\"door\", 1]")
    try:
        return AlertRule(table["name"], table["when"], tuple(str(s) for s in streams), table.get("for-s", 0.0),
                         table.get("cooldown-s", 0.0), table.get("clear-after-s"))
    except AlertRuleError as exc:
        raise AlertRuleError(f"{where}: {exc}") from None


def parse_alert_flag(value: str) -> AlertRule:
    """``--alert NAME=EXPR`` as a rule (every stream, no debounce, cooldown or clear-after).

    Raises:
        AlertRuleError: no ``=``, a bad name or a bad condition.
    """
    name, sep, when = value.partition("=") if isinstance(value, str) else ("", "", "")
    if not sep or not _NAME.fullmatch(name.strip()):
        raise AlertRuleError(f"--alert {value!r}: write NAME=EXPR, e.g. --alert 'smoke=text.contains(\"smoke\")' "
                             f"(NAME: 1 to 64 letters, digits, '_' or '-')")
    return AlertRule(name.strip(), when)


@dataclass
class _Track:
    """State of one rule on one stream (under :attr:`AlertRules._lock`)."""

    rule: int
    stream: int
    stream_name: str | None
    state: str = "OFF"               # OFF, PENDING, ON
    since: float | None = None       # when the state was entered
    pending_since: float | None = None
    last_match: float | None = None
    last_on: float | None = None     # last ON edge
    due: float | None = None         # the timer's next deadline for this track
    fires: int = 0
    errors: int = 0


class AlertRules(CaptionSubscriber):
    """Evaluates ``rules`` on every caption of ``bus`` (it subscribes itself to every stream) and
    publishes their edges on it.

    Args:
        rules: the rules (unique names, at most ``max_rules``).
        bus: the caption bus to subscribe to and publish on.
        clock: seconds since the epoch (``time.time``; tests pass a fake and call :meth:`poll`).
        timer: start the timer thread (tests with a fake clock pass False).

    Threads: :meth:`add` is called from every stream's frame loop and the timer thread calls
    :meth:`poll`; both evaluate and change state under one lock (µs) and publish under it, so
    edges of a (rule, stream) reach subscribers in order.

    Raises:
        AlertRuleError: duplicate names or too many rules.
    """

    def __init__(self, rules, bus: CaptionBus, clock: Callable[[], float] = time.time, *, timer: bool = True,
                 max_rules: int = MAX_RULES):
        self.rules: tuple[AlertRule, ...] = tuple(rules)
        if len(self.rules) > max_rules:
            raise AlertRuleError(f"{len(self.rules)} alert rules; at most {max_rules} are allowed")
        names = [r.name for r in self.rules]
        for name in names:
            if names.count(name) > 1:
                raise AlertRuleError(f"two alert rules are named {name!r}; give each a different name")
        self._bus, self._clock = bus, clock
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._tracks: dict[tuple[int, int], _Track] = {}
        self._heap: list[tuple[float, int, tuple[int, int]]] = []
        self._seq = 0
        self._rule_errors = [0] * len(self.rules)
        self._closed = False
        #: ON edges published, all rules. Evaluations that failed (counted as no match).
        self.fired = 0
        self.evaluation_errors = 0
        self._thread = None
        if timer:
            self._thread = threading.Thread(target=self._run_timer, name="alert-rules", daemon=True)
            self._thread.start()
        bus.subscribe(self)

    # -- captions ---------------------------------------------------------------------------
    def add(self, event: CaptionEvent) -> None:
        """Evaluate every rule watching ``event``'s stream and move their state machines. Never blocks."""
        variables = caption_variables(event)
        with self._lock:
            if self._closed:
                return
            now = self._clock()
            self._advance(now)
            for i, rule in enumerate(self.rules):
                if not rule.watches(event.stream, event.stream_name):
                    continue
                track = self._track(i, event.stream, event.stream_name)
                try:
                    match = rule.matches(variables)
                except ValueError as exc:
                    match = False
                    track.errors += 1
                    self.evaluation_errors += 1
                    self._rule_errors[i] += 1
                    if self._rule_errors[i] == 1:
                        log.warning("alert rule %r: its condition could not be evaluated (%s); counted as no match "
                                    "(logged once per rule)", rule.name, exc)
                self._step(track, rule, match, now, event)

    def _track(self, i: int, stream: int, stream_name: str | None) -> _Track:
        track = self._tracks.get((i, stream))
        if track is None:
            track = self._tracks[(i, stream)] = _Track(i, stream, stream_name)
        elif stream_name:
            track.stream_name = stream_name
        return track

    def _step(self, track: _Track, rule: AlertRule, match: bool, now: float, event: CaptionEvent) -> None:
        if match:
            track.last_match = now
        if track.state == "OFF" and match:
            track.state, track.since, track.pending_since = "PENDING", now, now
            due = now + rule.for_s
            if track.last_on is not None:
                due = max(due, track.last_on + rule.cooldown_s)
            if due <= now:
                self._edge(track, rule, "ON", now, "matched", event)
            else:
                self._schedule(track, due)
        elif track.state == "PENDING" and not match:
            track.state, track.since, track.pending_since = "OFF", now, None
            self._schedule(track, None)
        elif track.state == "ON":
            if rule.clear_after_s is not None:
                if match:
                    self._schedule(track, now + rule.clear_after_s)
            elif not match:
                self._edge(track, rule, "OFF", now, "the condition no longer holds", event)

    def _edge(self, track: _Track, rule: AlertRule, state: str, at: float, reason: str,
              event: CaptionEvent | None) -> None:
        """(under the lock) Enter ``state`` at ``at`` and publish the edge."""
        track.state, track.since = state, at
        self._schedule(track, None)
        if state == "ON":
            track.last_on, track.pending_since = at, None
            track.fires += 1
            self.fired += 1
            if rule.clear_after_s is not None:   # never before this ON (clear-after-s < for-s)
                self._schedule(track, max((track.last_match or at) + rule.clear_after_s, at))
        self._bus.publish_alert(AlertEvent(rule.name, state, track.stream, track.stream_name, at, reason, event,
                                           rule.when))

    # -- timer ------------------------------------------------------------------------------
    def _schedule(self, track: _Track, due: float | None) -> None:
        """(under the lock) Set ``track``'s deadline (None: none); a stale heap entry is skipped
        when popped, and the heap is rebuilt from the tracks when stale entries pile up."""
        track.due = due
        if due is None:
            return
        self._seq += 1
        first = not self._heap or due < self._heap[0][0]
        if len(self._heap) > 4 * len(self._tracks) + 64:
            self._heap = [(t.due, n, key) for n, (key, t) in enumerate(self._tracks.items()) if t.due is not None]
            heapq.heapify(self._heap)
        else:
            heapq.heappush(self._heap, (due, self._seq, (track.rule, track.stream)))
        if first:
            self._wake.notify()

    def _advance(self, now: float) -> None:
        """(under the lock) Make every edge due by ``now``, in deadline order."""
        while self._heap and self._heap[0][0] <= now:
            due, _, key = heapq.heappop(self._heap)
            track = self._tracks[key]
            if track.due != due:
                continue   # stale: rescheduled or cancelled
            rule = self.rules[track.rule]
            if track.state == "PENDING":
                held = due - track.pending_since
                cooled = track.last_on is not None and due == track.last_on + rule.cooldown_s and held > rule.for_s
                reason = f"held for {held:g} s" + (f" (after the {rule.cooldown_s:g} s cooldown)" if cooled else "")
                self._edge(track, rule, "ON", due, reason, None)
            elif track.state == "ON":
                self._edge(track, rule, "OFF", due, f"cleared after {rule.clear_after_s:g} s without a match", None)
            else:
                track.due = None

    def poll(self, now: float | None = None) -> None:
        """Make the timed edges due by ``now`` (default: the clock). The timer thread calls it;
        tests with a fake clock call it directly."""
        with self._lock:
            if not self._closed:
                self._advance(self._clock() if now is None else now)

    def _run_timer(self) -> None:
        with self._wake:
            while not self._closed:
                now = self._clock()
                self._advance(now)
                wait = 60.0 if not self._heap else min(max(self._heap[0][0] - now, 0.0), 60.0)
                if wait > 0:
                    self._wake.wait(wait)

    def close(self, end_time_s: float | None = None) -> None:
        """Stop the timer thread and stop evaluating (no edges are published at close). Idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._bus.unsubscribe(self)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- state ------------------------------------------------------------------------------
    def states(self) -> dict:
        """A JSON-ready snapshot: ``{"fired", "evaluation_errors", "rules": {NAME: {"when",
        "errors", "streams": {STREAM: {"state", "since", "last_match", "fires", "errors"}}}}}``
        (STREAM: the stream's name or index; times: seconds since the epoch or null; streams
        appear once a caption of theirs was evaluated)."""
        with self._lock:
            rules = {r.name: {"when": r.when, "errors": self._rule_errors[i], "streams": {}}
                     for i, r in enumerate(self.rules)}
            for (i, stream), t in sorted(self._tracks.items()):
                rules[self.rules[i].name]["streams"][t.stream_name or str(stream)] = {
                    "state": t.state, "since": t.since, "last_match": t.last_match, "fires": t.fires,
                    "errors": t.errors}
            return {"fired": self.fired, "evaluation_errors": self.evaluation_errors, "rules": rules}
