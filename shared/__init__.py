"""gymbus protocol package: protocol, codec, transport helpers, settings and the run-config schema."""
