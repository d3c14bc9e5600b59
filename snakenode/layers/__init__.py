"""Layers as bytes: the content-addressed layer store and the bundle format (manifest, blobs, checks).

This package sits below `net`, `train` and `snake`: all three move or read layers, none of them owns the
format, and it imports none of them (torch-free, no I/O beyond the store's own directory).
"""
