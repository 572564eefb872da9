//! The overlay: the caption drawn on the frame (`overlay.caption`) and the overlay template
//! (`ollama-overlay-template`), which makes the text shown from a JSON caption.
const std = @import("std");
const vh = @import("vh");
const json = vh.json;
const Config = @import("config.zig").Config;
const text_mod = @import("text.zig");
const TextBuf = text_mod.TextBuf;
const Caption = text_mod.Caption;

const text_color: vh.Rgba = .{ .r = 255, .g = 255, .b = 255, .a = 255 };
const band_color: vh.Rgba = .{ .r = 0, .g = 0, .b = 0, .a = 200 };

var failed_logged = false;

/// The overlay text of the last caption from ollama-overlay-template (when `ok`).
pub const Template = struct {
    text: Caption = .{},
    ok: bool = false,

    /// The overlay text of `caption` from ollama-overlay-template `template` (into `text`,
    /// `ok`): each `{name}` replaced by the caption's top-level field `name` (a string
    /// decoded, a number or boolean as written, null or missing `?`, an object or array as
    /// compact JSON), `{{` and `}}` literal braces. Nothing (the caption is shown as it is)
    /// without a template or when the caption is not a JSON object. Once per caption and per
    /// config read.
    pub fn render(self: *Template, template: ?[]const u8, caption: []const u8) void {
        self.text.clear();
        self.ok = false;
        const template_text = template orelse return;
        if (caption.len == 0) return;
        var doc = json.select(vh.allocator, caption, &.{""}) catch return;
        defer doc.deinit();
        const root = doc.get("") orelse return;
        if (root.kind != .object) return;
        var i: usize = 0;
        while (i < template_text.len) {
            const c = template_text[i];
            if ((c == '{' or c == '}') and i + 1 < template_text.len and template_text[i + 1] == c) {
                self.text.appendRaw(template_text[i .. i + 1]);
                i += 2;
                continue;
            }
            if (c == '{') {
                if (std.mem.indexOfScalarPos(u8, template_text, i + 1, '}')) |end| {
                    self.appendField(root.text, template_text[i + 1 .. end]);
                    i = end + 1;
                    continue;
                }
            }
            self.text.appendRaw(template_text[i .. i + 1]);
            i += 1;
        }
        self.ok = true;
    }

    /// Appends top-level field `name` of the (valid) JSON object `doc` to `text`, as
    /// `renderTemplate` says.
    fn appendField(self: *Template, doc: []const u8, name: []const u8) void {
        const raw = memberText(doc, name) orelse return self.text.appendRaw("?");
        switch (raw[0]) {
            '"' => self.text.appendJson(.{ .kind = .string, .text = raw }),
            'n' => self.text.appendRaw("?"),
            '{', '[' => {
                // compact: the blanks outside strings dropped
                var in_string = false;
                var escaped = false;
                for (raw, 0..) |ch, k| {
                    if (in_string) {
                        if (escaped) {
                            escaped = false;
                        } else if (ch == '\\') {
                            escaped = true;
                        } else if (ch == '"') {
                            in_string = false;
                        }
                    } else if (ch == '"') {
                        in_string = true;
                    } else if (ch == ' ' or ch == '\t' or ch == '\r' or ch == '\n') {
                        continue;
                    }
                    self.text.appendRaw(raw[k .. k + 1]);
                }
            },
            else => self.text.appendRaw(raw),
        }
    }
};

/// The JSON text of top-level member `name` of the valid JSON object `doc` (the last one
/// when it repeats), or null when there is none.
fn memberText(doc: []const u8, name: []const u8) ?[]const u8 {
    var stack_buf: [256]u8 = undefined;
    var fba: std.heap.FixedBufferAllocator = .init(&stack_buf);
    var s: std.json.Scanner = .initCompleteInput(fba.allocator(), doc);
    if ((s.next() catch return null) != .object_begin) return null;
    var found: ?[]const u8 = null;
    while (true) {
        const first = s.next() catch return found;
        if (first == .object_end) return found;
        var key_buf: [256]u8 = undefined; // a longer key matches nothing
        const key = json.readKey(&s, first, &key_buf) catch return found;
        const start = s.cursor;
        s.skipValue() catch return found;
        if (key != null and std.mem.eql(u8, key.?, name)) {
            found = std.mem.trim(u8, doc[start..s.cursor], " \t\r\n:,");
        }
    }
}

/// Draws `text` (what main.zig's `overlayText` chose) on the frame; nothing with
/// ollama-overlay=false or no text.
pub fn draw(frame: u32, cfg: *const Config, text_or_null: ?[]const u8) void {
    if (!cfg.overlay) return; // ollama-overlay=false: another processor draws the caption
    const text = text_or_null orelse return;
    vh.overlay.caption(
        vh.Mat.borrow(frame),
        text,
        cfg.placement,
        cfg.font_scale,
        text_color,
        band_color,
        @intCast(cfg.max_lines),
    ) catch {
        if (!failed_logged) {
            failed_logged = true;
            vh.log.warnf("overlay.caption failed: {s}", .{vh.cv.lastError()});
        }
    };
}
