"""XXH3-128 of byte ranges of one buffer, compiled with numba; the `xxhash` package is the reference and fallback.

Calling `xxhash.xxh3_128_digest` once per picture costs ~0.2 us of Python per call on top of the hash itself; the
compiled loop below hashes every picture of a BSON file in one call per thread, without the GIL. Only the
long-input path (> 240 bytes, every real JPEG) is compiled; shorter inputs go through `xxhash` (a test holds both
equal for every length). `one` hashes a single range, for fused passes (kernels/pictures.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["INIT", "KEYS", "LONG_MIN", "compiled_hasher", "compiled_one", "one"]

LONG_MIN = 241  # inputs of at least this many bytes take XXH3's long path
# XXH3's default 192-byte secret (kSecret in xxhash.h).
_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671fcb79e64eccc0e578825ad07dccff7221b8084674f743248e"
    "e03590e6813a264c3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8a8fa763fe39c343ff9dcbbc7c70b4f1d"
    "8a51e04bcdb45931c89f7ec9d9787364eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e2b16be587d47a1fc"
    "8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)


def _words(at: int, count: int) -> np.ndarray:
    return np.array([int.from_bytes(_SECRET[at + 8 * i : at + 8 * i + 8], "little") for i in range(count)], np.uint64)


# The secret words each step reads: stripes (offset 8 * stripe), scramble (128), last stripe (121), merges (11, 117).
_KEYS = (_words(0, 24), _words(128, 8), _words(121, 8), _words(11, 8), _words(117, 8))
_INIT = np.array(
    [0xC2B2AE3D, 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9]
    + [0x85EBCA77C2B2AE63, 0x85EBCA77, 0x27D4EB2F165667C5, 0x9E3779B1],
    dtype=np.uint64,
)


try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; xxhash hashes every picture without it
    numba = None

# Module-level compiled functions (not closures), so numba's on-disk cache holds them across processes.
if numba is not None:

    @intrinsic
    def _load(typingctx, array, index):
        """Little-endian uint64 at byte `index` of a uint8 array: one unaligned load."""

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            pointer = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
            return builder.load(pointer, align=1)

        return types.uint64(array, index), codegen

    _LOW32, _U32, _U47 = np.uint64(0xFFFFFFFF), np.uint64(32), np.uint64(47)
    _PRIME32, _PRIME64_1, _PRIME64_2 = (
        np.uint64(0x9E3779B1),
        np.uint64(0x9E3779B185EBCA87),
        np.uint64(0xC2B2AE3D27D4EB4F),
    )
    _AVALANCHE = np.uint64(0x165667919E3779F9)
    _jit = numba.njit(inline="always", cache=True)

    @_jit
    def _lane(value, key):
        mixed = value ^ key
        return (mixed & _LOW32) * (mixed >> _U32)

    # The eight accumulators live in a tuple so that LLVM keeps them in registers.
    @_jit
    def _stripe(a, view, at, keys, k):
        v0, v1, v2, v3 = _load(view, at), _load(view, at + 8), _load(view, at + 16), _load(view, at + 24)
        v4, v5, v6, v7 = _load(view, at + 32), _load(view, at + 40), _load(view, at + 48), _load(view, at + 56)
        return (
            a[0] + v1 + _lane(v0, keys[k]), a[1] + v0 + _lane(v1, keys[k + 1]),
            a[2] + v3 + _lane(v2, keys[k + 2]), a[3] + v2 + _lane(v3, keys[k + 3]),
            a[4] + v5 + _lane(v4, keys[k + 4]), a[5] + v4 + _lane(v5, keys[k + 5]),
            a[6] + v7 + _lane(v6, keys[k + 6]), a[7] + v6 + _lane(v7, keys[k + 7]),
        )  # fmt: skip

    @_jit
    def _scramble_one(value, key):
        value ^= value >> _U47
        return (value ^ key) * _PRIME32

    @_jit
    def _scramble(a, keys):
        return (
            _scramble_one(a[0], keys[0]), _scramble_one(a[1], keys[1]), _scramble_one(a[2], keys[2]),
            _scramble_one(a[3], keys[3]), _scramble_one(a[4], keys[4]), _scramble_one(a[5], keys[5]),
            _scramble_one(a[6], keys[6]), _scramble_one(a[7], keys[7]),
        )  # fmt: skip

    @_jit
    def _fold(a, b):  # 64 x 64 -> 128-bit product, halves xor-ed
        a_lo, a_hi, b_lo, b_hi = a & _LOW32, a >> _U32, b & _LOW32, b >> _U32
        lo_lo, hi_lo, lo_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi
        cross = (lo_lo >> _U32) + (hi_lo & _LOW32) + lo_hi
        return ((cross << _U32) | (lo_lo & _LOW32)) ^ ((hi_lo >> _U32) + (cross >> _U32) + a_hi * b_hi)

    @_jit
    def _merge(a, keys, start):
        result = start
        for i in range(4):
            result += _fold(a[2 * i] ^ keys[2 * i], a[2 * i + 1] ^ keys[2 * i + 1])
        result ^= result >> np.uint64(37)
        result *= _AVALANCHE
        return result ^ (result >> _U32)

    @numba.njit(nogil=True, cache=True)
    def one(view, start, length, keys, init, out, row):
        """out[row] = (high, low) halves of XXH3-128 of view[start : start + length], length > 240."""
        stripes, scrambles, last, merge_low, merge_high = keys
        a = (init[0], init[1], init[2], init[3], init[4], init[5], init[6], init[7])
        blocks = (length - 1) // 1024  # 16 stripes of 64 bytes per block with the default secret
        for block in range(blocks):
            for s in range(16):
                a = _stripe(a, view, start + block * 1024 + 64 * s, stripes, s)
            a = _scramble(a, scrambles)
        for s in range(((length - 1) - 1024 * blocks) // 64):
            a = _stripe(a, view, start + blocks * 1024 + 64 * s, stripes, s)
        a = _stripe(a, view, start + length - 64, last, 0)
        n = np.uint64(length)
        out[row, 0] = _merge(a, merge_high, ~(n * _PRIME64_2))
        out[row, 1] = _merge(a, merge_low, n * _PRIME64_1)

    @numba.njit(nogil=True, cache=True)
    def _many(view, starts, lengths, keys, init, out):
        for row in range(starts.shape[0]):
            if lengths[row] >= 241 and starts[row] >= 0 and starts[row] + lengths[row] <= view.shape[0]:
                one(view, starts[row], lengths[row], keys, init, out, row)

else:  # pragma: no cover
    one = _many = None


def _hash_ranges(view: np.ndarray, starts: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
    """Fill out[row] = (high, low) 64-bit halves of XXH3-128 for every range of >= LONG_MIN bytes."""
    _many(view, starts, lengths, _KEYS, _INIT, out)


def compiled_hasher() -> Callable | None:
    """The compiled range hasher, or None without numba."""
    return None if _many is None else _hash_ranges


def compiled_one() -> Callable | None:
    """The compiled hash of one range, `one(view, start, length, KEYS, INIT, out, row)`, for fused passes."""
    return one


KEYS, INIT = _KEYS, _INIT
