"""The CLI's flags made from the models they fill, so a flag's type, choices, default and help are the API's own:
the selection parameters (`SelectParams`), the strategies (their records), the training hyperparameters
(`Hyperparameters`) and the one `--hp KEY=VALUE` parser. Flags default to None: what is not given is left out of
the request and the gateway's default applies (the default shown in the help is that one)."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from grape.jobs import Hyperparameters
from grape.strategies import DEFAULT_STRATEGY, SelectParams, reading, strategy_specs


def strategy_names() -> str:
    """The strategies' names in registry order, for help texts: `grape, longest, …, source:<name>`."""
    return ", ".join(s.name for s in strategy_specs())


def plain_strategies() -> list[str]:
    """The strategies every dataset can run (no extra score kinds, not a family): the default comparison."""
    return [s.name for s in strategy_specs() if not s.needs and "<" not in s.name]


def _kind(field: FieldInfo) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) of a model field: its one non-None type; a Literal's values as choices."""
    annotation = field.annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(a) for a in args]
    if annotation is bool:
        return _boolean, None
    return annotation, None


def _boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: true or false")


def field_help(field: FieldInfo, extra: str = "") -> str:
    """A model field's description, what else the flag says, and its default (argparse: % doubled)."""
    text = (field.description or "").rstrip(".")
    if extra:
        text += f" ({extra})" if text else extra
    default = field.get_default(call_default_factory=True)
    if default is not None and not isinstance(default, BaseModel):
        text += f"; default {default}"
    return text.replace("%", "%%")


def add_model_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], flags: Mapping[str, str], notes: Mapping[str, str] = {}
) -> None:
    """`--flag` for each `flags[flag] = field` of `model`, typed and explained by the field (`notes`: more help)."""
    for flag, name in flags.items():
        field = model.model_fields[name]
        kind, choices = _kind(field)
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            choices=choices,
            default=None,
            metavar=None if choices else flag.lstrip("-").replace("-", "_").upper(),
            help=field_help(field, notes.get(name, "")),
        )


def add_selection_flags(parser: argparse.ArgumentParser, *, strategy: str | None = "--strategy") -> None:
    """`--strategy` (unless None) and a flag per selection parameter, each naming the strategies that read it."""
    if strategy:
        help_ = f"selection strategy, one of: {strategy_names()}; default {DEFAULT_STRATEGY}"
        parser.add_argument(strategy, default=None, help=help_)
    notes = {name: "read by " + (", ".join(reading(name)) or "no strategy") for name in SelectParams.model_fields}
    add_model_flags(parser, SelectParams, {f"--{name}": name for name in SelectParams.model_fields}, notes)


def selection_args(args: argparse.Namespace) -> dict[str, Any]:
    """The selection parameters given on the command line (the others keep the gateway's defaults)."""
    return {name: getattr(args, name) for name in SelectParams.model_fields if getattr(args, name, None) is not None}


def add_hp_flags(parser: argparse.ArgumentParser, flags: Mapping[str, str]) -> None:
    """Named flags for common hyperparameters (`--lr` -> learning_rate) and the repeatable `--hp KEY=VALUE` for
    any other one of the allow-list."""
    add_model_flags(parser, Hyperparameters, flags)
    parser.add_argument(
        "--hp",
        action="append",
        metavar="KEY=VALUE",
        help="another allowed training setting (repeatable; VALUE as JSON, else text), one of: "
        + ", ".join(Hyperparameters.model_fields),
    )


def hp_args(args: argparse.Namespace, flags: Iterable[str] = ()) -> dict[str, Any]:
    """The hyperparameters of the command line: the named flags given, then every `--hp KEY=VALUE`."""
    hp = {name: getattr(args, name) for name in flags if getattr(args, name, None) is not None}
    hp.update(parse_hp(getattr(args, "hp", None) or []))
    return hp


def parse_hp(pairs: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs: VALUE read as JSON (numbers, true/false, null, lists), else as text. The gateway checks
    the names and values against the allow-list (grape.jobs.Hyperparameters)."""
    hp: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--hp {pair!r}: give KEY=VALUE (an allowed training setting, grape.jobs.Hyperparameters)")
        hp[key] = json_or_text(value)
    return hp


def json_or_text(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
