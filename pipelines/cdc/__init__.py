"""Change data capture: Debezium's change events of a database's tables into Delta and Redis."""
