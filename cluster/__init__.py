"""ringserve.cluster."""
