"""The broker's keys at rest: the KEK, sealing, and the keys table (see docs/deployment.md)."""
