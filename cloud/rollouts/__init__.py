"""Staged rollouts: waves over a label selector, health gates, automatic rollback."""
