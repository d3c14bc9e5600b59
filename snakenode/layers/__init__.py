"""Layers as bytes: the content-addressed layer store, the bundle format (manifest, blobs, checks) and the
one per-layer receive path every transport feeds (sink.py).

This package sits below `net`, `train` and `snake`: all three move or read layers, none of them owns the
format, and it imports none of them (torch-free, no I/O beyond the store's own directory).
"""
