"""Compile every Triton kernel of roialign to a cubin for an sm_90 GPU, without a GPU.

Run by ``test_triton_compile.py``, in a subprocess: kernels defined under ``TRITON_INTERPRET=1``
(as conftest.py has it in the test process) cannot be compiled. Prints one JSON line per
compilation, ``{"kernel": "roi_align._forward_kernel", "case": "bf16", "ok": false, "error": ...}``,
and exits with 0 when every one succeeded, 10 when one failed, 11 (after a ``"toolchain"``
line) when this Triton cannot compile for the target at all (no CUDA backend, no ptxas), 12
(after a ``"table"`` line) when the tables below no longer match the kernels. (Not 1, which is
Python's own exit status for an uncaught exception.)

Each kernel's signature comes from the kernel itself: its parameters, which of them are
``tl.constexpr``, which are pointers (``*_ptr``). The tables hold only what the kernel cannot
tell: the dtype behind each pointer and the constexpr values, as the launchers pass them.
"""

import importlib
import inspect
import itertools
import json
import os
import sys
import traceback

# Both must be gone before triton.jit runs: the first makes every kernel an interpreted one, the
# second lets a compiled kernel read a global that is not a constexpr, which a GPU run rejects.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
EXIT_FAILED, EXIT_TOOLCHAIN, EXIT_TABLE = 10, 11, 12
FEATURES = ("fp32", "fp64", "bf16")  # dtypes of the input feature map

# Pointer dtypes that follow the input's: FEATURE is the input's own dtype, COMPUTE the one the
# launchers compute in for it (``reference.common.compute_dtype``: float64 for float64 input,
# float32 otherwise).
FEATURE = "feature"
COMPUTE = "compute"

# Per kernel:
# - pointers: the dtype behind each ``*_ptr`` parameter, read off the tensors its launcher passes;
# - scalars: the types of the other runtime parameters that are not Python ints. Today every
#   launcher passes ints there (sizes, strides, pooled size, sampling ratio, bands), which Triton
#   types i32, so it is empty; a launcher passing a float (fp32) would need an entry;
# - typical: constexprs and launch options of a typical launch (256 channels pooled to 7 x 7,
#   sampling_ratio 2); a tuple of values means "compile each";
# - ones: those of a launch where every integer argument is 1 (one channel of a 1 x 1 map pooled
#   to 1 x 1, sampling_ratio 1, one band), which Triton specialises into constants.
KERNELS = {
    "roi_align": {
        "_forward_kernel": dict(
            pointers=dict(x_ptr=FEATURE, coords_ptr=COMPUTE, batch_ptr="i32", out_ptr=FEATURE),
            # BLOCK_BINS = next_power_of_2(PH * PW), BLOCK_C = min(block_c(C), 4096 // BLOCK_BINS)
            typical=dict(ALIGNED=(True, False), BLOCK_C=64, BLOCK_BINS=64),
            ones=dict(ALIGNED=False, BLOCK_C=16, BLOCK_BINS=1)),
        "_backward_input_kernel": dict(
            pointers=dict(grad_ptr=COMPUTE, coords_ptr=COMPUTE, order_ptr="i32", spans_ptr="i32", bounds_ptr="i32",
                          out_ptr=COMPUTE),
            # BAND = _BAND_ROWS, BLOCK_C = block_c(C, _BACKWARD_BLOCK_C), num_warps = BLOCK_C // 32
            typical=dict(BAND=(1, 8), ALIGNED=(True, False), BLOCK_C=64, num_warps=2),
            ones=dict(BAND=8, ALIGNED=False, BLOCK_C=16, num_warps=1)),
        "_backward_rois_kernel": dict(
            # grad_ptr: the output's gradient as autograd hands it over, in the input's dtype
            pointers=dict(grad_ptr=FEATURE, x_ptr=FEATURE, coords_ptr=COMPUTE, batch_ptr="i32", out_ptr=COMPUTE),
            typical=dict(ALIGNED=(True, False), BLOCK_C=128),
            ones=dict(ALIGNED=False, BLOCK_C=16)),
    },
    "roi_align_max": {
        "_forward_kernel": dict(
            pointers=dict(x_ptr=FEATURE, ylow_ptr="i64", yhigh_ptr="i64", yfrac_ptr=COMPUTE, yin_ptr="i8",
                          yreal_ptr="i8", xlow_ptr="i64", xhigh_ptr="i64", xfrac_ptr=COMPUTE, xin_ptr="i8",
                          xreal_ptr="i8", batch_ptr="i32", out_ptr=COMPUTE, arg_ptr="i64"),
            typical=dict(ONNX=(False, True), RECORD=(False, True), BLOCK_C=64, BLOCK_BINS=64),
            ones=dict(ONNX=False, RECORD=True, BLOCK_C=16, BLOCK_BINS=1)),
        "_backward_input_kernel": dict(
            pointers=dict(grad_ptr=COMPUTE, arg_ptr="i64", ylow_ptr="i64", yhigh_ptr="i64", yfrac_ptr=COMPUTE,
                          xlow_ptr="i64", xhigh_ptr="i64", xfrac_ptr=COMPUTE, order_ptr="i32", bounds_ptr="i32",
                          out_ptr=COMPUTE),
            typical=dict(ONNX=(False, True), BLOCK_C=32, num_warps=1),
            ones=dict(ONNX=False, BLOCK_C=16, num_warps=1)),
        "_backward_rois_kernel": dict(
            pointers=dict(grad_ptr=COMPUTE, arg_ptr="i64", x_ptr=FEATURE, ylow_ptr="i64", yhigh_ptr="i64",
                          yfrac_ptr=COMPUTE, ymoves_ptr="i8", ydstart_ptr=COMPUTE, ydend_ptr=COMPUTE, xlow_ptr="i64",
                          xhigh_ptr="i64", xfrac_ptr=COMPUTE, xmoves_ptr="i8", xdstart_ptr=COMPUTE,
                          xdend_ptr=COMPUTE, batch_ptr="i32", out_ptr=COMPUTE),
            typical=dict(ONNX=(False, True), BLOCK_C=64),
            ones=dict(ONNX=False, BLOCK_C=16)),
    },
    "prroi_pool": {
        "_forward_kernel": dict(
            pointers=dict(s_ptr="fp64", batch_ptr="i64", xi_ptr="i64", xv_ptr="fp64", yi_ptr="i64", yv_ptr="fp64",
                          out_ptr=COMPUTE),
            typical=dict(ENTRIES=6, BLOCK_C=128),
            ones=dict(ENTRIES=6, BLOCK_C=16)),
        "_backward_input_kernel": dict(
            pointers=dict(grad_ptr=COMPUTE, source_ptr="i64", coef_ptr="fp64", start_ptr="i64", count_ptr="i64",
                          target_ptr="i64", grad_s_ptr="fp64"),
            typical=dict(BLOCK_C=128),
            ones=dict(BLOCK_C=16)),
        "_backward_rois_kernel": dict(
            pointers=dict(s_ptr="fp64", grad_ptr=COMPUTE, batch_ptr="i64", xi_ptr="i64", xv_ptr="fp64",
                          xds_ptr="fp64", xde_ptr="fp64", yi_ptr="i64", yv_ptr="fp64", yds_ptr="fp64",
                          yde_ptr="fp64", out_ptr="fp64"),
            typical=dict(ENTRIES=6, BLOCK_C=128),
            ones=dict(ENTRIES=6, BLOCK_C=16)),
    },
    "roi_align_rotated": {
        "_forward_kernel": dict(
            pointers=dict(x_ptr=FEATURE, params_ptr="fp64", first_ptr="i64", count_ptr="i32", base_ptr="fp64",
                          batch_ptr="i32", out_ptr=COMPUTE),
            # BLOCK_C, BLOCK_BINS, BLOCK_S = _tile(C, PH, PW, sampling_ratio)
            typical=dict(BLOCK_C=16, BLOCK_BINS=64, BLOCK_S=4, num_warps=8),
            ones=dict(BLOCK_C=16, BLOCK_BINS=1, BLOCK_S=1, num_warps=8)),
        "_backward_input_kernel": dict(
            pointers=dict(grad_ptr=COMPUTE, params_ptr="fp64", first_ptr="i64", count_ptr="i32", base_ptr="fp64",
                          order_ptr="i32", spans_ptr="i32", bounds_ptr="i32", out_ptr=COMPUTE),
            typical=dict(BAND=(1, 8), BLOCK_C=64, num_warps=2),
            ones=dict(BAND=8, BLOCK_C=16, num_warps=1)),
        "_backward_rois_kernel": dict(
            pointers=dict(grad_ptr=FEATURE, x_ptr=FEATURE, params_ptr="fp64", first_ptr="i64", count_ptr="i32",
                          base_ptr="fp64", batch_ptr="i32", out_ptr=COMPUTE),
            typical=dict(BLOCK_C=16, BLOCK_BINS=64, BLOCK_S=4),
            ones=dict(BLOCK_C=16, BLOCK_BINS=1, BLOCK_S=1)),
    },
}

OPTIONS = ("num_warps", "num_stages")  # launch options in the tables, not kernel parameters

# Triton 3.2 takes ``constants`` keyed by name (and leaves them out of the argument types
# whatever the signature says); later versions take ``constexprs`` keyed by (index,), marked
# "constexpr" in the signature.
NEW_API = "constexprs" in inspect.signature(ASTSource).parameters


def source(fn, types: dict, constants: dict, aligned: tuple) -> ASTSource:
    """``fn`` with ``types`` for its runtime parameters and ``constants`` for the others; the
    pointers in ``aligned`` marked 16-byte aligned, as those of torch's allocations are."""
    signature = {name: ("constexpr" if name in constants else types[name]) for name in fn.arg_names}
    index = {name: i for i, name in enumerate(fn.arg_names)}
    if NEW_API:
        return ASTSource(fn=fn, signature=signature, constexprs={(index[k],): v for k, v in constants.items()},
                         attrs={(index[name],): [["tt.divisibility", 16]] for name in aligned})
    from triton.backends.compiler import AttrsDescriptor
    return ASTSource(fn=fn, signature=signature, constants=dict(constants),
                     attrs=AttrsDescriptor.from_hints({index[name]: 16 for name in aligned}))


def _combinations(values: dict):
    """(constexprs, options) for every combination of the values given as tuples."""
    choices = [v if isinstance(v, tuple) else (v,) for v in values.values()]
    for combo in itertools.product(*choices):
        chosen = dict(zip(values, combo))
        yield ({k: v for k, v in chosen.items() if k not in OPTIONS},
               {k: v for k, v in chosen.items() if k in OPTIONS})


def cases(qualname: str, fn, spec: dict):
    """(case, types, constants, aligned pointers, options) of every compilation of ``fn``."""
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    pointers = [p.name for p in fn.params if not p.is_constexpr and p.name.endswith("_ptr")]
    scalars = [p.name for p in fn.params if not p.is_constexpr and not p.name.endswith("_ptr")]
    # A parameter the table does not know (or one it knows that is gone) would otherwise be
    # compiled with a guessed type, or not at all: say what to add instead.
    problems = []

    def compare(what: str, table: set, kernel: set) -> None:
        if kernel - table:
            problems.append(f"{what} for {sorted(kernel - table)}")
        if table - kernel:
            problems.append(f"no {what} for {sorted(table - kernel)}, which the kernel no longer has")

    compare("pointer dtypes", set(spec["pointers"]), set(pointers))
    for variant in ("typical", "ones"):
        compare(f"{variant} constexpr values", set(spec[variant]) - set(OPTIONS), constexprs)
    extra = set(spec.get("scalars", {})) - set(scalars)
    if extra:
        problems.append(f"no scalar types for {sorted(extra)}, which the kernel no longer has")
    if problems:
        raise LookupError(f"{qualname}: the table in {os.path.basename(__file__)} needs " + "; ".join(problems))
    scalar_types = {name: spec.get("scalars", {}).get(name, "i32") for name in scalars}

    def types_for(feature: str) -> dict:
        meaning = {FEATURE: feature, COMPUTE: "fp64" if feature == "fp64" else "fp32"}
        return {**{p: "*" + meaning.get(spec["pointers"][p], spec["pointers"][p]) for p in pointers}, **scalar_types}

    varied = [k for k, v in spec["typical"].items() if isinstance(v, tuple)]
    for feature in FEATURES:
        for constants, options in _combinations(spec["typical"]):
            label = ",".join([feature] + [f"{k}={constants.get(k, options.get(k))}" for k in varied])
            yield label, types_for(feature), constants, tuple(pointers), options
    # Every integer argument 1, made a constant as a launch does (a contiguous map's last stride
    # is always 1); with unaligned pointers, the other case a launch can meet (a view at an offset).
    ones = {name: 1 for name, t in scalar_types.items() if t == "i32"}
    for constants, options in _combinations(spec["ones"]):
        yield "ones", types_for("fp32"), {**constants, **ones}, (), options


def plan() -> list:
    """Every compilation, in a fixed order: (kernel, case, fn, types, constants, aligned, options)."""
    work = []
    for module_name, kernels in KERNELS.items():
        module = importlib.import_module(f"roialign.kernels.triton.{module_name}")
        # Kernels are the module's jitted ``*_kernel`` functions; the rest are device functions
        # compiled into them.
        jitted = {name for name, value in vars(module).items()
                  if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel")}
        if jitted != set(kernels):
            raise LookupError(f"{module_name}: kernels {sorted(jitted - set(kernels))} are missing from the table in "
                              f"{os.path.basename(__file__)}, {sorted(set(kernels) - jitted)} are gone")
        for name, spec in kernels.items():
            fn = getattr(module, name)
            for case in cases(f"{module_name}.{name}", fn, spec):
                work.append((f"{module_name}.{name}", case[0], fn, *case[1:]))
    return work


def error_text(error: BaseException) -> str:
    """Triton's message and what caused it: a CompilationError's cause names the culprit."""
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause) not in text:
        text += "\ncaused by: " + "".join(traceback.format_exception_only(type(cause), cause)).strip()
    return text[-6000:]


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


def main(argv: list) -> int:
    # --shard=I/N: compile every N-th compilation from the I-th, so that N processes share the work.
    shard, shards = 0, 1
    for arg in argv:
        if arg.startswith("--shard="):
            shard, shards = (int(v) for v in arg.removeprefix("--shard=").split("/"))
    # A trivial kernel first: if it cannot be compiled, the toolchain is missing, not our kernels.
    try:
        triton.compile(source(_probe, {"x_ptr": "*fp32"}, {}, ()), target=TARGET)
    except Exception as error:  # whatever this Triton raises for a missing backend or ptxas
        print(json.dumps({"toolchain": False, "triton": triton.__version__, "error": error_text(error)}), flush=True)
        return EXIT_TOOLCHAIN
    try:
        work = plan()
    except LookupError as error:
        print(json.dumps({"table": False, "error": str(error)}), flush=True)
        return EXIT_TABLE
    status = 0
    for kernel, label, fn, types, constants, aligned, options in work[shard::shards]:
        record = {"kernel": kernel, "case": label, "ok": True, "error": None}
        try:
            compiled = triton.compile(source(fn, types, constants, aligned), target=TARGET, options=options)
            if not compiled.asm.get("cubin"):
                raise RuntimeError(f"no cubin among {sorted(compiled.asm)}")
        except Exception as error:  # reported per compilation; the others still run
            record.update(ok=False, error=error_text(error))
            status = EXIT_FAILED
        print(json.dumps(record), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
