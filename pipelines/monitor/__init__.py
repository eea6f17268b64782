"""Is the platform keeping up: lag and staleness measured from what the jobs leave behind."""
