"""The library's behaviour, pinned: every method's tokens and counts for fixed seeds, as recorded in
``tests/fixtures/behaviour.json``.

A refactor that changes no behaviour (moving the model layer, the methods, the applications) must leave every
entry equal. The cases cover every method and variant (chain and both trees, exact and paper sss, soft and
hard cards, calibrated thresholds) on two model sets (the toy world, and random Llama models over token ids),
on both model layers (the eager cache and the static cache, uncompiled and with ``torch.compile`` replaced by
the identity, which runs the padded compiled-width logic), the whole-response methods against a remote target
(the bundled server), and the CLI's JSONL.

A change that is meant to change outputs re-records the fixture, and says so in its commit:

    python tests/test_behaviour.py --record
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).with_name("fixtures") / "behaviour.json"
SEED = 11
MAX_NEW_TOKENS = 12

# (label, method, options); every case runs on every model set and layer
CASES = [
    ("sample", "sample", {}),
    ("sample-greedy", "sample", {"temperature": 1.0, "top_k": 1}),
    ("sample-T0.7-top_p0.8", "sample", {"temperature": 0.7, "top_p": 0.8}),
    ("bon", "bon", {"n": 3}),
    ("soft_bon", "soft_bon", {"n": 3, "lam": 0.5}),
    ("args-greedy", "args", {}),
    ("args-sample", "args", {"mode": "sampled", "k": 5}),
    ("rs-auto", "rs", {}),
    ("rs-hard", "rs", {"reward_threshold": -1.0, "mode": "hard", "max_rejections": 3}),
    ("cards", "cards", {"max_segment_tokens": 6}),
    ("cards-hard-threshold", "cards", {"reward_threshold": 1.0, "mode": "hard", "max_rejections": 2}),
    ("cards-parallel", "cards", {"reward_threshold": 1.0, "parallel_candidates": 3}),
    ("sd-chain", "sd", {"num_draft_tokens": 3}),
    ("sd-topk-tree", "sd", {"tree": "topk", "branching": (2, 2, 1)}),
    ("sd-sampled-tree", "sd", {"tree": "sampled", "branching": (2, 2)}),
    ("sss-chain", "sss", {"num_draft_tokens": 4}),
    ("sss-chain-T0.8-top_k5", "sss", {"num_draft_tokens": 2, "temperature": 0.8, "top_k": 5, "lam": 0.5}),
    ("sss-sampled-tree", "sss", {"tree": "sampled"}),
    ("sss-topk-tree", "sss", {"tree": "topk", "branching": (3, 1)}),
    ("sss-paper", "sss", {"variant": "paper", "bonus_on_full_accept": False}),
    ("qalign", "qalign", {"steps": 3, "chains": 2}),
    ("qalign-best", "qalign", {"steps": 2, "chains": 2, "select": "best_reward", "beta": 0.5}),
    ("speculative_rejection", "speculative_rejection", {"n": 4, "alpha": 0.5, "round_tokens": 2}),
    ("smc", "smc", {"particles": 4, "segment_tokens": 2, "ess_threshold": 1.0}),
    ("beam", "beam", {"beams": 2, "width": 2, "max_step_tokens": 3}),
]
LAYERS = ("eager", "static", "compiled-identity")
REMOTE_CASES = [case for case in CASES if case[1] in ("sample", "bon", "soft_bon", "rs", "qalign")]
SAMPLING = ("temperature", "top_k", "top_p")


# ------------------------------------------------------------------ the model sets
def toy_models():
    from fastalign.eval.toyworld import load_toy_world

    world = load_toy_world()
    prompts = world.prompts[:3]
    return dict(target=world.target, draft=world.draft, aligned_draft=world.aligned_draft, ref=world.ref,
                reward=world.reward, tokenizer=world.tokenizer), prompts


def llama_models():
    from fastalign.testing import tiny_causal_lm, tiny_reward_model

    models = dict(target=tiny_causal_lm(seed=0, init_range=0.2), draft=tiny_causal_lm(seed=1, hidden=16, init_range=0.2),
                  aligned_draft=tiny_causal_lm(seed=2, hidden=16, init_range=0.2), reward=tiny_reward_model(seed=3),
                  tokenizer=None)
    models["ref"] = models["draft"]
    return models, [[1, 5, 9, 2], [7], [3, 3, 40, 12, 8, 60]]


MODEL_SETS = {"toy": toy_models, "llama": llama_models}


def roles(models: dict, method: str) -> dict:
    """The models a decode gets: for sss the aligned draft drafts and the unaligned one is the ref."""
    sss = method == "sss"
    return dict(target=models["target"], draft=models["aligned_draft" if sss else "draft"],
                ref=models["ref"] if sss else None, reward=models["reward"], tokenizer=models["tokenizer"])


# ------------------------------------------------------------------ what is recorded
def summary(out) -> dict:
    """The sequences and the deterministic stats of a decode (no wall times, no tensors)."""
    stats = {k: v for k, v in sorted(out.stats.items())
             if isinstance(v, (int, float)) and not isinstance(v, bool) and "time" not in k}
    return {"sequences": out.sequences, "stats": stats}


def engine_options(layer: str) -> dict:
    return {"eager": {}, "static": {"static_cache": True}, "compiled-identity": {"compile": True}}[layer]


def decode_case(models: dict, prompts, layer: str, method: str, options: dict):
    import fastalign

    options = dict(options)
    sampling = {k: options.pop(k) for k in SAMPLING if k in options}
    engine = fastalign.Engine(**roles(models, method), **engine_options(layer))
    return engine.decode(prompts, method=method, max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **sampling, **options)


class identity_compile:
    """``torch.compile`` replaced by the identity: the compiled path's logic (padded widths, shape buckets,
    guards stance) runs in seconds."""

    def __enter__(self):
        self.saved = torch.compile
        torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)

    def __exit__(self, *exc):
        torch.compile = self.saved


def local_results(name: str, layer: str) -> dict:
    models, prompts = MODEL_SETS[name]()
    out = {}
    with identity_compile():
        for label, method, options in CASES:
            out[label] = summary(decode_case(models, prompts, layer, method, options))
    return out


def remote_results() -> dict:
    """The whole-response methods with a remote target (the bundled server over the random Llama models)."""
    import fastalign
    from fastalign.models.remote import RemoteLM
    from fastalign.testing import serving

    models, prompts = llama_models()
    out = {}
    with serving(models["target"]) as url:
        target = RemoteLM(url)
        for label, method, options in REMOTE_CASES:
            options = dict(options)
            sampling = {k: options.pop(k) for k in SAMPLING if k in options}
            result = fastalign.decode(prompts, method=method, target=target, reward=models["reward"],
                                      max_new_tokens=MAX_NEW_TOKENS, seed=SEED, **sampling, **options)
            out[label] = {"sequences": result.sequences}
    return out


def cli_results(tmp: Path) -> list[dict]:
    """``fastalign generate --toy`` records (without times): one per prompt."""
    from fastalign import cli

    out = []
    for method, opts in (("sample", []), ("sss", ["--opt", "tree=sampled"]), ("cards", ["--opt", "max_segment_tokens=6"])):
        path = tmp / f"{method}.jsonl"
        code = cli.main(["generate", "--toy", "--method", method, *opts, "--max-new-tokens", str(MAX_NEW_TOKENS),
                         "--seed", str(SEED), "--batch-size", "2", "--threads", "1", "-o", str(path),
                         "review : the pasta", "review : our waiter", "review : the coffee"])
        assert code == 0
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out.append({k: record[k] for k in ("prompt", "completion", "tokens", "method", "options", "sampling")})
    return out


# ------------------------------------------------------------------ the tests
def recorded() -> dict:
    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} is missing: record it with `python tests/test_behaviour.py --record`")
    return json.loads(FIXTURE.read_text())


def assert_same(got, want, where: str) -> None:
    """Equal sequences; equal integer stats; float stats equal to 1e-9 (they are exact sums and ratios)."""
    assert got["sequences"] == want["sequences"], f"{where}: sequences differ"
    if "stats" not in want:
        return
    assert sorted(got["stats"]) == sorted(want["stats"]), f"{where}: other stats"
    for key, value in want["stats"].items():
        mine = got["stats"][key]
        if isinstance(value, float) or isinstance(mine, float):
            assert math.isclose(mine, value, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {key} {mine} != {value}"
        else:
            assert mine == value, f"{where}: {key} {mine} != {value}"


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", sorted(MODEL_SETS))
def test_every_method_keeps_its_recorded_tokens(name, layer):
    want = recorded()["local"][name][layer]
    got = local_results(name, layer)
    assert sorted(got) == sorted(want)
    for label in want:
        assert_same(got[label], want[label], f"{name}/{layer}/{label}")


def test_remote_methods_keep_their_recorded_tokens():
    want = recorded()["remote"]
    got = remote_results()
    for label in want:
        assert_same(got[label], want[label], f"remote/{label}")


def test_cli_jsonl_keeps_its_recorded_records(tmp_path):
    assert cli_results(tmp_path) == recorded()["cli"]


def record() -> None:
    import tempfile

    torch.set_num_threads(1)
    data = {"local": {name: {layer: local_results(name, layer) for layer in LAYERS} for name in sorted(MODEL_SETS)},
            "remote": remote_results()}
    with tempfile.TemporaryDirectory() as tmp:
        data["cli"] = cli_results(Path(tmp))
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"recorded {FIXTURE}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    for key, value in (("TRITON_INTERPRET", "1"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    record()
