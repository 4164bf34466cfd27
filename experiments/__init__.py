"""Experiments: training the MoE transformer LM and the MegaBlocks-style comparison."""
