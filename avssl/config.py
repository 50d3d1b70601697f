"""Typed, nested run configuration.

Every component owns a `Section` (a strict pydantic model) and receives only its own section.
A recipe is YAML; `load_config` validates it against a root section class, applies command-line
overrides (`--set data.clip_seconds=2`) and fails with the file, the key path and the reason.
Unknown keys, wrong types and impossible values are all load-time errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from avssl import AvsslError


class ConfigError(AvsslError):
    """A recipe or an override that does not validate."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, types are strict (no silent
    string-to-number coercion), and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


S = TypeVar("S", bound=Section)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `1e-2` and `3E5` are numbers, not strings
    (YAML 1.1 demands a dot and a signed exponent, so `base_lr: 1e-2` would fail validation)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a", "b", "c"], VALUE parsed as YAML, so `2` is an int, `[1, 2]` a list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. --set data.clip_seconds=2")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {item!r}: the key path is empty")
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return path, value


def default_section(cls: type[BaseModel], path: list[str]) -> dict[str, Any]:
    """The default contents of the section at `path` under `cls`, as plain data ({} when the
    section has no default or `path` names no section): an override of one key of a section the
    recipe leaves out keeps the section's other defaults."""
    node: Any = cls
    value: Any = None
    for part in path:
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return {}
        value = field.get_default(call_default_factory=True)
        node = type(value) if isinstance(value, BaseModel) else field.annotation
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else {}


def apply_overrides(tree: dict[str, Any], overrides: list[str], cls: type[BaseModel] | None = None) -> dict[str, Any]:
    """Set each `a.b.c=VALUE` in a nested dict (copying it). Missing intermediate sections are
    created: from their defaults under the root section class `cls` when given, else empty."""
    tree = json.loads(json.dumps(tree))  # deep copy of plain YAML data
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for depth, part in enumerate(path[:-1]):
            if part not in node and cls is not None:
                node[part] = default_section(cls, path[: depth + 1])
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:-1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; `avssl config show` lists the valid keys)"
        got = err.get("input")
        got_text = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_text}")
    lines.append("Fix the file or override the key with --set KEY.PATH=VALUE.")
    return "\n".join(lines)


def validate(cls: type[S], tree: dict[str, Any], source: str = "<config>") -> S:
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (recipes live in configs/, e.g. configs/data/demo.yaml)")
    try:
        tree = _yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(cls: type[S], path: str | Path | None = None, overrides: list[str] | None = None) -> S:
    """Load a recipe (or the defaults when `path` is None), apply overrides, validate."""
    tree = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        tree = apply_overrides(tree, overrides, cls)
        source += " with --set " + " ".join(overrides)
    return validate(cls, tree, source)


def to_yaml(cfg: Section) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_resolved(cfg: Section, path: str | Path) -> Path:
    """Write the fully resolved config (defaults filled in) next to a run's outputs, atomically."""
    from avssl.io import atomic_write_text

    return atomic_write_text(Path(path), to_yaml(cfg))


def flatten(cfg: Section | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: for logging a config as run parameters."""
    tree = cfg.model_dump(mode="json") if isinstance(cfg, Section) else cfg
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
