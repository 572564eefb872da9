//! Compile check of the generated bindings (`python processor/build.py --test`): references
//! every declaration of wit.zig, so every typed wrapper is compiled for wasm32 (a processor
//! build compiles only the wrappers it uses). Also lists every raw import in `imports`, so a
//! module built from this root imports the whole contract (tests/test_zig_processors.py
//! compares those imports with the WIT world's).
const std = @import("std");
const wit = @import("wit.zig");

fn refAll(comptime T: type) void {
    @setEvalBranchQuota(1_000_000);
    inline for (comptime std.meta.declarations(T)) |name| {
        const v = @field(T, name);
        if (@TypeOf(v) == type) {
            switch (@typeInfo(v)) {
                .@"struct", .@"enum", .@"union" => refAll(v),
                else => {},
            }
        } else {
            _ = &v;
        }
    }
}

/// Number of raw imports under `T` (each interface's `raw` namespace).
fn countImports(comptime T: type) usize {
    @setEvalBranchQuota(1_000_000);
    var n: usize = 0;
    inline for (comptime std.meta.declarations(T)) |name| {
        const v = @field(T, name);
        if (@TypeOf(v) == type and @typeInfo(v) == .@"struct" and !@hasField(v, "handle")) {
            if (comptime std.mem.eql(u8, name, "raw")) n += std.meta.declarations(v).len else n += countImports(v);
        }
    }
    return n;
}

fn listImports(comptime T: type, out: []usize, i: *usize) void {
    @setEvalBranchQuota(1_000_000);
    inline for (comptime std.meta.declarations(T)) |name| {
        const v = @field(T, name);
        if (@TypeOf(v) == type and @typeInfo(v) == .@"struct" and !@hasField(v, "handle")) {
            if (comptime std.mem.eql(u8, name, "raw")) {
                inline for (comptime std.meta.declarations(v)) |f| {
                    out[i.*] = @intFromPtr(&@field(v, f));
                    i.* += 1;
                }
            } else listImports(v, out, i);
        }
    }
}

var table: [countImports(wit)]usize = undefined;

/// Addresses of every raw import (forces them all into the module's import section).
export fn imports() usize {
    comptime refAll(wit);
    var i: usize = 0;
    listImports(wit, &table, &i);
    return @intFromPtr(&table);
}
