"""Fails when PTX holds a float operation that is fused into a multiply-add, may be fused by
ptxas, or is an approximation.

ALGORITHMS.md ("Precision of the scalars") asks every backend to round each operation on its
own, as the reference backend does. nvcc contracts ``a * b + c`` into ``fma.rn`` unless built
with ``-fmad=false``; and ptxas may still fuse a ``mul``/``add`` that carries no rounding
modifier. So the PTX of our kernels must contain no ``fma`` and only ``.rn`` (or other
explicitly rounded) float ``add``/``sub``/``mul``; and no approximate ``sqrt``/``div``/``rcp``
(``--use_fast_math``, ``-prec-div=false``). A GPU sees these as 1-ulp differences; this check
sees them on a machine without one.

    python .ci/ptx_fma_check.py FILE.ptx [...]     # exit 1 and the offending lines when found
"""
import re
import sys

FLOAT = r"(?:f16|f16x2|bf16|bf16x2|f32|f64)"
# fma/mad of any float type, with or without modifiers.
_FUSED = re.compile(rf"^\s*(?:@!?%\w+\s+)?(?:fma|mad)(?:\.\w+)*\.{FLOAT}\b")
# add/sub/mul of a float type without a rounding modifier (.rn/.rz/.rm/.rp): ptxas may fuse it.
_UNROUNDED = re.compile(rf"^\s*(?:@!?%\w+\s+)?(?:add|sub|mul)(?:\.(?:ftz|sat))*\.{FLOAT}\b")
# approximate square roots, divisions and reciprocals
_APPROX = re.compile(rf"^\s*(?:@!?%\w+\s+)?(?:sqrt|div|rcp|rsqrt)\.(?:approx|full)\b")


def offending_lines(ptx: str):
    """(line number, text) of every instruction that is or may become a fused multiply-add."""
    return [(n, line.strip()) for n, line in enumerate(ptx.splitlines(), 1)
            if _FUSED.match(line) or _UNROUNDED.match(line) or _APPROX.match(line)]


def main(paths) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[-1])
        return 2
    bad = 0
    for path in paths:
        with open(path) as f:
            found = offending_lines(f.read())
        for n, text in found[:20]:
            print(f"{path}:{n}: {text}")
        if found:
            print(f"ptx_fma_check: {path}: {len(found)} fused, fusable or approximate float instruction(s): "
                  f"build with the flags of csrc/compile_flags.json (-fmad=false, -prec-div=true, -prec-sqrt=true)")
        else:
            print(f"ptx_fma_check: {path}: no fma, every float add/sub/mul rounded on its own, no approximate "
                  f"sqrt/div")
        bad += bool(found)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
