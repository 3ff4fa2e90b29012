"""The shared core: the interfaces (FlowModel, Reward, Algorithm), the name → class registries, the typed configs,
batching and parameter helpers, weight finding and loading, the run-directory contract and reward mixing.

May import: ``samplers`` and the data packages ``align.conf``; parts are imported by name (importlib), never by an
import statement. Docstring only: importing it does nothing.
"""
