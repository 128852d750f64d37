"""The decentralised family: gossip over a topology, CHOCO-compressed messages, DIMAT alignment."""

from lightning_fedopt.strategies.gossip.gossip import GossipStrategy

__all__ = ["GossipStrategy"]
