#!/usr/bin/env python3
"""Generates the Zig guest bindings processor/sdk/wit.zig from the WIT contract (wasm/wit/).

    python processor/bindgen.py            # (re)write processor/sdk/wit.zig
    python processor/bindgen.py --check    # exit 1 when wit.zig is not what the WIT gives
    python processor/bindgen.py --stdout   # print instead of writing

`python processor/build.py` regenerates wit.zig before building, and `build.py --check` fails
when the checked-in wit.zig is stale.

How it works. The WIT is read with the host's own reader, `vision_host.runtime.wit.parse_dir`,
and every layout comes from the host's canonical-ABI codecs, `vision_host.runtime.canon.codec`
(`.flat` core letters i/I/f/F, `.size`, `.align`, `.payload_offset` and `.disc` of variants),
so guest and host agree by construction. For each interface imported by a world (interfaces
that are only exported, such as wasm:cv/request, are left out) the output holds:

* the WIT's named types as Zig types with the canonical memory layout: records and tuples as
  `extern struct`s, enums as non-exhaustive `enum(u8)` (the host may send OpenCV type codes
  through `mattype`), flags as `packed struct`s, variants as an `extern struct` of a tag and
  an `extern union`; `list`/`string`/`option`/`result` use canon.zig's `List`, `String`,
  `Option`, `Result`. A `comptime` block asserts every size, alignment and field offset
  against the codec, so a layout mistake is a compile error;
* per function, in `raw`, the `extern "<module>" fn @"<name>"` import with the flattened core
  signature (more than 16 flat parameters are passed as one pointer to a tuple in memory; a
  result of more than one flat value is written by the host to a return area whose address is
  the last parameter);
* per function a typed wrapper: `string`/`list` parameters as slices, records as structs,
  enums as Zig enums, resources as handle structs (`extern struct { handle: u32 }`, with the
  constructor as `init`, methods, statics, `drop` for `[resource-drop]` and `borrow(u32)`),
  strings/lists returned as owned slices (free with canon.free / canon.deinit), and
  `result<T, E>` as a Zig error union: an `error-result` string becomes `error.Failed` with
  the message kept for `canon.lastError()`, an enum error becomes the enum's own error set
  (`E.Error`, one error per case except `success`).

Functions whose shape the wrapper generator does not handle still get their `raw` import and
a comment saying so (none in the current contract).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIT_DIR = ROOT / "wasm" / "wit"
OUT = ROOT / "processor" / "sdk" / "wit.zig"



try:
    from vision_host.runtime import canon, wit
except ImportError:   # not installed: the source tree's package
    sys.path.insert(0, str(ROOT / "host"))
    from vision_host.runtime import canon, wit
EnumT, FlagsT, Function, Handle, ListT, OptionT, Prim, RecordT, ResourceT, ResultT, TupleT, VariantT = (
    wit.EnumT, wit.FlagsT, wit.Function, wit.Handle, wit.ListT, wit.OptionT, wit.Prim, wit.RecordT,
    wit.ResourceT, wit.ResultT, wit.TupleT, wit.VariantT)

MAX_FLAT_PARAMS = 16
MAX_FLAT_RESULTS = 1

ZIG_KEYWORDS = set("""
addrspace align allowzero and anyframe anytype asm break callconv catch comptime const continue
defer else enum errdefer error export extern fn for if inline linksection noalias noinline
nosuspend opaque or orelse packed pub resume return struct suspend switch test threadlocal try
union unreachable var volatile while
type bool void noreturn anyerror anyopaque comptime_int comptime_float isize usize true false null
undefined c_char c_short c_ushort c_int c_uint c_long c_ulong c_longlong c_ulonglong c_longdouble
f16 f32 f64 f80 f128
""".split())


class Unsupported(Exception):
    """A WIT shape the typed-wrapper generator does not handle (the raw import is kept)."""


# -- names ------------------------------------------------------------------------------------
def ident(name: str) -> str:
    """A Zig identifier, quoted when it is a keyword, a primitive or not a plain name."""
    if name in ZIG_KEYWORDS or re.fullmatch(r"[iu][0-9]+", name) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return f'@"{name}"'
    return name


ZIG_PRIMITIVES = set("""
type bool void noreturn anyerror anyopaque comptime_int comptime_float isize usize true false null
undefined c_char c_short c_ushort c_int c_uint c_long c_ulong c_longlong c_ulonglong c_longdouble
f16 f32 f64 f80 f128
""".split())


def field_ident(name: str) -> str:
    """A Zig field or enum-case name: only keywords need quoting there (`zig fmt` unquotes
    primitive names such as `null`)."""
    if name in ZIG_KEYWORDS - ZIG_PRIMITIVES or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return f'@"{name}"'
    return name


def _segments(name: str) -> list[str]:
    return [s for s in name.split("-") if s]


def pascal(name: str) -> str:
    """`key-point` → KeyPoint, `face-detector-YN` → FaceDetectorYN, `RGBA` → RGBA."""
    return "".join(s[0].upper() + s[1:] for s in _segments(name))


def camel(name: str) -> str:
    """`get-uchar-at` → getUcharAt, `NMS-boxes` → nmsBoxes, `read-from-ONNX` → readFromONNX."""
    segs = _segments(name)
    first = segs[0].lower() if segs[0].isupper() else segs[0][0].lower() + segs[0][1:]
    return first + "".join(s[0].upper() + s[1:] for s in segs[1:])


def snake(name: str) -> str:
    """`class-id` → class_id, `swap-RB` → swap_rb."""
    return "_".join(s.lower() for s in _segments(name))


def enum_cases(cases: list[str]) -> list[str]:
    """Zig names of enum cases: snake case, without the hyphen-separated prefix every case
    shares (`border-constant` → constant) when what remains is still distinct and valid."""
    names = [snake(c) for c in cases]
    segs = [_segments(c.lower()) for c in cases]
    common = 0
    if len(cases) > 1:
        while all(len(s) > common + 1 for s in segs) and len({s[common] for s in segs}) == 1:
            common += 1
    if common:
        stripped = ["_".join(s[common:]) for s in segs]
        if len(set(stripped)) == len(stripped) and not any(s[0].isdigit() for s in stripped):
            names = stripped
    return names


def package_ident(pkg: str) -> str:
    """`wasm:cv` → wasm_cv, `vision-host:platform` → vision_host_platform."""
    return re.sub(r"[^A-Za-z0-9]", "_", pkg)


# -- reading the contract -------------------------------------------------------------------
def _fix_bare_resources(ty, seen: set[int]):
    """`vision_host.runtime.wit` may leave a bare ResourceT where a type names a resource
    through `use` (instead of Handle(own)); give every such place its own<R> handle."""
    if isinstance(ty, ResourceT):
        return Handle(ty, True)
    if isinstance(ty, ListT):
        return ListT(_fix_bare_resources(ty.elem, seen))
    if isinstance(ty, OptionT):
        return OptionT(_fix_bare_resources(ty.elem, seen))
    if isinstance(ty, ResultT):
        return ResultT(_fix_bare_resources(ty.ok, seen), _fix_bare_resources(ty.err, seen))
    if isinstance(ty, TupleT):
        return TupleT(tuple(_fix_bare_resources(e, seen) for e in ty.elems))
    if isinstance(ty, (RecordT, VariantT)) and id(ty) not in seen:
        seen.add(id(ty))
        if isinstance(ty, RecordT):
            ty.fields[:] = [(n, _fix_bare_resources(t, seen)) for n, t in ty.fields]
        else:
            ty.cases[:] = [(n, _fix_bare_resources(t, seen) if t is not None else None) for n, t in ty.cases]
    return ty


_WORLD = re.compile(r"\bworld\s+([%\w-]+)\s*\{(.*?)\n\}", re.DOTALL)
_WORLD_ITEM = re.compile(r"^\s*(import|export)\s+([%\w:/@.-]+)\s*;", re.MULTILINE)
_PACKAGE = re.compile(r"^\s*package\s+([^;\s]+)\s*;", re.MULTILINE)


class Contract:
    """The parsed WIT: interfaces, where each named type is declared, what worlds import."""

    def __init__(self, root: Path):
        self.root = root
        self.interfaces = wit.parse_dir(root)
        seen: set[int] = set()
        for iface in self.interfaces.values():
            for name, ty in list(iface.types.items()):
                if not isinstance(ty, ResourceT):
                    iface.types[name] = _fix_bare_resources(ty, seen)
            for fn in iface.functions.values():
                fn.params = [(n, _fix_bare_resources(t, seen)) for n, t in fn.params]
                fn.result = _fix_bare_resources(fn.result, seen)
        self.home: dict[int, tuple[str, str]] = {}      # id(named type) → (interface, WIT name)
        self.aliases: dict[str, list[tuple[str, object]]] = {}  # interface → [(name, type)]
        self.imported: set[str] = set()
        self.exported: set[str] = set()
        self.world_imports: dict[str, list[str]] = {}
        self._read_files()

    def _read_files(self) -> None:
        files = sorted(self.root.rglob("*.wit"))
        declared = {}
        for path in files:
            m = _PACKAGE.search(path.read_text(encoding="utf-8"))
            if m:
                declared[path.parent] = m.group(1).split("@")[0]
        for path in files:
            text = path.read_text(encoding="utf-8")
            pkg = declared.get(path.parent)
            raw = wit.parse_text(text, str(path), {}, pkg)
            for qname, iface in raw.items():
                for name, ty in iface.types.items():
                    if isinstance(ty, (RecordT, EnumT, FlagsT, VariantT, ResourceT)) and ty.name == name:
                        resolved = self.interfaces[qname].types[name]
                        self.home[id(resolved)] = (qname, name)
                    else:
                        self.aliases.setdefault(qname, []).append((name, self.interfaces[qname].types[name]))
            for wm in _WORLD.finditer(text):
                world_imports = self.world_imports.setdefault(wm.group(1), [])
                for kind, target in _WORLD_ITEM.findall(wm.group(2)):
                    target = target.lstrip("%").split("@")[0]
                    qualified = target if ":" in target else f"{pkg}/{target}"
                    (self.imported if kind == "import" else self.exported).add(qualified)
                    if kind == "import":
                        world_imports.append(qualified)

    def generated_interfaces(self) -> list[str]:
        """Interfaces to bind: all but those only exported by worlds."""
        return [q for q in self.interfaces if not (q in self.exported and q not in self.imported)]


# -- the generator --------------------------------------------------------------------------
def _align(n: int, a: int) -> int:
    return (n + a - 1) & ~(a - 1)


FLAT_ZIG = {"i": "u32", "I": "u64", "f": "f32", "F": "f64"}
INT_ZIG = {"s8": "i8", "u8": "u8", "s16": "i16", "u16": "u16", "s32": "i32", "u32": "u32",
           "s64": "i64", "u64": "u64"}


def _prim_core_type(name: str) -> str:
    """Zig type of the core value a primitive is passed as."""
    return {"s8": "i32", "s16": "i32", "s32": "i32", "s64": "i64", "u64": "u64", "f32": "f32",
            "f64": "f64"}.get(name, "u32")


class Generator:
    def __init__(self, contract: Contract):
        self.c = contract
        self.ifaces = contract.generated_interfaces()
        self.out: list[str] = []
        self.asserts: list[str] = []
        self.tmp = 0
        self.error_enums: set[int] = set()
        self.stats = {"functions": 0, "wrapped": 0, "types": 0, "unsupported": []}
        self.local_names: dict[int, str] = {}
        self.layout_checks: dict[str, tuple[int, int]] = {}
        for q in self.ifaces:
            for fn in self.c.interfaces[q].functions.values():
                if isinstance(fn.result, ResultT) and isinstance(fn.result.err, EnumT):
                    self.error_enums.add(id(fn.result.err))

    # .. type names ................................................................
    def type_path(self, ty) -> str:
        """Zig path of a named WIT type: its local name in the interface being generated
        (declared or `use`d there), else the fully qualified path."""
        local = self.local_names.get(id(ty))
        if local:
            return local
        return self.qualified(ty)

    def qualified(self, ty) -> str:
        qname, name = self.c.home[id(ty)]
        pkg, iface = qname.split("/")
        return f"{package_ident(pkg)}.{ident(iface)}.{ident(pascal(name))}"

    def layout(self, ty) -> str:
        """The Zig type with the canonical memory layout of `ty` ("void" for none)."""
        if ty is None:
            return "void"
        if isinstance(ty, Prim):
            if ty.name == "bool":
                return "bool"
            if ty.name in ("f32", "f64"):
                return ty.name
            if ty.name == "char":
                return "u32"
            if ty.name == "string":
                return "canon.String"
            return INT_ZIG[ty.name]
        if isinstance(ty, ListT):
            return f"canon.List({self.layout(ty.elem)})"
        if isinstance(ty, OptionT):
            return f"canon.Option({self.layout(ty.elem)})"
        if isinstance(ty, ResultT):
            return f"canon.Result({self.layout(ty.ok)}, {self.layout(ty.err)})"
        if isinstance(ty, TupleT):
            fields = ", ".join(f'@"{k}": {self.layout(e)}' for k, e in enumerate(ty.elems))
            return f"extern struct {{ {fields} }}"
        if isinstance(ty, Handle):
            return self.type_path(ty.resource)
        if isinstance(ty, (RecordT, EnumT, FlagsT, VariantT)):
            return self.type_path(ty)
        raise Unsupported(f"no layout for {ty!r}")

    def api_param(self, ty) -> str:
        if isinstance(ty, Prim) and ty.name == "string":
            return "[]const u8"
        if isinstance(ty, ListT):
            return f"[]const {self.layout(ty.elem)}"
        if isinstance(ty, OptionT):
            return f"?{self.api_param(ty.elem)}"
        return self.layout(ty)

    def api_result(self, ty) -> str:
        if ty is None:
            return "void"
        if isinstance(ty, Prim) and ty.name == "string":
            return "[]u8"
        if isinstance(ty, ListT):
            return f"[]{self.layout(ty.elem)}"
        if isinstance(ty, OptionT):
            return f"?{self.api_result(ty.elem)}"
        return self.layout(ty)

    def api_result_expr(self, ty, x: str) -> str:
        """Converts layout value `x` of `ty` to the wrapper's return form."""
        if isinstance(ty, Prim) and ty.name == "string" or isinstance(ty, ListT):
            return f"{x}.slice()"
        if isinstance(ty, OptionT):
            return f"(if ({x}.is_some != 0) {self.api_result_expr(ty.elem, f'{x}.value')} else null)"
        return x

    def wit_text(self, ty) -> str:
        """`ty` as written in WIT (for doc comments)."""
        if ty is None:
            return "_"
        if isinstance(ty, Prim):
            return ty.name
        if isinstance(ty, ListT):
            return f"list<{self.wit_text(ty.elem)}>"
        if isinstance(ty, OptionT):
            return f"option<{self.wit_text(ty.elem)}>"
        if isinstance(ty, ResultT):
            if ty.ok is None and ty.err is None:
                return "result"
            if ty.err is None:
                return f"result<{self.wit_text(ty.ok)}>"
            return f"result<{self.wit_text(ty.ok)}, {self.wit_text(ty.err)}>"
        if isinstance(ty, TupleT):
            return "tuple<" + ", ".join(self.wit_text(e) for e in ty.elems) + ">"
        if isinstance(ty, Handle):
            return ty.resource.name if ty.own else f"borrow<{ty.resource.name}>"
        return ty.name

    # .. flattening (lowering parameters) ..........................................
    def fresh(self, stem: str) -> str:
        self.tmp += 1
        return f"wit_{stem}{self.tmp}"

    def lower(self, ty, expr: str, form: str, stmts: list[str]) -> list[tuple[str, str, str]]:
        """Flat core values of `expr` (of WIT type `ty`, in `form` "api" or "layout"), as
        (letter, Zig type, Zig expression); statements needed first go to `stmts`."""
        if isinstance(ty, Prim):
            n = ty.name
            if n == "bool":
                return [("i", "u32", f"@as(u32, @intFromBool({expr}))")]
            if n in ("f32", "f64"):
                return [(canon.codec(ty).flat, n, expr)]
            if n == "string":
                return self._lower_list(expr, form)
            core = _prim_core_type(n)
            return [(canon.codec(ty).flat, core, f"@as({core}, {expr})")]
        if isinstance(ty, ListT):
            return self._lower_list(expr, form)
        if isinstance(ty, RecordT):
            vals = []
            for fname, fty in ty.fields:
                vals += self.lower(fty, f"{expr}.{field_ident(snake(fname))}", "layout", stmts)
            return vals
        if isinstance(ty, TupleT):
            vals = []
            for k, e in enumerate(ty.elems):
                vals += self.lower(e, f'{expr}.@"{k}"', "layout", stmts)
            return vals
        if isinstance(ty, EnumT):
            return [("i", "u32", f"@as(u32, @backingInt({expr}))")]
        if isinstance(ty, FlagsT):
            c = canon.codec(ty)
            if c.size == 0:
                return []
            if len(c.flat) == 1:
                bits = c.size * 8
                return [("i", "u32", f"@as(u32, @as(u{bits}, @bitCast({expr})))")]
            return [("i", "u32", f"{expr}[{k}]") for k in range(len(c.flat))]
        if isinstance(ty, Handle):
            return [("i", "u32", f"{expr}.handle")]
        if isinstance(ty, (OptionT, ResultT, VariantT)):
            return self._lower_variant(ty, expr, form, stmts)
        raise Unsupported(f"cannot lower {ty!r}")

    def _lower_list(self, expr: str, form: str):
        if form == "api":
            return [("i", "u32", f"@as(u32, @intFromPtr({expr}.ptr))"), ("i", "u32", f"@as(u32, @intCast({expr}.len))")]
        return [("i", "u32", f"{expr}.ptr"), ("i", "u32", f"{expr}.len")]

    def _lower_variant(self, ty, expr: str, form: str, stmts: list[str]):
        c = canon.codec(ty)
        joined = c.flat[1:]
        tag = self.fresh("tag")
        slots = [self.fresh("v") for _ in joined]
        stmts.append(f"var {tag}: u32 = 0;")
        for s, letter in zip(slots, joined):
            stmts.append(f"var {s}: {FLAT_ZIG[letter]} = 0;")

        def fill(case_ty, payload_expr, payload_form, body: list[str]):
            if case_ty is None:
                return
            inner: list[str] = []
            vals = self.lower(case_ty, payload_expr, payload_form, inner)
            body += inner
            for (letter, zty, e), slot, want in zip(vals, slots, joined):
                body.append(f"{slot} = {self._coerce(e, letter, zty, want)};")

        if isinstance(ty, OptionT):
            body: list[str] = []
            if form == "api":
                payload = self.fresh("some")
                fill(ty.elem, payload, "api", body)
                stmts.append(f"if ({expr}) |{payload}| {{")
            else:
                fill(ty.elem, f"{expr}.value", "layout", body)
                stmts.append(f"if ({expr}.is_some != 0) {{")
            stmts.append(f"    {tag} = 1;")
            stmts += ["    " + b for b in body]
            stmts.append("}")
        elif isinstance(ty, ResultT):
            for k, (case_ty, field) in enumerate(((ty.ok, "ok"), (ty.err, "err"))):
                body = []
                fill(case_ty, f"{expr}.payload.{field}", "layout", body)
                cond = "==" if k == 0 else "!="
                stmts.append(f"if ({expr}.is_err {cond} 0) {{")
                stmts.append(f"    {tag} = {k};")
                stmts += ["    " + b for b in body]
                stmts.append("}")
        else:
            names = enum_cases([n for n, _ in ty.cases])
            stmts.append(f"{tag} = @backingInt({expr}.tag);")
            stmts.append(f"switch ({expr}.tag) {{")
            for (cname, case_ty), zname in zip(ty.cases, names):
                if case_ty is None:
                    continue
                body = []
                fill(case_ty, f"{expr}.payload.{field_ident(zname)}", "layout", body)
                stmts.append(f"    .{field_ident(zname)} => {{")
                stmts += ["        " + b for b in body]
                stmts.append("    },")
            stmts.append("    else => {},")
            stmts.append("}")
        return [("i", "u32", tag)] + [(letter, FLAT_ZIG[letter], s) for letter, s in zip(joined, slots)]

    @staticmethod
    def _coerce(e: str, have: str, zty: str, want: str) -> str:
        """Core value `e` (letter `have`, Zig type `zty`) in a joined slot of letter `want`."""
        if have == want:
            return f"@as({FLAT_ZIG[want]}, @bitCast({e}))" if zty != FLAT_ZIG[want] else e
        if want == "i":        # f32 in an i32 slot
            return f"@as(u32, @bitCast(@as(f32, {e})))"
        if have == "i":        # i32 in an i64 slot: zero-extended
            return f"@as(u64, @as(u32, @bitCast({e})))"
        if have == "f":
            return f"@as(u64, @as(u32, @bitCast(@as(f32, {e}))))"
        return f"@as(u64, @bitCast(@as(f64, {e})))"

    # .. lifting a single flat result ...............................................
    def lift_single(self, ty, x: str) -> str:
        if isinstance(ty, Prim):
            n = ty.name
            if n == "bool":
                return f"({x} != 0)"
            if n in ("u8", "u16", "s8", "s16"):
                return f"@as({INT_ZIG[n]}, @truncate({x}))"
            return x
        if isinstance(ty, EnumT):
            bits = canon.codec(ty).size * 8
            return f"@as({self.layout(ty)}, @enumFromInt(@as(u{bits}, @truncate({x}))))"
        if isinstance(ty, FlagsT):
            bits = canon.codec(ty).size * 8
            return f"@as({self.layout(ty)}, @bitCast(@as(u{bits}, @truncate({x}))))"
        if isinstance(ty, Handle):
            return f"{self.layout(ty)}{{ .handle = {x} }}"
        if isinstance(ty, RecordT) and len(canon.codec(ty).flat) == 1:
            for fname, fty in ty.fields:
                if canon.codec(fty).flat:
                    return f"{self.layout(ty)}{{ .{field_ident(snake(fname))} = {self.lift_single(fty, x)} }}"
        raise Unsupported(f"cannot lift a single flat {ty!r}")

    # .. emitting ......................................................................
    def emit(self, line: str = "", indent: int = 0) -> None:
        self.out.append(("    " * indent + line).rstrip() if line else "")

    def doc(self, text: str, indent: int) -> None:
        for para in text.split("\n"):
            for line in textwrap.wrap(para, 96 - 4 * indent, break_long_words=False,
                                      break_on_hyphens=False) or [""]:
                self.emit(f"/// {line}".rstrip(), indent)

    def generate(self) -> str:
        self.emit_header()
        packages: dict[str, list[str]] = {}
        for q in self.ifaces:
            packages.setdefault(q.split("/")[0], []).append(q)
        for pkg, names in packages.items():
            self.emit()
            self.emit(f"/// Package `{pkg}`.")
            self.emit(f"pub const {package_ident(pkg)} = struct {{")
            for k, q in enumerate(names):
                if k:
                    self.emit()
                self.emit_interface(q, 1)
            self.emit("};")
        self.emit()
        self.emit("// Canonical layouts, checked against the host's codecs (vision_host.runtime.canon).")
        self.emit("comptime {")
        for ty, (size, align) in sorted(self.layout_checks.items()):
            self.asserts.append(f"std.debug.assert(@sizeOf({ty}) == {size} and @alignOf({ty}) == {align});")
        for a in self.asserts:
            self.emit(a, 1)
        self.emit("}")
        return "\n".join(self.out) + "\n"

    def emit_header(self) -> None:
        worlds = ", ".join(sorted(self.c.world_imports))
        total = sum(len(self.c.interfaces[q].functions) for q in self.ifaces)
        self.emit("//! GENERATED by processor/bindgen.py from wasm/wit/: do not edit by hand.")
        self.emit("//! Regenerate with `python processor/bindgen.py` (processor/build.py does it before")
        self.emit("//! every build; `build.py --check` fails when this file is stale).")
        self.emit("//!")
        self.emit(f"//! {total} imported functions of {len(self.ifaces)} interfaces (worlds: {worlds}).")
        self.emit("//! Per interface: its types (canonical memory layout), `raw` (the core-wasm imports")
        self.emit("//! with their flattened signatures) and typed wrappers; resources are handle structs")
        self.emit("//! whose methods wrap `[constructor]`, `[method]`, `[static]` and `[resource-drop]`.")
        self.emit("//! Ownership: see canon.zig (strings/lists the host returns are the caller's to free).")
        self.emit("const std = @import(\"std\");")
        self.emit("const canon = @import(\"canon.zig\");")

    def scope_names(self, iface) -> set[str]:
        names = {"std", "canon", "raw", "lastError"}
        names |= {package_ident(q.split("/")[0]) for q in self.ifaces}
        names |= {q.split("/")[1] for q in self.ifaces}
        names |= {pascal(n) for n in iface.types}
        for fn in iface.functions.values():
            if fn.import_name.startswith("["):
                continue
            names.add(camel(fn.import_name))
        return names

    def emit_interface(self, qname: str, ind: int) -> None:
        iface = self.c.interfaces[qname]
        short = qname.split("/")[1]
        in_worlds = [w for w, imps in sorted(self.c.world_imports.items()) if qname in imps]
        self.emit(f"/// Interface `{qname}`" + (f" (imported by world {', '.join(in_worlds)})." if in_worlds else "."), ind)
        self.emit(f"pub const {ident(short)} = struct {{", ind)
        inner = ind + 1
        if iface.functions:
            self.emit("/// The message of the last call that failed with an `error-result` string.", inner)
            self.emit("pub const lastError = canon.lastError;", inner)
        # aliases and `use`d names
        self.local_names = {}
        local = set()
        for name, ty in self.c.aliases.get(qname, []):
            if name in local:
                continue
            local.add(name)
            target = ty.resource if isinstance(ty, Handle) else ty
            path = self.qualified(target) if id(target) in self.c.home else self.layout(target)
            self.emit(f"pub const {ident(pascal(name))} = {path};", inner)
            if id(target) in self.c.home:
                self.local_names.setdefault(id(target), ident(pascal(name)))
        for name, ty in iface.types.items():
            if self.c.home.get(id(ty)) == (qname, name):
                self.local_names[id(ty)] = ident(pascal(name))
        # declared types
        resources = []
        for name, ty in iface.types.items():
            if self.c.home.get(id(ty)) != (qname, name):
                continue
            if isinstance(ty, ResourceT):
                resources.append(ty)
                continue
            self.stats["types"] += 1
            self.emit_type(ty, inner)
        scope = self.scope_names(iface)
        for res in resources:
            self.stats["types"] += 1
            self.emit_resource(iface, res, inner, scope)
        # free functions
        for fn in iface.functions.values():
            if not fn.import_name.startswith("["):
                self.emit_wrapper(fn, inner, scope, None)
        # raw imports
        if iface.functions:
            self.emit("/// The core-wasm imports (canonical-ABI lowered signatures).", inner)
            self.emit("pub const raw = struct {", inner)
            for fn in iface.functions.values():
                self.emit_extern(fn, inner + 1, scope)
            self.emit("};", inner)
        self.emit("};", ind)

    def emit_type(self, ty, ind: int) -> None:
        c = canon.codec(ty)
        zname = ident(pascal(ty.name))
        path = self.qualified(ty)
        if isinstance(ty, RecordT):
            self.emit(f"pub const {zname} = extern struct {{", ind)
            offset = 0
            for fname, fty in ty.fields:
                fc = canon.codec(fty)
                offset = _align(offset, fc.align)
                self.emit(f"{field_ident(snake(fname))}: {self.layout(fty)},", ind + 1)
                self.asserts.append(f'std.debug.assert(@offsetOf({path}, "{snake(fname)}") == {offset});')
                offset += fc.size
            self.emit("};", ind)
        elif isinstance(ty, EnumT):
            bits = c.size * 8
            names = enum_cases(ty.cases)
            self.emit(f"pub const {zname} = enum(u{bits}) {{", ind)
            for n in names:
                self.emit(f"{field_ident(n)},", ind + 1)
            if len(names) < (1 << bits):
                self.emit("_,", ind + 1)
            if id(ty) in self.error_enums:
                self.emit_error_set(ty, names, ind + 1)
            self.emit("};", ind)
        elif isinstance(ty, FlagsT):
            if c.size == 0:
                self.emit(f"pub const {zname} = packed struct(u0) {{}};", ind)
            elif len(ty.flags) <= 32:
                bits = c.size * 8
                self.emit(f"pub const {zname} = packed struct(u{bits}) {{", ind)
                for f in ty.flags:
                    self.emit(f"{field_ident(snake(f))}: bool = false,", ind + 1)
                if bits > len(ty.flags):
                    self.emit(f"_padding: u{bits - len(ty.flags)} = 0,", ind + 1)
                self.emit("};", ind)
            else:
                self.emit(f"/// Flags: bit k of word k/32 is flag k ({', '.join(ty.flags)}).", ind)
                self.emit(f"pub const {zname} = [{len(c.flat)}]u32;", ind)
        elif isinstance(ty, VariantT):
            names = enum_cases([n for n, _ in ty.cases])
            bits = c.disc.size * 8
            self.emit(f"pub const {zname} = extern struct {{", ind)
            self.emit("tag: Tag,", ind + 1)
            payloads = [(n, t) for n, (_, t) in zip(names, ty.cases) if t is not None]
            if payloads:
                self.emit("payload: extern union {", ind + 1)
                for n, t in payloads:
                    self.emit(f"{field_ident(n)}: {self.layout(t)},", ind + 2)
                self.emit("},", ind + 1)
            self.emit(f"pub const Tag = enum(u{bits}) {{ {', '.join(field_ident(n) for n in names)}, _ }};", ind + 1)
            if payloads:
                self.emit(f"pub fn deinit(self: {zname}) void {{", ind + 1)
                self.emit("switch (self.tag) {", ind + 2)
                for n, _ in payloads:
                    self.emit(f".{field_ident(n)} => canon.deinit(self.payload.{field_ident(n)}),", ind + 3)
                self.emit("else => {},", ind + 3)
                self.emit("}", ind + 2)
                self.emit("}", ind + 1)
            self.emit("};", ind)
            if payloads:
                self.asserts.append(f'std.debug.assert(@offsetOf({path}, "payload") == {c.payload_offset});')
        if c.size:
            self.asserts.append(f"std.debug.assert(@sizeOf({path}) == {c.size} and @alignOf({path}) == {c.align});")

    def emit_error_set(self, ty: EnumT, names: list[str], ind: int) -> None:
        errors = [pascal(c) for c in ty.cases if c != "success"]
        fallback = "RuntimeError" if "RuntimeError" in errors else errors[-1]
        note = " (`success` is not an error)" if "success" in ty.cases else ""
        self.emit(f"/// The cases as Zig errors{note}.", ind)
        inner = ", ".join(errors)
        self.emit(f"pub const Error = error{{ {inner} }};" if len(errors) > 1 else f"pub const Error = error{{{inner}}};", ind)
        which = "`success` or an unknown value" if "success" in ty.cases else "An unknown value"
        self.emit(f"/// This case as an error; {which} (a host bug) gives error.{fallback}.", ind)
        self.emit("pub fn toError(self: @This()) Error {", ind)
        self.emit("return switch (self) {", ind + 1)
        for case, n in zip(ty.cases, names):
            if case != "success":
                self.emit(f".{field_ident(n)} => error.{pascal(case)},", ind + 2)
        self.emit(f"else => error.{fallback},", ind + 2)
        self.emit("};", ind + 1)
        self.emit("}", ind)

    def emit_resource(self, iface, res: ResourceT, ind: int, scope: set[str]) -> None:
        zname = ident(pascal(res.name))
        self.emit(f"/// Resource `{res.name}`: a handle owned by the host's table.", ind)
        self.emit(f"pub const {zname} = extern struct {{", ind)
        self.emit("handle: u32,", ind + 1)
        self.emit()
        self.emit("/// Wraps a handle the guest was given (e.g. the frame passed to `process`).", ind + 1)
        self.emit(f"pub fn borrow(handle: u32) {zname} {{", ind + 1)
        self.emit("return .{ .handle = handle };", ind + 2)
        self.emit("}", ind + 1)
        members = [fn for fn in iface.functions.values()
                   if re.fullmatch(r"\[(constructor|method|static|resource-drop)\]" + re.escape(res.name) + r"(\..*)?", fn.import_name)]
        inner_scope = scope | {"handle", "borrow", "drop", "init"} | {camel(fn.import_name.split(".", 1)[1]) for fn in members if "." in fn.import_name}
        for fn in members:
            self.emit_wrapper(fn, ind + 1, inner_scope, res)
        self.emit("};", ind)

    def wrapper_name(self, fn: Function, res: ResourceT | None) -> str:
        name = fn.import_name
        if name.startswith("[constructor]"):
            return "init"
        if name.startswith("[resource-drop]"):
            return "drop"
        if res is not None:
            short = camel(name.split(".", 1)[1])
            return short + "_" if short in ("handle", "borrow", "drop", "init") else short
        return camel(name)

    # .. signatures ....................................................................
    def core_signature(self, fn: Function):
        params = [canon.codec(t) for _, t in fn.params]
        result = canon.codec(fn.result)
        flat = "".join(p.flat for p in params)
        rflat = result.flat if result is not None else ""
        spilled = len(flat) > MAX_FLAT_PARAMS
        retptr = len(rflat) > MAX_FLAT_RESULTS
        return flat, rflat, spilled, retptr

    def extern_params(self, fn: Function, scope: set[str]) -> list[tuple[str, str]]:
        """(name, Zig type) of the extern's core parameters."""
        flat, rflat, spilled, retptr = self.core_signature(fn)
        out = []
        if spilled:
            out.append(("args", "u32"))
        else:
            for pname, ty in fn.params:
                base = snake(pname)
                names = self._flat_names(ty, base)
                for (letter, zty), n in zip(self._flat_types(ty), names):
                    out.append((n, zty))
        if retptr:
            out.append(("ret", "u32"))
        seen: dict[str, int] = {}
        fixed = []
        for n, t in out:
            if n in seen or n in scope:
                seen[n] = seen.get(n, 0) + 1
                n = f"{n}_{seen[n]}"
            seen.setdefault(n, 0)
            fixed.append((n, t))
        return fixed

    def _flat_types(self, ty) -> list[tuple[str, str]]:
        if isinstance(ty, Prim) and ty.name not in ("string", "bool", "char"):
            return [(canon.codec(ty).flat, _prim_core_type(ty.name))]
        if isinstance(ty, RecordT):
            return [x for _, f in ty.fields for x in self._flat_types(f)]
        if isinstance(ty, TupleT):
            return [x for e in ty.elems for x in self._flat_types(e)]
        return [(letter, FLAT_ZIG[letter]) for letter in canon.codec(ty).flat]

    def _flat_names(self, ty, base: str) -> list[str]:
        n = len(canon.codec(ty).flat)
        if isinstance(ty, RecordT):
            return [x for fname, f in ty.fields for x in self._flat_names(f, f"{base}_{snake(fname)}")]
        if isinstance(ty, TupleT):
            return [x for k, e in enumerate(ty.elems) for x in self._flat_names(e, f"{base}_{k}")]
        if isinstance(ty, (ListT,)) or isinstance(ty, Prim) and ty.name == "string":
            return [f"{base}_ptr", f"{base}_len"]
        if n == 1:
            return [base]
        return [f"{base}_{k}" for k in range(n)]

    def extern_result_type(self, fn: Function) -> str:
        flat, rflat, spilled, retptr = self.core_signature(fn)
        if retptr or not rflat:
            return "void"
        ty = fn.result
        if isinstance(ty, Prim) and ty.name not in ("bool", "char", "string"):
            return _prim_core_type(ty.name)
        return FLAT_ZIG[rflat]

    def emit_extern(self, fn: Function, ind: int, scope: set[str]) -> None:
        params = ", ".join(f"{ident(n)}: {t}" for n, t in self.extern_params(fn, scope))
        self.emit(f'pub extern "{fn.interface}" fn {ident(fn.import_name)}({params}) {self.extern_result_type(fn)};', ind)

    # .. wrappers ......................................................................
    def emit_wrapper(self, fn: Function, ind: int, scope: set[str], res: ResourceT | None) -> None:
        self.stats["functions"] += 1
        name = self.wrapper_name(fn, res)
        sig = f"{fn.import_name}: func(" + ", ".join(f"{p}: {self.wit_text(t)}" for p, t in fn.params) + ")"
        if fn.result is not None:
            sig += f" -> {self.wit_text(fn.result)}"
        try:
            body, params, ret_type = self.wrapper_body(fn, scope, res)
        except Unsupported as exc:
            self.stats["unsupported"].append(f"{fn.interface}#{fn.import_name}: {exc}")
            self.emit()
            self.emit(f"// {fn.import_name}: no typed wrapper ({exc}); use raw.@\"{fn.import_name}\".", ind)
            return
        self.stats["wrapped"] += 1
        self.emit()
        if fn.docs:
            self.doc(fn.docs, ind)
            self.emit("///", ind)
        self.emit(f"/// WIT: `{sig}`", ind)
        self.emit(f"pub fn {ident(name)}({params}) {ret_type} {{", ind)
        for line in body:
            self.emit(line, ind + 1)
        self.emit("}", ind)

    def wrapper_body(self, fn: Function, scope: set[str], res: ResourceT | None):
        """(body lines, parameter list, return type) of the typed wrapper of `fn`."""
        flat, rflat, spilled, retptr = self.core_signature(fn)
        body: list[str] = []
        params = []
        names = []
        for k, (pname, ty) in enumerate(fn.params):
            if k == 0 and pname == "self" and res is not None:
                pn = "self"
            else:
                pn = snake(pname)
                while pn in scope or pn in names or pn in ("self",) or ident(pn) != pn:
                    pn += "_"
            names.append(pn)
            params.append(f"{pn}: {self.api_param(ty)}")
        args: list[str] = []
        if spilled:
            fields = []
            inits = []
            for k, ((pname, ty), pn) in enumerate(zip(fn.params, names)):
                fields.append(f"p{k}: {self.layout(ty)}")
                inits.append(f".p{k} = {self.to_layout(ty, pn)}")
            rec = "extern struct { " + ", ".join(fields) + " }"
            body.append(f"const wit_args: {rec} = .{{ {', '.join(inits)} }};")
            size, align = self.tuple_layout([t for _, t in fn.params])
            body.append(f"comptime std.debug.assert(@sizeOf(@TypeOf(wit_args)) == {size} and @alignOf(@TypeOf(wit_args)) == {align});")
            args.append("@intFromPtr(&wit_args)")
        else:
            for (pname, ty), pn in zip(fn.params, names):
                vals = self.lower(ty, pn, "api", body)
                args += [e for _, _, e in vals]
        result = fn.result
        call = f"raw.{ident(fn.import_name)}"
        if result is None:
            body.append(f"{call}({', '.join(args)});")
            ret_type = "void"
        elif retptr:
            body.append(f"var wit_ret: {self.layout(result)} = undefined;")
            c = canon.codec(result)
            saved, self.local_names = self.local_names, {}
            self.layout_checks[self.layout(result)] = (c.size, c.align)
            self.local_names = saved
            args.append("@intFromPtr(&wit_ret)")
            body.append(f"{call}({', '.join(args)});")
            ret_type = self.finish_result(result, "wit_ret", body)
        else:
            if isinstance(result, ResultT):
                # only the case flag: result<_, _> (or payloads without flat values)
                body.append(f"const wit_case = {call}({', '.join(args)});")
                ret_type = self.error_type(result) + "!" + self.api_result(result.ok)
                body.append(f"if (wit_case != 0) return {self.err_value(result, None)};")
                if result.ok is not None:
                    raise Unsupported("result with a zero-size ok payload")
            else:
                call_expr = f"{call}({', '.join(args)})"
                body.append(f"return {self.lift_single(result, call_expr)};")
                ret_type = self.api_result(result)
        return body, ", ".join(params), ret_type

    def tuple_layout(self, types) -> tuple[int, int]:
        offset, align = 0, 1
        for t in types:
            c = canon.codec(t)
            offset = _align(offset, c.align) + c.size
            align = max(align, c.align)
        return _align(offset, align), align

    def to_layout(self, ty, expr: str) -> str:
        if isinstance(ty, Prim) and ty.name == "string":
            return f"canon.String.from({expr})"
        if isinstance(ty, ListT):
            return f"{self.layout(ty)}.from({expr})"
        if isinstance(ty, OptionT):
            if self.api_param(ty.elem) != self.layout(ty.elem):
                raise Unsupported("option of a list in spilled parameters")
            return f"{self.layout(ty)}.from({expr})"
        return expr

    def error_type(self, result: ResultT) -> str:
        if isinstance(result.err, EnumT):
            return f"{self.layout(result.err)}.Error"
        return "canon.Failed"

    def err_value(self, result: ResultT, x: str | None) -> str:
        err = result.err
        if err is None or x is None:
            return "canon.failBare()"
        if isinstance(err, Prim) and err.name == "string":
            return f"canon.fail({x})"
        if isinstance(err, EnumT):
            return f"{x}.toError()"
        return f"wit_fail: {{ canon.deinit({x}); break :wit_fail canon.failBare(); }}"

    def finish_result(self, result, x: str, body: list[str]) -> str:
        if isinstance(result, ResultT):
            body.append(f"if ({x}.is_err != 0) return {self.err_value(result, f'{x}.payload.err')};")
            if result.ok is not None:
                body.append(f"return {self.api_result_expr(result.ok, f'{x}.payload.ok')};")
            return f"{self.error_type(result)}!{self.api_result(result.ok)}"
        body.append(f"return {self.api_result_expr(result, x)};")
        return self.api_result(result)


def generate(root: Path = WIT_DIR) -> tuple[str, dict]:
    """The text of wit.zig for the WIT under `root`, and statistics."""
    gen = Generator(Contract(root))
    text = gen.generate()
    return text, gen.stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wit", type=Path, default=WIT_DIR, help="WIT directory (default: wasm/wit)")
    ap.add_argument("--out", type=Path, default=OUT, help="output file (default: processor/sdk/wit.zig)")
    ap.add_argument("--check", action="store_true", help="exit 1 when the output file is stale")
    ap.add_argument("--stdout", action="store_true", help="print the bindings instead of writing")
    args = ap.parse_args(argv)
    text, stats = generate(args.wit)
    for problem in stats["unsupported"]:
        print(f"bindgen: no typed wrapper for {problem}", file=sys.stderr)
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} is stale "
                  "(run `python processor/bindgen.py`)", file=sys.stderr)
            return 1
        print(f"{args.out.name} up to date ({stats['wrapped']} wrappers)")
        return 0
    if not args.out.exists() or args.out.read_text(encoding="utf-8") != text:
        args.out.write_text(text, encoding="utf-8")
    print(f"{args.out.name}: {stats['functions']} functions ({stats['wrapped']} wrapped), {stats['types']} types")
    return 0


if __name__ == "__main__":
    sys.exit(main())
