"""Typed config: strict validation with file, key path and reason; overrides; resolved dump."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import Field

from avssl.config import ConfigError, Section, apply_overrides, flatten, load_config, save_resolved


class Inner(Section):
    clip_seconds: float = Field(2.0, gt=0)
    workers: int = Field(2, ge=0)
    names: list[str] = Field(default_factory=list)


class Root(Section):
    data: Inner = Field(default_factory=Inner)
    seed: int = 0


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_loads_nested_sections_and_defaults(tmp_path):
    """A recipe fills the sections it names and defaults the rest."""
    cfg = load_config(Root, write(tmp_path, "data:\n  clip_seconds: 3.5\n"))
    assert cfg.data.clip_seconds == 3.5 and cfg.data.workers == 2 and cfg.seed == 0


def test_unknown_key_names_file_and_path(tmp_path):
    """A misspelled key fails at load time naming the file and the full key path."""
    path = write(tmp_path, "data:\n  clip_secnds: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(Root, path)
    assert str(path) in str(exc.value) and "data.clip_secnds" in str(exc.value) and "unknown key" in str(exc.value)


def test_wrong_type_is_rejected_not_coerced(tmp_path):
    """A string where an int belongs is an error, not silently converted."""
    with pytest.raises(ConfigError, match=r"data\.workers"):
        load_config(Root, write(tmp_path, "data:\n  workers: 'two'\n"))
    with pytest.raises(ConfigError, match=r"data\.workers"):
        load_config(Root, write(tmp_path, "data:\n  workers: '2'\n"))


def test_impossible_value_is_rejected(tmp_path):
    """Constraints (here clip_seconds > 0) are checked at load time with the reason."""
    with pytest.raises(ConfigError, match=r"data\.clip_seconds: Input should be greater than 0"):
        load_config(Root, write(tmp_path, "data:\n  clip_seconds: -1\n"))


def test_overrides_parse_yaml_values(tmp_path):
    """--set values are typed (2 -> int, [a, b] -> list) and may create nested keys."""
    cfg = load_config(Root, write(tmp_path, "seed: 1\n"), ["data.clip_seconds=2", "data.names=[a, b]", "seed=7"])
    assert cfg.data.clip_seconds == 2.0 and cfg.data.names == ["a", "b"] and cfg.seed == 7
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        apply_overrides({}, ["data.clip_seconds"])
    # YAML 1.2 floats: PyYAML's 1.1 rules would read 1e-2 and 5E3 as strings and fail validation.
    cfg = load_config(Root, write(tmp_path, "data:\n  clip_seconds: 5E3\n"), ["data.names=[1e5x]"])
    assert cfg.data.clip_seconds == 5000.0 and cfg.data.names == ["1e5x"]
    assert load_config(Root, None, ["data.clip_seconds=1e-2"]).data.clip_seconds == 0.01
    with pytest.raises(ConfigError, match=r"data\.nope"):
        load_config(Root, None, ["data.nope=1"])


def test_bad_yaml_names_line(tmp_path):
    """Broken YAML names the file and the line."""
    with pytest.raises(ConfigError, match="line 2"):
        load_config(Root, write(tmp_path, "seed: 1\n\tdata: 2\n"))  # a tab cannot start a token


def test_missing_file_says_where_recipes_are(tmp_path):
    """A missing recipe path is a clear error, not a traceback."""
    with pytest.raises(ConfigError, match="not found"):
        load_config(Root, tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    """The saved resolved config holds every default and loads back to the same object."""
    cfg = load_config(Root, None, ["data.workers=5"])
    path = save_resolved(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["data"]["clip_seconds"] == 2.0
    assert load_config(Root, path) == cfg
    assert flatten(cfg)["data.workers"] == 5


def test_repo_recipes_validate():
    """Every recipe shipped in configs/ validates against its config class."""
    from avssl.data.corpus import CorpusRecipe

    recipes = sorted(Path(__file__).resolve().parents[1].glob("configs/data/*.yaml"))
    assert recipes
    for path in recipes:
        load_config(CorpusRecipe, path)


def test_override_of_one_key_keeps_the_sections_other_defaults():
    """`--set masking.reconstruction.video_mode=tube` on a recipe without a masking section
    changes that key only; before, the created section lacked its required ratios and the whole
    override was refused."""
    from avssl.cluster.config import PretrainRecipe
    from avssl.pretrain.config import MaskingConfig

    recipe = Path(__file__).resolve().parent.parent / "configs" / "pretrain" / "demo.yaml"
    assert "masking" not in yaml.safe_load(recipe.read_text())
    cfg = load_config(PretrainRecipe, recipe, ["masking.reconstruction.video_mode=tube", "masking.reconstruction.video_ratios=[0.9]"])
    default = MaskingConfig()
    assert cfg.masking.reconstruction.video_mode == "tube" and cfg.masking.reconstruction.video_ratios == [0.9]
    assert cfg.masking.reconstruction.audio_ratios == default.reconstruction.audio_ratios
    assert cfg.masking.contrastive == default.contrastive
    # A key the recipe does set is overridden in place; an unknown section is still an error.
    assert load_config(PretrainRecipe, recipe, ["optim.warmup_steps=3"]).optim.base_lr == 2.0e-3
    with pytest.raises(ConfigError, match=r"nope"):
        load_config(PretrainRecipe, recipe, ["nope.x=1"])
