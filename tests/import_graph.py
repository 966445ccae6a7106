"""The package's shape, read from its source: modules, import arrows, cycles, function-level imports, sizes.

    python tests/import_graph.py          # the report (tests/test_layout.py asserts the same figures)

Only imports of lorakit's own modules make arrows. An import at module level (or under `if TYPE_CHECKING:`)
is an arrow; an import inside a function is listed separately with the comment that gives its reason.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass, field

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "lorakit")


@dataclass
class Module:
    name: str          # dotted, e.g. lorakit.train.loop
    path: str
    lines: int
    imports: set[str] = field(default_factory=set)             # module-level arrows to lorakit modules
    local_imports: list[tuple[int, str, str]] = field(default_factory=list)  # (line, statement, reason)
    long_functions: list[tuple[str, int]] = field(default_factory=list)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(SRC))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _target(mod: Module, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """The lorakit modules an import statement reads (a `from pkg import submodule` reads the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lorakit"]
    if node.level:
        package = mod.name if mod.path.endswith("__init__.py") else mod.name.rpartition(".")[0]
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "lorakit":
        return []
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return subs if len(subs) == len(node.names) else [base, *subs]


MODULE_REASON = "# imports inside functions:"  # a module-wide reason, e.g. in commands.py


def _reason(lines: list[str], lineno: int, module_reason: str) -> str:
    """Why an import sits inside a function: its own trailing comment, the comment line heading its block of
    imports, or the module's `# imports inside functions: ...` line."""
    own = lines[lineno - 1].partition("#")[2].strip()
    if own:
        return own
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
        i -= 1
    if i >= 0 and lines[i].strip().startswith("#"):
        return lines[i].strip().lstrip("#").strip()
    return module_reason


def read_modules(src: str = SRC) -> dict[str, Module]:
    paths = [os.path.join(d, n) for d, _, names in os.walk(src) for n in names if n.endswith(".py")]
    known = {module_name(p) for p in paths}
    modules = {}
    for path in sorted(paths):
        text = open(path, encoding="utf-8").read()
        mod = Module(module_name(path), path, text.count("\n"))
        tree = ast.parse(text)
        source_lines = text.split("\n")
        module_reason = next((line.partition(MODULE_REASON)[2].strip() for line in source_lines
                              if line.startswith(MODULE_REASON)), "")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    mod.long_functions.append((node.name, length))
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        statement = source_lines[inner.lineno - 1].partition("#")[0].strip()
                        mod.local_imports.append((inner.lineno, statement,
                                                  _reason(source_lines, inner.lineno, module_reason)))
        for node in tree.body:
            nodes = [node]
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks and import fallbacks still make arrows
                nodes = list(ast.walk(node))
            for n in nodes:
                if isinstance(n, (ast.Import, ast.ImportFrom)):
                    mod.imports.update(t for t in _target(mod, n, known) if t != mod.name)
        modules[mod.name] = mod
    for mod in modules.values():  # importing a.b.c first imports a.b: arrows to a package are arrows to its __init__
        mod.imports = {t for t in mod.imports if t in modules}
    return modules


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def folder(name: str) -> str:
    """The subpackage a module belongs to (top-level modules are their own folder)."""
    parts = name.split(".")
    return ".".join(parts[:2])


def folder_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod in modules.values():
        if mod.name == "lorakit":  # the public API imports everything it re-exports
            continue
        src = folder(mod.name)
        graph.setdefault(src, set()).update(folder(t) for t in mod.imports
                                            if folder(t) != src and t != "lorakit")
    return graph


def top_level_modules(modules: dict[str, Module]) -> list[str]:
    return sorted(m.name for m in modules.values()
                  if m.name.count(".") == 1 and not m.path.endswith("__init__.py"))


def report(modules: dict[str, Module]) -> str:
    graph = {m.name: m.imports for m in modules.values()}
    folders = folder_graph(modules)
    lines = [f"modules: {len(modules)} ({sum(m.lines for m in modules.values()):,} lines), "
             f"import arrows: {sum(len(m.imports) for m in modules.values())}",
             f"top-level modules: {len(top_level_modules(modules))}: "
             + ", ".join(n.split('.')[1] for n in top_level_modules(modules)),
             f"import cycles between files: {len(cycles(graph))} {cycles(graph) or ''}",
             f"import cycles between folders: {len(cycles(folders))} {cycles(folders) or ''}",
             "folder arrows: " + "; ".join(f"{k.split('.')[-1]} -> {', '.join(sorted(t.split('.')[-1] for t in v))}"
                                          for k, v in sorted(folders.items()) if v)]
    big = [(m.name, m.lines) for m in modules.values() if m.lines > 300]
    lines.append(f"files over 300 lines: {len(big)} {big or ''}")
    longf = [(m.name, f, n) for m in modules.values() for f, n in m.long_functions]
    lines.append(f"functions over 60 lines: {len(longf)} {longf or ''}")
    local = [(m.name, *entry) for m in modules.values() for entry in m.local_imports]
    lines.append(f"imports inside functions: {len(local)}")
    for name, lineno, stmt, reason in sorted(local):
        lines.append(f"  {name}:{lineno}  {stmt}  -- {reason or 'NO REASON GIVEN'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(read_modules()))
