//! cvcheck: a test processor that exercises the SDK's wrappers of the wasm:cv and platform
//! imports one operation at a time, for tests/test_zig_processors.py to compare with
//! OpenCV run directly.
//!
//! Config: `op` = the operation (one name of `ops` below; read on every frame). For every
//! frame the operation is applied to the frame through the SDK; the processor returns its
//! image result (a new mat, a view, or the frame drawn on in place) or the frame itself.
//! Non-image results (values read, rectangles, key points, matches, sizes, error messages)
//! are written as one JSON text into the processor store under processor "cvcheck", key =
//! the operation. A failed call stores {"error": "<Zig error>", "message": "<host message>"}
//! and passes the frame on. An unknown `op` is logged and the frame passes on.
//!
//! `cvcheck-url` (http and fetch operations only): the base URL of a test server; `http`
//! GETs `<url>/get`, POSTs to `<url>/post` and post-images to `<url>/image`; `fetch` starts
//! a GET of `<url>/fetch` on one frame and polls it on the following ones, storing the
//! result when the reply is complete. `net` reads the ONNX model `cvcheck-tiny.onnx` from
//! the host's models directory.
//!
//! Every mat an operation creates and does not return is dropped before `process` returns,
//! and everything the host returned is freed.
const std = @import("std");
const vh = @import("vh");

pub const panic = vh.panic;

const Mat = vh.Mat;
const W = std.Io.Writer;
/// What an operation returns: the mat to pass on, or null for the frame.
const Out = ?Mat;
const OpFn = *const fn (frame: Mat, w: *W) anyerror!Out;
const Op = struct { name: []const u8, run: OpFn };

// ==========================================================================================
// Entry point
// ==========================================================================================

var json_buf: [1 << 20]u8 = undefined;
var store: ?vh.datastore.Store = null;

export fn process(handle: u32) u32 {
    const frame = Mat.borrow(handle);
    const op_name = vh.config.get("op") orelse {
        vh.log.err("cvcheck: config `op` is not set");
        return handle;
    };
    defer vh.free(op_name);
    const op = for (ops) |op| {
        if (std.mem.eql(u8, op.name, op_name)) break op;
    } else {
        vh.log.errf("cvcheck: unknown op \"{s}\"", .{vh.utf8Prefix(op_name, 64)});
        return handle;
    };
    var w = W.fixed(&json_buf);
    const out = op.run(frame, &w) catch |err| blk: {
        w = W.fixed(&json_buf);
        w.writeAll("{\"error\":") catch {};
        std.json.Stringify.encodeJsonString(@errorName(err), .{}, &w) catch {};
        w.writeAll(",\"message\":") catch {};
        std.json.Stringify.encodeJsonString(vh.lastError(), .{}, &w) catch {};
        w.writeAll("}") catch {};
        vh.log.warnf("cvcheck {s}: {s}: {s}", .{ op.name, @errorName(err), vh.lastError() });
        break :blk null;
    };
    if (w.end > 0) {
        if (store == null) store = vh.datastore.Store.init();
        store.?.set("cvcheck", op.name, w.buffered()) catch vh.log.err("cvcheck: could not store the result");
    }
    return if (out) |m| m.handle else handle;
}

// ==========================================================================================
// Operations
// ==========================================================================================

const ops = [_]Op{
    // -- mat ---------------------------------------------------------------------------
    .{ .name = "info", .run = opInfo },
    .{ .name = "init", .run = opInit },
    .{ .name = "new-with-size", .run = opNewWithSize },
    .{ .name = "zeros", .run = opZeros },
    .{ .name = "ones", .run = opOnes },
    .{ .name = "clone", .run = opClone },
    .{ .name = "close", .run = opClose },
    .{ .name = "region", .run = opRegion },
    .{ .name = "copy-to", .run = opCopyTo },
    .{ .name = "copy-to-new", .run = opCopyToNew },
    .{ .name = "convert-to", .run = opConvertTo },
    .{ .name = "convert-to-with-params", .run = opConvertToWithParams },
    .{ .name = "reads", .run = opReads },
    .{ .name = "set-at", .run = opSetAt },
    .{ .name = "float-mat", .run = opFloatMat },
    .{ .name = "add-uchar", .run = opAddUchar },
    .{ .name = "subtract-uchar", .run = opSubtractUchar },
    .{ .name = "multiply-uchar", .run = opMultiplyUchar },
    .{ .name = "divide-uchar", .run = opDivideUchar },
    .{ .name = "add-float", .run = opAddFloat },
    .{ .name = "subtract-float", .run = opSubtractFloat },
    .{ .name = "multiply-float", .run = opMultiplyFloat },
    .{ .name = "divide-float", .run = opDivideFloat },
    .{ .name = "reshape", .run = opReshape },
    .{ .name = "reshape-rows", .run = opReshapeRows },
    .{ .name = "row-range", .run = opRowRange },
    .{ .name = "col-range", .run = opColRange },
    .{ .name = "row", .run = opRow },
    .{ .name = "col", .run = opCol },
    .{ .name = "min-max-loc", .run = opMinMaxLoc },
    .{ .name = "merge", .run = opMerge },
    // -- cv: drawing -------------------------------------------------------------------
    .{ .name = "arrowed-line", .run = opArrowedLine },
    .{ .name = "rectangle", .run = opRectangle },
    .{ .name = "circle", .run = opCircle },
    .{ .name = "line", .run = opLine },
    .{ .name = "put-text", .run = opPutText },
    // -- cv: image processing ----------------------------------------------------------
    .{ .name = "adaptive-threshold", .run = opAdaptiveThreshold },
    .{ .name = "blur", .run = opBlur },
    .{ .name = "box-filter", .run = opBoxFilter },
    .{ .name = "canny", .run = opCanny },
    .{ .name = "cvt-color", .run = opCvtColor },
    .{ .name = "cvt-color-rgb", .run = opCvtColorRgb },
    .{ .name = "dilate", .run = opDilate },
    .{ .name = "erode", .run = opErode },
    .{ .name = "structuring-element", .run = opStructuringElement },
    .{ .name = "equalize-hist", .run = opEqualizeHist },
    .{ .name = "gaussian-blur", .run = opGaussianBlur },
    .{ .name = "hough-lines", .run = opHoughLines },
    .{ .name = "hough-lines-p", .run = opHoughLinesP },
    .{ .name = "median-blur", .run = opMedianBlur },
    .{ .name = "resize", .run = opResize },
    .{ .name = "resize-fx", .run = opResizeFx },
    .{ .name = "threshold", .run = opThreshold },
    .{ .name = "transpose-nd", .run = opTransposeNd },
    .{ .name = "estimate-affine2d", .run = opEstimateAffine2d },
    .{ .name = "warp-affine", .run = opWarpAffine },
    .{ .name = "get-rotation-matrix2d", .run = opGetRotationMatrix2d },
    .{ .name = "error-result", .run = opErrorResult },
    // -- cv: arithmetic ----------------------------------------------------------------
    .{ .name = "add", .run = opAdd },
    .{ .name = "subtract", .run = opSubtract },
    .{ .name = "multiply", .run = opMultiply },
    .{ .name = "divide", .run = opDivide },
    .{ .name = "add-weighted", .run = opAddWeighted },
    .{ .name = "hconcat", .run = opHconcat },
    .{ .name = "vconcat", .run = opVconcat },
    .{ .name = "exp", .run = opExp },
    .{ .name = "lut", .run = opLut },
    .{ .name = "reduce", .run = opReduce },
    .{ .name = "reduce-avg", .run = opReduceAvg },
    .{ .name = "reduce-arg-max", .run = opReduceArgMax },
    .{ .name = "normalize", .run = opNormalize },
    .{ .name = "norm", .run = opNorm },
    // -- dnn ---------------------------------------------------------------------------
    .{ .name = "blob-from-image", .run = opBlobFromImage },
    .{ .name = "blob-from-image-with-params", .run = opBlobFromImageWithParams },
    .{ .name = "blob-rects-to-image-rects", .run = opBlobRectsToImageRects },
    .{ .name = "nms-boxes", .run = opNmsBoxes },
    .{ .name = "net-missing", .run = opNetMissing },
    .{ .name = "net", .run = opNet },
    // -- objdetect ---------------------------------------------------------------------
    .{ .name = "cascade", .run = opCascade },
    .{ .name = "cascade-params", .run = opCascadeParams },
    .{ .name = "cascade-missing", .run = opCascadeMissing },
    .{ .name = "hog", .run = opHog },
    .{ .name = "hog-params", .run = opHogParams },
    .{ .name = "face-yn-missing", .run = opFaceYnMissing },
    .{ .name = "face-sf-missing", .run = opFaceSfMissing },
    // -- features2d --------------------------------------------------------------------
    .{ .name = "akaze", .run = Detector(vh.features2d.AKAZEDetector).detect },
    .{ .name = "akaze-compute", .run = Detector(vh.features2d.AKAZEDetector).compute },
    .{ .name = "akaze-detect-and-compute", .run = Detector(vh.features2d.AKAZEDetector).detectAndCompute },
    .{ .name = "brisk", .run = Detector(vh.features2d.BRISKDetector).detect },
    .{ .name = "brisk-compute", .run = Detector(vh.features2d.BRISKDetector).compute },
    .{ .name = "brisk-detect-and-compute", .run = Detector(vh.features2d.BRISKDetector).detectAndCompute },
    .{ .name = "kaze", .run = Detector(vh.features2d.KAZEDetector).detect },
    .{ .name = "kaze-compute", .run = Detector(vh.features2d.KAZEDetector).compute },
    .{ .name = "kaze-detect-and-compute", .run = Detector(vh.features2d.KAZEDetector).detectAndCompute },
    .{ .name = "orb", .run = Detector(vh.features2d.ORBDetector).detect },
    .{ .name = "orb-compute", .run = Detector(vh.features2d.ORBDetector).compute },
    .{ .name = "orb-detect-and-compute", .run = Detector(vh.features2d.ORBDetector).detectAndCompute },
    .{ .name = "sift", .run = Detector(vh.features2d.SIFTDetector).detect },
    .{ .name = "sift-compute", .run = Detector(vh.features2d.SIFTDetector).compute },
    .{ .name = "sift-detect-and-compute", .run = Detector(vh.features2d.SIFTDetector).detectAndCompute },
    .{ .name = "orb-params", .run = opOrbParams },
    .{ .name = "detector-close", .run = opDetectorClose },
    .{ .name = "bf-match", .run = opBfMatch },
    .{ .name = "bf-knn-match", .run = opBfKnnMatch },
    .{ .name = "flann-knn-match", .run = opFlannKnnMatch },
    // -- platform ----------------------------------------------------------------------
    .{ .name = "config", .run = opConfig },
    .{ .name = "logging", .run = opLogging },
    .{ .name = "time", .run = opTime },
    .{ .name = "processor-store", .run = opProcessorStore },
    .{ .name = "frame-store", .run = opFrameStore },
    .{ .name = "overlay", .run = opOverlay },
    .{ .name = "http", .run = opHttp },
    .{ .name = "fetch", .run = opFetch },
    .{ .name = "fetch-cancel", .run = opFetchCancel },
};

// ==========================================================================================
// JSON helpers
// ==========================================================================================

fn jsonRect(w: *W, r: vh.Rect) !void {
    try w.print("[{d},{d},{d},{d}]", .{ r.min.x, r.min.y, r.max.x, r.max.y });
}

fn jsonRects(w: *W, rects: []const vh.Rect) !void {
    try w.writeAll("[");
    for (rects, 0..) |r, i| {
        if (i > 0) try w.writeAll(",");
        try jsonRect(w, r);
    }
    try w.writeAll("]");
}

fn jsonNumbers(w: *W, values: anytype) !void {
    try w.writeAll("[");
    for (values, 0..) |v, i| {
        if (i > 0) try w.writeAll(",");
        try w.print("{d}", .{v});
    }
    try w.writeAll("]");
}

fn jsonKeyPoints(w: *W, kps: []const vh.KeyPoint) !void {
    try w.writeAll("[");
    for (kps, 0..) |k, i| {
        if (i > 0) try w.writeAll(",");
        try w.print("[{d},{d},{d},{d},{d},{d},{d}]", .{ k.x, k.y, k.size, k.angle, k.response, k.octave, k.class_id });
    }
    try w.writeAll("]");
}

fn jsonMatches(w: *W, ms: []const vh.DMatch) !void {
    try w.writeAll("[");
    for (ms, 0..) |m, i| {
        if (i > 0) try w.writeAll(",");
        try w.print("[{d},{d},{d},{d}]", .{ m.query_idx, m.train_idx, m.img_idx, m.distance });
    }
    try w.writeAll("]");
}

/// {"rows","cols","mattype","size"} of a mat.
fn jsonShape(w: *W, m: Mat) !void {
    const size = m.size();
    defer vh.free(size);
    try w.print("{{\"rows\":{d},\"cols\":{d},\"mattype\":{d},\"size\":", .{ m.rows(), m.cols(), m.mattype() });
    try jsonNumbers(w, size);
    try w.writeAll("}");
}

fn jsonError(w: *W, key: []const u8, err: anyerror) !void {
    try w.print("\"{s}\":{{\"error\":\"{s}\",\"message\":", .{ key, @errorName(err) });
    try std.json.Stringify.encodeJsonString(vh.lastError(), .{}, w);
    try w.writeAll("}");
}

// ==========================================================================================
// Shared inputs
// ==========================================================================================

fn rgba(r: u8, g: u8, b: u8) vh.Rgba {
    return .{ .r = r, .g = g, .b = b, .a = 255 };
}

fn rect(x0: i32, y0: i32, x1: i32, y1: i32) vh.Rect {
    return .{ .min = .{ .x = x0, .y = y0 }, .max = .{ .x = x1, .y = y1 } };
}

fn gray(frame: Mat) !Mat {
    return vh.cv.cvtColor(frame, .bgr_to_gray);
}

/// The frame as float32 (same channels).
fn asFloat(frame: Mat) !Mat {
    return frame.convertTo(5);
}

/// A 5 × 5 box blur of the frame: the second operand of the arithmetic operations.
fn blurred(frame: Mat) !Mat {
    return vh.cv.blur(frame, .{ .x = 5, .y = 5 });
}

// ==========================================================================================
// mat
// ==========================================================================================

fn opInfo(frame: Mat, w: *W) !Out {
    const size = frame.size();
    defer vh.free(size);
    try w.print("{{\"cols\":{d},\"rows\":{d},\"mattype\":{d},\"step\":{d},\"elemsize\":{d},\"empty\":{},\"size\":", .{
        frame.cols(), frame.rows(), frame.mattype(), frame.step(), frame.elemsize(), frame.empty(),
    });
    try jsonNumbers(w, size);
    try w.writeAll("}");
    return null;
}

fn opInit(_: Mat, w: *W) !Out {
    const m = Mat.init(0);
    defer m.drop();
    try w.print("{{\"empty\":{},\"shape\":", .{m.empty()});
    try jsonShape(w, m);
    try w.writeAll("}");
    return null;
}

fn opNewWithSize(_: Mat, _: *W) !Out {
    return Mat.newWithSize(100, 200, 16); // 100 rows, 200 columns (rows first), 8-bit BGR
}

fn opZeros(_: Mat, _: *W) !Out {
    return try Mat.zeros(50, 80, 5);
}

fn opOnes(_: Mat, _: *W) !Out {
    return try Mat.ones(40, 30, 16);
}

fn opClone(frame: Mat, _: *W) !Out {
    return frame.clone();
}

fn opClose(frame: Mat, w: *W) !Out {
    const c = frame.clone();
    defer c.drop();
    const before = c.empty();
    c.close();
    try w.print("{{\"before\":{},\"after\":{},\"cols\":{d},\"rows\":{d}}}", .{ before, c.empty(), c.cols(), c.rows() });
    return null;
}

fn opRegion(frame: Mat, _: *W) !Out {
    return frame.region(rect(100, 50, 300, 200));
}

fn opCopyTo(frame: Mat, _: *W) !Out {
    const view = frame.region(rect(100, 50, 300, 200));
    defer view.drop();
    const b = try vh.cv.blur(view, .{ .x = 15, .y = 15 });
    defer b.drop();
    b.copyTo(view);
    return null;
}

fn opCopyToNew(frame: Mat, _: *W) !Out {
    const dst = Mat.init(0);
    frame.copyTo(dst);
    return dst;
}

fn opConvertTo(frame: Mat, _: *W) !Out {
    return try frame.convertTo(5);
}

fn opConvertToWithParams(frame: Mat, _: *W) !Out {
    return try frame.convertToWithParams(0, 0.5, 10);
}

const reads_2d = [_][2]u32{ .{ 0, 0 }, .{ 10, 20 }, .{ 123, 456 }, .{ 359, 1919 }, .{ 5, 1925 } };
const reads_3d = [_][3]u32{ .{ 0, 0, 0 }, .{ 10, 20, 1 }, .{ 200, 600, 2 } };
const reads_px = [_][2]u32{ .{ 0, 0 }, .{ 10, 20 }, .{ 359, 639 } };

fn opReads(frame: Mat, w: *W) !Out {
    try w.writeAll("{\"uchar\":[");
    for (reads_2d, 0..) |p, i| try w.print("{s}{d}", .{ sep(i), frame.getUcharAt(p[0], p[1]) });
    try w.writeAll("],\"int\":[");
    for (reads_2d, 0..) |p, i| try w.print("{s}{d}", .{ sep(i), frame.getIntAt(p[0], p[1]) });
    try w.writeAll("],\"float\":[");
    for (reads_2d, 0..) |p, i| try w.print("{s}{d}", .{ sep(i), frame.getFloatAt(p[0], p[1]) });
    try w.writeAll("],\"uchar3\":[");
    for (reads_3d, 0..) |p, i| try w.print("{s}{d}", .{ sep(i), frame.getUcharAt3(p[0], p[1], p[2]) });
    try w.writeAll("],\"int3\":[");
    for (reads_3d, 0..) |p, i| try w.print("{s}{d}", .{ sep(i), frame.getIntAt3(p[0], p[1], p[2]) });
    try w.writeAll("],\"float3\":[");
    for (reads_3d, 0..) |p, i| try w.print("{s}{d}", .{ sep(i), frame.getFloatAt3(p[0], p[1], p[2]) });
    try w.writeAll("],\"vecb\":[");
    for (reads_px, 0..) |p, i| {
        const v = frame.getVecbAt(p[0], p[1]);
        defer vh.free(v);
        try w.writeAll(sep(i));
        try jsonNumbers(w, v);
    }
    try w.writeAll("],\"vecf\":[");
    for (reads_px, 0..) |p, i| {
        const v = frame.getVecfAt(p[0], p[1]);
        defer vh.free(v);
        try w.writeAll(sep(i));
        try jsonNumbers(w, v);
    }
    try w.writeAll("],\"veci\":[");
    for (reads_px, 0..) |p, i| {
        const v = frame.getVeciAt(p[0], p[1]);
        defer vh.free(v);
        try w.writeAll(sep(i));
        try jsonNumbers(w, v);
    }
    try w.writeAll("]}");
    return null;
}

fn sep(i: usize) []const u8 {
    return if (i == 0) "" else ",";
}

fn opSetAt(frame: Mat, _: *W) !Out {
    const c = frame.clone();
    c.setUcharAt(10, 20, 7);
    c.setIntAt(11, 21, 300); // saturates to 255
    c.setFloatAt(12, 22, 3.6); // rounds to 4
    c.setUcharAt3(20, 30, 1, 9);
    c.setIntAt3(21, 31, 2, -5); // saturates to 0
    c.setFloatAt3(22, 32, 0, 250.4); // rounds to 250
    return c;
}

fn opFloatMat(frame: Mat, w: *W) !Out {
    const f = try asFloat(frame);
    f.setFloatAt(1, 2, 0.25);
    f.setIntAt(3, 4, -7);
    f.setFloatAt3(5, 6, 1, 2.5);
    f.setIntAt3(7, 8, 2, 1000);
    f.setUcharAt3(9, 10, 0, 77);
    const vf = f.getVecfAt(1, 0);
    defer vh.free(vf);
    const vi = f.getVeciAt(3, 1);
    defer vh.free(vi);
    try w.print("{{\"float\":{d},\"int\":{d},\"float3\":{d},\"int3\":{d},\"uchar3\":{d},\"uchar\":{d},\"vecf\":", .{
        f.getFloatAt(1, 2), f.getIntAt(3, 4), f.getFloatAt3(5, 6, 1), f.getIntAt3(7, 8, 2), f.getUcharAt3(9, 10, 0), f.getUcharAt(3, 4),
    });
    try jsonNumbers(w, vf);
    try w.writeAll(",\"veci\":");
    try jsonNumbers(w, vi);
    try w.writeAll("}");
    return f;
}

fn opAddUchar(frame: Mat, _: *W) !Out {
    const c = frame.clone();
    c.addUchar(30);
    return c;
}
fn opSubtractUchar(frame: Mat, _: *W) !Out {
    const c = frame.clone();
    c.subtractUchar(30);
    return c;
}
fn opMultiplyUchar(frame: Mat, _: *W) !Out {
    const c = frame.clone();
    c.multiplyUchar(2);
    return c;
}
fn opDivideUchar(frame: Mat, _: *W) !Out {
    const c = frame.clone();
    c.divideUchar(3);
    return c;
}
fn opAddFloat(frame: Mat, _: *W) !Out {
    const f = try asFloat(frame);
    f.addFloat(1.5);
    return f;
}
fn opSubtractFloat(frame: Mat, _: *W) !Out {
    const f = try asFloat(frame);
    f.subtractFloat(1.5);
    return f;
}
fn opMultiplyFloat(frame: Mat, _: *W) !Out {
    const f = try asFloat(frame);
    f.multiplyFloat(0.5);
    return f;
}
fn opDivideFloat(frame: Mat, _: *W) !Out {
    const f = try asFloat(frame);
    f.divideFloat(4);
    return f;
}

fn opReshape(frame: Mat, _: *W) !Out {
    return try frame.reshape(1, 0);
}
fn opReshapeRows(frame: Mat, _: *W) !Out {
    return try frame.reshape(0, 720);
}
fn opRowRange(frame: Mat, _: *W) !Out {
    return try frame.rowRange(100, 200);
}
fn opColRange(frame: Mat, _: *W) !Out {
    return try frame.colRange(50, 150);
}
fn opRow(frame: Mat, _: *W) !Out {
    return try frame.row(5);
}
fn opCol(frame: Mat, _: *W) !Out {
    return try frame.col(7);
}

fn opMinMaxLoc(frame: Mat, w: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    const r = try g.minMaxLoc();
    try w.print("{{\"min_val\":{d},\"max_val\":{d},\"min_loc\":[{d},{d}],\"max_loc\":[{d},{d}]", .{
        r.min_val, r.max_val, r.min_loc.x, r.min_loc.y, r.max_loc.x, r.max_loc.y,
    });
    // one-channel only: the 3-channel frame is an error
    if (frame.minMaxLoc()) |_| {
        try w.writeAll(",\"bgr\":\"ok\"");
    } else |err| {
        try w.writeAll(",");
        try jsonError(w, "bgr", err);
    }
    try w.writeAll("}");
    return null;
}

fn opMerge(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    const e = try vh.cv.canny(g, 50, 150);
    defer e.drop();
    return try Mat.merge(&.{ g, e, g });
}

// ==========================================================================================
// cv
// ==========================================================================================

fn opArrowedLine(frame: Mat, _: *W) !Out {
    try vh.cv.arrowedLine(frame, .{ .x = 20, .y = 30 }, .{ .x = 300, .y = 200 }, rgba(255, 0, 0), 3);
    return null;
}
fn opRectangle(frame: Mat, _: *W) !Out {
    try vh.cv.rectangle(frame, rect(50, 60, 400, 300), rgba(0, 255, 0), 2);
    return null;
}
fn opCircle(frame: Mat, _: *W) !Out {
    try vh.cv.circle(frame, .{ .x = 320, .y = 180 }, 80, rgba(0, 0, 255), 4);
    return null;
}
fn opLine(frame: Mat, _: *W) !Out {
    try vh.cv.line(frame, .{ .x = 0, .y = 0 }, .{ .x = 639, .y = 359 }, rgba(255, 255, 0), 1);
    return null;
}
fn opPutText(frame: Mat, _: *W) !Out {
    try vh.cv.putText(frame, "Hello vision-host", .{ .x = 30, .y = 100 }, .simplex, 1.5, rgba(255, 255, 255), 2);
    return null;
}

fn opAdaptiveThreshold(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    return try vh.cv.adaptiveThreshold(g, 255, .mean, .threshold_binary, 11, 2);
}
fn opBlur(frame: Mat, _: *W) !Out {
    return try vh.cv.blur(frame, .{ .x = 7, .y = 5 });
}
fn opBoxFilter(frame: Mat, _: *W) !Out {
    return try vh.cv.boxFilter(frame, 0xFFFF_FFFF, .{ .x = 9, .y = 9 });
}
fn opCanny(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    return try vh.cv.canny(g, 50, 150);
}
fn opCvtColor(frame: Mat, _: *W) !Out {
    return try gray(frame);
}
fn opCvtColorRgb(frame: Mat, _: *W) !Out {
    return try vh.cv.cvtColor(frame, .bgr_to_rgb);
}

fn opDilate(frame: Mat, _: *W) !Out {
    const k = try vh.cv.getStructuringElement(.rect, .{ .x = 5, .y = 5 });
    defer k.drop();
    return try vh.cv.dilate(frame, k);
}
fn opErode(frame: Mat, _: *W) !Out {
    const k = try vh.cv.getStructuringElement(.rect, .{ .x = 5, .y = 5 });
    defer k.drop();
    return try vh.cv.erode(frame, k);
}
fn opStructuringElement(_: Mat, _: *W) !Out {
    return try vh.cv.getStructuringElement(.ellipse, .{ .x = 7, .y = 5 });
}
fn opEqualizeHist(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    return try vh.cv.equalizeHist(g);
}
fn opGaussianBlur(frame: Mat, _: *W) !Out {
    return try vh.cv.gaussianBlur(frame, .{ .x = 9, .y = 9 }, 2.0, 2.0, .default);
}

fn edges(frame: Mat) !Mat {
    const g = try gray(frame);
    defer g.drop();
    return vh.cv.canny(g, 50, 150);
}
fn opHoughLines(frame: Mat, _: *W) !Out {
    const e = try edges(frame);
    defer e.drop();
    return try vh.cv.houghLines(e, 1, std.math.pi / 180.0, 100);
}
fn opHoughLinesP(frame: Mat, _: *W) !Out {
    const e = try edges(frame);
    defer e.drop();
    return try vh.cv.houghLinesP(e, 1, std.math.pi / 180.0, 50);
}
fn opMedianBlur(frame: Mat, _: *W) !Out {
    return try vh.cv.medianBlur(frame, .{ .x = 5, .y = 5 });
}
fn opResize(frame: Mat, _: *W) !Out {
    return try vh.cv.resize(frame, .{ .x = 320, .y = 180 }, 0, 0, .linear);
}
fn opResizeFx(frame: Mat, _: *W) !Out {
    return try vh.cv.resize(frame, .{ .x = 0, .y = 0 }, 0.5, 0.25, .nearest);
}
fn opThreshold(frame: Mat, _: *W) !Out {
    return try vh.cv.threshold(frame, 100, 255, .threshold_binary);
}
fn opTransposeNd(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    return try vh.cv.transposeND(g, &.{ 1, 0 });
}

/// Six points and their images under x' = 0.9x - 0.2y + 15, y' = 0.1x + 1.1y - 7.
const affine_from = [_][2]f32{ .{ 10, 20 }, .{ 200, 40 }, .{ 50, 300 }, .{ 400, 250 }, .{ 600, 100 }, .{ 320, 180 } };

fn pointsMat(points: []const [2]f32, transform: bool) Mat {
    const m = Mat.newWithSize(@intCast(points.len), 2, 5); // N rows × 2 float columns
    for (points, 0..) |p, i| {
        const x = if (transform) 0.9 * p[0] - 0.2 * p[1] + 15 else p[0];
        const y = if (transform) 0.1 * p[0] + 1.1 * p[1] - 7 else p[1];
        m.setFloatAt(@intCast(i), 0, x);
        m.setFloatAt(@intCast(i), 1, y);
    }
    return m;
}

fn opEstimateAffine2d(_: Mat, _: *W) !Out {
    const from = pointsMat(&affine_from, false);
    defer from.drop();
    const to = pointsMat(&affine_from, true);
    defer to.drop();
    return try vh.cv.estimateAffine2d(from, to);
}

fn opWarpAffine(frame: Mat, _: *W) !Out {
    const m = try vh.cv.getRotationMatrix2d(.{ .x = 320, .y = 180 }, 30, 0.8);
    defer m.drop();
    return try vh.cv.warpAffine(frame, m, .{ .x = 640, .y = 360 });
}

fn opGetRotationMatrix2d(_: Mat, w: *W) !Out {
    const m = try vh.cv.getRotationMatrix2d(.{ .x = 320, .y = 180 }, 30, 0.8);
    try w.writeAll("{\"m\":[");
    var r: u32 = 0;
    while (r < 2) : (r += 1) {
        var c: u32 = 0;
        while (c < 3) : (c += 1) try w.print("{s}{d}", .{ sep(r * 3 + c), m.getFloatAt(r, c) });
    }
    try w.writeAll("],\"shape\":");
    try jsonShape(w, m);
    try w.writeAll("}");
    return m;
}

fn opErrorResult(frame: Mat, w: *W) !Out {
    // An even Gaussian kernel is invalid: the err case, with the host's message.
    try w.writeAll("{");
    if (vh.cv.gaussianBlur(frame, .{ .x = 4, .y = 4 }, 0, 0, .default)) |m| {
        m.drop();
        try w.writeAll("\"gaussian\":\"ok\"");
    } else |err| try jsonError(w, "gaussian", err);
    try w.writeAll(",");
    const small = Mat.newWithSize(10, 10, 16);
    defer small.drop();
    if (vh.cv.add(frame, small)) |m| {
        m.drop();
        try w.writeAll("\"add\":\"ok\"");
    } else |err| try jsonError(w, "add", err);
    try w.writeAll("}");
    return null;
}

fn opAdd(frame: Mat, _: *W) !Out {
    const b = try blurred(frame);
    defer b.drop();
    return try vh.cv.add(frame, b);
}
fn opSubtract(frame: Mat, _: *W) !Out {
    const b = try blurred(frame);
    defer b.drop();
    return try vh.cv.subtract(frame, b);
}
fn opMultiply(frame: Mat, _: *W) !Out {
    const b = try blurred(frame);
    defer b.drop();
    return try vh.cv.multiply(frame, b);
}
fn opDivide(frame: Mat, _: *W) !Out {
    const b = try blurred(frame);
    defer b.drop();
    return try vh.cv.divide(frame, b);
}
fn opAddWeighted(frame: Mat, _: *W) !Out {
    const b = try blurred(frame);
    defer b.drop();
    return try vh.cv.addWeighted(frame, 0.7, b, 0.3, 5);
}
fn opHconcat(frame: Mat, _: *W) !Out {
    const b = try blurred(frame);
    defer b.drop();
    return try vh.cv.hconcat(frame, b);
}
fn opVconcat(frame: Mat, _: *W) !Out {
    const b = try blurred(frame);
    defer b.drop();
    return try vh.cv.vconcat(frame, b);
}
fn opExp(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    const f = try g.convertToWithParams(5, 1.0 / 64.0, 0);
    defer f.drop();
    return try vh.cv.exp(f);
}
fn opLut(frame: Mat, _: *W) !Out {
    const table = Mat.newWithSize(1, 256, 0);
    defer table.drop();
    var v: u32 = 0;
    while (v < 256) : (v += 1) table.setUcharAt(0, v, @intCast(255 - v));
    return try vh.cv.lut(frame, table);
}
fn opReduce(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    return try vh.cv.reduce(g, 0, 0, 4); // column sums as int32
}
fn opReduceAvg(frame: Mat, _: *W) !Out {
    return try vh.cv.reduce(frame, 1, 1, 5); // row means as float32
}
fn opReduceArgMax(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    return try vh.cv.reduceArgMax(g, 0, false);
}
fn opNormalize(frame: Mat, _: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    return try vh.cv.normalize(g, 10, 100, 32);
}
fn opNorm(frame: Mat, w: *W) !Out {
    const g = try gray(frame);
    defer g.drop();
    try w.print("{{\"inf\":{d},\"l1\":{d},\"l2\":{d}}}", .{ try vh.cv.norm(g, 1), try vh.cv.norm(g, 2), try vh.cv.norm(g, 4) });
    return null;
}

// ==========================================================================================
// dnn
// ==========================================================================================

const blob_params: vh.BlobParams = .{
    .scale_factor = 1.0 / 127.5,
    .size = .{ .x = 320, .y = 240 },
    .mean = .{ .val1 = 127.5, .val2 = 127.5, .val3 = 127.5, .val4 = 0 },
    .swap_rb = true,
    .ddepth = 5,
    .data_layout = .nchw,
    .padding_mode = .letterbox,
    .border = .{ .val1 = 0, .val2 = 0, .val3 = 0, .val4 = 0 },
};

fn opBlobFromImage(frame: Mat, _: *W) !Out {
    const mean: vh.Scalar = .{ .val1 = 10, .val2 = 20, .val3 = 30, .val4 = 0 };
    return try vh.dnn.blobFromImage(frame, 1.0 / 255.0, .{ .x = 300, .y = 300 }, mean, true, false);
}
fn opBlobFromImageWithParams(frame: Mat, _: *W) !Out {
    return try vh.dnn.blobFromImageWithParams(frame, blob_params);
}
fn opBlobRectsToImageRects(_: Mat, w: *W) !Out {
    const rects = try vh.dnn.blobRectsToImageRects(blob_params, &.{ rect(10, 20, 110, 220), rect(0, 0, 320, 240) }, .{ .x = 640, .y = 360 });
    defer vh.free(rects);
    try w.writeAll("{\"rects\":");
    try jsonRects(w, rects);
    try w.writeAll("}");
    return null;
}

const nms_boxes = [_]vh.Rect{ rect(10, 10, 110, 110), rect(15, 12, 115, 112), rect(200, 200, 260, 280), rect(205, 198, 262, 285), rect(400, 50, 450, 90) };
const nms_scores = [_]f32{ 0.9, 0.8, 0.7, 0.95, 0.3 };

fn opNmsBoxes(_: Mat, w: *W) !Out {
    const keep = try vh.dnn.nmsBoxes(&nms_boxes, &nms_scores, 0.5, 0.4);
    defer vh.free(keep);
    try w.writeAll("{\"keep\":");
    try jsonNumbers(w, keep);
    try w.writeAll("}");
    return null;
}

fn opNetMissing(_: Mat, w: *W) !Out {
    try w.writeAll("{");
    if (vh.dnn.Net.read("no-such-model.onnx", "")) |net| {
        net.drop();
        try w.writeAll("\"read\":\"ok\"");
    } else |err| try jsonError(w, "read", err);
    try w.writeAll(",");
    if (vh.dnn.Net.readFromONNX("no-such-model.onnx")) |net| {
        net.drop();
        try w.writeAll("\"read_onnx\":\"ok\"");
    } else |err| try jsonError(w, "read_onnx", err);
    const layer = vh.dnn.Layer.init();
    defer layer.drop();
    try w.writeAll(",");
    if (layer.getName()) |name| {
        defer vh.free(name);
        try w.writeAll("\"layer_name\":");
        try std.json.Stringify.encodeJsonString(name, .{}, w);
    } else |err| try jsonError(w, "layer_name", err);
    layer.close();
    try w.writeAll("}");
    return null;
}

/// Reads `cvcheck-tiny.onnx` both ways, lists its layers, runs it on the frame (a 32 × 32
/// blob) with forward-layers and forward; returns forward's output.
fn opNet(frame: Mat, w: *W) !Out {
    const model = "cvcheck-tiny.onnx";
    const net = try vh.dnn.Net.readFromONNX(model);
    defer net.drop();
    const other = try vh.dnn.Net.read(model, "");
    defer other.drop();
    try w.print("{{\"empty\":{},\"read_empty\":{},", .{ net.empty(), other.empty() });
    other.close();
    const names = try net.getLayerNames();
    defer vh.deinit(names);
    try w.writeAll("\"names\":[");
    for (names, 0..) |n, i| {
        try w.writeAll(sep(i));
        try std.json.Stringify.encodeJsonString(n.slice(), .{}, w);
    }
    const outs = try net.getUnconnectedOutLayers();
    defer vh.free(outs);
    try w.writeAll("],\"unconnected\":");
    try jsonNumbers(w, outs);
    if (outs.len > 0) {
        const layer = try net.getLayer(outs[0]);
        defer layer.drop();
        const name = try layer.getName();
        defer vh.free(name);
        try w.writeAll(",\"out_layer\":");
        try std.json.Stringify.encodeJsonString(name, .{}, w);
    }
    const zero: vh.Scalar = .{ .val1 = 0, .val2 = 0, .val3 = 0, .val4 = 0 };
    const blob = try vh.dnn.blobFromImage(frame, 1.0 / 255.0, .{ .x = 32, .y = 32 }, zero, false, false);
    defer blob.drop();
    try net.setInput(blob, "");
    const many = try net.forwardLayers(names);
    defer {
        for (many) |m| m.drop();
        vh.free(many);
    }
    try w.writeAll(",\"forward_layers\":[");
    for (many, 0..) |m, i| {
        try w.writeAll(sep(i));
        try jsonShape(w, m);
    }
    try w.writeAll("]}");
    return try net.forward("");
}

// ==========================================================================================
// objdetect
// ==========================================================================================

const face_cascade = "haarcascade_frontalface_default.xml";

fn opCascade(frame: Mat, w: *W) !Out {
    const cc = vh.objdetect.CascadeClassifier.init("cvcheck");
    defer cc.drop();
    const loaded = cc.load(face_cascade);
    const faces = try cc.detectMultiScale(frame);
    defer vh.free(faces);
    try w.print("{{\"loaded\":{},\"rects\":", .{loaded});
    try jsonRects(w, faces);
    try w.writeAll("}");
    return null;
}

fn opCascadeParams(frame: Mat, w: *W) !Out {
    const cc = vh.objdetect.CascadeClassifier.init("cvcheck");
    defer cc.drop();
    const loaded = cc.load(face_cascade);
    const faces = try cc.detectMultiScaleWithParams(frame, 1.2, 5, 0, .{ .x = 30, .y = 30 }, .{ .x = 0, .y = 0 });
    defer vh.free(faces);
    try w.print("{{\"loaded\":{},\"rects\":", .{loaded});
    try jsonRects(w, faces);
    try w.writeAll("}");
    return null;
}

fn opCascadeMissing(frame: Mat, w: *W) !Out {
    const cc = vh.objdetect.CascadeClassifier.init("cvcheck");
    defer cc.drop();
    try w.print("{{\"loaded\":{},", .{cc.load("no-such-cascade.xml")});
    if (cc.detectMultiScale(frame)) |faces| {
        vh.free(faces);
        try w.writeAll("\"detect\":\"ok\"");
    } else |err| try jsonError(w, "detect", err);
    cc.close();
    try w.writeAll("}");
    return null;
}

fn opHog(frame: Mat, w: *W) !Out {
    const hog = vh.objdetect.HOGDescriptor.init("cvcheck");
    defer hog.drop();
    const people = try hog.detectMultiScale(frame);
    defer vh.free(people);
    try w.writeAll("{\"rects\":");
    try jsonRects(w, people);
    try w.writeAll("}");
    return null;
}

fn opHogParams(frame: Mat, w: *W) !Out {
    const hog = vh.objdetect.HOGDescriptor.init("cvcheck");
    defer hog.drop();
    const people = try hog.detectMultiScaleWithParams(frame, 0, .{ .x = 8, .y = 8 }, .{ .x = 16, .y = 16 }, 1.05, 2, false);
    defer vh.free(people);
    try w.writeAll("{\"rects\":");
    try jsonRects(w, people);
    try w.writeAll("}");
    hog.close();
    return null;
}

fn opFaceYnMissing(frame: Mat, w: *W) !Out {
    const yn = vh.objdetect.FaceDetectorYN.init("no-such-yunet.onnx", "", .{ .x = 640, .y = 360 });
    defer yn.drop();
    const size0 = yn.getInputSize();
    try w.print("{{\"size\":[{d},{d}],\"score\":{d},\"nms\":{d},\"topk\":{d},", .{ size0.x, size0.y, yn.getScoreThreshold(), yn.getNmsThreshold(), yn.getTopk() });
    yn.setInputSize(.{ .x = 320, .y = 240 });
    yn.setScoreThreshold(0.5);
    yn.setNmsThreshold(0.25);
    yn.setTopk(7);
    const size1 = yn.getInputSize();
    try w.print("\"set\":[{d},{d},{d},{d},{d}],", .{ size1.x, size1.y, yn.getScoreThreshold(), yn.getNmsThreshold(), yn.getTopk() });
    if (yn.detect(frame)) |m| {
        m.drop();
        try w.writeAll("\"detect\":\"ok\"");
    } else |err| try jsonError(w, "detect", err);
    yn.close();
    const p = vh.objdetect.FaceDetectorYN.newWithParams("no-such-yunet.onnx", "", .{ .x = 100, .y = 80 }, 0.7, 0.2, 9, 0, 0);
    defer p.drop();
    const size2 = p.getInputSize();
    try w.print(",\"params\":[{d},{d},{d},{d},{d}]}}", .{ size2.x, size2.y, p.getScoreThreshold(), p.getNmsThreshold(), p.getTopk() });
    return null;
}

fn opFaceSfMissing(frame: Mat, w: *W) !Out {
    const sf = vh.objdetect.FaceRecognizerSF.init("no-such-sface.onnx", "");
    defer sf.drop();
    try w.writeAll("{");
    if (sf.feature(frame)) |m| {
        m.drop();
        try w.writeAll("\"feature\":\"ok\"");
    } else |err| try jsonError(w, "feature", err);
    try w.writeAll(",");
    const row = try frame.row(0);
    defer row.drop();
    if (sf.alignCrop(frame, row)) |m| {
        m.drop();
        try w.writeAll("\"align_crop\":\"ok\"");
    } else |err| try jsonError(w, "align_crop", err);
    try w.writeAll(",");
    if (sf.match(row, row)) |v| {
        try w.print("\"match\":{d}", .{v});
    } else |err| try jsonError(w, "match", err);
    try w.writeAll(",");
    if (sf.matchWithParams(row, row, .norm_l2)) |v| {
        try w.print("\"match_l2\":{d}", .{v});
    } else |err| try jsonError(w, "match_l2", err);
    sf.close();
    const p = vh.objdetect.FaceRecognizerSF.newWithParams("no-such-sface.onnx", "", 0, 0);
    defer p.drop();
    try w.writeAll(",");
    if (p.feature(frame)) |m| {
        m.drop();
        try w.writeAll("\"params_feature\":\"ok\"");
    } else |err| try jsonError(w, "params_feature", err);
    try w.writeAll("}");
    return null;
}

// ==========================================================================================
// features2d
// ==========================================================================================

/// The three operations of a detector resource type `D` (AKAZE, BRISK, KAZE, ORB, SIFT).
fn Detector(comptime D: type) type {
    return struct {
        /// {"kps": [[x, y, size, angle, response, octave, class_id], ...]}
        fn detect(frame: Mat, w: *W) anyerror!Out {
            const d = D.init("cvcheck");
            defer d.drop();
            const kps = try d.detect(frame);
            defer vh.free(kps);
            try w.writeAll("{\"kps\":");
            try jsonKeyPoints(w, kps);
            try w.writeAll("}");
            return null;
        }

        /// Descriptors of the detected key points: {"n_in", "kps", "desc": shape}.
        fn compute(frame: Mat, w: *W) anyerror!Out {
            const d = D.init("cvcheck");
            defer d.drop();
            const kps = try d.detect(frame);
            defer vh.free(kps);
            const none = Mat.init(0);
            defer none.drop();
            const res = try d.compute(frame, none, kps);
            defer res.desc.drop();
            defer vh.deinit(res);
            try w.print("{{\"n_in\":{d},\"kps\":", .{kps.len});
            try jsonKeyPoints(w, res.kps.slice());
            try w.writeAll(",\"desc\":");
            try jsonShape(w, res.desc);
            try w.writeAll("}");
            return null;
        }

        /// {"kps", "desc": shape}; returns the descriptor mat.
        fn detectAndCompute(frame: Mat, w: *W) anyerror!Out {
            const d = D.init("cvcheck");
            defer d.drop();
            const none = Mat.init(0);
            defer none.drop();
            const res = try d.detectAndCompute(frame, none);
            defer vh.deinit(res);
            try w.writeAll("{\"kps\":");
            try jsonKeyPoints(w, res.kps.slice());
            try w.writeAll(",\"desc\":");
            try jsonShape(w, res.desc);
            try w.writeAll("}");
            return res.desc;
        }
    };
}

fn opOrbParams(frame: Mat, w: *W) !Out {
    const d = vh.features2d.ORBDetector.newWithParams(300, 1.2, 8, 31, 0, 2, .harris, 31, 20);
    defer d.drop();
    const kps = try d.detect(frame);
    defer vh.free(kps);
    try w.writeAll("{\"kps\":");
    try jsonKeyPoints(w, kps);
    try w.writeAll("}");
    return null;
}

fn opDetectorClose(frame: Mat, w: *W) !Out {
    try w.writeAll("{");
    inline for (.{ "akaze", "brisk", "kaze", "orb", "sift" }, .{
        vh.features2d.AKAZEDetector, vh.features2d.BRISKDetector, vh.features2d.KAZEDetector,
        vh.features2d.ORBDetector,   vh.features2d.SIFTDetector,
    }) |name, D| {
        const d = D.init("cvcheck");
        defer d.drop();
        d.close();
        if (d.detect(frame)) |kps| {
            vh.free(kps);
            try w.writeAll("\"" ++ name ++ "\":\"ok\",");
        } else |err| {
            try jsonError(w, name, err);
            try w.writeAll(",");
        }
    }
    const m = vh.features2d.BFMatcher.init("cvcheck");
    defer m.drop();
    m.close();
    if (m.match(frame, frame)) |ms| {
        vh.free(ms);
        try w.writeAll("\"match\":\"ok\"");
    } else |err| try jsonError(w, "match", err);
    const f = vh.features2d.FlannBasedMatcher.init("cvcheck");
    defer f.drop();
    f.close();
    try w.writeAll(",");
    if (f.knnMatch(frame, frame, 2)) |ms| {
        vh.deinit(ms);
        try w.writeAll("\"knn\":\"ok\"");
    } else |err| try jsonError(w, "knn", err);
    try w.writeAll("}");
    return null;
}

/// Descriptors of `frame` and of its 3 × 3 Gaussian blur, from detector type `D`.
fn descriptorPair(comptime D: type, frame: Mat) ![2]Mat {
    const d = D.init("cvcheck");
    defer d.drop();
    const none = Mat.init(0);
    defer none.drop();
    const other = try vh.cv.gaussianBlur(frame, .{ .x = 3, .y = 3 }, 0, 0, .default);
    defer other.drop();
    const a = try d.detectAndCompute(frame, none);
    vh.free(a.kps);
    errdefer a.desc.drop();
    const b = try d.detectAndCompute(other, none);
    vh.free(b.kps);
    return .{ a.desc, b.desc };
}

fn opBfMatch(frame: Mat, w: *W) !Out {
    const descs = try descriptorPair(vh.features2d.ORBDetector, frame);
    defer for (descs) |d| d.drop();
    const m = vh.features2d.BFMatcher.newWithParams(.norm_hamming, true);
    defer m.drop();
    const matches = try m.match(descs[0], descs[1]);
    defer vh.free(matches);
    try w.writeAll("{\"matches\":");
    try jsonMatches(w, matches);
    try w.writeAll("}");
    return null;
}

fn jsonKnn(w: *W, lists: []const vh.canon.List(vh.DMatch)) !void {
    try w.writeAll("{\"knn\":[");
    for (lists, 0..) |l, i| {
        try w.writeAll(sep(i));
        try jsonMatches(w, l.slice());
    }
    try w.writeAll("]}");
}

fn opBfKnnMatch(frame: Mat, w: *W) !Out {
    const descs = try descriptorPair(vh.features2d.ORBDetector, frame);
    defer for (descs) |d| d.drop();
    const m = vh.features2d.BFMatcher.init("cvcheck");
    defer m.drop();
    const lists = try m.knnMatch(descs[0], descs[1], 2);
    defer vh.deinit(lists);
    try jsonKnn(w, lists);
    return null;
}

fn opFlannKnnMatch(frame: Mat, w: *W) !Out {
    const descs = try descriptorPair(vh.features2d.SIFTDetector, frame);
    defer for (descs) |d| d.drop();
    const m = vh.features2d.FlannBasedMatcher.init("cvcheck");
    defer m.drop();
    const lists = try m.knnMatch(descs[0], descs[1], 2);
    defer vh.deinit(lists);
    try jsonKnn(w, lists);
    return null;
}

// ==========================================================================================
// platform
// ==========================================================================================

fn opConfig(_: Mat, w: *W) !Out {
    const P = vh.wit.wasmvision_platform.config;
    const op = try P.getConfig("op");
    defer vh.free(op);
    try w.writeAll("{\"op\":");
    try std.json.Stringify.encodeJsonString(op, .{}, w);
    if (P.getConfig("cvcheck-no-such-key")) |v| {
        vh.free(v);
        try w.writeAll(",\"missing\":\"found\"}");
    } else |err| try w.print(",\"missing\":\"{s}\"}}", .{@errorName(err)});
    return null;
}

fn opLogging(_: Mat, w: *W) !Out {
    const L = vh.wit.wasmvision_platform.logging;
    L.log("cvcheck logging log");
    L.@"error"("cvcheck logging error");
    L.warn("cvcheck logging warn");
    L.info("cvcheck logging info");
    L.debug("cvcheck logging debug");
    L.println("cvcheck logging println");
    vh.log.infof("cvcheck logging {s} {d}", .{ "formatted", 42 });
    try w.writeAll("{\"logged\":7}");
    return null;
}

fn opTime(_: Mat, w: *W) !Out {
    try w.print("{{\"now_us\":{d},\"now_ms\":{d}}}", .{ vh.time.nowUs(), vh.time.nowMs() });
    return null;
}

fn opProcessorStore(_: Mat, w: *W) !Out {
    const s = vh.datastore.Store.init();
    defer s.deinit();
    const p = "cvcheck-ps";
    try w.print("{{\"exists_before\":{},", .{try s.exists(p)});
    try s.set(p, "a", "1");
    try s.set(p, "b", "two");
    const keys = s.getKeys(p);
    defer keys.deinit();
    try w.writeAll("\"keys\":[");
    for (0..keys.count()) |i| {
        try w.writeAll(sep(i));
        try std.json.Stringify.encodeJsonString(keys.at(i), .{}, w);
    }
    const b = try s.get(p, "b");
    defer vh.free(b);
    try w.print("],\"exists\":{},\"b\":", .{try s.exists(p)});
    try std.json.Stringify.encodeJsonString(b, .{}, w);
    try s.delete(p, "a");
    if (s.get(p, "a")) |v| {
        vh.free(v);
        try w.writeAll(",\"a_after_delete\":\"found\"");
    } else |err| try w.print(",\"a_after_delete\":\"{s}\"", .{@errorName(err)});
    try s.deleteAll(p);
    try w.print(",\"exists_after\":{}}}", .{try s.exists(p)});
    return null;
}

fn opFrameStore(frame: Mat, w: *W) !Out {
    const s = vh.datastore.FrameStore.init();
    defer s.deinit();
    try w.print("{{\"exists_before\":{},", .{try s.exists(frame)});
    try s.set(frame, "face-0", "1,2,3,4");
    try s.set(frame, "face-1", "5,6,7,8");
    const keys = s.getKeys(frame);
    defer keys.deinit();
    try w.writeAll("\"keys\":[");
    for (0..keys.count()) |i| {
        try w.writeAll(sep(i));
        try std.json.Stringify.encodeJsonString(keys.at(i), .{}, w);
    }
    const v = try s.get(frame, "face-1");
    defer vh.free(v);
    try w.print("],\"exists\":{},\"face_1\":", .{try s.exists(frame)});
    try std.json.Stringify.encodeJsonString(v, .{}, w);
    try s.delete(frame, "face-0");
    if (s.get(frame, "face-0")) |x| {
        vh.free(x);
        try w.writeAll(",\"face_0_after_delete\":\"found\"");
    } else |err| try w.print(",\"face_0_after_delete\":\"{s}\"", .{@errorName(err)});
    try s.deleteAll(frame);
    try w.print(",\"exists_after\":{}}}", .{try s.exists(frame)});
    return null;
}

fn opOverlay(frame: Mat, _: *W) !Out {
    const bg: vh.Rgba = .{ .r = 0, .g = 0, .b = 0, .a = 200 };
    try vh.overlay.caption(frame, "overlay check caption", .top, 0.8, rgba(255, 255, 255), bg, 2);
    return null;
}

fn opHttp(frame: Mat, w: *W) !Out {
    const base = vh.config.get("cvcheck-url") orelse return error.NoUrl;
    defer vh.free(base);
    var buf: [512]u8 = undefined;
    try w.writeAll("{\"get\":");
    if (vh.http.get(try std.fmt.bufPrint(&buf, "{s}/get", .{base}))) |body| {
        defer vh.free(body);
        try std.json.Stringify.encodeJsonString(body, .{}, w);
    } else |err| try w.print("\"error {s}\"", .{@errorName(err)});
    try w.writeAll(",\"post\":");
    if (vh.http.post(try std.fmt.bufPrint(&buf, "{s}/post", .{base}), "text/plain", "cvcheck body")) |body| {
        defer vh.free(body);
        try std.json.Stringify.encodeJsonString(body, .{}, w);
    } else |err| try w.print("\"error {s}\"", .{@errorName(err)});
    try w.writeAll(",\"post_image\":");
    if (vh.http.postImage(try std.fmt.bufPrint(&buf, "{s}/image", .{base}), "application/json", "{\"image\":\"%IMAGE%\"}", "answer", frame)) |body| {
        defer vh.free(body);
        try std.json.Stringify.encodeJsonString(body, .{}, w);
    } else |err| try w.print("\"error {s}\"", .{@errorName(err)});
    try w.writeAll(",\"not_allowed\":");
    if (vh.http.get("http://203.0.113.1/")) |body| {
        defer vh.free(body);
        try std.json.Stringify.encodeJsonString(body, .{}, w);
    } else |err| try w.print("\"{s}\"", .{@errorName(err)});
    try w.writeAll("}");
    return null;
}

/// Request state of the `fetch` operation, kept across frames.
var fetch_id: ?u32 = null;
var fetch_status: u16 = 0;
var fetch_body: [4096]u8 = undefined;
var fetch_len: usize = 0;

fn opFetch(_: Mat, w: *W) !Out {
    const id = fetch_id orelse {
        const base = vh.config.get("cvcheck-url") orelse return error.NoUrl;
        defer vh.free(base);
        var buf: [512]u8 = undefined;
        fetch_id = try vh.fetch.start("GET", try std.fmt.bufPrint(&buf, "{s}/fetch", .{base}), "", "");
        fetch_len = 0;
        fetch_status = 0;
        return null;
    };
    const p = vh.fetch.poll(id) catch |err| {
        fetch_id = null;
        return err;
    };
    defer p.deinit();
    if (p.status != 0) fetch_status = p.status;
    const n = @min(p.body.len, fetch_body.len - fetch_len);
    @memcpy(fetch_body[fetch_len..][0..n], p.body[0..n]);
    fetch_len += n;
    if (p.done) {
        fetch_id = null;
        try w.print("{{\"status\":{d},\"body\":", .{fetch_status});
        try std.json.Stringify.encodeJsonString(fetch_body[0..fetch_len], .{}, w);
        try w.writeAll("}");
    }
    return null;
}

fn opFetchCancel(_: Mat, w: *W) !Out {
    const base = vh.config.get("cvcheck-url") orelse return error.NoUrl;
    defer vh.free(base);
    var buf: [512]u8 = undefined;
    const id = try vh.fetch.start("GET", try std.fmt.bufPrint(&buf, "{s}/fetch", .{base}), "", "");
    vh.fetch.cancel(id);
    if (vh.fetch.poll(id)) |p| {
        p.deinit();
        try w.writeAll("{\"poll_after_cancel\":\"ok\"}");
    } else |err| try w.print("{{\"poll_after_cancel\":\"{s}\"}}", .{@errorName(err)});
    return null;
}
