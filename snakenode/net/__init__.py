"""Networking on libp2p. Never imports snakenode.train (a bootstrap peer must start in about a second)."""
