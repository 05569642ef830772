"""The remote backends against a real vLLM server (marker ``vllm``: ``pytest -m vllm`` runs these alone,
``-m 'not vllm'`` leaves them out).

The session fixtures build the vLLM environment when it is missing (``scripts/setup_vllm.sh``, a separate
``.venv-vllm``; the tests skip when it cannot be built, or fail when ``FASTALIGN_REQUIRE_VLLM=1``), save a
tiny random Llama policy and a tiny Llama reward model (head size 64: what vLLM's CPU attention takes), start
one vLLM server for each on free loopback ports, wait for them (``FASTALIGN_VLLM_START_TIMEOUT``, default
600 s) and always stop them. The last test kills the policy's server.
"""

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

import fastalign
from fastalign.models.reward import RewardModel
from fastalign.models.remote import RemoteError, RemoteLM, RemoteReward, eos_token_ids_of
from fastalign.testing import (
    VllmServer,
    empirical_law,
    enumerate_law,
    free_port,
    next_token_probs,
    qalign_exact_laws,
    tiny_causal_lm,
    tiny_process_reward_model,
    tiny_reward_model,
    tiny_tokenizer,
    total_variation,
)

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
V, EOS = 6, 5
SIZE = dict(vocab_size=V, hidden=128, heads=2, layers=2, context=128)  # head size 64
PROMPTS = [[1, 2], [3, 1, 4], [2]]


def report(request, line: str) -> None:
    """A line in pytest's output (uncaptured): how long the environment and the servers took."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[vllm] {line}")


@pytest.fixture(scope="session")
def vllm_python(request):
    venv = os.environ.get("FASTALIGN_VLLM_VENV", str(ROOT / ".venv-vllm"))
    start = time.monotonic()
    build = subprocess.run(["bash", str(ROOT / "scripts" / "setup_vllm.sh")], capture_output=True, text=True,
                           env={**os.environ, "FASTALIGN_VLLM_VENV": venv}, timeout=3600)
    if build.returncode != 0:
        message = (f"the vLLM environment cannot be built (scripts/setup_vllm.sh exited {build.returncode}):\n"
                   f"{build.stdout[-2000:]}{build.stderr[-2000:]}")
        if os.environ.get("FASTALIGN_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    report(request, f"{build.stdout.strip().splitlines()[-1]} ({time.monotonic() - start:.0f} s)")
    return os.path.join(venv, "bin", "python")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The policy, the reward model and a process reward model, in memory and saved (with a tokenizer) for vLLM."""
    root = tmp_path_factory.mktemp("vllm-models")
    policy = tiny_causal_lm(init_range=0.1, **SIZE)
    reward = tiny_reward_model(**SIZE)
    prm = tiny_process_reward_model(seed=2, **SIZE)
    for name, model in (("policy", policy), ("reward", reward), ("prm", prm)):
        model.save_pretrained(root / name)
        tiny_tokenizer(V).save_pretrained(root / name)
    return {"policy": policy, "reward": reward, "prm": prm, "policy_dir": str(root / "policy"),
            "reward_dir": str(root / "reward"), "prm_dir": str(root / "prm")}


@pytest.fixture(scope="module")
def servers(request, vllm_python, models):
    """One vLLM server for the policy, one for the reward model, started together; always stopped."""
    timeout = float(os.environ.get("FASTALIGN_VLLM_START_TIMEOUT", "600"))
    policy = VllmServer(vllm_python, models["policy_dir"])
    reward = VllmServer(vllm_python, models["reward_dir"], args=["--runner", "pooling", "--convert", "classify"])
    start = time.monotonic()
    try:
        for server in (policy, reward):
            server.start()
        for server in (policy, reward):
            server.wait_ready(timeout)
        report(request, f"policy and reward servers ready in {time.monotonic() - start:.0f} s")
        yield {"policy": policy, "reward": reward}
    finally:
        for server in (policy, reward):
            server.stop()


@pytest.fixture(scope="module")
def prm_server(request, vllm_python, models):
    """vLLM's pooling runner serving the process reward model (a 2-label LlamaForTokenClassification), started by
    the first test that needs it; always stopped."""
    start = time.monotonic()
    server = VllmServer(vllm_python, models["prm_dir"], args=["--runner", "pooling"])
    try:
        server.start().wait_ready(float(os.environ.get("FASTALIGN_VLLM_START_TIMEOUT", "600")))
        report(request, f"process reward server ready in {time.monotonic() - start:.0f} s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def target(servers, models):
    return RemoteLM(servers["policy"].url, eos_token_ids=eos_token_ids_of(models["policy_dir"]))


@pytest.fixture(scope="module")
def reward(servers):
    return RemoteReward(servers["reward"].url)


def check_response(y, max_new_tokens):
    assert 1 <= len(y) <= max_new_tokens and EOS not in y[:-1] and (y[-1] == EOS or len(y) == max_new_tokens)


# ------------------------------------------------------------------------------------------ methods
@pytest.mark.parametrize("method, options", [("sample", {}), ("bon", {"n": 4}), ("soft_bon", {"n": 4, "lam": 0.1}),
                                             ("rs", {"max_rejections": 4}), ("qalign", {"steps": 4, "chains": 2})])
def test_each_whole_response_method_runs_end_to_end(target, reward, models, method, options):
    kwargs = dict(method=method, target=target, reward=reward, max_new_tokens=6, temperature=1.0, seed=7, **options)
    out = fastalign.decode(PROMPTS, **kwargs)
    again = fastalign.decode(PROMPTS, **kwargs)
    assert out.sequences == again.sequences  # seeded requests: reproducible
    for y in out.sequences:
        check_response(y, 6)
    local_reward = RewardModel(models["reward"])
    if method in ("bon", "soft_bon"):
        assert out.stats["target_calls"] == len(PROMPTS)  # one request of n samples per prompt
        chosen = out.extra["rewards"][torch.arange(3), out.extra["chosen_index"]]
        assert torch.allclose(chosen, local_reward.score(PROMPTS, out.sequences), atol=1e-4)
    if method == "qalign":
        for b, chains in enumerate(out.extra["state_path"]):
            rewards = local_reward.score([PROMPTS[b]] * len(chains[0]), [e["proposal"] for e in chains[0]])
            assert torch.allclose(rewards, torch.tensor([e["reward"] for e in chains[0]]), atol=1e-4)


def test_speculative_rejection_runs_end_to_end_and_alpha_zero_is_bon(target, reward, models):
    """Rounds of seeded completion requests that continue each candidate's prefix: reproducible, candidates
    pruned, the output a finished candidate whose reward is the local model's; alpha=0 is vLLM bon token for
    token (the first round is bon's request: n samples per prompt with the prompt's seed)."""
    kwargs = dict(target=target, reward=reward, max_new_tokens=8, temperature=1.0, seed=5)
    out = fastalign.decode(PROMPTS, method="speculative_rejection", n=4, alpha=0.5, round_tokens=2, **kwargs)
    again = fastalign.decode(PROMPTS, method="speculative_rejection", n=4, alpha=0.5, round_tokens=2, **kwargs)
    assert out.sequences == again.sequences and out.extra["candidates"] == again.extra["candidates"]
    assert out.stats["candidates_pruned"] > 0 and out.stats["rejection_rounds"] > 0
    for y in out.sequences:
        check_response(y, 8)
    chosen = out.extra["rewards"][torch.arange(3), out.extra["chosen_index"]]
    assert torch.allclose(chosen, RewardModel(models["reward"]).score(PROMPTS, out.sequences), atol=1e-4)
    bon = fastalign.decode(PROMPTS, method="bon", n=4, **kwargs)
    sr = fastalign.decode(PROMPTS, method="speculative_rejection", n=4, alpha=0.0, round_tokens=2, **kwargs)
    assert sr.sequences == bon.sequences and sr.stats["target_calls"] == bon.stats["target_calls"] == len(PROMPTS)
    assert torch.equal(sr.extra["chosen_index"], bon.extra["chosen_index"])
    assert torch.allclose(sr.extra["rewards"], bon.extra["rewards"], atol=1e-5)


def test_smc_runs_end_to_end_with_delimited_segments(target, reward, models):
    """Each step a seeded request per particle that continues its prefix and stops at a delimiter (kept) or after
    segment_tokens; resampling in the client: reproducible, finished particles, rewards the local model's."""
    kwargs = dict(method="smc", target=target, reward=reward, max_new_tokens=8, temperature=1.0, seed=5,
                  particles=4, segment_tokens=3, delimiters=[1], ess_threshold=1.0)
    out = fastalign.decode(PROMPTS, **kwargs)
    again = fastalign.decode(PROMPTS, **kwargs)
    assert out.sequences == again.sequences and out.extra["particles"] == again.extra["particles"]
    assert torch.equal(out.extra["log_z"], again.extra["log_z"])
    assert out.stats["smc_steps"] > 1 and out.stats["smc_resamplings"] > 0
    for b, particles in enumerate(out.extra["particles"]):
        for y in particles:
            check_response(y, 8)
        local = RewardModel(models["reward"]).score([PROMPTS[b]] * 4, particles)
        assert torch.allclose(out.extra["rewards"][b], local, atol=1e-4)


def test_beam_runs_end_to_end_with_delimited_steps(target, reward, models):
    """Each step one request of width samples per live beam that continues its prefix and stops at a delimiter
    (kept) or after max_step_tokens; pruning in the client: reproducible, K finished beams per prompt, every
    step score the local reward model's on the prefix up to that step."""
    K, W, S, M, delims = 2, 3, 3, 8, [1]
    kwargs = dict(method="beam", target=target, reward=reward, max_new_tokens=M, temperature=1.0, seed=5,
                  beams=K, width=W, max_step_tokens=S, delimiters=delims)
    out = fastalign.decode(PROMPTS, **kwargs)
    again = fastalign.decode(PROMPTS, **kwargs)
    assert out.sequences == again.sequences and out.extra["finished"] == again.extra["finished"]
    assert out.stats["beam_steps"] > 1
    local = RewardModel(models["reward"])
    for b, finished in enumerate(out.extra["finished"]):
        assert len(finished) == K
        for f in finished:
            check_response(f["tokens"], M)
            prefixes, step = [], []
            for i, t in enumerate(f["tokens"]):  # the steps as the search cut them
                step.append(t)
                if t in delims or t == EOS or len(step) == S or i == len(f["tokens"]) - 1:
                    prefixes.append((prefixes[-1] if prefixes else []) + step)
                    step = []
            assert len(prefixes) == len(f["step_scores"])
            want = local.score([PROMPTS[b]] * len(prefixes), prefixes)
            assert torch.allclose(torch.tensor(f["step_scores"], dtype=torch.float64), want.double(), atol=1e-4)
        assert out.sequences[b] in [f["tokens"] for f in finished]


def test_many_long_seeded_prompts_at_once(target):
    """More prompt tokens than one engine step takes (2048 on CPU): seeded requests stay reproducible."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, EOS, (100,), generator=g).tolist() for _ in range(40)]
    first = target.complete(prompts, [8] * 40, seed=3, n=2)
    assert first == target.complete(prompts, [8] * 40, seed=3, n=2) and len(first) == 80
    for y in first:
        check_response(y, 8)


def test_methods_that_need_logits_ask_for_a_local_target(target, reward, models):
    for method in ("cards", "args", "sd", "sss"):
        with pytest.raises(fastalign.InputError, match="per-token logits, so a local target"):
            fastalign.decode(PROMPTS, method=method, target=target, reward=reward, draft=models["policy"],
                             ref=models["policy"])


# ------------------------------------------------------------------------------------------- laws
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 3, None), (1.3, None, 0.8)])
def test_vllm_samples_the_models_law(target, models, temperature, top_k, top_p):
    """Tempered and truncated as locally, stopping at EOS as locally: vLLM's responses follow the exact law."""
    prompt, copies = [3, 1, 4], 1000
    out = fastalign.decode([prompt] * copies, method="sample", target=target, max_new_tokens=2,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=11)
    law = enumerate_law(lambda t: next_token_probs(models["policy"], t, temperature, top_k, top_p), prompt, 2, {EOS})
    assert total_variation(empirical_law(out.sequences), law) < 0.08


def test_local_and_remote_qalign_follow_the_same_exact_law(target, reward, models):
    prompt, copies, steps, beta = [3, 1, 4], 1000, 4, 0.05
    local_reward = RewardModel(models["reward"])

    def reward_of(y):
        return float(local_reward.score([prompt], [list(y)])[0])

    p, stationary, after = qalign_exact_laws(lambda pre: next_token_probs(models["policy"], prompt + list(pre)),
                                             prompt, 2, {EOS}, reward_of, beta, steps)
    assert total_variation(p, after) > 0.2  # the chain moves far from the model's law in 4 steps
    kwargs = dict(method="qalign", max_new_tokens=2, steps=steps, beta=beta, seed=3)
    remote = fastalign.decode([prompt] * copies, target=target, reward=reward, **kwargs)
    local = fastalign.decode([prompt] * copies, target=models["policy"], reward=models["reward"], **kwargs)
    for out in (remote, local):
        seen = empirical_law(out.sequences)
        assert total_variation(seen, after) < 0.08 and total_variation(seen, p) > 0.15


def test_vllm_rewards_equal_local_rewards(reward, models):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (50,), generator=g)]
    responses = [torch.randint(0, V, (int(k),), generator=g).tolist() for k in torch.randint(0, 30, (50,), generator=g)]
    local = RewardModel(models["reward"]).score(prompts, responses)
    remote = reward(prompts, responses)
    assert remote.shape == (50,) and torch.allclose(remote, local, atol=1e-4, rtol=1e-4)
    assert local.std() > 0.01  # distinct pairs, distinct rewards: the comparison is not vacuous


# ------------------------------------------------------------------------- process reward (pooling runner)
def test_vllm_process_rewards_equal_local_prm_rewards(prm_server, models):
    """vLLM's pooling runner serves the PRM: P(good) at the last token of prompt + response, as a local
    RewardModel reads it (the empty response: the prompt's last token)."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (int(k),), generator=g).tolist() for k in torch.randint(1, 12, (50,), generator=g)]
    responses = [torch.randint(0, V, (int(k),), generator=g).tolist() for k in torch.randint(0, 30, (50,), generator=g)]
    local = RewardModel(models["prm"])
    assert local.process
    want = local.score(prompts, responses)
    got = RemoteReward(prm_server.url, process=True, batch_size=16)(prompts, responses)
    assert got.shape == (50,) and torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert want.std() > 0.01 and bool(((want > 0) & (want < 1)).all())  # distinct probabilities: not vacuous
    with pytest.raises(RemoteError, match="process=True"):  # /classify does not serve a token classifier
        RemoteReward(prm_server.url)(prompts[:1], responses[:1])


@pytest.mark.parametrize("method, options", [
    ("beam", dict(beams=2, width=3, max_step_tokens=3, delimiters=[1], aggregate="min")),
    ("smc", dict(particles=4, segment_tokens=3, delimiters=[1], ess_threshold=1.0)),
])
def test_step_methods_with_a_remote_prm_decode_as_with_the_local_prm(prm_server, models, method, options):
    """A local target with the PRM as the step reward, remote (vLLM) or local: the same tokens, and step
    scores / particle rewards equal to float tolerance."""
    kwargs = dict(method=method, target=models["policy"], max_new_tokens=8, temperature=1.0, seed=5, **options)
    remote_prm = RemoteReward(prm_server.url, process=True)
    remote = fastalign.decode(PROMPTS, reward=remote_prm, **kwargs)
    local = fastalign.decode(PROMPTS, reward=models["prm"], **kwargs)
    assert remote.sequences == local.sequences
    if method == "beam":
        assert [[f["tokens"] for f in fs] for fs in remote.extra["finished"]] == \
            [[f["tokens"] for f in fs] for fs in local.extra["finished"]]
        assert remote.stats["beam_steps"] > 1
        for r_fs, l_fs in zip(remote.extra["finished"], local.extra["finished"]):
            for r, l in zip(r_fs, l_fs):
                assert torch.allclose(torch.tensor(r["step_scores"]), torch.tensor(l["step_scores"]), atol=1e-5)
    else:
        assert remote.extra["particles"] == local.extra["particles"]
        assert remote.stats["smc_steps"] > 1 and remote.stats["smc_resamplings"] > 0
        assert torch.allclose(remote.extra["rewards"], local.extra["rewards"], atol=1e-5)
        assert torch.allclose(remote.extra["log_z"], local.extra["log_z"], atol=1e-4)


def test_beam_with_a_remote_target_and_a_remote_prm(target, prm_server, models):
    """Everything on vLLM: the steps from the policy's server, the step scores from the PRM's; the same beams
    as with the local PRM (the same seeded requests), every step score the local PRM's."""
    kwargs = dict(method="beam", target=target, max_new_tokens=8, temperature=1.0, seed=5, beams=2, width=3,
                  max_step_tokens=3, delimiters=[1])
    remote = fastalign.decode(PROMPTS, reward=RemoteReward(prm_server.url, process=True), **kwargs)
    local = fastalign.decode(PROMPTS, reward=models["prm"], **kwargs)
    assert remote.sequences == local.sequences and remote.stats["beam_steps"] > 1
    for r_fs, l_fs in zip(remote.extra["finished"], local.extra["finished"]):
        assert [f["tokens"] for f in r_fs] == [f["tokens"] for f in l_fs]
        for r, l in zip(r_fs, l_fs):
            assert torch.allclose(torch.tensor(r["step_scores"]), torch.tensor(l["step_scores"]), atol=1e-5)


# ------------------------------------------------------------------------------------ pool, failure
def test_a_pool_spreads_requests_and_fails_over(target, servers, models):
    port = servers["policy"].port
    names = [f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://127.0.0.1:{free_port()}"]
    pool = RemoteLM(names, eos_token_ids=eos_token_ids_of(models["policy_dir"]), backoff=0.05)
    kwargs = dict(method="bon", reward=models["reward"], n=3, max_new_tokens=4, seed=5)
    out = fastalign.decode([[1, 2]] * 12, target=pool, **kwargs)
    assert out.sequences == fastalign.decode([[1, 2]] * 12, target=target, **kwargs).sequences
    answered = pool.pool.answered
    assert answered[names[0]] >= 4 and answered[names[1]] >= 4 and answered[names[2]] == 0


def test_a_server_killed_mid_run_gives_a_remote_error_not_a_hang(servers, models):
    """Runs last: it kills the policy's server while qalign runs; the completed steps come back."""
    lm = RemoteLM(servers["policy"].url, eos_token_ids=eos_token_ids_of(models["policy_dir"]), retries=2,
                  backoff=0.2)
    rows = 8

    def kill_after_two_steps():
        while lm.counters.calls < 3 * rows:
            time.sleep(0.01)
        servers["policy"].kill()

    killer = threading.Thread(target=kill_after_two_steps, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        fastalign.decode([[1, 2]] * rows, method="qalign", target=lm, reward=models["reward"], max_new_tokens=8,
                         steps=1000, seed=1)
    assert time.monotonic() - start < 120
    assert servers["policy"].url in str(info.value) and "completion request" in str(info.value)
    partial = info.value.partial
    assert partial.extra["completed_steps"] >= 2
    assert all(len(chains[0]) == partial.extra["completed_steps"] + 1 for chains in partial.extra["state_path"])
