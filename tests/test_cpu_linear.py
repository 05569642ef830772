"""The native linear loop (csrc/linear.cpp, fastalign.models.native.linear_rows) against F.linear, and
the model copy that runs it on the static path (fastalign.models.cpu_linear)."""

from __future__ import annotations

import pytest
import torch

from fastalign.models import cpu_linear, native

requires_loop = pytest.mark.skipif(not native.native_linear_supported(),
                                   reason="fastalign._C is not built here or this CPU has no linear loop")


pytestmark = pytest.mark.usefixtures("one_thread_native_on")


def spy_on_the_loop():
    """A function giving the rows of each run of ``_C``'s linear loop since this call, sorted (``native.loop_runs``:
    from ``linear_rows`` and from the op's kernel, C++ or Python, alike)."""
    start = native.loop_runs()["linear"]
    return lambda: sorted((native.loop_runs()["linear"] - start).elements())


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
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16, 17, 33])
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
def test_a_rows_value_depends_only_on_which_loop_runs(isa):
    # each loop sums an output in one order whatever the other rows are: up to four rows the dot loop, beyond
    # that the column loop (groups of 8 or 16 rows in the lanes of a vector, the last one zero-padded)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(63, 200, generator=gen)  # odd O: the last outputs outside a block
    x = torch.randn(40, 200, generator=gen)
    dot = native.native_linear(x[:4], w, isa=isa)
    for r in range(4):
        assert torch.equal(native.native_linear(x[r: r + 1], w, isa=isa)[0], dot[r])
    assert torch.equal(native.native_linear(x[1:3], w, isa=isa), dot[1:3])
    columns = native.native_linear(x, w, isa=isa)
    for start, rows in [(0, 5), (3, 9), (7, 16), (20, 17), (35, 5), (1, 33)]:
        assert torch.equal(native.native_linear(x[start: start + rows], w, isa=isa), columns[start: start + rows])
    assert not torch.equal(columns[:4], dot)  # two summation orders: the test tells the loops apart


@requires_loop
@pytest.mark.skipif(len(loops()) < 2, reason="this CPU runs only one loop")
def test_the_column_loops_of_both_instruction_sets_give_the_same_bits():
    # one fused multiply-add chain per output and row, lanes that do not mix: 8 and 16 lanes agree exactly
    gen = torch.Generator().manual_seed(5)
    w, b = torch.randn(70, 300, generator=gen), torch.randn(70, generator=gen)
    for rows in (5, 8, 9, 16, 23):
        x = torch.randn(rows, 300, generator=gen)
        assert torch.equal(native.native_linear(x, w, b, isa="avx512f"), native.native_linear(x, w, b, isa="avx2"))


@requires_loop
def test_edge_shapes():
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(6, 40, generator=gen)
    w = big[1:]  # contiguous, at a storage offset
    assert native.native_linear(torch.randn(0, 40), w).shape == (0, 5)
    x = torch.randn(2, 40, generator=gen)
    assert torch.allclose(native.native_linear(x, w), x @ w.T, atol=1e-5)
    assert torch.allclose(native.native_linear(x, w[:1]), x @ w[:1].T, atol=1e-5)  # one output
    empty = torch.zeros(3, 0)
    assert not native.native_linear_ok(torch.zeros(1, 0), empty, None)  # I = 0: F.linear's answer
    assert torch.equal(native.linear_rows(torch.zeros(1, 0), empty, torch.ones(3)), torch.ones(1, 3))


@requires_loop
def test_the_op_passes_torch_s_checks():
    gen = torch.Generator().manual_seed(4)
    w, b = torch.randn(12, 40, generator=gen), torch.randn(12, generator=gen)
    for x in (torch.randn(1, 40, generator=gen), torch.randn(2, 3, 40, generator=gen)):
        torch.library.opcheck(cpu_linear.linear_rows_op, (x, w, b))
        torch.library.opcheck(cpu_linear.linear_rows_op, (x, w, None))


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
    ran = spy_on_the_loop()
    native.linear_rows(x, w)
    assert ran() == [1]
    many = torch.randn(native.LINEAR_MAX_ROWS + 1, 16, generator=gen)
    assert refuses(many, w, None)  # more rows than LINEAR_MAX_ROWS
    assert torch.equal(native.linear_rows(many, w), torch.nn.functional.linear(many, w)) and ran() == [1]
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
def test_the_copy_shares_the_weights_and_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_llama()
    twin = cpu_linear.native_twin(model)
    linears = {n: m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    big = {n for n, size in linears.items() if size >= cpu_linear.MIN_WEIGHT_ELEMENTS}
    assert big and len(big) < len(linears)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n in linears)  # the model as it was
    assert {n for n, m in twin.named_modules() if type(m) is cpu_linear.RowsLinear} == big
    mine, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    assert mine.keys() == theirs.keys() and all(mine[k] is theirs[k] for k in mine)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # still tied
    ran = spy_on_the_loop()
    ids = torch.tensor([[3, 7, 11, 2]])
    with torch.no_grad():
        assert torch.allclose(twin(ids[:, :1]).logits, model(ids[:, :1]).logits, atol=1e-5)  # one row: the loop
        assert ran() == [1] * len(big)
        assert torch.allclose(twin(ids).logits, model(ids).logits, atol=1e-5)  # four rows: the loop as well
        assert ran() == [1] * len(big) + [4] * len(big)
    assert cpu_linear.twin_is_current(twin, model)


@requires_loop
def test_a_module_runs_as_it_is_where_a_copy_would_not_serve(monkeypatch):
    model = tiny_llama()
    torch.set_num_threads(2)
    assert cpu_linear.native_twin(model) is model  # the loop has one thread
    torch.set_num_threads(1)
    model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert cpu_linear.native_twin(model) is model  # a copy would call the hook on the copy
    small = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert cpu_linear.native_twin(small) is small  # nothing worth turning
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    fresh = tiny_llama()
    assert cpu_linear.native_twin(fresh) is fresh


@requires_loop
def test_with_a_gradient_asked_the_layer_is_f_linear(monkeypatch):
    layer = torch.nn.Linear(256, 300)
    twin = cpu_linear.native_twin(torch.nn.Sequential(layer))
    ran = spy_on_the_loop()
    x = torch.randn(1, 256)
    twin(x).sum().backward()
    assert ran() == [] and layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(twin(x), layer(x), atol=1e-5) and ran() == [1]


@requires_loop
def test_biases_through_the_compiled_op(monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 300), torch.nn.ReLU(), torch.nn.Linear(300, 256)).eval()
    twin = cpu_linear.native_twin(net)
    ran = spy_on_the_loop()
    compiled = torch.compile(twin, dynamic=False)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.allclose(compiled(x), net(x), atol=1e-5)
    assert ran() == [3, 3]


@requires_loop
def test_a_model_layer_remakes_its_copy_when_the_weights_are_replaced():
    from fastalign.models.causal_lm import CausalLM

    model = tiny_llama()
    lm = CausalLM(model)
    assert lm.backbone is not model
    first = lm.prefill([[3, 7, 11, 2]])
    other = tiny_llama()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    model.load_state_dict(other.state_dict(), assign=True)  # new Parameter objects
    assert not cpu_linear.twin_is_current(lm.backbone, model)
    second = lm.prefill([[3, 7, 11, 2]])
    assert cpu_linear.twin_is_current(lm.backbone, model)
    with torch.no_grad():
        expected = model(torch.tensor([[3, 7, 11, 2]])).logits[:, -1]
    assert torch.allclose(second, expected, atol=1e-4) and not torch.allclose(first, second, atol=1e-2)


@requires_loop
@pytest.mark.parametrize("store", ["ragged", "compiled slots"])
def test_decode_steps_of_the_model_layer_call_the_loop(monkeypatch, store):
    """On both stores (through torch.compile on the slot store: the op is opaque, its kernel runs at each
    call) decode steps of one row reach the loop, and the tokens are those of the model as given."""
    from fastalign.models.causal_lm import CausalLM
    from fastalign.models.slots import SlotStore, StaticOptions

    ran = spy_on_the_loop()
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
    assert 1 in ran()
    if store != "ragged":
        assert lm.store.compiled_shapes  # the decode steps ran compiled


def anon_huge_pages_kb(address: int) -> int:
    """``AnonHugePages`` (kB) of this process's mapping that holds ``address`` (Linux ``/proc/self/smaps``)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(v, 16) for v in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def fresh_pages(n: int) -> torch.Tensor:
    """``n`` fp32 zeros on a private anonymous mapping of their own: 4 KiB pages (unless THP is "always"), where
    memory from the allocator may sit on pages an earlier test already backed with huge ones."""
    import mmap

    memory = mmap.mmap(-1, 4 * n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=torch.float32)  # (the tensor keeps the mapping alive)


def thp_mode() -> str:
    """The transparent huge page mode: always, madvise or never ('' where there is none)."""
    return native.huge_page_mode()


def collapse_works_here() -> bool:
    """Linux 6.1+ with transparent huge pages not switched off: where ``MADV_COLLAPSE`` exists."""
    import platform

    if thp_mode() in ("", "never"):
        return False
    try:
        major, minor = (int(v) for v in platform.release().split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 1)


@requires_loop
def test_huge_pages_back_a_tensor_without_changing_it(monkeypatch):
    """``collapse_huge_pages`` backs the whole huge pages of a tensor's storage with huge pages (seen in
    /proc/self/smaps) and leaves its values as they were; a storage smaller than a huge page, and the switch
    ``FASTALIGN_NATIVE=0``, give 0 and change nothing."""
    if not collapse_works_here():
        pytest.skip("no MADV_COLLAPSE here (not Linux 6.1+, or transparent huge pages are off)")
    t = fresh_pages(3 * 2**20)
    want = torch.randn(t.shape)
    t.copy_(want)
    before = anon_huge_pages_kb(t.data_ptr())  # (the mapping may have merged with others)
    done = native.collapse_huge_pages(t)
    assert done >= 5 * 2**21 and done % 2**21 == 0  # 12 MiB hold at least 5 whole 2 MiB pages
    gained = anon_huge_pages_kb(t.data_ptr()) - before
    assert gained >= done // 1024 or (thp_mode() == "always" and gained >= 0)
    assert torch.equal(t, want)
    assert native.collapse_huge_pages(torch.randn(1000)) == 0
    monkeypatch.setenv("FASTALIGN_NATIVE", "0")
    assert native.collapse_huge_pages(torch.randn(3 * 2**20)) == 0


@requires_loop
def test_the_copy_backs_its_turned_weights_with_huge_pages():
    """``native_twin`` backs the weights of the layers it turns with huge pages (their mapping, in a background
    thread joined here): every byte of an aligned 4 MiB weight; the model's outputs do not change."""
    if not collapse_works_here():
        pytest.skip("no MADV_COLLAPSE here (not Linux 6.1+, or transparent huge pages are off)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 16))
    weight = fresh_pages(1024 * 1024).view(1024, 1024)  # 4 MiB on 4 KiB pages, turned
    weight.copy_(model[0].weight.detach())
    model[0].weight = torch.nn.Parameter(weight)
    x = torch.randn(1, 1024)
    with torch.no_grad():
        want = model(x)
        twin = cpu_linear.native_twin(model)
        assert cpu_linear.wait_for_huge_pages(timeout=60)
        assert anon_huge_pages_kb(model[0].weight.data_ptr()) >= 4096  # two whole huge pages: all of it
        torch.testing.assert_close(twin(x), want)


@requires_loop
def test_the_turned_weights_move_into_one_mapping_in_their_order():
    """``native_twin`` moves the weights of the layers it turns into one mapping aligned to a huge page, one after
    the other in the layers' order, each on a storage of its own: the parameter objects, their values and the
    ties stay; a second copy of the model moves nothing."""
    huge = native.huge_page_bytes()
    if not huge:
        pytest.skip("no transparent huge pages here")
    model = tiny_llama()  # 4.5 MB of turned weights: more than a huge page
    params = dict(model.named_parameters())
    values = {name: p.detach().clone() for name, p in params.items()}
    ids = torch.tensor([[3, 7, 11, 2]])
    with torch.no_grad():
        want = model(ids).logits
        twin = cpu_linear.native_twin(model)
        turned = [m.weight for m in twin.modules() if type(m) is cpu_linear.RowsLinear]  # (the layers' order)
        starts = [w.data_ptr() for w in turned]
        assert starts[0] % huge == 0
        for w, following in zip(turned, turned[1:]):
            end = w.data_ptr() + 4 * w.numel()
            assert end <= following.data_ptr() < end + cpu_linear.WEIGHT_ALIGNMENT
        assert all(w.untyped_storage().nbytes() == 4 * w.numel() for w in turned)  # a storage each
        assert len({w.untyped_storage().data_ptr() for w in turned}) == len(turned)
        assert dict(model.named_parameters()) == params  # the same objects
        assert all(torch.equal(p, values[name]) for name, p in params.items())
        assert torch.equal(model(ids).logits, want)
        cpu_linear.native_twin(model)
        assert [w.data_ptr() for w in turned] == starts  # laid out already


@requires_loop
def test_a_weight_that_shares_its_storage_stays_where_it_is():
    """Moving a weight whose storage another tensor also uses, of the module or not, would untie the two: it
    stays. The mapping is whole huge pages."""
    huge = native.huge_page_bytes()
    if not huge or not native.huge_pages_on():
        pytest.skip("no transparent huge pages here")
    net = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    net.register_buffer("rows", net[1].weight.detach()[:2])  # a view of the second weight's storage
    alias = net[2].weight.detach()  # the third's, held outside the module
    other = torch.nn.Parameter(net[3].weight.data)  # the fourth's, another model's parameter
    kept = [net[i].weight.data_ptr() for i in (1, 2, 3)]
    mapping = cpu_linear.into_one_mapping([m.weight for m in net], list(net.parameters()) + list(net.buffers()))
    assert net[0].weight.data_ptr() == mapping.data_ptr() and mapping.numel() % huge == 0  # moved; whole pages
    assert [net[i].weight.data_ptr() for i in (1, 2, 3)] == kept  # still shared
    assert net.rows.data_ptr() == kept[0] and alias.data_ptr() == kept[1] and other.data_ptr() == kept[2]


@requires_loop
def test_weights_moved_inside_inference_mode_can_still_be_trained():
    """The copy made under ``torch.inference_mode`` (an engine built there) leaves ordinary tensors: the caller
    may train the model afterwards."""
    huge = native.huge_page_bytes()
    if not huge or not native.huge_pages_on():
        pytest.skip("no transparent huge pages here")
    net = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    with torch.inference_mode():
        cpu_linear.native_twin(net)
    assert net[0].weight.data_ptr() % huge == 0 and not net[0].weight.is_inference()
    net(torch.randn(2, 1024)).sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0
