"""Training: CosPlace (class groups + CosFace) and NetVLAD (clusters + weakly supervised triplets)."""
