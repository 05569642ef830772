"""The bundled server (``python -m fastalign.serve``) over real HTTP on 127.0.0.1: every bad request gets a 4xx
JSON error, work per request is capped, idle sockets time out, workers are bounded, keys and paths are kept."""

import http.client
import json
import math
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastalign
import fastalign.serve
from fastalign.serve import Limits
from fastalign.testing import tiny_causal_lm, tiny_reward_model, tiny_tokenizer

V = 8


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=V, hidden=16, init_range=0.2)


def reward_fn(prompts, responses):
    return torch.tensor([float(len(r)) for r in responses])


@pytest.fixture(scope="module")
def server(model):
    server, url = fastalign.serve.start(target=model, reward=reward_fn,
                                        limits=Limits(max_body_bytes=4096, max_prompts=4, max_reward_rows=8))
    yield server
    server.shutdown()
    server.server_close()


def request(server, method, path, body=None, headers=None, raw: bytes | None = None, timeout: float = 30):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def raw_exchange(server, data: bytes, read_timeout: float = 30) -> bytes:
    """Send raw bytes, return everything the server answers until it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=read_timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def error_of(status_payload, status):
    got, payload = status_payload
    assert got == status, payload
    assert set(payload["error"]) == {"message", "type", "code"} and payload["error"]["code"] == status
    return payload["error"]["message"]


@pytest.mark.parametrize("path, body, match", [
    ("/v1/completions", [1, 2], "the body must be a JSON object, got a JSON list"),
    ("/v1/completions", "hello", "the body must be a JSON object, got a JSON str"),
    ("/v1/completions", {"prompt": [1, V]}, f"token id {V} is outside the vocabulary of the target"),
    ("/v1/completions", {"prompt": [[1], [-3]]}, "prompt 1, position 0: token id -3 is outside the vocabulary"),
    ("/v1/completions", {"prompt": [1, 2.5]}, "prompt 0, position 1: token ids must be integers, got 2.5"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": -1}, "max_tokens must be an integer >= 0"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 10**9}, "max_tokens must be an integer >= 0 and <= 128"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": "3"}, "max_tokens must be an integer"),
    ("/v1/completions", {"prompt": [1, 2], "temperature": -1}, r"temperature must be in \[0.0, inf\]"),
    ("/v1/completions", {"prompt": [1, 2], "top_p": 0}, r"top_p must be in \(0.0, 1.0\]"),
    ("/v1/completions", {"prompt": [1, 2], "seed": 2**70}, "seed must be an integer >= 0"),
    ("/v1/completions", {"prompt": [[1]] * 5}, "5 prompts in one request; this server takes at most 4"),
    ("/v1/completions", {"prompt": None}, "prompts must be a list"),
    ("/v1/completions", {"prompt": [1, 2], "n": 2}, "this server does not support: n=2 "),
    ("/v1/completions", {"prompt": ["w1"]}, "text prompts need a server started with a tokenizer"),
    ("/reward", {"prompts": [], "responses": []}, "no rows"),
    ("/reward", {"prompts": [[]], "responses": [[]]}, "prompt 0 is empty"),
    ("/reward", {"prompts": [[1]], "responses": [["a"]]}, "response 0, position 0: token ids must be integers"),
    ("/reward", {"prompts": [[1]] * 9, "responses": [[2]] * 9}, "9 rows in one request; this server takes at most 8"),
    ("/reward", {"prompts": [[1]], "responses": [[2], [3]]}, "of equal lengths"),
])
def test_bad_requests_get_a_400_json_error(server, path, body, match):
    import re

    assert re.search(match, error_of(request(server, "POST", path, body), 400))


@pytest.mark.parametrize("data, expected", [
    (b"GET /health HTTP/1.0\r\n\r\n", [b"HTTP/1.1 200 OK", b"Connection: close"]),  # HTTP/1.0 closes
    (b"GET /health HTTP/1.1\r\n\r\nGET /v1/models?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n",  # pipelined
     [b'{"status": "ok"}', b'"owned_by": "fastalign"']),
    (b"POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: 32\r\n\r\n"
     b'{"prompt": [1], "max_tokens": 1}', [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"]),
    (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", [b"HTTP/1.1 411"]),
    (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", [b"HTTP/1.1 400"]),
    (b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", [b"HTTP/1.1 431", b"longer than 65536"]),
    (b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", [b"HTTP/1.1 431", b"more than 100 header"]),
    (b"GET /health HTTP/1.1\r\nno colon\r\n\r\n", [b"HTTP/1.1 400", b"bad header line"]),
    (b"HEAD /health HTTP/1.1\r\nConnection: close\r\n\r\n", [b"HTTP/1.1 405"]),
    (b"PRI * HTTP/2.0\r\n\r\n", [b"HTTP/1.1 505"]),
])
def test_http_framing(server, data, expected):
    """The request parser: keep-alive rules, pipelining, 100-continue, and a JSON error (then a close) for what it
    cannot frame."""
    answer = raw_exchange(server, data, read_timeout=10)
    assert all(part in answer for part in expected), answer[:300]


def test_json_nan_and_bad_json(server):
    message = error_of(request(server, "POST", "/v1/completions", raw=b'{"prompt": [1], "temperature": NaN}'), 400)
    assert "temperature must be a finite number, got nan" in message
    assert "not valid JSON" in error_of(request(server, "POST", "/v1/completions", raw=b"{oops"), 400)
    assert "not valid JSON" in error_of(request(server, "POST", "/v1/completions", raw=b"\xff\xfe"), 400)


def test_a_deeply_nested_body_is_a_400(server):
    for deep in (b"[" * 2000 + b"]" * 2000, b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}"):
        assert "nested too deeply" in error_of(request(server, "POST", "/v1/completions", raw=deep), 400)
    assert request(server, "GET", "/health") == (200, {"status": "ok"})


def test_max_tokens_zero_is_honoured_and_good_requests_work(server, model):
    status, out = request(server, "POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 0})
    assert status == 200 and out["choices"][0]["token_ids"] == [] and out["usage"]["completion_tokens"] == 0
    status, out = request(server, "POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 3, "seed": 4})
    local = fastalign.decode([[1, 2]], target=model, max_new_tokens=3, temperature=1.0, seed=4)
    assert status == 200 and out["choices"][0]["token_ids"] == local.sequences[0]
    status, out = request(server, "POST", "/reward", {"prompts": [[1], [2]], "responses": [[], [3, 4]]})
    assert status == 200 and out["rewards"] == [0.0, 2.0]


def test_unsupported_parameters_are_refused_by_name_and_neutral_ones_accepted(server):
    plain = {"prompt": [1, 2], "max_tokens": 4, "seed": 3}
    refused = {"presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"1": 5}, "min_tokens": 2,
               "min_p": True, "best_of": 2, "echo": True, "stream": True, "ignore_eos": True, "suffix": "x",
               "repetition_penalty": 1.2, "mystery": 1}
    message = error_of(request(server, "POST", "/v1/completions", {**plain, **refused}), 400)
    assert all(name in message for name in refused), message
    # what clients send as defaults changes nothing
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "min_tokens": 0, "min_p": 0,
               "n": 1, "best_of": None, "echo": False, "stream": False, "logprobs": None, "repetition_penalty": 1.0,
               "ignore_eos": False, "stop": None, "stop_token_ids": [], "user": "someone", "model": "fastalign",
               "return_token_ids": True}
    status, out = request(server, "POST", "/v1/completions", {**plain, **neutral})
    assert status == 200 and out["choices"][0]["token_ids"] == request(server, "POST", "/v1/completions",
                                                                       plain)[1]["choices"][0]["token_ids"]


def test_an_unknown_model_is_a_404(server):
    body = {"prompt": [1], "max_tokens": 1, "model": "gpt-4"}
    assert "the model 'gpt-4' does not exist" in error_of(request(server, "POST", "/v1/completions", body), 404)


@pytest.mark.parametrize("options", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 3},
                                     {"temperature": 1.3, "top_p": 0.8}, {"temperature": 0}])
def test_logprobs_are_those_of_the_truncated_tempered_distribution(server, model, options):
    """``logprobs: k``: each emitted token's log-probability and the k most likely tokens', under the distribution
    it was drawn from (greedy: a point mass, log-probability 0); the tokens are those drawn without logprobs."""
    from fastalign.testing import next_token_probs

    body = {"prompt": [1, 2], "max_tokens": 5, "seed": 11, **options}
    status, out = request(server, "POST", "/v1/completions", {**body, "logprobs": 2})
    choice = out["choices"][0]
    tokens, logprobs = choice["token_ids"], choice["logprobs"]
    assert status == 200 and tokens == request(server, "POST", "/v1/completions", body)[1]["choices"][0]["token_ids"]
    assert logprobs["tokens"] == [f"token_id:{t}" for t in tokens]  # no tokenizer: ids
    greedy = options["temperature"] == 0
    sampling = (1.0, 1, None) if greedy else (options["temperature"], options.get("top_k"), options.get("top_p"))
    for i, t in enumerate(tokens):
        probs = next_token_probs(model, [1, 2] + tokens[:i], *sampling)
        assert logprobs["token_logprobs"][i] == pytest.approx(math.log(probs[t]), abs=1e-5)
        likely = [v for v in probs.argsort(descending=True)[:2].tolist() if probs[v] > 0] + [t]
        top = logprobs["top_logprobs"][i]
        assert sorted(top) == sorted({f"token_id:{v}" for v in likely})
        assert all(top[f"token_id:{v}"] == pytest.approx(math.log(probs[v]), abs=1e-5) for v in likely)
        if greedy:
            assert top == {f"token_id:{t}": 0.0}
    assert "logprobs must be an integer >= 0 and <= 20" in error_of(
        request(server, "POST", "/v1/completions", {**body, "logprobs": 21}), 400)


@pytest.fixture(scope="module")
def text_server(model):
    server, _ = fastalign.serve.start(target=model, tokenizer=tiny_tokenizer(V))
    yield server
    server.shutdown()
    server.server_close()


def test_stop_strings_end_the_text_and_stop_tokens_the_response(server, text_server):
    """OpenAI's ``stop``: the text ends before the first stop string (not included), finish_reason "stop";
    the tokens are those drawn up to the one that completed it. ``stop_token_ids``: kept, like EOS."""
    tok = tiny_tokenizer(V)
    body = {"prompt": [1, 2], "max_tokens": 12, "seed": 0}
    full = request(text_server, "POST", "/v1/completions", body)[1]["choices"][0]
    tokens, text = full["token_ids"], full["text"]
    assert len(text.split()) >= 6 and full["finish_reason"] == "length"  # the seed gives a long text
    stop = " ".join(text.split()[4:6])
    n = next(n for n in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:n], skip_special_tokens=True))
    status, out = request(text_server, "POST", "/v1/completions", {**body, "stop": ["never", stop], "logprobs": 0})
    cut = out["choices"][0]
    assert status == 200 and cut["token_ids"] == tokens[:n] and cut["text"] == text[: text.index(stop)]
    assert (cut["finish_reason"], cut["stop_reason"]) == ("stop", stop) and stop not in cut["text"]
    assert cut["logprobs"]["tokens"] == [tok.decode([t]) for t in tokens[:n]]  # the tokenizer's pieces
    assert out["usage"]["completion_tokens"] == n

    k = 3  # a stop token ends the response after its first occurrence, kept
    out = request(text_server, "POST", "/v1/completions", {**body, "stop_token_ids": [tokens[k]]})[1]["choices"][0]
    first = tokens.index(tokens[k])
    assert out["token_ids"] == tokens[: first + 1] and (out["finish_reason"], out["stop_reason"]) == ("stop", tokens[k])

    message = error_of(request(server, "POST", "/v1/completions", {"prompt": [1], "stop": "w1"}), 400)
    assert "stop strings need a server started with a tokenizer" in message
    for bad in ("", [""], [1], {"a": 1}):
        assert "stop must be a non-empty string" in error_of(
            request(text_server, "POST", "/v1/completions", {"prompt": [1], "stop": bad}), 400)
    assert f"token id {V} is outside the vocabulary" in error_of(
        request(server, "POST", "/v1/completions", {"prompt": [1], "stop_token_ids": [V]}), 400)


def test_routes_methods_and_internal_errors(server, monkeypatch):
    assert "no route /nope" in error_of(request(server, "POST", "/nope", {}), 404)
    assert "no route /nope" in error_of(request(server, "GET", "/nope"), 404)
    assert "not allowed" in error_of(request(server, "PUT", "/v1/completions", {}), 405)
    assert request(server, "GET", "/health") == (200, {"status": "ok"})


def test_content_length_is_validated_and_the_body_capped(server):
    for length, status in [("-1", b"400"), ("abc", b"400"), ("99999", b"413")]:
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n").encode()
        answer = raw_exchange(server, head + b'{"prompt": [1]}', read_timeout=10)
        assert answer.startswith(b"HTTP/1.1 " + status), answer
        assert b'"error"' in answer and b"Connection: close" in answer
    no_length = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", read_timeout=10)
    assert no_length.startswith(b"HTTP/1.1 411") and b"Content-Length header is required" in no_length
    big = {"prompt": [1] * 3000}
    assert "this server takes at most 4096" in error_of(request(server, "POST", "/v1/completions", big), 413)
    garbage = raw_exchange(server, b"NONSENSE\r\n\r\n", read_timeout=10)  # parsed as HTTP/0.9: a bare body
    assert b'"code": 400' in garbage


def trickle(port: int, head: bytes, pause: float, steps: int) -> float | None:
    """Send ``head``, then one more byte every ``pause`` seconds, ``steps`` times at most: the seconds until the
    server closed the connection, or None if it never did."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        for _ in range(steps):
            if select.select([sock], [], [], pause)[0]:
                try:
                    if sock.recv(4096) == b"":
                        return time.monotonic() - start
                except ConnectionResetError:
                    return time.monotonic() - start
            try:
                sock.sendall(b"x")
            except OSError:
                return time.monotonic() - start
    return None


def test_idle_connections_time_out_and_workers_are_bounded(model):
    seen = set()

    def slow_reward(prompts, responses):
        seen.add(threading.get_ident())
        time.sleep(0.05)
        return torch.zeros(len(prompts))

    server, _ = fastalign.serve.start(target=model, reward=slow_reward,
                                      limits=Limits(idle_timeout=0.5, request_timeout=0.5, max_workers=2))
    try:
        idle = [socket.create_connection(("127.0.0.1", server.server_port), timeout=10) for _ in range(3)]
        start = time.monotonic()
        for sock in idle:
            assert sock.recv(1) == b""  # closed by the server after its idle timeout
            sock.close()
        assert time.monotonic() - start < 5
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:  # a body that stalls
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{}")
            assert sock.recv(1) == b""
        status, _ = request(server, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 1})
        assert status == 200
        with ThreadPoolExecutor(6) as pool:
            pair = {"prompts": [[1]], "responses": [[2]]}
            answers = list(pool.map(lambda _: request(server, "POST", "/reward", pair), range(6)))
        assert all(status == 200 for status, _ in answers) and 1 <= len(seen) <= 2  # two worker threads
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("head", [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                                  b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n"])
def test_a_request_has_one_deadline_for_its_headers_and_body(model, head):
    """A client sending a byte every 0.1 s (well within the idle timeout) is dropped once its request has taken
    ``request_timeout`` seconds, in the headers or in the body."""
    server, _ = fastalign.serve.start(target=model, limits=Limits(idle_timeout=5, request_timeout=0.5))
    try:
        closed_after = trickle(server.server_port, head, pause=0.1, steps=30)
        assert closed_after is not None and closed_after < 1.5, closed_after
    finally:
        server.shutdown()
        server.server_close()


SLOW_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n"


def test_slow_clients_do_not_block_health(model):
    """16 clients trickling their requests (as many as there are workers) leave /health answered at once."""
    server, _ = fastalign.serve.start(target=model, limits=Limits(idle_timeout=30, request_timeout=10))
    head = SLOW_HEAD
    try:
        with ThreadPoolExecutor(16) as pool:
            slow = [pool.submit(trickle, server.server_port, head, 0.2, 10) for _ in range(16)]
            time.sleep(0.5)
            start = time.monotonic()
            assert request(server, "GET", "/health", timeout=2) == (200, {"status": "ok"})
            assert time.monotonic() - start < 1
            assert [s.result() for s in slow] == [None] * 16  # still sending when they stopped
    finally:
        server.shutdown()
        server.server_close()


def test_idle_connections_make_room_and_a_full_server_answers_503(model):
    """With every connection taken, a new one closes the longest-idle keep-alive connection, or gets a 503 at
    once when none is idle."""
    server, _ = fastalign.serve.start(target=model, limits=Limits(idle_timeout=30, request_timeout=10,
                                                                  max_connections=3))
    head = SLOW_HEAD
    try:
        kept = [http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=5) for _ in range(3)]
        for conn in kept:  # three keep-alive connections, idle after one request each
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b'{"status": "ok"}'
            time.sleep(0.05)
        start = time.monotonic()
        status, _ = request(server, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 2}, timeout=3)
        assert status == 200 and time.monotonic() - start < 2
        assert kept[0].sock.recv(1) == b""  # the longest idle was closed to make room
        assert not select.select([kept[2].sock], [], [], 0.1)[0]  # the others are still open
        with ThreadPoolExecutor(3) as pool:  # three connections busy sending: the fourth gets a 503 at once
            slow = [pool.submit(trickle, server.server_port, head, 0.1, 10) for _ in range(3)]
            time.sleep(0.3)
            start = time.monotonic()
            assert "connections are busy" in error_of(request(server, "GET", "/health", timeout=3), 503)
            assert time.monotonic() - start < 1
            assert [s.result() for s in slow] == [None] * 3
        for conn in kept:
            conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_api_key(model):
    server, url = fastalign.serve.start(target=model, api_key="s3cret")
    try:
        body = {"prompt": [1], "max_tokens": 1}
        assert "API key" in error_of(request(server, "POST", "/v1/completions", body), 401)
        assert "API key" in error_of(request(server, "GET", "/v1/models"), 401)
        wrong = {"Authorization": "Bearer nope"}
        assert "API key" in error_of(request(server, "POST", "/v1/completions", body, wrong), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert request(server, "POST", "/v1/completions", body, good)[0] == 200
        assert request(server, "GET", "/health")[0] == 200
        from fastalign.models.remote import RemoteLM

        assert RemoteLM(url, api_key="s3cret").eos_token_ids == {V - 1}
    finally:
        server.shutdown()
        server.server_close()


def test_no_local_paths_at_v1_models(tmp_path, model):
    path = tmp_path / "secret-folder" / "my-model"
    model.save_pretrained(path)
    tiny_tokenizer(V).save_pretrained(path)
    server, _ = fastalign.serve.start(target=str(path), model_name=str(path))
    try:
        status, listed = request(server, "GET", "/v1/models")
        assert status == 200 and listed["data"][0]["id"] == "my-model"
        assert str(tmp_path) not in json.dumps(listed)
    finally:
        server.shutdown()
        server.server_close()
    assert fastalign.serve.public_model_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_non_loopback_address_warns(model):
    with pytest.warns(UserWarning, match="reachable from other machines: it has no TLS and no API key"):
        server = fastalign.serve.make_server(target=model, host="0.0.0.0")
    server.server_close()


def test_reward_server_checks_the_reward_models_vocabulary():
    reward = tiny_reward_model(vocab_size=V, hidden=16)
    server, _ = fastalign.serve.start(reward=reward)
    try:
        message = error_of(request(server, "POST", "/reward", {"prompts": [[1, V + 3]], "responses": [[1]]}), 400)
        assert f"token id {V + 3} is outside the vocabulary of the reward model" in message
        status, out = request(server, "POST", "/reward", {"prompts": [[1, 2]], "responses": [[3]]})
        assert status == 200 and len(out["rewards"]) == 1
        message = error_of(request(server, "POST", "/reward", {"prompts": [[1, 2]], "responses": [[3]],
                                                               "normalize": True}), 400)
        assert "/reward takes only prompts and responses; it does not support: normalize" in message
    finally:
        server.shutdown()
        server.server_close()


def _json_values():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.integers(), st.floats(),
                        st.text(max_size=4))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=10)


def test_fuzzed_requests_get_200_or_a_4xx_json_error(server):
    """Random JSON bodies (and fields of the right names with random values): never a dropped connection,
    never a 5xx."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = _json_values()
    ids = st.lists(st.integers(0, V - 1), min_size=1, max_size=4)
    good_fields = {
        "/v1/completions": {"prompt": st.one_of(ids, st.lists(ids, min_size=1, max_size=3)),
                            "max_tokens": st.integers(0, 4), "temperature": st.floats(0, 2),
                            "top_k": st.integers(-1, 10), "top_p": st.floats(0.1, 1), "seed": st.integers(0, 99),
                            "logprobs": st.integers(0, 1), "return_tokens_as_token_ids": st.booleans()},
        "/reward": {"prompts": st.lists(ids, min_size=2, max_size=2),
                    "responses": st.lists(st.lists(st.integers(0, V - 1), max_size=3), min_size=2, max_size=2)},
    }

    @st.composite
    def requests(draw):
        """A good request, or one with a field made odd (or dropped), or any JSON value at all."""
        path = draw(st.sampled_from(sorted(good_fields)))
        fields = good_fields[path]
        body = {name: draw(strategy) for name, strategy in fields.items() if draw(st.booleans()) or name in
                ("prompt", "prompts", "responses", "max_tokens")}
        odd = draw(st.sampled_from(["none", "field", "drop", "body"]))
        if odd == "field":
            body[draw(st.sampled_from(sorted(fields)))] = draw(values)
        elif odd == "drop":
            body.pop(draw(st.sampled_from(sorted(body))), None)
        elif odd == "body":
            body = draw(values)
        return path, body

    @settings(max_examples=120, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(call=requests())
    def check(call):
        path, body = call
        status, payload = request(server, "POST", path, body)
        assert status == 200 or (400 <= status < 500 and payload["error"]["code"] == status), (body, payload)

    check()


@pytest.mark.parametrize("flag, value, message", [
    ("--port", "99999", "expected a port number from 0 to 65535, got 99999"),  # was bound modulo 65536
    ("--port", "-1", "expected a port number from 0 to 65535, got -1"),
    ("--max-tokens", "0", "expected a positive integer, got 0"),  # was 'no cap'
    ("--max-tokens", "-5", "expected a positive integer, got -5"),
    ("--max-prompts", "0", "expected a positive integer, got 0"),  # refused every list of prompts
    ("--idle-timeout", "nan", "expected a finite number > 0, got nan"),
])
def test_bad_limits_are_refused_before_anything_loads(flag, value, message, capsys, monkeypatch):
    monkeypatch.setattr(fastalign.serve, "Engine", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        fastalign.serve.main(["--target", "anything", flag, value])
    assert exit_.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("limits", [dict(max_tokens=0), dict(max_prompts=0), dict(max_body_bytes=0),
                                    dict(max_reward_rows=-1), dict(max_workers=0)])
def test_bad_limits_are_refused_through_the_python_api_too(limits, monkeypatch):
    """The same minimums as the command line's, in one place: Limits(max_tokens=0) would answer every request
    of the default 16 tokens with a 400."""
    monkeypatch.setattr(fastalign.serve, "Engine", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(fastalign.InputError, match=next(iter(limits))):
        fastalign.serve.make_server(target="anything", limits=Limits(**limits))
