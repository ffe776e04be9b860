"""Integrations with other frameworks (each imported only when used)."""
