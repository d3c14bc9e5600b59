"""Light bootstrap peer: stable identity, gossip relay, peer exchange; never imports torch."""
