"""The algorithms' shared math: reward gradients, the value gradient's consistency residual, time subsampling,
the adjoint / costate sweep, the reward objectives and their config.

May import: ``align.core``, ``samplers``; never a model or a reward. Holds no algorithm, so the registry's import of
``algorithms`` registers nothing from here. Docstring only: importing it does nothing.
"""
