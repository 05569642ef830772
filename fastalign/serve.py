"""A small HTTP server for fastalign models (standard library ``http.server``), the protocol of
``fastalign.remote``: a causal LM via ``/v1/completions`` (token-id or text prompts) and a reward via
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
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .api import Engine
from .methods.base import Context, Randomness, sample_continuations
from .models import InputError


class _Models:
    """What the server holds: the wrapped target and reward, the tokenizer and a lock (one request at a time)."""

    def __init__(self, engine: Engine, model_name: str):
        self.target, self.reward, self.tokenizer = engine.target, engine.reward, engine.tokenizer
        self.model_name = model_name
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
        if body.get("stream") or body.get("echo") or int(body.get("n", 1)) != 1:
            raise InputError("stream, echo and n > 1 are not supported")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts:
            raise InputError("prompt is missing or empty")
        if any(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise InputError("text prompts need a server started with a tokenizer; send token ids")
            prompts = [self.tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in prompts]
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        top_k = body.get("top_k")
        top_k = None if top_k is None or int(top_k) <= 0 else int(top_k)
        top_p = body.get("top_p")
        top_p = None if top_p is None or float(top_p) >= 1.0 else float(top_p)
        if temperature == 0:
            temperature, top_k = 1.0, 1
        seed = body.get("seed")
        choices, used = [], 0
        for i, p in enumerate(prompts):
            rng = Randomness(None if seed is None else int(seed))
            ctx = Context(self.target, None, None, None, self.tokenizer, max_tokens, temperature, top_k, top_p, rng)
            with self.lock:
                tokens = sample_continuations(ctx, self.target, self.target.prefill([p], max_tokens), max_tokens, [0])[0]
            finish = "stop" if tokens[-1] in self.target.eos_token_ids else "length"
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
        with self.lock:
            return {"rewards": self.reward.score(prompts, responses).tolist()}


def _handler(models: _Models):
    routes = {"/v1/completions": models.completions, "/completions": models.completions, "/reward": models.rewards}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, models.models())
            elif self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):  # noqa: N802
            route = routes.get(self.path.rstrip("/"))
            if route is None:
                return self._error(404, f"no route {self.path}")
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                self._send(200, route(body))
            except (InputError, ValueError, TypeError, KeyError) as e:
                self._error(400, f"{type(e).__name__}: {e}")

        def log_message(self, format, *args):  # keep test output quiet
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # clients send one request per chain at once


def make_server(target=None, reward=None, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
                model_name: str = "fastalign", **engine_options) -> ThreadingHTTPServer:
    """A server (not started) for the given models; ``port=0`` picks a free port (``server.server_port``).

    Models are given as to ``fastalign.Engine`` (objects, names/paths, a reward callable)."""
    engine = Engine(target=target, reward=reward, tokenizer=tokenizer, **engine_options)
    return _Server((host, port), _handler(_Models(engine, model_name)))


def start(target=None, reward=None, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
          model_name: str = "fastalign", **engine_options) -> tuple[ThreadingHTTPServer, str]:
    """Start a server in a daemon thread; returns it and its base URL (``http://host:port``)."""
    server = make_server(target, reward, tokenizer, host, port, model_name, **engine_options)
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
    args = parser.parse_args(argv)
    if args.target is None and args.reward is None:
        parser.error("give --target and/or --reward")
    server = make_server(args.target, args.reward, args.tokenizer, args.host, args.port,
                         args.model_name or args.target or args.reward, device=args.device,
                         trust_remote_code=args.trust_remote_code, reward_tokenizer=args.reward_tokenizer)
    print(f"fastalign serving on http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    main()
