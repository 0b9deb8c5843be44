"""What producers run: the Python client, backfill from files, its rate limit."""
