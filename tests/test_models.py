"""Cache correctness: prefill + extend + rollback / tree keep / compaction equal a full recompute."""

import json

import pytest
import torch

from fastalign.errors import InputError
from fastalign.models.causal_lm import CausalLM
from fastalign.models.ragged import RaggedStore
from fastalign.models.reward import RewardModel
from fastalign.models.slots import SlotStore, StaticOptions
from fastalign.testing import ARCHITECTURES, tiny_causal_lm, tiny_reward_model

UNCOMPILED = StaticOptions(compile=False)  # the static cache's logic and steps, without compilation time


@pytest.fixture(params=["eager", "static"])
def layer(request):
    """The model layer under test: the eager reference or the static cache (``fastalign.models.slots``)."""
    return request.param


def new_store(layer):
    """A function making the KV stores of ``layer``."""
    return RaggedStore if layer == "eager" else lambda: SlotStore(UNCOMPILED)


def wrap(model, layer):
    return CausalLM(model, new_store(layer)())


def full_logits(model, row):
    with torch.no_grad():
        return model(torch.tensor([row])).logits[0].float()


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_extend_rollback_tree_match_full_recompute(arch, layer):
    model = tiny_causal_lm(arch)
    lm = wrap(model, layer)
    rows = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # ragged: left padding
    last = lm.prefill(rows)
    for b, r in enumerate(rows):
        assert_close(last[b], full_logits(model, r)[-1])

    new = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    logits = lm.extend(new)
    rows = [r + new[b].tolist() for b, r in enumerate(rows)]
    for b, r in enumerate(rows):
        assert_close(logits[b], full_logits(model, r)[-3:])

    lm.rollback(torch.tensor([1, 3, 0]))  # per-row rollback
    rows = [rows[0][:-1], rows[1][:-3], rows[2]]
    assert lm.lengths.tolist() == [len(r) for r in rows]
    new = torch.tensor([[20, 21], [22, 23], [24, 25]])
    logits = lm.extend(new)
    rows = [r + new[b].tolist() for b, r in enumerate(rows)]
    for b, r in enumerate(rows):
        assert_close(logits[b], full_logits(model, r)[-2:])

    # a tree block: two chains 0->1 and 2->3 hanging off the prefix
    parents = torch.tensor([[-1, 0, -1, 2]] * 3)
    toks = torch.tensor([[30, 31, 32, 33]] * 3)
    logits = lm.extend(toks, parents=parents)
    for b in range(3):
        for path in ([0, 1], [2, 3]):
            assert_close(logits[b, path], full_logits(model, rows[b] + toks[b, path].tolist())[-2:])

    # keep a different path per row (nothing at all in row 2), then continue
    lm.keep_new(torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool))
    rows = [rows[0] + [32, 33], rows[1] + [30], rows[2]]
    assert lm.lengths.tolist() == [len(r) for r in rows]
    for compact in (False, True):
        if compact:
            lm.rollback(1)
            rows = [r[:-1] for r in rows]
            lm.compact()
            assert lm.live.shape[1] == max(len(r) for r in rows)
        logits = lm.extend(torch.tensor([[40], [41], [42]]))
        rows = [r + [40 + b] for b, r in enumerate(rows)]
        for b, r in enumerate(rows):
            assert_close(logits[b, -1], full_logits(model, r)[-1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_expand_and_select_rows(arch, layer):
    model = tiny_causal_lm(arch)
    lm = wrap(model, layer)
    rows = [[1, 2, 3], [4, 5]]
    lm.prefill(rows)
    lm.expand(3)
    assert lm.batch_size == 6
    new = torch.arange(6)[:, None] + 10
    logits = lm.extend(new)
    for i in range(6):
        assert_close(logits[i, 0], full_logits(model, rows[i // 3] + [10 + i])[-1])
    lm.select_rows([5, 0])
    logits = lm.extend(torch.tensor([[1], [2]]))
    assert_close(logits[0, 0], full_logits(model, rows[1] + [15, 1])[-1])
    assert_close(logits[1, 0], full_logits(model, rows[0] + [10, 2])[-1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_cached_prefix_equals_full_scoring(arch, layer):
    rm = RewardModel(tiny_reward_model(arch), new_store=new_store(layer))
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    torch.testing.assert_close(rm.prefill(prompts, [[8], []]), rm.score(prompts, [[8], []]))
    tokens_before = rm.counters.tokens
    scores = rm.score_branches([[[9, 10], [11], []], [[12, 13, 14]]])
    assert rm.counters.tokens - tokens_before == 6  # only the new tokens were processed
    torch.testing.assert_close(scores[0], rm.score([prompts[0]] * 3, [[8, 9, 10], [8, 11], [8]]))
    torch.testing.assert_close(scores[1], rm.score([prompts[1]], [[12, 13, 14]]))
    torch.testing.assert_close(rm.append([[9], [12, 13]]), rm.score(prompts, [[8, 9], [12, 13]]))
    rm.select_rows([1, 1, 0])
    scores = rm.score_branches([[[1]], [[2]], [[3]]])
    torch.testing.assert_close(torch.cat(scores), rm.score([prompts[1], prompts[1], prompts[0]],
                                                           [[12, 13, 1], [12, 13, 2], [8, 9, 3]]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_keep_branches_reuses_scored_slots(arch, layer):
    rm = RewardModel(tiny_reward_model(arch), new_store=new_store(layer))
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8]]
    rm.prefill(prompts)
    rm.score_branches([[[9, 10], [11]], [[12], [13, 14, 15]], [[2]]])
    tokens_before = rm.counters.tokens
    kept = rm.keep_branches([0, 1, None])
    assert rm.counters.tokens == tokens_before  # nothing recomputed
    torch.testing.assert_close(kept, rm.score(prompts, [[9, 10], [13, 14, 15], []]))
    rm.score_branches([[[3]], [[4]], [[5]]])
    rm.score_branches([[[6], [7, 8]], [[9]], []])  # an unused block is dropped
    torch.testing.assert_close(rm.keep_branches([1, 0, None]), rm.score(prompts, [[9, 10, 7, 8], [13, 14, 15, 9], []]))
    torch.testing.assert_close(torch.cat(rm.score_branches([[[1]], [[1]], [[1]]])),
                               rm.score(prompts, [[9, 10, 7, 8, 1], [13, 14, 15, 9, 1], [1]]))
    rm.append([[1], [], []])
    with pytest.raises(RuntimeError, match="directly follow"):
        rm.keep_branches([0, 0, 0])


def tiny_sliding_lm(window: int, context: int = 64):
    """A tiny Gemma 3 text model: a sliding-window layer of ``window`` tokens, then a full-attention one."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=window,
                              max_position_embeddings=context, layer_types=["sliding_attention", "full_attention"],
                              pad_token_id=0, bos_token_id=0, eos_token_id=63, initializer_range=0.05)
    return Gemma3ForCausalLM(config).eval()


def test_sliding_window_layers_are_exact_within_the_window_and_refused_beyond(layer):
    """Sliding-window layers run as full attention (a 4-D mask), exact while a row fits in the window. The eager
    store gave chains a 2-D mask, from which transformers slid the window over cache columns, dead slots
    included: 0.17 off a full recompute at 6 tokens in 10 columns; and beyond the window nothing refused."""
    model = tiny_sliding_lm(window=6)
    lm = wrap(model, layer)
    assert lm.context_length == 6
    rows = [[5, 9], [3, 17, 22, 8, 41]]
    lm.prefill(rows)
    lm.extend(torch.tensor([[7], [11]]), live=torch.tensor([[False], [True]]))  # a dead slot in row 0
    rows[1].append(11)
    for token in (20, 21, 22, 23):  # row 0 grows to 6 tokens over 10 columns; row 1 rides along, dead
        logits = lm.extend(torch.tensor([[token], [token]]), live=torch.tensor([[True], [False]]))
        rows[0].append(token)
        with torch.no_grad():
            full = model(torch.tensor([rows[0]])).logits[0, -1]
        torch.testing.assert_close(logits[0, -1], full, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match=r"context length of the model \(6: the window of its sliding-window"):
        wrap(model, layer).prefill([[1, 2, 3, 4]], max_new_tokens=3)
    assert CausalLM(tiny_sliding_lm(window=100, context=64)).context_length == 64  # a window past the context


@pytest.mark.parametrize("size", [dict(), dict(vocab_size=300, hidden=256)], ids=["small", "native"])
def test_a_model_cast_after_wrapping_is_followed(layer, size):
    """A model cast after wrapping kept a store of the old dtype: fp32 -> fp64 gave logits 10 off with the
    native copy (SDPA misreads an fp32 mask beside fp64 queries), bf16 -> fp32 an index_copy_ dtype error."""
    model = tiny_causal_lm("llama", **{"vocab_size": 64, **size}, init_range=0.5)
    for start, cast in [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)]:
        model.to(start)
        lm = wrap(model, layer)
        lm.prefill([[1, 2, 3], [4, 5]])
        lm.extend(torch.tensor([[6], [7]]), parents=torch.tensor([[-1], [-1]]))  # a tree block: a 4-D mask
        model.to(cast)
        logits = lm.prefill([[1, 2, 3], [4, 5]])
        logits = lm.extend(torch.tensor([[6], [7]]), parents=torch.tensor([[-1], [-1]]))
        torch.testing.assert_close(logits[0, -1], full_logits(model, [1, 2, 3, 6])[-1], atol=1e-4, rtol=1e-4)
        assert lm.dtype == cast


def test_alibi_models_are_refused():
    """MPT took its ALiBi distances from cache columns (4e-2 off a full recompute with padding, silently); Bloom
    and Falcon with alibi=True failed on a 4-D mask with a raw ValueError."""
    from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM, MptConfig, MptForCausalLM

    small = dict(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)
    for model in (BloomForCausalLM(BloomConfig(**small)), MptForCausalLM(MptConfig(d_model=32, n_heads=4, n_layers=1,
                                                                                   vocab_size=64)),
                  FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, alibi=True))):
        with pytest.raises(InputError, match="ALiBi attention biases are not supported"):
            CausalLM(model)


def test_callable_reward_and_bad_input():
    rm = RewardModel(lambda p, r: torch.tensor([float(sum(x)) for x in r]))
    rm.prefill([[1], [2]], [[3], []])
    assert [s.tolist() for s in rm.score_branches([[[1, 1], []], [[5]]])] == [[5.0, 3.0], [5.0]]
    lm = CausalLM(tiny_causal_lm("llama", context=16))
    with pytest.raises(InputError, match="empty"):
        lm.prefill([[1, 2], []])
    with pytest.raises(InputError, match="context length"):
        lm.prefill([list(range(1, 17))], max_new_tokens=4)
    with pytest.raises(InputError, match="no prompts"):
        lm.prefill([])


def test_a_reward_model_without_one_trained_output_is_an_input_error(tmp_path):
    """A causal LM's folder loads as a sequence classifier with a freshly initialised 2-label head, and any
    2-label classifier was read at label 0 (a sentiment model's negative logit): random or wrong rewards."""
    from fastalign.eval.toyworld import build_tokenizer
    from fastalign.models.builder import ModelBuilder

    one = tiny_reward_model(vocab_size=64)
    one.config.num_labels = 2
    two = type(one)(one.config)  # a 2-label classifier
    with pytest.raises(InputError, match="num_labels=2"):
        RewardModel(two)
    for name, model, message in [("lm", tiny_causal_lm("llama", vocab_size=64), "no trained reward head"),
                                 ("two", two, "num_labels=2")]:
        model.save_pretrained(tmp_path / name)
        build_tokenizer().save_pretrained(tmp_path / name)
        with pytest.raises(InputError, match=message):
            ModelBuilder().reward(str(tmp_path / name))
    RewardModel(tiny_reward_model(vocab_size=64))  # one output: a reward
    # a one-output head under a config that lists no labels, which transformers reads as two
    tiny_reward_model(vocab_size=64).save_pretrained(tmp_path / "unlabelled")
    build_tokenizer().save_pretrained(tmp_path / "unlabelled")
    config = json.loads((tmp_path / "unlabelled" / "config.json").read_text())
    for key in ("id2label", "label2id", "num_labels"):
        config.pop(key, None)
    (tmp_path / "unlabelled" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="num_labels \\(here 2, two when it lists no labels\\)"):
        ModelBuilder().reward(str(tmp_path / "unlabelled"))
    (tmp_path / "rm.gguf").write_bytes(b"GGUF")
    with pytest.raises(InputError, match="a reward model cannot be a .gguf file"):
        ModelBuilder().reward(str(tmp_path / "rm.gguf"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tree_grown_over_several_calls_matches_full_recompute(arch, layer):
    model = tiny_causal_lm(arch)
    lm = wrap(model, layer)
    rows = [[1, 2, 3], [4, 5]]
    lm.prefill(rows)
    lm.extend(torch.tensor([[6], [7]]), live=torch.tensor([[True], [False]]))  # dead slot before the tree
    rows = [rows[0] + [6], rows[1]]
    level1 = torch.tensor([[10, 11], [12, 13]])  # two roots
    lm.extend(level1, parents=torch.tensor([[-1, -1]] * 2))
    # level 2: two children under root 1, one under root 0; parents index the whole tree so far
    parents = torch.tensor([[-1, -1, 1, 1, 0]] * 2)
    level2 = torch.tensor([[20, 21, 22], [23, 24, 25]])
    logits = lm.extend(level2, parents=parents)
    for b in range(2):
        for j, root in enumerate([1, 1, 0]):
            path = [level1[b, root].item(), level2[b, j].item()]
            assert_close(logits[b, j], full_logits(model, rows[b] + path)[-1])
    lm.keep_new(torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.bool))  # one path per row
    rows = [rows[0] + [11, 21], rows[1] + [12, 25]]
    assert lm.lengths.tolist() == [len(r) for r in rows]
    logits = lm.extend(torch.tensor([[30], [31]]))
    for b, r in enumerate(rows):
        assert_close(logits[b, -1], full_logits(model, r + [30 + b])[-1])


def test_columns_before_the_open_block_are_refused(layer):
    """``keep_new`` and a tree's earlier nodes (``parents``) address the last columns, which must have been written
    since the cache was last tidied (the open block, never moved by a compaction): after a prefill, a rollback or a
    ``keep_new`` the earlier columns may have moved, so addressing them is an error, never a silent wrong slot."""
    lm = wrap(tiny_causal_lm("llama"), layer)
    lm.prefill([[1, 2, 3], [4, 5]])
    with pytest.raises(ValueError, match="since the cache was last tidied"):
        lm.keep_new(torch.ones(2, 1, dtype=torch.bool))
    lm.extend(torch.tensor([[6, 7], [8, 9]]), parents=torch.tensor([[-1, -1]] * 2))
    lm.rollback(0)  # tidies: the roots are no longer addressable
    with pytest.raises(ValueError, match="since the cache was last tidied"):
        lm.extend(torch.tensor([[10], [11]]), parents=torch.tensor([[-1, -1, 0]] * 2))
    with pytest.raises(ValueError, match="since the cache was last tidied"):
        lm.keep_new(torch.ones(2, 2, dtype=torch.bool))
    assert lm.lengths.tolist() == [5, 4]  # nothing was written or dropped
    lm.extend(torch.tensor([[10, 11], [12, 13]]), parents=torch.tensor([[-1, -1]] * 2))
    lm.extend(torch.tensor([[14], [15]]), parents=torch.tensor([[-1, -1, 0]] * 2))
    lm.keep_new(torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool))
    assert lm.lengths.tolist() == [7, 5]
    with pytest.raises(ValueError, match="since the cache was last tidied"):
        lm.keep_new(torch.ones(2, 1, dtype=torch.bool))


def test_set_block_live_addresses_only_the_open_block(layer):
    """Like ``keep_new``: marking columns before the open block is an error (the stores' earlier columns differ
    after a rollback); zero columns change nothing; dead slots of the open block can be revived."""
    model = tiny_causal_lm("llama")
    lm = wrap(model, layer)
    lm.prefill([[1] * 8, [2, 3, 4]])
    lm.rollback(torch.tensor([7, 0]))
    lm.extend(torch.tensor([[5, 6], [7, 8]]))
    with pytest.raises(ValueError, match="only 2 were written since the cache was last tidied"):
        lm.set_block_live(torch.ones(2, 4, dtype=torch.bool))
    lm.set_block_live(torch.zeros(2, 0, dtype=torch.bool))
    assert lm.lengths.tolist() == [3, 5]
    lm.set_block_live(torch.zeros(2, 2, dtype=torch.bool))
    assert lm.lengths.tolist() == [1, 3]
    lm.set_block_live(torch.tensor([[True, False], [True, True]]))
    lm.tidy()
    logits = lm.extend(torch.tensor([[9], [9]]))
    assert_close(logits[0, -1].float(), full_logits(model, [1, 5, 9])[-1])
    assert_close(logits[1, -1].float(), full_logits(model, [2, 3, 4, 7, 8, 9])[-1])


def test_reward_with_its_own_tokenizer_scores_re_tokenised_text():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastalign.testing import tiny_tokenizer

    V = 16
    policy_tok = tiny_tokenizer(V)
    # the reward's own vocabulary: the same words at other ids (shifted by 4), so token ids must not be reused
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    reward_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                         bos_token="<s>", eos_token="</s>")
    model = tiny_reward_model("llama", vocab_size=V + 4)
    rm = RewardModel(model, tokenizer=reward_tok, policy_tokenizer=policy_tok)
    assert rm.retokenize and not rm.cached
    prompts, responses = [[1, 2], [3]], [[5, 6], [7, 8, 9]]
    expected = RewardModel(model).score([[], []], [[t + 4 for t in p + r] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(rm.score(prompts, responses), expected)
    # the cached interface falls back to scoring whole texts, with the same results
    rm.prefill(prompts, [[5], []])
    branches = rm.score_branches([[[6], []], [[7, 8, 9]]])
    torch.testing.assert_close(branches[0][0], expected[0])
    torch.testing.assert_close(branches[1][0], expected[1])
    # and through the API: the Engine passes the policy's tokenizer and the reward's own to the wrapper
    import fastalign
    from fastalign.testing import tiny_causal_lm

    out = fastalign.decode(["w1 w2"], method="bon", target=tiny_causal_lm(vocab_size=V), tokenizer=policy_tok,
                           reward=model, reward_tokenizer=reward_tok, max_new_tokens=3, n=4, seed=0)
    rewards = out.extra["rewards"][0]
    best = out.sequences[0]
    torch.testing.assert_close(rewards.max(), rm.score([policy_tok("w1 w2")["input_ids"]], [best])[0])
    # without the policy's tokenizer nothing can be re-tokenised: the reward read the policy's ids as its own
    with pytest.raises(InputError, match="reward_tokenizer=... re-tokenises .* pass tokenizer="):
        fastalign.Engine(target=tiny_causal_lm(vocab_size=V), reward=model, reward_tokenizer=reward_tok)
    for ready in ("vader", lambda prompts, responses: torch.zeros(len(responses)), RewardModel(model)):
        for policy in (policy_tok, None) if not isinstance(ready, str) else (policy_tok,):  # (a text reward
            # without the policy's tokenizer is refused for that first); without it, this is the refusal to give
            with pytest.raises(InputError, match="a callable or text reward never reads it, and a RewardModel"):
                fastalign.Engine(target=tiny_causal_lm(vocab_size=V), tokenizer=policy, reward=ready,
                                 reward_tokenizer=reward_tok)
    with pytest.raises(InputError, match="no reward= is given"):  # a step reward alone never reads it
        fastalign.Engine(target=tiny_causal_lm(vocab_size=V), tokenizer=policy_tok, step_reward=model,
                         reward_tokenizer=reward_tok)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("parents", [None, [[-1, 0]] * 2], ids=["chain", "tree"])
def test_padding_rides_along_a_row_at_its_context_length(arch, layer, parents):
    """Row 0 holds all 16 positions and rides along as padding while row 1 goes on: learned position tables
    (gpt2, opt) have no row for its padding's position, and row 1's logits are those of a full recompute."""
    model = tiny_causal_lm(arch, context=16)
    lm = wrap(model, layer)
    lm.prefill([[1] * 15, [2]])
    lm.extend(torch.tensor([[3], [4]]))  # row 0 at the context length (allowed)
    block = torch.tensor([[5, 5], [6, 7]])
    parents = None if parents is None else torch.tensor(parents)
    logits = lm.extend(block, parents=parents, live=torch.tensor([[False, False], [True, True]]))
    assert_close(logits[1].float(), full_logits(model, [2, 4, 6, 7])[-2:])
    assert lm.lengths.tolist() == [16, 4]
