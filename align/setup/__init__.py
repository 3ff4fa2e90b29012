"""From overrides to a built run: the command line's overrides checked and composed (overrides, compose), the
refusal pass over a composed config before any work, each check once (checks), what composing needs registered
(registration: typed configs, resolvers), the paper's settings table, prompt sets, and building the parts from a
checked config and the Trainer (build, assemble).

May import: ``align.core``, ``align.metrics``, ``align.train``, ``samplers`` and the data packages ``align.conf``,
``align.prompt_sets``; algorithms, models and rewards are found by name through the registries. Docstring only:
importing it does nothing (``registration.prepare_compose`` registers what composing needs).
"""
