"""How a command's config dataclass becomes its click options (cli.py's one way to declare a
command).

The field metadata it reads (help, choices, metavar, argument, path, cli) is the convention
pipeline/config.py and heads/config.py declare their commands' options in; this is its one
reader. It lives in stage one, beside pipeline/config.py, because that is the lowest layer
that declares commands (heads/config.py builds on it); the ground floor (cache/core/) holds
only what every process needs at run time, not the command line's concerns.
"""

from __future__ import annotations

import dataclasses
import typing

import click

from cache.core.errors import CaerError


def config_options(config_class, required=("cache", "out"), exclude=()):
    """Click options from a config dataclass: one --flag per field, with the field's default
    and its metadata's help, metavar and choices. Booleans are flags; tuple[str, ...] fields
    repeat (--annotations A --annotations B); tuple[int, ...] fields take 10,15. A field
    whose metadata says argument=True is a positional argument instead (path=True: a
    click.Path). Fields in ``exclude`` or with ``cli: False`` metadata get no flag; ``required``
    names the fields the command line insists on (the config's validate() checks the rest)."""
    hints = typing.get_type_hints(config_class)

    def parse_ints(ctx, param, value):
        if value is None or isinstance(value, tuple):
            return value
        try:
            return tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise CaerError(f"--{param.name.replace('_', '-')} {value}: expected integers "
                            f"separated by commas, e.g. 10,15") from None

    def decorate(command):
        for f in reversed(dataclasses.fields(config_class)):
            if f.name in exclude or f.metadata.get("cli", True) is False:
                continue
            flag, meta = "--" + f.name.replace("_", "-"), f.metadata
            hint, default, needed = hints[f.name], f.default, f.name in required
            common = dict(help=meta.get("help", ""), metavar=meta.get("metavar"))
            if meta.get("argument"):  # positional; click arguments take no help text
                kind = (click.Choice(meta["choices"]) if "choices" in meta
                        else click.Path() if meta.get("path") else None)
                many = typing.get_origin(hint) is tuple  # PATHS...: one or more
                option = click.argument(f.name, type=kind, required=needed,
                                        nargs=-1 if many else 1,
                                        default=None if needed or many else default,
                                        metavar=meta.get("metavar") or f.name.upper())
            elif hint is bool:
                option = click.option(flag, f.name, is_flag=True, default=default,
                                      help=common["help"])
            elif typing.get_origin(hint) is tuple and typing.get_args(hint)[0] is str:
                option = click.option(flag, f.name, multiple=True, required=needed, **common)
            elif typing.get_origin(hint) is tuple:
                option = click.option(flag, f.name, default=",".join(map(str, default)),
                                      callback=parse_ints, show_default=True, **common)
            else:
                base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
                kind = click.Choice(meta["choices"]) if "choices" in meta else base[0]
                shown = default not in (None, "") and not needed
                option = click.option(flag, f.name, type=kind, default=default, required=needed,
                                      show_default=shown, **common)
            command = option(command)
        return command
    return decorate
