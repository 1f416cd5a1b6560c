"""The storage layer: every SQL statement of wxd, as synchronous functions over a
sqlite3.Connection run by store.db.Database. Imports no service and no tornado."""
