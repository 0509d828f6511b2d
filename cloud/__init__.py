"""The cloud controller: admin API, tunnel server, artifacts, rollouts and their store."""
