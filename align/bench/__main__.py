"""``python -m align.bench``: see align/bench/__init__.py."""
from align.bench import main

main()
