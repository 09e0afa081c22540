"""``python -m flexlb.settings``: print the configuration's reference tables (docs/configuration.md)."""

from flexlb.settings.docs import render_config_table

print(render_config_table(), end="")
