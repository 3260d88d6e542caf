"""ResNets from scratch, and the DVC pipeline that trains, evaluates and registers them (docs/architecture.md)."""
