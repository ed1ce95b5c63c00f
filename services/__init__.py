"""gymbus services: broker, controller, ingest, viewers and the click CLI."""
