"""Worker packaging: what ``--setup_file ./setup.py`` ships, installed and run outside the source tree.

Dataflow's launcher builds an sdist from setup.py (Beam's ``Stager``, called here
as the launcher calls it) and each worker pip-installs it. The test builds that
sdist from a copy of the source, builds a wheel from the sdist, installs the
wheel into a fresh virtual environment and runs the pipeline and ``report`` with
it from a folder outside the source tree. The fresh environment sees this
environment's third-party packages through a ``.pth`` file (nothing is
downloaded) but not this checkout: ``python -I`` ignores ``PYTHONPATH`` and the
current folder, and the editable install's import hook is not loaded there.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipelines", "transforms")


def _source_files() -> set[str]:
    """The package files the project ships, relative to the repository (sources and templates)."""
    files = set()
    for package in PACKAGES:
        for path in glob.glob(os.path.join(REPO, package, "**", "*"), recursive=True):
            relative = os.path.relpath(path, REPO)
            if os.path.isfile(path) and "__pycache__" not in relative and not relative.endswith(".pyc"):
                files.add(relative.replace(os.sep, "/"))
    return files


def _source_packages() -> set[str]:
    """The package folders (with an ``__init__.py``), relative to the repository."""
    return {os.path.relpath(folder, REPO).replace(os.sep, "/")
            for package in PACKAGES for folder, _, names in os.walk(os.path.join(REPO, package))
            if "__init__.py" in names and "__pycache__" not in folder}


def _environment() -> dict:
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return environment


def _check(command, cwd, timeout=300) -> str:
    done = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist (as Beam's stager builds it for --setup_file) and a wheel built from it."""
    from apache_beam.runners.portability.stager import Stager

    folder = tmp_path_factory.mktemp("package")
    source = folder / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("setup.py", "README.md", "MANIFEST.in", "pyproject.toml", "setup.cfg", *PACKAGES):
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=ignore)
        elif os.path.exists(path):
            os.makedirs(source, exist_ok=True)
            shutil.copy2(path, source / name)
    sdist = Stager._build_setup_package(str(source / "setup.py"), str(folder / "sdist"), None)
    with tarfile.open(sdist) as archive:
        archive.extractall(folder / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        sdist_names = archive.getnames()
    unpacked = glob.glob(str(folder / "unpacked" / "*" / "setup.py"))[0]
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
            "--wheel-dir", str(folder / "wheel"), os.path.dirname(unpacked)], cwd=str(folder))
    wheel = glob.glob(str(folder / "wheel" / "*.whl"))[0]
    return {"folder": folder, "sdist": sdist, "sdist_names": sdist_names, "wheel": wheel}


def test_the_sdist_holds_every_package_file_setup_py_and_readme(built):
    root = os.path.basename(built["sdist"])[:-len(".tar.gz")]
    names = {name[len(root) + 1:] for name in built["sdist_names"] if name.startswith(root + "/")}
    assert {"setup.py", "README.md"} <= names
    missing = _source_files() - names
    assert not missing, missing
    assert {f"pipelines/report/templates/{name}" for name in ("base.html.j2", "report.html.j2", "compare.html.j2",
                                                              "macros.html.j2")} <= names


def test_the_wheel_holds_every_package_file_and_the_console_script(built):
    with zipfile.ZipFile(built["wheel"]) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(name).decode() for name in names if name.endswith("entry_points.txt"))
    missing = _source_files() - names
    assert not missing, missing
    assert not {name for name in names if name.split("/")[0] not in (*PACKAGES,) and ".dist-info/" not in name}
    packages = _source_packages()
    assert {"pipelines/run", "pipelines/report", "pipelines/demo", "pipelines/audit", "transforms/engine",
            "transforms/audit"} <= packages
    in_wheel = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    assert in_wheel == packages, in_wheel ^ packages
    templates = {name for name in names if name.endswith(".j2")}
    assert templates and all(name.startswith("pipelines/report/templates/") for name in templates), templates
    assert {"pipelines/demo/__main__.py", "pipelines/smoothgrad_audit.py"} <= names
    assert "smoothgrad-audit = pipelines.smoothgrad_audit:main" in entry_points


def _fresh_venv(folder) -> str:
    """A new virtual environment that sees this environment's packages, minus this project; returns its python."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    target = subprocess.run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    ours = {os.path.realpath(path) for path in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]}
    with open(os.path.join(target, "_parent_environment.pth"), "w") as handle:
        handle.write("".join(f"{path}\n" for path in sorted(ours)))
    return python


def test_the_wheel_in_a_fresh_venv_runs_the_pipeline_and_a_report_outside_the_source_tree(built):
    folder = built["folder"]
    python = _fresh_venv(folder)
    _check([python, "-I", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--quiet",
            built["wheel"]], cwd=str(folder))
    work = folder / "work"
    work.mkdir()
    where = _check([python, "-I", "-c", "import pipelines, transforms, jinja2; print(pipelines.__file__); "
                    "print(transforms.__file__)"], cwd=str(work)).split()
    venv = os.path.realpath(folder / "venv")
    assert all(os.path.realpath(path).startswith(venv + os.sep) for path in where[-2:]), where
    assert not any(os.path.realpath(path).startswith(os.path.realpath(REPO) + os.sep) for path in where[-2:])

    helpers.write_image_dataset(str(work / "data"), files=2, per_file=4, size=16, classes=3)
    model = helpers.save_tiny_cnn(str(work), size=16, classes=3)
    output = _check([str(folder / "venv" / "bin" / "smoothgrad-audit"), "--input", "data/*.tfrecord",
                     "--output", "out", "--model", model, "--run_id", "wheel", "--samples", "4",
                     "--batch_size", "4", "--progress_seconds", "0"], cwd=str(work))
    assert "Done: 8 records read, 8 explained, 8 rows written, errors: none." in output
    with open(work / "out" / "run_id=wheel" / "_MANIFEST.json") as handle:
        manifest = json.load(handle)
    assert manifest["invariant_holds"] is True and manifest["records_explained"] == 8
    _check([python, "-I", "-m", "pipelines.smoothgrad_audit", "report", "out/run_id=wheel"], cwd=str(work))
    _check([python, "-I", "-c", "from transforms.smoothgrad import SmoothGrad; import pipelines.run.validate"],
           cwd=str(work))
    assert "usage: python -m pipelines.demo" in _check([python, "-I", "-m", "pipelines.demo", "--help"], cwd=str(work))
    with open(work / "out" / "run_id=wheel" / "report" / "index.html", encoding="utf-8") as handle:
        assert "Run summary" in handle.read()
