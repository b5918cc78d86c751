"""The HTTP edge: the one HTTP server (TLS, basic auth, `/metrics`) and its exporter-toolkit web config."""
