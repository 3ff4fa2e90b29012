"""Feature extractors and evaluation metrics: CLIP and DreamSim features, the digits classifier, diversity and FID.

May import: ``align.core``. Docstring only: importing it does nothing.
"""
