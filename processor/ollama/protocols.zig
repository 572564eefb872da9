//! Wire protocols (`ollama-api`): the protocol table, each protocol's request URL and body
//! template, the readers of its 200 replies (which report what a line or reply means as an
//! `Outcome`) and the error text of error replies.
const std = @import("std");
const vh = @import("vh");
const json = vh.json;
const Config = @import("config.zig").Config;
const frames = @import("frames.zig");
const text_mod = @import("text.zig");
const TextBuf = text_mod.TextBuf;
const Caption = text_mod.Caption;

/// What a line (or a whole reply) of a 200 reply means; the pieces it carries are already
/// appended to the caption streaming.
pub const Outcome = union(enum) {
    /// More is to come.
    more,
    /// The reply is complete.
    complete,
    /// Not a reply of this protocol.
    malformed,
    /// An error line of an Ollama stream: its message.
    error_line: TextBuf(300),
    /// An error reply: its message (empty when unknown).
    server_error: TextBuf(300),
};

/// A wire protocol (`ollama-api`): all that differs between them. Adding a protocol is
/// adding an entry to `protocols` (the first is the default).
pub const Protocol = struct {
    /// Its `ollama-api` value.
    name: []const u8,
    /// How messages name the server when `ollama-server-name` is not set.
    server_name: []const u8,
    /// HTTP 404 suggests `ollama pull MODEL` (unless `ollama-server-name` is set: the
    /// server may not be Ollama then).
    pull_hint: bool,
    /// Writes the request URL: the base URL `ollama-url` and a path.
    url: *const fn (w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void,
    /// Writes the request body (see the file comment for the image placeholder).
    body: *const fn (w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void,
    /// It takes one image per request: several frames (ollama-frames) go as one grid.
    single_image: bool = false,
    /// How a 200 reply is read.
    reply: union(enum) {
        /// As it streams, line by line (NDJSON, server-sent events).
        lines: *const fn (line: []const u8, partial: *Caption) Outcome,
        /// Whole, once complete (at most `reply_body`'s capacity).
        whole: *const fn (body: []const u8, partial: *Caption) Outcome,
    },
};

pub const protocols = [_]Protocol{
    .{
        .name = "generate",
        .server_name = "Ollama",
        .pull_hint = true,
        .url = generate.url,
        .body = generate.body,
        .reply = .{ .lines = generate.line },
    },
    .{
        .name = "chat",
        .server_name = "Ollama",
        .pull_hint = true,
        .url = chat.url,
        .body = chat.body,
        .reply = .{ .lines = chat.line },
    },
    .{
        .name = "openai",
        .server_name = "the OpenAI-compatible server",
        .pull_hint = false,
        .url = openai.url,
        .body = openai.body,
        .reply = .{ .lines = openai.line },
    },
    .{
        .name = "workers-ai",
        .server_name = "Workers AI",
        .pull_hint = false,
        .url = workers_ai.url,
        .body = workers_ai.body,
        .single_image = true,
        .reply = .{ .whole = workers_ai.reply },
    },
};

pub const protocol_names = names: {
    var names: [protocols.len][]const u8 = undefined;
    for (protocols, &names) |p, *n| n.* = p.name;
    const final = names;
    break :names &final;
};

/// Ollama's POST /api/generate: NDJSON lines {"response":piece,…,"done":bool}.
const generate = struct {
    fn url(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try w.print("{s}/api/generate", .{c.url});
    }
    fn body(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try writeJson(w, .{
            .images = Images{ .c = c },
            .model = c.model,
            .prompt = frames.Prompt{ .cfg = c },
            .stream = true,
            .options = .{ .num_predict = c.max_tokens },
            .format = ollamaFormat(c),
        });
    }
    fn line(text: []const u8, partial: *Caption) Outcome {
        var doc = json.select(vh.allocator, text, &.{ "/response", "/done", "/error" }) catch return .malformed;
        defer doc.deinit();
        const piece = doc.get("/response");
        if (piece) |p| if (p.kind != .string) return .malformed;
        return ollamaLine(partial, piece, doc.get("/done"), doc.get("/error"));
    }
};

/// Ollama's POST /api/chat: NDJSON lines {"message":{"content":piece,…},…,"done":bool}.
const chat = struct {
    fn url(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try w.print("{s}/api/chat", .{c.url});
    }
    fn body(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try writeJson(w, .{
            .messages = .{.{ .role = "user", .images = Images{ .c = c }, .content = frames.Prompt{ .cfg = c } }},
            .model = c.model,
            .stream = true,
            .options = .{ .num_predict = c.max_tokens },
            .format = ollamaFormat(c),
        });
    }
    fn line(text: []const u8, partial: *Caption) Outcome {
        var doc = json.select(vh.allocator, text, &.{ "/message", "/message/content", "/done", "/error" }) catch return .malformed;
        defer doc.deinit();
        var piece: ?json.Value = null;
        if (doc.get("/message")) |message| {
            if (message.kind != .object) return .malformed;
            piece = doc.get("/message/content") orelse return .malformed;
            if (piece.?.kind != .string) return .malformed;
        }
        return ollamaLine(partial, piece, doc.get("/done"), doc.get("/error"));
    }
};

/// One line of an Ollama stream: its caption piece (a string, when there is one), "done"
/// and "error".
fn ollamaLine(partial: *Caption, piece: ?json.Value, done: ?json.Value, err: ?json.Value) Outcome {
    if (done) |d| if (d.boolean() == null) return .malformed;
    if (err) |e| {
        var text: TextBuf(300) = .{};
        text.appendJson(e); // (nothing unless a string)
        return .{ .error_line = text };
    }
    if (piece == null and done == null) return .malformed;
    if (piece) |p| partial.appendJson(p);
    if (done) |d| if (d.boolean().?) return .complete;
    return .more;
}

/// OpenAI chat completions (vLLM, llama.cpp's server, LM Studio, Ollama's /v1): POST
/// …/chat/completions, server-sent events whose `choices[0].delta.content` are the pieces.
const openai = struct {
    fn url(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        // An OpenAI base URL usually ends in /v1 already ("http://host:8000/v1").
        const v1 = std.mem.endsWith(u8, c.url, "/v1");
        try w.print("{s}{s}/chat/completions", .{ c.url, if (v1) "" else "/v1" });
    }
    fn body(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try writeJson(w, .{
            .messages = .{.{ .role = "user", .content = Content{ .c = c } }},
            .model = c.model,
            .stream = true,
            .max_tokens = c.max_tokens,
            .response_format = if (c.format == .plain) null else ResponseFormat{ .c = c },
        });
    }
    /// The user message's content parts: one image part per frame (`%EACH%`…`%END%` with
    /// several frames as separate images), then the text part.
    const Content = struct {
        c: *const Config,
        pub fn jsonStringify(self: Content, jw: *std.json.Stringify) std.Io.Writer.Error!void {
            const image_part = .{ .type = "image_url", .image_url = .{ .url = "data:image/jpeg;base64,%IMAGE%" } };
            const text_part = .{ .type = "text", .text = frames.Prompt{ .cfg = self.c } };
            if (!frames.eachImage(self.c)) return jw.write(.{ image_part, text_part });
            try jw.beginArray();
            try jw.beginWriteRaw();
            try jw.writer.writeAll("%EACH%");
            try std.json.Stringify.value(image_part, jw.options, jw.writer);
            try jw.writer.writeAll("%END%");
            jw.endWriteRaw();
            try jw.write(text_part);
            try jw.endArray();
        }
    };
    /// One line of the event stream (https://html.spec.whatwg.org/multipage/
    /// server-sent-events.html): `data: {chunk}` lines carry the pieces, `data: [DONE]`
    /// ends the stream; blank lines, comments and other fields are skipped.
    fn line(raw: []const u8, partial: *Caption) Outcome {
        const text = std.mem.trimEnd(u8, raw, "\r");
        if (!std.mem.startsWith(u8, text, "data:")) return .more;
        const data = std.mem.trim(u8, text["data:".len..], " ");
        if (std.mem.eql(u8, data, "[DONE]")) return .complete;
        var doc = json.select(vh.allocator, data, &.{
            "/error",                    "/choices",                 "/choices/0",
            "/choices/0/delta",          "/choices/0/delta/content", "/choices/0/finish_reason",
        }) catch return .malformed;
        defer doc.deinit();
        const choices = doc.get("/choices");
        if (choices) |c| if (c.kind != .array) return .malformed;
        if (doc.get("/error") != null) {
            var text_buf: TextBuf(300) = .{};
            errorText(data, &text_buf);
            return .{ .server_error = text_buf };
        }
        if (choices == null) return .malformed;
        const first = doc.get("/choices/0") orelse return .more; // e.g. a usage-only chunk
        if (first.kind != .object) return .malformed;
        if (doc.get("/choices/0/delta")) |delta| {
            if (delta.kind != .object) return .malformed;
            if (doc.get("/choices/0/delta/content")) |content| switch (content.kind) {
                .string => partial.appendJson(content),
                .null => {},
                else => return .malformed,
            };
        }
        // "stop"/"length": the reply is complete even if the server never sends [DONE]. A
        // stream that just ends without one (Ollama's /v1 after a runner error) is a
        // malformed reply.
        if (doc.get("/choices/0/finish_reason")) |reason| if (reason.kind == .string) return .complete;
        return .more;
    }
};

/// Cloudflare Workers AI (`@cf/llava-hf/llava-1.5-7b-hf`): POST {url}/{model}, one JSON
/// reply (the model does not stream).
const workers_ai = struct {
    fn url(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        // {url} is the account's …/ai/run endpoint, the model its path ("@cf/llava-hf/…").
        try w.print("{s}/{s}", .{ c.url, c.model });
    }
    fn body(w: *std.Io.Writer, c: *const Config) std.Io.Writer.Error!void {
        try writeJson(w, .{
            .image = Raw{ .text = "%IMAGE_BYTES%" },
            .prompt = frames.Prompt{ .cfg = c },
            .max_tokens = c.max_tokens,
        });
    }
    /// {"result":{"description":…},"success":true,…}, or
    /// {"success":false,"errors":[{"code":…,"message":…}],…}.
    fn reply(body_text: []const u8, partial: *Caption) Outcome {
        var doc = json.select(vh.allocator, body_text, &.{ "/success", "/result", "/result/description" }) catch return .malformed;
        defer doc.deinit();
        const success = (doc.get("/success") orelse return .malformed).boolean() orelse return .malformed;
        if (!success) {
            var text: TextBuf(300) = .{};
            errorText(body_text, &text);
            return .{ .server_error = text };
        }
        const result = doc.get("/result") orelse return .malformed;
        if (result.kind != .object) return .malformed;
        const description = doc.get("/result/description") orelse return .malformed;
        if (description.kind != .string) return .malformed;
        partial.clear();
        partial.appendJson(description);
        return .complete;
    }
};

/// Writes `value` as JSON (std.json: strings escaped, no whitespace; a null optional
/// field, e.g. `format` with ollama-format empty, is left out).
fn writeJson(w: *std.Io.Writer, value: anytype) std.Io.Writer.Error!void {
    try std.json.Stringify.value(value, .{ .emit_null_optional_fields = false }, w);
}

/// Ollama's `format` (generate, chat): "json", the schema object, or none (plain text).
fn ollamaFormat(c: *const Config) ?Raw {
    return switch (c.format) {
        .plain => null,
        .json => Raw{ .text = "\"json\"" },
        .schema => Raw{ .text = c.format_text },
    };
}

/// OpenAI's `response_format`: {"type":"json_object"}, or {"type":"json_schema",
/// "json_schema":{"name":"caption","schema":SCHEMA}}.
const ResponseFormat = struct {
    c: *const Config,
    pub fn jsonStringify(self: ResponseFormat, jw: *std.json.Stringify) std.Io.Writer.Error!void {
        switch (self.c.format) {
            .plain, .json => try jw.write(.{ .type = "json_object" }),
            .schema => try jw.write(.{ .type = "json_schema", .json_schema = .{ .name = "caption", .schema = Raw{ .text = self.c.format_text } } }),
        }
    }
};

/// Ollama's `images`: ["%IMAGE%"], or with several frames as separate images
/// [%EACH%"%IMAGE%"%END%] (the host writes the item once per frame).
const Images = struct {
    c: *const Config,
    pub fn jsonStringify(self: Images, jw: *std.json.Stringify) std.Io.Writer.Error!void {
        if (frames.eachImage(self.c)) return jw.print("[%EACH%\"%IMAGE%\"%END%]", .{});
        try jw.write(.{"%IMAGE%"});
    }
};

/// A value written as it is (the `%IMAGE_BYTES%` placeholder, which the host replaces by an
/// array).
const Raw = struct {
    text: []const u8,
    pub fn jsonStringify(self: Raw, jw: *std.json.Stringify) std.Io.Writer.Error!void {
        try jw.print("{s}", .{self.text});
    }
};

/// The error message of an error reply `body`, decoded into `out` (nothing if there is none):
/// Ollama sends {"error":"text"}, OpenAI-compatible servers {"error":{"message":"text",…}}
/// (both read as far as the body is valid JSON), Cloudflare {"success":false,"errors":
/// [{"code":…,"message":"text"}]}.
pub fn errorText(body: []const u8, out: *TextBuf(300)) void {
    var doc = json.selectPrefix(vh.allocator, body, &.{ "/error", "/error/message" });
    defer doc.deinit();
    if (doc.get("/error")) |err| switch (err.kind) {
        .string => out.appendJson(err),
        .object => if (doc.get("/error/message")) |m| out.appendJson(m),
        else => {},
    };
    if (out.len > 0) return;
    var cloudflare = json.select(vh.allocator, body, &.{"/errors/0/message"}) catch return;
    defer cloudflare.deinit();
    if (cloudflare.get("/errors/0/message")) |m| out.appendJson(m);
}
