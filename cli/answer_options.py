"""The options `vpr query` and `vpr eval` share for what comes after the global search: query expansion,
sequence matching, geometric re-ranking and the position estimate."""

from __future__ import annotations

from typing import Optional

import typer

from cli.common import MAX_BATCH, POSITIVE
from vpr.api import DEFAULT_RADIUS, DEFAULT_TOP_K, AnswerOptions, Expansion, RerankOptions, SequenceOptions, speed_range
from vpr.errors import UsageError

MAX_SEQUENCE = 10_000
QE = typer.Option(Expansion.n, "--qe", min=0, max=MAX_BATCH, help="Query expansion: average each query with its top N matches (alpha-QE) and search again; 0 = off.")
QE_ALPHA = typer.Option(Expansion.alpha, "--qe-alpha", min=0.0, max=100.0, help="alpha-QE's similarity exponent (0 = plain average query expansion).")
SEQUENCE = typer.Option(None, "--sequence", min=1, max=MAX_SEQUENCE, help="Match sequences of L frames (SeqSLAM) instead of single images: queries and database in capture order (file-name order, or a manifest's timestamp/frame column).")
CAUSAL = typer.Option(SequenceOptions.causal, "--causal", help="With --sequence: online mode, each frame uses only itself and the L-1 frames before it.")
SPEEDS = typer.Option("1", "--seq-speeds", help="With --sequence: relative speeds tried, database frames per query frame: one speed (1: both traversals at the same pace) or MIN:MAX:STEPS, e.g. 0.8:1.25:5 when the pace varies.")
WINDOW = typer.Option(SequenceOptions.window, "--seq-window", min=1, max=MAX_SEQUENCE, help="With --sequence: SeqSLAM's local contrast normalisation along the database over W frames (1 = off, the default). W = 11 lifts SeqSLAM thumbnails on sparsely sampled traversals (Nordland: +18 points at L = 10) but ruins matching where a place spans several frames or similarities are nearly flat (random-init models).")
RERANK = typer.Option(None, "--rerank", help="local: verify the top --rerank-k matches with local features + RANSAC and reorder by inliers (index built with --local-features).")
RERANK_K = typer.Option(RerankOptions.k, "--rerank-k", min=1, max=MAX_BATCH, help="With --rerank local: candidates verified per query.")
POSITION_K = typer.Option(DEFAULT_TOP_K, "--position-k", min=1, max=MAX_BATCH, help="Matches the position estimate looks at (densest cluster, similarity-weighted).")
POSITION_RADIUS = typer.Option(DEFAULT_RADIUS, "--position-radius", callback=POSITIVE, help="Metres within which matches count as one place for the position estimate.")


def parse_speeds(text: str) -> tuple[float, float, int]:
    """`MIN:MAX:STEPS` -> (min, max, steps), e.g. 0.8:1.25:5; `1` alone means speed 1 only."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            low = high = float(parts[0])
            steps = 1
        elif len(parts) == 3:
            low, high, steps = float(parts[0]), float(parts[1]), int(parts[2])
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"--seq-speeds {text}: expected MIN:MAX:STEPS, e.g. 0.8:1.25:5, or one speed, e.g. 1") from None
    if not (0 < low <= high <= 10 and 1 <= steps <= 100) or (steps == 1 and low != high):
        raise UsageError(f"--seq-speeds {text}: need 0 < MIN <= MAX <= 10 and 1 <= STEPS <= 100 (STEPS 1 only when MIN = MAX)")
    return low, high, steps


def answer_options(*, qe: int, qe_alpha: float, sequence: Optional[int], causal: bool, speeds: str, window: int,
                   rerank: Optional[str], rerank_k: int, position_k: int, position_radius: float) -> AnswerOptions:
    """The `AnswerOptions` the command line asks for; option combinations that mean nothing are refused."""
    if rerank not in (None, "local"):
        raise UsageError(f"--rerank {rerank}: the only re-ranking is 'local' (local features + RANSAC)")
    if sequence is None and (causal or speeds != SPEEDS.default or window != WINDOW.default):
        raise UsageError("--causal, --seq-speeds and --seq-window describe sequence matching; add --sequence L")
    if rerank is None and rerank_k != RERANK_K.default:
        raise UsageError("--rerank-k sets how many matches --rerank local verifies; add --rerank local")
    sequence_options = None
    if sequence is not None:
        sequence_options = SequenceOptions(length=sequence, speeds=speed_range(*parse_speeds(speeds)),
                                           window=window, causal=causal)
    return AnswerOptions(
        qe=Expansion(qe, qe_alpha), sequence=sequence_options,
        rerank=RerankOptions(k=rerank_k) if rerank == "local" else None,
        position_k=position_k, position_radius=position_radius,
    )
