"""Remote backends without vLLM: the whole-response methods against fastalign.serve, and the client's protocol,
server pool, retries and failures against small in-process stub servers (tests/integration/test_vllm.py runs
the same clients against a real vLLM)."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import fastalign
import fastalign.serve
from fastalign.models.remote import RemoteError, RemoteLM, RemoteReward, row_seed
from fastalign.models.reward import RewardModel
from fastalign.testing import serving, tiny_causal_lm, tiny_reward_model

V, EOS = 6, 5


def last_token_reward(y) -> float:
    return 1.5 * (tuple(y[-1:]) == (1,)) - 1.0 * (tuple(y[-1:]) == (3,))


def reward_fn(prompts, responses):
    return torch.tensor([last_token_reward(y) for y in responses])


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=V, hidden=16, init_range=0.25)


@pytest.fixture(scope="module")
def server(model):
    with serving(model, reward_fn) as url:
        yield url


class Stub:
    """An in-process HTTP server answering POST/GET with ``handle(path, body) -> (status, answer)``, recording
    the requests; ``handle`` may sleep or return ``None`` to drop the connection without an answer."""

    def __init__(self, handle):
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body):
                stub.requests.append((self.path, body))
                result = handle(self.path, body)
                if result is None:
                    self.close_connection = True
                    return
                status, answer = result
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._answer(None)

            def do_POST(self):  # noqa: N802
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def vllm_like(path, body, stop_token=None):
    """Answers as vLLM does: models without EOS ids, ``n`` choices with seeds ``seed + j``, EOS kept."""
    if path == "/v1/models":
        return 200, {"object": "list", "data": [{"id": "m", "owned_by": "vllm", "max_model_len": 64}]}
    choices = []
    for j in range(body["n"]):
        tokens = [(body["seed"] + j) % 4 + 1, stop_token if stop_token is not None else EOS][: body["max_tokens"]]
        finish = "stop" if len(tokens) == 2 else "length"
        choices.append({"index": j, "token_ids": tokens, "finish_reason": finish, "text": ""})
    return 200, {"choices": choices[::-1]}  # any order: the client sorts by index


@pytest.fixture
def stubs():
    made = []

    def make(handle):
        made.append(Stub(handle))
        return made[-1]

    yield make
    for stub in made:
        stub.close()


def dead_url():
    """A loopback URL where nothing listens."""
    stub = Stub(vllm_like)
    url = stub.url
    stub.close()
    return url


# ------------------------------------------------------------------------ methods end to end
@pytest.mark.parametrize("method, options", [("sample", {}), ("bon", {"n": 4}), ("soft_bon", {"n": 3, "lam": 0.5}),
                                             ("rs", {"max_rejections": 3}), ("qalign", {"steps": 3, "chains": 2})])
def test_whole_response_methods_run_remotely_and_reproducibly(server, method, options):
    kwargs = dict(method=method, target=RemoteLM(server), reward=RemoteReward(server), max_new_tokens=3,
                  temperature=1.0, seed=3, **options)
    a = fastalign.decode([[1, 2], [3, 1, 4], [2]], **kwargs)
    b = fastalign.decode([[1, 2], [3, 1, 4], [2]], **kwargs)
    assert a.sequences == b.sequences and len(a.sequences) == 3
    for y in a.sequences:
        assert 1 <= len(y) <= 3 and EOS not in y[:-1] and (y[-1] == EOS or len(y) == 3)
    assert a.stats["target_calls"] > 0
    if method in ("bon", "soft_bon"):
        n = options["n"]
        assert a.extra["rewards"].shape == (3, n) and a.stats["target_calls"] == 3 * n  # one sample per request
        for b_, y in enumerate(a.sequences):
            assert a.extra["rewards"][b_, a.extra["chosen_index"][b_]] == last_token_reward(y)
        if method == "bon":
            assert all(last_token_reward(y) == a.extra["rewards"][b_].max() for b_, y in enumerate(a.sequences))


def test_bon_candidates_are_the_seeded_samples_of_each_prompt(server, model):
    lm = RemoteLM(server)
    out = fastalign.decode([[1, 2], [4]], method="bon", target=lm, reward=reward_fn, n=3, max_new_tokens=3, seed=8)
    # the round's request seed of prompt b: the first draw of its own "request" stream
    seeds = fastalign.methods.base.Randomness(8, 2).request_seeds([0, 1], "request")
    # sample j of prompt b is the server's sample with seed seeds[b] + j, as vLLM seeds n samples
    for b, prompt in enumerate([[1, 2], [4]]):
        for j in range(3):
            alone = lm.complete([prompt], [3], seed=seeds[b] + j)[0]
            assert out.extra["rewards"][b, j] == last_token_reward(alone)


def test_a_remote_target_with_a_local_reward_model(server):
    rm = tiny_reward_model(vocab_size=V, hidden=16)
    out = fastalign.decode([[1, 2], [3]], method="bon", target=RemoteLM(server), reward=rm, n=3, max_new_tokens=3,
                           seed=2)
    assert torch.allclose(out.extra["rewards"].max(1).values, RewardModel(rm).score([[1, 2], [3]], out.sequences))


def test_sample_law_through_the_server_is_the_models(server, model):
    from fastalign.testing import empirical_law, enumerate_law, next_token_probs, total_variation

    prompt, copies = [2, 3], 800
    out = fastalign.decode([prompt] * copies, method="sample", target=RemoteLM(server), max_new_tokens=2, seed=5)
    law = enumerate_law(lambda t: next_token_probs(model, t), prompt, 2, {EOS})
    assert total_variation(empirical_law(out.sequences), law) < 0.1


# ------------------------------------------------------------------------------- protocol
def test_requests_carry_every_sampling_knob_and_n(stubs):
    stub = stubs(vllm_like)
    lm = RemoteLM(stub.url + "/v1", eos_token_ids=[EOS])
    got = lm.complete([[1], [2, 3]], [4, 1], temperature=0.5, top_k=3, seed=10, n=2)
    s0, s1 = row_seed(10, 0), row_seed(10, 1)
    assert got == [[s0 % 4 + 1, EOS], [(s0 + 1) % 4 + 1, EOS], [s1 % 4 + 1], [(s1 + 1) % 4 + 1]]
    bodies = [b for p, b in stub.requests if p == "/v1/completions"]
    assert len(bodies) == 2 and all(b["n"] == 2 for b in bodies)  # n samples per request on vLLM
    body = bodies[0] if bodies[0]["prompt"] == [1] else bodies[1]
    assert body["seed"] == s0 and body["temperature"] == 0.5 and body["top_k"] == 3 and body["top_p"] == 1.0
    assert body["stop_token_ids"] == [EOS] and body["min_p"] == 0.0 and body["repetition_penalty"] == 1.0
    assert body["return_token_ids"] and not body["ignore_eos"]
    assert lm.counters.calls == 2 and lm.counters.tokens == 2 * 1 + 2 * 2 + 6


def test_stop_token_ids_end_a_segment_like_eos(stubs):
    """A segment's delimiters go with the EOS ids as stop_token_ids; a stop at one of them is kept and ends it."""
    stub = stubs(lambda p, b: vllm_like(p, b, stop_token=2))
    lm = RemoteLM(stub.url, eos_token_ids=[EOS])
    assert lm.complete([[1]], [4], seed=3, stop_token_ids=[2, 0]) == [[3 % 4 + 1, 2]]
    body = [b for p, b in stub.requests if p == "/v1/completions"][0]
    assert body["stop_token_ids"] == [0, 2, EOS]


def test_vllm_needs_eos_ids_and_a_stop_at_another_token_is_an_error(stubs):
    with pytest.raises(fastalign.InputError, match="eos_token_ids"):
        RemoteLM(stubs(vllm_like).url)
    lm = RemoteLM(stubs(lambda p, b: vllm_like(p, b, stop_token=2)).url, eos_token_ids=[EOS])
    with pytest.raises(RemoteError, match="not at an EOS or stop token of this client"):
        lm.complete([[1]], [4])
    no_ids = stubs(lambda p, b: vllm_like(p, b) if p == "/v1/models" else (200, {"choices": [{"index": 0}]}))
    with pytest.raises(RemoteError, match="return_token_ids"):
        RemoteLM(no_ids.url, eos_token_ids=[EOS]).complete([[1]], [4])


def answering(choice):
    """A vLLM-like stub whose completions answer ``choice`` (a dict, or any JSON) for every sample."""
    return lambda p, b: vllm_like(p, b) if p == "/v1/models" else (200, {"choices": [choice] * b["n"]})


@pytest.mark.parametrize("choice", [{"token_ids": [], "finish_reason": "length"}, {"token_ids": [1]},
                                    {"token_ids": [1], "finish_reason": "abort"}])
def test_a_response_that_ends_short_of_max_tokens_without_eos_is_an_error(stubs, choice):
    """A short answer with no EOS was accepted unless its finish reason said "stop": sample returned it as a
    finished response, and smc and speculative_rejection asked again forever (thousands of requests a second)."""
    lm = RemoteLM(stubs(answering(choice)).url, eos_token_ids=[EOS])
    with pytest.raises(RemoteError, match=f"ended a response after {len(choice['token_ids'])} tokens, not at an EOS"):
        lm.complete([[1]], [4])
    for method, options in [("smc", {"particles": 2, "segment_tokens": 2}),
                            ("speculative_rejection", {"n": 2, "round_tokens": 2})]:
        errors = []

        def run():
            try:
                fastalign.decode([[1, 2]], method=method, target=lm, reward=reward_fn, max_new_tokens=4, **options)
            except RemoteError as e:
                errors.append(e)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive() and len(errors) == 1, method


@pytest.mark.parametrize("choices", [["oops"], {"0": {}}, [{"index": "0", "token_ids": [1, 5]}],
                                     [{"token_ids": ["a"]}], [{"token_ids": 7}],
                                     [{"token_ids": "123"}], [{"token_ids": [1.7, 5]}], [{"token_ids": [True]}],
                                     [{"token_ids": [-1, 5]}]])
def test_a_malformed_completion_is_a_remote_error(stubs, choices):
    """Raw AttributeError, ValueError and TypeError came out of these answers; "123" became [1, 2, 3], floats
    were cut to ints and -1 reached the reward model as an IndexError."""
    stub = stubs(lambda p, b: vllm_like(p, b) if p == "/v1/models" else (200, {"choices": choices}))
    with pytest.raises(RemoteError, match="the server's (choices is not a list of objects|token_ids are not a list)"):
        RemoteLM(stub.url, eos_token_ids=[EOS]).complete([[1]], [4])


@pytest.mark.parametrize("eos", ["12", [2.7], [True], [-1]])
def test_malformed_eos_ids_are_refused(stubs, eos):
    """"12" became {1, 2}, [2.7] {2} and [True] {1}, from the server's model list or from the caller."""
    listing = stubs(lambda p, b: (200, {"data": [{"id": "m", "eos_token_ids": eos}]}))
    with pytest.raises(RemoteError, match="the EOS token ids .* lists are not a list of token ids"):
        RemoteLM(listing.url)
    with pytest.raises(fastalign.InputError, match="eos_token_ids must be a token id or a list of them"):
        RemoteLM(stubs(vllm_like).url, eos_token_ids=eos)


@pytest.mark.parametrize("answer", [{"data": [{"index": 0, "probs": "9"}]}, {"data": [{"index": 0, "probs": [True]}]},
                                    {"data": "ab"}, {"data": ["a"]}, {"data": [{"index": "0", "probs": [1.0]}]}])
def test_malformed_vllm_scores_are_refused(stubs, answer):
    stub = stubs(lambda p, b: vllm_like(p, b) if p == "/v1/models" else (200, answer))
    with pytest.raises(RemoteError, match="(one score \\(a number\\) per pair|not a list of objects)"):
        RemoteReward(stub.url, api="vllm")([[1]], [[2]])


@pytest.mark.parametrize("rewards", ["1", [True], ["a"], [1.0, 2.0]])
def test_malformed_fastalign_rewards_are_refused(stubs, rewards):
    stub = stubs(lambda p, b: (200, {"data": [{"id": "m", "owned_by": "fastalign"}]}) if p == "/v1/models"
                 else (200, {"rewards": rewards}))
    with pytest.raises(RemoteError, match="one score \\(a number\\) per pair"):
        RemoteReward(stub.url, api="fastalign")([[1]], [[2]])


@pytest.mark.parametrize("listed", [{"data": [{"owned_by": "x"}]}, {"data": {"id": "m"}}, {"data": ["m"]}, ["m"]])
def test_a_malformed_model_list_is_a_remote_error(stubs, listed):
    stub = stubs(lambda p, b: (200, listed))
    with pytest.raises(RemoteError, match="(model list without ids|not a JSON object)"):
        RemoteLM(stub.url, eos_token_ids=[EOS])


@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_max_concurrency_and_retries_are_checked(server, value):
    with pytest.raises(fastalign.InputError, match="max_concurrency must be an integer"):
        RemoteLM(server, max_concurrency=value)
    with pytest.raises(fastalign.InputError, match="max_concurrency must be an integer"):
        RemoteReward(server, max_concurrency=value)
    with pytest.raises(fastalign.InputError, match="batch_size must be an integer"):
        RemoteReward(server, batch_size=value)
    if value is True:
        with pytest.raises(fastalign.InputError, match="retries must be an integer >= 0"):
            RemoteLM(server, retries=value)


def test_vllm_rewards_read_the_raw_score_of_prompt_plus_response(stubs):
    def classify(path, body):
        if path == "/v1/models":
            return 200, {"data": [{"id": "rm", "owned_by": "vllm"}]}
        return 200, {"data": [{"index": i, "probs": [float(sum(x))], "num_classes": 1}
                              for i, x in enumerate(body["input"])][::-1]}

    stub = stubs(classify)
    reward = RemoteReward(stub.url, batch_size=2)
    got = reward([[1, 2], [3], [4]], [[5], [1, 1], []])
    assert got.tolist() == [8.0, 5.0, 4.0] and got.dtype == torch.float32
    bodies = [b for p, b in stub.requests if p == "/classify"]
    assert len(bodies) == 2 and all(b["model"] == "rm" and b["use_activation"] is False for b in bodies)
    assert sorted(map(len, (b["input"] for b in bodies))) == [1, 2]


def stub_prm_logits(token: int, position: int) -> list[float]:
    """The (bad, good) logits a stub PRM gives a token at a position: distinct everywhere."""
    return [0.1 * token, 0.3 * position - 0.2 * token]


def test_vllm_process_rewards_read_p_good_at_the_last_token(stubs):
    def pooling(path, body):
        if path == "/v1/models":
            return 200, {"data": [{"id": "prm", "owned_by": "vllm"}]}
        return 200, {"data": [{"index": i, "object": "pooling",
                               "data": [stub_prm_logits(t, k) for k, t in enumerate(row)]}
                              for i, row in enumerate(body["input"])][::-1]}

    stub = stubs(pooling)
    reward = RemoteReward(stub.url, batch_size=2, process=True)
    prompts, responses = [[1, 2], [3], [4]], [[5], [1, 1], []]
    got = reward(prompts, responses)
    want = [torch.softmax(torch.tensor(stub_prm_logits(row[-1], len(row) - 1)), -1)[1]
            for row in (p + r for p, r in zip(prompts, responses))]
    assert got.dtype == torch.float32 and torch.allclose(got, torch.stack(want), atol=1e-6)
    assert len(set(got.tolist())) == 3 and all(0 < x < 1 for x in got.tolist())
    bodies = [b for p, b in stub.requests if p == "/pooling"]
    assert len(bodies) == 2 and not any(p == "/classify" for p, _ in stub.requests)
    assert all(b["model"] == "prm" and b["task"] == "token_classify" and b["use_activation"] is False
               for b in bodies)
    assert sorted(row for b in bodies for row in b["input"]) == [[1, 2, 5], [3, 1, 1], [4]]


def test_vllm_process_reward_failures_are_named(stubs):
    def one_label(path, body):  # a server whose model has 1 label (not a PRM)
        if path == "/v1/models":
            return 200, {"data": [{"id": "rm", "owned_by": "vllm"}]}
        return 200, {"data": [{"index": i, "data": [[0.5]] * len(row)} for i, row in enumerate(body["input"])]}

    with pytest.raises(RemoteError, match="2 logits"):
        RemoteReward(stubs(one_label).url, process=True)([[1]], [[2]])

    def token_classifier(path, body):  # vLLM serving a token-classification model, asked for /classify
        if path == "/v1/models":
            return 200, {"data": [{"id": "prm", "owned_by": "vllm"}]}
        return 501, {"error": {"message": "The model does not support Classification API", "code": 501}}

    with pytest.raises(RemoteError, match="process=True"):
        RemoteReward(stubs(token_classifier).url)([[1]], [[2]])
    with pytest.raises(fastalign.InputError, match="process must be"):
        RemoteReward("http://127.0.0.1:1", process="yes")
    with pytest.raises(fastalign.InputError, match="needs one"):
        RemoteReward("http://127.0.0.1:1", process=True)([[]], [[]])


# ------------------------------------------------------------------------- pool and failures
def test_a_pool_spreads_requests_and_fails_over(stubs):
    a, b = stubs(vllm_like), stubs(vllm_like)
    dead = dead_url()
    lm = RemoteLM([a.url, dead, b.url], eos_token_ids=[EOS], backoff=0.01)
    got = lm.complete([[1]] * 30, [2] * 30, seed=4)
    assert got == RemoteLM(a.url, eos_token_ids=[EOS]).complete([[1]] * 30, [2] * 30, seed=4)  # same seeds
    answered = lm.pool.answered
    assert answered[a.url] >= 10 and answered[b.url] >= 10 and answered[a.url] + answered[b.url] == 31
    # a failed server is tried last afterwards: round-robin alone would send it about 10 of the 30 requests
    assert 1 <= lm.pool._failures[dead] < 5


def test_failures_are_retried_with_backoff_then_named(stubs):
    calls = []

    def flaky(path, body):
        calls.append(time.monotonic())
        return (503, {"error": "warming up"}) if len(calls) <= 2 else vllm_like(path, body)

    lm = RemoteLM(stubs(flaky).url, eos_token_ids=[EOS], backoff=0.05)  # /v1/models fails twice, then works
    assert len(calls) == 3 and calls[2] - calls[1] >= 0.1 - 0.01  # waited backoff * 2 before the third try
    assert lm.complete([[1]], [2], seed=0) == [[1, EOS]]

    dead = [dead_url(), dead_url()]
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        RemoteReward(dead, api="fastalign", retries=2, backoff=0.01)([[1, 2]], [[3]])
    message = str(info.value)
    assert time.monotonic() - start < 5 and "reward request for pairs 0..0" in message
    assert all(url in message for url in dead) and "6 times" in message and "cannot reach" in message

    bad = RemoteLM(stubs(lambda p, b: vllm_like(p, b) if p == "/v1/models" else (400, {"error": "bad"})).url,
                   eos_token_ids=[EOS], backoff=0.01)
    with pytest.raises(RemoteError, match=r"prompt 0 .*seed 7.* answered HTTP 400"):
        bad.complete([[1]], [2], seed=7)  # a 4xx is the request's fault: not retried
    assert sum(bad.pool.answered.values()) == 1  # the model listing only


def test_no_answer_is_a_timeout_not_a_hang(stubs):
    def hang(path, body):
        if path == "/v1/models":
            return vllm_like(path, body)
        time.sleep(3)
        return None

    lm = RemoteLM(stubs(hang).url, eos_token_ids=[EOS], timeout=0.3, retries=1, backoff=0.01)
    start = time.monotonic()
    with pytest.raises(RemoteError, match="no answer within 0.3 s"):
        lm.complete([[1], [2]], [2, 2])
    assert time.monotonic() - start < 2.5

    dropped = RemoteLM(stubs(lambda p, b: vllm_like(p, b) if p == "/v1/models" else None).url, eos_token_ids=[EOS],
                       retries=0)
    with pytest.raises(RemoteError, match="connection failed|cannot reach") as info:
        dropped.complete([[1], [2]], [2, 2])
    assert info.value.completed == [None, None]


def test_qalign_keeps_its_completed_steps_when_the_reward_server_fails(model, stubs):
    answered = []

    def reward_server(path, body):
        answered.append(path)
        if len(answered) > 5:  # prompts, step 0, steps 1..3, then the server is gone
            return 503, {"error": "gone"}
        return 200, {"rewards": [last_token_reward(y) for y in body["responses"]]}

    kwargs = dict(method="qalign", target=model, max_new_tokens=3, steps=6, chains=2, seed=21)
    remote = RemoteReward(stubs(reward_server).url, api="fastalign", retries=1, backoff=0.01)
    with pytest.raises(RemoteError) as info:
        fastalign.decode([[1, 2], [3]], reward=remote, **kwargs)
    partial = info.value.partial
    assert partial is not None and partial.extra["completed_steps"] == 3
    full = fastalign.decode([[1, 2], [3]], reward=reward_fn, **kwargs)  # same seed, a local reward
    for b in range(2):
        for c in range(2):
            assert partial.extra["state_path"][b][c] == full.extra["state_path"][b][c][:4]
        assert partial.sequences[b] == partial.extra["final_states"][b][0]


@pytest.mark.parametrize("method, options", [("cards", {"max_rejections": 2}), ("args", {"k": 3})])
def test_a_remote_reward_serves_the_logits_methods_with_a_local_target(server, model, method, options):
    """A RemoteReward is a callable reward: with a local target, cards and args give the tokens of the same
    reward computed locally."""
    kwargs = dict(method=method, target=model, max_new_tokens=3, seed=5, **options)
    remote = fastalign.decode([[1, 2], [3]], reward=RemoteReward(server), **kwargs)
    local = fastalign.decode([[1, 2], [3]], reward=reward_fn, **kwargs)
    assert remote.sequences == local.sequences and remote.stats["reward_calls"] > 0


def test_a_server_that_accepts_and_never_answers_fails_on_the_read_timeout():
    """A frozen server (the kernel accepts, nothing ever answers) stalls a try for ``timeout`` seconds only, however
    long the connect timeout."""
    with socket.create_server(("127.0.0.1", 0), backlog=8) as frozen:
        url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RemoteError, match="no answer within 0.3 s"):
            RemoteLM(url, eos_token_ids=[EOS], timeout=0.3, connect_timeout=30, retries=0)
        assert time.monotonic() - start < 2


def test_a_connect_that_hangs_fails_on_the_connect_timeout():
    """A listen queue that is full drops the connect (nothing answers it): the try ends after ``connect_timeout``,
    not the read ``timeout``; a refused connect fails at once."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        address = full.getsockname()
        held = []
        for _ in range(8):  # fill the queue until a connect hangs (Linux holds backlog + 1)
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(address)
                held.append(probe)
            except TimeoutError:
                probe.close()
                break
        else:
            pytest.skip("this system never lets a loopback connect hang")
        try:
            start = time.monotonic()
            with pytest.raises(RemoteError, match=r"timed out \(connect_timeout 0.3 s"):
                RemoteReward(f"http://127.0.0.1:{address[1]}", api="fastalign", timeout=30, connect_timeout=0.3,
                             retries=0)([[1]], [[2]])
            assert time.monotonic() - start < 2
        finally:
            for sock in held:
                sock.close()
    start = time.monotonic()
    with pytest.raises(RemoteError, match="cannot reach the server: .*refused"):
        RemoteReward(dead_url(), api="fastalign", timeout=30, connect_timeout=30, retries=0)([[1]], [[2]])
    assert time.monotonic() - start < 2


def test_a_memory_budget_is_refused_with_a_remote_target(server):
    """speculative_rejection's max_live_tokens bounds the local cache; the server holds remote candidates."""
    with pytest.raises(fastalign.InputError, match="max_live_tokens bounds the candidates' tokens in the local"):
        fastalign.decode([[1, 2]], method="speculative_rejection", target=RemoteLM(server),
                         reward=RemoteReward(server), n=4, max_live_tokens=8, max_new_tokens=3, seed=0)


def test_a_local_reward_model_with_fewer_token_ids_than_a_remote_target_is_an_input_error():
    """The engine compares vocabularies with a local target only; with a served one, ids past the reward model's
    embedding table raised a raw IndexError inside it."""
    with serving(tiny_causal_lm(vocab_size=12, hidden=16, init_range=0.25)) as url:
        with pytest.raises(fastalign.InputError, match="vocabularies differ: the reward model embeds 6 token ids"):
            for seed in range(5):  # some seed draws an id >= 6 within 8 tokens
                fastalign.decode([[1, 2]], method="bon", n=2, target=RemoteLM(url), max_new_tokens=8, seed=seed,
                                 reward=tiny_reward_model(vocab_size=6))


@pytest.mark.parametrize("url", ["not a url", "127.0.0.1:8000", "ftp://host/v1", "http://"])
def test_a_malformed_base_url_is_an_input_error(url):
    """urllib raised a bare ValueError ("unknown url type") at the first request."""
    with pytest.raises(fastalign.InputError, match="a server base URL must look like http://HOST:PORT"):
        RemoteLM(url, retries=0)
