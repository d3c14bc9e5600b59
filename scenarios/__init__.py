"""Scripted multi-host networks with fault injection and reports."""
