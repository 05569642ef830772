"""Public API, the baselines (sample, bon, soft_bon) against exact laws, and input errors."""

import math
import os
import subprocess
import sys

import pytest
import torch

import fastalign
from fastalign.testing import (
    empirical_law,
    enumerate_law,
    next_token_probs,
    tiny_causal_lm,
    tiny_tokenizer,
    total_variation,
    tv_threshold,
)

V, EOS = 6, 5


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=V, hidden=16, init_range=0.25)


def digits_reward(prompts, responses):
    """An injective reward: the response read as a base-7 number (so bon has no ties)."""
    return torch.tensor([float(sum((t + 1) * 7**i for i, t in enumerate(r))) for r in responses])


@pytest.mark.usefixtures("both_layers")
def test_sample_follows_exact_law_in_a_mixed_batch(model):
    prompts = [[1, 2], [3, 1, 4]]
    draws = 3000
    out = fastalign.decode(prompts * draws, method="sample", target=model, max_new_tokens=2,
                           temperature=0.8, top_k=4, seed=0)
    for i, prompt in enumerate(prompts):
        exact = enumerate_law(lambda t: next_token_probs(model, t, 0.8, 4), prompt, 2, {EOS})
        seen = empirical_law(out.sequences[i::2])
        untruncated = enumerate_law(lambda t: next_token_probs(model, t, 1.0), prompt, 2, {EOS})
        assert total_variation(seen, exact) < tv_threshold(exact, draws)  # the noise of `draws` samples
        assert total_variation(exact, untruncated) > 0.1  # the check can tell the laws apart


@pytest.mark.usefixtures("both_layers")
def test_bon_follows_the_best_of_n_order_statistic(model):
    prompt, n, draws = [2, 3], 4, 4000
    p = enumerate_law(lambda t: next_token_probs(model, t), prompt, 2, {EOS})
    ranked = sorted(p, key=lambda y: digits_reward(None, [y]).item())
    exact, below = {}, 0.0
    for y in ranked:  # P(best = y) = F(r_y)^n - F(r_y-)^n
        exact[y] = (below + p[y]) ** n - below**n
        below += p[y]
    out = fastalign.decode([prompt] * draws, method="bon", target=model, reward=digits_reward,
                           max_new_tokens=2, n=n, seed=1)
    assert total_variation(empirical_law(out.sequences), exact) < tv_threshold(exact, draws)
    assert total_variation(exact, p) > 0.2
    assert out.stats["reward_calls"] == 1 and out.stats["target_calls"] == 2


@pytest.mark.usefixtures("both_layers")
def test_soft_bon_law(model):
    prompt, n, lam, draws = [2, 3], 2, 8.0, 4000
    p = enumerate_law(lambda t: next_token_probs(model, t), prompt, 2, {EOS})
    ys = list(p)
    r = {y: digits_reward(None, [y]).item() for y in ys}
    exact = {y: 0.0 for y in ys}
    for a in ys:  # two i.i.d. samples, keep one with probability softmax(r / lam)
        for b in ys:
            wa = 1 / (1 + math.exp((r[b] - r[a]) / lam))
            exact[a] += p[a] * p[b] * wa
            exact[b] += p[a] * p[b] * (1 - wa)
    out = fastalign.decode([prompt] * draws, method="soft_bon", target=model, reward=digits_reward,
                           max_new_tokens=2, n=n, lam=lam, seed=2)
    assert total_variation(empirical_law(out.sequences), exact) < tv_threshold(exact, draws)
    assert total_variation(exact, p) > 0.1


def test_outputs_stats_texts_and_seed(model):
    tok = tiny_tokenizer(V)
    engine = fastalign.Engine(target=model, tokenizer=tok)
    a = engine.decode(["w1 w2", "w3"], method="sample", max_new_tokens=4, seed=7)
    b = engine.decode(["w1 w2", "w3"], method="sample", max_new_tokens=4, seed=7)
    assert a.sequences == b.sequences  # reproducible with a seed
    assert a.texts == tok.batch_decode(a.sequences, skip_special_tokens=True)
    for s in a.sequences:
        assert 1 <= len(s) <= 4 and (len(s) == 4 or s[-1] == EOS) and EOS not in s[:-1]
    st = a.stats
    assert st["generated_tokens"] == sum(map(len, a.sequences))
    assert st["target_calls"] == max(map(len, a.sequences))  # one prefill + one call per further token
    assert st["target_tokens"] == 3 + sum(len(s) - 1 for s in a.sequences)
    assert st["wall_time_s"] > 0 and st["reward_calls"] == 0


def test_clear_errors(model):
    other = tiny_causal_lm(vocab_size=V + 2, hidden=16)
    with pytest.raises(fastalign.InputError, match="vocabularies differ"):
        fastalign.decode([[1]], method="sd", target=model, draft=other)
    with pytest.raises(fastalign.InputError, match="empty"):
        fastalign.decode([[1], []], target=model)
    with pytest.raises(fastalign.InputError, match="max_new_tokens"):
        fastalign.decode([[1]], target=model, max_new_tokens=0)
    with pytest.raises(fastalign.InputError, match="needs a reward"):
        fastalign.decode([[1]], method="bon", target=model)
    with pytest.raises(fastalign.InputError, match="needs a target"):
        fastalign.decode([[1]], method="sample")
    with pytest.raises(fastalign.InputError, match="context length"):
        fastalign.decode([list(range(1, 5)) * 40], target=model)
    with pytest.raises(fastalign.InputError, match="tokenizer"):
        fastalign.decode(["hello"], target=model)
    with pytest.raises(ValueError, match="unknown method"):
        fastalign.decode([[1]], method="nope", target=model)
    with pytest.raises(fastalign.InputError, match="no option 'bogus_option'; its options: n"):
        fastalign.decode([[1]], method="bon", target=model, reward=digits_reward, bogus_option=3)
    with pytest.raises(ValueError, match="NaN"):
        fastalign.kernels.sample(torch.tensor([[0.0, float("nan")]]))
    broken = tiny_causal_lm(vocab_size=V, hidden=16)
    with torch.no_grad():
        broken.lm_head.weight[2, 0] = float("nan")
    with pytest.raises(ValueError, match="the model's logits contain NaN"):
        fastalign.decode([[1, 2]], target=broken, max_new_tokens=2)


def test_models_load_from_a_path_without_remote_code(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer(V).save_pretrained(tmp_path / "m")
    out = fastalign.decode(["w1 w2"], target=str(tmp_path / "m"), max_new_tokens=3, seed=0)
    ref = fastalign.decode(["w1 w2"], target=model, tokenizer=tiny_tokenizer(V), max_new_tokens=3, seed=0)
    assert out.sequences == ref.sequences and out.texts == ref.texts


def test_the_library_runs_without_triton():
    """triton is only in the `test` extra: without it the package imports and decodes on the PyTorch references."""
    code = ("import sys\nsys.modules['triton'] = None  # import triton now fails, as when it is not installed\n"
            "import fastalign\nfrom fastalign.testing import tiny_causal_lm\nm = tiny_causal_lm(vocab_size=8)\n"
            "for method, extra in [('sample', {}), ('sd', {'draft': m}), ('sss', {'draft': m, 'ref': m})]:\n"
            "    out = fastalign.decode([[1, 2]], method=method, target=m, max_new_tokens=3, seed=0, **extra)\n"
            "    assert len(out.sequences[0]) >= 1\n"
            "print(fastalign.kernels.triton_available())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTALIGN_KERNELS")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
