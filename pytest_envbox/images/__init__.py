"""Images: references, registries, the store, safe unpacking (API.md section 6)."""
