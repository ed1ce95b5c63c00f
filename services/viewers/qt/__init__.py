"""The Qt desktop viewer (`gymbus viewer`), an optional extra (`gymbus[qt]`)."""
