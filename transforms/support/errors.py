"""Error rows and one-line messages: how every failure is reported.

A record that cannot be explained becomes one row of the errors output (its
key, file, index, the stage that failed and a one-line message). Both formats are
defined here only. A bad option is the engine's
:func:`transforms.engine.options.bad_option`, which the steps use too.
"""

from __future__ import annotations

import re

#: Tag of the error output of every Beam step that can fail a record.
ERRORS = "errors"
#: Beam metrics namespace of the project.
NAMESPACE = "smoothgrad_audit"
#: Longest message kept in an error row or a one-line error.
MAX_MESSAGE = 300


def one_line(error: BaseException | str) -> str:
    """An error as one short line.

    TensorFlow's ``[Op:...]`` suffixes and ``{{function_node ...}}`` prefixes
    are removed, whitespace (newlines included) collapses to single spaces, and
    the text is cut at :data:`MAX_MESSAGE` characters.

    Args:
        error: an exception or a message.

    Returns:
        The message on one line.

    Example:
        >>> one_line("bad\\n  input [Op:DecodePng]")
        'bad input'
    """
    text = error if isinstance(error, str) else (getattr(error, "message", None) or str(error))
    text = re.sub(r"\s*\[Op:[^\]]*\]", "", text)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = " ".join(text.split())
    return text[:MAX_MESSAGE] + ("..." if len(text) > MAX_MESSAGE else "")


def error_row(key: str, source_file: str, record_index: int | None, stage: str, error,
              record_sha256: str | None = None) -> dict:
    """One row of the errors output.

    Args:
        key: the record's key (the file name alone for a whole-file error).
        source_file: the TFRecord file.
        record_index: the record's position in its file, or None for the whole file.
        stage: ``read``, ``decode`` or ``explain``.
        error: an exception or a message; stored as :func:`one_line` of it.
        record_sha256: hex SHA-256 of the record's bytes, when the record was read whole.

    Returns:
        A dict with the fields of the errors schema.
    """
    return {"key": key, "source_file": source_file, "record_index": record_index,
            "record_sha256": record_sha256, "stage": stage, "error": one_line(error)}
