"""What every command line of the project shares: `-h` as well as `--help`, and defaults shown in the help."""
from __future__ import annotations

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}


def recipe_default(key: str) -> str:
    """For `show_default` of an imt-train option that overrides config key `section.key`: its value comes
    from the recipe, else from the dataclass default in train/config.py, which this shows."""
    from imt.train.config import SECTIONS

    section, name = key.split(".", 1)
    value = SECTIONS[section].__dataclass_fields__[name].default
    shown = "none" if value in ("", None) else repr(value) if isinstance(value, str) else value
    return f"recipe, else {shown}"
