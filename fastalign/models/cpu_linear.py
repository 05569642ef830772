"""Layer 2: a model's linear layers on the native few-row loop (``native.linear_rows``) for the static path.

A decode step of a small batch multiplies one to four rows by every weight matrix of the model, so on a CPU its
speed is how fast one core streams the weights; BLAS's matrix-vector path reaches much less than that
(``bench/bench_kernels.py --ops linear_rows`` measures both).

``with_native_linears(module)`` returns a copy of ``module``'s structure that shares every parameter and buffer
(no weight is copied; tied weights stay tied) and whose fp32 CPU ``nn.Linear`` layers call
``torch.ops.fastalign.linear_rows`` on blocks of at most ``native.LINEAR_MAX_ROWS`` rows. The model the caller
gave is left as it is. The op is opaque to ``torch.compile`` (a compiled step calls it as one kernel) and decides
at each call, in ``native.linear_rows``, whether the native loop runs or ``F.linear`` does (more than one torch
thread, ``FASTALIGN_NATIVE=0``, a CPU without AVX2).
"""

from __future__ import annotations

import copy
import itertools

import torch

from . import native


# A plain dispatcher op (not ``torch.library.custom_op``, whose Python wrapper costs more per call than a small
# layer's product): a CPU kernel and a fake one for torch.compile's tracing.
_LIBRARY = torch.library.Library("fastalign", "FRAGMENT")
_LIBRARY.define("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _linear_rows_cpu(x, weight, bias):
    return native.linear_rows(x, weight, bias)


_LIBRARY.impl("linear_rows", _linear_rows_cpu, "CPU")


@torch.library.register_fake("fastalign::linear_rows", lib=_LIBRARY)
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


linear_rows_op = torch.ops.fastalign.linear_rows  # ``native.linear_rows`` as a torch op


MIN_WEIGHT_ELEMENTS = 2**16  # smaller layers stay on F.linear: their weights stay in cache, and a call costs ~10 us


class RowsLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose blocks of a few rows go to ``linear_rows`` (set as the class of a copied layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= native.LINEAR_MAX_ROWS * self.in_features:
            return linear_rows_op(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def native_linears_apply(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on ``device`` in ``dtype`` would gain from ``with_native_linears`` on this machine."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and native.native_linear_supported()


def with_native_linears(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module``'s structure sharing its parameters and buffers, its fp32 CPU ``nn.Linear`` layers
    (exactly that class, contiguous weights of at least ``MIN_WEIGHT_ELEMENTS``) turned into ``RowsLinear`` (the
    module docstring)."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    twin = copy.deepcopy(module, memo=shared)
    for layer in twin.modules():
        if (type(layer) is torch.nn.Linear and layer.weight.device.type == "cpu"
                and layer.weight.dtype == torch.float32 and layer.weight.is_contiguous()
                and layer.weight.numel() >= MIN_WEIGHT_ELEMENTS):
            layer.__class__ = RowsLinear
    return twin
