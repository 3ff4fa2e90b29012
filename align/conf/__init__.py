"""The runner's yaml configs: ``config.yaml`` (the root), presets per group (``algo/``, ``model/``, ``reward/``)
and per domain (``preset/``)."""
import os

CONF_DIR = os.path.dirname(os.path.abspath(__file__))
