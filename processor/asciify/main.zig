//! asciify: renders every frame as ASCII art, white characters on black, one character per
//! cell of a grid laid over the frame (after wasmVision's asciify processor).
//!
//! Config (read on the first frame; an invalid value is logged once and the default used):
//! * `asciify-columns`: characters per row, integer 8–320 (default 80).
//! * `asciify-rows`: rows of characters, integer 0–240 (default 0: derived from the columns
//!   and the frame's aspect ratio, for cells twice as tall as wide).
//! * `asciify-equalize`: `true` spreads the brightness of the downscaled frame over the whole
//!   character ramp (histogram equalisation) so low-contrast scenes stay legible; `false`
//!   maps brightness linearly (default `true`).
//! * `asciify-print`: `true` also prints the art on the host's standard output every frame
//!   (logging.println), as wasmVision's processor does (default `false`).
//!
//! Each frame is downscaled to columns × rows px (area interpolation), turned gray and
//! (by default) equalised; the brightness of each px picks a character from
//! " .,:;i1tfLCG08@" (dark to bright). A row of brightness values is read with one
//! get-vecb-at call on the gray image reshaped to `columns` channels (one host call per
//! row, not per cell). Each row is drawn with put-text (Hershey plain, sized to the cells)
//! onto a new black mat of the frame's size and type, which is returned (the host takes it
//! over and drops the input frame). The intermediate mats are dropped every frame. If a
//! step fails the frame passes on unchanged and the host's message is logged once.
const std = @import("std");
const vh = @import("vh");

pub const panic = vh.panic;

/// Characters from dark to bright.
const ramp = " .,:;i1tfLCG08@";
const max_columns = 320;
/// Mean advance of the ramp's characters in Hershey plain at scale 1.0, in px.
const plain_advance = 8.2;
const white: vh.Rgba = .{ .r = 255, .g = 255, .b = 255, .a = 255 };

var configured = false;
var columns: u32 = 80;
var fixed_rows: u32 = 0;
var print = false;
var equalize = true;
var failure_logged = false;

fn configure() void {
    configured = true;
    columns = @intCast(vh.settings.int("asciify-columns", 80, 8, max_columns, "an integer 8-320"));
    fixed_rows = @intCast(vh.settings.int("asciify-rows", 0, 0, 240, "an integer 0-240"));
    print = readBool("asciify-print", false);
    equalize = readBool("asciify-equalize", true);
}

fn readBool(key: []const u8, default: bool) bool {
    const value = vh.config.get(key) orelse return default;
    defer vh.free(value);
    const v = vh.settings.trim(value);
    if (std.ascii.eqlIgnoreCase(v, "true")) return true;
    if (std.ascii.eqlIgnoreCase(v, "false")) return false;
    vh.log.errf("config {s}=\"{s}\" is invalid (expected true or false); using {}", .{ key, vh.utf8Prefix(value, 64), default });
    return default;
}

fn failed(what: []const u8) u32 {
    if (!failure_logged) {
        failure_logged = true;
        vh.log.warnf("asciify: {s} failed: {s}; passing frames through unchanged", .{ what, vh.lastError() });
    }
    return 0;
}

/// The ASCII rendering of `frame` as a new mat, or 0 on failure.
fn render(frame: vh.Mat) u32 {
    const width = frame.cols();
    const height = frame.rows();
    if (width == 0 or height == 0) return 0;
    const rows: u32 = if (fixed_rows > 0) fixed_rows else @max(1, (columns * height + width) / (2 * width));

    const small = vh.cv.resize(frame, .{ .x = @intCast(columns), .y = @intCast(rows) }, 0, 0, .area) catch return failed("resize");
    defer small.drop();
    const plain = if (small.mattype() == 0) small.clone() else vh.cv.cvtColor(small, .bgr_to_gray) catch return failed("cvt-color");
    const gray = if (equalize) blk: {
        defer plain.drop();
        break :blk vh.cv.equalizeHist(plain) catch return failed("equalize-hist");
    } else plain;
    defer gray.drop();

    // One host call per row instead of one per cell: seen as a mat of `columns` channels,
    // each row of the gray image is a single pixel, which get-vecb-at returns whole.
    const packed_rows = gray.reshape(columns, 0) catch return failed("reshape");
    defer packed_rows.drop();

    // new-with-size takes the number of ROWS first (wasmVision's runtime quirk, kept by the host).
    const out = vh.Mat.newWithSize(height, width, frame.mattype());
    drawRows(out, packed_rows, rows) catch |err| {
        out.drop();
        return failed(@errorName(err));
    };
    return out.handle;
}

/// Draws the `rows` character rows of the brightness rows of `packed_rows` onto `out`.
fn drawRows(out: vh.Mat, packed_rows: vh.Mat, rows: u32) error{ @"get-vecb-at", @"put-text" }!void {
    const cell_w = @as(f64, @floatFromInt(out.cols())) / @as(f64, @floatFromInt(columns));
    const cell_h = @as(f64, @floatFromInt(out.rows())) / @as(f64, @floatFromInt(rows));
    const font_scale = std.math.clamp(@min(cell_w / plain_advance, cell_h / 12.0), 0.1, 10.0);
    var line: [max_columns]u8 = undefined;
    var r: u32 = 0;
    while (r < rows) : (r += 1) {
        const values = packed_rows.getVecbAt(r, 0);
        defer vh.free(values);
        if (values.len != columns) return error.@"get-vecb-at";
        for (line[0..columns], values) |*ch, v| ch.* = ramp[@as(usize, v) * ramp.len / 256];
        const baseline: i32 = @intFromFloat(@as(f64, @floatFromInt(r)) * cell_h + cell_h * 0.8);
        vh.cv.putText(out, line[0..columns], .{ .x = 0, .y = baseline }, .plain, font_scale, white, 1) catch
            return error.@"put-text";
        if (print) vh.log.println(line[0..columns]);
    }
}

export fn process(frame: u32) u32 {
    if (!configured) configure();
    const out = render(vh.Mat.borrow(frame));
    return if (out != 0) out else frame;
}
