"""Sequence matching of ordered traversals (SeqSLAM, Milford & Wyeth, ICRA 2012) over descriptor similarities.

Query frames q_1..q_n and database frames d_1..d_m are unit descriptors in travel order.

1. Similarity matrix S[i, j] = q_i . d_j (SeqSLAM's difference matrix is D = 2 - 2 S for unit
   vectors: the smallest difference is the largest similarity).
2. Local contrast normalisation along the database axis, per query row i, over the window
   W(j) = {j - h, ..., j + h} clipped to [0, m), h = window // 2:
       Z[i, j] = (S[i, j] - mean_{k in W(j)} S[i, k]) / (std_{k in W(j)} S[i, k] + eps),
   with the population std (ddof 0) and eps = 1e-6. window <= 1 turns it off (Z = S).
3. Straight-line path score of query i at database frame j with speed v (database frames per
   query frame), over the offsets T (causal: t = -(L-1)..0, the last L frames as they arrive;
   centred: t = -(L // 2)..L - 1 - L // 2), keeping only the frames that exist:
       P_v[i, j] = 1/|T_i| sum_{t in T_i, 0 <= j + r(v t) < m} Z[i + t, j + r(v t)],  T_i = {t in T: 0 <= i+t < n},
   where r(x) = floor(x + 1/2) rounds to the nearest frame. At the ends of the query traversal the
   mean runs over the query frames that exist (the same for every j); a path that runs off the
   database scores 0 for its missing frames, so a lone frame at the database's edge cannot beat a
   whole matching sequence.
4. Speed search: P[i, j] = max_v P_v[i, j]; each query returns the k database frames with the
   largest P, best first, like a FAISS search.

Rows are processed in blocks of queries plus the L - 1 rows of context each block needs, one speed
at a time, so peak memory is O((block + L) * m), never the whole n x m matrix. With L = 1 and
window <= 1, P = S and the result is plain inner-product nearest neighbour.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from vpr.errors import UsageError
from vpr.retrieval.options import SequenceOptions

log = logging.getLogger(__name__)
EPS = 1e-6  # keeps Z finite where a window's similarities are all equal (e.g. black frames)


def contrast_normalise(similarity: torch.Tensor, window: int) -> torch.Tensor:
    """Z-score each row's similarities against their ±window // 2 neighbours along the database axis (step 2)."""
    half = window // 2
    if half == 0:
        return similarity
    rows = similarity.unsqueeze(1)
    pool = dict(kernel_size=2 * half + 1, stride=1, padding=half, count_include_pad=False)  # clipped at the ends
    mean = F.avg_pool1d(rows, **pool)
    std = F.avg_pool1d(rows * rows, **pool).sub_(mean * mean).clamp_min_(0).sqrt_().add_(EPS)
    return (rows - mean).div_(std).squeeze(1)


def path_scores(
    z: torch.Tensor, first: int, n_queries: int, start: int, stop: int, options: SequenceOptions,
) -> torch.Tensor:
    """Best-speed path scores P[i, j] (steps 3-4) of queries start..stop-1 from `z`, the normalised rows of
    query frames first, first + 1, ... (every frame those paths reach) of an `n_queries`-frame traversal."""
    m = z.shape[1]
    offsets = options.offsets()
    rows = torch.arange(start, stop, device=z.device)[None, :] + torch.tensor(offsets, device=z.device)[:, None]
    row_ok = ((rows >= 0) & (rows < n_queries)).float()  # offsets x block
    best = None
    for v in options.speeds:
        shifts = [math.floor(v * t + 0.5) for t in offsets]
        total = z.new_zeros(stop - start, m)
        for t, s in zip(offsets, shifts):
            a, b = max(start, -t), min(stop, n_queries - t)  # queries whose frame i + t exists
            j0, j1 = max(0, -s), min(m, m - s)  # database frames whose j + s exists
            if a < b and j0 < j1:
                total[a - start:b - start, j0:j1] += z[a + t - first:b + t - first, j0 + s:j1 + s]
        total.div_(row_ok.sum(dim=0)[:, None])  # over the query frames that exist; off the database adds 0
        best = total if best is None else torch.maximum(best, total, out=best)
    return best


def sequence_search(
    queries: np.ndarray, database: np.ndarray, options: SequenceOptions, *, block: int = 256, device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database frames of each query frame by SeqSLAM path score: (scores, indices), each n_q x min(k, m),
    best first; computed `block` query rows at a time on `device` (torch, CPU or CUDA)."""
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise UsageError(
            f"query and database descriptors must be 2-D with one width (got {queries.shape} and {database.shape})"
        )
    if block < 1 or len(database) == 0:
        raise UsageError("sequence search needs a non-empty database and query blocks of at least one frame")
    n, m = len(queries), len(database)
    k = min(options.k, m)
    offsets = options.offsets()
    scores, indices = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    with torch.inference_mode():
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(device)
        db = torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)).to(device)
        for start in range(0, n, block):
            stop = min(n, start + block)
            first, last = max(0, start + offsets[0]), min(n, stop + offsets[-1])
            z = contrast_normalise(q[first:last] @ db.T, options.window)
            top = path_scores(z, first, n, start, stop, options).topk(k, dim=1)
            scores[start:stop], indices[start:stop] = top.values.cpu().numpy(), top.indices.cpu().numpy()
    log.debug("sequence search: %d queries x %d frames, L=%d, %d speeds", n, m, options.length, len(options.speeds))
    return scores, indices
