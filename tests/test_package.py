"""The package as a whole: imports layered without cycles, every module's __all__, one version."""

from __future__ import annotations

import sdm


def test_import_graph_is_layered() -> None:
    """sdm's modules import each other without cycles at module level (imports inside functions are deferred on
    purpose and not counted), and nothing but the CLI's entry points imports the CLI."""
    import ast
    from pathlib import Path

    root = Path(sdm.__file__).parent
    names = {p: ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__") for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    cli_users = set()
    for path, name in names.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            if any(t == "sdm.cli" for t in targets):
                cli_users.add(name)
            if node in tree.body or any(node in getattr(top, "body", []) for top in tree.body if isinstance(top, ast.If)):
                found |= {t for t in targets if t.startswith("sdm") and t != name}
        graph[name] = found
    assert cli_users <= {"sdm.__main__"}, f"modules importing the CLI: {sorted(cli_users)}"

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join([*stack[stack.index(node):], node])}")
        if node in done or node not in graph:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [], done)


def test_every_module_says_what_it_exports() -> None:
    """Every module of sdm defines `__all__`, and every name in it exists (lazy ones included)."""
    import importlib
    from pathlib import Path

    root = Path(sdm.__file__).parent
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        if name == "sdm.__main__":
            continue
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{name}.__all__ names what it lacks: {missing}"


def test_one_version() -> None:
    """The package's version (stamped on every result) is the one pyproject.toml declares."""
    import re
    from pathlib import Path

    pyproject = (Path(sdm.__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, flags=re.M).group(1) == sdm.__version__
