"""What the demo, the tests and bench/ share: child processes, a cuttable proxy, MQTT brokers, a bare ingestor, a line simulator, tiny models."""
