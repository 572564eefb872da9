//! captions: draws the caption another processor left in the processor store (processor
//! "captions", key "caption": where the ollama processor keeps its latest scene
//! description) onto every frame, as lines of a few words each, from the top-left corner
//! down (after wasmVision's captions processor).
//!
//! Config (read on the first frame; an invalid value is logged once and the default used):
//! * `caption-words-per-line`: words per line, integer 1–100 (default 10).
//! * `caption-size`: font scale, a decimal number 0.1–10 (default 0.6; 1.0 ≈ 22 px tall).
//! * `caption-line-height`: px from the top of the frame to the first baseline and from one
//!   baseline to the next, integer 1–1000 (default 20).
//! * `caption-color`: black, white, red, green, blue or yellow (default black).
//! * `caption-outline`: true or false (default true): each line is first drawn 4 px thicker
//!   in the contrasting colour (white around black, red and blue; black around white, green
//!   and yellow), so that every letter stays readable whatever is behind it. Without it
//!   (wasmVision's plain text) black letters vanish on a dark part of the frame: on the
//!   shipped bottle clip, whose left edge is a dark strip, the first letter looked cut off.
//!
//! Text: Hershey simplex, 2 px thick, lines starting 10 px from the left edge; lines that
//! would start below the frame are not drawn; Hershey fonts have ASCII glyphs only. The
//! caption is drawn on the frame in place and the frame passed on; frames pass unchanged
//! while there is no caption. Nothing is allocated per frame but the caption the host
//! returns, freed before `process` returns.
const std = @import("std");
const vh = @import("vh");

pub const panic = vh.panic;

const store_processor = "captions";
const store_key = "caption";
const left_margin = 10;
const thickness = 2;
/// Extra px of the outline's strokes (2 px on each side of the letter's).
const outline_extra = 4;

const Config = struct {
    words_per_line: usize = 10,
    size: f32 = 0.6,
    line_height: i32 = 20,
    color: vh.Rgba = colors[0].rgba,
    /// The outline's colour, or null for none (`caption-outline=false`).
    outline: ?vh.Rgba = colors[0].outline,
};

const white: vh.Rgba = .{ .r = 255, .g = 255, .b = 255, .a = 255 };
const black: vh.Rgba = .{ .r = 0, .g = 0, .b = 0, .a = 255 };

/// A `caption-color` name, its colour and the contrasting colour of its outline.
const NamedColor = struct { name: []const u8, rgba: vh.Rgba, outline: vh.Rgba };
const colors = [_]NamedColor{
    .{ .name = "black", .rgba = black, .outline = white },
    .{ .name = "white", .rgba = white, .outline = black },
    .{ .name = "red", .rgba = .{ .r = 255, .g = 0, .b = 0, .a = 255 }, .outline = white },
    .{ .name = "green", .rgba = .{ .r = 0, .g = 255, .b = 0, .a = 255 }, .outline = black },
    .{ .name = "blue", .rgba = .{ .r = 0, .g = 0, .b = 255, .a = 255 }, .outline = white },
    .{ .name = "yellow", .rgba = .{ .r = 255, .g = 255, .b = 0, .a = 255 }, .outline = black },
};

var cfg: Config = .{};
var configured = false;
var store: ?vh.datastore.Store = null;
var store_error_logged = false;
var draw_error_logged = false;

fn configure() void {
    configured = true;
    cfg.words_per_line = @intCast(vh.settings.int("caption-words-per-line", 10, 1, 100, "an integer 1-100"));
    cfg.size = vh.settings.decimal("caption-size", 0.6, 0.1, 10, "a number 0.1-10");
    cfg.line_height = @intCast(vh.settings.int("caption-line-height", 20, 1, 1000, "an integer 1-1000 px"));
    const named = if (vh.config.get("caption-color")) |value| blk: {
        defer vh.free(value);
        for (colors) |c| {
            if (std.ascii.eqlIgnoreCase(vh.settings.trim(value), c.name)) break :blk c;
        }
        vh.log.errf("config caption-color=\"{s}\" is invalid (expected black, white, red, green, blue or yellow); using black", .{vh.utf8Prefix(value, 64)});
        break :blk colors[0];
    } else colors[0];
    cfg.color = named.rgba;
    cfg.outline = if (readOutline()) named.outline else null;
}

/// `caption-outline`: true unless set to false (or 0); anything else is reported once.
fn readOutline() bool {
    const value = vh.config.get("caption-outline") orelse return true;
    defer vh.free(value);
    const v = vh.settings.trim(value);
    if (std.ascii.eqlIgnoreCase(v, "true") or std.mem.eql(u8, v, "1")) return true;
    if (std.ascii.eqlIgnoreCase(v, "false") or std.mem.eql(u8, v, "0")) return false;
    vh.log.errf("config caption-outline=\"{s}\" is invalid (expected true or false); using true", .{vh.utf8Prefix(value, 64)});
    return true;
}

/// The stored caption (owned: `vh.free`), or null when there is none.
fn storedCaption() ?[]u8 {
    if (store == null) store = vh.datastore.Store.init();
    return store.?.get(store_processor, store_key) catch |err| {
        if (err != error.NoSuchKey and !store_error_logged) {
            store_error_logged = true;
            vh.log.warn("could not read the caption from the processor store");
        }
        return null;
    };
}

/// Draws `text` as lines of `cfg.words_per_line` words; stops below the frame.
fn drawCaption(img: vh.Mat, text: []const u8) void {
    const rows: i64 = img.rows();
    var words = std.mem.tokenizeAny(u8, text, " \t\r\n");
    var line_buf: [1024]u8 = undefined;
    var y: i32 = cfg.line_height;
    while (y - cfg.line_height < rows) : (y += cfg.line_height) {
        var len: usize = 0;
        var n: usize = 0;
        while (n < cfg.words_per_line) : (n += 1) {
            const word = words.next() orelse break;
            const sep: usize = @intFromBool(len > 0);
            if (len + sep + word.len > line_buf.len) continue; // an absurdly long word: skipped
            if (sep == 1) line_buf[len] = ' ';
            @memcpy(line_buf[len + sep ..][0..word.len], word);
            len += sep + word.len;
        }
        if (n == 0) break;
        const org: vh.Point = .{ .x = left_margin, .y = y };
        if (cfg.outline) |outline| {
            putText(img, line_buf[0..len], org, outline, thickness + outline_extra) catch return;
        }
        putText(img, line_buf[0..len], org, cfg.color, thickness) catch return;
    }
}

/// One line of text; a failure is logged once.
fn putText(img: vh.Mat, line: []const u8, org: vh.Point, color: vh.Rgba, px: i32) error{Failed}!void {
    vh.cv.putText(img, line, org, .simplex, cfg.size, color, px) catch {
        if (!draw_error_logged) {
            draw_error_logged = true;
            vh.log.warnf("put-text failed: {s}", .{vh.lastError()});
        }
        return error.Failed;
    };
}

export fn process(frame: u32) u32 {
    if (!configured) configure();
    const caption = storedCaption() orelse return frame;
    defer vh.free(caption);
    drawCaption(vh.Mat.borrow(frame), caption);
    return frame;
}
