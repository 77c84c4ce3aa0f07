"""The compiled pass of ingest's picture hashing: per document, find its pictures and hash each while it is hot.

Two separate passes (`bson_scan.spans`, then `xxh3` over the ranges) would touch every document's headers twice,
~0.5 us a document on a large file. `data/dedupe.py` calls it per thread and hashes what it leaves (short pictures,
flagged documents) with `xxhash`. None without numba.
"""

from __future__ import annotations

from prodcat.data.kernels import bson_scan, xxh3

__all__ = ["spans_and_hashes"]

if xxh3.one is not None and bson_scan.span_one is not None:
    import numba

    @numba.njit(nogil=True, cache=True)
    def spans_and_hashes(view, offsets, lengths, counts, first, out_offset, out_length, ok, span_keys, keys, init, out):
        """`bson_scan.spans` into (out_offset, out_length, ok), and out[row] = XXH3-128 halves of every picture of
        at least `xxh3.LONG_MIN` bytes in the documents it reads (ok True)."""
        for doc in range(offsets.shape[0]):
            end = offsets[doc] + lengths[doc]
            good = end <= view.shape[0] and bson_scan.span_one(
                view, offsets[doc], end, counts[doc], first[doc], out_offset, out_length, span_keys
            )
            ok[doc] = good
            if good:
                for row in range(first[doc], first[doc] + counts[doc]):
                    if out_length[row] >= 241:  # xxh3.LONG_MIN
                        xxh3.one(view, out_offset[row], out_length[row], keys, init, out, row)

else:  # pragma: no cover
    spans_and_hashes = None
