"""Built-in localization strategies (default plugins)."""
