"""``python -m align.fetch key=value ...``: get every weight the run ``python -m align.run key=value ...`` needs.

It takes the run's own overrides (a sweep's too: every combination's weights), lists each weight with the path
it resolved to, and downloads those on the Hugging Face hub into the Hugging Face cache (``huggingface_hub``, as
diffusers does) — the checkpoint, its decoder, the reward's tower and head, the metric features and the
``eval.rewards``' weights. Weights that are not on the hub (and, with HF_HUB_OFFLINE=1, those not yet in the
cache) are listed with where to get them and the key that points to them; then it exits with status 2. Nothing
is trained and no run directory is made. A run started afterwards finds the downloads in the cache.
"""
from __future__ import annotations

import sys

from align.conf import CONF_DIR
from align.core.weights import WeightsError
from align.setup.overrides import ConfigProblem, check_command
from align.core.weights import WeightNeed
from align.setup.preflight import missing_message, weight_needs

USAGE = ("usage: python -m align.fetch key=value ... (the overrides of the align.run command whose weights to get; "
         "HF_HUB_OFFLINE=1: check the Hugging Face cache only)")


def _fail(message: str) -> None:
    print(f"align: {message}", file=sys.stderr)
    sys.exit(2)


def run_needs(argv: list[str]) -> tuple[list[str], list[WeightNeed]]:
    """The overrides as the run reads them (``model=`` added) and every weight of every combination, once."""
    overrides, checked = check_command(argv, CONF_DIR)
    if not checked:
        _fail("align.fetch takes a new run's overrides; a resumed run (resume=) already has its weights")
    needs: dict[tuple, WeightNeed] = {}
    for combo in checked:
        for need in weight_needs(combo.cfg):
            needs.setdefault((need.spec, need.value), need)
    return overrides, list(needs.values())


def fetch(needs: list[WeightNeed]) -> list[WeightsError]:
    """Resolve (download when online) each need, printing its path; the errors of those that failed."""
    errors = []
    for need in needs:
        try:
            print(f"align: {need.spec.what}: {need.resolved()}", flush=True)
        except WeightsError as err:
            errors.append(err)
    return errors


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    try:
        overrides, needs = run_needs(argv)
    except ConfigProblem as err:
        _fail(str(err))
    errors = fetch(needs)
    if errors:
        _fail(missing_message(errors, overrides))
    print(f"align: all {len(needs)} weights of this run are available" if needs
          else "align: this run needs no weights beyond the shipped ones", flush=True)


if __name__ == "__main__":
    main()
