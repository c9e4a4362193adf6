"""Bad-input cases of the spvit ops, run by tests/test_fuzz.py in a subprocess (so that a crash or a hang is
caught and named instead of taking the test run down).

Each case is (op, backend, name, expected argument, call): `call()` runs the op on otherwise valid small
inputs with one argument broken. The case passes when it raises a ValueError or TypeError whose message starts
with the expected argument's name. backend "raw" calls torch.ops.spvit.<op> directly (the dispatcher entry point);
Python-type mistakes that the op schema itself rejects (torch's own RuntimeError, before any project code
runs) are not raw cases.

Run as `python -m tests.fuzz_cases NAME...`: for every case it prints `START <name>`, then
`RESULT <name> <json>` with {"ok": bool, "got": what happened}, flushing after each line; a case that crashes
the process, or runs longer than $SPVIT_FUZZ_CASE_TIMEOUT seconds (default 120; the process is then ended),
leaves a START without a RESULT.
"""

import faulthandler
import json
import os
import re
import sys
import time

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: Triton on CPU without a GPU

import torch  # noqa: E402

from spvit_kernels import ops  # noqa: E402
from spvit_kernels.ops import _registry, _validate  # noqa: E402

H, D = 2, 16  # token_scores: C = 32
LENGTHS = [5, 1, 8]  # cls + candidates (+ packages): an image with no candidate
T = sum(LENGTHS)
META = "meta"


def _cu(lengths=LENGTHS):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu


def _good(op):
    """Valid arguments of `op` as (positional list, keyword dict), schema order."""
    g = torch.Generator().manual_seed(0)
    if op == "token_scores":
        weights = [0.3 * torch.randn(shape, generator=g)
                   for shape in _validate.token_scores_weight_shapes(H, D).values()]
        return [torch.randn(T, H * D, generator=g), _cu(), 1, H, *weights], {}
    if op == "prune_pack":
        return [torch.randn(T, 24, generator=g), _cu(), torch.randn(T, generator=g), torch.rand(T, generator=g),
                1, "topk", 0.0, 2, "mean"], {}
    qkv = torch.randn(T, 3, 1, 32, generator=g)
    return [qkv[:, 0], qkv[:, 1], qkv[:, 2], _cu(), None, None], {}


ARG_INDEX = {
    "token_scores": {n: i for i, n in enumerate(["x", "cu_seqlens", "num_packages", "num_heads",
                                                  *_validate.TOKEN_SCORES_WEIGHTS])},
    "prune_pack": {n: i for i, n in enumerate(["x", "cu_seqlens", "keep_score", "keep_prob", "num_packages",
                                                "mode", "threshold", "num_keep", "package"])},
    "varlen_attention": {n: i for i, n in enumerate(["q", "k", "v", "cu_seqlens", "max_seqlen", "softmax_scale"])},
}


def _wide(t):
    """t as a non-contiguous view along its last dimension (stride 2)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., ::2] = t
    return buf[..., ::2]


# (op, argument broken, label, function of the good value -> bad value, schema_ok). schema_ok False: the raw
# op's schema rejects the Python type itself (torch's error), so the case is not run on "raw".
MUTATIONS = [
    # shared cu_seqlens problems
    *[(op, "cu_seqlens", label, fn, ok) for op in ARG_INDEX for label, fn, ok in [
        ("int64", lambda t: t.long(), True),
        ("2d", lambda t: t[None], True),
        ("one_entry", lambda t: t[:1], True),
        ("not_from_0", lambda t: t + 1, True),
        ("decreasing", lambda t: torch.tensor([0, 9, 4, T], dtype=torch.int32), True),
        ("short_of_T", lambda t: torch.tensor([0, 5, 6, T - 1], dtype=torch.int32), True),
        ("past_T", lambda t: torch.tensor([0, 5, 6, T + 7], dtype=torch.int32), True),
        ("float", lambda t: t.float(), True),
        ("meta", lambda t: t.to(META), True),
        ("list", lambda t: t.tolist(), False),
    ]],
    # token_scores
    ("token_scores", "x", "3d", lambda t: t[None], True),
    ("token_scores", "x", "int", lambda t: t.int(), True),
    ("token_scores", "x", "float64", lambda t: t.double(), True),
    ("token_scores", "x", "strided_cols", _wide, True),
    ("token_scores", "x", "none", lambda t: None, False),
    ("token_scores", "num_packages", "negative", lambda v: -1, True),
    ("token_scores", "num_packages", "too_many_for_an_image", lambda v: 4, True),
    ("token_scores", "num_packages", "float", lambda v: 1.0, False),
    ("token_scores", "num_heads", "one", lambda v: 1, True),
    ("token_scores", "num_heads", "not_dividing", lambda v: 5, True),
    ("token_scores", "num_heads", "head_dim_not_4k", lambda v: 16, True),
    ("token_scores", "w_in", "shape", lambda t: t[:, :-1], True),
    ("token_scores", "ln_weight", "meta", lambda t: t.to(META), True),
    ("token_scores", "se_w2", "int", lambda t: t.int(), True),
    ("token_scores", "b3", "2d", lambda t: t[None], True),
    ("token_scores", "w3", "float64", lambda t: t.double(), True),
    # prune_pack
    ("prune_pack", "x", "1d", lambda t: t[:, 0], True),
    ("prune_pack", "x", "bool", lambda t: t > 0, True),
    ("prune_pack", "x", "strided_cols", _wide, True),
    ("prune_pack", "keep_score", "float16", lambda t: t.half(), True),
    ("prune_pack", "keep_score", "short", lambda t: t[:-1], True),
    ("prune_pack", "keep_score", "meta", lambda t: t.to(META), True),
    ("prune_pack", "keep_prob", "2d", lambda t: t[:, None], True),
    ("prune_pack", "num_packages", "negative", lambda v: -1, True),
    ("prune_pack", "num_packages", "too_many_for_an_image", lambda v: 2, True),
    ("prune_pack", "num_packages", "huge", lambda v: 2**40, True),
    ("prune_pack", "mode", "unknown", lambda v: "bottomk", True),
    ("prune_pack", "package", "unknown", lambda v: "avg", True),
    ("prune_pack", "threshold", "string", lambda v: "0.5", False),
    ("prune_pack", "num_keep", "none_in_topk", lambda v: None, True),
    ("prune_pack", "num_keep", "negative", lambda v: -1, True),
    ("prune_pack", "num_keep", "2**31", lambda v: 2**31, True),
    ("prune_pack", "num_keep", "2**63-1", lambda v: 2**63 - 1, True),
    ("prune_pack", "num_keep", "2**63", lambda v: 2**63, False),
    ("prune_pack", "num_keep", "float", lambda v: 2.0, False),
    # varlen_attention
    ("varlen_attention", "q", "2d", lambda t: t[:, 0], True),
    ("varlen_attention", "q", "int", lambda t: t.int(), True),
    ("varlen_attention", "k", "dtype", lambda t: t.half(), True),
    ("varlen_attention", "v", "shape", lambda t: t[:-1], True),
    ("varlen_attention", "v", "meta", lambda t: t.to(META), True),
    ("varlen_attention", "q", "strided_last_dim", _wide, True),
    ("varlen_attention", "max_seqlen", "negative", lambda v: -1, True),
    ("varlen_attention", "max_seqlen", "too_short", lambda v: 3, True),
    ("varlen_attention", "softmax_scale", "nan", lambda v: float("nan"), True),
    ("varlen_attention", "softmax_scale", "inf", lambda v: float("inf"), True),
]


def backends(op):
    """Backends of `op` that run on CPU tensors in this process, plus "raw" (torch.ops.spvit.<op>)."""
    usable = [b for b in ops.available_backends(op) if "cpu" in _registry._BACKENDS[op][b].device_types()]
    return usable + ["raw"]


def all_cases():
    """{case name: (op, backend, expected argument name, schema_ok, mutation)} for every op x backend."""
    cases = {}
    for op, arg, label, fn, schema_ok in MUTATIONS:
        for backend in backends(op):
            if backend == "raw" and not schema_ok:
                continue
            if backend == "reference" and arg == "x" and label == "float64":
                continue  # the reference accepts float64 tokens on purpose (it is the tests' oracle)
            cases[f"{op}/{backend}/{arg}:{label}"] = (op, backend, arg, fn)
    return cases


def run_case(op, backend, arg, fn):
    args, kw = _good(op)
    i = ARG_INDEX[op][arg]
    args[i] = fn(args[i])
    if backend == "raw":
        getattr(torch.ops.spvit, op)(*args, **kw)
    else:
        getattr(ops, op)(*args, backend=backend, **kw)


# Cases that test the harness itself (never in all_cases): a crash and a hang must be caught and named.
SELF_TESTS = {"selftest/crash": lambda: os.abort(), "selftest/hang": lambda: time.sleep(3600)}


def main(names):
    cases = all_cases()
    # A case running longer than this is a hang: faulthandler's watchdog thread dumps the stacks and ends the
    # process even when the time is spent inside native code.
    case_timeout = float(os.environ.get("SPVIT_FUZZ_CASE_TIMEOUT", "120"))
    for name in names:
        print(f"START {name}", flush=True)
        faulthandler.dump_traceback_later(case_timeout, exit=True)
        try:
            if name in SELF_TESTS:
                SELF_TESTS[name]()
            else:
                run_case(*cases[name])
            result = {"ok": False, "got": "no error"}
        except (ValueError, TypeError) as exc:
            named = re.match(rf"{re.escape(cases[name][2])}\b", str(exc)) is not None
            result = {"ok": named, "got": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # noqa: BLE001 - any other error is a finding, reported by name
            result = {"ok": False, "got": f"{type(exc).__name__}: {exc}"}
        faulthandler.cancel_dump_traceback_later()
        print(f"RESULT {name} {json.dumps(result)}", flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
