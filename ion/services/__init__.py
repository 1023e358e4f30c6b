"""Services built on the container core."""
