"""From overrides to a built run: composing the config (compose), checking it before any work (checks), the
config resolvers, the paper's settings table, prompt sets, and building the parts and the Trainer (build,
assemble).

May import: ``align.core``, ``align.metrics``, ``align.train``, ``samplers`` and the data packages ``align.conf``,
``align.prompt_sets``; algorithms, models and rewards are found by name through the registries. Docstring only:
importing it does nothing (the resolvers are registered by ``resolvers.register_resolvers``).
"""
