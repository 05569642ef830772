"""End to end: ``sd`` / ``sss`` (chain and tree) against ``sample`` and Hugging Face ``generate``, with and
without its assisted generation (``assistant_model=``), on the same models and prompts.

Models: random-init Llama-style models built so that speculative decoding behaves as with real ones.

* **draft** = the target's embeddings (tied with the LM head), its first ``--draft-layers`` layers and its
  final norm (identical weights);
* **target** = the draft plus the remaining layers, whose output projections (``o_proj``, ``down_proj``) are
  scaled by a factor ``eps``: the target's logits are the draft's plus a perturbation that grows with ``eps``;
* **ref** (sss: the draft "before alignment") = the draft with Gaussian noise of relative size ``eta`` on
  every weight.

Three scalars are calibrated before timing (reported in the results), each measured along 32-token samples of
the draft from random prompts (on-policy, where decoding spends its time): the final-norm gain (shared), so
the draft's mean next-token entropy is ``--entropy`` nats (random models are otherwise near uniform); ``eps``,
so the mean per-token SD acceptance ``sum_v min(p, q_r)`` is ``--acceptance``; ``eta``, so the mean
``TV(q_r, q)`` is ``--ref-tv``. The same three models serve every run. EOS is disabled, so every run emits
exactly ``--max-new-tokens`` tokens per prompt; sampling is at temperature 1 over the full vocabulary
(``top_k=0`` for ``generate``).

Hugging Face assisted generation supports batch size 1 only: with ``--batch`` > 1 its prompts are run one at a
time (marked "(per prompt)"); its draft length is fixed to ``K`` (``num_assistant_tokens_schedule="constant"``,
``assistant_confidence_threshold=0``). Its target calls are counted with a forward hook.

Measured per run: wall time (the minimum of ``--repeats``, after an untimed short warm-up), generated tokens
per second, target forward calls, target calls per generated token of a sequence (the forward passes a
sequence went through / its tokens: ``target_calls * batch / generated_tokens`` for batched runs,
``target_calls / generated_tokens`` for the per-prompt loop; 1.0 for plain sampling), target tokens
processed (draft tokens the target scored included), and, for
fastalign, accepted draft tokens per target call and the acceptance rate.

    python bench/bench_speculative.py                     # CPU, tiny models, < 3 min
    python bench/bench_speculative.py --device cuda --target-size 1b --draft-size 100m --dtype bf16 --batch 1,16

(``--draft-size 100m`` keeps 1 of the 1B target's 22 layers: 110M parameters with the shared embeddings.)

Writes ``bench/results/speculative_<device>[_<tag>].json`` and ``.md``. On a CPU a forward pass costs about
in proportion to the tokens it processes (compute-bound), so scoring K+1 tokens in one target call saves little
wall time and the draft's calls (its LM head is a large share of a small draft) eat most of it: CPU runs give
the call ratios; the wall-time gains of speculative decoding come from memory-bound decoding on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    DTYPES, command_line, device_info, device_tag, env_backend, markdown_table, timed, write_results,
)
import fastalign  # noqa: E402

TARGET_SIZES = {  # Llama-style shapes; "1b" is TinyLlama-1.1B's (1.03B parameters here: tied embeddings)
    "tiny": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4,
                 num_hidden_layers=8, vocab_size=8192),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
               num_hidden_layers=22, vocab_size=32000),
}


# ----------------------------------------------------------------------------------------------- models
def build_models(size: str, draft_size: str, device, dtype, seed: int):
    """Target and draft sharing weights as in the module docstring; the extra layers' output projections are
    kept unscaled in ``extra`` so that ``set_eps`` can rescale them."""
    cfg = LlamaConfig(**TARGET_SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    target = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    n_draft = draft_layers(draft_size, cfg)
    if n_draft >= cfg.num_hidden_layers:
        raise SystemExit(f"the draft ({n_draft} layers) must be smaller than the target ({cfg.num_hidden_layers})")
    dcfg = copy.deepcopy(cfg)
    dcfg.num_hidden_layers = n_draft
    draft = LlamaForCausalLM(dcfg).to(device=device, dtype=dtype).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # embeddings, first layers, norm
    for m in (target, draft):
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    extra = [(mod, mod.weight.detach().clone()) for layer in target.model.layers[n_draft:]
             for mod in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    return target, draft, extra


def draft_layers(draft_size: str, cfg) -> int:
    """``tiny``: 1 layer; otherwise a parameter count (``100m``, ``250m``) met by a number of target layers."""
    if draft_size == "tiny":
        return 1
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}[draft_size[-1].lower()]
    want = float(draft_size[:-1]) * scale
    h, i = cfg.hidden_size, cfg.intermediate_size
    head_dim = h // cfg.num_attention_heads
    per_layer = 2 * h * h + 2 * h * cfg.num_key_value_heads * head_dim + 3 * h * i
    return max(1, round((want - cfg.vocab_size * h) / per_layer))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def probs(model, contexts: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(contexts).logits.float(), dim=-1)


def bisect(measure, goal: float, increasing: bool, lo: float = 0.0, hi: float = 1.0, steps: int = 14) -> float:
    """The scale ``s`` at which ``measure(s)`` reaches ``goal`` (``measure`` monotone in ``s``)."""
    def below(s):
        return (measure(s) < goal) == increasing
    while below(hi) and hi < 1e4:
        lo, hi = hi, hi * 4
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if below(mid) else (lo, mid)
    return (lo + hi) / 2


@torch.no_grad()
def calibrate(target, draft, extra, args, device):
    """Set the norm gain, ``eps`` and build the ref (module docstring); returns the ref and the settings."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(1, target.config.vocab_size, (8, 16), generator=gen).to(device)
    norms = [target.model.norm.weight, draft.model.norm.weight]
    base_norm = norms[0].detach().clone()

    def draft_samples(gain):  # everything is measured where it matters: along the draft's own samples
        for w in norms:
            w.copy_(base_norm * gain)
        torch.manual_seed(args.seed + 2)
        return draft.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                              top_p=1.0, max_new_tokens=32, pad_token_id=0)

    def entropy(gain):
        q = probs(draft, draft_samples(gain))[:, 15:]
        return float(-(q * q.clamp_min(1e-30).log()).sum(-1).mean())

    gain = bisect(entropy, args.entropy, increasing=False)
    entropy_draft = entropy(gain)
    contexts = draft_samples(gain)
    q_r = probs(draft, contexts)[:, 15:]

    def acceptance(eps):
        for mod, w in extra:
            mod.weight.copy_(w * eps)
        return float(torch.minimum(probs(target, contexts)[:, 15:], q_r).sum(-1).mean())

    eps = bisect(acceptance, args.acceptance, increasing=False)
    accept = acceptance(eps)

    ref = copy.deepcopy(draft)
    base = {n: p.detach().clone() for n, p in draft.named_parameters()}
    noise = {n: torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype) for n, p in base.items()}

    def ref_tv(eta):
        for n, p in ref.named_parameters():
            p.copy_(base[n] + eta * base[n].float().abs().mean().to(p.dtype) * noise[n])
        return float(0.5 * (probs(ref, contexts)[:, 15:] - q_r).abs().sum(-1).mean())

    eta = bisect(ref_tv, args.ref_tv, increasing=True)
    tv = ref_tv(eta)
    settings = dict(norm_gain=gain, draft_entropy_nats=entropy_draft, eps=eps, sd_acceptance=accept, eta=eta,
                    tv_draft_ref=tv)
    return ref, settings


# ------------------------------------------------------------------------------------------------- runs
class CallCounter:
    """Counts forward calls and input tokens of an HF model (for ``generate``)."""

    def __init__(self, model):
        self.calls = self.tokens = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.tokens += ids.numel() if ids is not None else 0


def run_fastalign(engine, prompts, method, options, max_new, seed):
    out = engine.decode(prompts, method=method, max_new_tokens=max_new, seed=seed, **options)
    st = out.stats
    return dict(generated=st["generated_tokens"], target_calls=st["target_calls"],
                target_tokens=st["target_tokens"], draft_calls=st["draft_calls"],
                accepted_per_target_call=st.get("accepted_per_target_call"),
                acceptance_rate=st.get("acceptance_rate"))


def run_hf(target, draft, counter, prompts, max_new, seed, K):
    torch.manual_seed(seed)
    ids = torch.tensor(prompts, device=target.device)
    kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new,
              pad_token_id=0)
    before = (counter.calls, counter.tokens)
    generated = 0
    if draft is None:
        out = target.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        generated = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    else:
        draft.generation_config.num_assistant_tokens = K
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
        for row in ids:  # assisted generation supports batch size 1 only
            out = target.generate(row[None], attention_mask=torch.ones_like(row[None]), assistant_model=draft, **kw)
            generated += out.shape[1] - ids.shape[1]
    return dict(generated=generated, target_calls=counter.calls - before[0],
                target_tokens=counter.tokens - before[1], draft_calls=None,
                accepted_per_target_call=None, acceptance_rate=None)


def configurations(args):
    K = args.num_draft_tokens
    tree = dict(branching=tuple(int(b) for b in args.branching.split(",")))
    runs = [
        ("hf generate", "hf", None),
        (f"hf generate + assistant (K={K})", "hf_assisted", None),
        ("fastalign sample", "sample", {}),
        (f"fastalign sd chain (K={K})", "sd", dict(num_draft_tokens=K)),
        (f"fastalign sd tree sampled {tree['branching']}", "sd", dict(tree="sampled", **tree)),
        (f"fastalign sd tree topk {tree['branching']}", "sd", dict(tree="topk", **tree)),
        (f"fastalign sss chain (K={K})", "sss", dict(num_draft_tokens=K)),
        (f"fastalign sss tree sampled {tree['branching']}", "sss", dict(tree="sampled", **tree)),
    ]
    return [r for r in runs if args.only is None or any(s in r[0] for s in args.only.split(","))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--target-size", choices=list(TARGET_SIZES), default="tiny")
    ap.add_argument("--draft-size", default="tiny", help="'tiny' (1 layer) or a parameter count, e.g. 100m")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--num-draft-tokens", type=int, default=4)
    ap.add_argument("--branching", default="2,2,1,1")
    ap.add_argument("--entropy", type=float, default=2.0, help="draft next-token entropy (nats) to calibrate to")
    ap.add_argument("--acceptance", type=float, default=0.75, help="per-token SD acceptance to calibrate to")
    ap.add_argument("--ref-tv", type=float, default=0.25, help="TV(draft, ref) to calibrate to (sss)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions (the minimum wall time is kept)")
    ap.add_argument("--only", help="comma-separated substrings of the run names to keep")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: stable timings on a shared machine; ignored on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--tag", help="suffix of the result files: speculative_<device>_<tag>")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    target, draft, extra = build_models(args.target_size, args.draft_size, device, dtype, args.seed)
    ref, settings = calibrate(target, draft, extra, args, device)
    counter = CallCounter(target)
    engine = fastalign.Engine(target=target, draft=draft, ref=ref)
    sizes = dict(target_params=n_params(target), draft_params=n_params(draft),
                 target_layers=target.config.num_hidden_layers, draft_layers=draft.config.num_hidden_layers)
    print(f"models: {sizes}; calibration: {settings}", flush=True)

    results = []
    for B in [int(b) for b in args.batch.split(",")]:
        gen = torch.Generator().manual_seed(args.seed + B)
        prompts = torch.randint(1, target.config.vocab_size, (B, args.prompt_len), generator=gen).tolist()
        for name, method, options in configurations(args):
            def once(max_new, seed):
                if method in ("hf", "hf_assisted"):
                    return run_hf(target, draft if method == "hf_assisted" else None, counter, prompts, max_new,
                                  seed, args.num_draft_tokens)
                return run_fastalign(engine, prompts, method, options, max_new, seed)

            once(4, args.seed)  # warm-up
            best, row = float("inf"), None
            for r in range(args.repeats):
                row, wall = timed(lambda: once(args.max_new_tokens, args.seed + r), device)
                best = min(best, wall)
            per_prompt = method == "hf_assisted" and B > 1  # one row per target call
            label = name + (" (per prompt)" if per_prompt else "")
            rows_per_call = 1 if per_prompt else B
            row.update(run=label, batch=B, wall_s=best, tokens_per_s=row["generated"] / best,
                       target_calls_per_token=row["target_calls"] * rows_per_call / row["generated"])
            results.append(row)
            print(f"B={B:<3} {label:<48} {best:8.3f}s  {row['tokens_per_s']:9.1f} tok/s  "
                  f"target calls/token {row['target_calls_per_token']:.3f}", flush=True)

    info = device_info(device)
    stem = f"speculative_{device_tag(info)}" + (f"_{args.tag}" if args.tag else "")
    payload = dict(command=command_line(), device=info, kernels_backend=env_backend(), dtype=args.dtype,
                   target_size=args.target_size, draft_size=args.draft_size, models=sizes,
                   calibration=settings, options=vars(args), results=results,
                   fastalign_version=getattr(fastalign, "__version__", None),
                   transformers_version=__import__("transformers").__version__)
    paths = write_results(stem, payload, to_markdown(payload), args.out_dir)
    print("wrote", *paths)


def to_markdown(payload) -> str:
    info, cal, m, o = payload["device"], payload["calibration"], payload["models"], payload["options"]
    lines = [
        f"# sd / sss vs sample and Hugging Face generate ({info['name']}, {info['device_type']})\n",
        f"Command: `{payload['command']}`  ",
        f"torch {info['torch']}, transformers {payload['transformers_version']}, triton {info['triton']}, "
        f"kernels backend {payload['kernels_backend']}, dtype {payload['dtype']}.  ",
        f"Models (random init, Llama-style, see the script's docstring): target {m['target_params'] / 1e6:.1f}M "
        f"parameters ({m['target_layers']} layers), draft {m['draft_params'] / 1e6:.1f}M ({m['draft_layers']} "
        f"layers, shares the target's first layers). Calibrated along the draft's samples: draft entropy "
        f"{cal['draft_entropy_nats']:.2f} nats, per-token SD acceptance {cal['sd_acceptance']:.3f}, "
        f"TV(draft, ref) {cal['tv_draft_ref']:.3f}.  ",
        f"Prompts of {o['prompt_len']} random tokens, {o['max_new_tokens']} new tokens each (no EOS), "
        f"temperature 1, full vocabulary. Wall time: minimum of {o['repeats']} runs after a warm-up"
        + (" (a shared CPU: indicative only)." if info["device_type"] == "cpu" else "."),
        "",
    ]
    header = ["batch", "run", "wall s", "tokens/s", "target calls", "target calls / token", "target tokens",
              "accepted / target call", "acceptance rate", "speed-up vs sample", "speed-up vs hf generate"]
    rows = []
    for B in sorted({r["batch"] for r in payload["results"]}):
        group = [r for r in payload["results"] if r["batch"] == B]
        base = {r["run"]: r["wall_s"] for r in group}
        t_sample = base.get("fastalign sample")
        t_hf = base.get("hf generate")
        for r in group:
            rows.append([
                B, r["run"], f"{r['wall_s']:.3f}", f"{r['tokens_per_s']:.1f}", r["target_calls"],
                f"{r['target_calls_per_token']:.3f}", r["target_tokens"],
                "" if r["accepted_per_target_call"] is None else f"{r['accepted_per_target_call']:.2f}",
                "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}",
                f"{t_sample / r['wall_s']:.2f}x" if t_sample else "",
                f"{t_hf / r['wall_s']:.2f}x" if t_hf else "",
            ])
    lines.append(markdown_table(header, rows))
    lines.append("\"target calls / token\" = the target forward passes a sequence went through / the tokens it "
                 "generated (1.0 for plain sampling). For trees the acceptance rate is accepted tokens / tree "
                 "nodes.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
