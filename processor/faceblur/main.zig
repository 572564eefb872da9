//! faceblur: finds faces in every frame with a Haar cascade and blurs each one in place
//! (after wasmVision's faceblur processor, which blurs the faces another processor stored
//! in the frame store; this one detects them itself, offline).
//!
//! Config (read once, when the processor starts; an invalid value is logged once and the
//! default used):
//! * `faceblur-cascade`: cascade file, one of OpenCV's bundled cascades by file name or a
//!   file in the host's models directory (default `haarcascade_frontalface_default.xml`).
//! * `faceblur-kernel`: side of the box blur in px, integer 1–999 (default 50).
//! * `faceblur-detect-width`: frames are downscaled to this width in px for detection,
//!   integer 0–4096 (default 256; 0, or a width at least the frame's, detects on the full
//!   frame). Faces narrower than about 24 px at that width are missed (about 60 px of a
//!   640 px frame at the default); detection time grows with the square of the width
//!   (about 10 ms at 256 px, 18 ms at 320 px and 90 ms for a full 768 × 432 frame on a
//!   2-core machine), and a call must finish within the host's per-frame deadline
//!   (20 ms by default).
//!
//! Detection uses OpenCV's defaults (scale step 1.1, 3 neighbours). Each face rectangle is
//! blurred through a region view of the frame: region + blur + copy-to. The frame is
//! changed in place and passed on. Per frame, every mat this processor creates (the
//! downscaled copy, region views, blurred copies) is dropped and the face list freed before
//! `process` returns. If the cascade cannot be loaded, the problem is logged once and frames
//! pass unchanged.
const std = @import("std");
const vh = @import("vh");

pub const panic = vh.panic;

const default_cascade = "haarcascade_frontalface_default.xml";

var started = false;
var classifier: ?vh.objdetect.CascadeClassifier = null;
var kernel: i32 = 50;
var detect_width: u32 = 256;
var detect_error_logged = false;
var blur_error_logged = false;

/// Reads the config and loads the cascade: run by the host when the processor starts
/// (loading a cascade takes longer than one frame's deadline), or on the first frame.
export fn _initialize() void {
    if (started) return;
    started = true;
    kernel = @intCast(vh.settings.int("faceblur-kernel", 50, 1, 999, "an integer 1-999 px"));
    detect_width = @intCast(vh.settings.int("faceblur-detect-width", 256, 0, 4096, "an integer 0-4096 px"));
    const configured = vh.config.get("faceblur-cascade");
    defer if (configured) |c| vh.free(c);
    const file = if (configured) |c| vh.settings.trim(c) else default_cascade;
    const cc = vh.objdetect.CascadeClassifier.init("faceblur");
    if (!cc.load(file)) {
        vh.log.errf("faceblur: cannot load cascade \"{s}\" (see the host's log); frames pass unchanged", .{vh.utf8Prefix(file, 200)});
        cc.drop();
        return;
    }
    classifier = cc;
    vh.log.infof("faceblur: cascade {s}, blur {d} px, detection at width {d}", .{ vh.utf8Prefix(file, 200), kernel, detect_width });
}

/// Face rectangles in frame coordinates (owned: `vh.free`), or null on failure.
fn detectFaces(cc: vh.objdetect.CascadeClassifier, frame: vh.Mat) ?[]vh.Rect {
    const cols = frame.cols();
    const rows = frame.rows();
    if (detect_width == 0 or detect_width >= cols) {
        return cc.detectMultiScale(frame) catch return detectFailed();
    }
    const h: u32 = @max(1, (rows * detect_width + cols / 2) / cols);
    const small = vh.cv.resize(frame, .{ .x = @intCast(detect_width), .y = @intCast(h) }, 0, 0, .area) catch return detectFailed();
    defer small.drop();
    const faces = cc.detectMultiScale(small) catch return detectFailed();
    for (faces) |*r| {
        r.min.x = scale(r.min.x, cols, detect_width);
        r.max.x = scale(r.max.x, cols, detect_width);
        r.min.y = scale(r.min.y, rows, h);
        r.max.y = scale(r.max.y, rows, h);
    }
    return faces;
}

fn scale(v: i32, full: u32, small: u32) i32 {
    return @intCast(@divTrunc(@as(i64, v) * full + small / 2, small));
}

fn detectFailed() ?[]vh.Rect {
    if (!detect_error_logged) {
        detect_error_logged = true;
        vh.log.warnf("faceblur: detection failed: {s}", .{vh.lastError()});
    }
    return null;
}

/// Blurs `r` of `frame` in place.
fn blurRegion(frame: vh.Mat, r: vh.Rect) void {
    const view = frame.region(r);
    defer view.drop();
    if (view.empty()) return;
    const blurred = vh.cv.blur(view, .{ .x = kernel, .y = kernel }) catch {
        if (!blur_error_logged) {
            blur_error_logged = true;
            vh.log.warnf("faceblur: blur failed: {s}", .{vh.lastError()});
        }
        return;
    };
    defer blurred.drop();
    blurred.copyTo(view);
}

export fn process(handle: u32) u32 {
    if (!started) _initialize();
    const cc = classifier orelse return handle;
    const frame = vh.Mat.borrow(handle);
    const faces = detectFaces(cc, frame) orelse return handle;
    defer vh.free(faces);
    for (faces) |r| blurRegion(frame, r);
    return handle;
}
