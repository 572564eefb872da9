//! Triggers (`ollama-trigger=change`): the change check (grey thumbnails of the frame, or
//! its region, and their difference) and the request counters in the processor store.
const std = @import("std");
const vh = @import("vh");
const store = @import("store.zig");

/// What started a request (counted as ollama/requests-NAME).
pub const Reason = enum { interval, change, heartbeat };

const thumb_w = 32;
const thumb_h = 18;

/// The change check: the current frame's thumbnail and that of the frame sent with the
/// last request (the reference).
pub const Check = struct {
    /// The current frame's grey thumbnail (valid when `valid`).
    cur: [thumb_w * thumb_h]u8 = undefined,
    valid: bool = false,
    /// The thumbnail of the frame sent with the last request (valid when `has_ref`).
    ref: [thumb_w * thumb_h]u8 = undefined,
    has_ref: bool = false,
    failed_logged: bool = false,

    /// Fills `cur` with `image` (the frame, or its region) shrunk to thumb_w × thumb_h grey
    /// pixels and sets `valid`; false (logged once) if the host could not make it.
    pub fn sample(self: *Check, image: vh.Mat) bool {
        self.valid = self.thumbnail(image);
        return self.valid;
    }

    fn thumbnail(self: *Check, image: vh.Mat) bool {
        // Two steps: bilinear to 4× the thumbnail, then area averaging (4 × 4 px a pixel). The
        // same scores on the clips in media/ as one area resize of the whole frame, ~6× cheaper.
        const mid = vh.cv.resize(image, .{ .x = 4 * thumb_w, .y = 4 * thumb_h }, 0, 0, .linear) catch
            return self.failed("resize");
        defer mid.drop();
        const small = vh.cv.resize(mid, .{ .x = thumb_w, .y = thumb_h }, 0, 0, .area) catch
            return self.failed("resize");
        defer small.drop();
        const grey: ?vh.Mat = if (small.mattype() == 0) null else vh.cv.cvtColor(small, .bgr_to_gray) catch
            return self.failed("cvt-color");
        defer if (grey) |g| g.drop();
        const g = grey orelse small;
        if (g.rows() != thumb_h or g.cols() != thumb_w) return self.failed("the thumbnail's size");
        var i: usize = 0;
        for (0..thumb_h) |r| {
            for (0..thumb_w) |c| {
                self.cur[i] = g.getUcharAt(@intCast(r), @intCast(c));
                i += 1;
            }
        }
        return true;
    }

    fn failed(self: *Check, what: []const u8) bool {
        if (!self.failed_logged) {
            self.failed_logged = true;
            vh.log.warnf("ollama: the change check failed ({s}: {s}); requests start only on the heartbeat", .{ what, vh.lastError() });
        }
        return false;
    }

    /// How much the scene changed since the last captioned frame: the mean absolute
    /// difference of the two thumbnails / 255, 0–1.
    pub fn score(self: *const Check) f32 {
        var sum: u32 = 0;
        for (self.cur, self.ref) |a, b| sum += if (a > b) a - b else b - a;
        return @as(f32, @floatFromInt(sum)) / @as(f32, @floatFromInt(self.cur.len * 255));
    }

    /// A request started: the frame sent (when its thumbnail was made) is the new reference.
    pub fn keep(self: *Check) void {
        if (!self.valid) return;
        self.ref = self.cur;
        self.has_ref = true;
    }

    /// No reference: the next request need not wait for a change.
    pub fn forget(self: *Check) void {
        self.has_ref = false;
    }
};

/// The counters under "ollama-stats" in the processor store.
pub const Stats = struct {
    requests_by: [std.enums.values(Reason).len]u64 = @splat(0),
    frames_unchanged: u64 = 0,
    frames_unchanged_stored: u64 = 0,
    unchanged_stored_us: u64 = 0,

    /// A request started for `reason`: its counter (and frames-unchanged, if it moved) into
    /// the processor store.
    pub fn countRequest(self: *Stats, reason: Reason, now: u64) void {
        const i = @intFromEnum(reason);
        self.requests_by[i] += 1;
        var key_buf: [32]u8 = undefined;
        const key = std.fmt.bufPrint(&key_buf, "requests-{s}", .{@tagName(reason)}) catch unreachable;
        storeCount(key, self.requests_by[i]);
        if (self.frames_unchanged != self.frames_unchanged_stored) self.storeUnchanged(now);
    }

    /// The change check found the frame unchanged: counted, stored at most once a second.
    pub fn unchanged(self: *Stats, now: u64) void {
        self.frames_unchanged += 1;
        if (now -| self.unchanged_stored_us >= std.time.us_per_s) self.storeUnchanged(now);
    }

    fn storeUnchanged(self: *Stats, now: u64) void {
        self.unchanged_stored_us = now;
        if (self.frames_unchanged == self.frames_unchanged_stored) return;
        self.frames_unchanged_stored = self.frames_unchanged;
        storeCount("frames-unchanged", self.frames_unchanged);
    }

    fn storeCount(key: []const u8, n: u64) void {
        var buf: [20]u8 = undefined;
        const text = std.fmt.bufPrint(&buf, "{d}", .{n}) catch unreachable;
        store.get().set("ollama-stats", key, text) catch |err| store.failed(err);
    }
};
