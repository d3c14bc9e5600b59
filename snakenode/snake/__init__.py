"""The snake protocol: jobs, bundles, routing, windows, hand-off. Pure decision logic has no I/O."""
