"""Check 2 for the Swift package in swift/ (SpeedQVLM), which no Swift toolchain compiles here:
every symbol the sources take from mlx-swift / mlx-swift-lm exists in the public API of the
versions swift/Package.swift pins, as listed in swift/api/*.api (devkit/swift_api.py writes
them from those repositories' sources).

What is checked, on the tree-sitter-swift parse of every .swift file but Package.swift:
- type names (annotations, inheritance, generic arguments, casts, attributes such as
  `@ModuleInfo`), `A.B` nested types, and that an API type's module is imported by the file;
- free functions and macros (`softmax`, `#huggingFaceTokenizerLoader`), module- or
  type-qualified members (`MLXFast.scaledDotProductAttention`, `MLXArray.ones`), members of
  values (`.reshaped`: the name must be a member of some type, the receiver's type is not
  inferred) and implicit members (`.none`, `.user(...)`);
- argument labels of calls whose callee is an API symbol (initialisers, functions, static
  members; for members of values, against every API overload of that name);
- `override`s of API class members (the member must exist and be `open`), and that own types
  conforming to API protocols implement each requirement without a default implementation;
- `import`s against the target dependencies in Package.swift, and the API lists' commits
  against Package.swift's pins.
Names the package declares itself are skipped; names from the Swift standard library and
Apple's SDKs are listed in swift/api/sdk-names.txt and are not checked against anything.
Each kind of finding is also provoked on snippets, to show that the check reports it.
See swift/README.md, "What CI checks".
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_swift

ROOT = Path(__file__).resolve().parents[2]
SWIFT = ROOT / "swift"
API_DIR = SWIFT / "api"
API_FILES = {"mlx-swift-lm": API_DIR / "mlx-swift-lm.api", "mlx-swift": API_DIR / "mlx-swift.api"}
SDK_FILE = API_DIR / "sdk-names.txt"
BUILD_DIRS = {".build", ".swiftpm", "DerivedData"}

PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))


def swift_files() -> list[Path]:
    return sorted(p for p in SWIFT.rglob("*.swift")
                  if not BUILD_DIRS & set(p.relative_to(SWIFT).parts))


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


@functools.lru_cache(maxsize=None)
def parse(data: bytes):
    return PARSER.parse(data)


def text(node) -> str:
    return node.text.decode("utf-8")


# ------------------------------------------------------------------ the API lists

LABEL_RE = re.compile(r"(\[)?([A-Za-z_]\w*)(\.\.\.)?:\]?")
OWNER_RE = re.compile(r"^((?:[A-Za-z_]\w*\.)*)(.+)$")
TYPE_KINDS = {"class", "struct", "enum", "protocol", "actor", "typealias", "associatedtype"}
BUILTIN_NAMES = {"self", "Self", "super", "error", "newValue", "oldValue", "_", "Any",
                 "AnyObject", "Type", "Protocol", "init"}
BUILTIN_MEMBERS = {"init", "self", "Type", "Protocol"}
# Attributes and literals of the language itself (not symbols of any module).
BUILTIN_MACROS = {"filePath", "file", "fileID", "line", "column", "function", "dsohandle",
                  "selector", "keyPath", "available", "unavailable", "warning", "error",
                  "externalMacro"}


@dataclass(frozen=True)
class Param:
    label: str  # "_" for none
    optional: bool
    variadic: bool


@dataclass
class Decl:
    module: str
    kind: str
    owner: str | None
    name: str
    params: tuple[Param, ...] | None
    flags: frozenset
    inherits: tuple[str, ...] = ()
    alias: str | None = None

    @property
    def qualname(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else self.name

    def signature(self) -> str:
        if self.params is None:
            return self.qualname
        return self.qualname + "(" + "".join(
            ("[" if p.optional else "") + p.label + ("..." if p.variadic else "") + ":"
            + ("]" if p.optional else "") for p in self.params) + ")"


def parse_params(labels: str) -> tuple[Param, ...]:
    return tuple(Param(m.group(2), bool(m.group(1)), bool(m.group(3)))
                 for m in LABEL_RE.finditer(labels))


def read_api_header(path: Path) -> dict[str, str]:
    header = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*([a-z ]+):\s*(.*)$", line)
        if m and m.group(1) not in header:
            header[m.group(1)] = m.group(2).strip()
    return header


def parse_api_line(line: str) -> Decl:
    tokens = line.split()
    module, kind, name_sig = tokens[:3]
    flags, inherits, alias = [], (), None
    rest = tokens[3:]
    while rest:
        tok = rest.pop(0)
        if tok == ":":
            inherits = tuple(rest.pop(0).split(","))
        elif tok == "=":
            alias = rest.pop(0)
        else:
            flags.append(tok)
    params = None
    if "(" in name_sig:
        name_sig, labels = name_sig.split("(", 1)
        params = parse_params("(" + labels)
    if kind in TYPE_KINDS or kind == "extension":
        owner, name = (name_sig.rsplit(".", 1) if "." in name_sig else (None, name_sig))
    else:
        m = OWNER_RE.match(name_sig)
        owner, name = (m.group(1)[:-1] or None), m.group(2)
    return Decl(module, kind, owner, name, params, frozenset(flags), inherits, alias)


class Api:
    """The public API of swift/api/*.api, indexed by owner and name."""

    def __init__(self, lines: list[str]):
        self.decls: list[Decl] = []
        self.types: dict[str, list[Decl]] = defaultdict(list)  # qualname -> type decls
        self.extensions: dict[str, set[str]] = defaultdict(set)  # type -> conformances added
        self.members: dict[str, dict[str, list[Decl]]] = defaultdict(lambda: defaultdict(list))
        self.globals: dict[str, list[Decl]] = defaultdict(list)  # top level, by name
        self.member_names: dict[str, list[Decl]] = defaultdict(list)  # any owner, by name
        self.modules: set[str] = set()
        for line in lines:
            if line.strip() and not line.startswith("#"):
                self.add(parse_api_line(line))

    def add(self, d: Decl):
        self.decls.append(d)
        self.modules.add(d.module)
        if d.kind == "extension":
            self.extensions[d.qualname].update(d.inherits)
            return
        if d.kind in TYPE_KINDS:
            self.types[d.qualname].append(d)
        if d.owner is None:
            self.globals[d.name].append(d)
        else:
            self.members[d.owner][d.name].append(d)
            self.member_names[d.name].append(d)

    # ---- types

    def find_type(self, name: str) -> str | None:
        """The qualname of a type given as written (`Linear`, `GELU.Approximation`)."""
        if name in self.types:
            return name
        return None

    def top_level_type(self, name: str, modules: set[str] | None = None) -> Decl | None:
        for d in self.globals.get(name, []):
            if d.kind in TYPE_KINDS and (modules is None or d.module in modules):
                return d
        return None

    def supertypes(self, qualname: str) -> list[str]:
        """qualname, its inherited types and conformances, transitively (aliases followed)."""
        seen: list[str] = []
        todo = [qualname]
        while todo:
            t = todo.pop(0)
            if t in seen:
                continue
            seen.append(t)
            for d in self.types.get(t, []):
                todo += list(d.inherits)
                if d.alias:
                    todo.append(d.alias)
            todo += sorted(self.extensions.get(t, ()))
        return seen

    def inits_of(self, qualname: str) -> list[Decl]:
        """The initialisers of a type: its own (and its extensions'); a class that declares
        none inherits its superclass's."""
        for t in self.supertypes(qualname):
            inits = self.members.get(t, {}).get("init", [])
            if inits:
                return inits
        return []

    def members_of(self, qualname: str) -> dict[str, list[Decl]]:
        out: dict[str, list[Decl]] = defaultdict(list)
        for t in self.supertypes(qualname):
            for name, decls in self.members.get(t, {}).items():
                out[name] += decls
        return out


@functools.lru_cache(maxsize=None)
def load_api() -> Api:
    lines = []
    for path in API_FILES.values():
        lines += path.read_text().splitlines()
    return Api(lines)


@functools.lru_cache(maxsize=None)
def load_sdk_names() -> dict[str, str]:
    """name -> framework, from swift/api/sdk-names.txt."""
    out = {}
    for line in SDK_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            framework, *names = line.split()
            for n in names:
                out[n] = framework
    return out


# ------------------------------------------------------------------ calls and label matching


def labels_match(params: tuple[Param, ...], args: list[str], trailing: int) -> bool:
    """Whether a call with these argument labels ("_" for none) and trailing closures can call
    a declaration with these parameters (Swift's order rules; defaults may be left out; a
    variadic parameter takes the unlabeled arguments after it)."""

    @functools.lru_cache(maxsize=None)
    def go(ai: int, pi: int) -> bool:
        if ai == len(args):
            rest = params[pi:]
            if trailing:
                # trailing closures fill the following parameters (leniently: any of them)
                return len([p for p in rest if not (p.optional or p.variadic)]) <= trailing
            return all(p.optional or p.variadic for p in rest)
        if pi == len(params):
            return False
        p = params[pi]
        if p.label == args[ai]:
            if p.variadic:
                j = ai + 1
                while True:
                    if go(j, pi + 1):
                        return True
                    if j < len(args) and args[j] == "_":
                        j += 1
                    else:
                        break
                return False
            if go(ai + 1, pi + 1):
                return True
        if p.optional or p.variadic:
            return go(ai, pi + 1)
        return False

    return go(0, 0)


def call_arguments(call) -> tuple[list[str], int, bool] | None:
    """(labels, trailing closures, is_subscript) of a call_expression / macro_invocation."""
    suffix = next((c for c in call.children if c.type == "call_suffix"), None)
    if suffix is None:
        return None
    labels: list[str] = []
    trailing = 0
    subscript = False
    for part in suffix.children:
        if part.type == "value_arguments":
            subscript = bool(part.children) and part.children[0].type == "["
            for arg in part.children:
                if arg.type == "value_argument":
                    name = arg.child_by_field_name("name")
                    labels.append(text(name).rstrip(":").strip() if name is not None else "_")
        elif part.type in ("lambda_literal", "annotated_lambda"):
            trailing += 1
    return labels, trailing, subscript


def format_call(name: str, labels: list[str], trailing: int) -> str:
    return f"{name}(" + "".join(f"{l}:" for l in labels) + ")" + (" {...}" * trailing)


# ------------------------------------------------------------------ our own declarations


@dataclass
class OwnType:
    qualname: str
    kind: str
    inherits: list[tuple[str, tuple[int, int]]]  # written name, position
    members: dict[str, list[tuple[tuple[str, ...] | None, set[str]]]] = field(
        default_factory=lambda: defaultdict(list))  # name -> [(labels, modifiers)]
    file: str = ""
    line: int = 0


def decl_params(decl) -> tuple[Param, ...]:
    """The parameters of a func / init declaration (as devkit/swift_api.py reads them)."""
    out = []
    kids = decl.children
    for i, c in enumerate(kids):
        if c.type != "parameter":
            continue
        names = [x for x in c.children if x.type == "simple_identifier"]
        default = False
        for j in range(i + 1, len(kids)):
            if kids[j].type in ("parameter", ")"):
                break
            if kids[j].type == "=" or decl.field_name_for_child(j) == "default_value":
                default = True
        out.append(Param(text(names[0]) if names else "_", default,
                         any(x.type == "..." for x in c.children)))
    return tuple(out)


def decl_labels(decl) -> tuple[str, ...]:
    return tuple(p.label for p in decl_params(decl))


def modifiers_of(decl) -> set[str]:
    out = set()
    for c in decl.children:
        if c.type == "modifiers":
            out |= {text(m) for m in c.children}
    return out


def type_path(user_type) -> list[str]:
    return [text(c) for c in user_type.children if c.type == "type_identifier"]


class Own:
    """What the package itself declares (every visibility), over all its files."""

    def __init__(self, trees: dict[str, object]):
        self.names: set[str] = set()
        # functions and initialisers by name (with their parameters), and every other name
        # declared (types, properties, parameters, bindings, enum cases)
        self.funcs: dict[str, list[Decl]] = defaultdict(list)
        self.values: set[str] = set()
        self.types: dict[str, OwnType] = {}
        self.type_names: set[str] = set()  # simple names of own types and generic parameters
        for name, tree in trees.items():
            self._walk(tree.root_node, owner=None, file=name)

    def _walk(self, node, owner, file):
        t = node.type
        if t in ("class_declaration", "protocol_declaration"):
            kind_node = next((c for i, c in enumerate(node.children)
                              if node.field_name_for_child(i) == "declaration_kind"), None)
            kind = kind_node.type if kind_node is not None else "protocol"
            name_node = node.child_by_field_name("name")
            if kind == "extension":
                qual = ".".join(type_path(name_node)) if name_node.type == "user_type" \
                    else text(name_node)
            else:
                qual = f"{owner}.{text(name_node)}" if owner else text(name_node)
                self._value(text(name_node))
                self.type_names.add(text(name_node))
            inherits = []
            for c in node.children:
                if c.type == "inheritance_specifier":
                    for u in c.named_children:
                        if u.type == "user_type":
                            inherits.append((".".join(type_path(u)),
                                             (u.start_point[0] + 1, u.start_point[1] + 1)))
            entry = self.types.get(qual)
            if entry is None:
                entry = self.types[qual] = OwnType(qual, kind, [], file=file,
                                                   line=node.start_point[0] + 1)
            entry.inherits += inherits
            for c in node.children:
                self._walk(c, qual, file)
            return
        if t in ("function_declaration", "protocol_function_declaration", "init_declaration",
                 "subscript_declaration"):
            name_node = node.child_by_field_name("name")
            name = {"init_declaration": "init", "subscript_declaration": "subscript"}.get(
                t, text(name_node) if name_node is not None else "?")
            self.names.add(name)
            self.funcs[name].append(Decl("swift/", "func", owner, name, decl_params(node),
                                         frozenset()))
            if owner and owner in self.types:
                self.types[owner].members[name].append((decl_labels(node), modifiers_of(node)))
        elif t in ("property_declaration", "protocol_property_declaration"):
            for c in node.children:
                if c.type == "pattern":
                    for ident in self._bindings(c):
                        self._value(ident)
                        if owner and owner in self.types:
                            self.types[owner].members[ident].append((None, modifiers_of(node)))
        elif t == "enum_entry":
            for i, c in enumerate(node.children):
                if node.field_name_for_child(i) == "name":
                    self._value(text(c))
                    if owner and owner in self.types:
                        self.types[owner].members[text(c)].append((None, set()))
        elif t in ("typealias_declaration", "associatedtype_declaration"):
            name_node = node.child_by_field_name("name")
            if name_node is not None:
                self._value(text(name_node))
                self.type_names.add(text(name_node))
        elif t == "type_parameter":
            for c in node.children:
                if c.type == "type_identifier":
                    self.type_names.add(text(c))
                    self._value(text(c))
                    break
        elif t in ("parameter", "lambda_parameter"):
            for c in node.children:
                if c.type == "simple_identifier":
                    self._value(text(c))
        elif t == "pattern":
            for ident in self._bindings(node):
                self._value(ident)
        for i, c in enumerate(node.children):
            if node.field_name_for_child(i) == "bound_identifier":
                self._value(text(c))
        for c in node.children:
            self._walk(c, owner, file)

    @staticmethod
    def _bindings(pattern) -> list[str]:
        out = []
        kids = pattern.children
        for i, c in enumerate(kids):
            if c.type == "simple_identifier" and not (i > 0 and kids[i - 1].type == "."):
                out.append(text(c))
            elif c.type == "pattern":
                out += Own._bindings(c)
        return out

    def _value(self, name: str):
        self.names.add(name)
        self.values.add(name)

    def declares(self, name: str) -> bool:
        if name in self.names:
            return True
        # property wrapper storage (`_x`) and projected value (`$x`)
        return name[:1] in "_$" and name[1:] in self.names


# ------------------------------------------------------------------ Package.swift


@dataclass
class Target:
    name: str
    path: str
    dependencies: set[str]


def package_manifest(data: bytes) -> tuple[list[Target], dict[str, str]]:
    """(targets, {package url: requirement as written}) of a Package.swift."""
    tree = parse(data)
    targets: list[Target] = []
    requirements: dict[str, str] = {}

    def args_of(call) -> list:
        suffix = next((c for c in call.children if c.type == "call_suffix"), None)
        if suffix is None:
            return []
        va = next((c for c in suffix.children if c.type == "value_arguments"), None)
        return [a for a in va.children if a.type == "value_argument"] if va else []

    def label(arg) -> str | None:
        n = arg.child_by_field_name("name")
        return text(n).rstrip(":").strip() if n is not None else None

    def value(arg):
        return arg.child_by_field_name("value")

    def callee_name(call) -> str:
        first = call.children[0]
        if first.type == "prefix_expression":
            return text(first).lstrip(".")
        return text(first)

    def strings(node) -> list[str]:
        out = []
        if node.type == "line_string_literal":
            return ["".join(text(c) for c in node.children if c.type == "line_str_text")]
        for c in node.children:
            out += strings(c)
        return out

    def walk(node):
        if node.type == "call_expression":
            name = callee_name(node)
            args = args_of(node)
            if name == "package":
                url = next((strings(value(a))[0] for a in args if label(a) == "url"), None)
                if url:
                    requirements[url] = ", ".join(text(a) for a in args if label(a) != "url")
            elif name in ("target", "executableTarget", "testTarget"):
                tname = next(strings(value(a))[0] for a in args if label(a) == "name")
                base = "Tests" if name == "testTarget" else "Sources"
                path = next((strings(value(a))[0] for a in args if label(a) == "path"),
                            f"{base}/{tname}")
                deps: set[str] = set()
                for a in args:
                    if label(a) == "dependencies":
                        for el in value(a).named_children:
                            if el.type == "line_string_literal":
                                deps.add(strings(el)[0])
                            elif el.type == "call_expression":
                                n = next((strings(value(x))[0] for x in args_of(el)
                                          if label(x) in ("name", None) and
                                          value(x).type == "line_string_literal"), None)
                                if n:
                                    deps.add(n)
                targets.append(Target(tname, path, deps))
        for c in node.children:
            walk(c)

    walk(tree.root_node)
    return targets, requirements


# mlx-swift / mlx-swift-lm library products (what an `import` of these names means)
MLX_SWIFT_MODULES = {"MLX", "MLXNN", "MLXFast", "MLXRandom", "MLXOptimizers", "MLXFFT",
                     "MLXLinalg"}
MLX_SWIFT_LM_MODULES = {"MLXLMCommon", "MLXVLM", "MLXLLM", "MLXEmbedders", "MLXRerankers",
                        "MLXHuggingFace", "MLXFoundationModels", "MLXGuidedGeneration"}
EXTERNAL_MODULES = MLX_SWIFT_MODULES | MLX_SWIFT_LM_MODULES


# ------------------------------------------------------------------ the checker

# Two places where tree-sitter-swift 0.7.x reads valid Swift as something else (without an
# ERROR node, so the syntax check is not concerned); the API check must not see symbols there.


def is_defer_statement(ident) -> bool:
    """The grammar has no `defer` statement: `defer { ... }` comes out as a call of an
    identifier `defer` with a trailing closure."""
    call = ident.parent
    if text(ident) != "defer" or call is None or call.type != "call_expression" or \
            call.children[0].id != ident.id:
        return False
    suffix = call.child_by_field_name("suffix") or next(
        (c for c in call.children if c.type == "call_suffix"), None)
    return suffix is not None and [c.type for c in suffix.named_children] == ["lambda_literal"]


def is_misparsed_async(user_type) -> bool:
    """`@Sendable () async throws -> URL` comes out as a function type whose parameters are a
    type named `async`."""
    parent = user_type.parent
    return (type_path(user_type) == ["async"] and parent is not None and
            parent.type == "function_type")



@dataclass
class Finding:
    file: str
    line: int
    column: int
    message: str

    def format(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class ApiChecker:
    """Finds uses of mlx-swift / mlx-swift-lm symbols in Swift sources that the API lacks.

    `sources` maps a file name to its source; `own_sources` (default: the same) is what counts
    as the package's own declarations."""

    def __init__(self, api: Api, sdk: dict[str, str], sources: dict[str, bytes],
                 own_sources: dict[str, bytes] | None = None):
        self.api = api
        self.sdk = sdk
        self.trees = {name: parse(data) for name, data in sources.items()}
        own_trees = {n: parse(d) for n, d in (own_sources or sources).items()}
        self.own = Own({**own_trees, **self.trees})
        self.findings: list[Finding] = []
        self.used_sdk: set[str] = set()
        self.imports: dict[str, set[str]] = {}
        self.file = ""

    # ---- helpers

    def report(self, node, message: str):
        self.findings.append(Finding(self.file, node.start_point[0] + 1,
                                     node.start_point[1] + 1, message))

    def is_sdk(self, name: str) -> bool:
        if name in self.sdk:
            self.used_sdk.add(name)
            return True
        return False

    def visible(self) -> set[str]:
        mods = set(self.imports.get(self.file, set()))
        if "MLX" in mods:  # MLXFast / MLXRandom live in MLX (their own modules re-export it)
            mods |= {"MLXFast", "MLXRandom"}
        if {"MLXFast", "MLXRandom"} & mods:
            mods.add("MLX")
        return mods

    def api_type(self, name: str) -> Decl | None:
        """An API top-level type named `name` (any module), unless the package declares it."""
        if self.own.declares(name):
            return None
        return self.api.top_level_type(name)

    def require_visible(self, node, decl: Decl, what: str):
        if decl.module not in self.visible():
            self.report(node, f"`{what}` is in {decl.module}, which this file does not import")

    def resolve_type_path(self, node, path: list[str]) -> str | None:
        """Check a written type `A.B.C`; return the API qualname when it is an API type."""
        root = path[0]
        if root in BUILTIN_NAMES or self.own.declares(root) or root in self.own.type_names:
            return None
        if root in EXTERNAL_MODULES and len(path) > 1 and self.api.top_level_type(root) is None:
            if root not in self.visible():
                self.report(node, f"module `{root}` is not imported by this file")
            decl = next((d for d in self.api.globals.get(path[1], [])
                         if d.module == root and d.kind in TYPE_KINDS), None)
            if decl is None:
                self.report(node, f"`{root}.{path[1]}` is not a type in the {root} API")
                return None
            return self.resolve_nested(node, decl.qualname, path[2:])
        decl = self.api.top_level_type(root)
        if decl is None:
            # nested types of API superclasses / protocols are in scope unqualified
            for t in self.enclosing_api_supertypes(self.type_stack):
                nested = [d for d in self.api.members.get(t, {}).get(root, [])
                          if d.kind in TYPE_KINDS]
                if nested:
                    return self.resolve_nested(node, nested[0].qualname, path[1:])
            if not self.is_sdk(root):
                self.report(node, f"unknown type `{root}` (not declared in swift/, not in "
                                  f"swift/api/*.api, not in swift/api/sdk-names.txt)")
            return None
        self.require_visible(node, decl, root)
        return self.resolve_nested(node, root, path[1:])

    def resolve_nested(self, node, qual: str, rest: list[str]) -> str | None:
        for part in rest:
            members = self.api.members_of(qual)
            nested = [d for d in members.get(part, []) if d.kind in TYPE_KINDS]
            if not nested:
                self.report(node, f"`{qual}` has no nested type `{part}` in the API")
                return None
            qual = nested[0].qualname
        return qual

    def expression_type(self, node) -> tuple[str, str] | None:
        """('type', qualname) / ('module', name) when an expression names an API type or a
        module, ('super', '') for super, else None."""
        if node.type == "simple_identifier":
            name = text(node)
            d = self.api_type(name)
            if d is not None:
                return ("type", d.qualname)  # MLXFast and MLXRandom: enums in MLX
            if name in EXTERNAL_MODULES and not self.own.declares(name):
                return ("module", name)
            return None
        if node.type == "user_type":
            path = type_path(node)
            if path and path[0] in EXTERNAL_MODULES and self.api_type(path[0]) is None:
                return None  # checked as a type use
            d = self.api_type(path[0]) if path else None
            if d is None:
                return None
            qual = d.qualname
            for part in path[1:]:
                nested = [x for x in self.api.members_of(qual).get(part, [])
                          if x.kind in TYPE_KINDS]
                if not nested:
                    return None
                qual = nested[0].qualname
            return ("type", qual)
        if node.type == "super_expression":
            return ("super", "")
        if node.type == "navigation_expression":
            target = node.child_by_field_name("target")
            name = self.suffix_name(node)
            base = self.expression_type(target) if target is not None else None
            if base and base[0] == "type" and name:
                nested = [x for x in self.api.members_of(base[1]).get(name, [])
                          if x.kind in TYPE_KINDS]
                if nested:
                    return ("type", nested[0].qualname)
            if base and base[0] == "module" and name:
                d = self.api.top_level_type(name)
                if d is not None:
                    return ("type", d.qualname)
        return None

    @staticmethod
    def suffix_name(nav) -> str | None:
        suffix = nav.child_by_field_name("suffix")
        if suffix is None:
            return None
        ident = suffix.child_by_field_name("suffix")
        if ident is None or ident.type != "simple_identifier":
            return None
        return text(ident)

    def enclosing_api_supertypes(self, stack: list[str]) -> list[str]:
        """API types whose members are in scope through implicit `self` in the own types."""
        out = []
        for qual in stack:
            out += self.api_supertypes_of_own(qual)
        return out

    def api_supertypes_of_own(self, qual: str, seen=None) -> list[str]:
        seen = seen or set()
        if qual in seen:
            return []
        seen.add(qual)
        out = []
        own = self.own.types.get(qual)
        if own is None:
            if self.api.find_type(qual):
                return self.api.supertypes(qual)
            return []
        for written, _pos in own.inherits:
            if written in self.own.types:
                out += self.api_supertypes_of_own(written, seen)
            else:
                d = self.api_type(written.split(".")[0])
                if d is not None:
                    out += self.api.supertypes(d.qualname)
        # extensions of the same own type were merged into it by Own
        return out

    # ---- checks

    def check_labels(self, node, what: str, candidates: list[Decl], labels, trailing):
        callable_ = [d for d in candidates if d.params is not None]
        if not callable_:
            return
        for d in callable_:
            params = tuple(p for p in d.params if p.label != "wrappedValue") \
                if d.kind == "init" and "attribute" in what else d.params
            if labels_match(params, labels, trailing):
                return
        options = "; ".join(sorted({d.signature() for d in callable_}))[:400]
        self.report(node, f"no {what} takes {format_call(what.split()[-1], labels, trailing)}"
                          f" -- the API has: {options}")

    def check_member(self, node, name: str, target) -> list[Decl] | None:
        """Check `target.name`; return the API declarations it can be (None: not an API use)."""
        kind = self.expression_type(target) if target is not None else None
        if kind and kind[0] == "type":
            members = self.api.members_of(kind[1])
            if name == "init":
                return self.api.inits_of(kind[1])
            found = members.get(name, [])
            if not found and not self.own.declares(name):  # not in an extension of ours
                self.report(node, f"`{kind[1]}` has no member `{name}` in the API")
                return None
            return found
        if kind and kind[0] == "module":
            found = [d for d in self.api.globals.get(name, []) if d.module == kind[1] or
                     (kind[1] in ("MLXFast", "MLXRandom") and d.module == "MLX")]
            if not found:
                self.report(node, f"`{kind[1]}.{name}` is not in the {kind[1]} API")
                return None
            return found
        if kind and kind[0] == "super":
            found = []
            for t in self.enclosing_api_supertypes(self.type_stack[-1:]):
                found += self.api.members.get(t, {}).get(name, [])
            if self.own.declares(name):
                return None
            if not found:
                self.report(node, f"`super.{name}`: no superclass in the API has `{name}`")
                return None
            return found
        return self.check_free_member(node, name)

    def check_free_member(self, node, name: str) -> list[Decl] | None:
        """`.name` on a value of unknown type: the name must exist somewhere."""
        if name in BUILTIN_MEMBERS or name.isdigit():
            return None
        if self.own.declares(name) or self.is_sdk(name):
            return None
        found = self.api.member_names.get(name, [])
        if not found:
            self.report(node, f"unknown member `.{name}` (no type in swift/, swift/api/*.api "
                              f"or swift/api/sdk-names.txt has it)")
            return None
        return found

    def check_bare(self, node, name: str):
        if (name in BUILTIN_NAMES or re.fullmatch(r"\$\d+", name) or self.own.declares(name)
                or self.is_sdk(name)):
            return
        globals_ = self.api.globals.get(name, [])
        if globals_:
            if not any(d.module in self.visible() for d in globals_):
                mods = sorted({d.module for d in globals_})
                self.report(node, f"`{name}` is in {', '.join(mods)}, which this file does not "
                                  f"import")
            return
        for t in self.enclosing_api_supertypes(self.type_stack):
            if name in self.api.members.get(t, {}):
                return
        self.report(node, f"unknown identifier `{name}` (not declared in swift/, not in "
                          f"swift/api/*.api, not in swift/api/sdk-names.txt)")

    def call_candidates(self, callee) -> tuple[str, list[Decl]] | None:
        """(description, declarations) a call's callee can be, when it is an API symbol."""
        if callee.type == "simple_identifier":
            name = text(callee)
            if name in self.own.values or name in BUILTIN_NAMES:
                return None
            d = self.api_type(name)
            if d is not None:
                return (f"init of {d.qualname}", self.api.inits_of(d.qualname))
            found = [x for x in self.api.globals.get(name, []) if x.kind in ("func", "macro")]
            for t in self.enclosing_api_supertypes(self.type_stack):
                found += self.api.members.get(t, {}).get(name, [])
            return self.with_own_funcs(f"function {name}", name, found)
        if callee.type == "user_type":
            kind = self.expression_type(callee)
            if kind and kind[0] == "type":
                return (f"init of {kind[1]}", self.api.inits_of(kind[1]))
            return None
        if callee.type == "navigation_expression":
            target = callee.child_by_field_name("target")
            name = self.suffix_name(callee)
            if name is None:
                return None
            kind = self.expression_type(target) if target is not None else None
            if kind and kind[0] == "type":
                members = self.api.members_of(kind[1])
                found = members.get(name, [])
                nested = [d for d in found if d.kind in TYPE_KINDS]
                if nested:
                    return (f"init of {nested[0].qualname}",
                            self.api.inits_of(nested[0].qualname))
                return (f"{kind[1]}.{name}", found)
            if kind and kind[0] == "module":
                return (f"function {kind[1]}.{name}",
                        [d for d in self.api.globals.get(name, []) if d.kind == "func"])
            if kind and kind[0] == "super":
                found = []
                for t in self.enclosing_api_supertypes(self.type_stack[-1:]):
                    found += self.api.members.get(t, {}).get(name, [])
                return (f"super.{name}", found)
            return self.with_own_funcs(f"member {name}", name,
                                       self.api.member_names.get(name, []))
        if callee.type == "prefix_expression":
            target = callee.child_by_field_name("target")
            if target is None or target.type != "simple_identifier":
                return None
            name = text(target)
            return self.with_own_funcs(f"member {name}", name,
                                       self.api.member_names.get(name, []))
        return None

    def with_own_funcs(self, what: str, name: str, api_found: list[Decl]):
        """The API's declarations named `name` and the package's own functions of that name
        (the receiver's type is not known). None -- no label check -- for a name of the SDK
        list, of a value the package declares (a stored closure, a local, a type, a case), or
        that only the package declares."""
        if (name in BUILTIN_MEMBERS or name in BUILTIN_NAMES or name in self.own.values
                or name in self.sdk or not api_found):
            return None
        return (what, api_found + self.own.funcs.get(name, []))

    @staticmethod
    def trailing_closures_after_try(call) -> int:
        """tree-sitter-swift parses `try f(x) { ... }` as a call of `try f(x)` with the
        closure: give the closure back to f."""
        child, parent = call, call.parent
        while parent is not None and parent.type in ("try_expression", "await_expression"):
            child, parent = parent, parent.parent
        if child is call or parent is None or parent.type != "call_expression" or \
                parent.children[0].id != child.id:
            return 0
        args = call_arguments(parent)
        if args is None or args[0]:
            return 0
        return args[1]

    def check_call(self, node):
        args = call_arguments(node)
        if args is None:
            return
        labels, trailing, subscript = args
        if subscript:
            return
        trailing += self.trailing_closures_after_try(node)
        callee = node.children[0]
        found = self.call_candidates(callee)
        if found is None:
            return
        what, candidates = found
        self.check_labels(node, what, candidates, labels, trailing)

    def check_attribute(self, node):
        user_type = next((c for c in node.children if c.type == "user_type"), None)
        if user_type is None:
            return
        path = type_path(user_type)
        name = path[0]
        if name in BUILTIN_MACROS or self.own.declares(name):
            return
        decl = self.api.top_level_type(name)
        if decl is None:
            if not self.is_sdk(name):
                self.report(user_type, f"unknown attribute `@{name}`")
            return
        self.require_visible(user_type, decl, name)
        labels = []
        kids = node.children
        for i, c in enumerate(kids):
            if c.type == "simple_identifier" and i + 1 < len(kids) and kids[i + 1].type == ":":
                labels.append(text(c))
        if any(c.type == "(" for c in kids):
            self.check_labels(node, f"attribute init of {decl.qualname}",
                              self.api.inits_of(decl.qualname), labels, 0)

    def check_macro(self, node):
        name_node = next((c for c in node.children if c.type == "simple_identifier"), None)
        if name_node is None:
            return
        name = text(name_node)
        if name in BUILTIN_MACROS or self.own.declares(name):
            return
        macros = [d for d in self.api.globals.get(name, []) if d.kind == "macro"]
        if not macros:
            if not self.is_sdk(name):
                self.report(node, f"unknown macro `#{name}`")
            return
        if not any(d.module in self.visible() for d in macros):
            self.report(node, f"`#{name}` is in {macros[0].module}, which this file does not "
                              f"import")
        args = call_arguments(node)
        if args is not None:
            self.check_labels(node, f"macro #{name}", macros, args[0], args[1])

    # ---- the walk

    BARE_PARENT_SKIP = {"navigation_suffix", "value_argument_label", "parameter",
                        "lambda_parameter", "enum_entry", "type_parameter", "identifier",
                        "attribute", "macro_invocation", "statement_label", "tuple_type_item",
                        "macro_declaration", "import_declaration", "operator_declaration",
                        "precedence_group_declaration", "precedence_group_attribute",
                        "capture_list_item"}

    def visit(self, node):
        t = node.type
        if t in ("class_declaration", "protocol_declaration"):
            kind_node = next((c for i, c in enumerate(node.children)
                              if node.field_name_for_child(i) == "declaration_kind"), None)
            name_node = node.child_by_field_name("name")
            if kind_node is not None and kind_node.type == "extension":
                qual = ".".join(type_path(name_node)) if name_node.type == "user_type" \
                    else text(name_node)
            else:
                qual = (f"{self.type_stack[-1]}.{text(name_node)}" if self.type_stack
                        and self.type_stack[-1] in self.own.types else text(name_node))
            self.type_stack.append(qual)
            for c in node.children:
                self.visit(c)
            self.type_stack.pop()
            return
        if t == "import_declaration":
            return
        if t == "user_type":
            path = type_path(node)
            if is_misparsed_async(node):
                return
            if path:
                self.resolve_type_path(node, path)
            for c in node.children:
                if c.type == "type_arguments":
                    self.visit(c)
            return
        if t == "attribute":
            self.check_attribute(node)
            for c in node.children:
                if c.type not in ("user_type", "simple_identifier"):
                    self.visit(c)
            return
        if t == "macro_invocation":
            self.check_macro(node)
        if t == "call_expression":
            self.check_call(node)
        if t == "navigation_expression":
            target = node.child_by_field_name("target")
            name = self.suffix_name(node)
            if name is not None:
                suffix = node.child_by_field_name("suffix")
                self.check_member(suffix, name, target)
        if t == "prefix_expression":
            op = node.child_by_field_name("operation")
            target = node.child_by_field_name("target")
            if op is not None and op.type == "." and target is not None:
                if target.type == "simple_identifier":
                    self.check_free_member(target, text(target))
                return
        if t == "function_declaration" and "override" in modifiers_of(node):
            self.check_override(node)
        if t == "simple_identifier":
            self.visit_identifier(node)
            return
        for c in node.children:
            self.visit(c)

    def visit_identifier(self, node):
        parent = node.parent
        if parent is None or parent.type in self.BARE_PARENT_SKIP:
            return
        if is_defer_statement(node):
            return
        prev = node.prev_sibling
        if prev is not None and prev.type == ".":
            self.check_free_member(node, text(node))  # `case .chunk(...)` patterns
            return
        if parent.type == "pattern":
            return  # a binding
        idx = next(i for i, c in enumerate(parent.children) if c.id == node.id)
        field_name = parent.field_name_for_child(idx)
        if field_name in ("name", "bound_identifier", "external_name"):
            return
        if parent.type == "navigation_expression" and field_name == "target":
            kind = self.expression_type(node)
            if kind is not None:  # a type or a module (its member is checked with the member)
                if kind[0] == "type":
                    self.require_visible(node, self.api.top_level_type(text(node)), text(node))
                elif kind[0] == "module" and text(node) not in self.visible():
                    self.report(node, f"module `{text(node)}` is not imported by this file")
                return
        if parent.type == "call_expression" and idx == 0:
            d = self.api_type(text(node))
            if d is not None:
                self.require_visible(node, d, text(node))
                return
        name = text(node)
        if name in EXTERNAL_MODULES and not self.own.declares(name):
            return
        d = self.api_type(name)
        if d is not None:
            self.require_visible(node, d, name)
            return
        self.check_bare(node, name)

    def check_override(self, node):
        """`override func f(a:b:)` in a subclass of an API class: the API class (or one of its
        superclasses) must have an `open` f(a:b:)."""
        name_node = node.child_by_field_name("name")
        if name_node is None or not self.type_stack:
            return
        name, labels = text(name_node), decl_labels(node)
        own = self.own.types.get(self.type_stack[-1])
        if own is None or not own.inherits:
            return
        superclass = own.inherits[0][0]
        if superclass in self.own.types or self.api_type(superclass.split(".")[0]) is None:
            return
        candidates = []
        for t in self.api.supertypes(self.api_type(superclass.split(".")[0]).qualname):
            for d in self.api.members.get(t, {}).get(name, []):
                if d.params is not None and tuple(p.label for p in d.params) == labels:
                    candidates.append(d)
        sig = f"{name}(" + "".join(f"{l}:" for l in labels) + ")"
        if not candidates:
            self.report(name_node, f"`override func {sig}`: no superclass in the API "
                                   f"({superclass}) has {sig}")
        elif not any("open" in d.flags for d in candidates):
            self.report(name_node, f"`override func {sig}`: {candidates[0].qualname} is not "
                                   f"`open`, so it cannot be overridden outside its module")

    def check_conformances(self):
        """Own types conforming to API protocols implement each requirement that has no
        default implementation (requirements and defaults matched by name and labels)."""
        for qual, own in sorted(self.own.types.items()):
            if own.kind == "protocol" or (own.kind == "extension" and
                                          qual not in self.own.type_names):
                continue
            if own.file not in self.trees:
                continue
            self.file = own.file
            api_supers = list(dict.fromkeys(self.api_supertypes_of_own(qual)))
            if not api_supers:
                continue
            available: dict[str, set] = defaultdict(set)
            chain = [qual] + [w for w, _ in own.inherits if w in self.own.types]
            for q in chain:
                for name, entries in self.own.types[q].members.items():
                    for labels, _mods in entries:
                        available[name].add(labels)
            for t in api_supers:
                for name, decls in self.api.members.get(t, {}).items():
                    for d in decls:
                        if "req" not in d.flags:
                            available[name].add(tuple(p.label for p in d.params)
                                                if d.params is not None else None)
            for t in api_supers:
                protocol = any(d.kind == "protocol" for d in self.api.types.get(t, []))
                if not protocol:
                    continue
                for name, decls in self.api.members.get(t, {}).items():
                    for d in decls:
                        if "req" not in d.flags or d.kind in TYPE_KINDS:
                            continue
                        labels = tuple(p.label for p in d.params) if d.params is not None \
                            else None
                        if labels in available.get(name, set()) or (
                                labels is None and name in available):
                            continue
                        self.findings.append(Finding(
                            own.file, own.line, 1,
                            f"`{qual}` conforms to {t} but implements no `{d.signature()}` "
                            f"(a requirement without a default implementation in the API)"))

    def run(self) -> list[Finding]:
        for name, tree in self.trees.items():
            self.imports[name] = {
                text(c) for imp in tree.root_node.children if imp.type == "import_declaration"
                for c in imp.children if c.type == "identifier"}
        for name, tree in self.trees.items():
            self.file = name
            self.type_stack: list[str] = []
            self.visit(tree.root_node)
        self.type_stack = []
        self.check_conformances()
        return self.findings


def check_imports(targets: list[Target], files: dict[str, bytes], api: Api) -> list[Finding]:
    """Each file under a target's folder imports mlx-swift(-lm) modules and local targets only
    when the target depends on them, and the API lists cover every such module."""
    out = []
    local = {t.name for t in targets}
    for name, data in files.items():
        path = name[len("swift/"):] if name.startswith("swift/") else name
        target = next((t for t in targets if path.startswith(t.path.rstrip("/") + "/")), None)
        for imp in parse(data).root_node.children:
            if imp.type != "import_declaration":
                continue
            ident = next(c for c in imp.children if c.type == "identifier")
            module = text(ident)
            line = imp.start_point[0] + 1
            if module in EXTERNAL_MODULES and module not in api.modules and \
                    module not in ("MLXFast", "MLXRandom"):
                out.append(Finding(name, line, 1, f"`import {module}`: swift/api/*.api has no "
                                                  f"{module} (regenerate with devkit/swift_api.py)"))
            if target is None:
                continue
            if (module in EXTERNAL_MODULES or module in local) and \
                    module not in target.dependencies and module != target.name:
                out.append(Finding(name, line, 1,
                                   f"`import {module}` but target {target.name} does not depend on "
                                   f"{module} in Package.swift"))
    return out


# ------------------------------------------------------------------ the tests


def package_sources() -> dict[str, bytes]:
    return {rel(p): p.read_bytes() for p in swift_files()
            if p.name != "Package.swift"}


@functools.lru_cache(maxsize=None)
def checker_findings() -> tuple[list[Finding], set[str]]:
    checker = ApiChecker(load_api(), load_sdk_names(), package_sources())
    findings = checker.run()
    return findings, checker.used_sdk


def pinned_requirement(url_part: str) -> str:
    _, requirements = package_manifest((SWIFT / "Package.swift").read_bytes())
    return next(req for url, req in requirements.items()
                if url.rstrip("/").removesuffix(".git").endswith(url_part))


def test_api_lists_are_from_the_pinned_versions():
    """swift/api/mlx-swift-lm.api was read at the commit Package.swift pins, and
    mlx-swift.api at a version inside Package.swift's range for mlx-swift."""
    lm = read_api_header(API_FILES["mlx-swift-lm"])
    assert lm["repo"] == "https://github.com/ml-explore/mlx-swift-lm"
    req = pinned_requirement("ml-explore/mlx-swift-lm")
    m = re.fullmatch(r'revision:\s*"([0-9a-f]{40})"', req)
    assert m, f"Package.swift pins mlx-swift-lm with `{req}`; the API check expects a revision"
    assert lm["commit"] == m.group(1), (
        f"Package.swift pins mlx-swift-lm {m.group(1)} but swift/api/mlx-swift-lm.api was read "
        f"at {lm['commit']}: regenerate it with devkit/swift_api.py")

    mlx = read_api_header(API_FILES["mlx-swift"])
    assert mlx["repo"] == "https://github.com/ml-explore/mlx-swift"
    req = pinned_requirement("ml-explore/mlx-swift")
    m = re.fullmatch(r'\.upToNextMinor\(from:\s*"(\d+)\.(\d+)\.(\d+)"\)', req)
    assert m, f"Package.swift's mlx-swift requirement `{req}` is not handled here"
    version = tuple(int(x) for x in mlx["describe"].split(".")) \
        if re.fullmatch(r"\d+\.\d+\.\d+", mlx["describe"]) else None
    lower = tuple(int(x) for x in m.groups())
    assert version is not None and version[:2] == lower[:2] and version >= lower, (
        f"swift/api/mlx-swift.api was read at {mlx['describe']}, outside `{req}`")


def test_api_lists_have_their_modules():
    api = load_api()
    assert {"MLX", "MLXNN", "MLXLMCommon", "MLXVLM", "MLXHuggingFace"} <= api.modules
    for name in ["MLXArray", "Linear", "Module", "VLMModel", "LMInput", "UserInputProcessor"]:
        assert api.top_level_type(name) is not None, name


def test_swift_sources_use_only_the_pinned_api():
    findings, _ = checker_findings()
    assert not findings, (
        f"{len(findings)} use(s) of symbols that are not in the pinned mlx-swift / mlx-swift-lm "
        f"API (swift/api/*.api) nor declared in swift/ nor listed in swift/api/sdk-names.txt:\n"
        + "\n".join(f.format() for f in findings)
        + "\n(a name from the Swift standard library or an Apple SDK goes in "
          "swift/api/sdk-names.txt; newer mlx-swift-lm API needs a new pin in Package.swift and "
          "the lists regenerated with devkit/swift_api.py, see swift/README.md)")


def test_imports_match_package_targets():
    targets, _ = package_manifest((SWIFT / "Package.swift").read_bytes())
    assert {t.name for t in targets} >= {"SpeedQVLM", "SpeedQVLMTests"}
    findings = check_imports(targets, package_sources(), load_api())
    assert not findings, "\n".join(f.format() for f in findings)


def test_sdk_names_are_all_used_and_not_mlx_symbols():
    """sdk-names.txt stays the list of what the sources really take from outside MLX: no stale
    names, and no mlx-swift(-lm) type (listing one would hide its uses from the check)."""
    _, used = checker_findings()
    sdk = load_sdk_names()
    assert not set(sdk) - used, f"unused names in {rel(SDK_FILE)}: {sorted(set(sdk) - used)}"
    api = load_api()
    shadowing = sorted(n for n in sdk if api.top_level_type(n) is not None)
    assert not shadowing, f"{rel(SDK_FILE)} lists MLX API types: {shadowing}"


# ---- the API check reports what it should (on snippets checked with the package's own
# declarations in scope, as a new file of the package would be)

GOOD_SNIPPET = """
import MLX
import MLXLMCommon
import MLXNN

final class Probe: Module, UnaryLayer {
    @ModuleInfo(key: "proj") var proj: Linear
    let norm = RMSNorm(dimensions: 8, eps: 1e-5)

    // two shapes tree-sitter-swift 0.7.4 misreads without an error (see is_defer_statement)
    var onDone: (@Sendable () async throws -> Int)?

    init(_ dims: Int) {
        defer { precondition(dims > 0) }
        self._proj.wrappedValue = Linear(dims, dims, bias: false)
    }

    func callAsFunction(_ x: MLXArray) -> MLXArray {
        let y = MLXFast.scaledDotProductAttention(
            queries: x, keys: x, values: x, scale: 1.0, mask: .none)
        return proj(norm(y)).reshaped(2, -1).transposed(1, 0) + softmax(x, axis: -1)
    }
}
"""

BAD_SNIPPETS = {
    # name: (a line replacing `return ...` in GOOD_SNIPPET's callAsFunction, expected message)
    "invented-free-function": ("return softmaxx(x, axis: -1)", "unknown identifier `softmaxx`"),
    "invented-member": ("return x.reshapedd(2, -1)", "unknown member `.reshapedd`"),
    "invented-mlxfast": ("return MLXFast.scaledDotProductAttentionFast(x)",
                         "`MLXFast` has no member `scaledDotProductAttentionFast`"),
    "invented-type": ("return MLXArrayy(x)", "unknown identifier `MLXArrayy`"),
    "wrong-init-label": ("return Linear(4, 4, biased: true)(x)",
                         "no init of Linear takes Linear(_:_:biased:)"),
    "wrong-function-label": ("return softmax(x, axiss: -1)", "no function softmax takes"),
    "wrong-member-label": ("return x.expandedDimensions(dim: 0)",
                           "no member expandedDimensions takes"),
    "wrong-static-label": ("return MLXArray.ones(shape: [2])", "no MLXArray.ones takes"),
    "invented-case": ("return GELU(approximation: .exact)(x)", "unknown member `.exact`"),
    "missing-import": ("return VLMTypeRegistry.shared.hash == 0 ? x : x",
                       "`VLMTypeRegistry` is in MLXVLM, which this file does not import"),
}


def run_snippet(source: str) -> list[Finding]:
    checker = ApiChecker(load_api(), load_sdk_names(), {"Probe.swift": source.encode()},
                         own_sources=package_sources())
    return checker.run()


def test_api_check_passes_a_correct_snippet():
    findings = run_snippet(GOOD_SNIPPET)
    assert not findings, "\n".join(f.format() for f in findings)


@pytest.mark.parametrize("name", sorted(BAD_SNIPPETS))
def test_api_check_reports_invented_symbols(name):
    line, expected = BAD_SNIPPETS[name]
    source = re.sub(r"return proj\(norm\(y\)\).*", line, GOOD_SNIPPET)
    assert source != GOOD_SNIPPET
    findings = run_snippet(source)
    messages = [f.format() for f in findings]
    assert any(expected in m for m in messages), f"{name}: {messages}"
    assert all(m.startswith("Probe.swift:") for m in messages)


def test_api_check_reports_a_bad_override_and_a_missing_requirement():
    source = """
import MLX
import MLXLMCommon
import MLXNN

final class Bad: Module {
    override func update(modules: ModuleChildren, verify: VerifyUpdate, paths: [String]) throws -> Self {
        self
    }
}

struct BadProcessor: UserInputProcessor {
    func prepare(inputs: UserInput) async throws -> LMInput { fatalError() }
}
"""
    messages = [f.format() for f in run_snippet(source)]
    assert any("override func update(modules:verify:paths:)" in m for m in messages), messages
    assert any("`BadProcessor` conforms to UserInputProcessor but implements no "
               "`UserInputProcessor.prepare(input:)`" in m for m in messages), messages


def test_import_check_reports_an_undeclared_dependency():
    targets = [Target("SpeedQVLM", "Sources/SpeedQVLM", {"MLX", "MLXNN"})]
    files = {"swift/Sources/SpeedQVLM/X.swift": b"import MLX\nimport MLXLLM\nimport MLXVLM\n"}
    messages = [f.format() for f in check_imports(targets, files, load_api())]
    assert any("X.swift:2:1: `import MLXLLM` but target SpeedQVLM does not depend" in m
               for m in messages), messages
    assert any("swift/api/*.api has no MLXLLM" in m for m in messages), messages
    assert any("X.swift:3:1: `import MLXVLM` but target" in m for m in messages), messages


@pytest.mark.parametrize("params, args, trailing, ok", [
    ("(_:_:[bias:])", ["_", "_"], 0, True),
    ("(_:_:[bias:])", ["_", "_", "bias"], 0, True),
    ("(_:_:[bias:])", ["_", "bias"], 0, False),
    ("(_...:[stream:])", ["_", "_", "_"], 0, True),
    ("(_...:[stream:])", [], 0, True),
    ("(total:body:)", ["total"], 1, True),
    ("(total:body:)", ["total"], 0, False),
    ("(dimensions:[eps:])", ["eps", "dimensions"], 0, False),
])
def test_label_matching(params, args, trailing, ok):
    assert labels_match(parse_params(params), args, trailing) is ok


# ---- devkit/swift_api.py writes what this test reads (on a made-up checkout, no git)

UPSTREAM_SNIPPET = """
import MLX

open class Layer: Module, UnaryLayer {
    public let weight: MLXArray
    let hidden: Int
    public init(_ inputs: Int, _ outputs: Int, bias: Bool = true) { fatalError() }
    open func callAsFunction(_ x: MLXArray) -> MLXArray { x }
    public func reshaped(_ shape: Int..., stream: StreamOrDevice = .default) -> MLXArray { x }
    public static func make() -> Layer { fatalError() }
    private func secret() {}
    public enum Kind: Sendable { case plain, scaled(factor: Float) }
}

public protocol Thing: Sendable {
    func run(input: Int) -> Int
    var size: Int { get }
}

extension Thing {
    public func run(input: Int) -> Int { input }
}

public extension MLXArray {
    func doubled() -> MLXArray { self }
}

#if os(Linux)
public struct LinuxOnly {}
#endif

internal func hiddenHelper() {}
public func helper(_ a: MLXArray, axis: Int) -> MLXArray { a }
public macro tokenizerLoader() -> Int = #externalMacro(module: "M", type: "T")
"""


def load_devkit():
    """devkit/swift_api.py, loaded from its path (whatever sys.path and import mode are)."""
    import importlib.util
    import sys

    name = "speedq_devkit_swift_api"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "devkit" / "swift_api.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_devkit_writes_the_list_format(tmp_path):
    devkit = load_devkit()
    checkout = tmp_path / "mlx-swift-lm"
    (checkout / "Libraries" / "MLXLMCommon").mkdir(parents=True)
    (checkout / "Libraries" / "MLXLMCommon" / "Upstream.swift").write_text(UPSTREAM_SNIPPET)
    out = tmp_path / "api"
    assert devkit.main(["--mlx-swift-lm", str(checkout), "--lm-modules", "MLXLMCommon",
                        "--out", str(out)]) == 0
    written = (out / "mlx-swift-lm.api").read_text()
    header = read_api_header(out / "mlx-swift-lm.api")
    assert header["repo"] == "https://github.com/ml-explore/mlx-swift-lm"
    assert header["modules"] == "MLXLMCommon"
    body = {line for line in written.splitlines() if not line.startswith("#")}
    assert body == {
        "MLXLMCommon class Layer open : Module,UnaryLayer",
        "MLXLMCommon var Layer.weight",
        "MLXLMCommon init Layer.init(_:_:[bias:])",
        "MLXLMCommon func Layer.callAsFunction(_:) open",
        "MLXLMCommon func Layer.reshaped(_...:[stream:])",
        "MLXLMCommon func Layer.make() static",
        "MLXLMCommon enum Layer.Kind : Sendable",
        "MLXLMCommon case Layer.Kind.plain",
        "MLXLMCommon case Layer.Kind.scaled(factor:)",
        "MLXLMCommon protocol Thing : Sendable",
        "MLXLMCommon func Thing.run(input:) req",
        "MLXLMCommon var Thing.size req",
        "MLXLMCommon func Thing.run(input:) ext",
        "MLXLMCommon func MLXArray.doubled() ext",
        "MLXLMCommon func helper(_:axis:)",
        "MLXLMCommon macro tokenizerLoader()",
    }, written

    # ... and the checker reads it back
    api = Api(written.splitlines())
    assert [d.signature() for d in api.inits_of("Layer")] == ["Layer.init(_:_:[bias:])"]
    assert labels_match(api.members["Layer"]["reshaped"][0].params, ["_", "_", "stream"], 0)
    assert api.top_level_type("LinuxOnly") is None  # #if os(Linux): not built for macOS / iOS
