"""A small HTTP server for fastalign models (standard library ``asyncio``), the protocol of
``fastalign.models.remote``: a causal LM via ``/v1/completions`` (token-id or text prompts) and a reward via
``/reward``. Meant for tests, examples and single-machine use, not for throughput: requests take turns on the
model.

    python -m fastalign.serve --target PATH_OR_NAME [--reward PATH_OR_NAME] [--port 8000]

or in Python: ``server, url = fastalign.serve.start(target=model, reward=reward_fn)`` (a background
thread; ``server.shutdown()`` stops it).

Sampling: each prompt of a request is sampled alone in a decode context of the engine's
(``Engine.context(..., seed)``) with the decode's kernels (``temperature == 0`` is greedy), so a seeded request
is reproducible and draws the tokens a local fastalign decode of that single row would draw from the same seed.
Prompts of one request share its seed, as in vLLM. Responses carry ``choices[i].token_ids`` (EOS kept), ``text`` when a tokenizer is known,
``finish_reason`` (``"stop"`` at EOS, a stop token or a stop string, else ``"length"``) and ``stop_reason``
(the stop token id or string that ended it, else null).

Parameters of ``/v1/completions``: ``model`` (the listed name; another one is a 404), ``prompt``,
``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop`` (strings that end the text, which
excludes them; needs a tokenizer), ``stop_token_ids`` (tokens that end the response, kept like EOS),
``logprobs`` (``k`` in [0, 20]: the log-probability of each emitted token, plus the ``k`` most likely tokens,
under the distribution it was drawn from: the target's tempered, top-k / top-p truncated and renormalised
next-token distribution, so a greedy token has log-probability 0; tokens shown as ``"token_id:<id>"`` when
``return_tokens_as_token_ids`` is set or no tokenizer is known), ``return_token_ids`` and ``user``. Every
other parameter (``n > 1``, ``stream``, ``echo``, penalties, ``logit_bias``, ``min_p``, ``min_tokens``, ...)
is refused with a 400 that names each one, unless it has its neutral value (``presence_penalty: 0``,
``n: 1``, ``null``, ...), which clients such as the ``openai`` package send.

Safety (``Limits``): every bad request gets a 4xx JSON error ``{"error": {"message", "type", "code"}}`` (400 bad
input, 401 missing or wrong API key, 404 unknown route or model, 405 method, 411 no ``Content-Length``, 413 body
too large, 503 no free connection); the request body, the prompts per request and ``max_tokens`` are capped. A
connection may wait ``idle_timeout`` seconds for its next request; from its first byte a request has
``request_timeout`` seconds in all to arrive (request line, headers and body), else the connection is dropped.
Waiting connections cost no worker: at most ``max_workers`` requests are worked on at once, and ``/health`` and
``/v1/models`` are answered at once whatever the model is doing. At most ``max_connections`` are open: a new one
beyond that closes the connection idle the longest, or gets a 503 when none is idle. With ``api_key`` set
(``--api-key`` or ``FASTALIGN_API_KEY``) every route but ``/health`` needs ``Authorization: Bearer KEY``. Binding
to an address other than loopback warns: the server has no TLS. ``/v1/models`` lists the model's name, never a
local path.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import json
import os
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import torch

from .api import Engine
from .arguments import Parser, port_number, positive_float, positive_int
from .errors import InputError
from .kernels import truncate_logits
from .validation import (
    SEED_LIMIT,
    check_context_lengths,
    check_float,
    check_int,
    check_prompts,
    check_token_rows,
)


@dataclass
class Limits:
    """What one request and one connection may ask of the server."""

    max_body_bytes: int = 1 << 20  # 1 MiB of JSON
    max_prompts: int = 64  # prompts per /v1/completions request
    max_reward_rows: int = 1024  # (prompt, response) pairs per /reward request
    max_tokens: int | None = None  # cap of max_tokens (None: the target's context length)
    idle_timeout: float = 30.0  # seconds a connection may wait for its next request
    request_timeout: float = 30.0  # seconds from a request's first byte to its last (headers and body)
    max_workers: int = 16  # requests worked on at once (threads; the model calls take turns)
    max_connections: int = 256  # connections open at once


MAX_LOGPROBS = 20  # most alternatives per token in ``logprobs`` (vLLM's default cap)

# Completion parameters this server does not implement, with the value that changes nothing (``None`` too is
# accepted for each): a request may send them at that value, as clients such as the openai package do.
NEUTRAL_PARAMETERS = {
    "n": 1, "best_of": 1, "stream": False, "stream_options": None, "echo": False, "suffix": None,
    "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "length_penalty": 1,
    "logit_bias": {}, "min_p": 0, "min_tokens": 0, "ignore_eos": False, "use_beam_search": False,
    "include_stop_str_in_output": False, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "prompt_logprobs": None, "truncate_prompt_tokens": None, "allowed_token_ids": None, "bad_words": [],
}
# The parameters it implements (see the module docstring).
COMPLETION_PARAMETERS = {"model", "prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
                         "stop_token_ids", "logprobs", "return_tokens_as_token_ids", "return_token_ids", "user"}


class UnknownModel(InputError):
    """A request names a model this server does not serve (HTTP 404)."""


def _is_neutral(value, neutral) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or isinstance(neutral, bool):  # True is not 1, False is not 0
        return value is neutral
    return value == neutral


def check_supported(body: dict) -> None:
    """Refuse, in one ``InputError``, every parameter of ``body`` this server does not implement (an unknown
    name, or one of ``NEUTRAL_PARAMETERS`` at another value): never a silent answer that ignores them."""
    refused = [name[:40] if name not in NEUTRAL_PARAMETERS else f"{name}={json.dumps(value)[:40]}"
               for name, value in body.items()
               if name not in COMPLETION_PARAMETERS
               and (name not in NEUTRAL_PARAMETERS or not _is_neutral(value, NEUTRAL_PARAMETERS[name]))]
    if refused:
        raise InputError(f"this server does not support: {', '.join(refused)} (leave them out or send their "
                         "default; it implements " + ", ".join(sorted(COMPLETION_PARAMETERS)) + ")")


def check_stop_strings(stop) -> list[str]:
    """OpenAI's ``stop``: a string or a list of them (each non-empty), or None."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r:.60}")
    return stops


def public_model_name(name: str | None) -> str:
    """The name to list at /v1/models: a Hub id as it is, a local path by its last component only."""
    if not name:
        return "fastalign"
    path = Path(name)
    if path.is_absolute() or path.exists() or name.startswith("."):
        return path.name or "fastalign"
    return name


@dataclass
class _Sampling:
    """One completion request's settings, checked."""

    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop_ids: set[int]
    stops: list[str]
    logprobs: int | None  # alternatives per token; None: no logprobs
    token_ids_as_text: bool  # "token_id:<id>" in logprobs


class _Models:
    """What the server holds: the wrapped target and reward, the tokenizer and a lock (one model call at a time)."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits):
        self.engine = engine  # decode contexts come from it (Engine.context)
        self.target, self.reward, self.tokenizer = engine.target, engine.reward, engine.tokenizer
        self.model_name = public_model_name(model_name)
        self.limits = limits
        self.lock = threading.Lock()

    def models(self) -> dict:
        entry = {"id": self.model_name, "object": "model", "owned_by": "fastalign"}
        if self.target is not None:
            entry["eos_token_ids"] = sorted(self.target.eos_token_ids)
            entry["max_model_len"] = self.target.context_length
        return {"object": "list", "data": [entry]}

    def _sampling(self, body: dict) -> _Sampling:
        cap = self.target.context_length if self.limits.max_tokens is None else self.limits.max_tokens
        max_tokens = body.get("max_tokens")
        max_tokens = check_int("max_tokens", 16 if max_tokens is None else max_tokens, minimum=0, maximum=cap)
        temperature = check_float("temperature", body.get("temperature", 1.0), low=0.0)
        top_k = check_int("top_k", body.get("top_k"), optional=True)
        top_k = None if top_k is None or top_k <= 0 else top_k  # vLLM: -1 (or 0) turns top-k off
        top_p = check_float("top_p", body.get("top_p"), low=0.0, high=1.0, low_open=True, optional=True)
        top_p = None if top_p is None or top_p >= 1.0 else top_p
        if temperature == 0:
            temperature, top_k = 1.0, 1
        seed = check_int("seed", body.get("seed"), 0, SEED_LIMIT - 1, optional=True)  # one seed per request
        stop_ids = [] if body.get("stop_token_ids") is None else body["stop_token_ids"]
        if not isinstance(stop_ids, list):
            raise InputError(f"stop_token_ids must be a list of token ids, got {stop_ids!r:.60}")
        stop_ids = check_token_rows("stop_token_ids", [stop_ids], self.target.vocab_size, "target",
                                    allow_empty=True)[0]
        stops = check_stop_strings(body.get("stop"))
        if stops and self.tokenizer is None:
            raise InputError("stop strings need a server started with a tokenizer; send stop_token_ids")
        logprobs = check_int("logprobs", body.get("logprobs"), 0, MAX_LOGPROBS, optional=True)
        as_ids = bool(body.get("return_tokens_as_token_ids")) or self.tokenizer is None
        return _Sampling(max_tokens, temperature, top_k, top_p, seed, set(stop_ids), stops, logprobs, as_ids)

    def completions(self, body: dict) -> dict:
        if self.target is None:
            raise InputError("this server has no target model")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise UnknownModel(f"the model {model!r:.80} does not exist; this server serves {self.model_name!r}")
        check_supported(body)
        prompt = body.get("prompt")
        single = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int))
        prompts = [prompt] if single else prompt
        if isinstance(prompts, list) and len(prompts) > self.limits.max_prompts:
            raise InputError(f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                             f"{self.limits.max_prompts}")
        if isinstance(prompts, list) and any(isinstance(p, str) for p in prompts) and self.tokenizer is None:
            raise InputError("text prompts need a server started with a tokenizer; send token ids")
        prompts = check_prompts(prompts, self.tokenizer, self.target.vocab_size)
        sampling = self._sampling(body)
        check_context_lengths({"target": self.target}, prompts, sampling.max_tokens)
        choices = [dict(index=i, **self._complete(p, sampling)) for i, p in enumerate(prompts)]
        prompt_tokens = sum(map(len, prompts))
        completion_tokens = sum(len(c["token_ids"]) for c in choices)
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def _complete(self, prompt: list[int], s: _Sampling) -> dict:
        """One prompt's choice: its tokens drawn as a local decode of that single row draws them (the loop of
        ``methods.base.sample_continuations``), stopped at EOS, a stop token or a stop string."""
        tokens, chosen, top = [], [], []
        finish, reason, text = "length", None, None
        if s.max_tokens > 0:
            ctx = self.engine.context(s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed)
            with self.lock:
                logits = self.target.prefill([prompt], s.max_tokens)  # [1, V]
                while True:
                    token = ctx.sample(logits, [0])  # [1]
                    tokens.append(int(token[0]))
                    if s.logprobs is not None:
                        self._logprobs(logits[0], tokens[-1], s, chosen, top)
                    last, eos = tokens[-1], self.target.eos_token_ids
                    if s.stops:
                        text, reason = self._cut_at_stop(tokens, s.stops)
                    if reason is None and last in s.stop_ids and last not in eos:
                        reason = last  # vLLM: the stop token; null at EOS
                    if reason is not None or last in eos:
                        finish = "stop"
                        break
                    if len(tokens) == s.max_tokens:
                        break
                    logits = self.target.extend(token[:, None])[:, -1]
        if text is None:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else ""
        choice = {"text": text, "token_ids": tokens, "finish_reason": finish, "stop_reason": reason,
                  "logprobs": None}
        if s.logprobs is not None:
            names = [self._token_name(t, s) for t in tokens]
            offsets = list(itertools.accumulate(map(len, names), initial=0))[:-1]  # as vLLM: the pieces' lengths
            choice["logprobs"] = {"tokens": names, "token_logprobs": chosen, "top_logprobs": top,
                                  "text_offset": offsets}
        return choice

    def _logprobs(self, logits: torch.Tensor, token: int, s: _Sampling, chosen: list, top: list) -> None:
        """Append the log-probability of ``token`` and the ``s.logprobs`` most likely tokens (with the chosen one)
        under the truncated tempered distribution ``token`` was drawn from. ``logits [V]``."""
        logp = torch.log_softmax(truncate_logits(logits, s.temperature, s.top_k, s.top_p), dim=-1)
        chosen.append(float(logp[token]))
        values, ids = torch.topk(logp, min(s.logprobs, logp.shape[-1]))
        alternatives = {t: v for t, v in zip(ids.tolist(), values.tolist()) if v > float("-inf")}
        alternatives[token] = chosen[-1]
        top.append({self._token_name(t, s): v for t, v in alternatives.items()})

    def _token_name(self, token: int, s: _Sampling) -> str:
        return f"token_id:{token}" if s.token_ids_as_text else self.tokenizer.decode([token])

    def _cut_at_stop(self, tokens: list[int], stops: list[str]) -> tuple[str, str | None]:
        """The text of ``tokens``, cut before the first stop string in it (OpenAI: the stop string is not
        included), and that string (None when there is none)."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        found = min(((text.find(s), s) for s in stops if s in text), default=None)
        return (text, None) if found is None else (text[: found[0]], found[1])

    def rewards(self, body: dict) -> dict:
        if self.reward is None:
            raise InputError("this server has no reward model")
        unknown = sorted(set(body) - {"prompts", "responses"})
        if unknown:  # e.g. a "model" or "truncate" meant for another server: never silently ignored
            raise InputError(f"/reward takes only prompts and responses; it does not support: "
                             f"{', '.join(name[:40] for name in unknown[:10])}")
        prompts, responses = body.get("prompts"), body.get("responses")
        if not isinstance(prompts, list) or not isinstance(responses, list) or len(prompts) != len(responses):
            raise InputError("send {'prompts': [[ids], ...], 'responses': [[ids], ...]} of equal lengths")
        if not prompts:
            raise InputError("no rows: send at least one (prompt, response) pair")
        if len(prompts) > self.limits.max_reward_rows:
            raise InputError(f"{len(prompts)} rows in one request; this server takes at most "
                             f"{self.limits.max_reward_rows}")
        vocab = None
        if self.reward.retokenize:
            vocab = len(self.reward.policy_tokenizer)
        elif self.reward.is_model:
            vocab = self.reward.lm.model.get_input_embeddings().num_embeddings
        prompts = check_token_rows("prompts", prompts, vocab, "reward model")
        responses = check_token_rows("responses", responses, vocab, "reward model", allow_empty=True)
        if self.reward.is_model and not self.reward.retokenize:
            check_context_lengths({"reward": self.reward}, [p + r for p, r in zip(prompts, responses)], 0)
        with self.lock:
            return {"rewards": self.reward.score(prompts, responses).tolist()}


# ---------------------------------------------------------------------------------------------- HTTP
_MAX_LINE = 65536  # bytes in a request line or a header line (as http.server)
_MAX_HEADERS = 100


class _HTTPError(Exception):
    """A request that gets an error answer: its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    close: bool  # the connection ends after the answer (asked by the client, or HTTP/1.0)


def _error(status: int, message: str) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


def _response(status: int, payload: dict, close: bool) -> bytes:
    data = json.dumps(payload).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + data


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # over the reader's limit
        raise _HTTPError(431, f"a request or header line is longer than {_MAX_LINE} bytes") from None


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes,
                        max_body: int) -> _Request:
    """The request whose first byte, ``first``, was read already. ``_HTTPError`` when it is malformed: its end
    is then unknown and the connection cannot be reused."""
    line = first + await _line(reader)
    for _ in range(8):  # empty lines before a request line are ignored (RFC 9112)
        if line.strip():
            break
        line = await _line(reader)
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _HTTPError(400, f"bad request line {line[:80]!r}")
    method, path, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _HTTPError(505, f"HTTP version {version[:20]!r} is not supported; use HTTP/1.1")
    headers: dict[str, str] = {}
    for count in range(_MAX_HEADERS + 1):
        raw = await _line(reader)
        if raw in (b"\r\n", b"\n"):
            break
        if not raw:
            raise _HTTPError(400, "the request ended before its headers did")
        if count == _MAX_HEADERS:
            raise _HTTPError(431, f"more than {_MAX_HEADERS} header lines")
        name, colon, value = raw.decode("latin-1").partition(":")
        if not colon or not name or name != name.strip():
            raise _HTTPError(400, f"bad header line {raw[:80]!r}")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value  # repeated: "5, 5" is no length
    connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    if "transfer-encoding" in headers:
        raise _HTTPError(411, "send the body with a Content-Length header (Transfer-Encoding is not supported)")
    length = headers.get("content-length")
    if length is None:
        if method == "POST":
            raise _HTTPError(411, "a Content-Length header is required")
        return _Request(method, path, headers, b"", close)
    if not (length.isascii() and length.isdigit()):
        raise _HTTPError(400, f"Content-Length must be a non-negative integer, got {length[:40]!r}")
    if int(length) > max_body:
        raise _HTTPError(413, f"the body has {int(length)} bytes; this server takes at most {max_body}")
    if headers.get("expect", "").lower() == "100-continue" and version == "HTTP/1.1":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        body = await reader.readexactly(int(length))
    except asyncio.IncompleteReadError as e:
        raise _HTTPError(400, f"the body ended after {len(e.partial)} of {int(length)} bytes") from None
    return _Request(method, path, headers, body, close)


def _parse_json(data: bytes) -> dict:
    try:
        body = json.loads(data or b"{}")
    except RecursionError:
        raise _HTTPError(400, "the body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _HTTPError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _HTTPError(400, f"the body must be a JSON object, got a JSON {type(body).__name__}")
    return body


class _Connection:
    """An open connection: its task, its writer, and since when it waits for a request (None while it has one)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.task, self.writer, self.idle_since = asyncio.current_task(), writer, time.monotonic()


class Server:
    """The bundled server, not yet serving: ``serve_forever()`` serves in the calling thread until
    ``shutdown()`` (from another thread), ``server_close()`` closes the listening socket, ``server_port`` is the
    bound port (the names of ``socketserver``).

    One asyncio loop reads and answers every connection: a connection waiting for its next request, or one
    whose request is still arriving, holds no thread. Completions and rewards run on ``max_workers`` threads.
    """

    def __init__(self, host: str, port: int, models: _Models, api_key: str | None):
        self.models, self.limits = models, models.limits
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self._routes = {"/v1/completions": models.completions, "/completions": models.completions,
                        "/reward": models.rewards}
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.socket = socket.socket(family, kind, proto)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(256)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()[:2]
        self.server_port = self.server_address[1]
        self._connections: set[_Connection] = set()  # touched by the loop's thread only
        self._executor: ThreadPoolExecutor | None = None
        self._state = threading.Lock()  # guards the three below, shared with shutdown()
        self._loop, self._stop, self._closing = None, None, False
        self._done = threading.Event()

    def serve_forever(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)  # a model call cannot be interrupted
            self._done.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` and wait until it has returned; open connections are closed."""
        with self._state:
            self._closing = True
            loop, stop = self._loop, self._stop
        if loop is not None:
            loop.call_soon_threadsafe(stop.set)
            self._done.wait()

    def server_close(self) -> None:
        self.socket.close()

    async def _serve(self) -> None:
        with self._state:
            if self._closing:
                return
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._executor = ThreadPoolExecutor(self.limits.max_workers, thread_name_prefix="fastalign-serve")
        server = await asyncio.start_server(self._connection, sock=self.socket, limit=_MAX_LINE)
        try:
            await self._stop.wait()  # shutdown(), or cancelled by asyncio.run on Ctrl-C
        finally:
            with self._state:
                self._loop = None
            server.close()
            tasks = [c.task for c in self._connections]
            for conn in self._connections:
                conn.writer.close()  # its handler sees the end of the stream (a cancelled one would be logged)
            await asyncio.gather(*tasks, return_exceptions=True)

    def _admit(self, conn: _Connection) -> bool:
        """Room for a new connection: with ``max_connections`` open, the one idle the longest is closed; False
        when none is idle."""
        if len(self._connections) >= self.limits.max_connections:
            idle = [c for c in self._connections if c.idle_since is not None]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.idle_since)
            self._connections.discard(oldest)
            oldest.writer.close()  # its handler reads the end of the stream and ends
        self._connections.add(conn)
        return True

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(writer)
        try:
            if not self._admit(conn):
                message = f"all {self.limits.max_connections} connections are busy; try again later"
                writer.write(_response(503, _error(503, message), close=True))
                await asyncio.wait_for(writer.drain(), self.limits.request_timeout)
                return
            while await self._exchange(reader, writer, conn):
                pass
        except (OSError, asyncio.TimeoutError):
            pass  # the client left, or was too slow: its request never arrived whole, or it did not read
        finally:
            self._connections.discard(conn)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection) -> bool:
        """Wait for one request and answer it; False when the connection is to close."""
        conn.idle_since = time.monotonic()
        first = await asyncio.wait_for(reader.read(1), self.limits.idle_timeout)
        conn.idle_since = None
        if not first:
            return False
        try:  # one deadline for the whole request: a client sending a byte now and then is still dropped
            request = await asyncio.wait_for(_read_request(reader, writer, first, self.limits.max_body_bytes),
                                             self.limits.request_timeout)
        except _HTTPError as e:
            status, payload, close = e.status, _error(e.status, e.message), True
        else:
            (status, payload), close = await self._answer(request), request.close
        writer.write(_response(status, payload, close))
        await asyncio.wait_for(writer.drain(), self.limits.request_timeout)
        return not close

    async def _answer(self, request: _Request) -> tuple[int, dict]:
        path = request.path.split("?", 1)[0].rstrip("/")
        if request.method not in ("GET", "POST"):
            return 405, _error(405, f"method {request.method[:20]} is not allowed; use GET or POST")
        if path != "/health" and not self._authorized(request.headers):
            return 401, _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
        if request.method == "GET" and path == "/health":
            return 200, {"status": "ok"}
        if request.method == "GET" and path in ("/v1/models", "/models"):
            return 200, self.models.models()
        route = self._routes.get(path) if request.method == "POST" else None
        if route is None:
            return 404, _error(404, f"no route {request.path[:100]}")
        try:
            body = _parse_json(request.body)
            result = await asyncio.get_running_loop().run_in_executor(self._executor, route, body)
        except _HTTPError as e:
            return e.status, _error(e.status, e.message)
        except UnknownModel as e:
            return 404, _error(404, str(e))
        except InputError as e:
            return 400, _error(400, str(e))
        except RecursionError:
            return 400, _error(400, "the body is nested too deeply")
        except (ValueError, TypeError, KeyError) as e:
            return 400, _error(400, f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 (never a dropped connection; no traceback to the client)
            return 500, _error(500, f"internal error ({type(e).__name__})")
        return 200, result

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "").encode("latin-1")
        return self._expected is None or hmac.compare_digest(given, self._expected)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(target=None, reward=None, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
                model_name: str = "fastalign", api_key: str | None = None, limits: Limits | None = None,
                **engine_options) -> Server:
    """A server (not started) for the given models; ``port=0`` picks a free port (``server.server_port``).

    Models are given as to ``fastalign.Engine`` (objects, names/paths, a reward callable). ``api_key``: when
    set, requests need ``Authorization: Bearer KEY``. ``limits``: see ``Limits``."""
    limits = limits or Limits()
    for name in ("max_body_bytes", "max_prompts", "max_reward_rows", "max_workers", "max_connections"):
        check_int(name, getattr(limits, name), minimum=1)
    check_int("max_tokens", limits.max_tokens, minimum=1, optional=True)
    check_float("idle_timeout", limits.idle_timeout, low=0.0, low_open=True)
    check_float("request_timeout", limits.request_timeout, low=0.0, low_open=True)
    if not is_loopback(host):
        warnings.warn(f"fastalign.serve is bound to {host!r}, reachable from other machines: it has no TLS"
                      + ("" if api_key else " and no API key (set --api-key)"), stacklevel=2)
    engine = Engine(target=target, reward=reward, tokenizer=tokenizer, **engine_options)
    return Server(host, port, _Models(engine, model_name, limits), api_key)


def start(target=None, reward=None, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
          model_name: str = "fastalign", api_key: str | None = None, limits: Limits | None = None,
          **engine_options) -> tuple[Server, str]:
    """Start a server in a daemon thread; returns it and its base URL (``http://host:port``)."""
    server = make_server(target, reward, tokenizer, host, port, model_name, api_key, limits, **engine_options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_port}"


def main(argv=None) -> None:
    parser = Parser(prog="python -m fastalign.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="causal LM (HF name or path) served at /v1/completions")
    parser.add_argument("--reward", help="sequence-classification reward model served at /reward")
    parser.add_argument("--tokenizer", help="tokenizer (defaults to the target's)")
    parser.add_argument("--reward-tokenizer", help="the reward model's tokenizer when it differs")
    parser.add_argument("--model-name", default=None, help="name listed at /v1/models (default: --target)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--api-key", default=os.environ.get("FASTALIGN_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $FASTALIGN_API_KEY, else none)")
    defaults = Limits()
    parser.add_argument("--max-body-bytes", type=positive_int, default=defaults.max_body_bytes)
    parser.add_argument("--max-prompts", type=positive_int, default=defaults.max_prompts, help="prompts per request")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="cap of max_tokens (default: context length)")
    parser.add_argument("--idle-timeout", type=positive_float, default=defaults.idle_timeout,
                        help="seconds a connection may wait for its next request")
    parser.add_argument("--request-timeout", type=positive_float, default=defaults.request_timeout,
                        help="seconds a request may take to arrive (headers and body)")
    parser.add_argument("--max-workers", type=positive_int, default=defaults.max_workers,
                        help="requests worked on at once")
    parser.add_argument("--max-connections", type=positive_int, default=defaults.max_connections,
                        help="connections open at once")
    args = parser.parse_args(argv)
    if args.target is None and args.reward is None:
        parser.error("give --target and/or --reward")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompts=args.max_prompts, max_tokens=args.max_tokens,
                    idle_timeout=args.idle_timeout, request_timeout=args.request_timeout,
                    max_workers=args.max_workers, max_connections=args.max_connections)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *rest: print(f"warning: {message}", file=sys.stderr)
            server = make_server(args.target, args.reward, args.tokenizer, args.host, args.port,
                                 args.model_name or args.target or args.reward, args.api_key, limits,
                                 device=args.device, trust_remote_code=args.trust_remote_code,
                                 reward_tokenizer=args.reward_tokenizer)
    except (InputError, OSError) as e:
        parser.exit(2, f"python -m fastalign.serve: error: {' '.join(str(e).split())}\n")
    print(f"fastalign serving on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
