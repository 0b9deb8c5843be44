"""The settings loaded, or one line that says what is wrong: unknown TOML keys refused (a typo
would silently be a default), each invalid value named by its environment variable, or its key
and the TOML file, never with a secret's value."""

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, ValidationError

from broker.settings import CONFIG_ENV, Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - what pydantic-settings reads TOML with on 3.10
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]


class SettingsInvalid(ValueError):
    """Settings that cannot be used, said in one line naming each by where it came from (its
    environment variable, or its key and the TOML file)."""


def load_settings() -> Settings:
    """The settings, or SettingsInvalid: unknown TOML keys are refused (a typo would silently
    be a default), and each invalid value names its variable or key."""
    config_file = os.environ.get(CONFIG_ENV)
    from_file: dict[str, Any] = {}
    if config_file and Path(config_file).is_file():
        try:
            from_file = tomllib.loads(Path(config_file).read_text())
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
            raise SettingsInvalid(f"{config_file}: not a TOML file of settings: {exc}") from None
        _refuse_unknown_keys(from_file, config_file)
    try:
        return Settings()
    except ValidationError as exc:
        problems = [_problem(error, from_file, config_file) for error in exc.errors()]
        raise SettingsInvalid("; ".join(problems)) from None
    except ValueError as exc:  # pydantic-settings: a value it could not parse, a missing file
        raise SettingsInvalid(_unparsed(str(exc))) from None


def _refuse_unknown_keys(from_file: dict[str, Any], config_file: str) -> None:
    known = sorted(Settings.model_fields)
    unknown = [key for key in from_file if key not in Settings.model_fields]
    if not unknown:
        return
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        named.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise SettingsInvalid(
        f"unknown key{'s' if len(unknown) > 1 else ''} in {config_file}: {', '.join(named)}; "
        "`swarm config` lists every setting"
    )


def _problem(error: Any, from_file: dict[str, Any], config_file: str | None) -> str:
    """One invalid value: where it came from, what it was (never a secret's), what is wrong."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message  # a rule across settings (the pool sizes): it names them
    field, names = _field_and_names(str(error["loc"][0]))
    env = next((name for name in names if name in os.environ), None)
    if env is not None:
        where = env
    elif field in from_file and config_file:
        where = f"`{field}` in {config_file}"
    else:
        where = names[0]
    # The URLs carry passwords: never shown.
    shown = "" if field == "amqp_url" else f"={error.get('input')!r}"
    return f"{where}{shown}: {message}"


def _field_and_names(name: str) -> tuple[str, list[str]]:
    """A setting (by field name, or by the alias an error names) and its variables."""
    for field, info in Settings.model_fields.items():
        choices = (
            [str(choice) for choice in info.validation_alias.choices]
            if isinstance(info.validation_alias, AliasChoices)
            else [f"SWARM_{field.upper()}"]
        )
        if name == field or name in choices:
            return field, choices
    return name, [f"SWARM_{name.upper()}"]


def _unparsed(message: str) -> str:
    """pydantic-settings' 'error parsing value for field "x" from source "..."', said with
    the variable's name."""
    match = re.search(r'error parsing value for field "(\w+)" from source "(\w+)"', message)
    if match is None:
        return " ".join(message.split())
    field, names = _field_and_names(match.group(1))
    env = next((name for name in names if name in os.environ), names[0])
    where = env if match.group(2).startswith("Env") else f"`{field}` in the TOML file"
    return f"{where}: not a value it can read (a JSON object or list where one is expected)"
