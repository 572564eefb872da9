//! blur: box-blurs every frame with a square kernel and passes the blurred copy on.
//!
//! Config: `blur-size` = kernel side in px (integer 1–1000, default 25).
//! The returned mat is new each frame; the host takes it over (and drops the input frame),
//! so this processor drops nothing.
const std = @import("std");
const vh = @import("vh");

pub const panic = vh.panic;

const default_size: i32 = 25;

/// Kernel side in px; 0 until read from config on the first frame.
var kernel: i32 = 0;
/// A failed blur is logged once, not every frame.
var blur_failed_logged = false;

fn readKernel() i32 {
    const value = vh.config.get("blur-size") orelse return default_size;
    defer vh.free(value);
    const k = std.fmt.parseInt(i32, std.mem.trim(u8, value, " \t"), 10) catch 0;
    if (k < 1 or k > 1000) {
        vh.log.errf("config blur-size=\"{s}\" is invalid (expected an integer 1-1000 px); using {d}", .{ vh.utf8Prefix(value, 64), default_size });
        return default_size;
    }
    return k;
}

export fn process(frame: u32) u32 {
    if (kernel == 0) kernel = readKernel();
    const blurred = vh.cv.blur(vh.Mat.borrow(frame), .{ .x = kernel, .y = kernel }) catch {
        if (!blur_failed_logged) {
            blur_failed_logged = true;
            vh.log.warnf("blur failed: {s}; passing frames through unchanged", .{vh.cv.lastError()});
        }
        return frame;
    };
    return blurred.handle;
}
