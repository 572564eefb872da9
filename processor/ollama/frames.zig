//! Several frames per request (`ollama-frames` > 1): copies of the image that is sent kept
//! in the host's ring of recent frames (`fetch.keep-frame`), the request started with
//! `fetch.post-frames`, and the sentence that tells the model what it is looking at.
//!
//! With N = ollama-frames and S = ollama-frames-span-ms, a copy is kept every S/(2·(N−1))
//! ms (at most one a frame, after the request of that frame, so a request never finds its
//! own frame in the ring) and the ring holds the newest 2·(N−1)+2 of them: twice as many
//! as a request picks, spread over a little more than S. The host picks, for each of the
//! N−1 moments now − S·(N−1−k)/(N−1), the kept copy nearest to it, then adds the current
//! frame (fewer at the start of a stream). The copies are made at the size they are sent
//! at: ollama-image-max-side with layout `images`; with `grid` that over the grid's columns
//! (ceil(√N)), at least 32 px (0, full size, stays full size). A change of ollama-region or
//! of that size empties the ring first (the copy kept then is the only one), so that a
//! request never mixes two regions.
const std = @import("std");
const vh = @import("vh");
const config = @import("config.zig");
const Config = config.Config;
const Region = @import("region.zig").Region;
const FrameView = @import("region.zig").FrameView;

/// When the last copy was kept (µs, the processor's clock), null before the first.
var last_keep_us: ?u64 = null;
/// The region and the longer side of the copies in the ring (see the file comment).
var kept_region: ?Region = null;
var kept_side: ?u32 = null;
var keep_failed_logged = false;

/// Smallest longer side of a grid tile's copy, px.
const min_tile_side = 32;

/// Whether requests carry several frames (ollama-frames > 1).
pub fn on(cfg: *const Config) bool {
    return cfg.frames > 1;
}

/// Whether the body repeats its image item once per frame (`%EACH%`…`%END%`): several
/// frames as separate images. (With one frame, or a grid, the body has one image.)
pub fn eachImage(cfg: *const Config) bool {
    return on(cfg) and cfg.frames_layout == .images;
}

/// Columns of the grid of `frames` tiles: ceil(√frames).
pub fn gridCols(frames: u64) u64 {
    var cols: u64 = 1;
    while (cols * cols < frames) cols += 1;
    return cols;
}

/// Time between two kept copies, µs: span / (2·(frames−1)). (Only with frames > 1.)
fn keepEveryUs(cfg: *const Config) u64 {
    return cfg.frames_span_ms * std.time.us_per_ms / (2 * (cfg.frames - 1));
}

/// Copies the ring holds: 2·(frames−1)+2.
fn capacity(cfg: *const Config) u32 {
    return @intCast(2 * (cfg.frames - 1) + 2);
}

/// The longer side of a kept copy, px (0 = full size): the size it is sent at.
fn copySide(cfg: *const Config) u32 {
    if (cfg.image_max_side == 0) return 0;
    return @intCast(switch (cfg.frames_layout) {
        .images => cfg.image_max_side,
        .grid => @max(cfg.image_max_side / gridCols(cfg.frames), min_tile_side),
    });
}

/// Keeps a copy of what is sent (the frame, or its region) in the host's ring when one is
/// due (with ollama-frames > 1; once every keepEveryUs). A failure is logged once: requests
/// then carry fewer frames.
pub fn keep(view: *FrameView, now: u64) void {
    const cfg = view.cfg;
    if (!on(cfg)) return;
    if (last_keep_us) |last| if (now -| last < keepEveryUs(cfg)) return;
    last_keep_us = now;
    const side = copySide(cfg);
    // Another region or size: the copy kept now is the only one (capacity 1 trims the ring).
    const fresh = kept_side != side or !std.meta.eql(kept_region, cfg.region);
    vh.fetch.keepFrame(view.image(), side, if (fresh) 1 else capacity(cfg)) catch {
        if (!keep_failed_logged) {
            keep_failed_logged = true;
            vh.log.warn("ollama: the host could not keep a copy of the frame for ollama-frames; requests carry fewer frames");
        }
        return;
    };
    kept_side = side;
    kept_region = cfg.region;
}

/// Starts the request with up to ollama-frames frames (see the file comment): as separate
/// images or as one grid, the current frame (`image`: the frame or its region) the newest.
pub fn post(url: []const u8, template: []const u8, image: vh.Mat, cfg: *const Config) vh.fetch.Error!u32 {
    const layout: vh.fetch.FramesLayout = switch (cfg.frames_layout) {
        .images => .images,
        .grid => .grid,
    };
    return vh.fetch.postFrames(
        url,
        "application/json",
        template,
        image,
        @intCast(cfg.image_max_side),
        @intCast(cfg.jpeg_quality),
        @intCast(cfg.frames),
        @intCast(cfg.frames_span_ms),
        layout,
    );
}

/// The prompt as sent (a JSON string): with ollama-frames > 1 a sentence saying what the
/// images are comes first, then ollama-prompt; otherwise ollama-prompt alone.
pub const Prompt = struct {
    cfg: *const Config,

    pub fn jsonStringify(self: Prompt, jw: *std.json.Stringify) std.Io.Writer.Error!void {
        if (!on(self.cfg)) return jw.write(self.cfg.prompt);
        var buf: [256]u8 = undefined;
        try jw.beginWriteRaw();
        try jw.writer.writeByte('"');
        try std.json.Stringify.encodeJsonStringChars(sentence(&buf, self.cfg), jw.options, jw.writer);
        try std.json.Stringify.encodeJsonStringChars(self.cfg.prompt, jw.options, jw.writer);
        try jw.writer.writeByte('"');
        jw.endWriteRaw();
    }
};

/// The sentence put before the prompt with ollama-frames > 1 (ends with a space).
pub fn sentence(buf: *[256]u8, cfg: *const Config) []const u8 {
    var secs: [24]u8 = undefined;
    const span = seconds(&secs, cfg.frames_span_ms);
    return switch (cfg.frames_layout) {
        .images => std.fmt.bufPrint(buf, "The images are consecutive moments of one video, oldest first, over the last {s} s. ", .{span}),
        .grid => std.fmt.bufPrint(buf, "The image is a grid of consecutive moments of one video over the last {s} s, oldest first, left to right then top to bottom, each labelled with its time in seconds before the newest. ", .{span}),
    } catch unreachable;
}

/// `ms` as seconds, trailing zeros dropped ("2", "1.5", "0.25").
fn seconds(buf: *[24]u8, ms: u64) []const u8 {
    const text = std.fmt.bufPrint(buf, "{d}.{d:0>3}", .{ ms / 1000, ms % 1000 }) catch unreachable;
    return std.mem.trimEnd(u8, std.mem.trimEnd(u8, text, "0"), ".");
}
