//! gaussianblur: Gaussian-blurs every frame and passes the blurred copy on (after
//! wasmVision's gaussianblur processor, which uses a fixed 25 px kernel and sigma 4.5).
//!
//! Config (read on the first frame; an invalid value is logged once and the default used):
//! * `gaussianblur-size`: kernel side in px, an odd integer 1–999 (default 25).
//! * `gaussianblur-sigma`: standard deviation in px, a decimal number 0–100 (default 4.5);
//!   0 derives it from the kernel side as OpenCV does (0.3 × ((size − 1) / 2 − 1) + 0.8).
//! Borders are reflected without repeating the edge pixel (OpenCV's BORDER_REFLECT_101).
//!
//! The returned mat is new each frame; the host takes it over (and drops the input frame),
//! so this processor drops nothing. If the blur fails the frame passes on unchanged and the
//! host's message is logged once.
const vh = @import("vh");

pub const panic = vh.panic;

const default_size = 25;
const default_sigma = 4.5;

var configured = false;
var kernel: i32 = default_size;
var sigma: f32 = default_sigma;
var failure_logged = false;

fn configure() void {
    configured = true;
    const k = vh.settings.int("gaussianblur-size", default_size, 1, 999, "an odd integer 1-999 px");
    if (@mod(k, 2) == 1) {
        kernel = @intCast(k);
    } else {
        vh.log.errf("config gaussianblur-size={d} is even (expected an odd integer 1-999 px); using {d}", .{ k, default_size });
    }
    sigma = vh.settings.decimal("gaussianblur-sigma", default_sigma, 0, 100, "a number 0-100 px");
}

export fn process(frame: u32) u32 {
    if (!configured) configure();
    const k: vh.Size = .{ .x = kernel, .y = kernel };
    const blurred = vh.cv.gaussianBlur(vh.Mat.borrow(frame), k, sigma, sigma, .reflect101) catch {
        if (!failure_logged) {
            failure_logged = true;
            vh.log.warnf("gaussian-blur failed: {s}; passing frames through unchanged", .{vh.lastError()});
        }
        return frame;
    };
    return blurred.handle;
}
