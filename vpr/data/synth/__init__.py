"""Deterministic synthetic demo city: procedural geo-tagged street views for demos and tests.

`presets` (the sizes, importing nothing heavy), `city` (streets, facades and sprites), `render` (one view),
`generate` (a whole dataset in the VPR-datasets layout), `preview` (a contact sheet)."""
