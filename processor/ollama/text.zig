//! Bounded text buffers: fixed-capacity text that never allocates (captions, messages,
//! reply bodies); what does not fit is dropped, cut at a character boundary.
const std = @import("std");
const vh = @import("vh");
const json = vh.json;

pub fn TextBuf(comptime capacity: usize) type {
    return struct {
        const Self = @This();
        buf: [capacity]u8 = undefined,
        len: usize = 0,

        pub fn slice(self: *const Self) []const u8 {
            return self.buf[0..self.len];
        }
        pub fn clear(self: *Self) void {
            self.len = 0;
        }
        /// Replaces the content; text longer than the capacity is cut at a char boundary.
        pub fn set(self: *Self, text: []const u8) void {
            const t = vh.utf8Prefix(text, capacity);
            @memcpy(self.buf[0..t.len], t);
            self.len = t.len;
        }
        /// Appends a JSON string value, decoded; what does not fit is dropped.
        pub fn appendJson(self: *Self, s: json.Value) void {
            _ = s.decodeAppend(&self.buf, &self.len);
        }
        /// Appends raw bytes; what does not fit is dropped.
        pub fn appendRaw(self: *Self, bytes: []const u8) void {
            const k = @min(bytes.len, capacity - self.len);
            @memcpy(self.buf[self.len..][0..k], bytes[0..k]);
            self.len += k;
        }
    };
}

/// A caption (streaming, complete, or as the overlay template made it).
pub const Caption = TextBuf(2048);

pub fn trimmed(s: []const u8) []const u8 {
    return std.mem.trim(u8, s, " \t\r\n");
}
