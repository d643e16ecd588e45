"""pollinate.client."""
