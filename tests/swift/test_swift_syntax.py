"""Check 1 for the Swift package in swift/ (SpeedQVLM), which no Swift toolchain compiles here:
every .swift file under swift/ parses with the tree-sitter Swift grammar (the tree-sitter-swift
wheel from PyPI, pinned in pyproject.toml's `test` extra) without an ERROR or MISSING node.

Failures are reported as file:line:column with the source line. The check is also run on broken
snippets (it must report them) and on a snippet of the modern Swift the package uses (it must
not). See swift/README.md, "What CI checks".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import tree_sitter
import tree_sitter_swift

ROOT = Path(__file__).resolve().parents[2]
SWIFT = ROOT / "swift"
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


# ------------------------------------------------------------------ the check


@dataclass
class SyntaxProblem:
    line: int  # 1-based
    column: int  # 1-based, in characters
    kind: str  # "ERROR" or "MISSING"
    what: str
    source_line: str

    def format(self, name: str) -> str:
        return (f"{name}:{self.line}:{self.column}: {self.kind} {self.what}\n"
                f"    {self.source_line}\n    {' ' * (self.column - 1)}^")


def syntax_problems(data: bytes) -> list[SyntaxProblem]:
    """Every ERROR and MISSING node of the parse, outermost first (an ERROR's insides are not
    reported again)."""
    tree = parse(data)
    lines = data.decode("utf-8").splitlines() or [""]
    out: list[SyntaxProblem] = []

    def walk(node):
        if node.is_missing or node.is_error:
            row, col_bytes = node.start_point
            line_bytes = data.splitlines()[row] if row < len(data.splitlines()) else b""
            column = len(line_bytes[:col_bytes].decode("utf-8", "replace")) + 1
            source_line = lines[row] if row < len(lines) else ""
            if node.is_missing:
                what = f"`{node.type}` (expected here)"
            else:
                snippet = text(node).strip().splitlines()[0][:60] if text(node).strip() else ""
                what = f"unexpected `{snippet}`" if snippet else "syntax error"
            out.append(SyntaxProblem(row + 1, column, "MISSING" if node.is_missing else "ERROR",
                                     what, source_line))
            return
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    return out


def test_the_swift_sources_are_found():
    names = {rel(p) for p in swift_files()}
    for expected in ["swift/Package.swift", "swift/Sources/SpeedQVLM/InternVLChat.swift",
                     "swift/Sources/SpeedQVLM/InternVLChatProcessor.swift",
                     "swift/Sources/SpeedQVLM/Registration.swift",
                     "swift/Tests/SpeedQVLMTests/SpeedQVLMTests.swift"]:
        assert expected in names


@pytest.mark.parametrize("path", swift_files(), ids=rel)
def test_swift_file_parses(path):
    problems = syntax_problems(path.read_bytes())
    assert not problems, (f"{len(problems)} syntax error(s) (tree-sitter-swift):\n"
                          + "\n".join(p.format(rel(path)) for p in problems))


BROKEN_SNIPPETS = {
    # name: (source, (line, column, kind) of the first problem)
    "missing-brace": ("func f() {\n    let x = 1\n", (1, 1, "ERROR")),
    "stray-token": ("let a = 1\nlet b = 2 ) + 3\n", (2, 11, "ERROR")),
    "unclosed-call": ("let y = foo(1, 2\nlet z = 3\n", (2, 1, "ERROR")),
    "bad-declaration": ("public final struct class Foo {}\n", (1, 27, "ERROR")),
    "missing-expression": ("let q =\n", (1, 7, "ERROR")),
    "missing-paren": ("let w = (1 + 2\n", (1, 15, "MISSING")),
}


@pytest.mark.parametrize("name", sorted(BROKEN_SNIPPETS))
def test_broken_swift_is_reported(name):
    source, (line, column, kind) = BROKEN_SNIPPETS[name]
    problems = syntax_problems(source.encode())
    assert problems, f"{name}: the broken snippet parsed cleanly"
    first = problems[0]
    assert (first.line, first.column, first.kind) == (line, column, kind), first.format(name)
    report = first.format("Snippet.swift")
    assert report.startswith(f"Snippet.swift:{line}:{column}: {kind} ")


def test_an_error_in_a_package_file_is_reported():
    """The same check on InternVLChat.swift with one `)` dropped: reported on that line."""
    path = SWIFT / "Sources" / "SpeedQVLM" / "InternVLChat.swift"
    lines = path.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines)
                 if "Linear(dims, dims, bias: true)" in line)
    lines[index] = lines[index].replace("bias: true)", "bias: true", 1)
    problems = syntax_problems("".join(lines).encode())
    assert problems, "dropping a `)` went unnoticed"
    assert problems[0].line == index + 1, problems[0].format(rel(path))


def test_the_grammar_is_the_pinned_one():
    """README's "What CI checks" and the expected positions above are for these versions
    (pyproject.toml's `test` extra pins them)."""
    import importlib.metadata

    grammar = tuple(int(x) for x in importlib.metadata.version("tree-sitter-swift").split(".")[:3])
    binding = tuple(int(x) for x in importlib.metadata.version("tree-sitter").split(".")[:2])
    assert (0, 7, 4) <= grammar < (0, 8, 0), grammar
    assert binding == (0, 26), binding


# Constructs the package uses (Swift 5.9-6.2); the grammar must take them without errors.
MODERN_SWIFT = """
import Foundation
@MainActor
@Observable
public final class Model<T: Sendable>: Base, Proto where T: Hashable {
    @ModuleInfo(key: "q_proj") var wq: Linear
    @State private var picked: Item?
    public private(set) var status = "idle"
    public enum Source: Sendable {
        case folder(URL)
        case lazy(@Sendable () async throws -> URL)
    }
    init() {
        defer { status = "ready" }
    }
    var tuple: (columns: Int, rows: Int) { (columns: 1, rows: 2) }
    var kind: String {
        switch status {
        case "idle": "i"
        default: "b"
        }
    }
    public func prepare(_ input: LMInput, cache: [any KVCache], state _: LMOutput.State?) async throws -> some Sequence {
        guard let image = input.image, case .array(let items)? = lookup["k"] else { return [] }
        if let qNorm, let kNorm { x = qNorm(x) + kNorm(x) }
        let (B, L) = (x.dim(0), x.dim(1))
        let y = x[0..., ..<1, 0...].reshaped(B, L, -1)
        let loader = #huggingFaceTokenizerLoader()
        let path = URL(fileURLWithPath: #filePath)
        for case let c as [String: Int] in items where !c.isEmpty {}
        for await event in try await stream(input: input) {
            switch event {
            case .chunk(let text): answer += text
            default: break
            }
        }
        Task { @MainActor in await self.run() }
        _ = items.map { (entry) -> NestedItem<String, Module> in entry }
        let isImage = ids .== MLXArray(5)
        return "the prompt has \\(B) tokens"
            + " and \\(L) rows"
    }
    @discardableResult
    public override func update(modules: ModuleChildren, verify: VerifyUpdate, path: [String] = []) throws -> Self {
        try super.update(modules: modules, verify: verify, path: path)
    }
}
#if canImport(UIKit)
let platform = "iOS"
#else
let platform = "macOS"
#endif
"""


def test_modern_swift_constructs_parse():
    problems = syntax_problems(MODERN_SWIFT.encode())
    assert not problems, "\n".join(p.format("MODERN_SWIFT") for p in problems)
