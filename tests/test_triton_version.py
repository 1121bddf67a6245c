"""The Triton versions fastvae claims: 3.6 and newer (setup.py), refused clearly below that."""

import subprocess
import sys


def test_an_older_triton_is_refused_with_a_clear_error():
    code = "import triton; triton.__version__ = '3.5.1'; import fastvae.kernels"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError") and "need triton >= 3.6" in last and "3.5.1 is installed" in last


def test_the_installed_triton_is_accepted():
    from fastvae import kernels

    assert kernels._release("3.6.0") == (3, 6) and kernels._release("3.10.0+git1a2b") == (3, 10)
    assert kernels._release(__import__("triton").__version__) >= kernels.MIN_TRITON


def test_setup_claims_the_version_the_kernels_check():
    from pathlib import Path

    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    assert "triton>=3.6;" in setup
