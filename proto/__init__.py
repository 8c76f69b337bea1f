"""ringserve.proto."""
