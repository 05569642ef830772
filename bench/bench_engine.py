"""Engine speed: the eager model layer vs the compiled one (``Engine(compile=True)``) vs ``transformers``'
``generate`` (eager, and with its own static cache and ``torch.compile``), side by side in one run.

Worlds:

* ``toy``: the shipped toy world (``fastalign.eval.toyworld``: a 3-layer 64-wide target, a 2-layer 48-wide draft,
  its aligned draft and reward model);
* ``100m``: random Llama-style models from ``bench_speculative.build_models``: a ~91M-parameter target
  (12 layers, 768 wide, vocabulary 8192) and a ~13M draft (its embeddings, first layer and norm), the ref a
  noisy copy of the draft; calibrated (``bench_speculative.calibrate``) so that the draft's entropy is 2 nats
  and the per-token SD acceptance ``--acceptance`` (0.8); ``cards`` and ``qalign`` use a rule reward (a
  callable: the share of even token ids), so only the target's calls are timed there;
* ``1b``: the same construction at GPU shapes: ``bench_speculative``'s ``1b`` target (TinyLlama-1.1B's shapes,
  22 layers, 2048 wide, vocabulary 32000) and a ~100M draft (``--draft-size 100m``: its first layer).

``--device`` and ``--dtype`` place every world's models (default: the CPU in fp32); on CUDA each call is timed
between ``torch.cuda.synchronize`` calls (``bench.common.timed``).

EOS is disabled everywhere (every run emits exactly ``--max-new-tokens`` tokens per prompt: equal work), and
sampling is at temperature 1 over the full vocabulary (``top_k=0`` for ``generate``), except ``cards`` (its
defaults, T = 0.7, top-k 40).

Timing: every case is first run once per variant to compile (its wall time minus the steady-state time is
reported as the compile time: ``torch.compile`` compiles each new shape on first use), then ``--repeats`` rounds
run the variants interleaved (eager, compiled, generate, ...) and the minimum wall time per variant is kept:
on a shared machine scheduling only adds time. The machine's load average is recorded before and after. A timed
call of the compiled engine can still meet a shape its first call did not (another seed, other acceptances) and
compile it: the JSON counts these per repeat (``new_shapes_while_timed``), and the table marks a compiled figure
"(compiling)" when its best run included one.

CUDA graphs: on a CUDA device ``Engine(compile=True)`` captures its compiled steps as CUDA graphs
(``fastalign.models.slots.step_compilation``). ``--graphs`` times both: ``compiled`` then runs torch.compile's
default mode (``FASTALIGN_CUDA_GRAPHS=0`` while its engines are built) and ``compiled_graphs`` the graphs
(``generate``'s static+compile variant uses ``transformers``' default ``reduce-overhead``, i.e. graphs, too).
Each world records each variant's compile settings and inductor's ``cudagraph_skips`` counter (a graph torch
declined to capture). On a CPU both variants compile the same way: ``--graphs`` there only checks that the code
runs.

    python bench/bench_engine.py                        # both worlds, all cases (CPU: ~30 min, mostly compiling)
    python bench/bench_engine.py --worlds toy --cases sample_b1,sd_chain
    python bench/bench_engine.py --device cuda --dtype bf16 --worlds 1b --cases sample_b1,sample_b16,sd_chain
    python bench/bench_engine.py --device cuda --dtype bf16 --worlds 1b --cases sample_b1,sample_b16,sd_chain --graphs

Against the physical limit (the ``sample`` cases): the same run first measures, on the same threads,

* the memory bandwidth ``BW``: a streaming read of a buffer much larger than the caches (``x.sum()`` over a
  ``--stream-mb`` fp32 tensor, default 1024 MB, on a CPU backed with huge pages where the OS allows, as the model
  layer backs the weights it streams), in GB/s: the best read of the run, read before the cases and again after
  each round of repeats of a ``sample`` case (a shared host's bandwidth drifts by a third within an hour: the
  fraction is then of the best the machine read while the case ran, not of one moment);
* (for reference) the rate at which fp32 matrix-vector products stream weights, ``F.linear`` of one row over
  256 MB of distinct ``[4096, 1024]`` matrices, in GB/s: what a batch-1 step's own kernels can reach here;
* the matmul FLOP rate ``F``: fp32 matmuls ``[16, H] x [H, 4H]`` (the batch-16 decode step's shape, ``H`` the
  target's width) and ``[1024, 1024] x [1024, 1024]``, each the best of a few; ``F`` is the faster of the two,
  in GFLOP/s (both are recorded), and like the bandwidth the best of the run: the large one is timed again
  after each round of repeats (the core's clock drifts with the host's load).

and per case the work of one generated token (``sample`` runs the target alone: one call per step, all rows in it):

* bytes read per token ``= W / batch + KV(L)``: ``W`` the bytes of the target's parameters read by one step
  (every parameter once; an input embedding table not shared with the output layer counts as the ``batch``
  rows it reads, so it adds one row per token), ``KV(L) = 2 * layers * kv_heads * head_dim * L * dtype bytes``
  the keys and values attended to at ``L``, the mean context length (prompt length + (new tokens - 1) / 2);
* FLOPs per token ``= 2 * P_mm + 4 * layers * heads * head_dim * L``: ``P_mm`` the non-embedding matrix
  parameters (every weight matrix, plus the output layer when it shares the embedding table; norms and the
  input embedding lookup excluded), the second term the attention scores and the weighted sum of the values.

and reports ``bandwidth fraction = bytes/token * tokens/s / BW`` and, for the batched cases (batch > 1),
``FLOP fraction = FLOPs/token * tokens/s / F``, and bytes/token * tokens/s over the matrix-vector rate, for
each variant (the table: compiled and generate static+compile). Prefill and the compiled path's padding (its
attention reads a view of the static cache, a power of two from 32 columns, with masked columns) are not
counted as work: they are overhead against the limit.

The result files are rewritten after every case, so a run cut short (a ``timeout``) keeps what it measured.

Writes ``bench/results/engine_<device>[_<tag>].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DTYPES, command_line, device_info, device_tag, markdown_table, timed, write_results,
)
import fastalign  # noqa: E402
from fastalign.models import cpu_linear, native  # noqa: E402
from fastalign.models.slots import CUDA_GRAPHS_ENV  # noqa: E402

CASES = {  # name: (method, options, batch)
    "sample_b1": ("sample", {}, 1),
    "sample_b16": ("sample", {}, 16),
    "sd_chain": ("sd", {"num_draft_tokens": 4}, 1),
    "sd_tree": ("sd", {"tree": "sampled"}, 1),
    "sss_chain": ("sss", {"num_draft_tokens": 4}, 1),
    "sss_tree": ("sss", {"tree": "sampled"}, 1),
    "cards": ("cards", {"reward_threshold": 0.0}, 1),
    "qalign": ("qalign", {"steps": 4}, 1),
}
GENERATE_CASES = ("sample_b1", "sample_b16")  # where generate does the same work


def even_share(prompts, responses):
    """A rule reward for the random models: the share of even token ids in the response."""
    return torch.tensor([sum(t % 2 == 0 for t in r) / max(1, len(r)) for r in responses])


# ------------------------------------------------------------------------------------------- limits
def _attention_shape(config) -> tuple[int, int, int, int]:
    """``(layers, heads, kv_heads, head_dim)`` of a decoder's config (Llama names, with GPT-2's as fallback)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, heads, kv_heads, head_dim


def _embedding_weights(model) -> list[torch.Tensor]:
    """The lookup tables (token, position) not shared with the output layer: read one row per token."""
    out = model.get_output_embeddings()
    out_w = out.weight if out is not None else None
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.weight is not out_w]


def weight_bytes_per_step(model, rows: int) -> int:
    """Bytes of ``model``'s parameters one decode step over ``rows`` rows reads: every parameter once (shared
    ones once), except unshared embedding tables, of which only the ``rows`` looked-up rows are read."""
    params = {id(p): p for p in model.parameters()}
    tables = {id(w): w for w in _embedding_weights(model)}
    total = sum(p.numel() * p.element_size() for k, p in params.items() if k not in tables)
    return total + sum(rows * w.shape[1] * w.element_size() for w in tables.values())


def matmul_params(model) -> int:
    """Parameters that take part in a matrix product per token: every weight matrix (dim >= 2) except the
    unshared embedding tables (a lookup); a table shared with the output layer counts once (the output layer)."""
    tables = {id(w) for w in _embedding_weights(model)}
    params = {id(p): p for p in model.parameters()}
    return sum(p.numel() for k, p in params.items() if p.dim() >= 2 and k not in tables)


def kv_bytes(model, length: float) -> float:
    """Bytes of keys and values one token's attention reads at context ``length`` (all layers)."""
    layers, _, kv_heads, head_dim = _attention_shape(model.config)
    elt = next(model.parameters()).element_size()
    return 2 * layers * kv_heads * head_dim * length * elt


def attention_flops(model, length: float) -> float:
    """FLOPs of one token's attention at context ``length``: scores ``q k^T`` and ``p v``, 2 each per MAC."""
    layers, heads, _, head_dim = _attention_shape(model.config)
    return 4 * layers * heads * head_dim * length


def sample_work(model, rows: int, prompt_len: float, new_tokens: int) -> dict:
    """Bytes read and FLOPs per generated token of ``sample`` at batch ``rows`` (module docstring)."""
    length = prompt_len + (new_tokens - 1) / 2
    return dict(mean_length=length,
                bytes_per_token=weight_bytes_per_step(model, rows) / rows + kv_bytes(model, length),
                flops_per_token=2 * matmul_params(model) + attention_flops(model, length))


def measure_bandwidth(device, mb: int = 1024, repeats: int = 5) -> float:
    """GB/s of a streaming read: ``x.sum()`` over an ``mb`` MB fp32 tensor, best of ``repeats``. On a CPU the
    tensor is backed with huge pages where the OS allows (``native.collapse_huge_pages``), as the model layer backs
    the weights it streams: the limit is the faster read. The tensor is made once per (device, size)."""
    key = (str(device), mb)
    if key not in _STREAM_BUFFERS:
        x = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
        if x.is_cpu:
            native.collapse_huge_pages(x)
        _STREAM_BUFFERS.clear()  # one buffer at a time
        _STREAM_BUFFERS[key] = x
    x = _STREAM_BUFFERS[key]
    best = min(timed(lambda: x.sum(), device)[1] for _ in range(repeats))
    return mb * 2**20 / best / 1e9


_STREAM_BUFFERS: dict = {}


def measure_gemv(device, mb: int = 256, repeats: int = 3) -> float:
    """GB/s of fp32 matrix-vector products (``F.linear`` of one row, the kernel of a batch-1 decode step) over
    distinct ``[4096, 1024]`` weights totalling ``mb`` MB, so that they stream from memory, best of ``repeats``."""
    ws = [torch.randn(4096, 1024, device=device) for _ in range(max(1, mb // 16))]
    x = torch.randn(1, 1024, device=device)
    best = min(timed(lambda: [torch.nn.functional.linear(x, w) for w in ws], device)[1] for _ in range(repeats))
    return len(ws) * 16 * 2**20 / best / 1e9


def measure_matmul(device, m: int, k: int, n: int, repeats: int = 5) -> float:
    """GFLOP/s of an fp32 ``[m, k] x [k, n]`` matmul, best of ``repeats`` (each timing enough calls to last
    about 50 ms)."""
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    calls = max(1, int(0.05 / max(1e-6, timed(lambda: a @ b, device)[1])))
    best = min(timed(lambda: [a @ b for _ in range(calls)], device)[1] for _ in range(repeats)) / calls
    return 2 * m * k * n / best / 1e9


def measure_limits(device, hidden: int, stream_mb: int) -> dict:
    """The machine's limits on the current threads (module docstring)."""
    small = measure_matmul(device, 16, hidden, 4 * hidden)
    large = measure_matmul(device, 1024, 1024, 1024)
    bandwidth = measure_bandwidth(device, stream_mb)
    return dict(bandwidth_gbps=bandwidth, bandwidth_samples_gbps=[bandwidth], stream_mb=stream_mb,
                gemv_gbps=measure_gemv(device),
                matmul_gflops={f"16x{hidden}x{4 * hidden}": small, "1024x1024x1024": large},
                flop_rate_gflops=max(small, large), flop_samples_gflops=[large])


def add_fractions(case: dict, work: dict, limits: dict, rows: int) -> None:
    """Per variant of ``case``: the fraction of the bandwidth limit and (``rows`` > 1) of the FLOP limit."""
    for v in case.values():
        if isinstance(v, dict) and "tokens_per_s" in v:
            v["bandwidth_fraction"] = work["bytes_per_token"] * v["tokens_per_s"] / (limits["bandwidth_gbps"] * 1e9)
            if "gemv_gbps" in limits:
                v["gemv_fraction"] = work["bytes_per_token"] * v["tokens_per_s"] / (limits["gemv_gbps"] * 1e9)
            if rows > 1:
                v["flop_fraction"] = work["flops_per_token"] * v["tokens_per_s"] / (limits["flop_rate_gflops"] * 1e9)


# ------------------------------------------------------------------------------------------- worlds
def toy_world(args):
    from fastalign.eval.toyworld import load_toy_world

    w = load_toy_world(device=args.device)
    for m in (w.target, w.draft, w.aligned_draft, w.reward):  # w.ref is w.draft
        m.to(dtype=args.dtype)
    for m in (w.target, w.draft, w.aligned_draft):
        m.generation_config.eos_token_id = None
    prompts = [p for p in w.tokenizer(w.prompts)["input_ids"]]
    models = dict(target=w.target, draft=w.draft, sss_draft=w.aligned_draft, ref=w.ref, reward=w.reward)
    return models, prompts, {}


RANDOM_WORLDS = {"100m": ("100m", "10m"), "1b": ("1b", "100m")}  # world: (target size, draft size)


def random_world(args, world):
    from bench.bench_speculative import TARGET_SIZES, build_models, calibrate

    TARGET_SIZES.setdefault("100m", dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12,
                                         num_key_value_heads=4, num_hidden_layers=12, vocab_size=8192))
    target, draft, extra = build_models(*RANDOM_WORLDS[world], args.device, args.dtype, args.seed)
    calib = argparse.Namespace(seed=args.seed, entropy=2.0, acceptance=args.acceptance, ref_tv=0.25)
    ref, settings = calibrate(target, draft, extra, calib, args.device)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, target.config.vocab_size, (16, 16), generator=gen).tolist()
    settings.update(target_params=sum(p.numel() for p in target.parameters()),
                    draft_params=sum(p.numel() for p in draft.parameters()))
    models = dict(target=target, draft=draft, sss_draft=draft, ref=ref, reward=even_share)
    return models, prompts, settings


@contextlib.contextmanager
def cuda_graphs_env(graphs: bool | None):
    """``FASTALIGN_CUDA_GRAPHS`` set to ``graphs`` (None: left as it is) while engines are built (their models'
    steps decide their compilation when attached)."""
    before = os.environ.get(CUDA_GRAPHS_ENV)
    if graphs is not None:
        os.environ[CUDA_GRAPHS_ENV] = "1" if graphs else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CUDA_GRAPHS_ENV, None)
        else:
            os.environ[CUDA_GRAPHS_ENV] = before


def engines(models, compile_, graphs: bool | None = None):
    """The engines of one layer kind: one for sss (aligned draft + ref), one for everything else. ``graphs``: CUDA
    graphs on (True) or off (False) for the compiled steps on a CUDA device (None: the default, on)."""
    def no_eos(engine):
        for lm in (engine.target, engine.draft, engine.ref):
            if lm is not None:
                lm.eos_token_ids = set()
                lm.eos_tensor = lm.eos_tensor[:0]
        return engine

    with cuda_graphs_env(graphs):
        plain = no_eos(fastalign.Engine(target=models["target"], draft=models["draft"], reward=models["reward"],
                                        compile=compile_))
        sss = no_eos(fastalign.Engine(target=models["target"], draft=models["sss_draft"], ref=models["ref"],
                                      compile=compile_))
    sss.target = plain.target  # one compiled target per world
    cpu_linear.wait_for_huge_pages()  # time the weights as they will stay (the model layer backs them with huge pages)
    return {"plain": plain, "sss": sss}


# ------------------------------------------------------------------------------------------- runs
def fastalign_run(engs, method, options, prompts, max_new, seed):
    engine = engs["sss" if method == "sss" else "plain"]
    kw = {} if method == "cards" else dict(temperature=1.0)
    out = engine.decode(prompts, method=method, max_new_tokens=max_new, seed=seed, **kw, **options)
    st = out.stats
    extra = {k: st[k] for k in ("acceptance_rate", "accepted_per_target_call") if k in st}
    return dict(tokens=st["generated_tokens"], target_calls=st["target_calls"], **extra)


def generate_run(model, prompts, max_new, seed, static: bool):
    from transformers import CompileConfig

    ids = torch.tensor(prompts, device=model.device)
    torch.manual_seed(seed)
    kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new, min_new_tokens=max_new,
              pad_token_id=0, attention_mask=torch.ones_like(ids))
    if static:
        cfg = CompileConfig(dynamic=False)
        cfg._compile_all_devices = True  # generate compiles on GPUs only unless told
        kw.update(cache_implementation="static", compile_config=cfg)
    out = model.generate(ids, **kw)
    return dict(tokens=(out.shape[1] - ids.shape[1]) * ids.shape[0])


def run_case(name, world_models, engs, prompts, args, limits=None):
    method, options, batch = CASES[name]
    rows = (prompts * batch)[:batch]
    def ours(kind):
        return lambda seed: fastalign_run(engs[kind], method, options, rows, args.max_new_tokens, seed)

    variants = {kind: ours(kind) for kind in engs}  # eager, compiled (and compiled_graphs)
    compiled_kinds = [k for k in engs if k != "eager"]
    if name in GENERATE_CASES:
        target = world_models["target"]
        variants["generate"] = lambda seed: generate_run(target, rows, args.max_new_tokens, seed, False)
        variants["generate_static_compiled"] = lambda seed: generate_run(target, rows, args.max_new_tokens, seed,
                                                                         True)
    first, times, info = {}, {k: [] for k in variants}, {}
    skips = dict.fromkeys(variants, 0)  # graphs inductor declined to capture, per variant
    for k, fn in variants.items():  # first calls: compilation of new shapes
        before = cudagraph_skips()
        info[k], first[k] = timed(lambda: fn(args.seed), args.device)
        skips[k] += cudagraph_skips() - before
    new_shapes = {k: [] for k in compiled_kinds}  # per repeat: shapes first met (and compiled) inside a timed call
    for r in range(args.repeats):
        for k, fn in variants.items():
            known = sum(map(len, compiled_shapes(engs[k]).values())) if k in new_shapes else 0
            before = cudagraph_skips()
            info[k], t = timed(lambda: fn(args.seed + 1 + r), args.device)
            skips[k] += cudagraph_skips() - before
            times[k].append(t)
            if k in new_shapes:
                new_shapes[k].append(sum(map(len, compiled_shapes(engs[k]).values())) - known)
        if limits is not None:  # bandwidth and clock drift on a shared host: the limits are the best of the run
            limits["bandwidth_samples_gbps"].append(measure_bandwidth(args.device, limits["stream_mb"], 2))
            limits["bandwidth_gbps"] = max(limits["bandwidth_samples_gbps"])
            limits["flop_samples_gflops"].append(measure_matmul(args.device, 1024, 1024, 1024, 2))
            small = limits["matmul_gflops"][next(iter(limits["matmul_gflops"]))]  # the batch-16 shape's, once
            limits["flop_rate_gflops"] = max(small, *limits["flop_samples_gflops"])
    out = {}
    for k in variants:
        best = min(times[k])
        out[k] = dict(wall_s=best, tokens=info[k]["tokens"], tokens_per_s=info[k]["tokens"] / best,
                      first_call_s=first[k], compile_s=max(0.0, first[k] - best), all_wall_s=times[k],
                      cudagraph_skips=skips[k],
                      **{x: v for x, v in info[k].items() if x != "tokens"})
    for k in compiled_kinds:
        out[k]["new_shapes_while_timed"] = new_shapes[k]
        out[k]["best_run_compiled"] = new_shapes[k][times[k].index(min(times[k]))] > 0
    print(f"  {name}: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s (compile {v['compile_s']:.0f} s)"
                                   for k, v in out.items()), flush=True)
    return out


def cudagraph_skips() -> int:
    """Graphs inductor declined to capture so far in this process (its ``cudagraph_skips`` counter)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def compiled_shapes(engs) -> dict:
    """The shapes each compiled model has compiled so far (``static_cache``: one compilation per shape)."""
    return {name: sorted(getattr(engs[kind], role).store.compiled_shapes)
            for name, kind, role in (("target", "plain", "target"), ("draft", "plain", "draft"),
                                     ("sss_draft", "sss", "draft"), ("ref", "sss", "ref"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="toy,100m", help="comma-separated, of toy, 100m, 1b (GPU shapes)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--acceptance", type=float, default=0.8, help="per-token SD acceptance of the 100m draft")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; docs/benchmarks.md, CPU threads)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream-mb", type=int, default=1024, help="size of the bandwidth probe's buffer (MB)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tag", help="suffix of the result files: engine_<device>_<tag>")
    ap.add_argument("--graphs", action="store_true",
                    help="also time the compiled engine with CUDA graphs (compiled_graphs); compiled then runs "
                         "torch.compile's default mode (on a CPU both are the same: a check that the code runs)")
    args = ap.parse_args(argv)
    worlds, cases = args.worlds.split(","), args.cases.split(",")
    for name, known in (("world", ["toy", *RANDOM_WORLDS]), ("case", CASES)):
        unknown = [x for x in (worlds if name == "world" else cases) if x not in known]
        if unknown:
            ap.error(f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    args.device, args.dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    info = device_info(args.device)
    info["cpu_count"] = os.cpu_count()
    payload = dict(command=command_line(), device=info, dtype=str(args.dtype).removeprefix("torch."),
                   threads=args.threads, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                   load_before=os.getloadavg(), worlds={})
    stem = f"engine_{device_tag(info)}" + (f"_{args.tag}" if args.tag else "")

    def save():  # after every case: a run cut short keeps what it measured
        payload["load_after"] = os.getloadavg()
        return write_results(stem, payload, to_markdown(payload), args.out_dir)

    for world in worlds:
        print(f"{world}:", flush=True)
        models, prompts, settings = toy_world(args) if world == "toy" else random_world(args, world)
        engs = {"eager": engines(models, False), "compiled": engines(models, True, False if args.graphs else None)}
        if args.graphs:
            engs["compiled_graphs"] = engines(models, True, True)
        results = {}
        compilation = {k: vars(engs[k]["plain"].target.store.compilation) for k in engs if k != "eager"}
        target = models["target"]
        limits = measure_limits(args.device, target.config.hidden_size, args.stream_mb)
        print(f"  limits: {limits['bandwidth_gbps']:.1f} GB/s, {limits['flop_rate_gflops']:.1f} GFLOP/s", flush=True)
        payload["worlds"][world] = dict(settings=settings, limits=limits, cases=results, compiled_shapes={},
                                        compilation=compilation)
        for name in cases:
            results[name] = run_case(name, models, engs, prompts, args,
                                     limits if CASES[name][0] == "sample" else None)
            method, _, batch = CASES[name]
            if method == "sample":
                rows = (prompts * batch)[:batch]
                results[name]["work"] = sample_work(target, batch, sum(map(len, rows)) / batch, args.max_new_tokens)
            for done, case in results.items():  # every case against the best limits read so far
                if "work" in case:
                    add_fractions(case, case["work"], limits, CASES[done][2])
            payload["worlds"][world]["compiled_shapes"] = compiled_shapes(engs["compiled"])
            save()
        del models, engs  # free the device before the next world
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    print("wrote", *save())


def to_markdown(payload) -> str:
    dev = payload["device"]
    lines = [f"# Engine speed: eager vs compiled vs transformers generate ({dev['name']}, "
             f"{payload.get('dtype', 'float32')}, {payload['threads']} thread(s), {dev['cpu_count']} CPUs)\n",
             f"`{payload['command']}`\n",
             f"torch {dev['torch']}; {payload['max_new_tokens']} new tokens per prompt, EOS disabled; minimum of "
             f"{payload['repeats']} interleaved repeats. Load average before / after: "
             f"{', '.join(f'{x:.1f}' for x in payload['load_before'])} / "
             f"{', '.join(f'{x:.1f}' for x in payload['load_after'])}.\n"]
    for world, res in payload["worlds"].items():
        lines.append(f"\n## {world}\n")
        graphs = any("compiled_graphs" in r for r in res["cases"].values())
        if res.get("compilation"):  # graphs torch declined to capture, summed over the cases
            lines.append("Compile settings (cudagraph skips): " + "; ".join(
                f"{k}: mode {c['mode']}, CUDA graphs {'on' if c['graphs'] else 'off'} "
                f"({sum(r[k].get('cudagraph_skips', 0) for r in res['cases'].values() if k in r)})"
                for k, c in res["compilation"].items()) + ".\n")
        if res["settings"]:
            s = res["settings"]
            lines.append(f"target {s['target_params'] / 1e6:.0f}M, draft {s['draft_params'] / 1e6:.0f}M "
                         f"parameters; calibrated SD acceptance {s['sd_acceptance']:.2f}.\n")
        lim = res.get("limits")
        if lim:
            mm = ", ".join(f"{k} {v:.1f}" for k, v in lim["matmul_gflops"].items())
            samples = lim.get("bandwidth_samples_gbps", [lim["bandwidth_gbps"]])
            flops = lim.get("flop_samples_gflops", [lim["flop_rate_gflops"]])
            lines.append(f"Limits measured in this run: streaming read {lim['bandwidth_gbps']:.1f} GB/s, the best "
                         f"of {len(samples)} reads from {min(samples):.1f} ({lim['stream_mb']} MB fp32 `x.sum()`, "
                         f"huge pages where the OS allows; read before the cases and after each round of "
                         f"repeats); fp32 matrix-vector products "
                         f"{lim['gemv_gbps']:.1f} GB/s (256 MB of weights); fp32 matmul GFLOP/s {mm} at the "
                         f"start; FLOP limit {lim['flop_rate_gflops']:.1f} GFLOP/s, the best of these and of "
                         f"{len(flops)} timings of 1024x1024x1024 (from {min(flops):.1f}; again after each "
                         f"round).\n")
        rows = []
        for name, r in res["cases"].items():
            e, c = r["eager"], r["compiled"]
            ref_sample = res["cases"].get("sample_b1", {}).get("compiled")
            mark = " (compiling)" if c.get("best_run_compiled") else ""  # a new shape compiled inside every timed run
            row = [name, f"{e['tokens_per_s']:.1f}", f"{c['tokens_per_s']:.1f}{mark}",
                   f"{c['tokens_per_s'] / e['tokens_per_s']:.2f}x"]
            g, gs = r.get("generate"), r.get("generate_static_compiled")
            row += [f"{g['tokens_per_s']:.1f}" if g else "", f"{gs['tokens_per_s']:.1f}" if gs else "",
                    f"{c['tokens_per_s'] / g['tokens_per_s']:.2f}x" if g else "",
                    f"{c['tokens_per_s'] / gs['tokens_per_s']:.2f}x" if gs else ""]
            row.append(f"{c['tokens_per_s'] / ref_sample['tokens_per_s']:.2f}x"
                       if ref_sample and name.startswith(("sd", "sss")) else "")
            row.append(f"{c['acceptance_rate']:.2f}" if "acceptance_rate" in c else "")
            row.append(f"{c['compile_s']:.0f}" + (f" / {gs['compile_s']:.0f}" if gs else ""))
            w = r.get("work")
            row += [f"{w['bytes_per_token'] / 1e6:.3g}" if w else "", f"{w['flops_per_token'] / 1e6:.3g}" if w else ""]
            row += [" / ".join(f"{v[key]:.0%}" for v in (c, gs) if v and key in v)
                    for key in ("bandwidth_fraction", "gemv_fraction", "flop_fraction")]
            if graphs:
                cg = r.get("compiled_graphs")
                cg_mark = " (compiling)" if cg and cg.get("best_run_compiled") else ""
                row += [f"{cg['tokens_per_s']:.1f}{cg_mark}" if cg else "",
                        f"{cg['tokens_per_s'] / c['tokens_per_s']:.2f}x" if cg else "",
                        f"{cg['tokens_per_s'] / g['tokens_per_s']:.2f}x" if cg and g else "",
                        f"{cg['tokens_per_s'] / gs['tokens_per_s']:.2f}x" if cg and gs else "",
                        f"{cg['compile_s']:.0f}" if cg else ""]
            rows.append(row)
        lines.append(markdown_table(
            ["case", "eager tok/s", "compiled tok/s", "compiled / eager", "generate tok/s",
             "generate static+compile tok/s", "compiled / generate", "compiled / generate static+compile",
             "compiled / compiled sample_b1", "acceptance", "compile s (ours / generate's)", "MB read / token",
             "MFLOP / token", "of bandwidth limit (compiled / generate static+compile)",
             "of matrix-vector rate (compiled / generate static+compile)",
             "of FLOP limit (compiled / generate static+compile)"]
            + (["graphs tok/s", "graphs / compiled", "graphs / generate", "graphs / generate static+compile",
                "graphs compile s"] if graphs else []), rows))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
