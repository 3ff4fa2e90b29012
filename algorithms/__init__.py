"""One file per algorithm; each registers itself with ``@register_algorithm``. Their shared math: ``common/``."""
