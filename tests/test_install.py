"""``pip install .`` (a built wheel, not editable) runs everything from a directory outside the checkout:
the configs and the published reference numbers are package data, found without the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel installed. The venv sees this interpreter's installed dependencies
    through a path file (so nothing is downloaded), but not its site hooks: an editable install of the
    checkout stays invisible, and ``harness`` can only come from the wheel."""
    base = tmp_path_factory.mktemp("install")
    wheels, source = base / "wheels", base / "source"   # built from a copy: the build leaves nothing in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "results", "build", "*.egg-info", "__pycache__",
                                                                ".kvsite", ".lockenv"))
    shutil.copytree(ROOT / "results" / "reference", source / "results" / "reference")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    [wheel] = list(wheels.glob("kv_harness-*.whl"))
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    return {"wheel": wheel, "bin": env_dir / "bin", "python": python, "site": Path(site)}


def test_the_wheel_ships_configs_and_reference_numbers(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "harness/conf/config.yaml" in names
    assert "harness/conf/method/snapkv.yaml" in names and "harness/conf/model/tiny_llama.yaml" in names
    assert any(n.startswith("harness/reference/") and n.endswith(".json") for n in names)
    assert not any(n.startswith(("tests/", "conf/", "results/")) for n in names)


def test_run_and_table_from_outside_the_checkout(installed, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update({"WANDB_MODE": "disabled", "PATH": f"{installed['bin']}:{env.get('PATH', '')}",
                "KV_HARNESS_CACHE": str(tmp_path / "cache")})
    where = subprocess.run([str(installed["python"]), "-c", "import harness; print(harness.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(installed["site"])), where          # the wheel's copy, not the checkout
    run = subprocess.run(["kvh", "run", "model=tiny_llama", "task=passkey", "method=snapkv", "method.budget=64"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "results" / "passkey" / "tiny_llama" / "default" / "snapkv_b64_w32_k7_maxpool_qh"
    assert (folder / "predictions.jsonl").is_file() and (folder / "manifest.json").is_file()
    assert len((folder / "predictions.jsonl").read_text().splitlines()) == 3      # 1 length x 3 depths
    table = subprocess.run(["kvh", "table"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "snapkv" in table.stdout.lower()
    assert (tmp_path / "results" / "tables" / "table.md").is_file()
    helps = subprocess.run(["kvh", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert helps.returncode == 0 and "kvh table" in helps.stdout
