"""Reward families. Each module registers its rewards with ``@register_reward``."""
