"""The built wheel on its own: ``eoc demo`` from a clean virtualenv, outside the source tree.

The wheel is built from a copy of the sources (``pip wheel`` writes ``build/`` and ``*.egg-info``
next to ``setup.py``, so the repository is never touched), installed with ``--no-deps`` into a new
virtualenv, and the dependencies (torch, numpy, safetensors, tqdm, triton) are borrowed from the
running interpreter by a ``.pth`` file listing its site-packages. A path line of a ``.pth`` file only
goes onto ``sys.path``: the ``.pth`` files in that folder (among them the editable install's, whose
finder maps ``eoc_dit`` to the source tree) are not processed, so ``eoc_dit`` can only come from the
wheel. The test checks that as well, then runs the new venv's ``eoc demo --samples 4`` in a temporary
working directory. ``pytest -s`` shows the demo's output.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

pytestmark = pytest.mark.slow  # 10-15 s on 2 cores: build, venv, install, demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the build reads: setup.py, pyproject.toml, README.md (the long description), the packages.
BUILD_INPUTS = ["setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "eoc_kernels", "python", "csrc"]
JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", ".ruff_cache", ".pytest_cache", ".hypothesis", "*.egg-info",
                              "build", "dist")
PROBE = """
import json, sys
import eoc_dit, eoc_dit.testbed, eoc_kernels
print(json.dumps({"eoc_dit": eoc_dit.__file__, "eoc_kernels": eoc_kernels.__file__, "assets": eoc_dit.testbed.ASSETS,
                  "meta_path": [type(f).__name__ for f in sys.meta_path], "modules": sorted(sys.modules),
                  "path": sys.path}))
"""


def _run(argv, timeout=180, **kwargs):
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{argv} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _dependency_dirs() -> list[str]:
    """The running interpreter's site-packages folders (where torch & co. are installed)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    source = {os.path.realpath(REPO), os.path.realpath(os.path.join(REPO, "python"))}
    out = []
    for path in paths:
        if os.path.isdir(path) and path not in out and os.path.realpath(path) not in source:
            out.append(path)
    return out


def _build_leftovers() -> dict[str, float]:
    """What a build in the repository itself would leave: build/, dist/, *.egg-info (name -> mtime)."""
    out = {}
    for folder in (REPO, os.path.join(REPO, "python")):
        for name in os.listdir(folder):
            if name in ("build", "dist") or name.endswith(".egg-info"):
                path = os.path.join(folder, name)
                out[path] = os.path.getmtime(path)
    return out


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv folder, its bin folder, a subprocess env) with only the built wheel of this repository installed."""
    before = _build_leftovers()
    root = tmp_path_factory.mktemp("wheel")
    src, dist, venv = root / "src", root / "dist", root / "venv"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=JUNK)
        elif os.path.isfile(path):
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # One intra-op thread, as tests/conftest.py sets in-process: the demo's tensors are small, and on a busy
    # 2-core machine two spinning threads make it 4-7x slower (5 s vs 20-35 s seen).
    env["OMP_NUM_THREADS"] = "1"

    # The wheel compiles eoc_kernels._C (about 70 s alone on 2 cores; several times that on a loaded machine).
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
         timeout=900, env=env)
    wheels = sorted(dist.glob("eoc_kernels-*.whl"))
    assert len(wheels) == 1, wheels
    assert _build_leftovers() == before, "building the wheel wrote into the repository"

    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    # This interpreter's pip installs into the new one (which has none); nothing is downloaded.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", str(wheels[0])],
         env=env)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip()
    assert _inside(purelib, str(venv))
    # After the install, so that pip does not see this environment's eoc-kernels as already installed.
    with open(os.path.join(purelib, "zz_borrowed_dependencies.pth"), "w") as f:
        f.write("".join(path + "\n" for path in _dependency_dirs()))
    return venv, venv / "bin", env


def test_wheel_installs_every_package_and_the_testbed_assets(wheel_venv):
    venv, bin_dir, env = wheel_venv
    info = json.loads(_run([str(bin_dir / "python"), "-c", PROBE], env=env, cwd=str(venv)).stdout)
    for key in ("eoc_dit", "eoc_kernels", "assets"):
        assert _inside(info[key], str(venv)), f"{key} resolves to {info[key]}, not inside the new venv {venv}"
        assert (not _inside(info[key], os.path.join(REPO, "python"))
                and not _inside(info[key], os.path.join(REPO, "eoc_kernels")))
    # The borrowed site-packages' own .pth files were not processed: no editable finder, nothing from the source tree.
    assert not any("Editable" in name for name in info["meta_path"]), info["meta_path"]
    assert not any(name.startswith("__editable__") for name in info["modules"])
    assert os.path.join(REPO, "python") not in info["path"] and REPO not in info["path"]
    shipped = {"testbed_dit.pt", "MODEL_CARD.json", "testbed_prior_ddim20.safetensors", "classifier.pt",
               "test_feature_stats.pt", "CLASSIFIER_CARD.json"}
    assert shipped <= set(os.listdir(info["assets"])), os.listdir(info["assets"])


def test_demo_runs_from_the_wheel(wheel_venv, tmp_path):
    _, bin_dir, env = wheel_venv
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run([str(bin_dir / "eoc"), "demo", "--samples", "4"], check=False, cwd=str(cwd), env=env,
                            capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "| method |" in result.stdout and "| uncached |" in result.stdout
    assert "| FORA N=3 |" in result.stdout and "| FORA N=3 + EOC calibrated |" in result.stdout
    png = cwd / "eoc_demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "-> eoc_demo.png" in result.stdout
    assert os.listdir(cwd) == ["eoc_demo.png"]  # nothing else written where the user ran it
