"""ipfs_accelerate_py: client backends for the IPFS Accelerate framework."""
