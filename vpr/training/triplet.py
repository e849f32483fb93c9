"""NetVLAD's weakly supervised triplet ranking loss and the images of mined tuples.

Loss (the paper's eq. 4 with squared Euclidean distances, averaged over all (query, negative) pairs):
    L = mean_j max(0, ||q - p*||^2 + m - ||q - n_j||^2),  m = 0.1.
Squared distances are the paper's and the MATLAB reference's convention (pytorch-NetVlad instead uses
plain distances with margin sqrt(0.1)); on unit descriptors ||a - b||^2 = 2 - 2 a.b, so m = 0.1 is a
margin of 0.05 in cosine similarity, independent of the descriptor size, and mining tests the same
inequality (`vpr.training.mining`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vpr.data.images import Preprocess, load_rgb, preprocess
from vpr.errors import ImageError
from vpr.training.mining import Triplet


def triplet_hinges(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, owner: torch.Tensor,
                   margin: float = 0.1) -> torch.Tensor:
    """The hinge of each negative: query/positive B x D, negatives M x D, owner[j] = the query of negative j."""
    d_pos = (query - positive).pow(2).sum(dim=1)
    d_neg = (query[owner] - negatives).pow(2).sum(dim=1)
    return torch.relu(d_pos[owner] + margin - d_neg)


def triplet_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, owner: torch.Tensor,
                 margin: float = 0.1) -> torch.Tensor:
    """Mean hinge over negatives (see `triplet_hinges`)."""
    return triplet_hinges(query, positive, negatives, owner, margin).mean()


class TupleImages(Dataset):
    """Images of mined tuples, query first, then the positive and the negatives, as one uint8 stack."""

    def __init__(self, triplets: list[Triplet], database: list[Path], queries: list[Path], input_size: tuple[int, int]) -> None:
        self.triplets = triplets
        self.database = database
        self.queries = queries
        self.rule = Preprocess("fixed", tuple(input_size))

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        t = self.triplets[i]
        paths = [self.queries[t.query], self.database[t.positive], *(self.database[n] for n in t.negatives)]
        try:
            return torch.stack([preprocess(load_rgb(p), self.rule, str(p)) for p in paths]), ""
        except ImageError as exc:  # re-raised in the main process with its one-line message
            return torch.zeros(0, dtype=torch.uint8), str(exc)


@dataclass
class TupleBatch:
    """Stacked tuple images and where each tuple's query, positive and negatives sit in the stack.

    `errors` lists unreadable images; the trainer raises the first one in the main process.
    """

    images: torch.Tensor
    query: torch.Tensor
    positive: torch.Tensor
    negatives: torch.Tensor
    owner: torch.Tensor
    errors: list[str]


def collate_tuples(items: list[tuple[torch.Tensor, str]]) -> TupleBatch:
    """Concatenate tuples of different negative counts into one batch (runs in DataLoader workers)."""
    errors = [error for _, error in items if error]
    items = [item for item in items if not item[1]]
    query, negatives, owner, offset = [], [], [], 0
    for b, (stack, _) in enumerate(items):
        query.append(offset)
        count = len(stack) - 2
        negatives.extend(range(offset + 2, offset + 2 + count))
        owner.extend([b] * count)
        offset += len(stack)
    query_t = torch.tensor(query, dtype=torch.long)
    images = torch.cat([s for s, _ in items]) if items else torch.zeros(0, dtype=torch.uint8)
    return TupleBatch(images, query_t, query_t + 1,
                      torch.tensor(negatives, dtype=torch.long), torch.tensor(owner, dtype=torch.long), errors)
