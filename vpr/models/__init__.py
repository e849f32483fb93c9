"""Models: torchvision backbones, the GeM / CosPlace / NetVLAD heads, and checkpoints."""
