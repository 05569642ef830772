"""The native few-row linear loop (csrc/linear.cpp, fastalign.models.native.linear_rows) against F.linear, and
the model copy that runs it on the static path (fastalign.models.cpu_linear)."""

from __future__ import annotations

import pytest
import torch

from fastalign.models import cpu_linear, native

requires_loop = pytest.mark.skipif(not native.native_linear_supported(),
                                   reason="fastalign._C is not built here or this CPU has no linear loop")


@pytest.fixture(autouse=True)
def _one_thread_native_on(monkeypatch):
    monkeypatch.delenv("FASTALIGN_NATIVE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loops() -> list[str]:
    """The loops this CPU runs (the widest first)."""
    if not native.native_linear_supported():
        return []
    order = ["avx512f", "avx2"]
    return order[order.index(native.native_info()["linear_isa"]):]


def reference(x, w, b):
    """F.linear in float64: the exact value up to the inputs' rounding."""
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())


@requires_loop
@pytest.mark.parametrize("isa", loops())
@pytest.mark.parametrize("in_features", [1, 7, 16, 31, 33, 64, 100, 768])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_rows_is_f_linear(isa, in_features, rows, bias):
    gen = torch.Generator().manual_seed(in_features * 10 + rows)
    w = torch.randn(37, in_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    b = torch.randn(37, generator=gen) if bias else None
    assert native.native_linear_ok(x, w, b) == (rows <= native.LINEAR_MAX_ROWS)
    out = native.native_linear(x, w, b, isa=isa)
    exact = reference(x, w, b)
    # fp32 dot products of length I: rounding within a few ulps of sum |w x| (another order than BLAS's)
    scale = reference(x.abs(), w.abs(), None if b is None else b.abs())
    assert out.dtype == torch.float32 and out.shape == (rows, 37)
    assert ((out.double() - exact).abs() <= 4 * in_features * 2**-24 * scale + 1e-30).all()


@requires_loop
@pytest.mark.parametrize("isa", loops())
def test_a_rows_value_does_not_depend_on_the_other_rows(isa):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 200, generator=gen)
    x = torch.randn(4, 200, generator=gen)
    together = native.native_linear(x, w, isa=isa)
    for r in range(4):
        assert torch.equal(native.native_linear(x[r: r + 1], w, isa=isa)[0], together[r])
    assert torch.equal(native.native_linear(x[1:3], w, isa=isa), together[1:3])


@requires_loop
def test_leading_dimensions_and_strided_input():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(10, 24, generator=gen)
    x = torch.randn(2, 1, 48, generator=gen)[..., ::2]  # [2, 1, 24], not contiguous
    out = native.linear_rows(x, w)
    assert out.shape == (2, 1, 10)
    assert torch.allclose(out, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@requires_loop
def test_what_the_loop_does_not_take_goes_to_f_linear(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 16, generator=gen)
    x = torch.randn(1, 16, generator=gen)

    def refuses(*args, **kwargs):
        return not native.native_linear_ok(*args, **kwargs)

    assert native.native_linear_ok(x, w, None)
    assert torch.equal(native.linear_rows(x, w), native.native_linear(x, w))  # taken: the loop ran
    five = torch.randn(5, 16, generator=gen)
    assert refuses(five, w, None)  # more rows than LINEAR_MAX_ROWS
    assert torch.equal(native.linear_rows(five, w), torch.nn.functional.linear(five, w))
    assert refuses(x.double(), w.double(), None)
    assert refuses(x, w.t().contiguous().t(), None)  # a weight that is not contiguous
    assert refuses(x, w, torch.randn(9))  # a bias of another size
    assert refuses(x, torch.randn(8, 15), None)
    with torch.enable_grad():
        assert refuses(x, w.clone().requires_grad_(), None)
    torch.set_num_threads(2)
    assert refuses(x, w, None)  # the loop has one thread: BLAS takes more
    assert torch.equal(native.linear_rows(x, w), torch.nn.functional.linear(x, w))
    torch.set_num_threads(1)
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    assert refuses(x, w, None)
    assert torch.equal(native.linear_rows(x, w), torch.nn.functional.linear(x, w))


@requires_loop
def test_an_unknown_loop_is_an_error():
    with pytest.raises(ValueError, match="no linear loop 'sse9'"):
        native.native_linear(torch.randn(1, 8), torch.randn(4, 8), isa="sse9")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # q/o/MLP/output weights of 2**16 elements and more (the loop's), keys and values of 2**15 (F.linear's)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=300, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@requires_loop
def test_the_copy_shares_the_weights_and_leaves_the_model_as_it_was():
    model = tiny_llama()
    twin = cpu_linear.with_native_linears(model)
    linears = {n: m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    big = {n for n, size in linears.items() if size >= cpu_linear.MIN_WEIGHT_ELEMENTS}
    assert big and len(big) < len(linears)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n in linears)  # the model as it was
    assert {n for n, m in twin.named_modules() if type(m) is cpu_linear.RowsLinear} == big
    mine, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    assert mine.keys() == theirs.keys() and all(mine[k] is theirs[k] for k in mine)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # still tied
    ids = torch.tensor([[3, 7, 11, 2]])
    with torch.no_grad():
        assert torch.allclose(twin(ids[:, :1]).logits, model(ids[:, :1]).logits, atol=1e-5)  # one row: the loop
        assert torch.allclose(twin(ids).logits, model(ids).logits, atol=1e-5)  # four rows: the loop as well


@requires_loop
@pytest.mark.parametrize("store", ["ragged", "compiled slots"])
def test_decode_steps_of_the_model_layer_call_the_loop(monkeypatch, store):
    """On both stores (through torch.compile on the slot store: the op is opaque, its Python body runs at each
    call) decode steps of one row reach native.linear_rows, and the tokens are those of the model as given."""
    from fastalign.models.causal_lm import CausalLM
    from fastalign.models.slots import SlotStore, StaticOptions

    calls = []
    real = native.linear_rows
    monkeypatch.setattr(native, "linear_rows", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    model = tiny_llama()
    lm = CausalLM(model, store=SlotStore(StaticOptions(compile=True)) if store != "ragged" else None)
    logits = lm.prefill([[3, 7, 11, 2]], 8)
    prefix = [3, 7, 11, 2]
    with torch.no_grad():
        for _ in range(4):
            tok = int(logits.reshape(-1).argmax())
            assert tok == int(model(torch.tensor([prefix])).logits[0, -1].argmax())
            prefix.append(tok)
            logits = lm.extend(torch.tensor([[tok]]))
    assert any(shape[:-1].numel() == 1 for shape in calls)
    if store != "ragged":
        assert lm.store.compiled_shapes  # the decode steps ran compiled
