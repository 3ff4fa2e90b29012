"""align: reward fine-tuning of flow-matching generators (VGG-Flow and its baselines behind one interface).

The entry modules (``python -m align.run | sweep | report | evaluate | bench | pretrain``) sit here; the library is
layered in sub-packages: ``core`` (interfaces, registries, typed configs, the run-directory contract), ``metrics``,
``models`` (plugins), ``train`` (the loop), ``setup`` (composing, checking and building a run) and ``report``.
ARCHITECTURE.md says what each may import. Importing any module registers nothing.
"""
