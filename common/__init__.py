"""Model-agnostic building blocks: devices, layers, attention kernels, KV storage, engine."""
