"""Per-user quotas kept in Redis (one atomic Lua call per check), shared by every replica."""
