"""Settings: typed dataclasses, read from TOML files and `section.key value` overrides, shown in --help, and turned
into the command line that reproduces a stage.

Every setting is a dataclass field whose line carries a comment: that comment is its meaning, the one place it is
explained (`field_help`), so `--help` and the docs cannot drift from the code. A stage's settings (sample.py's
SampleConfig, score.py's ScoreConfig) are also its command-line flags: `flag()` gives a field its flag names and
argparse options, cli.stage_parser builds the parser from the fields, and `command_line` writes a config back
as the flags that make it — so the loop prints, for every stage it runs, the very command that redoes it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import tomllib
from pathlib import Path

from minalign.errors import ConfigError

_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def field_help(section) -> dict[str, str]:
    """{field: its meaning} of a settings dataclass (or class): the comment on the field's line in its source (and
    in its base classes')."""
    cls = section if isinstance(section, type) else type(section)
    found: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        found.update({m[1]: m[2].strip() for m in map(_FIELD_COMMENT.match, inspect.getsource(klass).splitlines())
                      if m})
    return found


def toml_text(value) -> str:
    """A default as it is written in the TOML file."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def settings_help(cfg) -> str:
    """Every `section.key` of a settings dataclass with its default and meaning, one line each, for --help."""
    lines = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        meaning = field_help(section)
        for g in dataclasses.fields(section):
            flag = f"  --{f.name}.{g.name} {toml_text(getattr(section, g.name))}"
            lines.append(f"{flag:<48} {meaning.get(g.name, '')}".rstrip())
    return "\n".join(lines)


def _typed(section: str, name: str, default, value):
    """value converted to the type of the field's default; ConfigError if it does not fit."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list and isinstance(value, (list, tuple)):
        want = type(default[0]) if default else None  # a list's items take the type of the default's
        if want is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        if want is not None and not all(isinstance(v, want) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{section}.{name}: expected a list of {want.__name__}s, got {value!r}")
        return list(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{section}.{name}: expected a {kind.__name__}, got {value!r}")
    return value


def read_toml(path: str) -> dict:
    """The tables of a TOML settings file; ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {path}: {e}") from None


def read_settings(cfg, source: str | dict | None, overrides: list[tuple[str, str]] = ()):
    """cfg (a dataclass of section dataclasses, defaults filled in) updated from a TOML file (a path) or its tables
    (read_toml) and from `section.key value` overrides, each value read as a TOML value (3e-4, true, [0.9, 0.99])
    or else taken as a string. ConfigError naming the file, the unknown section or key, or the value of the wrong
    type."""
    raw = read_toml(source) if isinstance(source, str) and source else dict(source or {})
    raw = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for key, text in overrides:
        section, _, name = key.partition(".")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        raw.setdefault(section, {})[name] = value
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for section, values in raw.items():
        if section not in sections or not isinstance(values, dict):
            raise ConfigError(f"unknown config section {section!r}; known: {', '.join(sections)}")
        obj = sections[section]
        known = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"unknown config key {section}.{name}; {section} has {', '.join(known)}")
            setattr(obj, name, _typed(section, name, known[name], value))
    return cfg


# ------------------------------------------------------------------------------------------- stage flags

def flag(default=dataclasses.MISSING, *names: str, **options) -> dataclasses.Field:
    """A stage setting that is a command-line flag: names (default: --the-field-name) and argparse's options
    (choices, metavar, type of a list's items); no default = a required flag."""
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return dataclasses.field(**kwargs, metadata={"names": names, "options": options})


@dataclasses.dataclass
class Flag:
    """One flag of a stage config: where its value lives (a field, or a field of a nested section)."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    default: object  # dataclasses.MISSING for a required flag
    kind: type
    options: dict
    help: str


@functools.cache  # a class's flags never change; reading them reads its source (field_help)
def stage_flags(cls) -> tuple[Flag, ...]:
    """The flags of a stage config class, in order: its own fields, nested sections' fields in their place, and
    the fields of its base classes (the options every stage has) last."""
    meaning = field_help(cls)
    own = [f for f in dataclasses.fields(cls) if f.name in cls.__dict__.get("__annotations__", {})]
    inherited = [f for f in dataclasses.fields(cls) if f not in own]
    out = []
    for f in own + inherited:
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            out += [dataclasses.replace(g, path=(f.name, *g.path)) for g in stage_flags(type(f.default_factory()))]
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        names = f.metadata.get("names") or ("--" + f.name.replace("_", "-"),)
        kind = {"int": int, "float": float, "bool": bool, "list": list}.get(str(f.type).split(" ")[0], str)
        out.append(Flag((f.name,), names, default, kind, dict(f.metadata.get("options", {})),
                        meaning.get(f.name, "")))
    return tuple(out)


def get_path(cfg, path: tuple[str, ...]):
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def set_path(cfg, path: tuple[str, ...], value) -> None:
    setattr(get_path(cfg, path[:-1]), path[-1], value)


def _override_text(value) -> str:
    """A value as a `--section.key value` flag writes it: TOML (true, 1e-05, [0.9, 0.95]), a string as it is
    unless TOML would read it as something else."""
    if isinstance(value, str):
        try:
            tomllib.loads(f"v = {value}")
        except tomllib.TOMLDecodeError:
            return value
        return json.dumps(value)
    return toml_text(value) if not isinstance(value, list) else json.dumps(value)


def command_line(script: str, cfg) -> list[str]:
    """The argv of `python script` that builds cfg: every required flag, and every other one whose value is not
    its default (the defaults are the dataclass's, the same for the CLI and the loop). A config of sections
    (train.py's TrainConfig) is written as `--section.key value` flags after `--config ''` (no file)."""
    sections = [f for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    if len(sections) == len(dataclasses.fields(cfg)):
        argv = ["--config", ""]
        for f in sections:
            section, default = getattr(cfg, f.name), type(getattr(cfg, f.name))()
            argv += [x for g in dataclasses.fields(section) if getattr(section, g.name) != getattr(default, g.name)
                     for x in (f"--{f.name}.{g.name}", _override_text(getattr(section, g.name)))]
        return [script, *argv]
    argv = []
    for fl in stage_flags(type(cfg)):
        value = get_path(cfg, fl.path)
        if fl.default is not dataclasses.MISSING and value == fl.default:
            continue
        name = fl.names[-1]  # the long form: "--num-samples", which torchrun's own parser leaves alone
        if fl.kind is bool:
            argv.append(name)
        elif fl.kind is list:
            argv += [name, *map(str, value)]
        else:
            argv += [name, str(value)]
    return [script, *argv]
