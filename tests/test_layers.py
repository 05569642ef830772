"""The import rules of the layout (docs/internals.md, "Layers"), checked on the source:

* imports only go down: applications (cli, serve, compat, eval, testing) -> api -> methods -> models -> kernels,
  with errors and validation as shared utilities below the model layer;
* no import circles between modules;
* no ``_private`` name imported from another module.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = {"fastalign._C"}  # the compiled native extension: a module, imported by models/native.py alone
PACKAGES = {"fastalign": ROOT / "fastalign", "fastalign.kernels": ROOT / "kernels"}
# the lowest layer first; a module may import its own layer and those below
LAYERS = [("kernels", ["fastalign.kernels"]), ("utilities", ["fastalign.errors", "fastalign.validation"]),
          ("models", ["fastalign.models"]), ("methods", ["fastalign.methods"]), ("api", ["fastalign.api"]),
          ("applications", ["fastalign.cli", "fastalign.serve", "fastalign.compat", "fastalign.eval",
                            "fastalign.testing", "fastalign.__main__"])]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if package == "fastalign" and path.is_relative_to(PACKAGES["fastalign.kernels"]):
                continue  # a symlink to kernels/ in some checkouts
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None  # fastalign/__init__.py: loads its public names lazily


def imports(module: str, path: Path, known: dict) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import of ``module`` inside the library."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names if alias.name.startswith("fastalign")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fastalign"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub, None) if sub in known or sub in EXTENSIONS else (target, alias.name))
    return out


def graph():
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}, known


def test_imports_only_go_down():
    edges, _ = graph()
    upward = []
    for module, targets in edges.items():
        mine = layer_of(module)
        for target, _ in targets:
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    edges, known = graph()
    deps = {m: {t for t, _ in targets if t in known and t != m} for m, targets in edges.items()}
    circles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(deps[m]):
            if state.get(t) == "open":
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(deps):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(circles)


def test_no_private_name_is_imported_from_another_module():
    edges, _ = graph()
    private = [f"{module} imports {target}.{name}" for module, targets in edges.items()
               for target, name in targets if name is not None and name.startswith("_") and target != module]
    assert not private, "\n".join(private)
