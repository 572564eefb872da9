//! ollama-blocking: wasmVision's synchronous captioning design, for comparison (`vision-host
//! bench` runs it beside `ollama`). Every `ollama-interval-ms` it sends the frame through the
//! blocking `wasmvision:platform/http.post-image` to Ollama's /api/generate with
//! `"stream": false` and waits, inside `process`, for the whole answer: the video stops for
//! the server's latency each time. The caption is drawn like `ollama`'s and stored as
//! captions/caption. Use `ollama` for real work; this one exists to measure what it avoids.
//!
//! Config (read once): ollama-url (http://localhost:11434), ollama-model (llava),
//! ollama-prompt, ollama-interval-ms (3000). The host's wall-clock cap on one call
//! (`call_hard_timeout_ms`, 1 s by default) also caps the wait: raise it to let a slower
//! server answer.
const std = @import("std");
const vh = @import("vh");

pub const panic = vh.panic;

var configured = false;
var url: []const u8 = "";
var template: []const u8 = "";
var interval_us: u64 = 3_000_000;
var last_start_us: ?u64 = null;
var caption_buf: [2048]u8 = undefined;
var caption: []const u8 = "";
var store: ?vh.datastore.Store = null;

const white: vh.Rgba = .{ .r = 255, .g = 255, .b = 255, .a = 255 };
const band: vh.Rgba = .{ .r = 0, .g = 0, .b = 0, .a = 200 };

fn text(key: []const u8, default: []const u8) []const u8 {
    const value = vh.config.get(key) orelse return default;
    return std.mem.trim(u8, value, " \t\r\n"); // kept for the life of the instance
}

fn configure() !void {
    configured = true;
    const base = std.mem.trimEnd(u8, text("ollama-url", "http://localhost:11434"), "/");
    url = try std.mem.concat(vh.allocator, u8, &.{ base, "/api/generate" });
    var out: std.Io.Writer.Allocating = .init(vh.allocator);
    const w = &out.writer;
    try w.writeAll("{\"images\":[\"%IMAGE%\"],\"model\":");
    try std.json.Stringify.encodeJsonString(text("ollama-model", "llava"), .{}, w);
    try w.writeAll(",\"prompt\":");
    try std.json.Stringify.encodeJsonString(text("ollama-prompt", "Describe what is in this picture in 6 words or less."), .{}, w);
    try w.writeAll(",\"stream\":false}");
    template = try out.toOwnedSlice();
    const ms = vh.settings.int("ollama-interval-ms", 3000, 0, 86_400_000, "an integer 0-86400000 ms");
    interval_us = @as(u64, @intCast(ms)) * std.time.us_per_ms;
}

export fn process(frame: u32) u32 {
    if (!configured) configure() catch @panic("out of memory reading the config");
    const mat = vh.Mat.borrow(frame);
    const now = vh.time.nowUs();
    if (last_start_us == null or now -| last_start_us.? >= interval_us) {
        last_start_us = now;
        if (vh.http.postImage(url, "application/json", template, "response", mat)) |reply| {
            defer vh.free(reply);
            const t = vh.utf8Prefix(std.mem.trim(u8, reply, " \t\r\n"), caption_buf.len);
            @memcpy(caption_buf[0..t.len], t);
            caption = caption_buf[0..t.len];
            if (store == null) store = vh.datastore.Store.init();
            store.?.set("captions", "caption", caption) catch {};
        } else |err| {
            vh.log.warnf("ollama-blocking: request failed: {s}", .{@errorName(err)});
        }
    }
    if (caption.len > 0) vh.overlay.caption(mat, caption, .bottom, 0.6, white, band, 3) catch {};
    return frame;
}
