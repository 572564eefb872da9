//! hello: the smallest vision-host processor. Logs "frame WxH type T" at info level for
//! every frame (W×H in px, T = OpenCV type code, e.g. 16 = 8-bit BGR) and passes the frame
//! on unchanged.
const vh = @import("vh");

pub const panic = vh.panic;

export fn process(frame: u32) u32 {
    const mat = vh.Mat.borrow(frame);
    vh.log.infof("frame {d}x{d} type {d}", .{ mat.cols(), mat.rows(), mat.mattype() });
    return frame;
}
