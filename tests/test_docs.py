"""The README documents every setting the daemon reads."""

from pathlib import Path

from broker.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        variable = alias.choices[0] if alias is not None else f"SWARM_{name.upper()}"  # type: ignore[union-attr]
        assert f"| `{variable}` |" in README, f"{variable} is not documented in README.md"
