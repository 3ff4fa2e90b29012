"""``python -m align.report <sweep_dir> [--out DIR]`` (align/report/cli.py)."""
import sys

from align.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
