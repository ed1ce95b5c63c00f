"""`python -m gymbus.services.controller`."""

from gymbus.services.controller.service import main
from gymbus.shared.service import run_service

run_service(main)
