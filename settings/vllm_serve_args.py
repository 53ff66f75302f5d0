"""`vllm serve` arguments by their own names, parsed by vLLM's own parser so types match `vllm serve`.

vLLM's parser (`vllm.entrypoints.launchers.cli_args.make_arg_parser`) holds both the engine arguments
(AsyncEngineArgs) and the frontend ones (FrontendArgs: enable_auto_tool_choice, tool_call_parser,
lora_modules, chat_template, reasoning_parser, response_role, ...). Values given as `--arg NAME=VALUE`,
in an `--arg-file` or as `HF_SERVE_<NAME>` become the command line `vllm serve` would have been given
(`--name=value`, `--name`/`--no-name` for flags, several words for list options), which the parser then
reads into the Namespace that `AsyncEngineArgs.from_cli_args` and vLLM's `init_app_state` take.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
from collections.abc import Mapping
from typing import Any

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# Actions of vLLM's parser that are not arguments of a served model.
_NOT_ARGUMENTS = {"help", "version", "config", "model_tag", "subparser", "dispatch_function"}


class ServeArgumentError(ValueError):
    """A `vllm serve` argument vLLM's parser refuses; the message is vLLM's."""


@functools.cache
def serve_parser() -> argparse.ArgumentParser:
    """vLLM's `vllm serve` argument parser (imports vLLM: seconds)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve", exit_on_error=False))
    return parser


@functools.cache
def _actions() -> dict[str, argparse.Action]:
    return {
        action.dest: action
        for action in serve_parser()._actions
        if action.option_strings and action.dest not in _NOT_ARGUMENTS
    }


def serve_argument_names() -> frozenset[str]:
    """Every `vllm serve` option by its Namespace name (snake case)."""
    return frozenset(_actions())


def _words(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [item if isinstance(item, str) else json.dumps(item) for item in value]
    if isinstance(value, str):
        text = value.strip()
        return [text] if text[:1] in ("{", "[") else shlex.split(text)
    return [json.dumps(value) if isinstance(value, dict) else str(value)]


def to_command_line(values: Mapping[str, Any]) -> list[str]:
    """The `vllm serve` command-line words for these named values (names in snake or dash case)."""
    actions = _actions()
    argv: list[str] = []
    for given, value in values.items():
        name = given.replace("-", "_")
        action = actions.get(name)
        if action is None:
            raise ServeArgumentError(f"'{given}' is not a `vllm serve` argument")
        long = next(option for option in action.option_strings if option.startswith("--"))
        if action.nargs == 0:  # a flag: --name, or --no-name when the parser has one
            text = str(value).strip().lower()
            if value is True or text in TRUE_WORDS or text == "":
                argv.append(long)
            elif value is False or text in FALSE_WORDS:
                negative = f"--no-{long[2:]}"
                if negative in action.option_strings:
                    argv.append(negative)
            else:
                raise ServeArgumentError(f"'{given}' is a flag; give true or false, not '{value}'")
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            argv += [long, *_words(value)]
        else:
            text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict | list) else value
            argv.append(f"{long}={text}")
    return argv


def parse_serve_arguments(values: Mapping[str, Any]) -> argparse.Namespace:
    """The Namespace `vllm serve` would build for these values (later values win), checked as vLLM checks it."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    argv = to_command_line(values)
    try:
        namespace = serve_parser().parse_args(argv)
        validate_parsed_serve_args(namespace)
    except (argparse.ArgumentError, SystemExit, TypeError, ValueError) as error:
        raise ServeArgumentError(f"vLLM refuses {shlex.join(argv)}: {error}") from None
    return namespace
