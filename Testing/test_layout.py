"""The library's layout: no import cycle, modules of a readable size, a command line without science,
the Slicer extension's file list, and shipped weights of a reasonable size.

Everything here reads the source (``ast``) and ``SpineInpaint/CMakeLists.txt``; nothing imports the
library except the one check that ``import SpineInpaintLib.cli`` stays light.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "SpineInpaintLib"
LIB = REPO / PACKAGE
CMAKE_FILE = REPO / "SpineInpaint" / "CMakeLists.txt"

MAX_LINES = 800
MAX_WEIGHT_BYTES = 40 * 2**20

# --- what the Slicer extension gets ------------------------------------------------------------------
#: Top-level modules of the library that Slicer gets.
SLICER_MODULES = ["__init__.py", "__main__.py", "pipeline.py", "surface.py", "render.py", "report.py"]
#: Sub-packages that Slicer gets whole (every ``.py`` under them, at any depth)...
SLICER_PACKAGES = ["core", "segmentation", "detection", "inpainting", "mrml", "cli"]
#: ...except the command-line runs of training, evaluation and the phantom/demo/bench tools,
#: which ``cli.stages.lazy`` imports only when their command runs.
NOT_SHIPPED = ["cli/train_run.py", "cli/evaluate_run.py", "cli/tools_run.py"]
#: The rest of the library: development only (data sets and phantoms, trainers, evaluation).
DEVELOPMENT_PACKAGES = ["data", "training", "evaluation"]
#: The shipped weights: every file of these kinds under SpineInpaintLib/weights.
WEIGHT_PATTERNS = ["*.safetensors", "*.json"]

#: Libraries that only the run functions of the command line may import, never a cli module's top level.
SCIENCE = ("torch", "torchvision", "monai", "scipy")
#: The cli modules allowed to import them at the top: the lazily imported runs.
CLI_RUNS = {"train_run", "evaluate_run", "tools_run"}


def _python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def slicer_set() -> set[str]:
    """The files (repo-relative) that the Slicer extension must ship, from the lists above."""
    files = {f"{PACKAGE}/{name}" for name in SLICER_MODULES}
    for package in SLICER_PACKAGES:
        files |= {_rel(p) for p in _python_files(LIB / package)}
    return files - {f"{PACKAGE}/{name}" for name in NOT_SHIPPED}


def weight_set() -> set[str]:
    return {_rel(p) for p in (LIB / "weights").rglob("*") if p.is_file()
            and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in WEIGHT_PATTERNS)}


# --- the import graph of the library --------------------------------------------------------------------
@dataclass(frozen=True)
class ImportStatement:
    module: str  # the absolute dotted module the statement names
    name: str | None  # ``from module import name``; None for ``import module``
    line: int
    top_level: bool  # runs when the module is imported (not inside a function)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class _ImportCollector(ast.NodeVisitor):
    """Every import of a module, inside functions too, and ``importlib.import_module("literal")``."""

    def __init__(self, module: str, is_package: bool):
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[ImportStatement] = []
        self._depth = 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self.found.append(ImportStatement(alias.name, None, node.lineno, self._depth == 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        for alias in node.names:
            self.found.append(ImportStatement(module, alias.name, node.lineno, self._depth == 0))

    def visit_Call(self, node: ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.found.append(ImportStatement(node.args[0].value, None, node.lineno, self._depth == 0))
        self.generic_visit(node)


class ImportGraph:
    """The modules of SpineInpaintLib and which of them each one imports.

    ``from pkg import name`` goes to the submodule ``pkg.name`` when there is one, else through the
    re-exports of ``pkg/__init__.py`` to the module that defines ``name``; a package ``__init__``
    that re-exports imports the modules it re-exports from. Edges into a parent package's
    ``__init__`` that Python runs implicitly are left out of :attr:`edges` (they would make every
    re-exporting package a cycle) and added by :meth:`closure`.
    """

    def __init__(self, root: Path | None = None):
        self.files = {_module_name(p): p for p in _python_files(root or LIB)}
        self.packages = {m for m, p in self.files.items() if p.name == "__init__.py"}
        self.statements = {m: self._statements(m) for m in self.files}
        self._exports: dict[str, dict[str, tuple[str, str | None]]] = {}
        #: module -> {imported module: first line}
        self.edges: dict[str, dict[str, int]] = {m: {} for m in self.files}
        #: module -> [(external top-level package, line, top_level)]
        self.external: dict[str, list[tuple[str, int, bool]]] = {m: [] for m in self.files}
        for module, statements in self.statements.items():
            for st in statements:
                target = self.resolve(st.module, st.name)
                if target is None:
                    if st.module and not st.module.startswith(PACKAGE):
                        self.external[module].append((st.module.split(".")[0], st.line, st.top_level))
                elif target != module:
                    self.edges[module].setdefault(target, st.line)

    def _statements(self, module: str) -> list[ImportStatement]:
        path = self.files[module]
        collector = _ImportCollector(module, module in self.packages)
        collector.visit(ast.parse(path.read_text(), str(path)))
        return collector.found

    def exports(self, package: str) -> dict[str, tuple[str, str | None]]:
        """name -> (module, name there) for what a package's ``__init__`` imports at its top level."""
        if package not in self._exports:
            table = {}
            for st in self.statements[package]:
                if not st.top_level:
                    continue
                if st.name is None:
                    table[st.module.split(".")[0]] = (st.module.split(".")[0], None)
                elif st.name != "*":
                    table[st.name] = (st.module, st.name)
            tree = ast.parse(self.files[package].read_text())
            for node in ast.walk(tree):  # `import a.b as c` binds c to a.b
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.asname:
                            table[alias.asname] = (alias.name, None)
            self._exports[package] = table
        return self._exports[package]

    def resolve(self, module: str, name: str | None, _seen: frozenset = frozenset()) -> str | None:
        """The library module that ``from module import name`` (or ``import module``) really uses."""
        if module not in self.files:
            return None
        if name is None or name == "*":
            return module
        if f"{module}.{name}" in self.files:
            return f"{module}.{name}"
        if module in self.packages and (module, name) not in _seen:
            origin = self.exports(module).get(name)
            if origin is not None:
                resolved = self.resolve(origin[0], origin[1], _seen | {(module, name)})
                if resolved is not None:
                    return resolved
        return module

    def cycles(self) -> list[list[str]]:
        """Strongly connected sets of more than one module (Tarjan), or a module importing itself."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def strong(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            for w in sorted(self.edges[v]):
                if w not in index:
                    strong(w)
                    low[v] = min(low[v], low[w])
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

        for v in sorted(self.edges):
            if v not in index:
                strong(v)
        return found

    def closure(self, start: set[str]) -> dict[str, list[str]]:
        """Every module that importing ``start`` can run, each with one chain of imports that gets there."""
        chains = {m: [m] for m in start}
        todo = sorted(start)
        while todo:
            module = todo.pop()
            parents = [module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)]
            for target in [*self.edges[module], *(p for p in parents if p in self.files)]:
                if target not in chains:
                    chains[target] = [*chains[module], target]
                    todo.append(target)
        return chains


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph()


def test_the_import_graph_sees_function_level_imports_and_re_exports(graph):
    # The parser itself: pipeline imports inference through the package re-exports or directly, and
    # cli/commands.py imports most of the library inside its run functions only.
    assert graph.resolve(f"{PACKAGE}.core", "io") == f"{PACKAGE}.core.io"
    assert graph.resolve(PACKAGE, "SpineInpaintError") == PACKAGE
    for package in (p for p in graph.packages if graph.exports(p)):
        for name, (module, _) in graph.exports(package).items():
            if module.startswith(PACKAGE + "."):
                assert graph.resolve(package, name) != package, (package, name)
    function_level = [st for st in graph.statements[f"{PACKAGE}.cli.commands"] if not st.top_level]
    assert function_level, "cli/commands.py imports its domain modules inside the run functions"


def test_no_import_cycle(graph):
    cycles = graph.cycles()
    lines = []
    for component in cycles:
        members = set(component)
        lines.append("cycle: " + " <-> ".join(component))
        for module in component:
            for target, line in sorted(graph.edges[module].items()):
                if target in members:
                    lines.append(f"    {_rel(graph.files[module])}:{line} imports {target}")
    assert not cycles, "\n".join(lines)


# --- sizes ---------------------------------------------------------------------------------------------
def test_no_module_over_800_lines():
    too_long = {_rel(p): n for p in _python_files(LIB) + _python_files(REPO / "SpineInpaint")
                if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them where the pieces have names): {too_long}"


def test_every_shipped_weight_file_is_under_40_mb_and_has_its_metadata():
    shipped = sorted(weight_set())
    weights = [f for f in shipped if f.endswith(".safetensors")]
    assert len(weights) >= 3, f"the shipped weights are missing under {LIB / 'weights'}: {shipped}"
    big = {f: (REPO / f).stat().st_size for f in shipped if (REPO / f).stat().st_size >= MAX_WEIGHT_BYTES}
    assert not big, f"shipped files of 40 MB or more: {big}"
    for name in weights:
        path = REPO / name
        meta_path = path.with_suffix(".json")
        assert meta_path.is_file(), f"{name} has no JSON metadata beside it"
        meta = json.loads(meta_path.read_text())
        if "bytes" in meta:
            assert meta["bytes"] == path.stat().st_size, f"{name}: size differs from its metadata"


# --- the command line holds no science -----------------------------------------------------------------
def test_cli_modules_import_no_science_at_their_top_level(graph):
    offenders = []
    for module, found in sorted(graph.external.items()):
        if not module.startswith(f"{PACKAGE}.cli") or module.rpartition(".")[2] in CLI_RUNS:
            continue
        offenders += [f"{_rel(graph.files[module])}:{line} imports {name}" for name, line, top in found
                      if top and name in SCIENCE]
    assert not offenders, "cli modules import science at their top level (move it into the run function):\n" + \
        "\n".join(offenders)


def test_importing_the_command_line_loads_no_science():
    # The same, transitively: `python -m SpineInpaintLib --help` must not wait for torch.
    code = ("import sys; import SpineInpaintLib.cli as cli; cli.build_parser(); "
            f"print(','.join(m for m in {SCIENCE!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = [m for m in result.stdout.strip().split(",") if m]
    assert not loaded, f"`import SpineInpaintLib.cli` loads {loaded}; import them inside the run functions"


def _lazy_targets(graph) -> list[tuple[str, str, str]]:
    """(cli module, target module, function) for every ``lazy("module", "function")`` in cli."""
    targets = []
    for module, path in graph.files.items():
        if not module.startswith(f"{PACKAGE}.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "lazy":
                args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                assert len(args) == 2, f"{_rel(path)}:{node.lineno}: lazy() takes two string literals"
                targets.append((module, *args))
    return targets


def test_lazy_commands_name_functions_that_exist(graph):
    missing = []
    for module, target, function in _lazy_targets(graph):
        path = graph.files.get(target)
        defined = path is not None and any(
            isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function
            for n in ast.parse(path.read_text()).body)
        if not defined:
            missing.append(f"{module}: lazy({target!r}, {function!r})")
    assert not missing, "lazy commands naming no function:\n" + "\n".join(missing)


# --- the Slicer extension: CMake globs and the import closure ------------------------------------------
def _cmake_commands(text: str) -> list[tuple[str, list[tuple[str, bool]]]]:
    """``[(command, [(argument, quoted)])]`` of a CMake file (comments dropped, quoted escapes read)."""
    commands, pos = [], 0
    token = re.compile(r'\s+|#[^\n]*|"((?:[^"\\]|\\.)*)"|([^\s()"#]+)|(\()|(\))', re.S)
    head = re.compile(r"\s*([A-Za-z_]\w*)\s*\(")
    while pos < len(text):
        skip = re.compile(r"(\s+|#[^\n]*)").match(text, pos)
        if skip:
            pos = skip.end()
            continue
        match = head.match(text, pos)
        assert match, f"cannot read {CMAKE_FILE.name} at: {text[pos:pos + 40]!r}"
        name, pos, depth, args = match.group(1).lower(), match.end(), 1, []
        while depth:
            m = token.match(text, pos)
            assert m, f"cannot read {CMAKE_FILE.name} at: {text[pos:pos + 40]!r}"
            pos = m.end()
            if m.group(3):
                depth += 1
            elif m.group(4):
                depth -= 1
            elif m.group(1) is not None:
                args.append((re.sub(r"\\(.)", r"\1", m.group(1)), True))
            elif m.group(2):
                args.append((m.group(2), False))
        commands.append((name, args))
    return commands


def _cmake_glob(pattern: str, recurse: bool) -> list[str]:
    """CMake's file(GLOB) / file(GLOB_RECURSE) for a wildcard in the last component only."""
    directory, _, name = os.path.normpath(pattern).rpartition(os.sep)
    assert not any(c in directory for c in "*?["), f"wildcards only in the file name, please: {pattern}"
    if not os.path.isdir(directory):
        return []
    if recurse:
        return [os.path.join(d, f) for d, dirs, files in os.walk(directory) for f in files
                if fnmatch.fnmatchcase(f, name)]
    return [os.path.join(directory, f) for f in os.listdir(directory) if fnmatch.fnmatchcase(f, name)]


def interpret_cmake(path: Path | None = None) -> dict[str, list[str]]:
    """The variables that ``set``, ``file(GLOB...)`` and ``list(APPEND|FILTER)`` at the top level leave.

    Commands inside ``foreach``/``if``/``function``/``macro`` blocks are skipped; an unknown
    variable in a command that is interpreted fails, so that a change of structure is seen.
    """
    path = path or CMAKE_FILE
    variables = {"CMAKE_CURRENT_SOURCE_DIR": [str(path.parent)]}
    blocks = {"foreach": "endforeach", "if": "endif", "function": "endfunction", "macro": "endmacro",
              "while": "endwhile"}
    open_blocks: list[str] = []

    def expand(args: list[tuple[str, bool]]) -> list[str]:
        out = []
        for value, quoted in args:
            def sub(m):
                assert m.group(1) in variables, f"{path.name}: unknown variable ${{{m.group(1)}}}"
                return ";".join(variables[m.group(1)])
            text = re.sub(r"\$\{(\w+)\}", sub, value)
            out += [text] if quoted else [t for t in text.split(";") if t]
        return out

    for name, raw in _cmake_commands(path.read_text()):
        if name in blocks:
            open_blocks.append(blocks[name])
            continue
        if open_blocks:
            if name == open_blocks[-1]:
                open_blocks.pop()
            continue
        if name not in ("set", "file", "list"):
            continue
        args = expand(raw)
        if name == "set":
            variables[args[0]] = args[1:]
        elif name == "file" and args[0] in ("GLOB", "GLOB_RECURSE"):
            mode, var, rest = args[0], args[1], args[2:]
            relative = None
            patterns = []
            i = 0
            while i < len(rest):
                if rest[i] == "RELATIVE":
                    relative, i = os.path.normpath(rest[i + 1]), i + 2
                elif rest[i] == "LIST_DIRECTORIES":
                    i += 2
                elif rest[i] in ("CONFIGURE_DEPENDS", "FOLLOW_SYMLINKS"):
                    i += 1
                else:
                    patterns.append(rest[i])
                    i += 1
            found = sorted({f for p in patterns for f in _cmake_glob(p, mode == "GLOB_RECURSE")})
            variables[var] = [Path(os.path.relpath(f, relative)).as_posix() if relative else f for f in found]
        elif name == "list" and args[0] == "APPEND":
            variables.setdefault(args[1], []).extend(args[2:])
        elif name == "list" and args[0] == "FILTER":
            var, action, kind, regex = args[1:5]
            assert kind == "REGEX", args
            keep = action == "INCLUDE"
            variables[var] = [v for v in variables.get(var, []) if bool(re.search(regex, v)) == keep]
    return variables


@pytest.fixture(scope="module")
def cmake() -> dict[str, list[str]]:
    return interpret_cmake()


def test_cmake_reader_reads_globs_and_filters(tmp_path):
    # The reader itself, on a small tree: GLOB, GLOB_RECURSE, APPEND, EXCLUDE, blocks skipped.
    for rel in ("lib/a.py", "lib/b.py", "lib/pkg/c.py", "lib/pkg/sub/d.py", "lib/pkg/skip_me.py", "lib/pkg/e.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "mod").mkdir()
    cmake_file = tmp_path / "mod" / "CMakeLists.txt"
    cmake_file.write_text(
        "set(_dir ${CMAKE_CURRENT_SOURCE_DIR}/..) # a comment (with parentheses)\n"
        "file(GLOB _s RELATIVE ${_dir} CONFIGURE_DEPENDS\n  ${_dir}/lib/a.py\n  ${_dir}/lib/missing.py\n  )\n"
        "file(GLOB_RECURSE _p RELATIVE ${_dir} ${_dir}/lib/pkg/*.py)\n"
        "list(APPEND _s ${_p})\n"
        'list(FILTER _s EXCLUDE REGEX "^lib/pkg/(skip_me|other)\\\\.py$")\n'
        "foreach(_f ${_s})\n  file(GLOB _s ${_loop_only})\nendforeach()\n")
    variables = interpret_cmake(cmake_file)
    assert sorted(variables["_s"]) == ["lib/a.py", "lib/pkg/c.py", "lib/pkg/sub/d.py"]


def test_every_library_module_is_either_shipped_to_slicer_or_development_only():
    development = {_rel(p) for package in DEVELOPMENT_PACKAGES for p in _python_files(LIB / package)}
    not_shipped = {f"{PACKAGE}/{name}" for name in NOT_SHIPPED}
    unclassified = {_rel(p) for p in _python_files(LIB)} - slicer_set() - development - not_shipped
    assert not unclassified, (f"modules in neither the Slicer set nor a development package: {sorted(unclassified)} "
                              "(add them to SLICER_MODULES or SpineInpaint/CMakeLists.txt and this test)")
    missing = {f for f in slicer_set() | not_shipped if not (REPO / f).is_file()}
    assert not missing, f"listed here but not in the tree: {sorted(missing)}"


def test_cmake_ships_exactly_the_slicer_set(cmake):
    shipped = set(cmake.get("_library_scripts", []))
    expected = slicer_set()
    assert shipped - expected == set(), f"CMake ships modules that Slicer must not get: {sorted(shipped - expected)}"
    assert expected - shipped == set(), f"CMake misses modules that Slicer needs: {sorted(expected - shipped)}"
    commands = _cmake_commands(CMAKE_FILE.read_text())
    compile_calls = [args for name, args in commands if name == "ctkmacrocompilepythonscript"]
    assert len(compile_calls) == 1
    values = [value for value, _ in compile_calls[0]]
    assert values[values.index("SCRIPTS") + 1] == "${_library_scripts}"


def test_cmake_ships_exactly_the_weights(cmake):
    shipped = set(cmake.get("_weight_files", []))
    assert shipped == weight_set(), {"missing": sorted(weight_set() - shipped), "extra": sorted(shipped - weight_set())}
    loops = [args for name, args in _cmake_commands(CMAKE_FILE.read_text()) if name == "foreach"]
    assert any(args[1][0] == "${_weight_files}" for args in loops), "no foreach() copies ${_weight_files}"


def test_the_slicer_set_imports_nothing_outside_it(graph):
    # All imports count, inside functions too; the lazy("module", ...) runs of cli are strings, not
    # imports, and must name modules outside the Slicer set (they print a one-line error there).
    shipped = {_module_name(REPO / f) for f in slicer_set()}
    chains = graph.closure(shipped)
    outside = sorted(m for m in chains if m not in shipped)
    direct = [f"{_rel(graph.files[m])}:{line} imports {target}" for m in sorted(shipped)
              for target, line in sorted(graph.edges[m].items()) if target not in shipped]
    assert not outside, ("the Slicer set imports modules it does not ship:\n" + "\n".join(direct) + "\nreaching: "
                         + "; ".join(" -> ".join(chains[m]) for m in outside))
