"""Closed-form and fixed-point references the tests and experiments compare the algorithms with, out of the
library: the tilted target and the deterministic optimum (continuous), the discrete fixed points of Adjoint Matching
and VGG-Flow-PMP (discrete), Flow-GRPO's (flow_grpo) and DiffusionNFT's (diffusion_nft).

May import anything. Docstring only: importing it does nothing.
"""
