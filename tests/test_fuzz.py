"""The ops under hostile and random input.

1. Bad inputs (tests/fuzz_cases.py) per op x backend (reference, cpu, triton under the interpreter, the raw
   torch.ops.spvit entry point), all in one subprocess with a time limit: a crash or hang fails the test and
   names the case; every case must raise a ValueError / TypeError whose message starts with the argument.
2. Seeded random property checks of each op and backend against the float64 references: ragged lengths with
   0- and 1-candidate images, row-strided tokens, strided cu_seqlens / keep_score, every dtype, both pruning
   modes and every package mode. The seed is in the test id: a failure reproduces with that id alone.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from spvit_kernels import ops
from spvit_kernels.ops import _registry

from . import fuzz_cases
from . import test_prune_pack as pp
from . import test_token_scores as ts
from . import test_varlen_attention as va
from .utils import DTYPES, make_cu_seqlens, non_contiguous

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- 1. bad inputs, in a subprocess ---------------------------------------------------------------------------

def _run_cases(names, timeout, case_timeout=120):
    """Run the cases in subprocesses: {name: {"ok", "got"}}. A case that crashes or hangs its process (more
    than `case_timeout` s) is recorded as such and the remaining cases go on in a fresh process; `timeout`
    bounds each process as a whole."""
    results, todo = {}, list(names)
    env = dict(os.environ, SPVIT_FUZZ_CASE_TIMEOUT=str(case_timeout))
    while todo:
        proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz_cases", *todo], cwd=ROOT, text=True, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode == 0:
                died = None
            elif "Timeout (" in err:  # faulthandler's watchdog ended a case that ran too long
                died = f"hung (more than {case_timeout} s)"
            else:
                died = f"crashed the process (exit code {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            died = f"hung (the process gave no answer within {timeout} s)"
        started = None
        for line in out.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "START":
                started = rest
            elif kind == "RESULT":
                name, _, payload = rest.partition(" ")
                results[name] = json.loads(payload)
                started = None
        if started is not None:  # the case that was running when the process died or hung
            results[started] = {"ok": False, "got": f"{died or 'no result'}; stderr: {err[-1500:]}"}
        elif died is not None or any(n not in results for n in todo):
            raise AssertionError(f"the fuzz worker failed outside any case ({died})\n{err[-3000:]}")
        todo = [n for n in todo if n not in results]
    return results


@pytest.fixture(scope="module")
def bad_input_results():
    cases = fuzz_cases.all_cases()
    return cases, _run_cases(list(cases), timeout=120 + len(cases))


def test_a_crash_or_hang_is_caught_and_named():
    """The harness: a case that aborts the process or hangs is reported by name, the others still run."""
    first, last = "prune_pack/reference/num_keep:negative", "varlen_attention/reference/q:2d"
    results = _run_cases([first, "selftest/crash", "selftest/hang", last], timeout=300, case_timeout=3)
    assert results[first]["ok"] and results[last]["ok"]
    assert not results["selftest/crash"]["ok"] and "crashed" in results["selftest/crash"]["got"]
    assert not results["selftest/hang"]["ok"] and "hung" in results["selftest/hang"]["got"]


def _groups():
    return [(op, b) for op in fuzz_cases.ARG_INDEX for b in fuzz_cases.backends(op)]


@pytest.mark.parametrize("op,backend", _groups(), ids=[f"{o}-{b}" for o, b in _groups()])
def test_bad_inputs_raise_named_errors(bad_input_results, op, backend):
    cases, results = bad_input_results
    mine = [n for n, c in cases.items() if c[0] == op and c[1] == backend]
    assert len(mine) >= 10
    failed = {n: results[n]["got"] for n in mine if not results[n]["ok"]}
    assert not failed, "cases without a ValueError/TypeError naming the argument:\n" + "\n".join(
        f"  {n}: {got}" for n, got in failed.items())


# --- 2. random property checks against the float64 references -------------------------------------------------

def _cpu_backends(op):
    usable = [b for b in ops.available_backends(op) if "cpu" in _registry._BACKENDS[op][b].device_types()]
    return usable + ["raw"]


# Seeds per backend (Triton under the interpreter is slower): sized so that this file stays well under a minute.
SEEDS, TRITON_SEEDS = 20, 8


def _seeds(op):
    """(backend, seed) pairs of the random checks of `op`."""
    return [(b, s) for b in _cpu_backends(op) for s in range(TRITON_SEEDS if b == "triton" else SEEDS)]


def _spatial(rng, max_images=4, longest=40):
    """Candidates per image: a mix of 0, 1 and random counts, and one image with >= 8 (so scores vary)."""
    spatial = [rng.choice([0, 1, rng.randint(2, longest)]) for _ in range(rng.randint(0, max_images - 1))]
    spatial.insert(rng.randint(0, len(spatial)), rng.randint(8, longest))
    return spatial


def _maybe_strided(rng, t):
    return non_contiguous(t) if rng.random() < 0.5 else t


@pytest.mark.parametrize("backend,seed", _seeds("token_scores"))
def test_token_scores_random(backend, seed):
    rng = random.Random(seed)
    H, d = rng.choice([(2, 16), (3, 8), (4, 12), (2, 32)])
    dtype = rng.choice(DTYPES)
    P = rng.randint(0, 3)
    x, cu = ts.make_tokens(_spatial(rng), P, H * d, dtype, seed=seed,
                           row_stride=H * d + 5 if rng.random() < 0.5 else None)
    weights = ts.make_weights(H, d, dtype=rng.choice([torch.float32, dtype]), seed=seed)
    cu_arg = _maybe_strided(rng, cu)
    if backend == "raw":
        out = torch.ops.spvit.token_scores(x, cu_arg, P, H, *weights)
    else:
        out = ops.token_scores(x, cu_arg, P, H, *weights, backend=backend)
    tol = (ts.TRITON_TOL if backend == "triton" else ts.CPU_TOL)[dtype]
    if backend == "reference":
        tol = ts.TRITON_TOL[dtype]  # rounds like PyTorch in the token dtype
    ts.check_against_oracle(out, x, cu, P, H, weights, tol)


@pytest.mark.parametrize("backend,seed", _seeds("prune_pack"))
def test_prune_pack_random(backend, seed):
    rng = random.Random(seed)
    dtype = rng.choice(DTYPES)
    P = rng.randint(0, 3)
    spatial = _spatial(rng)
    x, cu, score, prob = pp.make_batch(spatial, P, rng.choice([7, 24, 64]), dtype, rng.choice(pp.PATTERNS),
                                       seed=seed)
    mode, package = rng.choice(["topk", "threshold"]), rng.choice(pp.PACKAGES)
    threshold = rng.choice([0.0, -0.5, 0.3])
    num_keep = rng.randint(0, max(spatial) + 3) if mode == "topk" else None
    if rng.random() < 0.5:  # rows with a stride other than C
        wide = torch.full((x.shape[0], x.shape[1] + 3), float("nan"), dtype=dtype)
        wide[:, :x.shape[1]] = x
        x = wide[:, :x.shape[1]]
    args = (x, _maybe_strided(rng, cu), _maybe_strided(rng, score), _maybe_strided(rng, prob), P, mode)
    if backend == "raw":
        out = torch.ops.spvit.prune_pack(*args, threshold, num_keep, package)
    else:
        out = ops.prune_pack(*args, threshold, num_keep, package, backend=backend)
    pp.check_against_oracle(out, x, cu, score, prob, P, mode, threshold, num_keep, package)
    if mode == "topk":  # the documented size: fixed by the shapes
        k = min(num_keep, x.shape[0] - len(spatial) * (1 + P))
        assert out[0].shape[0] == len(spatial) * (1 + P + (package != "none") + k)


@pytest.mark.parametrize("backend,seed", _seeds("varlen_attention"))
def test_varlen_attention_random(backend, seed):
    rng = random.Random(seed)
    dtype = rng.choice(DTYPES)
    lengths = [rng.choice([0, 1, 2, rng.randint(3, 40)]) for _ in range(rng.randint(1, 4))]
    q, k, v, cu = va.make_qkv(lengths, rng.randint(1, 3), rng.choice(va.HEAD_DIMS), dtype)
    cu_arg = _maybe_strided(rng, cu)
    max_seqlen = rng.choice([None, max(lengths) + rng.randint(0, 3)])
    if backend == "raw":
        out = torch.ops.spvit.varlen_attention(q, k, v, cu_arg, max_seqlen)
    else:
        out = ops.varlen_attention(q, k, v, cu_arg, max_seqlen, backend=backend)
    va.assert_matches_oracle(out, q, k, v, cu)


def test_strided_cu_seqlens_helper_is_strided():
    """The property checks' strided cu_seqlens really is a view with poison in between."""
    cu = make_cu_seqlens([3, 4])
    view = non_contiguous(cu)
    assert view.stride(0) == 2 and torch.equal(view, cu) and int(view._base[1]) == -77
