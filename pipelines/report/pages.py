"""What every page of the report package shares: rendering, the output folder, the command runner.

:func:`render` fills a Jinja2 template of ``pipelines/report/templates`` (with
the ``num`` filter, :func:`number`); :class:`Site` is a page's output folder,
local or ``gs://``; :func:`run_command` and :class:`OneLineParser` turn a user
mistake into one line and status 2. Used by ``report``, ``compare`` and
``history``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
from apache_beam.io.filesystems import FileSystems
from jinja2 import Environment, PackageLoader, StrictUndefined

from pipelines.report.run_data import RunError
from transforms.support import storage
from transforms.support.errors import one_line

PAGE = "index.html"
IMAGES = "img"


def number(value, digits: int = 3) -> str:
    """A value as table text: ``–`` for missing, ``yes``/``no``, integers plain, floats to ``digits`` places."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(number(item, digits) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


@functools.lru_cache(maxsize=1)
def _environment() -> Environment:
    environment = Environment(loader=PackageLoader("pipelines.report", "templates"), autoescape=True,
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["num"] = number
    return environment


def render(template: str, context: dict) -> str:
    """The HTML of ``template`` (in ``pipelines/templates``) with ``context``; autoescaped."""
    return _environment().get_template(template).render(**context)


class Site:
    """The output folder of a page: written locally (a temporary folder for ``gs://``), then published.

    A folder that already holds files must hold an ``index.html`` (a previous
    page): its ``index.html`` and ``img/`` are replaced; any other non-empty
    folder is refused, so no unrelated file is touched.

    Args:
        out: the output folder, local or ``gs://``.
    """

    def __init__(self, out: str):
        self.out = out.rstrip("/") or "/"
        self.remote = storage.is_remote(self.out)
        if not self.remote and os.path.exists(self.out) and not os.path.isdir(self.out):
            raise RunError(f"--out {self.out} is a file; a folder is needed")
        existing = storage.files_under(self.out)
        page = FileSystems.join(self.out, PAGE)
        if existing and page not in existing:
            raise RunError(f"--out {self.out} holds files but no {PAGE}; choose an empty folder or a previous "
                           "report's")
        old = [path for path in existing
               if path == page or path.startswith(FileSystems.join(self.out, IMAGES) + "/")]
        if old:
            FileSystems.delete(old)
        self.local = tempfile.mkdtemp(prefix="smoothgrad-page-") if self.remote else self.out
        os.makedirs(os.path.join(self.local, IMAGES), exist_ok=True)

    def image(self, name: str) -> tuple[str, str]:
        """``(local path to write, src for the page)`` of image ``name``."""
        return os.path.join(self.local, IMAGES, name), f"{IMAGES}/{name}"

    def finish(self, template: str, context: dict) -> str:
        """Writes the page, publishes the folder; returns the page's path (local or ``gs://``)."""
        with open(os.path.join(self.local, PAGE), "w", encoding="utf-8") as handle:
            handle.write(render(template, context))
        if self.remote:
            for folder, _, names in os.walk(self.local):
                for name in names:
                    source = os.path.join(folder, name)
                    relative = os.path.relpath(source, self.local).replace(os.sep, "/")
                    with open(source, "rb") as reader, FileSystems.create(f"{self.out}/{relative}") as writer:
                        shutil.copyfileobj(reader, writer)
        return FileSystems.join(self.out, PAGE)

    def close(self) -> None:
        """Removes the temporary folder of a remote output."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def run_command(prog: str, parser: argparse.ArgumentParser, build, argv) -> int:
    """Parses ``argv`` and runs ``build(args)``: a user mistake is one stderr line and status 2."""
    try:
        path = build(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as stop:  # --help
        return int(stop.code or 0)
    except (RunError, OSError) as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2
    print(path)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors become :class:`RunError` (one line, no usage dump)."""

    def error(self, message):
        """Raises :class:`RunError` with argparse's message."""
        raise RunError(message)
