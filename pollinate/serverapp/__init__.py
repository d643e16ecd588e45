"""pollinate.serverapp."""
