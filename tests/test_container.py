"""The Dockerfile's pinned versions agree with setup.py, and its build context holds what it copies.

No Docker engine runs here or in CI, so the image is not built; these checks
keep the file honest: the Beam SDK base image is the pinned apache-beam version
for a Python that setup.py allows, TensorFlow with CUDA is a version setup.py
allows, Beam's boot program stays the entrypoint, and every copied path exists
and is not excluded by ``.dockerignore``.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    with open(os.path.join(REPO, "Dockerfile"), encoding="utf-8") as handle:
        text = re.sub(r"\\\n", " ", handle.read())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _setup_keywords() -> dict:
    """setup()'s literal keyword arguments in setup.py (install_requires, python_requires, ...)."""
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {}
    for keyword in call.keywords:
        try:
            keywords[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:
            continue  # not a literal (e.g. long_description)
    return keywords


def _requirement(name: str) -> Requirement:
    requirements = [Requirement(text) for text in _setup_keywords()["install_requires"]]
    return next(requirement for requirement in requirements if requirement.name == name)


def test_the_base_image_is_the_beam_sdk_of_the_pinned_beam_version_and_an_allowed_python():
    bases = [line.split()[1] for line in _dockerfile() if line.upper().startswith("FROM ")]
    sdk = [base for base in bases if base.startswith("apache/beam_python")]
    assert len(sdk) == 1, bases
    match = re.fullmatch(r"apache/beam_python(\d+)\.(\d+)_sdk:(\S+)", sdk[0])
    assert match, sdk[0]
    python, beam = f"{match.group(1)}.{match.group(2)}", Version(match.group(3))
    assert python == "3.11"
    assert Version(f"{python}.0") in SpecifierSet(_setup_keywords()["python_requires"])
    assert beam in _requirement("apache-beam").specifier, (beam, _requirement("apache-beam"))
    assert not beam.is_prerelease


def test_tensorflow_with_cuda_is_pinned_to_a_version_setup_py_allows():
    installs = " ".join(line for line in _dockerfile() if line.upper().startswith("RUN ") and "pip install" in line)
    pins = re.findall(r"tensorflow\[and-cuda\]==([0-9][0-9a-z.]*)", installs)
    assert len(pins) == 1, installs
    assert Version(pins[0]) in _requirement("tensorflow").specifier, (pins[0], _requirement("tensorflow"))
    assert re.search(r"pip install [^&]*\"?\.\[gcp\]\"?", installs), "the project is installed from the copied source"


def test_beam_boot_stays_the_entrypoint():
    entrypoints = [line for line in _dockerfile() if line.upper().startswith("ENTRYPOINT")]
    assert entrypoints == ['ENTRYPOINT ["/opt/apache/beam/boot"]']


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker would leave ``path`` out of the build context (last matching pattern wins)."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/")
               and fnmatch.fnmatch(prefix.split("/")[-1], pattern[3:])) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_every_copied_path_exists_and_is_in_the_build_context():
    with open(os.path.join(REPO, ".dockerignore"), encoding="utf-8") as handle:
        patterns = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    copies = [line.split()[1:-1] for line in _dockerfile()
              if line.upper().startswith("COPY ") and "--from=" not in line]
    sources = [source for sources in copies for source in sources]
    assert {"setup.py", "README.md", "pipelines", "transforms"} <= set(sources)
    for source in sources:
        assert os.path.exists(os.path.join(REPO, source)), source
        assert not _ignored(source, patterns), source
    kept = [os.path.relpath(os.path.join(folder, name), REPO).replace(os.sep, "/")
            for package in ("pipelines", "transforms") for folder, _, names in os.walk(os.path.join(REPO, package))
            if "__pycache__" not in folder for name in names]
    assert "pipelines/report/templates/report.html.j2" in kept and "transforms/engine/smoothgrad.py" in kept
    for path in kept:  # every module of every subpackage, and the report's templates
        assert not _ignored(path, patterns), path
    for left_out in (".venv/bin/python", ".git/HEAD", "demo_data/model.keras", "pipelines/__pycache__/x.pyc", "tests"):
        assert _ignored(left_out, patterns), left_out


def test_the_flex_template_entry_point_launches_without_waiting():
    lines = _dockerfile()
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/launch.py" in lines
    with open(os.path.join(REPO, "templates", "flex", "launch.py"), encoding="utf-8") as handle:
        source = handle.read()
    assert "main(sys.argv[1:], wait=False)" in source
