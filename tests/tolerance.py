"""Every tolerance in tests/ goes through here, so that each one can be checked against the error it
must absorb on other CPUs.

Two rules, as the tests need them:
  close(a, b, atol=, rtol=)  elementwise |a − b| ≤ atol + rtol·|b| (torch.testing.assert_close's rule,
                             which does the checking); numbers and lists are compared as float64.
  close_norm(a, b, rel=)     ‖a − b‖ / ‖b‖ ≤ rel for one tensor, or for each tensor of two dicts
                             (the adapters of two runs), with the keys equal.
A tolerance of 0 means bit for bit.

With NEO_MARGINS=path in the environment every call also appends one JSON line: the test, the line
that called it, its tolerance and how much of it the measured error used (`used` = worst error ÷
tolerance; 0 when equal, inf when a bit-exact check failed). benchmarks/margins.py runs the suite
under several CPU kernel families (ATEN_CPU_CAPABILITY) and thread counts and turns those lines into
the margin table: margin = 1 / the worst `used` seen anywhere. Nothing is recorded otherwise.
"""
import json
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# torch.testing.assert_close's defaults by dtype (rtol, atol), used when a call gives none.
DEFAULTS = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
            torch.float64: (1e-7, 1e-7)}


def close(actual, expected, *, atol=None, rtol=None, msg=None, **kw):
    """torch.testing.assert_close(actual, expected, ...), recording how much of the tolerance it used."""
    a, b = _tensor(actual), _tensor(expected)
    if atol is None and rtol is None:
        rtol, atol = DEFAULTS.get(b.dtype, (0.0, 0.0))
    atol, rtol = atol or 0.0, rtol or 0.0
    if a.shape == b.shape and a.is_floating_point() and b.is_floating_point():
        err = (a.double() - b.double()).abs()
        used = _share(err, atol + rtol * b.double().abs())
        _record("elementwise", f"atol={atol:g} rtol={rtol:g}", used, err.max().item() if err.numel() else 0.0)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=msg, **kw)


def close_norm(actual, expected, rel):
    """‖actual − expected‖ / ‖expected‖ ≤ rel, per tensor; dicts of tensors compare key by key."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        pairs = [(k, actual[k], expected[k]) for k in expected]
    else:
        pairs = [("", actual, expected)]
    errs = {k: ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300)).item() for k, a, b in pairs}
    worst = max(errs, key=errs.get)
    _record("norm", f"rel={rel:g}", max(errs.values()) / rel if rel else (0.0 if errs[worst] == 0 else math.inf),
            errs[worst])
    assert errs[worst] <= rel, f"{worst}: relative difference {errs[worst]:.2e} > {rel:g}"


def _tensor(x):
    return x if torch.is_tensor(x) else torch.as_tensor(x, dtype=torch.float64)


def _share(err, tol):
    """The worst err / tol over the elements; an exact check (tol 0) used 0 when equal, inf otherwise."""
    if err.numel() == 0:
        return 0.0
    zero = tol == 0
    over = torch.where(zero, torch.where(err == 0, 0.0, math.inf), err / torch.where(zero, 1.0, tol))
    return over.max().item()


def _record(rule, tolerance, used, worst_error):
    path = os.environ.get("NEO_MARGINS")
    if not path:
        return
    caller = sys._getframe(2)  # the test's line: _record <- close <- test
    site = f"{Path(caller.f_code.co_filename).resolve().relative_to(ROOT)}:{caller.f_lineno}"
    row = dict(site=site, test=os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0], rule=rule,
               tolerance=tolerance, used=used, error=worst_error,
               capability=os.environ.get("ATEN_CPU_CAPABILITY", "best"), threads=torch.get_num_threads())
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
