"""`python -m gymbus.services.broker`."""

from gymbus.services.broker.service import main
from gymbus.shared.service import run_service

run_service(main)
