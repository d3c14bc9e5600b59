"""snakenode: peer-to-peer Snake Learning daemons.

Importing this package must stay cheap (no torch, no libp2p): the CLI's status commands load it.
"""

__version__ = "0.1.0"
