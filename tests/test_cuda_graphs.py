"""CUDA graphs on the compiled path (``fastalign.models.slots``): what can be checked without a GPU, and the GPU
checks that run where one is (``bench/gpu/run_tests_and_kernels.sh``).

Without a GPU: the mode each device gets (``step_compilation``, the one place that decides), the graph-mode code
path run on the CPU under a stand-in for cudagraph trees that reuses and overwrites every output the way
replays do (the tokens stay the eager ones; without the clones they do not), the static KV addresses (marked,
and seen as static inputs by dynamo), the shapes that would be captured, the fallbacks (graphs off, blocks wider
than the buckets, eager), and that the step traces as one graph (no host sync that would split the captured
region).
"""

import pytest
import torch

import fastalign
from fastalign.errors import InputError
from fastalign.models import slots
from fastalign.models.causal_lm import CausalLM
from fastalign.models.slots import CUDA_GRAPHS_ENV, SlotStore, StaticOptions, StepCompilation, step_compilation
from fastalign.testing import perturbed, tiny_causal_lm, tiny_reward_model

GRAPHS = StepCompilation(compile=True, mode="reduce-overhead", options=None, graphs=True)
NO_GRAPHS = StepCompilation(compile=True, mode=None, options=None, graphs=False)
CUDA = torch.device("cuda")  # a device object only: nothing runs on it here


# --------------------------------------------------------------------------- the mode per device
def test_the_mode_is_chosen_from_the_device(monkeypatch):
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    cpu = step_compilation(StaticOptions(), torch.device("cpu"))
    assert cpu == StepCompilation(True, None, {"cpp_wrapper": True}, graphs=False)  # the CPU path as it was
    assert step_compilation(StaticOptions(cuda_graphs=True), "cpu") == cpu  # no graphs off CUDA
    assert step_compilation(StaticOptions(cpp_wrapper=False), "cpu").options is None
    assert step_compilation(StaticOptions(), CUDA) == GRAPHS
    assert step_compilation(StaticOptions(), "cuda:1") == GRAPHS
    assert step_compilation(StaticOptions(cuda_graphs=False), CUDA) == NO_GRAPHS
    assert step_compilation(StaticOptions(compile=False), CUDA) == StepCompilation(compile=False)
    assert step_compilation(StaticOptions(compile=False), "cpu") == StepCompilation(compile=False)
    # an explicit mode is used as it is; graphs follow from it
    assert step_compilation(StaticOptions(mode="max-autotune-no-cudagraphs"), CUDA).graphs is False
    assert step_compilation(StaticOptions(mode="max-autotune", cuda_graphs=False), CUDA).graphs is True
    assert step_compilation(StaticOptions(mode="default"), CUDA) == StepCompilation(True, "default", None, False)


def test_the_environment_turns_graphs_off(monkeypatch):
    for value, graphs in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(CUDA_GRAPHS_ENV, value)
        assert step_compilation(StaticOptions(), CUDA).graphs is graphs, value
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "0")
    assert step_compilation(StaticOptions(cuda_graphs=True), CUDA) == GRAPHS  # the option wins over the default
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "maybe")
    with pytest.raises(InputError, match=CUDA_GRAPHS_ENV):
        step_compilation(StaticOptions(), CUDA)
    assert step_compilation(StaticOptions(), "cpu").graphs is False  # read only where it matters


def test_attach_compiles_with_the_chosen_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    model = tiny_causal_lm("llama")
    for options in (StaticOptions(), StaticOptions(cuda_graphs=True), StaticOptions(mode="max-autotune",
                                                                                    cpp_wrapper=False)):
        lm = CausalLM(model, SlotStore(options))
        assert lm.store.compilation == step_compilation(options, "cpu")
        assert calls.pop() == dict(dynamic=False, mode=lm.store.compilation.mode,
                                   options=lm.store.compilation.options)
    CausalLM(model, SlotStore(StaticOptions(compile=False)))
    assert calls == []  # not compiling: torch.compile is not called


def test_an_engine_compiles_on_the_cpu_without_graphs(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    engine = fastalign.Engine(target=tiny_causal_lm("llama"), compile=True)
    assert engine.target.store.compilation == StepCompilation(True, None, {"cpp_wrapper": True}, graphs=False)


# --------------------------------------------------------------------------- the graph-mode path on the CPU
class FakeCudagraphs:
    """``torch.compile(mode="reduce-overhead")`` as cudagraph trees treat outputs, on the CPU: a compiled function
    returns its output in one buffer per output shape (a replay writes the same memory), and every call (a new
    cudagraph step) first overwrites what all earlier calls of every compiled function returned (NaN), as
    replaying a graph of the tree's shared pool may. Counts ``cudagraph_mark_step_begin`` calls."""

    def __init__(self, monkeypatch, compilation: StepCompilation):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.calls = self.marks = 0
        monkeypatch.setattr(torch, "compile", self.compile)
        monkeypatch.setattr(slots, "step_compilation",
                            lambda options, device: compilation if options.compile else StepCompilation(False))
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", self.mark)

    def mark(self):
        self.marks += 1

    def compile(self, fn, **kwargs):
        def replay(*args):
            for buffer in self.buffers.values():
                buffer.fill_(float("nan"))
            out = fn(*args)
            buffer = self.buffers.setdefault((id(replay), tuple(out.shape)), torch.empty_like(out))
            buffer.copy_(out)
            self.calls += 1
            return buffer
        return replay


METHODS = [
    ("sample", {}),
    ("sd", {"num_draft_tokens": 3}),
    ("sd", {"tree": "topk", "branching": (2, 2, 1)}),
    ("sss", {"tree": "sampled"}),
    ("cards", {"reward_threshold": 1.0, "max_segment_tokens": 6}),
    ("qalign", {"steps": 2, "chains": 2}),
]


@pytest.fixture(scope="module")
def world():
    from fastalign.eval.toyworld import load_toy_world

    return load_toy_world()


def decode_all(world, flags):
    outs = []
    for method, options in METHODS:
        roles = dict(target=world.target, draft=world.aligned_draft if method == "sss" else world.draft,
                     ref=world.ref if method == "sss" else None, reward=world.reward, tokenizer=world.tokenizer)
        engine = fastalign.Engine(**roles, **flags)
        outs.append(engine.decode(world.prompts[:3], method=method, max_new_tokens=12, seed=2, **options))
    return outs, engine


def test_graph_mode_outputs_outlive_replays(world, monkeypatch):
    """The graph-mode path (forced on the CPU) under ``FakeCudagraphs``: every method's tokens and counts are the
    eager ones, each compiled call starts a cudagraph step, and the KV buffers are static addresses."""
    eager, _ = decode_all(world, {})
    fake = FakeCudagraphs(monkeypatch, GRAPHS)
    graphs, engine = decode_all(world, dict(compile=True))
    assert fake.calls > 100 and fake.marks == fake.calls
    for (method, _), e, g in zip(METHODS, eager, graphs):
        assert g.sequences == e.sequences, method
        assert g.stats["target_calls"] == e.stats["target_calls"], method
    store = engine.target.store
    assert store.compilation.graphs and store.cache.static_addresses
    for layer in store.layers():
        assert layer.keys._dynamo_static_input_type == layer.values._dynamo_static_input_type == "unguarded"


def test_without_the_clones_replays_corrupt_the_methods(world, monkeypatch):
    """The control: the same stand-in with the graph-mode handling off (outputs returned as the replay left them):
    the methods that keep a model's logits across its later calls (``sd`` and ``sss`` keep the draft's over the
    K draft steps) no longer get the eager tokens. So the previous test sees the hazard the clones remove."""
    eager, _ = decode_all(world, {})
    FakeCudagraphs(monkeypatch, NO_GRAPHS)
    broken, _ = decode_all(world, dict(compile=True))
    assert [method for (method, _), b, e in zip(METHODS, broken, eager) if b.sequences != e.sequences] == \
        ["sd", "sss"]


def test_the_shapes_captured_and_the_fallbacks(monkeypatch):
    """Compiled (captured) shapes: decode steps and blocks padded to the width buckets, over the row bucket. Not
    captured: the prefill, blocks wider than the last width bucket, calls with extra model arguments. Graphs off:
    no cudagraph steps, no static marks."""
    fake = FakeCudagraphs(monkeypatch, GRAPHS)
    model = tiny_causal_lm("llama", context=256)
    eager, lm = CausalLM(model), CausalLM(model, SlotStore(StaticOptions()))
    prompts = [[1, 2, 3], [4, 5], [6]]
    torch.testing.assert_close(lm.prefill(prompts, 40), eager.prefill(prompts, 40))
    assert fake.calls == 0 and lm.store.compiled_shapes == set()  # the prefill runs uncompiled
    S = lm.store.cache.length
    outs, wants = [], []
    for width in (1, 3, 1, 5, 16, 17, 20, 1):
        tokens = torch.arange(1, 1 + 3 * width).reshape(3, width) % 60 + 1
        before = fake.calls
        outs.append(lm.extend(tokens))
        wants.append(eager.extend(tokens))
        assert fake.calls == before + (width <= 16), width
    for out, want in zip(outs, wants):  # every output kept its values through the later replays
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # the attention views: the first 32 columns up to the 16-wide block (columns 13-28), then 128 (column 66)
    assert S == 128 and lm.store.compiled_shapes == {(4, 1, 1, 32, S), (4, 4, 1, 32, S), (4, 8, 1, 32, S),
                                                     (4, 16, 1, 32, S), (4, 1, 1, 128, S)}
    assert {shape for _, shape in fake.buffers} == {(4, w, 64) for w in (1, 4, 8, 16)}  # outputs: one per width

    off = FakeCudagraphs(monkeypatch, NO_GRAPHS)
    lm = CausalLM(model, SlotStore(StaticOptions()))
    lm.prefill(prompts, 8)
    lm.extend(torch.ones(3, 1, dtype=torch.long))
    assert off.calls == 1 and off.marks == 0 and not lm.store.cache.static_addresses
    assert not hasattr(lm.store.layers()[0].keys, "_dynamo_static_input_type")


def test_graph_mode_reward_model_and_resized_buffers_keep_eager_outputs(monkeypatch):
    """A reward model (hidden states out of the step) and a cache that grows (new, re-marked buffers) under the
    stand-in: the eager tokens."""
    monkeypatch.setattr(slots, "LENGTH_STEP", 16)
    monkeypatch.setattr(slots, "WIDTH_BUCKETS", (1, 2))
    target = tiny_causal_lm(vocab_size=16, hidden=16, layers=1, init_range=0.8, context=512)
    roles = dict(target=target, draft=perturbed(target, 0.05, 1), reward=tiny_reward_model(vocab_size=16))
    kw = dict(max_new_tokens=30, seed=1)
    prompts = [[1, 2, 3], [4, 5]]
    eager = [fastalign.decode(prompts, method=m, **roles, **kw).sequences for m in ("sd", "bon")]
    fake = FakeCudagraphs(monkeypatch, GRAPHS)
    engine = fastalign.Engine(**roles, compile=True)
    graphs = [engine.decode(prompts, method=m, **kw).sequences for m in ("sd", "bon")]
    assert graphs == eager and fake.calls > 30
    assert engine.target.store.cache.length > 16  # it grew past its first buffers
    assert all(layer.keys._dynamo_static_input_type == "unguarded" for layer in engine.target.store.layers())


def test_the_step_traces_as_one_graph():
    """What a CUDA graph captures is one dynamo graph: the step (mask built inside, the model's forward, the KV
    writes) has no graph break, so no host sync or Python fallback splits it. Traced on the CPU (dynamo only)."""
    model = tiny_causal_lm("llama")
    lm = CausalLM(model, SlotStore(StaticOptions(compile=False)))
    lm.prefill([[1, 2, 3], [4, 5]], 8)
    store = lm.store
    store.open_block(2, 1, compilable=True)
    R = store.cache.rows
    columns = torch.arange(store.end, store.end + 1)
    store.cache.write.columns = columns
    seen = store._live_buf[:, None, :slots.view_length(store.end + 1, store.cache.length)].contiguous()
    torch._dynamo.maybe_mark_dynamic(seen, 2)  # as ``write`` passes it: the view's length a dynamic size
    explained = torch._dynamo.explain(SlotStore._step)(
        store, torch.ones(R, 1, dtype=torch.long), torch.full((R, 1), 3), seen, torch.ones(R, 1, 1, dtype=torch.bool),
        columns)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "no-graphs"])
def test_the_kv_buffers_are_static_inputs_of_the_traced_step(monkeypatch, graphs):
    """What dynamo hands the backend (traced on the CPU, not compiled): in graph mode the KV buffers, which the step
    writes in place, are static inputs like the weights (cudagraph trees skip a graph that writes a non-static
    input), and the only non-static inputs are the small per-call tensors torch copies into the graph; without
    graphs the KV buffers stay ordinary inputs (the CPU path as it was)."""
    graphs_seen = []

    def backend(gm, example_inputs):
        graphs_seen.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=backend, dynamic=False))
    monkeypatch.setattr(slots, "step_compilation", lambda options, device: GRAPHS if graphs else NO_GRAPHS)
    lm = CausalLM(tiny_causal_lm("llama", layers=2), SlotStore(StaticOptions()))
    lm.prefill([[1, 2, 3], [4, 5]], 8)
    lm.extend(torch.ones(2, 1, dtype=torch.long))
    assert len(graphs_seen) == 1  # one graph: no break
    placeholders = list(graphs_seen[0].graph.find_nodes(op="placeholder"))
    static = {n.name for n in placeholders if n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")}
    written = {node.args[0].name for node in graphs_seen[0].graph.nodes  # targets of in-place ops
               if node.op in ("call_method", "call_function") and str(getattr(node.target, "__name__",
                                                                              node.target)).endswith("_")
               and node.args and getattr(node.args[0], "op", None) == "placeholder"}
    kv = {f"l_self_cache_layers_{i}_{kind}" for i in range(2) for kind in ("keys", "values")}
    assert written == kv
    per_call = {"l_tokens_", "l_positions_", "l_seen_", "l_block_", "l_columns_"}
    # and the sizes of the attention's view of the cache (a dynamic dimension: ``slots.SlotStore.write``)
    sizes = {n.name for n in placeholders if isinstance(n.meta.get("example_value"), torch.SymInt)}
    assert sizes
    if graphs:
        assert {n.name for n in placeholders} - static - sizes == per_call
    else:
        assert not static & kv and per_call | kv <= {n.name for n in placeholders} - static


# --------------------------------------------------------------------------- on a GPU
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda_only
@pytest.mark.parametrize("env", ["1", "0"], ids=["graphs", "no-graphs"])
def test_cuda_compiled_engine_gives_the_eager_tokens(monkeypatch, env):
    """On a GPU, fp32: ``Engine(compile=True)`` with CUDA graphs (and with them off) gives the eager engine's
    tokens for ``sample`` and ``sd`` (whose draft logits outlive the draft's next replays), and torch captured
    every step (``cudagraph_or_error``: a skipped graph raises, with its reason; the ``cudagraph_skips`` counter)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    monkeypatch.setenv(CUDA_GRAPHS_ENV, env)
    target = tiny_causal_lm("llama", vocab_size=64, hidden=32, layers=2, init_range=0.5)
    roles = dict(target=target, draft=perturbed(target, 0.05, 1), device="cuda")
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    compiled, eager = fastalign.Engine(**roles, compile=True), fastalign.Engine(**roles)
    assert compiled.target.store.compilation.graphs is (env == "1")
    skips = counters["inductor"]["cudagraph_skips"]
    with inductor_config.patch({"triton.cudagraph_or_error": env == "1"}):
        for method, options in (("sample", {}), ("sd", {"num_draft_tokens": 3})):
            for seed in (0, 1):
                kw = dict(method=method, max_new_tokens=16, seed=seed, **options)
                got, want = compiled.decode(prompts, **kw), eager.decode(prompts, **kw)
                assert got.sequences == want.sequences, (method, seed)
    assert compiled.target.store.compiled_shapes and compiled.draft.store.compiled_shapes
    assert counters["inductor"]["cudagraph_skips"] == skips
    if env == "1":
        assert all(layer.keys._dynamo_static_input_type == "unguarded" for layer in compiled.target.store.layers())
