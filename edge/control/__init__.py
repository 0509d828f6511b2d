"""The edge control plane: tunnel, enrollment, identity, desired state, artifact install, local rollback."""
