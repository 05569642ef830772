"""Remote backends: a target behind an OpenAI-compatible ``/v1/completions`` server and a reward behind a
small JSON endpoint. Standard library only (``urllib``, threads for concurrent requests).

Generation (``RemoteLM``). One request per row, sent concurrently (the server batches them)::

    POST {base_url}/v1/completions
    {"model": ..., "prompt": [token ids], "max_tokens": n, "temperature": T, "seed": s,
     "top_k": k, "top_p": p,                       # only when set
     "return_token_ids": true,                     # vLLM >= 0.10.2: choices[0].token_ids
     "return_tokens_as_token_ids": true, "logprobs": 0}   # older vLLM: logprobs.tokens = ["token_id:17", ...]

The sampled token ids are read from ``choices[0].token_ids`` when present, else from
``choices[0].logprobs.tokens`` in vLLM's ``"token_id:<id>"`` form. A response is cut after its first EOS
token and at ``max_tokens``; when the server reports ``finish_reason == "stop"`` without returning the EOS
token, the first of ``eos_token_ids`` is appended (no stop strings are sent, so ``"stop"`` means EOS).
Each row gets its own seed (``row_seed``): vLLM seeds each request, and a shared seed would make the
chains of one prompt draw identical tokens. With vLLM, enable prefix caching
(``--enable-prefix-caching``, the default in recent versions) so that a prompt is not recomputed for
every proposal. ``python -m fastalign.serve`` is a small server of this protocol for any HF causal LM.

Reward (``RemoteReward``), a callable usable as ``reward=`` anywhere::

    POST {base_url}/reward   {"prompts": [[ids], ...], "responses": [[ids], ...]}  ->  {"rewards": [float, ...]}

Token ids are the policy's; a server whose reward model has its own tokenizer re-tokenises the text.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from .models import InputError, ModelCounters

_GOLDEN = 0x9E3779B1


class RemoteError(RuntimeError):
    """A remote server could not be reached or answered with an error (the message says which)."""


def row_seed(seed: int, row: int) -> int:
    """The request seed of ``row`` in a generation round seeded by ``seed`` (``row_seed(s, 0) == s``)."""
    return (int(seed) + row * _GOLDEN) % (2**31 - 1)


def _request(url: str, payload: dict | None, timeout: float, api_key: str | None) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        raise RemoteError(f"{url} answered HTTP {e.code}: {body[:1000]}") from None
    except urllib.error.URLError as e:
        raise RemoteError(f"cannot reach {url}: {e.reason}") from None


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class RemoteLM:
    """A target model served behind an OpenAI-compatible completions endpoint (see the module docstring).

    ``model`` defaults to the first model the server lists; ``eos_token_ids`` defaults to what the server
    lists for it (a fastalign server does; for vLLM pass them). ``counters`` counts requests and tokens sent
    plus received (what a server without prefix caching would process).
    """

    def __init__(self, base_url: str, model: str | None = None, eos_token_ids=None, api_key: str | None = None,
                 timeout: float = 600.0, max_concurrency: int = 32):
        self.base_url, self.api_key, self.timeout = _base(base_url), api_key, timeout
        self.max_concurrency = max_concurrency
        self.counters = ModelCounters()
        if model is None or eos_token_ids is None:
            listed = _request(f"{self.base_url}/v1/models", None, timeout, api_key).get("data") or []
            entry = next((m for m in listed if model is None or m.get("id") == model), None)
            if entry is None:
                raise RemoteError(f"{self.base_url}/v1/models lists no model{'' if model is None else ' ' + model}")
            model = entry["id"]
            if eos_token_ids is None:
                eos_token_ids = entry.get("eos_token_ids")
        if eos_token_ids is None:
            raise InputError(f"the server does not list the EOS token ids of {model!r}: pass eos_token_ids=...")
        self.model = model
        self.eos_token_ids = {int(eos_token_ids)} if isinstance(eos_token_ids, int) else set(map(int, eos_token_ids))

    def complete(self, prompts: list[list[int]], budgets: list[int], temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed=0) -> list[list[int]]:
        """One sampled continuation per prompt (token ids), at most ``budgets[r]`` tokens, EOS kept.

        ``seed``: one request seed per prompt (a list), or an int (prompt ``r`` gets ``row_seed(seed, r)``)."""
        rows = list(range(len(prompts)))
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [row_seed(seed, r) for r in rows]
        if len(rows) <= 1:
            return [self._complete_one(prompts[r], budgets[r], temperature, top_k, top_p, seeds[r]) for r in rows]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(rows))) as pool:
            return list(pool.map(lambda r: self._complete_one(prompts[r], budgets[r], temperature, top_k, top_p,
                                                              seeds[r]), rows))

    def _complete_one(self, prompt, max_tokens, temperature, top_k, top_p, seed) -> list[int]:
        payload = {"model": self.model, "prompt": [int(t) for t in prompt], "max_tokens": int(max_tokens),
                   "temperature": float(temperature), "seed": int(seed), "return_token_ids": True,
                   "return_tokens_as_token_ids": True, "logprobs": 0}
        if top_k is not None:
            payload["top_k"] = int(top_k)
        if top_p is not None:
            payload["top_p"] = float(top_p)
        choice = _request(f"{self.base_url}/v1/completions", payload, self.timeout, self.api_key)["choices"][0]
        tokens = choice.get("token_ids")
        if tokens is None:
            listed = (choice.get("logprobs") or {}).get("tokens") or []
            if not all(isinstance(t, str) and t.startswith("token_id:") for t in listed):
                raise RemoteError("the server returned no token ids: it must honour return_token_ids "
                                  "(vLLM >= 0.10.2) or return_tokens_as_token_ids with logprobs")
            tokens = [int(t.split(":", 1)[1]) for t in listed]
        tokens = [int(t) for t in tokens][:max_tokens]
        end = next((k for k, t in enumerate(tokens) if t in self.eos_token_ids), None)
        if end is not None:
            tokens = tokens[: end + 1]
        elif choice.get("finish_reason") == "stop" and len(tokens) < max_tokens:
            tokens.append(min(self.eos_token_ids))
        self.counters.calls += 1
        self.counters.tokens += len(prompt) + len(tokens)
        return tokens


class RemoteReward:
    """A reward served behind ``POST {base_url}/reward`` (see the module docstring); call it like a reward:
    ``reward(prompts, responses) -> [N]`` fp32. Requests hold at most ``batch_size`` pairs."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0, batch_size: int = 256,
                 path: str = "/reward"):
        self.url = _base(base_url) + path
        self.api_key, self.timeout, self.batch_size = api_key, timeout, batch_size

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        rewards = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            payload = {"prompts": [[int(t) for t in p] for p in prompts[chunk]],
                       "responses": [[int(t) for t in r] for r in responses[chunk]]}
            got = _request(self.url, payload, self.timeout, self.api_key).get("rewards")
            if got is None or len(got) != len(payload["prompts"]):
                raise RemoteError(f"{self.url} must answer {{'rewards': [one float per pair]}}")
            rewards.extend(float(r) for r in got)
        return torch.tensor(rewards, dtype=torch.float32)
