"""Alert rules on real footage, end to end: `vision-host run` paced at the clip's frame rate, the
Ollama stand-in answering structured JSON by a script, the edges received by a webhook.

The expected edges are not taken from the alert module: the test replays the documented state
machine (:mod:`vision_host.captions.alerts`'s docstring) over the captions the webhook actually
received (their ``time`` and ``fields``), then compares the edges in order, their states and
their times. A caption closer than :data:`TOLERANCE_S` to a computed deadline is a genuine tie:
the replay follows both orders and either is accepted.

Rules (one per behaviour, all in one run; each reads its own key of the structured answer):

* ``plain``: no options: ON on the first matching caption, OFF on the first that does not match.
* ``debounce``: ``for-s``: a match shorter than it never fires; one that holds fires at t0 + for-s.
* ``cooldown``: ``cooldown-s``: a match within it of the last ON fires when it ends, never sooner,
  and not at all if the match ends first; a match after it fires at once.
* ``clear``: ``clear-after-s``: OFF that long after the last match, whether non-matching captions
  keep coming or no caption comes at all (the stand-in holds one reply back).

A second run serves the viewer (``-o mjpeg``): its ``/api/state`` shows a rule ON while the
answers match and OFF after, and the stats count the edges the webhook received.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from datetime import datetime

import pytest
import requests

from conftest import SAMPLE_CLIP
from ollama_standin import OllamaStandin
from run_process import RunProcess, free_port, wait_for

pytestmark = pytest.mark.slow

LATENCY_S = 0.15        # the stand-in's delay per reply: captions come every ~0.2 s (a frame is 33.5 ms)
FOR_S = 1.2             # debounce
COOLDOWN_S = 3.0
CLEAR_AFTER_S = 0.7
GAP_S = 1.6             # one reply held back this long: no caption at all meanwhile
TOLERANCE_S = 0.06      # timed edges: ± this around the replayed deadline; also the tie window

# The script in time, not in captions (so it holds for any caption spacing up to ~0.35 s): each
# rule's key is true while the reply is made within one of its intervals, in seconds after the
# first reply. The first reply made after GAP_AFTER_S is held back GAP_S (made after the wait).
SCRIPT = {
    "plain": [(0.4, 1.0), (4.0, 4.6)],
    "debounce": [(0.6, 1.1),              # 0.5 s: never fires
                 (2.0, 4.0)],             # fires 1.2 s after its first caption
    "cooldown": [(0.4, 0.8),              # ON at once
                 (1.4, 4.3),              # within the cooldown: fires when it ends (~3.4 s)
                 (4.8, 5.2),              # within the cooldown of that ON, ends first: never fires
                 (7.2, 7.6)],             # after it: fires at once
    "clear": [(5.0, 5.6),                 # OFF 0.7 s after the last match, non-matching captions coming
              (7.9, 8.3)],                # OFF 0.7 s after the last match, during the gap
}
GAP_AFTER_S = 8.3
RULES = {"plain": {}, "debounce": {"for-s": FOR_S}, "cooldown": {"cooldown-s": COOLDOWN_S},
         "clear": {"clear-after-s": CLEAR_AFTER_S}}


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1: :attr:`events` holds each POSTed JSON body, in arrival order."""

    def __init__(self):
        self.events: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.events.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class ScriptedReplies:
    """A stand-in ``reply``: ``{RULE: bool}``, true while the reply is made within one of the
    rule's intervals of ``script`` (seconds after the first reply); the first reply made after
    ``gap_after_s`` waits ``gap_s`` first. :attr:`gap_index`: that reply's index, once made."""

    def __init__(self, script: dict[str, list[tuple[float, float]]], gap_after_s: float, gap_s: float):
        self.script, self.gap_after_s, self.gap_s = script, gap_after_s, gap_s
        self._lock = threading.Lock()
        self._start: float | None = None
        self._count = 0
        self.gap_index: int | None = None

    def __call__(self, prompt, jpeg) -> str:
        with self._lock:
            now = time.monotonic()
            self._start = now if self._start is None else self._start
            index, self._count = self._count, self._count + 1
            gap = self.gap_index is None and now - self._start >= self.gap_after_s
            if gap:
                self.gap_index = index
        if gap:
            time.sleep(self.gap_s)
        at = time.monotonic() - self._start
        return json.dumps({name: any(a <= at < b for a, b in spans) for name, spans in self.script.items()})


def seconds(iso: str) -> float:
    """ISO 8601 UTC with milliseconds (``…T15:01:22.123Z``) as seconds since the epoch."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- the documented state machine, replayed --------------------------------------------------------
def replay(captions: list[tuple[float, int, bool]], for_s: float = 0.0, cooldown_s: float = 0.0,
           clear_after_s: float | None = None, tie_s: float = TOLERANCE_S) -> list[dict]:
    """Every edge sequence the documented machine can give for ``captions`` ((time s, frame index,
    matches), in order): one, or more when a caption lies within ``tie_s`` of a deadline (both
    orders are followed). Each result: ``{"edges": [(state, time, frame index or None for a timed
    edge)], "suppressed": matches that never fired, "state", "due"}`` (the last two at the end)."""
    start = {"state": "OFF", "t0": None, "last_match": None, "last_on": None, "due": None, "edges": (),
             "suppressed": 0}

    def fire(w: dict) -> dict:
        """The timer makes ``w``'s deadline due."""
        w, due = dict(w), w["due"]
        if w["state"] == "PENDING":
            w.update(state="ON", last_on=due, edges=w["edges"] + (("ON", due, None),), due=None)
            if clear_after_s is not None:    # never before the ON
                w["due"] = max((w["last_match"] if w["last_match"] is not None else due) + clear_after_s, due)
        else:   # ON with clear-after
            w.update(state="OFF", edges=w["edges"] + (("OFF", due, None),), due=None)
        return w

    def caption(w: dict, t: float, frame: int, match: bool) -> dict:
        w = dict(w)
        if match:
            w["last_match"] = t
        if w["state"] == "OFF" and match:
            due = t + for_s
            if w["last_on"] is not None:
                due = max(due, w["last_on"] + cooldown_s)
            if due <= t:
                w.update(state="ON", last_on=t, edges=w["edges"] + (("ON", t, frame),), due=None)
                if clear_after_s is not None:
                    w["due"] = t + clear_after_s
            else:
                w.update(state="PENDING", t0=t, due=due)
        elif w["state"] == "PENDING" and not match:
            w.update(state="OFF", due=None, suppressed=w["suppressed"] + 1)
        elif w["state"] == "ON":
            if clear_after_s is not None:
                if match:
                    w["due"] = t + clear_after_s
            elif not match:
                w.update(state="OFF", edges=w["edges"] + (("OFF", t, frame),))
        return w

    def key(w: dict) -> tuple:
        return tuple(sorted(w.items()))

    worlds = [start]
    for t, frame, match in captions:
        ready, settled = list(worlds), []
        while ready:                         # deadlines before the caption (or tied with it) first
            w = ready.pop()
            if w["due"] is not None and w["due"] < t - tie_s:
                ready.append(fire(w))
            elif w["due"] is not None and w["due"] <= t + tie_s:
                settled.append(w)            # the caption first …
                ready.append(fire(w))        # … or the deadline first
            else:
                settled.append(w)
        worlds = list({key(w): w for w in (caption(w, t, frame, match) for w in settled)}.values())
        assert len(worlds) <= 64, "too many ties to follow"
    return worlds


def matches(got: list[dict], edges: tuple, tolerance_s: float = TOLERANCE_S) -> bool:
    """Whether the received edges ``got`` (webhook JSON) are replayed ``edges``: same states in
    order; a caption-caused edge names the same caption and carries its time; a timed edge
    carries no caption and comes within ``tolerance_s`` of its deadline."""
    if [e["state"] for e in got] != [s for s, _, _ in edges]:
        return False
    for e, (_, t, frame) in zip(got, edges):
        caused = e["caption"]["frame_index"] if e["caption"] else None
        if caused != frame or abs(seconds(e["time"]) - t) > tolerance_s:
            return False
    return True


def describe(got: list[dict], worlds: list[dict], captions: list[tuple[float, int, bool]], t_start: float) -> str:
    """The received and the replayed edges side by side, times from the first caption, with the
    frame each edge came on (timed edges: the frame of the last caption before them)."""
    def frame_at(t: float) -> str:
        before = [f for tc, f, _ in captions if tc <= t + 1e-6]
        return f"after frame {before[-1]}" if before else "before any caption"

    lines = ["received:"]
    for e in got:
        t = seconds(e["time"])
        where = f"frame {e['caption']['frame_index']}" if e["caption"] else f"timer, {frame_at(t)}"
        lines.append(f"  {e['state']:3} at {t - t_start:7.3f} s ({where}; {e['reason']})")
    for n, w in enumerate(worlds):
        lines.append(f"replayed ({n + 1} of {len(worlds)}):")
        lines += [f"  {s:3} at {t - t_start:7.3f} s ({f'frame {f}' if f is not None else f'timer, {frame_at(t)}'})"
                  for s, t, f in w["edges"]]
    lines.append("captions: " + " ".join(f"{f}@{t - t_start:.3f}{'+' if m else '-'}" for t, f, m in captions))
    return "\n".join(lines)


def run_file(path, receiver: Receiver, standin: OllamaStandin, stats, rules: dict, output: str) -> str:
    text = f"""
[main]
source = "{SAMPLE_CLIP}"
{output}
stats = "{stats}"

[processing]
pipeline = ["ollama"]

[config]
ollama-url = "{standin.url}"
ollama-interval-ms = "0"
ollama-format = "json"

[[webhook]]
url = "{receiver.url}"

[events]
outbox = "{path.parent / 'outbox.sqlite3'}"
"""
    for name, options in rules.items():
        text += f'\n[[alert]]\nname = "{name}"\nwhen = "fields.{name} == true"\n'
        text += "".join(f"{k} = {v}\n" for k, v in options.items())
    path.write_text(text)
    return str(path)


def test_alert_edges_follow_the_documented_machine_at_the_expected_times(tmp_path):
    replies = ScriptedReplies(SCRIPT, GAP_AFTER_S, GAP_S)
    standin = OllamaStandin(latency_s=LATENCY_S, reply=replies)
    receiver = Receiver()
    stats = tmp_path / "stats.json"
    path = run_file(tmp_path / "alerts.toml", receiver, standin, stats, RULES,
                    f'output = "file"\ndestination = "{tmp_path / "out.mp4"}"')
    run = RunProcess(["-f", path, "--codec", "mp4v", "--no-history"], 0)
    try:
        # the script played, and a few captions after the gap (all false) have arrived
        wait_for(lambda: replies.gap_index is not None and
                 sum(e["type"] == "caption" for e in receiver.events) >= replies.gap_index + 4 or
                 run.proc.poll() is not None, 60, "the scripted captions")
        run.stop()
        assert run.proc.returncode == 0, run.stderr
        events = list(receiver.events)
    finally:
        run.stop()
        receiver.shutdown()
        standin.stop()

    caption_events = [e for e in events if e["type"] == "caption"]
    assert replies.gap_index is not None and len(caption_events) >= replies.gap_index + 4, run.stderr
    assert all(c["fields_error"] is None for c in caption_events), caption_events
    t_start = seconds(caption_events[0]["time"])
    result = json.loads(stats.read_text())
    alerts = result["events"]["alerts"]
    edges = [e for e in events if e["type"] == "alert"]
    for name, options in RULES.items():
        captions = [(seconds(c["time"]), c["frame_index"], c["fields"][name] is True) for c in caption_events]
        got = [e for e in edges if e["name"] == name]
        worlds = replay(captions, options.get("for-s", 0.0), options.get("cooldown-s", 0.0),
                        options.get("clear-after-s"))
        fitting = [w for w in worlds if matches(got, w["edges"])]
        assert fitting, f"rule {name}: the edges differ from the replay\n" + describe(got, worlds, captions, t_start)
        w = fitting[0]
        # the script exercised what the rule is here for (the shape of its edges)
        kinds = [(s, "caption" if f is not None else "timer") for s, _, f in w["edges"]]
        expected = {"plain": [("ON", "caption"), ("OFF", "caption")] * 2,
                    "debounce": [("ON", "timer"), ("OFF", "caption")],
                    "cooldown": [("ON", "caption"), ("OFF", "caption"), ("ON", "timer"), ("OFF", "caption"),
                                 ("ON", "caption"), ("OFF", "caption")],
                    "clear": [("ON", "caption"), ("OFF", "timer")] * 2}[name]
        assert kinds == expected, f"rule {name}: the captions did not exercise it\n" + \
            describe(got, [w], captions, t_start)
        assert w["state"] == "OFF" and w["due"] is None, f"rule {name}: still {w['state']} at the end"
        if name in ("debounce", "cooldown"):
            assert w["suppressed"] >= 1, f"rule {name}: no short match was suppressed\n" + \
                describe(got, [w], captions, t_start)
        if name == "cooldown":
            on = [t for s, t, _ in w["edges"] if s == "ON"]
            assert abs(on[1] - (on[0] + COOLDOWN_S)) < 1e-6 and on[2] - on[1] > COOLDOWN_S
        if name == "clear":
            off1, off2 = (t for s, t, _ in w["edges"] if s == "OFF")
            # non-matching captions kept coming before the first OFF; none came before the second
            assert any(off1 - CLEAR_AFTER_S < t < off1 for t, _, m in captions if not m)
            assert not any(off2 - CLEAR_AFTER_S < t < off2 + TOLERANCE_S for t, _, _ in captions)
        track = alerts["rules"][name]["streams"]["0"]
        assert track["fires"] == sum(e["state"] == "ON" for e in got) and track["state"] == "OFF"
    assert alerts["fired"] == sum(e["state"] == "ON" for e in edges) == 2 + 1 + 3 + 2
    assert alerts["evaluation_errors"] == 0
    assert result["captions"]["completed"] == len(caption_events)
    webhook = next(s for s in result["events"]["sinks"] if s["kind"] == "webhook")
    assert webhook["delivered"] == len(events) and webhook["dropped"] == 0


def test_the_viewer_shows_a_rule_on_while_it_holds_and_off_after(tmp_path):
    holding = threading.Event()
    standin = OllamaStandin(latency_s=LATENCY_S,
                            reply=lambda prompt, jpeg: json.dumps({"person": holding.is_set()}))
    receiver = Receiver()
    stats = tmp_path / "stats.json"
    port = free_port()
    path = run_file(tmp_path / "viewer.toml", receiver, standin, stats, {"person": {"for-s": 0.5}},
                    f'output = "mjpeg"\ndestination = "127.0.0.1:{port}"')
    run = RunProcess(["-f", path, "--no-history"], port)

    def state() -> tuple[dict, int]:
        stream = requests.get(run.base + "/api/state", timeout=5).json()["streams"][0]
        (alert,) = stream["alerts"]
        return alert, stream["captions"]["completed"]

    try:
        run.wait_until_serving()
        wait_for(lambda: state()[1] >= 2, 20, "two captions")
        alert, _ = state()
        assert alert["name"] == "person" and alert["state"] == "OFF" and alert["fires"] == 0
        holding.set()
        alert = wait_for(lambda: (a := state()[0])["state"] == "ON" and a, 10, "the rule ON")
        on_since = seconds(alert["since"])
        assert alert["fires"] == 1 and alert["errors"] == 0
        # it stays ON while matching captions keep coming
        seen = state()[1]
        wait_for(lambda: state()[1] >= seen + 3, 10, "three more captions")
        alert, _ = state()
        assert alert["state"] == "ON" and alert["fires"] == 1 and seconds(alert["last_match"]) > on_since
        holding.clear()
        alert = wait_for(lambda: (a := state()[0])["state"] == "OFF" and a, 10, "the rule OFF")
        assert seconds(alert["since"]) > seconds(alert["last_match"]) and alert["fires"] == 1
        seen = state()[1]
        wait_for(lambda: state()[1] >= seen + 3, 10, "three more captions")
        assert state()[0]["state"] == "OFF"
        run.stop()
        assert run.proc.returncode == 0, run.stderr
    finally:
        run.stop()
        receiver.shutdown()
        standin.stop()
    edges = [e for e in receiver.events if e["type"] == "alert"]
    assert [e["state"] for e in edges] == ["ON", "OFF"]
    assert abs(seconds(edges[0]["time"]) - on_since) < 0.002 and edges[0]["caption"] is None
    first_match = next(seconds(c["time"]) for c in receiver.events if c["type"] == "caption" and c["fields"]["person"])
    assert abs(seconds(edges[0]["time"]) - (first_match + 0.5)) <= TOLERANCE_S
    # OFF came with the first caption that did not match after the ON
    captions = [c for c in receiver.events if c["type"] == "caption" and seconds(c["time"]) > on_since]
    first_miss = next(c for c in captions if not c["fields"]["person"])
    assert edges[1]["caption"]["frame_index"] == first_miss["frame_index"], edges[1]
    assert abs(seconds(edges[1]["time"]) - seconds(first_miss["time"])) <= TOLERANCE_S
    result = json.loads(stats.read_text())
    assert result["events"]["alerts"]["fired"] == 1
    assert result["events"]["alerts"]["rules"]["person"]["streams"]["0"]["fires"] == 1
