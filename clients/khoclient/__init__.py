"""khoclient: the Python client library for khod (DESIGN §6)."""
