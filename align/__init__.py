"""align: reward fine-tuning of flow-matching generators (VGG-Flow and its baselines behind one interface)."""
from align import paper_settings as _paper_settings  # noqa: F401  (registers the ${align_paper:…} config resolver)
