"""The architecture rules of issue #28, checked from the source alone (ast; no imports, < 5 s).

Each test lists every offender as `file:line what`, so a red test says exactly what to fix.
"""
from __future__ import annotations

import ast
import json
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sdlora"
MAX_FUNC, MAX_FUNC_TRAINING, MAX_FILE = 80, 50, 400


def _py_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    if path.suffix == ".ipynb":  # a notebook's code cells, one after the other; IPython's %/! lines left out
        cells = json.loads(path.read_text())["cells"]
        lines = []
        for cell in cells:
            src = cell["source"] if cell["cell_type"] == "code" else []
            src = src.splitlines(keepends=True) if isinstance(src, str) else src
            lines += [("# " + x) if x.lstrip().startswith(("%", "!")) else x for x in src] + ["\n"]
        return ast.parse("".join(lines), str(path))
    return ast.parse(path.read_text(), str(path))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


PKG_FILES = _py_files(PKG)
MODULES = {_module_name(p): p for p in PKG_FILES}  # sdlora.lora.formats -> its file
RECIPES = [p for p in sorted(ROOT.glob("*.py"))]  # the top-level recipe scripts, imported as top-level modules
# Every file whose use of names is checked; the notebook's code counts as an example.
USER_FILES = (PKG_FILES + RECIPES + _py_files(ROOT / "tests") + _py_files(ROOT / "benchmarks")
              + _py_files(ROOT / "examples") + sorted((ROOT / "examples").rglob("*.ipynb")))
# Modules a file elsewhere can import by a top-level name: the recipes, and the scripts beside each other in
# tests/, benchmarks/ and examples/ (put on sys.path by conftest or by running them).
LOCAL_MODULES = {p.stem for p in USER_FILES if p.suffix == ".py" and p.parent != PKG and PKG not in p.parents}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# --- imports ------------------------------------------------------------------------------------------------------

def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, type_checking: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement anywhere in `tree` (functions, classes, try blocks included). Without
    `type_checking`, those under `if TYPE_CHECKING:` are left out: they never run, so they cannot close a cycle."""
    out = []

    def visit(node):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(tree)
    return out


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module an ImportFrom names, relative imports resolved against `path`'s package."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if not _is_package(path):
        package = package[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """`name`, or its longest prefix that is an sdlora module; None outside sdlora."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def _imported_modules(path: Path, type_checking: bool = False) -> list[tuple[str, int]]:
    """(sdlora module, line) for each module `path` imports. `from pkg import name` means pkg.name when that is a
    module, else pkg. A submodule's import does not count as importing its parent packages' __init__."""
    out = []
    for node in _import_nodes(_tree(path), type_checking):
        if isinstance(node, ast.Import):
            out += [(m, node.lineno) for a in node.names if (m := _known(a.name))]
            continue
        base = _absolute(path, node)
        for a in node.names:
            sub = f"{base}.{a.name}"
            m = sub if sub in MODULES else _known(base)
            if m:
                out.append((m, node.lineno))
    return out


@lru_cache(maxsize=None)
def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, among sdlora's modules."""
    g = {}
    for name, path in MODULES.items():
        edges = {}
        for m, line in _imported_modules(path):
            if m != name:
                edges.setdefault(m, line)
        g[name] = edges
    return g


def _sccs(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
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
            out.append(sorted(comp))
    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def _shortest_cycle(g, start: str, within: set[str]) -> list[str]:
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if w not in within:
                    continue
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return []


def _cycles() -> list[str]:
    """Each cycle as `a (file:line) -> b (file:line) -> ... -> a`: the shortest through each module of each
    strongly connected component, without repeats."""
    g, seen, out = _graph(), set(), []
    for comp in _sccs(g):
        if len(comp) < 2:
            continue
        for start in comp:
            cyc = _shortest_cycle(g, start, set(comp))
            i = cyc.index(min(cyc[:-1]))
            key = tuple(cyc[i:-1] + cyc[:i])
            if key in seen:
                continue
            seen.add(key)
            ring = list(key) + [key[0]]
            hops = [f"{a} ({_rel(MODULES[a])}:{g[a][b]})" for a, b in zip(ring, ring[1:])]
            out.append(" -> ".join(hops + [ring[-1]]))
    return out


def _offenders(what: str, rows: list[str]) -> str:
    return f"{len(rows)} {what}:\n  " + "\n  ".join(rows)


# --- the rules ----------------------------------------------------------------------------------------------------

def test_function_length():
    """No function over 80 lines in sdlora/, none over 50 in sdlora/training/ (def line to last line; nested
    functions count in their own right and in the function around them)."""
    rows = []
    for path in PKG_FILES:
        limit = MAX_FUNC_TRAINING if "training" in path.relative_to(PKG).parts[:1] else MAX_FUNC
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    rows.append(f"{_rel(path)}:{node.lineno} {node.name} ({n} lines > {limit})")
    assert not rows, _offenders("functions too long", rows)


def test_file_length():
    rows = []
    for path in PKG_FILES:
        n = len(path.read_text().splitlines())
        if n > MAX_FILE:
            rows.append(f"{_rel(path)}:1 ({n} lines > {MAX_FILE})")
    assert not rows, _offenders("files too long", rows)


def test_no_import_cycle():
    """Imports inside functions count; a package __init__ re-exporting a submodule that imports the __init__ is a
    cycle (submodules import their siblings directly)."""
    rows = _cycles()
    assert not rows, _offenders("import cycles", rows)


def _layer_violations(layer: str, forbidden: list[str]) -> list[str]:
    # Type-only imports count here: they still make `layer` depend on the layer above it.
    rows = []
    for name, path in MODULES.items():
        if name != layer and not name.startswith(layer + "."):
            continue
        for m, line in _imported_modules(path, type_checking=True):
            if any(m == f or m.startswith(f + ".") for f in forbidden):
                rows.append(f"{_rel(path)}:{line} {m}")
    return list(dict.fromkeys(rows))  # `from m import a, b` is one import of m


def test_ui_does_not_import_cli():
    rows = _layer_violations("sdlora.ui", ["sdlora.cli"])
    assert not rows, _offenders("imports of sdlora.cli from sdlora.ui", rows)


def test_lora_imports_no_layer_above():
    rows = _layer_violations("sdlora.lora", ["sdlora.output", "sdlora.training", "sdlora.ui", "sdlora.cli"])
    assert not rows, _offenders("imports of output/training/ui/cli from sdlora.lora", rows)


def test_no_importlib():
    rows = []
    for path in PKG_FILES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                rows += [f"{_rel(path)}:{node.lineno} import {a.name}" for a in node.names
                         if a.name.split(".")[0] == "importlib"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "importlib":
                rows.append(f"{_rel(path)}:{node.lineno} from {node.module} import")
            elif isinstance(node, ast.Name) and node.id == "__import__" or \
                    isinstance(node, ast.Attribute) and node.attr == "__import__":
                rows.append(f"{_rel(path)}:{node.lineno} __import__")
    assert not rows, _offenders("uses of importlib/__import__ in sdlora/", rows)


def test_no_print_outside_cli():
    rows = []
    for path in PKG_FILES:
        if path.relative_to(PKG).parts[0] == "cli":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                rows.append(f"{_rel(path)}:{node.lineno} print(")
    assert not rows, _offenders("print( calls outside sdlora/cli/", rows)


def _config_defaults() -> dict[str, object]:
    """TrainConfig's fields with a literal default, from every settings group of sdlora/training/config/: a plain
    `name: T = 1` or a `setting(1, ...)` / `setting(default=1, ...)` field."""
    out = {}
    for path in _py_files(PKG / "training" / "config"):
        for cls in (n for n in _tree(path).body if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value):
                    continue
                value = stmt.value
                if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "setting":
                    value = next((k.value for k in value.keywords if k.arg == "default"),
                                 value.args[0] if value.args else ast.Constant(None))
                try:
                    out[stmt.target.id] = ast.literal_eval(value)
                except ValueError:
                    pass  # field(default_factory=...), a name such as tuple(UNET_TARGETS), and the like
    return out


def _recipe_defaults(path: Path, tree: ast.AST):
    """(line, key, value) of each literal item of a module-level `DEFAULTS = {...}` (a recipe's own defaults)."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DEFAULTS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            for k, v in zip(node.value.keys, node.value.values):
                try:
                    yield node.lineno, ast.literal_eval(k), ast.literal_eval(v)
                except ValueError:
                    continue


def test_no_argparse_default_repeating_config():
    """A training flag whose explicit default (add_argument's default=, or set_defaults) equals TrainConfig's: the
    default belongs to the config alone. (default=None is argparse's "not given", not a repeat.)"""
    defaults, rows = _config_defaults(), []
    assert {"learning_rate", "rank", "train_batch_size"} <= defaults.keys(), "the config's defaults were not found"
    for path in [p for p in PKG_FILES if p.relative_to(PKG).parts[0] in ("cli", "recipes")] + RECIPES:
        for line, key, value in _recipe_defaults(path, _tree(path)):
            if key in defaults and value is not None and value == defaults[key]:
                rows.append(f"{_rel(path)}:{line} DEFAULTS[{key!r}] = {value!r}")
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "set_defaults":
                for k in node.keywords:  # p.set_defaults(num_train_epochs=1): a recipe's own default, unless equal
                    try:
                        value = ast.literal_eval(k.value)
                    except ValueError:
                        continue
                    if k.arg in defaults and value is not None and value == defaults[k.arg]:
                        rows.append(f"{_rel(path)}:{node.lineno} set_defaults({k.arg}={value!r})")
                continue
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            longs = [f for f in flags if f.startswith("--")]
            dest = kw["dest"].value if isinstance(kw.get("dest"), ast.Constant) else \
                (longs[0][2:].replace("-", "_") if longs else None)
            if dest not in defaults or "default" not in kw:
                continue
            try:
                value = ast.literal_eval(kw["default"])
            except ValueError:
                continue
            if value is not None and value == defaults[dest]:
                rows.append(f"{_rel(path)}:{node.lineno} {longs[0] if longs else dest} default={value!r}")
    assert not rows, _offenders("argparse defaults repeating TrainConfig's", rows)


# --- private names ----------------------------------------------------------------------------------------------

def _resolve_user(path: Path, module: str) -> str | None:
    """The project module `module` names (an sdlora module or a top-level script/helper), or None."""
    if module.split(".")[0] == "sdlora":
        return module if module in MODULES else None
    return module if module in LOCAL_MODULES else None


def _aliases(path: Path, tree: ast.AST) -> dict[str, str]:
    """Local name -> project module, from every import in the file (one flat scope: good enough for these files)."""
    out = {}
    for node in _import_nodes(tree, type_checking=True):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    if _resolve_user(path, a.name):
                        out[a.asname] = a.name
                elif _resolve_user(path, a.name.split(".")[0]) or a.name.split(".")[0] == "sdlora":
                    out[a.name.split(".")[0]] = a.name.split(".")[0]
        else:
            base = _absolute(path, node) if path.suffix == ".py" and PKG in path.parents else (node.module or "")
            for a in node.names:
                if _resolve_user(path, f"{base}.{a.name}") and base:
                    out[a.asname or a.name] = f"{base}.{a.name}"
    for node in ast.walk(tree):  # m = importlib.import_module("sdlora.x")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and _call_name(node.value) == "import_module" \
                and node.value.args and isinstance(node.value.args[0], ast.Constant) \
                and isinstance(node.value.args[0].value, str) and _resolve_user(path, node.value.args[0].value):
            out[node.targets[0].id] = node.value.args[0].value
    return out


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _module_of(expr: ast.expr, aliases: dict[str, str], path: Path) -> str | None:
    """The project module `expr` (a name or dotted attribute chain) evaluates to, if any."""
    dotted = _dotted(expr)
    if not dotted:
        return None
    head, _, rest = dotted.partition(".")
    if head not in aliases:
        return None
    full = aliases[head] + ("." + rest if rest else "")
    return _resolve_user(path, full)


def _embedded_code(tree: ast.AST) -> list[tuple[ast.Module, int]]:
    """Code in string constants that a script runs in a child process (`python -c CODE`): (tree, line offset)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" in node.value \
                and ("import sdlora" in node.value or "from sdlora" in node.value or "import train_" in node.value):
            try:
                out.append((ast.parse(node.value), node.lineno - 1))
            except SyntaxError:
                pass
    return out


def _private_uses(path: Path) -> list[str]:
    tree = _tree(path)
    rows = _private_uses_in(path, tree, 0)
    for code, offset in _embedded_code(tree):
        rows += _private_uses_in(path, code, offset)
    return rows


def _private_uses_in(path: Path, tree: ast.AST, offset: int) -> list[str]:
    rows, aliases, rel = [], _aliases(path, tree), _rel(path)
    for node in _import_nodes(tree, type_checking=True):
        if isinstance(node, ast.ImportFrom):
            base = _absolute(path, node) if PKG in path.parents else (node.module or "")
            if not _resolve_user(path, base) and not _resolve_user(path, base.split(".")[0]):
                continue
            rows += [f"{rel}:{node.lineno + offset} {base}.{a.name}" for a in node.names if _is_private(a.name)]
            rows += [f"{rel}:{node.lineno + offset} {base}" for p in base.split(".") if _is_private(p)][:1]
        else:
            rows += [f"{rel}:{node.lineno + offset} {a.name}" for a in node.names
                     if (_resolve_user(path, a.name) or a.name.startswith("sdlora."))
                     and any(_is_private(p) for p in a.name.split("."))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            m = _module_of(node.value, aliases, path)
            if m:
                rows.append(f"{rel}:{node.lineno + offset} {m}.{node.attr}")
        elif isinstance(node, ast.Call) and _call_name(node) in ("setattr", "getattr", "hasattr", "delattr", "object") \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and _is_private(node.args[1].value):
            m = _module_of(node.args[0], aliases, path)
            if m:  # monkeypatch.setattr(m, "_x", ...), setattr(m, "_x", ...), mock.patch.object(m, "_x")
                rows.append(f"{rel}:{node.lineno + offset} {m}.{node.args[1].value} ({_call_name(node)})")
        elif isinstance(node, ast.Call) and _call_name(node) in ("setattr", "delattr", "patch") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            target = node.args[0].value  # monkeypatch.setattr("sdlora.x._y", ...), mock.patch("sdlora.x._y")
            if (target.startswith("sdlora.") or target.split(".")[0] in LOCAL_MODULES) \
                    and any(_is_private(p) for p in target.split(".")):
                rows.append(f"{rel}:{node.lineno + offset} {target} ({_call_name(node)})")
    return rows


def test_no_private_name_across_modules():
    """`from m import _x`, `m._x`, `monkeypatch.setattr(m, "_x", ...)` where m is another project module (sdlora's,
    a recipe script, a helper beside the file): in sdlora/, the recipes, tests/, benchmarks/ and examples/."""
    rows = list(dict.fromkeys(r for path in USER_FILES for r in _private_uses(path)))
    assert not rows, _offenders("private names used across modules", rows)


def test_no_sys_path_edits_in_examples():
    rows = []
    examples = _py_files(ROOT / "examples") + sorted((ROOT / "examples").rglob("*.ipynb"))
    for path in examples:
        for node in ast.walk(_tree(path)):
            target = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if _dotted(node.func.value) == "sys.path":
                    target = f"sys.path.{node.func.attr}"
                elif _dotted(node.func) == "site.addsitedir":
                    target = "site.addsitedir"
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    t = t.value if isinstance(t, ast.Subscript) else t
                    if _dotted(t) == "sys.path":
                        target = "sys.path ="
            elif isinstance(node, ast.ImportFrom) and node.module == "sys" and \
                    any(a.name == "path" for a in node.names):
                target = "from sys import path"
            if target:
                rows.append(f"{_rel(path)}:{node.lineno} {target}")
    assert not rows, _offenders("sys.path edits in examples/", rows)
