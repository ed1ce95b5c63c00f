"""`python -m gymbus.services.ingest`."""

from gymbus.services.ingest.service import main
from gymbus.shared.service import run_service

run_service(main)
