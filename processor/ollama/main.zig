//! ollama: live captions from a vision-language server (Ollama with e.g. llava by default;
//! OpenAI-compatible servers and Cloudflare Workers AI too, see `ollama-api`), drawn on
//! every frame, without ever blocking the video.
//!
//! Per frame, `process` makes at most these host calls: `time.now`; `fetch.poll` while a
//! request is in flight; `fetch.post-frame` when it is time to start one; `overlay.caption`
//! (none with ollama-overlay=false); with ollama-trigger=change, while no request is in
//! flight and the cooldown is over, the change check: two `cv.resize` (bilinear to 128×72,
//! area to a 32×18 thumbnail), `mat.mattype`, `cv.cvt-color` to grey, the thumbnail's 576
//! pixels read with `mat.get-uchar-at` (accessors served inside the sandbox) and the three
//! mats dropped. With ollama-region set, also `mat.cols` and `mat.rows` (served inside the
//! sandbox) and, when the change check, a request or a kept copy needs it, one `mat.region`
//! (a view of the frame's pixels, no copy), dropped before `process` returns; with
//! ollama-show-region=true, two `cv.rectangle`. With ollama-frames > 1, `fetch.post-frames`
//! instead of `fetch.post-frame`, and `fetch.keep-frame` (after the request, unless requests
//! have stopped) at most once every ollama-frames-span-ms / (2·(ollama-frames−1)) ms.
//! (Plus, only on events: `fetch.cancel` for a timed-out/abandoned request,
//! `processor-store.set` for a finished caption, for the settings in force after the config
//! was read, for a request counter when a request starts and for frames-unchanged at most
//! once a second, and a log line when the state changes.)
//!
//! Triggers (`ollama-trigger`): `interval` starts a request every ollama-interval-ms.
//! `change` starts one when the scene has changed by more than ollama-change-threshold since
//! the frame sent with the last request: both frames (their ollama-region only, when set)
//! are shrunk to a 32×18 grey thumbnail
//! and the score is the mean absolute difference of their pixels / 255 (0 = identical,
//! 1 = black turned white). Never sooner than ollama-min-interval-ms after the last request
//! start (the cooldown), and at the latest every ollama-interval-ms (the heartbeat; 0 =
//! none). The first request starts on the first frame. A request that fails (no caption)
//! forgets the reference, so the next one starts as soon as the cooldown and the backoff
//! allow. In both modes a request only starts when none is in flight, and the
//! connection-failure backoff applies. Counters in the processor store under "ollama-stats" (apart
//! from the settings in force under "ollama"), as
//! decimal strings, written when they change: requests-interval, requests-change,
//! requests-heartbeat (requests started, by what started them), frames-unchanged (frames
//! the change check found unchanged: each a request not made; written at most once a
//! second and whenever a request starts).
//!
//! Wire protocols (`ollama-api`; each is one entry of `protocols` in protocols.zig). The host fills in
//! the image: the body is sent as a template whose first `%IMAGE%` becomes the base64 JPEG
//! (`%IMAGE_BYTES%`: its bytes as a JSON array of numbers). The image comes first in every
//! body, so that a prompt (or model name) containing the text %IMAGE% cannot be mistaken
//! for it. Each reply is streamed except Workers AI's; its pieces cut anywhere.
//! With ollama-frames > 1 (frames.zig) the host sends up to that many recent frames: as
//! separate images (ollama-frames-layout=images), the body's image item wrapped in
//! `%EACH%`…`%END%`, which the host writes once per frame, oldest first (generate:
//! "images":[%EACH%"%IMAGE%"%END%]; chat likewise; openai: one image_url part per frame
//! before the text part); or as one grid image (=grid; always with workers-ai, which takes
//! one image). The prompt then starts with a sentence saying what the images are ("The
//! images are consecutive moments of one video, oldest first, over the last 2 s. ").
//!   generate  (the default; Ollama's API) POST {url}/api/generate with
//!           {"images":["%IMAGE%"],"model":M,"prompt":P,"stream":true,"options":{"num_predict":N}}
//!           (+ "format":"json" or "format":{schema} with ollama-format);
//!           the reply is NDJSON, one object per line:
//!               {"model":"llava","created_at":"…","response":" A","done":false}
//!               …
//!               {"model":"llava","created_at":"…","response":"","done":true,"done_reason":"stop",…}
//!   chat    POST {url}/api/chat with {"messages":[{"role":"user","images":["%IMAGE%"],
//!           "content":P}],…}; NDJSON lines carry `message.content` pieces and `done`.
//!   openai  POST {url}/v1/chat/completions ({url}/chat/completions when the URL ends in
//!           /v1) with the image as a content part `{"type":"image_url","image_url":
//!           {"url":"data:image/jpeg;base64,…"}}` and "max_tokens":N (+ with ollama-format
//!           "response_format":{"type":"json_object"} or {"type":"json_schema","json_schema":
//!           {"name":"caption","schema":{schema}}}); the reply is
//!           server-sent events, `data: {chunk}` lines whose `choices[0].delta.content`
//!           are the pieces, complete at a `finish_reason` or `data: [DONE]`; errors are
//!           {"error":{"message":…}}.
//!           (vLLM, llama.cpp's server, LM Studio and Ollama's own /v1 speak it.)
//!   workers-ai  Cloudflare Workers AI: POST {url}/{model} (url = https://api.cloudflare.com/
//!           client/v4/accounts/ID/ai/run, model = @cf/llava-hf/llava-1.5-7b-hf) with
//!           {"image":[JPEG bytes as numbers],"prompt":P,"max_tokens":N} (no format: its LLaVA
//!           API has none; ollama-format is refused there, logged once); one JSON reply
//!           {"result":{"description":…},"success":true}, errors as
//!           {"success":false,"errors":[{"code":…,"message":…}]}. Needs an API key:
//!           ollama-api-key-env names the variable, the host sends it (Authorization: Bearer).
//!
//! The pieces are appended to the caption as they arrive (shown at once); when the reply
//! says it is complete ("done":true, a `finish_reason`, `[DONE]`, the Workers AI reply) the
//! caption is complete: trimmed, kept on screen until the next one replaces it, stored in
//! the datastore as captions/caption (wasmVision's `captions` processor reads it there;
//! captions/model is the model that wrote it) and logged. A line {"error":"…"} reports a
//! failure. HTTP 404 means the model is not there (for Ollama: not pulled); other non-200
//! replies carry {"error":"…"} (or {"error":{"message":"…"}}, or Cloudflare's "errors").
//!
//! The settings in force (defaults filled in, invalid values replaced by the defaults) are
//! stored in the processor store under processor "ollama" each time the config is read, one
//! key per setting, named as the config key without "ollama-": url, api, server-name, model,
//! prompt, interval-ms, paused, overlay, trigger, change-threshold, min-interval-ms, format,
//! region, show-region, frames, frames-span-ms, frames-layout (e.g. ollama/model = "llava";
//! the viewer shows them; ollama/format is "", "json" or the schema's text: the host reads
//! it to know whether to parse captions as JSON; ollama/region is the value as given, or ""
//! for the whole frame; ollama/frames-layout is grid with workers-ai).
//!
//! Config (read on the first frame, and again on the next frame whenever the stream's config
//! changes while running, e.g. from the viewer: vision-host:platform/config-watch; an invalid
//! value is reported once with logging.error and replaced by the default):
//!   ollama-url               http://localhost:11434  (http(s) base URL; a trailing / is dropped)
//!   ollama-api               generate  generate | chat | openai | workers-ai (the wire protocol, above)
//!   ollama-model             llava
//!   ollama-prompt            Describe what is in this picture in highly complimentary terms using 6 words or less.
//!   ollama-interval-ms       3000   minimum time between request starts (0–86400000);
//!                                   a request starts only when none is in flight.
//!                                   With ollama-trigger=change: the heartbeat, the longest
//!                                   time between request starts (0 = no heartbeat)
//!   ollama-trigger           interval  interval | change (above: when a request starts)
//!   ollama-change-threshold  0.01   0–1: the change score (mean grey difference / 255 of
//!                                   32×18 thumbnails) a frame must exceed (trigger=change)
//!   ollama-min-interval-ms   1000   cooldown with trigger=change: no request starts sooner
//!                                   after the last start (0–86400000)
//!   ollama-max-tokens        40     options.num_predict (1–4096)
//!   ollama-image-max-side    672    px, longer side of the JPEG sent (0 = full size, or 32–16384;
//!                                   with ollama-frames > 1: of each image, or of the grid)
//!   ollama-jpeg-quality      80     1–100
//!   ollama-timeout-ms        60000  a request running longer is cancelled (1000–3600000)
//!   ollama-caption-placement bottom top | bottom
//!   ollama-font-scale        0.6    0.1–10 (1.0 ≈ 22 px tall)
//!   ollama-max-lines         3      1–50 (the last lines are kept)
//!   ollama-paused            false  true: start no new request (one in flight still finishes);
//!                                   the last caption stays on screen
//!   ollama-overlay           true   false: draw nothing (no overlay call); captions are still
//!                                   requested, stored and logged (wasmVision's layout, where
//!                                   the `captions` processor draws captions/caption)
//!   ollama-format            (empty) empty: plain text | json: a JSON object | a JSON Schema (a
//!                                   JSON object, inline): an object matching it. Sent with
//!                                   the request (above); not with workers-ai. captions/caption
//!                                   is the reply as written (the JSON text)
//!   ollama-overlay-template  (none)  e.g. `{count} people · {activity}`: when a complete reply
//!                                   is a JSON object, the overlay shows this with each {name}
//!                                   replaced by that top-level field (a string decoded, a
//!                                   number or boolean as written, null or missing `?`, an
//!                                   object or array as compact JSON; {{ and }} for braces);
//!                                   otherwise the reply's text. While a reply streams, the
//!                                   last caption stays (no partial JSON is drawn)
//!   ollama-region            (empty) x,y,w,h: only this rectangle of the frame is sent (and,
//!                                   with trigger=change, watched), e.g. a door or a till.
//!                                   Whole px (100,50,300,200) or fractions of the frame's
//!                                   width/height, 0-1, when any of the four has a decimal
//!                                   point (0.5,0,0.5,1: the right half). Clamped to each
//!                                   frame; a value that does not parse, or a rectangle
//!                                   empty once clamped, is reported once and the whole frame
//!                                   used. Empty: the whole frame
//!   ollama-show-region       false  true: outline the region on every frame (2 px: its
//!                                   border pixels yellow, a black line just outside), also
//!                                   with ollama-overlay=false; the outline is not sent
//!   ollama-frames            1      frames per request (1–8): the current one and the kept
//!                                   copies nearest the moments evenly spread over the last
//!                                   ollama-frames-span-ms (fewer at the start of a stream)
//!   ollama-frames-span-ms    2000   ms between the oldest frame sent and the newest (100–60000)
//!   ollama-frames-layout     images images: each frame an image of its own | grid: tiled
//!                                   into one image (tiles labelled with their time, oldest
//!                                   first); always grid with workers-ai (logged once)
//!   ollama-server-name       after ollama-api: Ollama (generate, chat), the OpenAI-compatible
//!                                   server (openai), Workers AI (workers-ai). Free text: how
//!                                   messages name the server ("cannot reach NAME at URL");
//!                                   blank = unset, cut at 200 bytes
//!
//! On screen: while a reply streams, its partial caption (not with ollama-overlay-template);
//! otherwise the last complete caption (through the template, when it applies). Before the first caption nothing is drawn (no overlay call) unless there is a
//! problem, whose message is then shown (e.g. "cannot reach Ollama at …": every message
//! names the server as ollama-server-name says).
//!
//! State messages are logged once each time the state changes: logging.warn for problems,
//! logging.info when captions flow again. Connection failures back off exponentially
//! (1, 2, 4, … 30 s, reset once the server answers; "retrying in N s" gives the actual
//! wait, which is also never shorter than what remains of the interval); a destination
//! that the sandbox does not allow, or an invalid URL, stops all further requests.
//!
//! Memory is bounded: one 64 KiB line buffer for a streamed reply (a longer line counts as
//! a malformed reply), 2 KiB caption buffers (longer captions are cut at a character
//! boundary), a 16 KiB buffer for an error reply or a whole Workers AI reply; the config's
//! texts, the request URL and body live in an arena reset whenever the config is read
//! again. Reading a reply allocates nothing, except a transient copy of a line that needs
//! repair (invalid UTF-8; see json.zig). Every buffer the host returns is freed. The
//! frames kept for ollama-frames are held by the host: at most 2·(ollama-frames−1)+2
//! copies, no larger than they are sent.
//!
//! This file holds the state, the request cycle and `process`; the rest is beside it:
//! protocols.zig (the wire protocols), config.zig (reading the config), change.zig (the
//! change check, the counters), region.zig (ollama-region), frames.zig (ollama-frames),
//! overlay.zig (drawing, the overlay template), store.zig (the processor store), text.zig
//! (bounded text buffers).
const std = @import("std");
const vh = @import("vh");
const json = vh.json;

pub const panic = vh.panic;
const protocols = @import("protocols.zig");
const config = @import("config.zig");
const Config = config.Config;
const region = @import("region.zig");
const FrameView = region.FrameView;
const change = @import("change.zig");
const Reason = change.Reason;
const overlay = @import("overlay.zig");
const store = @import("store.zig");
const frames = @import("frames.zig");
const text_mod = @import("text.zig");
const TextBuf = text_mod.TextBuf;
const Caption = text_mod.Caption;
const trimmed = text_mod.trimmed;

// ==========================================================================================
// State
// ==========================================================================================

var cfg: Config = .{};
var configured = false;
/// config-watch version the current `cfg` was read at.
var config_version: u64 = 0;
/// Holds the config's texts, the request URL and body: reset when the config is read again.
var config_arena: std.heap.ArenaAllocator = .init(vh.allocator);
/// Where requests go ({url}/api/generate, …: the protocol's `url`).
var request_url: []const u8 = "";
/// The request body with the image placeholder (the protocol's `body`).
var template: []const u8 = "";

/// Request id held at the host (poll it; cancel it to abandon it), or null.
var request_id: ?u32 = null;
/// Still interpreting the current reply (false once complete, failed or abandoned).
var reply_open = false;
/// When the current request started (µs since epoch), for the timeout.
var request_started_us: u64 = 0;
/// HTTP status of the current reply, 0 until known.
var reply_status: u16 = 0;
/// Lines of the current 200 reply handled so far.
var reply_lines: usize = 0;
/// A complete reply's connection is kept until this time (µs) so that the server can end it
/// itself (`[DONE]`, the end of the body) and the request counts as finished, not cancelled.
var drain_until_us: u64 = 0;
const drain_grace_us: u64 = std.time.us_per_s;
/// When the last request was started or attempted (µs), null before the first.
var last_start_us: ?u64 = null;
/// No request starts before this time (µs); connection-failure backoff.
var retry_at_us: u64 = 0;
/// Current backoff step in s (0 = none): 1, 2, 4, … 30.
var backoff_s: u64 = 0;
/// Set for errors that retrying cannot fix (destination not allowed, invalid URL).
var stopped = false;

var line_storage: [64 * 1024]u8 = undefined;
/// The lines of a streamed 200 reply, reassembled across polls.
var lines: json.LineSplitter = .{ .buf = &line_storage };
/// The caption of the reply streaming now.
var partial: Caption = .{};
/// The last complete caption.
var caption: Caption = .{};
/// The overlay text of the last caption from ollama-overlay-template.
var templated: overlay.Template = .{};
/// Body of a non-200 reply (for its error text), or of a whole non-streamed reply.
var reply_body: TextBuf(16 * 1024) = .{};

const Health = enum { unknown, ok, problem };
var health: Health = .unknown;
/// The current problem message (shown on screen while there is no caption).
var problem: TextBuf(512) = .{};

/// The change check (trigger=change) and the request counters.
var check: change.Check = .{};
var stats: change.Stats = .{};

// ==========================================================================================
// Configuration
// ==========================================================================================

fn configure() void {
    configured = true;
    const old_region = cfg.region;
    _ = config_arena.reset(.retain_capacity);
    readConfig(config_arena.allocator()) catch @panic("out of memory reading the config");
    region.configRead();
    // A thumbnail of another part of the frame is no reference for the change check.
    if (!std.meta.eql(old_region, cfg.region)) check.forget();
    config.storeSettings(&cfg);
    renderTemplate(); // the template may have changed
    if (cfg.paused) {
        vh.log.infof("ollama: captions paused (ollama-paused=true)", .{});
    } else if (cfg.trigger == .change) {
        vh.log.infof("ollama: captions from model {s} of {s} at {s} when the scene changes, at most every {d} ms, heartbeat every {d} ms (0 = none)", .{ cfg.model, cfg.server_name, cfg.url, cfg.min_interval_ms, cfg.interval_ms });
    } else {
        vh.log.infof("ollama: captions from model {s} of {s} at {s} every {d} ms or slower", .{ cfg.model, cfg.server_name, cfg.url, cfg.interval_ms });
    }
    if (frames.on(&cfg)) {
        vh.log.infof("ollama: each request carries up to {d} frames over the last {d} ms, {s}", .{ cfg.frames, cfg.frames_span_ms, if (cfg.frames_layout == .grid) "tiled into one grid image" else "as separate images" });
    }
}

/// The config into `cfg`, the request URL and body (the protocol's) into `request_url`,
/// `template`; all texts in `arena`.
fn readConfig(arena: std.mem.Allocator) error{ OutOfMemory, WriteFailed }!void {
    try config.read(arena, &cfg);
    var out: std.Io.Writer.Allocating = .init(arena);
    try cfg.protocol.url(&out.writer, &cfg);
    request_url = try out.toOwnedSlice();
    try cfg.protocol.body(&out.writer, &cfg);
    template = try out.toOwnedSlice();
}

/// The overlay text of the last caption (once per caption and per config read).
fn renderTemplate() void {
    templated.render(cfg.overlay_template, caption.slice());
}

// ==========================================================================================
// State messages
// ==========================================================================================

/// Enters the problem state with a formatted message; logs it (warn) if it changed.
fn setProblem(comptime fmt: []const u8, args: anytype) void {
    var buf: [512]u8 = undefined;
    const msg = vh.bufPrintTrunc(&buf, fmt, args);
    if (health == .problem and std.mem.eql(u8, msg, problem.slice())) return;
    health = .problem;
    problem.set(msg);
    vh.log.warn(problem.slice());
}

/// Enters the ok state (a reply was received); logs (info) when that is news.
fn setOk() void {
    if (health == .ok) return;
    const recovered = health == .problem;
    health = .ok;
    problem.clear();
    if (recovered) {
        vh.log.infof("{s} at {s} is answering again (model {s})", .{ cfg.server_name, cfg.url, cfg.model });
    } else {
        vh.log.infof("{s} at {s} is answering (model {s})", .{ cfg.server_name, cfg.url, cfg.model });
    }
}

// ==========================================================================================
// Requests
// ==========================================================================================

/// What starts a request now, or null: none may start, or it is not time.
fn timeToStart(view: *FrameView, now: u64) ?Reason {
    if (stopped or cfg.paused or request_id != null) return null;
    if (now < retry_at_us) return null;
    switch (cfg.trigger) {
        .interval => {
            const last = last_start_us orelse return .interval;
            return if (now -| last >= cfg.interval_ms * std.time.us_per_ms) .interval else null;
        },
        .change => {
            if (last_start_us) |last| if (now -| last < cfg.min_interval_ms * std.time.us_per_ms) return null;
            const sampled = check.sample(view.image());
            if (sampled and (!check.has_ref or check.score() > cfg.change_threshold)) return .change;
            const last = last_start_us orelse return .change; // the first frame (no thumbnail)
            if (cfg.interval_ms > 0 and now -| last >= cfg.interval_ms * std.time.us_per_ms) return .heartbeat;
            stats.unchanged(now);
            return null;
        },
    }
}

fn startRequest(view: *FrameView, now: u64, reason: Reason) void {
    last_start_us = now;
    // The frame sent is the new reference for the change check.
    if (cfg.trigger == .change) check.keep();
    // The host copies the image (scaled down) before post-frame(s) returns: the region's
    // view may be dropped as soon as the frame is processed.
    const posted = if (frames.on(&cfg))
        frames.post(request_url, template, view.image(), &cfg)
    else
        vh.fetch.postFrame(
            request_url,
            "application/json",
            template,
            view.image(),
            @intCast(cfg.image_max_side),
            @intCast(cfg.jpeg_quality),
        );
    const id = posted catch |err| {
        transportFailed(err, now);
        return;
    };
    request_id = id;
    stats.countRequest(reason, now);
    reply_open = true;
    request_started_us = now;
    reply_status = 0;
    reply_lines = 0;
    lines.reset();
    partial.clear();
    reply_body.clear();
}

/// Handles a fetch error from post-frame or poll (the id is already released).
fn transportFailed(err: vh.fetch.Error, now: u64) void {
    reply_open = false;
    partial.clear();
    check.forget(); // no caption: the next request need not wait for a change
    const url = cfg.url;
    const name = cfg.server_name;
    switch (err) {
        error.ConnectionFailed => {
            backoff_s = if (backoff_s == 0) 1 else @min(backoff_s * 2, 30);
            retry_at_us = now + backoff_s * std.time.us_per_s;
            // The next start also waits for the interval (the cooldown with
            // trigger=change); report the real wait.
            const gap_ms = if (cfg.trigger == .change) cfg.min_interval_ms else cfg.interval_ms;
            const next_interval = (last_start_us orelse now) + gap_ms * std.time.us_per_ms;
            const wait_us = @max(retry_at_us, next_interval) -| now;
            const wait_s = (wait_us + std.time.us_per_s - 1) / std.time.us_per_s;
            setProblem("cannot reach {s} at {s}, retrying in {d} s", .{ name, url, wait_s });
        },
        error.Timeout => setProblem("{s} at {s} timed out", .{ name, url }),
        error.DestinationNotAllowed => {
            stopped = true;
            setProblem("{s} is not an allowed destination", .{url});
        },
        error.InvalidUrl => {
            stopped = true;
            setProblem("{s} is not a valid http(s) URL", .{request_url});
        },
        error.ResponseTooLarge => setProblem("the reply from {s} at {s} exceeded the response size limit and was cut off", .{ name, url }),
        error.RequestError => setProblem("the connection to {s} at {s} broke during the reply", .{ name, url }),
        error.TooManyRequests => setProblem("too many requests in flight to {s} at {s}; waiting for them to finish", .{ name, url }),
        error.UnknownRequest => setProblem("the request to {s} at {s} was lost by the host (unknown request id)", .{ name, url }),
        error.RuntimeError => setProblem("the host could not send the frame to {s} at {s} (runtime error)", .{ name, url }),
    }
}

/// Polls the request in flight and acts on what arrived.
fn pollRequest(id: u32, now: u64) void {
    const progress = vh.fetch.poll(id) catch |err| {
        request_id = null; // an error releases the id
        transportFailed(err, now);
        return;
    };
    defer progress.deinit();
    if (progress.done) request_id = null; // released by the host

    if (progress.status != 0 and reply_status == 0) {
        reply_status = progress.status;
        backoff_s = 0; // the server answered
        retry_at_us = 0;
    }
    const was_open = reply_open;
    if (reply_open) {
        if (reply_status == 200 and cfg.protocol.reply == .lines) {
            var it = lines.feed(progress.body);
            while (reply_open) {
                const item = it.next() orelse break;
                handleLine(item);
            }
        } else {
            reply_body.appendRaw(progress.body);
        }
        if (reply_open and progress.done) finishReply();
    }
    // A reply that ended early (complete, malformed, error line): drop the connection; a
    // complete one after a short grace in which the server normally ends it.
    if (was_open and !reply_open and health == .ok) drain_until_us = now + drain_grace_us;
    if (!reply_open and request_id != null and (health != .ok or now >= drain_until_us)) {
        vh.fetch.cancel(request_id.?);
        request_id = null;
    }
    if (request_id) |still| {
        if (reply_open and now -| request_started_us > cfg.timeout_ms * std.time.us_per_ms) {
            vh.fetch.cancel(still);
            request_id = null;
            reply_open = false;
            partial.clear();
            setProblem("{s} at {s} timed out", .{ cfg.server_name, cfg.url });
        }
    }
}

/// The host reported the reply complete while it was still open.
fn finishReply() void {
    switch (reply_status) {
        200 => switch (cfg.protocol.reply) {
            .whole => |read| replyOutcome(read(reply_body.slice(), &partial)),
            .lines => {
                if (lines.finish()) |item| handleLine(item); // a last line without '\n'
                if (reply_open) malformed(); // the stream ended before the reply said it was complete
            },
        },
        401, 403 => fail("{s} refused the credentials (HTTP {d}): set ollama-api-key-env to the variable holding the API key", .{ cfg.url, reply_status }),
        404 => if (cfg.protocol.pull_hint and !cfg.server_named)
            fail("model {s} not found: run `ollama pull {s}`", .{ cfg.model, cfg.model })
        else
            fail("model {s} not found on {s} at {s}", .{ cfg.model, cfg.server_name, cfg.url }),
        else => {
            var text: TextBuf(300) = .{};
            protocols.errorText(reply_body.slice(), &text);
            if (text.len > 0) {
                fail("server error {d}: {s}", .{ reply_status, text.slice() });
            } else {
                fail("server error {d}", .{reply_status});
            }
        },
    }
}

fn fail(comptime fmt: []const u8, args: anytype) void {
    reply_open = false;
    partial.clear();
    check.forget(); // no caption: the next request need not wait for a change
    setProblem(fmt, args);
}

fn malformed() void {
    fail("malformed reply from {s}", .{cfg.url});
}

/// One line of a streamed 200 reply, to the protocol's reader.
fn handleLine(item: json.LineSplitter.Item) void {
    const line = switch (item) {
        .line => |l| l,
        .too_long => return malformed(),
    };
    // A 200 reply that is a web page (a proxy's error page, a login page, a web UI at that
    // address): "malformed reply" would not tell the user that the URL points elsewhere.
    // Only the first line: markup after valid lines is a broken stream, not a page.
    const first_line = reply_lines == 0;
    reply_lines += 1;
    if (first_line and std.mem.startsWith(u8, std.mem.trimStart(u8, line, " \t\r\xef\xbb\xbf"), "<")) {
        return fail("{s} answered with an HTML page, not the {s} API: check ollama-url and ollama-api", .{ cfg.url, cfg.protocol.name });
    }
    replyOutcome(cfg.protocol.reply.lines(line, &partial));
}

/// Acts on what a line (or a whole reply) of a 200 reply meant.
fn replyOutcome(outcome: protocols.Outcome) void {
    switch (outcome) {
        .more => {},
        .complete => completeCaption(),
        .malformed => malformed(),
        .error_line => |text| fail("error from {s}: {s}", .{ cfg.server_name, text.slice() }),
        .server_error => |text| fail("server error: {s}", .{if (text.len > 0) text.slice() else "unknown"}),
    }
}

/// The reply is complete: the partial caption becomes the caption.
fn completeCaption() void {
    reply_open = false;
    setOk();
    const text = trimmed(partial.slice());
    if (text.len == 0) {
        vh.log.debugf("{s} returned an empty caption; keeping the previous one", .{cfg.server_name});
        partial.clear();
        return;
    }
    caption.set(text);
    partial.clear();
    renderTemplate();
    vh.log.infof("caption: {s}", .{caption.slice()});
    // the model first: a reader of captions/caption finds the model that wrote it
    store.get().set("captions", "model", cfg.model) catch {};
    store.get().set("captions", "caption", caption.slice()) catch |err| store.failed(err);
}

// ==========================================================================================
// Overlay
// ==========================================================================================

/// What to draw: the streaming caption, else the last caption, else a problem message,
/// else nothing (before the first caption, with no problem, the frame is left untouched).
/// With ollama-overlay-template set, a streaming reply is not shown (its JSON is incomplete):
/// the last caption, as the template made it, stays until the reply is complete.
fn overlayText() ?[]const u8 {
    if (reply_open and cfg.overlay_template == null) {
        const streaming = trimmed(partial.slice());
        if (streaming.len > 0) return streaming;
    }
    if (caption.len > 0) return if (templated.ok) templated.text.slice() else caption.slice();
    if (health == .problem) return problem.slice();
    return null;
}

// ==========================================================================================
// Entry point
// ==========================================================================================

export fn process(frame: u32) u32 {
    const version = vh.config.version();
    if (!configured or version != config_version) {
        config_version = version;
        configure();
    }
    const now = vh.time.nowUs();
    var view: FrameView = .{ .frame = frame, .cfg = &cfg };
    defer view.deinit();
    if (request_id) |id| pollRequest(id, now);
    if (timeToStart(&view, now)) |reason| startRequest(&view, now, reason);
    if (!stopped) frames.keep(&view, now); // after the request: it never finds its own frame kept
    region.draw(&view); // after the request: the outline is not sent
    overlay.draw(frame, &cfg, overlayText());
    return frame;
}
