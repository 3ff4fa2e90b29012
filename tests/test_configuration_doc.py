"""docs/configuration.md is generated from the config dataclasses (experiments/config_doc.py): the committed page
equals what the generator writes today, so a field added, removed or re-documented shows up as a failure here
until the page is regenerated."""
import difflib
import os

from experiments import config_doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_configuration_doc_is_up_to_date():
    page = config_doc.render()
    with open(config_doc.OUT, encoding="utf-8") as fh:
        committed = fh.read()
    diff = "".join(list(difflib.unified_diff(committed.splitlines(True), page.splitlines(True),
                                             "docs/configuration.md (committed)", "generated", n=1))[:40])
    assert committed == page, f"docs/configuration.md is out of date; regenerate it: {config_doc.COMMAND}\n{diff}"


def test_every_registered_key_is_on_the_page():
    """The generator reads the registries: each algorithm's, model's and reward's section and each of its keys
    appears (a registry the generator missed would leave its keys out); classes registered from tests/ or from a
    plugin outside the source tree are not the software's and stay off the page."""
    import dataclasses

    page = config_doc.render()
    for registry in config_doc.REGISTRIES:
        for name in config_doc._names(registry):
            assert f"`{registry.group}={name}`" in page, (registry.group, name)
            cls = registry.config(name)
            for f in dataclasses.fields(cls) if cls is not None else ():
                assert f"`{registry.group}.{f.name}" in page, (registry.group, name, f.name)
    assert sum(len(config_doc._names(r)) for r in config_doc.REGISTRIES) >= 20
    for f in dataclasses.fields(config_doc.RootConfig):
        assert f"`{f.name}`" in page or f"## `{f.name}`" in page, f.name


def test_a_class_registered_from_tests_stays_off_the_page():
    from helpers.tiny_sd3 import tiny_reward_registered

    with tiny_reward_registered() as name:
        assert any(name in r.names() for r in config_doc.REGISTRIES)
        assert f"`reward={name}`" not in config_doc.render()
