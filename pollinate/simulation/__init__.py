"""pollinate.simulation."""
