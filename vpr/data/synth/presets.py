"""The synthetic city's size presets (`vpr synth --preset`), in a module that imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

from vpr.errors import UsageError


@dataclass(frozen=True)
class SynthPreset:
    """Image size, image counts per split and city size of one dataset preset.

    `rows`: east-west streets in the city. Database images are spaced `metres_per_db` of street apart
    (4 headings per position); with `dense_train` the train database is `dense_per_metre` random poses per metre.
    """

    name: str
    width: int
    height: int
    train_db: int
    train_queries: int
    val_db: int
    val_queries: int
    test_db: int
    test_queries: int
    rows: int
    metres_per_db: float = 2.0
    dense_train: bool = False
    dense_per_metre: float = 16.0

    def counts(self) -> dict[str, tuple[int, int]]:
        """(database, queries) image counts per split."""
        return {"train": (self.train_db, self.train_queries), "val": (self.val_db, self.val_queries),
                "test": (self.test_db, self.test_queries)}

    def street_metres(self, split: str) -> float:
        """Street length the split band must hold for its database sampling density."""
        n_db = self.counts()[split][0]
        if split == "train" and self.dense_train:
            return n_db / self.dense_per_metre
        return n_db * self.metres_per_db


PRESETS: dict[str, SynthPreset] = {
    "tiny": SynthPreset("tiny", 96, 72, 120, 30, 40, 12, 40, 12, rows=2),
    "small": SynthPreset("small", 160, 120, 1500, 300, 500, 100, 1000, 200, rows=3),
    "medium": SynthPreset("medium", 224, 168, 30000, 2000, 1500, 300, 3000, 500, rows=5, dense_train=True),
    "large": SynthPreset("large", 224, 168, 80000, 6000, 3000, 600, 6000, 1000, rows=8, dense_train=True),
}


def get_preset(name: str) -> SynthPreset:
    """Look up a preset by name; raise `UsageError` listing the valid names."""
    if name not in PRESETS:
        raise UsageError(f"unknown synthetic preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
