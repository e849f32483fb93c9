"""The published methods vpr implements, one module each: the aggregator with its paper's equations, its
checkpoint layouts (`LAYOUTS`), and where needed its own backbone (`BACKBONES`) and the stand-in classes
its files pickle (`PICKLE_GLOBALS`). `vpr.models.registry` collects their records with everyone else's."""

MODULES: tuple[str, ...] = ("mixvpr", "convap", "boq", "cricavpr", "qaa", "salad", "megaloc", "supervlad", "anyloc", "sfrs",
                            "apgem", "edtformer")
