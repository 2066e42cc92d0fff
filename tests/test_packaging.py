"""Packaging: `pip wheel --no-build-isolation --no-deps .` builds a wheel holding the compiled
operators, which installs into a fresh virtual environment (torch visible, nothing fetched) and,
imported from outside the source tree, runs with the 'cpp' backend.

pip builds in the tree, so the extension's object files from the in-place build (`make build`)
are reused: the wheel costs a link, not a compile."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import torch

import manualconv

REPO = Path(__file__).resolve().parent.parent
# other builds of this tree (`flock /tmp/manualconv-build.lock make build`) share its build/ folder
BUILD_LOCK = Path("/tmp/manualconv-build.lock")

CHECK = """
import torch, torch.nn.functional as F, manualconv, manualconv.functional as MF
x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
y = MF.conv2d(x, w, padding=1)
y.sum().backward()
expected = F.conv2d(x.detach(), w.detach(), padding=1)
print(manualconv.__file__)
print(manualconv.__version__, manualconv.get_backend(), manualconv.ops.AVAILABLE)
print((y - expected).abs().max().item(), x.grad.shape == x.shape and w.grad.shape == w.shape)
"""


@contextlib.contextmanager
def build_lock():
    with open(BUILD_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(args, **kwargs) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _isolated_env() -> dict:
    """No PYTHONPATH (the source tree must not be importable), no index (nothing fetched)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return dict(env, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", MAX_JOBS=env.get("MAX_JOBS", "2"))


def test_wheel_installs_into_fresh_venv_with_compiled_operators(tmp_path):
    env = _isolated_env()
    dist = tmp_path / "dist"
    with build_lock():
        _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", dist, REPO], cwd=REPO, env=env)
    (wheel,) = dist.glob("manualconv-*.whl")
    assert wheel.name.startswith(f"manualconv-{manualconv.__version__}-"), wheel.name  # the one version
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=env)
    python = venv / "bin" / "python"
    # torch lives in this test's environment (a virtual environment itself, so a new venv's
    # --system-site-packages would not reach it): a .pth file puts its site-packages on the path
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).strip())
    (site / "torch_environment.pth").write_text(str(Path(torch.__file__).resolve().parent.parent) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", wheel], env=env, cwd=tmp_path)
    lines = _run([python, "-c", CHECK], env=env, cwd=tmp_path).strip().splitlines()
    location, (version, backend, available), (difference, grad_shapes) = lines[-3], lines[-2].split(), lines[-1].split()
    assert Path(location).resolve().is_relative_to(site.resolve()), f"imported {location}, not the installed wheel"
    assert (version, backend, available) == (manualconv.__version__, "cpp", "True")
    # float64 conv of 27-term sums of O(1) values: torch's and the kernel's sums differ by rounding only
    assert float(difference) < 1e-12 and grad_shapes == "True"
    installed = list((site / "manualconv").glob("_C*.so"))
    assert installed, "the wheel holds no compiled extension"
