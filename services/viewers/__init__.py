"""What shows runs: the live model both viewers share, the terminal dashboard, the Qt viewer,
grid-world drawing and episode replay."""
