"""``reward=mix``: the framework's weighted sum of registered rewards (align/core/reward_mix.py), registered under
its name like any reward."""
from align.core.registry import register_reward
from align.core.reward_mix import MixConfig, MixReward

register_reward("mix", config=MixConfig)(MixReward)
