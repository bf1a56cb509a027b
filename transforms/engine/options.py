"""The error for a bad option, raised by the engine and the Beam steps alike.

A bad option becomes a ``ValueError`` whose message names the option, what is
allowed and what was given. It is defined in the engine, which raises it
most, so that the engine imports nothing from the Beam side.
"""

from __future__ import annotations


def bad_option(name: str, allowed: str, got) -> ValueError:
    """The error for an option outside its allowed values.

    Example:
        >>> str(bad_option("noise_mode", "one of ('absolute', 'relative')", "relatve"))
        "'noise_mode' must be one of ('absolute', 'relative'); got 'relatve'."
    """
    return ValueError(f"'{name}' must be {allowed}; got {got!r}.")
