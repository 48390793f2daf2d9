"""`pip install embedder` works outside a checkout: the wheel carries the config folder, and composing a config from
the installed package finds it there (not in a repository that happens to be around)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_the_configs_and_composes_outside_a_checkout(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("embedder-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    shipped = {n[len("embedder/configs/"):] for n in names if n.startswith("embedder/configs/")}
    in_repo = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")
               if "local" not in p.parts}
    assert shipped == in_repo  # every YAML file, and nothing else
    assert "embedder/sample_data/qa/train.json" in names
    assert not (tmp_path / "site" / "embedder" / "configs").is_symlink()

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import embedder, embedder.config as c; "
            "assert embedder.__file__.startswith(sys.argv[1]), embedder.__file__; "
            "cfg = c.compose('train', ['task=beir', 'beir.folder=/data/beir/scifact']); "
            "print(c.CONFIG_DIR, cfg.recipe_name, cfg.model.model_name_or_path)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-2000:]
    config_dir, recipe_name, model_path = out.stdout.split()
    assert config_dir == str(tmp_path / "site" / "embedder" / "configs") and recipe_name == "beir-scifact"
    assert os.path.isdir(model_path)  # ${bundled:minilm} resolved from the installed package
