"""A test kit: start real daemons, wait for their workers and status, compare stores frame by frame."""
