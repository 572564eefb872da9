//! The region (`ollama-region`): its value parsed, worked out on each frame, the view of
//! the frame that is sent and watched, and its outline (`ollama-show-region`).
const std = @import("std");
const vh = @import("vh");
const Config = @import("config.zig").Config;

var draw_failed_logged = false;
/// A region empty on the frame was reported (once per config read).
var empty_logged = false;

/// The config was read again: a region empty on a frame is reported again.
pub fn configRead() void {
    empty_logged = false;
}

/// `ollama-region`: the part of the frame sent and watched, x,y,w,h in px or as fractions
/// of the frame's width and height (worked out against each frame's size: `regionRect`).
pub const Region = union(enum) {
    px: [4]i64,
    fraction: [4]f32,
};

/// `ollama-region`'s value (trimmed, not empty), or null when it is not a region.
pub fn parse(text: []const u8) ?Region {
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

/// The frame being processed and, once needed, its region: a view (`mat.region`, sharing
/// the frame's pixels) made at most once a frame and dropped when `process` returns.
pub const FrameView = struct {
    frame: u32,
    cfg: *const Config,
    rect_known: bool = false,
    /// The region in px on this frame (null: the whole frame).
    rect: ?vh.Rect = null,
    crop: ?vh.Mat = null,

    /// The region in px on this frame, or null for the whole frame (no region, or one empty
    /// on this frame: reported once).
    pub fn region(self: *FrameView) ?vh.Rect {
        if (self.rect_known) return self.rect;
        self.rect_known = true;
        const cfg = self.cfg;
        const r = cfg.region orelse return null;
        const f = vh.Mat.borrow(self.frame);
        const cols = f.cols();
        const rows = f.rows();
        self.rect = regionRect(r, cols, rows);
        if (self.rect == null and !empty_logged) {
            empty_logged = true;
            vh.log.errf("config ollama-region=\"{s}\" is empty on a {d}x{d} frame once clamped to it; using the whole frame", .{ cfg.region_text, cols, rows });
        }
        return self.rect;
    }

    /// What is sent and watched: the region's view, or the frame.
    pub fn image(self: *FrameView) vh.Mat {
        if (self.crop) |c| return c;
        const rect = self.region() orelse return vh.Mat.borrow(self.frame);
        self.crop = vh.Mat.borrow(self.frame).region(rect);
        return self.crop.?;
    }

    pub fn deinit(self: *FrameView) void {
        if (self.crop) |c| c.drop();
        self.crop = null;
    }
};

/// ollama-show-region: a 2 px outline around the region, its inner line (the region's
/// border pixels) bright yellow and its outer line (just outside) black, so that it reads
/// on light and dark footage alike.
pub fn draw(view: *FrameView) void {
    if (!view.cfg.show_region) return;
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
    if (draw_failed_logged) return;
    draw_failed_logged = true;
    vh.log.warnf("ollama: drawing the region failed: {s}", .{vh.cv.lastError()});
}
