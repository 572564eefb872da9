"""A reader for the WIT files that are the host ↔ processor contract (``wasm/wit``).

Parses the part of the WIT language the contract uses (packages, interfaces, ``use``,
``type`` aliases, ``record``, ``enum``, ``flags``, ``variant``, ``resource`` with
constructors, methods and static functions, and free functions; types ``bool``, ``s8`` …
``u64``, ``f32``, ``f64``, ``char``, ``string``, ``list<T>``, ``option<T>``,
``result<T, E>``, ``tuple<…>``, ``own<R>``, ``borrow<R>``) into the small type model below,
from which :mod:`.canon` derives the canonical-ABI lowering of every function.

Grammar: the component model's ``WIT.md``. wasmCV's identifiers keep their upper-case
acronyms (``RGBA``, ``face-detector-YN``), which older WIT tools accepted; so does this reader.
Import names follow the canonical ABI's core naming: ``[constructor]R``, ``[method]R.f``,
``[static]R.f``, ``[resource-drop]R``, in module ``namespace:package/interface``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Prim", "ListT", "OptionT", "ResultT", "TupleT", "RecordT", "EnumT", "FlagsT", "VariantT",
           "ResourceT", "Handle", "Function", "Interface", "WitError", "parse_dir", "parse_text"]


class WitError(Exception):
    """A WIT file could not be read: the message gives the file, line and what was expected."""


# -- type model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prim:
    """``bool``, ``s8``…``u64``, ``f32``, ``f64``, ``char`` or ``string``."""
    name: str


@dataclass(frozen=True)
class ListT:
    """``list<elem>``."""
    elem: object


@dataclass(frozen=True)
class OptionT:
    """``option<elem>``."""
    elem: object


@dataclass(frozen=True)
class ResultT:
    """``result<ok, err>``; ``None`` for a missing case type (``_``)."""
    ok: object | None
    err: object | None


@dataclass(frozen=True)
class TupleT:
    """``tuple<…>``, element types in order."""
    elems: tuple


@dataclass(eq=False)
class RecordT:
    """A named record; ``fields`` are (name, type) in declaration order (the layout order)."""
    name: str
    fields: list[tuple[str, object]] = field(default_factory=list)


@dataclass(eq=False)
class EnumT:
    """A named enum; a value is its case index in ``cases``."""
    name: str
    cases: list[str] = field(default_factory=list)


@dataclass(eq=False)
class FlagsT:
    """A named flags type; bit k of a value is ``flags[k]``."""
    name: str
    flags: list[str] = field(default_factory=list)


@dataclass(eq=False)
class VariantT:
    """A named variant; ``cases`` are (name, payload type or None), index = discriminant."""
    name: str
    cases: list[tuple[str, object | None]] = field(default_factory=list)


@dataclass(eq=False)
class ResourceT:
    """A resource type; ``interface`` is the qualified interface name that declares it."""
    name: str
    interface: str

    @property
    def key(self) -> str:
        """``namespace:package/interface.resource``, unique in a contract."""
        return f"{self.interface}.{self.name}"


@dataclass(frozen=True)
class Handle:
    """``own<R>`` (``own=True``, also a bare resource name) or ``borrow<R>``."""
    resource: ResourceT
    own: bool


@dataclass
class Function:
    """One imported function: ``import_name`` is its core import name in ``interface``."""
    interface: str
    import_name: str
    params: list[tuple[str, object]]
    result: object | None
    docs: str = ""


@dataclass
class Interface:
    """An interface: qualified ``name`` (``ns:pkg/iface``), its named types and functions."""
    name: str
    types: dict[str, object] = field(default_factory=dict)
    functions: dict[str, Function] = field(default_factory=dict)


PRIMITIVES = {"bool", "s8", "u8", "s16", "u16", "s32", "u32", "s64", "u64", "f32", "f64",
              "float32", "float64", "char", "string"}
_ALIASES = {"float32": "f32", "float64": "f64"}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<doc>///[^\n]*)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<arrow>->)
  | (?P<id>%?[A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*)
  | (?P<ver>@[0-9A-Za-z.+-]+)
  | (?P<punct>[{}()<>,:;=.*/_])
""", re.VERBOSE | re.DOTALL)


class _Tokens:
    def __init__(self, text: str, origin: str):
        self.origin = origin
        self.items: list[tuple[str, str, int]] = []   # (kind, text, line)
        self.docs: dict[int, str] = {}                 # token index → doc comment before it
        pos, line, doc = 0, 1, []
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise WitError(f"{origin}:{line}: unexpected character {text[pos]!r}")
            kind, value = m.lastgroup, m.group()
            if kind == "doc":
                doc.append(value[3:].strip())
            elif kind not in ("ws", "comment"):
                if doc:
                    self.docs[len(self.items)] = " ".join(doc)
                    doc = []
                self.items.append((kind, value, line))
            line += value.count("\n")
            pos = m.end()
        self.i = 0

    def peek(self, ahead: int = 0) -> str:
        j = self.i + ahead
        return self.items[j][1] if j < len(self.items) else ""

    def next(self) -> str:
        if self.i >= len(self.items):
            raise WitError(f"{self.origin}: unexpected end of file")
        value = self.items[self.i][1]
        self.i += 1
        return value

    def doc(self) -> str:
        return self.docs.get(self.i, "")

    def expect(self, want: str) -> str:
        got = self.next()
        if got != want:
            raise self.error(f"expected {want!r}, found {got!r}", back=1)
        return got

    def ident(self) -> str:
        j = self.i
        got = self.next()
        if j >= len(self.items) or self.items[j][0] != "id":
            raise self.error(f"expected a name, found {got!r}", back=1)
        return got.lstrip("%")

    def error(self, message: str, back: int = 0) -> WitError:
        j = min(max(self.i - back, 0), len(self.items) - 1)
        line = self.items[j][2] if self.items else 0
        return WitError(f"{self.origin}:{line}: {message}")


class _Package:
    def __init__(self, name: str):
        self.name = name
        self.interfaces: dict[str, Interface] = {}
        self.pending_uses: list[tuple[Interface, str, list[tuple[str, str]], _Tokens]] = []


def parse_text(text: str, origin: str = "<wit>", packages: dict | None = None,
               package: str | None = None) -> dict[str, Interface]:
    """Parse one WIT file's text; returns (and adds to ``packages``' interfaces) its interfaces
    by qualified name. A file without a ``package`` line belongs to ``package`` (the one its
    directory declares). ``use`` across files is resolved by :func:`parse_dir`.

    Raises:
        WitError: a syntax error or a missing package declaration.
    """
    tokens = _Tokens(text, origin)
    if tokens.peek() == "package":
        tokens.next()
        pkg_name = _qualified(tokens)
        tokens.expect(";")
    elif package:
        pkg_name = package
    else:
        raise tokens.error("no `package ns:name;` declaration in this file or its directory")
    packages = packages if packages is not None else {}
    pkg = packages.setdefault(pkg_name, _Package(pkg_name))
    found = {}
    while tokens.peek():
        word = tokens.next()
        if word == "interface":
            iface = _interface(tokens, pkg)
            found[iface.name] = iface
        elif word == "world":
            _skip_block(tokens)
        else:
            raise tokens.error(f"expected `interface` or `world`, found {word!r}", back=1)
    return found


def _qualified(tokens: _Tokens) -> str:
    ns = tokens.ident()
    tokens.expect(":")
    name = tokens.ident()
    while tokens.peek() == ":":                     # nested namespaces
        tokens.next()
        name += ":" + tokens.ident()
    if tokens.peek().startswith("@"):
        tokens.next()                                # versions are not part of core names here
    return f"{ns}:{name}"


def _skip_block(tokens: _Tokens) -> None:
    tokens.ident()
    tokens.expect("{")
    depth = 1
    while depth:
        t = tokens.next()
        depth += (t == "{") - (t == "}")


def _interface(tokens: _Tokens, pkg: _Package) -> Interface:
    short = tokens.ident()
    iface = pkg.interfaces.setdefault(short, Interface(f"{pkg.name}/{short}"))
    tokens.expect("{")
    while tokens.peek() != "}":
        doc = tokens.doc()
        word = tokens.next()
        if word == "use":
            path = tokens.next().lstrip("%")
            if tokens.peek() == ":":                 # use ns:pkg/iface.{…}
                tokens.next()
                path += ":" + tokens.ident()
                tokens.expect("/")
                path += "/" + tokens.ident()
                if tokens.peek().startswith("@"):
                    tokens.next()
            tokens.expect(".")
            tokens.expect("{")
            names = []
            while tokens.peek() != "}":
                name = tokens.ident()
                alias = name
                if tokens.peek() == "as":
                    tokens.next()
                    alias = tokens.ident()
                names.append((name, alias))
                if tokens.peek() == ",":
                    tokens.next()
            tokens.expect("}")
            tokens.expect(";")
            pkg.pending_uses.append((iface, path, names, tokens))
            for _, alias in names:
                iface.types.setdefault(alias, _Ref(alias, iface))
        elif word == "type":
            name = tokens.ident()
            tokens.expect("=")
            iface.types[name] = _type(tokens, iface)
            tokens.expect(";")
        elif word == "record":
            rec = _declare(iface, tokens.ident(), RecordT)
            for fname, ftype in _members(tokens, iface, typed=True):
                rec.fields.append((fname, ftype))
        elif word == "enum":
            en = _declare(iface, tokens.ident(), EnumT)
            en.cases.extend(name for name, _ in _members(tokens, iface, typed=False))
        elif word == "flags":
            fl = _declare(iface, tokens.ident(), FlagsT)
            fl.flags.extend(name for name, _ in _members(tokens, iface, typed=False))
        elif word == "variant":
            va = _declare(iface, tokens.ident(), VariantT)
            va.cases.extend(_members(tokens, iface, typed=False, payload=True))
        elif word == "resource":
            _resource(tokens, iface)
        elif tokens.peek() == ":":                   # name: func(…)
            tokens.expect(":")
            _function(tokens, iface, word.lstrip("%"), doc)
        else:
            raise tokens.error(f"unexpected {word!r} in interface {iface.name}", back=1)
    tokens.expect("}")
    return iface


class _Ref:
    """A type name not yet resolved (``use`` targets and forward references)."""

    def __init__(self, name: str, iface: Interface):
        self.name, self.iface = name, iface


def _declare(iface: Interface, name: str, kind):
    obj = kind(name)
    iface.types[name] = obj
    return obj


def _members(tokens: _Tokens, iface: Interface, typed: bool, payload: bool = False):
    tokens.expect("{")
    out = []
    while tokens.peek() != "}":
        name = tokens.ident()
        ty = None
        if typed:
            tokens.expect(":")
            ty = _type(tokens, iface)
        elif payload and tokens.peek() == "(":
            tokens.next()
            ty = _type(tokens, iface)
            tokens.expect(")")
        out.append((name, ty))
        if tokens.peek() == ",":
            tokens.next()
    tokens.expect("}")
    return out


def _resource(tokens: _Tokens, iface: Interface) -> None:
    name = tokens.ident()
    res = iface.types.get(name)
    if not isinstance(res, ResourceT):
        res = ResourceT(name, iface.name)
        iface.types[name] = res
    own = Handle(res, True)
    iface.functions[f"[resource-drop]{name}"] = Function(iface.name, f"[resource-drop]{name}",
                                                         [("self", own)], None)
    if tokens.peek() == ";":
        tokens.next()
        return
    tokens.expect("{")
    while tokens.peek() != "}":
        doc = tokens.doc()
        word = tokens.next()
        if word == "constructor":
            params = _params(tokens, iface)
            result = own
            if tokens.peek() == "->":                # constructor(…) -> result<R, E>
                tokens.next()
                result = _type(tokens, iface)
            tokens.expect(";")
            iface.functions[f"[constructor]{name}"] = Function(iface.name, f"[constructor]{name}",
                                                               params, result, doc)
            continue
        fname = word.lstrip("%")
        tokens.expect(":")
        static = tokens.peek() == "static"
        if static:
            tokens.next()
        prefix = f"[static]{name}." if static else f"[method]{name}."
        self_param = [] if static else [("self", Handle(res, False))]
        _function(tokens, iface, prefix + fname, doc, self_param)
    tokens.expect("}")


def _params(tokens: _Tokens, iface: Interface) -> list[tuple[str, object]]:
    tokens.expect("(")
    params = []
    while tokens.peek() != ")":
        pname = tokens.ident()
        tokens.expect(":")
        params.append((pname, _type(tokens, iface)))
        if tokens.peek() == ",":
            tokens.next()
    tokens.expect(")")
    return params


def _function(tokens: _Tokens, iface: Interface, name: str, doc: str,
              leading: list | None = None) -> None:
    tokens.expect("func")
    params = (leading or []) + _params(tokens, iface)
    result = None
    if tokens.peek() == "->":
        tokens.next()
        if tokens.peek() == "(":
            raise tokens.error("named multiple results are not supported")
        result = _type(tokens, iface)
    tokens.expect(";")
    iface.functions[name] = Function(iface.name, name, params, result, doc)


def _type(tokens: _Tokens, iface: Interface):
    word = tokens.next()
    if word == "_":
        return None
    word = word.lstrip("%")
    if word in PRIMITIVES:
        return Prim(_ALIASES.get(word, word))
    if word in ("list", "option", "borrow", "own"):
        tokens.expect("<")
        inner = _type(tokens, iface)
        tokens.expect(">")
        if word == "list":
            return ListT(inner)
        if word == "option":
            return OptionT(inner)
        return _HandleRef(inner, word == "own")
    if word == "result":
        if tokens.peek() != "<":
            return ResultT(None, None)
        tokens.next()
        ok = _type(tokens, iface)
        err = None
        if tokens.peek() == ",":
            tokens.next()
            err = _type(tokens, iface)
        tokens.expect(">")
        return ResultT(ok, err)
    if word == "tuple":
        tokens.expect("<")
        elems = []
        while tokens.peek() != ">":
            elems.append(_type(tokens, iface))
            if tokens.peek() == ",":
                tokens.next()
        tokens.expect(">")
        return TupleT(tuple(elems))
    return _Ref(word, iface)


_PACKAGE_LINE = re.compile(r"^\s*package\s+([^;\s]+)\s*;", re.MULTILINE)


class _HandleRef:
    def __init__(self, target, own: bool):
        self.target, self.own = target, own


def parse_dir(root: Path) -> dict[str, Interface]:
    """Parse every ``*.wit`` under ``root`` (its ``deps/`` included) and resolve all names.

    Returns interfaces by qualified name (``wasm:cv/mat``, ``wasmvision:platform/http``, …).

    Raises:
        WitError: a syntax error, an unknown type or interface, or a ``use`` of a missing name.
    """
    packages: dict[str, _Package] = {}
    files = sorted(Path(root).rglob("*.wit"))
    declared: dict[Path, str] = {}
    for path in files:
        m = _PACKAGE_LINE.search(path.read_text(encoding="utf-8"))
        if m:
            declared[path.parent] = m.group(1).split("@")[0]
    for path in files:
        parse_text(path.read_text(encoding="utf-8"), str(path.relative_to(root)), packages,
                   declared.get(path.parent))
    interfaces = {i.name: i for p in packages.values() for i in p.interfaces.values()}
    for pkg in packages.values():
        for iface, path, names, tokens in pkg.pending_uses:
            qualified = path if ":" in path else f"{pkg.name}/{path}"
            source = interfaces.get(qualified)
            if source is None:
                raise WitError(f"{tokens.origin}: `use {path}` names an unknown interface")
            for name, alias in names:
                if name not in source.types:
                    raise WitError(f"{tokens.origin}: `use {path}.{{{name}}}`: {qualified} has no type {name}")
                iface.types[alias] = source.types[name]
    resolving: set[int] = set()

    def resolve(ty):
        if isinstance(ty, _Ref):
            target = ty.iface.types.get(ty.name)
            if target is None:
                raise WitError(f"unknown type {ty.name!r} in {ty.iface.name}")
            if isinstance(target, _Ref):
                if id(target) in resolving:
                    raise WitError(f"type {ty.name!r} in {ty.iface.name} refers to itself")
                resolving.add(id(target))
                target = resolve(target)
                resolving.discard(id(target))
            target = resolve(target) if isinstance(target, _Ref) else target
            return Handle(target, True) if isinstance(target, ResourceT) else target
        if isinstance(ty, _HandleRef):
            res = resolve(ty.target)
            res = res.resource if isinstance(res, Handle) else res
            if not isinstance(res, ResourceT):
                raise WitError(f"own/borrow of {res!r}, which is not a resource")
            return Handle(res, ty.own)
        if isinstance(ty, ResourceT):
            return Handle(ty, True)
        if isinstance(ty, ListT):
            return ListT(resolve(ty.elem))
        if isinstance(ty, OptionT):
            return OptionT(resolve(ty.elem))
        if isinstance(ty, ResultT):
            return ResultT(resolve(ty.ok), resolve(ty.err))
        if isinstance(ty, TupleT):
            return TupleT(tuple(resolve(e) for e in ty.elems))
        return ty

    done: set[int] = set()

    def fill(ty):
        """Resolve the members of named compound types in place (once each)."""
        if id(ty) in done:
            return
        done.add(id(ty))
        if isinstance(ty, RecordT):
            ty.fields[:] = [(n, resolve(t)) for n, t in ty.fields]
        elif isinstance(ty, VariantT):
            ty.cases[:] = [(n, resolve(t) if t is not None else None) for n, t in ty.cases]

    for iface in interfaces.values():
        for name, ty in list(iface.types.items()):
            value = resolve(ty)
            value = value.resource if isinstance(value, Handle) else value    # the named resource itself
            iface.types[name] = value
            fill(value)
        for fn in iface.functions.values():
            fn.params = [(n, resolve(t)) for n, t in fn.params]
            fn.result = resolve(fn.result)
    return interfaces
