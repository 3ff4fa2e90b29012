"""``python -m experiments.reproduce digits [--jobs N]``: every published result of a study from one command at one
commit: the runs of every sweep its page reports (resuming where an earlier invocation stopped), then the
summaries, the figures, the page and the README's example output, all from those runs."""
