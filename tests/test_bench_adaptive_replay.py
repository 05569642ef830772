"""The accounting of ``bench/bench_adaptive_replay.py``'s replay of a prompt's rounds on a recorded trace: rounds,
their cost, the length cap, and what ``AdaptiveLength`` is fed; worked out by hand on traces of certain outcomes
(every position accepted, or none)."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_adaptive_replay import Fixed, replay  # noqa: E402
from fastalign.methods.speculative import AdaptiveLength, RoundCosts  # noqa: E402

COSTS = RoundCosts(0.25, (1.0, 1.5, 2.0))


def test_a_fixed_k_on_certain_acceptance():
    rng = random.Random(0)
    # all accepted: K=3 emits 4 tokens a round; 10 tokens are 4 + 4 + 2 (the last round capped at K=1)
    cost, rounds = replay(Fixed(3), [1.0] * 10, COSTS, rng)
    assert rounds == 3 and cost == pytest.approx(2 * COSTS.chain_round(3) + COSTS.chain_round(1))
    # none accepted: one token a round, K capped by what is left (4, 3, 2, 1, 0 tokens after the round's own)
    cost, rounds = replay(Fixed(3), [0.0] * 5, COSTS, rng)
    assert rounds == 5
    assert cost == pytest.approx(sum(COSTS.chain_round(k) for k in (3, 3, 2, 1, 0)))


def test_auto_is_fed_the_accepted_positions_and_the_first_rejected():
    class Spy(AdaptiveLength):
        def __init__(self):
            super().__init__(1, COSTS, floor=0)
            self.fed = []

        def update(self, rows, betas):
            self.fed.append(list(betas[0]))
            super().update(rows, betas)

    spy = Spy()
    trace = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    replay(spy, trace, COSTS, random.Random(0))
    assert len(spy.fed[0]) >= 1  # a first round drafts
    t = 0
    for fed in spy.fed:  # each round: the positions from where it starts, up to and with the first rejected
        assert fed == trace[t: t + len(fed)] and 0.0 not in fed[:-1]
        t += len(fed) + (fed[-1:] != [0.0])  # the emitted token: the residual's at a rejection, else one more
    assert t == len(trace)
