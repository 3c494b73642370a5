"""How MSM walks the image pairs: blocks of images sized by a memory budget, and the exact
per-degree products (``strategy="per_degree"``, :func:`msm.max_similarities`).

Each block pair ((i0, i1), (j0, j1)) is one (bi·P)×C @ C×(bj·P) product; symmetric runs
(the queries scored against themselves) take only the blocks with J ≥ I and read each
product's row maxima for i against j and its column maxima for j against i.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from musc_pipeline.core import lnamd

BlockPairs = list[tuple[tuple[int, int], tuple[int, int]]]


def block_size(patches: int, memory_budget: int, copies: int = 1, itemsize: int = 4) -> int:
    """Images per block so that one block pair's ``copies`` P×P similarity tensors fit the budget."""
    per_pair = copies * patches * patches * itemsize
    return max(1, math.isqrt(max(1, memory_budget // per_pair)))


def block_pairs(n: int, m: int, b: int, symmetric: bool) -> BlockPairs:
    """Query × key blocks of b images; symmetric: only blocks with J ≥ I (each pair once)."""
    q_blocks = [(s, min(s + b, n)) for s in range(0, n, b)]
    k_blocks = q_blocks if symmetric else [(s, min(s + b, m)) for s in range(0, m, b)]
    return [(q, k) for qi, q in enumerate(q_blocks) for kj, k in enumerate(k_blocks) if not symmetric or kj >= qi]


def per_degree(queries, keys, degrees, pairs: BlockPairs, out, dtype,
               progress: Callable[[int, int], None] | None = None) -> None:
    """One product Z_{r,i} Z_{r,j}ᵀ per degree and block pair in ``dtype``, reduced to maxima."""
    symmetric = keys is None
    n, h, w, c = queries.shape
    p = h * w
    unit = lambda maps_, r: lnamd.unit_features(maps_.float(), r).reshape(len(maps_), p, c).to(dtype)  # noqa: E731

    for ri, r in enumerate(degrees):  # one degree's features at a time (memory); unit: products are cosines
        q_feats = unit(queries, r)
        k_feats = q_feats if symmetric else unit(keys, r)
        for done, ((i0, i1), (j0, j1)) in enumerate(pairs, 1):
            # (bi·P)×C @ C×(bj·P) -> bi×P×bj×P in `dtype`
            sim = (q_feats[i0:i1].reshape(-1, c) @ k_feats[j0:j1].reshape(-1, c).T).view(i1 - i0, p, j1 - j0, p)
            out[ri, i0:i1, :, j0:j1] = sim.amax(dim=3)
            if symmetric and j0 != i0:
                out[ri, j0:j1, :, i0:i1] = sim.amax(dim=1).permute(1, 2, 0)
            if progress is not None:
                progress(ri * len(pairs) + done, len(degrees) * len(pairs))
        del q_feats, k_feats
