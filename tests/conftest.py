import os

# Before anything imports triton or transformers: run Triton kernels on the CPU interpreter, stay offline.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# Tiny models: one thread is as fast as two and immune to oversubscription on a busy 2-core machine.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: integration tests against a real vLLM server (tests/integration); "
                                       "select with -m vllm, deselect with -m 'not vllm'")
    # The Triton interpreter runs a kernel's float math as NumPy array operations, and NumPy warns about IEEE
    # results that the kernels produce on purpose for masked (-inf) logits and zero probabilities: log(0) = -inf,
    # -inf - (-inf) = nan, 0 * inf = nan, each then discarded by a tl.where (compiled on a GPU, the same
    # arithmetic is silent). That these values never reach an output is what the tests check: the kernels
    # equal their PyTorch references token for token on masked vocabularies. Only these messages from the
    # interpreter are silenced; a warning from anywhere else still shows.
    for message in ("divide by zero encountered", "invalid value encountered"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture
def one_thread_native_on(monkeypatch):
    """One torch thread (the native loops' condition) and ``FASTALIGN_NATIVE`` unset, for the test."""
    monkeypatch.delenv("FASTALIGN_NATIVE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_device():
    """Where Triton-vs-reference tests put their tensors: ``"cuda"`` when a GPU runs the compiled kernels
    (``TRITON_INTERPRET`` not ``1``), ``"cpu"`` under the interpreter; both sides of a comparison run there."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a GPU (or run with TRITON_INTERPRET=1)")
    return "cuda"


@pytest.fixture(params=["eager", "static"])
def both_layers(request, monkeypatch):
    """Run a test on both model layers: the eager reference and the static cache (``Engine(static_cache=True)``,
    uncompiled: the same cache logic and steps as ``compile=True`` without the compilation time)."""
    if request.param == "static":
        from fastalign.api import Engine

        eager_init = Engine.__init__

        def static_init(self, *args, **kwargs):
            kwargs.setdefault("static_cache", True)
            eager_init(self, *args, **kwargs)

        monkeypatch.setattr(Engine, "__init__", static_init)
    return request.param
