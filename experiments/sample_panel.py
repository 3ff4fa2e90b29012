"""``python -m experiments.sample_panel OUT.png "Title=path/to/grid.png" ...``: stack sample grids (a run's
``samples/*.png``) into one labelled figure, top to bottom (the README's side-by-side sample figure)."""
from __future__ import annotations

import argparse


def sample_panel(out: str, panels: list[tuple[str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.55 * len(panels)), dpi=150, squeeze=False)
    for ax, (title, path) in zip(axes[:, 0], panels):
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
    args = p.parse_args(argv)
    panels = []
    for spec in args.panels:
        title, sep, path = spec.partition("=")
        if not sep:
            p.error(f"expected Title=path, got {spec!r}")
        panels.append((title, path))
    sample_panel(args.out, panels)


if __name__ == "__main__":
    main()
