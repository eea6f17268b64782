"""The Redis online store: newer-wins writes, key layout and encoding (:mod:`.store`), and the read
API a model server calls (:mod:`.serving`). Imports no Spark."""
