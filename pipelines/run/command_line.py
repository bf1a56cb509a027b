"""The command line: ``--config FILE``, one flag per config key, ``--validate_only``, and Beam's flags.

Flags win over the config file; a config file may hold Beam pipeline options
under ``beam_options`` (the command line's Beam flags win over them). Anything
the CLI does not know goes to Beam, and an argument no Beam option accepts is
refused in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib

from pipelines.run.config import (BEAM_OPTIONS, Config, ConfigError, _as_bool, _fail, load_yaml, show_default,
                              validate)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def argument_parser() -> argparse.ArgumentParser:
    """The CLI's own options; anything it does not know goes on to Beam."""
    parser = _OneLineParser(
        prog="smoothgrad-audit",
        description="SmoothGrad saliency corpus from TFRecord images, on Apache Beam. Options come "
                    "from --config FILE.yaml and the flags below (flags win); any other flag "
                    "(--runner, --direct_num_workers, --project, --region, --temp_location, ...) "
                    "is passed to Beam. Without --runner, the in-process Beam runner is used. "
                    "Sub-commands for finished runs: 'smoothgrad-audit report RUN_DIR' (an HTML "
                    "audit report) and 'smoothgrad-audit compare RUN_A RUN_B' (two runs side by side).",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file with a flat mapping of the keys below (and optionally "
                                          "'beam_options', a mapping of Beam pipeline options).")
    parser.add_argument("--validate_only", "--validate-only", action="store_true",
                        help="Check the config, the model (one image explained on CPU), the inputs and the Beam "
                             "options for the chosen runner, then exit without running (0: valid, 2: not).")
    for field in dataclasses.fields(Config):
        help_text = field.metadata["help"] + f" (default: {show_default(field.default)})"
        if field.type in ("bool", bool):
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, help=help_text)
            if "_" in field.name:
                parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                                    action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
        elif field.name == "input":
            parser.add_argument("--input", action="extend", nargs="+", help=help_text)
        else:
            parser.add_argument(f"--{field.name}", help=help_text)
    return parser


def unknown_beam_arguments(beam_args: list[str]) -> list[str]:
    """The arguments that no Beam pipeline option (of any runner) accepts."""
    from apache_beam.options.pipeline_options import PipelineOptions

    captured = []
    PipelineOptions(beam_args).get_all_options(add_extra_args_fn=captured.append)
    return captured[0].parse_known_args(beam_args)[1]


def _reject_unknown(beam_args: list[str], parser: argparse.ArgumentParser) -> None:
    unknown = unknown_beam_arguments(beam_args)
    if not unknown:
        return
    first = unknown[0]
    ours = [option for action in parser._actions for option in action.option_strings]
    close = difflib.get_close_matches(first.split("=", 1)[0], ours, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    what = f"unknown option {first!r}" if first.startswith("-") else f"unexpected argument {first!r}"
    raise ConfigError(f"{what}: neither a smoothgrad-audit option (see --help) nor a Beam pipeline option.{hint}")


def beam_arguments(options) -> list[str]:
    """A config file's ``beam_options`` mapping as Beam command-line arguments.

    ``runner: DataflowRunner`` becomes ``--runner=DataflowRunner``; ``true``
    becomes the bare flag; a list repeats the flag (``dataflow_service_options``,
    ``experiments``); ``null`` leaves the option out. Every name must be a Beam
    pipeline option.
    """
    if options is None:
        return []
    if not isinstance(options, dict):
        raise _fail(BEAM_OPTIONS, "a mapping of Beam pipeline option names to values", options)
    arguments = []
    for name, value in options.items():
        flag = f"--{name}"
        if value is None:
            continue
        if value is True:
            arguments.append(flag)
        elif value is False:
            raise ConfigError(f"config key '{BEAM_OPTIONS}': '{name}: false' cannot be passed to Beam; "
                              "leave the option out to keep its default.")
        elif isinstance(value, (list, tuple)) and all(isinstance(item, (str, int, float)) for item in value):
            arguments += [f"{flag}={item}" for item in value]
        elif isinstance(value, (str, int, float)):
            arguments.append(f"{flag}={value}")
        else:
            raise _fail(f"{BEAM_OPTIONS}.{name}", "a string, a number, true or a list of them", value)
    unknown = unknown_beam_arguments(arguments)
    if unknown:
        raise ConfigError(f"config key '{BEAM_OPTIONS}': {unknown[0].split('=', 1)[0].lstrip('-')!r} "
                          "is not a Beam pipeline option.")
    return arguments


def _boolean_values(argv: list[str]) -> list[str]:
    """``--key=true|false`` for a boolean key → ``--key`` / ``--no-key`` (Flex Templates pass ``--name=value``)."""
    switches = {}
    for field in dataclasses.fields(Config):
        if field.type in ("bool", bool):
            switches[f"--{field.name}"] = field.name
            switches[f"--{field.name.replace('_', '-')}"] = field.name
    out = []
    for item in argv:
        name, _, value = item.partition("=")
        if name in switches and "=" in item:
            item = f"--{switches[name]}" if _as_bool(switches[name], value) else f"--no-{switches[name]}"
        out.append(item)
    return out


@dataclasses.dataclass(frozen=True)
class Command:
    """A parsed command line.

    Attributes:
        config: the validated run configuration.
        beam_args: Beam's arguments: the config file's ``beam_options`` first, then the
            command line's (which win).
        validate_only: check everything, then exit without running.
    """

    config: Config
    beam_args: list
    validate_only: bool = False


def parse_command(argv: list[str]) -> Command:
    """Parses the command line (``--config FILE``, the keys' flags, ``--validate_only``, Beam's flags)."""
    parser = argument_parser()
    known, beam_args = parser.parse_known_args(_boolean_values(list(argv)))
    _reject_unknown(beam_args, parser)
    raw = load_yaml(known.config) if getattr(known, "config", None) else {}
    file_beam_args = beam_arguments(raw.pop(BEAM_OPTIONS, None))
    flags = {key: value for key, value in vars(known).items() if key not in ("config", "validate_only")}
    if "input" in flags:
        flags["input"] = [part.strip() for item in flags["input"] for part in item.split(",") if part.strip()]
    for key, value in flags.items():
        if isinstance(value, str) and value.lower() in ("null", "~"):
            flags[key] = None
    raw.update(flags)
    return Command(validate(raw), file_beam_args + list(beam_args), bool(getattr(known, "validate_only", False)))


def parse(argv: list[str]) -> tuple[Config, list[str]]:
    """Parses the command line: returns the validated config and Beam's arguments (see :func:`parse_command`)."""
    command = parse_command(argv)
    return command.config, command.beam_args
