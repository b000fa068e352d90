"""Workspaces (teams), their members, roles and seats."""
