"""Recipes that start from another (`base = "file.toml"`): merged by table, theirs win."""

import pytest

from speedq_mlx.errors import SpeedQError
from speedq_mlx.quant.recipe import component_settings, load_recipe
from speedq_mlx.stages.common import StageConfig


def _write(folder, name, text):
    (folder / name).write_text(text)
    return folder / name


def test_a_recipe_changes_only_what_differs_from_its_base(tmp_path):
    _write(tmp_path, "base.toml", 'description = "base"\n[quant]\nbits = 2\ngroup_size = 64\n'
           "[quant.embeddings]\nbits = 4\ngroup_size = 32\n[stage3]\nsteps = 100\nlr = 2e-5\nbatch = 4\n")
    child = _write(tmp_path, "child.toml", 'base = "base.toml"\ndescription = "child"\n[quant]\nbits = 4\n'
                   "[stage3]\nlr = 1e-5\n")
    recipe = load_recipe(child)
    assert recipe["description"] == "child" and recipe["path"] == str(child) and "base" not in recipe
    s = component_settings(recipe)
    assert s["language"] == (4, 64) and s["embeddings"] == (4, 32)  # [quant] merged key by key
    cfg = StageConfig.from_recipe(recipe, "stage3")
    assert (cfg.train.steps, cfg.train.lr, cfg.train.batch) == (100, 1e-5, 4)


def test_a_base_that_is_missing_or_loops_is_a_one_line_error(tmp_path):
    lost = _write(tmp_path, "lost.toml", 'base = "nowhere.toml"\n')
    with pytest.raises(SpeedQError, match=r"recipe file not found: .*nowhere.toml \(base of .*lost.toml\)"):
        load_recipe(lost)
    _write(tmp_path, "a.toml", 'base = "b.toml"\n')
    _write(tmp_path, "b.toml", 'base = "a.toml"\n')
    with pytest.raises(SpeedQError, match="base chain comes back to itself") as e:
        load_recipe(tmp_path / "a.toml")
    assert "\n" not in str(e.value)


def test_a_bad_key_in_a_base_names_the_base(tmp_path):
    _write(tmp_path, "base.toml", "[quant]\nbitz = 2\n")
    child = _write(tmp_path, "child.toml", 'base = "base.toml"\n')
    with pytest.raises(SpeedQError, match=r"recipe .*base.toml: unknown key\(s\) in \[quant\]: bitz"):
        load_recipe(child)
