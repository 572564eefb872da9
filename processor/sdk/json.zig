//! JSON for vision-host processors. The standard library does the JSON itself:
//! `std.json.Scanner` tokenizes and validates what is read (driven by `select` below), and
//! requests are written with `std.json.Stringify` (`value`, `encodeJsonString`). This
//! file keeps only what std.json lacks for a reply that streams into a processor, frame by
//! frame, under a 20 ms deadline per call. Pure Zig (no host imports), so the unit tests at
//! the end run natively (`python processor/build.py --test`).
//!
//! * `LineSplitter`: a streamed reply (NDJSON, server-sent events) arrives in pieces, one per
//!   `fetch.poll`, that is one per `process` call, cut anywhere (even inside a UTF-8
//!   character). std.json cannot take input across calls that way: `std.json.Reader` pulls
//!   from a `std.Io.Reader`, which cannot wait for the next frame, and the streaming
//!   `Scanner` reads ONE document, while NDJSON and SSE are one document per line. The
//!   splitter keeps the unfinished line in a fixed, caller-given buffer (64 KiB in `ollama`),
//!   so memory stays bounded whatever the server sends; each complete line is then scanned
//!   whole.
//! * `select`: the values at a few JSON Pointers of one object, after std.json.Scanner has
//!   validated all of it. Nothing is allocated for a valid document: the scanner's nesting
//!   stack lives in a small buffer on the stack (nesting is limited to `max_depth`), and a
//!   string is decoded only when asked (`Value.decodeAppend`), into the caller's fixed buffer.
//!   (`std.json.parseFromSlice` would allocate a tree and every string of every line: the
//!   guest's allocator would work per token.)
//! * `repair`: a server can send invalid UTF-8 (e.g. a multi-byte character split between two
//!   tokens, as the fault drills do) or a lone surrogate half as a `\ud83d` escape (a JSON
//!   encoder given a string cut inside a surrogate pair). std.json.Scanner rejects both
//!   (RFC 8259); a caption must survive them, each bad byte or half read as U+FFFD (the
//!   canonical ABI requires valid UTF-8 of every string, and the fault drills check it).
//!   Only a document the scanner rejects is repaired, into a copy made with the caller's
//!   allocator, and scanned again.
//!
//! Measured when std.json replaced the hand-written reader and writer (an 871-line
//! json.zig), on the `ollama` processor (Zig 0.17 ReleaseSmall, wasmtime, 2 shared cores):
//! * a 200-line NDJSON reply read in wasm (split, scanned, pieces decoded): 128 → 150 µs
//!   (typical Ollama lines: 183 → 229 µs), about 1 % of a call's 20 ms deadline; the
//!   processor call that receives the whole reply (tests/test_bench.py's scenario) stays
//!   ~1.0–1.4 ms, most of it the host's poll and overlay; the steady per-frame call is
//!   unchanged (73 µs median);
//! * no allocation per line or token (a test reads a line with a failing allocator), guest
//!   memory constant over 60 replies;
//! * ollama.wasm 37,275 → 55,468 bytes: the scanner is ~9.7 KB of code, `select` and
//!   `repair` ~3.5 KB, the request templates through `std.json.Stringify.value` ~3.6 KB more
//!   than hand-written writes; compiling the module without the module cache takes ~20 ms
//!   longer (once per machine: the compiled module is cached).
//! None of these is a reason to keep a hand-written tokenizer, decoder or string writer.
const std = @import("std");

// ------------------------------------------------------------------------------------------
// NDJSON / SSE line splitting
// ------------------------------------------------------------------------------------------

/// Splits a byte stream into lines ('\n'-terminated; a trailing '\r' is removed; blank
/// lines are skipped). Feed each received piece with `feed` and drain it with `next`:
///
///     var lines = splitter.feed(body);
///     while (lines.next()) |item| switch (item) {
///         .line => |l| handle(l),   // valid until the next call of `next`
///         .too_long => bad(),        // a line longer than the buffer (its bytes dropped)
///     };
///
/// When the stream ends, `finish` returns a last line that had no '\n'.
/// A line may be at most `buf.len` bytes (without its '\n'); longer lines are reported
/// once as `.too_long` when their '\n' arrives (or at `finish`).
pub const LineSplitter = struct {
    /// Storage for the line being assembled across pieces.
    buf: []u8,
    /// Bytes of the incomplete line held in `buf`.
    len: usize = 0,
    /// The line being assembled is longer than `buf`: drop bytes up to its '\n'.
    overflowed: bool = false,

    pub const Item = union(enum) {
        /// One complete line without its line ending; never blank.
        line: []const u8,
        /// A line exceeded the buffer; its content is lost.
        too_long,
    };

    pub fn init(buf: []u8) LineSplitter {
        return .{ .buf = buf };
    }

    /// Forgets any partial line (e.g. when a new reply starts).
    pub fn reset(self: *LineSplitter) void {
        self.len = 0;
        self.overflowed = false;
    }

    /// Starts splitting `chunk`; drain the result with `Lines.next` before feeding again.
    pub fn feed(self: *LineSplitter, chunk: []const u8) Lines {
        return .{ .splitter = self, .chunk = chunk };
    }

    /// End of stream: returns the unterminated last line, if any, and resets.
    pub fn finish(self: *LineSplitter) ?Item {
        defer self.reset();
        if (self.overflowed) return .too_long;
        const line = trimLine(self.buf[0..self.len]);
        if (isBlank(line)) return null;
        return .{ .line = line };
    }

    pub const Lines = struct {
        splitter: *LineSplitter,
        chunk: []const u8,
        pos: usize = 0,

        /// The next complete line of the chunk, or null once the chunk is used up (its
        /// unterminated tail is then kept for the next `feed`).
        pub fn next(self: *Lines) ?Item {
            const sp = self.splitter;
            while (self.pos < self.chunk.len) {
                const rest = self.chunk[self.pos..];
                const nl = std.mem.findScalar(u8, rest, '\n') orelse {
                    // Unterminated tail: keep it for the next piece.
                    self.pos = self.chunk.len;
                    if (!sp.overflowed) {
                        if (sp.len + rest.len > sp.buf.len) {
                            sp.overflowed = true;
                            sp.len = 0;
                        } else {
                            @memcpy(sp.buf[sp.len..][0..rest.len], rest);
                            sp.len += rest.len;
                        }
                    }
                    return null;
                };
                const piece = rest[0..nl];
                self.pos += nl + 1;
                if (sp.overflowed or sp.len + piece.len > sp.buf.len) {
                    sp.reset();
                    return .too_long;
                }
                var line: []const u8 = piece; // no partial line held: use the chunk directly
                if (sp.len > 0) {
                    @memcpy(sp.buf[sp.len..][0..piece.len], piece);
                    line = sp.buf[0 .. sp.len + piece.len];
                    sp.len = 0; // `buf` keeps the bytes until the next append
                }
                line = trimLine(line);
                if (isBlank(line)) continue;
                return .{ .line = line };
            }
            return null;
        }
    };

    fn trimLine(line: []const u8) []const u8 {
        return if (line.len > 0 and line[line.len - 1] == '\r') line[0 .. line.len - 1] else line;
    }

    fn isBlank(line: []const u8) bool {
        return std.mem.trim(u8, line, " \t\r\n").len == 0;
    }
};

// ------------------------------------------------------------------------------------------
// Reading: `select` over std.json.Scanner
// ------------------------------------------------------------------------------------------

pub const Error = error{Malformed};

/// Containers nested deeper than this make a document malformed.
pub const max_depth = 64;

/// A value found by `select`: its kind and its source text.
pub const Value = struct {
    kind: Kind,
    /// The value as it is in the document: a string with its quotes and escapes, a container
    /// whole.
    text: []const u8,

    pub const Kind = enum { object, array, string, number, true, false, null };

    /// The value of a boolean; null for any other kind.
    pub fn boolean(v: Value) ?bool {
        return switch (v.kind) {
            .true => true,
            .false => false,
            else => null,
        };
    }

    /// Decodes a string value and appends it to `out[len.*..]`, advancing `len.*`. Returns
    /// false when `out` filled up; the output then ends at the last complete character that
    /// fit, so `out[0..len.*]` stays valid UTF-8 (if it was). Appends nothing for another kind.
    pub fn decodeAppend(v: Value, out: []u8, len: *usize) bool {
        if (v.kind != .string) return true;
        // A string never pushes onto the scanner's nesting stack: no allocator needed.
        var s: std.json.Scanner = .initCompleteInput(.failing, v.text);
        while (true) {
            var escaped: [4]u8 = undefined;
            const token = s.next() catch return true; // cannot fail: `select` validated it
            const piece = stringPiece(token, &escaped) orelse return true;
            const fit = utf8Prefix(piece, out.len - len.*);
            @memcpy(out[len.*..][0..fit.len], fit);
            len.* += fit.len;
            if (fit.len < piece.len) return false;
            if (token == .string) return true;
        }
    }
};

/// What `select` returns: `get` the value at one of the pointers it was given.
pub fn Selection(comptime pointers: []const []const u8) type {
    return struct {
        const Self = @This();
        values: [pointers.len]?Value = @splat(null),
        /// The repaired copy of the document that the values point into (empty when none was
        /// needed), made with `gpa`.
        repaired: []u8 = &.{},
        gpa: std.mem.Allocator,

        /// The value at `pointer` (one of those given to `select`), or null when absent.
        pub fn get(self: *const Self, comptime pointer: []const u8) ?Value {
            const i = comptime for (pointers, 0..) |p, i| {
                if (std.mem.eql(u8, p, pointer)) break i;
            } else @compileError("not selected: " ++ pointer);
            return self.values[i];
        }

        pub fn deinit(self: *Self) void {
            self.gpa.free(self.repaired);
        }
    };
}

/// Reads one JSON object `text` (e.g. one NDJSON line) and returns the values at `pointers`,
/// JSON Pointers (RFC 6901, without `~` escapes): "/done" is the member "done",
/// "/choices/0/delta" the member "delta" of the first element of the array "choices".
///
/// All of `text` is validated first: anything but one object with whitespace around it, or
/// nesting deeper than `max_depth`, is `error.Malformed`. When a key repeats, the last one
/// counts, and so do the values below it from that one only. A string's invalid UTF-8 and
/// lone surrogate escapes read as U+FFFD (see `repair`); only then is a copy made, with
/// `gpa`: release the result with `deinit`.
pub fn select(gpa: std.mem.Allocator, text: []const u8, comptime pointers: []const []const u8) Error!Selection(pointers) {
    return selectIn(gpa, text, pointers, .whole);
}

/// Like `select`, but a document that turns out malformed, or that is not an object, is
/// not an error: the values that were complete before the fault are returned (e.g. the
/// "error" of an error reply followed by more text).
pub fn selectPrefix(gpa: std.mem.Allocator, text: []const u8, comptime pointers: []const []const u8) Selection(pointers) {
    return selectIn(gpa, text, pointers, .prefix) catch unreachable;
}

fn selectIn(gpa: std.mem.Allocator, text: []const u8, comptime pointers: []const []const u8, comptime mode: enum { whole, prefix }) Error!Selection(pointers) {
    const paths = comptime Paths.parse(pointers);
    var result: Selection(pointers) = .{ .gpa = gpa };
    scan(&paths, text, &result.values) catch {
        // Rejected: scan again what the scanner rejects but a reader should not (if any).
        result.repaired = repair(gpa, text) orelse return if (mode == .prefix) result else error.Malformed;
        result.values = @splat(null);
        scan(&paths, result.repaired, &result.values) catch if (mode == .whole) {
            result.deinit();
            return error.Malformed;
        };
    };
    return result;
}

/// The pointers of a `select` call, split into steps at compile time. A bit per pointer in
/// `u32` masks.
const Paths = struct {
    steps: []const []const []const u8,
    /// [depth]: the pointers with exactly `depth` steps (they select a value at that depth).
    ends_at: []const u32,
    /// [depth]: the pointers with more than `depth` steps (they go on below that depth).
    goes_on: []const u32,

    fn parse(comptime pointers: []const []const u8) Paths {
        if (pointers.len > 32) @compileError("select: at most 32 pointers");
        var steps: [pointers.len][]const []const u8 = undefined;
        var deepest = 0;
        for (pointers, 0..) |p, i| {
            if (std.mem.findScalar(u8, p, '~') != null) @compileError("select: no ~ escapes: " ++ p);
            if (p.len > 0 and p[0] != '/') @compileError("select: a pointer starts with /: " ++ p);
            var list: []const []const u8 = &.{};
            var it = std.mem.splitScalar(u8, p, '/');
            _ = it.next();
            while (it.next()) |step| list = list ++ &[_][]const u8{step};
            steps[i] = list;
            deepest = @max(deepest, list.len);
        }
        var ends_at: [deepest + 1]u32 = @splat(0);
        var goes_on: [deepest + 1]u32 = @splat(0);
        for (steps, 0..) |list, i| {
            ends_at[list.len] |= 1 << i;
            for (0..list.len) |d| goes_on[d] |= 1 << i;
        }
        const s = steps;
        const e = ends_at;
        const g = goes_on;
        return .{ .steps = &s, .ends_at = &e, .goes_on = &g };
    }

    fn endsAt(self: *const Paths, depth: usize) u32 {
        return if (depth < self.ends_at.len) self.ends_at[depth] else 0;
    }
    fn goesOn(self: *const Paths, depth: usize) u32 {
        return if (depth < self.goes_on.len) self.goes_on[depth] else 0;
    }

    /// Of `candidates` (pointers going on below `depth`), those whose step at `depth` is
    /// `key` (an object member) or `index` (an array element).
    fn follow(self: *const Paths, candidates: u32, depth: usize, key: ?[]const u8, index: usize) u32 {
        var out: u32 = 0;
        for (self.steps, 0..) |list, i| {
            if (candidates & (@as(u32, 1) << @intCast(i)) != 0 and depth < list.len) {
                const step = list[depth];
                const hit = if (key) |k| std.mem.eql(u8, k, step) else isIndex(step, index);
                if (hit) out |= @as(u32, 1) << @intCast(i);
            }
        }
        return out;
    }

    fn isIndex(step: []const u8, index: usize) bool {
        var buf: [20]u8 = undefined;
        return std.mem.eql(u8, step, std.fmt.bufPrint(&buf, "{d}", .{index}) catch return false);
    }
};

/// One open object or array while scanning.
const Level = struct {
    object: bool,
    /// The pointers whose steps lead to this container.
    matching: u32,
    /// Where the container starts in the text.
    start: usize,
    /// Elements of an array seen so far.
    index: usize = 0,
};

/// Scans `text` with std.json.Scanner and stores in `values` what `paths` select; fails
/// with the scanner's errors (values complete before the fault are stored).
fn scan(paths: *const Paths, text: []const u8, values: []?Value) !void {
    // The scanner's nesting stack: one bit per level, `max_depth` levels, plus the growth
    // reserve of std's array list (it never needs more: deeper is rejected below).
    var stack_buffer: [256]u8 = undefined;
    var fba: std.heap.FixedBufferAllocator = .init(&stack_buffer);
    var s: std.json.Scanner = .initCompleteInput(fba.allocator(), text);
    var levels: [max_depth + 1]Level = undefined;
    var depth: usize = 0; // containers open
    var matching: u32 = std.math.maxInt(u32); // the pointers leading to the next value
    var key_buffer: [64]u8 = undefined;
    var before: usize = 0; // where the scanner was before the value's first token
    var token = try s.next();
    if (token != .object_begin) return error.SyntaxError;
    while (true) {
        // `token` begins a value at `depth`. What an earlier occurrence of its key selected
        // below it is forgotten (the last occurrence counts).
        store(values, matching & paths.goesOn(depth), null);
        const start = before + skipSeparators(text[before..]);
        switch (token) {
            .object_begin, .array_begin => {
                depth += 1;
                if (depth > max_depth) return error.SyntaxError;
                levels[depth] = .{ .object = token == .object_begin, .matching = matching, .start = start };
            },
            else => {
                while (isPartial(token)) token = try s.next();
                const kind: Value.Kind = switch (token) {
                    .string => .string,
                    .number => .number,
                    .true => .true,
                    .false => .false,
                    .null => .null,
                    else => return error.SyntaxError,
                };
                store(values, matching & paths.endsAt(depth), .{ .kind = kind, .text = text[start..s.cursor] });
            },
        }
        // The next value: close the containers that end here, read its key or count it.
        while (true) {
            if (depth == 0) {
                if (try s.next() != .end_of_document) return error.SyntaxError;
                return;
            }
            const level = &levels[depth];
            const candidates = level.matching & paths.goesOn(depth - 1);
            before = s.cursor;
            token = try s.next();
            if (token == .object_end or token == .array_end) {
                depth -= 1;
                const kind: Value.Kind = if (level.object) .object else .array;
                store(values, level.matching & paths.endsAt(depth), .{ .kind = kind, .text = text[level.start..s.cursor] });
                continue;
            }
            if (level.object) {
                const key = try readKey(&s, token, &key_buffer);
                matching = if (candidates == 0 or key == null) 0 else paths.follow(candidates, depth - 1, key.?, 0);
                before = s.cursor;
                token = try s.next();
            } else {
                matching = if (candidates == 0) 0 else paths.follow(candidates, depth - 1, null, level.index);
                level.index += 1;
            }
            break;
        }
    }
}

/// Bytes of whitespace, ':' and ',' at the start of `s` (what lies between two tokens).
fn skipSeparators(s: []const u8) usize {
    for (s, 0..) |c, i| switch (c) {
        ' ', '\t', '\r', '\n', ':', ',' => {},
        else => return i,
    };
    return s.len;
}

/// Sets the values of the pointers in mask `which`.
fn store(values: []?Value, which: u32, value: ?Value) void {
    if (which == 0) return;
    for (values, 0..) |*v, i| {
        if (which & (@as(u32, 1) << @intCast(i)) != 0) v.* = value;
    }
}

/// The decoded key (escapes resolved) of the object member whose first token is `first`,
/// read on from `s`; null when longer than `buf` (its tokens are still consumed). The result
/// is a slice of the scanner's input when the key has no escapes, else of `buf`. Fails with
/// the scanner's errors, or `error.SyntaxError` when `first` does not start a string.
pub fn readKey(s: *std.json.Scanner, first: std.json.Token, buf: []u8) !?[]const u8 {
    var token = first;
    var len: usize = 0;
    var fits = true;
    while (true) {
        var escaped: [4]u8 = undefined;
        const piece = stringPiece(token, &escaped) orelse return error.SyntaxError;
        if (token == .string and len == 0 and fits) return piece; // no escapes: no copy
        if (fits and len + piece.len <= buf.len) {
            @memcpy(buf[len..][0..piece.len], piece);
            len += piece.len;
        } else fits = false;
        if (token == .string) return if (fits) buf[0..len] else null;
        token = try s.next();
    }
}

/// The text of one piece of a string as the scanner returns it (`.string` is the last);
/// null for any other token. An escape's bytes are copied into `escaped`.
fn stringPiece(token: std.json.Token, escaped: *[4]u8) ?[]const u8 {
    return switch (token) {
        .partial_string, .string => |p| p,
        inline .partial_string_escaped_1,
        .partial_string_escaped_2,
        .partial_string_escaped_3,
        .partial_string_escaped_4,
        => |bytes| blk: {
            @memcpy(escaped[0..bytes.len], &bytes);
            break :blk escaped[0..bytes.len];
        },
        else => null,
    };
}

/// A piece of a string or number that more pieces follow.
fn isPartial(token: std.json.Token) bool {
    return switch (token) {
        .partial_number,
        .partial_string,
        .partial_string_escaped_1,
        .partial_string_escaped_2,
        .partial_string_escaped_3,
        .partial_string_escaped_4,
        => true,
        else => false,
    };
}

/// The longest prefix of valid UTF-8 `s` of at most `max` bytes that does not cut a
/// character.
fn utf8Prefix(s: []const u8, max: usize) []const u8 {
    if (s.len <= max) return s;
    var n = max;
    while (n > 0 and s[n] & 0xC0 == 0x80) n -= 1;
    return s[0..n];
}

/// A copy of `text` (made with `gpa`) in which what std.json.Scanner rejects but a reader
/// should not is replaced: every byte that does not start a valid UTF-8 character by U+FFFD,
/// and in strings each `\u` escape of a surrogate half that is not part of a pair by
/// `\ufffd`. Null when there is nothing to replace (or no memory for the copy).
fn repair(gpa: std.mem.Allocator, text: []const u8) ?[]u8 {
    const replacement = "\u{fffd}";
    const out = gpa.alloc(u8, replacement.len * text.len) catch return null;
    var n: usize = 0;
    var changed = false;
    var in_string = false;
    var i: usize = 0;
    while (i < text.len) {
        const c = text[i];
        var take: usize = 1; // bytes kept as they are
        if (c >= 0x80) {
            take = utf8Length(text[i..]) orelse {
                @memcpy(out[n..][0..replacement.len], replacement);
                n += replacement.len;
                i += 1;
                changed = true;
                continue;
            };
        } else if (in_string and c == '\\' and i + 1 < text.len) {
            take = 2;
            if (text[i + 1] == 'u') if (hex4(text[i + 2 ..])) |unit| {
                take = 6;
                const pair = unit >= 0xD800 and unit <= 0xDBFF and i + 12 <= text.len and
                    text[i + 6] == '\\' and text[i + 7] == 'u' and
                    if (hex4(text[i + 8 ..])) |low| low >= 0xDC00 and low <= 0xDFFF else false;
                if (pair) {
                    take = 12;
                } else if (unit >= 0xD800 and unit <= 0xDFFF) {
                    @memcpy(out[n..][0..6], "\\ufffd");
                    n += 6;
                    i += 6;
                    changed = true;
                    continue;
                }
            };
        } else if (c == '"') {
            in_string = !in_string;
        }
        @memcpy(out[n..][0..take], text[i..][0..take]);
        n += take;
        i += take;
    }
    if (!changed) {
        gpa.free(out);
        return null;
    }
    return gpa.realloc(out, n) catch {
        gpa.free(out);
        return null;
    };
}

/// Bytes of the valid UTF-8 character at the start of `s`; null when there is none.
fn utf8Length(s: []const u8) ?usize {
    const len = std.unicode.utf8ByteSequenceLength(s[0]) catch return null;
    if (len > s.len) return null;
    _ = std.unicode.utf8Decode(s[0..len]) catch return null;
    return len;
}

/// The value of four hex digits at the start of `s`; null when there are not four.
fn hex4(s: []const u8) ?u16 {
    if (s.len < 4) return null;
    var v: u16 = 0;
    for (s[0..4]) |c| v = v << 4 | (std.fmt.charToDigit(c, 16) catch return null);
    return v;
}

// ------------------------------------------------------------------------------------------
// Tests (native): python processor/build.py --test
// ------------------------------------------------------------------------------------------

const testing = std.testing;

/// Feeds `stream` in pieces of the given sizes (cycled) and concatenates the lines with
/// '|' separators, '#' for a too-long line; includes `finish`.
fn splitAll(stream: []const u8, sizes: []const usize, cap: usize, out: []u8) ![]const u8 {
    var storage: [64]u8 = undefined;
    var sp = LineSplitter.init(storage[0..cap]);
    var w = std.Io.Writer.fixed(out);
    var pos: usize = 0;
    var k: usize = 0;
    while (pos < stream.len) : (k += 1) {
        const n = @min(sizes[k % sizes.len], stream.len - pos);
        var lines = sp.feed(stream[pos .. pos + n]);
        pos += n;
        while (lines.next()) |item| switch (item) {
            .line => |l| {
                try w.writeAll(l);
                try w.writeByte('|');
            },
            .too_long => try w.writeAll("#|"),
        };
    }
    if (sp.finish()) |item| switch (item) {
        .line => |l| {
            try w.writeAll(l);
            try w.writeAll("|");
        },
        .too_long => try w.writeAll("#|"),
    };
    return w.buffered();
}

test "LineSplitter gives the same lines however the stream is cut" {
    const stream = "{\"a\":1}\n{\"response\":\"caf\xc3\xa9 \xe2\x98\x95\"}\r\n\n  \n{\"done\":true}\nlast";
    const expected = "{\"a\":1}|{\"response\":\"caf\xc3\xa9 \xe2\x98\x95\"}|{\"done\":true}|last|";
    var out: [512]u8 = undefined;
    // Every chunk size from 1 byte (cuts inside UTF-8 sequences and inside "\r\n")...
    for (1..stream.len + 1) |size| {
        try testing.expectEqualStrings(expected, try splitAll(stream, &.{size}, 64, &out));
    }
    // ...and irregular cuts.
    try testing.expectEqualStrings(expected, try splitAll(stream, &.{ 3, 1, 7, 2, 11 }, 64, &out));
    try testing.expectEqualStrings(expected, try splitAll(stream, &.{ 8, 1 }, 64, &out));
}

test "LineSplitter every single cut position" {
    const stream = "{\"x\":\"\xf0\x9d\x84\x9e\"}\n{\"y\":2}\n";
    var out: [256]u8 = undefined;
    for (1..stream.len) |cut| {
        try testing.expectEqualStrings(
            "{\"x\":\"\xf0\x9d\x84\x9e\"}|{\"y\":2}|",
            try splitAll(stream, &.{ cut, stream.len }, 64, &out),
        );
    }
}

test "LineSplitter reports lines longer than its buffer once and recovers" {
    var out: [256]u8 = undefined;
    const stream = "short\n0123456789abcdef-too-long\nok\n0123456789abcdef-x";
    try testing.expectEqualStrings("short|#|ok|#|", try splitAll(stream, &.{1}, 8, &out));
    try testing.expectEqualStrings("short|#|ok|#|", try splitAll(stream, &.{5}, 8, &out));
    try testing.expectEqualStrings("short|#|ok|#|", try splitAll(stream, &.{100}, 8, &out));
    // Exactly the capacity is fine.
    try testing.expectEqualStrings("12345678|ab|", try splitAll("12345678\nab", &.{3}, 8, &out));
    try testing.expectEqualStrings("12345678|ab|", try splitAll("12345678\nab", &.{100}, 8, &out));
}

test "LineSplitter reset drops a partial line" {
    var storage: [32]u8 = undefined;
    var sp = LineSplitter.init(&storage);
    var lines = sp.feed("{\"partial\":");
    try testing.expect(lines.next() == null);
    sp.reset();
    lines = sp.feed("{\"b\":1}\n");
    try testing.expectEqualStrings("{\"b\":1}", lines.next().?.line);
    try testing.expect(lines.next() == null);
    try testing.expect(sp.finish() == null);
}

fn decoded(v: ?Value, out: []u8) ![]const u8 {
    var n: usize = 0;
    try testing.expect(v.?.kind == .string);
    try testing.expect(v.?.decodeAppend(out, &n));
    return out[0..n];
}

test "select reads an Ollama stream line" {
    const line =
        \\{"model":"llava","created_at":"2024-01-01T00:00:00.1Z","response":" A","done":false}
    ;
    var doc = try select(testing.allocator, line, &.{ "/model", "/response", "/done", "/error", "" });
    defer doc.deinit();
    var out: [64]u8 = undefined;
    try testing.expectEqualStrings("llava", try decoded(doc.get("/model"), &out));
    try testing.expectEqualStrings(" A", try decoded(doc.get("/response"), &out));
    try testing.expectEqual(false, doc.get("/done").?.boolean().?);
    try testing.expect(doc.get("/error") == null);
    try testing.expectEqual(Value.Kind.object, doc.get("").?.kind);
    try testing.expectEqualStrings(line, doc.get("").?.text);
}

test "select finds values of every kind, in objects and arrays, as their source text" {
    const line =
        \\ { "done" : true , "context":[1,2,[3,{"a":[]}]], "o":{"k":"v\"}"},
        \\   "total_duration": 12345678, "x": -0.5e+2, "z": 0, "n": null, "e": {} , "f": [ ] }
    ;
    var doc = try select(testing.allocator, line, &.{
        "/done", "/context", "/context/2/1/a", "/context/1", "/context/5", "/o", "/o/k",
        "/total_duration", "/x", "/n", "/e", "/f", "/f/0", "/o/k/0",
    });
    defer doc.deinit();
    try testing.expectEqual(true, doc.get("/done").?.boolean().?);
    try testing.expectEqualStrings("[1,2,[3,{\"a\":[]}]]", doc.get("/context").?.text);
    try testing.expectEqual(Value.Kind.array, doc.get("/context").?.kind);
    try testing.expectEqualStrings("[]", doc.get("/context/2/1/a").?.text);
    try testing.expectEqualStrings("2", doc.get("/context/1").?.text);
    try testing.expectEqual(Value.Kind.number, doc.get("/context/1").?.kind);
    try testing.expect(doc.get("/context/5") == null);
    try testing.expectEqualStrings("{\"k\":\"v\\\"}\"}", doc.get("/o").?.text);
    var out: [8]u8 = undefined;
    try testing.expectEqualStrings("v\"}", try decoded(doc.get("/o/k"), &out));
    try testing.expectEqualStrings("12345678", doc.get("/total_duration").?.text);
    try testing.expectEqualStrings("-0.5e+2", doc.get("/x").?.text);
    try testing.expectEqual(Value.Kind.null, doc.get("/n").?.kind);
    try testing.expect(doc.get("/n").?.boolean() == null);
    try testing.expectEqualStrings("{}", doc.get("/e").?.text);
    try testing.expectEqualStrings("[ ]", doc.get("/f").?.text);
    try testing.expect(doc.get("/f/0") == null);
    try testing.expect(doc.get("/o/k/0") == null); // below a string: nothing
}

test "select: a repeated key counts once, the last, with what is below it" {
    const line =
        \\{"done":false,"message":{"content":"a","role":"x"},"done":true,"message":{"role":"y"}}
    ;
    var doc = try select(testing.allocator, line, &.{ "/done", "/message/content", "/message/role" });
    defer doc.deinit();
    try testing.expectEqual(true, doc.get("/done").?.boolean().?);
    try testing.expect(doc.get("/message/content") == null);
    try testing.expectEqualStrings("\"y\"", doc.get("/message/role").?.text);
}

test "select matches keys by their decoded text" {
    var doc = try select(testing.allocator, "{\"d\\u006fne\":true,\"don\":1}", &.{ "/done", "/do" });
    defer doc.deinit();
    try testing.expect(doc.get("/done").?.boolean().?);
    try testing.expect(doc.get("/do") == null);
}

test "a valid document is read without allocating" {
    const line =
        \\{"model":"llava","response":" caf\u00e9 \ud83c\udf1f","done":false,"context":[[[1]],{"a":{}}]}
    ;
    var doc = try select(testing.failing_allocator, line, &.{ "/response", "/done", "/context/1/a" });
    defer doc.deinit();
    var out: [64]u8 = undefined;
    try testing.expectEqualStrings(" café 🌟", try decoded(doc.get("/response"), &out));
    try testing.expectEqualStrings("{}", doc.get("/context/1/a").?.text);
}

test "select reads an empty object" {
    var doc = try select(testing.allocator, " {} ", &.{"/a"});
    defer doc.deinit();
    try testing.expect(doc.get("/a") == null);
}

fn expectMalformed(text: []const u8) !void {
    var doc = select(testing.allocator, text, &.{ "/a", "/a/0" }) catch |err| {
        try testing.expectEqual(error.Malformed, err);
        return;
    };
    doc.deinit();
    std.debug.print("not rejected: {s}\n", .{text});
    return error.TestExpectedMalformed;
}

test "select rejects malformed input" {
    const bad = [_][]const u8{
        "",                  "   ",                 "[1,2]",                 "\"str\"",
        "null",              "{",                   "{\"a\"}",               "{\"a\":}",
        "{\"a\":1,}",        "{,\"a\":1}",          "{\"a\":1 \"b\":2}",     "{a:1}",
        "{'a':1}",           "{\"a\":1}x",          "{\"a\":1}{}",           "{\"a\":tru}",
        "{\"a\":01}",        "{\"a\":1.}",          "{\"a\":.5}",            "{\"a\":-}",
        "{\"a\":1e}",        "{\"a\":+1}",          "{\"a\":\"x}",           "{\"a\":\"\\x\"}",
        "{\"a\":\"\\u12\"}", "{\"a\":\"\\u12G4\"}", "{\"a\":\"tab\there\"}", "{\"a\":[1,2}",
        "{\"a\":{\"b\":1]}", "{\"a\":[1,]}",        "{\"a\":NaN}",           "<html>502 Bad Gateway</html>",
        "{\"a\":\"\xff\"",   "\xef\xbb\xbf{}",      "{\"a\xff\":1",          "{\"a\":\"\\ud800",
    };
    for (bad) |text| try expectMalformed(text);
}

test "select limits nesting depth" {
    var buf: [2 * max_depth + 16]u8 = undefined;
    for ([_]usize{ max_depth - 1, max_depth }) |arrays| {
        var w = std.Io.Writer.fixed(&buf);
        try w.writeAll("{\"a\":");
        for (0..arrays) |_| try w.writeByte('[');
        for (0..arrays) |_| try w.writeByte(']');
        try w.writeAll("}");
        if (arrays < max_depth) {
            var doc = try select(testing.allocator, w.buffered(), &.{"/a"});
            doc.deinit();
        } else try expectMalformed(w.buffered());
    }
}

test "strings decode escapes and surrogate pairs to UTF-8" {
    const line =
        \\{"s":"q\" b\\ s\/ \b\f\n\r\t \u00e9\u2615 \ud834\udd1e \uD83D\uDE00 \u0000"}
    ;
    var doc = try select(testing.allocator, line, &.{"/s"});
    defer doc.deinit();
    var out: [64]u8 = undefined;
    try testing.expectEqualStrings("q\" b\\ s/ \x08\x0c\n\r\t é☕ 𝄞 😀 \x00", try decoded(doc.get("/s"), &out));
}

test "lone surrogates and invalid UTF-8 read as U+FFFD, in values and keys" {
    const line = "{\"s\":\"a\\ud800b\\udc00c\\ud800\\u0041 \xff \xc3( \xe2\x98 \xed\xa0\x80 ok\",\"k\xff\":\"\\ud83d\\ud83d\\ude00\"}";
    var doc = try select(testing.allocator, line, &.{ "/s", "/k\u{fffd}" });
    defer doc.deinit();
    var out: [128]u8 = undefined;
    const s = try decoded(doc.get("/s"), &out);
    try testing.expectEqualStrings(
        "a\u{fffd}b\u{fffd}c\u{fffd}A \u{fffd} \u{fffd}( \u{fffd}\u{fffd} \u{fffd}\u{fffd}\u{fffd} ok",
        s,
    );
    try testing.expect(std.unicode.utf8ValidateSlice(s));
    try testing.expectEqualStrings("\u{fffd}😀", try decoded(doc.get("/k\u{fffd}"), &out));
}

test "decodeAppend stops at a character boundary when full" {
    var doc = try select(testing.allocator, "{\"s\":\"ab\\u00e9\xe2\x98\x95\",\"e\":\"\\ud83d\\ude00\"}", &.{ "/s", "/e" });
    defer doc.deinit();
    var out: [5]u8 = undefined;
    var n: usize = 0;
    try testing.expect(!doc.get("/s").?.decodeAppend(&out, &n));
    try testing.expectEqualStrings("ab\xc3\xa9", out[0..n]); // ☕ (3 bytes) did not fit
    n = 1;
    out[0] = 'x';
    try testing.expect(!doc.get("/e").?.decodeAppend(out[0..4], &n));
    try testing.expectEqual(@as(usize, 1), n);
}

test "selectPrefix keeps what was complete before a fault" {
    const body = "{\"error\":\"model not found\",\"detail\":{\"x\":1} and then some";
    try expectMalformed(body);
    var doc = selectPrefix(testing.allocator, body, &.{ "/error", "/detail", "/more" });
    defer doc.deinit();
    var out: [64]u8 = undefined;
    try testing.expectEqualStrings("model not found", try decoded(doc.get("/error"), &out));
    try testing.expectEqualStrings("{\"x\":1}", doc.get("/detail").?.text);
    var none = selectPrefix(testing.allocator, "<html>", &.{"/error"});
    defer none.deinit();
    try testing.expect(none.get("/error") == null);
    var bad = selectPrefix(testing.allocator, "{\"error\":\"caf\xc3\"}{", &.{"/error"});
    defer bad.deinit();
    try testing.expectEqualStrings("caf\u{fffd}", try decoded(bad.get("/error"), &out));
}

test "what std.json writes reads back" {
    const inputs = [_][]const u8{ "a\"b\\c\n\r\t\x01\x08\x0c\x7fend", "emoji 😀 ok", "%IMAGE% </script>", "" };
    for (inputs) |input| {
        var buf: [256]u8 = undefined;
        var w = std.Io.Writer.fixed(&buf);
        try w.print("{f}", .{std.json.fmt(.{ .k = input }, .{})});
        var doc = try select(testing.allocator, w.buffered(), &.{"/k"});
        defer doc.deinit();
        var out: [256]u8 = undefined;
        try testing.expectEqualStrings(input, try decoded(doc.get("/k"), &out));
    }
}

test "a whole Ollama reply cut at every position yields the caption" {
    const reply =
        \\{"model":"llava","created_at":"t","response":" Rad","done":false}
        \\{"model":"llava","created_at":"t","response":"iant \u00e9l\u00e9gance","done":false}
        \\{"model":"llava","created_at":"t","response":" \ud83c\udf1f","done":false}
        \\{"model":"llava","created_at":"t","response":"","done":true,"done_reason":"stop","context":[1,2,3],"total_duration":5}
        \\
    ;
    for (1..reply.len) |cut| {
        var storage: [256]u8 = undefined;
        var sp = LineSplitter.init(&storage);
        var caption: [64]u8 = undefined;
        var n: usize = 0;
        var done = false;
        for ([_][]const u8{ reply[0..cut], reply[cut..] }) |piece| {
            var lines = sp.feed(piece);
            while (lines.next()) |item| {
                var doc = try select(testing.allocator, item.line, &.{ "/response", "/done" });
                defer doc.deinit();
                try testing.expect(doc.get("/response").?.decodeAppend(&caption, &n));
                done = doc.get("/done").?.boolean().?;
            }
        }
        try testing.expect(sp.finish() == null);
        try testing.expect(done);
        try testing.expectEqualStrings(" Radiant élégance 🌟", caption[0..n]);
    }
}
