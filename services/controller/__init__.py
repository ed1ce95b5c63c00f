"""The controller process: validates and stores runs, schedules them, tracks their states."""
