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
//! sandbox) and, when the change check or a request needs it, one `mat.region` (a view of
//! the frame's pixels, no copy), dropped before `process` returns; with
//! ollama-show-region=true, two `cv.rectangle`.
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
//! Wire protocols (`ollama-api`; each is one entry of `protocols` below). The host fills in
//! the image: the body is sent as a template whose first `%IMAGE%` becomes the base64 JPEG
//! (`%IMAGE_BYTES%`: its bytes as a JSON array of numbers). The image comes first in every
//! body, so that a prompt (or model name) containing the text %IMAGE% cannot be mistaken
//! for it. Each reply is streamed except Workers AI's; its pieces cut anywhere.
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
//! region, show-region (e.g. ollama/model = "llava"; the viewer shows them; ollama/format is
//! "", "json" or the schema's text: the host reads it to know whether to parse captions as
//! JSON; ollama/region is the value as given, or "" for the whole frame).
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
//!   ollama-image-max-side    672    px, longer side of the JPEG sent (0 = full size, or 32–16384)
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
//! repair (invalid UTF-8; see json.zig). Every buffer the host returns is freed.
const std = @import("std");
const vh = @import("vh");
const json = vh.json;

pub const panic = vh.panic;

// ==========================================================================================
// Wire protocols
// ==========================================================================================

/// A wire protocol (`ollama-api`): all that differs between them. Adding a protocol is
/// adding an entry to `protocols` (the first is the default).
const Protocol = struct {
    /// Its `ollama-api` value.
    name: []const u8,
    /// How messages name the server when `ollama-server-name` is not set.
    server_name: []const u8,
    /// HTTP 404 suggests `ollama pull MODEL` (unless `ollama-server-name` is set: the
    /// server may not be Ollama then).
    pull_hint: bool,
    /// Writes the request URL: the base URL `ollama-url` and a path.
    url: *const fn (w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void,
    /// Writes the request body (see the file comment for the image placeholder).
    body: *const fn (w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void,
    /// How a 200 reply is read.
    reply: union(enum) {
        /// As it streams, line by line (NDJSON, server-sent events).
        lines: *const fn (line: []const u8) void,
        /// Whole, once complete (at most `reply_body`'s capacity).
        whole: *const fn (body: []const u8) void,
    },
};

const protocols = [_]Protocol{
    .{
        .name = "generate",
        .server_name = "Ollama",
        .pull_hint = true,
        .url = generate.url,
        .body = generate.body,
        .reply = .{ .lines = generate.line },
    },
    .{
        .name = "chat",
        .server_name = "Ollama",
        .pull_hint = true,
        .url = chat.url,
        .body = chat.body,
        .reply = .{ .lines = chat.line },
    },
    .{
        .name = "openai",
        .server_name = "the OpenAI-compatible server",
        .pull_hint = false,
        .url = openai.url,
        .body = openai.body,
        .reply = .{ .lines = openai.line },
    },
    .{
        .name = "workers-ai",
        .server_name = "Workers AI",
        .pull_hint = false,
        .url = workers_ai.url,
        .body = workers_ai.body,
        .reply = .{ .whole = workers_ai.reply },
    },
};

const protocol_names = names: {
    var names: [protocols.len][]const u8 = undefined;
    for (protocols, &names) |p, *n| n.* = p.name;
    const final = names;
    break :names &final;
};

/// Ollama's POST /api/generate: NDJSON lines {"response":piece,…,"done":bool}.
const generate = struct {
    fn url(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try w.print("{s}/api/generate", .{c.url});
    }
    fn body(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try writeJson(w, .{
            .images = .{"%IMAGE%"},
            .model = c.model,
            .prompt = c.prompt,
            .stream = true,
            .options = .{ .num_predict = c.max_tokens },
            .format = ollamaFormat(c),
        });
    }
    fn line(text: []const u8) void {
        var doc = json.select(vh.allocator, text, &.{ "/response", "/done", "/error" }) catch return malformed();
        defer doc.deinit();
        const piece = doc.get("/response");
        if (piece) |p| if (p.kind != .string) return malformed();
        ollamaLine(piece, doc.get("/done"), doc.get("/error"));
    }
};

/// Ollama's POST /api/chat: NDJSON lines {"message":{"content":piece,…},…,"done":bool}.
const chat = struct {
    fn url(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try w.print("{s}/api/chat", .{c.url});
    }
    fn body(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try writeJson(w, .{
            .messages = .{.{ .role = "user", .images = .{"%IMAGE%"}, .content = c.prompt }},
            .model = c.model,
            .stream = true,
            .options = .{ .num_predict = c.max_tokens },
            .format = ollamaFormat(c),
        });
    }
    fn line(text: []const u8) void {
        var doc = json.select(vh.allocator, text, &.{ "/message", "/message/content", "/done", "/error" }) catch return malformed();
        defer doc.deinit();
        var piece: ?json.Value = null;
        if (doc.get("/message")) |message| {
            if (message.kind != .object) return malformed();
            piece = doc.get("/message/content") orelse return malformed();
            if (piece.?.kind != .string) return malformed();
        }
        ollamaLine(piece, doc.get("/done"), doc.get("/error"));
    }
};

/// One line of an Ollama stream: its caption piece (a string, when there is one), "done"
/// and "error".
fn ollamaLine(piece: ?json.Value, done: ?json.Value, err: ?json.Value) void {
    if (done) |d| if (d.boolean() == null) return malformed();
    if (err) |e| {
        var text: TextBuf(300) = .{};
        text.appendJson(e); // (nothing unless a string)
        return fail("error from {s}: {s}", .{ cfg.server_name, text.slice() });
    }
    if (piece == null and done == null) return malformed();
    if (piece) |p| partial.appendJson(p);
    if (done) |d| if (d.boolean().?) completeCaption();
}

/// OpenAI chat completions (vLLM, llama.cpp's server, LM Studio, Ollama's /v1): POST
/// …/chat/completions, server-sent events whose `choices[0].delta.content` are the pieces.
const openai = struct {
    fn url(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        // An OpenAI base URL usually ends in /v1 already ("http://host:8000/v1").
        const v1 = std.mem.endsWith(u8, c.url, "/v1");
        try w.print("{s}{s}/chat/completions", .{ c.url, if (v1) "" else "/v1" });
    }
    fn body(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try writeJson(w, .{
            .messages = .{.{ .role = "user", .content = .{
                .{ .type = "image_url", .image_url = .{ .url = "data:image/jpeg;base64,%IMAGE%" } },
                .{ .type = "text", .text = c.prompt },
            } }},
            .model = c.model,
            .stream = true,
            .max_tokens = c.max_tokens,
            .response_format = if (c.format == .plain) null else ResponseFormat{ .c = c },
        });
    }
    /// One line of the event stream (https://html.spec.whatwg.org/multipage/
    /// server-sent-events.html): `data: {chunk}` lines carry the pieces, `data: [DONE]`
    /// ends the stream; blank lines, comments and other fields are skipped.
    fn line(raw: []const u8) void {
        const text = std.mem.trimEnd(u8, raw, "\r");
        if (!std.mem.startsWith(u8, text, "data:")) return;
        const data = std.mem.trim(u8, text["data:".len..], " ");
        if (std.mem.eql(u8, data, "[DONE]")) return completeCaption();
        var doc = json.select(vh.allocator, data, &.{
            "/error",                    "/choices",                 "/choices/0",
            "/choices/0/delta",          "/choices/0/delta/content", "/choices/0/finish_reason",
        }) catch return malformed();
        defer doc.deinit();
        const choices = doc.get("/choices");
        if (choices) |c| if (c.kind != .array) return malformed();
        if (doc.get("/error") != null) {
            var text_buf: TextBuf(300) = .{};
            errorText(data, &text_buf);
            return fail("server error: {s}", .{if (text_buf.len > 0) text_buf.slice() else "unknown"});
        }
        if (choices == null) return malformed();
        const first = doc.get("/choices/0") orelse return; // e.g. a usage-only chunk
        if (first.kind != .object) return malformed();
        if (doc.get("/choices/0/delta")) |delta| {
            if (delta.kind != .object) return malformed();
            if (doc.get("/choices/0/delta/content")) |content| switch (content.kind) {
                .string => partial.appendJson(content),
                .null => {},
                else => return malformed(),
            };
        }
        // "stop"/"length": the reply is complete even if the server never sends [DONE]. A
        // stream that just ends without one (Ollama's /v1 after a runner error) is a
        // malformed reply.
        if (doc.get("/choices/0/finish_reason")) |reason| if (reason.kind == .string) completeCaption();
    }
};

/// Cloudflare Workers AI (`@cf/llava-hf/llava-1.5-7b-hf`): POST {url}/{model}, one JSON
/// reply (the model does not stream).
const workers_ai = struct {
    fn url(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        // {url} is the account's …/ai/run endpoint, the model its path ("@cf/llava-hf/…").
        try w.print("{s}/{s}", .{ c.url, c.model });
    }
    fn body(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try writeJson(w, .{
            .image = Raw{ .text = "%IMAGE_BYTES%" },
            .prompt = c.prompt,
            .max_tokens = c.max_tokens,
        });
    }
    /// {"result":{"description":…},"success":true,…}, or
    /// {"success":false,"errors":[{"code":…,"message":…}],…}.
    fn reply(body_text: []const u8) void {
        var doc = json.select(vh.allocator, body_text, &.{ "/success", "/result", "/result/description" }) catch return malformed();
        defer doc.deinit();
        const success = (doc.get("/success") orelse return malformed()).boolean() orelse return malformed();
        if (!success) {
            var text: TextBuf(300) = .{};
            errorText(body_text, &text);
            return fail("server error: {s}", .{if (text.len > 0) text.slice() else "unknown"});
        }
        const result = doc.get("/result") orelse return malformed();
        if (result.kind != .object) return malformed();
        const description = doc.get("/result/description") orelse return malformed();
        if (description.kind != .string) return malformed();
        partial.clear();
        partial.appendJson(description);
        completeCaption();
    }
};

/// Writes `value` as JSON (std.json: strings escaped, no whitespace; a null optional
/// field, e.g. `format` with ollama-format empty, is left out).
fn writeJson(w: *std.Io.Writer, value: anytype) std.Io.Writer.Error!void {
    try std.json.Stringify.value(value, .{ .emit_null_optional_fields = false }, w);
}

/// Ollama's `format` (generate, chat): "json", the schema object, or none (plain text).
fn ollamaFormat(c: *const Config) ?Raw {
    return switch (c.format) {
        .plain => null,
        .json => Raw{ .text = "\"json\"" },
        .schema => Raw{ .text = c.format_text },
    };
}

/// OpenAI's `response_format`: {"type":"json_object"}, or {"type":"json_schema",
/// "json_schema":{"name":"caption","schema":SCHEMA}}.
const ResponseFormat = struct {
    c: *const Config,
    pub fn jsonStringify(self: ResponseFormat, jw: *std.json.Stringify) std.Io.Writer.Error!void {
        switch (self.c.format) {
            .plain, .json => try jw.write(.{ .type = "json_object" }),
            .schema => try jw.write(.{ .type = "json_schema", .json_schema = .{ .name = "caption", .schema = Raw{ .text = self.c.format_text } } }),
        }
    }
};

/// A value written as it is (the `%IMAGE_BYTES%` placeholder, which the host replaces by an
/// array).
const Raw = struct {
    text: []const u8,
    pub fn jsonStringify(self: Raw, jw: *std.json.Stringify) std.Io.Writer.Error!void {
        try jw.print("{s}", .{self.text});
    }
};

// ==========================================================================================
// Configuration
// ==========================================================================================

const Config = struct {
    /// Base URL without trailing '/', e.g. "http://localhost:11434".
    url: []const u8 = "http://localhost:11434",
    protocol: *const Protocol = &protocols[0],
    model: []const u8 = "llava",
    prompt: []const u8 = "Describe what is in this picture in highly complimentary terms using 6 words or less.",
    interval_ms: u64 = 3000,
    trigger: Trigger = .interval,
    change_threshold: f32 = default_change_threshold,
    min_interval_ms: u64 = 1000,
    max_tokens: u64 = 40,
    image_max_side: u64 = 672,
    jpeg_quality: u64 = 80,
    timeout_ms: u64 = 60000,
    placement: vh.overlay.Placement = .bottom,
    font_scale: f32 = 0.6,
    max_lines: u64 = 3,
    paused: bool = false,
    /// false: nothing drawn (another processor draws captions/caption).
    overlay: bool = true,
    /// How messages name the server: `ollama-server-name`, else the protocol's name for it.
    server_name: []const u8 = "Ollama",
    /// Whether `ollama-server-name` was given.
    server_named: bool = false,
    /// `ollama-format`: what the reply is asked to be (never .json/.schema for workers-ai).
    format: Format = .plain,
    /// The setting in force as stored (ollama/format): "", "json" or the schema's text.
    format_text: []const u8 = "",
    /// `ollama-overlay-template` (null: unset; the overlay shows the caption).
    overlay_template: ?[]const u8 = null,
    /// `ollama-region` (null: the whole frame, also when the value was invalid).
    region: ?Region = null,
    /// The setting in force as stored (ollama/region): the value as given, or "".
    region_text: []const u8 = "",
    /// `ollama-show-region`: outline the region on every frame.
    show_region: bool = false,
};

/// `ollama-region`: the part of the frame sent and watched, x,y,w,h in px or as fractions
/// of the frame's width and height (worked out against each frame's size: `regionRect`).
const Region = union(enum) {
    px: [4]i64,
    fraction: [4]f32,
};

/// `ollama-format`: plain text (empty), any JSON object ("json"), or a JSON Schema.
const Format = enum { plain, json, schema };

/// `ollama-trigger`: what starts a request (see the file comment).
const Trigger = enum { interval, change };
/// `ollama-change-threshold`'s default: above the noise of a still camera (JPEG and sensor
/// noise score ≤ 0.003 on the clips in media/), below a person or a car entering (0.01–0.02
/// within a frame or two of their arrival, up to 0.1–0.2 once in view).
const default_change_threshold: f32 = 0.01;

/// Longest `ollama-server-name` kept (bytes, cut at a character boundary).
const max_server_name = 200;

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

const text_color: vh.Rgba = .{ .r = 255, .g = 255, .b = 255, .a = 255 };
const band_color: vh.Rgba = .{ .r = 0, .g = 0, .b = 0, .a = 200 };

fn trimmed(s: []const u8) []const u8 {
    return std.mem.trim(u8, s, " \t\r\n");
}

/// An http:// or https:// URL with a host (a trailing / aside), nothing that would break
/// the request line or the JSON of a message.
fn validUrl(text: []const u8) bool {
    const url = std.mem.trimEnd(u8, text, "/");
    const rest = if (std.ascii.startsWithIgnoreCase(url, "http://"))
        url["http://".len..]
    else if (std.ascii.startsWithIgnoreCase(url, "https://"))
        url["https://".len..]
    else
        return false;
    if (rest.len == 0 or rest[0] == '/') return false;
    for (url) |c| if (c <= ' ' or c == '"' or c == '\\' or c == 0x7f) return false;
    return true;
}

fn configure() void {
    configured = true;
    const old_region = cfg.region;
    _ = config_arena.reset(.retain_capacity);
    readConfig(config_arena.allocator()) catch @panic("out of memory reading the config");
    region_empty_logged = false;
    // A thumbnail of another part of the frame is no reference for the change check.
    if (!std.meta.eql(old_region, cfg.region)) has_ref = false;
    storeSettings();
    renderTemplate(); // the template may have changed
    if (cfg.paused) {
        vh.log.infof("ollama: captions paused (ollama-paused=true)", .{});
    } else if (cfg.trigger == .change) {
        vh.log.infof("ollama: captions from model {s} of {s} at {s} when the scene changes, at most every {d} ms, heartbeat every {d} ms (0 = none)", .{ cfg.model, cfg.server_name, cfg.url, cfg.min_interval_ms, cfg.interval_ms });
    } else {
        vh.log.infof("ollama: captions from model {s} of {s} at {s} every {d} ms or slower", .{ cfg.model, cfg.server_name, cfg.url, cfg.interval_ms });
    }
}

fn readConfig(arena: std.mem.Allocator) error{ OutOfMemory, WriteFailed }!void {
    const s = vh.settings;
    const d: Config = .{};
    const server_name = try s.optionalText(arena, "ollama-server-name");
    cfg = .{
        .url = std.mem.trimEnd(u8, try s.text(arena, "ollama-url", d.url, validUrl, "an http:// or https:// URL"), "/"),
        .protocol = &protocols[s.oneOf("ollama-api", protocol_names, 0, .exact, comptime s.listed(protocol_names))],
        .model = try s.text(arena, "ollama-model", d.model, s.nonBlank, "a non-empty text"),
        .prompt = try s.text(arena, "ollama-prompt", d.prompt, s.nonBlank, "a non-empty text"),
        .interval_ms = @intCast(s.int("ollama-interval-ms", d.interval_ms, 0, 86_400_000, "an integer 0-86400000 ms")),
        .trigger = s.choice(Trigger, "ollama-trigger", d.trigger, .ignore_case),
        .change_threshold = s.decimal("ollama-change-threshold", default_change_threshold, 0, 1, "a number 0-1"),
        .min_interval_ms = @intCast(s.int("ollama-min-interval-ms", d.min_interval_ms, 0, 86_400_000, "an integer 0-86400000 ms")),
        .max_tokens = @intCast(s.int("ollama-max-tokens", d.max_tokens, 1, 4096, "an integer 1-4096")),
        .image_max_side = @intCast(s.intOr("ollama-image-max-side", d.image_max_side, 32, 16384, 0, "0 (full size) or an integer 32-16384 px")),
        .jpeg_quality = @intCast(s.int("ollama-jpeg-quality", d.jpeg_quality, 1, 100, "an integer 1-100")),
        .timeout_ms = @intCast(s.int("ollama-timeout-ms", d.timeout_ms, 1000, 3_600_000, "an integer 1000-3600000 ms")),
        .placement = s.choice(vh.overlay.Placement, "ollama-caption-placement", d.placement, .ignore_case),
        .font_scale = s.decimal("ollama-font-scale", d.font_scale, 0.1, 10, "a number 0.1-10"),
        .max_lines = @intCast(s.int("ollama-max-lines", d.max_lines, 1, 50, "an integer 1-50")),
        .paused = s.boolean("ollama-paused", d.paused),
        .overlay = s.boolean("ollama-overlay", d.overlay),
        .show_region = s.boolean("ollama-show-region", d.show_region),
    };
    cfg.server_name = if (server_name) |name| vh.utf8Prefix(name, max_server_name) else cfg.protocol.server_name;
    cfg.server_named = server_name != null;
    try readFormat(arena);
    try readRegion(arena);
    cfg.overlay_template = try s.optionalText(arena, "ollama-overlay-template");
    var out: std.Io.Writer.Allocating = .init(arena);
    try cfg.protocol.url(&out.writer, &cfg);
    request_url = try out.toOwnedSlice();
    try cfg.protocol.body(&out.writer, &cfg);
    template = try out.toOwnedSlice();
}

/// `ollama-format` into cfg.format / cfg.format_text: empty, `json` (any case) or a JSON
/// object (the schema, kept as given). Anything else is reported and plain text used; so is
/// a JSON format with workers-ai, whose LLaVA API has no such field (reported).
fn readFormat(arena: std.mem.Allocator) error{OutOfMemory}!void {
    const s = vh.settings;
    const value = vh.config.get("ollama-format") orelse return;
    defer vh.free(value);
    const v = s.trim(value);
    if (v.len == 0) return;
    if (std.ascii.eqlIgnoreCase(v, "json")) {
        cfg.format = .json;
        cfg.format_text = "json";
    } else if (isJsonObject(v)) {
        cfg.format = .schema;
        cfg.format_text = try arena.dupe(u8, v);
    } else {
        return s.reportInvalid("ollama-format", value, "empty, json or a JSON Schema object", "\"\" (plain text)");
    }
    if (std.mem.eql(u8, cfg.protocol.name, "workers-ai")) {
        vh.log.errf("ollama-format={s}: Workers AI's LLaVA cannot be asked for JSON (its API has no such field); the captions stay plain text", .{if (cfg.format == .json) "json" else "a JSON Schema"});
        cfg.format = .plain;
        cfg.format_text = "";
    }
}

/// `ollama-region` into cfg.region / cfg.region_text: empty (the whole frame), or x,y,w,h as
/// whole numbers of px (x, y may be negative; w, h not) or as fractions of the frame's width
/// and height (a decimal point in any of the four, e.g. 0.5,0,0.5,1; each then 0-1).
/// Anything else is reported and the whole frame used.
fn readRegion(arena: std.mem.Allocator) error{OutOfMemory}!void {
    const s = vh.settings;
    const value = vh.config.get("ollama-region") orelse return;
    defer vh.free(value);
    const v = s.trim(value);
    if (v.len == 0) return;
    cfg.region = parseRegion(v) orelse
        return s.reportInvalid("ollama-region", value, "x,y,w,h in whole px or as fractions 0-1 of the frame, e.g. 0.5,0,0.5,1", "\"\" (the whole frame)");
    cfg.region_text = try arena.dupe(u8, v);
}

fn parseRegion(text: []const u8) ?Region {
    var parts: [4][]const u8 = undefined;
    var it = std.mem.splitScalar(u8, text, ',');
    var n: usize = 0;
    while (it.next()) |part| : (n += 1) {
        if (n == 4) return null;
        parts[n] = vh.settings.trim(part);
    }
    if (n != 4) return null;
    // A decimal point anywhere: fractions ("0.5,0,0.5,1"), all four 0-1.
    const fraction = std.mem.indexOfScalar(u8, text, '.') != null;
    if (fraction) {
        var f: [4]f32 = undefined;
        for (parts, &f) |part, *out| {
            out.* = vh.parseDecimal(part) orelse return null;
            if (out.* < 0 or out.* > 1) return null;
        }
        return .{ .fraction = f };
    }
    var px: [4]i64 = undefined;
    for (parts, &px, 0..) |part, *out, i| {
        out.* = std.fmt.parseInt(i32, part, 10) catch return null;
        if (i >= 2 and out.* < 0) return null; // a negative width or height
    }
    return .{ .px = px };
}

/// The region on a frame of `cols` × `rows` px, clamped to it (max exclusive), or null when
/// the rectangle is empty after clamping.
fn regionRect(region: Region, cols: u32, rows: u32) ?vh.Rect {
    const w: i64 = cols;
    const h: i64 = rows;
    var x0: i64 = undefined;
    var y0: i64 = undefined;
    var x1: i64 = undefined;
    var y1: i64 = undefined;
    switch (region) {
        .px => |r| {
            x0 = r[0];
            y0 = r[1];
            x1 = r[0] + r[2];
            y1 = r[1] + r[3];
        },
        .fraction => |r| {
            const fw: f32 = @floatFromInt(cols);
            const fh: f32 = @floatFromInt(rows);
            x0 = @intFromFloat(@round(r[0] * fw));
            y0 = @intFromFloat(@round(r[1] * fh));
            x1 = @intFromFloat(@round(@min(r[0] + r[2], 1) * fw));
            y1 = @intFromFloat(@round(@min(r[1] + r[3], 1) * fh));
        },
    }
    x0 = std.math.clamp(x0, 0, w);
    x1 = std.math.clamp(x1, 0, w);
    y0 = std.math.clamp(y0, 0, h);
    y1 = std.math.clamp(y1, 0, h);
    if (x1 <= x0 or y1 <= y0) return null;
    return .{
        .min = .{ .x = @intCast(x0), .y = @intCast(y0) },
        .max = .{ .x = @intCast(x1), .y = @intCast(y1) },
    };
}

/// Whether `text` is one valid JSON object.
fn isJsonObject(text: []const u8) bool {
    var doc = json.select(vh.allocator, text, &.{""}) catch return false;
    defer doc.deinit();
    const root = doc.get("") orelse return false;
    return root.kind == .object;
}

/// The settings in force, into the processor store as ollama/{key without "ollama-"} (see
/// the file comment), so that the host can show them (the viewer's fields).
fn storeSettings() void {
    var interval: [20]u8 = undefined;
    var min_interval: [20]u8 = undefined;
    var threshold: [24]u8 = undefined;
    const settings = [_][2][]const u8{
        .{ "url", cfg.url },
        .{ "api", cfg.protocol.name },
        .{ "server-name", cfg.server_name },
        .{ "model", cfg.model },
        .{ "prompt", cfg.prompt },
        .{ "interval-ms", std.fmt.bufPrint(&interval, "{d}", .{cfg.interval_ms}) catch unreachable },
        .{ "paused", if (cfg.paused) "true" else "false" },
        .{ "overlay", if (cfg.overlay) "true" else "false" },
        .{ "trigger", @tagName(cfg.trigger) },
        .{ "change-threshold", formatFraction(&threshold, cfg.change_threshold) },
        .{ "min-interval-ms", std.fmt.bufPrint(&min_interval, "{d}", .{cfg.min_interval_ms}) catch unreachable },
        .{ "format", cfg.format_text },
        .{ "region", cfg.region_text },
        .{ "show-region", if (cfg.show_region) "true" else "false" },
    };
    for (settings) |kv| {
        processorStore().set("ollama", kv[0], kv[1]) catch |err| return storeFailed(err);
    }
}

/// `v` (0–1) with up to 4 decimals, trailing zeros dropped ("0.01", "1"), without std's
/// float printing.
fn formatFraction(buf: *[24]u8, v: f32) []const u8 {
    const scaled: u32 = @intFromFloat(@round(std.math.clamp(v, 0, 1) * 10000));
    const text = std.fmt.bufPrint(buf, "{d}.{d:0>4}", .{ scaled / 10000, scaled % 10000 }) catch unreachable;
    return std.mem.trimEnd(u8, std.mem.trimEnd(u8, text, "0"), ".");
}

/// The run's processor store (created on first use).
fn processorStore() vh.datastore.Store {
    if (store == null) store = vh.datastore.Store.init();
    return store.?;
}

/// A processor-store write failed: logged the first time only.
fn storeFailed(err: vh.datastore.Error) void {
    if (store_failed_logged) return;
    store_failed_logged = true;
    // (a switch, not @errorName, which would link the names of every error in std)
    const why: []const u8 = switch (err) {
        error.NoSuchFrame => "no such frame",
        error.NoSuchKey => "no such key",
        error.RuntimeError => "runtime error",
    };
    vh.log.warnf("could not write to the processor store: {s}", .{why});
}

// ==========================================================================================
// Bounded text buffers
// ==========================================================================================

fn TextBuf(comptime capacity: usize) type {
    return struct {
        const Self = @This();
        buf: [capacity]u8 = undefined,
        len: usize = 0,

        fn slice(self: *const Self) []const u8 {
            return self.buf[0..self.len];
        }
        fn clear(self: *Self) void {
            self.len = 0;
        }
        /// Replaces the content; text longer than the capacity is cut at a char boundary.
        fn set(self: *Self, text: []const u8) void {
            const t = vh.utf8Prefix(text, capacity);
            @memcpy(self.buf[0..t.len], t);
            self.len = t.len;
        }
        /// Appends a JSON string value, decoded; what does not fit is dropped.
        fn appendJson(self: *Self, s: json.Value) void {
            _ = s.decodeAppend(&self.buf, &self.len);
        }
        /// Appends raw bytes; what does not fit is dropped.
        fn appendRaw(self: *Self, bytes: []const u8) void {
            const k = @min(bytes.len, capacity - self.len);
            @memcpy(self.buf[self.len..][0..k], bytes[0..k]);
            self.len += k;
        }
    };
}

// ==========================================================================================
// State
// ==========================================================================================

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
var partial: TextBuf(2048) = .{};
/// The last complete caption.
var caption: TextBuf(2048) = .{};
/// The overlay text of the last caption from ollama-overlay-template (when `templated_ok`).
var templated: TextBuf(2048) = .{};
var templated_ok = false;
/// Body of a non-200 reply (for its error text), or of a whole non-streamed reply.
var reply_body: TextBuf(16 * 1024) = .{};

const Health = enum { unknown, ok, problem };
var health: Health = .unknown;
/// The current problem message (shown on screen while there is no caption).
var problem: TextBuf(512) = .{};

var store: ?vh.datastore.Store = null;
var store_failed_logged = false;
var overlay_failed_logged = false;
var region_draw_failed_logged = false;
/// A region empty on the frame was reported (once per config read).
var region_empty_logged = false;

// ==========================================================================================
// The region (ollama-region): what is sent and watched
// ==========================================================================================

/// The frame being processed and, once needed, its region: a view (`mat.region`, sharing
/// the frame's pixels) made at most once a frame and dropped when `process` returns.
const FrameView = struct {
    frame: u32,
    rect_known: bool = false,
    /// The region in px on this frame (null: the whole frame).
    rect: ?vh.Rect = null,
    crop: ?vh.Mat = null,

    /// The region in px on this frame, or null for the whole frame (no region, or one empty
    /// on this frame: reported once).
    fn region(self: *FrameView) ?vh.Rect {
        if (self.rect_known) return self.rect;
        self.rect_known = true;
        const r = cfg.region orelse return null;
        const f = vh.Mat.borrow(self.frame);
        const cols = f.cols();
        const rows = f.rows();
        self.rect = regionRect(r, cols, rows);
        if (self.rect == null and !region_empty_logged) {
            region_empty_logged = true;
            vh.log.errf("config ollama-region=\"{s}\" is empty on a {d}x{d} frame once clamped to it; using the whole frame", .{ cfg.region_text, cols, rows });
        }
        return self.rect;
    }

    /// What is sent and watched: the region's view, or the frame.
    fn image(self: *FrameView) vh.Mat {
        if (self.crop) |c| return c;
        const rect = self.region() orelse return vh.Mat.borrow(self.frame);
        self.crop = vh.Mat.borrow(self.frame).region(rect);
        return self.crop.?;
    }

    fn deinit(self: *FrameView) void {
        if (self.crop) |c| c.drop();
        self.crop = null;
    }
};

/// ollama-show-region: a 2 px outline around the region, its inner line (the region's
/// border pixels) bright yellow and its outer line (just outside) black, so that it reads
/// on light and dark footage alike.
fn drawRegion(view: *FrameView) void {
    if (!cfg.show_region) return;
    const r = view.region() orelse return;
    const f = vh.Mat.borrow(view.frame);
    const inner: vh.Rect = .{ .min = r.min, .max = .{ .x = r.max.x - 1, .y = r.max.y - 1 } };
    const outer: vh.Rect = .{ .min = .{ .x = r.min.x - 1, .y = r.min.y - 1 }, .max = r.max };
    vh.cv.rectangle(f, outer, region_outer_color, 1) catch return regionDrawFailed();
    vh.cv.rectangle(f, inner, region_inner_color, 1) catch return regionDrawFailed();
}

const region_inner_color: vh.Rgba = .{ .r = 255, .g = 230, .b = 0, .a = 255 };
const region_outer_color: vh.Rgba = .{ .r = 0, .g = 0, .b = 0, .a = 255 };

fn regionDrawFailed() void {
    if (region_draw_failed_logged) return;
    region_draw_failed_logged = true;
    vh.log.warnf("ollama: drawing the region failed: {s}", .{vh.cv.lastError()});
}

// ==========================================================================================
// Triggers: the change check and the request counters
// ==========================================================================================

/// What started a request (counted as ollama/requests-NAME).
const Reason = enum { interval, change, heartbeat };

const thumb_w = 32;
const thumb_h = 18;
/// The current frame's grey thumbnail (valid when `thumb_valid`).
var cur_thumb: [thumb_w * thumb_h]u8 = undefined;
var thumb_valid = false;
/// The thumbnail of the frame sent with the last request (valid when `has_ref`).
var ref_thumb: [thumb_w * thumb_h]u8 = undefined;
var has_ref = false;
var thumb_failed_logged = false;

var requests_by: [std.enums.values(Reason).len]u64 = @splat(0);
var frames_unchanged: u64 = 0;
var frames_unchanged_stored: u64 = 0;
var unchanged_stored_us: u64 = 0;

/// Fills `cur_thumb` with `image` (the frame, or its region) shrunk to thumb_w × thumb_h grey pixels; false (logged
/// once) if the host could not make it.
fn thumbnail(image: vh.Mat) bool {
    // Two steps: bilinear to 4× the thumbnail, then area averaging (4 × 4 px a pixel). The
    // same scores on the clips in media/ as one area resize of the whole frame, ~6× cheaper.
    const mid = vh.cv.resize(image, .{ .x = 4 * thumb_w, .y = 4 * thumb_h }, 0, 0, .linear) catch
        return thumbFailed("resize");
    defer mid.drop();
    const small = vh.cv.resize(mid, .{ .x = thumb_w, .y = thumb_h }, 0, 0, .area) catch
        return thumbFailed("resize");
    defer small.drop();
    const grey: ?vh.Mat = if (small.mattype() == 0) null else vh.cv.cvtColor(small, .bgr_to_gray) catch
        return thumbFailed("cvt-color");
    defer if (grey) |g| g.drop();
    const g = grey orelse small;
    if (g.rows() != thumb_h or g.cols() != thumb_w) return thumbFailed("the thumbnail's size");
    var i: usize = 0;
    for (0..thumb_h) |r| {
        for (0..thumb_w) |c| {
            cur_thumb[i] = g.getUcharAt(@intCast(r), @intCast(c));
            i += 1;
        }
    }
    return true;
}

fn thumbFailed(what: []const u8) bool {
    if (!thumb_failed_logged) {
        thumb_failed_logged = true;
        vh.log.warnf("ollama: the change check failed ({s}: {s}); requests start only on the heartbeat", .{ what, vh.lastError() });
    }
    return false;
}

/// How much the scene changed since the last captioned frame: the mean absolute difference
/// of the two thumbnails / 255, 0–1.
fn changeScore() f32 {
    var sum: u32 = 0;
    for (cur_thumb, ref_thumb) |a, b| sum += if (a > b) a - b else b - a;
    return @as(f32, @floatFromInt(sum)) / @as(f32, @floatFromInt(cur_thumb.len * 255));
}

/// A request started for `reason`: its counter (and frames-unchanged, if it moved) into the
/// processor store.
fn countRequest(reason: Reason, now: u64) void {
    const i = @intFromEnum(reason);
    requests_by[i] += 1;
    var key_buf: [32]u8 = undefined;
    const key = std.fmt.bufPrint(&key_buf, "requests-{s}", .{@tagName(reason)}) catch unreachable;
    storeCount(key, requests_by[i]);
    if (frames_unchanged != frames_unchanged_stored) storeUnchanged(now);
}

fn storeUnchanged(now: u64) void {
    unchanged_stored_us = now;
    if (frames_unchanged == frames_unchanged_stored) return;
    frames_unchanged_stored = frames_unchanged;
    storeCount("frames-unchanged", frames_unchanged);
}

fn storeCount(key: []const u8, n: u64) void {
    var buf: [20]u8 = undefined;
    const text = std.fmt.bufPrint(&buf, "{d}", .{n}) catch unreachable;
    processorStore().set("ollama-stats", key, text) catch |err| storeFailed(err);
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
            thumb_valid = thumbnail(view.image());
            if (thumb_valid and (!has_ref or changeScore() > cfg.change_threshold)) return .change;
            const last = last_start_us orelse return .change; // the first frame (no thumbnail)
            if (cfg.interval_ms > 0 and now -| last >= cfg.interval_ms * std.time.us_per_ms) return .heartbeat;
            frames_unchanged += 1;
            if (now -| unchanged_stored_us >= std.time.us_per_s) storeUnchanged(now);
            return null;
        },
    }
}

fn startRequest(view: *FrameView, now: u64, reason: Reason) void {
    last_start_us = now;
    // The frame sent is the new reference for the change check.
    if (cfg.trigger == .change and thumb_valid) {
        ref_thumb = cur_thumb;
        has_ref = true;
    }
    // The host copies the image (scaled down) before post-frame returns: the region's view
    // may be dropped as soon as the frame is processed.
    const id = vh.fetch.postFrame(
        request_url,
        "application/json",
        template,
        view.image(),
        @intCast(cfg.image_max_side),
        @intCast(cfg.jpeg_quality),
    ) catch |err| {
        transportFailed(err, now);
        return;
    };
    request_id = id;
    countRequest(reason, now);
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
    has_ref = false; // no caption: the next request need not wait for a change
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
            .whole => |read| read(reply_body.slice()),
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
            errorText(reply_body.slice(), &text);
            if (text.len > 0) {
                fail("server error {d}: {s}", .{ reply_status, text.slice() });
            } else {
                fail("server error {d}", .{reply_status});
            }
        },
    }
}

/// The error message of an error reply `body`, decoded into `out` (nothing if there is none):
/// Ollama sends {"error":"text"}, OpenAI-compatible servers {"error":{"message":"text",…}}
/// (both read as far as the body is valid JSON), Cloudflare {"success":false,"errors":
/// [{"code":…,"message":"text"}]}.
fn errorText(body: []const u8, out: *TextBuf(300)) void {
    var doc = json.selectPrefix(vh.allocator, body, &.{ "/error", "/error/message" });
    defer doc.deinit();
    if (doc.get("/error")) |err| switch (err.kind) {
        .string => out.appendJson(err),
        .object => if (doc.get("/error/message")) |m| out.appendJson(m),
        else => {},
    };
    if (out.len > 0) return;
    var cloudflare = json.select(vh.allocator, body, &.{"/errors/0/message"}) catch return;
    defer cloudflare.deinit();
    if (cloudflare.get("/errors/0/message")) |m| out.appendJson(m);
}

fn fail(comptime fmt: []const u8, args: anytype) void {
    reply_open = false;
    partial.clear();
    has_ref = false; // no caption: the next request need not wait for a change
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
    cfg.protocol.reply.lines(line);
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
    processorStore().set("captions", "model", cfg.model) catch {};
    processorStore().set("captions", "caption", caption.slice()) catch |err| storeFailed(err);
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
    if (caption.len > 0) return if (templated_ok) templated.slice() else caption.slice();
    if (health == .problem) return problem.slice();
    return null;
}

/// The overlay text of the last caption from ollama-overlay-template (into `templated`,
/// `templated_ok`): each `{name}` replaced by the caption's top-level field `name` (a string
/// decoded, a number or boolean as written, null or missing `?`, an object or array as
/// compact JSON), `{{` and `}}` literal braces. Nothing (the caption is shown as it is)
/// without a template or when the caption is not a JSON object. Once per caption and per
/// config read.
fn renderTemplate() void {
    templated.clear();
    templated_ok = false;
    const template_text = cfg.overlay_template orelse return;
    if (caption.len == 0) return;
    var doc = json.select(vh.allocator, caption.slice(), &.{""}) catch return;
    defer doc.deinit();
    const root = doc.get("") orelse return;
    if (root.kind != .object) return;
    var i: usize = 0;
    while (i < template_text.len) {
        const c = template_text[i];
        if ((c == '{' or c == '}') and i + 1 < template_text.len and template_text[i + 1] == c) {
            templated.appendRaw(template_text[i .. i + 1]);
            i += 2;
            continue;
        }
        if (c == '{') {
            if (std.mem.indexOfScalarPos(u8, template_text, i + 1, '}')) |end| {
                appendField(root.text, template_text[i + 1 .. end]);
                i = end + 1;
                continue;
            }
        }
        templated.appendRaw(template_text[i .. i + 1]);
        i += 1;
    }
    templated_ok = true;
}

/// Appends top-level field `name` of the (valid) JSON object `doc` to `templated`, as
/// `renderTemplate` says.
fn appendField(doc: []const u8, name: []const u8) void {
    const raw = memberText(doc, name) orelse return templated.appendRaw("?");
    switch (raw[0]) {
        '"' => templated.appendJson(.{ .kind = .string, .text = raw }),
        'n' => templated.appendRaw("?"),
        '{', '[' => {
            // compact: the blanks outside strings dropped
            var in_string = false;
            var escaped = false;
            for (raw, 0..) |ch, k| {
                if (in_string) {
                    if (escaped) {
                        escaped = false;
                    } else if (ch == '\\') {
                        escaped = true;
                    } else if (ch == '"') {
                        in_string = false;
                    }
                } else if (ch == '"') {
                    in_string = true;
                } else if (ch == ' ' or ch == '\t' or ch == '\r' or ch == '\n') {
                    continue;
                }
                templated.appendRaw(raw[k .. k + 1]);
            }
        },
        else => templated.appendRaw(raw),
    }
}

/// The JSON text of top-level member `name` of the valid JSON object `doc` (the last one
/// when it repeats), or null when there is none.
fn memberText(doc: []const u8, name: []const u8) ?[]const u8 {
    var stack_buf: [256]u8 = undefined;
    var fba: std.heap.FixedBufferAllocator = .init(&stack_buf);
    var s: std.json.Scanner = .initCompleteInput(fba.allocator(), doc);
    if ((s.next() catch return null) != .object_begin) return null;
    var found: ?[]const u8 = null;
    while (true) {
        // the key, decoded (a longer one than the buffer matches nothing)
        var key: TextBuf(256) = .{};
        var fits = true;
        var escaped: [4]u8 = undefined;
        while (true) {
            const token = s.next() catch return found;
            const piece: []const u8 = switch (token) {
                .object_end => return found,
                .partial_string, .string => |p| p,
                inline .partial_string_escaped_1,
                .partial_string_escaped_2,
                .partial_string_escaped_3,
                .partial_string_escaped_4,
                => |bytes| blk: {
                    @memcpy(escaped[0..bytes.len], &bytes);
                    break :blk escaped[0..bytes.len];
                },
                else => return found,
            };
            if (piece.len > 256 - key.len) fits = false;
            key.appendRaw(piece);
            if (token == .string) break;
        }
        const start = s.cursor;
        s.skipValue() catch return found;
        if (fits and std.mem.eql(u8, key.slice(), name)) {
            found = std.mem.trim(u8, doc[start..s.cursor], " \t\r\n:,");
        }
    }
}

fn drawOverlay(frame: u32) void {
    if (!cfg.overlay) return; // ollama-overlay=false: another processor draws the caption
    const text = overlayText() orelse return;
    vh.overlay.caption(
        vh.Mat.borrow(frame),
        text,
        cfg.placement,
        cfg.font_scale,
        text_color,
        band_color,
        @intCast(cfg.max_lines),
    ) catch {
        if (!overlay_failed_logged) {
            overlay_failed_logged = true;
            vh.log.warnf("overlay.caption failed: {s}", .{vh.cv.lastError()});
        }
    };
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
    var view: FrameView = .{ .frame = frame };
    defer view.deinit();
    if (request_id) |id| pollRequest(id, now);
    if (timeToStart(&view, now)) |reason| startRequest(&view, now, reason);
    drawRegion(&view); // after the request: the outline is not sent
    drawOverlay(frame);
    return frame;
}
