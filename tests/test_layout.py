"""The layers of ../shared/DESIGN.md, read from the source: imports point down only, and no module
imports itself through others (every import counts, those inside functions too)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ldm", "pipelines", "finetune", "shapes", "configs")
# what each package may import besides itself (shapes.world and shapes.clip are the exception below)
ALLOWED = {"ldm": set(), "pipelines": {"ldm"}, "finetune": {"ldm", "pipelines", "configs", "shapes"},
           "shapes": {"ldm", "pipelines", "finetune", "configs"}, "configs": set()}
# the bottom of the shapes package: what finetune's shapes-model trainings render from
SHAPES_BASE = {"shapes.world", "shapes.clip", "shapes"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    mods = {module_name(p): p for p in files}
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_imports_point_down_only():
    wrong = []
    for mod, deps in graph().items():
        top = mod.split(".")[0]
        for d in deps:
            dtop = d.split(".")[0]
            if dtop == top:
                continue
            if dtop not in ALLOWED[top] or (top == "finetune" and dtop == "shapes" and d not in SHAPES_BASE):
                wrong.append(f"{mod} -> {d}")
    for mod in ("shapes.world", "shapes.clip"):  # the base of shapes sits just above ldm
        wrong += [f"{mod} -> {d}" for d in graph()[mod] if not (d.startswith("ldm") or d in SHAPES_BASE)]
    assert not wrong, wrong


def test_no_import_cycles():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, cycles
