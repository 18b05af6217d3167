"""The reading side of a store: token states by passage id, DPR search, the decoupled reader at question time."""
