"""Command-line options derived from the config dataclasses, so the CLI declares no option twice.

Each field declared with `prodcat.config.option` becomes one typer option: `--field-name` (plus `--alias` for each
earlier name, and its short flag), of the field's type, with the field's default and help. What jsonargparse does for
litgpt's dataclasses, for typer: `@from_configs` on a command whose parameter is annotated with a config class
replaces that parameter by the options and hands the command the built config. Conventions:
- bool fields get `--x/--no-x`;
- tuple fields are comma-separated (`--splits train,val`), pairs colon-separated (`--arms softmax:adamw`);
- path fields (`option(..., path=True)`) are read as paths; an empty default makes them required.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from prodcat.errors import UserError

__all__ = ["from_configs", "build_config", "config_classes", "flags"]


def flags(field: dataclasses.Field) -> list[str]:
    """The field's option names: `--field-name`, `--alias` per earlier name, then its short flag."""
    names = [f"--{name.replace('_', '-')}" for name in (field.name, *field.metadata.get("aliases", ()))]
    return names + ([field.metadata["short"]] if field.metadata.get("short") else [])


def config_classes(command: Callable[..., Any]) -> tuple[type, ...]:
    """The config classes a `from_configs` command takes its options from (none for the others)."""
    return getattr(command, "__configs__", ())


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _join(value: tuple[Any, ...]) -> str:
    return ",".join(":".join(map(str, item)) if isinstance(item, tuple) else str(item) for item in value)


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _option_type(field: dataclasses.Field, hint: Any) -> Any:
    if _is_tuple(hint):
        return str
    if field.metadata.get("path"):
        return Path | None if _optional(hint) else Path
    return hint


def _parameter(cls: type, field: dataclasses.Field, hint: Any) -> inspect.Parameter:
    """One keyword-only parameter whose Annotated typer.Option (or Argument) says everything about the flag."""
    meta = field.metadata
    if not meta.get("help"):
        raise TypeError(f"{cls.__name__}.{field.name} has no help text: declare it with prodcat.config.option")
    default, help_text = field.default, meta["help"]
    if _is_tuple(hint):
        default, help_text = _join(default), f"{help_text} Comma-separated."
    elif meta.get("path") and isinstance(default, str):
        default = Path(default) if default else inspect.Parameter.empty  # "" : the command needs one
    if meta.get("positional"):
        info = typer.Argument(help=help_text, show_default=default is not inspect.Parameter.empty)
    elif hint is bool:
        names = [f"{name}/--no-{name[2:]}" for name in flags(field) if name.startswith("--")]
        info = typer.Option(*names, help=help_text)
    else:
        info = typer.Option(*flags(field), help=help_text)
    annotation = Annotated[_option_type(field, hint), info]
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _convert(text: str, kind: Any, flag: str) -> Any:
    if _is_tuple(kind):  # one pair of a tuple of pairs: "loss:optimizer"
        parts, kinds = text.split(":"), typing.get_args(kind)
        if len(parts) != len(kinds):
            raise UserError(f"{flag}: {text!r} needs {len(kinds)} ':'-separated parts")
        return tuple(_convert(part.strip(), sub, flag) for part, sub in zip(parts, kinds, strict=True))
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a {kind.__name__}") from None


def _value(field: dataclasses.Field, hint: Any, raw: Any) -> Any:
    """The command-line value as the config field wants it (paths as str, comma lists as tuples)."""
    if raw is None:
        return None
    if _is_tuple(hint):
        element = typing.get_args(hint)[0]  # tuple[X, ...] and the fixed tuples here hold one type
        return tuple(_convert(part.strip(), element, flags(field)[0]) for part in raw.split(",") if part.strip())
    return str(raw) if isinstance(raw, Path) else raw


def build_config(cls: type, arguments: dict[str, Any]) -> Any:
    """Pop `cls`'s fields from the parsed `arguments` and build it; a refused value is a one-line error."""
    hints = typing.get_type_hints(cls)
    values = {field.name: _value(field, hints[field.name], arguments.pop(field.name)) for field in _fields(cls)}
    try:
        return cls(**values)
    except UserError:
        raise
    except ValueError as error:  # a plan's own checks: bad flags, not a bug
        raise UserError(str(error)) from error


def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    # `record` fields (config.record) are facts a stage writes, not options.
    return tuple(field for field in dataclasses.fields(cls) if field.init and field.metadata.get("cli", True))


def from_configs(function: Callable[..., Any]) -> Callable[..., Any]:
    """The typer command for `function`: each parameter annotated with a config dataclass becomes that class's
    options (in field order); the others stay as declared. The call gets the built config."""
    hints = typing.get_type_hints(function, include_extras=True)
    configs = {name: hint for name, hint in hints.items() if dataclasses.is_dataclass(hint)}
    parameters: list[inspect.Parameter] = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name in configs:
            cls = configs[parameter.name]
            field_hints = typing.get_type_hints(cls)
            parameters += [_parameter(cls, field, field_hints[field.name]) for field in _fields(cls)]
        else:
            hint = hints.get(parameter.name, parameter.annotation)
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hint))

    @functools.wraps(function)
    def command(**arguments: Any) -> Any:
        for name, cls in configs.items():
            arguments[name] = build_config(cls, arguments)
        return function(**arguments)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    command.__configs__ = tuple(configs.values())  # type: ignore[attr-defined]
    return command
