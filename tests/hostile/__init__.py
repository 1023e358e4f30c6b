"""Hostile inputs: every bad input gets a clear answer and loses nothing."""
