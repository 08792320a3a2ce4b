"""The map in DESIGN.md, checked: layers import downward only, no import circle, exporters never imports
edgelm, edgelm never imports runtime_tests. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgelm", "exporters", "runtime_tests")
#: The ground floor: imports only itself and exporters.
GROUND = {
    "edgelm",
    "edgelm.errors",
    "edgelm.fsutil",
    "edgelm.bundle",
    "edgelm.schemes",
    "edgelm.tasks",
    "edgelm.hostinfo",
    "edgelm.report",
    "edgelm.models",
    "edgelm.profiles",
    "edgelm.data",
}
TOP = {"edgelm.cli", "edgelm.pipeline", "edgelm.generative"}  # generative: the text-generation pipeline


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (module level or in a function)."""
    edges = {}
    for name, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        edges[name] = {d for d in deps if d in mods and d != name}
    return edges


EDGES = _imports(_modules())


def test_the_walk_sees_the_imports():
    assert "edgelm.schemes" in EDGES["edgelm.recipe"] and "exporters" in EDGES["edgelm.pipeline"]
    assert "edgelm.bundle" in EDGES["edgelm.validate.adb"] and "edgelm.validate.bundle" in EDGES["edgelm.cli"]


def test_exporters_never_import_edgelm_and_edgelm_never_imports_runtime_tests():
    bad = [(m, d) for m, ds in EDGES.items() for d in ds if m.startswith("exporters") and d.startswith("edgelm")]
    bad += [(m, d) for m, ds in EDGES.items() for d in ds if m.startswith("edgelm") and d.startswith("runtime_tests")]
    assert not bad


def test_ground_floor_imports_nothing_above_it():
    bad = [(m, d) for m in GROUND for d in EDGES[m] if d.startswith("edgelm") and d not in GROUND]
    assert not bad, bad


def test_nothing_imports_the_pipeline_or_cli_but_the_layers_above():
    bad = [(m, d) for m, ds in EDGES.items() for d in ds if d in TOP and m not in TOP]
    assert not bad, bad
    assert "edgelm.cli" not in EDGES["edgelm.pipeline"]


def test_no_import_circle():
    """No cycle among edgelm's modules (a package importing its own plug-in modules is not one: exporters
    imports its format modules by name at run time, and they import the package's ``register``)."""
    graph = {m: {d for d in ds if d.startswith("edgelm")} for m, ds in EDGES.items() if m.startswith("edgelm")}
    graph["edgelm"] = set()  # the package's __init__ imports nothing; ``import edgelm`` is not an upward edge
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(d) :], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_one_module_per_runner():
    """host, emulator, ssh and adb each in its own module, each satisfying the Runner protocol."""
    from edgelm.validate import adb, emulator, host, ssh
    from edgelm.validate.runner import Runner

    for module, cls in ((host, "HostRunner"), (emulator, "EmulatorRunner"), (ssh, "SSHRunner"), (adb, "AdbRunner")):
        runner_cls = getattr(module, cls)
        assert runner_cls.__module__ == module.__name__
        assert all(hasattr(runner_cls, a) for a in ("name", "kind", "emulated", "describe", "run_bundle"))
    assert isinstance(host.HostRunner(), Runner)
