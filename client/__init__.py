"""ringserve.client."""
