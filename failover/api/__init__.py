"""The HTTP API and the operator's web page (aiohttp)."""
