"""Print, for every law check of tests/test_verify_kernels.py (and the sss method check of tests/test_speculative.py),
the TV each position reaches against its noise threshold, for the correct rule and for every wrong rule of
``kernels._verify_math.WRONG_VARIANTS`` ("!" marks TV > threshold: the check rejects it)::

    TRITON_INTERPRET=1 .venv/bin/python scripts/law_report.py
"""

import functools
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

import test_speculative as ts  # noqa: E402
import test_verify_kernels as tk  # noqa: E402

from fastalign.kernels import spec_verify_torch  # noqa: E402
from fastalign.kernels._verify_math import WRONG_VARIANTS  # noqa: E402
from fastalign.methods import speculative  # noqa: E402
from fastalign.testing import empirical_law, tiny_causal_lm, total_variation, tv_threshold  # noqa: E402


def fmt(check):
    return "  ".join(f"pos {i}: n {n} TV {tv:.4f} / {thr:.4f}{'!' if tv > thr else ' '}" for i, n, tv, thr in check)


def main():
    for case in tk.CHAIN_LAWS:
        print(f"chain {tk._case_id(case)}  (listed to reject: {', '.join(case[4])})")
        for wrong in (None,) + WRONG_VARIANTS:
            if wrong != "residual_unnormalised":
                print(f"  {str(wrong):22s} {fmt(tk._chain_law(case, wrong))}")
    for case in tk.TREE_LAWS:
        print(f"tree {tk._tree_id(case)}  (listed to reject: {', '.join(case[5]) or '-'})")
        for wrong in (None,) + WRONG_VARIANTS:
            if wrong != "residual_from_p":
                print(f"  {str(wrong):22s} {fmt(tk._tree_law(case, wrong))}")
    target = tiny_causal_lm(vocab_size=ts.V, hidden=16, layers=1, init_range=0.8, seed=0)
    draft = ts.perturbed(target, 0.05, 1)
    models = (target, draft, ts.perturbed(draft, 0.3, 2))
    exact = ts.pi_law(models, ts.PROMPT, 3, 0.8, 3, None, lam=0.7)
    threshold = tv_threshold(exact, ts.DRAWS)
    print(f"method sss, K=2, T=0.8, top-k 3, lam 0.7, {ts.DRAWS} decodes (threshold {threshold:.4f})")
    original = speculative.spec_verify
    try:
        for wrong in (None, "tilt_truncated", "bonus_from_p", "residual_from_p", "ratio_at_T1", "ratio_untruncated"):
            speculative.spec_verify = original if wrong is None else functools.partial(spec_verify_torch, _wrong=wrong)
            out = ts.decode(models, "sss", num_draft_tokens=2, max_new_tokens=3, temperature=0.8, top_k=3, lam=0.7)
            tv = total_variation(empirical_law(out.sequences), exact)
            print(f"  {str(wrong):22s} TV {tv:.4f}{'!' if tv > threshold else ''}")
    finally:
        speculative.spec_verify = original


if __name__ == "__main__":
    main()
