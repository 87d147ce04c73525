"""The tests' NBD client is the project's own (drctl/nbdclient.py, also used by the demo)."""

from drctl.nbdclient import NbdClient, NbdError

__all__ = ["NbdClient", "NbdError"]
