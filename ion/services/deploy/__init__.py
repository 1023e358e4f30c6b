"""The Deploy service: reads a deployment file and puts every dependency in place."""
