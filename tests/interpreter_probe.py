"""Does this Triton's interpreter run a loop whose bound is a loaded scalar (as our kernels do)?

Triton <= 3.5's interpreter turns such a bound into a Python int with ``int()`` on a 1-element
array, which numpy 2.4 rejects ("only 0-dimensional arrays can be converted to Python
scalars"): every interpreted kernel of ours then fails, whatever its code. Probed once, so that
the test run stops with that explanation instead of a hundred identical failures.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _count(bound_ptr, out_ptr):
    total = 0
    for _ in range(0, tl.load(bound_ptr)):
        total += 1
    tl.store(out_ptr, total)


def interpreter_problem() -> str | None:
    """None when the interpreter runs the probe, else what goes wrong."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](torch.tensor([3], dtype=torch.int32), out)
    except Exception as error:  # the interpreter wraps what failed
        return f"{type(error).__name__}: {error}"
    return None if int(out[0]) == 3 else f"the probe counted {int(out[0])} iterations instead of 3"
