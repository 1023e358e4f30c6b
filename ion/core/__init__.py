"""The container itself: lifecycle, messaging, processes, apps, shell.

Nothing under ``ion.core`` imports ``ion.services``.
"""
