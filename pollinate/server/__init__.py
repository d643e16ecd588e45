"""pollinate.server."""
