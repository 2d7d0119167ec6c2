"""Model sources: Hugging Face repo ids and registered names go through huggingface_hub's
cache (offline here), local folders are used as they are."""

import json
import shutil
import subprocess
import sys

import pytest

from speedq_mlx.model import registry

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tiny_ckpt, tmp_path):
    """A Hugging Face cache holding the tiny checkpoint as repo test-org/tiny-internvl."""
    repo = tmp_path / "hub" / "models--test-org--tiny-internvl"
    shutil.copytree(tiny_ckpt, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def _run(code, env_extra, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "SPEEDQ_NO_OPENBLAS": "1",
           "HF_HOME": str(tmp_path / "hf-home"), **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_repo_id_and_registered_name_load_from_cache_offline(hub_cache, tmp_path):
    code = (
        "import sys; from speedq_mlx.model import registry; "
        "registry.MODELS['tiny-test'] = 'test-org/tiny-internvl'; "
        "from speedq_mlx.cli import main; main(sys.argv[1:])"
    )
    for i, model in enumerate(["test-org/tiny-internvl", "tiny-test"]):
        out = tmp_path / f"out{i}"
        proc = subprocess.run(
            [sys.executable, "-c", code, "quantize", "--method", "rtn", "-m", model, "-b", "2", "-o", str(out)],
            capture_output=True, text=True,
            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "SPEEDQ_NO_OPENBLAS": "1",
                 "HF_HUB_CACHE": str(hub_cache), "HF_HOME": str(tmp_path / "hf-home")})
        assert proc.returncode == 0, proc.stderr
        assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 2
        assert f"test-org--tiny-internvl/snapshots/{COMMIT}" in proc.stdout


def test_offline_and_not_cached_is_a_clear_error(tmp_path):
    proc = _run("from speedq_mlx.cli import main; main(['quantize', '--method', 'rtn', '-m', 'internvl2-1b', '-b', '2', '-o', 'x'])",
                {"HF_HUB_CACHE": str(tmp_path / "empty")}, tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("error: cannot get OpenGVLab/InternVL2-1B from the Hugging Face hub")
    assert "HF_HUB_OFFLINE" in line and "\n" not in line


def test_registry_names_map_to_hub_repos():
    assert registry.hub_id("InternVL2-1B") == "OpenGVLab/InternVL2-1B"
    assert set(registry.MODELS) == {"internvl2-1b", "internvl2.5-1b", "internvl3-1b", "internvl3-2b"}
