"""Team governance: spend limits and overage requests, notifications, the audit log."""
