//! Configuration: the settings (`Config`, read from the stream's config with defaults and
//! validation; see the table in main.zig) and the settings in force, stored for the host.
const std = @import("std");
const vh = @import("vh");
const json = vh.json;
const protocols_mod = @import("protocols.zig");
const Protocol = protocols_mod.Protocol;
const protocols = protocols_mod.protocols;
const protocol_names = protocols_mod.protocol_names;
const Region = @import("region.zig").Region;
const parseRegion = @import("region.zig").parse;
const store = @import("store.zig");

pub const Config = struct {
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
    /// `ollama-frames`: frames per request (1: the current frame only, as before).
    frames: u64 = 1,
    /// `ollama-frames-span-ms`: the frames are spread over this many ms before the newest.
    frames_span_ms: u64 = 2000,
    /// `ollama-frames-layout` in force (always .grid for a single-image protocol).
    frames_layout: FramesLayout = .images,
};

/// `ollama-frames-layout`: several frames as separate images, or tiled into one image.
pub const FramesLayout = enum { images, grid };


/// `ollama-format`: plain text (empty), any JSON object ("json"), or a JSON Schema.
pub const Format = enum { plain, json, schema };

/// `ollama-trigger`: what starts a request (see the file comment).
pub const Trigger = enum { interval, change };
/// `ollama-change-threshold`'s default: above the noise of a still camera (JPEG and sensor
/// noise score ≤ 0.003 on the clips in media/), below a person or a car entering (0.01–0.02
/// within a frame or two of their arrival, up to 0.1–0.2 once in view).
pub const default_change_threshold: f32 = 0.01;

/// Longest `ollama-server-name` kept (bytes, cut at a character boundary).
const max_server_name = 200;

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

/// Reads the config into `cfg` (the texts into `arena`).
pub fn read(arena: std.mem.Allocator, cfg: *Config) error{OutOfMemory}!void {
    const s = vh.settings;
    const d: Config = .{};
    const server_name = try s.optionalText(arena, "ollama-server-name");
    cfg.* = .{
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
        .frames = @intCast(s.int("ollama-frames", d.frames, 1, 8, "an integer 1-8")),
        .frames_span_ms = @intCast(s.int("ollama-frames-span-ms", d.frames_span_ms, 100, 60_000, "an integer 100-60000 ms")),
        .frames_layout = s.choice(FramesLayout, "ollama-frames-layout", d.frames_layout, .ignore_case),
    };
    cfg.server_name = if (server_name) |name| vh.utf8Prefix(name, max_server_name) else cfg.protocol.server_name;
    cfg.server_named = server_name != null;
    try readFormat(arena, cfg);
    try readRegion(arena, cfg);
    singleImageLayout(cfg);
    cfg.overlay_template = try s.optionalText(arena, "ollama-overlay-template");
}

/// `ollama-format` into cfg.format / cfg.format_text: empty, `json` (any case) or a JSON
/// object (the schema, kept as given). Anything else is reported and plain text used; so is
/// a JSON format with workers-ai, whose LLaVA API has no such field (reported).
fn readFormat(arena: std.mem.Allocator, cfg: *Config) error{OutOfMemory}!void {
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

/// A protocol that takes one image (Workers AI's LLaVA) gets several frames as a grid: said
/// once per config read when the layout asked for (or the default) was separate images.
fn singleImageLayout(cfg: *Config) void {
    if (!cfg.protocol.single_image) return;
    if (cfg.frames > 1 and cfg.frames_layout == .images) {
        vh.log.infof("ollama-frames={d}: {s} takes one image per request; the frames are sent tiled into one grid image (ollama-frames-layout=grid)", .{ cfg.frames, cfg.protocol.server_name });
    }
    cfg.frames_layout = .grid;
}

/// `ollama-region` into cfg.region / cfg.region_text: empty (the whole frame), or x,y,w,h as
/// whole numbers of px (x, y may be negative; w, h not) or as fractions of the frame's width
/// and height (a decimal point in any of the four, e.g. 0.5,0,0.5,1; each then 0-1).
/// Anything else is reported and the whole frame used.
fn readRegion(arena: std.mem.Allocator, cfg: *Config) error{OutOfMemory}!void {
    const s = vh.settings;
    const value = vh.config.get("ollama-region") orelse return;
    defer vh.free(value);
    const v = s.trim(value);
    if (v.len == 0) return;
    cfg.region = parseRegion(v) orelse
        return s.reportInvalid("ollama-region", value, "x,y,w,h in whole px or as fractions 0-1 of the frame, e.g. 0.5,0,0.5,1", "\"\" (the whole frame)");
    cfg.region_text = try arena.dupe(u8, v);
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
pub fn storeSettings(cfg: *const Config) void {
    var interval: [20]u8 = undefined;
    var min_interval: [20]u8 = undefined;
    var threshold: [24]u8 = undefined;
    var frames: [20]u8 = undefined;
    var span: [20]u8 = undefined;
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
        .{ "frames", std.fmt.bufPrint(&frames, "{d}", .{cfg.frames}) catch unreachable },
        .{ "frames-span-ms", std.fmt.bufPrint(&span, "{d}", .{cfg.frames_span_ms}) catch unreachable },
        .{ "frames-layout", @tagName(cfg.frames_layout) },
    };
    for (settings) |kv| {
        store.get().set("ollama", kv[0], kv[1]) catch |err| return store.failed(err);
    }
}

/// `v` (0–1) with up to 4 decimals, trailing zeros dropped ("0.01", "1"), without std's
/// float printing.
fn formatFraction(buf: *[24]u8, v: f32) []const u8 {
    const scaled: u32 = @intFromFloat(@round(std.math.clamp(v, 0, 1) * 10000));
    const text = std.fmt.bufPrint(buf, "{d}.{d:0>4}", .{ scaled / 10000, scaled % 10000 }) catch unreachable;
    return std.mem.trimEnd(u8, std.mem.trimEnd(u8, text, "0"), ".");
}
