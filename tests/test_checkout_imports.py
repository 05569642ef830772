"""The checkout's ``kernels/`` folder (the package ``fastalign.kernels``) does not hide the PyPI package ``kernels``
(Hugging Face's, which transformers >= 5.25 imports) when the checkout's root is on ``sys.path``, as it is for
``python -m fastalign`` and ``python -m pytest`` run from the root."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_name_kernels_is_handed_to_the_package_found_elsewhere(tmp_path):
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'the other package'\n")
    # -S -I: no site-packages, so the only other `kernels` is the stand-in; the root comes first, as with python -m
    done = run(f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(other.parent)!r}]; import kernels; "
               "print(kernels.WHO); print(sorted(m for m in sys.modules if m.startswith('kernels')))",
               tmp_path, "-S", "-I")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["the other package", "['kernels']"]


def test_without_another_package_the_name_kernels_reads_as_not_installed(tmp_path):
    """transformers (5.x before 5.25) finds the folder with find_spec, has no metadata for it and imports it:
    the module must then read as absent (no __file__, no __version__), and importing it must not fail."""
    done = run(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import kernels; "
               "print(getattr(kernels, '__version__', 'N/A'), getattr(kernels, '__file__', None)); "
               "print(sorted(m for m in sys.modules if m.startswith('kernels'))); kernels.get_kernel",
               tmp_path, "-S", "-I")
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["N/A None", "['kernels']"]
    assert "the PyPI package kernels is not installed" in done.stderr
    assert "fastalign.kernels" in done.stderr


def test_transformers_and_fastalign_kernels_import_from_the_root():
    done = run("import transformers.activations, fastalign.kernels as fk; print(fk.sample.__module__)", ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fastalign.kernels.sample"]
