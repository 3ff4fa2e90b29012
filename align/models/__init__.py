"""Model backends. Each module registers itself with ``@register_model``."""
