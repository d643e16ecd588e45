"""pollinate.clientapp."""
