"""The edge data plane: MQTT ingestion, payload checks, the durable outbox and sync back to the cloud."""
