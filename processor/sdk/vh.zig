//! vision-host guest SDK for Zig processors.
//!
//! A processor is a WASI preview 1 reactor module (built with `-fno-entry`) that exports
//! `process(frame: u32) -> u32`, `memory` and `cabi_realloc`, and imports the functions of
//! the WIT world `vision-host:platform/processor` (wasm/wit/), lowered with the component
//! model's canonical ABI. This file declares those imports with their exact core-wasm
//! signatures and wraps them in typed calls:
//!
//!     const vh = @import("vh"); // module "vh" = processor/sdk/vh.zig (see processor/build.py)
//!     pub const panic = vh.panic; // reports panics through logging.error
//!     export fn process(frame: u32) u32 {
//!         const m = vh.Mat.borrow(frame);
//!         vh.log.infof("frame {d}x{d}", .{ m.cols(), m.rows() });
//!         return frame;
//!     }
//!
//! Memory rules (the guest owns everything the host returns):
//! * Strings and lists returned by the host are allocated in guest memory through the
//!   exported `cabi_realloc`. Wrappers that return them hand the caller an owned slice,
//!   to release with `vh.free` (or the type's `deinit`); wrappers that do not need them
//!   (error messages, ...) free them before returning.
//! * Mat handles are plain u32. `Mat.drop` releases a mat the guest created (clone, blur
//!   result, ...); never drop the frame handle `process` received, and never drop a mat
//!   you return from `process` (the host takes it over).
//!
//! Canonical ABI in brief: string/list = (ptr, len); bool = i32 0/1; enum = i32; records
//! flatten field by field. A result with more than one flat value is written by the host
//! into a return area whose address is the last parameter: discriminant u8 at +0 (0 = ok,
//! 1 = err), payload at +max-payload-alignment (+4 when either case holds an i32/pointer,
//! +1 when both cases are u8-sized, e.g. result<bool, enum>).
const std = @import("std");

pub const json = @import("json.zig");

// ==========================================================================================
// Memory shared with the host
// ==========================================================================================

/// The guest heap (single-threaded wasm).
pub const allocator = std.heap.wasm_allocator;

/// Every block handed to the host through `cabi_realloc` is allocated with at least this
/// alignment, and `free` releases with it; so a block is freed exactly as it was allocated
/// whatever alignment (1, 4 or 8) the host asked for.
const host_alignment: std.mem.Alignment = .@"8";

/// Address returned for zero-byte allocations: never dereferenced, never freed.
const empty_block: usize = 8;

/// The canonical ABI allocation hook: a fresh block when `old_ptr` is 0, else a resize.
/// Traps when memory is exhausted (the host call that needed it fails).
fn cabiRealloc(old_ptr: ?[*]u8, old_size: usize, alignment: usize, new_size: usize) callconv(.c) [*]u8 {
    if (alignment > host_alignment.toByteUnits()) @panic("cabi_realloc: alignment over 8");
    const old: []u8 = if (old_ptr) |p| p[0..old_size] else &.{};
    if (new_size == 0) {
        freeBytes(old);
        return @ptrFromInt(empty_block);
    }
    const new = allocator.rawAlloc(new_size, host_alignment, @returnAddress()) orelse
        @panic("cabi_realloc: out of memory");
    if (old.len > 0) {
        @memcpy(new[0..@min(old.len, new_size)], old[0..@min(old.len, new_size)]);
        freeBytes(old);
    }
    return new;
}

comptime {
    @export(&cabiRealloc, .{ .name = "cabi_realloc" });
}

fn freeBytes(bytes: []u8) void {
    if (bytes.len == 0) return;
    allocator.rawFree(bytes, host_alignment, @returnAddress());
}

/// Releases a slice the host allocated (a string, list, or `Progress.body`) or one made
/// with `alloc`. Empty slices are ignored.
pub fn free(slice: anytype) void {
    freeBytes(@constCast(std.mem.sliceAsBytes(slice)));
}

/// Allocates `n` bytes that `free` releases. Null when memory is exhausted.
pub fn alloc(n: usize) ?[]u8 {
    if (n == 0) return @as([*]u8, @ptrFromInt(empty_block))[0..0];
    const p = allocator.rawAlloc(n, host_alignment, @returnAddress()) orelse return null;
    return p[0..n];
}

/// Builds a string from the canonical (ptr, len) pair the host wrote.
fn hostSlice(comptime T: type, ptr: u32, len: u32) []T {
    if (len == 0) return &.{};
    const p: [*]T = @ptrFromInt(ptr);
    return p[0..len];
}

/// The return area for results that do not fit one flat value (16 bytes suffices for
/// every function of the world).
const RetArea = struct {
    bytes: [16]u8 align(8) = @splat(0),

    fn ptr(self: *RetArea) u32 {
        return @intFromPtr(&self.bytes);
    }
    fn u8At(self: *const RetArea, off: usize) u8 {
        return self.bytes[off];
    }
    fn u16At(self: *const RetArea, off: usize) u16 {
        return std.mem.readInt(u16, self.bytes[off..][0..2], .little);
    }
    fn u32At(self: *const RetArea, off: usize) u32 {
        return std.mem.readInt(u32, self.bytes[off..][0..4], .little);
    }
    /// True when the result discriminant says `ok`.
    fn isOk(self: *const RetArea) bool {
        return self.bytes[0] == 0;
    }
    /// A (ptr, len) pair at `off` as an owned slice.
    fn slice(self: *const RetArea, comptime T: type, off: usize) []T {
        return hostSlice(T, self.u32At(off), self.u32At(off + 4));
    }
};

/// (ptr, len) of a Zig slice, as lowered for `string` / `list<u8>` parameters.
inline fn addr(s: []const u8) u32 {
    return @intFromPtr(s.ptr);
}
inline fn len32(s: []const u8) u32 {
    return @intCast(s.len);
}

// ==========================================================================================
// Panics
// ==========================================================================================

/// Use as `pub const panic = vh.panic;` in a processor's root file: a panic logs its
/// message through `logging.error` and traps (the host sees the trap).
pub const panic = std.debug.FullPanic(onPanic);

fn onPanic(msg: []const u8, _: ?usize) noreturn {
    @branchHint(.cold);
    const prefix = "processor panic: ";
    var buf: [256]u8 = undefined;
    @memcpy(buf[0..prefix.len], prefix);
    const m = utf8Prefix(msg, buf.len - prefix.len);
    @memcpy(buf[prefix.len..][0..m.len], m);
    raw.logging.@"error"(addr(&buf), @intCast(prefix.len + m.len));
    @trap();
}

/// The longest prefix of `s` of at most `max` bytes that does not cut a UTF-8 character
/// (assuming `s` is valid UTF-8).
pub fn utf8Prefix(s: []const u8, max: usize) []const u8 {
    if (s.len <= max) return s;
    var end = max;
    while (end > 0 and (s[end] & 0xC0) == 0x80) end -= 1;
    return s[0..end];
}

// ==========================================================================================
// Raw imports: exactly the core-wasm signatures of the world (see wasm/wit/ and
// `wasm-tools component embed --dummy-names legacy wasm/wit -w processor`).
// ==========================================================================================

pub const raw = struct {
    pub const time = struct {
        pub extern "wasmvision:platform/time" fn now(tz: u32) u64;
    };
    pub const logging = struct {
        pub extern "wasmvision:platform/logging" fn log(ptr: u32, len: u32) void;
        pub extern "wasmvision:platform/logging" fn @"error"(ptr: u32, len: u32) void;
        pub extern "wasmvision:platform/logging" fn warn(ptr: u32, len: u32) void;
        pub extern "wasmvision:platform/logging" fn info(ptr: u32, len: u32) void;
        pub extern "wasmvision:platform/logging" fn debug(ptr: u32, len: u32) void;
        pub extern "wasmvision:platform/logging" fn println(ptr: u32, len: u32) void;
    };
    pub const config = struct {
        pub extern "wasmvision:platform/config" fn @"get-config"(key_ptr: u32, key_len: u32, ret: u32) void;
    };
    pub const http = struct {
        pub extern "wasmvision:platform/http" fn get(url_ptr: u32, url_len: u32, ret: u32) void;
        pub extern "wasmvision:platform/http" fn post(url_ptr: u32, url_len: u32, ct_ptr: u32, ct_len: u32, body_ptr: u32, body_len: u32, ret: u32) void;
        pub extern "wasmvision:platform/http" fn @"post-image"(url_ptr: u32, url_len: u32, ct_ptr: u32, ct_len: u32, tpl_ptr: u32, tpl_len: u32, item_ptr: u32, item_len: u32, mat: u32, ret: u32) void;
    };
    pub const datastore = struct {
        pub extern "wasmvision:platform/datastore" fn @"[constructor]processor-store"(id: u32) u32;
        pub extern "wasmvision:platform/datastore" fn @"[method]processor-store.get"(self: u32, proc_ptr: u32, proc_len: u32, key_ptr: u32, key_len: u32, ret: u32) void;
        pub extern "wasmvision:platform/datastore" fn @"[method]processor-store.set"(self: u32, proc_ptr: u32, proc_len: u32, key_ptr: u32, key_len: u32, val_ptr: u32, val_len: u32, ret: u32) void;
        pub extern "wasmvision:platform/datastore" fn @"[method]processor-store.delete"(self: u32, proc_ptr: u32, proc_len: u32, key_ptr: u32, key_len: u32, ret: u32) void;
        pub extern "wasmvision:platform/datastore" fn @"[method]processor-store.delete-all"(self: u32, proc_ptr: u32, proc_len: u32, ret: u32) void;
        pub extern "wasmvision:platform/datastore" fn @"[method]processor-store.exists"(self: u32, proc_ptr: u32, proc_len: u32, ret: u32) void;
        pub extern "wasmvision:platform/datastore" fn @"[method]processor-store.get-keys"(self: u32, proc_ptr: u32, proc_len: u32, ret: u32) void;
        pub extern "wasmvision:platform/datastore" fn @"[resource-drop]processor-store"(self: u32) void;
    };
    pub const mat = struct {
        pub extern "wasm:cv/mat" fn @"[constructor]mat"(id: u32) u32;
        pub extern "wasm:cv/mat" fn @"[static]mat.new-with-size"(cols: u32, rows: u32, mattype: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.clone"(self: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.close"(self: u32) void;
        pub extern "wasm:cv/mat" fn @"[method]mat.cols"(self: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.rows"(self: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.mattype"(self: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.size"(self: u32, ret: u32) void;
        pub extern "wasm:cv/mat" fn @"[method]mat.step"(self: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.elemsize"(self: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.empty"(self: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.region"(self: u32, min_x: i32, min_y: i32, max_x: i32, max_y: i32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.copy-to"(self: u32, dst: u32) void;
        pub extern "wasm:cv/mat" fn @"[method]mat.get-uchar-at"(self: u32, row: u32, col: u32) u32;
        pub extern "wasm:cv/mat" fn @"[method]mat.set-uchar-at"(self: u32, row: u32, col: u32, val: u32) void;
        pub extern "wasm:cv/mat" fn @"[method]mat.get-vecb-at"(self: u32, row: u32, col: u32, ret: u32) void;
        pub extern "wasm:cv/mat" fn @"[resource-drop]mat"(self: u32) void;
    };
    pub const cv = struct {
        pub extern "wasm:cv/cv" fn @"put-text"(img: u32, text_ptr: u32, text_len: u32, x: i32, y: i32, font: u32, scale: f64, r: u32, g: u32, b: u32, a: u32, thickness: i32, ret: u32) void;
        pub extern "wasm:cv/cv" fn rectangle(img: u32, min_x: i32, min_y: i32, max_x: i32, max_y: i32, r: u32, g: u32, b: u32, a: u32, thickness: u32, ret: u32) void;
        pub extern "wasm:cv/cv" fn circle(img: u32, x: i32, y: i32, radius: u32, r: u32, g: u32, b: u32, a: u32, thickness: u32, ret: u32) void;
        pub extern "wasm:cv/cv" fn line(img: u32, x1: i32, y1: i32, x2: i32, y2: i32, r: u32, g: u32, b: u32, a: u32, thickness: u32, ret: u32) void;
        pub extern "wasm:cv/cv" fn blur(src: u32, kx: i32, ky: i32, ret: u32) void;
        pub extern "wasm:cv/cv" fn @"gaussian-blur"(src: u32, kx: i32, ky: i32, sigma_x: f32, sigma_y: f32, border: u32, ret: u32) void;
        pub extern "wasm:cv/cv" fn resize(src: u32, w: i32, h: i32, fx: f32, fy: f32, interp: u32, ret: u32) void;
    };
    pub const fetch = struct {
        pub extern "vision-host:platform/fetch" fn @"post-frame"(url_ptr: u32, url_len: u32, ct_ptr: u32, ct_len: u32, tpl_ptr: u32, tpl_len: u32, frame: u32, max_side: u32, jpeg_quality: u32, ret: u32) void;
        pub extern "vision-host:platform/fetch" fn start(method_ptr: u32, method_len: u32, url_ptr: u32, url_len: u32, ct_ptr: u32, ct_len: u32, body_ptr: u32, body_len: u32, ret: u32) void;
        pub extern "vision-host:platform/fetch" fn poll(id: u32, ret: u32) void;
        pub extern "vision-host:platform/fetch" fn cancel(id: u32) void;
    };
    pub const overlay = struct {
        pub extern "vision-host:platform/overlay" fn caption(img: u32, text_ptr: u32, text_len: u32, where: u32, font_scale: f32, fg_r: u32, fg_g: u32, fg_b: u32, fg_a: u32, bg_r: u32, bg_g: u32, bg_b: u32, bg_a: u32, max_lines: u32, ret: u32) void;
    };
};

// ==========================================================================================
// wasmvision:platform/time
// ==========================================================================================

pub const time = struct {
    /// Wall-clock time since the Unix epoch in microseconds.
    pub fn nowUs() u64 {
        return raw.time.now(0);
    }
    /// Wall-clock time since the Unix epoch in milliseconds.
    pub fn nowMs() u64 {
        return raw.time.now(0) / 1000;
    }
};

// ==========================================================================================
// wasmvision:platform/logging
// ==========================================================================================

/// Logging through the host. `msg` must be valid UTF-8. The `...f` variants format into a
/// 1 KiB stack buffer (std.fmt syntax) and truncate longer messages at a character
/// boundary, ending them with "…".
pub const log = struct {
    pub fn err(msg: []const u8) void {
        raw.logging.@"error"(addr(msg), len32(msg));
    }
    pub fn warn(msg: []const u8) void {
        raw.logging.warn(addr(msg), len32(msg));
    }
    pub fn info(msg: []const u8) void {
        raw.logging.info(addr(msg), len32(msg));
    }
    pub fn debug(msg: []const u8) void {
        raw.logging.debug(addr(msg), len32(msg));
    }
    /// wasmVision's deprecated `log` (logged at warning level).
    pub fn logDeprecated(msg: []const u8) void {
        raw.logging.log(addr(msg), len32(msg));
    }
    /// Printed on the host's stdout regardless of the log level.
    pub fn println(msg: []const u8) void {
        raw.logging.println(addr(msg), len32(msg));
    }

    pub fn errf(comptime fmt: []const u8, args: anytype) void {
        var buf: [1024]u8 = undefined;
        err(bufPrintTrunc(&buf, fmt, args));
    }
    pub fn warnf(comptime fmt: []const u8, args: anytype) void {
        var buf: [1024]u8 = undefined;
        warn(bufPrintTrunc(&buf, fmt, args));
    }
    pub fn infof(comptime fmt: []const u8, args: anytype) void {
        var buf: [1024]u8 = undefined;
        info(bufPrintTrunc(&buf, fmt, args));
    }
    pub fn debugf(comptime fmt: []const u8, args: anytype) void {
        var buf: [1024]u8 = undefined;
        debug(bufPrintTrunc(&buf, fmt, args));
    }
};

/// Formats into `buf`; when the text does not fit, it is cut at a UTF-8 character boundary
/// and ends with "…". Always returns valid UTF-8 if the arguments are.
pub fn bufPrintTrunc(buf: []u8, comptime fmt: []const u8, args: anytype) []const u8 {
    const ellipsis = "…";
    var w = std.Io.Writer.fixed(buf);
    w.print(fmt, args) catch {
        const kept = utf8Prefix(buf[0..w.end], buf.len - ellipsis.len);
        @memcpy(buf[kept.len..][0..ellipsis.len], ellipsis);
        return buf[0 .. kept.len + ellipsis.len];
    };
    return w.buffered();
}

// ==========================================================================================
// wasmvision:platform/config
// ==========================================================================================

pub const config = struct {
    /// The value of config key `key` (`-c key=value`), owned by the caller (`vh.free`),
    /// or null when the key is not set.
    pub fn get(key: []const u8) ?[]u8 {
        var ret: RetArea = .{};
        raw.config.@"get-config"(addr(key), len32(key), ret.ptr());
        // result<string, config-error>: ok -> (ptr, len) at +4; err -> enum u8 at +4.
        if (!ret.isOk()) return null;
        return ret.slice(u8, 4);
    }

    /// Like `get`, but copies the value into `buf` and frees the host's copy. Null when
    /// the key is not set; error.TooLong when the value does not fit `buf`.
    pub fn getInto(key: []const u8, buf: []u8) error{TooLong}!?[]u8 {
        const value = get(key) orelse return null;
        defer free(value);
        if (value.len > buf.len) return error.TooLong;
        @memcpy(buf[0..value.len], value);
        return buf[0..value.len];
    }
};

// ==========================================================================================
// wasmvision:platform/http (blocking; prefer `fetch`, which never blocks the video)
// ==========================================================================================

pub const http = struct {
    pub const Error = error{
        DestinationNotAllowed,
        InvalidUrl,
        RequestError,
        RuntimeError,
        TooManyRequests,
    };

    /// http-error enum (declaration order of the WIT).
    fn toError(code: u8) Error {
        return switch (code) {
            1 => error.DestinationNotAllowed,
            2 => error.InvalidUrl,
            3 => error.RequestError,
            5 => error.TooManyRequests,
            else => error.RuntimeError, // 4 = runtime-error; 0 = success never comes as err
        };
    }

    /// result<string, http-error>: ok -> (ptr, len) at +4; err -> enum u8 at +4.
    fn stringResult(ret: *const RetArea) Error![]u8 {
        if (!ret.isOk()) return toError(ret.u8At(4));
        return ret.slice(u8, 4);
    }

    /// Blocking GET; the body as text, owned by the caller (`vh.free`).
    pub fn get(url: []const u8) Error![]u8 {
        var ret: RetArea = .{};
        raw.http.get(addr(url), len32(url), ret.ptr());
        return stringResult(&ret);
    }

    /// Blocking POST of `body`; the reply body as text, owned by the caller.
    pub fn post(url: []const u8, content_type: []const u8, body: []const u8) Error![]u8 {
        var ret: RetArea = .{};
        raw.http.post(addr(url), len32(url), addr(content_type), len32(content_type), addr(body), len32(body), ret.ptr());
        return stringResult(&ret);
    }

    /// Blocking POST of frame `mat` as base64 JPEG in place of `%IMAGE%` in `template`;
    /// returns the top-level JSON field `response_item` of the reply, owned by the caller.
    pub fn postImage(url: []const u8, content_type: []const u8, template: []const u8, response_item: []const u8, mat: Mat) Error![]u8 {
        var ret: RetArea = .{};
        raw.http.@"post-image"(addr(url), len32(url), addr(content_type), len32(content_type), addr(template), len32(template), addr(response_item), len32(response_item), mat.handle, ret.ptr());
        return stringResult(&ret);
    }
};

// ==========================================================================================
// wasmvision:platform/datastore
// ==========================================================================================

pub const datastore = struct {
    pub const Error = error{ NoSuchFrame, NoSuchKey, RuntimeError };

    /// datastore-error enum (declaration order of the WIT).
    fn toError(code: u8) Error {
        return switch (code) {
            1 => error.NoSuchFrame,
            2 => error.NoSuchKey,
            else => error.RuntimeError,
        };
    }

    /// A `processor-store` resource: string key/values grouped per processor name, shared
    /// by all processors of a run. Create once and keep it.
    pub const Store = struct {
        handle: u32,

        pub fn init() Store {
            return .{ .handle = raw.datastore.@"[constructor]processor-store"(0) };
        }

        /// Drops the resource.
        pub fn deinit(self: Store) void {
            raw.datastore.@"[resource-drop]processor-store"(self.handle);
        }

        /// The value, owned by the caller (`vh.free`).
        pub fn get(self: Store, processor: []const u8, key: []const u8) Error![]u8 {
            var ret: RetArea = .{};
            raw.datastore.@"[method]processor-store.get"(self.handle, addr(processor), len32(processor), addr(key), len32(key), ret.ptr());
            // result<string, datastore-error>: ok -> (ptr, len) at +4; err -> enum u8 at +4.
            if (!ret.isOk()) return toError(ret.u8At(4));
            return ret.slice(u8, 4);
        }

        pub fn set(self: Store, processor: []const u8, key: []const u8, value: []const u8) Error!void {
            var ret: RetArea = .{};
            raw.datastore.@"[method]processor-store.set"(self.handle, addr(processor), len32(processor), addr(key), len32(key), addr(value), len32(value), ret.ptr());
            return unitResult(&ret);
        }

        pub fn delete(self: Store, processor: []const u8, key: []const u8) Error!void {
            var ret: RetArea = .{};
            raw.datastore.@"[method]processor-store.delete"(self.handle, addr(processor), len32(processor), addr(key), len32(key), ret.ptr());
            return unitResult(&ret);
        }

        pub fn deleteAll(self: Store, processor: []const u8) Error!void {
            var ret: RetArea = .{};
            raw.datastore.@"[method]processor-store.delete-all"(self.handle, addr(processor), len32(processor), ret.ptr());
            return unitResult(&ret);
        }

        /// Whether `processor` has any keys.
        pub fn exists(self: Store, processor: []const u8) Error!bool {
            var ret: RetArea = .{};
            raw.datastore.@"[method]processor-store.exists"(self.handle, addr(processor), len32(processor), ret.ptr());
            // result<bool, datastore-error>: both payloads are 1 byte, so payload at +1.
            if (!ret.isOk()) return toError(ret.u8At(1));
            return ret.u8At(1) != 0;
        }

        /// The keys of `processor`, owned by the caller (`StringList.deinit`).
        pub fn getKeys(self: Store, processor: []const u8) StringList {
            var ret: RetArea = .{};
            raw.datastore.@"[method]processor-store.get-keys"(self.handle, addr(processor), len32(processor), ret.ptr());
            // list<string>: (ptr, len) at +0 of the return area; elements (ptr, len).
            return .{ .items = ret.slice(StringList.Item, 0) };
        }

        /// result<_, datastore-error>: the err payload (1-byte enum) is at +1.
        fn unitResult(ret: *const RetArea) Error!void {
            if (!ret.isOk()) return toError(ret.u8At(1));
        }
    };
};

/// A `list<string>` returned by the host: owned, release with `deinit`.
pub const StringList = struct {
    items: []Item,

    /// One element as laid out in memory: (ptr, len), 8 bytes, align 4.
    pub const Item = extern struct { ptr: u32, len: u32 };

    pub fn count(self: StringList) usize {
        return self.items.len;
    }
    pub fn at(self: StringList, i: usize) []const u8 {
        return hostSlice(u8, self.items[i].ptr, self.items[i].len);
    }
    pub fn deinit(self: StringList) void {
        for (self.items) |it| free(hostSlice(u8, it.ptr, it.len));
        free(self.items);
    }
};

// ==========================================================================================
// wasm:cv/types
// ==========================================================================================

/// A colour (vision-host converts it to OpenCV's BGR order).
pub const Rgba = struct {
    r: u8,
    g: u8,
    b: u8,
    a: u8 = 255,

    pub const white: Rgba = .{ .r = 255, .g = 255, .b = 255 };
    pub const black: Rgba = .{ .r = 0, .g = 0, .b = 0 };
};

/// Width and height in px.
pub const Size = struct { x: i32, y: i32 };
/// A position in px from the top-left corner.
pub const Point = Size;
/// Top-left (`min`) and bottom-right (`max`) corners in px.
pub const Rect = struct { min: Point, max: Point };

pub const BorderType = enum(u32) {
    constant,
    replicate,
    reflect,
    wrap,
    reflect101,
    transparent,
    default,
    isolated,
};

pub const HersheyFont = enum(u32) {
    simplex,
    plain,
    duplex,
    complex,
    triplex,
    complex_small,
    script_simplex,
    script_complex,
    italic,
};

pub const Interpolation = enum(u32) {
    nearest,
    linear,
    cubic,
    area,
    lanczos4,
};

/// Element depth of a mat (a single-channel type code).
pub const MatType = enum(u32) {
    cv8u,
    cv8s,
    cv16u,
    cv16s,
    cv32s,
    cv32f,
    cv64f,
};

// ==========================================================================================
// wasm:cv/mat
// ==========================================================================================

/// A handle to a host-side image (H×W×C array, BGR for colour frames).
pub const Mat = struct {
    handle: u32,

    /// Wraps a handle the guest does not own (e.g. the frame given to `process`).
    pub fn borrow(handle: u32) Mat {
        return .{ .handle = handle };
    }

    /// A new empty mat (owned: `drop` it).
    pub fn initEmpty() Mat {
        return .{ .handle = raw.mat.@"[constructor]mat"(0) };
    }

    /// A new zero-filled mat of `rows` × `cols` elements (owned). `mattype` is a depth
    /// (`@intFromEnum(MatType.cv8u)`) or an OpenCV type code (depth + 8 × (channels - 1)).
    pub fn newWithSize(cols_: u32, rows_: u32, mattype_: u32) Mat {
        return .{ .handle = raw.mat.@"[static]mat.new-with-size"(cols_, rows_, mattype_) };
    }

    /// Releases a mat the guest owns. Never drop the frame given to `process`.
    pub fn drop(self: Mat) void {
        raw.mat.@"[resource-drop]mat"(self.handle);
    }

    /// A deep copy (owned).
    pub fn clone(self: Mat) Mat {
        return .{ .handle = raw.mat.@"[method]mat.clone"(self.handle) };
    }

    /// Releases the pixels now; the handle stays valid (and empty) until dropped.
    pub fn close(self: Mat) void {
        raw.mat.@"[method]mat.close"(self.handle);
    }

    /// Width in px.
    pub fn cols(self: Mat) u32 {
        return raw.mat.@"[method]mat.cols"(self.handle);
    }

    /// Height in px.
    pub fn rows(self: Mat) u32 {
        return raw.mat.@"[method]mat.rows"(self.handle);
    }

    /// OpenCV's full type code: depth + 8 × (channels - 1), e.g. 16 = 8-bit, 3 channels.
    pub fn mattype(self: Mat) u32 {
        return raw.mat.@"[method]mat.mattype"(self.handle);
    }

    /// One entry per dimension ([rows, cols]), owned by the caller (`vh.free`).
    pub fn size(self: Mat) []u32 {
        var ret: RetArea = .{};
        raw.mat.@"[method]mat.size"(self.handle, ret.ptr());
        return ret.slice(u32, 0);
    }

    /// Bytes per row.
    pub fn step(self: Mat) u32 {
        return raw.mat.@"[method]mat.step"(self.handle);
    }

    /// Bytes per element (all channels).
    pub fn elemSize(self: Mat) u32 {
        return raw.mat.@"[method]mat.elemsize"(self.handle);
    }

    pub fn isEmpty(self: Mat) bool {
        return raw.mat.@"[method]mat.empty"(self.handle) != 0;
    }

    /// A view of `r` sharing pixels with this mat, clipped to it (owned handle: `drop`).
    pub fn region(self: Mat, r: Rect) Mat {
        return .{ .handle = raw.mat.@"[method]mat.region"(self.handle, r.min.x, r.min.y, r.max.x, r.max.y) };
    }

    /// Copies this mat's pixels into `dst`, which takes this mat's size and type.
    pub fn copyTo(self: Mat, dst: Mat) void {
        raw.mat.@"[method]mat.copy-to"(self.handle, dst.handle);
    }

    pub fn getUcharAt(self: Mat, row: u32, col: u32) u8 {
        return @truncate(raw.mat.@"[method]mat.get-uchar-at"(self.handle, row, col));
    }

    pub fn setUcharAt(self: Mat, row: u32, col: u32, val: u8) void {
        raw.mat.@"[method]mat.set-uchar-at"(self.handle, row, col, val);
    }

    /// The channel bytes of one element (e.g. B, G, R), owned by the caller (`vh.free`).
    pub fn getVecbAt(self: Mat, row: u32, col: u32) []u8 {
        var ret: RetArea = .{};
        raw.mat.@"[method]mat.get-vecb-at"(self.handle, row, col, ret.ptr());
        return ret.slice(u8, 0);
    }
};

// ==========================================================================================
// wasm:cv/cv
// ==========================================================================================

/// Drawing and filters. On failure the host's message is kept (truncated to 256 bytes) for
/// `cv.lastError()` and the call returns `error.CvFailed`.
///
/// `blur`, `gaussianBlur` and `resize` leave `src` alone in vision-host (handles are plain
/// u32 at this boundary, as in wasmVision), so the frame given to `process` may be passed;
/// the WIT types `src` as an owned `mat`, which a strict component host would consume.
pub const cv = struct {
    pub const Error = error{CvFailed};

    var last_error_buf: [256]u8 = undefined;
    var last_error_len: usize = 0;

    /// The message of the most recent failed cv/overlay call.
    pub fn lastError() []const u8 {
        return last_error_buf[0..last_error_len];
    }

    /// result<_, error-result> or result<mat, error-result>: err -> string at +4.
    /// Copies and frees the message, returns error.CvFailed.
    fn fail(ret: *const RetArea) Error {
        const msg = ret.slice(u8, 4);
        defer free(msg);
        const kept = utf8Prefix(msg, last_error_buf.len);
        @memcpy(last_error_buf[0..kept.len], kept);
        last_error_len = kept.len;
        return error.CvFailed;
    }

    fn unitResult(ret: *const RetArea) Error!void {
        if (!ret.isOk()) return fail(ret);
    }

    /// result<mat, error-result>: ok -> handle at +4.
    fn matResult(ret: *const RetArea) Error!Mat {
        if (!ret.isOk()) return fail(ret);
        return .{ .handle = ret.u32At(4) };
    }

    /// Draws `text` with its baseline-left corner at `org`; scale 1.0 ≈ 22 px tall.
    pub fn putText(img: Mat, text: []const u8, org: Point, font: HersheyFont, scale: f64, color: Rgba, thickness: i32) Error!void {
        var ret: RetArea = .{};
        raw.cv.@"put-text"(img.handle, addr(text), len32(text), org.x, org.y, @backingInt(font), scale, color.r, color.g, color.b, color.a, thickness, ret.ptr());
        return unitResult(&ret);
    }

    pub fn rectangle(img: Mat, r: Rect, color: Rgba, thickness: u8) Error!void {
        var ret: RetArea = .{};
        raw.cv.rectangle(img.handle, r.min.x, r.min.y, r.max.x, r.max.y, color.r, color.g, color.b, color.a, thickness, ret.ptr());
        return unitResult(&ret);
    }

    pub fn circle(img: Mat, center: Point, radius: u32, color: Rgba, thickness: u8) Error!void {
        var ret: RetArea = .{};
        raw.cv.circle(img.handle, center.x, center.y, radius, color.r, color.g, color.b, color.a, thickness, ret.ptr());
        return unitResult(&ret);
    }

    pub fn line(img: Mat, from: Point, to: Point, color: Rgba, thickness: u8) Error!void {
        var ret: RetArea = .{};
        raw.cv.line(img.handle, from.x, from.y, to.x, to.y, color.r, color.g, color.b, color.a, thickness, ret.ptr());
        return unitResult(&ret);
    }

    /// Box filter with a `k.x` × `k.y` px kernel; returns a new mat (owned).
    pub fn blur(src: Mat, k: Size) Error!Mat {
        var ret: RetArea = .{};
        raw.cv.blur(src.handle, k.x, k.y, ret.ptr());
        return matResult(&ret);
    }

    /// Gaussian filter (kernel sides odd, or 0 to derive them from the sigmas); new mat.
    pub fn gaussianBlur(src: Mat, k: Size, sigma_x: f32, sigma_y: f32, border: BorderType) Error!Mat {
        var ret: RetArea = .{};
        raw.cv.@"gaussian-blur"(src.handle, k.x, k.y, sigma_x, sigma_y, @backingInt(border), ret.ptr());
        return matResult(&ret);
    }

    /// Resizes to `to`, or by `fx`/`fy` when `to` is 0×0; new mat (owned).
    pub fn resize(src: Mat, to: Size, fx: f32, fy: f32, interp: Interpolation) Error!Mat {
        var ret: RetArea = .{};
        raw.cv.resize(src.handle, to.x, to.y, fx, fy, @backingInt(interp), ret.ptr());
        return matResult(&ret);
    }
};

// ==========================================================================================
// vision-host:platform/fetch (non-blocking HTTP, polled once per frame)
// ==========================================================================================

pub const fetch = struct {
    /// fetch-error, in WIT declaration order (the enum's wire value is the index).
    pub const Error = error{
        DestinationNotAllowed,
        InvalidUrl,
        ConnectionFailed,
        Timeout,
        ResponseTooLarge,
        RequestError,
        TooManyRequests,
        UnknownRequest,
        RuntimeError,
    };

    fn toError(code: u8) Error {
        return switch (code) {
            0 => error.DestinationNotAllowed,
            1 => error.InvalidUrl,
            2 => error.ConnectionFailed,
            3 => error.Timeout,
            4 => error.ResponseTooLarge,
            5 => error.RequestError,
            6 => error.TooManyRequests,
            7 => error.UnknownRequest,
            else => error.RuntimeError,
        };
    }

    /// result<u32, fetch-error>: ok -> id at +4; err -> enum u8 at +4.
    fn idResult(ret: *const RetArea) Error!u32 {
        if (!ret.isOk()) return toError(ret.u8At(4));
        return ret.u32At(4);
    }

    /// What arrived since the previous poll. `body` is owned: call `deinit`.
    pub const Progress = struct {
        /// HTTP status code; 0 while the status line has not arrived.
        status: u16,
        /// The reply is complete and the id released.
        done: bool,
        /// Body bytes received since the previous poll (possibly empty).
        body: []u8,

        pub fn deinit(self: Progress) void {
            free(self.body);
        }
    };

    /// Starts `POST url` with `template`, whose first `%IMAGE%` the host replaces by the
    /// base64 JPEG of `frame`, downscaled so its longer side is at most `max_side` px
    /// (0 = full size), at `jpeg_quality` (1–100). Returns the request id at once.
    pub fn postFrame(url: []const u8, content_type: []const u8, template: []const u8, frame: Mat, max_side: u32, jpeg_quality: u32) Error!u32 {
        var ret: RetArea = .{};
        raw.fetch.@"post-frame"(addr(url), len32(url), addr(content_type), len32(content_type), addr(template), len32(template), frame.handle, max_side, jpeg_quality, ret.ptr());
        return idResult(&ret);
    }

    /// Starts a request without a frame (`method` GET or POST). Returns the request id.
    pub fn start(method: []const u8, url: []const u8, content_type: []const u8, body: []const u8) Error!u32 {
        var ret: RetArea = .{};
        raw.fetch.start(addr(method), len32(method), addr(url), len32(url), addr(content_type), len32(content_type), addr(body), len32(body), ret.ptr());
        return idResult(&ret);
    }

    /// Progress of request `id`. An error is reported once and releases the id; so does
    /// `done = true`.
    pub fn poll(id: u32) Error!Progress {
        var ret: RetArea = .{};
        raw.fetch.poll(id, ret.ptr());
        // result<progress, fetch-error>: ok -> status u16 @4, done u8 @6, body (ptr, len)
        // @8/@12; err -> enum u8 @4.
        if (!ret.isOk()) return toError(ret.u8At(4));
        return .{
            .status = ret.u16At(4),
            .done = ret.u8At(6) != 0,
            .body = ret.slice(u8, 8),
        };
    }

    /// Abandons request `id`, closing its connection; unknown ids are ignored.
    pub fn cancel(id: u32) void {
        raw.fetch.cancel(id);
    }
};

// ==========================================================================================
// vision-host:platform/overlay
// ==========================================================================================

pub const overlay = struct {
    pub const Placement = enum(u32) { top, bottom };

    /// Draws `text` (UTF-8) word-wrapped to the frame's width on a filled band at the top or
    /// bottom of `img`, at most `max_lines` lines (the last ones kept). `font_scale` 1.0 ≈
    /// 22 px tall. The host caches the layout, so an unchanged caption is cheap.
    /// On failure see `cv.lastError()`.
    pub fn caption(img: Mat, text: []const u8, where: Placement, font_scale: f32, fg: Rgba, bg: Rgba, max_lines: u32) cv.Error!void {
        var ret: RetArea = .{};
        raw.overlay.caption(img.handle, addr(text), len32(text), @backingInt(where), font_scale, fg.r, fg.g, fg.b, fg.a, bg.r, bg.g, bg.b, bg.a, max_lines, ret.ptr());
        return cv.unitResult(&ret);
    }
};
