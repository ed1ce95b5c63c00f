"""`python -m gymbus.services.broker`."""

from gymbus.services.broker.service import main
from gymbus.shared.transport import run_service

run_service(main)
