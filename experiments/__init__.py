"""Studies built from lorax runs: sweep definitions and the scripts that turn runs into tables."""
