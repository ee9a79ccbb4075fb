"""The README documents every setting, where a user looks for it."""

from pathlib import Path

from dache.config import SETTINGS

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    for setting in SETTINGS:
        assert f"| `{setting.env}` | `--{setting.option}` |" in README, setting.env
