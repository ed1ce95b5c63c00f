"""The AgentSpeak plan files of the BDI agent (data: `grid.asl` is the default)."""
