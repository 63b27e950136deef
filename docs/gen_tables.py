"""Regenerate the generated tables of docs/methods.md and docs/architecture.md.

    python docs/gen_tables.py --check   # exit 1, with a diff, when a table is stale
    python docs/gen_tables.py --write   # rewrite the tables in place
    python docs/gen_tables.py --cycles  # print import cycles (top-level units, modules)

Each table sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; text
outside the markers is written by hand and left alone. Registry tables (methods.md,
`generated:registry:SLUG`, listed in REGISTRY_TABLES) come from the live registries after
importing every module of grouprl: name (with its non-default registered capabilities),
keyword-only parameters with defaults, inputs where asked, docstring summary; a registry
of dataclass records (INPUTS) gets one column per field. The module table (architecture.md,
`generated:modules`) is read from the source tree with `ast`: one row per top-level module
or subpackage of `src/grouprl`, its job from docstrings, and the other top-level units it
imports (imports inside functions included, marked late; `if TYPE_CHECKING:` ones left out).
--check and --write also fail (exit 1) when a registry in the source has no table.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import inspect
import pkgutil
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PKG = "grouprl"
METHODS_MD = REPO / "docs" / "methods.md"
ARCHITECTURE_MD = REPO / "docs" / "architecture.md"
REGENERATE = "python docs/gen_tables.py --write"


# ------------------------------------------------------------------ shared helpers


def summary(doc: str | None, limit: int = 160) -> str:
    """A docstring's summary: its first paragraph on one line, cut to its first sentence
    when longer than `limit`; `|` escaped for markdown tables."""
    para = " ".join((doc or "").split("\n\n")[0].split())
    if len(para) > limit and ". " in para[20:]:
        para = para[: para.index(". ", 20) + 1]
    return para.replace("|", "\\|")


class DocError(Exception):
    """A doc whose markers do not fit the generators."""


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"


def replace_blocks(text: str, blocks: dict[str, str], where: str) -> str:
    """Put each body between its markers; every marker pair must be present exactly once
    and every `generated:` marker in `text` must be one we generate."""
    found = set(re.findall(r"<!-- generated:(\S+) -->", text))
    unknown = sorted(found - set(blocks))
    if unknown:
        raise DocError(f"{where}: markers with no generator: {', '.join(unknown)}")
    for name, body in blocks.items():
        start, end = _markers(name)
        if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
            raise DocError(f"{where}: need exactly one {start} ... {end} pair")
        head, rest = text.split(start)
        _, tail = rest.split(end)
        text = f"{head}{start}\n{body.rstrip()}\n{end}{tail}"
    return text


# ------------------------------------------------------------------ registry tables


@dataclass(frozen=True)
class RegistryTable:
    slug: str  # marker: generated:registry:<slug>
    registry: str  # "module:ATTRIBUTE"
    inputs: bool = False  # add the "inputs" column (components called by input name)


REGISTRY_TABLES = [
    RegistryTable("advantages", "grouprl.algorithms.advantages:ADVANTAGES", inputs=True),
    RegistryTable("modifiers", "grouprl.algorithms.advantages:ADVANTAGE_MODIFIERS", inputs=True),
    RegistryTable("losses", "grouprl.algorithms.losses:LOSSES"),
    RegistryTable("aggregations", "grouprl.algorithms.aggregation:AGGREGATIONS"),
    RegistryTable("regularizers", "grouprl.algorithms.regularizers:REGULARIZERS"),
    RegistryTable("token_masks", "grouprl.algorithms.selection:TOKEN_MASKS", inputs=True),
    RegistryTable("sample_filters", "grouprl.algorithms.selection:SAMPLE_FILTERS", inputs=True),
    RegistryTable("samplers", "grouprl.data.samplers:SAMPLERS"),
    RegistryTable("rollout_strategies", "grouprl.training.strategies.base:ROLLOUT_STRATEGIES"),
    RegistryTable("sft_transforms", "grouprl.training.sft_transforms:SFT_TRANSFORMS"),
    RegistryTable("rewards", "grouprl.rewards.base:REWARDS"),
    RegistryTable("reward_models", "grouprl.rewards.models:REWARD_MODELS"),
    RegistryTable("tasks", "grouprl.data.tasks.base:TASKS"),
    RegistryTable("benchmarks", "grouprl.data.benchmarks:BENCHMARKS"),
    RegistryTable("rollout_engines", "grouprl.rollout.base:ROLLOUT_ENGINES"),
    RegistryTable("mismatch", "grouprl.algorithms.mismatch:MISMATCH_CORRECTIONS"),
    RegistryTable("strategies", "grouprl.training.parallel:STRATEGIES"),
    RegistryTable("trackers", "grouprl.monitor.trackers:TRACKERS"),
    RegistryTable("environments", "grouprl.envs.base:ENVIRONMENTS"),
    RegistryTable("tools", "grouprl.envs.base:TOOLS"),
    RegistryTable("tool_parsers", "grouprl.envs.parsing:TOOL_PARSERS"),
    RegistryTable("inputs", "grouprl.inputs:INPUTS"),
]


def import_all() -> None:
    """Import every module of grouprl, so that every registration has run."""
    pkg = importlib.import_module(PKG)
    for info in pkgutil.walk_packages(pkg.__path__, f"{PKG}."):
        importlib.import_module(info.name)


def declared_registries() -> list[str]:
    """`module:NAME` of every module-level `NAME = Registry(...)` in the source tree."""
    out = []
    for path in sorted((SRC / PKG).rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
            call = value.func if isinstance(value, ast.Call) else None
            if not (isinstance(call, ast.Name) and call.id == "Registry"):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    out.append(f"{module_name(path)}:{t.id}")
    return out


def uncovered_registries() -> list[str]:
    """Registries in the source that no table in REGISTRY_TABLES documents."""
    covered = {t.registry for t in REGISTRY_TABLES}
    return [r for r in declared_registries() if r not in covered]


def _fmt_params(params: dict[str, inspect.Parameter]) -> str:
    cells = [
        f"`{n}`" if p.default is p.empty else f"`{n}={p.default!r}`" for n, p in params.items()
    ]
    return ", ".join(cells) or "—"


def _cell(value: object, prose: bool) -> str:
    if isinstance(value, str):
        return value.replace("|", "\\|") if prose else f"`{value}`"
    if isinstance(value, set | frozenset | list | tuple):
        return ", ".join(f"`{v}`" for v in sorted(map(str, value))) or "—"
    return f"`{value!r}`"


def record_table(reg: Any) -> str:
    """Registries of dataclass records (e.g. INPUTS): one column per non-callable field;
    a column of strings is prose when any of them has five words or more, else code."""
    records = [(n, reg.get(n)) for n in reg.names()]
    cols = [
        f.name
        for f in dataclasses.fields(records[0][1])
        if f.name != "name" and not callable(getattr(records[0][1], f.name))
    ]
    prose = {
        c: any(
            isinstance(v, str) and len(v.split()) >= 5 for v in (getattr(r, c) for _, r in records)
        )
        for c in cols
    }
    lines = ["| name | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in records:
        cells = " | ".join(_cell(getattr(r, c), prose[c]) for c in cols)
        lines.append(f"| `{name}` | {cells} |")
    return "\n".join(lines) + "\n"


def capability_flags(reg: Any, name: str) -> list[str]:
    """The capabilities `name` was registered with that differ from the defaults."""
    caps = reg.capabilities(name) if hasattr(reg, "capabilities") else None
    if not dataclasses.is_dataclass(caps):
        return []
    default = type(caps)()
    out = []
    for f in dataclasses.fields(caps):
        value = getattr(caps, f.name)
        if value != getattr(default, f.name):
            out.append(f.name if value is True else f"{f.name}={value!r}")
    return out


def registry_table(spec: RegistryTable) -> str:
    from grouprl.registry import config_params, input_params

    module, attr = spec.registry.split(":")
    reg = getattr(importlib.import_module(module), attr)
    if reg.names() and all(
        dataclasses.is_dataclass(reg.get(n)) and not inspect.isclass(reg.get(n))
        for n in reg.names()
    ):
        return record_table(reg)
    head = "| name | parameters (defaults) |" + (" inputs |" if spec.inputs else "") + " summary |"
    lines = [head, "|---" * (4 if spec.inputs else 3) + "|"]
    for name in reg.names():
        obj = reg.get(name)
        flags = capability_flags(reg, name)
        label = f"`{name}`" + (f" ({', '.join(flags)})" if flags else "")
        row = f"| {label} | {_fmt_params(config_params(obj))} |"
        if spec.inputs:
            ins = input_params(obj)
            row += (
                " "
                + ", ".join(
                    f"`{n}`" + ("" if p.default is p.empty else " (optional)")
                    for n, p in ins.items()
                )
                + " |"
            )
        lines.append(f"{row} {summary(inspect.getdoc(obj))} |")
    return "\n".join(lines) + "\n"


def registry_blocks() -> dict[str, str]:
    import_all()
    return {f"registry:{t.slug}": registry_table(t) for t in REGISTRY_TABLES}


# ------------------------------------------------------------------ module table


def module_name(path: Path) -> str:
    """Dotted name of a source file: src/grouprl/a/__init__.py -> grouprl.a."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass
class Unit:
    """A top-level module (`config.py`), subpackage (`training/`) or `__init__.py`."""

    label: str
    path: Path
    files: list[Path]
    deps: dict[str, bool] = field(default_factory=dict)  # unit label -> only late imports


@dataclass(frozen=True)
class Edge:
    src: str  # dotted module names
    dst: str
    late: bool  # inside a function body: runs at call time, not at import


def units() -> dict[str, Unit]:
    root = SRC / PKG
    out: dict[str, Unit] = {}
    for path in sorted(root.iterdir()):
        if path.suffix == ".py":
            out[path.name] = Unit(path.name, path, [path])
        elif (path / "__init__.py").is_file():
            out[f"{path.name}/"] = Unit(f"{path.name}/", path, sorted(path.rglob("*.py")))
    return out


def known_modules() -> set[str]:
    return {module_name(p) for p in (SRC / PKG).rglob("*.py")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, late: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Import nodes (and import_module calls) with whether they run only when called;
    imports under `if TYPE_CHECKING:` are skipped (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), late)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom | ast.Call):
            yield node, late
        inner = late or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _imports(node, inner)


def _is_import_module(node: ast.AST) -> bool:
    """A call of `importlib.import_module` (or a bare `import_module`)."""
    if not isinstance(node, ast.Call):
        return False
    return getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"


def module_edges(path: Path, modules: set[str]) -> list[Edge]:
    """The grouprl modules that `path` imports, resolved to real modules of the tree."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]

    def resolve(base: str, names: list[str]) -> list[str]:
        # `from a.b import c` imports module a.b.c when it exists, else names from a.b
        hits = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
        return hits + ([base] if len(hits) < len(names) else [])

    tree = ast.parse(path.read_text(encoding="utf-8"))
    edges = []
    for node, late in _imports(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = resolve(base, [a.name for a in node.names])
        elif _is_import_module(node):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                targets = [arg.value]
            else:  # a computed name (a lazy table): every module named in the file, late
                late = True
                targets = [
                    c.value
                    for c in ast.walk(tree)
                    if isinstance(c, ast.Constant)
                    and isinstance(c.value, str)
                    and c.value in modules
                ]
        for t in targets:
            while t and t not in modules and "." in t:
                t = t.rpartition(".")[0]  # a name inside a module: the module
            if t in modules and t != here and (t == PKG or t.startswith(PKG + ".")):
                edges.append(Edge(here, t, late))
    return edges


def unit_of(module: str, all_units: dict[str, Unit]) -> str:
    """The top-level unit label of a dotted module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__.py"
    return f"{parts[1]}/" if f"{parts[1]}/" in all_units else f"{parts[1]}.py"


def import_graph() -> tuple[dict[str, Unit], list[Edge]]:
    """Top-level units (with their dependencies filled in) and all module import edges."""
    all_units = units()
    modules = known_modules()
    late: dict[tuple[str, str], bool] = {}  # an import is late only if every one is
    for u in all_units.values():
        for f in u.files:
            for e in module_edges(f, modules):
                late[e.src, e.dst] = late.get((e.src, e.dst), True) and e.late
    edges = [Edge(a, b, lt) for (a, b), lt in sorted(late.items())]
    for e in edges:
        a, b = unit_of(e.src, all_units), unit_of(e.dst, all_units)
        if a != b:
            deps = all_units[a].deps
            deps[b] = deps.get(b, True) and e.late
    return all_units, edges


def _doc(path: Path) -> str | None:
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))


def _job(unit: Unit) -> str:
    if unit.path.is_file():
        return summary(_doc(unit.path)) or "*(no module docstring)*"
    lines = [summary(_doc(unit.path / "__init__.py")) or "*(no package docstring)*"]
    for child in sorted(unit.path.iterdir()):
        if child.suffix == ".py" and child.name != "__init__.py":
            lines.append(f"`{child.name}`: {summary(_doc(child)) or '*(no docstring)*'}")
        elif (child / "__init__.py").is_file():
            names = ", ".join(
                f"`{p.name}`" for p in sorted(child.glob("*.py")) if p.name != "__init__.py"
            )
            doc = summary(_doc(child / "__init__.py")) or "*(no docstring)*"
            lines.append(f"`{child.name}/`: {doc} ({names})")
    return "<br>".join(lines)


def module_table() -> str:
    all_units, _ = import_graph()
    order = sorted(all_units, key=lambda k: (k != "__init__.py", k.endswith("/"), k))
    lines = [
        "| module | job | depends on (late: imported only inside functions) |",
        "|---|---|---|",
    ]
    for label in order:
        u = all_units[label]
        deps = ", ".join(
            f"`{d}`" + (" (late)" if late else "") for d, late in sorted(u.deps.items())
        )
        lines.append(f"| `{label}` | {_job(u)} | {deps or '—'} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ cycles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Components of more than one node (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def unit_cycles() -> list[tuple[list[str], list[Edge]]]:
    """Import cycles between top-level units (all imports, late ones included), each with
    the module imports that close it."""
    all_units, edges = import_graph()
    graph = {label: set(u.deps) for label, u in all_units.items()}
    out = []
    for comp in strongly_connected(graph):
        inside = [
            e
            for e in edges
            if unit_of(e.src, all_units) in comp
            and unit_of(e.dst, all_units) in comp
            and unit_of(e.src, all_units) != unit_of(e.dst, all_units)
        ]
        out.append((comp, inside))
    return out


def module_cycles() -> list[list[str]]:
    """Import cycles between single modules (files), late imports included."""
    _, edges = import_graph()
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
    return strongly_connected(graph)


def format_cycles() -> str:
    lines = []
    for comp, inside in unit_cycles():
        lines.append(f"cycle between units: {' <-> '.join(comp)}")
        lines += [f"    {e.src} -> {e.dst}{' (late)' if e.late else ''}" for e in inside]
    for comp in module_cycles():
        lines.append(f"cycle between modules: {' <-> '.join(comp)}")
    return "\n".join(lines) or "no import cycles"


# ------------------------------------------------------------------ files


def expected() -> dict[Path, str]:
    """The text each generated doc should have."""
    methods = METHODS_MD.read_text(encoding="utf-8")
    arch = ARCHITECTURE_MD.read_text(encoding="utf-8")
    return {
        METHODS_MD: replace_blocks(methods, registry_blocks(), METHODS_MD.name),
        ARCHITECTURE_MD: replace_blocks(arch, {"modules": module_table()}, ARCHITECTURE_MD.name),
    }


def stale() -> dict[Path, str]:
    """Unified diffs (file -> expected) of the docs that differ from the generator."""
    out = {}
    for path, text in expected().items():
        current = path.read_text(encoding="utf-8")
        if current != text:
            rel = str(path.relative_to(REPO))
            diff = difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True), rel, rel
            )
            out[path] = "".join(diff)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when a table is stale")
    mode.add_argument("--write", action="store_true", help="rewrite the tables in place")
    mode.add_argument("--cycles", action="store_true", help="print import cycles")
    args = ap.parse_args(argv)
    if args.cycles:
        print(format_cycles())
        return 0
    try:
        return _run(args.write)
    except DocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(write: bool) -> int:
    missing = uncovered_registries()
    if missing:
        print(f"registries without a table (add them to REGISTRY_TABLES): {', '.join(missing)}")
    if write:
        for path, text in expected().items():
            if path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
                print(f"wrote {path.relative_to(REPO)}")
        print(format_cycles())
        return 1 if missing else 0
    diffs = stale()
    for diff in diffs.values():
        sys.stdout.write(diff)
    if diffs:
        print(f"stale generated tables: run `{REGENERATE}`")
    print(format_cycles())
    return 1 if diffs or missing else 0


if __name__ == "__main__":
    sys.exit(main())
