"""Training: configs and validation, parameter groups and freezing, optimiser, step, loop, checkpoints,
FLOPs/MFU and metrics. `mm-train` (launch/train.py) is the command-line entry point."""
