"""The configuration reference (docs/configuration.md) is generated from the config classes and
kept in step with them."""

from __future__ import annotations

from pathlib import Path

from avssl import reference

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"


def _keys() -> list[tuple[str, reference.Row]]:
    return [
        (recipe.cls.__name__, row)
        for recipe in reference.recipes()
        for name, section, instance in reference.sections(recipe.cls)
        for row in reference.leaf_rows(section, f"{name}.", instance)
    ]


def test_configuration_doc_is_the_rendered_reference():
    """docs/configuration.md is exactly what render() writes from the code today."""
    assert DOC.read_text() == reference.render(), (
        "docs/configuration.md is out of date: run `python -m avssl.reference --write docs/configuration.md`"
    )


def test_every_config_key_has_a_description():
    """Every leaf key of every recipe carries a Field description, and every section a docstring."""
    missing = [f"{recipe}: {row.key}" for recipe, row in _keys() if not (row.field.description or "").strip()]
    assert not missing, "add Field(description=...) to: " + ", ".join(missing)
    undocumented = [
        f"{recipe.cls.__name__}.{name} ({section.__name__})"
        for recipe in reference.recipes()
        for name, section, _ in reference.sections(recipe.cls)
        if not (section.__doc__ or "").strip()
    ]
    assert not undocumented, "add a class docstring to: " + ", ".join(undocumented)


def test_reference_lists_every_key_with_the_recipes_defaults():
    """Each key appears once per recipe, with the default the recipe builds (FinetuneRecipe's optim
    starts at base_lr 5e-4, not OptimConfig's 1.5e-4), and required keys are marked."""
    text = reference.render()
    for recipe, row in _keys():
        assert f"| `{row.key}` |" in text, f"{recipe}: {row.key} missing from the reference"
    rows = {(recipe, row.key): row for recipe, row in _keys()}
    assert rows["FinetuneRecipe", "optim.base_lr"].default == 5e-4
    assert rows["PretrainRecipe", "optim.base_lr"].default == 1.5e-4
    assert rows["PretrainRecipe", "masking.reconstruction.audio_ratios"].default == [0.75]
    assert reference.default_text(rows["FinetuneRecipe", "head.task"].default) == "required"


def test_module_writes_the_reference(tmp_path):
    """`python -m avssl.reference --write PATH` writes render() to PATH."""
    out = tmp_path / "configuration.md"
    reference.main(["--write", str(out)])
    assert out.read_text() == reference.render()


def test_readme_is_short_and_docs_speak_of_the_project():
    """The README stays a front page (at most 200 lines), and no project file speaks of how it was
    developed (a session or issue number): history lives in git."""
    import re

    assert len((ROOT / "README.md").read_text().splitlines()) <= 200, "README.md is over 200 lines: move detail to docs/"
    history = re.compile(r"session [0-9]+|issue [0-9]+", re.IGNORECASE)
    folders = ["docs", "configs", "pretrain", "finetune", "kernels", "cluster", "avssl", "benchmarks"]
    files = [ROOT / "README.md"] + [p for f in folders for p in (ROOT / f).rglob("*")
                                    if p.suffix in (".md", ".py", ".yaml", ".sh", ".toml") and p.is_file()]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
             if history.search(line)]
    assert not found, "development history in project files (keep it in git): " + ", ".join(found)
