"""A small HTTP server for fastalign models (standard library ``http.server``), the protocol of
``fastalign.models.remote``: a causal LM via ``/v1/completions`` (token-id or text prompts) and a reward via
``/reward``. Meant for tests, examples and single-machine use, not for throughput: requests run one at a
time on the model.

    python -m fastalign.serve --target PATH_OR_NAME [--reward PATH_OR_NAME] [--port 8000]

or in Python: ``server, url = fastalign.serve.start(target=model, reward=reward_fn)`` (a background
thread; ``server.shutdown()`` stops it).

Sampling: each prompt of a request is sampled alone from ``Randomness(seed)`` with the decode's kernels
(``temperature == 0`` is greedy), so a seeded request is reproducible and draws the tokens a local
fastalign decode of that single row would draw from the same seed. Prompts of one request share its
seed, as in vLLM. Responses carry ``choices[i].token_ids`` (EOS kept), ``logprobs.tokens`` as
``"token_id:<id>"`` when ``return_tokens_as_token_ids`` is set, ``text`` when a tokenizer is known, and
``finish_reason`` (``"stop"`` at EOS, else ``"length"``).

Safety (``Limits``): every bad request gets a 4xx JSON error ``{"error": {"message", "type", "code"}}`` (400 bad
input, 401 missing or wrong API key, 404 unknown route, 405 method, 411 no ``Content-Length``, 413 body too
large); the request body, the prompts per request and ``max_tokens`` are capped; an idle or slow connection is
dropped after ``idle_timeout`` seconds; at most ``max_workers`` connections are served at once (the others wait
in the listen queue). With ``api_key`` set (``--api-key`` or ``FASTALIGN_API_KEY``) every route but ``/health``
needs ``Authorization: Bearer KEY``. Binding to an address other than loopback warns: the server has no TLS.
``/v1/models`` lists the model's name, never a local path.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .api import Engine
from .methods.base import Context, Randomness, sample_continuations
from .errors import InputError
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
    """What one request may ask of the server."""

    max_body_bytes: int = 1 << 20  # 1 MiB of JSON
    max_prompts: int = 64  # prompts per /v1/completions request
    max_reward_rows: int = 1024  # (prompt, response) pairs per /reward request
    max_tokens: int | None = None  # cap of max_tokens (None: the target's context length)
    idle_timeout: float = 30.0  # seconds a connection may sit idle or send slowly
    max_workers: int = 16  # connections served at once


def public_model_name(name: str | None) -> str:
    """The name to list at /v1/models: a Hub id as it is, a local path by its last component only."""
    if not name:
        return "fastalign"
    path = Path(name)
    if path.is_absolute() or path.exists() or name.startswith("."):
        return path.name or "fastalign"
    return name


class _Models:
    """What the server holds: the wrapped target and reward, the tokenizer and a lock (one request at a time)."""

    def __init__(self, engine: Engine, model_name: str, limits: Limits):
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

    def completions(self, body: dict) -> dict:
        if self.target is None:
            raise InputError("this server has no target model")
        if body.get("stream") or body.get("echo") or check_int("n", body.get("n", 1), minimum=1) != 1:
            raise InputError("stream, echo and n > 1 are not supported")
        prompt = body.get("prompt")
        single = isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int))
        prompts = [prompt] if single else prompt
        if isinstance(prompts, list) and len(prompts) > self.limits.max_prompts:
            raise InputError(f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                             f"{self.limits.max_prompts}")
        if isinstance(prompts, list) and any(isinstance(p, str) for p in prompts) and self.tokenizer is None:
            raise InputError("text prompts need a server started with a tokenizer; send token ids")
        prompts = check_prompts(prompts, self.tokenizer, self.target.vocab_size)
        cap = self.limits.max_tokens or self.target.context_length
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
        check_context_lengths({"target": self.target}, prompts, max_tokens)
        choices, used = [], 0
        for i, p in enumerate(prompts):
            tokens = []
            if max_tokens > 0:
                rng = Randomness(seed)
                ctx = Context(self.target, None, None, None, self.tokenizer, max_tokens, temperature, top_k, top_p,
                              rng)
                with self.lock:
                    logits = self.target.prefill([p], max_tokens)
                    tokens = sample_continuations(ctx, self.target, logits, max_tokens, [0])[0]
            finish = "stop" if tokens and tokens[-1] in self.target.eos_token_ids else "length"
            choice = {"index": i, "token_ids": tokens, "finish_reason": finish, "logprobs": None,
                      "text": self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer else ""}
            if body.get("return_tokens_as_token_ids") and body.get("logprobs") is not None:
                choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in tokens]}
            choices.append(choice)
            used += len(p) + len(tokens)
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": sum(map(len, prompts)), "total_tokens": used,
                          "completion_tokens": used - sum(map(len, prompts))}}

    def rewards(self, body: dict) -> dict:
        if self.reward is None:
            raise InputError("this server has no reward model")
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


def _handler(models: _Models, api_key: str | None):
    routes = {"/v1/completions": models.completions, "/completions": models.completions, "/reward": models.rewards}
    limits = models.limits
    expected = f"Bearer {api_key}".encode() if api_key else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = limits.idle_timeout  # the socket's timeout: an idle or slow client is dropped

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def send_error(self, code, message=None, explain=None):  # http.server's own errors, as JSON too
            self.close_connection = True
            self._error(code, message or HTTPStatus(code).phrase)

        def _authorized(self) -> bool:
            if expected is None or self.path.rstrip("/") == "/health":
                return True
            given = self.headers.get("Authorization", "").encode()
            if hmac.compare_digest(given, expected):
                return True
            self._error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
            return False

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if not self._authorized():
                return
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, models.models())
            elif self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def _read_body(self) -> dict | None:
            """The request's JSON object, or None after answering with an error."""
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                return self._error(411, "a Content-Length header is required")
            if not length.strip().isdigit():
                self.close_connection = True  # the body's end is unknown: the connection cannot be reused
                return self._error(400, f"Content-Length must be a non-negative integer, got {length!r}")
            if int(length) > limits.max_body_bytes:
                self.close_connection = True
                return self._error(413, f"the body has {int(length)} bytes; this server takes at most "
                                        f"{limits.max_body_bytes}")
            data = self.rfile.read(int(length))
            if len(data) < int(length):
                self.close_connection = True
                return self._error(400, f"the body ended after {len(data)} of {int(length)} bytes")
            try:
                body = json.loads(data or b"{}")
            except (ValueError, UnicodeDecodeError) as e:
                return self._error(400, f"the body is not valid JSON: {e}")
            if not isinstance(body, dict):
                return self._error(400, f"the body must be a JSON object, got a JSON {type(body).__name__}")
            return body

        def do_POST(self):  # noqa: N802
            route = routes.get(self.path.rstrip("/"))
            if route is None:
                self.close_connection = True
                return self._error(404, f"no route {self.path}")
            if not self._authorized():
                self.close_connection = True
                return
            body = self._read_body()
            if body is None:
                return
            try:
                result = route(body)
            except (InputError, ValueError, TypeError, KeyError) as e:
                return self._error(400, str(e) if isinstance(e, InputError) else f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 (never a dropped connection; no traceback to the client)
                return self._error(500, f"internal error ({type(e).__name__})")
            self._send(200, result)

        def _not_allowed(self):
            self.close_connection = True
            self._error(405, f"method {self.command} is not allowed; use GET or POST")

        do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

        def log_message(self, format, *args):  # keep test output quiet
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_workers`` at once: further connections wait in the listen
    queue until a worker ends (an idle connection ends after the handler's timeout)."""

    daemon_threads = True
    request_queue_size = 256  # clients send one request per chain at once

    def __init__(self, address, handler, max_workers: int):
        self._slots = threading.BoundedSemaphore(max_workers)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(target=None, reward=None, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
                model_name: str = "fastalign", api_key: str | None = None, limits: Limits | None = None,
                **engine_options) -> ThreadingHTTPServer:
    """A server (not started) for the given models; ``port=0`` picks a free port (``server.server_port``).

    Models are given as to ``fastalign.Engine`` (objects, names/paths, a reward callable). ``api_key``: when
    set, requests need ``Authorization: Bearer KEY``. ``limits``: see ``Limits``."""
    limits = limits or Limits()
    check_int("max_workers", limits.max_workers, minimum=1)
    check_float("idle_timeout", limits.idle_timeout, low=0.0, low_open=True)
    if not is_loopback(host):
        warnings.warn(f"fastalign.serve is bound to {host!r}, reachable from other machines: it has no TLS"
                      + ("" if api_key else " and no API key (set --api-key)"), stacklevel=2)
    engine = Engine(target=target, reward=reward, tokenizer=tokenizer, **engine_options)
    return _Server((host, port), _handler(_Models(engine, model_name, limits), api_key), limits.max_workers)


def start(target=None, reward=None, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
          model_name: str = "fastalign", api_key: str | None = None, limits: Limits | None = None,
          **engine_options) -> tuple[ThreadingHTTPServer, str]:
    """Start a server in a daemon thread; returns it and its base URL (``http://host:port``)."""
    server = make_server(target, reward, tokenizer, host, port, model_name, api_key, limits, **engine_options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_port}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastalign.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="causal LM (HF name or path) served at /v1/completions")
    parser.add_argument("--reward", help="sequence-classification reward model served at /reward")
    parser.add_argument("--tokenizer", help="tokenizer (defaults to the target's)")
    parser.add_argument("--reward-tokenizer", help="the reward model's tokenizer when it differs")
    parser.add_argument("--model-name", default=None, help="name listed at /v1/models (default: --target)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--api-key", default=os.environ.get("FASTALIGN_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $FASTALIGN_API_KEY, else none)")
    defaults = Limits()
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--max-prompts", type=int, default=defaults.max_prompts, help="prompts per request")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap of max_tokens (default: context length)")
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout, help="seconds")
    parser.add_argument("--max-workers", type=int, default=defaults.max_workers, help="connections at once")
    args = parser.parse_args(argv)
    if args.target is None and args.reward is None:
        parser.error("give --target and/or --reward")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_prompts=args.max_prompts, max_tokens=args.max_tokens,
                    idle_timeout=args.idle_timeout, max_workers=args.max_workers)
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
