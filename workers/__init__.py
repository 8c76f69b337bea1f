"""ringserve.workers."""
