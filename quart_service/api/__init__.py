"""The HTTP APIs: the OpenAI-compatible v1 API and the admin API."""
