"""The config system of every command: a typed key table per command, YAML files, `key=value` overrides.

A command's config is a flat dict (keys of kind "dict", e.g. `model_kwargs`, nest one level). It is
built as: the table's defaults <- a YAML file (which may start from another with `base: other.yaml`,
a path relative to the including file) <- overrides (`--set key=value` and the command's flags, whose
names are the keys' own). Values given as text are parsed as YAML (`lr=5e-4`, `model_kwargs.depth=4`,
`amp=null`) and coerced to the key's kind (`epochs=10.0` -> 10). Unknown keys are refused with a
suggestion.

Each key also says what changing it does (`effect`): "model" keys define the network, "run" keys change
the result, "none" keys do not (threads, progress, ...), "once" keys act on one invocation only. A
resumed run takes its own saved config; on the command line it accepts changes to "none" and "once"
keys only (see `ConfigTable.resume`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

from .errors import UserError

__all__ = ["Key", "ConfigTable", "yaml_load", "read_yaml", "parse_override"]

KINDS = ("bool", "int", "float", "str", "dict", "window", "int_list", "float_list", "str_list")
EFFECTS = ("model", "run", "none", "once")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 needs a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str, seen: tuple = ()) -> Dict[str, Any]:
    """A YAML config file as a dict, with its `base:` chain merged in (the including file wins)."""
    path = os.path.abspath(path)
    if path in seen:
        raise UserError(f"config {path} includes itself through 'base:'")
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = yaml_load(handle.read()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    merged.update(data)
    return merged


def parse_override(text: str) -> Tuple[str, Any]:
    """'key=value' -> (key, YAML-parsed value); `-` in the key reads as `_`."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise UserError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {key}: cannot parse {raw!r} as a YAML value ({exc.__class__.__name__})") from exc
    return key, value


def _suggest(key: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return _is_number(value) and int(value) == value


@dataclass(frozen=True)
class Key:
    """One config key.

    Args:
        default: the value when nobody sets it.
        help: one line for `--help`.
        kind: one of KINDS; by default the default's type ("window": a positive int or "auto"; the
            lists also read "0,3" / "0.08,1" / "a,b" from text).
        nullable: null is allowed (always when the default is null).
        choices: the allowed values.
        positive: must be > 0.  low: must be >= low.
        flag: the command line has `--<key-with-dashes>` for it (bool keys: `--key`, or `--no-key` when
            the default is true); every key can be set with `--set key=value`.
        aliases: other (older) spellings of the flag, accepted but not shown.
        effect: "model" (defines the network), "run" (changes the result), "none" (does not) or "once"
            (this invocation only, e.g. `stop_after_epochs`: a resumed run starts it from its default).
        hidden: not listed in `--help` (test hooks).
        off_help: what `--no-<key>` does, for a bool flag key whose default is true, where "do not " + `help`
            does not read well (the generated text drops a leading "also": `--no-train` "do not measure
            training throughput").
    """

    default: Any
    help: str
    kind: str = ""
    nullable: bool = False
    choices: Tuple[Any, ...] = ()
    positive: bool = False
    low: Optional[float] = None
    flag: bool = False
    aliases: Tuple[str, ...] = ()
    effect: str = "run"
    hidden: bool = False
    off_help: str = ""

    def __post_init__(self):
        kind = self.kind or _kind_of(self.default)
        if kind not in KINDS:
            raise ValueError(f"config key kind must be one of {KINDS}, got {kind!r}")
        if self.effect not in EFFECTS:
            raise ValueError(f"config key effect must be one of {EFFECTS}, got {self.effect!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "nullable", self.nullable or self.default is None)
        if self.off_help and not (kind == "bool" and self.default is True):
            raise ValueError("off_help is the text of a --no-<key> flag: only for a bool key whose default is true")


def _kind_of(default: Any) -> str:
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str), ("dict", dict)):
        if isinstance(default, types):
            return kind
    if isinstance(default, (list, tuple)):
        return "float_list" if default and all(_is_number(v) for v in default) else "str_list"
    raise ValueError(f"give the kind of a config key whose default is {default!r}")


def _coerce(name: str, key: Key, value: Any) -> Any:
    """`value` as the key's kind, or a UserError naming the key, the expectation and the value."""
    if value is None:
        if key.nullable:
            return None
        if key.kind == "dict":
            return {}
        raise UserError(f"config key {name!r} cannot be null")
    kind, null = key.kind, " or null" if key.nullable else ""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {name!r} expects true or false{null}, got {value!r}")
    if kind == "int":
        if _is_int(value):
            return int(value)
        raise UserError(f"config key {name!r} expects an integer{null}, got {value!r}")
    if kind == "float":
        if _is_number(value):
            return float(value)
        raise UserError(f"config key {name!r} expects a number{null}, got {value!r}")
    if kind == "str":
        if isinstance(value, str) or _is_number(value):
            return str(value)
        raise UserError(f"config key {name!r} expects a string{null}, got {value!r}")
    if kind == "dict":
        if isinstance(value, Mapping):
            return dict(value)
        raise UserError(f"config key {name!r} expects a mapping, got {value!r}")
    if kind == "window":
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if value == "auto" or (_is_int(value) and value >= 1):
            return "auto" if value == "auto" else int(value)
        raise UserError(f"config key {name!r} expects a positive integer or 'auto'{null}, got {value!r}")
    items = value
    if isinstance(items, str):
        items = [t for t in re.split(r"[,\s]+", items.strip()) if t]
    elif not isinstance(items, (list, tuple)):
        items = [items]
    if kind == "int_list":
        try:
            return [int(t) if _is_int(t) else int(str(t)) for t in items]
        except ValueError:
            raise UserError(f"config key {name!r} expects integers like 0,2,3{null}, got {value!r}") from None
    if kind == "float_list":
        try:
            return [float(t) if _is_number(t) else float(str(t)) for t in items]
        except ValueError:
            raise UserError(f"config key {name!r} expects numbers like 0.08,1.0{null}, got {value!r}") from None
    if all(isinstance(t, str) or _is_number(t) for t in items):
        return [str(t) for t in items]
    raise UserError(f"config key {name!r} expects names like a,b,c{null}, got {value!r}")


def _check_bounds(name: str, key: Key, value: Any) -> None:
    if value is None:
        return
    if key.choices and value not in key.choices:
        raise UserError(f"config key {name!r} must be one of {', '.join(map(str, key.choices))}; got {value!r}")
    if key.positive and value <= 0:
        raise UserError(f"config key {name!r} must be > 0, got {value!r}")
    if key.low is not None and value < key.low:
        raise UserError(f"config key {name!r} must be >= {key.low:g}, got {value!r}")


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any], keys) -> List[str]:
    return [f"{k}: run {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


class ConfigTable:
    """The keys of one command, and what a config of it can be.

    Args:
        command: the command's name, for messages (`train`, `mil train`...).
        keys: name -> Key, in the order `--help` lists them.
        check: further cross-key validation of a whole config (raises UserError).
    """

    def __init__(self, command: str, keys: Mapping[str, Key], check: Optional[Callable[[Dict[str, Any]], None]] = None):
        self.command = command
        self.keys: Dict[str, Key] = dict(keys)
        self.check = check

    def derive(self, command: str, names: Iterable[str], changes: Optional[Mapping[str, Mapping[str, Any]]] = None,
               extra: Optional[Mapping[str, Key]] = None, check: Optional[Callable[[Dict[str, Any]], None]] = None
               ) -> "ConfigTable":
        """Another command's table made of some of these keys (`changes`: per key, fields to replace, e.g.
        another default) and `extra` keys of its own."""
        changes = changes or {}
        keys = {n: dataclasses.replace(self.keys[n], **changes.get(n, {})) for n in names}
        keys.update(extra or {})
        return ConfigTable(command, keys, check)

    # ------------------------------------------------------------------ building configs
    def defaults(self) -> Dict[str, Any]:
        return {name: copy.deepcopy(key.default) for name, key in self.keys.items()}

    def apply(self, cfg: Mapping[str, Any], overrides: Mapping[str, Any], source: str = "override") -> Dict[str, Any]:
        """`cfg` updated with `overrides` (dotted keys like `model_kwargs.depth` set one nested entry)."""
        cfg = copy.deepcopy(dict(cfg))
        for dotted, value in overrides.items():
            name, _, sub = dotted.partition(".")
            key = self.keys.get(name)
            if key is None:
                raise UserError(f"unknown config key {name!r} in {source}{_suggest(name, self.keys)}")
            if sub:
                if key.kind != "dict":
                    raise UserError(f"config key {name!r} has no sub-keys (only mappings nest), got {dotted!r}")
                cfg[name] = dict(cfg.get(name) or {})
                if value is None:
                    cfg[name].pop(sub, None)
                else:
                    cfg[name][sub] = value
            else:
                cfg[name] = _coerce(name, key, value)
        return cfg

    def validate(self, cfg: Dict[str, Any]) -> Dict[str, Any]:
        for name, key in self.keys.items():
            _check_bounds(name, key, cfg.get(name))
        if self.check is not None:
            self.check(cfg)
        return cfg

    def load(self, path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """defaults <- the YAML file at `path` <- `overrides`; validated."""
        return self.validate(self.apply(self.defaults(), self.given(path, overrides)))

    def given(self, path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """What the user set, in order: the YAML file's entries, then the overrides (dotted keys kept as
        they are, so that `apply` sets one nested entry). Unknown keys and bad values are refused here."""
        out: Dict[str, Any] = {}
        for source, entries in ((f"config file {path}", read_yaml(path) if path else {}),
                                ("the command line", overrides or {})):
            self.apply(self.defaults(), entries, source=source)
            for dotted, value in entries.items():
                out.pop(dotted, None)  # a later setting of the same key comes last
                out[dotted] = value
        return out

    def parse_text(self, name: str, text: str) -> Any:
        """A command-line flag's text as a value: YAML for every kind but strings, which stay as typed
        (a folder named `01` stays `01`), except that `null` still means null."""
        if self.keys[name].kind == "str":
            return None if text.strip() in ("null", "~", "None") else text
        try:
            return yaml_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"--{name.replace('_', '-')}: cannot parse {text!r} ({exc.__class__.__name__})") from exc

    # ------------------------------------------------------------------ runs
    def keys_with(self, *effects: str) -> List[str]:
        return [name for name, key in self.keys.items() if key.effect in effects]

    def resume(self, saved: Mapping[str, Any], given: Mapping[str, Any], source: str,
               allow_change: bool = False) -> Dict[str, Any]:
        """The config to resume a run with: the run's own `saved` config, changed by what the user
        `given`s only where that does not change the result. A "model" key that differs is always
        refused; a "run" key unless `allow_change`."""
        once = self.keys_with("once")
        # keys a later version dropped are ignored
        known = {k: v for k, v in saved.items() if k in self.keys and k not in once}
        base = self.apply(self.defaults(), known, source=source)
        cfg = self.validate(self.apply(base, given, source="the command line"))
        models = _differences(base, cfg, self.keys_with("model"))
        if models:
            raise UserError(f"cannot resume {source}: it holds another model ({'; '.join(models)})")
        runs = _differences(base, cfg, self.keys_with("run"))
        if runs and not allow_change:
            raise UserError(
                f"cannot resume {source}: it was trained with another config ({'; '.join(runs)}); a resumed run "
                f"keeps its own config (only keys that do not change the result may, e.g. "
                f"{', '.join(k for k in self.keys_with('none') if not self.keys[k].hidden and k != 'output')}), or set "
                "allow_config_change=true"
            )
        return cfg

    # ------------------------------------------------------------------ help
    def flag(self, name: str) -> str:
        key = self.keys[name]
        dashed = name.replace("_", "-")
        return f"--no-{dashed}" if key.kind == "bool" and key.default is True else f"--{dashed}"

    def flag_help(self, name: str) -> str:
        """The `--help` text of the key's flag: what giving the flag does. For `--no-<key>` (a bool key whose
        default is true) that is the opposite of the key's own help: its `off_help`, or "do not <help>"."""
        key = self.keys[name]
        text = key.help + (f" (one of: {', '.join(map(str, key.choices))})" if key.choices else "")
        if self.flag(name).startswith("--no-"):
            text = key.off_help or "do not " + re.sub(r"^also\s+", "", key.help)
            text += f"; sets {name}=false (default true)"
        return text

    def describe(self) -> str:
        """One entry per key: name, default, help (for `--help`)."""
        lines = []
        for name, key in self.keys.items():
            if key.hidden:
                continue
            shown = yaml.safe_dump(key.default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"  {name} = {shown}\n      {key.help}")
        return "\n".join(lines)
