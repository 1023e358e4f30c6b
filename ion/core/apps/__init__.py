"""Apps: OTP-style ``.app`` and ``.rel`` files, the app manager and app supervisors (DESIGN §7)."""

from ion.core.apps.appfile import AppDefinition, ReleaseDefinition, load_app_file, load_rel_file

__all__ = ["AppDefinition", "ReleaseDefinition", "load_app_file", "load_rel_file"]
