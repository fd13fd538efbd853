"""Training modules, objectives and the CLI of the preference-optimization codebase."""
