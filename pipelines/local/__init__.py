"""Developer tooling for one machine: the embedded platform (Kafka KRaft, Redis, the Apicurio
schema registry on loopback: ``python -m pipelines.local up|down|status|reset``), the JVM jars
fetched by Maven (``python -m pipelines.local.jars fetch``) and the event generator with its
injected faults (``fp-generate``)."""
