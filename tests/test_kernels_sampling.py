"""The ``entropy`` and ``sample`` Triton kernels against their references, on ``kernel_device`` (conftest): the
interpreter on CPU, or the compiled kernels on a GPU (``TRITON_INTERPRET=0``), the references on the same device.

Shapes are small on purpose: the interpreter runs every program in Python.
"""

import math

import pytest
import torch

from fastalign.kernels import entropy, entropy_torch, sample, sample_torch, truncate_logits
from fastalign.kernels._entropy_triton import entropy_triton
from fastalign.kernels._sample_triton import sample_triton, truncation_threshold
from fastalign.kernels.rng import uniform_grid_torch

NEG_INF = float("-inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTALIGN_KERNELS", "triton")


def masked_rows(R, V, dtype=torch.float32, scale=3.0, device="cpu"):
    """Random logits with the edge cases docs/design.md section 3 names: masked entries, all-but-one masked."""
    x = torch.randn(R, V) * scale
    if R > 1:
        x[1, torch.rand(V) < 0.5] = NEG_INF  # scattered mask
    if R > 2:
        keep = int(torch.randint(V, ()))
        x[2] = NEG_INF
        x[2, keep] = 1.5  # all but one masked
    return x.to(device=device, dtype=dtype)


def kept_mask(logits, temperature, top_k, top_p):
    """Finite entries of the reference truncation."""
    return truncate_logits(logits, temperature, top_k, top_p) > NEG_INF


def triton_kept_mask(logits, temperature, top_k, top_p):
    tau = truncation_threshold(logits.contiguous(), temperature, top_k, top_p)
    x = logits.float() / temperature
    keep = x > NEG_INF
    return keep if tau is None else keep & (x >= tau[:, None])


# ---------------------------------------------------------------- entropy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,V,chunk", [(4, 300, None), (3, 300, 64), (2, 2500, None), (2, 1100, 1024), (1, 37, 5)])
def test_entropy_matches_reference(dtype, R, V, chunk, kernel_device):
    x = masked_rows(R, V, dtype, device=kernel_device)
    for temperature in (1.0, 0.7):
        h, lse = entropy_triton(x, temperature, chunk_size=chunk)
        h_ref, lse_ref = entropy_torch(x, temperature)
        assert h.dtype == lse.dtype == torch.float32 and h.shape == lse.shape == (R,)
        torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)
    if R > 2:  # the all-but-one-masked row is a point mass
        assert h[2].item() == pytest.approx(0.0, abs=1e-6)
        assert lse[2].item() == pytest.approx(1.5 / 0.7, rel=1e-6)


@pytest.mark.parametrize("chunk", [None, 2])
def test_entropy_single_token_and_uniform_rows(chunk, kernel_device):
    dev = kernel_device
    h, lse = entropy_triton(torch.tensor([[0.3], [-2.0]], device=dev), chunk_size=chunk)
    torch.testing.assert_close(h, torch.zeros(2, device=dev))
    torch.testing.assert_close(lse, torch.tensor([0.3, -2.0], device=dev))
    V = 50
    x = torch.full((2, V), 4.0, device=dev)
    x[1, 25:] = NEG_INF  # a fully masked chunk in the split path
    h, lse = entropy_triton(x, chunk_size=10 if chunk else None)
    torch.testing.assert_close(h, torch.tensor([math.log(V), math.log(25)], device=dev))
    torch.testing.assert_close(lse, torch.tensor([4.0 + math.log(V), 4.0 + math.log(25)], device=dev))


def test_entropy_large_logits_stay_accurate(kernel_device):
    # entropy is computed relative to the running max: no cancellation of lse - E[x] at |x| ~ 1e4
    # (compared with the reference on the exactly shifted logits, and with the reference on x itself)
    x = (torch.randn(3, 400) + 1e4).to(kernel_device)
    shifted = x - 1e4  # exact (Sterbenz)
    h_ref, lse_ref = entropy_torch(shifted)
    for h, lse in [entropy_triton(x, chunk_size=chunk) for chunk in (None, 128)] + [entropy_torch(x)]:
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, lse_ref + 1e4, rtol=1e-7, atol=2e-3)


@pytest.mark.parametrize("temperature", [1e-4, 1e-6, 1e-9])
def test_entropy_of_tied_logits_at_a_small_temperature(temperature, kernel_device):
    """Two tied maxima are a fair coin at every temperature: log 2 nats (the reference gave 0 at T = 1e-6, where
    ``x - logsumexp(x)`` at x = 3e7 rounds the log 2 away), and a single maximum 0."""
    x = torch.tensor([[30.0, 30.0, -20.0], [1.0, 2.0, 3.0]], device=kernel_device)
    expected = torch.tensor([math.log(2), 0.0], device=kernel_device)
    for h, _ in [entropy_torch(x, temperature)] + [entropy_triton(x, temperature, chunk_size=c) for c in (None, 2)]:
        torch.testing.assert_close(h, expected, rtol=0, atol=1e-6)


def test_entropy_dispatch_and_errors(triton_backend, kernel_device):
    x = torch.randn(2, 64).to(kernel_device)
    h, lse = entropy(x, 0.9)
    h_t, lse_t = entropy_triton(x, 0.9)
    assert torch.equal(h, h_t) and torch.equal(lse, lse_t)
    x_t = torch.randn(64, 2).to(kernel_device).t()  # non-contiguous
    torch.testing.assert_close(entropy(x_t)[0], entropy_torch(x_t)[0])
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 3] = bad
        with pytest.raises(ValueError):
            entropy(y)
    with pytest.raises(ValueError, match="entirely -inf"):
        entropy(torch.full((1, 4), NEG_INF, device=kernel_device))
    h_nv, lse_nv = entropy(x, 0.9, validate=False)  # skips the checks only
    assert torch.equal(h_nv, h) and torch.equal(lse_nv, lse)


# ---------------------------------------------------------------- sample: exact thresholds

@pytest.mark.parametrize("dtype,top_k,top_p,temperature", [
    (torch.float32, 5, None, 1.0), (torch.bfloat16, 5, None, 0.6), (torch.float16, 1, None, 1.0),
    (torch.float32, 2, None, 0.8), (torch.float32, None, 0.9, 0.6), (torch.bfloat16, None, 0.3, 1.0),
    (torch.float16, None, 0.9, 1.3), (torch.float32, 8, 0.7, 1.0), (torch.bfloat16, 8, 0.7, 0.7),
])
def test_threshold_keeps_exactly_the_reference_set(dtype, top_k, top_p, temperature, kernel_device):
    x = masked_rows(4, 200, dtype, device=kernel_device)
    assert torch.equal(triton_kept_mask(x, temperature, top_k, top_p), kept_mask(x, temperature, top_k, top_p))


@pytest.mark.parametrize("top_k,top_p", [(3, None), (6, None), (None, 0.5), (None, 0.75), (4, 0.6)])
def test_threshold_ties_at_the_boundary_are_kept(top_k, top_p, kernel_device):
    # few distinct values: the k-th value and the top-p boundary fall inside tie groups
    x = torch.randint(0, 4, (4, 40)).float().to(device=kernel_device, dtype=torch.bfloat16)
    x[0, :] = 1.0  # every entry tied
    x[1, ::3] = NEG_INF
    ref = kept_mask(x, 1.0, top_k, top_p)
    got = triton_kept_mask(x, 1.0, top_k, top_p)
    assert torch.equal(got, ref)
    assert ref[0].all()  # a fully tied row keeps everything
    if top_k is not None and top_p is None:
        assert (ref.sum(1) >= top_k).all() and (ref.sum(1) > top_k).any()  # ties really were kept


def test_threshold_extreme_values_and_signed_zero(kernel_device):
    # exercises the integer-image pivots (huge ranges) and -0.0 == +0.0 ties
    row = torch.tensor([-3e38, -1e20, -1e-30, 1e-40, 0.0, -0.0, 0.0, 5.0, 1e30, 2e30, -7.0, 1e-40],
                       device=kernel_device)
    x = torch.stack([row, -row])
    for k in (2, 4, 6, 7, 9, 11):  # boundaries on 1e-40 ties, on the +-0 ties, among huge values
        assert torch.equal(triton_kept_mask(x, 1.0, k, None), kept_mask(x, 1.0, k, None)), k


def test_threshold_edge_cases(kernel_device):
    x = masked_rows(3, 30, device=kernel_device)
    x[0, 10:] = NEG_INF  # 10 finite entries, k larger: everything finite is kept
    for top_k, top_p in [(12, None), (30, None), (100, None), (None, 1.0), (None, None)]:
        assert torch.equal(triton_kept_mask(x, 1.0, top_k, top_p), kept_mask(x, 1.0, top_k, top_p))
    assert truncation_threshold(x, 1.0, 30, 1.0) is None  # k >= V and p = 1: nothing to truncate


# ---------------------------------------------------------------- sample: token for token


@pytest.mark.parametrize("dtype,top_k,top_p,temperature,seed,chunk", [
    (torch.float32, None, None, 1.0, 0, None), (torch.bfloat16, None, None, 0.7, 1, 128),
    (torch.float16, None, None, 1.5, 2**40 + 3, 100), (torch.float32, 7, None, 0.7, 2, 128),
    (torch.bfloat16, 7, None, 1.0, 3, None), (torch.float32, None, 0.8, 1.3, 4, 64),
    (torch.float16, None, 0.8, 1.0, 5, None), (torch.float32, 20, 0.9, 0.8, 6, 128),
    (torch.bfloat16, 20, 0.9, 1.0, 7, None),
])
def test_sample_matches_reference_token_for_token(dtype, top_k, top_p, temperature, seed, chunk, kernel_device):
    x = masked_rows(4, 300, dtype, device=kernel_device)
    ref = sample_torch(x, temperature, top_k, top_p, seed)
    got = sample_triton(x, temperature, top_k, top_p, seed, chunk_size=chunk)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref)
    assert ref[2] == int(torch.argmax(x[2].float()))  # all but one masked


def test_sample_many_seeds_split_vocab(kernel_device):
    x = torch.randn(2, 1100).to(kernel_device)
    x[1, 500:] = NEG_INF  # the last chunk is fully masked
    for seed in range(6):
        ref = sample_torch(x, 1.0, None, None, seed)
        assert torch.equal(sample_triton(x, 1.0, None, None, seed, chunk_size=300), ref)
        assert torch.equal(sample_triton(x, 1.0, None, None, seed), ref)


def test_sample_single_token_rows_and_greedy_ties(kernel_device):
    one_token = torch.tensor([[0.5], [-3.0]], device=kernel_device)
    assert sample_triton(one_token, 0.8, None, 0.5, seed=3).tolist() == [0, 0]
    # top_k=1 keeps every tie of the maximum: the draw is uniform among them, token for token
    x = torch.zeros(3, 20, device=kernel_device)
    x[:, [4, 9, 17]] = 2.0
    for seed in range(6):
        got = sample_triton(x, 1.0, 1, None, seed, chunk_size=8)
        assert torch.equal(got, sample_torch(x, 1.0, 1, None, seed))
        assert set(got.tolist()) <= {4, 9, 17}


def test_sample_dispatch_and_errors(triton_backend, kernel_device):
    x = torch.randn(3, 50).to(kernel_device)
    assert torch.equal(sample(x, 0.9, 5, 0.9, seed=7), sample_torch(x, 0.9, 5, 0.9, seed=7))
    assert torch.equal(sample(x, 0.9, 5, 0.9, seed=7, validate=False), sample_torch(x, 0.9, 5, 0.9, seed=7))
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[0, 1] = bad
        with pytest.raises(ValueError):
            sample(y, seed=0)
    with pytest.raises(ValueError, match="entirely -inf"):
        sample(torch.full((1, 4), NEG_INF, device=kernel_device))
    for kwargs in (dict(temperature=0.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_triton(x, **kwargs)
        with pytest.raises(ValueError):
            sample_torch(x, **kwargs)


# ---------------------------------------------------------------- sample: the law of the draws


def empirical(tokens, V):
    return torch.bincount(tokens, minlength=V).double() / tokens.numel()


def assert_law(freq, probs, n):
    """Every token within 5 standard errors of its probability; dropped tokens never drawn."""
    probs = probs.double()
    tol = 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-9
    assert ((freq - probs).abs() <= tol).all(), (freq, probs)
    assert (freq[probs == 0] == 0).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.8), (1.0, 5, 0.6)])
def test_sample_reference_follows_truncated_softmax(temperature, top_k, top_p):
    # distinct rows draw independent noise (row r's own stream), so one call with N copies of a row = N draws
    V, N = 12, 40000
    row = torch.randn(1, V) * 1.5
    row[0, 3] = NEG_INF
    probs = torch.softmax(truncate_logits(row, temperature, top_k, top_p), -1)[0]
    freq = empirical(sample_torch(row.expand(N, V), temperature, top_k, top_p, seed=11), V)
    assert_law(freq, probs, N)
    # and across seeds for a fixed row
    seeds = torch.stack([sample_torch(row, temperature, top_k, top_p, seed=s) for s in range(1000)]).flatten()
    assert_law(empirical(seeds, V), probs, 1000)


def test_sample_triton_follows_truncated_softmax(kernel_device):
    # small (each row is one interpreted program): the exact kept sets and token-for-token equality
    # with the reference are tested above; this checks the kernel's own draws against the law
    V, N = 6, 160
    row = torch.tensor([[1.0, 0.5, NEG_INF, 0.0, -1.0, 1.0]], device=kernel_device)
    probs = torch.softmax(row, -1)[0]
    assert_law(empirical(sample_triton(row.expand(N, V), 1.0, None, None, seed=5), V), probs, N)
    probs = torch.softmax(truncate_logits(row, 1.0, 2, None), -1)[0]  # keeps the tie at 1.0
    assert_law(empirical(sample_triton(row.expand(40, V), 1.0, 2, None, seed=6), V), probs, 40)


@pytest.mark.parametrize("temperature", [1e-4, 1e-6, 1e-9])
@pytest.mark.parametrize("top_k,top_p", [(None, None), (2, None), (None, 0.9)])
def test_sample_splits_tied_logits_evenly_at_a_small_temperature(temperature, top_k, top_p):
    """Logits (30, 30, -20): the law is 1/2, 1/2, 0 at every temperature. At a small T the scaled logits are huge
    (3e7 at T = 1e-6, where fp32 spacing is 2), and noise added to them without the row maximum taken out is
    rounded away, so the tie went to the first index (P(0) = 0.73 at T = 1e-6, 1.0 at 1e-9). The unshifted rule
    on the same uniforms fails this check at the two smaller temperatures: the test can tell them apart."""
    N = 40000
    row = torch.tensor([[30.0, 30.0, -20.0]])
    probs = torch.tensor([0.5, 0.5, 0.0])
    assert_law(empirical(sample_torch(row.expand(N, 3), temperature, top_k, top_p, seed=3), 3), probs, N)
    if temperature < 1e-5:
        x = truncate_logits(row.expand(N, 3), temperature, top_k, top_p)
        unshifted = torch.argmax(x - torch.log(-torch.log(uniform_grid_torch(3, N, 3))), dim=-1)
        with pytest.raises(AssertionError):
            assert_law(empirical(unshifted, 3), probs, N)


def test_sample_triton_splits_tied_logits_evenly_at_a_small_temperature(kernel_device):
    N = 200  # interpreted: one program per row
    row = torch.tensor([[30.0, -20.0, 30.0, 30.0]], device=kernel_device)
    for temperature, top_k in ((1e-9, None), (1e-7, 3)):
        got = sample_triton(row.expand(N, 4), temperature, top_k, None, seed=4)
        assert torch.equal(got, sample_torch(row.expand(N, 4), temperature, top_k, None, seed=4))
        assert_law(empirical(got.cpu(), 4), torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]), N)


def test_top_p_with_the_mass_exactly_p_keeps_the_smallest_nucleus(kernel_device):
    """The documented rule (kernels/truncation.py): top-p keeps the tokens of probability >= t for the largest t
    at which the kept mass is >= p. Probabilities [.5, .25, .25] (exact in fp32) with p = .5: t = .5 already
    keeps mass .5, so only the .5 token stays; any p above .5 needs t = .25, and the tie keeps both .25 tokens.
    The reference and the Triton threshold agree, and every draw at p = .5 is the .5 token."""
    x = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]).log().to(kernel_device)
    assert torch.softmax(x, -1).tolist() == [[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]
    top = x == x.max(-1, keepdim=True).values
    for top_p, expected in ((0.5, top), (0.4, top), (0.5000001, torch.ones_like(top)), (0.75, torch.ones_like(top))):
        assert torch.equal(kept_mask(x, 1.0, None, top_p), expected), top_p
        assert torch.equal(triton_kept_mask(x, 1.0, None, top_p), expected), top_p
    for seed in range(8):
        assert sample_torch(x, 1.0, None, 0.5, seed).tolist() == [0, 2]
        assert sample_triton(x, 1.0, None, 0.5, seed).tolist() == [0, 2]
