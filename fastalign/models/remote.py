"""Remote backends: a target and a reward behind HTTP servers, one or several, with fastalign as the client.
Standard library only (``urllib``, threads for concurrent requests).

The servers are vLLM's OpenAI-compatible server (the distributed engine: tensor / pipeline parallel,
prefix caching, continuous batching) or the small ``python -m fastalign.serve``; start them with e.g.::

    vllm serve POLICY --port 8000 --tensor-parallel-size 4
    vllm serve REWARD_MODEL --port 8001 --runner pooling --convert classify
    vllm serve PROCESS_REWARD_MODEL --port 8002 --runner pooling        # RemoteReward(..., process=True)

Generation (``RemoteLM``), used by the whole-response methods (sample, bon, soft_bon, rs, qalign) and the
segment methods (speculative_rejection, smc: each segment is a request that continues the prompt plus the
response so far)::

    POST {base_url}/v1/completions
    {"model": ..., "prompt": [token ids], "max_tokens": m, "n": n, "seed": s, "temperature": T,
     "top_k": k or 0, "top_p": p or 1, "min_p": 0, "repetition_penalty": 1, ...,   # every knob explicit
     "stop_token_ids": [EOS ids + a segment's delimiters], "return_token_ids": true}

Every sampling parameter is sent, so that the server's defaults (vLLM applies the model's
``generation_config.json``) never change the law: the tokens are drawn from the target's truncated tempered
per-token distributions, as locally. A response stops after its first EOS token (kept, as locally) or at
``max_tokens``; the EOS ids are sent as ``stop_token_ids`` (with the delimiters that end a segment, kept like
EOS, when a method asks for them), and a server that stops at a token this client did not ask for is an error
(the law would differ from local decoding). The token ids are read from
``choices[i].token_ids`` (vLLM >= 0.10.2, fastalign.serve).

Seeds. Sample ``j`` of prompt ``b`` is drawn with the request seed ``seeds[b] + j``: vLLM seeds sample ``j``
of a request asking for ``n`` samples with ``seed + j``, so a request with ``n`` samples draws what ``n``
single-sample requests would. Servers that do not take ``n > 1`` (fastalign.serve) get one request per sample
instead, seeded ``seeds[b] + j``: below ``2**31 - 1 + n`` (vLLM and fastalign.serve take 64-bit seeds). The
methods derive ``seeds[b]`` from prompt ``b``'s own seed, the per-prompt seed of local decoding
(``fastalign.methods.base.Randomness.request_seeds``); a direct call ``complete(..., seed=s)`` gives prompt ``b``
the request seed ``row_seed(s, b)``, which is ``s`` itself for prompt 0, as one vLLM request would use it.

Reward (``RemoteReward``), a callable usable as ``reward=`` anywhere::

    vLLM:       POST {base_url}/classify {"model": ..., "input": [[prompt + response ids], ...],
                                          "use_activation": false}  ->  data[i].probs[0]
    vLLM PRM:   POST {base_url}/pooling  {"model": ..., "input": [[prompt + response ids], ...],
                                          "task": "token_classify", "use_activation": false}
                                      ->  softmax(data[i].data[-1])[1]          (process=True)
    fastalign:  POST {base_url}/reward   {"prompts": [[ids], ...], "responses": [[ids], ...]}  ->  rewards

``use_activation: false`` returns the raw score head (no sigmoid), read at the last token: what a local
``RewardModel`` computes. A process reward model (a 2-label ``*ForTokenClassification`` model served with
``--runner pooling``) answers ``/pooling`` with the raw logits ``[T, 2]`` of every token; the client reads the
last token's and returns ``softmax(logits)[1]`` (fp32), the probability of a good step, as a local
``RewardModel`` reads a PRM: the step reward of ``beam`` and ``smc`` when the response ends at a step's
separator. Token ids are the policy's: the reward model must share its tokenizer.

Several servers (``ServerPool``): every client takes one base URL or a list of them, used as one server:
requests are spread round-robin, a failed request moves to the next server, and a server that keeps failing
is tried last. A request that fails on every server is retried with exponential backoff; fastalign's requests
are all safe to repeat (a seeded completion draws the same tokens again, a reward is a pure function).
Each transport failure ends as a ``RemoteError`` that names the servers and the request, never a hang and
never a raw ``urllib`` / ``http.client`` exception.

Timeouts: a try waits ``connect_timeout`` seconds (default 10) for its connection and then ``timeout`` seconds
(default 600: a long generation on a busy server) for each read of the answer. A server that accepts and
then freezes therefore stalls a try for ``timeout`` seconds, and a request for up to
``(retries + 1) * servers * timeout`` plus the backoff before its ``RemoteError``: lower ``timeout`` when the
answers are known to come faster. A server that is down fails at once (refused) or after ``connect_timeout``.
"""

from __future__ import annotations

import functools
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch

from ..errors import InputError
from ..validation import check_context_length, check_float, check_int, check_seed, is_int, is_real
from .causal_lm import ModelCounters, eos_token_ids

_GOLDEN = 0x9E3779B1
_RETRY_STATUS = (429, 500, 502, 503, 504)  # overloaded or restarting servers; other errors are the request's


class RemoteError(RuntimeError):
    """A remote server could not be reached or answered with an error; the message names the server(s) and
    the request.

    ``completed``: for a batch of requests (``RemoteLM.complete``), each row's result, ``None`` where it failed.
    ``partial``: what a method completed before the failure, when it keeps it (``qalign``: the steps done, with
    ``.sequences`` and ``.extra["state_path"]`` as in a ``DecodeOutput``).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.completed: list | None = None
        self.partial = None


def _token_ids(value, what: str) -> list[int]:
    """``value``, a server's token ids: a list of integers >= 0 (a string, floats or bools are not ids)."""
    if not isinstance(value, list) or not all(is_int(t) and t >= 0 for t in value):
        raise RemoteError(f"{what} are not a list of token ids ({str(value)[:80]})")
    return [int(t) for t in value]


def _indexed(value, what: str) -> list[dict]:
    """``value``, a server's list of answers (choices, scores): objects in the order of their ``index``."""
    if not isinstance(value, list) or not all(isinstance(d, dict) and is_int(d.get("index", 0)) for d in value):
        raise RemoteError(f"{what} is not a list of objects with integer indices ({str(value)[:80]})")
    return sorted(value, key=lambda d: d.get("index", 0))


class _Transient(Exception):
    """A failure worth retrying elsewhere or later (transport, timeout, 429/5xx)."""


def request_seed(bits: int) -> int:
    """Any integer as a request seed, in ``[0, 2**31 - 1)`` (a range every server takes): every request seed
    this client derives ends here, the methods' (``Randomness.request_seeds``) and ``row_seed``'s."""
    return int(bits) % (2**31 - 1)


def row_seed(seed: int, row: int) -> int:
    """The request seed of prompt ``row`` of a ``complete`` call given one int ``seed`` (``row_seed(s, 0) == s``
    for ``s < 2**31 - 1``)."""
    return request_seed(int(seed) + row * _GOLDEN)


def request_seeds_of(seed, n_prompts: int) -> list[int]:
    """The request seed of each prompt of a ``complete`` call (module docstring, Seeds): ``seed`` is one int per
    prompt, used as given, or one int ``s``, which gives prompt ``b`` the seed ``row_seed(s, b)``."""
    seed = check_seed(seed, n_prompts, optional=False)
    return seed if isinstance(seed, list) else [row_seed(seed, b) for b in range(n_prompts)]


def eos_token_ids_of(name_or_path: str, trust_remote_code: bool = False) -> set[int]:
    """The EOS token ids local decoding uses for a model (its config and generation config, no weights):
    pass them as ``RemoteLM(..., eos_token_ids=...)`` for a vLLM server of that model."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    try:
        generation = GenerationConfig.from_pretrained(name_or_path)
    except OSError:  # no generation_config.json
        generation = None
    return eos_token_ids(SimpleNamespace(config=config, generation_config=generation))


def _base(url: str) -> str:
    """A server's base URL without a trailing ``/`` or ``/v1``; it must be an http(s) URL with a host (urllib
    would raise a bare ValueError for ``"not a url"`` at the first request)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or " " in url:
        raise InputError(f"a server base URL must look like http://HOST:PORT (https too), got {url!r}")
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@functools.cache
def _reading_within(http_class: type, read_timeout: float) -> type:
    """``http_class`` (an ``http.client`` connection) whose ``timeout`` bounds the connect (TCP, proxy tunnel,
    TLS) only; then each read of the answer waits at most ``read_timeout`` seconds."""

    class Connection(http_class):
        def connect(self):
            super().connect()
            self.sock.settimeout(read_timeout)

    return Connection


class _ReadTimeout:
    """A urllib handler whose connections take ``read_timeout`` for reads (``open(timeout=...)``: the connect)."""

    def __init__(self, read_timeout: float):
        super().__init__()
        self.read_timeout = read_timeout

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_reading_within(http_class, self.read_timeout), req, **kwargs)


class _HTTPHandler(_ReadTimeout, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_ReadTimeout, urllib.request.HTTPSHandler):
    pass


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment included) with separate connect and read timeouts."""
    return urllib.request.build_opener(_HTTPHandler(read_timeout), _HTTPSHandler(read_timeout))


def _post(url: str, payload: dict | None, opener: urllib.request.OpenerDirector, connect_timeout: float,
          read_timeout: float, api_key: str | None) -> dict:
    """One HTTP request; ``_Transient`` for what another try may fix, ``RemoteError`` for the rest."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with opener.open(req, timeout=connect_timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        message = f"HTTP {e.code}: {e.read().decode(errors='replace')[:1000]}"
        if e.code in _RETRY_STATUS:
            raise _Transient(message) from None
        raise RemoteError(message) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):  # while connecting or sending the request
            raise _Transient(f"cannot reach the server: timed out (connect_timeout {connect_timeout:g} s, "
                             f"timeout {read_timeout:g} s)") from None
        raise _Transient(f"cannot reach the server: {e.reason}") from None
    except (socket.timeout, TimeoutError):
        raise _Transient(f"no answer within {read_timeout:g} s") from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        raise _Transient(f"connection failed: {type(e).__name__}: {e}") from None
    try:
        answer = json.loads(body)
    except ValueError:
        raise _Transient(f"the answer is not JSON: {body[:200]!r}") from None
    if not isinstance(answer, dict):
        raise RemoteError(f"the answer is not a JSON object: {body[:200]!r}")
    return answer


class ServerPool:
    """Base URLs used as one server (see the module docstring): data parallelism without new infrastructure.

    ``retries`` rounds over all servers follow the first, after ``backoff * 2**k`` seconds. ``answered``
    counts the requests each server answered. ``connect_timeout``: seconds a try waits for its connection;
    ``timeout``: seconds it then waits for each read of the answer (600 by default, so a frozen server stalls
    a try that long: see "Timeouts" in the module docstring).
    """

    def __init__(self, base_urls, api_key: str | None = None, timeout: float = 600.0, retries: int = 3,
                 backoff: float = 0.5, connect_timeout: float = 10.0):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls or [])
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise InputError(f"give a server base URL or a list of them, got {base_urls!r}")
        if not (is_int(retries) and retries >= 0) or not backoff >= 0 or not timeout > 0:
            raise InputError(f"retries must be an integer >= 0, backoff >= 0 and timeout > 0; got {retries!r}, "
                             f"{backoff!r}, {timeout!r}")
        check_float("connect_timeout", connect_timeout, low=0.0, low_open=True)
        self.urls = [_base(u) for u in urls]
        self.api_key, self.timeout, self.retries, self.backoff = api_key, timeout, retries, backoff
        self.connect_timeout = connect_timeout
        self._opener = _opener(timeout)
        self.answered = Counter()
        self._failures = Counter()  # failures in a row, per server
        self._turn = 0
        self._lock = threading.Lock()

    def _order(self) -> list[str]:
        """Servers for the next request: round-robin, those that failed last time at the end."""
        with self._lock:
            start, self._turn = self._turn, self._turn + 1
            fails = dict(self._failures)
        rotated = self.urls[start % len(self.urls):] + self.urls[: start % len(self.urls)]
        return sorted(rotated, key=lambda u: fails.get(u, 0) > 0)

    def request(self, path: str, payload: dict | None, what: str) -> dict:
        """``payload`` POSTed (GET when None) to ``path`` on a server of the pool; ``what`` names the request
        in errors."""
        errors = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            for url in self._order():
                try:
                    answer = _post(url + path, payload, self._opener, self.connect_timeout, self.timeout,
                                   self.api_key)
                except _Transient as e:
                    errors.append(f"{url}{path}: {e}")
                    with self._lock:
                        self._failures[url] += 1
                    continue
                except RemoteError as e:
                    raise RemoteError(f"{what} failed: {url}{path} answered {e}") from None
                with self._lock:
                    self._failures[url] = 0
                    self.answered[url] += 1
                return answer
        tries = (self.retries + 1) * len(self.urls)
        raise RemoteError(f"{what} failed {tries} times ({len(self.urls)} server(s), {self.retries} retries "
                          f"with backoff); last errors: " + "; ".join(errors[-len(self.urls):]))

    def models(self, model: str | None) -> dict:
        """The ``/v1/models`` entry of ``model`` (the first listed when None) on the first server that answers."""
        listed = self.request("/v1/models", None, "listing the models (GET /v1/models)").get("data") or []
        if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in listed):
            raise RemoteError(f"{self.urls[0]}/v1/models answered a model list without ids ({str(listed)[:80]})")
        entry = next((m for m in listed if model is None or m.get("id") == model), None)
        if entry is None:
            names = [m.get("id") for m in listed]
            raise RemoteError(f"{self.urls[0]}/v1/models lists no model{'' if model is None else ' ' + repr(model)}"
                              f" (it lists {names})")
        return entry

    def map(self, fn, items: list, max_concurrency: int) -> list:
        """``[fn(item) for item in items]`` with up to ``max_concurrency`` requests in flight. If some fail, the
        first ``RemoteError`` is raised with ``completed``: every item's result, None where it failed."""
        def attempt(item):
            try:
                return fn(item), None
            except RemoteError as e:
                return None, e

        if len(items) <= 1:
            done = [attempt(item) for item in items]
        else:
            with ThreadPoolExecutor(max_workers=min(max_concurrency, len(items))) as pool:
                done = list(pool.map(attempt, items))
        failed = [e for _, e in done if e is not None]
        if failed:
            failed[0].completed = [r for r, _ in done]
            raise failed[0]
        return [r for r, _ in done]


class RemoteLM:
    """A target model served behind an OpenAI-compatible completions endpoint (see the module docstring).

    ``base_url``: one URL or a list (a ``ServerPool``). ``model`` defaults to the first model the server lists;
    ``eos_token_ids`` defaults to what the server lists for it (fastalign.serve does; for vLLM pass them, e.g.
    ``eos_token_ids_of(PATH)``). ``counters`` counts requests and the tokens sent plus received (what a server
    without prefix caching would process). ``timeout``, ``connect_timeout``, ``retries``, ``backoff``: see
    ``ServerPool``.
    """

    def __init__(self, base_url, model: str | None = None, eos_token_ids=None, api_key: str | None = None,
                 timeout: float = 600.0, max_concurrency: int = 64, retries: int = 3, backoff: float = 0.5,
                 connect_timeout: float = 10.0):
        self.pool = ServerPool(base_url, api_key, timeout, retries, backoff, connect_timeout)
        self.max_concurrency = check_int("max_concurrency", max_concurrency, minimum=1)
        self.counters = ModelCounters()
        self._count_lock = threading.Lock()  # requests finish on several threads
        entry = self.pool.models(model)
        self.model = entry["id"]
        # a server that says it is fastalign's takes one sample per request; vLLM (and others) take n
        self.samples_per_request = 1 if entry.get("owned_by") == "fastalign" else None
        self.context_length = entry.get("max_model_len")
        if eos_token_ids is not None:
            given = [eos_token_ids] if is_int(eos_token_ids) else eos_token_ids
            if not isinstance(given, (list, tuple, set)) or not all(is_int(t) and t >= 0 for t in given):
                raise InputError(f"eos_token_ids must be a token id or a list of them, got {eos_token_ids!r}")
            eos_token_ids = list(given)
        else:
            listed = entry.get("eos_token_ids")
            if listed is None:
                raise InputError(f"the server does not list the EOS token ids of {self.model!r}: pass "
                                 "eos_token_ids=... (fastalign.models.remote.eos_token_ids_of(PATH) reads them from "
                                 "the model)")
            eos_token_ids = _token_ids([listed] if is_int(listed) else listed,
                                       f"the EOS token ids {self.pool.urls[0]}/v1/models lists")
        self.eos_token_ids = {int(t) for t in eos_token_ids}

    def add_stop_tokens(self, ids) -> None:
        """Make ``ids`` end a response like EOS (e.g. a chat template's end-of-turn token): sent as stop tokens
        with every request, as ``CausalLM.add_stop_tokens`` makes them end a local decode."""
        self.eos_token_ids = self.eos_token_ids | {int(i) for i in ids}

    @property
    def base_url(self) -> str:
        return self.pool.urls[0]

    def complete(self, prompts: list[list[int]], budgets: list[int], temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed=0, n: int = 1,
                 stop_token_ids=()) -> list[list[int]]:
        """``n`` sampled continuations per prompt (token ids, at most ``budgets[b]`` tokens, EOS kept); rows
        ``b * n + j`` belong to prompt ``b``. Sample ``j`` of prompt ``b`` is drawn with seed ``seeds[b] + j``:
        ``seed`` is one request seed per prompt (a list), or an int (prompt ``b`` gets ``row_seed(seed, b)``).
        ``stop_token_ids``: more tokens that end a continuation (kept, like EOS): a segment's delimiters."""
        seeds = request_seeds_of(seed, len(prompts))
        stops = self.eos_token_ids | {int(t) for t in stop_token_ids}
        if len(budgets) != len(prompts) or not (isinstance(n, int) and n >= 1):
            raise InputError(f"complete needs one budget per prompt and n >= 1, got {len(prompts)} prompts, "
                             f"{len(budgets)} budgets, n={n!r}")
        check_context_length(prompts, budgets, self.context_length, f"{self.model!r} on the server")
        per_request = n if self.samples_per_request is None else self.samples_per_request
        jobs = [(b, j, min(per_request, n - j)) for b in range(len(prompts)) for j in range(0, n, per_request)]

        def job(spec):
            b, j, count = spec
            return self._complete_one(prompts[b], budgets[b], count, temperature, top_k, top_p,
                                      seeds[b] + j, f"prompt {b}", stops)

        try:
            results = self.pool.map(job, jobs, self.max_concurrency)
        except RemoteError as e:  # report per row (prompt-major, as returned)
            if e.completed is not None:
                e.completed = [None if r is None else r[k] for (_, _, count), r in zip(jobs, e.completed)
                               for k in range(count)]
            raise
        return [tokens for samples in results for tokens in samples]

    def _complete_one(self, prompt, max_tokens, n, temperature, top_k, top_p, seed, row, stops) -> list[list[int]]:
        payload = {"model": self.model, "prompt": [int(t) for t in prompt], "max_tokens": int(max_tokens),
                   "n": n, "seed": int(seed), "temperature": float(temperature),
                   "top_k": 0 if top_k is None else int(top_k), "top_p": 1.0 if top_p is None else float(top_p),
                   "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                   "stop_token_ids": sorted(stops), "ignore_eos": False, "min_tokens": 0,
                   "return_token_ids": True}
        what = (f"completion request for {row} ({len(prompt)} prompt tokens, max_tokens {max_tokens}, n {n}, "
                f"seed {seed})")
        choices = _indexed(self.pool.request("/v1/completions", payload, what).get("choices"),
                           f"{what}: the server's choices")
        if len(choices) != n:
            raise RemoteError(f"{what}: the server answered {len(choices)} choices")
        out = []
        for choice in choices:
            tokens = choice.get("token_ids")
            if tokens is None:
                raise RemoteError(f"{what}: the server returned no token ids; it must honour return_token_ids "
                                  "(vLLM >= 0.10.2, fastalign.serve)")
            tokens = _token_ids(tokens, f"{what}: the server's token_ids")[:max_tokens]
            end = next((k for k, t in enumerate(tokens) if t in stops), None)
            if end is not None:
                tokens = tokens[: end + 1]
            elif len(tokens) < max_tokens:  # a response ends at a stop token or at max_tokens, nowhere else
                raise RemoteError(f"{what}: the server ended a response after {len(tokens)} tokens, not at an EOS or "
                                  f"stop token of this client ({sorted(stops)}; finish reason "
                                  f"{choice.get('finish_reason')!r}, stop reason {choice.get('stop_reason')!r}): "
                                  "pass every EOS id in eos_token_ids, or start the server without extra stops "
                                  "or a lower cap of max_tokens")
            out.append(tokens)
        with self._count_lock:
            self.counters.calls += 1
            self.counters.tokens += n * len(prompt) + sum(map(len, out))
        return out


class RemoteReward:
    """A reward model behind vLLM's classification endpoint or fastalign's ``/reward`` (module docstring); call it
    like a reward: ``reward(prompts, responses) -> [N]`` fp32.

    ``api``: ``"vllm"``, ``"fastalign"`` or ``"auto"`` (asks ``/v1/models`` on first use: a server owned by
    fastalign speaks ``/reward``, any other ``/classify``). ``process=True``: the vLLM server serves a process
    reward model (a 2-label ``*ForTokenClassification`` model, ``vllm serve PRM --runner pooling``), read through
    ``/pooling`` as the probability of label 1 ("good") at the last token, in ``[0, 1]``; a fastalign server
    needs no flag (its ``/reward`` reads a PRM itself). Requests hold at most ``batch_size`` pairs and up to
    ``max_concurrency`` are in flight (spread over the pool).
    """

    APIS = ("auto", "vllm", "fastalign")

    def __init__(self, base_url, model: str | None = None, api: str = "auto", api_key: str | None = None,
                 timeout: float = 600.0, batch_size: int = 64, max_concurrency: int = 8, retries: int = 3,
                 backoff: float = 0.5, connect_timeout: float = 10.0, process: bool = False):
        if api not in self.APIS:
            raise InputError(f"api must be one of {self.APIS}, got {api!r}")
        if not isinstance(process, bool):
            raise InputError(f"process must be True or False, got {process!r}")
        self.process = process
        check_int("batch_size", batch_size, minimum=1)
        self.pool = ServerPool(base_url, api_key, timeout, retries, backoff, connect_timeout)
        self.model, self.api, self.batch_size = model, api, batch_size
        self.max_concurrency = check_int("max_concurrency", max_concurrency, minimum=1)

    def _resolve(self) -> None:
        if self.api == "auto" or (self.api == "vllm" and self.model is None):
            entry = self.pool.models(self.model)
            self.model = entry["id"]
            if self.api == "auto":
                self.api = "fastalign" if entry.get("owned_by") == "fastalign" else "vllm"

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise InputError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self.process and not all(len(p) + len(r) for p, r in zip(prompts, responses)):
            raise InputError("a process reward (process=True) reads the last token: every prompt + response "
                             "needs one")
        self._resolve()
        starts = list(range(0, len(prompts), self.batch_size))
        chunks = self.pool.map(lambda s: self._score(prompts[s:s + self.batch_size], responses[s:s + self.batch_size],
                                                     s), starts, self.max_concurrency)
        return torch.tensor([r for chunk in chunks for r in chunk], dtype=torch.float32)

    def _score(self, prompts, responses, start: int) -> list[float]:
        what = f"reward request for pairs {start}..{start + len(prompts) - 1}"
        if self.api == "fastalign":
            payload = {"prompts": [[int(t) for t in p] for p in prompts],
                       "responses": [[int(t) for t in r] for r in responses]}
            got = self.pool.request("/reward", payload, what).get("rewards")
        elif self.process:
            got = self._score_process(prompts, responses, what)
        else:
            payload = {"model": self.model, "input": [[int(t) for t in p] + [int(t) for t in r]
                                                      for p, r in zip(prompts, responses)],
                       "use_activation": False}
            try:
                answer = self.pool.request("/classify", payload, what)
            except RemoteError as e:
                if "does not support Classification" in str(e):  # vLLM serving a token-classification model
                    raise RemoteError(f"{e} (a process reward model, *ForTokenClassification? pass "
                                      "RemoteReward(..., process=True))") from None
                raise
            data = _indexed(answer.get("data"), f"{what}: the server's data")
            got = [d["probs"][0] for d in data] if all(isinstance(d.get("probs"), list) and d["probs"]
                                                        for d in data) else None
        if not isinstance(got, list) or len(got) != len(prompts) or not all(map(is_real, got)):
            raise RemoteError(f"{what}: the server must answer one score (a number) per pair, got {got!r:.200}")
        return [float(r) for r in got]

    def _score_process(self, prompts, responses, what: str) -> list[float] | None:
        """P(good) at the last token of each prompt + response, from vLLM's per-token logits (``/pooling``,
        task ``token_classify``, raw logits: the softmax is taken here in fp32, as ``RewardModel`` does)."""
        rows = [[int(t) for t in p] + [int(t) for t in r] for p, r in zip(prompts, responses)]
        payload = {"model": self.model, "input": rows, "task": "token_classify", "use_activation": False}
        data = _indexed(self.pool.request("/pooling", payload, what).get("data"), f"{what}: the server's data")
        if len(data) != len(rows):
            return None
        last = []
        for row, d in zip(rows, data):
            logits = d.get("data")
            # one row of logits per token, 2 labels (bad, good): anything else is not a PRM's answer
            if not (isinstance(logits, list) and len(logits) == len(row) and isinstance(logits[-1], list)
                    and len(logits[-1]) == 2 and all(map(is_real, logits[-1]))):
                raise RemoteError(f"{what}: /pooling must answer 2 logits (bad, good) for each of the {len(row)} "
                                  f"tokens of a row (a 2-label token-classification model), got {logits!r:.200}")
            last.append(logits[-1])
        return torch.softmax(torch.tensor(last, dtype=torch.float32), -1)[:, 1].tolist()
