"""The layers of uncdiff/ (README, "Layout"): imports point one way and never form a cycle, and the
math reads no files and draws nothing.

Every `import` statement counts, at module level or inside a function, so a lazy import cannot
hide a wrong-way dependency."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "uncdiff"
CALLBACKS = Path(__file__).resolve().parent.parent / "callbacks"
# Each layer may import only the layers before it (and itself). The math (core, uncertainty) comes first:
# files (io) and data sets (data) are read outside it and handed to it as tensors and values.
LAYERS = ["core", "uncertainty", "io", "data", "evaluation", "lightning", "callbacks", "commands", "cli"]
MATH = ("core", "uncertainty")
# Training and logging frameworks, plotting and progress bars: the math takes callbacks instead.
NOT_IN_MATH = ("lightning", "pytorch_lightning", "wandb", "matplotlib", "tqdm")
# what the commands share (their options, settings and runtime); not commands themselves
COMMANDS_SHARED = {"uncdiff.commands.options", "uncdiff.commands.settings", "uncdiff.commands.runtime"}


def module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in CALLBACKS.glob("*.py"):
        name = "uncdiff.callbacks" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = path
    return out


def all_imports(path: Path, name: str) -> set[str]:
    """Every module that `path` (the module `name`) imports, ours and others', with relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def imports_of(path: Path, name: str) -> set[str]:
    return {m for m in all_imports(path, name) if m == "uncdiff" or m.startswith("uncdiff.")}


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "cli"  # uncdiff/__main__.py etc.: the top


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: {m for t in imports_of(path, name) if (m := resolve(t, modules)) and m != name and m != "uncdiff"}
            for name, path in modules.items()}


def test_the_layers_are_folders_of_the_package():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(LAYERS) - {"callbacks", "cli"} <= folders


@pytest.mark.parametrize("module", sorted(module_files()))
def test_imports_point_one_way(module):
    deps = graph()[module]
    mine = LAYERS.index(layer(module))
    wrong = sorted(d for d in deps if LAYERS.index(layer(d)) > mine)
    assert not wrong, f"{module} ({layer(module)}) imports a later layer: {wrong}"
    if layer(module) == "commands" and module not in (*COMMANDS_SHARED, "uncdiff.commands"):
        others = sorted(d for d in deps if layer(d) == "commands" and d not in COMMANDS_SHARED)
        assert not others, f"the command {module} imports another command: {others}"


def test_core_imports_nothing_else_of_ours():
    g = graph()
    for module, deps in g.items():
        if layer(module) == "core":
            assert all(layer(d) == "core" for d in deps), (module, deps)


def test_the_math_reads_no_files_and_draws_nothing():
    """core and uncertainty import neither io nor data (the order above), nor Lightning, W&B, matplotlib
    or tqdm: a progress bar is a callback handed in (`uncdiff.core.samplers.Progress`)."""
    modules = module_files()
    for module, path in sorted(modules.items()):
        if layer(module) in MATH:
            ours = {m for t in imports_of(path, module) if (m := resolve(t, modules))}
            banned = sorted(m for m in ours if layer(m) in ("io", "data"))
            banned += sorted({m for m in all_imports(path, module) if m.split(".")[0] in NOT_IN_MATH})
            assert not banned, f"the math module {module} imports {banned}"


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in g.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_wrong_way_and_lazy_imports(tmp_path):
    """The checker itself: a function-level import is found, and a relative one is resolved."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from uncdiff.commands import sample\n    import tqdm.auto\nfrom . import samplers\n")
    found = imports_of(source, "uncdiff.core.m")
    assert "uncdiff.commands.sample" in found and "uncdiff.core.samplers" in found
    assert "tqdm.auto" in all_imports(source, "uncdiff.core.m")
