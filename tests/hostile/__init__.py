"""Hostile inputs: requests, archives and filesystem races an attacker can bring about."""
