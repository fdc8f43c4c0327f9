"""configs/ ships with the package: a wheel built from the checkout, installed into a fresh venv,
runs ``fpdiff demo --quick`` from outside the source tree (issue 25). The venv sees the development
venv's site-packages (torch and the other dependencies, not fpdiff: its editable finder is never
activated there) through a path file, so nothing is downloaded."""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ["pipeline", "configs", "setup.py", "setup.cfg", "pyproject.toml", "README.md"]


def build_wheel(out: Path) -> Path:
    """The wheel of a copy of the checkout (an in-tree build would leave build/ and egg-info behind)."""
    src = out / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out / "dist"), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (out / "dist").glob("fpdiff-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (Path(purelib) / "dev_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return python


def test_installed_wheel_runs_the_demo_outside_the_checkout(tmp_path, mnist_shards):
    wheel = build_wheel(tmp_path)
    python = fresh_venv(tmp_path / "venv")
    # --ignore-installed: the development venv's fpdiff is visible and must not be touched
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run([str(python), "-c", "import pipeline.config_files as c; print(c.__file__); print(c.CONFIG_DIR)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    venv = str(tmp_path / "venv")
    assert where[0].startswith(venv) and where[1].startswith(venv), where  # the installed copy, its configs
    assert sorted(p.name for p in Path(where[1]).glob("*.yaml")) == sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))

    fpdiff = tmp_path / "venv" / "bin" / "fpdiff"
    r = subprocess.run([str(fpdiff), "demo", "--quick", "--run-dir", "demo", "--data-dir",
                        str(Path(mnist_shards[0]).parent)], cwd=work, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((work / "demo" / "summary.json").read_text())
    assert summary["steps"] > 0 and (work / "demo" / "samples.png").is_file()
