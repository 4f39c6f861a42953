"""Just-in-time approval of elevated and privileged actions (docs/approvals.md)."""
