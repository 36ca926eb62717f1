"""The package layout: the repository's top-level folders are the `dsv3` packages (setup.py maps
`dsv3.model` to `model/`, and so on), imports run one way, launch -> train -> {parallel, fp8, data}
-> model, and no two modules import each other, even through a function-level import."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"model": 0, "data": 1, "fp8": 1, "parallel": 1, "train": 2, "launch": 3}


def modules() -> dict[str, Path]:
    """dsv3 module name -> its file, for every module of the packages."""
    found = {}
    for package in RANK:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("dsv3", *(parts[:-1] if parts[-1] == "__init__" else parts)))
            found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """The dsv3 modules a module imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name.startswith("dsv3.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            if base.startswith("dsv3"):  # `from package import module` imports the module
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return targets


MODULES = modules()
GRAPH = {name: {t for t in imports(name, path) if t in MODULES and t != name} for name, path in MODULES.items()}


def test_every_dsv3_import_names_a_file_of_the_repository():
    unresolved = {}
    for name, path in MODULES.items():
        for target in imports(name, path):
            candidates = [target, target.rsplit(".", 1)[0]]  # a module, or a name defined in one
            if not any(c in MODULES for c in candidates):
                unresolved.setdefault(name, []).append(target)
    assert not unresolved


def test_imports_run_one_way_between_packages():
    upward = sorted(f"{name} imports {target}" for name, targets in GRAPH.items() for target in targets
                    if (a := name.split(".")[1]) != (b := target.split(".")[1]) and RANK[b] >= RANK[a])
    assert not upward


def test_no_two_modules_import_each_other():
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(t == goal or (t not in seen and not seen.add(t) and reaches(t, goal, seen)) for t in GRAPH[start])

    cycles = sorted(name for name in GRAPH if reaches(name, name, set()))
    assert not cycles
