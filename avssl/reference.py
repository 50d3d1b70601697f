"""The configuration reference (docs/configuration.md), generated from the recipe classes.

Every key of every recipe is a field of a `Section` (a pydantic model) that carries its type,
default, constraints and `description`; this module walks the three recipes and writes one table
per section, so the reference cannot drift from the code (tests/test_reference.py compares the
file with `render()`).

    python -m avssl.reference                                # print the reference
    python -m avssl.reference --write docs/configuration.md  # rewrite the file
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from avssl.config import Section

DEFAULT_PATH = Path("docs/configuration.md")


@dataclass(frozen=True)
class Recipe:
    """One recipe class and the commands that read it."""

    cls: type[Section]
    command: str


def recipes() -> list[Recipe]:
    # Imported here: the cluster and finetune modules import torch and transformers.
    from avssl.cluster.config import PretrainRecipe
    from avssl.data.corpus import CorpusRecipe
    from avssl.finetune.recipe import FinetuneRecipe

    return [
        Recipe(CorpusRecipe, "`avssl data synth`"),
        Recipe(PretrainRecipe, "`avssl pretrain` and `avssl submit`"),
        Recipe(FinetuneRecipe, "`avssl finetune`, `avssl prove` and `avssl submit finetune`"),
    ]


@dataclass(frozen=True)
class Row:
    """One leaf key of a section: its dotted path under the recipe and its field."""

    key: str
    field: FieldInfo
    default: Any  # PydanticUndefined when the key is required


def _section_class(annotation: Any) -> type[Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def _default(field: FieldInfo) -> Any:
    return field.get_default(call_default_factory=True) if not field.is_required() else PydanticUndefined


def leaf_rows(cls: type[Section], prefix: str, instance: Section | None) -> Iterator[Row]:
    """Every leaf key under section `cls`, nested sections flattened into dotted keys. Defaults come
    from `instance` (the default the enclosing section builds, which may differ from the class's:
    FinetuneRecipe's optim starts at base_lr 5e-4), else from the class."""
    for name, field in cls.model_fields.items():
        value = getattr(instance, name) if instance is not None else _default(field)
        sub = _section_class(field.annotation)
        if sub is not None:
            yield from leaf_rows(sub, f"{prefix}{name}.", value if isinstance(value, BaseModel) else None)
        else:
            yield Row(prefix + name, field, value)


def sections(recipe: type[Section]) -> Iterator[tuple[str, type[Section], Section | None]]:
    """The recipe's top-level sections: (key, class, default instance or None when required)."""
    for name, field in recipe.model_fields.items():
        sub = _section_class(field.annotation)
        if sub is None:
            raise TypeError(f"{recipe.__name__}.{name}: a recipe's top-level keys must be sections")
        default = _default(field)
        yield name, sub, default if isinstance(default, BaseModel) else None


# ----------------------------------------------------------------------------- formatting


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        inner, *meta = args
        bounds = _bounds(meta)
        return f"{_type_name(inner)} ({bounds})" if bounds else _type_name(inner)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("multiple_of", "multiple of"),
           ("min_length", "length >="), ("max_length", "length <="))


def _bounds(metadata: list[Any]) -> str:
    """`ge=1, lt=1.0` constraints as `>= 1, < 1`, from annotated-types or pydantic metadata."""
    found: dict[str, Any] = {}
    nested = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            nested.append(_bounds(item.metadata))
            continue
        for attr, _ in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None and not isinstance(value, enum.Enum):
                found[attr] = value
    if "min_length" in found and found.get("max_length") == found["min_length"]:
        found["length"] = found.pop("min_length")
        del found["max_length"]
    parts = [f"{sign} {_number(found[attr])}" for attr, sign in (*_BOUNDS, ("length", "length")) if attr in found]
    return ", ".join(p for p in (*nested, *parts) if p)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def field_type(field: FieldInfo) -> str:
    name = _type_name(field.annotation)
    bounds = _bounds(field.metadata)
    return f"{name} ({bounds})" if bounds else name


def default_text(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    """Table-safe Markdown: pipes escaped, and `<name>` escaped so it is not read as an HTML tag."""
    return re.sub(r"<(?=[A-Za-z/])", r"\\<", text.replace("|", "\\|").replace("\n", " "))


def _doc(cls: type) -> str:
    """The first paragraph of a class docstring, on one line."""
    doc = inspect.getdoc(cls) if cls.__doc__ else ""
    return " ".join((doc or "").split("\n\n")[0].split())


def render() -> str:
    """The whole reference as Markdown: per recipe, one table per top-level section."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `python -m avssl.reference --write docs/configuration.md` from the config classes "
        "(types, defaults, constraints and `Field` descriptions); `tests/test_reference.py` fails when this "
        "file is out of date. A recipe is YAML with these sections; every key is optional unless marked "
        "required, unknown keys and wrong types are errors, and `--set KEY.PATH=VALUE` overrides one key "
        "(the value is parsed as YAML). Nested sections appear as dotted keys.",
        "",
    ]
    for recipe in recipes():
        cls = recipe.cls
        out += [f"## {cls.__name__}", "", f"{_doc(cls)} Read by {recipe.command}.", ""]
        for name, section, instance in sections(cls):
            out += [f"### `{name}`", "", f"{_doc(section)} (`{section.__module__}.{section.__name__}`)", ""]
            out += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
            for row in leaf_rows(section, f"{name}.", instance):
                out.append(
                    f"| `{row.key}` | {field_type(row.field)} | {_cell(default_text(row.default))} | "
                    f"{_cell(row.field.description or '')} |"
                )
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avssl.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="PATH", default=None, help=f"write the reference to PATH (e.g. {DEFAULT_PATH})")
    args = parser.parse_args(argv)
    text = render()
    if args.write is None:
        sys.stdout.write(text)
        return
    from avssl.io import atomic_write_text

    atomic_write_text(Path(args.write), text)
    print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
