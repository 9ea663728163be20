"""Backends that ship with ipfs_accelerate_py, registered like third-party plugins."""
