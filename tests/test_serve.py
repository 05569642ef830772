"""The bundled server (``python -m fastalign.serve``) over real HTTP on 127.0.0.1: every bad request gets a 4xx
JSON error, work per request is capped, idle sockets time out, workers are bounded, keys and paths are kept."""

import http.client
import json
import socket
import time

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


def request(server, method, path, body=None, headers=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
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
    ("/v1/completions", {"prompt": [1, 2], "n": 2}, "n > 1 are not supported"),
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


def test_json_nan_and_bad_json(server):
    message = error_of(request(server, "POST", "/v1/completions", raw=b'{"prompt": [1], "temperature": NaN}'), 400)
    assert "temperature must be a finite number, got nan" in message
    assert "not valid JSON" in error_of(request(server, "POST", "/v1/completions", raw=b"{oops"), 400)
    assert "not valid JSON" in error_of(request(server, "POST", "/v1/completions", raw=b"\xff\xfe"), 400)


def test_max_tokens_zero_is_honoured_and_good_requests_work(server, model):
    status, out = request(server, "POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 0})
    assert status == 200 and out["choices"][0]["token_ids"] == [] and out["usage"]["completion_tokens"] == 0
    status, out = request(server, "POST", "/v1/completions", {"prompt": [1, 2], "max_tokens": 3, "seed": 4})
    local = fastalign.decode([[1, 2]], target=model, max_new_tokens=3, temperature=1.0, seed=4)
    assert status == 200 and out["choices"][0]["token_ids"] == local.sequences[0]
    status, out = request(server, "POST", "/reward", {"prompts": [[1], [2]], "responses": [[], [3, 4]]})
    assert status == 200 and out["rewards"] == [0.0, 2.0]


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


def test_idle_connections_time_out_and_workers_are_bounded(model):
    server, _ = fastalign.serve.start(target=model, limits=Limits(idle_timeout=0.5, max_workers=2))
    try:
        idle = [socket.create_connection(("127.0.0.1", server.server_port), timeout=10) for _ in range(3)]
        deadline = time.monotonic() + 5
        while server._slots._value and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server._slots._value == 0  # two workers hold the first two; the third waits in the queue
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
