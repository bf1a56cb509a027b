"""The package layout's promises: public import paths that outlive moves, an engine without Beam."""

from __future__ import annotations

import os
import subprocess
import sys

import transforms.engine.smoothgrad as engine
from tests import import_graph


def test_transforms_smoothgrad_still_exports_the_engine_names():
    import transforms.smoothgrad as public

    assert public.SmoothGrad is engine.SmoothGrad
    assert set(public.__all__) == set(engine.__all__)
    for name in engine.__all__:
        assert getattr(public, name) is getattr(engine, name), name


def test_the_engine_imports_nothing_of_beam_or_the_steps_in_its_source():
    engine = {name: path for name, path in import_graph.modules(("transforms",)).items()
              if name == "transforms.engine" or name.startswith("transforms.engine.")}
    assert len(engine) >= 14, sorted(engine)
    wrong = []
    for name, path in engine.items():
        for imported, line in import_graph.imported_names(path, name, path.endswith("__init__.py")):
            top = imported.split(".")[0]
            outside = top == "pipelines" or (top == "transforms" and imported not in ("transforms", "transforms.engine")
                                             and not imported.startswith("transforms.engine."))
            if top == "apache_beam" or outside:
                wrong.append(f"{os.path.relpath(path, import_graph.REPO)}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_importing_every_engine_module_loads_no_beam():
    code = ("import importlib, pkgutil, sys\n"
            "import transforms.engine as engine\n"
            "for module in pkgutil.walk_packages(engine.__path__, 'transforms.engine.'):\n"
            "    importlib.import_module(module.name)\n"
            "print(sorted(name for name in sys.modules if name == 'apache_beam' or name.startswith('apache_beam.')"
            " or (name.startswith('transforms.') and not name.startswith('transforms.engine'))"
            " or name.startswith('pipelines')))\n")
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", code], cwd=import_graph.REPO, env=environment, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_no_import_circles_in_pipelines_and_transforms():
    edges = import_graph.graph()
    assert "pipelines.smoothgrad_audit" in edges and "transforms.engine.smoothgrad" in edges
    circles = import_graph.cycles(edges)
    described = [" -> ".join(f"{module} (line {edges[module][target]})" for module, target in zip(circle, circle[1:]))
                 + f" -> {circle[-1]}" for circle in circles]
    assert not circles, "import circles (imports inside functions count):\n" + "\n".join(described)


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def later():\n    from pkg.a import thing\n")
    (package / "c.py").write_text("import pkg.a\n")
    edges = import_graph.graph(("pkg",), root=str(tmp_path))
    assert edges["pkg.c"] == {"pkg.a": 1}
    assert import_graph.cycles(edges) == [["pkg.a", "pkg.b", "pkg.a"]]
