#!/usr/bin/env python3
"""Regenerate swift/api/*.api: the public API names of mlx-swift-lm and mlx-swift.

tests/swift/test_swift_api.py checks every mlx-swift / mlx-swift-lm symbol the Swift package
in swift/ uses against these lists (no Swift toolchain runs in this repository's CI). The lists
hold names only -- types, their public members with parameter labels, free functions, macros --
never code.

    python devkit/swift_api.py \\
        --mlx-swift-lm /path/to/mlx-swift-lm.git --commit 14414441fa44f45eee35a61e9fa0bab577cf9734 \\
        --mlx-swift /path/to/mlx-swift.git --mlx-swift-commit 0.31.6 \\
        [--lm-note TEXT] [--mlx-note TEXT] [--out swift/api]

Each of --mlx-swift-lm / --mlx-swift is a git directory (bare or not) or a checkout; with a
commit (sha or tag) the files are read from git at that commit, without one from the checkout's
work tree (the header says which, and whether it had uncommitted changes). Pass the revision
swift/Package.swift pins for mlx-swift-lm, and for mlx-swift the version that Package.swift's
range and mlx-swift-lm's resolve to; tests/swift/test_swift_api.py checks both against
Package.swift. Only the modules of the products Package.swift uses are read (--lm-modules,
--mlx-modules), and only `#if` branches that can build for macOS or iOS.

Line format (one symbol a line, sorted; see the header of the files written):

    MODULE KIND NAME[(LABELS)] [FLAGS...] [: INHERITED,...] [= ALIAS_TARGET]

KIND: class struct enum protocol actor typealias associatedtype extension case init func var
subscript macro. NAME is Owner.member for members (Owner may be a type of another module or of
the SDK that the module extends, e.g. CIImage). LABELS are Swift's argument labels, `_` for
none, each followed by `:`; `[label:]` has a default value, `label...:` is variadic.
FLAGS: open (may be subclassed / overridden from another module), static, req (a protocol
requirement), ext (declared in an extension).

Upstream files that tree-sitter-swift cannot parse cleanly are parsed again after rewrites
that only touch function bodies and conditional compilation (see `_REWRITES`); the header lists
every file that still has parse errors, and a plain-text scan for `public` declarations the
tree walk did not see is printed as a warning.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tree_sitter
import tree_sitter_swift

REPO_URLS = {
    "mlx-swift-lm": "https://github.com/ml-explore/mlx-swift-lm",
    "mlx-swift": "https://github.com/ml-explore/mlx-swift",
}
# the products swift/Package.swift depends on
DEFAULT_MODULES = {
    "mlx-swift-lm": ["MLXLMCommon", "MLXVLM", "MLXHuggingFace"],
    "mlx-swift": ["MLX", "MLXNN"],
}
SOURCE_ROOTS = ("Libraries", "Sources", "Source")

_PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))

# tree-sitter-swift 0.7.4 reports errors in some valid Swift that upstream sources have: `#if`
# between the cases of a switch, `sending` in a closure's result type, `()` as an argument,
# `*` starting a continuation line, `final` as a variable name, `canImport(M, _version: N)`.
# The first two can hide declarations (an `#if` in a switch turns MLXArray.swift into one
# ERROR), so these rewrites are tried in order and kept when they reduce the errors; the others
# only ever stay inside function bodies, and the header lists where.
_REWRITES = [
    ("`#if` lines blanked (every branch left after the macOS / iOS filter kept)",
     re.compile(r"^[ \t]*#(?:if|elseif|else|endif)\b.*$", re.M), ""),
    ("`sending` dropped", re.compile(r"\bsending\s+(?=[\w(\[@])"), ""),
]


# ------------------------------------------------------------------ conditional compilation
# swift/Package.swift builds for macOS and iOS only, so `#if` branches that build for neither
# (Linux shims such as MLXLMCommon's CGSize) are left out; a branch that builds for one of them,
# or whose condition is not known here (arch, compiler, DEBUG, custom flags), is kept.

PLATFORMS = ("macOS", "iOS")
# frameworks both macOS 14 and iOS 17 have, and those only one has
APPLE_MODULES = {"Foundation", "CoreGraphics", "CoreImage", "CoreMedia", "CoreVideo",
                 "AVFoundation", "Metal", "MetalKit", "ObjectiveC", "Darwin", "os", "Accelerate",
                 "ImageIO", "UniformTypeIdentifiers", "SwiftUI", "Combine", "Dispatch",
                 "CoreML", "Vision", "PhotosUI", "Photos", "Observation"}
PLATFORM_MODULES = {"macOS": {"AppKit", "Cocoa"}, "iOS": {"UIKit"}}
NOT_APPLE_MODULES = {"Glibc", "Musl", "WinSDK", "Android", "Bionic", "WASILibc", "CRT"}


def _cond_value(expr: str, platform: str):
    """True / False / None (not known here) for an `#if` condition when building for
    `platform` (macOS or iOS)."""
    tokens = re.findall(r"\w+\s*\([^()]*\)|&&|\|\||!|\(|\)|\w+", expr)
    pos = 0

    def atom():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "!":
            v = atom()
            return None if v is None else not v
        if tok == "(":
            v = disj()
            pos += 1  # ')'
            return v
        m = re.fullmatch(r"(\w+)\s*\(([^()]*)\)", tok)
        if m:
            fn, arg = m.group(1), m.group(2).split(",")[0].strip()
            if fn == "os":
                return arg == platform
            if fn == "canImport":
                if arg in APPLE_MODULES or arg in PLATFORM_MODULES[platform]:
                    return True
                if arg in NOT_APPLE_MODULES or any(arg in mods for p, mods in
                                                   PLATFORM_MODULES.items() if p != platform):
                    return False
                return None
            return None  # arch, compiler, swift, targetEnvironment, hasFeature ...
        if tok in ("true", "false"):
            return tok == "true"
        return None  # DEBUG, custom -D flags

    def conj():
        nonlocal pos
        v = atom()
        while pos < len(tokens) and tokens[pos] == "&&":
            pos += 1
            w = atom()
            v = False if v is False or w is False else (True if v and w else None)
        return v

    def disj():
        nonlocal pos
        v = conj()
        while pos < len(tokens) and tokens[pos] == "||":
            pos += 1
            w = conj()
            v = True if v is True or w is True else (False if v is False and w is False else None)
        return v

    try:
        return disj()
    except IndexError:
        return None


_DIRECTIVE = re.compile(r"^[ \t]*#(if|elseif|else|endif)\b(.*)$")


def _active_lines(lines: list[str], platform: str) -> list[bool]:
    """Per line: whether it can be compiled for `platform` (unknown conditions count as yes)."""
    out = []
    # per open #if: [this branch active, an earlier branch surely taken, enclosing active]
    stack: list[list[bool]] = []
    for line in lines:
        m = _DIRECTIVE.match(line)
        enclosing = stack[-1][0] if stack else True
        if m:
            kind, rest = m.group(1), re.sub(r"//.*$", "", m.group(2)).strip()
            if kind == "if":
                v = _cond_value(rest, platform)
                stack.append([enclosing and v is not False, v is True, enclosing])
            elif kind in ("elseif", "else") and stack:
                top = stack[-1]
                v = _cond_value(rest, platform) if kind == "elseif" else True
                top[0] = top[2] and not top[1] and v is not False
                top[1] = top[1] or v is True
            elif kind == "endif" and stack:
                stack.pop()
            out.append(True)
            continue
        out.append(enclosing)
    return out


def drop_inactive_branches(text: str) -> str:
    """Blank the lines of `#if` branches that build neither for macOS nor for iOS (line
    numbers are kept)."""
    lines = text.split("\n")
    keep = [any(flags) for flags in zip(*(_active_lines(lines, p) for p in PLATFORMS))]
    return "\n".join(line if k else "" for line, k in zip(lines, keep))


@dataclass(frozen=True)
class Symbol:
    module: str
    kind: str
    name: str
    labels: str | None = None  # "(a:[b:]_...:)" or None
    flags: tuple[str, ...] = ()
    inherits: tuple[str, ...] = ()
    alias: str | None = None

    def line(self) -> str:
        parts = [self.module, self.kind, self.name + (self.labels or "")]
        parts += list(self.flags)
        if self.inherits:
            parts += [":", ",".join(self.inherits)]
        if self.alias:
            parts += ["=", self.alias]
        return " ".join(parts)


# --------------------------------------------------------------------------- reading sources


class Source:
    """Files of one repository: from git at a commit, or from a work tree."""

    def __init__(self, path: Path, commit: str | None):
        self.path = path
        self.commit = commit
        self.git_dir: Path | None = None
        if (path / "HEAD").exists() and (path / "objects").is_dir():
            self.git_dir = path
        elif (path / ".git").exists():
            self.git_dir = path / ".git"
        if commit and self.git_dir is None:
            sys.exit(f"{path}: --commit needs a git directory or a git checkout")

    def _git(self, *args: str) -> str:
        return subprocess.run(["git", f"--git-dir={self.git_dir}", *args], check=True,
                              capture_output=True, text=True).stdout

    def resolved(self) -> dict:
        """sha, describe, date of what is read (None where unknown)."""
        if self.git_dir is None:
            return {"sha": None, "describe": None, "date": None,
                    "read_from": "a folder without git"}
        ref = self.commit or "HEAD"
        sha = self._git("rev-parse", f"{ref}^{{commit}}").strip()
        try:
            describe = self._git("describe", "--tags", sha).strip()
        except subprocess.CalledProcessError:
            describe = None
        date = self._git("log", "-1", "--format=%cs", sha).strip()
        read_from = f"git objects at {self.commit}" if self.commit else "the work tree"
        if not self.commit:
            dirty = subprocess.run(["git", "-C", str(self.path), "status", "--porcelain"],
                                   capture_output=True, text=True).stdout.strip()
            read_from += " (with uncommitted changes!)" if dirty else " (clean)"
        return {"sha": sha, "describe": describe, "date": date, "read_from": read_from}

    def names(self, directory: str) -> list[str]:
        """The .swift files under `directory`, relative to the repository."""
        if self.commit:
            listing = self._git("ls-tree", "-r", "--name-only", self.commit, "--", directory)
            return sorted(n for n in listing.split("\n") if n.endswith(".swift"))
        return sorted(str(p.relative_to(self.path))
                      for p in (self.path / directory).rglob("*.swift"))

    def read(self, name: str) -> bytes:
        if self.commit:
            return subprocess.run(["git", f"--git-dir={self.git_dir}", "show",
                                   f"{self.commit}:{name}"], check=True,
                                  capture_output=True).stdout
        return (self.path / name).read_bytes()

    def module_dir(self, module: str) -> str:
        for base in SOURCE_ROOTS:
            d = f"{base}/{module}"
            if self.names(d):
                return d
        sys.exit(f"{self.path}: no directory for module {module} under {SOURCE_ROOTS}")


# --------------------------------------------------------------------------- parsing


def _errors(tree) -> list:
    out = []

    def walk(n):
        if n.is_error or n.is_missing:
            out.append(n)
            return
        for c in n.children:
            walk(c)

    walk(tree.root_node)
    return out


def _in_body(node) -> bool:
    """Whether a node lies inside code (a function body, accessor or closure), where no
    declaration we list can be."""
    n = node.parent
    while n is not None:
        if n.type in ("function_body", "computed_property", "computed_getter", "lambda_literal",
                      "statements"):
            return True
        n = n.parent
    return False


def _error_size(errors) -> int:
    return sum(max(1, e.end_byte - e.start_byte) for e in errors)


def parse_upstream(data: bytes):
    """(tree, rewrites applied, errors left)."""
    text = drop_inactive_branches(data.decode("utf-8"))
    tree = _PARSER.parse(text.encode("utf-8"))
    errors = _errors(tree)
    applied: list[str] = []
    for name, pattern, repl in _REWRITES:
        if not errors:
            break
        new_text = pattern.sub(repl, text)
        if new_text == text:
            continue
        new_tree = _PARSER.parse(new_text.encode("utf-8"))
        new_errors = _errors(new_tree)
        if _error_size(new_errors) < _error_size(errors):
            text, tree, errors = new_text, new_tree, new_errors
            applied.append(name)
    return tree, applied, errors


# --------------------------------------------------------------------------- declarations


def _text(node) -> str:
    return node.text.decode("utf-8")


def _modifier_texts(decl) -> list[str]:
    for c in decl.children:
        if c.type == "modifiers":
            return [_text(m) for m in c.children]
    return []


def _visibility(decl) -> str | None:
    for c in decl.children:
        if c.type == "modifiers":
            for m in c.children:
                if m.type == "visibility_modifier":
                    t = _text(m)
                    if "(" not in t:  # private(set) is about the setter
                        return t
    return None


def _unavailable_or_spi(decl) -> bool:
    for m in _modifier_texts(decl):
        compact = re.sub(r"\s+", "", m)
        if compact.startswith("@_spi") or (compact.startswith("@available(") and
                                           "unavailable" in compact):
            return True
    return False


def _is_static(decl) -> bool:
    for c in decl.children:
        if c.type == "modifiers":
            for m in c.children:
                if m.type == "property_modifier" and _text(m) in ("static", "class"):
                    return True
    return False


def type_name(node) -> str:
    """`A.B<C>` -> 'A.B'; [T] -> 'Array'; [K: V] -> 'Dictionary'; T? -> 'Optional'."""
    if node.type == "user_type":
        return ".".join(_text(c) for c in node.children if c.type == "type_identifier")
    if node.type == "array_type":
        return "Array"
    if node.type == "dictionary_type":
        return "Dictionary"
    if node.type == "optional_type":
        return "Optional"
    for c in node.named_children:
        if c.type in ("user_type", "array_type", "dictionary_type", "optional_type"):
            return type_name(c)
    return re.sub(r"\s+", "", _text(node))


def labels_of(decl) -> str:
    """'(_:axis:[stream:])' from the parameters of a func / init / subscript / macro."""
    parts: list[str] = []
    kids = decl.children
    for i, c in enumerate(kids):
        if c.type != "parameter":
            continue
        names = [x for x in c.children if x.type == "simple_identifier"]
        label = _text(names[0]) if names else "_"
        if decl.type == "subscript_declaration" and len(names) == 1:
            label = "_"  # subscript parameters have no label unless one is written
        variadic = any(x.type == "..." for x in c.children)
        default = False
        for j in range(i + 1, len(kids)):
            if kids[j].type in ("parameter", ")"):
                break
            if kids[j].type == "=" or decl.field_name_for_child(j) == "default_value":
                default = True
        piece = label + ("..." if variadic else "") + ":"
        parts.append(f"[{piece}]" if default else piece)
    return "(" + "".join(parts) + ")"


def _inherits(decl) -> tuple[str, ...]:
    out = []
    for c in decl.children:
        if c.type == "inheritance_specifier":
            for t in c.named_children:
                out.append(type_name(t))
    return tuple(out)


def _decl_kind(decl) -> str:
    for i, c in enumerate(decl.children):
        if decl.field_name_for_child(i) == "declaration_kind":
            return c.type
    return "class"


def _decl_name(decl) -> str:
    for i, c in enumerate(decl.children):
        if decl.field_name_for_child(i) == "name":
            return type_name(c) if c.type != "type_identifier" else _text(c)
    return "?"


class Collector:
    def __init__(self, module: str):
        self.module = module
        self.symbols: set[Symbol] = set()

    def add(self, kind, name, labels=None, flags=(), inherits=(), alias=None):
        self.symbols.add(Symbol(self.module, kind, name, labels, tuple(flags), tuple(inherits),
                                alias))

    def visit_file(self, root):
        self.visit_body(root, owner=None, public_default=False, protocol=False, ext=False)

    def visit_body(self, body, owner, public_default, protocol, ext):
        for d in body.named_children:
            self.visit_decl(d, owner, public_default, protocol, ext)

    def _public(self, d, public_default, protocol) -> bool:
        if _unavailable_or_spi(d):
            return False
        vis = _visibility(d)
        if vis in ("public", "open"):
            return True
        if vis is None and (public_default or protocol):
            return True
        return False

    def visit_decl(self, d, owner, public_default, protocol, ext):
        t = d.type
        qual = (lambda n: f"{owner}.{n}" if owner else n)
        flags = ["open"] if _visibility(d) == "open" else []
        if protocol:
            flags.append("req")
        if ext:
            flags.append("ext")
        if t in ("class_declaration", "protocol_declaration"):
            kind = "protocol" if t == "protocol_declaration" else _decl_kind(d)
            name = _decl_name(d)
            body = next((c for c in d.children if c.type.endswith("_body")), None)
            if kind == "extension":
                vis = _visibility(d)
                if _unavailable_or_spi(d):
                    return
                inherits = _inherits(d)
                if inherits:
                    self.add("extension", name, inherits=inherits)
                if body is not None:
                    self.visit_body(body, name, public_default=vis == "public", protocol=False,
                                    ext=True)
                return
            if not self._public(d, public_default, protocol):
                return
            full = qual(name)
            self.add(kind, full, flags=[f for f in flags if f == "open"], inherits=_inherits(d))
            if body is not None:
                self.visit_body(body, full, public_default=False,
                                protocol=kind == "protocol", ext=False)
            return
        if t in ("function_declaration", "protocol_function_declaration"):
            if not self._public(d, public_default, protocol):
                return
            name_node = d.child_by_field_name("name")
            if name_node is None:
                return
            f = flags + (["static"] if _is_static(d) else [])
            self.add("func", qual(_text(name_node)), labels_of(d), f)
            return
        if t == "init_declaration":
            if not self._public(d, public_default, protocol):
                return
            self.add("init", qual("init"), labels_of(d), flags)
            return
        if t == "subscript_declaration":
            if not self._public(d, public_default, protocol):
                return
            self.add("subscript", qual("subscript"), labels_of(d), flags)
            return
        if t in ("property_declaration", "protocol_property_declaration"):
            if not self._public(d, public_default, protocol):
                return
            f = flags + (["static"] if _is_static(d) else [])
            for c in d.children:
                if c.type == "pattern":
                    for ident in _bound_names(c):
                        self.add("var", qual(ident), None, f)
            return
        if t == "typealias_declaration":
            if not self._public(d, public_default, protocol):
                return
            names = [c for i, c in enumerate(d.children) if d.field_name_for_child(i) == "name"]
            if names:
                target = type_name(names[1]) if len(names) > 1 else None
                self.add("typealias", qual(_text(names[0])), alias=target)
            return
        if t == "associatedtype_declaration":
            name_node = d.child_by_field_name("name")
            if name_node is not None:
                self.add("associatedtype", qual(_text(name_node)), flags=["req"])
            return
        if t == "enum_entry":
            # enum cases are as visible as their enum, which is public when we got here
            kids = d.children
            for i, c in enumerate(kids):
                if d.field_name_for_child(i) == "name":
                    labels = None
                    if i + 1 < len(kids) and d.field_name_for_child(i + 1) == "data_contents":
                        labels = _case_labels(kids[i + 1])
                    self.add("case", qual(_text(c)), labels)
            return
        if t == "macro_declaration":
            if not self._public(d, public_default, protocol):
                return
            name_node = next((c for c in d.children if c.type == "simple_identifier"), None)
            if name_node is not None:
                self.add("macro", _text(name_node), labels_of(d))
            return
        if t in ("directive", "comment", "multiline_comment", "import_declaration",
                 "operator_declaration", "precedence_group_declaration", "deinit_declaration"):
            return
        if t == "ERROR":
            # what error recovery left flat: still collect the declarations inside
            self.visit_body(d, owner, public_default, protocol, ext)


def _bound_names(pattern) -> list[str]:
    out = []
    for c in pattern.children:
        if c.type == "simple_identifier":
            out.append(_text(c))
        elif c.type == "pattern":
            out += _bound_names(c)
    return out


def _case_labels(data) -> str:
    """'(_:x:)' for `case a(Int, x: Int)`."""
    parts = []
    pending_label = None
    for c in data.children:
        if c.type == "simple_identifier":
            pending_label = _text(c)
        elif c.is_named and c.type not in ("simple_identifier",):
            parts.append((pending_label or "_") + ":")
            pending_label = None
        elif c.type == "=":  # default value of an associated value
            if parts:
                parts[-1] = f"[{parts[-1]}]"
    return "(" + "".join(parts) + ")"


_PUBLIC_DECL = re.compile(
    r"^[ \t]*(?:@\w+(?:\([^)]*\))?\s+)*(?:public|open)\s+(?:[\w()]+\s+)*?"
    r"(?:func|var|let|class|struct|enum|protocol|actor|typealias|macro)\s+([A-Za-z_]\w*)", re.M)


def extract(source: Source, modules: list[str]):
    """(symbols, {file: rewrites}, {file: error lines}, missed public names)."""
    symbols: set[Symbol] = set()
    rewritten: dict[str, list[str]] = {}
    broken: dict[str, list[int]] = {}
    missed: list[str] = []
    for module in modules:
        directory = source.module_dir(module)
        for name in source.names(directory):
            data = source.read(name)
            tree, applied, errors = parse_upstream(data)
            if applied:
                rewritten[name] = applied
            if errors:
                broken[name] = (sorted({e.start_point[0] + 1 for e in errors}),
                                all(_in_body(e) for e in errors))
            col = Collector(module)
            col.visit_file(tree.root_node)
            symbols |= col.symbols
            seen = {s.name.rsplit(".", 1)[-1] for s in col.symbols}
            for m in _PUBLIC_DECL.finditer(data.decode("utf-8")):
                if m.group(1) not in seen:
                    line = data[:m.start(1)].count(b"\n") + 1
                    missed.append(f"{name}:{line}: {m.group(1)}")
    return symbols, rewritten, broken, missed


# --------------------------------------------------------------------------- writing


def write_list(path: Path, repo: str, source: Source, modules: list[str], symbols, rewritten,
               broken, note: str | None):
    info = source.resolved()
    ts_version = importlib.metadata.version("tree-sitter")
    grammar_version = importlib.metadata.version("tree-sitter-swift")
    header = [
        f"# Public API names of {REPO_URLS[repo]} (Swift), for tests/swift/test_swift_api.py",
        f"# repo: {REPO_URLS[repo]}",
        f"# commit: {info['sha'] or 'work tree (no git)'}",
        f"# describe: {info['describe'] or '-'}",
        f"# commit date: {info['date'] or '-'}",
    ]
    header.append(f"# read from: {info['read_from']}")
    if note:
        header += [f"# note: {line}" for line in note.splitlines()]
    header += [
        f"# modules: {' '.join(modules)}",
        f"# generated by devkit/swift_api.py on {_dt.date.today().isoformat()} with tree-sitter "
        f"{ts_version}, tree-sitter-swift {grammar_version}; regenerate, do not edit by hand.",
        "# Names and argument labels only (no code): MODULE KIND NAME[(LABELS)] [FLAGS] "
        "[: INHERITED] [= ALIAS]",
        "#   LABELS: `label:` each, `_:` unlabeled, `[label:]` has a default, `label...:` variadic;",
        "#   FLAGS: open (subclass / override from outside), static, req (protocol requirement), "
        "ext (declared in an extension).",
        "# Public = `public`/`open`, members of `public extension`s, protocol requirements, enum "
        "cases of public enums; `@_spi` and `@available(*, unavailable)` left out.",
        "# `#if` branches that cannot build for macOS / iOS (os(Linux), !canImport(CoreGraphics)"
        " ...) are left out; all others are listed (a union over arch, compiler, DEBUG).",
    ]
    if rewritten:
        header.append("# parsed after rewrites outside declarations (tree-sitter-swift limits):")
        header += [f"#   {name}: {'; '.join(r)}" for name, r in sorted(rewritten.items())]
    if broken:
        header.append("# parse errors left:")
        header += [f"#   {name}: lines {', '.join(map(str, lines))} "
                   + ("(all inside function bodies or closures)" if in_body else
                      "(NOT all inside code: declarations near them may be missing)")
                   for name, (lines, in_body) in sorted(broken.items())]
    lines = sorted({s.line() for s in symbols},
                   key=lambda l: (l.split(" ")[0], l.split(" ")[2], l))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + lines) + "\n")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mlx-swift-lm", type=Path, help="git dir or checkout of mlx-swift-lm")
    ap.add_argument("--commit", help="mlx-swift-lm commit or tag (swift/Package.swift's pin)")
    ap.add_argument("--lm-modules", nargs="+", default=DEFAULT_MODULES["mlx-swift-lm"])
    ap.add_argument("--lm-note", help="a note for the header (e.g. why this commit)")
    ap.add_argument("--mlx-swift", type=Path, help="git dir or checkout of mlx-swift")
    ap.add_argument("--mlx-swift-commit", help="mlx-swift commit or tag")
    ap.add_argument("--mlx-modules", nargs="+", default=DEFAULT_MODULES["mlx-swift"])
    ap.add_argument("--mlx-note", help="a note for the header")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parents[1] / "swift" / "api")
    args = ap.parse_args(argv)
    if not args.mlx_swift_lm and not args.mlx_swift:
        ap.error("give --mlx-swift-lm and/or --mlx-swift")

    jobs = []
    if args.mlx_swift_lm:
        jobs.append(("mlx-swift-lm", Source(args.mlx_swift_lm, args.commit), args.lm_modules,
                     args.lm_note))
    if args.mlx_swift:
        jobs.append(("mlx-swift", Source(args.mlx_swift, args.mlx_swift_commit),
                     args.mlx_modules, args.mlx_note))
    for repo, source, modules, note in jobs:
        symbols, rewritten, broken, missed = extract(source, modules)
        out = args.out / f"{repo}.api"
        info = write_list(out, repo, source, modules, symbols, rewritten, broken, note)
        print(f"{out}: {len(symbols)} symbols from {repo} {info['sha']} ({info['describe']}); "
              f"{len(rewritten)} files rewritten, {len(broken)} with parse errors left")
        for m in missed:
            print(f"  warning: public declaration not in the list: {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
