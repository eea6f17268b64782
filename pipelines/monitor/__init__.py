"""Is the platform keeping up: lag, staleness, dead-letter rate and online p99 measured from what
the jobs leave behind (:mod:`.check`), and the recorded history as an HTML page (:mod:`.report`)."""
