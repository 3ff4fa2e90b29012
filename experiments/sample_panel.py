"""``python -m experiments.sample_panel OUT.png "Title=path/to/grid.png" ...``: put sample grids (a run's
``samples/*.png``) into one labelled figure, top to bottom, or left to right with ``--side-by-side`` (the
the sample figure of docs/results.md: the grids are one row of 8 samples per prompt, so they are tall)."""
from __future__ import annotations

import argparse


def sample_panel(out: str, panels: list[tuple[str, str]], side_by_side: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    n = len(panels)
    shape, size = ((1, n), (1.9 * n, 3.0)) if side_by_side else ((n, 1), (7, 1.55 * n))
    fig, axes = plt.subplots(*shape, figsize=size, dpi=150, squeeze=False)
    for ax, (title, path) in zip(axes.flatten(), panels):
        ax.imshow(mpimg.imread(path))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.sample_panel", description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("panels", nargs="+", help='"Title=path/to/samples/latest.png"')
    p.add_argument("--side-by-side", action="store_true", help="one row of panels instead of one column")
    args = p.parse_args(argv)
    panels = []
    for spec in args.panels:
        title, sep, path = spec.partition("=")
        if not sep:
            p.error(f"expected Title=path, got {spec!r}")
        panels.append((title, path))
    sample_panel(args.out, panels, args.side_by_side)


if __name__ == "__main__":
    main()
