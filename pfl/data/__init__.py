"""Datasets as uint8 tensors, PFLlib-style partitions, and on-device batching."""
