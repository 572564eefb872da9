//! JSON helpers for vision-host processors. Pure Zig (no host imports), so the unit tests
//! at the end run natively:
//!
//!     python -m ziglang test processor/sdk/json.zig
//!
//! Three parts:
//!
//! * `writeString`: a string as a JSON string literal, with real escaping.
//! * `LineSplitter`: reassembles NDJSON lines (one JSON document per '\n'-terminated line)
//!   from body bytes that arrive in pieces cut anywhere, even inside a line or inside a
//!   multi-byte UTF-8 character. It holds at most one partial line in a caller-given,
//!   fixed-size buffer, so memory stays bounded whatever the server sends.
//! * `ObjectReader`: a minimal, validating reader for ONE JSON object (e.g. one NDJSON
//!   line). It walks the top-level fields in order and yields string / number / bool / null
//!   values; nested objects and arrays are validated and skipped (returned as raw text).
//!   Strings stay escaped until `String.decodeAppend` decodes them to UTF-8 (\uXXXX escapes
//!   including surrogate pairs; invalid UTF-8 and lone surrogates become U+FFFD, so the
//!   result is always valid UTF-8, which the canonical ABI requires of every `string`).
const std = @import("std");

// ------------------------------------------------------------------------------------------
// Writing
// ------------------------------------------------------------------------------------------

/// Writes `s` as a JSON string literal, quotes included: `"` and `\` are backslash-escaped,
/// newline, carriage return and tab become \n \r \t, every other control character
/// (U+0000–U+001F) becomes \u00XX. All other bytes, including non-ASCII UTF-8, are written
/// unchanged (`s` is expected to be valid UTF-8, as every canonical-ABI string is).
pub fn writeString(w: *std.Io.Writer, s: []const u8) std.Io.Writer.Error!void {
    const hex = "0123456789abcdef";
    try w.writeByte('"');
    var start: usize = 0; // first byte not yet written
    for (s, 0..) |c, i| {
        const escape: ?[]const u8 = switch (c) {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            else => null,
        };
        if (escape == null and c >= 0x20) continue;
        try w.writeAll(s[start..i]);
        if (escape) |e| {
            try w.writeAll(e);
        } else {
            const u = [6]u8{ '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
            try w.writeAll(&u);
        }
        start = i + 1;
    }
    try w.writeAll(s[start..]);
    try w.writeByte('"');
}

// ------------------------------------------------------------------------------------------
// NDJSON line splitting
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
        for (line) |c| if (!isWs(c)) return false;
        return true;
    }
};

// ------------------------------------------------------------------------------------------
// Reading
// ------------------------------------------------------------------------------------------

pub const ParseError = error{Malformed};

/// Nesting deeper than this is rejected as malformed (keeps recursion bounded).
pub const max_depth = 64;

/// A JSON string as it appears in the source: the bytes between the quotes, escapes intact
/// (already validated by the reader).
pub const String = struct {
    raw: []const u8,

    /// True when the decoded string equals `plain` exactly.
    pub fn eql(self: String, plain: []const u8) bool {
        if (std.mem.findScalar(u8, self.raw, '\\') == null) return std.mem.eql(u8, self.raw, plain);
        var tmp: [256]u8 = undefined;
        if (plain.len > tmp.len) return false;
        var n: usize = 0;
        if (!self.decodeAppend(tmp[0..@min(tmp.len, plain.len + 4)], &n)) return false;
        return std.mem.eql(u8, tmp[0..n], plain);
    }

    /// Decodes the string to UTF-8 and appends it to `out[len.*..]`, advancing `len.*`.
    /// Returns false when `out` filled up; the output then ends at the last complete
    /// character that fit, so `out[0..len.*]` is always valid UTF-8 (if it was before).
    pub fn decodeAppend(self: String, out: []u8, len: *usize) bool {
        const s = self.raw;
        var i: usize = 0;
        while (i < s.len) {
            var cp: u21 = undefined;
            const c = s[i];
            if (c == '\\') {
                const e = s[i + 1];
                i += 2;
                cp = switch (e) {
                    '"' => '"',
                    '\\' => '\\',
                    '/' => '/',
                    'b' => 0x08,
                    'f' => 0x0c,
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'u' => u: {
                        const hi = hex4(s[i..][0..4]);
                        i += 4;
                        if (hi >= 0xD800 and hi <= 0xDBFF) {
                            // High surrogate: valid only when followed by \u + low surrogate.
                            if (i + 6 <= s.len and s[i] == '\\' and s[i + 1] == 'u') {
                                const lo = hex4(s[i + 2 ..][0..4]);
                                if (lo >= 0xDC00 and lo <= 0xDFFF) {
                                    i += 6;
                                    break :u 0x10000 + ((@as(u21, hi) - 0xD800) << 10) + (lo - 0xDC00);
                                }
                            }
                            break :u replacement;
                        }
                        if (hi >= 0xDC00 and hi <= 0xDFFF) break :u replacement; // lone low half
                        break :u hi;
                    },
                    else => unreachable, // rejected by the reader
                };
            } else if (c < 0x80) {
                cp = c;
                i += 1;
            } else {
                // Raw UTF-8 from the network: validate, replacing each bad byte by U+FFFD.
                cp = replacement;
                var n: usize = 1;
                if (std.unicode.utf8ByteSequenceLength(c)) |seq_len| {
                    if (i + seq_len <= s.len) {
                        if (std.unicode.utf8Decode(s[i..][0..seq_len])) |utf8_cp| {
                            cp = utf8_cp;
                            n = seq_len;
                        } else |_| {}
                    }
                } else |_| {}
                i += n;
            }
            if (!appendCodepoint(out, len, cp)) return false;
        }
        return true;
    }
};

/// A JSON number as it appears in the source (validated); convert on demand.
pub const Number = struct {
    raw: []const u8,

    pub fn toF64(self: Number) f64 {
        return std.fmt.parseFloat(f64, self.raw) catch unreachable; // grammar already checked
    }

    /// The value as integer type T; null if it has a fraction/exponent or does not fit.
    pub fn toInt(self: Number, comptime T: type) ?T {
        return std.fmt.parseInt(T, self.raw, 10) catch null;
    }
};

pub const Value = union(enum) {
    string: String,
    number: Number,
    boolean: bool,
    null,
    /// A nested object, validated; its raw source text.
    object: []const u8,
    /// An array, validated; its raw source text.
    array: []const u8,
};

pub const Field = struct {
    key: String,
    value: Value,
};

/// Reads one JSON object, e.g. one NDJSON line, field by field:
///
///     var r = try ObjectReader.init(line);
///     while (try r.next()) |f| { if (f.key.eql("done")) ... }
///
/// `next` returns null after the closing '}' and fails with `error.Malformed` on any
/// syntax error, including anything but whitespace after the object. Read to the end
/// (until null) to know the whole line is valid. Duplicate keys are all reported.
pub const ObjectReader = struct {
    items: Items,

    pub fn init(src: []const u8) ParseError!ObjectReader {
        return .{ .items = try Items.init(src, '{') };
    }

    pub fn next(self: *ObjectReader) ParseError!?Field {
        var p = (try self.items.next('}')) orelse return null;
        const key = try p.string();
        p.skipWs();
        try p.expect(':');
        const value = try p.value(1);
        self.items.pos = p.pos;
        return .{ .key = key, .value = value };
    }
};

/// Reads one JSON array element by element (e.g. OpenAI's `choices`):
///
///     var r = try ArrayReader.init(raw);
///     while (try r.next()) |v| { ... }
///
/// Like `ObjectReader`: null after the closing ']', `error.Malformed` on a syntax error.
pub const ArrayReader = struct {
    items: Items,

    pub fn init(src: []const u8) ParseError!ArrayReader {
        return .{ .items = try Items.init(src, '[') };
    }

    pub fn next(self: *ArrayReader) ParseError!?Value {
        var p = (try self.items.next(']')) orelse return null;
        const v = try p.value(1);
        self.items.pos = p.pos;
        return v;
    }
};

/// The comma-separated items of one container (shared by `ObjectReader` and `ArrayReader`).
const Items = struct {
    src: []const u8,
    pos: usize,
    state: enum { first, more, done } = .first,

    fn init(src: []const u8, open: u8) ParseError!Items {
        var p = Parser{ .src = src };
        p.skipWs();
        try p.expect(open);
        return .{ .src = src, .pos = p.pos };
    }

    /// A parser at the start of the next item; null after `close`, which must end the input
    /// (whitespace aside). The caller stores the position after the item in `pos`.
    fn next(self: *Items, close: u8) ParseError!?Parser {
        if (self.state == .done) return null;
        var p = Parser{ .src = self.src, .pos = self.pos };
        p.skipWs();
        if (self.state == .more) {
            if (p.peek() == ',') {
                p.pos += 1;
                p.skipWs();
            } else {
                try p.expect(close);
                return try self.end(&p);
            }
        } else if (p.peek() == close) {
            p.pos += 1;
            return try self.end(&p);
        }
        self.state = .more;
        return p;
    }

    fn end(self: *Items, p: *Parser) ParseError!?Parser {
        p.skipWs();
        if (p.pos != p.src.len) return error.Malformed;
        self.pos = p.pos;
        self.state = .done;
        return null;
    }
};

/// U+FFFD REPLACEMENT CHARACTER, substituted for undecodable input.
const replacement: u21 = 0xFFFD;

fn isWs(c: u8) bool {
    return c == ' ' or c == '\t' or c == '\n' or c == '\r';
}

fn hexDigit(c: u8) ?u16 {
    return switch (c) {
        '0'...'9' => c - '0',
        'a'...'f' => c - 'a' + 10,
        'A'...'F' => c - 'A' + 10,
        else => null,
    };
}

/// Four validated hex digits to their value.
fn hex4(h: *const [4]u8) u16 {
    var v: u16 = 0;
    for (h) |c| v = (v << 4) | hexDigit(c).?;
    return v;
}

/// Appends the UTF-8 encoding of `cp` if it fits entirely.
fn appendCodepoint(out: []u8, len: *usize, cp: u21) bool {
    var tmp: [4]u8 = undefined;
    const n = std.unicode.utf8Encode(cp, &tmp) catch std.unicode.utf8Encode(replacement, &tmp) catch unreachable;
    if (len.* + n > out.len) return false;
    @memcpy(out[len.*..][0..n], tmp[0..n]);
    len.* += n;
    return true;
}

/// Recursive-descent validator over `src`, starting at `pos`.
const Parser = struct {
    src: []const u8,
    pos: usize = 0,

    fn peek(p: *const Parser) u8 {
        return if (p.pos < p.src.len) p.src[p.pos] else 0;
    }

    fn skipWs(p: *Parser) void {
        while (p.pos < p.src.len and isWs(p.src[p.pos])) p.pos += 1;
    }

    fn expect(p: *Parser, c: u8) ParseError!void {
        if (p.peek() != c) return error.Malformed;
        p.pos += 1;
    }

    fn literal(p: *Parser, word: []const u8) ParseError!void {
        if (!std.mem.startsWith(u8, p.src[p.pos..], word)) return error.Malformed;
        p.pos += word.len;
    }

    /// Skips whitespace, then one value. `depth` counts the enclosing containers.
    fn value(p: *Parser, depth: usize) ParseError!Value {
        p.skipWs();
        const start = p.pos;
        switch (p.peek()) {
            '"' => return .{ .string = try p.string() },
            't' => {
                try p.literal("true");
                return .{ .boolean = true };
            },
            'f' => {
                try p.literal("false");
                return .{ .boolean = false };
            },
            'n' => {
                try p.literal("null");
                return .null;
            },
            '{' => {
                try p.container(depth, '}');
                return .{ .object = p.src[start..p.pos] };
            },
            '[' => {
                try p.container(depth, ']');
                return .{ .array = p.src[start..p.pos] };
            },
            '-', '0'...'9' => return .{ .number = try p.number() },
            else => return error.Malformed,
        }
    }

    /// An object (close = '}') or array (close = ']') starting at the current '{' / '['.
    fn container(p: *Parser, depth: usize, close: u8) ParseError!void {
        if (depth >= max_depth) return error.Malformed;
        p.pos += 1;
        p.skipWs();
        if (p.peek() == close) {
            p.pos += 1;
            return;
        }
        while (true) {
            if (close == '}') {
                p.skipWs();
                _ = try p.string();
                p.skipWs();
                try p.expect(':');
            }
            _ = try p.value(depth + 1);
            p.skipWs();
            if (p.peek() == ',') {
                p.pos += 1;
                continue;
            }
            return p.expect(close);
        }
    }

    /// A string literal at the current '"'; validates escapes, rejects raw control chars.
    fn string(p: *Parser) ParseError!String {
        try p.expect('"');
        const start = p.pos;
        const s = p.src;
        while (p.pos < s.len) {
            const c = s[p.pos];
            switch (c) {
                '"' => {
                    p.pos += 1;
                    return .{ .raw = s[start .. p.pos - 1] };
                },
                '\\' => {
                    if (p.pos + 1 >= s.len) return error.Malformed;
                    switch (s[p.pos + 1]) {
                        '"', '\\', '/', 'b', 'f', 'n', 'r', 't' => p.pos += 2,
                        'u' => {
                            if (p.pos + 6 > s.len) return error.Malformed;
                            for (s[p.pos + 2 .. p.pos + 6]) |h| {
                                if (hexDigit(h) == null) return error.Malformed;
                            }
                            p.pos += 6;
                        },
                        else => return error.Malformed,
                    }
                },
                0...0x1f => return error.Malformed,
                else => p.pos += 1,
            }
        }
        return error.Malformed; // unterminated
    }

    /// A number per the JSON grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
    fn number(p: *Parser) ParseError!Number {
        const s = p.src;
        const start = p.pos;
        if (p.peek() == '-') p.pos += 1;
        if (p.peek() == '0') {
            p.pos += 1;
        } else {
            if (try p.digits() == 0) return error.Malformed;
        }
        if (p.peek() == '.') {
            p.pos += 1;
            if (try p.digits() == 0) return error.Malformed;
        }
        if (p.peek() == 'e' or p.peek() == 'E') {
            p.pos += 1;
            if (p.peek() == '+' or p.peek() == '-') p.pos += 1;
            if (try p.digits() == 0) return error.Malformed;
        }
        return .{ .raw = s[start..p.pos] };
    }

    fn digits(p: *Parser) ParseError!usize {
        const start = p.pos;
        while (p.pos < p.src.len and p.src[p.pos] >= '0' and p.src[p.pos] <= '9') p.pos += 1;
        return p.pos - start;
    }
};

// ------------------------------------------------------------------------------------------
// Tests (native): python -m ziglang test processor/sdk/json.zig
// ------------------------------------------------------------------------------------------

const testing = std.testing;

fn expectWritten(input: []const u8, expected: []const u8) !void {
    var buf: [256]u8 = undefined;
    var w = std.Io.Writer.fixed(&buf);
    try writeString(&w, input);
    try testing.expectEqualStrings(expected, w.buffered());
}

test "writeString escapes quote, backslash and control characters" {
    try expectWritten("", "\"\"");
    try expectWritten("plain text", "\"plain text\"");
    try expectWritten("say \"hi\"", "\"say \\\"hi\\\"\"");
    try expectWritten("C:\\dir\\", "\"C:\\\\dir\\\\\"");
    try expectWritten("a\nb\rc\td", "\"a\\nb\\rc\\td\"");
    try expectWritten("\x00\x01\x08\x0c\x1f", "\"\\u0000\\u0001\\u0008\\u000c\\u001f\"");
    try expectWritten("%IMAGE% / </script>", "\"%IMAGE% / </script>\"");
    try expectWritten("\x7f", "\"\x7f\"");
}

test "writeString passes non-ASCII UTF-8 through" {
    try expectWritten("café ☕ 𝄞 日本", "\"café ☕ 𝄞 日本\"");
}

test "writeString output reads back to the input" {
    const inputs = [_][]const u8{ "a\"b\\c\n\r\t\x01end", "emoji 😀 ok", "" };
    for (inputs) |input| {
        var buf: [256]u8 = undefined;
        var w = std.Io.Writer.fixed(&buf);
        try w.writeAll("{\"k\":");
        try writeString(&w, input);
        try w.writeAll("}");
        var r = try ObjectReader.init(w.buffered());
        const f = (try r.next()).?;
        var out: [256]u8 = undefined;
        var n: usize = 0;
        try testing.expect(f.value.string.decodeAppend(&out, &n));
        try testing.expectEqualStrings(input, out[0..n]);
        try testing.expect(try r.next() == null);
    }
}

test "writeString reports a full writer" {
    var buf: [4]u8 = undefined;
    var w = std.Io.Writer.fixed(&buf);
    try testing.expectError(error.WriteFailed, writeString(&w, "too long"));
}

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

fn decoded(s: String, out: []u8) ![]const u8 {
    var n: usize = 0;
    try testing.expect(s.decodeAppend(out, &n));
    return out[0..n];
}

test "ObjectReader reads an Ollama stream line" {
    const line =
        \\{"model":"llava","created_at":"2024-01-01T00:00:00.1Z","response":" A","done":false}
    ;
    var r = try ObjectReader.init(line);
    var out: [64]u8 = undefined;
    var f = (try r.next()).?;
    try testing.expect(f.key.eql("model"));
    try testing.expectEqualStrings("llava", try decoded(f.value.string, &out));
    f = (try r.next()).?;
    try testing.expect(f.key.eql("created_at"));
    f = (try r.next()).?;
    try testing.expect(f.key.eql("response"));
    try testing.expectEqualStrings(" A", try decoded(f.value.string, &out));
    f = (try r.next()).?;
    try testing.expect(f.key.eql("done"));
    try testing.expectEqual(false, f.value.boolean);
    try testing.expect(try r.next() == null);
    try testing.expect(try r.next() == null);
}

test "ObjectReader reads numbers, null, and skips nested values" {
    const line =
        \\ { "done" : true , "context":[1,2,[3,{"a":[]}]], "o":{"k":"v\"}"},
        \\   "total_duration": 12345678, "x": -0.5e+2, "z": 0, "n": null, "e": {} , "f": [ ] }
    ;
    var r = try ObjectReader.init(line);
    var f = (try r.next()).?;
    try testing.expectEqual(true, f.value.boolean);
    f = (try r.next()).?;
    try testing.expectEqualStrings("[1,2,[3,{\"a\":[]}]]", f.value.array);
    f = (try r.next()).?;
    try testing.expectEqualStrings("{\"k\":\"v\\\"}\"}", f.value.object);
    f = (try r.next()).?;
    try testing.expectEqual(@as(f64, 12345678), f.value.number.toF64());
    try testing.expectEqual(@as(?u32, 12345678), f.value.number.toInt(u32));
    try testing.expectEqual(@as(?u8, null), f.value.number.toInt(u8));
    f = (try r.next()).?;
    try testing.expectEqual(@as(f64, -50), f.value.number.toF64());
    try testing.expectEqual(@as(?i32, null), f.value.number.toInt(i32));
    f = (try r.next()).?;
    try testing.expectEqual(@as(f64, 0), f.value.number.toF64());
    try testing.expectEqual(@as(?i32, 0), f.value.number.toInt(i32));
    f = (try r.next()).?;
    try testing.expect(f.value == .null);
    f = (try r.next()).?;
    try testing.expectEqualStrings("{}", f.value.object);
    f = (try r.next()).?;
    try testing.expectEqualStrings("[ ]", f.value.array);
    try testing.expect(try r.next() == null);
}

test "ObjectReader reads an empty object" {
    var r = try ObjectReader.init(" {} ");
    try testing.expect(try r.next() == null);
}

fn expectMalformed(line: []const u8) !void {
    var r = ObjectReader.init(line) catch return;
    while (r.next()) |f| {
        if (f == null) return error.TestExpectedMalformed;
    } else |err| try testing.expectEqual(error.Malformed, err);
}

test "ObjectReader rejects malformed input" {
    const bad = [_][]const u8{
        "",                  "   ",                 "[1,2]",                 "\"str\"",
        "null",              "{",                   "{\"a\"}",               "{\"a\":}",
        "{\"a\":1,}",        "{,\"a\":1}",          "{\"a\":1 \"b\":2}",     "{a:1}",
        "{'a':1}",           "{\"a\":1}x",          "{\"a\":1}{}",           "{\"a\":tru}",
        "{\"a\":01}",        "{\"a\":1.}",          "{\"a\":.5}",            "{\"a\":-}",
        "{\"a\":1e}",        "{\"a\":+1}",          "{\"a\":\"x}",           "{\"a\":\"\\x\"}",
        "{\"a\":\"\\u12\"}", "{\"a\":\"\\u12G4\"}", "{\"a\":\"tab\there\"}", "{\"a\":[1,2}",
        "{\"a\":{\"b\":1]}", "{\"a\":[1,]}",        "{\"a\":NaN}",           "<html>502 Bad Gateway</html>",
    };
    for (bad) |line| expectMalformed(line) catch |err| {
        std.debug.print("not rejected: {s}\n", .{line});
        return err;
    };
}

test "ObjectReader limits nesting depth" {
    var buf: [2 * max_depth + 16]u8 = undefined;
    var w = std.Io.Writer.fixed(&buf);
    try w.writeAll("{\"a\":");
    for (0..max_depth) |_| try w.writeByte('[');
    for (0..max_depth) |_| try w.writeByte(']');
    try w.writeAll("}");
    try expectMalformed(w.buffered());
}

test "String decodes escapes and surrogate pairs to UTF-8" {
    const line =
        \\{"s":"q\" b\\ s\/ \b\f\n\r\t \u00e9\u2615 \ud834\udd1e \uD83D\uDE00 \u0000"}
    ;
    var r = try ObjectReader.init(line);
    const f = (try r.next()).?;
    var out: [64]u8 = undefined;
    try testing.expectEqualStrings(
        "q\" b\\ s/ \x08\x0c\n\r\t é☕ 𝄞 😀 \x00",
        try decoded(f.value.string, &out),
    );
}

test "String replaces lone surrogates and invalid UTF-8 with U+FFFD" {
    const line = "{\"s\":\"a\\ud800b\\udc00c\\ud800\\u0041 \xff \xc3( \xe2\x98 \xed\xa0\x80 ok\"}";
    var r = try ObjectReader.init(line);
    const f = (try r.next()).?;
    var out: [128]u8 = undefined;
    const s = try decoded(f.value.string, &out);
    try testing.expectEqualStrings(
        "a\u{fffd}b\u{fffd}c\u{fffd}A \u{fffd} \u{fffd}( \u{fffd}\u{fffd} \u{fffd}\u{fffd}\u{fffd} ok",
        s,
    );
    try testing.expect(std.unicode.utf8ValidateSlice(s));
}

test "String.decodeAppend stops at a character boundary when full" {
    const s = String{ .raw = "ab\\u00e9\xe2\x98\x95" }; // "abé☕"
    var out: [5]u8 = undefined;
    var n: usize = 0;
    try testing.expect(!s.decodeAppend(&out, &n));
    try testing.expectEqualStrings("ab\xc3\xa9", out[0..n]); // ☕ (3 bytes) did not fit
    n = 1;
    out[0] = 'x';
    try testing.expect(!(String{ .raw = "\\ud83d\\ude00" }).decodeAppend(out[0..4], &n));
    try testing.expectEqual(@as(usize, 1), n);
}

test "String.eql compares decoded text" {
    try testing.expect((String{ .raw = "response" }).eql("response"));
    try testing.expect(!(String{ .raw = "respons" }).eql("response"));
    try testing.expect((String{ .raw = "d\\u006fne" }).eql("done"));
    try testing.expect(!(String{ .raw = "d\\u006fne" }).eql("don"));
    try testing.expect(!(String{ .raw = "d\\u006fne" }).eql("donee"));
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
                var r = try ObjectReader.init(item.line);
                while (try r.next()) |f| {
                    if (f.key.eql("response")) try testing.expect(f.value.string.decodeAppend(&caption, &n));
                    if (f.key.eql("done")) done = f.value.boolean;
                }
            }
        }
        try testing.expect(sp.finish() == null);
        try testing.expect(done);
        try testing.expectEqualStrings(" Radiant élégance 🌟", caption[0..n]);
    }
}

test "ArrayReader reads elements of any type and rejects malformed input" {
    var r = try ArrayReader.init(" [ {\"index\":0,\"delta\":{\"content\":\"Hi\"}} , 2, \"x\", [1] ] ");
    const first = (try r.next()).?;
    try std.testing.expect(first == .object);
    var o = try ObjectReader.init(first.object);
    try std.testing.expect((try o.next()).?.key.eql("index"));
    try std.testing.expect((try r.next()).? == .number);
    try std.testing.expect((try r.next()).?.string.eql("x"));
    try std.testing.expect((try r.next()).? == .array);
    try std.testing.expect((try r.next()) == null);
    var empty = try ArrayReader.init("[]");
    try std.testing.expect((try empty.next()) == null);
    for ([_][]const u8{ "[1,]", "[1 2]", "[1] x", "{}", "[" }) |bad| {
        var b = ArrayReader.init(bad) catch continue;
        const got = while (true) {
            const v = b.next() catch break error.Malformed;
            if (v == null) break {};
        };
        try std.testing.expectError(error.Malformed, got);
    }
}
