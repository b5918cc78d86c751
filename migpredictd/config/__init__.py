"""Configuration: the YAML loader that keeps every value's file and line, and the daemon's config schema."""
