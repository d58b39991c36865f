"""How a config field declares what it allows, and the one rule set that checks every field
(pipeline/config.py declares the fields; its `validate` adds the rules that relate two of them).

A field's type is its annotation (Optional[...] allows null; a bool is not an int; an int is taken
where a float is declared; floats are finite; strings are non-empty); `one_of` declares its
choices and `ranged` its bounds beside its default, so that `launch.py config show` lists them.
"""

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key, the value and what is allowed."""


class ConfigLoader(yaml.SafeLoader):
    """YAML as the config reads it: PyYAML's safe loader with YAML 1.2's booleans and floats.

    YAML 1.1 (PyYAML's default) reads yes / no / on / off as booleans, so a label map written
    `{yes: true, no: false}` became {True: True, False: False} and every "yes" / "no" row was
    rejected. Here only true / false (any case style YAML 1.2 allows) are booleans; yes, no, on and
    off stay the strings the user wrote, in the file and in `--set` alike. YAML 1.1 also reads
    1e-6 (no dot) and 2.0e5 (no exponent sign) as strings; here they are the numbers they mean."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                   list("-+0123456789."))


def read_yaml(text_or_file) -> Any:
    """A config file or a `--set` value, read by ConfigLoader (a SafeLoader: no tag builds a Python object)."""
    return yaml.load(text_or_file, Loader=ConfigLoader)


def one_of(default: Any, choices: tuple) -> Any:
    """A field whose value must be one of `choices` (a list field: each of its items); the choices
    are checked by `validate` and listed by `launch.py config show`."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"choices": choices})
    return field(default=default, metadata={"choices": choices})


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


@dataclass(frozen=True)
class Range:
    """Bounds of a number field (ge: >=, gt: >, le: <=, lt: <), and what a special value means."""
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    note: str = ""

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low = f"[{_number(self.ge)}" if self.ge is not None else f"({_number(self.gt)}" if self.gt is not None else ""
        high = f"{_number(self.le)}]" if self.le is not None else f"{_number(self.lt)})" if self.lt is not None else ""
        if low and high:
            text = f"in {low}, {high}"
        else:
            text = " ".join(f"{sign} {_number(bound)}" for sign, bound in
                            ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if bound is not None)
        return f"{text} ({self.note})" if self.note else text


def ranged(default: Any, *, ge=None, gt=None, le=None, lt=None, note: str = "") -> Any:
    """A number field whose value must lie within bounds (null, where the type allows it, is not
    bounded); the bounds are checked by `validate` and listed by `launch.py config show`."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt, note)})


def declared(kind: str, cls, prefix: str = "") -> dict[str, Any]:
    """'section.key' -> the field's metadata[kind], for every field that declares one."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(declared(kind, type(default), f"{prefix}{f.name}."))
        elif kind in f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata[kind]
    return out


def build(cls, raw: dict, prefix: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; known keys here: {', '.join(known)}")
    values = {}
    for name, value in raw.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of keys, got {value!r}")
            values[name] = build(type(default), value, f"{prefix}{name}.")
        else:
            values[name] = _as_declared(f"{prefix}{name}", value, f.type)
    return cls(**values)


def _type_name(annotation) -> str:
    args = get_args(annotation)
    if get_origin(annotation) is Union:
        return " or ".join(_type_name(arm) for arm in args)
    if get_origin(annotation) is list:
        return f"a list of {_type_name(args[0])}"
    if get_origin(annotation) is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return {type(None): "null", bool: "bool (true or false)"}.get(annotation, annotation.__name__)


def _fits(value: Any, annotation) -> bool:
    """Whether YAML's value is of the declared type. A bool is not an int (true would pass as 1);
    an int is a float."""
    args = get_args(annotation)
    if get_origin(annotation) is Union:
        return any(_fits(value, arm) for arm in args)
    if get_origin(annotation) is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if get_origin(annotation) is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _as_declared(key: str, value: Any, annotation) -> Any:
    """The value as its field declares it (an int where a float is declared becomes that float), or
    a ConfigError naming the key, the value and the type."""
    if not _fits(value, annotation):
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(annotation)}")
    float_field = annotation is float or (get_origin(annotation) is Union and float in get_args(annotation))
    if float_field and isinstance(value, int):
        return float(value)
    if get_origin(annotation) is dict and get_args(annotation)[1] is float:
        return {k: float(v) for k, v in value.items()}
    return value


def _sound(value: Any) -> bool:
    """Numbers are finite (inf and nan pass every `> 0` check) and strings are non-empty, at any depth."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return value != ""
    if isinstance(value, list):
        return all(map(_sound, value))
    if isinstance(value, dict):
        return all(_sound(k) and _sound(v) for k, v in value.items())
    return True


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


def check_fields(section, prefix: str) -> None:
    """Every field of every section: its declared type, finite numbers and non-empty strings, its
    `one_of` choices (a list field: each item) and its `ranged` bounds."""
    for f in dataclasses.fields(section):
        key, value = f"{prefix}{f.name}", getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
            continue
        _as_declared(key, value, f.type)
        check(_sound(value), key, value, {float: "a finite number", str: "a non-empty string"}.get(
            type(value), "no empty string, inf or nan inside"))
        if "choices" in f.metadata:
            choices = f.metadata["choices"]
            if isinstance(value, list):
                check(all(item in choices for item in value), key, value, f"a list of: {', '.join(choices)} (or [])")
            else:
                check(value in choices, key, value, " | ".join(map(str, choices)))
        if "range" in f.metadata and value is not None:
            check(value in f.metadata["range"], key, value, str(f.metadata["range"]))
