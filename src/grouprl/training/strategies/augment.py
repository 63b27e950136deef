"""`difficulty_aug`: DeepVideo-R1's difficulty-aware augmentation, text analogue (being built)."""
