//! ollama: live captions from a vision-language server (Ollama with e.g. llava by default;
//! OpenAI-compatible servers and Cloudflare Workers AI too, see `ollama-api`), drawn on
//! every frame, without ever blocking the video.
//!
//! Per frame, `process` makes at most these host calls: `time.now`; `fetch.poll` while a
//! request is in flight; `fetch.post-frame` when it is time to start one; `overlay.caption`
//! (none with ollama-overlay=false). (Plus, only on events: `fetch.cancel` for a
//! timed-out/abandoned request, `processor-store.set` for a finished caption and for the
//! settings in force after the config was read, and a log line when the state changes.)
//!
//! Default protocol (ollama-api=generate: Ollama's API, POST {ollama-url}/api/generate,
//! content-type application/json):
//!
//!     {"images":["<base64 JPEG>"],"model":M,"prompt":P,"stream":true,"options":{"num_predict":N}}
//!
//! The host fills in the image: this processor sends the body as a template whose first
//! `%IMAGE%` is the placeholder. "images" comes first so that a prompt (or model name)
//! containing the text %IMAGE% cannot be mistaken for it. With "stream":true the reply is
//! NDJSON, one object per line, arriving in pieces cut anywhere:
//!
//!     {"model":"llava","created_at":"…","response":" A","done":false}
//!     …
//!     {"model":"llava","created_at":"…","response":"","done":true,"done_reason":"stop",…}
//!
//! Other protocols (`ollama-api`), each streamed:
//!   chat    POST {url}/api/chat with {"messages":[{"role":"user","images":["%IMAGE%"],
//!           "content":P}],…}; NDJSON lines carry `message.content` pieces and `done`.
//!   openai  POST {url}/v1/chat/completions ({url}/chat/completions when the URL ends in
//!           /v1) with the image as a content part `{"type":"image_url","image_url":
//!           {"url":"data:image/jpeg;base64,…"}}` and "max_tokens":N; the reply is
//!           server-sent events, `data: {chunk}` lines whose `choices[0].delta.content`
//!           are the pieces, complete at a `finish_reason` or `data: [DONE]`; errors are
//!           {"error":{"message":…}}.
//!           (vLLM, llama.cpp's server, LM Studio and Ollama's own /v1 speak it.)
//!   workers-ai  Cloudflare Workers AI: POST {url}/{model} (url = https://api.cloudflare.com/
//!           client/v4/accounts/ID/ai/run, model = @cf/llava-hf/llava-1.5-7b-hf) with
//!           {"image":[JPEG bytes as numbers],"prompt":P,"max_tokens":N}; one JSON reply
//!           {"result":{"description":…},"success":true}, errors as
//!           {"success":false,"errors":[{"code":…,"message":…}]}. Needs an API key:
//!           ollama-api-key-env names the variable, the host sends it (Authorization: Bearer).
//!
//! The pieces are appended to the caption as they arrive (shown at once); at
//! `"done":true` (or `[DONE]`) the caption is complete: trimmed, kept on screen until the next one
//! replaces it, stored in the datastore as captions/caption (wasmVision's `captions`
//! processor reads it there; captions/model is the model that wrote it) and logged. A line
//! {"error":"…"} reports a failure. HTTP 404 means the model is not there (for Ollama: not
//! pulled); other non-200 replies carry {"error":"…"}.
//!
//! The settings in force (defaults filled in, invalid values replaced by the defaults) are
//! stored in the processor store under processor "ollama" each time the config is read, one
//! key per setting, named as the config key without "ollama-": url, api, server-name, model,
//! prompt, interval-ms, paused, overlay (e.g. ollama/model = "llava"; the viewer shows them).
//!
//! Config (read on the first frame, and again on the next frame whenever the stream's config
//! changes while running, e.g. from the viewer: vision-host:platform/config-watch; an invalid
//! value is reported once with logging.error and replaced by the default):
//!   ollama-url               http://localhost:11434  (http(s) base URL; a trailing / is dropped)
//!   ollama-api               generate  generate | chat | openai | workers-ai (the wire protocol, above)
//!   ollama-model             llava
//!   ollama-prompt            Describe what is in this picture in highly complimentary terms using 6 words or less.
//!   ollama-interval-ms       3000   minimum time between request starts (0–86400000);
//!                                   a request starts only when none is in flight
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
//!   ollama-server-name       after ollama-api: Ollama (generate, chat), the OpenAI-compatible
//!                                   server (openai), Workers AI (workers-ai). Free text: how
//!                                   messages name the server ("cannot reach NAME at URL");
//!                                   blank = unset, cut at 200 bytes
//!
//! On screen: while a reply streams, its partial caption; otherwise the last complete
//! caption. Before the first caption nothing is drawn (no overlay call) unless there is a
//! problem, whose message is then shown (e.g. "cannot reach Ollama at …": every message
//! names the server as ollama-server-name says).
//!
//! State messages are logged once each time the state changes: logging.warn for problems,
//! logging.info when captions flow again. Connection failures back off exponentially
//! (1, 2, 4, … 30 s, reset once the server answers; "retrying in N s" gives the actual
//! wait, which is also never shorter than what remains of the interval); a destination
//! that the sandbox does not allow, or an invalid URL, stops all further requests.
//!
//! Memory is static and bounded: one 64 KiB NDJSON line buffer (a longer line counts as a
//! malformed reply), 2 KiB caption buffers (longer captions are cut at a character
//! boundary), a 4 KiB buffer for error replies; every buffer the host returns is freed.
const std = @import("std");
const vh = @import("vh");
const json = vh.json;

pub const panic = vh.panic;

// ==========================================================================================
// Configuration
// ==========================================================================================

/// The wire protocol (`ollama-api`).
const Api = enum {
    /// Ollama's POST /api/generate, NDJSON `response` pieces.
    generate,
    /// Ollama's POST /api/chat, NDJSON `message.content` pieces.
    chat,
    /// OpenAI chat completions (vLLM, llama.cpp's server, LM Studio, Ollama's /v1):
    /// POST …/chat/completions, SSE `choices[0].delta.content` pieces.
    openai,
    /// Cloudflare Workers AI (`@cf/llava-hf/llava-1.5-7b-hf`): POST {url}/{model}, one JSON
    /// reply `{"result":{"description":…},"success":true}` (the model does not stream).
    @"workers-ai",
};

const Config = struct {
    /// Base URL without trailing '/', e.g. "http://localhost:11434".
    url: []const u8 = "http://localhost:11434",
    api: Api = .generate,
    model: []const u8 = "llava",
    prompt: []const u8 = "Describe what is in this picture in highly complimentary terms using 6 words or less.",
    interval_ms: u64 = 3000,
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
    /// How messages name the server: `ollama-server-name`, else `defaultServerName(api)`.
    server_name: []const u8 = "Ollama",
    /// Whether `ollama-server-name` was given (then no `ollama pull` hint: the server may
    /// not be Ollama).
    server_named: bool = false,
};

/// How messages name a server of protocol `api` when `ollama-server-name` is not set.
fn defaultServerName(api: Api) []const u8 {
    return switch (api) {
        .generate, .chat => "Ollama",
        .openai => "the OpenAI-compatible server",
        .@"workers-ai" => "Workers AI",
    };
}

/// Longest `ollama-server-name` kept (bytes, cut at a character boundary).
const max_server_name = 200;

var cfg: Config = .{};
var configured = false;
/// config-watch version the current `cfg` was read at.
var config_version: u64 = 0;
/// Config values `cfg` points into (freed when the config is read again).
var held: [8][]u8 = undefined;
var held_len: usize = 0;
/// Where requests go, after `ollama-api`: "{url}/api/generate", "{url}/api/chat",
/// "{url}/v1/chat/completions" or "{url}/{model}".
var request_url: []const u8 = "";
/// The request body with the `%IMAGE%` placeholder (see the file comment).
var template: []const u8 = "";

const text_color: vh.Rgba = .{ .r = 255, .g = 255, .b = 255, .a = 255 };
const band_color: vh.Rgba = .{ .r = 0, .g = 0, .b = 0, .a = 200 };

fn trimmed(s: []const u8) []const u8 {
    return std.mem.trim(u8, s, " \t\r\n");
}

fn reportInvalid(key: []const u8, value: []const u8, expected: []const u8, default: anytype) void {
    const fmt_default = comptime if (@TypeOf(default) == []const u8) "{s}" else "{d}";
    vh.log.errf("config {s}=\"{s}\" is invalid (expected {s}); using the default " ++ fmt_default, .{
        key, vh.utf8Prefix(value, 200), expected, default,
    });
}

/// An integer setting in [min, max] (or exactly `also`, when given).
fn readInt(key: []const u8, default: u64, min: u64, max: u64, also: ?u64, expected: []const u8) u64 {
    const value = vh.config.get(key) orelse return default;
    defer vh.free(value);
    if (std.fmt.parseInt(u64, trimmed(value), 10)) |v| {
        if ((v >= min and v <= max) or (also != null and v == also.?)) return v;
    } else |_| {}
    reportInvalid(key, value, expected, default);
    return default;
}

fn readScale(key: []const u8, comptime default: f32) f32 {
    const value = vh.config.get(key) orelse return default;
    defer vh.free(value);
    if (vh.parseDecimal(trimmed(value))) |v| {
        if (v >= 0.1 and v <= 10) return v;
    }
    reportInvalid(key, value, "a number 0.1-10", @as([]const u8, std.fmt.comptimePrint("{d}", .{default})));
    return default;
}

fn readPlacement(key: []const u8, default: vh.overlay.Placement) vh.overlay.Placement {
    const value = vh.config.get(key) orelse return default;
    defer vh.free(value);
    const v = trimmed(value);
    if (std.ascii.eqlIgnoreCase(v, "bottom")) return .bottom;
    if (std.ascii.eqlIgnoreCase(v, "top")) return .top;
    reportInvalid(key, value, "top or bottom", @as([]const u8, @tagName(default)));
    return default;
}

/// The wire protocol (`ollama-api`).
fn readApi(key: []const u8, default: Api) Api {
    const value = vh.config.get(key) orelse return default;
    defer vh.free(value);
    return std.meta.stringToEnum(Api, trimmed(value)) orelse {
        reportInvalid(key, value, "generate, chat, openai or workers-ai", @as([]const u8, @tagName(default)));
        return default;
    };
}

/// A non-empty text setting without surrounding blanks, kept until the config is read again.
fn readText(key: []const u8, default: []const u8) []const u8 {
    const value = vh.config.get(key) orelse return default;
    const text = trimmed(value);
    if (text.len == 0) {
        reportInvalid(key, value, "a non-empty text", default);
        vh.free(value);
        return default;
    }
    hold(value);
    return text;
}

/// Keeps `value` until the next `configure` (cfg holds views into it).
fn hold(value: []u8) void {
    std.debug.assert(held_len < held.len);
    held[held_len] = value;
    held_len += 1;
}

/// An optional free-text setting without surrounding blanks (at most `max_len` bytes, cut at
/// a character boundary), kept until the config is read again; null when unset or blank.
fn readOptionalText(key: []const u8, max_len: usize) ?[]const u8 {
    const value = vh.config.get(key) orelse return null;
    const text = trimmed(value);
    if (text.len == 0) {
        vh.free(value);
        return null;
    }
    hold(value);
    return vh.utf8Prefix(text, max_len);
}

fn readBool(key: []const u8, default: bool) bool {
    const value = vh.config.get(key) orelse return default;
    defer vh.free(value);
    const v = trimmed(value);
    if (std.ascii.eqlIgnoreCase(v, "true") or std.mem.eql(u8, v, "1")) return true;
    if (std.ascii.eqlIgnoreCase(v, "false") or std.mem.eql(u8, v, "0")) return false;
    reportInvalid(key, value, "true or false", @as([]const u8, if (default) "true" else "false"));
    return default;
}

fn validUrl(url: []const u8) bool {
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

fn readUrl(key: []const u8, default: []const u8) []const u8 {
    const value = vh.config.get(key) orelse return default;
    const url = std.mem.trimEnd(u8, trimmed(value), "/");
    if (!validUrl(url)) {
        reportInvalid(key, value, "an http:// or https:// URL", default);
        vh.free(value);
        return default;
    }
    hold(value);
    return url; // a view into `value`, kept until the config is read again
}

fn configure() void {
    const first = !configured;
    configured = true;
    for (held[0..held_len]) |value| vh.free(value);
    held_len = 0;
    if (!first) {
        vh.allocator.free(request_url);
        vh.allocator.free(template);
    }
    const d: Config = .{};
    const server_name = readOptionalText("ollama-server-name", max_server_name);
    cfg = .{
        .url = readUrl("ollama-url", d.url),
        .api = readApi("ollama-api", d.api),
        .model = readText("ollama-model", d.model),
        .prompt = readText("ollama-prompt", d.prompt),
        .interval_ms = readInt("ollama-interval-ms", d.interval_ms, 0, 86_400_000, null, "an integer 0-86400000 ms"),
        .max_tokens = readInt("ollama-max-tokens", d.max_tokens, 1, 4096, null, "an integer 1-4096"),
        .image_max_side = readInt("ollama-image-max-side", d.image_max_side, 32, 16384, 0, "0 (full size) or an integer 32-16384 px"),
        .jpeg_quality = readInt("ollama-jpeg-quality", d.jpeg_quality, 1, 100, null, "an integer 1-100"),
        .timeout_ms = readInt("ollama-timeout-ms", d.timeout_ms, 1000, 3_600_000, null, "an integer 1000-3600000 ms"),
        .placement = readPlacement("ollama-caption-placement", d.placement),
        .font_scale = readScale("ollama-font-scale", d.font_scale),
        .max_lines = readInt("ollama-max-lines", d.max_lines, 1, 50, null, "an integer 1-50"),
        .paused = readBool("ollama-paused", d.paused),
        .overlay = readBool("ollama-overlay", d.overlay),
    };
    cfg.server_name = server_name orelse defaultServerName(cfg.api);
    cfg.server_named = server_name != null;
    request_url = buildRequestUrl() catch @panic("out of memory building the request URL");
    template = buildTemplate() catch @panic("out of memory building the request body");
    storeSettings();
    if (cfg.paused) {
        vh.log.infof("ollama: captions paused (ollama-paused=true)", .{});
    } else {
        vh.log.infof("ollama: captions from model {s} of {s} at {s} every {d} ms or slower", .{ cfg.model, cfg.server_name, cfg.url, cfg.interval_ms });
    }
}

/// The settings in force, into the processor store as ollama/{key without "ollama-"} (see
/// the file comment), so that the host can show them (the viewer's fields).
fn storeSettings() void {
    var interval: [20]u8 = undefined;
    const settings = [_][2][]const u8{
        .{ "url", cfg.url },
        .{ "api", @tagName(cfg.api) },
        .{ "server-name", cfg.server_name },
        .{ "model", cfg.model },
        .{ "prompt", cfg.prompt },
        .{ "interval-ms", std.fmt.bufPrint(&interval, "{d}", .{cfg.interval_ms}) catch unreachable },
        .{ "paused", if (cfg.paused) "true" else "false" },
        .{ "overlay", if (cfg.overlay) "true" else "false" },
    };
    for (settings) |kv| {
        processorStore().set("ollama", kv[0], kv[1]) catch |err| return storeFailed(err);
    }
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

fn buildRequestUrl() error{OutOfMemory}![]const u8 {
    const path = switch (cfg.api) {
        .generate => "/api/generate",
        .chat => "/api/chat",
        // An OpenAI base URL usually ends in /v1 already ("http://host:8000/v1").
        .openai => if (std.mem.endsWith(u8, cfg.url, "/v1")) "/chat/completions" else "/v1/chat/completions",
        // {url} is the account's …/ai/run endpoint, the model its path ("@cf/llava-hf/…").
        .@"workers-ai" => return std.mem.concat(vh.allocator, u8, &.{ cfg.url, "/", cfg.model }),
    };
    return std.mem.concat(vh.allocator, u8, &.{ cfg.url, path });
}

/// The request body; the image placeholder always precedes the model and the prompt.
fn buildTemplate() error{ OutOfMemory, WriteFailed }![]const u8 {
    var out: std.Io.Writer.Allocating = .init(vh.allocator);
    const w = &out.writer;
    switch (cfg.api) {
        .generate => {
            try w.writeAll("{\"images\":[\"%IMAGE%\"],\"model\":");
            try json.writeString(w, cfg.model);
            try w.writeAll(",\"prompt\":");
            try json.writeString(w, cfg.prompt);
            try w.print(",\"stream\":true,\"options\":{{\"num_predict\":{d}}}}}", .{cfg.max_tokens});
        },
        .chat => {
            try w.writeAll("{\"messages\":[{\"role\":\"user\",\"images\":[\"%IMAGE%\"],\"content\":");
            try json.writeString(w, cfg.prompt);
            try w.writeAll("}],\"model\":");
            try json.writeString(w, cfg.model);
            try w.print(",\"stream\":true,\"options\":{{\"num_predict\":{d}}}}}", .{cfg.max_tokens});
        },
        .openai => {
            try w.writeAll("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"," ++
                "\"image_url\":{\"url\":\"data:image/jpeg;base64,%IMAGE%\"}},{\"type\":\"text\",\"text\":");
            try json.writeString(w, cfg.prompt);
            try w.writeAll("}]}],\"model\":");
            try json.writeString(w, cfg.model);
            try w.print(",\"stream\":true,\"max_tokens\":{d}}}", .{cfg.max_tokens});
        },
        .@"workers-ai" => {
            // The host puts the JPEG's bytes as a JSON array of numbers at %IMAGE_BYTES%.
            try w.writeAll("{\"image\":%IMAGE_BYTES%,\"prompt\":");
            try json.writeString(w, cfg.prompt);
            try w.print(",\"max_tokens\":{d}}}", .{cfg.max_tokens});
        },
    }
    return out.toOwnedSlice();
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
        /// Appends a decoded JSON string; what does not fit is dropped.
        fn appendJson(self: *Self, s: json.String) void {
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
/// NDJSON lines of a 200 reply, reassembled across polls.
var lines: json.LineSplitter = .{ .buf = &line_storage };
/// The caption of the reply streaming now.
var partial: TextBuf(2048) = .{};
/// The last complete caption.
var caption: TextBuf(2048) = .{};
/// Body of a non-200 reply (for its error text), or of a whole non-streamed reply.
var error_body: TextBuf(16 * 1024) = .{};

const Health = enum { unknown, ok, problem };
var health: Health = .unknown;
/// The current problem message (shown on screen while there is no caption).
var problem: TextBuf(512) = .{};

var store: ?vh.datastore.Store = null;
var store_failed_logged = false;
var overlay_failed_logged = false;

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

fn timeToStart(now: u64) bool {
    if (stopped or cfg.paused or request_id != null) return false;
    if (now < retry_at_us) return false;
    const last = last_start_us orelse return true;
    return now -| last >= cfg.interval_ms * std.time.us_per_ms;
}

fn startRequest(frame: u32, now: u64) void {
    last_start_us = now;
    const id = vh.fetch.postFrame(
        request_url,
        "application/json",
        template,
        vh.Mat.borrow(frame),
        @intCast(cfg.image_max_side),
        @intCast(cfg.jpeg_quality),
    ) catch |err| {
        transportFailed(err, now);
        return;
    };
    request_id = id;
    reply_open = true;
    request_started_us = now;
    reply_status = 0;
    reply_lines = 0;
    lines.reset();
    partial.clear();
    error_body.clear();
}

/// Handles a fetch error from post-frame or poll (the id is already released).
fn transportFailed(err: vh.fetch.Error, now: u64) void {
    reply_open = false;
    partial.clear();
    const url = cfg.url;
    const name = cfg.server_name;
    switch (err) {
        error.ConnectionFailed => {
            backoff_s = if (backoff_s == 0) 1 else @min(backoff_s * 2, 30);
            retry_at_us = now + backoff_s * std.time.us_per_s;
            // The next start also waits for the interval; report the real wait.
            const next_interval = (last_start_us orelse now) + cfg.interval_ms * std.time.us_per_ms;
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
        if (reply_status == 200 and cfg.api != .@"workers-ai") {
            var it = lines.feed(progress.body);
            while (reply_open) {
                const item = it.next() orelse break;
                handleItem(item);
            }
        } else {
            error_body.appendRaw(progress.body);
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
        200 => {
            if (cfg.api == .@"workers-ai") return handleWorkersReply(error_body.slice());
            if (lines.finish()) |item| handleItem(item); // a last line without '\n'
            if (reply_open) malformed(); // the stream ended without "done":true
        },
        401, 403 => fail("{s} refused the credentials (HTTP {d}): set ollama-api-key-env to the variable holding the API key", .{ cfg.url, reply_status }),
        // Ollama's hint only where the server is Ollama as far as the config tells.
        404 => if (cfg.server_named or cfg.api == .openai or cfg.api == .@"workers-ai")
            fail("model {s} not found on {s} at {s}", .{ cfg.model, cfg.server_name, cfg.url })
        else
            fail("model {s} not found: run `ollama pull {s}`", .{ cfg.model, cfg.model }),
        else => {
            var text: TextBuf(300) = .{};
            errorText(error_body.slice(), &text);
            if (text.len > 0) {
                fail("server error {d}: {s}", .{ reply_status, text.slice() });
            } else {
                fail("server error {d}", .{reply_status});
            }
        },
    }
}

/// The "error" field of a JSON object `body`, decoded into `out` (nothing if not JSON).
/// Ollama sends {"error": "text"}, OpenAI-compatible servers {"error": {"message": "text", …}}.
fn errorText(body: []const u8, out: *TextBuf(300)) void {
    var r = json.ObjectReader.init(body) catch return;
    while (r.next() catch return) |f| {
        if (!f.key.eql("error")) continue;
        switch (f.value) {
            .string => |text| {
                out.clear();
                out.appendJson(text);
            },
            .object => |inner| if (field(inner, "message")) |m| if (m == .string) {
                out.clear();
                out.appendJson(m.string);
            },
            else => {},
        }
    }
    // Cloudflare's API envelope: {"success":false,"errors":[{"code":…,"message":…}]}.
    if (out.len == 0) if (field(body, "errors")) |errors| if (errors == .array) {
        var items = json.ArrayReader.init(errors.array) catch return;
        const first = (items.next() catch return) orelse return;
        if (first == .object) if (field(first.object, "message")) |m| if (m == .string) out.appendJson(m.string);
    };
}

/// A whole Workers AI reply: {"result":{"description":…},"success":true,…}, or
/// {"success":false,"errors":[{"code":…,"message":…}],…}.
fn handleWorkersReply(body: []const u8) void {
    const success = field(body, "success") orelse return malformed();
    if (success != .boolean) return malformed();
    if (!success.boolean) {
        var text: TextBuf(300) = .{};
        errorText(body, &text);
        return fail("server error: {s}", .{if (text.len > 0) text.slice() else "unknown"});
    }
    const result = field(body, "result") orelse return malformed();
    if (result != .object) return malformed();
    const description = field(result.object, "description") orelse return malformed();
    if (description != .string) return malformed();
    partial.clear();
    partial.appendJson(description.string);
    completeCaption();
}

/// The value of `key` in the JSON object `src` (the last one when repeated); null when
/// absent or when `src` is not a valid object.
fn field(src: []const u8, key: []const u8) ?json.Value {
    var found: ?json.Value = null;
    var r = json.ObjectReader.init(src) catch return null;
    while (r.next() catch return null) |f| {
        if (f.key.eql(key)) found = f.value;
    }
    return found;
}

fn fail(comptime fmt: []const u8, args: anytype) void {
    reply_open = false;
    partial.clear();
    setProblem(fmt, args);
}

fn malformed() void {
    fail("malformed reply from {s}", .{cfg.url});
}

/// One line of a 200 reply.
fn handleItem(item: json.LineSplitter.Item) void {
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
        return fail("{s} answered with an HTML page, not the {s} API: check ollama-url and ollama-api", .{ cfg.url, @tagName(cfg.api) });
    }
    switch (cfg.api) {
        .generate, .chat => handleNdjsonLine(line),
        .openai => handleSseLine(line),
        .@"workers-ai" => unreachable, // not line-based: see handleWorkersReply
    }
}

/// One server-sent-events line of an OpenAI stream (https://html.spec.whatwg.org/multipage/
/// server-sent-events.html): `data: {chunk}` lines carry the pieces, `data: [DONE]` ends
/// the stream; blank lines, comments and other fields are skipped.
fn handleSseLine(raw: []const u8) void {
    const line = std.mem.trimEnd(u8, raw, "\r");
    if (!std.mem.startsWith(u8, line, "data:")) return;
    const data = std.mem.trim(u8, line["data:".len..], " ");
    if (std.mem.eql(u8, data, "[DONE]")) return completeCaption();
    var err_value: ?json.Value = null;
    var choices: ?[]const u8 = null;
    var r = json.ObjectReader.init(data) catch return malformed();
    while (r.next() catch return malformed()) |f| {
        if (f.key.eql("error")) {
            err_value = f.value;
        } else if (f.key.eql("choices")) {
            if (f.value != .array) return malformed();
            choices = f.value.array;
        }
    }
    if (err_value != null) {
        var text: TextBuf(300) = .{};
        errorText(data, &text);
        return fail("server error: {s}", .{if (text.len > 0) text.slice() else "unknown"});
    }
    var items = json.ArrayReader.init(choices orelse return malformed()) catch return malformed();
    const first = (items.next() catch return malformed()) orelse return; // e.g. a usage-only chunk
    if (first != .object) return malformed();
    if (field(first.object, "delta")) |delta| {
        if (delta != .object) return malformed();
        if (field(delta.object, "content")) |content| switch (content) {
            .string => |piece| partial.appendJson(piece),
            .null => {},
            else => return malformed(),
        };
    }
    // "stop"/"length": the reply is complete even if the server never sends [DONE]. A stream
    // that just ends without one (Ollama's /v1 after a runner error) is a malformed reply.
    if (field(first.object, "finish_reason")) |reason| if (reason == .string) completeCaption();
}

/// One NDJSON line of an Ollama stream (/api/generate or /api/chat).
fn handleNdjsonLine(line: []const u8) void {
    var response: ?json.String = null;
    var done: ?bool = null;
    var err_text: ?json.String = null;
    var r = json.ObjectReader.init(line) catch return malformed();
    while (r.next() catch return malformed()) |f| {
        if (f.key.eql("response") and cfg.api == .generate) {
            if (f.value != .string) return malformed();
            response = f.value.string;
        } else if (f.key.eql("message") and cfg.api == .chat) {
            if (f.value != .object) return malformed();
            const content = field(f.value.object, "content") orelse return malformed();
            if (content != .string) return malformed();
            response = content.string;
        } else if (f.key.eql("done")) {
            if (f.value != .boolean) return malformed();
            done = f.value.boolean;
        } else if (f.key.eql("error")) {
            err_text = if (f.value == .string) f.value.string else .{ .raw = "" };
        }
    }
    if (err_text) |e| {
        var text: TextBuf(300) = .{};
        text.appendJson(e);
        return fail("error from {s}: {s}", .{ cfg.server_name, text.slice() });
    }
    if (response == null and done == null) return malformed();
    if (response) |piece| partial.appendJson(piece);
    if (done == true) completeCaption();
}

/// `"done":true`: the partial caption becomes the caption.
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
fn overlayText() ?[]const u8 {
    if (reply_open) {
        const streaming = trimmed(partial.slice());
        if (streaming.len > 0) return streaming;
    }
    if (caption.len > 0) return caption.slice();
    if (health == .problem) return problem.slice();
    return null;
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
    if (request_id) |id| pollRequest(id, now);
    if (timeToStart(now)) startRequest(frame, now);
    drawOverlay(frame);
    return frame;
}
